// The CUDA attention core: the twins of cpu::attention_forward / attention_backward (float),
// layouts and semantics in attention_kernels.h; launch dimensions from attention_plan.h.
//
// Design (simple, correct, deterministic first): three kernels of kAttnThreads threads over
// tiles of kAttnTile = 32 rows, each a sequence of the two building blocks below.
//   forward        (b, h, query rows [r0, r0 + 32)):  S = scale Q K^T into probs (dots),
//                  softmax in place (one warp per row), O = P V (matmul).
//   backward_rows  (b, h, query rows [r0, r0 + 32)):  dP = dO V^T into scratch (dots),
//                  dS = P (dP - rowsum(dP o P)) scale in place, dQ = dS K (matmul).
//   backward_cols  (b, kv head g, key columns [c0, c0 + 32)):
//                  dK = sum_h dS_h^T Q_h, then dV = sum_h P_h^T dO_h over the group's query
//                  heads h in increasing order and the query rows i in [c0, T) in increasing
//                  order (matmul on a transposed chunk).
// dots: the tile's A rows are staged in shared memory, then 32-key chunks of B; thread (warp w,
//   lane l) owns the outputs (w + 8k, l) of a chunk and sums each over d in order.
// matmul: 32-row chunks of P and M are staged; thread t owns the output elements t + 256k of
//   the (32, D) tile, accumulated in shared memory over the chunks, each in increasing j.
// Determinism: every output element has one owner thread and one summation order; the row
// reductions (max, sum, dot) are a warp butterfly broadcast from lane 0. No atomics, so results
// are bitwise reproducible. They match the CPU to rounding, not bit for bit (other summation
// orders, FMA contraction); the element math is model/softmax_math.h, shared with the CPU.
//
// NOTE: cost. This is not FlashAttention. It materialises the (B, NH, T, T) probabilities the
// CPU layout saves (4 B NH T^2 bytes: 8 GiB per sequence at the 671B shape, T = 4096 with 128
// heads) and sweeps them about five times in the forward (write S, three softmax passes, read
// for P V) and four in the backward (write dP, two passes, read for dQ, then dS and P again for
// dK / dV), so it is bound by memory traffic at O(T^2) per head, and its FP32 CUDA-core dots
// use no tensor cores. backward_cols blocks at small c0 do up to T rows while those near T do
// 32, so the tail of that grid is unbalanced. The faster path is a fused flash-style kernel
// (or cuDNN's SDPA graph) that keeps scores on chip and saves only the row log-sum-exp.
#include <algorithm>

#include "model/kernels/cuda/attention_kernels.h"
#include "model/kernels/cuda/attention_plan.h"
#include "model/kernels/cuda/cuda_check.h"
#include "model/softmax_math.h"

namespace moe::cuda {

namespace {

constexpr int kTile = kAttnTile;
constexpr int kWarps = kAttnThreads / 32;
constexpr int kPad = kTile + 1;  // row stride of a staged (32, 32) P chunk: conflict-free
constexpr unsigned kFullMask = 0xffffffffu;

__device__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = softmax_max(v, __shfl_xor_sync(kFullMask, v, o));
  return __shfl_sync(kFullMask, v, 0);
}

__device__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return __shfl_sync(kFullMask, v, 0);
}

// dots: s[i * T + j] = alpha * sum_d a[i * lda + d] b[j * ldb + d] for the tile's rows
// i in [r0, min(r0 + 32, T)) and keys j in [0, i] (the causal part; s is one head's (T, T)
// block). smem: attention_dots_smem_floats(D). The caller synchronises before reusing smem.
__device__ void tile_causal_dots(float* s, const float* a, int64_t lda, const float* b,
                                 int64_t ldb, int D, int64_t r0, int64_t T, float alpha,
                                 float* smem) {
  float* as = smem;              // (32, D): the tile's A rows
  float* bs = smem + kTile * D;  // (32, D + 1): a chunk of B rows
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int64_t r1 = r0 + kTile < T ? r0 + kTile : T;
  for (int idx = tid; idx < kTile * D; idx += kAttnThreads) {
    const int64_t i = r0 + idx / D;
    as[idx] = i < T ? a[i * lda + idx % D] : 0.0f;
  }
  for (int64_t c0 = 0; c0 < r1; c0 += kTile) {
    __syncthreads();  // as staged; the previous chunk's reads of bs done
    for (int idx = tid; idx < kTile * D; idx += kAttnThreads) {
      const int jl = idx / D, d = idx % D;
      const int64_t j = c0 + jl;
      bs[jl * (D + 1) + d] = j < r1 ? b[j * ldb + d] : 0.0f;
    }
    __syncthreads();
    const int64_t j = c0 + lane;
    for (int il = warp; il < kTile; il += kWarps) {
      const int64_t i = r0 + il;
      if (i < T && j <= i) {
        const float* ar = as + il * D;
        const float* br = bs + lane * (D + 1);
        float acc = 0.0f;
        for (int d = 0; d < D; ++d) acc += ar[d] * br[d];
        s[i * T + j] = alpha * acc;
      }
    }
  }
}

// Forward softmax of the tile's rows, one warp per row: p[i][0, i] <- softmax(p[i][0, i]),
// p[i][i + 1, T) <- 0 (the masked future), as cpu softmax_causal_row.
__device__ void tile_softmax_rows(float* p, int64_t r0, int64_t T) {
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  for (int il = warp; il < kTile; il += kWarps) {
    const int64_t i = r0 + il;
    if (i >= T) break;  // warp-uniform
    float* row = p + i * T;
    const int64_t n = causal_keys(i);
    float m = row[0];
    for (int64_t j = lane; j < n; j += 32) m = softmax_max(m, row[j]);
    m = warp_max(m);
    float sum = 0.0f;
    for (int64_t j = lane; j < n; j += 32) {
      const float e = softmax_exp(row[j] - m);
      row[j] = e;
      sum += e;
    }
    sum = warp_sum(sum);
    const float inv = 1.0f / sum;
    for (int64_t j = lane; j < n; j += 32) row[j] *= inv;
    for (int64_t j = n + lane; j < T; j += 32) row[j] = 0.0f;
  }
}

// Softmax backward of the tile's rows in place over dP, one warp per row:
// ds[i][0, i] <- P (dP - sum_j dP_j P_j) scale, ds[i][i + 1, r1) <- 0 up to the tile's end r1,
// as cpu softmax_backward_row.
__device__ void tile_softmax_backward_rows(float* ds, const float* p, int64_t r0, int64_t T,
                                           float scale) {
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int64_t r1 = r0 + kTile < T ? r0 + kTile : T;
  for (int il = warp; il < kTile; il += kWarps) {
    const int64_t i = r0 + il;
    if (i >= T) break;  // warp-uniform
    float* row = ds + i * T;
    const float* pr = p + i * T;
    const int64_t n = causal_keys(i);
    float dot = 0.0f;
    for (int64_t j = lane; j < n; j += 32) dot += row[j] * pr[j];
    dot = warp_sum(dot);
    for (int64_t j = lane; j < n; j += 32) row[j] = softmax_backward_value(pr[j], row[j], dot, scale);
    for (int64_t j = n + lane; j < r1; j += 32) row[j] = 0.0f;
  }
}

// acc[o][d] += sum_{k < nk} ps[o][k] ms[k][d] over the (32, D) tile, k in increasing order;
// thread t owns the elements t + 256 m (the same in every call with this D).
__device__ void tile_accumulate(float* acc, const float* ps, const float* ms, int D, int nk) {
  for (int idx = static_cast<int>(threadIdx.x); idx < kTile * D; idx += kAttnThreads) {
    const int o = idx / D, d = idx % D;
    float a = acc[idx];
    for (int k = 0; k < nk; ++k) a += ps[o * kPad + k] * ms[k * D + d];
    acc[idx] = a;
  }
}

__device__ void tile_zero(float* acc, int D) {
  for (int idx = static_cast<int>(threadIdx.x); idx < kTile * D; idx += kAttnThreads)
    acc[idx] = 0.0f;
}

// matmul: o[i * ldo + d] = sum_{j < r1} p[i * T + j] m[j * ldm + d] for the tile's rows
// i in [r0, r1 = min(r0 + 32, T)) and d < D, j in increasing order (p: one head's (T, T)
// block, written for j < r1). smem: attention_matmul_smem_floats(D); the caller synchronises
// before (smem reuse, p written by other warps).
__device__ void tile_matmul(float* o, int64_t ldo, const float* p, const float* m, int64_t ldm,
                            int D, int64_t r0, int64_t T, float* smem) {
  float* acc = smem;               // (32, D)
  float* ms = smem + kTile * D;    // (32, D): rows [c0, c0 + 32) of M
  float* ps = ms + kTile * D;      // (32, 33): P[r0 + il][c0 + jl] at il * 33 + jl
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t r1 = r0 + kTile < T ? r0 + kTile : T;
  tile_zero(acc, D);
  for (int64_t c0 = 0; c0 < r1; c0 += kTile) {
    const int nk = static_cast<int>(r1 - c0 < kTile ? r1 - c0 : kTile);
    __syncthreads();  // the previous chunk consumed
    for (int idx = tid; idx < kTile * D; idx += kAttnThreads) {
      const int64_t j = c0 + idx / D;
      ms[idx] = j < r1 ? m[j * ldm + idx % D] : 0.0f;
    }
    for (int idx = tid; idx < kTile * kTile; idx += kAttnThreads) {
      const int il = idx / kTile, jl = idx % kTile;
      const int64_t i = r0 + il, j = c0 + jl;
      ps[il * kPad + jl] = i < T && j < r1 ? p[i * T + j] : 0.0f;
    }
    __syncthreads();
    tile_accumulate(acc, ps, ms, D, nk);
  }
  // Each thread reads back only the elements it accumulated: no barrier needed.
  for (int idx = tid; idx < kTile * D; idx += kAttnThreads) {
    const int64_t i = r0 + idx / D;
    if (i < T) o[i * ldo + idx % D] = acc[idx];
  }
}

// matmul on transposed chunks, summed over heads: for the key columns c in
// [c0, min(c0 + 32, T)) and d < D,
//   o[c * ldo + d] = sum_{hh < heads} sum_{i in [c0, T), c <= i} p_hh[i * T + c] m_hh[i * ldm + d]
// with p_hh = p + hh T T and m_hh = m + hh m_head, heads then rows in increasing order.
// smem: attention_matmul_smem_floats(D); the caller synchronises before.
__device__ void tile_matmul_transposed(float* o, int64_t ldo, const float* p, const float* m,
                                       int64_t m_head, int64_t ldm, int D, int64_t heads,
                                       int64_t c0, int64_t T, float* smem) {
  float* acc = smem;               // (32, D)
  float* ms = smem + kTile * D;    // (32, D): rows [i0, i0 + 32) of M
  float* ps = ms + kTile * D;      // (32, 33): P[i0 + il][c0 + cl] at cl * 33 + il
  const int tid = static_cast<int>(threadIdx.x);
  tile_zero(acc, D);
  for (int64_t hh = 0; hh < heads; ++hh) {
    const float* ph = p + hh * T * T;
    const float* mh = m + hh * m_head;
    for (int64_t i0 = c0; i0 < T; i0 += kTile) {
      const int nk = static_cast<int>(T - i0 < kTile ? T - i0 : kTile);
      __syncthreads();  // the previous chunk consumed
      for (int idx = tid; idx < kTile * D; idx += kAttnThreads) {
        const int64_t i = i0 + idx / D;
        ms[idx] = i < T ? mh[i * ldm + idx % D] : 0.0f;
      }
      for (int idx = tid; idx < kTile * kTile; idx += kAttnThreads) {
        const int il = idx / kTile, cl = idx % kTile;
        const int64_t i = i0 + il, c = c0 + cl;
        ps[cl * kPad + il] = i < T && c <= i ? ph[i * T + c] : 0.0f;
      }
      __syncthreads();
      tile_accumulate(acc, ps, ms, D, nk);
    }
  }
  for (int idx = tid; idx < kTile * D; idx += kAttnThreads) {
    const int64_t c = c0 + idx / D;
    if (c < T) o[c * ldo + idx % D] = acc[idx];
  }
}

// Grid (row tiles, NH, B).
__global__ void __launch_bounds__(kAttnThreads)
    attention_forward_kernel(float* out, float* probs, const float* qkv, int64_t T, int64_t NH,
                             int64_t NKV, int HD, int HDv, float scale) {
  extern __shared__ float smem[];
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t g = h / (NH / NKV);
  const int64_t W = (NH + NKV) * HD + NKV * HDv, OW = NH * HDv;
  const float* base = qkv + b * T * W;
  const float* q = base + h * HD;
  const float* k = base + (NH + g) * HD;
  const float* v = base + (NH + NKV) * HD + g * HDv;
  float* p = probs + (b * NH + h) * T * T;
  tile_causal_dots(p, q, W, k, W, HD, r0, T, scale, smem);
  __syncthreads();
  tile_softmax_rows(p, r0, T);
  __syncthreads();
  tile_matmul(out + b * T * OW + h * HDv, OW, p, v, W, HDv, r0, T, smem);
}

// Grid (row tiles, NH, B): dS into scratch, dQ into dqkv.
__global__ void __launch_bounds__(kAttnThreads)
    attention_backward_rows_kernel(float* dqkv, float* scratch, const float* dout,
                                   const float* qkv, const float* probs, int64_t T, int64_t NH,
                                   int64_t NKV, int HD, int HDv, float scale) {
  extern __shared__ float smem[];
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t g = h / (NH / NKV);
  const int64_t W = (NH + NKV) * HD + NKV * HDv, OW = NH * HDv;
  const float* base = qkv + b * T * W;
  const float* k = base + (NH + g) * HD;
  const float* v = base + (NH + NKV) * HD + g * HDv;
  const float* p = probs + (b * NH + h) * T * T;
  float* ds = scratch + (b * NH + h) * T * T;
  tile_causal_dots(ds, dout + b * T * OW + h * HDv, OW, v, W, HDv, r0, T, 1.0f, smem);
  __syncthreads();
  tile_softmax_backward_rows(ds, p, r0, T, scale);
  __syncthreads();
  tile_matmul(dqkv + b * T * W + h * HD, W, ds, k, W, HD, r0, T, smem);
}

// Grid (column tiles, NKV, B): dK and dV of kv head g's keys [c0, c0 + 32).
__global__ void __launch_bounds__(kAttnThreads)
    attention_backward_cols_kernel(float* dqkv, const float* scratch, const float* dout,
                                   const float* qkv, const float* probs, int64_t T, int64_t NH,
                                   int64_t NKV, int HD, int HDv) {
  extern __shared__ float smem[];
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t g = blockIdx.y, b = blockIdx.z;
  const int64_t group = NH / NKV, h0 = g * group;
  const int64_t W = (NH + NKV) * HD + NKV * HDv, OW = NH * HDv;
  float* drow = dqkv + b * T * W;
  const int64_t plane0 = (b * NH + h0) * T * T;  // the group's first (T, T) block
  // dK = sum_h dS_h^T Q_h, Q_h HD apart in the token row.
  tile_matmul_transposed(drow + (NH + g) * HD, W, scratch + plane0, qkv + b * T * W + h0 * HD,
                         HD, W, HD, group, c0, T, smem);
  __syncthreads();  // the dK write-out's reads of smem done before dV reuses it
  // dV = sum_h P_h^T dO_h, dO_h HDv apart in the output row.
  tile_matmul_transposed(drow + (NH + NKV) * HD + g * HDv, W, probs + plane0,
                         dout + b * T * OW + h0 * HDv, HDv, OW, HDv, group, c0, T, smem);
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

void attention_forward(float* out, float* probs, const float* qkv, int64_t B, int64_t T_,
                       int64_t NH, int64_t NKV, int64_t HD, int64_t HDv, Stream stream) {
  const AttentionPlan plan = attention_plan({B, T_, NH, NKV, HD, HDv}, attention_smem_limit());
  if (B == 0 || T_ == 0) return;
  CHECK(out != nullptr && probs != nullptr && qkv != nullptr, "attention_forward: null buffer");
  const LaunchDims& d = plan.forward;
  attention_smem_opt_in(attention_forward_kernel, d);
  attention_forward_kernel<<<attention_grid(d), d.block, static_cast<size_t>(d.smem_bytes),
                             stream>>>(out, probs, qkv, T_, NH, NKV, static_cast<int>(HD),
                                       static_cast<int>(HDv), attention_scale<float>(HD));
  CUDA_CHECK_LAUNCH();
}

void attention_forward(float* out, float* probs, const float* qkv, int64_t B, int64_t T_,
                       int64_t NH, int64_t NKV, int64_t HD, Stream stream) {
  attention_forward(out, probs, qkv, B, T_, NH, NKV, HD, HD, stream);
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* probs,
                        int64_t B, int64_t T_, int64_t NH, int64_t NKV, int64_t HD, int64_t HDv,
                        float* scratch, Stream stream) {
  const AttentionPlan plan = attention_plan({B, T_, NH, NKV, HD, HDv}, attention_smem_limit());
  if (B == 0 || T_ == 0) return;
  CHECK(dqkv != nullptr && dout != nullptr && qkv != nullptr && probs != nullptr &&
            scratch != nullptr,
        "attention_backward: null buffer");
  const int hd = static_cast<int>(HD), hdv = static_cast<int>(HDv);
  const LaunchDims& r = plan.backward_rows;
  attention_smem_opt_in(attention_backward_rows_kernel, r);
  attention_backward_rows_kernel<<<attention_grid(r), r.block, static_cast<size_t>(r.smem_bytes),
                                   stream>>>(dqkv, scratch, dout, qkv, probs, T_, NH, NKV, hd,
                                             hdv, attention_scale<float>(HD));
  CUDA_CHECK_LAUNCH();
  const LaunchDims& c = plan.backward_cols;
  attention_smem_opt_in(attention_backward_cols_kernel, c);
  attention_backward_cols_kernel<<<attention_grid(c), c.block, static_cast<size_t>(c.smem_bytes),
                                   stream>>>(dqkv, scratch, dout, qkv, probs, T_, NH, NKV, hd,
                                             hdv);
  CUDA_CHECK_LAUNCH();
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* probs,
                        int64_t B, int64_t T_, int64_t NH, int64_t NKV, int64_t HD,
                        float* scratch, Stream stream) {
  attention_backward(dqkv, dout, qkv, probs, B, T_, NH, NKV, HD, HD, scratch, stream);
}

}  // namespace moe::cuda
