// Causal self-attention core over a fused qkv, with grouped-query heads (GQA) and a value head
// width HDv that may differ from the query / key width HD (MLA: HD = qk_nope + qk_rope).
//
// Shapes: qkv / dqkv (B, T, W) with W = (NH + NKV) HD + NKV HDv, each token row holding the
// NH query heads and NKV key heads (HD wide), then NKV value heads (HDv wide);
// out / dout (B, T, NH HDv); probs (B, NH, T, T) with the upper triangle zero;
// scratch (B, NH, T, T). Query head h reads kv head g = h / (NH / NKV); scale = 1 / sqrt(HD).
// With HDv = HD every operation is the one the HD-only entry points always did (same GEMMs,
// same order), so their results are unchanged bit for bit.
// Accumulation: everything is ASSIGNED (dqkv included).
//
// Work is split into (b, head, row block) units of kBlock rows. A query block [r0, r1) only
// needs keys [0, r1), so the GEMMs do (1 + kBlock / T) / 2 of the full T x T work (9/16 at
// T = 256) instead of all of it. Each unit calls BLAS from inside our parallel region, where
// OpenBLAS runs single-threaded. kBlock = 32 measured best at HD = 32 and within ~10% of
// larger blocks at HD = 128.
// Determinism: every output element is written by exactly one unit and reduced in a fixed
// order, so the results are bitwise identical for any thread count or schedule. With GQA the
// dK / dV of a kv head sum over its query heads: those units own (b, kv head, column block)
// and add the query heads in order (first with beta = 0, then beta = 1).
#include <cmath>
#include <cstdint>

#include "model/check.h"
#include "model/kernels/cpu/dense_ops.h"
#include "model/softmax_math.h"

namespace moe::cpu {

namespace {

constexpr int64_t kBlock = 32;

void attention_check(int64_t B, int64_t T_, int64_t NH, int64_t NKV, int64_t HD, int64_t HDv) {
  CHECK(B >= 0 && T_ >= 0 && HD > 0 && HDv > 0 && NKV > 0 && NH >= NKV && NH % NKV == 0,
        "attention B=%lld T=%lld NH=%lld NKV=%lld HD=%lld HDv=%lld", static_cast<long long>(B),
        static_cast<long long>(T_), static_cast<long long>(NH), static_cast<long long>(NKV),
        static_cast<long long>(HD), static_cast<long long>(HDv));
}

// row[0, n) <- softmax(row[0, n)); row[n, end) <- 0 (the masked future).
template <typename T>
[[gnu::always_inline]] inline void softmax_causal_row(T* row, int64_t n, int64_t end) {
  T m = row[0];
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = softmax_max(m, row[j]);
  T sum = T(0);
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const T e = softmax_exp(row[j] - m);
    row[j] = e;
    sum += e;
  }
  const T inv = T(1) / sum;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] *= inv;
  for (int64_t j = n; j < end; ++j) row[j] = T(0);
}

// Rows [r0, r1) of one head's (T, T) score matrix; float gets SIMD clones (exp dominates).
template <typename T>
[[gnu::always_inline]] inline void softmax_causal_rows_impl(T* p, int64_t r0, int64_t r1,
                                                            int64_t T_) {
  for (int64_t i = r0; i < r1; ++i) softmax_causal_row(p + i * T_, causal_keys(i), T_);
}
MOE_SIMD_CLONES void softmax_causal_rows(float* p, int64_t r0, int64_t r1, int64_t T_) {
  softmax_causal_rows_impl(p, r0, r1, T_);
}
void softmax_causal_rows(double* p, int64_t r0, int64_t r1, int64_t T_) {
  softmax_causal_rows_impl(p, r0, r1, T_);
}

// dS = P * (dP - rowsum(dP * P)) * scale on row[0, n), in place over dP; row[n, end) <- 0.
template <typename T>
[[gnu::always_inline]] inline void softmax_backward_row(T* row, const T* p, int64_t n, int64_t end,
                                                        T scale) {
  T dot = T(0);
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < n; ++j) dot += row[j] * p[j];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] = softmax_backward_value(p[j], row[j], dot, scale);
  for (int64_t j = n; j < end; ++j) row[j] = T(0);
}

// Rows [r0, r1) of one head's dP / P, zeroed up to the end of the block (r1).
template <typename T>
[[gnu::always_inline]] inline void softmax_backward_rows_impl(T* ds, const T* p, int64_t r0,
                                                              int64_t r1, int64_t T_, T scale) {
  for (int64_t i = r0; i < r1; ++i)
    softmax_backward_row(ds + i * T_, p + i * T_, causal_keys(i), r1, scale);
}
MOE_SIMD_CLONES void softmax_backward_rows(float* ds, const float* p, int64_t r0, int64_t r1,
                                           int64_t T_, float scale) {
  softmax_backward_rows_impl(ds, p, r0, r1, T_, scale);
}
void softmax_backward_rows(double* ds, const double* p, int64_t r0, int64_t r1, int64_t T_,
                           double scale) {
  softmax_backward_rows_impl(ds, p, r0, r1, T_, scale);
}

}  // namespace

template <typename T>
void attention_forward(T* out, T* probs, const T* qkv, int64_t B, int64_t T_, int64_t NH,
                       int64_t NKV, int64_t HD, int64_t HDv) {
  attention_check(B, T_, NH, NKV, HD, HDv);
  const int64_t W = (NH + NKV) * HD + NKV * HDv;
  const int64_t OW = NH * HDv;
  const int64_t group = NH / NKV;
  const int64_t nblocks = (T_ + kBlock - 1) / kBlock;
  const T scale = attention_scale<T>(HD);
  // Later row blocks cost more (keys [0, r1)), so hand units out dynamically.
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t u = 0; u < B * NH * nblocks; ++u) {
    const int64_t bh = u / nblocks;
    const int64_t b = bh / NH;
    const int64_t h = bh % NH;
    const int64_t g = h / group;
    const int64_t r0 = (u % nblocks) * kBlock;
    const int64_t r1 = r0 + kBlock < T_ ? r0 + kBlock : T_;
    const T* base = qkv + b * T_ * W;
    const T* q = base + h * HD;
    const T* k = base + (NH + g) * HD;
    const T* v = base + (NH + NKV) * HD + g * HDv;
    T* p = probs + bh * T_ * T_;
    // S[r0:r1, 0:r1] = scale Q[r0:r1] K[0:r1]^T, softmax in place, then O = P V.
    gemm<T>(false, true, r1 - r0, r1, HD, scale, q + r0 * W, W, k, W, T(0), p + r0 * T_, T_);
    softmax_causal_rows(p, r0, r1, T_);
    gemm<T>(false, false, r1 - r0, HDv, r1, T(1), p + r0 * T_, T_, v, W, T(0),
            out + b * T_ * OW + r0 * OW + h * HDv, OW);
  }
}

template <typename T>
void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* probs, int64_t B, int64_t T_,
                        int64_t NH, int64_t NKV, int64_t HD, int64_t HDv, T* scratch) {
  attention_check(B, T_, NH, NKV, HD, HDv);
  const int64_t W = (NH + NKV) * HD + NKV * HDv;
  const int64_t OW = NH * HDv;
  const int64_t group = NH / NKV;
  const int64_t nblocks = (T_ + kBlock - 1) / kBlock;
  const T scale = attention_scale<T>(HD);

  // Pass 1, per (b, h, row block): dP = dO V^T, dS (into scratch), dQ = dS K.
  // NOTE: dS is zeroed above the diagonal only up to the end of its row block; pass 2 reads
  // no further right than that.
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t u = 0; u < B * NH * nblocks; ++u) {
    const int64_t bh = u / nblocks;
    const int64_t b = bh / NH;
    const int64_t h = bh % NH;
    const int64_t g = h / group;
    const int64_t r0 = (u % nblocks) * kBlock;
    const int64_t r1 = r0 + kBlock < T_ ? r0 + kBlock : T_;
    const T* base = qkv + b * T_ * W;
    const T* k = base + (NH + g) * HD;
    const T* v = base + (NH + NKV) * HD + g * HDv;
    const T* p = probs + bh * T_ * T_;
    T* ds = scratch + bh * T_ * T_;
    gemm<T>(false, true, r1 - r0, r1, HDv, T(1), dout + b * T_ * OW + r0 * OW + h * HDv, OW, v, W,
            T(0), ds + r0 * T_, T_);
    softmax_backward_rows(ds, p, r0, r1, T_, scale);
    gemm<T>(false, false, r1 - r0, HD, r1, T(1), ds + r0 * T_, T_, k, W, T(0),
            dqkv + b * T_ * W + r0 * W + h * HD, W);
  }

  // Pass 2, per (b, kv head g, column block [c0, c1)): keys c0.. are seen by queries c0..T,
  //   dK[c0:c1] = sum_h dS_h[c0:T, c0:c1]^T Q_h[c0:T]
  //   dV[c0:c1] = sum_h  P_h[c0:T, c0:c1]^T dO_h[c0:T]
  // over the group's query heads h in increasing order.
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t u = 0; u < B * NKV * nblocks; ++u) {
    const int64_t bg = u / nblocks;
    const int64_t b = bg / NKV;
    const int64_t g = bg % NKV;
    const int64_t c0 = (u % nblocks) * kBlock;
    const int64_t c1 = c0 + kBlock < T_ ? c0 + kBlock : T_;
    T* dk = dqkv + b * T_ * W + c0 * W + (NH + g) * HD;
    T* dv = dqkv + b * T_ * W + c0 * W + (NH + NKV) * HD + g * HDv;
    for (int64_t hh = 0; hh < group; ++hh) {
      const int64_t h = g * group + hh;
      const int64_t bh = b * NH + h;
      const T beta = hh == 0 ? T(0) : T(1);
      const T* ds = scratch + bh * T_ * T_ + c0 * T_ + c0;
      const T* p = probs + bh * T_ * T_ + c0 * T_ + c0;
      const T* q = qkv + b * T_ * W + c0 * W + h * HD;
      const T* dO = dout + b * T_ * OW + c0 * OW + h * HDv;
      gemm<T>(true, false, c1 - c0, HD, T_ - c0, T(1), ds, T_, q, W, beta, dk, W);
      gemm<T>(true, false, c1 - c0, HDv, T_ - c0, T(1), p, T_, dO, OW, beta, dv, W);
    }
  }
}

template <typename T>
void attention_forward(T* out, T* probs, const T* qkv, int64_t B, int64_t T_, int64_t NH,
                       int64_t NKV, int64_t HD) {
  attention_forward<T>(out, probs, qkv, B, T_, NH, NKV, HD, HD);
}

template <typename T>
void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* probs, int64_t B, int64_t T_,
                        int64_t NH, int64_t NKV, int64_t HD, T* scratch) {
  attention_backward<T>(dqkv, dout, qkv, probs, B, T_, NH, NKV, HD, HD, scratch);
}

#define MOE_INSTANTIATE(T)                                                                         \
  template void attention_forward<T>(T*, T*, const T*, int64_t, int64_t, int64_t, int64_t,         \
                                     int64_t);                                                     \
  template void attention_forward<T>(T*, T*, const T*, int64_t, int64_t, int64_t, int64_t,         \
                                     int64_t, int64_t);                                            \
  template void attention_backward<T>(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, \
                                      int64_t, int64_t, T*);                                       \
  template void attention_backward<T>(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, \
                                      int64_t, int64_t, int64_t, T*);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe::cpu
