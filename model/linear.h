// The three GEMMs of a linear layer y = x W^T (W (OC, IC) row-major, x (N, IC)) in the run's
// precision, DeepSeek-V3's mixed-precision recipe (report section 3.3):
//   fp32  as is;
//   bf16  both inputs of every GEMM rounded to BF16, FP32 accumulation;
//   fp8   both inputs E4M3 with FP32 scales (model/fp8_quant.h), FP32 accumulation: the
//         activation-like input scaled per 1x128 tile along the GEMM's reduction dimension,
//         the weight per 128x128 block. Forward x (1x128 along IC) . W; input gradient
//         dy (1x128 along OC) . W; weight gradient dy^T x, both 128x1 (the reduction runs
//         over the N tokens).
// The quantized GEMM is an exact emulation unless the backend multiplies the format
// natively: each input is fake-quantized (quantized and dequantized, bit for bit what a
// block-scaled FP8 GEMM multiplies) into scratch, then one FP32 GEMM (OpenBLAS, or cuBLAS
// without TF32), all through `ops`. Native bf16 (Ops::gemm_bf16_native, the CUDA backend):
// the operands are BF16 bits and the GEMM runs on them (tensor cores), the weight held as bits
// in wq's memory (wq is then not a float tensor). Native fp8 (Ops::gemm_fp8_native, cuBLASLt's
// block-scaled GEMMs on Hopper): wq's memory holds W's E4M3 codes, W^T's codes and both 128x128
// scale tables in cuBLASLt's layout (linear_fp8_weight_layout); each GEMM quantizes its activation
// operands into LinearScratch::a (forward x and input gradient dy in 1x128 tiles, weight
// gradient dy and x in 128x1 tiles whose codes are then transposed), the token rows padded
// with zeros to a multiple of 16, and multiplies the codes (Ops::gemm_fp8, the "TN" form
// only). The same tiles and scales as the emulation: only the FP32 sums' order differs. The
// weight arrives already quantized
// (linear_quantize_weight, once per optimizer step: every GEMM of the step reads the same
// copy); activations are quantized here. T = double (gradient checks) supports fp32 only.
#pragma once

#include <cstdint>

#include "model/arena.h"
#include "model/ops.h"
#include "model/types.h"

namespace moe {

// Quantized copies of GEMM inputs: two buffers of `capacity` elements each. fp32 needs none.
// Native FP8 builds its operands (E4M3 codes, scales in cuBLASLt's layouts, rows padded to 16)
// in `a` as bytes: capacity * sizeof(T) >= linear_fp8_scratch_bytes of every call.
// With `row_pad` (any precision) the GEMMs whose rows are tokens (forward, input gradient)
// go through cpu::gemm_rows_invariant: a token's output row then depends on its own input row
// only, not on how many rows share the call (the routed experts' GEMMs, whose row count
// the EP layout decides).
template <typename T>
struct LinearScratch {
  T* a = nullptr;
  T* b = nullptr;
  int64_t capacity = 0;
  T* row_pad = nullptr;
  int64_t row_pad_count = 0;
};

// A linear layer's input as its weight gradient needs it, saved by the forward in the GEMM
// input format instead of FP32 (DeepSeek-V3 report 3.3.3, low-precision storage): bf16 its
// BF16 bits; fp8 its E4M3 codes with the forward's own 1x128 scales, from which the weight
// gradient rebuilds 128x1 tiles (dequantize, quantize again). fp32 saves the float tensor
// itself and uses no LinearSaved. Rows of IC elements.
struct LinearSaved {
  uint16_t* bf16 = nullptr;  // (N, IC)
  uint8_t* codes = nullptr;  // (N, IC)
  float* scales = nullptr;   // (N, ceil(IC / 128))
};
// Bytes of a LinearSaved of N rows (0 for fp32), and its buffers carved from an arena.
int64_t linear_saved_bytes(int64_t N, int64_t IC, PrecisionMode mode);
LinearSaved linear_saved_carve(Carver& c, int64_t N, int64_t IC, PrecisionMode mode);
// The saved rows from row r0 on.
LinearSaved linear_saved_rows(const LinearSaved& x, int64_t r0, int64_t IC);

// Native FP8: bytes of LinearScratch::a that the three GEMMs of a linear layer of `rows`
// tokens (or fewer) need: the largest of its forward, input-gradient and weight-gradient plans.
int64_t linear_fp8_scratch_bytes(int64_t rows, int64_t IC, int64_t OC);
// Native FP8: where a weight copy's parts lie, bytes from wq (the codes at 0). Both widths
// must be multiples of 16 (cuBLASLt FP8), and `total` fits the OC x IC floats the copy has.
struct LinearFp8Weight {
  int64_t codes_t = 0;   // W^T (IC, OC) codes, the input gradient's operand
  int64_t scales = 0;    // W's 128x128 scales, kBlock128 layout over (OC, IC)
  int64_t scales_t = 0;  // W^T's, kBlock128 layout over (IC, OC)
  int64_t tmp = 0;       // fp8_quantize's compact scales and their transpose, while quantizing
  int64_t tmp_t = 0;
  int64_t total = 0;
};
LinearFp8Weight linear_fp8_weight_layout(int64_t OC, int64_t IC);

// wq (OC, IC) with row stride ld <- w in the mode's GEMM input format (a copy for fp32;
// BF16 bits in wq's first half when the backend multiplies BF16 natively). In place allowed
// (wq == w) except for native BF16.
template <typename T>
void linear_quantize_weight(Ops<T>& ops, T* wq, const T* w, int64_t OC, int64_t IC, int64_t ld,
                            PrecisionMode mode);

// out (N, OC) = x (N, IC) . wq^T. With `save` (bf16 / fp8), x is also saved there in the GEMM
// input format, for linear_backward_weight_saved.
template <typename T>
void linear_forward(Ops<T>& ops, T* out, const T* x, const T* wq, int64_t N, int64_t IC, int64_t OC,
                    PrecisionMode mode, const LinearScratch<T>& s,
                    const LinearSaved* save = nullptr);
// out (N, OC) = x . wq^T for a second GEMM that reads an input an earlier linear_forward
// saved (fp32: the float tensor x_fp32 itself; otherwise `saved`, x_fp32 unread): the same
// operand, not quantized again.
template <typename T>
void linear_forward_saved(Ops<T>& ops, T* out, const T* x_fp32, const LinearSaved& saved,
                          const T* wq, int64_t N, int64_t IC, int64_t OC, PrecisionMode mode,
                          const LinearScratch<T>& s);
// dx (N, IC) = dout (N, OC) . wq, assigned; added to dx when `accumulate` (a layer input
// that feeds several branches).
template <typename T>
void linear_backward_input(Ops<T>& ops, T* dx, const T* dout, const T* wq, int64_t N, int64_t IC, int64_t OC,
                           PrecisionMode mode, const LinearScratch<T>& s,
                           bool accumulate = false);
// dw (OC, IC) += dout^T (OC, N) . x (N, IC). blocks (n_blocks + 1 row offsets from 0 to N;
// null: one block) split the tokens into groups whose FP8 128x1 tiles start afresh, as if
// each were zero-padded to a multiple of 128 rows (the routed experts' rows from different
// EP ranks), so the rounding does not depend on which rows share a GEMM.
template <typename T>
void linear_backward_weight(Ops<T>& ops, T* dw, const T* dout, const T* x, int64_t N, int64_t IC, int64_t OC,
                            PrecisionMode mode, const LinearScratch<T>& s,
                            const int64_t* blocks = nullptr, int64_t n_blocks = 1);
// The same from what the forward saved of x: in fp32 the float tensor x itself, otherwise
// `saved` (x is not read and may be scratch the forward has reused).
template <typename T>
void linear_backward_weight_saved(Ops<T>& ops, T* dw, const T* dout, const T* x, const LinearSaved& saved,
                                  int64_t N, int64_t IC, int64_t OC, PrecisionMode mode,
                                  const LinearScratch<T>& s, const int64_t* blocks = nullptr,
                                  int64_t n_blocks = 1);

}  // namespace moe
