// model/model_stages: explicit stage sizes are honoured, and the balanced split is the exact
// optimum (smallest largest stage cost, earliest boundaries on ties) found by brute force
// over every split, with the per-layer costs written out independently here.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <numeric>
#include <vector>

#include "model/model.h"
#include "model/model_stages.h"

namespace moe {
namespace {

using Bounds = std::vector<int64_t>;

ModelDims stage_dims(int64_t L, int64_t dense_layers) {
  ModelDims d;
  d.V = 16;
  d.C = 8;
  d.L = L;
  d.NH = 2;
  d.NKV = 1;
  d.HD = 4;
  d.T = 5;
  d.F = 12;
  d.dense_layers = dense_layers;
  d.E = 6;
  d.K = 2;
  d.FE = 8;
  d.S = 8;
  return d;
}

// Independent reference: multiply-adds per token of each part, x6 for forward + backward.
int64_t ref_layer_cost(const ModelDims& d, int64_t l) {
  const int64_t q = d.NH * d.HD, kv = d.NKV * d.HD;
  int64_t macs = d.C * q + 2 * d.C * kv + q * d.C;  // wq, wk, wv, wo
  macs += 2 * d.T * q;                              // QK^T and PV over the T window
  if (l < d.dense_layers) macs += 3 * d.C * d.F;    // w1, w3, w2
  else macs += d.C * d.E + 3 * d.C * d.FE * d.K + 3 * d.C * d.S;  // router, routed, shared
  return 6 * macs;
}

int64_t ref_stage_cost(const ModelDims& d, int64_t l0, int64_t l1) {
  int64_t c = l1 == d.L ? 6 * d.V * d.C : 0;
  for (int64_t l = l0; l < l1; ++l) c += ref_layer_cost(d, l);
  return c;
}

int64_t ref_max_cost(const ModelDims& d, const Bounds& b) {
  int64_t m = 0;
  for (size_t s = 0; s + 1 < b.size(); ++s) m = std::max(m, ref_stage_cost(d, b[s], b[s + 1]));
  return m;
}

// Every split of L layers into S non-empty stages, in lexicographic order of the bounds;
// the first with the smallest largest cost.
Bounds brute_force(const ModelDims& d, int S) {
  Bounds best, cur(1, 0);
  int64_t best_cost = 0;
  std::function<void()> walk = [&] {
    const int stages_left = S - static_cast<int>(cur.size() - 1);
    if (stages_left == 1) {
      cur.push_back(d.L);
      const int64_t c = ref_max_cost(d, cur);
      if (best.empty() || c < best_cost) best = cur, best_cost = c;
      cur.pop_back();
      return;
    }
    for (int64_t i = cur.back() + 1; i + (stages_left - 1) <= d.L; ++i) {
      cur.push_back(i);
      walk();
      cur.pop_back();
    }
  };
  walk();
  return best;
}

TEST(ModelStages, ExplicitStageLayersAreHonoured) {
  const ModelDims d = stage_dims(7, 1);
  EXPECT_EQ(model_stage_bounds(d, 3, {1, 5, 1}), (Bounds{0, 1, 6, 7}));
  EXPECT_EQ(model_stage_bounds(d, 1, {7}), (Bounds{0, 7}));
  EXPECT_EQ(model_stage_bounds(d, 7, {1, 1, 1, 1, 1, 1, 1}), (Bounds{0, 1, 2, 3, 4, 5, 6, 7}));
}

TEST(ModelStages, OneStageHoldsEveryLayer) {
  for (int64_t L : {1, 2, 9}) EXPECT_EQ(model_stage_bounds(stage_dims(L, 1), 1, {}), (Bounds{0, L}));
}

TEST(ModelStages, AsManyStagesAsLayersGiveOneEach) {
  const ModelDims d = stage_dims(6, 2);
  EXPECT_EQ(model_stage_bounds(d, 6, {}), (Bounds{0, 1, 2, 3, 4, 5, 6}));
}

TEST(ModelStages, EqualLayersSplitEvenly) {
  // All layers alike (all dense, or all MoE); the head costs less than a layer here, so
  // any uneven split puts more than the last stage's load on some stage.
  for (int64_t dense : {0, 12}) {
    const ModelDims d = stage_dims(12, dense);
    ASSERT_LT(model_head_flops(d), model_layer_flops(d, 0));
    EXPECT_EQ(model_stage_bounds(d, 2, {}), (Bounds{0, 6, 12}));
    EXPECT_EQ(model_stage_bounds(d, 3, {}), (Bounds{0, 4, 8, 12}));
    EXPECT_EQ(model_stage_bounds(d, 4, {}), (Bounds{0, 3, 6, 9, 12}));
    EXPECT_EQ(model_stage_bounds(d, 6, {}), (Bounds{0, 2, 4, 6, 8, 10, 12}));
  }
}

TEST(ModelStages, CheapDenseLayersGiveStageZeroMoreLayers) {
  // Two dense layers, each under half a MoE layer: stage 0 takes them and two MoE layers.
  ModelDims d = stage_dims(8, 2);
  d.F = 2;
  ASSERT_LT(2 * model_layer_flops(d, 0), model_layer_flops(d, 2));
  const Bounds b = model_stage_bounds(d, 3, {});
  EXPECT_EQ(b, brute_force(d, 3));
  EXPECT_EQ(b, (Bounds{0, 4, 6, 8}));
}

TEST(ModelStages, BalancedSplitIsTheBruteForceOptimum) {
  struct Case {
    int64_t L, dense, F, V;
  };
  // Small and large dense FFNs, a head far heavier than a layer, all-dense and all-MoE.
  const Case cases[] = {{5, 1, 12, 16},   {7, 1, 2, 16},     {8, 3, 200, 16}, {9, 0, 12, 16},
                        {9, 9, 12, 16},   {10, 2, 12, 4000}, {11, 1, 2, 300}, {6, 6, 7, 1},
                        {10, 4, 40, 64},  {12, 1, 1, 16}};
  for (const Case& c : cases) {
    ModelDims d = stage_dims(c.L, c.dense);
    d.F = c.F;
    d.V = c.V;
    for (int S = 1; S <= c.L; ++S) {
      SCOPED_TRACE(testing::Message() << "L=" << c.L << " dense=" << c.dense << " F=" << c.F
                                      << " V=" << c.V << " S=" << S);
      const Bounds want = brute_force(d, S);
      const Bounds got = model_stage_bounds(d, S, {});
      EXPECT_EQ(ref_max_cost(d, got), ref_max_cost(d, want));
      EXPECT_EQ(got, want);
    }
  }
}

TEST(ModelStages, StageFlopsSumToModelFlops) {
  ModelDims d = stage_dims(9, 2);
  d.V = 100;
  for (const Bounds& b : {Bounds{0, 9}, Bounds{0, 1, 5, 9}, Bounds{0, 2, 3, 4, 5, 6, 7, 8, 9}}) {
    const std::vector<int64_t> flops = model_stage_flops(d, b);
    ASSERT_EQ(flops.size() + 1, b.size());
    for (size_t s = 0; s < flops.size(); ++s) EXPECT_EQ(flops[s], ref_stage_cost(d, b[s], b[s + 1]));
    const int64_t total = std::accumulate(flops.begin(), flops.end(), int64_t{0});
    EXPECT_EQ(static_cast<double>(total), model_flops_per_token(d));
  }
}

TEST(ModelStagesDeathTest, ImpossibleInputIsABug) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const ModelDims d = stage_dims(4, 1);
  EXPECT_DEATH(model_stage_bounds(d, 0, {}), "pipeline stages");
  EXPECT_DEATH(model_stage_bounds(d, 5, {}), "pipeline stages");
  EXPECT_DEATH(model_stage_bounds(d, 2, {1, 2}), "sum to 3");
  EXPECT_DEATH(model_stage_bounds(d, 2, {4, 0}), "a stage of 0 layers");
  EXPECT_DEATH(model_stage_bounds(d, 2, {4}), "stage_layers for 2 stages");
}

}  // namespace
}  // namespace moe
