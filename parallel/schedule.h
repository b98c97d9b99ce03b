// Pipeline schedules as data: a pure function from (kind, pp, M, rank) to the ordered list of
// operations that rank runs in one optimizer step, plus a checker and a simulator. No MPI
// here; the executor (parallel/pipeline) runs these lists, the tests and `moetrain schedule`
// print and simulate them.
//
// Letters: pp pipeline ranks, M micro-batches per step, S stages the model is cut into, r a
// rank, c a chunk of a rank (0 or 1), s a stage (0 = embedding side, S-1 = loss side), m a
// micro-batch (0 <= m < M).
//
// Placement (stage s of micro-batch m runs on rank schedule_place(...).rank, its chunk c):
//  - 1f1b, zb1p: S = pp; stage s on rank s, chunk 0. One chunk per rank.
//  - dualpipe:   S = pp (pp even); rank r holds stage r as chunk 0 and stage pp-1-r as
//                chunk 1, so every stage lives on two ranks (two parameter copies; the
//                gradients of the two copies are summed before the optimizer step).
//                Two directions run the same model: micro-batches [0, M/2) enter at rank 0
//                and flow down through chunks 0 (stage s on rank s); micro-batches
//                [M/2, M) enter at rank pp-1 and flow up through chunks 1 (stage s on rank
//                pp-1-s). A chunk only ever sees micro-batches of its own direction.
//  - dualpipev:  S = 2 pp; rank r holds stage r as chunk 0 and stage 2pp-1-r as chunk 1.
//                Every micro-batch enters at rank 0, goes down through chunks 0, turns on
//                rank pp-1 (stage pp-1 -> pp is local, no message) and comes back up
//                through chunks 1; its loss is on rank 0. One parameter copy.
//
// Ops (PipeOp). Compute: F (forward), B (full backward: dX and dW), Bx (backward for the
// input only; its dW is a later W), W (backward for weights), F&B (the forward of (chunk,
// mb) overlapped with the full backward of (chunk2, mb2), DualPipe's fused pair).
// Communication, explicit and placed where an executor posts or waits it:
//  - a send follows the compute that produced its data at once; it never blocks (the
//    executor posts it non-blocking and completes it before the buffer is reused);
//  - a receive stands right before the compute that consumes it: the executor may post it
//    as early as it likes (kind, chunk and mb name the message, e.g. as its tag) but must
//    have it complete there.
// Messages cross ranks only; a hand-off between two chunks of one rank (DualPipeV's turn,
// pp = 1) has no op. (chunk, mb) of a send or receive name the local chunk whose output
// (send) or input (receive) travels: activations forward, input gradients backward.
//
// Costs and the simulator: a forward chunk costs f, a full backward b, a W w, a Bx b - w, an
// F&B pair fb; messages are free and instantaneous. Every rank starts at 0 and runs its list
// in order, waiting only at receives.
//  - makespan: when the last rank finishes.
//  - rank_bubble[r] = makespan - (the summed cost of r's compute ops): idle time of rank r
//    within the step. bubble = the largest rank_bubble. With f:b:w = 1:2:1 and fb = f + b
//    every rank is busy the same time, so all rank bubbles are equal and equal the
//    DeepSeek-V3 report's Table 2 (README of deepseek-ai/DualPipe):
//      1f1b (pp-1)(f+b), zb1p (pp-1)(f+b-2w), dualpipe (pp/2-1)(fb+b-3w),
//      dualpipev (PP/2-1)(fb+b-3w) with PP = 2 pp, the DualPipe rank count it is cut from.
//    NOTE: for dualpipev, PP is the number of stages (DualPipeV on pp ranks is one half of
//    DualPipe on 2 pp ranks) and f, b, w, fb are costs of its own, half-size chunks.
//    With 1:2:1 and a cheaper pair (b <= fb < f + b) the ranks differ and the largest
//    bubble is still the table's. Other ratios make the table an approximation: zb1p
//    idles (pp-1)(b - w + max(f - w, 0)), more than the table when w > f.
//  - peak_activations[r]: the most micro-batch activations of one chunk that rank r holds at
//    once. An F adds one; it is released by the full B, or by the W of a split backward
//    (a W still reads the saved inputs). An F&B pair counts its forward before it releases
//    its backward: both live during the pair. The unit is one chunk's activations of one
//    micro-batch; a chunk is 1/pp of the layers for 1f1b, zb1p and dualpipe, so 1f1b's
//    rank 0 (pp) and dualpipe's ranks (pp+1) compare directly with the table's PP and PP+1;
//    for dualpipev a chunk is 1/(2 pp) of the layers and its ranks hold 2 pp + 1 of them.
//  - param_copies: copies of the model's parameters held by the pp ranks together; equally,
//    a rank's parameters in units of 1/pp of the model.
#pragma once

#include <string>
#include <vector>

#include "model/types.h"

namespace moe {

enum class PipeOpKind {
  kForward,          // F:   forward of (chunk, mb)
  kBackward,         // B:   full backward of (chunk, mb): dX and dW
  kBackwardInput,    // Bx:  dX only of (chunk, mb); the matching kBackwardWeight comes later
  kBackwardWeight,   // W:   dW of (chunk, mb), after its kBackwardInput
  kForwardBackward,  // F&B: forward of (chunk, mb) overlapped with full backward of (chunk2, mb2)
  kSendActivation,   // output of the forward of (chunk, mb) to rank peer
  kRecvActivation,   // input of the forward of (chunk, mb) from rank peer
  kSendGradient,     // input gradient computed by the backward of (chunk, mb) to rank peer
  kRecvGradient,     // output gradient the backward of (chunk, mb) needs, from rank peer
};

struct PipeOp {
  PipeOpKind kind = PipeOpKind::kForward;
  int chunk = 0, mb = 0;      // the op's (local chunk, micro-batch); of the forward for F&B
  int chunk2 = -1, mb2 = -1;  // F&B only: the backward's (local chunk, micro-batch)
  int peer = -1;              // sends and receives only: the other rank
};

// Where stage s of micro-batch m runs.
struct PipePlace {
  int rank = 0, chunk = 0;
};

struct ScheduleCosts {
  double f = 1, b = 2, w = 1, fb = 3;  // forward, full backward, weight part of b, F&B pair
};

struct ScheduleSim {
  double makespan = 0;
  double bubble = 0;                  // max over ranks of rank_bubble
  std::vector<double> rank_bubble;    // (pp) makespan - busy time of the rank
  std::vector<double> rank_busy;      // (pp) summed compute cost
  std::vector<int> peak_activations;  // (pp) chunk activations in flight, most at once
  int param_copies = 1;
  std::string error;                  // empty: valid; else the first violation or deadlock
};

// Constraints of each kind; a violation is a UserError of one line naming kind and numbers.
// All: pp >= 1, M >= 1. dualpipe: pp even, M even and M >= 2 pp. dualpipev: M >= 2 pp.
void schedule_check(PipeSchedule kind, int pp, int M);

const char* schedule_kind_name(PipeSchedule kind);  // "1f1b", "zb1p", "dualpipe", "dualpipev"
int schedule_chunks_per_rank(PipeSchedule kind);    // 1 or 2
int schedule_num_stages(PipeSchedule kind, int pp);  // S
int schedule_param_copies(PipeSchedule kind);        // 1, or 2 for dualpipe
// The stage that chunk c of rank r holds.
int schedule_stage_of(PipeSchedule kind, int pp, int rank, int chunk);
// Where stage s of micro-batch m runs (M picks the DualPipe direction of m).
PipePlace schedule_place(PipeSchedule kind, int pp, int M, int stage, int mb);

// The compute ops of rank r in order (no sends or receives), and the full list with the
// messages placed. Both call schedule_check first.
std::vector<PipeOp> schedule_rank_compute(PipeSchedule kind, int pp, int M, int rank);
std::vector<PipeOp> schedule_rank_ops(PipeSchedule kind, int pp, int M, int rank);
// Every rank's list, index r.
std::vector<std::vector<PipeOp>> schedule_all_ops(PipeSchedule kind, int pp, int M);

// "F0.3", "B1.2", "Bx0.1", "W0.1", "F0.3&B1.1", "a>1" / "g>1" (send activation / gradient
// to rank 1), "a<0" / "g<2" (receive from a rank); ops of a list separated by spaces.
std::string pipe_op_to_string(const PipeOp& op);
// The op kind alone: "F", "B", "Bx", "W", "F&B", "send_act", "recv_act", "send_grad",
// "recv_grad" (static strings).
const char* pipe_op_kind_name(PipeOpKind k);
std::string schedule_to_string(const std::vector<PipeOp>& ops);

// Runs every rank's list (ranks[r]) and checks, op by op, that its inputs exist: an F has
// the activation of the stage before (made on this rank earlier, or received), a B / Bx has
// its own F and the gradient of the stage after, a W its Bx, a send its data, a receive a
// matching send from the right peer; every (stage, mb) gets exactly one F, one B or Bx, and
// one W after a Bx, on the rank and chunk schedule_place names; every send is received.
// Returns the times; error names the first violation, or the ranks stuck in a deadlock.
ScheduleSim schedule_simulate_ops(PipeSchedule kind, int pp, int M,
                                  const std::vector<std::vector<PipeOp>>& ranks,
                                  const ScheduleCosts& costs);
// The built-in schedule of (kind, pp, M): checks the constraints and the costs (UserError),
// simulates, and CHECK-fails if the schedule breaks a dependency (a bug).
ScheduleSim schedule_simulate(PipeSchedule kind, int pp, int M, const ScheduleCosts& costs);

// Costs must be finite with f > 0, b > 0, 0 <= w <= b, fb > 0 (UserError otherwise).
void schedule_costs_check(const ScheduleCosts& costs);

}  // namespace moe
