// Pieces shared by the whole-model gradient checks (tests/test_model.cpp, tests/test_mla.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include "model/model.h"

namespace moe::test {

// objective = mean CE + aux_loss_sum (dloss_ce = 1 / N, dloss_aux = 1)
inline double objective(Model<double>& m, const std::vector<int32_t>& x,
                        const std::vector<int32_t>& y, int64_t B, int64_t T_) {
  const double ce = model_forward<double>(m, x.data(), y.data(), B, T_, false);
  return ce + m.aux_loss_sum;
}

// All expert choices of the last forward, to detect a finite-difference step that flipped
// a (piecewise constant) routing decision.
inline std::vector<int32_t> routing_of(const Model<double>& m, int64_t N) {
  std::vector<int32_t> ids;
  for (int64_t l = m.d.dense_layers; l < m.d.L; ++l) {
    const int32_t* e = m.slots[0].layers[static_cast<size_t>(l)].expert_ids;
    ids.insert(ids.end(), e, e + N * m.d.K);
  }
  return ids;
}

}  // namespace moe::test
