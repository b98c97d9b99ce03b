// Pipeline stage boundaries (model/model_stages.h): explicit, or the exact min-max split by
// a dynamic program over suffixes (L is at most a few hundred, S <= L: O(S L^2) is nothing).
#include "model/model_stages.h"

#include <algorithm>
#include <limits>

#include "model/check.h"

namespace moe {

namespace {

constexpr int64_t kInfeasible = std::numeric_limits<int64_t>::max();

// Stage costs over layer prefixes: the cost of layers [j, i), plus the head when i = L.
class StageCost {
 public:
  explicit StageCost(const ModelDims& d) : L_(d.L), head_(model_head_flops(d)), prefix_(1, 0) {
    prefix_.reserve(static_cast<size_t>(d.L) + 1);
    for (int64_t l = 0; l < d.L; ++l) prefix_.push_back(prefix_.back() + model_layer_flops(d, l));
  }
  int64_t operator()(int64_t j, int64_t i) const {
    return prefix_[static_cast<size_t>(i)] - prefix_[static_cast<size_t>(j)] + (i == L_ ? head_ : 0);
  }

 private:
  int64_t L_, head_;
  std::vector<int64_t> prefix_;  // (L + 1) summed layer costs
};

std::vector<int64_t> bounds_explicit(const ModelDims& d, int S, const std::vector<int64_t>& stage_layers) {
  CHECK(static_cast<int64_t>(stage_layers.size()) == S, "%zu stage_layers for %d stages",
        stage_layers.size(), S);
  std::vector<int64_t> bounds(1, 0);
  for (int64_t n : stage_layers) {
    CHECK(n >= 1, "a stage of %lld layers", static_cast<long long>(n));
    bounds.push_back(bounds.back() + n);
  }
  CHECK(bounds.back() == d.L, "stage_layers sum to %lld, the model has %lld layers",
        static_cast<long long>(bounds.back()), static_cast<long long>(d.L));
  return bounds;
}

// best[k][j]: the smallest largest stage cost of layers [j, L) cut into k stages, each of at
// least one layer (kInfeasible when fewer than k layers remain).
std::vector<std::vector<int64_t>> suffix_optima(const StageCost& cost, int64_t L, int S) {
  std::vector<std::vector<int64_t>> best(static_cast<size_t>(S) + 1,
                                         std::vector<int64_t>(static_cast<size_t>(L) + 1, kInfeasible));
  for (int64_t j = 0; j < L; ++j) best[1][static_cast<size_t>(j)] = cost(j, L);
  for (int k = 2; k <= S; ++k)
    for (int64_t j = 0; j + k <= L; ++j) {
      int64_t b = kInfeasible;
      for (int64_t i = j + 1; i + (k - 1) <= L; ++i)
        b = std::min(b, std::max(cost(j, i), best[static_cast<size_t>(k) - 1][static_cast<size_t>(i)]));
      best[static_cast<size_t>(k)][static_cast<size_t>(j)] = b;
    }
  return best;
}

std::vector<int64_t> bounds_balanced(const ModelDims& d, int S) {
  const StageCost cost(d);
  const auto best = suffix_optima(cost, d.L, S);
  const int64_t opt = best[static_cast<size_t>(S)][0];
  // Each boundary as early as the optimum allows: the stage fits under opt and the rest can
  // still be cut into the remaining stages under opt.
  std::vector<int64_t> bounds(1, 0);
  for (int s = 0; s + 1 < S; ++s) {
    const int rest = S - 1 - s;
    int64_t i = bounds.back() + 1;
    while (cost(bounds.back(), i) > opt || best[static_cast<size_t>(rest)][static_cast<size_t>(i)] > opt) {
      ++i;
      CHECK(i + rest <= d.L);  // the optimum is reachable, so some i fits
    }
    bounds.push_back(i);
  }
  bounds.push_back(d.L);
  return bounds;
}

}  // namespace

int64_t model_layer_flops(const ModelDims& d, int64_t l) {
  const int64_t attn = d.attn_matmul_params();
  const int64_t ffn = d.is_moe(l) ? d.E * d.C + 3 * d.K * d.FE * d.C + 3 * d.S * d.C : 3 * d.F * d.C;
  return 6 * (attn + ffn) + 6 * d.T * d.NH * (d.qk_hd() + d.v_dim());
}

int64_t model_head_flops(const ModelDims& d) { return 6 * d.V * d.C; }

std::vector<int64_t> model_stage_bounds(const ModelDims& d, int S, const std::vector<int64_t>& stage_layers) {
  CHECK(S >= 1 && S <= d.L, "%d pipeline stages for %lld layers", S, static_cast<long long>(d.L));
  if (!stage_layers.empty()) return bounds_explicit(d, S, stage_layers);
  return bounds_balanced(d, S);
}

std::vector<int64_t> model_stage_flops(const ModelDims& d, const std::vector<int64_t>& bounds) {
  CHECK(bounds.size() >= 2 && bounds.front() == 0 && bounds.back() == d.L);
  const StageCost cost(d);
  std::vector<int64_t> flops;
  for (size_t s = 0; s + 1 < bounds.size(); ++s) {
    CHECK(bounds[s] < bounds[s + 1]);
    flops.push_back(cost(bounds[s], bounds[s + 1]));
  }
  return flops;
}

}  // namespace moe
