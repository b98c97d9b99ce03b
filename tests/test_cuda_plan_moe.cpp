// Launch plans of the MoE routing and dispatch CUDA kernels (model/kernels/cuda/moe_plan.h),
// checked on every machine, GPU or not: for the shapes of every config in configs/*.toml
// (hard-coded below) and a few extremes, every plan stays inside the CUDA limits (grid_x <
// 2^31, grid_y/z <= 65535, block a multiple of 32 in [32, 1024], smem <= 48 KiB), covers its
// problem under the work split moe_plan.h writes down, and the scratch sizes hold what the
// kernels put there.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "model/kernels/cpu/moe_ops.h"
#include "model/kernels/cuda/moe_plan.h"
#include "tests/cuda_launch_limits.h"

namespace {

using moe::cuda::LaunchDims;

// The shapes one config gives the MoE kernels.
struct MoeShapes {
  const char* name;
  int64_t B, T;   // micro_batch, seq_len: N = B T tokens per micro-batch
  int64_t E, K;   // num_experts, top_k
  int64_t G, KG;  // num_groups, topk_groups
  int64_t C;      // d_model
};

const std::vector<MoeShapes>& moe_shapes() {
  static const std::vector<MoeShapes> k = {
      // tiny.toml: micro_batch 16 x seq 128, 8 experts top-2, no groups, d_model 128.
      {"tiny", 16, 128, 8, 2, 1, 1, 128},
      // bench-cpu.toml: micro_batch 8 x seq 256, 8 experts top-2, d_model 512.
      {"bench-cpu", 8, 256, 8, 2, 1, 1, 512},
      // deepseek-v3-tiny.toml: 16 x 128, 8 experts top-2, 4 groups / 2 kept, d_model 128.
      {"deepseek-v3-tiny", 16, 128, 8, 2, 4, 2, 128},
      // deepseek-v3-1b.toml: 4 x 2048, 32 experts top-4, 4 groups / 2 kept, d_model 1024.
      {"deepseek-v3-1b", 4, 2048, 32, 4, 4, 2, 1024},
      // deepseek-v3-16b.toml: 1 x 4096, 64 experts top-6, 8 groups / 4 kept, d_model 2048.
      {"deepseek-v3-16b", 1, 4096, 64, 6, 8, 4, 2048},
      // deepseek-v3-671b.toml: 1 x 4096, 256 experts top-8, 8 groups / 4 kept, d_model 7168.
      {"deepseek-v3-671b", 1, 4096, 256, 8, 8, 4, 7168},
      // Extremes: the most experts the kernels take, one per group; odd widths; a large batch.
      {"max-experts", 3, 37, moe::cpu::kMoeMaxExperts, 16, moe::cpu::kMoeMaxExperts, 16, 229},
      {"odd", 1, 71, 6, 3, 3, 2, 229},
      {"large-batch", 64, 16384, 256, 8, 8, 4, 7168},
  };
  return k;
}

::testing::AssertionResult within_limits(const LaunchDims& d) {
  ::testing::AssertionResult r = moe_test::within_cuda_limits(d, false);
  if (!r) return r;
  if (!moe::cuda::moe_dims_fit(d)) return ::testing::AssertionFailure() << "moe_dims_fit says no";
  return ::testing::AssertionSuccess();
}

// One warp per token: enough warps for N, and `per_warp` bytes of shared memory each.
void expect_warp_per_token(const LaunchDims& d, int64_t N, int64_t per_warp) {
  EXPECT_TRUE(within_limits(d));
  const int64_t warps = d.block / 32;
  EXPECT_GE(d.grid_x * warps, N);
  EXPECT_LT((d.grid_x - 1) * warps, std::max<int64_t>(N, 1));  // no all-idle block
  EXPECT_GE(d.smem_bytes, warps * per_warp);
}

TEST(CudaPlanMoe, RouterPlansFitEveryConfig) {
  for (const MoeShapes& s : moe_shapes()) {
    SCOPED_TRACE(s.name);
    const int64_t N = s.B * s.T;
    expect_warp_per_token(moe::cuda::moe_router_forward_dims(N, s.E, s.G), N,
                          4 * (s.E + 2 * s.G));
    EXPECT_EQ(moe::cuda::moe_router_forward_warp_words(s.E, s.G), s.E + 2 * s.G);
    expect_warp_per_token(moe::cuda::moe_router_backward_dims(N, s.E), N, 4 * s.E);
    expect_warp_per_token(moe::cuda::moe_aux_token_dims(N), N, 0);
    const LaunchDims dc = moe::cuda::moe_aux_count_dims(N, s.K);
    EXPECT_TRUE(within_limits(dc));
    EXPECT_GE(dc.grid_x * dc.block, N * s.K);
    const LaunchDims dr = moe::cuda::moe_aux_reduce_dims();
    EXPECT_TRUE(within_limits(dr));
    EXPECT_EQ(dr.grid_x, 1);
    EXPECT_EQ(dr.block & (dr.block - 1), 0) << "the reduction tree halves the block";
    EXPECT_GE(dr.smem_bytes, dr.block * 8);
  }
}

TEST(CudaPlanMoe, DispatchPlansFitEveryConfig) {
  for (const MoeShapes& s : moe_shapes()) {
    SCOPED_TRACE(s.name);
    const int64_t N = s.B * s.T, pairs = N * s.K;
    const int64_t tiles = moe::cuda::moe_dispatch_tiles(N, s.K);
    EXPECT_EQ(tiles, (pairs + moe::cuda::kMoeTilePairs - 1) / moe::cuda::kMoeTilePairs);
    EXPECT_EQ(moe::cuda::kMoeTilePairs % 32, 0);
    const LaunchDims dt = moe::cuda::moe_dispatch_tile_dims(N, s.E, s.K);
    EXPECT_TRUE(within_limits(dt));
    EXPECT_GE(dt.grid_x * (dt.block / 32), tiles);
    EXPECT_GE(dt.smem_bytes, (dt.block / 32) * s.E * 4);
    const LaunchDims ds = moe::cuda::moe_dispatch_scan_dims(s.E);
    EXPECT_TRUE(within_limits(ds));
    EXPECT_EQ(ds.grid_x, 1);
    EXPECT_GE(ds.block, s.E);  // one thread per expert
    EXPECT_GE(ds.smem_bytes, ds.block * 8);
    EXPECT_EQ(moe::cuda::moe_dispatch_scratch_bytes(N, s.E, s.K), tiles * s.E * 4);
    // Row kernels: permute forward over N K rows, permute backward and combine over N.
    for (int vec : {1, 4}) {
      if (s.C % vec != 0) continue;
      for (int64_t rows : {pairs, N}) {
        const LaunchDims d = moe::cuda::moe_rows_dims(rows, s.C, vec);
        EXPECT_TRUE(within_limits(d));
        EXPECT_EQ(d.grid_x, rows);
        EXPECT_LE(d.block, std::max<int64_t>(32, (s.C / vec + 31) / 32 * 32));
      }
      const LaunchDims db = moe::cuda::moe_combine_backward_dims(N, s.K, s.C, vec);
      EXPECT_TRUE(within_limits(db));
      EXPECT_EQ(db.grid_x, N);
      EXPECT_LE(db.block / 32, s.K);  // no warp without a slot
    }
  }
}

TEST(CudaPlanMoe, AuxScratchHoldsTermsAndCounts) {
  for (const MoeShapes& s : moe_shapes()) {
    SCOPED_TRACE(s.name);
    const int64_t off = moe::cuda::moe_aux_counts_offset(s.B, s.T);
    EXPECT_GE(off, s.B * s.T * 8);  // the per-token double terms come first
    EXPECT_EQ(off % 8, 0);
    EXPECT_EQ(moe::cuda::moe_aux_loss_scratch_bytes(s.B, s.T, s.E), off + s.B * s.E * 4);
  }
}

TEST(CudaPlanMoe, EmptyBatchStillLaunchable) {
  // N == 0 still launches one (idle) block, so the plan writes zero counts and offsets.
  EXPECT_TRUE(within_limits(moe::cuda::moe_router_forward_dims(0, 8, 1)));
  EXPECT_TRUE(within_limits(moe::cuda::moe_router_backward_dims(0, 8)));
  EXPECT_TRUE(within_limits(moe::cuda::moe_aux_count_dims(0, 2)));
  EXPECT_TRUE(within_limits(moe::cuda::moe_rows_dims(0, 128, 4)));
  EXPECT_TRUE(within_limits(moe::cuda::moe_combine_backward_dims(0, 2, 128, 4)));
  EXPECT_EQ(moe::cuda::moe_dispatch_tiles(0, 2), 0);
  EXPECT_EQ(moe::cuda::moe_dispatch_scratch_bytes(0, 8, 2), 0);
  EXPECT_TRUE(within_limits(moe::cuda::moe_dispatch_scan_dims(8)));
}

TEST(CudaPlanMoe, RejectsTooManyExperts) {
  EXPECT_DEATH(moe::cuda::moe_router_forward_dims(1, moe::cpu::kMoeMaxExperts + 1, 1), "E=");
  EXPECT_DEATH(moe::cuda::moe_dispatch_scan_dims(0), "E=");
}

}  // namespace
