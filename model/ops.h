// The backend interface (DESIGN "Ops / backend"): every kernel and memory operation the
// training step runs, over the memory of one device. The model's code calls only this; the
// CPU implementation (model/ops_cpu.cpp) forwards to model/kernels/cpu, the CUDA one
// (model/kernels/cuda/cuda_ops.cu, float only) to model/kernels/cuda on the backend's stream.
//
// Memory: every pointer is memory of the backend's device (an arena built for it) unless its
// name ends in `_host`. Device work is ordered on the backend's stream and may still be running
// when a call returns; the calls that hand back a host value (the `_host` outputs, the
// double returns) wait for what they read, and say so. Semantics, argument order and the
// accumulation contract are the CPU kernels' (model/kernels/cpu/dense_ops.h, moe_ops.h,
// model/fp8_quant.h): the same arguments give the same result on every backend, within the
// tolerances tests/gpu pins.
//
// T is float for training and double for gradient checks (CPU only). The quantization calls
// take float whatever T is: they serve the BF16 / FP8 GEMM inputs, which only float models have.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "model/fp8_quant.h"
#include "model/kernels/cuda/gemm_plan.h"
#include "model/types.h"

namespace moe {

// The largest call a step makes, for backends that size their scratch once, up front (no
// allocation inside a step). model_build fills it from the dims and the micro-batch size.
struct OpsLimits {
  int64_t tokens = 0;   // tokens per micro-batch, N = B T (a MoE call's permuted rows: N K)
  int64_t width = 0;    // the widest RMSNorm row (C, q_lora, kv_lora)
  int64_t batch = 0;    // sequences per micro-batch (B)
  int64_t seq_len = 0;  // T
  int64_t experts = 0;  // E (0 without MoE layers)
  int64_t top_k = 0;    // K
};

template <typename T>
class Ops {
 public:
  virtual ~Ops() = default;
  virtual Device device() const = 0;

  // ---- memory ----------------------------------------------------------------------------
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;
  virtual void zero(void* dst, size_t bytes) = 0;
  // dst (rows, cols), rows ld_dst apart <- src (rows, cols), rows ld_src apart (elements).
  virtual void copy_rows(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t rows,
                         int64_t cols) = 0;
  // dst += src over (rows, cols) with the strides of copy_rows.
  virtual void add_rows(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t rows,
                        int64_t cols) = 0;
  // Host memory in and out. upload may return before the copy is done but src_host may be
  // reused as soon as it returns; download waits for the device's work and the copy.
  virtual void upload(void* dst, const void* src_host, size_t bytes) = 0;
  virtual void download(void* dst_host, const void* src, size_t bytes) = 0;
  // Waits for every call made so far.
  virtual void synchronize() = 0;

  // ---- GEMMs (cpu::gemm, cpu::gemm_rows_invariant) -----------------------------------------
  virtual void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha,
                    const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C,
                    int64_t ldc) = 0;
  virtual void gemm_rows_invariant(bool trans_b, int64_t M, int64_t N, int64_t K, const T* A,
                                   int64_t lda, const T* B, int64_t ldb, T beta, T* C,
                                   int64_t ldc, T* pad, int64_t pad_count) = 0;
  // A linear layer's three GEMMs with weight (OC, IC), as cpu::matmul_*: out = inp W^T,
  // dinp = dout W (assigned), dweight += dout^T inp.
  void matmul_forward(T* out, const T* inp, const T* weight, int64_t N, int64_t IC, int64_t OC) {
    gemm(false, true, N, OC, IC, T(1), inp, IC, weight, IC, T(0), out, OC);
  }
  void matmul_backward_input(T* dinp, const T* dout, const T* weight, int64_t N, int64_t IC,
                             int64_t OC) {
    gemm(false, false, N, IC, OC, T(1), dout, OC, weight, IC, T(0), dinp, IC);
  }
  void matmul_backward_weight(T* dweight, const T* dout, const T* inp, int64_t N, int64_t IC,
                              int64_t OC) {
    gemm(true, false, OC, IC, N, T(1), dout, OC, inp, IC, T(1), dweight, IC);
  }

  // ---- Native BF16 GEMMs -----------------------------------------------------------------
  // Whether the linear layers' BF16 GEMMs (precision.mode = "bf16") multiply BF16 operands
  // through gemm_bf16 (tensor cores on a GPU) instead of linear.h's exact emulation (operands
  // rounded to BF16 but stored as floats, one FP32 GEMM). The two differ only in the order
  // of the FP32 sums: every product of two BF16 values is exact in FP32.
  virtual bool gemm_bf16_native() const = 0;
  // C (M, N) = op(A) op(B) + beta C (gemm's arguments, alpha 1) over BF16 operands (bits),
  // FP32 accumulation and output. Only called where gemm_bf16_native().
  virtual void gemm_bf16(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                         const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb,
                         float beta, float* C, int64_t ldc) = 0;

  // ---- Native FP8 GEMMs (the linear layers' path where gemm_fp8_native(), model/linear.h) ---
  // dst (C, R) = src (R, C)^T, both compact, elements of elem_bytes = 1 (E4M3 codes), 2 (BF16
  // bits) or 4 (floats, FP8 scales). Exact copies.
  virtual void transpose(void* dst, const void* src, int64_t R, int64_t C, size_t elem_bytes) = 0;
  // Whether gemm_fp8 multiplies E4M3 codes natively (cuBLASLt block scaling on Hopper).
  virtual bool gemm_fp8_native() const = 0;
  // C (M, N) = A (M, K) B (N, K)^T + beta C (ldc >= N), A and B E4M3 codes, K-contiguous and
  // compact (lda = ldb = K), with FP32 scales in the GEMM layouts of a_mode / b_mode
  // (model/kernels/cuda/gemm_plan.h: 1x128 tiles along K as (ceil(K / 128), rows), or
  // 128x128 blocks as (ceil(rows / 128), ceil(K / 128) rounded up to 4)); not both blocks.
  // FP32 accumulation and output. The CPU dequantizes both into buffers it allocates per call
  // and runs the FP32 GEMM (a reference for tests: a step must not allocate).
  virtual void gemm_fp8(int64_t M, int64_t N, int64_t K, const uint8_t* A, const float* a_scales,
                        cuda::Fp8Scaling a_mode, const uint8_t* B, const float* b_scales,
                        cuda::Fp8Scaling b_mode, float beta, float* C, int64_t ldc) = 0;

  // ---- dense kernels (model/kernels/cpu/dense_ops.h) --------------------------------------
  // V: the table's rows (a device kernel sizes its grid and bounds-checks with it).
  virtual void embedding_forward(T* out, const int32_t* tokens, const T* wte, int64_t N,
                                 int64_t C, int64_t V) = 0;
  virtual void embedding_backward(T* dwte, const T* dout, const int32_t* tokens, int64_t N,
                                  int64_t C, int64_t V) = 0;
  virtual void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* weight, int64_t N,
                               int64_t C, T eps) = 0;
  virtual void rmsnorm_backward_input(T* dinp, const T* dout, const T* inp, const T* weight,
                                      const T* rstd, int64_t N, int64_t C) = 0;
  virtual void rmsnorm_backward_weight(T* dweight, const T* dout, const T* inp, const T* rstd,
                                       int64_t N, int64_t C) = 0;
  virtual void rope_tables(T* cos_out, T* sin_out, int64_t T_, int64_t HD, double theta) = 0;
  virtual void rope_forward(T* x, const T* cos_t, const T* sin_t, int64_t B, int64_t T_,
                            int64_t H, int64_t HD, int64_t stride) = 0;
  virtual void rope_backward(T* dx, const T* cos_t, const T* sin_t, int64_t B, int64_t T_,
                             int64_t H, int64_t HD, int64_t stride) = 0;
  // Fused causal attention: lse (B, NH, T) is saved instead of the probabilities. scratch is
  // the backend's own size (model_layout.cpp: cpu::attention_scratch_elems on the CPU,
  // cuda::attention_scratch_floats on CUDA); its contents are undefined after a call.
  virtual void attention_forward(T* out, T* lse, const T* qkv, int64_t B, int64_t T_,
                                 int64_t NH, int64_t NKV, int64_t HD, int64_t HDv,
                                 T* scratch) = 0;
  virtual void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* lse,
                                  int64_t B, int64_t T_, int64_t NH, int64_t NKV, int64_t HD,
                                  int64_t HDv, T* scratch) = 0;
  virtual void swiglu_forward(T* out, const T* gu, int64_t N, int64_t F) = 0;
  virtual void swiglu_backward(T* dgu, const T* dout, const T* gu, int64_t N, int64_t F) = 0;
  virtual void cross_entropy_forward(T* losses, T* probs, const T* logits,
                                     const int32_t* targets, int64_t N, int64_t V) = 0;
  virtual void cross_entropy_backward(T* dlogits, const T* probs, const int32_t* targets,
                                      T dloss, int64_t N, int64_t V) = 0;
  virtual void residual_forward(T* out, const T* a, const T* b, int64_t n) = 0;
  // Over the tokens with a target (>= 0), their losses summed in token order in double:
  // acc[0] += (sum / count) / divisor (nothing when none has a target), acc[1] += sum. acc:
  // two doubles of device memory; nothing is read back (the model reads its sums once per
  // chunk).
  virtual void scored_loss_accumulate(double* acc, const T* losses, const int32_t* targets,
                                      int64_t N, double divisor) = 0;
  // Multi-token prediction module k's inputs from the main targets y (B, T_): at position t
  // tokens = y[t + k] (0 past the end or where y < 0), targets = y[t + k + 1] (-1 past the end).
  virtual void mtp_shift(int32_t* tokens, int32_t* targets, const int32_t* y, int64_t B,
                         int64_t T_, int64_t k) = 0;

  // ---- MoE kernels (model/kernels/cpu/moe_ops.h) ------------------------------------------
  virtual void router_forward(T* scores, int32_t* expert_ids, T* weights, const T* logits,
                              const float* bias, int64_t N, int64_t E, int64_t K, ScoreFn score,
                              double route_scale, int64_t G, int64_t KG) = 0;
  virtual void router_backward(T* dlogits, const T* dweights, const T* dscores_extra,
                               const T* scores, const int32_t* expert_ids, int64_t N, int64_t E,
                               int64_t K, ScoreFn score, double route_scale) = 0;
  // acc[0] (one double of device memory) += the balance loss (cpu::aux_loss_forward's
  // float value). Nothing is read back.
  virtual void aux_loss_forward(double* acc, const T* scores, const int32_t* expert_ids,
                                int64_t B, int64_t T_, int64_t E, int64_t K, double alpha) = 0;
  virtual void aux_loss_backward(T* dscores, const T* scores, const int32_t* expert_ids,
                                 int64_t B, int64_t T_, int64_t E, int64_t K, double alpha,
                                 T dloss) = 0;
  // counts (E) and offsets (E + 1) land in host memory (the expert loop and the exchange plan
  // read them there); row_of and token_of stay on the device. Waits.
  virtual void moe_plan(int64_t* counts_host, int64_t* offsets_host, int32_t* row_of,
                        int32_t* token_of, const int32_t* expert_ids, int64_t N, int64_t E,
                        int64_t K) = 0;
  virtual void moe_permute_forward(T* xp, const T* x, const int32_t* token_of, int64_t rows,
                                   int64_t C) = 0;
  virtual void moe_permute_backward(T* dx, const T* dxp, const int32_t* row_of, int64_t N,
                                    int64_t K, int64_t C) = 0;
  virtual void moe_combine_forward(T* out, const T* yp, const T* weights, const int32_t* row_of,
                                   int64_t N, int64_t K, int64_t C) = 0;
  virtual void moe_combine_backward(T* dyp, T* dweights, const T* dout, const T* yp,
                                    const T* weights, const int32_t* row_of, int64_t N, int64_t K,
                                    int64_t C) = 0;

  // ---- GEMM-input quantization (model/fp8_quant.h) ------------------------------------------
  virtual void fp8_quantize(uint8_t* q, float* scales, const float* x, int64_t R, int64_t C,
                            Fp8Tile t) = 0;
  virtual void fp8_dequantize(float* x, const uint8_t* q, const float* scales, int64_t R,
                              int64_t C, Fp8Tile t) = 0;
  virtual void fp8_fake_quantize_ld(float* out, int64_t ld_out, const float* x, int64_t ld_x,
                                    int64_t R, int64_t C, Fp8Tile t) = 0;
  void fp8_fake_quantize(float* out, const float* x, int64_t R, int64_t C, Fp8Tile t) {
    fp8_fake_quantize_ld(out, C, x, C, R, C, t);
  }
  virtual void bf16_fake_quantize(float* out, const float* x, int64_t n) = 0;
  // bits (n) = x rounded to BF16 (round to nearest even); with `rounded` also the rounded
  // values as floats.
  virtual void bf16_encode(uint16_t* bits, float* rounded, const float* x, int64_t n) = 0;
  virtual void bf16_decode(float* x, const uint16_t* bits, int64_t n) = 0;
};

// The CPU backend (stateless; host memory is its device memory). It emulates the BF16 and
// FP8 GEMMs (gemm_bf16_native() and gemm_fp8_native() false) unless created with
// native_bf16 / native_fp8: then gemm_bf16 / gemm_fp8 decode both operands into buffers they
// allocate per call and run the FP32 GEMM, so tests run the linear layers' native paths
// (their operand formats, paddings and transposes) on the CPU. Not for training: a step must
// not allocate.
template <typename T>
std::unique_ptr<Ops<T>> ops_cpu_create(bool native_bf16 = false, bool native_fp8 = false);

}  // namespace moe
