// The GEMM layer on the GPU: cuBLAS / cuBLASLt behind row-major entry points that mirror
// cpu::gemm (model/kernels/cpu/dense_ops.h). Plain C++ (no CUDA types); device pointers.
//
// Row-major semantics, as cpu::gemm: C (M, N) = alpha op(A) op(B) + beta C, op(X) = X or
// X^T by trans_a / trans_b, leading dimensions are row strides (>= the stored row length).
// M == 0 or N == 0 does nothing; K == 0 leaves beta C (0 where beta == 0, never 0 * NaN).
// beta == 0 never reads C. Accumulation is FP32 in every precision, output FP32.
// Every call runs on the context's stream, asynchronously; nothing here synchronizes.
//
// Precisions (model/kernels/cuda/gemm_plan.h): fp32 / tf32 (float), bf16 (uint16_t BF16
// bits), fp8 (uint8_t E4M3 codes with FP32 block scales, the layouts and alignment in
// gemm_plan.h). FP8 runs only the row-major form C = A B^T (cuBLASLt's "TN", the only FP8
// form on Hopper) on sm_90 (cuBLASLt's 1x128 / 128x128 block scaling is sm_90 only);
// anything else is a CHECK failure that says so.
#pragma once

#include <cstddef>
#include <cstdint>

#include "model/kernels/cuda/cuda_backend.h"
#include "model/kernels/cuda/gemm_plan.h"

namespace moe::cuda {

// One per rank and device: the cuBLAS and cuBLASLt handles, the workspace (a caller-owned
// device buffer of gemm_workspace_bytes(), 256-byte aligned, never allocated here), the
// bound stream, the device's compute capability and a cache of cuBLASLt FP8 algorithms.
// NOTE: cuBLAS and cuBLASLt calls share the one workspace, safe because they all run on the
// bound stream; after gemm_context_set_stream the caller orders the old and the new stream.
struct GemmContext;

GemmContext* gemm_context_create(void* workspace, size_t workspace_bytes, Stream stream);
void gemm_context_destroy(GemmContext* ctx);
void gemm_context_set_stream(GemmContext& ctx, Stream stream);
Stream gemm_context_stream(const GemmContext& ctx);
// sm_90: cuBLASLt's 1x128 / 128x128 FP8 block scaling is available.
bool gemm_fp8_block_scaling_supported(const GemmContext& ctx);

// FP32 inputs; Fp32Math picks exact FP32 math or TF32 tensor cores (inputs rounded to TF32).
enum class Fp32Math { kFp32, kTf32 };
void gemm_f32(GemmContext& ctx, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
              float alpha, const float* A, int64_t lda, const float* B, int64_t ldb, float beta,
              float* C, int64_t ldc, Fp32Math math = Fp32Math::kFp32);

// BF16 inputs (bits), FP32 accumulation and output.
void gemm_bf16(GemmContext& ctx, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
               float alpha, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb,
               float beta, float* C, int64_t ldc);

// E4M3 inputs with block scales: C (M, N) = alpha A (M, K) B (N, K)^T + beta C; trans_a must
// be false and trans_b true. a_scales / b_scales in the layout of a_mode / b_mode for an
// (M, K) / (N, K) input (gemm_plan.h); not both kBlock128.
void gemm_fp8(GemmContext& ctx, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
              float alpha, const uint8_t* A, int64_t lda, const float* a_scales,
              Fp8Scaling a_mode, const uint8_t* B, int64_t ldb, const float* b_scales,
              Fp8Scaling b_mode, float beta, float* C, int64_t ldc);

// ---- Grouped expert GEMMs -----------------------------------------------------------------
// The routed experts' rows are contiguous per expert: expert e owns rows [row_offsets[e],
// row_offsets[e + 1]) (host array of E + 1 offsets from 0; empty experts allowed and skipped)
// of the token matrices; weights are stacked (E, ...). One cuBLAS / cuBLASLt call per
// non-empty expert, all on the context's stream.
// An input as stored for the precision: `data` is float (fp32 / tf32), uint16_t (bf16) or
// uint8_t (fp8, then `scales` as gemm_plan.h lays them out for grouped GEMMs).
struct GemmInput {
  const void* data = nullptr;
  const float* scales = nullptr;
};

// Forward: Y_e (n_e, OC) = X_e (n_e, IC) W_e^T, W (E, OC, IC); Y assigned.
void gemm_experts_forward(GemmContext& ctx, GemmPrecision p, float* Y, GemmInput X,
                          GemmInput W, const int64_t* row_offsets, int64_t E, int64_t IC,
                          int64_t OC);
// Input gradient: dX_e (n_e, IC) = dY_e (n_e, OC) W_e, assigned (added when `accumulate`).
// W as in the forward (E, OC, IC), except fp8: the transposed weights Wt (E, IC, OC) with
// their 128x128 block scales (Hopper's FP8 is TN only).
enum class GemmOutput { kAssign, kAccumulate };
void gemm_experts_backward_input(GemmContext& ctx, GemmPrecision p, float* dX, GemmInput dY,
                                 GemmInput W, const int64_t* row_offsets, int64_t E,
                                 int64_t IC, int64_t OC, GemmOutput out = GemmOutput::kAssign);
// Weight gradient: dW_e (OC, IC) += dY_e^T X_e, dW (E, OC, IC) FP32. dY (rows, OC) and
// X (rows, IC) as the token matrices, except fp8: the per-expert transposed copies dY_e^T
// (OC, n_e) and X_e^T (IC, n_e), each expert's block compact at row_offsets[e] * OC (IC),
// 1x128 scales along n_e at fp8_expert_t_scale_offset (gemm_plan.h).
void gemm_experts_backward_weight(GemmContext& ctx, GemmPrecision p, float* dW, GemmInput dY,
                                  GemmInput X, const int64_t* row_offsets, int64_t E,
                                  int64_t IC, int64_t OC);

// Peak dense GEMM throughput in FLOP/s (the MFU denominator of `moetrain bench`): an
// n x n x n GEMM in precision p (kBf16 or kFp8; kFp32 / kTf32 also work) timed with events
// over `iters` runs after `warmup`, on `stream`. scratch: gemm_peak_scratch_bytes(p, n)
// device bytes, 256-byte aligned, overwritten. Synchronizes the stream.
double measure_peak_flops(GemmContext& ctx, GemmPrecision p, void* scratch,
                          size_t scratch_bytes, Stream stream, int64_t n = kPeakGemmDim,
                          int warmup = 3, int iters = 10);

}  // namespace moe::cuda
