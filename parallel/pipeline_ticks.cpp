#include "parallel/pipeline_ticks.h"

#include <algorithm>
#include <cstdint>
#include <map>
#include <tuple>

#include "model/check.h"

namespace moe {

namespace {

std::string transfer_name(const PipeTransfer& t) {
  return strprintf("%s of stage %d micro-batch %d", t.type == 0 ? "activation" : "gradient",
                   t.stage, t.mb);
}

// One message op of one rank, with its place on its pair of ranks (the k-th message from
// sender to receiver, k in the receiver's list order) and the tick it is posted in.
struct Msg {
  int op = 0;
  PipeTransfer t;
  size_t pair = 0;  // sender * pp + receiver
  int64_t k = 0;
  int before = 0;    // the compute op its tick runs before (ops.size(): the end)
  int earliest = 0;  // the earliest `before` allowed (receives: once the slot is taken)
  int latest = 0;    // sends: the latest `before` allowed (while the buffer stays put)
};

struct Planner {
  PipeSchedule kind;
  int pp, M;
  const std::vector<std::vector<PipeOp>>& ranks;
  std::vector<std::vector<Msg>> msgs;  // (pp) per rank: its receives, then its sends
  // From build_ticks: each message's tick on its rank, and each tick's messages in issue order.
  std::vector<std::vector<int>> tick_of;               // (pp, msgs)
  std::vector<std::vector<std::vector<int>>> in_tick;  // (pp, ticks)
  // (pair, k) -> the sender's and the receiver's Msg index.
  std::vector<std::vector<int>> send_of, recv_of;
  PipeTickPlan out;

  bool fail(std::string e) {
    out.error = std::move(e);
    return false;
  }

  bool is_compute(int r, int i) const {
    return !pipe_op_is_message(ranks[static_cast<size_t>(r)][static_cast<size_t>(i)].kind);
  }
  // The first compute op at or after op i (ops.size(): none).
  int next_compute(int r, int i) const {
    const int n = static_cast<int>(ranks[static_cast<size_t>(r)].size());
    while (i < n && !is_compute(r, i)) ++i;
    return i;
  }

  bool collect() {
    const size_t P = static_cast<size_t>(pp);
    msgs.assign(P, {});
    send_of.assign(P * P, {});
    recv_of.assign(P * P, {});
    // Receives first: the receiver's list order fixes k, as it needs them in that order.
    std::vector<std::map<std::tuple<int, int, int>, int64_t>> k_of(P * P);
    std::vector<std::vector<int>> take(P);
    for (int pass = 0; pass < 2; ++pass)
      for (int r = 0; r < pp; ++r) {
        const auto& ops = ranks[static_cast<size_t>(r)];
        if (pass == 0) take[static_cast<size_t>(r)] = pipe_slot_take_index(ops, M);
        for (int i = 0; i < static_cast<int>(ops.size()); ++i) {
          if (!pipe_op_is_message(ops[static_cast<size_t>(i)].kind)) continue;
          Msg m;
          m.op = i;
          m.t = pipe_op_transfer(kind, pp, r, ops[static_cast<size_t>(i)]);
          if (m.t.send != (pass == 1)) continue;
          if (m.t.peer < 0 || m.t.peer >= pp || m.t.peer == r)
            return fail(strprintf("rank %d: op %d names peer %d", r, i, m.t.peer));
          if (m.t.mb < 0 || m.t.mb >= M)
            return fail(strprintf("rank %d: op %d names micro-batch %d", r, i, m.t.mb));
          m.pair = m.t.send ? static_cast<size_t>(r) * P + static_cast<size_t>(m.t.peer)
                            : static_cast<size_t>(m.t.peer) * P + static_cast<size_t>(r);
          m.before = next_compute(r, i);
          const auto key = std::make_tuple(m.t.type, m.t.stage, m.t.mb);
          auto& same = m.t.send ? send_of[m.pair] : recv_of[m.pair];
          if (!m.t.send) {
            // Its slot is taken before op take[mb]: the first tick after that.
            m.earliest = next_compute(r, take[static_cast<size_t>(r)][static_cast<size_t>(m.t.mb)]);
            if (!k_of[m.pair].emplace(key, static_cast<int64_t>(same.size())).second)
              return fail(strprintf("rank %d receives the %s from rank %d twice", r,
                                    transfer_name(m.t).c_str(), m.t.peer));
            m.k = static_cast<int64_t>(same.size());
            same.push_back(static_cast<int>(msgs[static_cast<size_t>(r)].size()));
          } else {
            const auto it = k_of[m.pair].find(key);
            if (it == k_of[m.pair].end())
              return fail(strprintf("rank %d sends the %s to rank %d, which never receives it", r,
                                    transfer_name(m.t).c_str(), m.t.peer));
            m.k = it->second;
            if (same.size() <= static_cast<size_t>(m.k)) same.resize(static_cast<size_t>(m.k) + 1, -1);
            same[static_cast<size_t>(m.k)] = static_cast<int>(msgs[static_cast<size_t>(r)].size());
            m.earliest = m.before;
            m.latest = send_latest(r, i, m.t.mb, take[static_cast<size_t>(r)]);
          }
          msgs[static_cast<size_t>(r)].push_back(m);
        }
      }
    for (size_t pair = 0; pair < P * P; ++pair) {
      auto& sv = send_of[pair];
      const auto& rv = recv_of[pair];
      const int a = static_cast<int>(pair / P), b = static_cast<int>(pair % P);
      sv.resize(rv.size(), -1);
      for (size_t k = 0; k < rv.size(); ++k)
        if (sv[k] < 0)
          return fail(strprintf("rank %d receives the %s from rank %d, which never sends it", b,
                                transfer_name(msgs[static_cast<size_t>(b)][static_cast<size_t>(rv[k])].t).c_str(), a));
      // Sends go out in the receiver's order: one made early waits for those due before it.
      int at = 0;
      for (size_t k = 0; k < sv.size(); ++k) {
        Msg& m = msgs[static_cast<size_t>(a)][static_cast<size_t>(sv[k])];
        if (m.before < at) {
          if (at > m.latest)
            return fail(strprintf("rank %d cannot hold the %s for rank %d until the messages "
                                  "rank %d needs first have gone: its buffer is reused", a,
                                  transfer_name(m.t).c_str(), b, b));
          m.before = at;
          ++out.moved;
        }
        at = m.before;
      }
    }
    return true;
  }

  // The latest tick a send of `mb` made before op i may wait for: its buffer stays put until
  // the next compute op of the micro-batch on this rank. Without one, the send is its last
  // op and its slot is free after it: then until the tick where another micro-batch could
  // post a receive into that slot.
  int send_latest(int r, int i, int mb, const std::vector<int>& take) const {
    const auto& ops = ranks[static_cast<size_t>(r)];
    const int n = static_cast<int>(ops.size());
    for (int j = i + 1; j < n; ++j) {
      const PipeOp& o = ops[static_cast<size_t>(j)];
      if (!pipe_op_is_message(o.kind) &&
          (o.mb == mb || (o.kind == PipeOpKind::kForwardBackward && o.mb2 == mb)))
        return j;
    }
    int latest = n;
    for (int other = 0; other < M; ++other) {
      const int t = take[static_cast<size_t>(other)];
      if (other != mb && t > i) latest = std::min(latest, next_compute(r, t) - 1);
    }
    return latest;
  }

  // Order: receives from one sender must not be posted in a later tick than the ones sent
  // after them; an earlier-sent receive moves up to its successor's tick.
  bool keep_order() {
    const size_t P = static_cast<size_t>(pp);
    for (size_t pair = 0; pair < P * P; ++pair) {
      const int b = static_cast<int>(pair % P);
      auto& rv = recv_of[pair];
      for (size_t k = rv.size(); k-- > 1;) {
        Msg& lo = msgs[static_cast<size_t>(b)][static_cast<size_t>(rv[k - 1])];
        const Msg& hi = msgs[static_cast<size_t>(b)][static_cast<size_t>(rv[k])];
        if (lo.before <= hi.before) continue;
        if (hi.before < lo.earliest)
          return fail(strprintf("rank %d cannot receive the %s from rank %d before the %s it "
                                "sends later: its slot is not free that early", b,
                                transfer_name(lo.t).c_str(), lo.t.peer,
                                transfer_name(hi.t).c_str()));
        lo.before = hi.before;
        ++out.moved;
      }
    }
    return true;
  }

  // Builds each rank's ticks from the messages' `before`.
  void build_ticks() {
    out.ranks.assign(static_cast<size_t>(pp), {});
    tick_of.assign(static_cast<size_t>(pp), {});
    in_tick.assign(static_cast<size_t>(pp), {});
    for (int r = 0; r < pp; ++r) {
      std::vector<int> order(msgs[static_cast<size_t>(r)].size());
      for (size_t j = 0; j < order.size(); ++j) order[j] = static_cast<int>(j);
      const auto& ms = msgs[static_cast<size_t>(r)];
      // By tick; within one, per peer and direction in pair order (k), sends first.
      std::stable_sort(order.begin(), order.end(), [&](int x, int y) {
        const Msg& a = ms[static_cast<size_t>(x)];
        const Msg& b = ms[static_cast<size_t>(y)];
        return std::make_tuple(a.before, !a.t.send, a.t.peer, a.k) <
               std::make_tuple(b.before, !b.t.send, b.t.peer, b.k);
      });
      auto& ticks = out.ranks[static_cast<size_t>(r)];
      auto& msg_tick = tick_of[static_cast<size_t>(r)];
      auto& tick_msgs = in_tick[static_cast<size_t>(r)];
      msg_tick.assign(ms.size(), -1);
      for (int j : order) {
        const Msg& m = ms[static_cast<size_t>(j)];
        if (ticks.empty() || ticks.back().before != m.before) {
          ticks.push_back(PipeTick{m.before, {}});
          tick_msgs.emplace_back();
        }
        ticks.back().ops.push_back(m.op);
        tick_msgs.back().push_back(j);
        msg_tick[static_cast<size_t>(j)] = static_cast<int>(ticks.size()) - 1;
      }
    }
  }

  // Replays the ticks with rendezvous sends. Returns true when every rank finishes; else
  // moves one receive a stuck sender needs into its receiver's current tick and returns
  // false (or fails when no receive can move).
  bool replay(bool* finished) {
    *finished = false;
    const size_t P = static_cast<size_t>(pp);
    auto partner = [&](const Msg& m, int* q, int* qj) {
      *q = m.t.peer;
      *qj = m.t.send ? recv_of[m.pair][static_cast<size_t>(m.k)] : send_of[m.pair][static_cast<size_t>(m.k)];
    };
    std::vector<int> at(P, 0);
    std::vector<std::vector<uint8_t>> met(P);
    for (size_t r = 0; r < P; ++r) met[r].assign(msgs[r].size(), 0);
    for (bool progress = true; progress;) {
      progress = false;
      for (int r = 0; r < pp; ++r) {
        const size_t R = static_cast<size_t>(r);
        while (at[R] < static_cast<int>(in_tick[R].size())) {
          bool done = true;
          for (int j : in_tick[R][static_cast<size_t>(at[R])]) {
            if (met[R][static_cast<size_t>(j)]) continue;
            int q = 0, qj = 0;
            partner(msgs[R][static_cast<size_t>(j)], &q, &qj);
            if (at[static_cast<size_t>(q)] == tick_of[static_cast<size_t>(q)][static_cast<size_t>(qj)]) {
              met[R][static_cast<size_t>(j)] = 1;
              met[static_cast<size_t>(q)][static_cast<size_t>(qj)] = 1;
            } else {
              done = false;
            }
          }
          if (!done) break;
          ++at[R];
          progress = true;
        }
      }
    }
    bool all_done = true;
    for (size_t r = 0; r < P; ++r) all_done = all_done && at[r] == static_cast<int>(in_tick[r].size());
    if (all_done) {
      *finished = true;
      return true;
    }
    // A stuck send whose receive waits in a later tick of a rank that is stuck too: post the
    // receive in that rank's current tick, when its slot is free by then.
    for (int r = 0; r < pp; ++r) {
      const size_t R = static_cast<size_t>(r);
      if (at[R] >= static_cast<int>(in_tick[R].size())) continue;
      for (int j : in_tick[R][static_cast<size_t>(at[R])]) {
        const Msg& m = msgs[R][static_cast<size_t>(j)];
        if (met[R][static_cast<size_t>(j)] || !m.t.send) continue;
        int q = 0, qj = 0;
        partner(m, &q, &qj);
        const size_t Q = static_cast<size_t>(q);
        if (at[Q] >= static_cast<int>(in_tick[Q].size())) continue;
        Msg& rv = msgs[Q][static_cast<size_t>(qj)];
        const int now = out.ranks[Q][static_cast<size_t>(at[Q])].before;
        if (now < rv.earliest || now >= rv.before) continue;
        // Order: every receive sent before it on the pair moves up with it (keep_order).
        bool can = true;
        for (int64_t k = 0; k < m.k && can; ++k) {
          const Msg& lo = msgs[Q][static_cast<size_t>(recv_of[m.pair][static_cast<size_t>(k)])];
          can = lo.before <= now || lo.earliest <= now;
        }
        if (!can) continue;
        rv.before = now;
        ++out.moved;
        return true;
      }
    }
    std::string stuck;
    for (int r = 0; r < pp; ++r) {
      const size_t R = static_cast<size_t>(r);
      if (at[R] >= static_cast<int>(in_tick[R].size())) continue;
      std::string ops;
      for (int op : out.ranks[R][static_cast<size_t>(at[R])].ops)
        ops += (ops.empty() ? "" : " ") + pipe_op_to_string(ranks[R][static_cast<size_t>(op)]);
      stuck += strprintf("%srank %d in tick %d (%s)", stuck.empty() ? "" : ", ", r, at[R], ops.c_str());
    }
    return fail("deadlock under rendezvous sends: " + stuck);
  }

  void run() {
    if (!collect()) return;
    // Each round moves a receive earlier; there are finitely many places, so it ends.
    for (;;) {
      if (!keep_order()) return;
      build_ticks();
      bool finished = false;
      if (!replay(&finished)) return;
      if (finished) return;
    }
  }
};

}  // namespace

bool pipe_op_is_message(PipeOpKind k) {
  return k == PipeOpKind::kSendActivation || k == PipeOpKind::kRecvActivation ||
         k == PipeOpKind::kSendGradient || k == PipeOpKind::kRecvGradient;
}

PipeTransfer pipe_op_transfer(PipeSchedule kind, int pp, int rank, const PipeOp& op) {
  CHECK(pipe_op_is_message(op.kind), "op %s is not a message", pipe_op_kind_name(op.kind));
  const int s = schedule_stage_of(kind, pp, rank, op.chunk);
  switch (op.kind) {
    case PipeOpKind::kSendActivation: return {true, op.peer, 0, s + 1, op.mb};
    case PipeOpKind::kRecvActivation: return {false, op.peer, 0, s, op.mb};
    case PipeOpKind::kSendGradient: return {true, op.peer, 1, s - 1, op.mb};
    default: return {false, op.peer, 1, s, op.mb};
  }
}

std::vector<int> pipe_slot_take_index(const std::vector<PipeOp>& ops, int M) {
  std::vector<int> take(static_cast<size_t>(M), -1);
  for (int i = 0; i < static_cast<int>(ops.size()); ++i) {
    const PipeOp& op = ops[static_cast<size_t>(i)];
    for (int mb : {op.mb, op.kind == PipeOpKind::kForwardBackward ? op.mb2 : -1})
      if (mb >= 0 && mb < M && take[static_cast<size_t>(mb)] < 0) take[static_cast<size_t>(mb)] = i;
  }
  for (int& f : take) {
    if (f < 0) continue;
    for (int j = f - 1; j >= 0; --j)
      if (!pipe_op_is_message(ops[static_cast<size_t>(j)].kind)) {
        f = j;
        break;
      }
  }
  return take;
}

std::string pipeline_ticks_to_string(const std::vector<PipeOp>& ops,
                                     const std::vector<PipeTick>& ticks) {
  std::string out;
  size_t t = 0;
  auto put = [&](const std::string& s) { out += (out.empty() ? "" : " ") + s; };
  for (int i = 0; i <= static_cast<int>(ops.size()); ++i) {
    if (t < ticks.size() && ticks[t].before == i) {
      std::string group;
      for (int op : ticks[t].ops)
        group += (group.empty() ? "" : " ") + pipe_op_to_string(ops[static_cast<size_t>(op)]);
      put("[" + group + "]");
      ++t;
    }
    if (i < static_cast<int>(ops.size()) && !pipe_op_is_message(ops[static_cast<size_t>(i)].kind))
      put(pipe_op_to_string(ops[static_cast<size_t>(i)]));
  }
  return out;
}

PipeTickPlan pipeline_ticks_plan(PipeSchedule kind, int pp, int M) {
  return pipeline_ticks_plan_ops(kind, pp, M, schedule_all_ops(kind, pp, M));
}

PipeTickPlan pipeline_ticks_plan_ops(PipeSchedule kind, int pp, int M,
                                     const std::vector<std::vector<PipeOp>>& ranks) {
  CHECK(static_cast<int>(ranks.size()) == pp, "%zu op lists for pp %d", ranks.size(), pp);
  Planner p{kind, pp, M, ranks, {}, {}, {}, {}, {}, {}};
  p.run();
  return std::move(p.out);
}

}  // namespace moe
