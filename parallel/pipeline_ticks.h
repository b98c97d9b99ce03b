// The pipeline's messages as NCCL can run them: ticks, planned and proven from the op lists.
//
// MPI matches messages by tag, so the executor's CPU path posts each receive early and in any
// order. NCCL has no tags and runs a communicator's operations in stream order: between two
// ranks the k-th send is the peer's k-th receive, an operation blocks everything queued
// behind it, and a send may wait until its receive is posted (rendezvous). On NCCL the
// executor therefore posts messages in ticks: a tick is a group of transfers posted together
// right before a compute op (or after the last), so its transfers progress together, and
// completed before that compute op runs. Megatron-LM and the DualPipe reference batch their
// point-to-point operations the same way.
//
// The plan (pipeline_ticks_plan) starts from the op lists (parallel/schedule.h): a send in
// the tick after the compute op that made its data, a receive in the tick before the compute
// op that needs it. Two things must then hold, and the plan proves both:
//  - order: between any two ranks the sender's sends, in issue order, name the receiver's
//    receives in the order its list needs them (tags would have hidden a mismatch; NCCL
//    would swap two buffers of equal size). A send made before one its receiver needs first
//    is held back to that one's tick, and issued after it;
//  - progress: with rendezvous sends and every tick completed before the next compute op,
//    all ranks finish. A tick completes once each of its transfers has met its peer's; the
//    plan replays the ticks and, where every rank still running waits on another, moves a
//    receive the waiting sender needs into its receiver's current tick (DualPipe's two
//    directions need this: both neighbours send at once).
// A receive moves no earlier than the micro-batch takes its activation slot
// (pipe_slot_take_index), the executor's rule for posting receives early on MPI, so its
// buffer is free. A send is held back no later than the micro-batch's next compute op on its
// rank (or, after its last op, until another micro-batch could take the slot), so its buffer
// is unchanged.
#pragma once

#include <string>
#include <vector>

#include "parallel/schedule.h"

namespace moe {

// One message seen from one side: what the tag named on MPI.
struct PipeTransfer {
  bool send = false;
  int peer = 0;   // pipeline rank
  int type = 0;   // 0: activation, 1: gradient
  int stage = 0;  // the stage that receives it
  int mb = 0;
};

bool pipe_op_is_message(PipeOpKind k);

// The transfer a send or receive op of `rank` stands for.
PipeTransfer pipe_op_transfer(PipeSchedule kind, int pp, int rank, const PipeOp& op);

// (M) the op index before which each micro-batch takes its activation slot on this rank: the
// compute op before its first op (so its receives can be posted a whole compute op ahead),
// or its first op when no compute op comes before; -1 when it never comes here.
std::vector<int> pipe_slot_take_index(const std::vector<PipeOp>& ops, int M);

// One rank's ticks, in the order it posts them.
struct PipeTick {
  int before = 0;          // the compute op it runs before; ops.size(): after the last op
  std::vector<int> ops;    // the message ops it posts, in issue order
};

struct PipeTickPlan {
  std::vector<std::vector<PipeTick>> ranks;  // (pp)
  int moved = 0;       // receives posted earlier than their op list places them
  std::string error;   // "": the plan keeps order and progress; else one line naming why not
};

PipeTickPlan pipeline_ticks_plan(PipeSchedule kind, int pp, int M);

// One rank's list as it runs in ticks: compute ops, each tick in brackets before the compute
// op it runs before ("[a<0] F0.0 [a>2 a<0] F0.1 ... [g>0]").
std::string pipeline_ticks_to_string(const std::vector<PipeOp>& ops,
                                     const std::vector<PipeTick>& ticks);
// The same over given lists (ranks[r]), for tests that break a schedule on purpose.
PipeTickPlan pipeline_ticks_plan_ops(PipeSchedule kind, int pp, int M,
                                     const std::vector<std::vector<PipeOp>>& ranks);

}  // namespace moe
