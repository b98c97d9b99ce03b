#include "io/hf_export.h"

#include <algorithm>
#include <utility>

#include "io/json_lite.h"
#include "model/check.h"

namespace moe {

namespace {

// Dimension letters as in model/model.h: C d_model, V vocab, L layers, NH heads, FE expert
// width, E routed experts, NS shared experts.
struct Builder {
  const Config& cfg;
  StDtype dt;
  std::vector<ExportTensor>& out;

  // An exported tensor made of one checkpoint dataset of the same shape.
  void one(const std::string& name, const std::string& path, std::vector<int64_t> shape,
           StDtype dtype) {
    out.push_back(ExportTensor{name, shape, dtype, {ExportSource{path, shape, 0, 0}}});
  }
  void one(const std::string& name, const std::string& path, std::vector<int64_t> shape) {
    one(name, path, std::move(shape), dt);
  }

  void attention(const std::string& Q, const std::string& P) {
    const AttentionConfig& a = cfg.attention;
    const int64_t C = cfg.model.d_model, NH = cfg.model.n_heads;
    if (a.kind == AttentionKind::kMla) {
      const int64_t qk = a.qk_nope_head_dim + a.qk_rope_head_dim;
      if (a.q_lora_rank == 0) {
        one(P + "self_attn.q_proj.weight", Q + "attn/wq", {NH * qk, C});
      } else {
        one(P + "self_attn.q_a_proj.weight", Q + "attn/wq_a", {a.q_lora_rank, C});
        one(P + "self_attn.q_a_layernorm.weight", Q + "attn/q_norm", {a.q_lora_rank});
        one(P + "self_attn.q_b_proj.weight", Q + "attn/wq_b", {NH * qk, a.q_lora_rank});
      }
      one(P + "self_attn.kv_a_proj_with_mqa.weight", Q + "attn/wkv_a",
          {int64_t{a.kv_lora_rank} + a.qk_rope_head_dim, C});
      one(P + "self_attn.kv_a_layernorm.weight", Q + "attn/kv_norm", {a.kv_lora_rank});
      one(P + "self_attn.kv_b_proj.weight", Q + "attn/wkv_b",
          {NH * (int64_t{a.qk_nope_head_dim} + a.v_head_dim), a.kv_lora_rank});
      one(P + "self_attn.o_proj.weight", Q + "attn/wo", {C, NH * a.v_head_dim});
    } else {
      const int64_t HD = cfg.model.head_dim, NKV = cfg.model.n_kv_heads;
      one(P + "self_attn.q_proj.weight", Q + "attn/wq", {NH * HD, C});
      one(P + "self_attn.k_proj.weight", Q + "attn/wk", {NKV * HD, C});
      one(P + "self_attn.v_proj.weight", Q + "attn/wv", {NKV * HD, C});
      one(P + "self_attn.o_proj.weight", Q + "attn/wo", {C, NH * HD});
    }
  }

  void moe(const std::string& Q, const std::string& P, const std::string& bias) {
    const int64_t C = cfg.model.d_model, E = cfg.moe.num_experts, FE = cfg.moe.d_expert,
                  NS = cfg.moe.num_shared_experts;
    one(P + "mlp.gate.weight", Q + "moe/router", {E, C});
    one(P + "mlp.gate.e_score_correction_bias", bias, {E}, StDtype::kF32);
    for (int64_t e = 0; e < E; ++e) {
      const std::string q = Q + "moe/experts/" + std::to_string(e) + "/";
      const std::string p = P + "mlp.experts." + std::to_string(e) + ".";
      one(p + "gate_proj.weight", q + "w_gate", {FE, C});
      one(p + "up_proj.weight", q + "w_up", {FE, C});
      one(p + "down_proj.weight", q + "w_down", {C, FE});
    }
    if (NS == 0) return;
    // One SwiGLU of width NS FE: gate/up rows stacked, down_proj columns side by side.
    ExportTensor gate{P + "mlp.shared_experts.gate_proj.weight", {NS * FE, C}, dt, {}};
    ExportTensor up{P + "mlp.shared_experts.up_proj.weight", {NS * FE, C}, dt, {}};
    ExportTensor down{P + "mlp.shared_experts.down_proj.weight", {C, NS * FE}, dt, {}};
    for (int64_t s = 0; s < NS; ++s) {
      const std::string q = Q + "moe/shared/" + std::to_string(s) + "/";
      gate.sources.push_back(ExportSource{q + "w_gate", {FE, C}, s * FE, 0});
      up.sources.push_back(ExportSource{q + "w_up", {FE, C}, s * FE, 0});
      down.sources.push_back(ExportSource{q + "w_down", {C, FE}, 0, s * FE});
    }
    out.push_back(std::move(gate));
    out.push_back(std::move(up));
    out.push_back(std::move(down));
  }

  void block(const std::string& Q, const std::string& P, bool is_moe, const std::string& bias) {
    const int64_t C = cfg.model.d_model, F = cfg.model.d_ff;
    one(P + "input_layernorm.weight", Q + "attn_norm", {C});
    attention(Q, P);
    one(P + "post_attention_layernorm.weight", Q + "ffn_norm", {C});
    if (is_moe) {
      moe(Q, P, bias);
    } else {
      one(P + "mlp.gate_proj.weight", Q + "mlp/w_gate", {F, C});
      one(P + "mlp.up_proj.weight", Q + "mlp/w_up", {F, C});
      one(P + "mlp.down_proj.weight", Q + "mlp/w_down", {C, F});
    }
  }
};

std::string layer_prefix(int64_t i) { return "model.layers." + std::to_string(i) + "."; }

// The MTP modules' blocks are MoE blocks when the model has MoE layers (DeepSeek-V3's
// layer 61 is; HF builds layer i as MoE when i >= first_k_dense_replace).
bool mtp_is_moe(const Config& cfg) { return cfg.model.dense_layers < cfg.model.n_layers; }

int64_t exported_mtp(const Config& cfg, const ExportOptions& opt) {
  return opt.drop_mtp ? 0 : cfg.model.mtp_depth;
}

}  // namespace

const char* to_string(ExportDtype t) { return t == ExportDtype::kBf16 ? "bf16" : "fp32"; }

uint64_t ExportTensor::numel() const {
  uint64_t n = 1;
  for (const int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

uint64_t ExportTensor::bytes() const { return numel() * st_dtype_size(dtype); }

bool export_is_deepseek_v3(const Config& cfg) { return cfg.attention.kind == AttentionKind::kMla; }

std::vector<ExportTensor> export_plan(const Config& cfg, const ExportOptions& opt) {
  std::vector<ExportTensor> out;
  const StDtype dt = opt.dtype == ExportDtype::kBf16 ? StDtype::kBF16 : StDtype::kF32;
  Builder b{cfg, dt, out};
  const int64_t C = cfg.model.d_model, V = cfg.model.vocab_size, L = cfg.model.n_layers;
  const std::string head = cfg.model.tie_embeddings ? "/model/embed/wte" : "/model/lm_head";
  b.one("model.embed_tokens.weight", "/model/embed/wte", {V, C});
  for (int64_t l = 0; l < L; ++l) {
    const std::string Q = "/model/layers/" + std::to_string(l) + "/";
    b.block(Q, layer_prefix(l), l >= cfg.model.dense_layers,
            "/router/layers/" + std::to_string(l) + "/bias");
  }
  b.one("model.norm.weight", "/model/final_norm", {C});
  b.one("lm_head.weight", head, {V, C});
  for (int64_t k = 0; k < exported_mtp(cfg, opt); ++k) {
    const std::string Q = "/model/mtp/" + std::to_string(k) + "/", P = layer_prefix(L + k);
    b.one(P + "embed_tokens.weight", "/model/embed/wte", {V, C});
    b.one(P + "enorm.weight", Q + "enorm", {C});
    b.one(P + "hnorm.weight", Q + "hnorm", {C});
    b.one(P + "eh_proj.weight", Q + "eh_proj", {C, 2 * C});
    b.block(Q, P, mtp_is_moe(cfg), "/router/mtp/" + std::to_string(k) + "/bias");
    b.one(P + "shared_head.norm.weight", Q + "final_norm", {C});
    b.one(P + "shared_head.head.weight", head, {V, C});
  }
  return out;
}

std::string export_config_json(const Config& cfg, const ExportOptions& opt) {
  const ModelConfig& m = cfg.model;
  const AttentionConfig& a = cfg.attention;
  const MoeConfig& e = cfg.moe;
  const bool mla = export_is_deepseek_v3(cfg);
  auto num = [](int64_t v) { return std::to_string(v); };
  auto str = [](const char* s) { return json_quote(s); };
  auto flag = [](bool v) { return std::string(v ? "true" : "false"); };
  auto count_or_null = [&](int64_t v) { return v == 0 ? std::string("null") : num(v); };
  std::vector<std::pair<std::string, std::string>> kv = {
      {"architectures", "[\"DeepseekV3ForCausalLM\"]"},
      {"model_type", str("deepseek_v3")},
      {"vocab_size", num(m.vocab_size)},
      {"hidden_size", num(m.d_model)},
      {"intermediate_size", num(m.d_ff)},
      {"moe_intermediate_size", num(e.d_expert)},
      {"num_hidden_layers", num(m.n_layers)},
      {"num_nextn_predict_layers", num(exported_mtp(cfg, opt))},
      {"num_attention_heads", num(m.n_heads)},
      {"num_key_value_heads", num(mla ? m.n_heads : m.n_kv_heads)},
      {"n_shared_experts", count_or_null(e.num_shared_experts)},
      {"n_routed_experts", num(e.num_experts)},
      {"num_experts_per_tok", num(e.top_k)},
      {"routed_scaling_factor", json_number(e.route_scale)},
      {"scoring_func", str(e.score == ScoreFn::kSigmoid ? "sigmoid" : "softmax")},
      {"topk_method", str("noaux_tc")},
      {"n_group", num(e.num_groups)},
      {"topk_group", num(e.topk_groups)},
      // Our router renormalizes the top-k weights for sigmoid scores only.
      {"norm_topk_prob", flag(e.score == ScoreFn::kSigmoid)},
      {"first_k_dense_replace", num(m.dense_layers)},
      {"moe_layer_freq", "1"},
      {"ep_size", "1"},
      {"kv_lora_rank", mla ? num(a.kv_lora_rank) : "null"},
      {"q_lora_rank", mla ? count_or_null(a.q_lora_rank) : "null"},
      {"qk_nope_head_dim", num(mla ? a.qk_nope_head_dim : 0)},
      {"qk_rope_head_dim", num(mla ? a.qk_rope_head_dim : m.head_dim)},
      {"v_head_dim", num(mla ? a.v_head_dim : m.head_dim)},
      {"hidden_act", str("silu")},
      {"max_position_embeddings", num(m.seq_len)},
      {"rms_norm_eps", json_number(m.norm_eps)},
      {"rope_theta", json_number(a.rope_theta)},
      {"rope_scaling", "null"},
      {"tie_word_embeddings", flag(m.tie_embeddings)},
      {"torch_dtype", str(opt.dtype == ExportDtype::kBf16 ? "bfloat16" : "float32")},
      {"attention_bias", "false"},
      {"attention_dropout", "0.0"},
      {"initializer_range", json_number(m.init_std)},
      {"aux_loss_alpha", json_number(e.aux_loss_alpha)},
      {"seq_aux", "true"},
      {"use_cache", "true"},
  };
  if (!mla) kv.emplace_back("head_dim", num(m.head_dim));
  std::sort(kv.begin(), kv.end());
  std::string out = "{\n";
  for (size_t i = 0; i < kv.size(); ++i)
    out += "  " + json_quote(kv[i].first) + ": " + kv[i].second + (i + 1 < kv.size() ? ",\n" : "\n");
  return out + "}\n";
}

std::vector<ExportFile> export_files(const std::vector<ExportTensor>& plan, uint64_t max_bytes) {
  std::vector<ExportFile> files;
  uint64_t total = 0;
  for (const ExportTensor& t : plan) total += t.bytes();
  if (total <= max_bytes) return {ExportFile{"model.safetensors", 0, plan.size(), total}};
  for (size_t i = 0; i < plan.size(); ++i) {
    const uint64_t b = plan[i].bytes();
    if (files.empty() || (files.back().count > 0 && files.back().bytes + b > max_bytes))
      files.push_back(ExportFile{"", i, 0, 0});
    files.back().count += 1;
    files.back().bytes += b;
  }
  for (size_t f = 0; f < files.size(); ++f)
    files[f].name = strprintf("model-%05zu-of-%05zu.safetensors", f + 1, files.size());
  return files;
}

std::string export_index_json(const std::vector<ExportTensor>& plan,
                              const std::vector<ExportFile>& files) {
  uint64_t total = 0;
  for (const ExportTensor& t : plan) total += t.bytes();
  std::string out = "{\n  \"metadata\": {\n    \"total_size\": " + std::to_string(total) +
                    "\n  },\n  \"weight_map\": {\n";
  bool first = true;
  for (const ExportFile& f : files)
    for (size_t i = f.first; i < f.first + f.count; ++i) {
      out += (first ? "    " : ",\n    ") + json_quote(plan[i].name) + ": " + json_quote(f.name);
      first = false;
    }
  return out + "\n  }\n}\n";
}

}  // namespace moe
