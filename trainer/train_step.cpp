#include "trainer/train_step.h"

#include <algorithm>
#include <cmath>

#include "io/config_model.h"
#include "model/check.h"
#include "model/kernels/cpu/moe_ops.h"
#include "model/model_stages.h"
#include "parallel/watchdog.h"
#ifdef MOETRAIN_HAVE_CUDA
#include "model/kernels/cuda/cuda_ops.h"
#include "optim/optim_ops_cuda.h"
#endif

namespace moe {

void windows_split(int32_t* inputs, int32_t* targets, const int32_t* windows, int64_t B, int64_t T_) {
  for (int64_t b = 0; b < B; ++b) {
    const int32_t* w = windows + b * (T_ + 1);
    for (int64_t t = 0; t < T_; ++t) {
      inputs[b * T_ + t] = w[t];
      targets[b * T_ + t] = w[t + 1];
    }
  }
}

void train_state_set_watchdog(TrainState& s, Watchdog* w) {
  s.watchdog = w;
  if (s.pipe) s.pipe->watchdog = w;
}

Comm* train_world_comm(const TrainState& s) {
  return s.grid && s.grid->world ? s.grid->world.get() : nullptr;
}

namespace {

// Builds a region's shard over `comm` (null: whole) at state offset `state_offset`.
ShardRegion shard_region(const ParamRegion& r, Comm* comm, int64_t state_offset) {
  ShardRegion s;
  s.comm = comm;
  s.begin = static_cast<int64_t>(r.offset);
  s.count = static_cast<int64_t>(r.count);
  const int64_t P = comm ? comm->size() : 1, mine = comm ? comm->rank() : 0;
  CHECK(s.count % P == 0);
  s.shard = s.count / P;
  s.shard_begin = s.begin + mine * s.shard;
  s.state_offset = state_offset;
  return s;
}

// The reduced gradient of a region's shard: the reduce-scatter result, or the buffer itself
// when the region is not sharded.
float* region_grad(TrainState& s, const ShardRegion& r) {
  return r.comm ? s.grad_shard + r.state_offset : s.model.grads + r.shard_begin;
}

// The gradient tensor that went bad first in backward order with a non-finite element on any
// rank, or "" when every gradient is finite: the one of the highest layer (backward starts at
// the head, MTP modules before it), the latest in the table within it. Collective over the
// job; only after a step found a non-finite sum, so its extra passes cost nothing otherwise.
std::string first_nonfinite_tensor(TrainState& s) {
  const Model<float>& m = s.model;
  // (layer + 1) * 2^24 + id orders tensors by layer, then table position; exact in a double.
  auto key = [](const ParamInfo& p) {
    return static_cast<double>(p.layer + 1) * 16777216.0 + static_cast<double>(p.id);
  };
  double worst = -1;
  for (const ShardRegion& r : s.regions) {
    const int64_t lo = r.shard_begin, hi = r.shard_begin + r.shard;
    const float* g = region_grad(s, r);
    for (const ParamInfo& p : m.table) {
      const int64_t a = std::max<int64_t>(lo, static_cast<int64_t>(p.offset));
      const int64_t b = std::min<int64_t>(hi, static_cast<int64_t>(p.offset + p.count));
      if (a >= b || key(p) <= worst) continue;
      if (!std::isfinite(s.optim->sum_squares(g + (a - lo), b - a))) worst = key(p);
    }
  }
  if (Comm* world = train_world_comm(s)) world->all_reduce_max(&worst, 1);
  if (worst < 0) return "";
  // The whole model's table, for a name every rank agrees on.
  for (const ParamInfo& p : model_param_table(m.d.whole_model()))
    if (key(p) == worst) return p.name;
  return "?";
}

}  // namespace

void train_state_init(TrainState& s, const Config& cfg, const ProcessGrid* grid, Device device) {
  CHECK(device != Device::kAuto, "resolve run.device before building the training state");
  s.cfg = cfg;
  s.grid = grid;
  s.device = device;
  ModelDims d = config_model_dims(cfg);
  const int64_t B = cfg.training.micro_batch;
  const int dp = grid ? grid->dp : 1;
  const int pp = grid ? grid->pp : 1;
  d.ep = grid ? grid->ep : 1;
  d.ep_rank = grid ? grid->ep_rank : 0;
  s.micro_batches = cfg.training.global_batch / (cfg.training.micro_batch * dp);
  // ZeRO-1 groups: every rank holding the same parameters (DualPipe's two copies included).
  Comm* param_comm = grid ? grid->param_comm.get() : nullptr;
  Comm* expert_param_comm = grid ? grid->expert_param_comm.get() : nullptr;
  ModelPart part = model_part_whole(d);
  s.root_part = part;
  int n_slots = 1;
  int exchange_lanes = 1;
  bool split_backward = false;
  if (pp > 1) {
    const PipeSchedule kind = cfg.parallel.schedule;
    const int M = static_cast<int>(s.micro_batches);
    s.stage_bounds = model_stage_bounds(d, schedule_num_stages(kind, pp), cfg.parallel.stage_layers);
    PipelinePlan plan = pipeline_plan(kind, pp, M, grid->pp_rank, s.stage_bounds, d);
    s.root_part = pipeline_plan(kind, pp, M, 0, s.stage_bounds, d).part;
    part = plan.part;
    n_slots = plan.n_slots;
    split_backward = plan.split_backward;
    exchange_lanes = plan.has_fb ? 2 : 1;  // an F&B pair's two chunks exchange at once
    std::vector<int> peers;
    for (int q = 0; q < pp; ++q) peers.push_back(grid->pp_peer(q));
    s.pipe = std::make_unique<Pipeline>();
    pipeline_init(*s.pipe, std::move(plan), grid->world.get(), std::move(peers), B, d.T, d.C);
    s.pipe->overlap_fb = cfg.parallel.fb_overlap;
  }
  model_build<float>(s.model, d, B, param_comm ? param_comm->size() : 1,
                     expert_param_comm ? expert_param_comm->size() : 1, part, n_slots,
                     split_backward, device);
  model_init<float>(s.model, cfg.run.seed);
  Model<float>& m = s.model;
  const bool has_exchange = d.ep > 1 && d.n_moe_blocks() > 0;
  if (device == Device::kCuda) {
    // The ZeRO-1 groups and the expert exchange move device tensors: their NCCL twins take
    // that traffic.
#ifdef MOETRAIN_HAVE_CUDA
    device_comms_init(s.dev, param_comm, expert_param_comm, has_exchange ? grid->ep_comm.get() : nullptr,
                      s.pipe ? grid->pp_comm.get() : nullptr, ops_cuda_stream(*m.ops),
                      cfg.parallel.timeout_s);
#endif
    if (s.dev.param) param_comm = s.dev.param.get();
    if (s.dev.expert_param) expert_param_comm = s.dev.expert_param.get();
    // Without NCCL in the build the pipeline stages its messages through host memory.
    if (s.dev.pp) pipeline_set_p2p(*s.pipe, s.dev.pp.get(), device);
  }
  if (has_exchange) {
    CHECK(grid && grid->ep_comm);
    // One routing plan per (activation slot, MoE block): each micro-batch in flight keeps its own.
    s.exchange = std::make_unique<EpExchange>(*grid->ep_comm, d.E, n_slots * d.n_moe_blocks(),
                                              moe_rows_max(d, B * d.T), d.C, exchange_lanes,
                                              d.dispatch_fp8 ? EpWireFormat::kFp8Bf16
                                                             : EpWireFormat::kFloat);
    m.exchange = s.exchange.get();
    if (device == Device::kCuda) {
      CHECK(s.dev.ep, "the expert exchange on a GPU needs NCCL");
      s.exchange->set_device(*m.ops, *s.dev.ep, Device::kCuda);
    }
  }
  s.regions[0] = shard_region(m.replicated, param_comm, 0);
  s.regions[1] = shard_region(m.experts, expert_param_comm, s.regions[0].shard);
  s.state_size = s.regions[0].shard + s.regions[1].shard;
  const size_t n = static_cast<size_t>(s.state_size);
  const bool any_sharded = s.regions[0].comm || s.regions[1].comm;
  s.adam_m = s.adam_v = nullptr;
  s.adam_m_bf16 = s.adam_v_bf16 = nullptr;
  s.opt_arena = arena_build("optimizer state", [&](Carver& c) {
    if (cfg.optim.state_dtype == StateDtype::kBf16) {
      s.adam_m_bf16 = c.take<uint16_t>(n);
      s.adam_v_bf16 = c.take<uint16_t>(n);
    } else {
      s.adam_m = c.take<float>(n);
      s.adam_v = c.take<float>(n);
    }
    s.grad_shard = any_sharded ? c.take<float>(n) : nullptr;
  }, device);
  const int64_t largest_shard = std::max(s.regions[0].shard, s.regions[1].shard);
  if (device == Device::kCpu) {
    s.optim = optim_ops_cpu(largest_shard);
  } else {
#ifdef MOETRAIN_HAVE_CUDA
    s.optim = optim_ops_cuda(ops_cuda_stream(*m.ops), largest_shard);
#endif
    CHECK(s.optim, "this build has no CUDA backend");
  }
  s.decay.clear();
  for (const ParamInfo& p : m.table) s.decay.push_back(p.decay ? 1 : 0);
  // Gradient buckets: each tensor is final once backward passes its stage.
  std::vector<GradRegion> regions;
  for (const ShardRegion& r : s.regions)
    regions.push_back(GradRegion{r.comm, r.begin, r.count, r.comm ? region_grad(s, r) : nullptr});
  std::vector<GradSpan> spans;
  for (const ParamInfo& p : m.table)
    spans.push_back(GradSpan{p.routed_experts ? 1 : 0, static_cast<int64_t>(p.offset),
                             static_cast<int64_t>(p.offset + p.count), model_grad_stage(d, p)});
  const int64_t bucket_elems =
      std::max<int64_t>(1, static_cast<int64_t>(cfg.parallel.bucket_mb * 1024 * 1024 / sizeof(float)));
  grad_reducer_init(s.reducer, std::move(regions), spans, bucket_elems);
  s.window.assign(static_cast<size_t>(B * (d.T + 1)), 0);
  s.inputs.assign(static_cast<size_t>(B * d.T), 0);
  s.targets.assign(static_cast<size_t>(B * d.T), 0);
  s.lr_plan.kind = cfg.lr.schedule;
  s.lr_plan.peak = cfg.optim.lr;
  s.lr_plan.warmup = cfg.lr.warmup_steps;
  s.lr_plan.total = cfg.training.steps;
  s.lr_plan.min_ratio = cfg.lr.min_lr_ratio;
  s.lr_plan.decay_fraction = cfg.lr.decay_fraction;
}

StepStats train_step(TrainState& s, int64_t step, const BatchSource& source) {
  // The GEMMs of this step read the weights the last update (or init, or a load) left.
  model_quantize_weights(s.model);
  Model<float>& m = s.model;
  const ModelDims& d = m.d;
  Comm* world = train_world_comm(s);
  const int64_t B = s.cfg.training.micro_batch, T_ = d.T;
  const int64_t global_batch = s.cfg.training.global_batch;
  const int64_t dp_rank = s.grid ? s.grid->dp_rank : 0, dp_size = s.grid ? s.grid->dp : 1;
  StepStats st;
  model_zero_grads<float>(m);
  std::fill_n(m.expert_load, d.n_moe_blocks() * d.E, int64_t{0});
  // The loss is the mean over every target token of the global batch; the balance loss the
  // mean over its sequences. Each micro-batch contributes its share of both gradients, so
  // the sum over micro-batches and ranks is the global batch's gradient.
  const float dloss_ce = 1.0f / static_cast<float>(global_batch * T_);
  const float dloss_aux = 1.0f / static_cast<float>(global_batch);
  double sums[3] = {0, 0, 0};  // cross-entropy means, balance losses, MTP cross-entropy means
  grad_reducer_begin(s.reducer, m.grads);
  // The op that makes gradients final runs with the reducer watching each stage finish,
  // so each bucket's reduction starts as soon as its stage is done.
  auto watch_final = [&s, &m](bool on) {
    if (!s.overlap_reduction) return;
    if (on) {
      m.grads_ready = [&s](int64_t stage) { grad_reducer_stage_done(s.reducer, stage); };
    } else {
      m.grads_ready = nullptr;
    }
  };
  if (s.pipe) {
    // Data-parallel rank r runs the r-th contiguous block of the step's micro-batches.
    const PipelineBatch batch = [&](int mb, int32_t* tokens, int32_t* targets) {
      source(s.window.data(), step, (dp_rank * s.micro_batches + mb) * B, B);
      windows_split(tokens, targets, s.window.data(), B, T_);
    };
    const PipelineLoss r = pipeline_run(*s.pipe, m, batch, dloss_ce, dloss_aux, watch_final);
    sums[0] = r.ce_sum;
    sums[1] = r.aux_sum;
    sums[2] = r.mtp_sum;
  } else {
    for (int64_t i = 0; i < s.micro_batches; ++i) {
      const int64_t mb = dp_rank * s.micro_batches + i;
      if (s.watchdog) s.watchdog->set_micro_batch(static_cast<int>(i));
      source(s.window.data(), step, mb * B, B);
      windows_split(s.inputs.data(), s.targets.data(), s.window.data(), B, T_);
      const ChunkLoss r =
          model_chunk_forward<float>(m, 0, 0, d.L, s.inputs.data(), s.targets.data(), B, T_, true);
      sums[0] += r.ce_mean;
      sums[1] += r.aux_sum;
      sums[2] += r.mtp_ce_mean;
      const bool last = i + 1 == s.micro_batches;
      if (last) watch_final(true);
      model_backward<float>(m, dloss_ce, dloss_aux);
      if (last) watch_final(false);
    }
  }
  if (s.watchdog) s.watchdog->set_micro_batch(-1);
  grad_reducer_finish(s.reducer);
  // Each micro-batch's loss is computed on one rank and each MoE layer's load counted where
  // the layer runs, so sums over the whole job give the global batch's.
  const int64_t n_moe = d.n_moe_blocks() * d.E;
  if (world) {
    world->all_reduce_sum(sums, 3);
    world->all_reduce_sum(m.expert_load, n_moe);
  }
  st.loss = sums[0] / static_cast<double>(s.micro_batches * dp_size);
  st.aux_loss = sums[1] / static_cast<double>(global_batch);
  st.mtp_loss = sums[2] / static_cast<double>(s.micro_batches * dp_size);
  // Every parameter element is in exactly one rank's shard of one region (DualPipe's two
  // copies share one group, so they count once).
  double sq = 0;
  for (const ShardRegion& r : s.regions)
    sq += s.optim->sum_squares(region_grad(s, r), r.shard);
  if (world) world->all_reduce_sum(&sq, 1);
  st.grad_norm = std::sqrt(sq);
  st.lr = lr_at(s.lr_plan, step);
  // The guards. Every value here was summed over the job, so every rank decides alike: a
  // non-finite loss or gradient (NaN or Inf anywhere makes the sum of squares non-finite:
  // the check costs nothing beyond the norm), or a loss over the spike limit, drops the
  // whole update (parameters, moments and router biases stay as they were).
  st.nonfinite = !std::isfinite(sq) || !std::isfinite(sums[0]) || !std::isfinite(sums[1]) ||
                 !std::isfinite(sums[2]);
  st.spike = !st.nonfinite && st.loss > s.loss_limit;
  if (st.nonfinite || st.spike) {
    st.applied = false;
    if (st.nonfinite) st.first_bad = first_nonfinite_tensor(s);
    return st;
  }
  AdamWStep as;
  as.lr = static_cast<float>(st.lr);
  as.beta1 = static_cast<float>(s.cfg.optim.beta1);
  as.beta2 = static_cast<float>(s.cfg.optim.beta2);
  as.eps = static_cast<float>(s.cfg.optim.eps);
  as.weight_decay = static_cast<float>(s.cfg.optim.weight_decay);
  as.t = step + 1;
  as.grad_scale = grad_clip_scale(st.grad_norm, s.cfg.optim.grad_clip);
  // Update the part of every tensor that falls inside this rank's shards.
  for (const ShardRegion& r : s.regions) {
    const int64_t lo = r.shard_begin, hi = r.shard_begin + r.shard;
    const float* g = region_grad(s, r);
    for (size_t i = 0; i < m.table.size(); ++i) {
      const ParamInfo& p = m.table[i];
      const int64_t a = std::max<int64_t>(lo, static_cast<int64_t>(p.offset));
      const int64_t b = std::min<int64_t>(hi, static_cast<int64_t>(p.offset + p.count));
      if (a >= b) continue;
      const int64_t k = r.state_offset + (a - lo);  // element a's index in the moments
      if (s.adam_m_bf16) {
        s.optim->adamw_bf16(m.params + a, g + (a - lo), s.adam_m_bf16 + k, s.adam_v_bf16 + k,
                            b - a, as, s.decay[i] != 0);
      } else {
        s.optim->adamw(m.params + a, g + (a - lo), s.adam_m + k, s.adam_v + k, b - a, as,
                       s.decay[i] != 0);
      }
    }
    if (r.comm) r.comm->all_gather(m.params + r.begin, nullptr, r.shard);
  }
  // Auxiliary-loss-free balancing: once per step, from the whole global batch's load (the
  // same on every rank after the all-reduce, so every rank updates its biases identically).
  double imbalance = 0;
  for (int64_t l = 0; l < d.n_moe_blocks(); ++l) {
    const int64_t* load = m.expert_load + l * d.E;
    imbalance += cpu::expert_load_imbalance(load, d.E);
    cpu::router_bias_update(m.router_bias + l * d.E, load, d.E, s.cfg.moe.bias_update_speed);
  }
  st.imbalance = d.n_moe_blocks() > 0 ? imbalance / static_cast<double>(d.n_moe_blocks()) : 0;
  return st;
}

double eval_loss(TrainState& s, int64_t n_batches, const BatchSource& source) {
  model_quantize_weights(s.model);
  const int64_t B = s.cfg.training.micro_batch, T_ = s.model.d.T;
  const int64_t dp_rank = s.grid ? s.grid->dp_rank : 0, dp_size = s.grid ? s.grid->dp : 1;
  double sum = 0;
  // Every rank runs the same number of forwards (the expert exchange is collective); a rank
  // past the end repeats a batch and drops its loss.
  const int64_t rounds = (n_batches + dp_size - 1) / dp_size;
  for (int64_t k = 0; k < rounds; ++k) {
    const int64_t i = k * dp_size + dp_rank;
    source(s.window.data(), 0, (i < n_batches ? i : 0) * B, B);
    windows_split(s.inputs.data(), s.targets.data(), s.window.data(), B, T_);
    // With a pipeline the loss is computed on one rank of the replica, 0 elsewhere.
    const double loss =
        s.pipe ? pipeline_forward_only(*s.pipe, s.model, s.inputs.data(), s.targets.data())
               : model_forward<float>(s.model, s.inputs.data(), s.targets.data(), B, T_, false);
    if (i < n_batches) sum += loss;
  }
  if (Comm* world = train_world_comm(s)) world->all_reduce_sum(&sum, 1);
  return n_batches > 0 ? sum / static_cast<double>(n_batches) : 0.0;
}

}  // namespace moe
