// Token embedding on the device: the twins of cpu::embedding_forward / embedding_backward.
//
// Shapes: tokens (N); wte / dwte (V, C); out / dout (N, C).
// Accumulation: out ASSIGNED, dwte ACCUMULATED.
// Determinism of the backward, without atomics or a sort: a block owns a group of
// kEmbeddingBackwardRows vocabulary rows and a column tile, scans all N tokens in order in
// tiles of blockDim.x, compacts the tile's hits on its rows into shared memory (ballot +
// warp prefix, so the list stays in increasing n), and adds the hits' dout rows in list
// order. A (row, column) element is only ever touched by one thread of one block, and in
// increasing n: the same float additions in the same order as the CPU loop, so the result
// is bitwise the CPU twin's. Cost: every block reads all N tokens (V / 64 * column tiles
// * N int32, from L2); a very frequent token serializes its row group's adds onto one block.
#include "model/kernels/cuda/cuda_check.h"
#include "model/kernels/cuda/reduce.cuh"
#include "model/kernels/cuda/dense_kernels.h"
#include "model/kernels/cuda/dense_plan.h"

namespace moe::cuda {

namespace {

__global__ void embedding_forward_kernel(float* out, const int32_t* tokens, const float* wte,
                                         int64_t C, int64_t V) {
  const int64_t n = blockIdx.x;
  const int32_t t = tokens[n];
  if (t < 0 || t >= V) __trap();  // the CPU twin CHECKs tokens[n] >= 0
  const float* src = wte + static_cast<int64_t>(t) * C;
  float* dst = out + n * C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) dst[c] = src[c];
}

// grid (row groups, column tiles); dynamic smem: s_n[blockDim.x], s_tok[blockDim.x],
// s_warp[32] (int32).
__global__ void embedding_backward_kernel(float* dwte, const float* dout, const int32_t* tokens,
                                          int64_t N, int64_t C, int64_t V) {
  MOE_DYNAMIC_SMEM(int32_t, smem);
  int32_t* s_n = smem;
  int32_t* s_tok = smem + blockDim.x;
  int32_t* s_warp = smem + 2 * blockDim.x;
  const int64_t v0 = static_cast<int64_t>(blockIdx.x) * kEmbeddingBackwardRows;
  const int64_t v1 = v0 + kEmbeddingBackwardRows < V ? v0 + kEmbeddingBackwardRows : V;
  // This thread's columns: c_first + k * blockDim.x, k < kEmbeddingBackwardColsPerThread.
  const int64_t c_first =
      static_cast<int64_t>(blockIdx.y) * blockDim.x * kEmbeddingBackwardColsPerThread +
      threadIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t base = 0; base < N; base += blockDim.x) {
    const int64_t n = base + threadIdx.x;
    const int32_t t = n < N ? tokens[n] : -1;
    const bool hit = t >= v0 && t < v1;
    const unsigned mask = __ballot_sync(0xffffffffu, hit);
    if (lane == 0) s_warp[warp] = __popc(mask);
    __syncthreads();
    int offset = 0, total = 0;
    for (int w = 0; w < nwarps; ++w) {
      const int count = s_warp[w];
      if (w < warp) offset += count;
      total += count;
    }
    if (hit) {
      const int pos = offset + __popc(mask & lanes_below);
      s_n[pos] = static_cast<int32_t>(n);
      s_tok[pos] = t;
    }
    __syncthreads();
    for (int j = 0; j < total; ++j) {
      const float* src = dout + static_cast<int64_t>(s_n[j]) * C;
      float* dst = dwte + static_cast<int64_t>(s_tok[j]) * C;
#pragma unroll
      for (int64_t k = 0; k < kEmbeddingBackwardColsPerThread; ++k) {
        const int64_t c = c_first + k * blockDim.x;
        if (c < C) dst[c] += src[c];
      }
    }
    __syncthreads();  // s_warp, s_n and s_tok are rewritten by the next tile
  }
}

}  // namespace

void embedding_forward(float* out, const int32_t* tokens, const float* wte, int64_t N, int64_t C,
                       int64_t V, Stream stream) {
  CHECK(N >= 0 && C >= 0 && V >= 0, "N=%lld C=%lld V=%lld", static_cast<long long>(N),
        static_cast<long long>(C), static_cast<long long>(V));
  const LaunchDims d = plan_embedding_forward(N, C);
  if (d.grid_x == 0 || C == 0) return;
  MOE_LAUNCH(dims_grid(d), dims_block(d), d.smem_bytes, stream, embedding_forward_kernel)(
      out, tokens, wte, C, V);
  CUDA_CHECK_LAUNCH();
}

void embedding_backward(float* dwte, const float* dout, const int32_t* tokens, int64_t N,
                        int64_t C, int64_t V, Stream stream) {
  CHECK(N >= 0 && N < (int64_t(1) << 31) && C >= 0 && V >= 0, "N=%lld C=%lld V=%lld",
        static_cast<long long>(N), static_cast<long long>(C), static_cast<long long>(V));
  const LaunchDims d = plan_embedding_backward(V, C);
  if (d.grid_x == 0 || N == 0) return;
  MOE_LAUNCH(dims_grid(d), dims_block(d), d.smem_bytes, stream, embedding_backward_kernel)(
      dwte, dout, tokens, N, C, V);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe::cuda
