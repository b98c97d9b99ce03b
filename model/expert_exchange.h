// How a MoE layer reaches routed experts that live on other ranks (expert parallelism).
// model/ sees only this interface; parallel/ implements it over the EP group's
// communicator, so the layer code stays free of communication details.
//
// Per MoE layer of the micro-batch in flight: plan (exchange counts), dispatch (send each
// permuted row to the rank owning its expert), the local experts compute, combine (send the
// results back into the sender's row order). Backward reuses the layer's plan: dispatch the
// output gradients, combine the input gradients. All ranks of the EP group make the same
// calls in the same order.
#pragma once

#include <cstdint>

namespace moe {

class ExpertExchange {
 public:
  virtual ~ExpertExchange() = default;
  // counts (E): this rank's rows per global expert (moe_plan's counts); expert_ids (N, K):
  // the routing, for traffic statistics only. Fills local_offsets (EL + 1) for the rows this
  // rank's local experts receive and returns their number.
  virtual int64_t plan(int64_t moe_layer, const int64_t* counts, const int32_t* expert_ids,
                       int64_t N, int64_t K, int64_t* local_offsets) = 0;
  // x_grouped (rows of plan, C) <- xp (N K, C).
  virtual void dispatch(int64_t moe_layer, float* x_grouped, const float* xp, int64_t C) = 0;
  // yp (N K, C) <- y_grouped (rows of plan, C).
  virtual void combine(int64_t moe_layer, float* yp, const float* y_grouped, int64_t C) = 0;
};

}  // namespace moe
