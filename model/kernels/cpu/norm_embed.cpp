// Token embedding, RMSNorm and the residual add.
//
// Shapes: tokens (N); wte / dwte (V, C); inp, out, dout, dinp (N, C); weight (C); rstd (N).
// Accumulation: dwte and dweight ACCUMULATE; rmsnorm_backward_input ACCUMULATES into dinp
// (inp is the residual stream); embedding_forward and residual_forward assign.
// Determinism: every output element is reduced in a fixed order owned by one thread, so
// results are bitwise identical for any thread count. Reductions over rows (dwte, dweight)
// are parallel over column blocks, never atomics.
// Precision: rmsnorm sums of squares and row dot products accumulate in double (for float
// inputs too): it costs little next to the loads and keeps rstd accurate for wide rows.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "model/check.h"
#include "model/kernels/cpu/dense_ops.h"

namespace moe::cpu {

namespace {

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelMin = 1 << 14;
// Column block for row reductions: a multiple of a cache line so threads never share one.
constexpr int64_t kColBlock = 64;

}  // namespace

template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* wte, int64_t N, int64_t C) {
  CHECK(N >= 0 && C >= 0, "N=%lld C=%lld", static_cast<long long>(N), static_cast<long long>(C));
#pragma omp parallel for schedule(static) if (N * C >= kParallelMin)
  for (int64_t n = 0; n < N; ++n) {
    CHECK(tokens[n] >= 0, "token %d at row %lld", tokens[n], static_cast<long long>(n));
    std::memcpy(out + n * C, wte + static_cast<int64_t>(tokens[n]) * C,
                static_cast<size_t>(C) * sizeof(T));
  }
}

template <typename T>
void embedding_backward(T* dwte, const T* dout, const int32_t* tokens, int64_t N, int64_t C) {
  CHECK(N >= 0 && C >= 0, "N=%lld C=%lld", static_cast<long long>(N), static_cast<long long>(C));
  const int64_t nblocks = (C + kColBlock - 1) / kColBlock;
  // Each thread owns a column block of every dwte row and walks the tokens in order.
#pragma omp parallel for schedule(static) if (N * C >= kParallelMin)
  for (int64_t cb = 0; cb < nblocks; ++cb) {
    const int64_t c0 = cb * kColBlock;
    const int64_t c1 = c0 + kColBlock < C ? c0 + kColBlock : C;
    for (int64_t n = 0; n < N; ++n) {
      T* dst = dwte + static_cast<int64_t>(tokens[n]) * C;
      const T* src = dout + n * C;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
    }
  }
}

template <typename T>
void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* weight, int64_t N, int64_t C, T eps) {
  CHECK(N >= 0 && C > 0, "N=%lld C=%lld", static_cast<long long>(N), static_cast<long long>(C));
#pragma omp parallel for schedule(static) if (N * C >= kParallelMin)
  for (int64_t n = 0; n < N; ++n) {
    const T* x = inp + n * C;
    double ss = 0.0;
#pragma omp simd reduction(+ : ss)
    for (int64_t c = 0; c < C; ++c) ss += static_cast<double>(x[c]) * x[c];
    const T r = static_cast<T>(1.0 / std::sqrt(ss / static_cast<double>(C) + eps));
    rstd[n] = r;
    T* o = out + n * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] = x[c] * r * weight[c];
  }
}

// With y = x r w and r = (mean(x^2) + eps)^(-1/2):
//   dx_c = r w_c g_c - x_c r^3 / C * sum_j g_j w_j x_j.
template <typename T>
void rmsnorm_backward_input(T* dinp, const T* dout, const T* inp, const T* weight, const T* rstd,
                            int64_t N, int64_t C) {
  CHECK(N >= 0 && C > 0, "N=%lld C=%lld", static_cast<long long>(N), static_cast<long long>(C));
#pragma omp parallel for schedule(static) if (N * C >= kParallelMin)
  for (int64_t n = 0; n < N; ++n) {
    const T* x = inp + n * C;
    const T* g = dout + n * C;
    double dot = 0.0;
#pragma omp simd reduction(+ : dot)
    for (int64_t c = 0; c < C; ++c) dot += static_cast<double>(g[c]) * weight[c] * x[c];
    const T r = rstd[n];
    const T k = static_cast<T>(dot * r * r * r / static_cast<double>(C));
    T* dx = dinp + n * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) dx[c] += r * weight[c] * g[c] - x[c] * k;
  }
}

template <typename T>
void rmsnorm_backward_weight(T* dweight, const T* dout, const T* inp, const T* rstd, int64_t N,
                             int64_t C) {
  CHECK(N >= 0 && C > 0, "N=%lld C=%lld", static_cast<long long>(N), static_cast<long long>(C));
  const int64_t nblocks = (C + kColBlock - 1) / kColBlock;
#pragma omp parallel for schedule(static) if (N * C >= kParallelMin)
  for (int64_t cb = 0; cb < nblocks; ++cb) {
    const int64_t c0 = cb * kColBlock;
    const int64_t c1 = c0 + kColBlock < C ? c0 + kColBlock : C;
    T acc[kColBlock] = {};
    for (int64_t n = 0; n < N; ++n) {
      const T r = rstd[n];
      const T* x = inp + n * C;
      const T* g = dout + n * C;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) acc[c - c0] += g[c] * x[c] * r;
    }
    for (int64_t c = c0; c < c1; ++c) dweight[c] += acc[c - c0];
  }
}

template <typename T>
void residual_forward(T* out, const T* a, const T* b, int64_t n) {
  CHECK(n >= 0, "n=%lld", static_cast<long long>(n));
#pragma omp parallel for simd schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

#define MOE_INSTANTIATE(T)                                                                      \
  template void embedding_forward<T>(T*, const int32_t*, const T*, int64_t, int64_t);           \
  template void embedding_backward<T>(T*, const T*, const int32_t*, int64_t, int64_t);          \
  template void rmsnorm_forward<T>(T*, T*, const T*, const T*, int64_t, int64_t, T);            \
  template void rmsnorm_backward_input<T>(T*, const T*, const T*, const T*, const T*, int64_t,  \
                                          int64_t);                                             \
  template void rmsnorm_backward_weight<T>(T*, const T*, const T*, const T*, int64_t, int64_t); \
  template void residual_forward<T>(T*, const T*, const T*, int64_t);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe::cpu
