// The three GEMMs of a linear layer y = x W^T (W (OC, IC) row-major, x (N, IC)) in the run's
// precision, DeepSeek-V3's mixed-precision recipe (report section 3.3):
//   fp32  as is;
//   bf16  both inputs of every GEMM rounded to BF16, FP32 accumulation;
//   fp8   both inputs E4M3 with FP32 scales (model/fp8_quant.h), FP32 accumulation: the
//         activation-like input scaled per 1x128 tile along the GEMM's reduction dimension,
//         the weight per 128x128 block. Forward x (1x128 along IC) . W; input gradient
//         dy (1x128 along OC) . W; weight gradient dy^T x, both 128x1 (the reduction runs
//         over the N tokens).
// On CPU the quantized GEMM is an exact emulation: each input is fake-quantized (quantized
// and dequantized, bit for bit what a block-scaled FP8 GEMM multiplies) into scratch, then
// one FP32 OpenBLAS GEMM. The weight arrives already quantized (linear_quantize_weight, once
// per optimizer step: every GEMM of the step reads the same copy); activations are
// quantized here. T = double (gradient checks) supports fp32 only.
#pragma once

#include <cstdint>

#include "model/types.h"

namespace moe {

// Quantized copies of GEMM inputs: two buffers of `capacity` elements each. fp32 needs none.
template <typename T>
struct LinearScratch {
  T* a = nullptr;
  T* b = nullptr;
  int64_t capacity = 0;
};

// wq (OC, IC) with row stride ld <- w in the mode's GEMM input format (a copy for fp32).
// In place allowed (wq == w).
template <typename T>
void linear_quantize_weight(T* wq, const T* w, int64_t OC, int64_t IC, int64_t ld,
                            PrecisionMode mode);

// out (N, OC) = x (N, IC) . wq^T
template <typename T>
void linear_forward(T* out, const T* x, const T* wq, int64_t N, int64_t IC, int64_t OC,
                    PrecisionMode mode, const LinearScratch<T>& s);
// dx (N, IC) = dout (N, OC) . wq (assigned)
template <typename T>
void linear_backward_input(T* dx, const T* dout, const T* wq, int64_t N, int64_t IC, int64_t OC,
                           PrecisionMode mode, const LinearScratch<T>& s);
// dw (OC, IC) += dout^T (OC, N) . x (N, IC)
template <typename T>
void linear_backward_weight(T* dw, const T* dout, const T* x, int64_t N, int64_t IC, int64_t OC,
                            PrecisionMode mode, const LinearScratch<T>& s);

}  // namespace moe
