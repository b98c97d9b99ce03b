// What `moetrain export` writes, as data: the Hugging Face tensor names, shapes and dtypes
// of the public DeepSeek-V3 release (deepseek-ai/DeepSeek-V3, model_type "deepseek_v3"),
// each with the checkpoint datasets it is built from, plus config.json and the shard index.
// Pure functions of the Config: no checkpoint is read here, so the 671B table can be checked
// without materializing weights.
//
// Our logical tensors ("/model/<name>" in a checkpoint, FP32) and their HF names, with
// P = "model.layers.<i>." (i = l for layer l, L + k for MTP module k) and Q = "layers/<l>/"
// or "mtp/<k>/":
//   embed/wte -> model.embed_tokens.weight   final_norm -> model.norm.weight
//   lm_head   -> lm_head.weight (from embed/wte when model.tie_embeddings)
//   Q attn_norm -> P input_layernorm.weight,  Q ffn_norm -> P post_attention_layernorm.weight
//   MLA: Q attn/wq | wq_a, q_norm, wq_b -> P self_attn.q_proj | q_a_proj, q_a_layernorm, q_b_proj
//        Q attn/wkv_a, kv_norm, wkv_b, wo -> P self_attn.kv_a_proj_with_mqa, kv_a_layernorm,
//        kv_b_proj, o_proj
//   MHA: Q attn/wq, wk, wv, wo -> P self_attn.q_proj, k_proj, v_proj, o_proj
//   dense: Q mlp/w_gate, w_up, w_down -> P mlp.gate_proj, up_proj, down_proj
//   MoE: Q moe/router -> P mlp.gate.weight; /router/<layers/l | mtp/k>/bias ->
//        P mlp.gate.e_score_correction_bias; Q moe/experts/<e>/w_* -> P mlp.experts.<e>.*_proj;
//        Q moe/shared/<s>/w_* -> P mlp.shared_experts.*_proj, the shared experts concatenated
//        into one SwiGLU of width num_shared x d_expert (gate/up rows stacked in expert order,
//        down_proj columns side by side)
//   MTP k: Q enorm, hnorm, eh_proj -> P enorm, hnorm, eh_proj; Q final_norm ->
//        P shared_head.norm; copies: P embed_tokens (of embed/wte) and P shared_head.head (of
//        the output head), as in the release; plus its block under Q (a MoE block when the
//        model has MoE layers, as HF builds layer L + k, else a dense one).
// Every name ends in ".weight" except e_score_correction_bias. Weights are (out, in) in both.
//
// NOTE: RoPE needs no permutation. Our kernels rotate interleaved pairs (x[2i], x[2i+1]),
// the convention of DeepSeek's released weights (the HF modeling code de-interleaves q_pe
// and k_pe itself before rotate_half). Per-head row layouts follow the release as well:
// wq / wq_b rows are [nope | rope] per head, wkv_a rows are [kv_lora | rope], wkv_b rows are
// [k_nope | v] per head.
//
// The router bias stays F32 under --dtype bf16, as in the release (a selection bias moves in
// steps far below BF16's resolution near its values).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "io/config.h"
#include "io/safetensors.h"

namespace moe {

enum class ExportDtype { kBf16, kFp32 };
const char* to_string(ExportDtype t);  // "bf16", "fp32"

// Hugging Face's save_pretrained default shard size, 5 GB, in MiB.
constexpr double kExportDefaultShardMb = 4768;

struct ExportOptions {
  ExportDtype dtype = ExportDtype::kBf16;
  bool drop_mtp = false;  // omit the MTP modules (num_nextn_predict_layers 0)
  double shard_mb = kExportDefaultShardMb;  // largest file before sharding (> 0)
};

// A checkpoint dataset (FP32) placed into an exported tensor at (row0, col0).
struct ExportSource {
  std::string path;            // "/model/layers/3/moe/shared/1/w_down"
  std::vector<int64_t> shape;  // as stored: {n} or {rows, cols}
  int64_t row0 = 0, col0 = 0;
};

// One exported tensor; its sources tile it exactly (no gap, no overlap).
struct ExportTensor {
  std::string name;  // "model.layers.3.mlp.shared_experts.down_proj.weight"
  std::vector<int64_t> shape;
  StDtype dtype = StDtype::kBF16;
  std::vector<ExportSource> sources;
  uint64_t numel() const;
  uint64_t bytes() const;
};

// attention.kind = "mla": the only layout that loads as DeepSeek-V3.
bool export_is_deepseek_v3(const Config& cfg);

// The exported tensors in file order: embedding, layers 0..L-1, final norm, head, then
// (unless drop_mtp) MTP modules 0..D-1 as layers L..L+D-1.
std::vector<ExportTensor> export_plan(const Config& cfg, const ExportOptions& opt);

// config.json with the release's keys (sorted, two-space indent, trailing newline).
std::string export_config_json(const Config& cfg, const ExportOptions& opt);

// The files of an export: one "model.safetensors" when the plan's bytes fit max_bytes,
// else "model-00001-of-0000K.safetensors", ..., filled in plan order, a new file started
// when the next tensor would exceed max_bytes (a larger tensor gets a file of its own).
struct ExportFile {
  std::string name;
  size_t first = 0, count = 0;  // plan[first, first + count)
  uint64_t bytes = 0;           // tensor data bytes
};
std::vector<ExportFile> export_files(const std::vector<ExportTensor>& plan, uint64_t max_bytes);

// model.safetensors.index.json: {"metadata": {"total_size": bytes}, "weight_map": {...}}.
std::string export_index_json(const std::vector<ExportTensor>& plan,
                              const std::vector<ExportFile>& files);

}  // namespace moe
