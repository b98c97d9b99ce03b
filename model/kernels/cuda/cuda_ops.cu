// The CUDA backend (cuda_ops.h): Ops<float> over device memory, each call forwarding to the
// kernels of model/kernels/cuda on the backend's one stream, so the calls run in the order
// they are made. Semantics, argument order and accumulation are the CPU kernels' (ops.h).
//
// Scratch, one allocation sized from OpsLimits at creation (scratch_layout below), each part
// 256-byte aligned (the cuBLAS workspace needs 256, the aux-loss terms 8, the histograms 4):
//   gemm workspace      gemm_workspace_bytes(sm_major)                       bytes
//   rmsnorm dW partials rmsnorm_backward_weight_scratch_count(tokens, width) floats
//   dispatch histograms moe_dispatch_scratch_bytes(tokens, experts, top_k)   bytes
//   aux-loss terms      moe_aux_loss_scratch_bytes(batch, seq_len, experts)  bytes
//   host values         loss sum (double), loss count (int64), aux loss (float)
//   moe_plan            counts (experts) and offsets (experts + 1), int64
// A call whose shape needs more than its part holds CHECK-fails, naming the limits.
// Host values: moe_plan computes on the device, copies the counts back on the stream and
// waits for it. The loss sums stay on the device (scored_loss_accumulate, aux_loss_forward).
#include <cstdint>

#include "model/check.h"
#include "model/kernels/cuda/attention_kernels.h"
#include "model/kernels/cuda/cuda_check.h"
#include "model/kernels/cuda/cuda_ops.h"
#include "model/kernels/cuda/dense_kernels.h"
#include "model/kernels/cuda/dense_plan.h"
#include "model/kernels/cuda/gemm_cublas.h"
#include "model/kernels/cuda/moe_kernels.h"
#include "model/kernels/cuda/moe_plan.h"
#include "model/kernels/cuda/ops_kernels.h"
#include "model/kernels/cuda/quant_kernels.h"

namespace moe {

namespace {

constexpr size_t kScratchAlign = 256;

struct ScratchLayout {
  size_t gemm = 0, gemm_bytes = 0;
  size_t rms = 0;
  int64_t rms_count = 0;  // floats
  size_t dispatch = 0;
  int64_t dispatch_bytes = 0;
  size_t aux = 0;
  int64_t aux_bytes = 0;
  size_t loss_sum = 0, loss_count = 0, aux_loss = 0, plan_counts = 0, plan_offsets = 0;
  size_t total = 0;
};

// Appends `bytes` at the next aligned offset; returns the offset.
size_t carve(size_t& cursor, size_t bytes) {
  const size_t at = (cursor + kScratchAlign - 1) / kScratchAlign * kScratchAlign;
  cursor = at + bytes;
  return at;
}

ScratchLayout scratch_layout(const OpsLimits& lim, int sm_major) {
  CHECK(lim.tokens >= 0 && lim.width >= 0 && lim.batch >= 0 && lim.seq_len >= 0 &&
            lim.experts >= 0 && lim.top_k >= 0,
        "OpsLimits tokens=%lld width=%lld batch=%lld seq_len=%lld experts=%lld top_k=%lld",
        (long long)lim.tokens, (long long)lim.width, (long long)lim.batch,
        (long long)lim.seq_len, (long long)lim.experts, (long long)lim.top_k);
  ScratchLayout l;
  size_t cur = 0;
  l.gemm_bytes = cuda::gemm_workspace_bytes(sm_major);
  l.gemm = carve(cur, l.gemm_bytes);
  l.rms_count = cuda::rmsnorm_backward_weight_scratch_count(lim.tokens, lim.width);
  l.rms = carve(cur, sizeof(float) * static_cast<size_t>(l.rms_count));
  if (lim.experts > 0) {
    CHECK(lim.top_k >= 1, "OpsLimits experts=%lld with top_k=%lld", (long long)lim.experts,
          (long long)lim.top_k);
    l.dispatch_bytes = cuda::moe_dispatch_scratch_bytes(lim.tokens, lim.experts, lim.top_k);
    if (lim.seq_len >= 1)
      l.aux_bytes = cuda::moe_aux_loss_scratch_bytes(lim.batch, lim.seq_len, lim.experts);
  }
  l.dispatch = carve(cur, static_cast<size_t>(l.dispatch_bytes));
  l.aux = carve(cur, static_cast<size_t>(l.aux_bytes));
  l.loss_sum = carve(cur, sizeof(double));
  l.loss_count = carve(cur, sizeof(int64_t));
  l.aux_loss = carve(cur, sizeof(float));
  l.plan_counts = carve(cur, sizeof(int64_t) * static_cast<size_t>(lim.experts));
  l.plan_offsets = carve(cur, sizeof(int64_t) * static_cast<size_t>(lim.experts + 1));
  l.total = carve(cur, 0);
  return l;
}

class CudaOps final : public Ops<float> {
 public:
  CudaOps(const OpsLimits& limits, bool native_bf16, bool native_fp8, bool attention_bf16)
      : lim_(limits),
        native_bf16_(native_bf16),
        native_fp8_(native_fp8),
        attention_core_(attention_bf16 ? cuda::AttentionCore::kBf16 : cuda::AttentionCore::kFp32) {
    int dev = 0, sm_major = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&sm_major, cudaDevAttrComputeCapabilityMajor, dev));
    l_ = scratch_layout(limits, sm_major);
    s_ = cuda::stream_create();
    base_ = static_cast<unsigned char*>(cuda::device_alloc(l_.total));
    gemm_ = cuda::gemm_context_create(base_ + l_.gemm, l_.gemm_bytes, s_);
  }
  ~CudaOps() override {
    cuda::stream_synchronize(s_);  // queued work may still read the scratch
    cuda::gemm_context_destroy(gemm_);
    cuda::device_free(base_);
    cuda::stream_destroy(s_);
  }
  CudaOps(const CudaOps&) = delete;
  CudaOps& operator=(const CudaOps&) = delete;

  cuda::Stream stream() const { return s_; }
  Device device() const override { return Device::kCuda; }

  // ---- memory: device to device on the stream; the host copies wait --------------------
  void copy(void* dst, const void* src, size_t bytes) override {
    if (bytes) CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, s_));
  }
  void zero(void* dst, size_t bytes) override {
    if (bytes) CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, s_));
  }
  void copy_rows(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows,
                 int64_t cols) override {
    CHECK(rows >= 0 && cols >= 0, "rows=%lld cols=%lld", (long long)rows, (long long)cols);
    if (rows == 0 || cols == 0) return;
    const size_t w = sizeof(float) * static_cast<size_t>(cols);
    if (rows == 1) return copy(dst, src, w);  // 2D copies want pitches >= the row
    CHECK(ld_dst >= cols && ld_src >= cols, "ld_dst=%lld ld_src=%lld < cols=%lld",
          (long long)ld_dst, (long long)ld_src, (long long)cols);
    CUDA_CHECK(cudaMemcpy2DAsync(dst, sizeof(float) * static_cast<size_t>(ld_dst), src,
                                 sizeof(float) * static_cast<size_t>(ld_src), w,
                                 static_cast<size_t>(rows), cudaMemcpyDeviceToDevice, s_));
  }
  void add_rows(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows,
                int64_t cols) override {
    cuda::add_rows(dst, ld_dst, src, ld_src, rows, cols, s_);
  }
  // NOTE: an H2D cudaMemcpyAsync may return before it has read src_host: from pinned memory
  // it is fully asynchronous, and from pageable memory the CUDA docs ("API synchronization
  // behavior") only say it *might* be synchronous. Waiting for the stream is what makes
  // reusing src_host at once safe for every kind of host memory (it also waits for the work
  // queued before, which a per-copy staging buffer could avoid).
  void upload(void* dst, const void* src_host, size_t bytes) override {
    if (!bytes) return;
    CUDA_CHECK(cudaMemcpyAsync(dst, src_host, bytes, cudaMemcpyHostToDevice, s_));
    CUDA_CHECK(cudaStreamSynchronize(s_));
  }
  // Queued after every call so far, then waited for: dst_host holds the finished values.
  void download(void* dst_host, const void* src, size_t bytes) override {
    if (!bytes) return;
    CUDA_CHECK(cudaMemcpyAsync(dst_host, src, bytes, cudaMemcpyDeviceToHost, s_));
    CUDA_CHECK(cudaStreamSynchronize(s_));
  }
  void synchronize() override { CUDA_CHECK(cudaStreamSynchronize(s_)); }

  // ---- GEMMs: exact FP32 math (no TF32), as the CPU's sgemm -------------------------------
  void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
            const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
            int64_t ldc) override {
    cuda::gemm_f32(*gemm_, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc,
                   cuda::Fp32Math::kFp32);
  }
  // The CPU pads a small call to gemm_rows_min rows because OpenBLAS's small-matrix kernels
  // sum in another order than its packed ones. Padding buys nothing known on the GPU: cuBLAS
  // picks its kernel (tile shape, split-K) by a heuristic over the whole shape, M included,
  // and does not document a row's summation order as independent of M, so the pad is unused
  // and this is a plain GEMM. What does hold: a row's result does not depend on the values of
  // the other rows, and a given shape gives the same bits every run (cuBLAS's documented
  // reproducibility: same toolkit and GPU model, one stream with its own workspace).
  // NOTE: row invariance across M (a row's bits in a 3-row call vs a 300-row call) is
  // UNVERIFIED on the GPU.
  void gemm_rows_invariant(bool trans_b, int64_t M, int64_t N, int64_t K, const float* A,
                           int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                           int64_t ldc, float* /*pad*/, int64_t /*pad_count*/) override {
    cuda::gemm_f32(*gemm_, false, trans_b, M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc,
                   cuda::Fp32Math::kFp32);
  }

  void transpose(void* dst, const void* src, int64_t R, int64_t C, size_t elem_bytes) override {
    cuda::transpose(dst, src, R, C, elem_bytes, s_);
  }
  // cuBLASLt's 1x128 / 128x128 block scaling exists on sm_90 only; elsewhere gemm_fp8 fails.
  // Created without native_fp8, the linear layers emulate (gemm_fp8 itself still works).
  bool gemm_fp8_native() const override {
    return native_fp8_ && cuda::gemm_fp8_block_scaling_supported(*gemm_);
  }
  void gemm_fp8(int64_t M, int64_t N, int64_t K, const uint8_t* A, const float* a_scales,
                cuda::Fp8Scaling a_mode, const uint8_t* B, const float* b_scales,
                cuda::Fp8Scaling b_mode, float beta, float* C, int64_t ldc) override {
    cuda::gemm_fp8(*gemm_, false, true, M, N, K, 1.0f, A, K, a_scales, a_mode, B, K, b_scales,
                   b_mode, beta, C, ldc);
  }

  // Tensor cores on BF16 operands, FP32 accumulation (cuBLAS's CUBLAS_COMPUTE_32F).
  bool gemm_bf16_native() const override { return native_bf16_; }
  void gemm_bf16(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const uint16_t* A,
                 int64_t lda, const uint16_t* B, int64_t ldb, float beta, float* C,
                 int64_t ldc) override {
    CHECK(native_bf16_, "gemm_bf16 on a CUDA backend created to emulate BF16 GEMMs");
    cuda::gemm_bf16(*gemm_, trans_a, trans_b, M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
  }

  // ---- dense kernels ------------------------------------------------------------------------
  void embedding_forward(float* out, const int32_t* tokens, const float* wte, int64_t N,
                         int64_t C, int64_t V) override {
    cuda::embedding_forward(out, tokens, wte, N, C, V, s_);
  }
  void embedding_backward(float* dwte, const float* dout, const int32_t* tokens, int64_t N,
                          int64_t C, int64_t V) override {
    cuda::embedding_backward(dwte, dout, tokens, N, C, V, s_);
  }
  void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N,
                       int64_t C, float eps) override {
    cuda::rmsnorm_forward(out, rstd, inp, weight, N, C, eps, s_);
  }
  void rmsnorm_backward_input(float* dinp, const float* dout, const float* inp,
                              const float* weight, const float* rstd, int64_t N,
                              int64_t C) override {
    cuda::rmsnorm_backward_input(dinp, dout, inp, weight, rstd, N, C, s_);
  }
  void rmsnorm_backward_weight(float* dweight, const float* dout, const float* inp,
                               const float* rstd, int64_t N, int64_t C) override {
    const int64_t need = cuda::rmsnorm_backward_weight_scratch_count(N, C);
    CHECK(need <= l_.rms_count,
          "rmsnorm_backward_weight N=%lld C=%lld needs %lld scratch floats, OpsLimits "
          "(tokens %lld, width %lld) gave %lld",
          (long long)N, (long long)C, (long long)need, (long long)lim_.tokens,
          (long long)lim_.width, (long long)l_.rms_count);
    cuda::rmsnorm_backward_weight(dweight, dout, inp, rstd, N, C, at<float>(l_.rms), l_.rms_count,
                                  s_);
  }
  void rope_tables(float* cos_out, float* sin_out, int64_t T_, int64_t HD, double theta) override {
    cuda::rope_tables(cos_out, sin_out, T_, HD, theta, s_);
  }
  void rope_forward(float* x, const float* cos_t, const float* sin_t, int64_t B, int64_t T_,
                    int64_t H, int64_t HD, int64_t stride) override {
    cuda::rope_forward(x, cos_t, sin_t, B, T_, H, HD, stride, s_);
  }
  void rope_backward(float* dx, const float* cos_t, const float* sin_t, int64_t B, int64_t T_,
                     int64_t H, int64_t HD, int64_t stride) override {
    cuda::rope_backward(dx, cos_t, sin_t, B, T_, H, HD, stride, s_);
  }
  void attention_forward(float* out, float* lse, const float* qkv, int64_t B, int64_t T_,
                         int64_t NH, int64_t NKV, int64_t HD, int64_t HDv,
                         float* scratch) override {
    cuda::attention_forward(out, lse, qkv, B, T_, NH, NKV, HD, HDv, scratch, attention_core_, s_);
  }
  void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* lse,
                          int64_t B, int64_t T_, int64_t NH, int64_t NKV, int64_t HD,
                          int64_t HDv, float* scratch) override {
    cuda::attention_backward(dqkv, dout, qkv, lse, B, T_, NH, NKV, HD, HDv, scratch,
                             attention_core_, s_);
  }
  void swiglu_forward(float* out, const float* gu, int64_t N, int64_t F) override {
    cuda::swiglu_forward(out, gu, N, F, s_);
  }
  void swiglu_backward(float* dgu, const float* dout, const float* gu, int64_t N,
                       int64_t F) override {
    cuda::swiglu_backward(dgu, dout, gu, N, F, s_);
  }
  void cross_entropy_forward(float* losses, float* probs, const float* logits,
                             const int32_t* targets, int64_t N, int64_t V) override {
    cuda::cross_entropy_forward(losses, probs, logits, targets, N, V, s_);
  }
  void cross_entropy_backward(float* dlogits, const float* probs, const int32_t* targets,
                              float dloss, int64_t N, int64_t V) override {
    cuda::cross_entropy_backward(dlogits, probs, targets, dloss, N, V, s_);
  }
  void residual_forward(float* out, const float* a, const float* b, int64_t n) override {
    cuda::residual_forward(out, a, b, n, s_);
  }
  void scored_loss_accumulate(double* acc, const float* losses, const int32_t* targets,
                              int64_t N, double divisor) override {
    double* sum = at<double>(l_.loss_sum);
    int64_t* count = at<int64_t>(l_.loss_count);
    cuda::scored_loss_sum(sum, count, losses, targets, N, s_);
    cuda::loss_mean_accumulate(acc, sum, count, divisor, s_);
  }
  void mtp_shift(int32_t* tokens, int32_t* targets, const int32_t* y, int64_t B, int64_t T_,
                 int64_t k) override {
    cuda::mtp_shift(tokens, targets, y, B, T_, k, s_);
  }

  // ---- MoE kernels --------------------------------------------------------------------------
  void router_forward(float* scores, int32_t* expert_ids, float* weights, const float* logits,
                      const float* bias, int64_t N, int64_t E, int64_t K, ScoreFn score,
                      double route_scale, int64_t G, int64_t KG) override {
    cuda::router_forward(scores, expert_ids, weights, logits, bias, N, E, K, score, route_scale,
                         G, KG, s_);
  }
  void router_backward(float* dlogits, const float* dweights, const float* dscores_extra,
                       const float* scores, const int32_t* expert_ids, int64_t N, int64_t E,
                       int64_t K, ScoreFn score, double route_scale) override {
    cuda::router_backward(dlogits, dweights, dscores_extra, scores, expert_ids, N, E, K, score,
                          route_scale, s_);
  }
  void aux_loss_forward(double* acc, const float* scores, const int32_t* expert_ids, int64_t B,
                        int64_t T_, int64_t E, int64_t K, double alpha) override {
    float* loss = at<float>(l_.aux_loss);
    cuda::aux_loss_forward(loss, scores, expert_ids, B, T_, E, K, alpha, aux_scratch(B, T_, E),
                           s_);
    cuda::accumulate_to_double(acc, loss, s_);
  }
  void aux_loss_backward(float* dscores, const float* scores, const int32_t* expert_ids,
                         int64_t B, int64_t T_, int64_t E, int64_t K, double alpha,
                         float dloss) override {
    cuda::aux_loss_backward(dscores, scores, expert_ids, B, T_, E, K, alpha, dloss,
                            aux_scratch(B, T_, E), s_);
  }
  void moe_plan(int64_t* counts_host, int64_t* offsets_host, int32_t* row_of, int32_t* token_of,
                const int32_t* expert_ids, int64_t N, int64_t E, int64_t K) override {
    CHECK(E >= 1 && E <= lim_.experts, "moe_plan E=%lld, OpsLimits experts=%lld", (long long)E,
          (long long)lim_.experts);
    const int64_t need = cuda::moe_dispatch_scratch_bytes(N, E, K);
    CHECK(need <= l_.dispatch_bytes,
          "moe_plan N=%lld E=%lld K=%lld needs %lld scratch bytes, OpsLimits (tokens %lld, "
          "experts %lld, top_k %lld) gave %lld",
          (long long)N, (long long)E, (long long)K, (long long)need, (long long)lim_.tokens,
          (long long)lim_.experts, (long long)lim_.top_k, (long long)l_.dispatch_bytes);
    int64_t* counts = at<int64_t>(l_.plan_counts);
    int64_t* offsets = at<int64_t>(l_.plan_offsets);
    cuda::moe_plan(counts, offsets, row_of, token_of, expert_ids, N, E, K,
                   need > 0 ? base_ + l_.dispatch : nullptr, s_);
    const size_t n_counts = sizeof(int64_t) * static_cast<size_t>(E);
    CUDA_CHECK(cudaMemcpyAsync(counts_host, counts, n_counts, cudaMemcpyDeviceToHost, s_));
    CUDA_CHECK(cudaMemcpyAsync(offsets_host, offsets, n_counts + sizeof(int64_t),
                               cudaMemcpyDeviceToHost, s_));
    CUDA_CHECK(cudaStreamSynchronize(s_));
  }
  void moe_permute_forward(float* xp, const float* x, const int32_t* token_of, int64_t rows,
                           int64_t C) override {
    cuda::moe_permute_forward(xp, x, token_of, rows, C, s_);
  }
  void moe_permute_backward(float* dx, const float* dxp, const int32_t* row_of, int64_t N,
                            int64_t K, int64_t C) override {
    cuda::moe_permute_backward(dx, dxp, row_of, N, K, C, s_);
  }
  void moe_combine_forward(float* out, const float* yp, const float* weights,
                           const int32_t* row_of, int64_t N, int64_t K, int64_t C) override {
    cuda::moe_combine_forward(out, yp, weights, row_of, N, K, C, s_);
  }
  void moe_combine_backward(float* dyp, float* dweights, const float* dout, const float* yp,
                            const float* weights, const int32_t* row_of, int64_t N, int64_t K,
                            int64_t C) override {
    cuda::moe_combine_backward(dyp, dweights, dout, yp, weights, row_of, N, K, C, s_);
  }

  // ---- GEMM-input quantization ------------------------------------------------------------
  void fp8_quantize(uint8_t* q, float* scales, const float* x, int64_t R, int64_t C,
                    Fp8Tile t) override {
    cuda::fp8_quantize(q, scales, x, R, C, t, s_);
  }
  void fp8_dequantize(float* x, const uint8_t* q, const float* scales, int64_t R, int64_t C,
                      Fp8Tile t) override {
    cuda::fp8_dequantize(x, q, scales, R, C, t, s_);
  }
  void fp8_fake_quantize_ld(float* out, int64_t ld_out, const float* x, int64_t ld_x, int64_t R,
                            int64_t C, Fp8Tile t) override {
    cuda::fp8_fake_quantize_ld(out, ld_out, x, ld_x, R, C, t, s_);
  }
  void bf16_fake_quantize(float* out, const float* x, int64_t n) override {
    cuda::bf16_fake_quantize(out, x, n, s_);
  }
  void bf16_encode(uint16_t* bits, float* rounded, const float* x, int64_t n) override {
    cuda::bf16_encode(bits, rounded, x, n, s_);
  }
  void bf16_decode(float* x, const uint16_t* bits, int64_t n) override {
    cuda::bf16_decode(x, bits, n, s_);
  }

 private:
  template <typename V>
  V* at(size_t offset) const {
    return reinterpret_cast<V*>(base_ + offset);
  }
  void* aux_scratch(int64_t B, int64_t T_, int64_t E) const {
    const int64_t need = cuda::moe_aux_loss_scratch_bytes(B, T_, E);
    CHECK(need <= l_.aux_bytes,
          "aux loss B=%lld T=%lld E=%lld needs %lld scratch bytes, OpsLimits (batch %lld, "
          "seq_len %lld, experts %lld) gave %lld",
          (long long)B, (long long)T_, (long long)E, (long long)need, (long long)lim_.batch,
          (long long)lim_.seq_len, (long long)lim_.experts, (long long)l_.aux_bytes);
    return base_ + l_.aux;
  }

  OpsLimits lim_;
  bool native_bf16_ = true;
  bool native_fp8_ = true;
  cuda::AttentionCore attention_core_ = cuda::AttentionCore::kFp32;
  ScratchLayout l_;
  cuda::Stream s_ = nullptr;
  unsigned char* base_ = nullptr;  // the one allocation, l_.total bytes
  cuda::GemmContext* gemm_ = nullptr;
};

}  // namespace

std::unique_ptr<Ops<float>> ops_cuda_create(const OpsLimits& limits, bool native_bf16,
                                            bool native_fp8, bool attention_bf16) {
  return std::make_unique<CudaOps>(limits, native_bf16, native_fp8, attention_bf16);
}

cuda::Stream ops_cuda_stream(Ops<float>& ops) {
  auto* c = dynamic_cast<CudaOps*>(&ops);
  CHECK(c != nullptr, "ops_cuda_stream: not a CUDA backend (device %d)",
        static_cast<int>(ops.device()));
  return c->stream();
}

}  // namespace moe
