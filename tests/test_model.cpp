// Whole-model tests: gradient checks of the assembled transformer (dense and MoE, both
// score functions, shared experts on and off, balance loss on) against central finite
// differences in double precision, and the accumulation contract across micro-batches.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "model/model.h"
#include "model/rng.h"

namespace moe {
namespace {

ModelDims small_dims(ScoreFn score, int64_t shared_width, int64_t dense_layers) {
  ModelDims d;
  d.V = 11; d.C = 8; d.L = 3; d.NH = 2; d.NKV = 1; d.HD = 4; d.T = 5; d.F = 12;
  d.dense_layers = dense_layers;
  d.E = 6; d.K = 2; d.FE = 4; d.S = shared_width; d.G = 1; d.KG = 1;
  d.score = score;
  d.route_scale = 1.5;
  d.aux_alpha = 0.1;
  d.init_std = 0.4;
  return d;
}

std::vector<int32_t> random_tokens(int64_t n, int64_t V, uint64_t seed) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) t[static_cast<size_t>(i)] = static_cast<int32_t>(rng_u64(seed, 9, i) % V);
  return t;
}

// objective = mean CE + aux_loss_sum (dloss_ce = 1 / N, dloss_aux = 1)
double objective(Model<double>& m, const std::vector<int32_t>& x, const std::vector<int32_t>& y,
                 int64_t B, int64_t T_) {
  double ce = model_forward<double>(m, x.data(), y.data(), B, T_, false);
  return ce + m.aux_loss_sum;
}

// All expert choices of the last forward, to detect a finite-difference step that flipped
// a (piecewise constant) routing decision.
std::vector<int32_t> routing_of(const Model<double>& m, int64_t N) {
  std::vector<int32_t> ids;
  for (int64_t l = m.d.dense_layers; l < m.d.L; ++l) {
    const int32_t* e = m.slots[0].layers[static_cast<size_t>(l)].expert_ids;
    ids.insert(ids.end(), e, e + N * m.d.K);
  }
  return ids;
}

void gradient_check(const ModelDims& d, uint64_t seed) {
  // Thousands of tiny forwards: one thread avoids paying OpenMP start-up on each kernel.
  // (Thread-count determinism is the kernel tests' job.)
  omp_set_num_threads(1);
  const int64_t B = 2, T_ = d.T, N = B * T_;
  Model<double> m;
  model_build<double>(m, d, B);
  model_init<double>(m, seed);
  // A non-zero selection bias: it must change which experts are chosen, never the weights.
  for (int64_t i = 0; i < d.n_moe_layers() * d.E; ++i)
    m.router_bias[i] = static_cast<float>(0.05 * rng_normal(seed, 77, static_cast<uint64_t>(i)));
  const std::vector<int32_t> x = random_tokens(N, d.V, seed), y = random_tokens(N, d.V, seed + 1);

  model_zero_grads<double>(m);
  const double base = objective(m, x, y, B, T_);
  ASSERT_TRUE(std::isfinite(base));
  const std::vector<int32_t> base_routing = routing_of(m, N);
  model_backward<double>(m, 1.0 / static_cast<double>(N), 1.0);
  std::vector<double> analytic(m.grads, m.grads + m.n_params);

  double max_err = 0, max_grad = 0;
  int64_t skipped = 0, checked = 0;
  const double h = 1e-5;
  for (size_t i = 0; i < m.n_params; ++i) {
    const double saved = m.params[i];
    m.params[i] = saved + h;
    const double lp = objective(m, x, y, B, T_);
    const bool flip_p = routing_of(m, N) != base_routing;
    m.params[i] = saved - h;
    const double lm = objective(m, x, y, B, T_);
    const bool flip_m = routing_of(m, N) != base_routing;
    m.params[i] = saved;
    if (flip_p || flip_m) {
      ++skipped;
      continue;
    }
    const double fd = (lp - lm) / (2 * h);
    max_err = std::max(max_err, std::fabs(fd - analytic[i]));
    max_grad = std::max(max_grad, std::fabs(analytic[i]));
    ++checked;
  }
  EXPECT_GT(max_grad, 1e-3) << "gradients are all ~zero: the check would prove nothing";
  EXPECT_LT(max_err, 1e-7 * std::max(1.0, max_grad)) << "max |fd - analytic| over " << checked;
  EXPECT_LT(skipped, static_cast<int64_t>(m.n_params) / 100) << "too many routing flips";
}

TEST(ModelGradient, DenseOnly) { gradient_check(small_dims(ScoreFn::kSigmoid, 0, 3), 11); }
TEST(ModelGradient, MoeSigmoidShared) { gradient_check(small_dims(ScoreFn::kSigmoid, 4, 1), 12); }
TEST(ModelGradient, MoeSigmoidNoShared) { gradient_check(small_dims(ScoreFn::kSigmoid, 0, 1), 13); }
TEST(ModelGradient, MoeSoftmaxShared) { gradient_check(small_dims(ScoreFn::kSoftmax, 4, 1), 14); }
TEST(ModelGradient, MoeSoftmaxNoSharedAllMoe) { gradient_check(small_dims(ScoreFn::kSoftmax, 0, 0), 15); }

TEST(ModelGradient, TiedEmbeddingsGroupLimited) {
  ModelDims d = small_dims(ScoreFn::kSigmoid, 4, 1);
  d.tie_embeddings = true;
  d.G = 3;
  d.KG = 2;
  gradient_check(d, 16);
}

// k micro-batches accumulated = one batch k times larger (weight gradients +=).
TEST(ModelAccumulation, MicroBatchesEqualOneBigBatch) {
  const ModelDims d = small_dims(ScoreFn::kSigmoid, 4, 1);
  const int64_t T_ = d.T, B = 4, N = B * T_;
  const std::vector<int32_t> x = random_tokens(N, d.V, 5), y = random_tokens(N, d.V, 6);
  Model<double> big, small;
  model_build<double>(big, d, B);
  model_build<double>(small, d, B / 2);
  model_init<double>(big, 3);
  model_init<double>(small, 3);
  model_zero_grads<double>(big);
  model_zero_grads<double>(small);
  const double dce = 1.0 / static_cast<double>(N), daux = 1.0 / static_cast<double>(B);
  model_forward<double>(big, x.data(), y.data(), B, T_, true);
  model_backward<double>(big, dce, daux);
  for (int64_t half = 0; half < 2; ++half) {
    const int64_t off = half * (N / 2);
    model_forward<double>(small, x.data() + off, y.data() + off, B / 2, T_, true);
    model_backward<double>(small, dce, daux);
  }
  double max_diff = 0, max_abs = 0;
  for (size_t i = 0; i < big.n_params; ++i) {
    max_diff = std::max(max_diff, std::fabs(big.grads[i] - small.grads[i]));
    max_abs = std::max(max_abs, std::fabs(big.grads[i]));
  }
  EXPECT_GT(max_abs, 1e-4);
  EXPECT_LT(max_diff, 1e-12 * std::max(1.0, max_abs));
  for (int64_t i = 0; i < d.n_moe_layers() * d.E; ++i)
    EXPECT_EQ(big.expert_load[i], small.expert_load[i]) << i;
}

// The float model computes the same loss as the double one (to float accuracy).
TEST(ModelForward, FloatMatchesDouble) {
  const ModelDims d = small_dims(ScoreFn::kSigmoid, 4, 1);
  const int64_t B = 2, N = B * d.T;
  const std::vector<int32_t> x = random_tokens(N, d.V, 21), y = random_tokens(N, d.V, 22);
  Model<double> md;
  Model<float> mf;
  model_build<double>(md, d, B);
  model_build<float>(mf, d, B);
  model_init<double>(md, 8);
  model_init<float>(mf, 8);
  const double ld = model_forward<double>(md, x.data(), y.data(), B, d.T, false);
  const double lf = model_forward<float>(mf, x.data(), y.data(), B, d.T, false);
  EXPECT_GT(ld, 1.0);
  EXPECT_NEAR(lf, ld, 1e-5 * ld);
}

// Parameter table: contiguous, in order, decay off exactly for norms.
TEST(ModelLayout, TableIsContiguous) {
  const ModelDims d = small_dims(ScoreFn::kSigmoid, 4, 1);
  const std::vector<ParamInfo> t = model_param_table(d);
  size_t off = 0;
  for (const ParamInfo& p : t) {
    EXPECT_EQ(p.offset, off) << p.name;
    off += p.count;
    EXPECT_EQ(p.decay, p.shape.size() > 1) << p.name;
  }
  EXPECT_EQ(static_cast<int64_t>(off), model_counts(d).total);
}

}  // namespace
}  // namespace moe

namespace moe {
namespace {

// The logical (checkpoint) views cover every parameter element exactly once, and the
// per-expert names address the right rows of the fused buffers.
TEST(ModelLayout, LogicalTensorsCoverEveryElementOnce) {
  ModelDims d = small_dims(ScoreFn::kSigmoid, 8, 1);  // two shared experts of width 4
  const std::vector<ParamInfo> table = model_param_table(d);
  const size_t n = table.back().offset + table.back().count;
  std::vector<int> hits(n, 0);
  bool saw_expert = false, saw_shared_down = false;
  for (const LogicalTensor& t : model_logical_tensors(d)) {
    const int64_t rows = t.shape.size() == 2 ? t.shape[0] : 1;
    const int64_t cols = t.shape.back();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) ++hits[t.offset + static_cast<size_t>(r * t.ld + c)];
    if (t.name == "layers/2/moe/experts/5/w_up") {
      saw_expert = true;
      const ParamInfo& w13 = *std::find_if(table.begin(), table.end(), [](const ParamInfo& p) {
        return p.name == "layers/2/moe/experts/w13";
      });
      EXPECT_EQ(t.offset, w13.offset + static_cast<size_t>((5 * 2 * d.FE + d.FE) * d.C));
    }
    if (t.name == "layers/1/moe/shared/1/w_down") {
      saw_shared_down = true;
      EXPECT_EQ(t.ld, d.S);
      EXPECT_EQ(t.shape, (std::vector<int64_t>{d.C, d.FE}));
    }
  }
  EXPECT_TRUE(saw_expert);
  EXPECT_TRUE(saw_shared_down);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(hits[i], 1) << "element " << i;
}

}  // namespace
}  // namespace moe
