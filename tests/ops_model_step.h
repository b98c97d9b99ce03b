// One training step of a small model that exercises every kind of layer (dense and MoE FFN,
// shared experts, group-limited routing, balance loss; GQA or MLA; MTP), run through whatever
// backend the model was built with. Shared by the CPU discipline test (a guarded backend)
// and the GPU model test (CUDA against CPU).
#pragma once

#include <cstdint>
#include <vector>

#include "model/model.h"
#include "model/rng.h"

namespace moe {

inline ModelDims ops_step_dims(PrecisionMode pm, bool mla, int64_t mtp, int64_t T) {
  ModelDims d;
  d.V = 96; d.C = 128; d.L = 3; d.NH = 4; d.NKV = 2; d.HD = 32; d.T = T; d.F = 256;
  d.dense_layers = 1;
  d.E = 8; d.K = 2; d.FE = 64; d.S = 64; d.G = 2; d.KG = 1;
  d.aux_alpha = 0.01;
  d.precision = pm;
  d.dispatch_fp8 = pm == PrecisionMode::kFp8;
  if (mla) {
    d.attn = AttentionKind::kMla;
    d.q_lora = 64; d.kv_lora = 32; d.qk_nope = 16; d.qk_rope = 16; d.v_hd = 32;
  }
  d.mtp = mtp;
  return d;
}

struct OpsStepOut {
  double loss = 0, aux = 0, mtp = 0;
  std::vector<float> grads;      // downloaded through m.ops
  std::vector<int64_t> load;     // this step's routing counts per MoE block and expert
};

// On a built model (micro-batches of B sequences): init from `seed`, zero the gradients,
// quantize the weights, one training forward over counter-based tokens (every ninth target
// ignored), and backward, split into input and weight passes when `split`.
inline OpsStepOut ops_model_step(Model<float>& m, int64_t B, bool split, uint64_t seed) {
  const ModelDims& d = m.d;
  model_init<float>(m, seed);
  model_zero_grads<float>(m);
  model_quantize_weights<float>(m);
  std::vector<int32_t> x(static_cast<size_t>(B * d.T)), y(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = static_cast<int32_t>(rng_u64(seed, 1, i) % static_cast<uint64_t>(d.V));
    y[i] = i % 9 == 4 ? -1
                      : static_cast<int32_t>(rng_u64(seed, 2, i) % static_cast<uint64_t>(d.V));
  }
  OpsStepOut o;
  o.loss = model_forward<float>(m, x.data(), y.data(), B, d.T, true);
  o.aux = m.aux_loss_sum;
  o.mtp = m.mtp_ce_sum;
  const float dloss = 1.0f / static_cast<float>(B * d.T);
  if (split) {
    model_chunk_backward<float>(m, 0, 0, d.L, dloss, 1.0f, BackwardPart::kInput);
    model_chunk_backward<float>(m, 0, 0, d.L, dloss, 1.0f, BackwardPart::kWeight);
  } else {
    model_backward<float>(m, dloss, 1.0f);
  }
  o.grads.resize(m.n_alloc);
  m.ops->download(o.grads.data(), m.grads, m.n_alloc * sizeof(float));
  o.load.assign(m.expert_load, m.expert_load + d.n_moe_blocks() * d.E);
  return o;
}

}  // namespace moe
