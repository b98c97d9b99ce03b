// The MoE layer's expert exchange over an EP group (model/expert_exchange.h's interface):
// one EpPlan per MoE layer for the micro-batch in flight, the dispatch/combine scratch, and
// traffic counters for the benchmark. Everything is sized at creation; a step allocates
// nothing.
#pragma once

#include <cstdint>
#include <vector>

#include "model/expert_exchange.h"
#include "parallel/expert_dispatch.h"

namespace moe {

// What the dispatches since the last reset sent to other ranks, against the least the routing
// needed: a token whose K experts live on r other ranks must reach each of them once, while
// a row-per-slot dispatch sends it once per slot.
struct EpTraffic {
  int64_t tokens = 0;           // tokens routed (summed over MoE layers)
  int64_t rows_remote = 0;      // rows dispatched to other ranks
  int64_t rows_remote_min = 0;  // distinct (token, other rank) pairs
};

class EpExchange final : public ExpertExchange {
 public:
  // comm: the EP group (kept by reference; must outlive this); E routed experts;
  // rows_capacity: the most rows a layer may receive (moe_rows_max); C: row width.
  EpExchange(Comm& comm, int64_t E, int64_t n_moe_layers, int64_t rows_capacity, int64_t C);

  int64_t plan(int64_t moe_layer, const int64_t* counts, const int32_t* expert_ids, int64_t N,
               int64_t K, int64_t* local_offsets) override;
  void dispatch(int64_t moe_layer, float* x_grouped, const float* xp, int64_t C) override;
  void combine(int64_t moe_layer, float* yp, const float* y_grouped, int64_t C) override;

  const EpTraffic& traffic() const { return traffic_; }
  void reset_traffic() { traffic_ = EpTraffic{}; }

 private:
  Comm& comm_;
  int64_t C_max_;
  std::vector<EpPlan> plans_;   // per MoE layer
  std::vector<float> scratch_;  // (rows_capacity, C): the wire layout
  EpTraffic traffic_;
};

}  // namespace moe
