// The config schema: enum spellings, the key table, and the range and combination rules.
//
// NOTE: a rule that involves several keys reports at the origin of the one set last (the
// last --set, else the latest line in the file): that is the key that made the combination
// impossible. Messages name every key involved.
#include "io/config_schema.h"

#include <climits>
#include <cstdarg>
#include <initializer_list>

#include "model/check.h"

namespace moe::config_schema {

namespace {

constexpr EnumName<Device> kDeviceNames[] = {
    {"cpu", Device::kCpu}, {"cuda", Device::kCuda}, {"auto", Device::kAuto}};
constexpr EnumName<AttentionKind> kAttentionNames[] = {
    {"mha", AttentionKind::kMha}, {"mla", AttentionKind::kMla}};
constexpr EnumName<ScoreFn> kScoreNames[] = {
    {"softmax", ScoreFn::kSoftmax}, {"sigmoid", ScoreFn::kSigmoid}};
constexpr EnumName<LrSchedule> kLrScheduleNames[] = {
    {"cosine", LrSchedule::kCosine}, {"wsd", LrSchedule::kWsd}, {"constant", LrSchedule::kConstant}};
constexpr EnumName<PipeSchedule> kPipeScheduleNames[] = {
    {"1f1b", PipeSchedule::k1F1B}, {"zb1p", PipeSchedule::kZB1P},
    {"dualpipe", PipeSchedule::kDualPipe}, {"dualpipev", PipeSchedule::kDualPipeV}};
constexpr EnumName<PrecisionMode> kPrecisionNames[] = {
    {"fp32", PrecisionMode::kFp32}, {"bf16", PrecisionMode::kBf16}, {"fp8", PrecisionMode::kFp8}};
constexpr EnumName<StateDtype> kStateDtypeNames[] = {
    {"fp32", StateDtype::kFp32}, {"bf16", StateDtype::kBf16}};
constexpr EnumName<NonfiniteAction> kNonfiniteNames[] = {
    {"skip", NonfiniteAction::kSkip}, {"abort", NonfiniteAction::kAbort}};
constexpr EnumName<SpikeAction> kSpikeNames[] = {
    {"warn", SpikeAction::kWarn}, {"skip", SpikeAction::kSkip}, {"rollback", SpikeAction::kRollback}};
constexpr EnumName<SaveErrorAction> kSaveErrorNames[] = {
    {"stop", SaveErrorAction::kStop}, {"continue", SaveErrorAction::kContinue}};

template <class E>
const char* enum_to_string(E v) {
  for (const auto& n : enum_names(static_cast<const E*>(nullptr)))
    if (n.value == v) return n.name;
  return "?";
}

// One row per key: the TOML name is the field's name (optim.betas is the one exception).
#define MOE_KEY(sec, key) Key{#sec, #key, [](Config& c) -> FieldRef { return &c.sec.key; }}
constexpr Key kKeys[] = {
    MOE_KEY(run, name), MOE_KEY(run, seed), MOE_KEY(run, device), MOE_KEY(run, threads),

    MOE_KEY(model, vocab_size), MOE_KEY(model, d_model), MOE_KEY(model, n_layers),
    MOE_KEY(model, n_heads), MOE_KEY(model, n_kv_heads), MOE_KEY(model, head_dim),
    MOE_KEY(model, seq_len), MOE_KEY(model, dense_layers), MOE_KEY(model, d_ff),
    MOE_KEY(model, tie_embeddings), MOE_KEY(model, mtp_depth), MOE_KEY(model, mtp_loss_weight),
    MOE_KEY(model, init_std), MOE_KEY(model, norm_eps),

    MOE_KEY(attention, kind), MOE_KEY(attention, rope_theta), MOE_KEY(attention, q_lora_rank),
    MOE_KEY(attention, kv_lora_rank), MOE_KEY(attention, qk_nope_head_dim),
    MOE_KEY(attention, qk_rope_head_dim), MOE_KEY(attention, v_head_dim),

    MOE_KEY(moe, num_experts), MOE_KEY(moe, num_shared_experts), MOE_KEY(moe, top_k),
    MOE_KEY(moe, d_expert), MOE_KEY(moe, score), MOE_KEY(moe, route_scale),
    MOE_KEY(moe, bias_update_speed), MOE_KEY(moe, aux_loss_alpha), MOE_KEY(moe, num_groups),
    MOE_KEY(moe, topk_groups), MOE_KEY(moe, collapse_steps), MOE_KEY(moe, imbalance_warn),

    MOE_KEY(data, train), MOE_KEY(data, val),

    MOE_KEY(training, steps), MOE_KEY(training, global_batch), MOE_KEY(training, micro_batch),
    MOE_KEY(training, exit_at_step), MOE_KEY(training, exit_after_minutes),
    MOE_KEY(training, on_nonfinite), MOE_KEY(training, max_skipped_steps),
    MOE_KEY(training, spike_factor), MOE_KEY(training, spike_window), MOE_KEY(training, on_spike),

    MOE_KEY(optim, lr),
    Key{"optim", "betas", [](Config& c) -> FieldRef { return Betas{&c.optim.beta1, &c.optim.beta2}; }},
    MOE_KEY(optim, eps), MOE_KEY(optim, weight_decay), MOE_KEY(optim, grad_clip),
    MOE_KEY(optim, state_dtype),

    MOE_KEY(lr, schedule), MOE_KEY(lr, warmup_steps), MOE_KEY(lr, min_lr_ratio),
    MOE_KEY(lr, decay_fraction),

    MOE_KEY(parallel, dp), MOE_KEY(parallel, ep), MOE_KEY(parallel, pp), MOE_KEY(parallel, schedule),
    MOE_KEY(parallel, bucket_mb), MOE_KEY(parallel, stage_layers), MOE_KEY(parallel, fb_overlap),
    MOE_KEY(parallel, timeout_s),

    MOE_KEY(precision, mode), MOE_KEY(precision, dispatch_fp8), MOE_KEY(precision, native_gemm),

    MOE_KEY(checkpoint, dir), MOE_KEY(checkpoint, every), MOE_KEY(checkpoint, keep_last),
    MOE_KEY(checkpoint, resume), MOE_KEY(checkpoint, on_save_error),

    MOE_KEY(log, every), MOE_KEY(log, eval_every), MOE_KEY(log, eval_batches),
    MOE_KEY(log, metrics_file), MOE_KEY(log, samples), MOE_KEY(log, sample_tokens),
    MOE_KEY(log, heartbeat_s),
};
#undef MOE_KEY

std::string one_line(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (unsigned char ch : s) {
    if (ch == '\n') out += "\\n";
    else if (ch == '\r') out += "\\r";
    else if (ch == '\t') out += "\\t";
    else if (ch < 0x20 || ch == 0x7f) out += strprintf("\\x%02x", ch);
    else out += static_cast<char>(ch);
  }
  return out;
}

// The range and combination checks, each failing at the origin of the keys involved.
class Rules {
 public:
  Rules(const KeyOrigins& origins, const std::string& source) : origins_(origins), source_(source) {}

  [[noreturn]] void fail(std::initializer_list<const char*> keys, const char* fmt, ...) const
      __attribute__((format(printf, 3, 4))) {
    const KeyOrigin* last = nullptr;
    for (const char* k : keys) {
      auto it = origins_.find(k);
      if (it != origins_.end() && (!last || it->second.order > last->order)) last = &it->second;
    }
    va_list ap;
    va_start(ap, fmt);
    std::string msg = vstrprintf(fmt, ap);
    va_end(ap);
    config_fail(last ? last->where : source_, "%s", msg.c_str());
  }

  void at_least(const char* key, int64_t v, int64_t lo) const {
    if (v < lo) fail({key}, "%s must be >= %lld, got %lld", key, (long long)lo, (long long)v);
  }
  void positive(const char* key, double v) const {
    if (!(v > 0)) fail({key}, "%s must be > 0, got %g", key, v);
  }
  void non_negative(const char* key, double v) const {
    if (!(v >= 0)) fail({key}, "%s must be >= 0, got %g", key, v);
  }
  // v in [0, 1] with either end open as asked.
  void unit(const char* key, double v, bool open_lo, bool open_hi) const {
    bool ok = (open_lo ? v > 0 : v >= 0) && (open_hi ? v < 1 : v <= 1);
    if (!ok) fail({key}, "%s must be in %c0, 1%c, got %g", key, open_lo ? '(' : '[', open_hi ? ')' : ']', v);
  }
  // 0 turns the feature off; anything else must be above `lo` (or at least `lo`).
  void zero_or_above(const char* key, double v, double lo, bool inclusive) const {
    if (v == 0 || (inclusive ? v >= lo : v > lo)) return;
    fail({key}, "%s must be 0 (off) or %s %g, got %g", key, inclusive ? ">=" : ">", lo, v);
  }
  void non_empty(const char* key, const std::string& v) const {
    if (v.empty()) fail({key}, "%s must be non-empty", key);
  }

 private:
  const KeyOrigins& origins_;
  const std::string& source_;
};

bool has_moe_layers(const ModelConfig& m) { return m.dense_layers < m.n_layers; }

void check_model(ModelConfig& m, const Rules& r) {
  r.at_least("model.vocab_size", m.vocab_size, 2);
  r.at_least("model.d_model", m.d_model, 1);
  r.at_least("model.n_layers", m.n_layers, 1);
  r.at_least("model.n_heads", m.n_heads, 1);
  r.at_least("model.n_kv_heads", m.n_kv_heads, 1);
  if (m.n_heads % m.n_kv_heads != 0)
    r.fail({"model.n_heads", "model.n_kv_heads"},
           "model.n_heads = %d is not divisible by model.n_kv_heads = %d", m.n_heads, m.n_kv_heads);
  r.at_least("model.head_dim", m.head_dim, 0);
  if (m.head_dim == 0) {
    const auto keys = {"model.head_dim", "model.d_model", "model.n_heads"};
    if (m.d_model % m.n_heads != 0)
      r.fail(keys, "model.d_model = %d is not divisible by model.n_heads = %d; set model.head_dim",
             m.d_model, m.n_heads);
    m.head_dim = m.d_model / m.n_heads;
    if (m.head_dim < 2 || m.head_dim % 2 != 0)
      r.fail(keys, "model.head_dim = model.d_model / model.n_heads = %d must be even and >= 2 (RoPE)",
             m.head_dim);
  } else if (m.head_dim < 2 || m.head_dim % 2 != 0) {
    r.fail({"model.head_dim"}, "model.head_dim must be even and >= 2 (RoPE), got %d", m.head_dim);
  }
  r.at_least("model.seq_len", m.seq_len, 1);
  r.at_least("model.dense_layers", m.dense_layers, 0);
  if (m.dense_layers > m.n_layers)
    r.fail({"model.dense_layers", "model.n_layers"}, "model.dense_layers = %d exceeds model.n_layers = %d",
           m.dense_layers, m.n_layers);
  r.at_least("model.d_ff", m.d_ff, 0);  // 0 is resolved once [moe] is checked
  r.at_least("model.mtp_depth", m.mtp_depth, 0);
  r.non_negative("model.mtp_loss_weight", m.mtp_loss_weight);
  r.positive("model.init_std", m.init_std);
  r.positive("model.norm_eps", m.norm_eps);
}

void check_attention(const AttentionConfig& a, const Rules& r) {
  r.positive("attention.rope_theta", a.rope_theta);
  const struct {
    const char* key;
    int value;
    int mla_min;
  } dims[] = {{"attention.q_lora_rank", a.q_lora_rank, 0},
              {"attention.kv_lora_rank", a.kv_lora_rank, 1},
              {"attention.qk_nope_head_dim", a.qk_nope_head_dim, 1},
              {"attention.qk_rope_head_dim", a.qk_rope_head_dim, 2},
              {"attention.v_head_dim", a.v_head_dim, 1}};
  for (const auto& d : dims) r.at_least(d.key, d.value, 0);
  if (a.kind != AttentionKind::kMla) return;
  for (const auto& d : dims)
    if (d.value < d.mla_min)
      r.fail({d.key, "attention.kind"}, "%s must be >= %d when attention.kind = \"mla\", got %d",
             d.key, d.mla_min, d.value);
  if (a.qk_rope_head_dim % 2 != 0)
    r.fail({"attention.qk_rope_head_dim"}, "attention.qk_rope_head_dim must be even (RoPE), got %d",
           a.qk_rope_head_dim);
}

void check_moe(const MoeConfig& e, ModelConfig& m, const Rules& r) {
  r.at_least("moe.num_shared_experts", e.num_shared_experts, 0);
  r.at_least("moe.top_k", e.top_k, 1);
  r.at_least("moe.d_expert", e.d_expert, 1);
  r.positive("moe.route_scale", e.route_scale);
  r.non_negative("moe.bias_update_speed", e.bias_update_speed);
  r.non_negative("moe.aux_loss_alpha", e.aux_loss_alpha);
  r.at_least("moe.num_groups", e.num_groups, 1);
  r.at_least("moe.topk_groups", e.topk_groups, 1);
  if (e.topk_groups > e.num_groups)
    r.fail({"moe.topk_groups", "moe.num_groups"}, "moe.topk_groups = %d exceeds moe.num_groups = %d",
           e.topk_groups, e.num_groups);
  if (!has_moe_layers(m)) {
    r.at_least("moe.num_experts", e.num_experts, 0);  // unused: every layer is dense
  } else {
    if (e.num_experts < 1)
      r.fail({"moe.num_experts", "model.dense_layers", "model.n_layers"},
             "moe.num_experts must be >= 1 when model.dense_layers < model.n_layers, got %d",
             e.num_experts);
    if (e.top_k > e.num_experts)
      r.fail({"moe.top_k", "moe.num_experts"}, "moe.top_k = %d exceeds moe.num_experts = %d", e.top_k,
             e.num_experts);
    if (e.num_experts % e.num_groups != 0)
      r.fail({"moe.num_experts", "moe.num_groups"},
             "moe.num_experts = %d is not divisible by moe.num_groups = %d", e.num_experts, e.num_groups);
    const int64_t reachable = int64_t{e.topk_groups} * (e.num_experts / e.num_groups);
    if (e.top_k > reachable)
      r.fail({"moe.top_k", "moe.topk_groups", "moe.num_experts", "moe.num_groups"},
             "moe.top_k = %d exceeds moe.topk_groups * (moe.num_experts / moe.num_groups) = %lld",
             e.top_k, (long long)reachable);
  }
  r.at_least("moe.collapse_steps", e.collapse_steps, 0);
  r.zero_or_above("moe.imbalance_warn", e.imbalance_warn, 1.0, true);
  if (m.d_ff == 0) {
    const int64_t d_ff = (int64_t{e.top_k} + e.num_shared_experts) * e.d_expert;
    if (d_ff > INT_MAX)
      r.fail({"model.d_ff", "moe.top_k", "moe.num_shared_experts", "moe.d_expert"},
             "model.d_ff = (moe.top_k + moe.num_shared_experts) * moe.d_expert = %lld exceeds %d; "
             "set model.d_ff", (long long)d_ff, INT_MAX);
    m.d_ff = static_cast<int>(d_ff);
  }
}

// The stage placement of parallel/schedule.h, which io/ cannot include: pp stages, or 2 pp
// for dualpipev (two per rank); pp = 1 runs no pipeline and is one stage.
int64_t pipeline_stages(const ParallelConfig& p) {
  if (p.pp == 1) return 1;
  return p.schedule == PipeSchedule::kDualPipeV ? 2 * int64_t{p.pp} : p.pp;
}

// Every pipeline stage holds at least one layer; explicit stage sizes cover the model.
void check_stages(const ParallelConfig& p, const ModelConfig& m, const Rules& r) {
  const int64_t S = pipeline_stages(p);
  const bool two_per_rank = p.pp > 1 && p.schedule == PipeSchedule::kDualPipeV;
  if (S > m.n_layers) {
    if (two_per_rank)
      r.fail({"parallel.schedule", "parallel.pp", "model.n_layers"},
             "parallel.schedule = \"dualpipev\" needs model.n_layers >= 2 * parallel.pp = %lld, got %d",
             (long long)S, m.n_layers);
    r.fail({"parallel.pp", "model.n_layers"}, "parallel.pp = %d exceeds model.n_layers = %d", p.pp,
           m.n_layers);
  }
  if (p.stage_layers.empty()) return;
  bool ok = static_cast<int64_t>(p.stage_layers.size()) == S;
  int64_t sum = 0;
  for (int64_t n : p.stage_layers) {
    ok = ok && n >= 1 && n <= m.n_layers;  // bounded, so the sum cannot overflow
    if (ok) sum += n;
  }
  if (ok && sum == m.n_layers) return;
  const std::string why = two_per_rank
      ? strprintf("2 x parallel.pp = %lld for parallel.schedule = \"dualpipev\"", (long long)S)
      : strprintf("parallel.pp = %d", p.pp);
  r.fail({"parallel.stage_layers", "parallel.pp", "parallel.schedule", "model.n_layers"},
         "parallel.stage_layers = %s needs %lld %s (one per pipeline stage: %s), each >= 1, "
         "summing to model.n_layers = %d", config_int_list(p.stage_layers).c_str(), (long long)S,
         S == 1 ? "entry" : "entries", why.c_str(), m.n_layers);
}

void check_parallel(const ParallelConfig& p, const ModelConfig& m, const MoeConfig& e, const Rules& r) {
  r.at_least("parallel.dp", p.dp, 1);
  r.at_least("parallel.ep", p.ep, 1);
  r.at_least("parallel.pp", p.pp, 1);
  r.positive("parallel.bucket_mb", p.bucket_mb);
  r.positive("parallel.timeout_s", p.timeout_s);
  if (p.dp % p.ep != 0)
    r.fail({"parallel.dp", "parallel.ep"}, "parallel.dp = %d is not divisible by parallel.ep = %d",
           p.dp, p.ep);
  if (has_moe_layers(m) && e.num_experts % p.ep != 0)
    r.fail({"moe.num_experts", "parallel.ep"}, "moe.num_experts = %d is not divisible by parallel.ep = %d",
           e.num_experts, p.ep);
  // Node-limited routing bounds traffic only if every expert group lives on whole ranks.
  if (has_moe_layers(m) && p.ep > 1 && e.num_groups > 1 && e.num_groups % p.ep != 0 &&
      p.ep % e.num_groups != 0)
    r.fail({"moe.num_groups", "parallel.ep"},
           "moe.num_groups = %d and parallel.ep = %d: one must divide the other so that each "
           "expert group maps to whole ranks", e.num_groups, p.ep);
  if (p.schedule == PipeSchedule::kDualPipe && p.pp % 2 != 0)
    r.fail({"parallel.schedule", "parallel.pp"},
           "parallel.schedule = \"dualpipe\" needs an even parallel.pp, got %d", p.pp);
  check_stages(p, m, r);
}

void check_training(const TrainingConfig& t, const ParallelConfig& p, const Rules& r) {
  r.at_least("training.steps", t.steps, 1);
  r.at_least("training.global_batch", t.global_batch, 1);
  r.at_least("training.micro_batch", t.micro_batch, 1);
  const int64_t per_step = int64_t{t.micro_batch} * p.dp;
  if (t.global_batch % per_step != 0)
    r.fail({"training.global_batch", "training.micro_batch", "parallel.dp"},
           "training.global_batch = %d is not divisible by training.micro_batch * parallel.dp = %lld",
           t.global_batch, (long long)per_step);
  r.at_least("training.exit_at_step", t.exit_at_step, 0);
  r.non_negative("training.exit_after_minutes", t.exit_after_minutes);
  r.at_least("training.max_skipped_steps", t.max_skipped_steps, 1);
  r.zero_or_above("training.spike_factor", t.spike_factor, 1.0, false);
  r.at_least("training.spike_window", t.spike_window, 3);
  // Asking for an action on spikes with detection off is a mistake, not a no-op.
  if (t.on_spike != SpikeAction::kWarn && t.spike_factor == 0)
    r.fail({"training.on_spike", "training.spike_factor"},
           "training.on_spike = \"%s\" needs training.spike_factor > 1 (0 turns spike "
           "detection off)", enum_to_string(t.on_spike));
}

// What the pipeline schedule needs of the step (after check_training: M is whole).
void check_pipeline(const Config& c, const Rules& r) {
  const ParallelConfig& p = c.parallel;
  if (p.pp == 1) return;
  const char* kind = enum_to_string(p.schedule);
  const int64_t M = c.training.global_batch / (int64_t{c.training.micro_batch} * p.dp);
  const bool dualpipe = p.schedule == PipeSchedule::kDualPipe;
  // DualPipe splits the micro-batches into two directions of at least pp each; DualPipeV
  // needs 2 pp in flight to fill its V.
  if ((dualpipe && (M % 2 != 0 || M < 2 * int64_t{p.pp})) ||
      (p.schedule == PipeSchedule::kDualPipeV && M < 2 * int64_t{p.pp}))
    r.fail({"parallel.schedule", "parallel.pp", "training.global_batch", "training.micro_batch",
            "parallel.dp"},
           "parallel.schedule = \"%s\" with parallel.pp = %d needs %s >= %lld per data-parallel "
           "rank, got %lld (training.global_batch / (training.micro_batch x parallel.dp))",
           kind, p.pp, dualpipe ? "an even number of micro-batches" : "micro-batches",
           2LL * p.pp, (long long)M);
  // The executor tags each message (activation or gradient, receiving stage, micro-batch);
  // MPI guarantees tags up to 32767 only.
  const int64_t tags = 2 * pipeline_stages(p) * M;
  if (tags > 32768)
    r.fail({"training.micro_batch", "training.global_batch", "parallel.pp", "parallel.dp"},
           "parallel.pp = %d with %lld micro-batches per data-parallel rank needs %lld pipeline "
           "message tags, more than the 32768 MPI guarantees (raise training.micro_batch)",
           p.pp, (long long)M, (long long)tags);
  // 1f1b and zb1p put the embedding (stage 0) and the head (stage S - 1) on different ranks;
  // DualPipe(V) holds both on rank 0.
  const bool one_chunk = p.schedule == PipeSchedule::k1F1B || p.schedule == PipeSchedule::kZB1P;
  if (one_chunk && c.model.mtp_depth > 0)
    r.fail({"model.mtp_depth", "parallel.pp", "parallel.schedule"},
           "model.mtp_depth > 0 needs the embedding on the head's rank (the MTP modules embed "
           "the next tokens), but parallel.schedule = \"%s\" with parallel.pp = %d puts them on "
           "ranks 0 and %d (use dualpipe or dualpipev)", kind, p.pp, p.pp - 1);
  if (one_chunk && c.model.tie_embeddings)
    r.fail({"model.tie_embeddings", "parallel.pp", "parallel.schedule"},
           "model.tie_embeddings = true needs the embedding and the head on one rank, but "
           "parallel.schedule = \"%s\" with parallel.pp = %d puts them on ranks 0 and %d "
           "(use dualpipe or dualpipev, or untie)", kind, p.pp, p.pp - 1);
}

void check_optim(const OptimConfig& o, const LrConfig& lr, const Rules& r) {
  r.positive("optim.lr", o.lr);
  if (!(o.beta1 >= 0 && o.beta1 < 1 && o.beta2 >= 0 && o.beta2 < 1))
    r.fail({"optim.betas"}, "optim.betas must each be in [0, 1), got [%g, %g]", o.beta1, o.beta2);
  r.positive("optim.eps", o.eps);
  r.non_negative("optim.weight_decay", o.weight_decay);
  r.non_negative("optim.grad_clip", o.grad_clip);
  r.at_least("lr.warmup_steps", lr.warmup_steps, 0);
  r.unit("lr.min_lr_ratio", lr.min_lr_ratio, false, false);
  r.unit("lr.decay_fraction", lr.decay_fraction, true, false);
}

void check_io(const Config& c, const Rules& r) {
  r.non_empty("data.train", c.data.train);
  r.non_empty("checkpoint.dir", c.checkpoint.dir);
  r.at_least("checkpoint.every", c.checkpoint.every, 0);
  r.at_least("checkpoint.keep_last", c.checkpoint.keep_last, 1);
  r.non_empty("checkpoint.resume", c.checkpoint.resume);
  r.at_least("log.every", c.log.every, 1);
  r.at_least("log.eval_every", c.log.eval_every, 0);
  r.at_least("log.eval_batches", c.log.eval_batches, 1);
  r.at_least("log.samples", c.log.samples, 0);
  r.at_least("log.sample_tokens", c.log.sample_tokens, 1);
  r.non_negative("log.heartbeat_s", c.log.heartbeat_s);
}

}  // namespace

std::span<const EnumName<Device>> enum_names(const Device*) { return kDeviceNames; }
std::span<const EnumName<AttentionKind>> enum_names(const AttentionKind*) { return kAttentionNames; }
std::span<const EnumName<ScoreFn>> enum_names(const ScoreFn*) { return kScoreNames; }
std::span<const EnumName<LrSchedule>> enum_names(const LrSchedule*) { return kLrScheduleNames; }
std::span<const EnumName<PipeSchedule>> enum_names(const PipeSchedule*) { return kPipeScheduleNames; }
std::span<const EnumName<PrecisionMode>> enum_names(const PrecisionMode*) { return kPrecisionNames; }
std::span<const EnumName<StateDtype>> enum_names(const StateDtype*) { return kStateDtypeNames; }
std::span<const EnumName<NonfiniteAction>> enum_names(const NonfiniteAction*) { return kNonfiniteNames; }
std::span<const EnumName<SpikeAction>> enum_names(const SpikeAction*) { return kSpikeNames; }
std::span<const EnumName<SaveErrorAction>> enum_names(const SaveErrorAction*) { return kSaveErrorNames; }

std::span<const Key> config_keys() { return kKeys; }

const Key* config_key_find(std::string_view section, std::string_view name) {
  for (const Key& k : kKeys)
    if (section == k.section && name == k.name) return &k;
  return nullptr;
}

bool config_section_known(std::string_view section) {
  for (const Key& k : kKeys)
    if (section == k.section) return true;
  return false;
}

std::string config_int_list(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

void config_fail(const std::string& where, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string msg = vstrprintf(fmt, ap);
  va_end(ap);
  throw UserError(one_line(where + ": " + msg));
}

void config_validate(Config& cfg, const KeyOrigins& origins, const std::string& source) {
  const Rules r(origins, source);
  r.at_least("run.threads", cfg.run.threads, 0);
  check_model(cfg.model, r);
  check_attention(cfg.attention, r);
  check_moe(cfg.moe, cfg.model, r);
  check_parallel(cfg.parallel, cfg.model, cfg.moe, r);
  check_training(cfg.training, cfg.parallel, r);
  check_pipeline(cfg, r);
  check_optim(cfg.optim, cfg.lr, r);
  check_io(cfg, r);
}

}  // namespace moe::config_schema

namespace moe {

const char* to_string(Device v) { return config_schema::enum_to_string(v); }
const char* to_string(AttentionKind v) { return config_schema::enum_to_string(v); }
const char* to_string(ScoreFn v) { return config_schema::enum_to_string(v); }
const char* to_string(LrSchedule v) { return config_schema::enum_to_string(v); }
const char* to_string(PipeSchedule v) { return config_schema::enum_to_string(v); }
const char* to_string(PrecisionMode v) { return config_schema::enum_to_string(v); }
const char* to_string(StateDtype v) { return config_schema::enum_to_string(v); }
const char* to_string(NonfiniteAction v) { return config_schema::enum_to_string(v); }
const char* to_string(SpikeAction v) { return config_schema::enum_to_string(v); }
const char* to_string(SaveErrorAction v) { return config_schema::enum_to_string(v); }

}  // namespace moe
