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

void train_state_init(TrainState& s, const Config& cfg) {
  s.cfg = cfg;
  const ModelDims d = config_model_dims(cfg);
  const int64_t B = cfg.training.micro_batch;
  model_build<float>(s.model, d, B);
  model_init<float>(s.model, cfg.run.seed);
  const size_t n = s.model.n_params;
  s.opt_arena = arena_build("optimizer state", [&](Carver& c) {
    s.adam_m = c.take<float>(n);
    s.adam_v = c.take<float>(n);
  });
  s.decay.clear();
  for (const ParamInfo& p : s.model.table) s.decay.push_back(p.decay ? 1 : 0);
  s.window.assign(static_cast<size_t>(B * (d.T + 1)), 0);
  s.inputs.assign(static_cast<size_t>(B * d.T), 0);
  s.targets.assign(static_cast<size_t>(B * d.T), 0);
  s.norm_partials.assign(static_cast<size_t>(grad_norm_blocks(static_cast<int64_t>(n))), 0.0);
  s.micro_batches = cfg.training.global_batch / (cfg.training.micro_batch * cfg.parallel.dp);
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
  const int64_t B = s.cfg.training.micro_batch, T_ = d.T;
  const int64_t global_batch = s.cfg.training.global_batch;
  StepStats st;
  model_zero_grads<float>(m);
  std::fill_n(m.expert_load, d.n_moe_layers() * d.E, int64_t{0});
  // The loss is the mean over every target token of the global batch; the balance loss the
  // mean over its sequences. Each micro-batch contributes its share of both gradients.
  const float dloss_ce = 1.0f / static_cast<float>(global_batch * T_);
  const float dloss_aux = 1.0f / static_cast<float>(global_batch);
  double loss_sum = 0, aux_sum = 0;
  for (int64_t mb = 0; mb < s.micro_batches; ++mb) {
    source(s.window.data(), step, mb * B, B);
    windows_split(s.inputs.data(), s.targets.data(), s.window.data(), B, T_);
    loss_sum += model_forward<float>(m, s.inputs.data(), s.targets.data(), B, T_, true);
    aux_sum += m.aux_loss_sum;
    model_backward<float>(m, dloss_ce, dloss_aux);
  }
  st.loss = loss_sum / static_cast<double>(s.micro_batches);
  st.aux_loss = aux_sum / static_cast<double>(global_batch);
  st.grad_norm = std::sqrt(grad_sum_squares(m.grads, static_cast<int64_t>(m.n_params), s.norm_partials.data()));
  st.lr = lr_at(s.lr_plan, step);
  AdamWStep as;
  as.lr = static_cast<float>(st.lr);
  as.beta1 = static_cast<float>(s.cfg.optim.beta1);
  as.beta2 = static_cast<float>(s.cfg.optim.beta2);
  as.eps = static_cast<float>(s.cfg.optim.eps);
  as.weight_decay = static_cast<float>(s.cfg.optim.weight_decay);
  as.t = step + 1;
  as.grad_scale = grad_clip_scale(st.grad_norm, s.cfg.optim.grad_clip);
  for (size_t i = 0; i < m.table.size(); ++i) {
    const ParamInfo& p = m.table[i];
    adamw_update(m.params + p.offset, m.grads + p.offset, s.adam_m + p.offset,
                 s.adam_v + p.offset, static_cast<int64_t>(p.count), as, s.decay[i] != 0);
  }
  // Auxiliary-loss-free balancing: once per step, from the whole global batch's load.
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
  double sum = 0;
  for (int64_t i = 0; i < n_batches; ++i) {
    source(s.window.data(), 0, i * B, B);
    windows_split(s.inputs.data(), s.targets.data(), s.window.data(), B, T_);
    sum += model_forward<float>(s.model, s.inputs.data(), s.targets.data(), B, T_, false);
  }
  return n_batches > 0 ? sum / static_cast<double>(n_batches) : 0.0;
}

}  // namespace moe
