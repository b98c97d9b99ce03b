// Causal self-attention core, fused: the (T, T) probabilities are never kept. The forward saves
// one log-sum-exp per query row; the backward recomputes the probabilities from it.
//
// Shapes: qkv / dqkv (B, T, W) with W = (NH + NKV) HD + NKV HDv, each token row holding the
// NH query heads and NKV key heads (HD wide), then NKV value heads (HDv wide);
// out / dout (B, T, NH HDv); lse (B, NH, T). Query head h reads kv head g = h / (NH / NKV);
// scale = 1 / sqrt(HD). Accumulation: everything is ASSIGNED (dqkv included).
//
// Work is split into (b, query head) units; each walks its query rows in blocks of kBlock.
// A block [r0, r1) only needs keys [0, r1), so the GEMMs do (1 + kBlock / T) / 2 of the full
// T x T work. The block's scores live in a (kBlock, T) strip of the unit's scratch, never in a
// (T, T) matrix: memory is O(T) per head instead of O(T^2) (8 GiB per sequence at the 671B
// shape, T = 4096 with 128 heads, for the saved probabilities alone).
//   forward   S = scale Q K^T; softmax in place (lse saved); O = P V.
//   backward  S again, P = exp(S - lse); dP = dO V^T; dS = P (dP - rowsum(dP P)) scale;
//             dQ = dS K (assigned per block); dK += dS^T Q; dV += P^T dO.
// The block covers every key of its rows, so rowsum(dP P) needs no saved output O.
// Each unit calls BLAS from inside our parallel region, where OpenBLAS runs single-threaded.
// Determinism: a unit owns its outputs and sums them in a fixed order (row blocks ascending),
// so results are bitwise identical for any thread count or schedule. With GQA the dK / dV of a
// kv head sum over its query heads: each unit accumulates its own copy in scratch, then the
// group's copies are added in head order. The forward's output is the one the unfused kernel
// computed (same GEMMs, same softmax), bit for bit.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "model/check.h"
#include "model/kernels/cpu/dense_ops.h"
#include "model/softmax_math.h"

namespace moe::cpu {

namespace {

// Rows per block. 32 measured best for the unfused kernel at HD = 32 and within ~10% of larger
// blocks at HD = 128; the backward's dK / dV updates are rank-kBlock.
constexpr int64_t kBlock = 32;

void attention_check(int64_t B, int64_t T_, int64_t NH, int64_t NKV, int64_t HD, int64_t HDv) {
  CHECK(B >= 0 && T_ >= 0 && HD > 0 && HDv > 0 && NKV > 0 && NH >= NKV && NH % NKV == 0,
        "attention B=%lld T=%lld NH=%lld NKV=%lld HD=%lld HDv=%lld", static_cast<long long>(B),
        static_cast<long long>(T_), static_cast<long long>(NH), static_cast<long long>(NKV),
        static_cast<long long>(HD), static_cast<long long>(HDv));
}

// The strips of unit u: its forward / backward scores and its backward dS, each (kBlock, T).
int64_t strip_elems(int64_t T_) { return kBlock * T_; }

// row[0, n) <- softmax(row[0, n)); row[n, end) <- 0 (the masked future); returns the lse.
template <typename T>
[[gnu::always_inline]] inline T softmax_causal_row(T* row, int64_t n, int64_t end) {
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
  return softmax_lse(m, sum);
}

// Strip rows [0, r1 - r0) hold query rows [r0, r1) (row stride T_); float gets SIMD clones.
template <typename T>
[[gnu::always_inline]] inline void softmax_causal_rows_impl(T* s, T* lse, int64_t r0, int64_t r1,
                                                            int64_t T_) {
  for (int64_t i = r0; i < r1; ++i)
    lse[i] = softmax_causal_row(s + (i - r0) * T_, causal_keys(i), r1);
}
MOE_SIMD_CLONES void softmax_causal_rows(float* s, float* lse, int64_t r0, int64_t r1,
                                         int64_t T_) {
  softmax_causal_rows_impl(s, lse, r0, r1, T_);
}
void softmax_causal_rows(double* s, double* lse, int64_t r0, int64_t r1, int64_t T_) {
  softmax_causal_rows_impl(s, lse, r0, r1, T_);
}

// row[0, n) <- exp(row - lse); row[n, end) <- 0.
template <typename T>
[[gnu::always_inline]] inline void softmax_recompute_row(T* row, T lse, int64_t n, int64_t end) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] = softmax_prob(row[j], lse);
  for (int64_t j = n; j < end; ++j) row[j] = T(0);
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

// Query rows [r0, r1) in strips of stride T_: P from the scores and lse, then dS over dP.
template <typename T>
[[gnu::always_inline]] inline void softmax_backward_rows_impl(T* p, T* ds, const T* lse,
                                                              int64_t r0, int64_t r1, int64_t T_,
                                                              T scale) {
  for (int64_t i = r0; i < r1; ++i) {
    T* pr = p + (i - r0) * T_;
    softmax_recompute_row(pr, lse[i], causal_keys(i), r1);
    softmax_backward_row(ds + (i - r0) * T_, pr, causal_keys(i), r1, scale);
  }
}
MOE_SIMD_CLONES void softmax_backward_rows(float* p, float* ds, const float* lse, int64_t r0,
                                           int64_t r1, int64_t T_, float scale) {
  softmax_backward_rows_impl(p, ds, lse, r0, r1, T_, scale);
}
void softmax_backward_rows(double* p, double* ds, const double* lse, int64_t r0, int64_t r1,
                           int64_t T_, double scale) {
  softmax_backward_rows_impl(p, ds, lse, r0, r1, T_, scale);
}

// rows x cols of a matrix with row stride ld <- 0.
template <typename T>
void zero_rows(T* a, int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r)
    std::memset(a + r * ld, 0, sizeof(T) * static_cast<size_t>(cols));
}

}  // namespace

int64_t attention_scratch_elems(int64_t B, int64_t T_, int64_t NH, int64_t NKV, int64_t HD,
                                int64_t HDv) {
  attention_check(B, T_, NH, NKV, HD, HDv);
  const int64_t strips = B * NH * 2 * strip_elems(T_);
  const int64_t gqa = NH > NKV ? B * NH * T_ * (HD + HDv) : 0;
  return strips + gqa;
}

template <typename T>
void attention_forward(T* out, T* lse, const T* qkv, int64_t B, int64_t T_, int64_t NH,
                       int64_t NKV, int64_t HD, int64_t HDv, T* scratch) {
  attention_check(B, T_, NH, NKV, HD, HDv);
  const int64_t W = (NH + NKV) * HD + NKV * HDv;
  const int64_t OW = NH * HDv;
  const int64_t group = NH / NKV;
  const T scale = attention_scale<T>(HD);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t bh = 0; bh < B * NH; ++bh) {
    const int64_t b = bh / NH;
    const int64_t h = bh % NH;
    const int64_t g = h / group;
    const T* base = qkv + b * T_ * W;
    const T* q = base + h * HD;
    const T* k = base + (NH + g) * HD;
    const T* v = base + (NH + NKV) * HD + g * HDv;
    T* s = scratch + bh * 2 * strip_elems(T_);
    T* l = lse + bh * T_;
    for (int64_t r0 = 0; r0 < T_; r0 += kBlock) {
      const int64_t r1 = r0 + kBlock < T_ ? r0 + kBlock : T_;
      // S[r0:r1, 0:r1] = scale Q[r0:r1] K[0:r1]^T, softmax in place, then O = P V.
      gemm<T>(false, true, r1 - r0, r1, HD, scale, q + r0 * W, W, k, W, T(0), s, T_);
      softmax_causal_rows(s, l, r0, r1, T_);
      gemm<T>(false, false, r1 - r0, HDv, r1, T(1), s, T_, v, W, T(0),
              out + b * T_ * OW + r0 * OW + h * HDv, OW);
    }
  }
}

template <typename T>
void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* lse, int64_t B, int64_t T_,
                        int64_t NH, int64_t NKV, int64_t HD, int64_t HDv, T* scratch) {
  attention_check(B, T_, NH, NKV, HD, HDv);
  const int64_t W = (NH + NKV) * HD + NKV * HDv;
  const int64_t OW = NH * HDv;
  const int64_t group = NH / NKV;
  const T scale = attention_scale<T>(HD);
  // With GQA each query head's dK / dV (T, HD + HDv) go to scratch after the strips.
  T* partial = scratch + B * NH * 2 * strip_elems(T_);

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t bh = 0; bh < B * NH; ++bh) {
    const int64_t b = bh / NH;
    const int64_t h = bh % NH;
    const int64_t g = h / group;
    const T* base = qkv + b * T_ * W;
    const T* q = base + h * HD;
    const T* k = base + (NH + g) * HD;
    const T* v = base + (NH + NKV) * HD + g * HDv;
    const T* dO = dout + b * T_ * OW + h * HDv;
    const T* l = lse + bh * T_;
    T* p = scratch + bh * 2 * strip_elems(T_);
    T* ds = p + strip_elems(T_);
    T* dq = dqkv + b * T_ * W + h * HD;
    T *dk, *dv;
    int64_t ldk, ldv;
    if (group == 1) {  // the unit owns kv head g: straight into dqkv
      dk = dqkv + b * T_ * W + (NH + g) * HD;
      dv = dqkv + b * T_ * W + (NH + NKV) * HD + g * HDv;
      ldk = ldv = W;
    } else {
      dk = partial + bh * T_ * (HD + HDv);
      dv = dk + T_ * HD;
      ldk = HD;
      ldv = HDv;
    }
    zero_rows(dk, T_, HD, ldk);
    zero_rows(dv, T_, HDv, ldv);
    for (int64_t r0 = 0; r0 < T_; r0 += kBlock) {
      const int64_t r1 = r0 + kBlock < T_ ? r0 + kBlock : T_;
      const int64_t nr = r1 - r0;
      gemm<T>(false, true, nr, r1, HD, scale, q + r0 * W, W, k, W, T(0), p, T_);
      gemm<T>(false, true, nr, r1, HDv, T(1), dO + r0 * OW, OW, v, W, T(0), ds, T_);
      softmax_backward_rows(p, ds, l, r0, r1, T_, scale);
      gemm<T>(false, false, nr, HD, r1, T(1), ds, T_, k, W, T(0), dq + r0 * W, W);
      gemm<T>(true, false, r1, HD, nr, T(1), ds, T_, q + r0 * W, W, T(1), dk, ldk);
      gemm<T>(true, false, r1, HDv, nr, T(1), p, T_, dO + r0 * OW, OW, T(1), dv, ldv);
    }
  }
  if (group == 1) return;

  // The group's query heads' dK / dV, added in head order per token row.
#pragma omp parallel for schedule(static)
  for (int64_t bt = 0; bt < B * T_; ++bt) {
    const int64_t b = bt / T_;
    const int64_t t = bt % T_;
    T* row = dqkv + bt * W;
    for (int64_t g = 0; g < NKV; ++g) {
      T* dk = row + (NH + g) * HD;
      T* dv = row + (NH + NKV) * HD + g * HDv;
      for (int64_t hh = 0; hh < group; ++hh) {
        const T* unit = partial + (b * NH + g * group + hh) * T_ * (HD + HDv);
        const T* pk = unit + t * HD;
        const T* pv = unit + T_ * HD + t * HDv;
        if (hh == 0) {
          for (int64_t d = 0; d < HD; ++d) dk[d] = pk[d];
          for (int64_t d = 0; d < HDv; ++d) dv[d] = pv[d];
        } else {
          for (int64_t d = 0; d < HD; ++d) dk[d] += pk[d];
          for (int64_t d = 0; d < HDv; ++d) dv[d] += pv[d];
        }
      }
    }
  }
}

#define MOE_INSTANTIATE(T)                                                                     \
  template void attention_forward<T>(T*, T*, const T*, int64_t, int64_t, int64_t, int64_t,     \
                                     int64_t, int64_t, T*);                                    \
  template void attention_backward<T>(T*, const T*, const T*, const T*, int64_t, int64_t,      \
                                      int64_t, int64_t, int64_t, int64_t, T*);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe::cpu
