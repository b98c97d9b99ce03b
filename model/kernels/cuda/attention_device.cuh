// Design: fused (flash-style), simple and deterministic first. Three kernels of kAttnThreads
// threads (8 warps) over tiles of kAttnTile = 32 rows; scores live in registers and shared
// memory only, and the forward saves one float per query row, lse_i = m_i + log(l_i).
//   forward        (b, h, query rows [r0, r0 + 32)): for key chunks c0 = 0, 32, .., r0:
//                  S = scale Q K^T (masked j > i), online softmax per row (running max m,
//                  sum l, rescale exp(m_old - m_new), 0 on the first chunk), O = O corr + P V.
//                  Then out = O / l and lse = softmax_lse(m, l).
//   backward_rows  (b, h, query rows [r0, r0 + 32)): pass (a) over the key chunks recomputes
//                  P = exp(S - lse) and dP = dO V^T and sums D_i = sum_j P_ij dP_ij (saved
//                  to scratch for backward_cols: O is not kept, so D comes from P and dP);
//                  pass (b) recomputes P and dP, dS = P (dP - D) scale, dQ = dS K.
//   backward_cols  (b, kv head g, key columns [c0, c0 + 32)): over the group's query heads h
//                  in increasing order, then query chunks i0 = c0, c0 + 32, .. < T: S^T, P^T
//                  from lse, dP^T from dO and V, dS^T with D from scratch;
//                  dK = sum dS^T Q, dV = sum P^T dO.
// Building blocks: a 32-row tile (A) stays in shared memory while 32-row chunks (B) are
//   staged with a +1 pad; thread (warp w, lane l) owns the scores of tile rows w + 8 r
//   (r < 4) against chunk row l, each a dot over d in increasing order. The (32, D)
//   accumulators (O, dQ, dK, dV) live in shared memory; thread t owns elements t + 256 m and
//   adds a chunk's 32 terms in increasing key order. Masked (j > i) and out-of-range
//   (row or key >= T) entries of P and dS are set to 0 explicitly (softmax_exp clamps, so
//   exp(-inf) is not 0), and staged rows past the end are zero, so no garbage is multiplied.
// Determinism: every output element (out, lse, D, dQ, dK, dV) has one owner thread and one
// summation order; the row reductions (max, sum, D) are a warp butterfly broadcast from lane
// 0. No atomics, so results are bitwise reproducible run to run on one device. They match
// the CPU to rounding, not bit for bit (online vs two-pass softmax, other summation orders,
// FMA contraction); the element math is model/softmax_math.h, shared with the CPU.
//
// Two cores (attention_plan.h's AttentionCore), one algorithm: the kernels are templated on
// it and differ only in the three building blocks below. kFp32 as described; kBf16 stages the
// operands as BF16 and computes the (32, 32) score tiles and the accumulations with WMMA
// (16x16x16, FP32 accumulation) through FP32 score tiles in shared memory: every thread then
// reads its scores from there, and everything past that point (masks, online softmax, lse, D,
// dS) is the same code. Its accumulators are written fragment by fragment by warps, so a
// barrier comes before a tile is stored.
// NOTE: cost. Memory is O(T) per head (lse and D, B NH T floats each) instead of the (T, T)
// probabilities. The forward does about
// T^2 / 2 (HD + HDv) FMAs per head; the backward recomputes S and dP three times (rows
// passes (a) and (b), cols) and adds dQ, dK, dV: T^2 / 2 (5 HD + 4 HDv), 4.5x the forward at
// HD = HDv. Each block rereads the K / V (or Q / dO) chunks it needs from global memory
// (mostly L2 hits), O(T^2 / 32) rows per head.
// Work per block is uneven: forward / backward_rows blocks near T sweep T / 32 chunks, those
// near 0 one; backward_cols the reverse, times the group size, so grid tails are unbalanced.
// kBf16 takes the products to tensor cores; the tiles stay 32 x 32 (FlashAttention-2 uses
// 64-128 row tiles and keeps fragments in registers), so it is the first step, not the last.
#pragma once

#if defined(__CUDACC__) || defined(MOETRAIN_CUDA_SIM)
#include <cuda_bf16.h>
#include <mma.h>
#endif

#include <cmath>
#include <type_traits>

#include "model/kernels/cuda/attention_plan.h"
#include "model/kernels/cuda/launch.h"
#include "model/softmax_math.h"

namespace moe::cuda {

namespace {

constexpr int kTile = kAttnTile;
constexpr int kWarps = kAttnThreads / 32;
constexpr int kRowsPerWarp = kTile / kWarps;  // warp w owns tile rows w + kWarps r
constexpr int kSLd = static_cast<int>(kAttnScoreLd);
constexpr unsigned kFullMask = 0xffffffffu;
static_assert(kTile == 32 && kTile % kWarps == 0, "one lane per chunk row, whole rows per warp");
static_assert(kWarps == 8, "kBf16: four warps per (32, 32) score tile, two tiles at once");

template <AttentionCore C>
using Elem = std::conditional_t<C == AttentionCore::kBf16, __nv_bfloat16, float>;

template <AttentionCore C>
__device__ __forceinline__ Elem<C> to_elem(float x) {
  if constexpr (C == AttentionCore::kBf16) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

// The kernel's shared-memory pieces (attention_smem's byte offsets) as typed pointers, with
// the operands' row strides.
template <AttentionCore C>
struct Smem {
  int ld_q, ld_k, ld_v, ld_dout;
  Elem<C>* q;
  Elem<C>* k;
  Elem<C>* v;
  Elem<C>* dout;
  float* s;  // kBf16 score tiles: (32, kSLd) each
  Elem<C>* p;
  Elem<C>* ds;
  float* acc0;
  float* acc1;
  float* row;
};

template <AttentionCore C>
__device__ Smem<C> smem_carve(unsigned char* base, AttentionKernel k, int HD, int HDv) {
  const AttentionSmem m = attention_smem(k, HD, HDv, C);
  Smem<C> t;
  t.q = reinterpret_cast<Elem<C>*>(base + m.q);
  t.k = reinterpret_cast<Elem<C>*>(base + m.k);
  t.v = reinterpret_cast<Elem<C>*>(base + m.v);
  t.dout = reinterpret_cast<Elem<C>*>(base + m.dout);
  t.s = reinterpret_cast<float*>(base + m.s);
  t.p = reinterpret_cast<Elem<C>*>(base + m.p);
  t.ds = reinterpret_cast<Elem<C>*>(base + m.ds);
  t.acc0 = reinterpret_cast<float*>(base + m.acc0);
  t.acc1 = reinterpret_cast<float*>(base + m.acc1);
  t.row = reinterpret_cast<float*>(base + m.row);
  t.ld_q = static_cast<int>(m.ld_q);
  t.ld_k = static_cast<int>(m.ld_k);
  t.ld_v = static_cast<int>(m.ld_v);
  t.ld_dout = static_cast<int>(m.ld_dout);
  return t;
}

__device__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = softmax_max(v, __shfl_xor_sync(kFullMask, v, o));
  return __shfl_sync(kFullMask, v, 0);
}

__device__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return __shfl_sync(kFullMask, v, 0);
}

// dst (32, ldd) <- rows [r0, r0 + 32) of src (row stride ld), D columns, in the core's
// element type; rows at or past `end` are zero.
template <typename E>
__device__ void tile_stage(E* dst, int ldd, const float* src, int64_t ld, int D, int64_t r0,
                           int64_t end) {
  for (int idx = static_cast<int>(threadIdx.x); idx < kTile * D; idx += kAttnThreads) {
    const int rl = idx / D, d = idx % D;
    const int64_t r = r0 + rl;
    const float x = r < end ? src[r * ld + d] : 0.0f;
    if constexpr (std::is_same_v<E, float>) {
      dst[rl * ldd + d] = x;
    } else {
      dst[rl * ldd + d] = __float2bfloat16_rn(x);
    }
  }
}

__device__ void tile_zero(float* acc, int D) {
  for (int idx = static_cast<int>(threadIdx.x); idx < kTile * D; idx += kAttnThreads)
    acc[idx] = 0.0f;
}

// ---- Building block 1: scores --------------------------------------------------------------
// kFp32: the warp's scores against the lane's chunk row, acc[r] = sum_d a[(w + 8 r) lda + d]
// b[lane ldb + d], d increasing (a read as a broadcast; b lane_rows-padded).
__device__ __forceinline__ void warp_row_dots(float (&acc)[kRowsPerWarp], const float* a, int lda,
                                              const float* b, int ldb, int D) {
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const float* ar = a + warp * lda;
  const float* br = b + lane * ldb;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) acc[r] = 0.0f;
  for (int d = 0; d < D; ++d) {
    const float bv = br[d];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) acc[r] += ar[r * kWarps * lda + d] * bv;
  }
}

// kBf16: warp wl (0..3) of a group of four writes the 16x16 quarter (wl / 2, wl % 2) of the
// (32, 32) tile s = a b^T (a, b (32, D) BF16 row-major), k in steps of 16, increasing.
__device__ void tc_score_quarter(float* s, const __nv_bfloat16* a, int lda,
                                 const __nv_bfloat16* b, int ldb, int D, int wl) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace w = nvcuda::wmma;
  const int mi = wl >> 1, ni = wl & 1;
  w::fragment<w::accumulator, 16, 16, 16, float> c;
  w::fill_fragment(c, 0.0f);
  for (int k0 = 0; k0 < D; k0 += 16) {
    w::fragment<w::matrix_a, 16, 16, 16, __nv_bfloat16, w::row_major> fa;
    w::fragment<w::matrix_b, 16, 16, 16, __nv_bfloat16, w::col_major> fb;
    w::load_matrix_sync(fa, a + mi * 16 * lda + k0, lda);
    w::load_matrix_sync(fb, b + ni * 16 * ldb + k0, ldb);  // b^T column-major = b row-major
    w::mma_sync(c, fa, fb, c);
  }
  w::store_matrix_sync(s + mi * 16 * kSLd + ni * 16, c, kSLd, w::mem_row_major);
#else
  __trap();  // the plan never picks kBf16 below sm_80
#endif
}

// The thread's rows' scores (tile rows w + 8 r) against chunk row `lane`: a (32, D) . b^T.
// kBf16 goes through s (one tile) and a barrier, so every thread of the block must call it.
template <AttentionCore C>
__device__ __forceinline__ void chunk_scores(float (&out)[kRowsPerWarp], const Elem<C>* a,
                                             int lda, const Elem<C>* b, int ldb, int D, float* s) {
  if constexpr (C == AttentionCore::kFp32) {
    (void)s;
    warp_row_dots(out, a, lda, b, ldb, D);
  } else {
    const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
    if (warp < 4) tc_score_quarter(s, a, lda, b, ldb, D, warp);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) out[r] = s[(warp + kWarps * r) * kSLd + lane];
  }
}

// Two score tiles at once, a1 b1^T and a2 b2^T (the backward's S and dP): kBf16 gives each its
// four warps and the two tiles of s.
template <AttentionCore C>
__device__ __forceinline__ void chunk_scores2(float (&out1)[kRowsPerWarp], const Elem<C>* a1,
                                              int lda1, const Elem<C>* b1, int ldb1, int D1,
                                              float (&out2)[kRowsPerWarp], const Elem<C>* a2,
                                              int lda2, const Elem<C>* b2, int ldb2, int D2,
                                              float* s) {
  if constexpr (C == AttentionCore::kFp32) {
    (void)s;
    warp_row_dots(out1, a1, lda1, b1, ldb1, D1);
    warp_row_dots(out2, a2, lda2, b2, ldb2, D2);
  } else {
    const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
    float* s2 = s + kTile * kSLd;
    if (warp < 4) {
      tc_score_quarter(s, a1, lda1, b1, ldb1, D1, warp);
    } else {
      tc_score_quarter(s2, a2, lda2, b2, ldb2, D2, warp - 4);
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      out1[r] = s[(warp + kWarps * r) * kSLd + lane];
      out2[r] = s2[(warp + kWarps * r) * kSLd + lane];
    }
  }
}

// ---- Building block 2: accumulation --------------------------------------------------------
// acc[o][d] <- acc[o][d] rescale[o] (rescale may be null: 1) + sum_{k < nk} ps[o][k] ms[k][d]
// over the (32, D) tile (row stride D), k increasing; ps (32, attention_p_ld), ms row stride
// ldm. kFp32: thread t owns the elements t + 256 m (the same in every call with this D), so
// no barrier is needed between its calls and tile_store. kBf16: the rescale pass, a barrier,
// then warp w owns the 16x16 fragments w, w + 8, .. of the (2, D / 16) grid and sums over all
// 32 keys (rows past nk of P are 0, staged rows past the end are 0); tile_store needs a
// barrier after it. Every thread of the block must call it.
template <AttentionCore C>
__device__ void tile_accumulate(float* acc, const float* rescale, const Elem<C>* ps,
                                const Elem<C>* ms, int ldm, int D, int nk) {
  constexpr int pld = static_cast<int>(attention_p_ld(C));
  if constexpr (C == AttentionCore::kFp32) {
    for (int idx = static_cast<int>(threadIdx.x); idx < kTile * D; idx += kAttnThreads) {
      const int o = idx / D, d = idx % D;
      float a = rescale != nullptr ? acc[idx] * rescale[o] : acc[idx];
      for (int k = 0; k < nk; ++k) a += ps[o * pld + k] * ms[k * ldm + d];
      acc[idx] = a;
    }
  } else {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    namespace w = nvcuda::wmma;
    (void)nk;
    if (rescale != nullptr) {
      for (int idx = static_cast<int>(threadIdx.x); idx < kTile * D; idx += kAttnThreads)
        acc[idx] *= rescale[idx / D];
      __syncthreads();
    }
    const int warp = static_cast<int>(threadIdx.x) >> 5, nd = D / 16;
    for (int f = warp; f < 2 * nd; f += kWarps) {
      const int mi = f / nd, ni = f % nd;
      float* cp = acc + mi * 16 * D + ni * 16;
      w::fragment<w::accumulator, 16, 16, 16, float> c;
      w::load_matrix_sync(c, cp, D, w::mem_row_major);
      for (int k0 = 0; k0 < kTile; k0 += 16) {
        w::fragment<w::matrix_a, 16, 16, 16, __nv_bfloat16, w::row_major> fa;
        w::fragment<w::matrix_b, 16, 16, 16, __nv_bfloat16, w::row_major> fb;
        w::load_matrix_sync(fa, ps + mi * 16 * pld + k0, pld);
        w::load_matrix_sync(fb, ms + k0 * ldm + ni * 16, ldm);
        w::mma_sync(c, fa, fb, c);
      }
      w::store_matrix_sync(cp, c, D, w::mem_row_major);
    }
#else
    __trap();
#endif
  }
}

// dst rows [r0, min(r0 + 32, T)) (row stride ld) <- acc (32, D), divided by div[row] where
// div is not null. kFp32 stores only the elements the thread accumulated; kBf16 callers put a
// barrier before it (tile_accumulate).
__device__ void tile_store(float* dst, int64_t ld, const float* acc, const float* div, int D,
                           int64_t r0, int64_t T) {
  for (int idx = static_cast<int>(threadIdx.x); idx < kTile * D; idx += kAttnThreads) {
    const int o = idx / D;
    const int64_t i = r0 + o;
    if (i < T) dst[i * ld + idx % D] = div != nullptr ? acc[idx] / div[o] : acc[idx];
  }
}

// kBf16's accumulators are written by warps: the block waits before a thread reads them.
template <AttentionCore C>
__device__ __forceinline__ void accumulators_done() {
  if constexpr (C == AttentionCore::kBf16) __syncthreads();
}

// Grid (row tiles, NH, B): out rows [r0, r0 + 32) of head h and their lse.
// smem: attention_smem(kForward, HD, HDv, C).
template <AttentionCore C>
__global__ void __launch_bounds__(kAttnThreads)
    attention_forward_kernel(float* out, float* lse, const float* qkv, int64_t T, int64_t NH,
                             int64_t NKV, int HD, int HDv, float scale) {
  MOE_DYNAMIC_SMEM(unsigned char, smem);
  const Smem<C> sm = smem_carve<C>(smem, AttentionKernel::kForward, HD, HDv);
  const int ldq = sm.ld_q, ldk = sm.ld_k, ldv = sm.ld_v;
  constexpr int pld = static_cast<int>(attention_p_ld(C));
  float* os = sm.acc0;  // (32, HDv): the O accumulator
  float* row = sm.row;  // (32): per row the chunk's rescale, at the end l
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t g = h / (NH / NKV);
  const int64_t W = (NH + NKV) * HD + NKV * HDv, OW = NH * HDv;
  const int64_t r1 = r0 + kTile < T ? r0 + kTile : T;  // rows [r0, r1); keys [0, r1)
  const float* base = qkv + b * T * W;
  const float* k = base + (NH + g) * HD;
  const float* v = base + (NH + NKV) * HD + g * HDv;
  tile_stage(sm.q, ldq, base + h * HD, W, HD, r0, T);
  tile_zero(os, HDv);
  float m[kRowsPerWarp], l[kRowsPerWarp];  // the warp's rows' running max and sum (all lanes)
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }
  // NOTE: c0 <= r0 <= i for every row of the tile, so key c0 is unmasked in every chunk of
  // every in-range row: m is finite from the first chunk on.
  for (int64_t c0 = 0; c0 < r1; c0 += kTile) {
    const int nk = static_cast<int>(r1 - c0 < kTile ? r1 - c0 : kTile);
    __syncthreads();  // q and o ready; the previous chunk's reads of k, v, s, p, row done
    tile_stage(sm.k, ldk, k, W, HD, c0, r1);
    tile_stage(sm.v, ldv, v, W, HDv, c0, r1);
    __syncthreads();
    float s[kRowsPerWarp];
    chunk_scores<C>(s, sm.q, ldq, sm.k, ldk, HD, sm.s);
    const int64_t j = c0 + lane;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int il = warp + kWarps * r;
      const int64_t i = r0 + il;
      const bool valid = i < T && j < causal_keys(i);
      const float sv = valid ? scale * s[r] : -INFINITY;
      const float m_new = softmax_max(m[r], warp_max(sv));
      const float p = valid ? softmax_exp(sv - m_new) : 0.0f;
      const float psum = warp_sum(p);
      float corr = 1.0f;  // rows past T: P is 0 and O stays 0
      if (i < T) {        // warp-uniform
        corr = c0 == 0 ? 0.0f : softmax_rescale(m[r], m_new);
        l[r] = l[r] * corr + psum;
        m[r] = m_new;
      }
      sm.p[il * pld + lane] = to_elem<C>(p);
      if (lane == 0) row[il] = corr;
    }
    __syncthreads();  // p, row written
    tile_accumulate<C>(os, row, sm.p, sm.v, ldv, HDv, nk);
  }
  __syncthreads();  // the last accumulate done (its reads of row; kBf16: its fragments)
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int il = warp + kWarps * r;
    const int64_t i = r0 + il;
    if (lane == 0 && i < T) {
      row[il] = l[r];
      lse[(b * NH + h) * T + i] = softmax_lse(m[r], l[r]);
    }
  }
  __syncthreads();
  tile_store(out + b * T * OW + h * HDv, OW, os, row, HDv, r0, T);
}

// backward_rows, one key chunk [c0, c0 + 32) (rows < r1): stages its K and V rows, then the
// thread's tile rows' unscaled scores s = Q K^T and dP = dO V^T against them. Opens with a
// barrier (the previous chunk's reads of k, v and dS done; q, dout ready), so every thread
// of the block must call it.
template <AttentionCore C>
__device__ void rows_chunk_dots(float (&s)[kRowsPerWarp], float (&dp)[kRowsPerWarp],
                                const Smem<C>& sm, const float* k, const float* v, int64_t W,
                                int HD, int HDv, int64_t c0, int64_t r1) {
  __syncthreads();
  tile_stage(sm.k, sm.ld_k, k, W, HD, c0, r1);
  tile_stage(sm.v, sm.ld_v, v, W, HDv, c0, r1);
  __syncthreads();
  chunk_scores2<C>(s, sm.q, sm.ld_q, sm.k, sm.ld_k, HD, dp, sm.dout, sm.ld_dout, sm.v, sm.ld_v,
                   HDv, sm.s);
}

// Grid (row tiles, NH, B): D of rows [r0, r0 + 32) of head h into dots, their dQ into dqkv.
// smem: attention_smem(kBackwardRows, HD, HDv, C).
template <AttentionCore C>
__global__ void __launch_bounds__(kAttnThreads)
    attention_backward_rows_kernel(float* dqkv, float* dots, const float* dout, const float* qkv,
                                   const float* lse, int64_t T, int64_t NH, int64_t NKV, int HD,
                                   int HDv, float scale) {
  MOE_DYNAMIC_SMEM(unsigned char, smem);
  const Smem<C> sm = smem_carve<C>(smem, AttentionKernel::kBackwardRows, HD, HDv);
  const int ldq = sm.ld_q, ldo = sm.ld_dout, ldk = sm.ld_k;
  constexpr int pld = static_cast<int>(attention_p_ld(C));
  float* dqs = sm.acc0;  // (32, HD): the dQ accumulator
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t g = h / (NH / NKV);
  const int64_t W = (NH + NKV) * HD + NKV * HDv, OW = NH * HDv;
  const int64_t r1 = r0 + kTile < T ? r0 + kTile : T;
  const float* base = qkv + b * T * W;
  const float* k = base + (NH + g) * HD;
  const float* v = base + (NH + NKV) * HD + g * HDv;
  const float* lse_h = lse + (b * NH + h) * T;
  tile_stage(sm.q, ldq, base + h * HD, W, HD, r0, T);
  tile_stage(sm.dout, ldo, dout + b * T * OW + h * HDv, OW, HDv, r0, T);
  tile_zero(dqs, HD);
  float lse_r[kRowsPerWarp], dot[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = r0 + warp + kWarps * r;
    lse_r[r] = i < T ? lse_h[i] : 0.0f;
    dot[r] = 0.0f;  // pass (a): the lane's partial sum over its keys
  }
  // The two passes sweep the same chunks with the same scores; pass (a) sums
  // D_i = sum_j P_ij dP_ij per lane over the chunks in order (then the warp sum), pass (b)
  // writes dS = P (dP - D) scale and adds dQ += dS K.
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t c0 = 0; c0 < r1; c0 += kTile) {
      const int nk = static_cast<int>(r1 - c0 < kTile ? r1 - c0 : kTile);
      float s[kRowsPerWarp], dp[kRowsPerWarp];
      rows_chunk_dots<C>(s, dp, sm, k, v, W, HD, HDv, c0, r1);
      const int64_t j = c0 + lane;
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int il = warp + kWarps * r;
        const int64_t i = r0 + il;
        const bool valid = i < T && j < causal_keys(i);
        const float p = valid ? softmax_prob(scale * s[r], lse_r[r]) : 0.0f;
        if (pass == 0) {
          dot[r] += valid ? p * dp[r] : 0.0f;
        } else {
          sm.p[il * pld + lane] =
              to_elem<C>(valid ? softmax_backward_value(p, dp[r], dot[r], scale) : 0.0f);
        }
      }
      if (pass == 1) {
        __syncthreads();  // dS written
        tile_accumulate<C>(dqs, nullptr, sm.p, sm.k, ldk, HD, nk);
      }
    }
    if (pass == 0) {
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int64_t i = r0 + warp + kWarps * r;
        dot[r] = warp_sum(dot[r]);
        if (lane == 0 && i < T) dots[(b * NH + h) * T + i] = dot[r];
      }
    }
  }
  accumulators_done<C>();
  tile_store(dqkv + b * T * W + h * HD, W, dqs, nullptr, HD, r0, T);
}

// Grid (column tiles, NKV, B): dK and dV of kv head g's keys [c0, c0 + 32).
// smem: attention_smem(kBackwardCols, HD, HDv, C).
template <AttentionCore C>
__global__ void __launch_bounds__(kAttnThreads)
    attention_backward_cols_kernel(float* dqkv, const float* dots, const float* dout,
                                   const float* qkv, const float* lse, int64_t T, int64_t NH,
                                   int64_t NKV, int HD, int HDv, float scale) {
  MOE_DYNAMIC_SMEM(unsigned char, smem);
  const Smem<C> sm = smem_carve<C>(smem, AttentionKernel::kBackwardCols, HD, HDv);
  const int ldkt = sm.ld_k, ldvt = sm.ld_v, ldq = sm.ld_q, ldo = sm.ld_dout;
  constexpr int pld = static_cast<int>(attention_p_ld(C));
  float* dks = sm.acc0;  // (32, HD): the dK accumulator
  float* dvs = sm.acc1;  // (32, HDv): the dV accumulator
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t g = blockIdx.y, b = blockIdx.z;
  const int64_t group = NH / NKV;
  const int64_t W = (NH + NKV) * HD + NKV * HDv, OW = NH * HDv;
  const float* base = qkv + b * T * W;
  float* drow = dqkv + b * T * W;
  tile_stage(sm.k, ldkt, base + (NH + g) * HD, W, HD, c0, T);
  tile_stage(sm.v, ldvt, base + (NH + NKV) * HD + g * HDv, W, HDv, c0, T);
  tile_zero(dks, HD);
  tile_zero(dvs, HDv);
  for (int64_t h = g * group; h < (g + 1) * group; ++h) {
    const float* q = base + h * HD;
    const float* dh = dout + b * T * OW + h * HDv;
    const float* lse_h = lse + (b * NH + h) * T;
    const float* dots_h = dots + (b * NH + h) * T;
    for (int64_t i0 = c0; i0 < T; i0 += kTile) {
      const int nk = static_cast<int>(T - i0 < kTile ? T - i0 : kTile);
      __syncthreads();  // k, v ready; the previous chunk's reads of q, dout, s, p, ds done
      tile_stage(sm.q, ldq, q, W, HD, i0, T);
      tile_stage(sm.dout, ldo, dh, OW, HDv, i0, T);
      __syncthreads();
      // The lane's query row; its lse and D (D written by backward_rows for every row < T).
      const int64_t i = i0 + lane;
      const bool row_ok = i < T;
      const float lse_i = row_ok ? lse_h[i] : 0.0f;
      const float dot_i = row_ok ? dots_h[i] : 0.0f;
      float s[kRowsPerWarp], dp[kRowsPerWarp];
      chunk_scores2<C>(s, sm.k, ldkt, sm.q, ldq, HD, dp, sm.v, ldvt, sm.dout, ldo, HDv, sm.s);
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int cl = warp + kWarps * r;
        const bool valid = row_ok && c0 + cl < causal_keys(i);  // key c <= i < T
        const float p = valid ? softmax_prob(scale * s[r], lse_i) : 0.0f;
        sm.p[cl * pld + lane] = to_elem<C>(p);
        sm.ds[cl * pld + lane] =
            to_elem<C>(valid ? softmax_backward_value(p, dp[r], dot_i, scale) : 0.0f);
      }
      __syncthreads();  // P^T, dS^T written
      tile_accumulate<C>(dks, nullptr, sm.ds, sm.q, ldq, HD, nk);
      tile_accumulate<C>(dvs, nullptr, sm.p, sm.dout, ldo, HDv, nk);
    }
  }
  accumulators_done<C>();
  tile_store(drow + (NH + g) * HD, W, dks, nullptr, HD, c0, T);
  tile_store(drow + (NH + NKV) * HD + g * HDv, W, dvs, nullptr, HDv, c0, T);
}

}  // namespace

}  // namespace moe::cuda
