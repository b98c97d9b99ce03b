// Rotary position embedding (interleaved pairs), applied in place.
//
// Shapes: cos / sin tables (T, HD/2); x / dx viewed as (B, T, H, HD) with `stride` elements
// between consecutive tokens, so q and k can be rotated inside a fused qkv row.
// Pair i of a head is (x[2i], x[2i+1]); at position t it turns by angle(t, i) = t * theta^(-2i/HD).
// Backward applies the transpose (a turn by -angle); dx is overwritten, i.e. assigned.
#include <cmath>
#include <cstdint>

#include "model/check.h"
#include "model/kernels/cpu/dense_ops.h"
#include "model/rope_math.h"

namespace moe::cpu {

namespace {

constexpr int64_t kParallelMin = 1 << 14;

// sign = +1 rotates by +angle (forward), -1 by -angle (backward).
template <typename T>
void rope_apply(T* x, const T* cos_t, const T* sin_t, int64_t B, int64_t T_, int64_t H, int64_t HD,
                int64_t stride, T sign) {
  CHECK(B >= 0 && T_ >= 0 && H >= 0 && HD > 0 && HD % 2 == 0, "rope HD=%lld must be even",
        static_cast<long long>(HD));
  CHECK(stride >= H * HD, "stride=%lld < H*HD", static_cast<long long>(stride));
  const int64_t half = HD / 2;
#pragma omp parallel for schedule(static) if (B * T_ * H * HD >= kParallelMin)
  for (int64_t bt = 0; bt < B * T_; ++bt) {
    const int64_t t = bt % T_;
    const T* c = cos_t + t * half;
    const T* s = sin_t + t * half;
    for (int64_t h = 0; h < H; ++h) {
      T* v = x + bt * stride + h * HD;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const RopePair<T> y = rope_rotate(v[2 * i], v[2 * i + 1], c[i], sign * s[i]);
        v[2 * i] = y.x0;
        v[2 * i + 1] = y.x1;
      }
    }
  }
}

}  // namespace

template <typename T>
void rope_tables(T* cos_out, T* sin_out, int64_t T_, int64_t HD, double theta) {
  CHECK(T_ >= 0 && HD > 0 && HD % 2 == 0 && theta > 0.0, "T=%lld HD=%lld theta=%g",
        static_cast<long long>(T_), static_cast<long long>(HD), theta);
  const int64_t half = HD / 2;
  for (int64_t t = 0; t < T_; ++t) {
    for (int64_t i = 0; i < half; ++i) {
      const double angle = rope_angle(t, i, HD, theta);
      cos_out[t * half + i] = static_cast<T>(std::cos(angle));
      sin_out[t * half + i] = static_cast<T>(std::sin(angle));
    }
  }
}

template <typename T>
void rope_forward(T* x, const T* cos_t, const T* sin_t, int64_t B, int64_t T_, int64_t H,
                  int64_t HD, int64_t stride) {
  rope_apply(x, cos_t, sin_t, B, T_, H, HD, stride, T(1));
}

template <typename T>
void rope_backward(T* dx, const T* cos_t, const T* sin_t, int64_t B, int64_t T_, int64_t H,
                   int64_t HD, int64_t stride) {
  rope_apply(dx, cos_t, sin_t, B, T_, H, HD, stride, T(-1));
}

#define MOE_INSTANTIATE(T)                                                                   \
  template void rope_tables<T>(T*, T*, int64_t, int64_t, double);                            \
  template void rope_forward<T>(T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t,  \
                                int64_t);                                                    \
  template void rope_backward<T>(T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, \
                                 int64_t);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe::cpu
