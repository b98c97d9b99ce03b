// CPU kernels for the dense parts of the transformer, llm.c style: paired
// *_forward / *_backward free functions over raw pointers and sizes.
// Templated on the element type: float for training, double for gradient checks.
//
// Dimension letters: N = tokens (B*T), B batch, T sequence, C model width, V vocabulary,
// NH query heads, NKV key/value heads, HD head dim, F FFN width.
//
// Accumulation contract:
//   - weight gradients (dweight, dwte, ...) are ACCUMULATED (+=);
//   - activation gradients are ASSIGNED (=), except where a kernel's input is the
//     residual stream: rmsnorm_backward_input ACCUMULATES into dinp (+=).
// Argument order: outputs, saved-for-backward, inputs, weights, dimensions, scratch.
#pragma once

#include <cmath>
#include <cstdint>

#include "model/act_math.h"

namespace moe::cpu {

// exp for the softmax / SiLU hot loops: the shared Cephes expf (model/act_math.h), branch-free
// so the `#pragma omp simd` loops vectorize it. The double version is std::exp (gradient
// checks).
inline float exp_fast(float x) { return exp_fast_f32(x); }
inline double exp_fast(double x) { return std::exp(x); }

// Put on the float row functions of exp-heavy kernels (softmax, SiLU): the build targets
// baseline x86-64 (SSE2, 4 lanes, no FMA), and an AVX2+FMA clone picked at load time makes
// those passes about 3x faster. Results stay deterministic on one machine; they may differ
// in the last bits between machines with and without AVX2.
#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define MOE_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
#endif
#ifndef MOE_SIMD_CLONES
#define MOE_SIMD_CLONES
#endif

// Row-major C(M,N) = alpha * op(A)(M,K) * op(B)(K,N) + beta * C, through OpenBLAS.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
          int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc);

// Row-major C(M,N) = A(M,K) * op(B)(K,N) + beta * C with every output row a function of its
// own row of A alone, bit for bit, whatever M is and wherever the row sits. OpenBLAS picks
// its kernel by the problem's size (GEMV at M = 1, "small matrix" and direct kernels below a
// size, the packed kernels above) and they sum in different orders: a row of a 3-row
// product differs in its last bits from the same row inside a 300-row one. The packed
// kernels give every row the same order whatever M is, so a call gets at least
// gemm_rows_min(K, N) rows (M N K >= 2^22; OpenBLAS 0.3.21's small kernels stop at
// M N K = 100^3, measured over K, N in 4..512), the rows below that zero-padded through
// `pad` (gemm_rows_invariant_pad_count(K, N) elements). T = double (gradient checks, one
// layout each) calls gemm directly.
// tests/test_dense_ops.cpp pins it. The routed experts need this: expert parallelism
// changes how many rows an expert's GEMMs get, and the BF16/FP8 rounding after them turns a
// last-bit difference into a 2^-8 or 2^-4 one.
constexpr int64_t gemm_rows_min(int64_t K, int64_t N) {
  const int64_t nk = K * N > 0 ? K * N : 1, m = ((int64_t(1) << 22) + nk - 1) / nk;
  return m > 32 ? m : 32;
}
constexpr int64_t gemm_rows_invariant_pad_count(int64_t K, int64_t N) {
  return gemm_rows_min(K, N) * (K + N);
}
template <typename T>
void gemm_rows_invariant(bool trans_b, int64_t M, int64_t N, int64_t K, const T* A,
                         int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc, T* pad,
                         int64_t pad_count);

// Linear layer with weight (OC, IC): out(N, OC) = inp(N, IC) @ weight^T.
template <typename T>
void matmul_forward(T* out, const T* inp, const T* weight, int64_t N, int64_t IC, int64_t OC);
// dinp(N, IC) = dout(N, OC) @ weight   (assigned)
template <typename T>
void matmul_backward_input(T* dinp, const T* dout, const T* weight, int64_t N, int64_t IC,
                           int64_t OC);
// dweight(OC, IC) += dout^T @ inp
template <typename T>
void matmul_backward_weight(T* dweight, const T* dout, const T* inp, int64_t N, int64_t IC,
                            int64_t OC);

// out(N, C) = wte[tokens[n]]
template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* wte, int64_t N, int64_t C);
// dwte[tokens[n]] += dout[n]; fixed order (deterministic).
template <typename T>
void embedding_backward(T* dwte, const T* dout, const int32_t* tokens, int64_t N, int64_t C);

// out = inp * rstd * weight, rstd = 1 / sqrt(mean(inp^2) + eps); rstd (N) saved.
template <typename T>
void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* weight, int64_t N, int64_t C,
                     T eps);
// dinp += d(out)/d(inp)^T dout    (ACCUMULATES: inp is the residual stream)
template <typename T>
void rmsnorm_backward_input(T* dinp, const T* dout, const T* inp, const T* weight, const T* rstd,
                            int64_t N, int64_t C);
// dweight += sum_n dout * inp * rstd
template <typename T>
void rmsnorm_backward_weight(T* dweight, const T* dout, const T* inp, const T* rstd, int64_t N,
                             int64_t C);

// Rotary embedding tables for positions [0, T) and head dim HD (even):
// cos/sin (T, HD/2), angle(t, i) = t * theta^(-2i/HD).
template <typename T>
void rope_tables(T* cos_out, T* sin_out, int64_t T_, int64_t HD, double theta);
// In place on x viewed as (B, T, H, HD) with row stride `stride` between tokens (elements):
// each pair (x[2i], x[2i+1]) at position t is rotated by angle(t, i).
template <typename T>
void rope_forward(T* x, const T* cos_t, const T* sin_t, int64_t B, int64_t T_, int64_t H,
                  int64_t HD, int64_t stride);
// In place: rotates dx back by -angle (the transpose of the forward rotation).
template <typename T>
void rope_backward(T* dx, const T* cos_t, const T* sin_t, int64_t B, int64_t T_, int64_t H,
                   int64_t HD, int64_t stride);

// Causal self-attention, fused (flash-style): the (T, T) probabilities are never kept.
//   qkv / dqkv (B, T, W), W = (NH + NKV) HD + NKV HDv: per token the NH query heads and NKV
//     key heads (HD wide), then the NKV value heads (HDv wide). Query head h reads kv head
//     h / (NH / NKV); scale = 1 / sqrt(HD). Standard attention / GQA: HDv = HD. MLA: NKV = NH,
//     HD = qk_nope + qk_rope, HDv = v_head_dim.
//   out / dout (B, T, NH HDv);
//   lse (B, NH, T): per query row the log-sum-exp of its scaled causal scores
//     (model/softmax_math.h softmax_lse), the only statistic the backward needs: it recomputes
//     P = exp(S - lse) from qkv.
//   scratch: attention_scratch_elems(...) elements; contents undefined after either call.
// dqkv is ASSIGNED. Results are bitwise independent of the thread count.
template <typename T>
void attention_forward(T* out, T* lse, const T* qkv, int64_t B, int64_t T_, int64_t NH,
                       int64_t NKV, int64_t HD, int64_t HDv, T* scratch);
template <typename T>
void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* lse, int64_t B,
                        int64_t T_, int64_t NH, int64_t NKV, int64_t HD, int64_t HDv, T* scratch);
// The scratch both need: per (b, head) two (kAttnBlock, T) score strips, and with GQA
// (NH > NKV) each query head's own dK / dV (T, HD + HDv) before the group's fixed-order sum.
int64_t attention_scratch_elems(int64_t B, int64_t T_, int64_t NH, int64_t NKV, int64_t HD,
                                int64_t HDv);

// SwiGLU on a fused gate/up projection gu (N, 2F), each row [gate(F) | up(F)]:
// out(N, F) = silu(gate) * up.
template <typename T>
void swiglu_forward(T* out, const T* gu, int64_t N, int64_t F);
// dgu (N, 2F), assigned.
template <typename T>
void swiglu_backward(T* dgu, const T* dout, const T* gu, int64_t N, int64_t F);

// Fused softmax + cross-entropy. losses (N) = -log softmax(logits)[target];
// probs (N, V) saved. Targets < 0 are ignored (loss 0, no gradient).
template <typename T>
void cross_entropy_forward(T* losses, T* probs, const T* logits, const int32_t* targets,
                           int64_t N, int64_t V);
// dlogits (N, V) = (probs - onehot(target)) * dloss, assigned. dloss is the gradient of the
// total loss with respect to each token's loss (e.g. 1 / tokens in the global batch).
template <typename T>
void cross_entropy_backward(T* dlogits, const T* probs, const int32_t* targets, T dloss,
                            int64_t N, int64_t V);

// out = a + b over n elements (out may alias a).
template <typename T>
void residual_forward(T* out, const T* a, const T* b, int64_t n);

}  // namespace moe::cpu
