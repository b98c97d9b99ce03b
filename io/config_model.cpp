#include "io/config_model.h"

namespace moe {

ModelDims config_model_dims(const Config& cfg) {
  const ModelConfig& mc = cfg.model;
  const MoeConfig& moe = cfg.moe;
  ModelDims d;
  d.V = mc.vocab_size;
  d.C = mc.d_model;
  d.L = mc.n_layers;
  d.NH = mc.n_heads;
  d.NKV = mc.n_kv_heads;
  d.HD = mc.head_dim;
  d.T = mc.seq_len;
  d.F = mc.d_ff;
  d.dense_layers = mc.dense_layers;
  d.E = moe.num_experts;
  d.K = moe.top_k;
  d.FE = moe.d_expert;
  d.S = static_cast<int64_t>(moe.num_shared_experts) * moe.d_expert;
  d.G = moe.num_groups;
  d.KG = moe.topk_groups;
  d.score = moe.score;
  d.route_scale = moe.route_scale;
  d.aux_alpha = moe.aux_loss_alpha;
  d.norm_eps = mc.norm_eps;
  d.rope_theta = cfg.attention.rope_theta;
  d.init_std = mc.init_std;
  d.tie_embeddings = mc.tie_embeddings;
  d.attn = cfg.attention.kind;
  d.q_lora = cfg.attention.q_lora_rank;
  d.kv_lora = cfg.attention.kv_lora_rank;
  d.qk_nope = cfg.attention.qk_nope_head_dim;
  d.qk_rope = cfg.attention.qk_rope_head_dim;
  d.v_hd = cfg.attention.v_head_dim;
  d.mtp = mc.mtp_depth;
  d.mtp_weight = mc.mtp_loss_weight;
  d.precision = cfg.precision.mode;
  d.dispatch_fp8 = cfg.precision.dispatch_fp8;
  d.native_gemm = cfg.precision.native_gemm;
  return d;
}

}  // namespace moe
