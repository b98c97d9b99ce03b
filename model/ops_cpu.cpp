// The CPU backend: Ops over host memory, forwarding to model/kernels/cpu and model/fp8_quant.h.
// Nothing is asynchronous, so the waits are no-ops.
#include <cstring>
#include <type_traits>
#include <vector>

#include "model/check.h"
#include "model/fp8.h"
#include "model/fp8_quant.h"
#include "model/kernels/cpu/dense_ops.h"
#include "model/kernels/cpu/moe_ops.h"
#include "model/ops.h"

namespace moe {

namespace {

// Below this many elements a row copy stays on one thread.
constexpr int64_t kParallelMin = 1 << 14;

// x (rows, cols), rows ld apart, decoded from BF16 bits into a matrix of the same strides.
std::vector<float> decode_bf16(const uint16_t* x, int64_t rows, int64_t cols, int64_t ld) {
  std::vector<float> out(static_cast<size_t>(rows > 0 ? (rows - 1) * ld + cols : 0), 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[r * ld + c] = bf16_to_float(x[r * ld + c]);
  return out;
}

// x (R, K) from E4M3 codes and scales in a GEMM layout (gemm_plan.h).
std::vector<float> decode_fp8(const uint8_t* q, const float* scales, int64_t R, int64_t K,
                              cuda::Fp8Scaling mode) {
  std::vector<float> out(static_cast<size_t>(R * K));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = 0; k < K; ++k)
      out[static_cast<size_t>(r * K + k)] =
          fp8_tile_decode(q[r * K + k], scales[cuda::fp8_gemm_scale_index(r, k, R, K, mode)]);
  return out;
}

template <typename E>
void transpose_as(void* dst, const void* src, int64_t R, int64_t C) {
  E* d = static_cast<E*>(dst);
  const E* s = static_cast<const E*>(src);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) d[c * R + r] = s[r * C + c];
}

template <typename T>
class CpuOps final : public Ops<T> {
 public:
  CpuOps(bool native_bf16, bool native_fp8) : native_bf16_(native_bf16), native_fp8_(native_fp8) {}
  Device device() const override { return Device::kCpu; }

  void copy(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memcpy(dst, src, bytes);
  }
  void zero(void* dst, size_t bytes) override {
    if (bytes) std::memset(dst, 0, bytes);
  }
  void copy_rows(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t rows,
                 int64_t cols) override {
    if (cols == 0) return;
#pragma omp parallel for schedule(static) if (rows * cols >= kParallelMin)
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(dst + r * ld_dst, src + r * ld_src, sizeof(T) * static_cast<size_t>(cols));
  }
  void add_rows(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t rows,
                int64_t cols) override {
#pragma omp parallel for schedule(static) if (rows * cols >= kParallelMin)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) dst[r * ld_dst + c] += src[r * ld_src + c];
  }
  void upload(void* dst, const void* src_host, size_t bytes) override { copy(dst, src_host, bytes); }
  void download(void* dst_host, const void* src, size_t bytes) override {
    copy(dst_host, src, bytes);
  }
  void synchronize() override {}

  void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
            int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) override {
    cpu::gemm<T>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  void gemm_rows_invariant(bool trans_b, int64_t M, int64_t N, int64_t K, const T* A,
                           int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc,
                           T* pad, int64_t pad_count) override {
    cpu::gemm_rows_invariant<T>(trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc, pad, pad_count);
  }

  bool gemm_bf16_native() const override { return native_bf16_; }
  void gemm_bf16(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const uint16_t* A,
                 int64_t lda, const uint16_t* B, int64_t ldb, float beta, float* C,
                 int64_t ldc) override {
    // Float operands whatever T is (only a float backend is created native).
    CHECK(native_bf16_, "gemm_bf16 on a CPU backend that emulates BF16 GEMMs");
    // The stored extents: op(X) = X^T reads X as (K, rows), else (rows, K).
    const std::vector<float> a = decode_bf16(A, trans_a ? K : M, trans_a ? M : K, lda);
    const std::vector<float> b = decode_bf16(B, trans_b ? N : K, trans_b ? K : N, ldb);
    cpu::gemm<float>(trans_a, trans_b, M, N, K, 1.0f, a.data(), lda, b.data(), ldb, beta, C, ldc);
  }

  void transpose(void* dst, const void* src, int64_t R, int64_t C, size_t elem_bytes) override {
    switch (elem_bytes) {
      case 1: return transpose_as<uint8_t>(dst, src, R, C);
      case 2: return transpose_as<uint16_t>(dst, src, R, C);
      case 4: return transpose_as<uint32_t>(dst, src, R, C);
    }
    CHECK(false, "transpose of %zu-byte elements", elem_bytes);
  }
  bool gemm_fp8_native() const override { return native_fp8_; }
  void gemm_fp8(int64_t M, int64_t N, int64_t K, const uint8_t* A, const float* a_scales,
                cuda::Fp8Scaling a_mode, const uint8_t* B, const float* b_scales,
                cuda::Fp8Scaling b_mode, float beta, float* C, int64_t ldc) override {
    CHECK(!(a_mode == cuda::Fp8Scaling::kBlock128 && b_mode == cuda::Fp8Scaling::kBlock128),
          "FP8 GEMM with two 128x128-scaled inputs");
    const std::vector<float> a = decode_fp8(A, a_scales, M, K, a_mode);
    const std::vector<float> b = decode_fp8(B, b_scales, N, K, b_mode);
    cpu::gemm<float>(false, true, M, N, K, 1.0f, a.data(), K, b.data(), K, beta, C, ldc);
  }

  void embedding_forward(T* out, const int32_t* tokens, const T* wte, int64_t N, int64_t C,
                         int64_t /*V: the CPU kernel CHECKs tokens itself*/) override {
    cpu::embedding_forward<T>(out, tokens, wte, N, C);
  }
  void embedding_backward(T* dwte, const T* dout, const int32_t* tokens, int64_t N, int64_t C,
                          int64_t /*V*/) override {
    cpu::embedding_backward<T>(dwte, dout, tokens, N, C);
  }
  void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* weight, int64_t N, int64_t C,
                       T eps) override {
    cpu::rmsnorm_forward<T>(out, rstd, inp, weight, N, C, eps);
  }
  void rmsnorm_backward_input(T* dinp, const T* dout, const T* inp, const T* weight,
                              const T* rstd, int64_t N, int64_t C) override {
    cpu::rmsnorm_backward_input<T>(dinp, dout, inp, weight, rstd, N, C);
  }
  void rmsnorm_backward_weight(T* dweight, const T* dout, const T* inp, const T* rstd, int64_t N,
                               int64_t C) override {
    cpu::rmsnorm_backward_weight<T>(dweight, dout, inp, rstd, N, C);
  }
  void rope_tables(T* cos_out, T* sin_out, int64_t T_, int64_t HD, double theta) override {
    cpu::rope_tables<T>(cos_out, sin_out, T_, HD, theta);
  }
  void rope_forward(T* x, const T* cos_t, const T* sin_t, int64_t B, int64_t T_, int64_t H,
                    int64_t HD, int64_t stride) override {
    cpu::rope_forward<T>(x, cos_t, sin_t, B, T_, H, HD, stride);
  }
  void rope_backward(T* dx, const T* cos_t, const T* sin_t, int64_t B, int64_t T_, int64_t H,
                     int64_t HD, int64_t stride) override {
    cpu::rope_backward<T>(dx, cos_t, sin_t, B, T_, H, HD, stride);
  }
  void attention_forward(T* out, T* lse, const T* qkv, int64_t B, int64_t T_, int64_t NH,
                         int64_t NKV, int64_t HD, int64_t HDv, T* scratch) override {
    cpu::attention_forward<T>(out, lse, qkv, B, T_, NH, NKV, HD, HDv, scratch);
  }
  void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* lse, int64_t B,
                          int64_t T_, int64_t NH, int64_t NKV, int64_t HD, int64_t HDv,
                          T* scratch) override {
    cpu::attention_backward<T>(dqkv, dout, qkv, lse, B, T_, NH, NKV, HD, HDv, scratch);
  }
  void swiglu_forward(T* out, const T* gu, int64_t N, int64_t F) override {
    cpu::swiglu_forward<T>(out, gu, N, F);
  }
  void swiglu_backward(T* dgu, const T* dout, const T* gu, int64_t N, int64_t F) override {
    cpu::swiglu_backward<T>(dgu, dout, gu, N, F);
  }
  void cross_entropy_forward(T* losses, T* probs, const T* logits, const int32_t* targets,
                             int64_t N, int64_t V) override {
    cpu::cross_entropy_forward<T>(losses, probs, logits, targets, N, V);
  }
  void cross_entropy_backward(T* dlogits, const T* probs, const int32_t* targets, T dloss,
                              int64_t N, int64_t V) override {
    cpu::cross_entropy_backward<T>(dlogits, probs, targets, dloss, N, V);
  }
  void residual_forward(T* out, const T* a, const T* b, int64_t n) override {
    cpu::residual_forward<T>(out, a, b, n);
  }
  void scored_loss_accumulate(double* acc, const T* losses, const int32_t* targets, int64_t N,
                              double divisor) override {
    double sum = 0;
    int64_t count = 0;
    for (int64_t i = 0; i < N; ++i) {
      if (targets[i] < 0) continue;
      sum += static_cast<double>(losses[i]);
      ++count;
    }
    if (count > 0) acc[0] += sum / static_cast<double>(count) / divisor;
    acc[1] += sum;
  }
  void mtp_shift(int32_t* tokens, int32_t* targets, const int32_t* y, int64_t B, int64_t T_,
                 int64_t k) override {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T_; ++t) {
        const int32_t* yb = y + b * T_;
        const int64_t i = b * T_ + t;
        tokens[i] = t + k < T_ && yb[t + k] >= 0 ? yb[t + k] : 0;
        targets[i] = t + k + 1 < T_ ? yb[t + k + 1] : -1;
      }
  }

  void router_forward(T* scores, int32_t* expert_ids, T* weights, const T* logits,
                      const float* bias, int64_t N, int64_t E, int64_t K, ScoreFn score,
                      double route_scale, int64_t G, int64_t KG) override {
    cpu::router_forward<T>(scores, expert_ids, weights, logits, bias, N, E, K, score, route_scale,
                           G, KG);
  }
  void router_backward(T* dlogits, const T* dweights, const T* dscores_extra, const T* scores,
                       const int32_t* expert_ids, int64_t N, int64_t E, int64_t K, ScoreFn score,
                       double route_scale) override {
    cpu::router_backward<T>(dlogits, dweights, dscores_extra, scores, expert_ids, N, E, K, score,
                            route_scale);
  }
  void aux_loss_forward(double* acc, const T* scores, const int32_t* expert_ids, int64_t B,
                        int64_t T_, int64_t E, int64_t K, double alpha) override {
    acc[0] += static_cast<double>(cpu::aux_loss_forward<T>(scores, expert_ids, B, T_, E, K, alpha));
  }
  void aux_loss_backward(T* dscores, const T* scores, const int32_t* expert_ids, int64_t B,
                         int64_t T_, int64_t E, int64_t K, double alpha, T dloss) override {
    cpu::aux_loss_backward<T>(dscores, scores, expert_ids, B, T_, E, K, alpha, dloss);
  }
  void moe_plan(int64_t* counts_host, int64_t* offsets_host, int32_t* row_of, int32_t* token_of,
                const int32_t* expert_ids, int64_t N, int64_t E, int64_t K) override {
    cpu::moe_plan(counts_host, offsets_host, row_of, token_of, expert_ids, N, E, K);
  }
  void moe_permute_forward(T* xp, const T* x, const int32_t* token_of, int64_t rows,
                           int64_t C) override {
    cpu::moe_permute_forward<T>(xp, x, token_of, rows, C);
  }
  void moe_permute_backward(T* dx, const T* dxp, const int32_t* row_of, int64_t N, int64_t K,
                            int64_t C) override {
    cpu::moe_permute_backward<T>(dx, dxp, row_of, N, K, C);
  }
  void moe_combine_forward(T* out, const T* yp, const T* weights, const int32_t* row_of,
                           int64_t N, int64_t K, int64_t C) override {
    cpu::moe_combine_forward<T>(out, yp, weights, row_of, N, K, C);
  }
  void moe_combine_backward(T* dyp, T* dweights, const T* dout, const T* yp, const T* weights,
                            const int32_t* row_of, int64_t N, int64_t K, int64_t C) override {
    cpu::moe_combine_backward<T>(dyp, dweights, dout, yp, weights, row_of, N, K, C);
  }

  void fp8_quantize(uint8_t* q, float* scales, const float* x, int64_t R, int64_t C,
                    Fp8Tile t) override {
    moe::fp8_quantize(q, scales, x, R, C, t);
  }
  void fp8_dequantize(float* x, const uint8_t* q, const float* scales, int64_t R, int64_t C,
                      Fp8Tile t) override {
    moe::fp8_dequantize(x, q, scales, R, C, t);
  }
  void fp8_fake_quantize_ld(float* out, int64_t ld_out, const float* x, int64_t ld_x, int64_t R,
                            int64_t C, Fp8Tile t) override {
    moe::fp8_fake_quantize_ld(out, ld_out, x, ld_x, R, C, t);
  }
  void bf16_fake_quantize(float* out, const float* x, int64_t n) override {
    moe::bf16_fake_quantize(out, x, n);
  }
  void bf16_encode(uint16_t* bits, float* rounded, const float* x, int64_t n) override {
#pragma omp parallel for simd schedule(static) if (n >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      bits[i] = bf16_from_float(x[i]);
      if (rounded) rounded[i] = bf16_to_float(bits[i]);
    }
  }
  void bf16_decode(float* x, const uint16_t* bits, int64_t n) override {
#pragma omp parallel for simd schedule(static) if (n >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) x[i] = bf16_to_float(bits[i]);
  }

 private:
  bool native_bf16_ = false;
  bool native_fp8_ = false;
};

}  // namespace

template <typename T>
std::unique_ptr<Ops<T>> ops_cpu_create(bool native_bf16, bool native_fp8) {
  CHECK(!native_bf16 || (std::is_same_v<T, float>), "BF16 GEMMs need float tensors");
  CHECK(!native_fp8 || (std::is_same_v<T, float>), "FP8 GEMMs need float tensors");
  return std::make_unique<CpuOps<T>>(native_bf16, native_fp8);
}

template std::unique_ptr<Ops<float>> ops_cpu_create<float>(bool, bool);
template std::unique_ptr<Ops<double>> ops_cpu_create<double>(bool, bool);

}  // namespace moe
