// Plain-loop double references for the MoE routing and dispatch kernels (moe_ops.h), written
// independently of the kernels' algorithms (full sorts instead of repeated selection) so a
// shared mistake is unlikely. Header-only; tests only.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "model/types.h"

namespace moe::ref {

// Routes one token. s (E), ids (K), w (K) are outputs. Returns the selection margin: the
// smallest gap between neighbours in the ranking that decides the result (among the first
// KG + 1 groups and the first K + 1 candidate experts); +inf when nothing can tie.
inline double router_token(double* s, int32_t* ids, double* w, const double* logits,
                           const float* bias, int64_t E, int64_t K, ScoreFn score, double scale,
                           int64_t G, int64_t KG) {
  if (score == ScoreFn::kSigmoid) {
    for (int64_t e = 0; e < E; ++e) s[e] = 1.0 / (1.0 + std::exp(-logits[e]));
  } else {
    const double mx = *std::max_element(logits, logits + E);
    double sum = 0.0;
    for (int64_t e = 0; e < E; ++e) sum += std::exp(logits[e] - mx);
    for (int64_t e = 0; e < E; ++e) s[e] = std::exp(logits[e] - mx) / sum;
  }
  std::vector<double> b(E);
  for (int64_t e = 0; e < E; ++e) b[e] = s[e] + static_cast<double>(bias[e]);
  double margin = INFINITY;
  const int64_t Eg = E / G;
  std::vector<int64_t> cand;
  if (G == 1) {
    cand.resize(E);
    std::iota(cand.begin(), cand.end(), 0);
  } else {
    std::vector<double> gs(G);
    for (int64_t g = 0; g < G; ++g) {
      std::vector<double> v(b.begin() + g * Eg, b.begin() + (g + 1) * Eg);
      std::sort(v.begin(), v.end(), std::greater<double>());
      gs[g] = v[0] + (Eg > 1 ? v[1] : 0.0);
    }
    std::vector<int64_t> order(G);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t x, int64_t y) { return gs[x] > gs[y]; });
    for (int64_t j = 0; j < KG && j + 1 < G; ++j)
      margin = std::min(margin, gs[order[j]] - gs[order[j + 1]]);
    for (int64_t j = 0; j < KG; ++j)
      for (int64_t e = order[j] * Eg; e < (order[j] + 1) * Eg; ++e) cand.push_back(e);
  }
  std::stable_sort(cand.begin(), cand.end());
  std::stable_sort(cand.begin(), cand.end(), [&](int64_t x, int64_t y) { return b[x] > b[y]; });
  for (int64_t j = 0; j < K && j + 1 < static_cast<int64_t>(cand.size()); ++j)
    margin = std::min(margin, b[cand[j]] - b[cand[j + 1]]);
  double sum = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    ids[k] = static_cast<int32_t>(cand[k]);
    sum += s[cand[k]];
  }
  for (int64_t k = 0; k < K; ++k)
    w[k] = score == ScoreFn::kSigmoid ? s[ids[k]] / sum * scale : s[ids[k]] * scale;
  return margin;
}

// DeepSeek-V3 eq. 17-20, literally: f_e and P_e per sequence.
inline double aux_loss(const double* scores, const int32_t* ids, int64_t B, int64_t T,
                       int64_t E, int64_t K, double alpha) {
  double total = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> f(E, 0.0), P(E, 0.0);
    for (int64_t t = 0; t < T; ++t) {
      const double* s = scores + (b * T + t) * E;
      double sum = 0.0;
      for (int64_t e = 0; e < E; ++e) sum += s[e];
      for (int64_t e = 0; e < E; ++e) P[e] += s[e] / sum / static_cast<double>(T);
      for (int64_t e = 0; e < E; ++e) {
        bool chosen = false;
        for (int64_t k = 0; k < K; ++k) chosen = chosen || ids[(b * T + t) * K + k] == e;
        if (chosen) f[e] += static_cast<double>(E) / static_cast<double>(K * T);
      }
    }
    for (int64_t e = 0; e < E; ++e) total += alpha * f[e] * P[e];
  }
  return total;
}

// Dispatch plan by sorting (expert, token, slot) triples.
inline void plan(std::vector<int64_t>& counts, std::vector<int64_t>& offsets,
                 std::vector<int32_t>& row_of, std::vector<int32_t>& token_of,
                 const int32_t* ids, int64_t N, int64_t E, int64_t K) {
  std::vector<int64_t> pairs(N * K);
  std::iota(pairs.begin(), pairs.end(), 0);
  std::stable_sort(pairs.begin(), pairs.end(),
                   [&](int64_t x, int64_t y) { return ids[x] < ids[y]; });
  counts.assign(E, 0);
  offsets.assign(E + 1, 0);
  row_of.assign(N * K, -1);
  token_of.assign(N * K, -1);
  for (int64_t i = 0; i < N * K; ++i) ++counts[ids[i]];
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
  for (int64_t r = 0; r < N * K; ++r) {
    row_of[pairs[r]] = static_cast<int32_t>(r);
    token_of[r] = static_cast<int32_t>(pairs[r] / K);
  }
}

}  // namespace moe::ref
