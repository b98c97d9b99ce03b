// Whole-model tests: gradient checks of the assembled transformer (dense and MoE, both
// score functions, shared experts on and off, balance loss on) against central finite
// differences in double precision, and the accumulation contract across micro-batches; the
// split backward (BackwardPart::kInput / kWeight) against kFull, with slots, chunks and
// expert parallelism (two ranks as threads over a loopback exchange).
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <barrier>
#include <cmath>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#include "model/model.h"
#include "model/rng.h"
#include "tests/model_gradient_check.h"

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

using test::objective;
using test::routing_of;

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

// Split backward (the zero-bubble "B" / "W"): BackwardPart::kInput then kWeight, in any
// interleaving of slots and chunks, gives the gradients of kFull; kFull is unchanged by
// split_backward; grads_ready sees every stage once, in order.
namespace moe {
namespace {

constexpr uint64_t kSplitSeed = 41;

struct MicroBatch {
  std::vector<int32_t> x, y;
};

std::vector<MicroBatch> micro_batches(const ModelDims& d, int64_t N, int n, uint64_t seed) {
  std::vector<MicroBatch> mbs;
  for (int i = 0; i < n; ++i)
    mbs.push_back({random_tokens(N, d.V, seed + 2 * i), random_tokens(N, d.V, seed + 2 * i + 1)});
  return mbs;
}

// Shared experts, a dense first layer, the balance loss on (small_dims: L = 3).
ModelDims split_dims() { return small_dims(ScoreFn::kSigmoid, 4, 1); }

template <typename T>
double split_tolerance() {
  return std::is_same_v<T, float> ? 1e-6 : 1e-13;
}

template <typename T>
void build_for_split_test(Model<T>& m, const ModelDims& d, int64_t B, int n_slots, bool split) {
  model_build<T>(m, d, B, 1, 1, {}, n_slots, split);
  model_init<T>(m, kSplitSeed);
  model_zero_grads<T>(m);
}

// Reference: a model built without split, forward + kFull per micro-batch in turn. Returns
// each micro-batch's input gradient dL/d res[0].
template <typename T>
std::vector<std::vector<T>> full_reference(Model<T>& ref, const ModelDims& d, int64_t B,
                                           const std::vector<MicroBatch>& mbs) {
  build_for_split_test<T>(ref, d, B, 1, false);
  const int64_t N = B * d.T;
  std::vector<std::vector<T>> dx;
  for (const MicroBatch& mb : mbs) {
    model_chunk_forward<T>(ref, 0, 0, d.L, mb.x.data(), mb.y.data(), B, d.T, true);
    model_chunk_backward<T>(ref, 0, 0, d.L, T(1) / T(N), T(1) / T(B), BackwardPart::kFull);
    const T* g = model_chunk_grad<T>(ref, 0);
    dx.emplace_back(g, g + N * d.C);
  }
  return dx;
}

// Every parameter tensor within rel of its own largest reference gradient (an expert's or a
// norm's error cannot hide behind the head's larger values), and not all ~zero.
template <typename T>
void expect_grads_match(const Model<T>& got, const Model<T>& want, double rel) {
  ASSERT_EQ(got.n_alloc, want.n_alloc);
  double max_all = 0;
  for (const ParamInfo& p : want.table) {
    double max_diff = 0, max_abs = 0;
    for (size_t i = p.offset; i < p.offset + p.count; ++i) {
      max_diff = std::max(max_diff, std::fabs(double(got.grads[i]) - double(want.grads[i])));
      max_abs = std::max(max_abs, std::fabs(double(want.grads[i])));
    }
    EXPECT_LE(max_diff, rel * max_abs) << p.name;
    max_all = std::max(max_all, max_abs);
  }
  EXPECT_GT(max_all, 1e-3) << "gradients are all ~zero: the comparison would prove nothing";
  for (int64_t i = 0; i < got.d.n_moe_layers() * got.d.E; ++i)
    EXPECT_EQ(got.expert_load[i], want.expert_load[i]) << i;
}

template <typename T>
bool same_bits(const T* a, const T* b, int64_t n) {
  return std::memcmp(a, b, sizeof(T) * static_cast<size_t>(n)) == 0;
}

template <typename T>
class ModelSplitBackward : public ::testing::Test {};
using SplitTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(ModelSplitBackward, SplitTypes);

// Two micro-batches in flight: Bx(0), Bx(1), W(1), W(0) = kFull of each in turn. Fails if
// the slots shared their kept gradients (W(0) would read slot 1's) or if an expert's W read
// the wrong rows.
TYPED_TEST(ModelSplitBackward, TwoSlotsMatchFull) {
  using T = TypeParam;
  const ModelDims d = split_dims();
  const int64_t B = 2, N = B * d.T, L = d.L;
  const std::vector<MicroBatch> mbs = micro_batches(d, N, 2, 31);
  Model<T> ref, m;
  const std::vector<std::vector<T>> dx = full_reference<T>(ref, d, B, mbs);
  build_for_split_test<T>(m, d, B, 2, true);
  const T dce = T(1) / T(N), daux = T(1) / T(B);
  for (int s = 0; s < 2; ++s)
    model_chunk_forward<T>(m, s, 0, L, mbs[s].x.data(), mbs[s].y.data(), B, d.T, true);
  model_chunk_backward<T>(m, 0, 0, L, dce, daux, BackwardPart::kInput);
  model_chunk_backward<T>(m, 1, 0, L, dce, daux, BackwardPart::kInput);
  for (size_t i = 0; i < m.n_alloc; ++i)
    ASSERT_EQ(m.grads[i], T(0)) << "kInput wrote a weight gradient";
  for (int s = 0; s < 2; ++s)
    EXPECT_TRUE(same_bits(model_chunk_grad<T>(m, s), dx[s].data(), N * d.C)) << "slot " << s;
  model_chunk_backward<T>(m, 1, 0, L, dce, daux, BackwardPart::kWeight);
  model_chunk_backward<T>(m, 0, 0, L, dce, daux, BackwardPart::kWeight);
  expect_grads_match<T>(m, ref, split_tolerance<T>());
}

// Chunks [0, 2) and [2, L) of two slots, the input gradient handed from chunk to chunk in
// model_chunk_grad, the weight passes late and out of order.
TYPED_TEST(ModelSplitBackward, ChunksInterleavedMatchFull) {
  using T = TypeParam;
  const ModelDims d = split_dims();
  const int64_t B = 2, N = B * d.T, L = d.L, l = 2;
  const std::vector<MicroBatch> mbs = micro_batches(d, N, 2, 33);
  Model<T> ref, m;
  const std::vector<std::vector<T>> dx = full_reference<T>(ref, d, B, mbs);
  build_for_split_test<T>(m, d, B, 2, true);
  const T dce = T(1) / T(N), daux = T(1) / T(B);
  const int32_t* const x[2] = {mbs[0].x.data(), mbs[1].x.data()};
  const int32_t* const y[2] = {mbs[0].y.data(), mbs[1].y.data()};
  test::run_interleaved_split_backward<T>(m, l, L, x, y, B, d.T, dce, daux);
  for (int s = 0; s < 2; ++s)
    EXPECT_TRUE(same_bits(model_chunk_grad<T>(m, s), dx[s].data(), N * d.C)) << "slot " << s;
  expect_grads_match<T>(m, ref, split_tolerance<T>());
}

// kFull does not care how the model was built: the same bits either way.
TYPED_TEST(ModelSplitBackward, FullOnSplitModelIsBitIdentical) {
  using T = TypeParam;
  const ModelDims d = split_dims();
  const int64_t B = 2, N = B * d.T;
  Model<T> plain, split;
  build_for_split_test<T>(plain, d, B, 1, false);
  build_for_split_test<T>(split, d, B, 1, true);
  for (const MicroBatch& mb : micro_batches(d, N, 2, 35)) {
    for (Model<T>* m : {&plain, &split}) {
      model_forward<T>(*m, mb.x.data(), mb.y.data(), B, d.T, true);
      model_backward<T>(*m, T(1) / T(N), T(0.5));
    }
    EXPECT_TRUE(same_bits(model_chunk_grad<T>(plain, 0), model_chunk_grad<T>(split, 0), N * d.C));
  }
  EXPECT_TRUE(same_bits(plain.grads, split.grads, static_cast<int64_t>(plain.n_alloc)));
}

std::vector<int64_t> stages_of(Model<float>& m, int64_t l0, int64_t l1, BackwardPart part) {
  std::vector<int64_t> stages;
  m.grads_ready = [&stages](int64_t s) { stages.push_back(s); };
  model_chunk_backward<float>(m, 0, l0, l1, 1.0f, 1.0f, part);
  m.grads_ready = nullptr;
  return stages;
}

// kFull: 0, then per layer a mid-layer call and its own stage, then L + 1 (unchanged).
// kInput: none. kWeight: each stage once, in the order its weights complete.
TEST(ModelSplitBackwardStages, GradsReadyOrder) {
  const ModelDims d = split_dims();
  const int64_t B = 1, L = d.L;
  const std::vector<MicroBatch> mbs = micro_batches(d, B * d.T, 1, 37);
  Model<float> plain, split;
  build_for_split_test<float>(plain, d, B, 1, false);
  build_for_split_test<float>(split, d, B, 1, true);
  model_forward<float>(plain, mbs[0].x.data(), mbs[0].y.data(), B, d.T, false);
  const std::vector<int64_t> full = stages_of(plain, 0, L, BackwardPart::kFull);
  EXPECT_EQ(full, (std::vector<int64_t>{0, 0, 1, 1, 2, 2, 3, 4}));

  model_forward<float>(split, mbs[0].x.data(), mbs[0].y.data(), B, d.T, false);
  EXPECT_TRUE(stages_of(split, 0, L, BackwardPart::kInput).empty());
  const std::vector<int64_t> weight = stages_of(split, 0, L, BackwardPart::kWeight);
  std::vector<int64_t> every(static_cast<size_t>(L + 2));
  for (size_t i = 0; i < every.size(); ++i) every[i] = static_cast<int64_t>(i);
  EXPECT_EQ(weight, every);  // non-decreasing, 0 first, L + 1 last, each stage once
  std::vector<int64_t> full_once = full;
  full_once.erase(std::unique(full_once.begin(), full_once.end()), full_once.end());
  EXPECT_EQ(weight, full_once);

  // Per chunk: the upper chunk's weight pass completes stages 0..L-2, the lower one the rest.
  model_forward<float>(split, mbs[0].x.data(), mbs[0].y.data(), B, d.T, false);
  EXPECT_TRUE(stages_of(split, 2, L, BackwardPart::kInput).empty());
  EXPECT_TRUE(stages_of(split, 0, 2, BackwardPart::kInput).empty());
  EXPECT_EQ(stages_of(split, 2, L, BackwardPart::kWeight), (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(stages_of(split, 0, 2, BackwardPart::kWeight), (std::vector<int64_t>{2, 3, 4}));
}

// Misuse is refused: a split pass on a model built without split_backward, a weight pass
// without its input pass, anything over a pending weight pass.
TEST(ModelSplitBackwardStages, MisuseIsRefused) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const ModelDims d = split_dims();
  const int64_t B = 1, L = d.L;
  const std::vector<MicroBatch> mbs = micro_batches(d, B * d.T, 1, 39);
  Model<float> plain, split;
  build_for_split_test<float>(plain, d, B, 1, false);
  build_for_split_test<float>(split, d, B, 1, true);
  model_forward<float>(plain, mbs[0].x.data(), mbs[0].y.data(), B, d.T, false);
  EXPECT_DEATH(model_chunk_backward<float>(plain, 0, 0, L, 1.0f, 1.0f, BackwardPart::kInput),
               "split_backward");
  model_forward<float>(split, mbs[0].x.data(), mbs[0].y.data(), B, d.T, false);
  EXPECT_DEATH(model_chunk_backward<float>(split, 0, 0, L, 1.0f, 1.0f, BackwardPart::kWeight),
               "kWeight without its kInput");
  model_chunk_backward<float>(split, 0, 1, L, 1.0f, 1.0f, BackwardPart::kInput);
  EXPECT_DEATH(model_chunk_backward<float>(split, 0, 1, L, 1.0f, 1.0f, BackwardPart::kFull),
               "still pending");
  EXPECT_DEATH(model_forward<float>(split, mbs[0].x.data(), mbs[0].y.data(), B, d.T, false),
               "pending");
}

// Two expert-parallel ranks as threads of this process: rows move by copying between the
// ranks' buffers, grouped per expert in sender order. Every call is collective, as over MPI.
struct LoopbackGroup {
  static constexpr int kRanks = 2;
  int64_t E, EL;
  std::barrier<> sync{kRanks};
  std::vector<std::array<std::vector<int64_t>, kRanks>> counts;  // per key: each rank's (E)
  std::array<const float*, kRanks> from{};
  LoopbackGroup(int64_t E_, int64_t n_keys) : E(E_), EL(E_ / kRanks), counts(n_keys) {}
  // First row of sender s's rows of expert e: among the rows grouped on e's owner, and in s's xp.
  int64_t grouped_row(int64_t key, int64_t e, int s) const {
    int64_t r = 0;
    for (int64_t j = e / EL * EL; j < e; ++j)
      for (int q = 0; q < kRanks; ++q) r += counts[key][q][j];
    for (int q = 0; q < s; ++q) r += counts[key][q][e];
    return r;
  }
  int64_t sender_row(int64_t key, int64_t e, int s) const {
    int64_t r = 0;
    for (int64_t j = 0; j < e; ++j) r += counts[key][s][j];
    return r;
  }
};

// Every start does the whole (synchronous) exchange; finishes have nothing left to do. Both
// ranks make the same calls in the same order, as over MPI.
class LoopbackExchange : public ExpertExchange {
 public:
  LoopbackExchange(LoopbackGroup& g, int rank) : g_(g), rank_(rank) {}
  void plan_start(int, int64_t key, const int64_t* counts, const int32_t*, int64_t,
                  int64_t) override {
    g_.counts[key][rank_].assign(counts, counts + g_.E);
    g_.sync.arrive_and_wait();
    const int64_t e0 = rank_ * g_.EL;
    offsets_.resize(static_cast<size_t>(g_.EL + 1));
    for (int64_t j = 0; j < g_.EL; ++j) offsets_[j] = g_.grouped_row(key, e0 + j, 0);
    offsets_[g_.EL] = g_.grouped_row(key, e0 + g_.EL - 1, LoopbackGroup::kRanks);
    blocks_.resize(static_cast<size_t>(g_.EL * LoopbackGroup::kRanks + 1));
    for (int64_t j = 0; j < g_.EL; ++j)
      for (int q = 0; q < LoopbackGroup::kRanks; ++q)
        blocks_[static_cast<size_t>(j * LoopbackGroup::kRanks + q)] = g_.grouped_row(key, e0 + j, q);
    blocks_.back() = offsets_[g_.EL];
    g_.sync.arrive_and_wait();
  }
  int64_t plan_finish(int, int64_t* local_offsets, int64_t* block_offsets) override {
    std::copy(offsets_.begin(), offsets_.end(), local_offsets);
    std::copy(blocks_.begin(), blocks_.end(), block_offsets);
    return offsets_.back();
  }
  void dispatch_start(int, int64_t key, float* xg, const float* xp, int64_t C) override {
    g_.from[rank_] = xp;
    g_.sync.arrive_and_wait();
    for (int64_t e = rank_ * g_.EL; e < (rank_ + 1) * g_.EL; ++e)
      for (int s = 0; s < LoopbackGroup::kRanks; ++s)
        std::copy_n(g_.from[s] + g_.sender_row(key, e, s) * C, g_.counts[key][s][e] * C,
                    xg + g_.grouped_row(key, e, s) * C);
    g_.sync.arrive_and_wait();
  }
  void combine_start(int, int64_t key, float* yp, const float* yg, int64_t C) override {
    g_.from[rank_] = yg;
    g_.sync.arrive_and_wait();
    for (int64_t e = 0; e < g_.E; ++e)
      std::copy_n(g_.from[e / g_.EL] + g_.grouped_row(key, e, rank_) * C,
                  g_.counts[key][rank_][e] * C, yp + g_.sender_row(key, e, rank_) * C);
    g_.sync.arrive_and_wait();
  }
  void finish(int) override {}

 private:
  LoopbackGroup& g_;
  int rank_;
  std::vector<int64_t> offsets_, blocks_;
};

// Rank r of an ep = 2 model against one process: replicated gradients are those of rank r's
// micro-batches (whole[r]); a local expert's are the sum over both ranks' micro-batches.
void expect_ep_grads_match(const Model<float>& m, const std::array<Model<float>, 2>& whole,
                           double rel) {
  double max_all = 0;
  for (const ParamInfo& p : m.table) {
    const ParamInfo& q = *std::find_if(whole[0].table.begin(), whole[0].table.end(),
                                       [&](const ParamInfo& w) { return w.name == p.name; });
    // The local experts are a contiguous block of the whole tensor, from expert0 on.
    const size_t per_expert = q.count / static_cast<size_t>(m.d.E);
    const size_t base =
        q.offset + (p.routed_experts ? static_cast<size_t>(m.d.expert0()) * per_expert : 0);
    double max_diff = 0, max_abs = 0;
    for (size_t i = 0; i < p.count; ++i) {
      const double want =
          p.routed_experts ? double(whole[0].grads[base + i]) + double(whole[1].grads[base + i])
                           : double(whole[static_cast<size_t>(m.d.ep_rank)].grads[base + i]);
      max_diff = std::max(max_diff, std::fabs(double(m.grads[p.offset + i]) - want));
      max_abs = std::max(max_abs, std::fabs(want));
    }
    EXPECT_LE(max_diff, rel * max_abs) << "rank " << m.d.ep_rank << " " << p.name;
    max_all = std::max(max_all, max_abs);
  }
  EXPECT_GT(max_all, 1e-3);
}

// With ep = 2 the weight pass reads the rows the experts received (xg, and the output
// gradients after the exchange). Two ranks (threads) run Bx(0), Bx(1), W(1), W(0); their
// gradients are those of one process running kFull over the same micro-batches.
TEST(ModelSplitBackwardEp, TwoRanksMatchOneProcess) {
  const ModelDims d1 = split_dims();
  ModelDims d = d1;
  d.ep = LoopbackGroup::kRanks;
  const int64_t B = 2, N = B * d.T, L = d.L;
  const float dce = 1.0f / static_cast<float>(N), daux = 1.0f / static_cast<float>(B);
  std::array<std::vector<MicroBatch>, 2> mbs = {micro_batches(d, N, 2, 51),
                                                micro_batches(d, N, 2, 61)};
  std::array<Model<float>, 2> whole, ranks;
  for (size_t r = 0; r < 2; ++r) full_reference<float>(whole[r], d1, B, mbs[r]);
  LoopbackGroup g(d.E, 2 * d.n_moe_layers());
  auto rank_main = [&](int r) {
    omp_set_num_threads(1);
    ModelDims dr = d;
    dr.ep_rank = r;
    LoopbackExchange ex(g, r);
    Model<float>& m = ranks[static_cast<size_t>(r)];
    build_for_split_test<float>(m, dr, B, 2, true);
    m.exchange = &ex;
    const std::vector<MicroBatch>& mb = mbs[static_cast<size_t>(r)];
    for (int s = 0; s < 2; ++s)
      model_chunk_forward<float>(m, s, 0, L, mb[s].x.data(), mb[s].y.data(), B, d.T, true);
    model_chunk_backward<float>(m, 0, 0, L, dce, daux, BackwardPart::kInput);
    model_chunk_backward<float>(m, 1, 0, L, dce, daux, BackwardPart::kInput);
    model_chunk_backward<float>(m, 1, 0, L, dce, daux, BackwardPart::kWeight);
    model_chunk_backward<float>(m, 0, 0, L, dce, daux, BackwardPart::kWeight);
    m.exchange = nullptr;
  };
  std::thread other(rank_main, 1);
  rank_main(0);
  other.join();
  int64_t cross_rows = 0;
  for (int s = 0; s < LoopbackGroup::kRanks; ++s)
    for (int64_t e = 0; e < d.E; ++e)
      if (e / g.EL != s) cross_rows += g.counts[0][s][static_cast<size_t>(e)];
  EXPECT_GT(cross_rows, 0) << "no row crossed ranks: the exchange was not exercised";
  for (const Model<float>& m : ranks) expect_ep_grads_match(m, whole, 1e-5);
}

// DualPipe's overlapped pair at the model level: the forward of one micro-batch and the full
// backward of another advance in turns (model_chunk_step, each turn up to the start of an
// expert exchange, on lanes 0 and 1), on two EP ranks. Losses, gradients, routing counts and
// input gradients equal, bit for bit, running the same chunks one after the other.
TEST(ModelChunkSteps, InterleavedPairEqualsSequentialBitForBit) {
  ModelDims d = split_dims();
  d.ep = LoopbackGroup::kRanks;
  const int64_t B = 2, N = B * d.T, L = d.L;
  const double dce = 1.0 / static_cast<double>(N), daux = 1.0 / static_cast<double>(B);
  std::array<std::vector<MicroBatch>, 2> mbs = {micro_batches(d, N, 2, 71),
                                                micro_batches(d, N, 2, 81)};
  std::array<std::array<Model<float>, 2>, 2> models;  // [rank][sequential, interleaved]
  std::array<std::array<double, 2>, 2> loss{};
  std::array<std::array<std::vector<float>, 2>, 2> dx;
  std::array<int, 2> turns{};
  LoopbackGroup g(d.E, 2 * d.n_moe_layers());
  auto rank_main = [&](int r) {
    omp_set_num_threads(1);
    ModelDims dr = d;
    dr.ep_rank = r;
    LoopbackExchange ex(g, r);
    const std::vector<MicroBatch>& mb = mbs[static_cast<size_t>(r)];
    for (int way = 0; way < 2; ++way) {
      Model<float>& m = models[static_cast<size_t>(r)][static_cast<size_t>(way)];
      build_for_split_test<float>(m, dr, B, 2, false);
      m.exchange = &ex;
      model_chunk_forward<float>(m, 0, 0, L, mb[0].x.data(), mb[0].y.data(), B, d.T, true);
      ChunkRun f = chunk_run_forward(1, 0, L, mb[1].x.data(), mb[1].y.data(), B, d.T, true, 0);
      ChunkRun b = chunk_run_backward(0, 0, L, dce, daux, BackwardPart::kFull, 1);
      if (way == 0) {
        while (model_chunk_step(m, f)) {
        }
        while (model_chunk_step(m, b)) {
        }
      } else {
        bool f_more = true, b_more = true;
        while (f_more || b_more) {
          if (f_more) f_more = model_chunk_step(m, f);
          if (b_more) b_more = model_chunk_step(m, b);
          ++turns[static_cast<size_t>(r)];
        }
      }
      loss[static_cast<size_t>(r)][static_cast<size_t>(way)] = f.loss.ce_mean + f.loss.aux_sum;
      const float* g0 = model_chunk_grad<float>(m, 0);
      dx[static_cast<size_t>(r)][static_cast<size_t>(way)].assign(g0, g0 + N * d.C);
      model_chunk_backward<float>(m, 1, 0, L, static_cast<float>(dce), static_cast<float>(daux));
      m.exchange = nullptr;
    }
  };
  std::thread other(rank_main, 1);
  rank_main(0);
  other.join();
  for (size_t r = 0; r < 2; ++r) {
    SCOPED_TRACE(r);
    const Model<float>& seq = models[r][0];
    const Model<float>& mix = models[r][1];
    // Each MoE layer's forward stops 3 times and its backward twice: the pair took turns.
    EXPECT_EQ(turns[r], 3 * d.n_moe_layers() + 1);
    EXPECT_EQ(loss[r][0], loss[r][1]);
    EXPECT_GT(loss[r][0], 0.0);
    EXPECT_TRUE(same_bits(seq.grads, mix.grads, static_cast<int64_t>(seq.n_alloc)));
    EXPECT_TRUE(dx[r][0] == dx[r][1]);
    for (int64_t i = 0; i < d.n_moe_layers() * d.E; ++i)
      EXPECT_EQ(seq.expert_load[i], mix.expert_load[i]) << i;
  }
  // And what both computed is the model's gradient: against one process per rank's batches.
  std::array<Model<float>, 2> whole;
  for (size_t r = 0; r < 2; ++r) full_reference<float>(whole[r], split_dims(), B, mbs[r]);
  for (size_t r = 0; r < 2; ++r) expect_ep_grads_match(models[r][1], whole, 1e-5);
}

}  // namespace
}  // namespace moe
