#include "parallel/pipeline.h"

#include "parallel/watchdog.h"

#include <algorithm>
#include <cstring>

#include "model/check.h"
#include "model/wall_clock.h"

namespace moe {

namespace {

// Message tags: (activation 0 / gradient 1, the stage that receives, micro-batch).
int message_tag(const PipelinePlan& pl, int type, int recv_stage, int mb) {
  return (type * pl.S + recv_stage) * pl.M + mb;
}

}  // namespace

PipelinePlan pipeline_plan(PipeSchedule kind, int pp, int M, int rank,
                           const std::vector<int64_t>& bounds, const ModelDims& d) {
  PipelinePlan pl;
  pl.kind = kind;
  pl.pp = pp;
  pl.rank = rank;
  pl.M = M;
  pl.S = schedule_num_stages(kind, pp);
  pl.ops = schedule_rank_ops(kind, pp, M, rank);  // checks (kind, pp, M)
  CHECK(static_cast<int>(bounds.size()) == pl.S + 1 && bounds.front() == 0 && bounds.back() == d.L,
        "stage bounds do not cover the model");
  // Below 32767, which point-to-point groups use (Comm::p2p_group_start).
  CHECK(message_tag(pl, 1, pl.S - 1, M - 1) < 32767, "too many stages x micro-batches for MPI tags");
  pl.chunks = schedule_chunks_per_rank(kind);
  pl.part = ModelPart{std::vector<uint8_t>(static_cast<size_t>(d.L), 0), false, false};
  for (int c = 0; c < pl.chunks; ++c) {
    const int s = schedule_stage_of(kind, pp, rank, c);
    pl.stage[c] = s;
    pl.l0[c] = bounds[static_cast<size_t>(s)];
    pl.l1[c] = bounds[static_cast<size_t>(s) + 1];
    CHECK(pl.l0[c] < pl.l1[c], "stage %d has no layers", s);
    for (int64_t l = pl.l0[c]; l < pl.l1[c]; ++l) pl.part.layers[static_cast<size_t>(l)] = 1;
    pl.part.embedding = pl.part.embedding || s == 0;
    pl.part.head = pl.part.head || s == pl.S - 1;
  }
  // Each micro-batch's interval on this rank: from the compute op before its first op (so its
  // receives are posted a whole compute op ahead; pipe_slot_take_index, which the NCCL tick
  // plan shares) to its last op.
  const int n = static_cast<int>(pl.ops.size());
  std::vector<int> last(static_cast<size_t>(M), -1);
  for (int i = 0; i < n; ++i) {
    const PipeOp& op = pl.ops[static_cast<size_t>(i)];
    if (op.mb >= 0) last[static_cast<size_t>(op.mb)] = i;
    if (op.kind == PipeOpKind::kForwardBackward && op.mb2 >= 0) last[static_cast<size_t>(op.mb2)] = i;
    if (op.kind == PipeOpKind::kBackward || op.kind == PipeOpKind::kBackwardWeight ||
        op.kind == PipeOpKind::kForwardBackward)
      pl.last_backward_op = i;
    pl.split_backward = pl.split_backward || op.kind == PipeOpKind::kBackwardInput;
  }
  std::vector<std::vector<int>> starts(static_cast<size_t>(n)), ends(static_cast<size_t>(n));
  const std::vector<int> take = pipe_slot_take_index(pl.ops, M);
  for (int mb = 0; mb < M; ++mb) {
    const int f = take[static_cast<size_t>(mb)];
    if (f < 0) continue;
    starts[static_cast<size_t>(f)].push_back(mb);
    ends[static_cast<size_t>(last[static_cast<size_t>(mb)])].push_back(mb);
  }
  // Lowest free slot first; a slot freed after op i is free again before op i + 1.
  pl.slot_of.assign(static_cast<size_t>(M), -1);
  std::vector<uint8_t> busy;
  pl.n_slots = 0;
  for (int i = 0; i < n; ++i) {
    for (int mb : starts[static_cast<size_t>(i)]) {
      size_t s = 0;
      while (s < busy.size() && busy[s]) ++s;
      if (s == busy.size()) busy.push_back(0);
      busy[s] = 1;
      pl.slot_of[static_cast<size_t>(mb)] = static_cast<int>(s);
    }
    pl.n_slots = std::max(pl.n_slots, static_cast<int>(busy.size()));
    for (int mb : ends[static_cast<size_t>(i)]) busy[static_cast<size_t>(pl.slot_of[static_cast<size_t>(mb)])] = 0;
  }
  pl.acquire_at = std::move(starts);
  pl.n_slots = std::max(pl.n_slots, 1);
  // Each F&B pair's own messages: the receives its two chunks consume, standing right before
  // it, and the sends of what they produce, right after.
  pl.fb_msgs.assign(static_cast<size_t>(n), PipelinePlan::FbMessages{});
  pl.fb_of.assign(static_cast<size_t>(n), -1);
  for (int i = 0; i < n; ++i) {
    const PipeOp& fb = pl.ops[static_cast<size_t>(i)];
    if (fb.kind != PipeOpKind::kForwardBackward) continue;
    pl.has_fb = true;
    PipelinePlan::FbMessages& msg = pl.fb_msgs[static_cast<size_t>(i)];
    auto take = [&](int j, int* slot_index) {
      CHECK(*slot_index < 0, "F&B op %d: two messages of one kind", i);
      *slot_index = j;
      pl.fb_of[static_cast<size_t>(j)] = i;
    };
    for (int j = i - 1; j >= 0; --j) {
      const PipeOp& o = pl.ops[static_cast<size_t>(j)];
      if (o.kind == PipeOpKind::kRecvActivation && o.chunk == fb.chunk && o.mb == fb.mb) {
        take(j, &msg.recv_act);
      } else if (o.kind == PipeOpKind::kRecvGradient && o.chunk == fb.chunk2 && o.mb == fb.mb2) {
        take(j, &msg.recv_grad);
      } else {
        break;
      }
    }
    for (int j = i + 1; j < n; ++j) {
      const PipeOp& o = pl.ops[static_cast<size_t>(j)];
      if (o.kind == PipeOpKind::kSendActivation && o.chunk == fb.chunk && o.mb == fb.mb) {
        take(j, &msg.send_act);
      } else if (o.kind == PipeOpKind::kSendGradient && o.chunk == fb.chunk2 && o.mb == fb.mb2) {
        take(j, &msg.send_grad);
      } else {
        break;
      }
    }
  }
  return pl;
}

int64_t pipeline_buffer_bytes(const PipelinePlan& plan, int64_t B, int64_t T, int64_t C,
                              bool ticked) {
  const int64_t sc = int64_t{plan.n_slots} * plan.chunks, mb = B * T * C;
  const int64_t floats = ticked ? sc * mb : 3 * sc * mb + int64_t{plan.n_slots} * mb;
  return floats * static_cast<int64_t>(sizeof(float));
}

void pipeline_init(Pipeline& p, PipelinePlan plan, Comm* comm, std::vector<int> peer_rank,
                   int64_t B, int64_t T, int64_t C) {
  CHECK(static_cast<int>(peer_rank.size()) == plan.pp);
  CHECK(comm || plan.pp == 1, "a pipeline over several ranks needs a communicator");
  p.plan = std::move(plan);
  p.comm = comm;
  p.peer_rank = std::move(peer_rank);
  p.B = B;
  p.T = T;
  p.C = C;
  const size_t sc = static_cast<size_t>(p.plan.n_slots * p.plan.chunks);
  p.grad_in.assign(sc * static_cast<size_t>(B * T * C), 0.0f);
  p.act_in.assign(sc * static_cast<size_t>(B * T * C), 0.0f);
  p.act_out.assign(sc * static_cast<size_t>(B * T * C), 0.0f);
  p.grad_out.assign(static_cast<size_t>(p.plan.n_slots * B * T * C), 0.0f);
  p.recv_act.assign(sc, CommRequest{});
  p.recv_grad.assign(sc, CommRequest{});
  p.grad_received.assign(sc, 0);
  p.send_act.assign(sc, CommRequest{});
  p.send_grad.assign(static_cast<size_t>(p.plan.n_slots), CommRequest{});
  p.tokens.assign(static_cast<size_t>(B * T), 0);
  p.targets.assign(static_cast<size_t>(B * T), 0);
}

void pipeline_set_p2p(Pipeline& p, Comm* p2p, Device device) {
  const PipelinePlan& pl = p.plan;
  CHECK(p2p && p2p->size() == pl.pp && p2p->rank() == pl.rank,
        "the pipeline's point-to-point group must be its %d pipeline ranks in order", pl.pp);
  PipeTickPlan tp = pipeline_ticks_plan(pl.kind, pl.pp, pl.M);
  CHECK(tp.error.empty(), "schedule %s (pp %d, %d micro-batches) cannot run on NCCL: %s",
        schedule_kind_name(pl.kind), pl.pp, pl.M, tp.error.c_str());
  p.p2p = p2p;
  p.ticks = std::move(tp.ranks[static_cast<size_t>(pl.rank)]);
  p.tick_before.assign(pl.ops.size() + 1, -1);
  for (size_t t = 0; t < p.ticks.size(); ++t) {
    CHECK(static_cast<int>(p.ticks[t].ops.size()) <= Comm::kP2pGroupMax, "a tick of %zu transfers",
          p.ticks[t].ops.size());
    p.tick_before[static_cast<size_t>(p.ticks[t].before)] = static_cast<int>(t);
  }
  const size_t n = static_cast<size_t>(pl.n_slots * pl.chunks) * static_cast<size_t>(p.B * p.T * p.C);
  p.grad_arena = arena_build("pipeline gradients", [&](Carver& c) { p.grad_dev = c.take<float>(n); },
                             device);
  p.group.assign(static_cast<size_t>(Comm::kP2pGroupMax), P2pTransfer{});
  // The tagged path's host buffers are not used.
  p.grad_in = {};
  p.act_in = {};
  p.act_out = {};
  p.grad_out = {};
}

namespace {

struct Runner {
  Pipeline& p;
  Model<float>& m;
  const PipelineBatch& batch;
  float dloss_ce, dloss_aux;
  const std::function<void(bool)>& on_final;
  PipelineLoss loss;

  const PipelinePlan& pl() const { return p.plan; }
  int slot(int mb) const { return pl().slot_of[static_cast<size_t>(mb)]; }
  size_t sc(int mb, int chunk) const {
    return static_cast<size_t>(slot(mb) * pl().chunks + chunk);
  }
  size_t elems() const { return static_cast<size_t>(p.B * p.T * p.C); }
  size_t bytes() const { return elems() * sizeof(float); }
  float* residual(int mb, int64_t l) { return model_chunk_residual<float>(m, slot(mb), l, p.B, p.T); }
  float* grad_buffer(int mb, int chunk) {
    return (ticked() ? p.grad_dev : p.grad_in.data()) + sc(mb, chunk) * elems();
  }
  bool ticked() const { return p.p2p != nullptr; }
  // The model's memory is a device's: messages go through host copies (Pipeline::act_in).
  bool staged() const { return !ticked() && m.ops->device() != Device::kCpu; }
  float* act_in(int mb, int chunk) { return p.act_in.data() + sc(mb, chunk) * elems(); }

  void wait(CommRequest& r, double* blocked) {
    if (r.active) wait_on(*p.comm, r, blocked);
  }
  void wait_on(Comm& c, CommRequest& r, double* blocked) {
    if (!r.active) return;
    const double t = now_s();
    c.wait(r);
    if (blocked) *blocked += now_s() - t;
  }

  // The micro-batch takes its slot: the previous holder's sends must have left, then every
  // receive this micro-batch will need on this rank is posted.
  void acquire(int mb) {
    const int s = slot(mb);
    if (ticked()) {  // nothing in flight between ticks; receives go in the ticks
      for (int c = 0; c < pl().chunks; ++c) p.grad_received[static_cast<size_t>(s * pl().chunks + c)] = 0;
      return;
    }
    for (int c = 0; c < pl().chunks; ++c) {
      wait(p.send_act[static_cast<size_t>(s * pl().chunks + c)], nullptr);
      p.grad_received[static_cast<size_t>(s * pl().chunks + c)] = 0;
    }
    wait(p.send_grad[static_cast<size_t>(s)], nullptr);
    for (const PipeOp& op : pl().ops) {
      if (op.mb != mb) continue;
      const int stage = pl().stage[op.chunk];
      if (op.kind == PipeOpKind::kRecvActivation) {
        float* to = staged() ? act_in(mb, op.chunk) : residual(mb, pl().l0[op.chunk]);
        p.recv_act[sc(mb, op.chunk)] =
            p.comm->recv_start(to, bytes(), p.peer_rank[static_cast<size_t>(op.peer)],
                               message_tag(pl(), 0, stage, mb));
      } else if (op.kind == PipeOpKind::kRecvGradient) {
        p.recv_grad[sc(mb, op.chunk)] =
            p.comm->recv_start(grad_buffer(mb, op.chunk), bytes(), p.peer_rank[static_cast<size_t>(op.peer)],
                               message_tag(pl(), 1, stage, mb));
      }
    }
  }

  void forward(int chunk, int mb) {
    batch(mb, p.tokens.data(), p.targets.data());
    const double t = now_s();
    const ChunkLoss r = model_chunk_forward<float>(m, slot(mb), pl().l0[chunk], pl().l1[chunk],
                                                   p.tokens.data(), p.targets.data(), p.B, p.T, true);
    p.times.compute += now_s() - t;
    add_loss(chunk, r);
  }

  void add_loss(int chunk, const ChunkLoss& r) {
    if (pl().l1[chunk] == m.d.L) {
      loss.ce_sum += r.ce_mean;
      loss.mtp_sum += r.mtp_ce_mean;
    }
    loss.aux_sum += r.aux_sum;
  }

  // Before a backward's input pass writes the slot's residual gradient: the last one sent from
  // it must be out, and the received one goes in.
  void backward_prepare(int chunk, int mb, double* blocked) {
    wait(p.send_grad[static_cast<size_t>(slot(mb))], blocked);
    uint8_t& got = p.grad_received[sc(mb, chunk)];
    if (got) {
      float* to = model_chunk_grad<float>(m, slot(mb));
      if (ticked())
        m.ops->copy(to, grad_buffer(mb, chunk), bytes());
      else
        m.ops->upload(to, grad_buffer(mb, chunk), bytes());
      got = 0;
    }
  }

  void backward(int chunk, int mb, BackwardPart part) {
    if (part != BackwardPart::kWeight) backward_prepare(chunk, mb, &p.times.recv_wait);
    const double t = now_s();
    model_chunk_backward<float>(m, slot(mb), pl().l0[chunk], pl().l1[chunk], dloss_ce, dloss_aux,
                                part);
    p.times.compute += now_s() - t;
  }

  void recv_activation(const PipeOp& op, double* blocked) {
    wait(p.recv_act[sc(op.mb, op.chunk)], blocked);
    if (staged())
      m.ops->upload(residual(op.mb, pl().l0[op.chunk]), act_in(op.mb, op.chunk), bytes());
  }
  void recv_gradient(const PipeOp& op, double* blocked) {
    wait(p.recv_grad[sc(op.mb, op.chunk)], blocked);
    p.grad_received[sc(op.mb, op.chunk)] = 1;
  }
  // What a send reads: the model's buffer, or its host copy `stage` when staged.
  const float* send_source(const float* from, float* stage) {
    if (!staged()) return from;
    m.ops->download(stage, from, bytes());
    return stage;
  }
  void send_activation(const PipeOp& op) {
    const float* from = send_source(residual(op.mb, pl().l1[op.chunk]),
                                    p.act_out.data() + sc(op.mb, op.chunk) * elems());
    p.send_act[sc(op.mb, op.chunk)] = p.comm->send_start(
        from, bytes(), p.peer_rank[static_cast<size_t>(op.peer)],
        message_tag(pl(), 0, pl().stage[op.chunk] + 1, op.mb));
  }
  void send_gradient(const PipeOp& op) {
    const size_t s = static_cast<size_t>(slot(op.mb));
    const float* from = send_source(model_chunk_grad<float>(m, slot(op.mb)),
                                    p.grad_out.data() + s * elems());
    p.send_grad[s] = p.comm->send_start(from, bytes(), p.peer_rank[static_cast<size_t>(op.peer)],
                                        message_tag(pl(), 1, pl().stage[op.chunk] - 1, op.mb));
  }
  const PipeOp* op_at(int j) const { return j < 0 ? nullptr : &pl().ops[static_cast<size_t>(j)]; }

  // The tick planned before op i (ops.size(): after the last), posted as one group and
  // completed: sends from the model's buffers, receives into them (activations) or into
  // grad_dev (gradients).
  void run_tick(int i) {
    const int t = p.tick_before[static_cast<size_t>(i)];
    if (t < 0) return;
    const PipeTick& tick = p.ticks[static_cast<size_t>(t)];
    int n = 0;
    for (int j : tick.ops) {
      const PipeOp& op = pl().ops[static_cast<size_t>(j)];
      P2pTransfer& x = p.group[static_cast<size_t>(n++)];
      x = P2pTransfer{};
      x.bytes = bytes();
      x.peer = op.peer;
      switch (op.kind) {
        case PipeOpKind::kSendActivation: x.send = residual(op.mb, pl().l1[op.chunk]); break;
        case PipeOpKind::kSendGradient: x.send = model_chunk_grad<float>(m, slot(op.mb)); break;
        case PipeOpKind::kRecvActivation: x.recv = residual(op.mb, pl().l0[op.chunk]); break;
        default: x.recv = grad_buffer(op.mb, op.chunk); break;
      }
    }
    CommRequest r = p.p2p->p2p_group_start(p.group.data(), n);
    wait_on(*p.p2p, r, &p.times.recv_wait);
    for (int j : tick.ops) {
      const PipeOp& op = pl().ops[static_cast<size_t>(j)];
      if (op.kind == PipeOpKind::kRecvGradient) p.grad_received[sc(op.mb, op.chunk)] = 1;
    }
  }
  // An F&B pair: the forward of (chunk, mb) and the full backward of (chunk2, mb2), with the
  // messages each consumes and produces. Overlapped, the two advance in turns, each turn
  // running one chunk up to the start of its next expert exchange (model_chunk_step), so
  // every all-to-all of one chunk and the pair's pipeline messages are in flight while the
  // other computes (DeepSeek-V3 report, Figure 4). The turns are the same on every rank of
  // an EP group (same op list, same layers), which keeps its collectives in one order.
  void forward_backward(int i, const PipeOp& op) {
    // Ticked, the pair's messages are in the ticks around it.
    const PipelinePlan::FbMessages msg =
        ticked() ? PipelinePlan::FbMessages{} : pl().fb_msgs[static_cast<size_t>(i)];
    const double t0 = now_s();
    const double ex0 = m.exchange ? m.exchange->blocked_s() : 0.0;
    double msg_wait = 0;
    batch(op.mb, p.tokens.data(), p.targets.data());
    const bool overlap = p.overlap_fb;
    ChunkRun f = chunk_run_forward(slot(op.mb), pl().l0[op.chunk], pl().l1[op.chunk],
                                   p.tokens.data(), p.targets.data(), p.B, p.T, true, 0);
    ChunkRun b = chunk_run_backward(slot(op.mb2), pl().l0[op.chunk2], pl().l1[op.chunk2],
                                    dloss_ce, dloss_aux, BackwardPart::kFull, overlap ? 1 : 0);
    bool f_more = true, b_more = true, b_begun = false;
    if (const PipeOp* r = op_at(msg.recv_act)) recv_activation(*r, &msg_wait);
    auto step_f = [&] {
      f_more = model_chunk_step(m, f);
      if (f_more) return;
      add_loss(op.chunk, f.loss);
      if (const PipeOp* s = op_at(msg.send_act)) send_activation(*s);
    };
    auto step_b = [&] {
      if (!b_begun) {
        if (const PipeOp* r = op_at(msg.recv_grad)) recv_gradient(*r, &msg_wait);
        backward_prepare(op.chunk2, op.mb2, &msg_wait);
        b_begun = true;
      }
      b_more = model_chunk_step(m, b);
      if (!b_more)
        if (const PipeOp* s = op_at(msg.send_grad)) send_gradient(*s);
    };
    if (overlap) {
      while (f_more || b_more) {
        if (f_more) step_f();
        progress();
        if (b_more) step_b();
        progress();
      }
    } else {
      while (f_more) step_f();
      while (b_more) step_b();
    }
    const double dt = now_s() - t0;
    const double ex = m.exchange ? m.exchange->blocked_s() - ex0 : 0.0;
    p.times.compute += dt - msg_wait;
    p.times.recv_wait += msg_wait;
    p.times.fb_wall += dt;
    p.times.fb_comm_wait += msg_wait + ex;
    p.times.fb_pairs += 1;
  }

  // MPI moves messages inside library calls only: one between turns lets the other chunk's
  // exchange and the pair's sends advance.
  void progress() {
    if (m.exchange) m.exchange->progress();
  }

  void run() {
    const double t0 = now_s();
    const int n = static_cast<int>(pl().ops.size());
    for (int i = 0; i < n; ++i) {
      for (int mb : pl().acquire_at[static_cast<size_t>(i)]) acquire(mb);
      const PipeOp& op = pl().ops[static_cast<size_t>(i)];
      const bool final_op = i == pl().last_backward_op;
      if (p.watchdog) {
        p.watchdog->set_schedule_op(i, pipe_op_kind_name(op.kind));
        p.watchdog->set_micro_batch(op.mb);
      }
      if (ticked()) {
        if (pipe_op_is_message(op.kind)) continue;  // its tick runs it
        run_tick(i);
      } else if (pl().fb_of[static_cast<size_t>(i)] >= 0) {
        continue;  // its F&B pair runs it
      }
      switch (op.kind) {
        case PipeOpKind::kRecvActivation: recv_activation(op, &p.times.recv_wait); break;
        case PipeOpKind::kRecvGradient: recv_gradient(op, &p.times.recv_wait); break;
        case PipeOpKind::kSendActivation: send_activation(op); break;
        case PipeOpKind::kSendGradient: send_gradient(op); break;
        case PipeOpKind::kForward: forward(op.chunk, op.mb); break;
        case PipeOpKind::kBackward:
        case PipeOpKind::kBackwardInput:
        case PipeOpKind::kBackwardWeight: {
          const BackwardPart part = op.kind == PipeOpKind::kBackward        ? BackwardPart::kFull
                                    : op.kind == PipeOpKind::kBackwardInput ? BackwardPart::kInput
                                                                            : BackwardPart::kWeight;
          if (final_op && on_final) on_final(true);
          backward(op.chunk, op.mb, part);
          if (final_op && on_final) on_final(false);
          break;
        }
        case PipeOpKind::kForwardBackward:
          if (final_op && on_final) on_final(true);
          forward_backward(i, op);
          if (final_op && on_final) on_final(false);
          break;
      }
    }
    if (ticked()) run_tick(n);
    if (p.watchdog) {
      p.watchdog->set_schedule_op(-1, nullptr);
      p.watchdog->set_micro_batch(-1);
    }
    // Nothing may stay in flight past the step: the next step reuses every buffer.
    for (CommRequest& r : p.send_act) wait(r, nullptr);
    for (CommRequest& r : p.send_grad) wait(r, nullptr);
    for (CommRequest& r : p.recv_act) CHECK(!r.active, "a posted receive was never used");
    for (CommRequest& r : p.recv_grad) CHECK(!r.active, "a posted receive was never used");
    p.times.wall = now_s() - t0;
  }
};

}  // namespace

PipelineLoss pipeline_run(Pipeline& p, Model<float>& m, const PipelineBatch& batch,
                          float dloss_ce, float dloss_aux,
                          const std::function<void(bool)>& on_final_backward) {
  CHECK(static_cast<int>(m.slots.size()) >= p.plan.n_slots, "model has %zu slots, plan needs %d",
        m.slots.size(), p.plan.n_slots);
  p.times = PipelineTimes{};
  Runner r{p, m, batch, dloss_ce, dloss_aux, on_final_backward, {}};
  r.run();
  return r.loss;
}

namespace {

// One blocking transfer as a group of one (the ticked path's send or receive).
void p2p_one(Comm& c, const void* send, void* recv, size_t bytes, int peer) {
  P2pTransfer x;
  x.send = send;
  x.recv = recv;
  x.bytes = bytes;
  x.peer = peer;
  CommRequest r = c.p2p_group_start(&x, 1);
  c.wait(r);
}

}  // namespace

double pipeline_forward_only(Pipeline& p, Model<float>& m, const int32_t* tokens,
                             const int32_t* targets) {
  const PipelinePlan& pl = p.plan;
  const size_t bytes = static_cast<size_t>(p.B * p.T * p.C) * sizeof(float);
  // Through host copies as pipeline_run, unless ticked (p2p: device buffers directly).
  const bool staged = !p.p2p && m.ops->device() != Device::kCpu;
  double loss = 0;
  // Stages in order, placed as micro-batch 0 (DualPipe's first direction). Each message goes
  // from stage s to s + 1 and every rank walks the stages in the same order, so blocking
  // (even rendezvous) sends and receives cannot deadlock.
  for (int s = 0; s < pl.S; ++s) {
    const PipePlace here = schedule_place(pl.kind, pl.pp, pl.M, s, 0);
    if (here.rank != pl.rank) continue;
    const int c = here.chunk;
    const int prev = s > 0 ? schedule_place(pl.kind, pl.pp, pl.M, s - 1, 0).rank : pl.rank;
    if (prev != pl.rank) {
      float* in = model_chunk_residual<float>(m, 0, pl.l0[c], p.B, p.T);
      if (p.p2p) {
        p2p_one(*p.p2p, nullptr, in, bytes, prev);
      } else {
        p.comm->recv(staged ? p.act_in.data() : in, bytes, p.peer_rank[static_cast<size_t>(prev)],
                     message_tag(pl, 0, s, 0));
        if (staged) m.ops->upload(in, p.act_in.data(), bytes);
      }
    }
    const ChunkLoss r = model_chunk_forward<float>(m, 0, pl.l0[c], pl.l1[c], tokens, targets, p.B,
                                                   p.T, false);
    if (pl.l1[c] == m.d.L) loss = r.ce_mean;
    const int next = s + 1 < pl.S ? schedule_place(pl.kind, pl.pp, pl.M, s + 1, 0).rank : pl.rank;
    if (next != pl.rank) {
      const float* out = model_chunk_residual<float>(m, 0, pl.l1[c], p.B, p.T);
      if (p.p2p) {
        p2p_one(*p.p2p, out, nullptr, bytes, next);
      } else {
        if (staged) {
          m.ops->download(p.act_out.data(), out, bytes);
          out = p.act_out.data();
        }
        p.comm->send(out, bytes, p.peer_rank[static_cast<size_t>(next)], message_tag(pl, 0, s + 1, 0));
      }
    }
  }
  return loss;
}

}  // namespace moe
