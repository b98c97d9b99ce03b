// Fused softmax + cross-entropy on the device: the twins of cpu::cross_entropy_forward /
// cross_entropy_backward, with exp_fast_f32 (model/act_math.h, cpu::exp_fast's bits on the
// host).
//
// Shapes: logits / probs / dlogits (N, V); targets, losses (N).
// Accumulation: every output is ASSIGNED. Targets < 0 are ignored: loss 0, zero gradient row.
// Forward: one block per row, three passes over the logits (max; sum of exp in double, as on
// the CPU; probs = exp(x - max) / sum, the exp recomputed rather than read back), each
// reduction in a fixed order (dense_common.cuh). Backward: elementwise, a block per
// (row, column tile).
#include "model/act_math.h"
#include "model/kernels/cuda/cuda_check.h"
#include "model/kernels/cuda/reduce.cuh"
#include "model/kernels/cuda/dense_kernels.h"
#include "model/kernels/cuda/dense_plan.h"

namespace moe::cuda {

namespace {

__global__ void cross_entropy_forward_kernel(float* losses, float* probs, const float* logits,
                                             const int32_t* targets, int64_t V) {
  __shared__ float red_f[32];
  __shared__ double red_d[32];
  const int64_t row = blockIdx.x;
  const float* x = logits + row * V;
  float* p = probs + row * V;
  float m = x[0];
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) m = x[v] > m ? x[v] : m;
  m = block_max(m, red_f);
  double sum = 0.0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) sum += exp_fast_f32(x[v] - m);
  sum = block_sum(sum, red_d);
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) p[v] = exp_fast_f32(x[v] - m) * inv;
  if (threadIdx.x == 0) {
    const int32_t t = targets[row];
    if (t >= V) __trap();  // the CPU twin CHECKs target < V
    losses[row] = t < 0 ? 0.0f
                        : static_cast<float>(log(sum) + static_cast<double>(m) -
                                             static_cast<double>(x[t]));
  }
}

// grid_x = N * col_tiles: block b writes row b / col_tiles, columns of tile b % col_tiles.
__global__ void cross_entropy_backward_kernel(float* dlogits, const float* probs,
                                              const int32_t* targets, float dloss, int64_t V,
                                              int64_t col_tiles) {
  const int64_t row = blockIdx.x / col_tiles;
  const int64_t tile = blockIdx.x - row * col_tiles;
  const int32_t t = targets[row];
  const float* p = probs + row * V;
  float* d = dlogits + row * V;
  const int64_t c_first =
      tile * blockDim.x * kCrossEntropyBackwardColsPerThread + threadIdx.x;
#pragma unroll
  for (int64_t k = 0; k < kCrossEntropyBackwardColsPerThread; ++k) {
    const int64_t v = c_first + k * blockDim.x;
    if (v >= V) break;
    d[v] = t < 0 ? 0.0f : (v == t ? (p[v] - 1.0f) * dloss : p[v] * dloss);
  }
}

}  // namespace

void cross_entropy_forward(float* losses, float* probs, const float* logits,
                           const int32_t* targets, int64_t N, int64_t V, Stream stream) {
  CHECK(N >= 0 && V > 0, "N=%lld V=%lld", static_cast<long long>(N), static_cast<long long>(V));
  const LaunchDims d = plan_cross_entropy_forward(N, V);
  if (d.grid_x == 0) return;
  MOE_LAUNCH(dims_grid(d), dims_block(d), d.smem_bytes, stream, cross_entropy_forward_kernel)(
      losses, probs, logits, targets, V);
  CUDA_CHECK_LAUNCH();
}

void cross_entropy_backward(float* dlogits, const float* probs, const int32_t* targets,
                            float dloss, int64_t N, int64_t V, Stream stream) {
  CHECK(N >= 0 && V > 0, "N=%lld V=%lld", static_cast<long long>(N), static_cast<long long>(V));
  const LaunchDims d = plan_cross_entropy_backward(N, V);
  if (d.grid_x == 0) return;
  MOE_LAUNCH(dims_grid(d), dims_block(d), d.smem_bytes, stream, cross_entropy_backward_kernel)(
      dlogits, probs, targets, dloss, V, cross_entropy_backward_col_tiles(V, d.block));
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe::cuda
