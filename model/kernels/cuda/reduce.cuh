// Device helpers every kernel file shares: LaunchDims -> dim3, and warp and block reductions
// in a fixed order (so results do not depend on scheduling).
#pragma once

#include <cuda_runtime.h>

#include "model/kernels/cuda/launch_dims.h"

namespace moe::cuda {

inline dim3 dims_grid(const LaunchDims& d) {
  return dim3(static_cast<unsigned>(d.grid_x), static_cast<unsigned>(d.grid_y),
              static_cast<unsigned>(d.grid_z));
}
inline dim3 dims_block(const LaunchDims& d) { return dim3(static_cast<unsigned>(d.block)); }

// Sum over a warp by an xor butterfly: every lane ends with the same bits (each step adds the
// same two values, a + b == b + a), in an order fixed by the lane numbers.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// cpu's max: m = x > m ? x : m (exact, so any order gives the same value).
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}

// Block-wide sum, returned to every thread: warp butterflies, then the warp sums added in
// warp order by every thread. blockDim.x a multiple of 32; red holds 32 elements. Ends with
// a barrier, so red may be reused at once. Every thread of the block must call it.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  T total = red[0];
  for (int w = 1; w < nwarps; ++w) total += red[w];
  __syncthreads();
  return total;
}

__device__ __forceinline__ float block_max(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_max(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float m = red[0];
  for (int w = 1; w < nwarps; ++w) m = red[w] > m ? red[w] : m;
  __syncthreads();
  return m;
}

}  // namespace moe::cuda
