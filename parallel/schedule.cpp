// Schedules as data: constraints, stage placement, printing, and the messages placed around
// each rank's compute order (schedule_build.cpp makes the order, schedule_sim.cpp runs it).
#include "parallel/schedule.h"

#include <cmath>

#include "model/check.h"

namespace moe {

const char* schedule_kind_name(PipeSchedule kind) {
  switch (kind) {
    case PipeSchedule::k1F1B: return "1f1b";
    case PipeSchedule::kZB1P: return "zb1p";
    case PipeSchedule::kDualPipe: return "dualpipe";
    case PipeSchedule::kDualPipeV: return "dualpipev";
  }
  return "?";
}

void schedule_check(PipeSchedule kind, int pp, int M) {
  const char* name = schedule_kind_name(kind);
  if (pp < 1) user_error("schedule %s needs pp >= 1, got %d", name, pp);
  if (M < 1) user_error("schedule %s needs micro-batches >= 1, got %d", name, M);
  if (kind == PipeSchedule::kDualPipe) {
    if (pp % 2 != 0) user_error("schedule dualpipe needs an even pp, got %d", pp);
    if (M % 2 != 0 || M < 2 * pp)
      user_error("schedule dualpipe needs an even number of micro-batches >= 2 * pp = %d, got %d",
                 2 * pp, M);
  }
  if (kind == PipeSchedule::kDualPipeV && M < 2 * pp)
    user_error("schedule dualpipev needs micro-batches >= 2 * pp = %d, got %d", 2 * pp, M);
}

void schedule_costs_check(const ScheduleCosts& c) {
  const bool finite = std::isfinite(c.f) && std::isfinite(c.b) && std::isfinite(c.w) &&
                      std::isfinite(c.fb);
  if (!finite || c.f <= 0 || c.b <= 0 || c.w < 0 || c.w > c.b || c.fb <= 0)
    user_error("schedule costs need f > 0, b > 0, 0 <= w <= b and fb > 0, got f=%g b=%g w=%g fb=%g",
               c.f, c.b, c.w, c.fb);
}

int schedule_chunks_per_rank(PipeSchedule kind) {
  return kind == PipeSchedule::kDualPipe || kind == PipeSchedule::kDualPipeV ? 2 : 1;
}

int schedule_num_stages(PipeSchedule kind, int pp) {
  return kind == PipeSchedule::kDualPipeV ? 2 * pp : pp;
}

int schedule_param_copies(PipeSchedule kind) { return kind == PipeSchedule::kDualPipe ? 2 : 1; }

int schedule_stage_of(PipeSchedule kind, int pp, int rank, int chunk) {
  CHECK(rank >= 0 && rank < pp && chunk >= 0 && chunk < schedule_chunks_per_rank(kind),
        "rank %d chunk %d", rank, chunk);
  if (chunk == 0) return rank;
  return kind == PipeSchedule::kDualPipe ? pp - 1 - rank : 2 * pp - 1 - rank;
}

PipePlace schedule_place(PipeSchedule kind, int pp, int M, int stage, int mb) {
  CHECK(stage >= 0 && stage < schedule_num_stages(kind, pp) && mb >= 0 && mb < M,
        "stage %d mb %d", stage, mb);
  switch (kind) {
    case PipeSchedule::k1F1B:
    case PipeSchedule::kZB1P: return {stage, 0};
    case PipeSchedule::kDualPipe:
      return mb < M / 2 ? PipePlace{stage, 0} : PipePlace{pp - 1 - stage, 1};
    case PipeSchedule::kDualPipeV:
      return stage < pp ? PipePlace{stage, 0} : PipePlace{2 * pp - 1 - stage, 1};
  }
  return {};
}

const char* pipe_op_kind_name(PipeOpKind k) {
  switch (k) {
    case PipeOpKind::kForward: return "F";
    case PipeOpKind::kBackward: return "B";
    case PipeOpKind::kBackwardInput: return "Bx";
    case PipeOpKind::kBackwardWeight: return "W";
    case PipeOpKind::kForwardBackward: return "F&B";
    case PipeOpKind::kSendActivation: return "send_act";
    case PipeOpKind::kRecvActivation: return "recv_act";
    case PipeOpKind::kSendGradient: return "send_grad";
    case PipeOpKind::kRecvGradient: return "recv_grad";
  }
  return "?";
}

std::string pipe_op_to_string(const PipeOp& op) {
  switch (op.kind) {
    case PipeOpKind::kForward: return strprintf("F%d.%d", op.chunk, op.mb);
    case PipeOpKind::kBackward: return strprintf("B%d.%d", op.chunk, op.mb);
    case PipeOpKind::kBackwardInput: return strprintf("Bx%d.%d", op.chunk, op.mb);
    case PipeOpKind::kBackwardWeight: return strprintf("W%d.%d", op.chunk, op.mb);
    case PipeOpKind::kForwardBackward:
      return strprintf("F%d.%d&B%d.%d", op.chunk, op.mb, op.chunk2, op.mb2);
    case PipeOpKind::kSendActivation: return strprintf("a>%d", op.peer);
    case PipeOpKind::kRecvActivation: return strprintf("a<%d", op.peer);
    case PipeOpKind::kSendGradient: return strprintf("g>%d", op.peer);
    case PipeOpKind::kRecvGradient: return strprintf("g<%d", op.peer);
  }
  return "?";
}

std::string schedule_to_string(const std::vector<PipeOp>& ops) {
  std::string s;
  for (const PipeOp& op : ops) {
    if (!s.empty()) s += ' ';
    s += pipe_op_to_string(op);
  }
  return s;
}

namespace {

// The messages around one compute part (a forward or a backward of (chunk, mb)) on rank r:
// the receive it needs before it and the send of what it made after it, when the neighbour
// stage lives on another rank.
struct Neighbours {
  PipeSchedule kind;
  int pp, M, rank;

  // Appends a message op of (chunk, mb) with the rank of stage s + dir of the micro-batch,
  // when there is such a stage and it lives on another rank.
  void message(std::vector<PipeOp>& out, PipeOpKind k, int chunk, int mb, int dir) const {
    const int s = schedule_stage_of(kind, pp, rank, chunk) + dir;
    if (s < 0 || s >= schedule_num_stages(kind, pp)) return;
    const int p = schedule_place(kind, pp, M, s, mb).rank;
    if (p != rank) out.push_back({k, chunk, mb, -1, -1, p});
  }
  void recv_forward(std::vector<PipeOp>& out, int chunk, int mb) const {
    message(out, PipeOpKind::kRecvActivation, chunk, mb, -1);
  }
  void send_forward(std::vector<PipeOp>& out, int chunk, int mb) const {
    message(out, PipeOpKind::kSendActivation, chunk, mb, +1);
  }
  void recv_backward(std::vector<PipeOp>& out, int chunk, int mb) const {
    message(out, PipeOpKind::kRecvGradient, chunk, mb, +1);
  }
  void send_backward(std::vector<PipeOp>& out, int chunk, int mb) const {
    message(out, PipeOpKind::kSendGradient, chunk, mb, -1);
  }
};

}  // namespace

std::vector<PipeOp> schedule_rank_ops(PipeSchedule kind, int pp, int M, int rank) {
  const Neighbours nb{kind, pp, M, rank};
  std::vector<PipeOp> out;
  for (const PipeOp& op : schedule_rank_compute(kind, pp, M, rank)) {
    switch (op.kind) {
      case PipeOpKind::kForward:
        nb.recv_forward(out, op.chunk, op.mb);
        out.push_back(op);
        nb.send_forward(out, op.chunk, op.mb);
        break;
      case PipeOpKind::kBackward:
      case PipeOpKind::kBackwardInput:
        nb.recv_backward(out, op.chunk, op.mb);
        out.push_back(op);
        nb.send_backward(out, op.chunk, op.mb);
        break;
      case PipeOpKind::kForwardBackward:
        nb.recv_forward(out, op.chunk, op.mb);
        nb.recv_backward(out, op.chunk2, op.mb2);
        out.push_back(op);
        nb.send_forward(out, op.chunk, op.mb);
        nb.send_backward(out, op.chunk2, op.mb2);
        break;
      default: out.push_back(op); break;  // W: no message
    }
  }
  return out;
}

std::vector<std::vector<PipeOp>> schedule_all_ops(PipeSchedule kind, int pp, int M) {
  schedule_check(kind, pp, M);
  std::vector<std::vector<PipeOp>> ranks(static_cast<size_t>(pp));
  for (int r = 0; r < pp; ++r) ranks[static_cast<size_t>(r)] = schedule_rank_ops(kind, pp, M, r);
  return ranks;
}

}  // namespace moe
