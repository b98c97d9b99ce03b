// Launch planning of the CUDA FP8 / BF16 quantization and AdamW kernels
// (model/kernels/cuda/quant_plan.h), on the CPU: every plan stays within CUDA's limits for the
// parameter and activation shapes of every shipped config, and the units the kernels derive
// from a plan (fp8_quant_unit, the kernels' own geometry) cover every element exactly once with
// the CPU's scale layout, for odd shapes and odd tiles too.
//
// Shapes per config (configs/*.toml), N = micro_batch * seq_len tokens of one micro-batch:
//   FP8 weights (OC, IC) in 128x128 blocks: every linear layer (attention or MLA projections,
//     dense FFN, expert, MTP eh_proj);
//   activations (rows, IC) and (rows, OC) in 1x128 and 128x1 tiles, rows = N (dense) or up
//     to N * top_k * ep (an expert receiving every routed row of its EP group);
//   BF16 rounding and AdamW over whole tensors and the whole model (671B elements).
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "model/fp8_quant.h"
#include "model/kernels/cuda/quant_plan.h"

namespace moe::cuda {
namespace {

constexpr int64_t kGridXMax = 2147483647;
constexpr int64_t kGridYZMax = 65535;
constexpr int64_t kSmemMax = 48 * 1024;

struct ConfigShapes {
  std::string name;
  int64_t N;                                   // tokens per micro-batch
  int64_t top_k, ep;
  std::vector<std::pair<int64_t, int64_t>> linears;  // (OC, IC)
  int64_t vocab, d_model;
  int64_t params;                              // about the model's parameter count
};

// Derived by hand from configs/*.toml (d_ff = 0 resolves to (top_k + shared) * d_expert).
std::vector<ConfigShapes> config_shapes() {
  std::vector<ConfigShapes> v;
  // tiny: d 128, MHA 4 heads of 32, experts 128 wide, d_ff (2 + 1) * 128 = 384.
  v.push_back({"tiny", 16 * 128, 2, 1,
               {{384, 128}, {128, 128}, {384, 128}, {128, 384}, {128, 128}, {128, 128}},
               256, 128, 2'000'000});
  // bench-cpu: d 512, MHA 8 heads, experts 512 wide, d_ff 3 * 512 = 1536.
  v.push_back({"bench-cpu", 8 * 256, 2, 1,
               {{1536, 512}, {512, 512}, {1536, 512}, {512, 1536}, {512, 512}, {512, 512}},
               256, 512, 40'000'000});
  // deepseek-v3-tiny: d 128, MLA 4 heads (q_lora 64, kv_lora 32, nope 32, rope 16, v 32),
  // experts 128, d_ff 384, MTP eh_proj (128, 256).
  v.push_back({"deepseek-v3-tiny", 16 * 128, 2, 1,
               {{64, 128}, {4 * 48, 64}, {32 + 16, 128}, {4 * 64, 32}, {128, 4 * 32},
                {384, 128}, {128, 384}, {128, 128}, {128, 128}, {128, 256}},
               256, 128, 3'000'000});
  // deepseek-v3-1b: d 1024, MLA 8 heads (q_lora 384, kv_lora 256, nope 64, rope 32, v 64),
  // d_ff 2816, experts 704, ep 8, MTP eh_proj (1024, 2048).
  v.push_back({"deepseek-v3-1b", 4 * 2048, 4, 8,
               {{384, 1024}, {8 * 96, 384}, {256 + 32, 1024}, {8 * 128, 256}, {1024, 8 * 64},
                {2816, 1024}, {1024, 2816}, {704, 1024}, {1024, 704}, {1024, 2048}},
               129280, 1024, 1'500'000'000});
  // deepseek-v3-16b: d 2048, MLA 16 heads (no q_lora: q (16 * 192, 2048), kv_lora 512), d_ff
  // 11264, experts 1408 (2 shared: 2816), ep 8.
  v.push_back({"deepseek-v3-16b", 1 * 4096, 6, 8,
               {{16 * 192, 2048}, {512 + 64, 2048}, {16 * 256, 512}, {2048, 16 * 128},
                {11264, 2048}, {2048, 11264}, {1408, 2048}, {2048, 1408}, {2816, 2048},
                {2048, 2816}, {2048, 4096}},
               129280, 2048, 16'000'000'000});
  // deepseek-v3-671b: d 7168, MLA 128 heads (q_lora 1536, kv_lora 512, nope 128, rope 64,
  // v 128), d_ff 18432, experts 2048, ep 64, MTP eh_proj (7168, 14336).
  v.push_back({"deepseek-v3-671b", 1 * 4096, 8, 64,
               {{1536, 7168}, {128 * 192, 1536}, {512 + 64, 7168}, {128 * 256, 512},
                {7168, 128 * 128}, {18432, 7168}, {7168, 18432}, {2048, 7168}, {7168, 2048},
                {7168, 14336}},
               129280, 7168, 671'000'000'000});
  return v;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The limits, and the plan's own invariants.
void expect_plan_ok(int64_t R, int64_t C, Fp8Tile t, const std::string& what) {
  SCOPED_TRACE(what + " " + std::to_string(R) + "x" + std::to_string(C) + " tile " +
               std::to_string(t.rows) + "x" + std::to_string(t.cols));
  const Fp8QuantPlan p = fp8_quant_plan(R, C, t);
  SCOPED_TRACE(p.describe());
  const LaunchDims& d = p.dims;
  EXPECT_EQ(d.block, kQuantThreads);
  EXPECT_LE(d.block, 1024);
  EXPECT_EQ(d.block % 32, 0);
  EXPECT_LE(d.grid_y, kGridYZMax);
  EXPECT_LE(d.grid_z, kGridYZMax);
  EXPECT_LE(d.smem_bytes, kSmemMax);
  EXPECT_LE(d.grid_x, kGridXMax);
  if (R == 0 || C == 0) {
    EXPECT_EQ(d.grid_x, 0);
    return;
  }
  EXPECT_GE(d.grid_x, 1);
  EXPECT_EQ(p.threads_x % 32, 0);
  EXPECT_EQ(kQuantThreads % p.threads_x, 0);
  EXPECT_EQ(p.unit_cols, p.tiles_per_unit * t.cols);
  EXPECT_EQ(p.col_tiles, ceil_div(C, t.cols));
  EXPECT_EQ(p.unit_col_groups, ceil_div(C, p.unit_cols));
  EXPECT_EQ(d.grid_x, ceil_div(R, t.rows) * p.unit_col_groups);
  EXPECT_GE(d.smem_bytes, p.tiles_per_unit * 8);
  EXPECT_EQ(ceil_div(R, t.rows) * p.col_tiles, fp8_scale_count(R, C, t));
}

TEST(CudaPlanQuant, ConfigShapesWithinLimits) {
  for (const ConfigShapes& c : config_shapes()) {
    SCOPED_TRACE(c.name);
    const std::vector<int64_t> rows = {c.N, c.N * c.top_k, c.N * c.top_k * c.ep, 1, 7};
    for (const auto& [OC, IC] : c.linears) {
      expect_plan_ok(OC, IC, kTileWeight, "weight");
      expect_plan_ok(IC, OC, kTileWeight, "weight^T");
      for (int64_t r : rows) {
        for (Fp8Tile t : {kTileAct, kTileActT}) {
          expect_plan_ok(r, IC, t, "input");
          expect_plan_ok(r, OC, t, "output grad");
        }
      }
    }
    // The residual stream and MoE dispatch rows (1x128 along d_model), the embedding and head.
    expect_plan_ok(c.N * c.top_k * c.ep, c.d_model, kTileAct, "dispatch");
    expect_plan_ok(c.vocab, c.d_model, kTileWeight, "head");
    for (int64_t n : {c.N * c.d_model, c.vocab * c.d_model, c.params, int64_t{0}, int64_t{1}}) {
      for (const LaunchDims& d : {adamw_plan(n), bf16_round_plan(n)}) {
        EXPECT_EQ(d.block, kQuantThreads);
        EXPECT_LE(d.grid_x, kGridXMax);
        EXPECT_LE(d.grid_x, kElementwiseMaxBlocks);
        EXPECT_EQ(d.smem_bytes, 0);
        EXPECT_EQ(d.grid_x == 0, n == 0);
        // The grid-stride loop's index i < n plus the stride never overflows int64.
        EXPECT_LT(n, INT64_MAX - d.grid_x * d.block);
      }
    }
  }
}

// The unit geometry against the CPU's layout: every element in exactly one unit, in one of its
// threads' (column, row) slots, and the scale the unit gives it is the CPU's
// scales[(r / t.rows) * col_tiles + c / t.cols].
void expect_units_cover(int64_t R, int64_t C, Fp8Tile t) {
  SCOPED_TRACE(std::to_string(R) + "x" + std::to_string(C) + " tile " + std::to_string(t.rows) +
               "x" + std::to_string(t.cols));
  const Fp8QuantPlan p = fp8_quant_plan(R, C, t);
  expect_plan_ok(R, C, t, "odd");
  std::vector<int> hits(static_cast<size_t>(R * C), 0);
  std::vector<int> scale_hits(static_cast<size_t>(fp8_scale_count(R, C, t)), 0);
  const int tx_count = p.threads_x, ty_count = kQuantThreads / p.threads_x;
  for (int64_t ui = 0; ui < p.dims.grid_x; ++ui) {
    const Fp8QuantUnit u =
        fp8_quant_unit(ui, R, C, t.rows, t.cols, p.unit_cols, p.unit_col_groups, p.col_tiles);
    ASSERT_GE(u.nr, 1);
    ASSERT_GE(u.nc, 1);
    ASSERT_EQ(u.c0 % t.cols, 0);
    ASSERT_LE(u.ntiles, p.tiles_per_unit);  // the shared-memory arrays hold it
    ASSERT_LE(u.s + u.ntiles, static_cast<int64_t>(scale_hits.size()));
    for (int64_t k = 0; k < u.ntiles; ++k) ++scale_hits[static_cast<size_t>(u.s + k)];
    for (int tid = 0; tid < kQuantThreads; ++tid) {
      const int tx = tid % tx_count, ty = tid / tx_count;
      for (int64_t cc = tx; cc < u.nc; cc += tx_count) {
        ASSERT_LT(cc / t.cols, u.ntiles);
        for (int64_t rr = ty; rr < u.nr; rr += ty_count) {
          const int64_t r = u.r0 + rr, c = u.c0 + cc;
          ASSERT_LT(r, R);
          ASSERT_LT(c, C);
          ++hits[static_cast<size_t>(r * C + c)];
          ASSERT_EQ(u.s + cc / t.cols, (r / t.rows) * p.col_tiles + c / t.cols);
        }
      }
    }
  }
  for (size_t i = 0; i < hits.size(); ++i) ASSERT_EQ(hits[i], 1) << "element " << i;
  for (size_t i = 0; i < scale_hits.size(); ++i) ASSERT_EQ(scale_hits[i], 1) << "scale " << i;
}

TEST(CudaPlanQuant, UnitsCoverEveryElementOnce) {
  const std::vector<Fp8Tile> tiles = {kTileAct, kTileActT, kTileWeight, {1, 1}, {3, 5},
                                      {1, 4096}, {300, 1}, {2, 200}, {128, 64}};
  const std::vector<std::pair<int64_t, int64_t>> shapes = {
      {1, 1}, {130, 259}, {71, 229}, {1, 1500}, {257, 3}, {128, 128}, {129, 1025}, {5, 2049}};
  for (Fp8Tile t : tiles)
    for (const auto& [R, C] : shapes) expect_units_cover(R, C, t);
}

TEST(CudaPlanQuant, EmptyShapesPlanNothing) {
  for (Fp8Tile t : {kTileAct, kTileActT, kTileWeight}) {
    EXPECT_EQ(fp8_quant_plan(0, 259, t).dims.grid_x, 0);
    EXPECT_EQ(fp8_quant_plan(130, 0, t).dims.grid_x, 0);
  }
  EXPECT_EQ(adamw_plan(0).grid_x, 0);
  EXPECT_EQ(bf16_round_plan(0).grid_x, 0);
}

// The standard tiles get the intended splits: 1x128 rows in 1024-column units (8 tiles, 4
// elements per thread), 128x1 in 256-column units (a column per thread), 128x128 two blocks
// per unit.
TEST(CudaPlanQuant, StandardTileSplits) {
  const Fp8QuantPlan act = fp8_quant_plan(4096, 7168, kTileAct);
  EXPECT_EQ(act.unit_cols, 1024);
  EXPECT_EQ(act.threads_x, 256);
  EXPECT_EQ(act.dims.grid_x, 4096 * 7);
  const Fp8QuantPlan act_t = fp8_quant_plan(4096, 7168, kTileActT);
  EXPECT_EQ(act_t.unit_cols, 256);
  EXPECT_EQ(act_t.threads_x, 256);
  EXPECT_EQ(act_t.dims.grid_x, 32 * 28);
  const Fp8QuantPlan w = fp8_quant_plan(2048, 7168, kTileWeight);
  EXPECT_EQ(w.unit_cols, 256);
  EXPECT_EQ(w.tiles_per_unit, 2);
  EXPECT_EQ(w.dims.grid_x, 16 * 28);
}

}  // namespace
}  // namespace moe::cuda
