// Pieces shared by the whole-model gradient checks (tests/test_model.cpp, tests/test_mla.cpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "model/model.h"
#include "model/rng.h"

namespace moe::test {

// objective = mean CE + mtp_weight / mtp * MTP CE sum / N + aux_loss_sum (dloss_ce = 1 / N,
// dloss_aux = 1), with every target valid (N = B T_ of them)
inline double objective(Model<double>& m, const std::vector<int32_t>& x,
                        const std::vector<int32_t>& y, int64_t B, int64_t T_) {
  const double ce = model_forward<double>(m, x.data(), y.data(), B, T_, true);
  const double mtp = m.d.mtp > 0 ? m.d.mtp_weight / static_cast<double>(m.d.mtp) *
                                       m.mtp_ce_sum / static_cast<double>(B * T_)
                                 : 0.0;
  return ce + mtp + m.aux_loss_sum;
}

// All expert choices of the last forward, to detect a finite-difference step that flipped
// a (piecewise constant) routing decision.
inline std::vector<int32_t> routing_of(const Model<double>& m, int64_t N) {
  std::vector<int32_t> ids;
  for (int64_t l = 0; l < m.d.n_blocks(); ++l) {
    if (!m.d.block_moe(l)) continue;
    const int32_t* e = m.slots[0].layers[static_cast<size_t>(l)].expert_ids;
    ids.insert(ids.end(), e, e + N * m.d.K);
  }
  return ids;
}

// Norm weights away from their init of 1, so a norm weight read in the wrong place shows.
template <typename T>
void perturb_norms(Model<T>& m, uint64_t seed) {
  for (const ParamInfo& p : m.table)
    if (p.shape.size() == 1)
      for (size_t i = 0; i < p.count; ++i)
        m.params[p.offset + i] = static_cast<T>(1.0 + 0.3 * rng_normal(seed, 31, p.offset + i));
}

// model_backward's gradient of `objective` (dloss_ce = 1 / N, dloss_aux = 1) against
// fourth-order central differences of every parameter, skipping those whose step flipped a
// routing decision. (Second-order differences' truncation error, h^2 f(3) / 6, reaches 1.7e-6
// at h = 1e-5 on a dense-only model, whose third derivatives are large.)
struct FdCheck {
  double base = 0, max_err = 0, max_grad = 0;
  int64_t skipped = 0;
  std::vector<double> analytic;
};
inline FdCheck fd_check_fourth_order(Model<double>& m, const std::vector<int32_t>& x,
                                     const std::vector<int32_t>& y, int64_t B, int64_t T_) {
  const int64_t N = B * T_;
  FdCheck r;
  model_zero_grads<double>(m);
  r.base = objective(m, x, y, B, T_);
  const std::vector<int32_t> base_routing = routing_of(m, N);
  model_backward<double>(m, 1.0 / static_cast<double>(N), 1.0);
  r.analytic.assign(m.grads, m.grads + m.n_params);
  const double h = 2e-5;
  for (size_t i = 0; i < m.n_params; ++i) {
    const double saved = m.params[i];
    double f[4];
    bool flip = false;
    const double steps[4] = {2 * h, h, -h, -2 * h};
    for (int s = 0; s < 4; ++s) {
      m.params[i] = saved + steps[s];
      f[s] = objective(m, x, y, B, T_);
      flip |= routing_of(m, N) != base_routing;
    }
    m.params[i] = saved;
    if (flip) {
      ++r.skipped;
      continue;
    }
    const double fd = (8 * (f[1] - f[2]) - (f[0] - f[3])) / (12 * h);
    r.max_err = std::max(r.max_err, std::fabs(fd - r.analytic[i]));
    r.max_grad = std::max(r.max_grad, std::fabs(r.analytic[i]));
  }
  return r;
}

// Two micro-batches (slots 0 and 1, tokens x[s], targets y[s]) through a model cut at layer
// `cut` of L, forward chunk by chunk, then the backward split into input and weight parts
// interleaved across chunks and slots as a DualPipe rank runs them (a weight part after later
// input parts, slot 1's input before slot 0's weights).
template <typename T>
void run_interleaved_split_backward(Model<T>& m, int64_t cut, int64_t L,
                                    const int32_t* const x[2], const int32_t* const y[2],
                                    int64_t B, int64_t T_, T dce, T daux) {
  auto fwd = [&](int s, int64_t l0, int64_t l1) {
    model_chunk_forward<T>(m, s, l0, l1, x[s], y[s], B, T_, true);
  };
  auto bwd = [&](int s, int64_t l0, int64_t l1, BackwardPart p) {
    model_chunk_backward<T>(m, s, l0, l1, dce, daux, p);
  };
  fwd(0, 0, cut);
  fwd(0, cut, L);
  fwd(1, 0, cut);
  fwd(1, cut, L);
  bwd(0, cut, L, BackwardPart::kInput);
  bwd(0, 0, cut, BackwardPart::kInput);
  bwd(1, cut, L, BackwardPart::kInput);
  bwd(0, cut, L, BackwardPart::kWeight);
  bwd(1, 0, cut, BackwardPart::kInput);
  bwd(1, cut, L, BackwardPart::kWeight);
  bwd(1, 0, cut, BackwardPart::kWeight);
  bwd(0, 0, cut, BackwardPart::kWeight);
}

}  // namespace moe::test
