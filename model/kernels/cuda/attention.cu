// The CUDA attention core: the twins of cpu::attention_forward / attention_backward (float),
// layouts and semantics in attention_kernels.h; launch dimensions and shared-memory carving
// from attention_plan.h.
//
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
// NOTE: cost. Memory is O(T) per head (lse and D, B NH T floats each) instead of the (T, T)
// probabilities. Compute is FP32 on CUDA cores, no tensor cores: the forward does about
// T^2 / 2 (HD + HDv) FMAs per head; the backward recomputes S and dP three times (rows
// passes (a) and (b), cols) and adds dQ, dK, dV: T^2 / 2 (5 HD + 4 HDv), 4.5x the forward at
// HD = HDv. Each block rereads the K / V (or Q / dO) chunks it needs from global memory
// (mostly L2 hits), O(T^2 / 32) rows per head.
// Work per block is uneven: forward / backward_rows blocks near T sweep T / 32 chunks, those
// near 0 one; backward_cols the reverse, times the group size, so grid tails are unbalanced.
// The faster path is a tensor-core kernel (FlashAttention-2 style) or cuDNN's SDPA graph.
#include <cmath>

#include "model/kernels/cuda/attention_kernels.h"
#include "model/kernels/cuda/attention_plan.h"
#include "model/kernels/cuda/cuda_check.h"
#include "model/softmax_math.h"

namespace moe::cuda {

namespace {

constexpr int kTile = kAttnTile;
constexpr int kWarps = kAttnThreads / 32;
constexpr int kRowsPerWarp = kTile / kWarps;  // warp w owns tile rows w + kWarps r
constexpr int kPad = kTile + 1;               // row stride of a staged (32, 32) P / dS chunk
constexpr unsigned kFullMask = 0xffffffffu;
static_assert(kTile == 32 && kTile % kWarps == 0, "one lane per chunk row, whole rows per warp");

__device__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = softmax_max(v, __shfl_xor_sync(kFullMask, v, o));
  return __shfl_sync(kFullMask, v, 0);
}

__device__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return __shfl_sync(kFullMask, v, 0);
}

// dst (32, ldd) <- rows [r0, r0 + 32) of src (row stride ld), D columns; rows at or past
// `end` are zero.
__device__ void tile_stage(float* dst, int ldd, const float* src, int64_t ld, int D, int64_t r0,
                           int64_t end) {
  for (int idx = static_cast<int>(threadIdx.x); idx < kTile * D; idx += kAttnThreads) {
    const int rl = idx / D, d = idx % D;
    const int64_t r = r0 + rl;
    dst[rl * ldd + d] = r < end ? src[r * ld + d] : 0.0f;
  }
}

__device__ void tile_zero(float* acc, int D) {
  for (int idx = static_cast<int>(threadIdx.x); idx < kTile * D; idx += kAttnThreads)
    acc[idx] = 0.0f;
}

// The warp's scores against the lane's chunk row: acc[r] = sum_d a[(w + 8 r) lda + d]
// b[lane ldb + d], d increasing (a read as a broadcast; b with ldb = D + 1, attention_padded).
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

// acc[o][d] <- acc[o][d] rescale[o] (rescale may be null: 1) + sum_{k < nk} ps[o][k] ms[k][d]
// over the (32, D) tile, k increasing; ms has row stride ldm. Thread t owns the elements
// t + 256 m (the same in every call with this D).
__device__ void tile_accumulate(float* acc, const float* rescale, const float* ps,
                                const float* ms, int ldm, int D, int nk) {
  for (int idx = static_cast<int>(threadIdx.x); idx < kTile * D; idx += kAttnThreads) {
    const int o = idx / D, d = idx % D;
    float a = rescale != nullptr ? acc[idx] * rescale[o] : acc[idx];
    for (int k = 0; k < nk; ++k) a += ps[o * kPad + k] * ms[k * ldm + d];
    acc[idx] = a;
  }
}

// dst rows [r0, min(r0 + 32, T)) (row stride ld) <- acc (32, D), divided by div[row] where
// div is not null. Each thread stores only the elements it accumulated (tile_accumulate's
// ownership), so no barrier is needed after the last accumulate.
__device__ void tile_store(float* dst, int64_t ld, const float* acc, const float* div, int D,
                           int64_t r0, int64_t T) {
  for (int idx = static_cast<int>(threadIdx.x); idx < kTile * D; idx += kAttnThreads) {
    const int o = idx / D;
    const int64_t i = r0 + o;
    if (i < T) dst[i * ld + idx % D] = div != nullptr ? acc[idx] / div[o] : acc[idx];
  }
}

// Grid (row tiles, NH, B): out rows [r0, r0 + 32) of head h and their lse.
// smem: attention_forward_smem_floats(HD, HDv).
__global__ void __launch_bounds__(kAttnThreads)
    attention_forward_kernel(float* out, float* lse, const float* qkv, int64_t T, int64_t NH,
                             int64_t NKV, int HD, int HDv, float scale) {
  extern __shared__ float smem[];
  float* qs = smem;                   // (32, HD): the tile's query rows
  float* ks = qs + kTile * HD;        // (32, HD + 1): a key chunk
  float* vs = ks + kTile * (HD + 1);  // (32, HDv): the value chunk
  float* ps = vs + kTile * HDv;       // (32, 33): the chunk's unnormalised P
  float* os = ps + kTile * kPad;      // (32, HDv): the O accumulator
  float* row = os + kTile * HDv;      // (32): per row the chunk's rescale, at the end l
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t g = h / (NH / NKV);
  const int64_t W = (NH + NKV) * HD + NKV * HDv, OW = NH * HDv;
  const int64_t r1 = r0 + kTile < T ? r0 + kTile : T;  // rows [r0, r1); keys [0, r1)
  const float* base = qkv + b * T * W;
  const float* k = base + (NH + g) * HD;
  const float* v = base + (NH + NKV) * HD + g * HDv;
  tile_stage(qs, HD, base + h * HD, W, HD, r0, T);
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
    __syncthreads();  // qs and os ready; the previous chunk's reads of ks, vs, ps, row done
    tile_stage(ks, HD + 1, k, W, HD, c0, r1);
    tile_stage(vs, HDv, v, W, HDv, c0, r1);
    __syncthreads();
    float s[kRowsPerWarp];
    warp_row_dots(s, qs, HD, ks, HD + 1, HD);
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
      ps[il * kPad + lane] = p;
      if (lane == 0) row[il] = corr;
    }
    __syncthreads();  // ps, row written
    tile_accumulate(os, row, ps, vs, HDv, HDv, nk);
  }
  __syncthreads();  // the last accumulate's reads of row done
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
// warp's tile rows' unscaled scores s = Q K^T and dP = dO V^T against them. Opens with a
// barrier (the previous chunk's reads of ks, vs and dS done; qs, dos ready), so every thread
// of the block must call it.
__device__ void rows_chunk_dots(float (&s)[kRowsPerWarp], float (&dp)[kRowsPerWarp],
                                const float* qs, const float* dos, float* ks, float* vs,
                                const float* k, const float* v, int64_t W, int HD, int HDv,
                                int64_t c0, int64_t r1) {
  __syncthreads();
  tile_stage(ks, HD + 1, k, W, HD, c0, r1);
  tile_stage(vs, HDv + 1, v, W, HDv, c0, r1);
  __syncthreads();
  warp_row_dots(s, qs, HD, ks, HD + 1, HD);
  warp_row_dots(dp, dos, HDv, vs, HDv + 1, HDv);
}

// Grid (row tiles, NH, B): D of rows [r0, r0 + 32) of head h into dots, their dQ into dqkv.
// smem: attention_backward_rows_smem_floats(HD, HDv).
__global__ void __launch_bounds__(kAttnThreads)
    attention_backward_rows_kernel(float* dqkv, float* dots, const float* dout, const float* qkv,
                                   const float* lse, int64_t T, int64_t NH, int64_t NKV, int HD,
                                   int HDv, float scale) {
  extern __shared__ float smem[];
  float* qs = smem;                     // (32, HD): the tile's query rows
  float* dos = qs + kTile * HD;         // (32, HDv): their dO rows
  float* ks = dos + kTile * HDv;        // (32, HD + 1): a key chunk
  float* vs = ks + kTile * (HD + 1);    // (32, HDv + 1): the value chunk
  float* dss = vs + kTile * (HDv + 1);  // (32, 33): the chunk's dS
  float* dqs = dss + kTile * kPad;      // (32, HD): the dQ accumulator
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
  tile_stage(qs, HD, base + h * HD, W, HD, r0, T);
  tile_stage(dos, HDv, dout + b * T * OW + h * HDv, OW, HDv, r0, T);
  tile_zero(dqs, HD);
  float lse_r[kRowsPerWarp], dot[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = r0 + warp + kWarps * r;
    lse_r[r] = i < T ? lse_h[i] : 0.0f;
    dot[r] = 0.0f;  // pass (a): the lane's partial sum over its keys
  }
  // Pass (a): D_i = sum_j P_ij dP_ij, per lane over the chunks in order, then the warp sum.
  for (int64_t c0 = 0; c0 < r1; c0 += kTile) {
    float s[kRowsPerWarp], dp[kRowsPerWarp];
    rows_chunk_dots(s, dp, qs, dos, ks, vs, k, v, W, HD, HDv, c0, r1);
    const int64_t j = c0 + lane;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t i = r0 + warp + kWarps * r;
      const bool valid = i < T && j < causal_keys(i);
      const float p = valid ? softmax_prob(scale * s[r], lse_r[r]) : 0.0f;
      dot[r] += valid ? p * dp[r] : 0.0f;
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = r0 + warp + kWarps * r;
    dot[r] = warp_sum(dot[r]);
    if (lane == 0 && i < T) dots[(b * NH + h) * T + i] = dot[r];
  }
  // Pass (b): dS = P (dP - D) scale, dQ += dS K.
  for (int64_t c0 = 0; c0 < r1; c0 += kTile) {
    const int nk = static_cast<int>(r1 - c0 < kTile ? r1 - c0 : kTile);
    float s[kRowsPerWarp], dp[kRowsPerWarp];
    rows_chunk_dots(s, dp, qs, dos, ks, vs, k, v, W, HD, HDv, c0, r1);
    const int64_t j = c0 + lane;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int il = warp + kWarps * r;
      const int64_t i = r0 + il;
      const bool valid = i < T && j < causal_keys(i);
      const float p = valid ? softmax_prob(scale * s[r], lse_r[r]) : 0.0f;
      dss[il * kPad + lane] = valid ? softmax_backward_value(p, dp[r], dot[r], scale) : 0.0f;
    }
    __syncthreads();  // dss written
    tile_accumulate(dqs, nullptr, dss, ks, HD + 1, HD, nk);
  }
  tile_store(dqkv + b * T * W + h * HD, W, dqs, nullptr, HD, r0, T);
}

// Grid (column tiles, NKV, B): dK and dV of kv head g's keys [c0, c0 + 32).
// smem: attention_backward_cols_smem_floats(HD, HDv).
__global__ void __launch_bounds__(kAttnThreads)
    attention_backward_cols_kernel(float* dqkv, const float* dots, const float* dout,
                                   const float* qkv, const float* lse, int64_t T, int64_t NH,
                                   int64_t NKV, int HD, int HDv, float scale) {
  extern __shared__ float smem[];
  float* kt = smem;                     // (32, HD): the tile's key rows
  float* vt = kt + kTile * HD;          // (32, HDv): their value rows
  float* qc = vt + kTile * HDv;         // (32, HD + 1): a query chunk
  float* doc = qc + kTile * (HD + 1);   // (32, HDv + 1): its dO rows
  float* pt = doc + kTile * (HDv + 1);  // (32, 33): P^T, pt[c][i]
  float* dst = pt + kTile * kPad;       // (32, 33): dS^T
  float* dks = dst + kTile * kPad;      // (32, HD): the dK accumulator
  float* dvs = dks + kTile * HD;        // (32, HDv): the dV accumulator
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t g = blockIdx.y, b = blockIdx.z;
  const int64_t group = NH / NKV;
  const int64_t W = (NH + NKV) * HD + NKV * HDv, OW = NH * HDv;
  const float* base = qkv + b * T * W;
  float* drow = dqkv + b * T * W;
  tile_stage(kt, HD, base + (NH + g) * HD, W, HD, c0, T);
  tile_stage(vt, HDv, base + (NH + NKV) * HD + g * HDv, W, HDv, c0, T);
  tile_zero(dks, HD);
  tile_zero(dvs, HDv);
  for (int64_t h = g * group; h < (g + 1) * group; ++h) {
    const float* q = base + h * HD;
    const float* dh = dout + b * T * OW + h * HDv;
    const float* lse_h = lse + (b * NH + h) * T;
    const float* dots_h = dots + (b * NH + h) * T;
    for (int64_t i0 = c0; i0 < T; i0 += kTile) {
      const int nk = static_cast<int>(T - i0 < kTile ? T - i0 : kTile);
      __syncthreads();  // kt, vt ready; the previous chunk's reads of qc, doc, pt, dst done
      tile_stage(qc, HD + 1, q, W, HD, i0, T);
      tile_stage(doc, HDv + 1, dh, OW, HDv, i0, T);
      __syncthreads();
      // The lane's query row; its lse and D (D written by backward_rows for every row < T).
      const int64_t i = i0 + lane;
      const bool row_ok = i < T;
      const float lse_i = row_ok ? lse_h[i] : 0.0f;
      const float dot_i = row_ok ? dots_h[i] : 0.0f;
      float s[kRowsPerWarp], dp[kRowsPerWarp];
      warp_row_dots(s, kt, HD, qc, HD + 1, HD);
      warp_row_dots(dp, vt, HDv, doc, HDv + 1, HDv);
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int cl = warp + kWarps * r;
        const bool valid = row_ok && c0 + cl < causal_keys(i);  // key c <= i < T
        const float p = valid ? softmax_prob(scale * s[r], lse_i) : 0.0f;
        pt[cl * kPad + lane] = p;
        dst[cl * kPad + lane] = valid ? softmax_backward_value(p, dp[r], dot_i, scale) : 0.0f;
      }
      __syncthreads();  // pt, dst written
      tile_accumulate(dks, nullptr, dst, qc, HD + 1, HD, nk);
      tile_accumulate(dvs, nullptr, pt, doc, HDv + 1, HDv, nk);
    }
  }
  tile_store(drow + (NH + g) * HD, W, dks, nullptr, HD, c0, T);
  tile_store(drow + (NH + NKV) * HD + g * HDv, W, dvs, nullptr, HDv, c0, T);
}

// The device's opt-in shared-memory limit per block.
int64_t attention_smem_limit() {
  int dev = 0, bytes = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return bytes;
}

dim3 attention_grid(const LaunchDims& d) {
  return dim3(static_cast<unsigned>(d.grid_x), static_cast<unsigned>(d.grid_y),
              static_cast<unsigned>(d.grid_z));
}

// Kernels over 48 KiB of dynamic shared memory must opt in before launch.
template <typename Kernel>
void attention_smem_opt_in(Kernel* kernel, const LaunchDims& d) {
  if (d.smem_bytes > kSmemDefaultBytes)
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(d.smem_bytes)));
}

}  // namespace

// The forward needs no scratch (attention_scratch_floats sizes the backward's D).
void attention_forward(float* out, float* lse, const float* qkv, int64_t B, int64_t T_,
                       int64_t NH, int64_t NKV, int64_t HD, int64_t HDv, float* /*scratch*/,
                       Stream stream) {
  const AttentionPlan plan = attention_plan({B, T_, NH, NKV, HD, HDv}, attention_smem_limit());
  if (B == 0 || T_ == 0) return;
  CHECK(out != nullptr && lse != nullptr && qkv != nullptr, "attention_forward: null buffer");
  const LaunchDims& d = plan.forward;
  attention_smem_opt_in(attention_forward_kernel, d);
  attention_forward_kernel<<<attention_grid(d), d.block, static_cast<size_t>(d.smem_bytes),
                             stream>>>(out, lse, qkv, T_, NH, NKV, static_cast<int>(HD),
                                       static_cast<int>(HDv), attention_scale<float>(HD));
  CUDA_CHECK_LAUNCH();
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* lse,
                        int64_t B, int64_t T_, int64_t NH, int64_t NKV, int64_t HD, int64_t HDv,
                        float* scratch, Stream stream) {
  const AttentionPlan plan = attention_plan({B, T_, NH, NKV, HD, HDv}, attention_smem_limit());
  if (B == 0 || T_ == 0) return;
  CHECK(dqkv != nullptr && dout != nullptr && qkv != nullptr && lse != nullptr &&
            scratch != nullptr,
        "attention_backward: null buffer");
  const int hd = static_cast<int>(HD), hdv = static_cast<int>(HDv);
  const float scale = attention_scale<float>(HD);
  // backward_rows writes D (B, NH, T) into scratch; backward_cols, after it on the stream,
  // reads it.
  const LaunchDims& r = plan.backward_rows;
  attention_smem_opt_in(attention_backward_rows_kernel, r);
  attention_backward_rows_kernel<<<attention_grid(r), r.block, static_cast<size_t>(r.smem_bytes),
                                   stream>>>(dqkv, scratch, dout, qkv, lse, T_, NH, NKV, hd, hdv,
                                             scale);
  CUDA_CHECK_LAUNCH();
  const LaunchDims& c = plan.backward_cols;
  attention_smem_opt_in(attention_backward_cols_kernel, c);
  attention_backward_cols_kernel<<<attention_grid(c), c.block, static_cast<size_t>(c.smem_bytes),
                                   stream>>>(dqkv, scratch, dout, qkv, lse, T_, NH, NKV, hd, hdv,
                                             scale);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe::cuda
