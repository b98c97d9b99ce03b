// How a MoE layer reaches routed experts that live on other ranks (expert parallelism).
// model/ sees only this interface; parallel/ implements it over the EP group's
// communicator, so the layer code stays free of communication details.
//
// Per MoE layer of a micro-batch in flight (`key`): plan (exchange counts), dispatch (send
// each permuted row to the rank owning its expert), the local experts compute, combine (send
// the results back into the sender's row order). Backward reuses the key's plan: dispatch the
// output gradients, combine the input gradients.
//
// Every exchange is split into a start and a finish so that computation runs while it is in
// flight: the layer's own (shared experts, weight gradients), or another chunk's in an
// overlapped F&B pair. A lane carries one exchange at a time (it owns the wire buffer); two
// chunks interleaving use one lane each. All ranks of the EP group make the same starts and
// finishes in the same order.
#pragma once

#include <cstdint>

namespace moe {

class ExpertExchange {
 public:
  virtual ~ExpertExchange() = default;
  // counts (E): this rank's rows per global expert (moe_plan's counts); expert_ids (N, K):
  // the routing, for traffic statistics only. Both stay untouched until plan_finish, which
  // fills local_offsets (EL + 1) for the rows this rank's local experts receive and
  // block_offsets (EL ep + 1): local expert j's rows from sender p start at row
  // block_offsets[j ep + p] (senders in rank order), the last entry is the rows received,
  // which it returns. FP8 weight gradients start their 128-row tiles at every block, so
  // their rounding does not depend on which rows share a rank.
  virtual void plan_start(int lane, int64_t key, const int64_t* counts, const int32_t* expert_ids,
                          int64_t N, int64_t K) = 0;
  virtual int64_t plan_finish(int lane, int64_t* local_offsets, int64_t* block_offsets) = 0;
  // x_grouped (rows of key's plan, C) <- xp (N K, C); x_grouped is written by finish.
  virtual void dispatch_start(int lane, int64_t key, float* x_grouped, const float* xp,
                              int64_t C) = 0;
  // yp (N K, C) <- y_grouped (rows of key's plan, C); y_grouped may be reused once started.
  virtual void combine_start(int lane, int64_t key, float* yp, const float* y_grouped,
                             int64_t C) = 0;
  // Completes the lane's dispatch or combine.
  virtual void finish(int lane) = 0;
  // Lets exchanges in flight move (MPI progresses inside library calls); never blocks.
  virtual void progress() {}
  // Seconds spent blocked in plan_finish / finish so far: exchange time nothing hid.
  virtual double blocked_s() const { return 0; }
};

}  // namespace moe
