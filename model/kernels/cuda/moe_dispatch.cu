// Token dispatch on the device: the dispatch plan (a stable counting sort of the (token, slot)
// pairs by expert), the permutation into expert-contiguous rows and the weighted combine
// back; the twins of model/kernels/cpu/moe_dispatch.cpp. Contracts in moe_kernels.h, launch
// plans in moe_plan.h.
//
// Dimension letters: N tokens, K slots per token, E experts, C row width; pairs = N * K.
//
// The plan reproduces the CPU's row order exactly, in three launches:
//   1. histogram: each warp counts the experts of one tile of consecutive pairs (integer
//      shared-memory atomics: the counts do not depend on their order), hist (tiles, E);
//   2. scan: one thread per expert sums its column over the tiles (counts), the block scans
//      the counts (offsets), and each column becomes the tile's first row for that expert;
//   3. place: each warp walks its tile again 32 pairs at a time, in pair order; a pair's row
//      is its expert's cursor plus the lanes below it with the same expert (__match_any_sync),
//      so within an expert rows follow tiles, then pairs: token, then slot, as on the CPU.
// Permute and combine give each output row one writer and sum over k in k order, with
// products and sums rounded one by one (no contraction into FMA), so they compute the CPU's
// float operations exactly; dweights is a double dot product in a fixed lane-and-tree order.
#include <cstdint>
#include <initializer_list>

#include "model/kernels/cuda/cuda_check.h"
#include "model/kernels/cuda/reduce.cuh"
#include "model/kernels/cuda/moe_kernels.h"

namespace moe::cuda {

namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// V consecutive floats moved as one access (V = 4: 16-byte aligned rows).
template <int V>
struct alignas(sizeof(float) * V) FloatVec {
  float v[V];
};

// The dispatch tile this warp owns and its pair range [i0, i1); false past the last tile.
__device__ bool warp_tile(int64_t& tile, int64_t& i0, int64_t& i1, int64_t pairs) {
  tile = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kMoeWarpSize) +
         threadIdx.x / kMoeWarpSize;
  i0 = tile * kMoeTilePairs;
  i1 = min(pairs, i0 + kMoeTilePairs);
  return i0 < pairs;
}

// hist (tiles, E): how many pairs of each tile chose each expert.
__global__ void dispatch_histogram_kernel(int32_t* hist, const int32_t* expert_ids,
                                          int64_t pairs, int64_t E) {
  MOE_DYNAMIC_SMEM(unsigned char, smem_raw);
  int64_t tile, i0, i1;
  if (!warp_tile(tile, i0, i1, pairs)) return;
  const int lane = threadIdx.x % kMoeWarpSize;
  int32_t* h = reinterpret_cast<int32_t*>(smem_raw) + (threadIdx.x / kMoeWarpSize) * E;  // (E)
  for (int64_t e = lane; e < E; e += kMoeWarpSize) h[e] = 0;
  __syncwarp();
  for (int64_t i = i0 + lane; i < i1; i += kMoeWarpSize) {
    const int32_t e = expert_ids[i];
    if (e < 0 || e >= E) __trap();  // the CPU CHECK-fails on such an id
    atomicAdd(&h[e], 1);
  }
  __syncwarp();
  for (int64_t e = lane; e < E; e += kMoeWarpSize) hist[tile * E + e] = h[e];
}

// counts (E), offsets (E + 1); hist (tiles, E) becomes each tile's first row per expert.
// One block, thread e for expert e (blockDim.x >= E); inclusive Hillis-Steele scan.
__global__ void dispatch_scan_kernel(int64_t* counts, int64_t* offsets, int32_t* hist,
                                     int64_t tiles, int64_t E) {
  MOE_DYNAMIC_SMEM(unsigned char, smem_raw);
  int64_t* scan = reinterpret_cast<int64_t*>(smem_raw);  // (blockDim.x)
  const int64_t e = threadIdx.x;
  int64_t c = 0;
  if (e < E)
    for (int64_t t = 0; t < tiles; ++t) c += hist[t * E + e];
  scan[e] = c;
  __syncthreads();
  for (unsigned off = 1; off < blockDim.x; off <<= 1) {
    const int64_t add = threadIdx.x >= off ? scan[threadIdx.x - off] : 0;
    __syncthreads();
    scan[threadIdx.x] += add;
    __syncthreads();
  }
  if (e == 0) offsets[0] = 0;
  if (e >= E) return;
  counts[e] = c;
  offsets[e + 1] = scan[e];
  int64_t base = scan[e] - c;  // exclusive: the expert's first row
  for (int64_t t = 0; t < tiles; ++t) {
    const int32_t h = hist[t * E + e];
    hist[t * E + e] = static_cast<int32_t>(base);
    base += h;
  }
}

// row_of (pairs), token_of (pairs) from the tiles' first rows (tiles, E).
__global__ void dispatch_place_kernel(int32_t* row_of, int32_t* token_of, const int32_t* first,
                                      const int32_t* expert_ids, int64_t pairs, int64_t E,
                                      int64_t K) {
  MOE_DYNAMIC_SMEM(unsigned char, smem_raw);
  int64_t tile, i0, i1;
  if (!warp_tile(tile, i0, i1, pairs)) return;
  const int lane = threadIdx.x % kMoeWarpSize;
  int32_t* cursor = reinterpret_cast<int32_t*>(smem_raw) + (threadIdx.x / kMoeWarpSize) * E;
  for (int64_t e = lane; e < E; e += kMoeWarpSize) cursor[e] = first[tile * E + e];
  __syncwarp();
  const unsigned below = (1u << lane) - 1u;  // lanes lower than this one
  for (int64_t j = i0; j < i1; j += kMoeWarpSize) {  // j is warp-uniform
    const int64_t i = j + lane;
    const bool live = i < i1;
    const int32_t e = live ? expert_ids[i] : -1;
    const unsigned same = __match_any_sync(kFullMask, e);
    if (live) {
      const int32_t r = cursor[e] + __popc(same & below);
      row_of[i] = r;
      token_of[r] = static_cast<int32_t>(i / K);
    }
    __syncwarp();  // every lane has read its cursor before the group's lowest lane moves it
    if (live && (same & below) == 0u) cursor[e] += __popc(same);
    __syncwarp();
  }
}

template <int V>
__global__ void permute_forward_kernel(float* xp, const float* x, const int32_t* token_of,
                                       int64_t rows, int64_t C) {
  const int64_t r = blockIdx.x;
  if (r >= rows) return;
  const auto* src = reinterpret_cast<const FloatVec<V>*>(x + static_cast<int64_t>(token_of[r]) * C);
  auto* dst = reinterpret_cast<FloatVec<V>*>(xp + r * C);
  for (int64_t c = threadIdx.x; c < C / V; c += blockDim.x) dst[c] = src[c];
}

template <int V>
__global__ void permute_backward_kernel(float* dx, const float* dxp, const int32_t* row_of,
                                        int64_t N, int64_t K, int64_t C) {
  const int64_t n = blockIdx.x;
  if (n >= N) return;
  const int32_t* rows = row_of + n * K;
  auto* dst = reinterpret_cast<FloatVec<V>*>(dx + n * C);
  for (int64_t c = threadIdx.x; c < C / V; c += blockDim.x) {
    FloatVec<V> acc = reinterpret_cast<const FloatVec<V>*>(dxp + static_cast<int64_t>(rows[0]) * C)[c];
    for (int64_t k = 1; k < K; ++k) {
      const FloatVec<V> v =
          reinterpret_cast<const FloatVec<V>*>(dxp + static_cast<int64_t>(rows[k]) * C)[c];
#pragma unroll
      for (int j = 0; j < V; ++j) acc.v[j] += v.v[j];
    }
    dst[c] = acc;
  }
}

template <int V>
__global__ void combine_forward_kernel(float* out, const float* yp, const float* weights,
                                       const int32_t* row_of, int64_t N, int64_t K, int64_t C) {
  const int64_t n = blockIdx.x;
  if (n >= N) return;
  const int32_t* rows = row_of + n * K;
  const float* w = weights + n * K;
  auto* dst = reinterpret_cast<FloatVec<V>*>(out + n * C);
  for (int64_t c = threadIdx.x; c < C / V; c += blockDim.x) {
    FloatVec<V> acc = reinterpret_cast<const FloatVec<V>*>(yp + static_cast<int64_t>(rows[0]) * C)[c];
#pragma unroll
    for (int j = 0; j < V; ++j) acc.v[j] = __fmul_rn(w[0], acc.v[j]);
    for (int64_t k = 1; k < K; ++k) {
      const FloatVec<V> y =
          reinterpret_cast<const FloatVec<V>*>(yp + static_cast<int64_t>(rows[k]) * C)[c];
#pragma unroll
      for (int j = 0; j < V; ++j) acc.v[j] = __fadd_rn(acc.v[j], __fmul_rn(w[k], y.v[j]));
    }
    dst[c] = acc;
  }
}

// One warp per slot k of token n (blockIdx.x).
template <int V>
__global__ void combine_backward_kernel(float* dyp, float* dweights, const float* dout,
                                        const float* yp, const float* weights,
                                        const int32_t* row_of, int64_t N, int64_t K, int64_t C) {
  const int64_t n = blockIdx.x;
  if (n >= N) return;
  const int lane = threadIdx.x % kMoeWarpSize;
  const int64_t warps = blockDim.x / kMoeWarpSize;
  const auto* g = reinterpret_cast<const FloatVec<V>*>(dout + n * C);
  for (int64_t k = threadIdx.x / kMoeWarpSize; k < K; k += warps) {
    const int64_t r = row_of[n * K + k];
    const float w = weights[n * K + k];
    const auto* y = reinterpret_cast<const FloatVec<V>*>(yp + r * C);
    auto* dy = reinterpret_cast<FloatVec<V>*>(dyp + r * C);
    double dot = 0.0;
    for (int64_t c = lane; c < C / V; c += kMoeWarpSize) {
      const FloatVec<V> gv = g[c], yv = y[c];
      FloatVec<V> out;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        out.v[j] = w * gv.v[j];
        dot += static_cast<double>(gv.v[j]) * static_cast<double>(yv.v[j]);
      }
      dy[c] = out;
    }
    dot = warp_sum(dot);
    if (lane == 0) dweights[n * K + k] = static_cast<float>(dot);
  }
}

dim3 grid_of(const LaunchDims& d) {
  CHECK(moe_dims_fit(d), "grid (%lld, %lld, %lld) block %d smem %lld", (long long)d.grid_x,
        (long long)d.grid_y, (long long)d.grid_z, d.block, (long long)d.smem_bytes);
  return dim3(static_cast<unsigned>(d.grid_x), static_cast<unsigned>(d.grid_y),
              static_cast<unsigned>(d.grid_z));
}

// 4 when every row of every pointer starts 16-byte aligned, else 1.
int vec_width(int64_t C, std::initializer_list<const void*> ptrs) {
  if (C % 4 != 0) return 1;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  return 4;
}

void check_rows(int64_t N, int64_t K, int64_t C) {
  CHECK(N >= 0 && K >= 1 && C >= 0, "N=%lld K=%lld C=%lld", (long long)N, (long long)K,
        (long long)C);
  CHECK(N * K <= INT32_MAX, "N*K=%lld does not fit row ids", (long long)(N * K));
}

}  // namespace

void moe_plan(int64_t* counts, int64_t* offsets, int32_t* row_of, int32_t* token_of,
              const int32_t* expert_ids, int64_t N, int64_t E, int64_t K, void* scratch,
              Stream stream) {
  check_rows(N, K, 0);
  CHECK(E >= 1, "E=%lld", (long long)E);
  const int64_t pairs = N * K, tiles = moe_dispatch_tiles(N, K);
  auto* hist = static_cast<int32_t*>(scratch);  // (tiles, E)
  CHECK(tiles == 0 || (hist != nullptr && reinterpret_cast<uintptr_t>(hist) % 4 == 0),
        "dispatch scratch %p", scratch);
  const LaunchDims dt = moe_dispatch_tile_dims(N, E, K);
  if (tiles > 0) {
    MOE_LAUNCH(grid_of(dt), dt.block, dt.smem_bytes, stream, dispatch_histogram_kernel)(
        hist, expert_ids, pairs, E);
    CUDA_CHECK_LAUNCH();
  }
  const LaunchDims ds = moe_dispatch_scan_dims(E);
  MOE_LAUNCH(grid_of(ds), ds.block, ds.smem_bytes, stream, dispatch_scan_kernel)(
      counts, offsets, hist, tiles, E);
  CUDA_CHECK_LAUNCH();
  if (tiles > 0) {
    MOE_LAUNCH(grid_of(dt), dt.block, dt.smem_bytes, stream, dispatch_place_kernel)(
        row_of, token_of, hist, expert_ids, pairs, E, K);
    CUDA_CHECK_LAUNCH();
  }
}

void moe_permute_forward(float* xp, const float* x, const int32_t* token_of, int64_t rows,
                         int64_t C, Stream stream) {
  check_rows(rows, 1, C);
  const int vec = vec_width(C, {xp, x});
  const LaunchDims d = moe_rows_dims(rows, C, vec);
  if (vec == 4)
    MOE_LAUNCH(grid_of(d), d.block, 0, stream, permute_forward_kernel<4>)(xp, x, token_of, rows, C);
  else
    MOE_LAUNCH(grid_of(d), d.block, 0, stream, permute_forward_kernel<1>)(xp, x, token_of, rows, C);
  CUDA_CHECK_LAUNCH();
}

void moe_permute_backward(float* dx, const float* dxp, const int32_t* row_of, int64_t N,
                          int64_t K, int64_t C, Stream stream) {
  check_rows(N, K, C);
  const int vec = vec_width(C, {dx, dxp});
  const LaunchDims d = moe_rows_dims(N, C, vec);
  if (vec == 4)
    MOE_LAUNCH(grid_of(d), d.block, 0, stream, permute_backward_kernel<4>)(
        dx, dxp, row_of, N, K, C);
  else
    MOE_LAUNCH(grid_of(d), d.block, 0, stream, permute_backward_kernel<1>)(
        dx, dxp, row_of, N, K, C);
  CUDA_CHECK_LAUNCH();
}

void moe_combine_forward(float* out, const float* yp, const float* weights,
                         const int32_t* row_of, int64_t N, int64_t K, int64_t C, Stream stream) {
  check_rows(N, K, C);
  const int vec = vec_width(C, {out, yp});
  const LaunchDims d = moe_rows_dims(N, C, vec);
  if (vec == 4)
    MOE_LAUNCH(grid_of(d), d.block, 0, stream, combine_forward_kernel<4>)(
        out, yp, weights, row_of, N, K, C);
  else
    MOE_LAUNCH(grid_of(d), d.block, 0, stream, combine_forward_kernel<1>)(
        out, yp, weights, row_of, N, K, C);
  CUDA_CHECK_LAUNCH();
}

void moe_combine_backward(float* dyp, float* dweights, const float* dout, const float* yp,
                          const float* weights, const int32_t* row_of, int64_t N, int64_t K,
                          int64_t C, Stream stream) {
  check_rows(N, K, C);
  const int vec = vec_width(C, {dyp, dout, yp});
  const LaunchDims d = moe_combine_backward_dims(N, K, C, vec);
  if (vec == 4)
    MOE_LAUNCH(grid_of(d), d.block, 0, stream, combine_backward_kernel<4>)(
        dyp, dweights, dout, yp, weights, row_of, N, K, C);
  else
    MOE_LAUNCH(grid_of(d), d.block, 0, stream, combine_backward_kernel<1>)(
        dyp, dweights, dout, yp, weights, row_of, N, K, C);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe::cuda
