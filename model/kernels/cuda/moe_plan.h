// Host-side launch planning for the MoE routing and dispatch kernels (router.cu,
// moe_dispatch.cu): grid, block and shared memory of every launch, and the scratch each op
// needs. Plain C++ compiled into the core library everywhere, so the CPU tests check every
// plan against the CUDA limits and the arena can size scratch without a toolkit.
//
// Dimension letters: N tokens, B sequences, T tokens per sequence, E experts, K experts per
// token, G expert groups, C row width; pairs = N * K (token, slot) pairs = permuted rows.
//
// Work split (the kernels rely on it):
//   router forward/backward, aux-loss per-token: one warp per token, `block / 32` tokens a block.
//   dispatch histogram/place: one warp per tile of kMoeTilePairs consecutive pairs.
//   dispatch scan: one block, one thread per expert.
//   permute forward/backward, combine forward: one block per output row, threads over C.
//   combine backward: one block per token, one warp per slot k.
#pragma once

#include <cstdint>

#include "model/hd.h"
#include "model/kernels/cuda/launch_dims.h"

namespace moe::cuda {

inline constexpr int kMoeWarpSize = 32;
// The shared memory a block may use without opting in (cudaFuncSetAttribute).
inline constexpr int64_t kMoeSmemLimit = 48 * 1024;
inline constexpr int64_t kMoeMaxGridX = 2147483647;  // 2^31 - 1
inline constexpr int64_t kMoeMaxGridYZ = 65535;
// (token, slot) pairs one warp counts and places in the dispatch plan; a multiple of 32.
inline constexpr int64_t kMoeTilePairs = 512;

// Per-warp shared memory of the router forward, in 4-byte words: scores (E), group scores
// (G) and kept-group flags (G). Shared by the plan and the kernel.
MOE_HD inline int64_t moe_router_forward_warp_words(int64_t E, int64_t G) { return E + 2 * G; }

// True when d is launchable: 1 <= grid_x <= 2^31-1, 1 <= grid_y/z <= 65535, block a multiple
// of 32 in [32, 1024], 0 <= smem_bytes <= 48 KiB.
bool moe_dims_fit(const LaunchDims& d);

LaunchDims moe_router_forward_dims(int64_t N, int64_t E, int64_t G);
LaunchDims moe_router_backward_dims(int64_t N, int64_t E);
// Per-sequence expert counts of the balance loss: one thread per pair.
LaunchDims moe_aux_count_dims(int64_t N, int64_t K);
// Balance loss forward (per-token terms) and backward: one warp per token.
LaunchDims moe_aux_token_dims(int64_t N);
// The fixed-order sum of the per-token terms: one block, a power-of-two tree.
LaunchDims moe_aux_reduce_dims();
// Dispatch histogram and placement: one warp per tile, E int32 of shared memory per warp.
LaunchDims moe_dispatch_tile_dims(int64_t N, int64_t E, int64_t K);
LaunchDims moe_dispatch_scan_dims(int64_t E);
// One block per row of `vec`-float vectors (vec 1 or 4): permute forward (rows = N K),
// permute backward and combine forward (rows = N).
LaunchDims moe_rows_dims(int64_t rows, int64_t C, int vec);
LaunchDims moe_combine_backward_dims(int64_t N, int64_t K, int64_t C, int vec);

// Dispatch tiles for N K pairs (0 when N == 0).
int64_t moe_dispatch_tiles(int64_t N, int64_t K);

// Scratch of cuda::moe_plan: the per-tile histograms, int32 (tiles, E). 0 when N == 0.
int64_t moe_dispatch_scratch_bytes(int64_t N, int64_t E, int64_t K);
// Scratch of cuda::aux_loss_forward / aux_loss_backward: per-token terms, double (B T), at
// offset 0, then per-sequence counts, int32 (B, E), at moe_aux_counts_offset(B, T).
int64_t moe_aux_counts_offset(int64_t B, int64_t T_);
int64_t moe_aux_loss_scratch_bytes(int64_t B, int64_t T_, int64_t E);

}  // namespace moe::cuda
