// Host-side planning for the CUDA GEMM layer (gemm_cublas.h): plain C++, no CUDA headers,
// compiled into the core library and tested on every machine.
//
// What lives here: the precisions, the cuBLASLt workspace size, the scratch of the peak
// FLOP/s measurement, the FP8 scale layouts cuBLASLt's block-scaled GEMMs read (with host
// converters from model/fp8_quant.h's layout), and the alignment check of a model's linear
// shapes against what the FP8 GEMMs need.
//
// FP8 GEMM contract (Hopper, sm_90, cuBLASLt 12.9+ block scaling), row-major:
//   C (M, N) = alpha * A (M, K) . B (N, K)^T + beta * C        both inputs K-contiguous
// This is cuBLASLt's "TN" form, the only one its FP8 kernels take on sm_90; the other
// orientations of a linear layer are brought to it with transposed copies (input gradient:
// W^T, whose 128x128 blocks are W's blocks transposed; weight gradient: dY^T and X^T, whose
// 1x128 tiles are the 128x1 tiles of dY and X).
// Each input is scaled either per 1x128 tile along K (kTile1x128: activations) or per 128x128
// block (kBlock128: weights); two kBlock128 inputs are not supported by cuBLASLt.
// Scale layouts (FP32), for an input of R rows and K columns, L = ceil(K / 128):
//   kTile1x128  (L, R) row-major, compact: scale of row r, k-tile b at b * R + r
//               (cuBLASLt's "M-major M x L"; NOTE: the transpose of fp8_quantize's (R, L)).
//   kBlock128   (ceil(R / 128), L4) row-major, L4 = L rounded up to a multiple of 4: block
//               (p, b) at p * L4 + b, columns b >= L unused (cuBLASLt's "K-major L4 x ..";
//               fp8_quantize's (ceil(R / 128), L) with its rows padded to L4).
// Alignment (cuBLASLt FP8): data and scale pointers 16-byte aligned; K, lda, ldb multiples
// of 16 elements; M, N, ldc multiples of 4. A model's linears therefore need both widths
// multiples of 16 (gemm_fp8_shapes_check), and every token count fed to an FP8 GEMM a
// multiple of 16 (the routed experts' rows are padded to kFp8RowAlign).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "model/types.h"

namespace moe::cuda {

// kFp32: FP32 inputs and math; kTf32: FP32 inputs on TF32 tensor cores; kBf16: BF16 inputs
// (uint16_t bits); kFp8: E4M3 codes (uint8_t) with block scales. FP32 accumulation and
// FP32 output in every case.
enum class GemmPrecision { kFp32, kTf32, kBf16, kFp8 };
const char* gemm_precision_name(GemmPrecision p);

// How an FP8 input is scaled (layouts in the file header).
enum class Fp8Scaling { kTile1x128, kBlock128 };

constexpr int64_t kFp8ScaleBlock = 128;  // tile / block edge of the DeepSeek-V3 recipe
constexpr int64_t kFp8DimAlign = 16;     // K, lda, ldb (elements = bytes for E4M3)
constexpr int64_t kFp8OuterAlign = 4;    // M, N, ldc (scale layouts, FP32 output rows)
constexpr int64_t kFp8RowAlign = 16;     // token rows per FP8 GEMM (they become K in dW)
constexpr size_t kGemmPtrAlign = 16;     // data and scale pointers
constexpr size_t kGemmWorkspaceAlign = 256;

// cuBLASLt workspace for a device of compute capability `sm_major`.x: 32 MiB on Hopper and
// later (NVIDIA's recommendation for sm_90), 4 MiB before.
size_t gemm_workspace_bytes(int sm_major);

// Default edge of the square GEMM measure_peak_flops times, and the device scratch it takes
// for an n x n x n GEMM in precision p (A, B, C and, for fp8, both scale tensors).
constexpr int64_t kPeakGemmDim = 8192;
// Byte offsets of its buffers in the scratch (each 256-byte aligned): A (n, n) and B (n, n)
// in the precision's storage, C (n, n) FP32, fp8's scales (A kTile1x128, B kBlock128).
struct PeakScratchLayout {
  size_t a = 0, b = 0, c = 0, a_scales = 0, b_scales = 0, total = 0;
};
PeakScratchLayout gemm_peak_scratch_layout(GemmPrecision p, int64_t n = kPeakGemmDim);
size_t gemm_peak_scratch_bytes(GemmPrecision p, int64_t n = kPeakGemmDim);
// Bytes of one element of a GEMM input in precision p.
size_t gemm_input_bytes(GemmPrecision p);

// ---- FP8 scale layouts -----------------------------------------------------------------

int64_t fp8_gemm_ktiles(int64_t K);  // L = ceil(K / 128)
// Row stride of a kBlock128 scale tensor: L rounded up to a multiple of 4.
int64_t fp8_gemm_block_scale_ld(int64_t K);
// Elements of the scale tensor of an (R, K) input.
int64_t fp8_gemm_scale_count(int64_t R, int64_t K, Fp8Scaling s);
// Index of the scale that covers element (r, k).
int64_t fp8_gemm_scale_index(int64_t r, int64_t k, int64_t R, int64_t K, Fp8Scaling s);
// dst (GEMM layout, fp8_gemm_scale_count elements, padding zeroed) <- src in fp8_quantize's
// layout: (R, L) for kTile1x128 (quantized with kTileAct), (ceil(R / 128), L) for kBlock128
// (kTileWeight).
void fp8_gemm_scales_from_quant(float* dst, const float* src, int64_t R, int64_t K,
                                Fp8Scaling s);

// ---- Grouped expert GEMMs (gemm_experts_*) -----------------------------------------------
// Expert e owns rows [row_offsets[e], row_offsets[e + 1]) of the token matrices (E + 1
// offsets from 0, nondecreasing). FP8 scale tensors of the token matrices are per expert,
// each expert's block compact and the blocks in expert order:
//   forward / input gradient: the (n_e, K) rows of expert e, kTile1x128, start at
//     row_offsets[e] * ceil(K / 128);
//   weight gradient: the transposed copies dY_e^T (OC, n_e), X_e^T (IC, n_e), data compact per
//     expert at row_offsets[e] * OC (or IC), scales (kTile1x128 over K = n_e) at
//     fp8_expert_t_scale_offset(row_offsets, e, OC (or IC)).
int64_t fp8_expert_t_scale_offset(const int64_t* row_offsets, int64_t e, int64_t R);
int64_t fp8_expert_t_scale_count(const int64_t* row_offsets, int64_t E, int64_t R);

// ---- Model shapes ------------------------------------------------------------------------

// The widths that decide a model's linear-layer GEMMs (io/config's resolved values).
struct GemmModelShape {
  AttentionKind attn = AttentionKind::kMha;
  int64_t d_model = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;  // head_dim: MHA
  int64_t d_ff = 0;                                                 // dense FFN width
  int64_t d_expert = 0, num_experts = 0;
  int64_t d_shared = 0;  // the shared experts' total width (0: none)
  int64_t q_lora_rank = 0, kv_lora_rank = 0;  // MLA; q_lora_rank 0: wq instead of wq_a/wq_b
  int64_t qk_nope_head_dim = 0, qk_rope_head_dim = 0, v_head_dim = 0;
  int64_t vocab_size = 0;
  int64_t mtp_depth = 0;  // > 0: the MTP modules' mtp/eh_proj (d_model, 2 d_model)
};

// kRun: the GEMMs follow the run's precision mode (FP8 in fp8); kHigh: they stay in higher
// precision whatever the mode (the router and the output head, DeepSeek-V3 report 3.3.1; the
// MTP modules' eh_proj, which the model keeps beside the head).
enum class LinearPrecision { kRun, kHigh };

// A linear layer's weight (out_features, in_features); routed: its token rows are the routed
// experts' (dispatched) rows rather than the batch's tokens.
struct GemmLinearShape {
  std::string name;
  int64_t out_features = 0, in_features = 0;
  LinearPrecision precision = LinearPrecision::kRun;
  bool routed = false;
};

// Every distinct linear of the model, fused where the model fuses (attn/wqkv, */w13).
std::vector<GemmLinearShape> gemm_linear_shapes(const GemmModelShape& m);

// The first violation of the FP8 GEMM alignment among the kRun shapes ("" when none), e.g.
// "FP8 GEMM: layer attn/wkv_b has out_features = 200, not a multiple of 16 (cuBLASLt FP8
// needs K and leading dimensions in multiples of 16 elements)".
std::string gemm_fp8_shape_error(const std::vector<GemmLinearShape>& shapes);
// The same as a UserError (precision.mode = "fp8" on a CUDA device).
void gemm_fp8_shapes_check(const std::vector<GemmLinearShape>& shapes);

}  // namespace moe::cuda
