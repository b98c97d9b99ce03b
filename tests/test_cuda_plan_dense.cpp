// Launch plans of the dense CUDA kernels (model/kernels/cuda/dense_plan.h), checked on every
// machine, GPU or not: for the shapes of every config in configs/*.toml (hard-coded below)
// and a few extremes, every plan stays inside the CUDA limits (grid_x < 2^31, grid_y/z <=
// 65535, block a multiple of 32 in [32, 1024], smem <= 48 KiB) and covers its problem.
// Also pins the arithmetic the CUDA kernels share with the CPU ones (model/act_math.h,
// model/rope_math.h) to the CPU kernels' own.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "model/act_math.h"
#include "model/kernels/cpu/dense_ops.h"
#include "model/kernels/cuda/dense_plan.h"
#include "model/rng.h"
#include "model/rope_math.h"
#include "tests/cuda_launch_limits.h"

namespace {

using moe::cuda::LaunchDims;

// The shapes one config gives the dense kernels.
struct ConfigShapes {
  const char* name;
  int64_t N;                  // tokens per micro-batch: micro_batch * seq_len
  int64_t T;                  // seq_len
  int64_t V;                  // vocab_size
  std::vector<int64_t> C;     // rmsnorm widths: d_model, and the MLA ranks
  std::vector<int64_t> F;     // SwiGLU widths: d_ff, d_expert, shared d_expert * count
  int64_t top_k;              // expert rows are N * top_k
  std::vector<int64_t> H_HD;  // rope (H, HD) pairs, flattened
};

const std::vector<ConfigShapes>& config_shapes() {
  static const std::vector<ConfigShapes> k = {
      // tiny.toml: mha, d_model 128, 4 heads (HD 32), micro_batch 16 x seq 128, d_expert 128.
      {"tiny", 16 * 128, 128, 256, {128}, {128, 512}, 2, {4, 32}},
      // bench-cpu.toml: d_model 512, 8 heads (HD 64), micro_batch 8 x seq 256.
      {"bench-cpu", 8 * 256, 256, 256, {512}, {512, 2048}, 2, {8, 64}},
      // deepseek-v3-tiny.toml: mla, rope head dim 16 (per head, H = 1), ranks 64 / 32.
      {"deepseek-v3-tiny", 16 * 128, 128, 256, {128, 64, 32}, {128, 512}, 2, {1, 16}},
      // deepseek-v3-1b.toml: d_model 1024, ranks 384 / 256, d_ff 2816, d_expert 704.
      {"deepseek-v3-1b", 4 * 2048, 2048, 129280, {1024, 384, 256}, {2816, 704}, 4, {1, 32}},
      // deepseek-v3-16b.toml: d_model 2048, kv rank 512, d_ff 11264, d_expert 1408 (2 shared).
      {"deepseek-v3-16b", 1 * 4096, 4096, 129280, {2048, 512}, {11264, 1408, 2816}, 6, {1, 64}},
      // deepseek-v3-671b.toml: d_model 7168, ranks 1536 / 512, d_ff 18432, d_expert 2048.
      {"deepseek-v3-671b", 1 * 4096, 4096, 129280, {7168, 1536, 512}, {18432, 2048}, 8, {1, 64}},
  };
  return k;
}

::testing::AssertionResult within_limits(const LaunchDims& d) {
  ::testing::AssertionResult r = moe_test::within_cuda_limits(d, true);
  if (!r) return r;
  if (!moe::cuda::launch_dims_valid(d)) return ::testing::AssertionFailure() << "not valid";
  return ::testing::AssertionSuccess();
}

// All plans for one (N, C, V, F, ...) set; coverage where a plan's grid carries the problem.
void check_all_plans(int64_t N, int64_t T, int64_t V, int64_t C, int64_t F, int64_t rows_f,
                     int64_t H, int64_t HD) {
  using namespace moe::cuda;
  SCOPED_TRACE(::testing::Message() << "N=" << N << " V=" << V << " C=" << C << " F=" << F
                                    << " H=" << H << " HD=" << HD);
  const LaunchDims ef = plan_embedding_forward(N, C);
  EXPECT_TRUE(within_limits(ef));
  EXPECT_EQ(ef.grid_x, N);

  const LaunchDims eb = plan_embedding_backward(V, C);
  EXPECT_TRUE(within_limits(eb));
  EXPECT_GE(eb.grid_x * kEmbeddingBackwardRows, V);  // every vocabulary row owned
  EXPECT_GE(eb.grid_y * eb.block * kEmbeddingBackwardColsPerThread, C);  // every column
  EXPECT_EQ(eb.smem_bytes, (2 * eb.block + 32) * 4);

  for (const LaunchDims& d : {plan_rmsnorm_forward(N, C), plan_rmsnorm_backward_input(N, C)}) {
    EXPECT_TRUE(within_limits(d));
    EXPECT_EQ(d.grid_x, N);
    EXPECT_LE(d.block, 512);
  }
  const LaunchDims wp = plan_rmsnorm_backward_weight_partial(N, C);
  const LaunchDims wf = plan_rmsnorm_backward_weight_final(C);
  EXPECT_TRUE(within_limits(wp));
  EXPECT_TRUE(within_limits(wf));
  const int64_t chunks = rmsnorm_backward_weight_chunks(N);
  EXPECT_EQ(wp.grid_y, chunks);
  EXPECT_GE(chunks * rmsnorm_backward_weight_chunk_rows(N), N);  // every row in a chunk
  EXPECT_LT((chunks - 1) * rmsnorm_backward_weight_chunk_rows(N), N);  // no empty chunk
  EXPECT_EQ(rmsnorm_backward_weight_scratch_count(N, C), chunks * C);
  EXPECT_GE(wp.grid_x * wp.block, C);
  EXPECT_GE(wf.grid_x * wf.block, C);

  const LaunchDims ro = plan_rope(N, H, HD);
  EXPECT_TRUE(within_limits(ro));
  EXPECT_EQ(ro.grid_x, N);
  EXPECT_TRUE(within_limits(plan_rope_tables(T, HD)));

  for (const int64_t rows : {N, rows_f}) {
    const LaunchDims sw = plan_swiglu(rows, F);
    EXPECT_TRUE(within_limits(sw));
    EXPECT_EQ(sw.grid_x, rows);
  }
  EXPECT_TRUE(within_limits(plan_residual(N * C)));

  const LaunchDims cf = plan_cross_entropy_forward(N, V);
  EXPECT_TRUE(within_limits(cf));
  EXPECT_EQ(cf.grid_x, N);
  const LaunchDims cb = plan_cross_entropy_backward(N, V);
  EXPECT_TRUE(within_limits(cb));
  const int64_t tiles = cross_entropy_backward_col_tiles(V, cb.block);
  EXPECT_EQ(cb.grid_x, N * tiles);
  EXPECT_GE(tiles * cb.block * kCrossEntropyBackwardColsPerThread, V);
}

TEST(CudaPlanDense, EveryConfigShapeWithinLimits) {
  for (const ConfigShapes& s : config_shapes()) {
    SCOPED_TRACE(s.name);
    ASSERT_EQ(s.H_HD.size(), 2u);
    for (const int64_t C : s.C)
      for (const int64_t F : s.F)
        check_all_plans(s.N, s.T, s.V, C, F, s.N * s.top_k, s.H_HD[0], s.H_HD[1]);
  }
}

// Odd sizes as the GPU tests use them, and extremes: one row, a huge token count.
TEST(CudaPlanDense, OddAndExtremeShapesWithinLimits) {
  check_all_plans(71, 71, 257, 229, 229, 71 * 3, 3, 64);
  check_all_plans(1, 1, 1, 1, 1, 1, 1, 2);
  check_all_plans(int64_t(1) << 22, 4096, 129280, 7168, 18432, int64_t(1) << 25, 128, 192);
}

TEST(CudaPlanDense, EmptyProblemsHaveNoBlocks) {
  using namespace moe::cuda;
  EXPECT_EQ(plan_embedding_forward(0, 128).grid_x, 0);
  EXPECT_EQ(plan_embedding_backward(0, 128).grid_x, 0);
  EXPECT_EQ(plan_embedding_backward(256, 0).grid_x, 0);
  EXPECT_EQ(plan_rmsnorm_forward(0, 128).grid_x, 0);
  EXPECT_EQ(plan_rmsnorm_backward_weight_partial(0, 128).grid_x, 0);
  EXPECT_EQ(rmsnorm_backward_weight_scratch_count(0, 128), 0);
  EXPECT_EQ(plan_rope(0, 4, 32).grid_x, 0);
  EXPECT_EQ(plan_rope(8, 0, 32).grid_x, 0);
  EXPECT_EQ(plan_swiglu(0, 128).grid_x, 0);
  EXPECT_EQ(plan_swiglu(8, 0).grid_x, 0);
  EXPECT_EQ(plan_residual(0).grid_x, 0);
  EXPECT_EQ(plan_cross_entropy_backward(0, 256).grid_x, 0);
  for (const LaunchDims& d : {plan_embedding_backward(0, 128), plan_swiglu(0, 0),
                              plan_rmsnorm_backward_weight_partial(0, 128)})
    EXPECT_TRUE(within_limits(d));
}

// A tile per block covers the matrix; the rows the grid's y limit allows, and no more.
TEST(CudaPlanDense, TransposeTilesCoverTheMatrix) {
  using namespace moe::cuda;
  struct Shape {
    int64_t R, C;
  };
  for (const Shape sh : {Shape{1, 1}, Shape{37, 29}, Shape{32, 64}, Shape{7168, 65536},
                         Shape{kTransposeMaxRows, 128}}) {
    const LaunchDims d = plan_transpose(sh.R, sh.C);
    EXPECT_TRUE(within_limits(d));
    EXPECT_EQ(d.grid_x * kTransposeTile >= sh.C && (d.grid_x - 1) * kTransposeTile < sh.C, true);
    EXPECT_EQ(d.grid_y * kTransposeTile >= sh.R && (d.grid_y - 1) * kTransposeTile < sh.R, true);
    EXPECT_EQ(d.block % kTransposeTile, 0);
  }
  EXPECT_EQ(plan_transpose(0, 64).grid_x, 0);
  EXPECT_EQ(plan_transpose(64, 0).grid_x, 0);
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(plan_transpose(kTransposeMaxRows + 1, 16), "transpose of");
}

TEST(CudaPlanDense, LaunchDimsValidRejectsOutOfLimits) {
  using moe::cuda::launch_dims_valid;
  LaunchDims d;
  d.block = 256;
  EXPECT_TRUE(launch_dims_valid(d));
  LaunchDims bad = d;
  bad.block = 1000;  // not a multiple of 32
  EXPECT_FALSE(launch_dims_valid(bad));
  bad = d;
  bad.block = 2048;
  EXPECT_FALSE(launch_dims_valid(bad));
  bad = d;
  bad.grid_y = 65536;
  EXPECT_FALSE(launch_dims_valid(bad));
  bad = d;
  bad.grid_x = int64_t(1) << 31;
  EXPECT_FALSE(launch_dims_valid(bad));
  bad = d;
  bad.smem_bytes = 48 * 1024 + 1;
  EXPECT_FALSE(launch_dims_valid(bad));
}

// The device exp (model/act_math.h) is cpu::exp_fast<float> bit for bit on the host: over
// random values, the clamp edges, both tails and NaN.
TEST(CudaDenseMath, ExpFastF32MatchesCpuBitwise) {
  std::vector<float> xs = {0.0f, -0.0f, 1.0f, -1.0f, 86.9f, -86.9f, 87.0f, -87.0f, 88.0f,
                           88.5f, -88.5f, 100.0f, -100.0f, 1e-30f, -1e-30f,
                           std::numeric_limits<float>::infinity(),
                           -std::numeric_limits<float>::infinity()};
  for (uint64_t i = 0; i < 20000; ++i)
    xs.push_back(static_cast<float>(40.0 * moe::rng_normal(31, 1, i)));
  for (const float x : xs) {
    const float want = moe::cpu::exp_fast(x), got = moe::exp_fast_f32(x);
    EXPECT_EQ(moe::float_to_bits(got), moe::float_to_bits(want)) << x;
  }
  EXPECT_TRUE(std::isnan(moe::exp_fast_f32(std::numeric_limits<float>::quiet_NaN())));
}

// rope_angle is what cpu::rope_tables rounds; rope_rotate turns by the table's angle.
TEST(CudaDenseMath, RopeMathMatchesTables) {
  const int64_t T_ = 37, HD = 30;
  std::vector<double> c(T_ * HD / 2), s(T_ * HD / 2);
  moe::cpu::rope_tables<double>(c.data(), s.data(), T_, HD, 10000.0);
  for (int64_t t = 0; t < T_; ++t)
    for (int64_t i = 0; i < HD / 2; ++i) {
      const double a = moe::rope_angle(t, i, HD, 10000.0);
      EXPECT_EQ(std::cos(a), c[t * HD / 2 + i]);
      EXPECT_EQ(std::sin(a), s[t * HD / 2 + i]);
    }
  const moe::RopePair<double> y = moe::rope_rotate(1.0, 0.0, std::cos(0.5), std::sin(0.5));
  EXPECT_DOUBLE_EQ(y.x0, std::cos(0.5));
  EXPECT_DOUBLE_EQ(y.x1, std::sin(0.5));
}

}  // namespace
