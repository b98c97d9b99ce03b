// The resolved run configuration: one typed struct per TOML section.
//
// This is the only place TOML is read. Loading validates every key (unknown keys, wrong
// types, out-of-range values, impossible combinations) and throws moe::UserError with one
// line: "<file>:<line>:<col>: <section.key> ...". Overrides given as "section.key=value"
// are typed and validated exactly like the file; their location prints as
// "--set section.key=value".
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "model/types.h"  // the mode enums

namespace moe {

// Run-behaviour modes that only the config and the trainer use (the model's modes are in
// model/types.h).
enum class NonfiniteAction { kSkip, kAbort };          // training.on_nonfinite
enum class SpikeAction { kWarn, kSkip, kRollback };    // training.on_spike
enum class SaveErrorAction { kStop, kContinue };       // checkpoint.on_save_error

struct RunConfig {
  std::string name = "tiny";
  uint64_t seed = 1234;
  Device device = Device::kAuto;
  int threads = 0;  // CPU threads per rank; 0 = cores / ranks on the node

  bool operator==(const RunConfig&) const = default;
};

struct ModelConfig {
  int vocab_size = 256;
  int d_model = 256;
  int n_layers = 6;
  int n_heads = 8;
  int n_kv_heads = 8;   // divides n_heads (grouped-query attention when smaller)
  int head_dim = 0;     // 0 in the file = d_model / n_heads; always resolved after loading
  int seq_len = 256;
  int dense_layers = 1; // the first dense_layers layers use a dense SwiGLU FFN
  int d_ff = 0;         // dense FFN width; 0 in the file = (moe.top_k + moe.num_shared_experts) * moe.d_expert
                        // (DeepSeek-V3: 18432 = 9 x 2048); always resolved after loading
  bool tie_embeddings = false;
  int mtp_depth = 0;
  double mtp_loss_weight = 0.3;
  double init_std = 0.02;
  double norm_eps = 1e-6;

  bool operator==(const ModelConfig&) const = default;
};

struct AttentionConfig {
  AttentionKind kind = AttentionKind::kMha;
  double rope_theta = 10000.0;
  // MLA (issue 7); parsed and validated now.
  int q_lora_rank = 0;
  int kv_lora_rank = 0;
  int qk_nope_head_dim = 0;
  int qk_rope_head_dim = 0;
  int v_head_dim = 0;

  bool operator==(const AttentionConfig&) const = default;
};

struct MoeConfig {
  int num_experts = 16;
  int num_shared_experts = 1;
  int top_k = 2;
  int d_expert = 256;
  ScoreFn score = ScoreFn::kSigmoid;
  double route_scale = 1.0;
  double bias_update_speed = 0.001;
  double aux_loss_alpha = 0.0001;
  int num_groups = 1;
  int topk_groups = 1;
  // Health warnings (issue 9): steps a routed expert may receive no tokens before a warning
  // (0 off), and the max / mean expert load above which a step warns (0 off, else >= 1).
  int64_t collapse_steps = 0;
  double imbalance_warn = 0.0;

  bool operator==(const MoeConfig&) const = default;
};

struct DataConfig {
  std::string train = "data/fortunes/train.bin";
  std::string val = "data/fortunes/val.bin";

  bool operator==(const DataConfig&) const = default;
};

struct TrainingConfig {
  int64_t steps = 1000;
  int global_batch = 32;  // sequences per optimizer step
  int micro_batch = 4;    // sequences per forward pass
  int64_t exit_at_step = 0;
  double exit_after_minutes = 0.0;
  // A step whose loss or gradient norm is NaN/inf: abort the run, or skip its update;
  // max_skipped_steps consecutive skipped steps end the run.
  NonfiniteAction on_nonfinite = NonfiniteAction::kAbort;
  int max_skipped_steps = 10;
  // Loss spikes: a loss above spike_factor x the median of the last spike_window losses
  // (0 = detection off, else > 1) is warned about, skipped, or rolled back.
  double spike_factor = 0.0;
  int spike_window = 20;
  SpikeAction on_spike = SpikeAction::kWarn;

  bool operator==(const TrainingConfig&) const = default;
};

struct OptimConfig {
  double lr = 3e-3;
  double beta1 = 0.9;  // TOML: betas = [b1, b2]
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  double grad_clip = 1.0;  // 0 disables clipping
  StateDtype state_dtype = StateDtype::kFp32;

  bool operator==(const OptimConfig&) const = default;
};

struct LrConfig {
  LrSchedule schedule = LrSchedule::kCosine;
  int64_t warmup_steps = 50;
  double min_lr_ratio = 0.1;
  double decay_fraction = 0.2;  // WSD: the last fraction of steps decays to min_lr

  bool operator==(const LrConfig&) const = default;
};

struct ParallelConfig {
  int dp = 1;
  int ep = 1;
  int pp = 1;
  PipeSchedule schedule = PipeSchedule::k1F1B;
  double bucket_mb = 4.0;  // gradient reduction bucket size (MiB)
  // Layers of each pipeline stage (pp for 1f1b, zb1p and dualpipe, 2 pp for dualpipev; one
  // when pp = 1), summing to model.n_layers; empty = balanced by compute.
  std::vector<int64_t> stage_layers;
  // DualPipe / DualPipeV: interleave the two chunks of each F&B pair piece by piece, so each
  // one's all-to-alls and pipeline messages hide behind the other's computation. false runs
  // them one after the other (same results, bit for bit).
  bool fb_overlap = true;
  // Watchdog: a collective or point-to-point transfer not complete within timeout_s seconds
  // stops the job, naming the operation.
  double timeout_s = 600.0;

  bool operator==(const ParallelConfig&) const = default;
};

struct PrecisionConfig {
  PrecisionMode mode = PrecisionMode::kFp32;
  bool dispatch_fp8 = false;
  // bf16 / fp8 GEMMs on the device's native formats where it has them (BF16 and, on Hopper,
  // block-scaled FP8 tensor cores), and the attention core on BF16 tensor cores; false: the
  // exact FP32 emulation and FP32 attention on every device.
  bool native_gemm = true;

  bool operator==(const PrecisionConfig&) const = default;
};

struct CheckpointConfig {
  std::string dir = "checkpoints/tiny";
  int64_t every = 200;  // 0 disables periodic saves
  int keep_last = 3;
  std::string resume = "none";  // none | auto | <path>
  SaveErrorAction on_save_error = SaveErrorAction::kStop;  // a failed save stops the run, or warns

  bool operator==(const CheckpointConfig&) const = default;
};

struct LogConfig {
  int64_t every = 10;
  int64_t eval_every = 100;  // 0 disables evaluation during training
  int eval_batches = 20;
  std::string metrics_file = "runs/tiny/metrics.jsonl";  // empty disables
  int samples = 3;           // samples printed at the end of training
  int sample_tokens = 120;
  double heartbeat_s = 60.0;  // a progress line at least this often, in seconds (0 off)

  bool operator==(const LogConfig&) const = default;
};

struct Config {
  RunConfig run;
  ModelConfig model;
  AttentionConfig attention;
  MoeConfig moe;
  DataConfig data;
  TrainingConfig training;
  OptimConfig optim;
  LrConfig lr;
  ParallelConfig parallel;
  PrecisionConfig precision;
  CheckpointConfig checkpoint;
  LogConfig log;
  std::string source;  // the file it came from, for messages

  bool operator==(const Config&) const = default;
};

// Loads `path`, applies `overrides` ("section.key=value", in order), validates, and returns
// the resolved config. Throws UserError on any problem.
Config config_load(const std::string& path, const std::vector<std::string>& overrides);

// Same, from TOML text (`source_name` is used in messages); for tests and fuzzing.
Config config_parse(const std::string& toml_text, const std::string& source_name,
                    const std::vector<std::string>& overrides);

// The resolved config as TOML text, every key explicit, one per line; parsing it back gives
// an identical Config.
std::string config_to_toml(const Config& cfg);

// 64-bit FNV-1a of any text.
uint64_t text_hash(std::string_view text);

// text_hash(config_to_toml(cfg)): equal on all ranks or the job stops.
uint64_t config_hash(const Config& cfg);

const char* to_string(Device v);
const char* to_string(AttentionKind v);
const char* to_string(ScoreFn v);
const char* to_string(LrSchedule v);
const char* to_string(PipeSchedule v);
const char* to_string(PrecisionMode v);
const char* to_string(StateDtype v);
const char* to_string(NonfiniteAction v);
const char* to_string(SpikeAction v);
const char* to_string(SaveErrorAction v);

}  // namespace moe
