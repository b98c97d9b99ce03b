// Launch planning for the dense CUDA kernels (dense_kernels.h): grid, block and shared memory
// as plain data, in plain C++ so every machine builds and tests it
// (tests/test_cuda_plan_dense.cpp). The .cu launchers take their configuration from here and
// nowhere else; the constants below are the contract between a plan and its kernel.
//
// Dimension letters: N rows (tokens), C model width, V vocabulary, F FFN width, B batch,
// T sequence, H heads, HD head dim.
// Every plan CHECKs its result against the CUDA limits (grid_x < 2^31, grid_y/z <= 65535,
// block a multiple of 32 in [32, 1024], smem <= 48 KiB). A plan for an empty problem
// (N = 0 ...) has grid_x = 0: the launcher returns without launching.
#pragma once

#include <cstdint>

#include "model/kernels/cuda/launch_dims.h"

namespace moe::cuda {

// embedding_backward: one block owns kEmbeddingBackwardRows vocabulary rows and a column
// tile of block * kEmbeddingBackwardColsPerThread columns.
constexpr int64_t kEmbeddingBackwardRows = 64;
constexpr int64_t kEmbeddingBackwardColsPerThread = 4;
// cross_entropy_backward: one block writes block * kCrossEntropyBackwardColsPerThread
// columns of one row.
constexpr int64_t kCrossEntropyBackwardColsPerThread = 4;

// True when d is launchable: the limits above (grid_x = 0 allowed: nothing to launch).
bool launch_dims_valid(const LaunchDims& d);

// One block per row of N rows, threads striding over `cols` elements each, with at most
// max_block threads and about items_per_thread elements per thread (embedding_forward,
// swiglu, rmsnorm and cross_entropy_forward rows).
LaunchDims plan_rows(int64_t N, int64_t cols, int64_t items_per_thread, int max_block);

// Grid-stride loop over n elements (residual_forward, rope_tables).
LaunchDims plan_elementwise(int64_t n);

LaunchDims plan_embedding_forward(int64_t N, int64_t C);
// grid_x = ceil(V / kEmbeddingBackwardRows) row groups, grid_y = column tiles; dynamic
// shared memory (2 * block + 32) int32 for the ordered list of a token tile's hits.
LaunchDims plan_embedding_backward(int64_t V, int64_t C);

LaunchDims plan_rmsnorm_forward(int64_t N, int64_t C);
LaunchDims plan_rmsnorm_backward_input(int64_t N, int64_t C);
// rmsnorm_backward_weight runs in two passes: per-column partial sums over fixed chunks of
// rmsnorm_backward_weight_chunk_rows(N) rows into scratch (chunks, C), then a pass adding the
// chunks in order into dweight. scratch needs rmsnorm_backward_weight_scratch_count(N, C)
// floats. The chunking depends on N only, so a given shape always sums in the same order.
int64_t rmsnorm_backward_weight_chunk_rows(int64_t N);
int64_t rmsnorm_backward_weight_chunks(int64_t N);
int64_t rmsnorm_backward_weight_scratch_count(int64_t N, int64_t C);
LaunchDims plan_rmsnorm_backward_weight_partial(int64_t N, int64_t C);  // (column tiles, chunks)
LaunchDims plan_rmsnorm_backward_weight_final(int64_t C);               // column tiles

// One block per token (B * T of them), threads over the H * HD/2 pairs.
LaunchDims plan_rope(int64_t BT, int64_t H, int64_t HD);
LaunchDims plan_rope_tables(int64_t T_, int64_t HD);

LaunchDims plan_swiglu(int64_t N, int64_t F);
LaunchDims plan_residual(int64_t n);

// transpose of an (R, C) matrix: (kTransposeTile x kTransposeTile) tiles staged in shared
// memory, grid (ceil(C / tile), ceil(R / tile)), kTransposeBlock threads (tile / 8 row passes).
// At most kTransposeMaxRows rows (the grid's y limit; CHECKed).
constexpr int64_t kTransposeTile = 32;
constexpr int kTransposeBlock = 256;
constexpr int64_t kTransposeMaxRows = 65535 * kTransposeTile;
LaunchDims plan_transpose(int64_t R, int64_t C);

LaunchDims plan_cross_entropy_forward(int64_t N, int64_t V);
// grid_x = N * cross_entropy_backward_col_tiles(V, block).
LaunchDims plan_cross_entropy_backward(int64_t N, int64_t V);
int64_t cross_entropy_backward_col_tiles(int64_t V, int block);

}  // namespace moe::cuda
