#include "parallel/expert_exchange.h"

#include "model/check.h"

namespace moe {

EpExchange::EpExchange(Comm& comm, int64_t E, int64_t n_moe_layers, int64_t rows_capacity,
                       int64_t C)
    : comm_(comm), C_max_(C) {
  CHECK(n_moe_layers >= 0 && C >= 1);
  for (int64_t l = 0; l < n_moe_layers; ++l)
    plans_.push_back(ep_plan_create(comm.size(), E, rows_capacity));
  scratch_.assign(static_cast<size_t>(rows_capacity * C), 0.0f);
}

int64_t EpExchange::plan(int64_t moe_layer, const int64_t* counts, const int32_t* expert_ids,
                         int64_t N, int64_t K, int64_t* local_offsets) {
  CHECK(moe_layer >= 0 && moe_layer < static_cast<int64_t>(plans_.size()));
  EpPlan& p = plans_[static_cast<size_t>(moe_layer)];
  ep_plan(p, counts, comm_);
  std::copy(p.local_offsets.begin(), p.local_offsets.end(), local_offsets);
  // Traffic: rows to other ranks, and the distinct other ranks each token must reach.
  traffic_.tokens += N;
  for (int q = 0; q < p.ep; ++q)
    if (q != p.rank) traffic_.rows_remote += p.send_counts[static_cast<size_t>(q)];
  for (int64_t i = 0; i < N; ++i) {
    const int32_t* ids = expert_ids + i * K;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t owner = ids[k] / p.EL;
      bool first = owner != p.rank;
      for (int64_t j = 0; j < k && first; ++j) first = ids[j] / p.EL != owner;
      traffic_.rows_remote_min += first ? 1 : 0;
    }
  }
  return p.rows_recv;
}

void EpExchange::dispatch(int64_t moe_layer, float* x_grouped, const float* xp, int64_t C) {
  CHECK(C <= C_max_);
  ep_dispatch(x_grouped, scratch_.data(), xp, plans_[static_cast<size_t>(moe_layer)], C, comm_);
}

void EpExchange::combine(int64_t moe_layer, float* yp, const float* y_grouped, int64_t C) {
  CHECK(C <= C_max_);
  ep_combine(yp, scratch_.data(), y_grouped, plans_[static_cast<size_t>(moe_layer)], C, comm_);
}

}  // namespace moe
