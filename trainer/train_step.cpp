#include "trainer/train_step.h"

#include <algorithm>
#include <cmath>

#include "io/config_model.h"
#include "model/check.h"
#include "model/kernels/cpu/moe_ops.h"

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

Comm* train_dp_comm(const TrainState& s) {
  return s.grid && s.grid->dp_comm ? s.grid->dp_comm.get() : nullptr;
}

void train_state_init(TrainState& s, const Config& cfg, const ProcessGrid* grid) {
  s.cfg = cfg;
  s.grid = grid;
  const ModelDims d = config_model_dims(cfg);
  const int64_t B = cfg.training.micro_batch;
  const int dp = grid ? grid->dp : 1;
  model_build<float>(s.model, d, B, dp);
  model_init<float>(s.model, cfg.run.seed);
  s.shard = static_cast<int64_t>(s.model.n_alloc) / dp;
  s.shard_begin = static_cast<int64_t>(grid ? grid->dp_rank : 0) * s.shard;
  const size_t n = static_cast<size_t>(s.shard);
  s.opt_arena = arena_build("optimizer state", [&](Carver& c) {
    s.adam_m = c.take<float>(n);
    s.adam_v = c.take<float>(n);
    s.grad_shard = dp > 1 ? c.take<float>(n) : nullptr;
  });
  s.decay.clear();
  for (const ParamInfo& p : s.model.table) s.decay.push_back(p.decay ? 1 : 0);
  s.window.assign(static_cast<size_t>(B * (d.T + 1)), 0);
  s.inputs.assign(static_cast<size_t>(B * d.T), 0);
  s.targets.assign(static_cast<size_t>(B * d.T), 0);
  s.norm_partials.assign(static_cast<size_t>(grad_norm_blocks(s.shard)), 0.0);
  s.micro_batches = cfg.training.global_batch / (cfg.training.micro_batch * dp);
  s.lr_plan.kind = cfg.lr.schedule;
  s.lr_plan.peak = cfg.optim.lr;
  s.lr_plan.warmup = cfg.lr.warmup_steps;
  s.lr_plan.total = cfg.training.steps;
  s.lr_plan.min_ratio = cfg.lr.min_lr_ratio;
  s.lr_plan.decay_fraction = cfg.lr.decay_fraction;
}

StepStats train_step(TrainState& s, int64_t step, const BatchSource& source) {
  Model<float>& m = s.model;
  const ModelDims& d = m.d;
  Comm* dp = train_dp_comm(s);
  const int64_t B = s.cfg.training.micro_batch, T_ = d.T;
  const int64_t global_batch = s.cfg.training.global_batch;
  const int64_t dp_rank = s.grid ? s.grid->dp_rank : 0, dp_size = s.grid ? s.grid->dp : 1;
  StepStats st;
  model_zero_grads<float>(m);
  std::fill_n(m.expert_load, d.n_moe_layers() * d.E, int64_t{0});
  // The loss is the mean over every target token of the global batch; the balance loss the
  // mean over its sequences. Each micro-batch contributes its share of both gradients, so
  // the sum over micro-batches and ranks is the global batch's gradient.
  const float dloss_ce = 1.0f / static_cast<float>(global_batch * T_);
  const float dloss_aux = 1.0f / static_cast<float>(global_batch);
  double sums[2] = {0, 0};  // cross-entropy means, balance losses
  for (int64_t i = 0; i < s.micro_batches; ++i) {
    // Rank r runs the r-th contiguous block of the step's micro-batches.
    const int64_t mb = dp_rank * s.micro_batches + i;
    source(s.window.data(), step, mb * B, B);
    windows_split(s.inputs.data(), s.targets.data(), s.window.data(), B, T_);
    sums[0] += model_forward<float>(m, s.inputs.data(), s.targets.data(), B, T_, true);
    sums[1] += m.aux_loss_sum;
    model_backward<float>(m, dloss_ce, dloss_aux);
  }
  const int64_t n_moe = d.n_moe_layers() * d.E;
  float* g = m.grads + s.shard_begin;
  if (dp) {
    dp->all_reduce_sum(sums, 2);
    dp->all_reduce_sum(m.expert_load, n_moe);
    dp->reduce_scatter_sum(s.grad_shard, m.grads, s.shard);
    g = s.grad_shard;
  }
  st.loss = sums[0] / static_cast<double>(s.micro_batches * dp_size);
  st.aux_loss = sums[1] / static_cast<double>(global_batch);
  double sq = grad_sum_squares(g, s.shard, s.norm_partials.data());
  if (dp) dp->all_reduce_sum(&sq, 1);
  st.grad_norm = std::sqrt(sq);
  st.lr = lr_at(s.lr_plan, step);
  AdamWStep as;
  as.lr = static_cast<float>(st.lr);
  as.beta1 = static_cast<float>(s.cfg.optim.beta1);
  as.beta2 = static_cast<float>(s.cfg.optim.beta2);
  as.eps = static_cast<float>(s.cfg.optim.eps);
  as.weight_decay = static_cast<float>(s.cfg.optim.weight_decay);
  as.t = step + 1;
  as.grad_scale = grad_clip_scale(st.grad_norm, s.cfg.optim.grad_clip);
  // Update the part of every tensor that falls inside this rank's shard.
  const int64_t lo = s.shard_begin, hi = s.shard_begin + s.shard;
  for (size_t i = 0; i < m.table.size(); ++i) {
    const ParamInfo& p = m.table[i];
    const int64_t a = std::max<int64_t>(lo, static_cast<int64_t>(p.offset));
    const int64_t b = std::min<int64_t>(hi, static_cast<int64_t>(p.offset + p.count));
    if (a >= b) continue;
    adamw_update(m.params + a, g + (a - lo), s.adam_m + (a - lo), s.adam_v + (a - lo), b - a, as,
                 s.decay[i] != 0);
  }
  if (dp) dp->all_gather(m.params, nullptr, s.shard);
  // Auxiliary-loss-free balancing: once per step, from the whole global batch's load (the
  // same on every rank after the all-reduce, so every rank updates its biases identically).
  double imbalance = 0;
  for (int64_t l = 0; l < d.n_moe_layers(); ++l) {
    const int64_t* load = m.expert_load + l * d.E;
    imbalance += cpu::expert_load_imbalance(load, d.E);
    cpu::router_bias_update(m.router_bias + l * d.E, load, d.E, s.cfg.moe.bias_update_speed);
  }
  st.imbalance = d.n_moe_layers() > 0 ? imbalance / static_cast<double>(d.n_moe_layers()) : 0;
  return st;
}

double eval_loss(TrainState& s, int64_t n_batches, const BatchSource& source) {
  const int64_t B = s.cfg.training.micro_batch, T_ = s.model.d.T;
  const int64_t dp_rank = s.grid ? s.grid->dp_rank : 0, dp_size = s.grid ? s.grid->dp : 1;
  double sum = 0;
  for (int64_t i = dp_rank; i < n_batches; i += dp_size) {
    source(s.window.data(), 0, i * B, B);
    windows_split(s.inputs.data(), s.targets.data(), s.window.data(), B, T_);
    sum += model_forward<float>(s.model, s.inputs.data(), s.targets.data(), B, T_, false);
  }
  if (Comm* dp = train_dp_comm(s)) dp->all_reduce_sum(&sum, 1);
  return n_batches > 0 ? sum / static_cast<double>(n_batches) : 0.0;
}

}  // namespace moe
