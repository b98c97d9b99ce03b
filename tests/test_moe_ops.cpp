// MoE routing and dispatch kernels (model/kernels/cpu/moe_ops.h) against plain double
// references (tests/reference_moe.h), finite differences and adjoint identities.
//
// Dimension letters: N tokens, B sequences, T tokens per sequence, E experts, K per token,
// G groups, KG kept groups, C row width.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <numeric>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "model/kernels/cpu/moe_ops.h"
#include "model/router_math.h"
#include "model/rng.h"
#include "tests/reference_moe.h"

namespace moe {
namespace {

using cpu::aux_loss_backward;
using cpu::aux_loss_forward;
using cpu::router_backward;
using cpu::router_forward;

// Tolerances per precision: float kernels against double references, double kernels
// against double references and against finite differences.
constexpr double kTolFloat = 2e-5;
constexpr double kTolDouble = 1e-12;
constexpr double kTolFd = 1e-7;
// Selection must be this far from a tie for float-vs-double and finite-difference checks.
constexpr double kMinMargin = 1e-3;

struct RouterShape {
  int64_t N, E, K, G, KG;
  ScoreFn score;
  double scale;
};

void PrintTo(const RouterShape& p, std::ostream* os) {
  *os << "{N=" << p.N << " E=" << p.E << " K=" << p.K << " G=" << p.G << " KG=" << p.KG
      << (p.score == ScoreFn::kSigmoid ? " sigmoid" : " softmax") << " scale=" << p.scale << "}";
}

std::string shape_name(const testing::TestParamInfo<RouterShape>& info) {
  const RouterShape& p = info.param;
  return "N" + std::to_string(p.N) + "E" + std::to_string(p.E) + "K" + std::to_string(p.K) +
         "G" + std::to_string(p.G) + "KG" + std::to_string(p.KG) +
         (p.score == ScoreFn::kSigmoid ? "Sigmoid" : "Softmax");
}

// Random router inputs; each token's logits are redrawn until the reference selection is at
// least min_margin from a tie, so float rounding or a finite-difference step cannot flip it.
struct RouterInputs {
  std::vector<double> logits;  // (N, E)
  std::vector<float> bias;     // (E)
  std::vector<double> scores;  // (N, E) reference
  std::vector<int32_t> ids;    // (N, K) reference
  std::vector<double> weights; // (N, K) reference
};

RouterInputs router_inputs(const RouterShape& p, uint64_t seed, double min_margin = kMinMargin) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.5);
  std::uniform_real_distribution<float> uni(-0.05f, 0.05f);
  RouterInputs in;
  in.logits.resize(p.N * p.E);
  in.bias.resize(p.E);
  in.scores.resize(p.N * p.E);
  in.ids.resize(p.N * p.K);
  in.weights.resize(p.N * p.K);
  for (float& b : in.bias) b = uni(rng);
  for (int64_t n = 0; n < p.N; ++n) {
    for (int attempt = 0;; ++attempt) {
      if (attempt == 1000) {
        ADD_FAILURE() << "cannot draw a tie-free token";
        break;
      }
      for (int64_t e = 0; e < p.E; ++e) {
        // Round through float so the float kernel sees exactly the reference's inputs.
        in.logits[n * p.E + e] = static_cast<float>(normal(rng));
      }
      const double margin = ref::router_token(&in.scores[n * p.E], &in.ids[n * p.K],
                                              &in.weights[n * p.K], &in.logits[n * p.E],
                                              in.bias.data(), p.E, p.K, p.score, p.scale, p.G,
                                              p.KG);
      if (margin > min_margin) break;
    }
  }
  return in;
}

template <typename T>
std::vector<T> cast(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

double max_abs(const std::vector<double>& v) {
  double m = 0.0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

template <typename A, typename B>
void expect_near_all(const std::vector<A>& got, const std::vector<B>& want, double tol,
                     const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = static_cast<double>(got[i]), w = static_cast<double>(want[i]);
    ASSERT_NEAR(g, w, tol * std::max(1.0, std::fabs(w))) << what << " at " << i;
  }
}

// ---------------------------------------------------------------------------------------
// Router forward against the reference.

class RouterShapes : public testing::TestWithParam<RouterShape> {};

TEST_P(RouterShapes, ForwardMatchesReferenceFloatAndDouble) {
  const RouterShape p = GetParam();
  const RouterInputs in = router_inputs(p, 100 + p.N * 7 + p.E);
  ASSERT_GT(max_abs(in.logits), 0.0);
  {
    std::vector<float> logits = cast<float>(in.logits), scores(p.N * p.E), w(p.N * p.K);
    std::vector<int32_t> ids(p.N * p.K, -7);
    router_forward(scores.data(), ids.data(), w.data(), logits.data(), in.bias.data(), p.N, p.E,
                   p.K, p.score, p.scale, p.G, p.KG);
    EXPECT_EQ(ids, in.ids);
    expect_near_all(scores, in.scores, kTolFloat, "float scores");
    expect_near_all(w, in.weights, kTolFloat, "float weights");
  }
  {
    std::vector<double> scores(p.N * p.E), w(p.N * p.K);
    std::vector<int32_t> ids(p.N * p.K, -7);
    router_forward(scores.data(), ids.data(), w.data(), in.logits.data(), in.bias.data(), p.N,
                   p.E, p.K, p.score, p.scale, p.G, p.KG);
    EXPECT_EQ(ids, in.ids);
    expect_near_all(scores, in.scores, kTolDouble, "double scores");
    expect_near_all(w, in.weights, kTolDouble, "double weights");
  }
}

// Loss used for the router gradient checks: sum c*w + sum d*s, with fixed random c, d.
double router_probe_loss(const RouterShape& p, const std::vector<double>& logits,
                         const std::vector<float>& bias, const std::vector<double>& c,
                         const std::vector<double>* d, const std::vector<int32_t>& want_ids) {
  std::vector<double> s(p.N * p.E), w(p.N * p.K);
  std::vector<int32_t> ids(p.N * p.K);
  router_forward(s.data(), ids.data(), w.data(), logits.data(), bias.data(), p.N, p.E, p.K,
                 p.score, p.scale, p.G, p.KG);
  EXPECT_EQ(ids, want_ids) << "finite-difference step changed the selection";
  double loss = 0.0;
  for (size_t i = 0; i < w.size(); ++i) loss += c[i] * w[i];
  if (d != nullptr)
    for (size_t i = 0; i < s.size(); ++i) loss += (*d)[i] * s[i];
  return loss;
}

TEST_P(RouterShapes, BackwardMatchesFiniteDifferences) {
  RouterShape p = GetParam();
  p.N = std::min<int64_t>(p.N, 6);  // FD costs N*E forward passes
  const RouterInputs in = router_inputs(p, 200 + p.E);
  std::mt19937_64 rng(300 + p.E);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> c(p.N * p.K), d(p.N * p.E);
  for (double& x : c) x = normal(rng);
  for (double& x : d) x = normal(rng);
  for (bool extra : {false, true}) {
    SCOPED_TRACE(extra ? "with dscores_extra" : "without dscores_extra");
    std::vector<double> dlogits(p.N * p.E, 123.0);
    router_backward(dlogits.data(), c.data(), extra ? d.data() : nullptr, in.scores.data(),
                    in.ids.data(), p.N, p.E, p.K, p.score, p.scale);
    // A softmax over one expert is constant: its gradient is genuinely zero.
    if (p.E > 1 || p.score == ScoreFn::kSigmoid) {
      ASSERT_GT(max_abs(dlogits), 0.0);
    }
    const double h = 1e-6;
    std::vector<double> fd(p.N * p.E);
    for (size_t i = 0; i < fd.size(); ++i) {
      std::vector<double> lp = in.logits, lm = in.logits;
      lp[i] += h;
      lm[i] -= h;
      fd[i] = (router_probe_loss(p, lp, in.bias, c, extra ? &d : nullptr, in.ids) -
               router_probe_loss(p, lm, in.bias, c, extra ? &d : nullptr, in.ids)) /
              (2 * h);
    }
    expect_near_all(dlogits, fd, kTolFd, "dlogits");
    // The float kernel computes the same map.
    std::vector<float> df(p.N * p.E), cf = cast<float>(c), dd = cast<float>(d),
                                      sf = cast<float>(in.scores);
    router_backward(df.data(), cf.data(), extra ? dd.data() : nullptr, sf.data(), in.ids.data(),
                    p.N, p.E, p.K, p.score, p.scale);
    expect_near_all(df, dlogits, 1e-5, "float dlogits");
  }
}

INSTANTIATE_TEST_SUITE_P(
    Moe, RouterShapes,
    testing::Values(RouterShape{71, 7, 1, 1, 1, ScoreFn::kSigmoid, 1.0},
                    RouterShape{71, 7, 2, 1, 1, ScoreFn::kSoftmax, 1.0},
                    RouterShape{71, 9, 3, 1, 1, ScoreFn::kSigmoid, 2.5},
                    RouterShape{71, 9, 3, 1, 1, ScoreFn::kSoftmax, 2.5},
                    RouterShape{71, 16, 2, 4, 2, ScoreFn::kSigmoid, 1.0},
                    RouterShape{71, 16, 3, 4, 2, ScoreFn::kSoftmax, 1.0},
                    RouterShape{29, 9, 2, 9, 3, ScoreFn::kSigmoid, 1.0},  // one expert per group
                    RouterShape{17, 5, 5, 1, 1, ScoreFn::kSigmoid, 1.0},  // K = E
                    RouterShape{13, 1, 1, 1, 1, ScoreFn::kSoftmax, 1.0},  // E = 1
                    RouterShape{40, 64, 6, 8, 3, ScoreFn::kSigmoid, 2.5}),
    shape_name);

// ---------------------------------------------------------------------------------------
// Selection rules, hand-constructed.

struct Routed {
  std::vector<double> scores, weights;
  std::vector<int32_t> ids;
};

Routed route(const std::vector<double>& logits, const std::vector<float>& bias, int64_t K,
             ScoreFn score = ScoreFn::kSigmoid, int64_t G = 1, int64_t KG = 1,
             double scale = 1.0) {
  const int64_t E = static_cast<int64_t>(bias.size()), N = static_cast<int64_t>(logits.size()) / E;
  Routed r{std::vector<double>(N * E), std::vector<double>(N * K), std::vector<int32_t>(N * K)};
  router_forward(r.scores.data(), r.ids.data(), r.weights.data(), logits.data(), bias.data(), N,
                 E, K, score, scale, G, KG);
  return r;
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

TEST(MoeRouterSelect, BiasChangesSelectionButNotWeights) {
  const std::vector<double> logits = {2.0, 1.0, 0.0, -1.0};
  const Routed plain = route(logits, {0, 0, 0, 0}, 2);
  EXPECT_EQ(plain.ids, (std::vector<int32_t>{0, 1}));
  // sigmoid(0) + 0.5 = 1.0 beats sigmoid(2) = 0.88: expert 2 moves to the front.
  const Routed biased = route(logits, {0, 0, 0.5f, 0}, 2);
  EXPECT_EQ(biased.ids, (std::vector<int32_t>{2, 0}));
  const double s0 = sigmoid(2.0), s2 = sigmoid(0.0);
  EXPECT_NEAR(biased.weights[0], s2 / (s0 + s2), 1e-15);
  EXPECT_NEAR(biased.weights[1], s0 / (s0 + s2), 1e-15);
  EXPECT_EQ(biased.scores, plain.scores);  // bias never touches the scores
  // Softmax: weights are the unbiased scores, not renormalized.
  const Routed sm = route(logits, {0, 0, 0.5f, 0}, 2, ScoreFn::kSoftmax, 1, 1, 3.0);
  EXPECT_EQ(sm.ids, (std::vector<int32_t>{0, 2}));  // softmax(2) = 0.64 vs 0.09 + 0.5
  EXPECT_NEAR(sm.weights[0], 3.0 * sm.scores[0], 1e-15);
  EXPECT_NEAR(sm.weights[1], 3.0 * sm.scores[2], 1e-15);
  EXPECT_LT(sm.weights[0] + sm.weights[1], 3.0);
}

TEST(MoeRouterSelect, TiesGoToLowerId) {
  EXPECT_EQ(route({0, 0, 0, 0, 0}, {0, 0, 0, 0, 0}, 3).ids, (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(route({0, 0, 0, 0, 0}, {-1, 0, -1, 0, 0}, 2).ids, (std::vector<int32_t>{1, 3}));
  // Output order is by biased score, ties inside it by id.
  EXPECT_EQ(route({0, 1, 0, 1}, {0, 0, 0, 0}, 3).ids, (std::vector<int32_t>{1, 3, 0}));
  // Tied groups: all four groups equal, KG = 2 keeps groups 0 and 1.
  EXPECT_EQ(route(std::vector<double>(8, 0.0), std::vector<float>(8, 0.f), 3,
                  ScoreFn::kSigmoid, 4, 2)
                .ids,
            (std::vector<int32_t>{0, 1, 2}));
}

TEST(MoeRouterSelect, GroupLimitingDropsHighExpertInWeakGroup) {
  // Groups of two: {0,1} has the single best expert but a weak partner (top-2 sum ~1.0),
  // {2,3} has two good experts (sum ~1.46), {4,5} and {6,7} are weak.
  const std::vector<double> logits = {5, -5, 1, 1, -2, -2, -3, -3};
  const std::vector<float> bias(8, 0.f);
  EXPECT_EQ(route(logits, bias, 2).ids, (std::vector<int32_t>{0, 2}));
  EXPECT_EQ(route(logits, bias, 2, ScoreFn::kSigmoid, 4, 1).ids, (std::vector<int32_t>{2, 3}));
  EXPECT_EQ(route(logits, bias, 3, ScoreFn::kSigmoid, 4, 2).ids,
            (std::vector<int32_t>{0, 2, 3}));
  // Bias counts in the group score: lifting expert 1 makes group {0,1} the best one.
  std::vector<float> lift(8, 0.f);
  lift[1] = 0.6f;
  EXPECT_EQ(route(logits, lift, 2, ScoreFn::kSigmoid, 4, 1).ids, (std::vector<int32_t>{0, 1}));
}

// DeepSeek-V3's routing (256 experts in 8 groups, 4 groups kept, top-8, route scale 2.5) on
// random scores and biases: every chosen expert lies in a kept group, and the kept groups
// are the 4 with the largest sums of their two best biased scores (computed here directly).
TEST(MoeRouterSelect, V3GroupLimitsHoldOnRandomTokens) {
  const int64_t E = 256, K = 8, G = 8, KG = 4, Eg = E / G, N = 200;
  std::vector<double> logits(N * E);
  std::vector<float> bias(E);
  for (int64_t i = 0; i < N * E; ++i) logits[i] = 3.0 * (rng_uniform(77, 1, i) - 0.5);
  for (int64_t e = 0; e < E; ++e) bias[e] = static_cast<float>(0.2 * (rng_uniform(77, 2, e) - 0.5));
  const Routed r = route(logits, bias, K, ScoreFn::kSigmoid, G, KG, 2.5);
  int64_t groups_used = 0;
  for (int64_t n = 0; n < N; ++n) {
    std::vector<std::pair<double, int64_t>> gs;
    for (int64_t g = 0; g < G; ++g) {
      std::vector<double> b;
      for (int64_t j = 0; j < Eg; ++j)
        b.push_back(r.scores[n * E + g * Eg + j] + static_cast<double>(bias[g * Eg + j]));
      std::sort(b.rbegin(), b.rend());
      gs.push_back({b[0] + b[1], g});
    }
    std::sort(gs.begin(), gs.end(), [](auto a, auto b) { return a.first > b.first; });
    std::vector<bool> kept(G, false);
    for (int64_t j = 0; j < KG; ++j) kept[gs[j].second] = true;
    std::vector<bool> used(G, false);
    double wsum = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int32_t e = r.ids[n * K + k];
      ASSERT_TRUE(kept[e / Eg]) << "token " << n << " expert " << e << " outside the kept groups";
      used[e / Eg] = true;
      wsum += r.weights[n * K + k];
    }
    EXPECT_NEAR(wsum, 2.5, 1e-12);  // normalized over the top-k, times the route scale
    for (bool u : used) groups_used += u;
  }
  // The limit binds: without it the top-8 of 256 would spread over more groups.
  EXPECT_LE(groups_used, N * KG);
  const Routed free = route(logits, bias, K, ScoreFn::kSigmoid, 1, 1, 2.5);
  int64_t outside = 0;
  for (int64_t i = 0; i < N * K; ++i) outside += free.ids[i] != r.ids[i];
  EXPECT_GT(outside, 0);
}

// ---------------------------------------------------------------------------------------
// Balance loss.

struct AuxShape {
  int64_t B, T, E, K;
};

void PrintTo(const AuxShape& a, std::ostream* os) {
  *os << "{B=" << a.B << " T=" << a.T << " E=" << a.E << " K=" << a.K << "}";
}

class AuxShapes : public testing::TestWithParam<AuxShape> {};

TEST_P(AuxShapes, ForwardMatchesReferenceAndBackwardMatchesFiniteDifferences) {
  const AuxShape a = GetParam();
  const double alpha = 0.3;
  for (ScoreFn score : {ScoreFn::kSigmoid, ScoreFn::kSoftmax}) {
    SCOPED_TRACE(score == ScoreFn::kSigmoid ? "sigmoid" : "softmax");
    const RouterShape p{a.B * a.T, a.E, a.K, 1, 1, score, 1.0};
    const RouterInputs in = router_inputs(p, 400 + a.E, 0.0);
    const double want = ref::aux_loss(in.scores.data(), in.ids.data(), a.B, a.T, a.E, a.K, alpha);
    ASSERT_GT(want, 0.0);
    EXPECT_NEAR(aux_loss_forward(in.scores.data(), in.ids.data(), a.B, a.T, a.E, a.K, alpha),
                want, kTolDouble * want);
    const std::vector<float> sf = cast<float>(in.scores);
    EXPECT_NEAR(aux_loss_forward(sf.data(), in.ids.data(), a.B, a.T, a.E, a.K, alpha), want,
                kTolFloat * want);

    const double dloss = 1.7;
    std::vector<double> ds(p.N * p.E, 99.0);
    aux_loss_backward(ds.data(), in.scores.data(), in.ids.data(), a.B, a.T, a.E, a.K, alpha,
                      dloss);
    ASSERT_GT(max_abs(ds), 0.0);
    const double h = 1e-6;
    std::vector<double> fd(ds.size());
    for (size_t i = 0; i < fd.size(); ++i) {
      std::vector<double> sp = in.scores, sm = in.scores;
      sp[i] += h;
      sm[i] -= h;
      fd[i] = dloss *
              (ref::aux_loss(sp.data(), in.ids.data(), a.B, a.T, a.E, a.K, alpha) -
               ref::aux_loss(sm.data(), in.ids.data(), a.B, a.T, a.E, a.K, alpha)) /
              (2 * h);
    }
    expect_near_all(ds, fd, kTolFd, "dscores");
    std::vector<float> dsf(ds.size());
    aux_loss_backward(dsf.data(), sf.data(), in.ids.data(), a.B, a.T, a.E, a.K, alpha,
                      static_cast<float>(dloss));
    expect_near_all(dsf, ds, 1e-5, "float dscores");
  }
}

INSTANTIATE_TEST_SUITE_P(Moe, AuxShapes,
                         testing::Values(AuxShape{1, 1, 3, 1}, AuxShape{3, 11, 9, 3},
                                         AuxShape{2, 71, 7, 2}, AuxShape{1, 130, 16, 4}));

// ---------------------------------------------------------------------------------------
// Dispatch plan.

void check_plan(const std::vector<int32_t>& ids, int64_t N, int64_t E, int64_t K) {
  std::vector<int64_t> counts(E, -1), offsets(E + 1, -1);
  std::vector<int32_t> row_of(N * K, -1), token_of(N * K, -1);
  cpu::moe_plan(counts.data(), offsets.data(), row_of.data(), token_of.data(), ids.data(), N, E,
                K);
  std::vector<int64_t> rc, ro;
  std::vector<int32_t> rr, rt;
  ref::plan(rc, ro, rr, rt, ids.data(), N, E, K);
  EXPECT_EQ(counts, rc);
  EXPECT_EQ(offsets, ro);
  EXPECT_EQ(row_of, rr);
  EXPECT_EQ(token_of, rt);
  // The invariants, checked directly as well.
  EXPECT_EQ(offsets[0], 0);
  EXPECT_EQ(offsets[E], N * K);
  for (int64_t e = 0; e < E; ++e) EXPECT_EQ(offsets[e + 1] - offsets[e], counts[e]);
  std::vector<int64_t> pair_of_row(N * K, -1);
  for (int64_t i = 0; i < N * K; ++i) {
    ASSERT_GE(row_of[i], 0);
    ASSERT_LT(row_of[i], N * K);
    EXPECT_EQ(pair_of_row[row_of[i]], -1) << "row used twice";
    pair_of_row[row_of[i]] = i;
    EXPECT_EQ(token_of[row_of[i]], i / K);
    const int32_t e = ids[i];
    EXPECT_GE(row_of[i], offsets[e]);
    EXPECT_LT(row_of[i], offsets[e + 1]);
  }
  // (expert, token, slot) strictly increasing over rows; pair index = token * K + slot.
  for (int64_t r = 1; r < N * K; ++r) {
    const int64_t a = pair_of_row[r - 1], b = pair_of_row[r];
    EXPECT_TRUE(ids[a] < ids[b] || (ids[a] == ids[b] && a < b)) << "row " << r;
  }
}

TEST(MoePlan, RandomRoutingWithEmptyExperts) {
  // Experts 3 and 8 never chosen: bias pushes them out.
  const RouterShape p{71, 9, 3, 1, 1, ScoreFn::kSigmoid, 1.0};
  RouterInputs in = router_inputs(p, 500, 0.0);
  std::vector<float> bias(9, 0.f);
  bias[3] = bias[8] = -5.f;
  Routed r = route(in.logits, bias, 3);
  int64_t n3 = std::count(r.ids.begin(), r.ids.end(), 3);
  ASSERT_EQ(n3, 0);
  check_plan(r.ids, 71, 9, 3);
}

TEST(MoePlan, AllTokensToOneExpertAndEdgeCases) {
  check_plan(std::vector<int32_t>(37, 4), 37, 6, 1);
  check_plan(std::vector<int32_t>{}, 0, 5, 2);
  // Not distinct per token (the plan does not need it): both slots to expert 1.
  check_plan({1, 1, 0, 1, 1, 0}, 3, 2, 2);
  std::mt19937_64 rng(7);
  std::vector<int32_t> ids(229 * 2);
  for (auto& x : ids) x = static_cast<int32_t>(rng() % 13);
  check_plan(ids, 229, 13, 2);
}

// ---------------------------------------------------------------------------------------
// Permute and combine.

struct DispatchCase {
  int64_t N, E, K, C;
  std::vector<int32_t> ids, row_of, token_of;
  std::vector<int64_t> counts, offsets;
};

DispatchCase make_dispatch(int64_t N, int64_t E, int64_t K, int64_t C, uint64_t seed) {
  DispatchCase d{N, E, K, C, std::vector<int32_t>(N * K), {}, {}, {}, {}};
  std::mt19937_64 rng(seed);
  for (int64_t n = 0; n < N; ++n) {
    std::vector<int32_t> perm(E);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int64_t k = 0; k < K; ++k) d.ids[n * K + k] = perm[k] % (E - 1);  // expert E-1 empty
  }
  ref::plan(d.counts, d.offsets, d.row_of, d.token_of, d.ids.data(), N, E, K);
  return d;
}

std::vector<double> randn(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> v(n);
  for (double& x : v) x = normal(rng);
  return v;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

class DispatchShapes : public testing::TestWithParam<std::array<int64_t, 4>> {};

TEST_P(DispatchShapes, ForwardMatchesReference) {
  const auto [N, E, K, C] = GetParam();
  const DispatchCase d = make_dispatch(N, E, K, C, 600 + N);
  const int64_t R = N * K;
  const std::vector<double> x = randn(N * C, 1), y = randn(R * C, 2), w = randn(R, 3);
  if (C > 0) {
    ASSERT_GT(max_abs(x), 0.0);
  }
  std::vector<double> xp_ref(R * C), out_ref(N * C, 0.0);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) xp_ref[r * C + c] = x[d.token_of[r] * C + c];
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < C; ++c)
        out_ref[n * C + c] += w[n * K + k] * y[d.row_of[n * K + k] * C + c];

  std::vector<float> xf = cast<float>(x), yf = cast<float>(y), wf = cast<float>(w);
  std::vector<float> xp(R * C, -1.f), out(N * C, -1.f);
  cpu::moe_permute_forward(xp.data(), xf.data(), d.token_of.data(), R, C);
  cpu::moe_combine_forward(out.data(), yf.data(), wf.data(), d.row_of.data(), N, K, C);
  expect_near_all(xp, xp_ref, 1e-7, "xp");
  expect_near_all(out, out_ref, kTolFloat, "out");
}

// permute and combine are linear (combine bilinear), so their backward passes are exactly
// the adjoints: <dxp, P x> = <P^T dxp, x>, <dout, Comb(yp, w)> = <dyp, yp> = <dw, w>.
TEST_P(DispatchShapes, BackwardIsTheAdjoint) {
  const auto [N, E, K, C] = GetParam();
  const DispatchCase d = make_dispatch(N, E, K, C, 700 + N);
  const int64_t R = N * K;
  const std::vector<double> x = randn(N * C, 4), dxp = randn(R * C, 5), y = randn(R * C, 6),
                            w = randn(R, 7), dout = randn(N * C, 8);
  std::vector<double> xp(R * C), dx(N * C, 42.0), out(N * C), dyp(R * C, 42.0), dw(R, 42.0);
  cpu::moe_permute_forward(xp.data(), x.data(), d.token_of.data(), R, C);
  cpu::moe_permute_backward(dx.data(), dxp.data(), d.row_of.data(), N, K, C);
  const double tol = 1e-12 * static_cast<double>(R * C);
  EXPECT_NEAR(dot(dxp, xp), dot(dx, x), tol);
  cpu::moe_combine_forward(out.data(), y.data(), w.data(), d.row_of.data(), N, K, C);
  cpu::moe_combine_backward(dyp.data(), dw.data(), dout.data(), y.data(), w.data(),
                            d.row_of.data(), N, K, C);
  EXPECT_NEAR(dot(dout, out), dot(dyp, y), tol);
  EXPECT_NEAR(dot(dout, out), dot(dw, w), tol);
  // Float kernels give the same gradients.
  std::vector<float> dxpf = cast<float>(dxp), yf = cast<float>(y), wf = cast<float>(w),
                     doutf = cast<float>(dout), dxf(N * C), dypf(R * C), dwf(R);
  cpu::moe_permute_backward(dxf.data(), dxpf.data(), d.row_of.data(), N, K, C);
  cpu::moe_combine_backward(dypf.data(), dwf.data(), doutf.data(), yf.data(), wf.data(),
                            d.row_of.data(), N, K, C);
  expect_near_all(dxf, dx, 1e-5, "dx");
  expect_near_all(dypf, dyp, 1e-5, "dyp");
  expect_near_all(dwf, dw, 1e-5 * static_cast<double>(C), "dweights");
}

INSTANTIATE_TEST_SUITE_P(Moe, DispatchShapes,
                         testing::Values(std::array<int64_t, 4>{71, 9, 3, 229},
                                         std::array<int64_t, 4>{64, 16, 2, 32},
                                         std::array<int64_t, 4>{5, 3, 1, 1},
                                         std::array<int64_t, 4>{33, 7, 2, 0}));

// ---------------------------------------------------------------------------------------
// Auxiliary-loss-free balancing.

TEST(MoeBalance, BiasUpdateMovesAgainstLoad) {
  std::vector<float> bias = {0.1f, 0.f, -0.2f, 0.f, 0.f};
  const std::vector<int64_t> load = {20, 2, 4, 4, 5};  // mean 7
  cpu::router_bias_update(bias.data(), load.data(), 5, 0.25);
  EXPECT_EQ(bias, (std::vector<float>{0.1f - 0.25f, 0.25f, -0.2f + 0.25f, 0.25f, 0.25f}));
  const std::vector<int64_t> equal = {3, 3, 3, 3, 3};
  std::vector<float> same = bias;
  cpu::router_bias_update(same.data(), equal.data(), 5, 0.25);
  EXPECT_EQ(same, bias);  // sign(0) = 0
  const std::vector<int64_t> zero(5, 0);
  cpu::router_bias_update(same.data(), zero.data(), 5, 0.25);
  EXPECT_EQ(same, bias);
  // Mean 7/3 is not an integer: loads 2 go up, 3 goes down.
  std::vector<float> b3(3, 0.f);
  const std::vector<int64_t> l3 = {2, 2, 3};
  cpu::router_bias_update(b3.data(), l3.data(), 3, 1.0);
  EXPECT_EQ(b3, (std::vector<float>{1.f, 1.f, -1.f}));
}

TEST(MoeBalance, Imbalance) {
  EXPECT_DOUBLE_EQ(cpu::expert_load_imbalance(std::vector<int64_t>{20, 2, 4, 4, 5}.data(), 5),
                   20.0 / 7.0);
  EXPECT_DOUBLE_EQ(cpu::expert_load_imbalance(std::vector<int64_t>{3, 3, 3}.data(), 3), 1.0);
  EXPECT_DOUBLE_EQ(cpu::expert_load_imbalance(std::vector<int64_t>{0, 0, 0}.data(), 3), 0.0);
}

TEST(MoeBalance, BiasUpdatesBalanceASkewedBatch) {
  const int64_t N = 512, E = 8, K = 2;
  std::mt19937_64 rng(800);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<float> logits(N * E);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t e = 0; e < E; ++e)
      logits[n * E + e] = static_cast<float>(normal(rng) + (e == 0 ? 3.0 : 0.0));
  std::vector<float> bias(E, 0.f), scores(N * E), w(N * K);
  std::vector<int32_t> ids(N * K);
  std::vector<int64_t> load(E);
  auto measure = [&] {
    router_forward(scores.data(), ids.data(), w.data(), logits.data(), bias.data(), N, E, K,
                   ScoreFn::kSigmoid, 1.0, int64_t{1}, int64_t{1});
    std::fill(load.begin(), load.end(), 0);
    for (int32_t id : ids) ++load[id];
    return cpu::expert_load_imbalance(load.data(), E);
  };
  const double before = measure();
  EXPECT_GT(before, 3.0);
  for (int it = 0; it < 200; ++it) {
    measure();
    cpu::router_bias_update(bias.data(), load.data(), E, 0.005);
  }
  const double after = measure();
  EXPECT_LT(after, 1.5) << "before " << before;
  EXPECT_LT(bias[0], 0.f);
}

// ---------------------------------------------------------------------------------------
// Determinism: bit-identical results for 1 and 2 threads.

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

TEST(MoeDeterminism, OneAndTwoThreadsAgree) {
  const int64_t B = 3, T = 97, N = B * T, E = 16, K = 3, G = 4, KG = 2, C = 40;
  std::mt19937_64 rng(900);
  std::normal_distribution<float> normal(0.f, 1.f);
  auto rand_vec = [&](size_t n) {
    std::vector<float> v(n);
    for (float& x : v) x = normal(rng);
    return v;
  };
  const std::vector<float> logits = rand_vec(N * E), bias = rand_vec(E), dw = rand_vec(N * K),
                           x = rand_vec(N * C), y = rand_vec(N * K * C), dout = rand_vec(N * C);
  struct Out {
    std::vector<float> s, w, dl, ds, xp, dx, out, dyp, dwc;
    float aux;
    std::vector<int32_t> ids;
  };
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    Out o{std::vector<float>(N * E), std::vector<float>(N * K), std::vector<float>(N * E),
          std::vector<float>(N * E), std::vector<float>(N * K * C), std::vector<float>(N * C),
          std::vector<float>(N * C), std::vector<float>(N * K * C), std::vector<float>(N * K),
          0.f, std::vector<int32_t>(N * K)};
    for (ScoreFn score : {ScoreFn::kSigmoid, ScoreFn::kSoftmax}) {
      router_forward(o.s.data(), o.ids.data(), o.w.data(), logits.data(), bias.data(), N, E, K,
                     score, 1.5, G, KG);
      o.aux += aux_loss_forward(o.s.data(), o.ids.data(), B, T, E, K, 0.01);
      aux_loss_backward(o.ds.data(), o.s.data(), o.ids.data(), B, T, E, K, 0.01, 1.f);
      router_backward(o.dl.data(), dw.data(), o.ds.data(), o.s.data(), o.ids.data(), N, E, K,
                      score, 1.5);
    }
    std::vector<int64_t> counts(E), offsets(E + 1);
    std::vector<int32_t> row_of(N * K), token_of(N * K);
    cpu::moe_plan(counts.data(), offsets.data(), row_of.data(), token_of.data(), o.ids.data(), N,
                  E, K);
    cpu::moe_permute_forward(o.xp.data(), x.data(), token_of.data(), N * K, C);
    cpu::moe_permute_backward(o.dx.data(), o.xp.data(), row_of.data(), N, K, C);
    cpu::moe_combine_forward(o.out.data(), y.data(), o.w.data(), row_of.data(), N, K, C);
    cpu::moe_combine_backward(o.dyp.data(), o.dwc.data(), dout.data(), y.data(), o.w.data(),
                              row_of.data(), N, K, C);
    return o;
  };
  const int saved = omp_get_max_threads();
  const Out a = run(1), b = run(2);
  omp_set_num_threads(saved);
  EXPECT_EQ(a.ids, b.ids);
  EXPECT_TRUE(same_bits(a.s, b.s));
  EXPECT_TRUE(same_bits(a.w, b.w));
  EXPECT_TRUE(same_bits(a.dl, b.dl));
  EXPECT_TRUE(same_bits(a.ds, b.ds));
  EXPECT_EQ(std::memcmp(&a.aux, &b.aux, sizeof(float)), 0);
  EXPECT_TRUE(same_bits(a.xp, b.xp));
  EXPECT_TRUE(same_bits(a.dx, b.dx));
  EXPECT_TRUE(same_bits(a.out, b.out));
  EXPECT_TRUE(same_bits(a.dyp, b.dyp));
  EXPECT_TRUE(same_bits(a.dwc, b.dwc));
}

}  // namespace
// NaN scores (non-finite activations) rank below every number, ties to the lower id: every
// token still gets K distinct valid experts, the finite ones first, with and without groups.
TEST(RouterSelect, NaNScoresRankLast) {
  const float nan = std::nanf("");
  const float scores[8] = {0.1f, nan, 0.7f, nan, 0.3f, -INFINITY, nan, 0.2f};
  const float bias[8] = {};
  int32_t ids[6], kept[4];
  moe::router_select(ids, kept, scores, bias, 8, 6, 1, 1);
  const int32_t want[6] = {2, 4, 7, 0, 1, 3};  // the numbers by score (-inf ties NaN: by id)
  for (int k = 0; k < 6; ++k) EXPECT_EQ(ids[k], want[k]) << k;
  const float all_nan[8] = {nan, nan, nan, nan, nan, nan, nan, nan};
  moe::router_select(ids, kept, all_nan, bias, 8, 4, 4, 2);
  for (int k = 0; k < 4; ++k) EXPECT_EQ(ids[k], k) << k;  // groups 0 and 1, lower ids first
}

}  // namespace moe
