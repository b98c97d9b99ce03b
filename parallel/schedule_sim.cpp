// Runs every rank's op list against the data dependencies and the costs: the validator and
// the simulator are one pass, so a schedule that simulates is a schedule that is valid.
// Definitions (bubble, activations) in schedule.h.
#include <algorithm>
#include <cmath>
#include <limits>

#include "model/check.h"
#include "parallel/schedule.h"

namespace moe {

namespace {

constexpr double kNever = std::numeric_limits<double>::quiet_NaN();

// What exists so far, per (stage s, micro-batch m) at index s M + m.
struct SimState {
  PipeSchedule kind;
  int pp, S, M;
  std::vector<char> f_done, x_done, w_done;  // forward, input gradient, weight gradient
  std::vector<double> act_sent;   // when stage s's output activation was sent (kNever: not)
  std::vector<double> grad_sent;  // when stage s's input gradient was sent
  std::vector<char> act_recv;     // stage s's input activation arrived on its rank
  std::vector<char> grad_recv;    // stage s's output gradient arrived on its rank

  size_t key(int s, int m) const {
    return static_cast<size_t>(s) * static_cast<size_t>(M) + static_cast<size_t>(m);
  }
  int rank_of(int s, int m) const { return schedule_place(kind, pp, M, s, m).rank; }
  // The input of the forward of stage s on rank r: the embedding, or the previous stage's
  // output made on this rank, or received.
  bool act_ready(int r, int s, int m) const {
    if (s == 0) return true;
    return rank_of(s - 1, m) == r ? f_done[key(s - 1, m)] != 0 : act_recv[key(s, m)] != 0;
  }
  // The output gradient the backward of stage s needs: the loss, or the next stage's input
  // gradient made on this rank, or received.
  bool grad_ready(int r, int s, int m) const {
    if (s == S - 1) return true;
    return rank_of(s + 1, m) == r ? x_done[key(s + 1, m)] != 0 : grad_recv[key(s, m)] != 0;
  }
};

struct RankRun {
  size_t next = 0;    // next op to run
  double clock = 0;   // when the rank is free
  double busy = 0;    // summed compute cost
  int live = 0;       // chunk activations held
  int peak = 0;
};

enum class Outcome { kRan, kBlocked, kError };

struct Runner {
  SimState& st;
  const ScheduleCosts& c;
  std::string err;

  Outcome fail(int r, size_t i, const PipeOp& op, const std::string& what) {
    err = strprintf("rank %d op %zu (%s): %s", r, i, pipe_op_to_string(op).c_str(), what.c_str());
    return Outcome::kError;
  }

  // The stage of (chunk, mb) on rank r, or -1 (with err set) when m does not pass there.
  int stage(int r, size_t i, const PipeOp& op, int chunk, int mb) {
    if (chunk < 0 || chunk >= schedule_chunks_per_rank(st.kind) || mb < 0 || mb >= st.M) {
      fail(r, i, op, strprintf("no chunk %d / micro-batch %d", chunk, mb));
      return -1;
    }
    const int s = schedule_stage_of(st.kind, st.pp, r, chunk);
    const PipePlace p = schedule_place(st.kind, st.pp, st.M, s, mb);
    if (p.rank != r || p.chunk != chunk) {
      fail(r, i, op,
           strprintf("micro-batch %d does not pass through chunk %d of rank %d", mb, chunk, r));
      return -1;
    }
    return s;
  }

  Outcome forward(int r, size_t i, const PipeOp& op, RankRun& run, int s, int m) {
    if (st.f_done[st.key(s, m)]) return fail(r, i, op, "second forward");
    if (!st.act_ready(r, s, m)) return fail(r, i, op, strprintf("input of stage %d not here", s));
    st.f_done[st.key(s, m)] = 1;
    run.peak = std::max(run.peak, ++run.live);
    return Outcome::kRan;
  }

  Outcome backward(int r, size_t i, const PipeOp& op, RankRun& run, int s, int m, bool full) {
    const size_t k = st.key(s, m);
    if (st.x_done[k]) return fail(r, i, op, "second backward");
    if (!st.f_done[k]) return fail(r, i, op, "backward before its forward");
    if (!st.grad_ready(r, s, m))
      return fail(r, i, op, strprintf("output gradient of stage %d not here", s));
    st.x_done[k] = 1;
    if (full) {
      st.w_done[k] = 1;
      --run.live;
    }
    return Outcome::kRan;
  }

  // A send records when its data left; a receive waits for it (kBlocked until it is sent).
  Outcome message(int r, size_t i, const PipeOp& op, RankRun& run, int s, int m) {
    const PipeOpKind k = op.kind;
    const bool act = k == PipeOpKind::kSendActivation || k == PipeOpKind::kRecvActivation;
    const bool send = k == PipeOpKind::kSendActivation || k == PipeOpKind::kSendGradient;
    // The stage on the other end: activations go to s + 1 and come from s - 1, gradients
    // the other way.
    const int other = s + ((act == send) ? 1 : -1);
    if (other < 0 || other >= st.S || st.rank_of(other, m) != op.peer || op.peer == r)
      return fail(r, i, op,
                  strprintf("stage %d of micro-batch %d is not on rank %d", other, m, op.peer));
    if (send) {
      std::vector<double>& sent = act ? st.act_sent : st.grad_sent;
      if (!std::isnan(sent[st.key(s, m)])) return fail(r, i, op, "sent twice");
      if (!(act ? st.f_done : st.x_done)[st.key(s, m)])
        return fail(r, i, op, "sends what is not computed yet");
      sent[st.key(s, m)] = run.clock;
      return Outcome::kRan;
    }
    std::vector<char>& got = act ? st.act_recv : st.grad_recv;
    if (got[st.key(s, m)]) return fail(r, i, op, "received twice");
    const double t = (act ? st.act_sent : st.grad_sent)[st.key(other, m)];
    if (std::isnan(t)) return Outcome::kBlocked;
    run.clock = std::max(run.clock, t);
    got[st.key(s, m)] = 1;
    return Outcome::kRan;
  }

  Outcome step(int r, size_t i, const PipeOp& op, RankRun& run) {
    const int s = stage(r, i, op, op.chunk, op.mb);
    if (s < 0) return Outcome::kError;
    Outcome o = Outcome::kRan;
    double cost = 0;
    switch (op.kind) {
      case PipeOpKind::kForward:
        o = forward(r, i, op, run, s, op.mb);
        cost = c.f;
        break;
      case PipeOpKind::kBackward:
      case PipeOpKind::kBackwardInput: {
        const bool full = op.kind == PipeOpKind::kBackward;
        o = backward(r, i, op, run, s, op.mb, full);
        cost = full ? c.b : c.b - c.w;
        break;
      }
      case PipeOpKind::kBackwardWeight: {
        const size_t k = st.key(s, op.mb);
        if (!st.x_done[k]) return fail(r, i, op, "W before its Bx");
        if (st.w_done[k]) return fail(r, i, op, "second W, or W after a full backward");
        st.w_done[k] = 1;
        --run.live;
        cost = c.w;
        break;
      }
      case PipeOpKind::kForwardBackward: {
        const int s2 = stage(r, i, op, op.chunk2, op.mb2);
        if (s2 < 0) return Outcome::kError;
        // Both parts' inputs must be here before the pair starts; the forward's activations
        // are allocated before the backward frees its own.
        if (!st.grad_ready(r, s2, op.mb2))
          return fail(r, i, op, strprintf("output gradient of stage %d not here", s2));
        o = forward(r, i, op, run, s, op.mb);
        if (o == Outcome::kRan) o = backward(r, i, op, run, s2, op.mb2, true);
        cost = c.fb;
        break;
      }
      default: return message(r, i, op, run, s, op.mb);
    }
    if (o == Outcome::kRan) {
      run.clock += cost;
      run.busy += cost;
    }
    return o;
  }
};

}  // namespace

ScheduleSim schedule_simulate_ops(PipeSchedule kind, int pp, int M,
                                  const std::vector<std::vector<PipeOp>>& ranks,
                                  const ScheduleCosts& costs) {
  schedule_check(kind, pp, M);
  CHECK(static_cast<int>(ranks.size()) == pp, "%zu op lists for pp %d", ranks.size(), pp);
  const int S = schedule_num_stages(kind, pp);
  const size_t n = static_cast<size_t>(S) * static_cast<size_t>(M);
  SimState st{kind, pp, S, M, std::vector<char>(n), std::vector<char>(n), std::vector<char>(n),
              std::vector<double>(n, kNever), std::vector<double>(n, kNever),
              std::vector<char>(n), std::vector<char>(n)};
  Runner run{st, costs, {}};
  std::vector<RankRun> rr(static_cast<size_t>(pp));
  ScheduleSim sim;
  sim.param_copies = schedule_param_copies(kind);

  // Sends never block, so running each rank as far as it goes, round after round, gives
  // the exact times; a round in which no rank moves is a deadlock.
  for (bool moved = true; moved;) {
    moved = false;
    for (int r = 0; r < pp; ++r) {
      RankRun& x = rr[static_cast<size_t>(r)];
      const std::vector<PipeOp>& ops = ranks[static_cast<size_t>(r)];
      while (x.next < ops.size()) {
        const Outcome o = run.step(r, x.next, ops[x.next], x);
        if (o == Outcome::kError) {
          sim.error = run.err;
          return sim;
        }
        if (o == Outcome::kBlocked) break;
        ++x.next;
        moved = true;
      }
    }
  }
  std::string stuck;
  for (int r = 0; r < pp; ++r) {
    const RankRun& x = rr[static_cast<size_t>(r)];
    const std::vector<PipeOp>& ops = ranks[static_cast<size_t>(r)];
    if (x.next < ops.size())
      stuck += strprintf("%srank %d at op %zu (%s)", stuck.empty() ? "" : ", ", r, x.next,
                         pipe_op_to_string(ops[x.next]).c_str());
  }
  if (!stuck.empty()) {
    sim.error = "deadlock: " + stuck + " waiting for a message never sent";
    return sim;
  }
  for (int s = 0; s < S && sim.error.empty(); ++s)
    for (int m = 0; m < M && sim.error.empty(); ++m) {
      const size_t k = st.key(s, m);
      if (!st.f_done[k] || !st.x_done[k] || !st.w_done[k])
        sim.error = strprintf("stage %d micro-batch %d lacks its %s", s, m,
                              !st.f_done[k] ? "forward" : !st.x_done[k] ? "backward" : "W");
      else if ((!std::isnan(st.act_sent[k]) && !st.act_recv[st.key(s + 1, m)]) ||
               (!std::isnan(st.grad_sent[k]) && !st.grad_recv[st.key(s - 1, m)]))
        sim.error =
            strprintf("a message of stage %d micro-batch %d is sent but never received", s, m);
    }
  if (!sim.error.empty()) return sim;

  for (const RankRun& x : rr) sim.makespan = std::max(sim.makespan, x.clock);
  for (const RankRun& x : rr) {
    sim.rank_busy.push_back(x.busy);
    sim.rank_bubble.push_back(sim.makespan - x.busy);
    sim.peak_activations.push_back(x.peak);
    sim.bubble = std::max(sim.bubble, sim.makespan - x.busy);
  }
  return sim;
}

ScheduleSim schedule_simulate(PipeSchedule kind, int pp, int M, const ScheduleCosts& costs) {
  schedule_costs_check(costs);
  const ScheduleSim sim = schedule_simulate_ops(kind, pp, M, schedule_all_ops(kind, pp, M), costs);
  CHECK(sim.error.empty(), "schedule %s pp %d M %d: %s", schedule_kind_name(kind), pp, M,
        sim.error.c_str());
  return sim;
}

}  // namespace moe
