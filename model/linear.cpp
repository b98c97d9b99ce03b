#include "model/linear.h"

#include <type_traits>

#include "model/check.h"
#include "model/fp8_quant.h"
#include "model/kernels/cpu/dense_ops.h"

namespace moe {

namespace {

// dst (R, C) <- src in the mode's GEMM input format, tiles per `tile` (fp8).
void quantize_input(float* dst, const float* src, int64_t R, int64_t C, PrecisionMode mode,
                    Fp8Tile tile) {
  if (mode == PrecisionMode::kFp8) {
    fp8_fake_quantize(dst, src, R, C, tile);
  } else {
    bf16_fake_quantize(dst, src, R * C);
  }
}

template <typename T>
bool exact(PrecisionMode mode) {
  if constexpr (!std::is_same_v<T, float>)
    CHECK(mode == PrecisionMode::kFp32, "BF16 / FP8 GEMMs need float tensors");
  return mode == PrecisionMode::kFp32;
}

template <typename T>
void check_room(const LinearScratch<T>& s, int64_t n) {
  CHECK(s.a && s.b && n <= s.capacity, "linear scratch of %lld elements, %lld needed",
        (long long)s.capacity, (long long)n);
}

}  // namespace

template <typename T>
void linear_quantize_weight(T* wq, const T* w, int64_t OC, int64_t IC, int64_t ld,
                            PrecisionMode mode) {
  if (exact<T>(mode)) {
    if (wq == w) return;
    for (int64_t r = 0; r < OC; ++r)
      for (int64_t c = 0; c < IC; ++c) wq[r * ld + c] = w[r * ld + c];
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (mode == PrecisionMode::kFp8) {
      fp8_fake_quantize_ld(wq, ld, w, ld, OC, IC, kTileWeight);
    } else {
      for (int64_t r = 0; r < OC; ++r) bf16_fake_quantize(wq + r * ld, w + r * ld, IC);
    }
  }
}

template <typename T>
void linear_forward(T* out, const T* x, const T* wq, int64_t N, int64_t IC, int64_t OC,
                    PrecisionMode mode, const LinearScratch<T>& s) {
  if (exact<T>(mode)) return cpu::matmul_forward<T>(out, x, wq, N, IC, OC);
  if constexpr (std::is_same_v<T, float>) {
    check_room(s, N * IC);
    quantize_input(s.a, x, N, IC, mode, kTileAct);
    cpu::matmul_forward<float>(out, s.a, wq, N, IC, OC);
  }
}

template <typename T>
void linear_backward_input(T* dx, const T* dout, const T* wq, int64_t N, int64_t IC, int64_t OC,
                           PrecisionMode mode, const LinearScratch<T>& s) {
  if (exact<T>(mode)) return cpu::matmul_backward_input<T>(dx, dout, wq, N, IC, OC);
  if constexpr (std::is_same_v<T, float>) {
    check_room(s, N * OC);
    quantize_input(s.a, dout, N, OC, mode, kTileAct);
    cpu::matmul_backward_input<float>(dx, s.a, wq, N, IC, OC);
  }
}

template <typename T>
void linear_backward_weight(T* dw, const T* dout, const T* x, int64_t N, int64_t IC, int64_t OC,
                            PrecisionMode mode, const LinearScratch<T>& s) {
  if (exact<T>(mode)) return cpu::matmul_backward_weight<T>(dw, dout, x, N, IC, OC);
  if constexpr (std::is_same_v<T, float>) {
    check_room(s, N * (IC > OC ? IC : OC));
    quantize_input(s.a, dout, N, OC, mode, kTileActT);
    quantize_input(s.b, x, N, IC, mode, kTileActT);
    cpu::matmul_backward_weight<float>(dw, s.a, s.b, N, IC, OC);
  }
}

#define MOE_INSTANTIATE(T)                                                                     \
  template void linear_quantize_weight<T>(T*, const T*, int64_t, int64_t, int64_t,            \
                                          PrecisionMode);                                     \
  template void linear_forward<T>(T*, const T*, const T*, int64_t, int64_t, int64_t,          \
                                  PrecisionMode, const LinearScratch<T>&);                    \
  template void linear_backward_input<T>(T*, const T*, const T*, int64_t, int64_t, int64_t,   \
                                         PrecisionMode, const LinearScratch<T>&);             \
  template void linear_backward_weight<T>(T*, const T*, const T*, int64_t, int64_t, int64_t,  \
                                          PrecisionMode, const LinearScratch<T>&);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
