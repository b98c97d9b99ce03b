// Launch plans and scratch sizes of the MoE routing and dispatch kernels; the work split is
// written down in moe_plan.h. Every plan CHECKs its shape, then stays inside the CUDA limits
// (tests/test_cuda_plan_moe.cpp holds them to it for every shipped config).
#include "model/kernels/cuda/moe_plan.h"

#include <algorithm>

#include "model/check.h"
#include "model/kernels/cpu/moe_ops.h"

namespace moe::cuda {

namespace {

// Warps a block of the one-warp-per-token kernels holds at most (256 threads).
constexpr int64_t kMaxWarpsPerBlock = 8;
constexpr int kRowThreadsMax = 256;
constexpr int kAuxThreads = 256;     // count and reduce kernels
constexpr int kDispatchWarps = 4;    // tiles per block of the histogram and place kernels

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_experts(int64_t E) {
  CHECK(E >= 1 && E <= cpu::kMoeMaxExperts, "E=%lld outside [1, %lld]", (long long)E,
        (long long)cpu::kMoeMaxExperts);
}

// Warp-per-token launch: `warps` tokens per block, at least one block.
LaunchDims warp_per_token(int64_t N, int64_t warps, int64_t smem_per_warp) {
  LaunchDims d;
  d.block = static_cast<int>(warps * kMoeWarpSize);
  d.grid_x = std::max<int64_t>(1, ceil_div(N, warps));
  d.smem_bytes = warps * smem_per_warp;
  return d;
}

// Warps that fit the shared-memory budget at `per_warp` bytes each, in [1, 8].
int64_t warps_for_smem(int64_t per_warp) {
  return std::clamp<int64_t>(kMoeSmemLimit / per_warp, 1, kMaxWarpsPerBlock);
}

}  // namespace

bool moe_dims_fit(const LaunchDims& d) {
  return d.grid_x >= 1 && d.grid_x <= kMoeMaxGridX && d.grid_y >= 1 &&
         d.grid_y <= kMoeMaxGridYZ && d.grid_z >= 1 && d.grid_z <= kMoeMaxGridYZ &&
         d.block >= kMoeWarpSize && d.block <= 1024 && d.block % kMoeWarpSize == 0 &&
         d.smem_bytes >= 0 && d.smem_bytes <= kMoeSmemLimit;
}

LaunchDims moe_router_forward_dims(int64_t N, int64_t E, int64_t G) {
  check_experts(E);
  CHECK(N >= 0 && G >= 1 && G <= E, "N=%lld E=%lld G=%lld", (long long)N, (long long)E,
        (long long)G);
  const int64_t per_warp = 4 * moe_router_forward_warp_words(E, G);
  return warp_per_token(N, warps_for_smem(per_warp), per_warp);
}

LaunchDims moe_router_backward_dims(int64_t N, int64_t E) {
  check_experts(E);
  CHECK(N >= 0, "N=%lld", (long long)N);
  const int64_t per_warp = 4 * E;
  return warp_per_token(N, warps_for_smem(per_warp), per_warp);
}

LaunchDims moe_aux_count_dims(int64_t N, int64_t K) {
  CHECK(N >= 0 && K >= 1, "N=%lld K=%lld", (long long)N, (long long)K);
  LaunchDims d;
  d.block = kAuxThreads;
  d.grid_x = std::max<int64_t>(1, ceil_div(N * K, kAuxThreads));
  return d;
}

LaunchDims moe_aux_token_dims(int64_t N) {
  CHECK(N >= 0, "N=%lld", (long long)N);
  return warp_per_token(N, kMaxWarpsPerBlock, 0);
}

LaunchDims moe_aux_reduce_dims() {
  LaunchDims d;
  d.block = kAuxThreads;  // a power of two: the tree halves it
  d.smem_bytes = kAuxThreads * static_cast<int64_t>(sizeof(double));
  return d;
}

int64_t moe_dispatch_tiles(int64_t N, int64_t K) {
  CHECK(N >= 0 && K >= 1, "N=%lld K=%lld", (long long)N, (long long)K);
  return ceil_div(N * K, kMoeTilePairs);
}

LaunchDims moe_dispatch_tile_dims(int64_t N, int64_t E, int64_t K) {
  check_experts(E);
  LaunchDims d;
  d.block = kDispatchWarps * kMoeWarpSize;
  d.grid_x = std::max<int64_t>(1, ceil_div(moe_dispatch_tiles(N, K), kDispatchWarps));
  d.smem_bytes = kDispatchWarps * E * static_cast<int64_t>(sizeof(int32_t));
  return d;
}

LaunchDims moe_dispatch_scan_dims(int64_t E) {
  check_experts(E);
  LaunchDims d;
  d.block = static_cast<int>(ceil_div(E, kMoeWarpSize) * kMoeWarpSize);  // one thread per expert
  d.smem_bytes = d.block * static_cast<int64_t>(sizeof(int64_t));
  return d;
}

LaunchDims moe_rows_dims(int64_t rows, int64_t C, int vec) {
  CHECK(rows >= 0 && C >= 0 && (vec == 1 || vec == 4) && C % vec == 0,
        "rows=%lld C=%lld vec=%d", (long long)rows, (long long)C, vec);
  LaunchDims d;
  const int64_t threads = ceil_div(C / vec, kMoeWarpSize) * kMoeWarpSize;
  d.block = static_cast<int>(std::clamp<int64_t>(threads, kMoeWarpSize, kRowThreadsMax));
  d.grid_x = std::max<int64_t>(1, rows);
  return d;
}

LaunchDims moe_combine_backward_dims(int64_t N, int64_t K, int64_t C, int vec) {
  CHECK(N >= 0 && K >= 1 && C >= 0 && (vec == 1 || vec == 4) && C % vec == 0,
        "N=%lld K=%lld C=%lld vec=%d", (long long)N, (long long)K, (long long)C, vec);
  LaunchDims d;
  d.block = static_cast<int>(std::min<int64_t>(K, kMaxWarpsPerBlock) * kMoeWarpSize);
  d.grid_x = std::max<int64_t>(1, N);
  return d;
}

int64_t moe_dispatch_scratch_bytes(int64_t N, int64_t E, int64_t K) {
  check_experts(E);
  return moe_dispatch_tiles(N, K) * E * static_cast<int64_t>(sizeof(int32_t));
}

int64_t moe_aux_counts_offset(int64_t B, int64_t T_) {
  CHECK(B >= 0 && T_ >= 1, "B=%lld T=%lld", (long long)B, (long long)T_);
  constexpr int64_t kAlign = 256;
  return ceil_div(B * T_ * static_cast<int64_t>(sizeof(double)), kAlign) * kAlign;
}

int64_t moe_aux_loss_scratch_bytes(int64_t B, int64_t T_, int64_t E) {
  check_experts(E);
  return moe_aux_counts_offset(B, T_) + B * E * static_cast<int64_t>(sizeof(int32_t));
}

}  // namespace moe::cuda
