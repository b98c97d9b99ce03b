// Where every parameter and activation lives: the parameter table, the arenas, init.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "model/check.h"
#include "model/kernels/cpu/dense_ops.h"
#include "model/kernels/cuda/attention_plan.h"
#include "model/model.h"
#include "model/rng.h"

#ifdef MOETRAIN_HAVE_CUDA
#include "model/kernels/cuda/cuda_ops.h"
#endif

namespace moe {

namespace {

OpsLimits ops_limits(const ModelDims& d, int64_t B_max) {
  OpsLimits l;
  l.tokens = B_max * d.T;
  l.width = std::max({d.C, d.q_lora, d.kv_lora});
  l.batch = B_max;
  l.seq_len = d.T;
  l.experts = d.n_moe_blocks() > 0 ? d.E : 0;
  l.top_k = d.K;
  return l;
}

// native_gemm: the BF16 / FP8 GEMMs on their own tensor cores; attention_bf16: the attention
// core on BF16 tensor cores (cuda_ops.h).
template <typename T>
std::unique_ptr<Ops<T>> ops_create(Device device, const OpsLimits& limits, bool native_gemm,
                                   bool attention_bf16) {
  CHECK(device != Device::kAuto, "resolve run.device = \"auto\" before building the model");
  if (device == Device::kCpu) return ops_cpu_create<T>();
  if constexpr (std::is_same_v<T, float>) {
#ifdef MOETRAIN_HAVE_CUDA
    return ops_cuda_create(limits, native_gemm, native_gemm, attention_bf16);
#else
    (void)limits;
    (void)native_gemm;
    (void)attention_bf16;
    CHECK(false, "this build has no CUDA backend (configure with the CUDA toolkit present)");
#endif
  }
  CHECK(false, "the CUDA backend trains float models only");
  return nullptr;
}


// The attention core's scratch for micro-batches of B sequences: each backend's own need
// (the CPU's score strips and GQA partials; the GPU's per-row dots).
size_t attention_scratch_elems(const ModelDims& d, int64_t B, Device device) {
  CHECK(device != Device::kAuto, "resolve run.device = \"auto\" before sizing the model");
  const int64_t NKV = d.mla() ? d.NH : d.NKV;
  const int64_t HD = d.qk_hd(), HDv = d.v_dim();
  if (device == Device::kCuda)
    return static_cast<size_t>(cuda::attention_scratch_floats({B, d.T, d.NH, NKV, HD, HDv}));
  return static_cast<size_t>(cpu::attention_scratch_elems(B, d.T, d.NH, NKV, HD, HDv));
}

size_t round_up(size_t n, size_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// Walks the parameters in their fixed order: the replicated tensors in model order, then the
// local routed experts of every MoE layer, starting at the replicated size rounded up to
// pad_replicated. With base == nullptr it only fills the table. Returns the replicated size.
template <typename T>
size_t param_layout(const ModelDims& d, const ModelPart& part, size_t pad_replicated, T* base,
                    ModelParams<T>* views, std::vector<ParamInfo>* table) {
  size_t offset = 0;
  int64_t layer = -1, id = 0;
  // Tensors of parts not held keep their id (their place in the whole model's table) but
  // take no room and get null views.
  auto take = [&](const std::string& name, std::vector<int64_t> shape, bool decay,
                  bool experts = false) -> T* {
    const int64_t my_id = id++;
    if (!part.holds(layer)) return nullptr;
    size_t count = 1;
    for (int64_t s : shape) count *= static_cast<size_t>(s);
    if (table) table->push_back(ParamInfo{name, shape, offset, count, decay, experts, layer, my_id});
    T* p = base ? base + offset : nullptr;
    offset += count;
    return p;
  };
  auto prefix = [](int64_t l) { return "layers/" + std::to_string(l) + "/"; };
  ModelParams<T> v{};
  v.wte = take("embed/wte", {d.V, d.C}, true);
  v.layers.resize(static_cast<size_t>(d.L));
  // A transformer block's replicated tensors under `pre` (a MoE block's routed experts come
  // later, in the expert region).
  auto take_block = [&](LayerParams<T>& lp, const std::string& pre, bool moe) {
    lp = LayerParams<T>{};
    lp.attn_norm = take(pre + "attn_norm", {d.C}, false);
    if (!d.mla()) {
      lp.wqkv = take(pre + "attn/wqkv", {d.qkv(), d.C}, true);
    } else {
      if (d.q_lora > 0) {
        lp.wq_a = take(pre + "attn/wq_a", {d.q_lora, d.C}, true);
        lp.q_norm = take(pre + "attn/q_norm", {d.q_lora}, false);
        lp.wq_b = take(pre + "attn/wq_b", {d.NH * d.qk_hd(), d.q_lora}, true);
      } else {
        lp.wq = take(pre + "attn/wq", {d.NH * d.qk_hd(), d.C}, true);
      }
      lp.wkv_a = take(pre + "attn/wkv_a", {d.kv_lora + d.qk_rope, d.C}, true);
      lp.kv_norm = take(pre + "attn/kv_norm", {d.kv_lora}, false);
      lp.wkv_b = take(pre + "attn/wkv_b", {d.NH * (d.qk_nope + d.v_hd), d.kv_lora}, true);
    }
    lp.wo = take(pre + "attn/wo", {d.C, d.d_attn()}, true);
    lp.ffn_norm = take(pre + "ffn_norm", {d.C}, false);
    if (!moe) {
      lp.w13 = take(pre + "mlp/w13", {2 * d.F, d.C}, true);
      lp.w2 = take(pre + "mlp/w2", {d.C, d.F}, true);
    } else {
      lp.router = take(pre + "moe/router", {d.E, d.C}, true);
      if (d.S > 0) {
        lp.sw13 = take(pre + "moe/shared/w13", {2 * d.S, d.C}, true);
        lp.sw2 = take(pre + "moe/shared/w2", {d.C, d.S}, true);
      }
    }
  };
  auto take_experts = [&](LayerParams<T>& lp, const std::string& pre) {
    lp.ew13 = take(pre + "moe/experts/w13", {d.EL(), 2 * d.FE, d.C}, true, true);
    lp.ew2 = take(pre + "moe/experts/w2", {d.EL(), d.C, d.FE}, true, true);
  };
  for (int64_t l = 0; l < d.L; ++l) {
    layer = l;
    take_block(v.layers[static_cast<size_t>(l)], prefix(l), d.is_moe(l));
  }
  layer = d.L;
  v.final_norm = take("final_norm", {d.C}, false);
  v.lm_head = d.tie_embeddings ? v.wte : take("lm_head", {d.V, d.C}, true);
  // Multi-token prediction modules belong with the head (layer L): their blocks are of the
  // last layer's kind.
  auto mtp_prefix = [](int64_t k) { return "mtp/" + std::to_string(k) + "/"; };
  v.mtp.resize(static_cast<size_t>(d.mtp));
  for (int64_t k = 0; k < d.mtp; ++k) {
    MtpParams<T>& mp = v.mtp[static_cast<size_t>(k)];
    const std::string pre = mtp_prefix(k);
    mp.enorm = take(pre + "enorm", {d.C}, false);
    mp.hnorm = take(pre + "hnorm", {d.C}, false);
    mp.eh_proj = take(pre + "eh_proj", {d.C, 2 * d.C}, true);
    take_block(mp.block, pre, d.mtp_moe());
    mp.final_norm = take(pre + "final_norm", {d.C}, false);
  }
  const size_t n_replicated = offset;
  offset = round_up(offset, pad_replicated);
  for (int64_t l = d.dense_layers; l < d.L; ++l) {
    layer = l;
    take_experts(v.layers[static_cast<size_t>(l)], prefix(l));
  }
  layer = d.L;
  if (d.mtp_moe())
    for (int64_t k = 0; k < d.mtp; ++k) take_experts(v.mtp[static_cast<size_t>(k)].block, mtp_prefix(k));
  if (views) *views = std::move(v);
  return n_replicated;
}

// One LayerKept (see model.h) for a dense and/or a MoE layer; N rows, R = R_max.
template <typename T>
LayerKept<T> kept_layout(const ModelDims& d, size_t N, size_t R, bool dense, bool moe,
                         Carver& c) {
  const size_t C = static_cast<size_t>(d.C);
  LayerKept<T> k{};
  k.dres_mid = c.take<T>(N * C);
  if (!d.mla()) {
    k.dqkv = c.take<T>(N * static_cast<size_t>(d.qkv()));
  } else {
    const size_t QD = static_cast<size_t>(d.NH * d.qk_hd()), QL = static_cast<size_t>(d.q_lora);
    const size_t KVL = static_cast<size_t>(d.kv_lora);
    k.dq = c.take<T>(N * QD);
    if (QL > 0) {
      k.dq_an = c.take<T>(N * QL);
      k.dq_a = c.take<T>(N * QL);
    }
    k.dkv = c.take<T>(N * static_cast<size_t>(d.NH * (d.qk_nope + d.v_hd)));
    k.dkv_an = c.take<T>(N * KVL);
    k.dkv_a = c.take<T>(N * (KVL + static_cast<size_t>(d.qk_rope)));
  }
  k.dln1 = c.take<T>(N * C);
  k.dln2 = c.take<T>(N * C);
  k.dres_out = c.take<T>(N * C);
  if (dense) k.dgu = c.take<T>(N * 2 * static_cast<size_t>(d.F));
  if (moe) {
    k.dlogits_r = c.take<T>(N * static_cast<size_t>(d.E));
    k.dyg = c.take<T>(R * C);
    k.degu = c.take<T>(R * 2 * static_cast<size_t>(d.FE));
    if (d.S > 0) k.dsgu = c.take<T>(N * 2 * static_cast<size_t>(d.S));
  }
  return k;
}

// bf16 / fp8: buffers that live only inside one piece of a layer (model_chunk_step never
// stops between writing and reading them), so one set serves every slot and layer: the
// quantized GEMM operands, and the float tensors the layers save in the GEMM input format.
template <typename T>
struct GemmWorkspace {
  T *ln1 = nullptr, *attn_out = nullptr, *ln2 = nullptr, *h = nullptr, *eh = nullptr;
  T *q_an = nullptr, *kv_an = nullptr;  // MLA
  LinearScratch<T> lin;
  // The routed experts' row pad (any precision; cpu::gemm_rows_invariant).
  T* expert_pad = nullptr;
  int64_t expert_pad_count = 0;
};

// The linear layers' widths as the GEMM planning (gemm_plan.h) sees them; dense / moe: whether
// the dense FFN's and the MoE layers' linears are among them.
std::vector<cuda::GemmLinearShape> linear_shapes(const ModelDims& d, bool dense, bool moe) {
  cuda::GemmModelShape g;
  g.attn = d.attn;
  g.d_model = d.C;
  g.n_heads = d.NH;
  g.n_kv_heads = d.NKV;
  g.head_dim = d.HD;
  g.d_ff = dense ? d.F : 0;
  g.d_expert = d.FE;
  g.num_experts = moe ? d.E : 0;
  g.d_shared = d.S;
  g.q_lora_rank = d.q_lora;
  g.kv_lora_rank = d.kv_lora;
  g.qk_nope_head_dim = d.qk_nope;
  g.qk_rope_head_dim = d.qk_rope;
  g.v_head_dim = d.v_hd;
  g.vocab_size = d.V;
  g.mtp_depth = d.mtp;
  return cuda::gemm_linear_shapes(g);
}

template <typename T>
GemmWorkspace<T> workspace_layout(const ModelDims& d, const ModelPart& part, int64_t B,
                                  Carver& c) {
  GemmWorkspace<T> w;
  bool any_dense = false, any_moe = false;
  for (int64_t b = 0; b < d.n_blocks(); ++b) {
    if (!part.holds_block(b)) continue;
    any_dense |= !d.block_moe(b);
    any_moe |= d.block_moe(b);
  }
  if (any_moe) {
    // The experts' GEMMs, (K, N): (C, 2FE), (FE, C) forward, (C, FE), (2FE, C) backward.
    const auto pad = [](int64_t K, int64_t N) { return cpu::gemm_rows_invariant_pad_count(K, N); };
    w.expert_pad_count = std::max({pad(d.C, 2 * d.FE), pad(d.FE, d.C), pad(d.C, d.FE),
                                   pad(2 * d.FE, d.C)});
    w.expert_pad = c.take<T>(static_cast<size_t>(w.expert_pad_count));
  }
  if (d.precision == PrecisionMode::kFp32) return w;
  const size_t N = static_cast<size_t>(B * d.T), C = static_cast<size_t>(d.C);
  const size_t R = any_moe ? static_cast<size_t>(moe_rows_max(d, B * d.T)) : 0;
  const size_t HA = static_cast<size_t>(d.d_attn()), QKV = static_cast<size_t>(d.qkv());
  const size_t F = any_dense ? static_cast<size_t>(d.F) : 0;
  const size_t FE = static_cast<size_t>(d.FE), S = any_moe ? static_cast<size_t>(d.S) : 0;
  w.ln1 = c.take<T>(N * C);
  w.attn_out = c.take<T>(N * HA);
  if (any_dense) w.ln2 = c.take<T>(N * C);
  w.h = c.take<T>(std::max(N * F, N * S));
  if (any_moe) w.eh = c.take<T>(R * FE);
  // MLA's projections: wq (QD) or wq_a (q_lora) and wq_b, wkv_a (KVA), wkv_b (KVB).
  size_t mla_cap = 0;
  if (d.mla()) {
    const size_t QL = static_cast<size_t>(d.q_lora), KVL = static_cast<size_t>(d.kv_lora);
    if (QL > 0) w.q_an = c.take<T>(N * QL);
    w.kv_an = c.take<T>(N * KVL);
    mla_cap = N * std::max({QL, KVL, static_cast<size_t>(d.NH * d.qk_hd()),
                            KVL + static_cast<size_t>(d.qk_rope),
                            static_cast<size_t>(d.NH * (d.qk_nope + d.v_hd))});
  }
  // Every GEMM operand of a linear layer: (rows, width) of each of its inputs and outputs.
  size_t cap = std::max({N * C, d.mla() ? mla_cap : N * QKV, N * HA, N * 2 * F, N * 2 * S,
                         R * C, R * 2 * FE});
  if (d.precision == PrecisionMode::kFp8) {
    // The native FP8 path (linear.h; a backend with gemm_fp8_native()) builds its operands in
    // the first buffer as bytes: as many as any linear layer's three GEMMs need, (rows, IC, OC)
    // per layer. A few rows more than the float copies (the padding to 16).
    int64_t fp8 = 0;
    for (const cuda::GemmLinearShape& l : linear_shapes(d, any_dense, any_moe)) {
      if (l.precision != cuda::LinearPrecision::kRun) continue;
      fp8 = std::max(fp8, linear_fp8_scratch_bytes(static_cast<int64_t>(l.routed ? R : N),
                                                   l.in_features, l.out_features));
    }
    cap = std::max(cap, (static_cast<size_t>(fp8) + sizeof(T) - 1) / sizeof(T));
  }
  w.lin = LinearScratch<T>{c.take<T>(cap), c.take<T>(cap), static_cast<int64_t>(cap)};
  return w;
}

// split_backward: every held layer keeps its own LayerKept; otherwise they share one.
// ws: the model's GemmWorkspace (bf16 / fp8).
// host: the routing counts and offsets, which stay in host memory (LayerActs).
template <typename T>
void act_layout(const ModelDims& d, const ModelPart& part, int64_t B, bool split_backward,
                Device device, const GemmWorkspace<T>& ws, Carver& c, Carver& host,
                Activations<T>& a) {
  const size_t N = static_cast<size_t>(B * d.T), C = static_cast<size_t>(d.C);
  const size_t NK = N * static_cast<size_t>(d.K), E = static_cast<size_t>(d.E);
  const size_t R = static_cast<size_t>(moe_rows_max(d, B * d.T));
  const bool ep = d.ep > 1;
  const size_t lse_elems = static_cast<size_t>(B * d.NH * d.T);
  a.tokens = c.take<int32_t>(N);
  a.targets = c.take<int32_t>(N);
  a.res = c.take<T>(static_cast<size_t>(d.L + 1) * N * C);
  a.layers.resize(static_cast<size_t>(d.n_blocks()));
  bool any_dense = false, any_moe = false;
  for (int64_t b = 0; b < d.n_blocks(); ++b) {
    if (!part.holds_block(b)) continue;
    any_dense |= !d.block_moe(b);
    any_moe |= d.block_moe(b);
  }
  const PrecisionMode pm = d.precision;
  const bool q = pm != PrecisionMode::kFp32;
  const size_t HA = static_cast<size_t>(d.d_attn()), F = static_cast<size_t>(d.F);
  const size_t FE = static_cast<size_t>(d.FE), S = static_cast<size_t>(d.S);
  // MLA widths (unused otherwise): ranks, the packed attention input, the projections.
  const size_t QL = static_cast<size_t>(d.q_lora), KVL = static_cast<size_t>(d.kv_lora);
  const size_t QD = static_cast<size_t>(d.NH * d.qk_hd());
  const size_t KVA = KVL + static_cast<size_t>(d.qk_rope);
  const size_t KVB = static_cast<size_t>(d.NH * (d.qk_nope + d.v_hd)), QKVm = 2 * QD + HA;
  // bf16 / fp8: the float tensors that only a weight gradient reads are saved in the GEMM
  // input format; the floats live in the model's workspace, except the expert rows, which
  // an exchange in flight holds across chunk steps: once per slot. fp32 keeps them per layer.
  T *xp_once = nullptr, *xg_once = nullptr;
  if (q && any_moe) {
    xp_once = c.take<T>(NK * C);
    if (ep) xg_once = c.take<T>(R * C);
  }
  auto take_saved = [&](size_t rows, size_t cols) {
    return linear_saved_carve(c, static_cast<int64_t>(rows), static_cast<int64_t>(cols), pm);
  };
  for (int64_t l = 0; l < d.n_blocks(); ++l) {
    LayerActs<T>& la = a.layers[static_cast<size_t>(l)];
    la = LayerActs<T>{};
    if (!part.holds_block(l)) continue;
    const bool moe = d.block_moe(l);
    la.res_mid = c.take<T>(N * C);
    la.ln1 = q ? ws.ln1 : c.take<T>(N * C);
    la.rstd1 = c.take<T>(N);
    if (!d.mla()) {
      la.qkv = c.take<T>(N * static_cast<size_t>(d.qkv()));
    } else {
      if (QL > 0) {
        la.q_a = c.take<T>(N * QL);
        la.q_rstd = c.take<T>(N);
        la.q_an = q ? ws.q_an : c.take<T>(N * QL);
        if (q) la.saved_q_an = take_saved(N, QL);
      }
      la.kv_c = c.take<T>(N * KVL);
      la.kv_rstd = c.take<T>(N);
      la.kv_an = q ? ws.kv_an : c.take<T>(N * KVL);
      if (q) la.saved_kv_an = take_saved(N, KVL);
      la.qkv_mla = c.take<T>(N * QKVm);
    }
    la.lse = c.take<T>(lse_elems);
    la.attn_out = q ? ws.attn_out : c.take<T>(N * HA);
    la.ln2 = q && !moe ? ws.ln2 : c.take<T>(N * C);
    la.rstd2 = c.take<T>(N);
    if (q) {
      la.saved_ln1 = take_saved(N, C);
      la.saved_attn_out = take_saved(N, HA);
    }
    if (!moe) {
      la.gu = c.take<T>(N * 2 * F);
      la.h = q ? ws.h : c.take<T>(N * F);
      if (q) {
        la.saved_ln2 = take_saved(N, C);
        la.saved_h = take_saved(N, F);
      }
    } else {
      la.scores = c.take<T>(N * E);
      la.expert_ids = c.take<int32_t>(NK);
      la.gate_weights = c.take<T>(NK);
      la.counts = host.take<int64_t>(E);
      la.offsets = host.take<int64_t>(E + 1);
      la.row_of = c.take<int32_t>(NK);
      la.token_of = c.take<int32_t>(NK);
      la.xp = q ? xp_once : c.take<T>(NK * C);
      la.xg = !ep ? nullptr : q ? xg_once : c.take<T>(R * C);
      la.local_offsets = host.take<int64_t>(static_cast<size_t>(d.EL()) + 1);
      la.block_offsets = host.take<int64_t>(static_cast<size_t>(d.EL() * d.ep) + 1);
      la.egu = c.take<T>(R * 2 * FE);
      la.eh = q ? ws.eh : c.take<T>(R * FE);
      la.yp = c.take<T>(NK * C);
      if (d.S > 0) {
        la.sgu = c.take<T>(N * 2 * S);
        la.sh = q ? ws.h : c.take<T>(N * S);
      }
      if (q) {
        la.saved_xg = take_saved(R, C);
        la.saved_eh = take_saved(R, FE);
        if (d.S > 0) la.saved_sh = take_saved(N, S);
      }
    }
    if (split_backward) la.kept = kept_layout<T>(d, N, R, !moe, moe, c);
  }
  a.split_backward = split_backward;
  if (!split_backward && (any_dense || any_moe)) {
    const LayerKept<T> shared = kept_layout<T>(d, N, R, any_dense, any_moe, c);
    for (int64_t l = 0; l < d.n_blocks(); ++l)
      if (part.holds_block(l)) a.layers[static_cast<size_t>(l)].kept = shared;
  }
  a.mtp.assign(part.head ? static_cast<size_t>(d.mtp) : 0, MtpActs<T>{});
  for (MtpActs<T>& ma : a.mtp) {
    ma.tokens = c.take<int32_t>(N);
    ma.targets = c.take<int32_t>(N);
    ma.emb = c.take<T>(N * C);
    ma.e_rstd = c.take<T>(N);
    ma.h_rstd = c.take<T>(N);
    ma.cat = c.take<T>(N * 2 * C);
    ma.x = c.take<T>(N * C);
    ma.out = c.take<T>(N * C);
    ma.lnf = c.take<T>(N * C);
    ma.rstdf = c.take<T>(N);
    ma.probs = c.take<T>(N * static_cast<size_t>(d.V));
    ma.losses = c.take<T>(N);
  }
  const bool mtp = !a.mtp.empty();
  a.mtp_logits = mtp ? c.take<T>(N * static_cast<size_t>(d.V)) : nullptr;
  a.mtp_dcat = mtp ? c.take<T>(N * 2 * C) : nullptr;
  a.mtp_demb = mtp ? c.take<T>(N * C) : nullptr;
  a.mtp_dh = mtp ? c.take<T>(N * C) : nullptr;
  a.lnf = c.take<T>(N * C);
  a.rstdf = c.take<T>(N);
  a.logits = c.take<T>(N * static_cast<size_t>(d.V));
  a.probs = c.take<T>(N * static_cast<size_t>(d.V));
  a.losses = c.take<T>(N);
  a.loss_acc = c.take<double>(kLossSlots);
  a.dlogits = c.take<T>(N * static_cast<size_t>(d.V));
  a.dlnf = c.take<T>(N * C);
  a.dres0 = c.take<T>(N * C);
  a.tmp = c.take<T>(N * C);
  a.router_logits = c.take<T>(N * E);
  a.dres = c.take<T>(N * C);
  a.dattn = c.take<T>(N * static_cast<size_t>(d.d_attn()));
  a.attn_scratch = c.take<T>(attention_scratch_elems(d, B, device));
  a.mla_proj = d.mla() ? c.take<T>(N * std::max({QD, KVA, KVB})) : nullptr;
  a.dqkv_mla = d.mla() ? c.take<T>(N * QKVm) : nullptr;
  a.dkv_c = d.mla() ? c.take<T>(N * KVL) : nullptr;
  a.dh = c.take<T>(std::max({N * static_cast<size_t>(d.F), R * static_cast<size_t>(d.FE),
                             N * static_cast<size_t>(d.S)}));
  a.dxp = c.take<T>(NK * C);
  a.dyp = ep ? c.take<T>(NK * C) : nullptr;
  a.yg = ep ? c.take<T>(R * C) : nullptr;
  a.dxg = ep ? c.take<T>(R * C) : nullptr;
  a.dgate = c.take<T>(NK);
  a.dscores = c.take<T>(N * E);
  for (int64_t l = 0; l < d.n_blocks(); ++l)
    if (part.holds_block(l)) {
      LayerActs<T>& la = a.layers[static_cast<size_t>(l)];
      la.lin = ws.lin;
      la.lin_experts = ws.lin;
      la.lin_experts.row_pad = ws.expert_pad;
      la.lin_experts.row_pad_count = ws.expert_pad_count;
    }
}

void dims_check(const ModelDims& d) {
  CHECK(d.V >= 2 && d.C >= 1 && d.L >= 1 && d.T >= 1);
  CHECK(d.NH >= 1 && d.NKV >= 1 && d.NH % d.NKV == 0, "NH %lld NKV %lld", (long long)d.NH,
        (long long)d.NKV);
  if (!d.mla()) {
    CHECK(d.HD >= 2 && d.HD % 2 == 0);
  } else {
    CHECK(d.q_lora >= 0 && d.kv_lora >= 1 && d.qk_nope >= 0 && d.v_hd >= 1 && d.qk_rope >= 2 &&
              d.qk_rope % 2 == 0,
          "MLA dims q_lora %lld kv_lora %lld nope %lld rope %lld v %lld", (long long)d.q_lora,
          (long long)d.kv_lora, (long long)d.qk_nope, (long long)d.qk_rope, (long long)d.v_hd);
  }
  CHECK(d.dense_layers >= 0 && d.dense_layers <= d.L);
  if (d.n_moe_layers() > 0) {
    CHECK(d.E >= 1 && d.K >= 1 && d.K <= d.E && d.FE >= 1 && d.S >= 0);
    CHECK(d.G >= 1 && d.E % d.G == 0 && d.KG >= 1 && d.KG <= d.G);
    CHECK(d.ep >= 1 && d.E % d.ep == 0 && d.ep_rank >= 0 && d.ep_rank < d.ep, "E %lld ep %lld",
          (long long)d.E, (long long)d.ep);
  }
  if (d.dense_layers > 0) CHECK(d.F >= 1);
  CHECK(d.mtp >= 0 && d.mtp_weight >= 0, "mtp %lld weight %g", (long long)d.mtp, d.mtp_weight);
}

}  // namespace

std::vector<cuda::GemmLinearShape> model_linear_shapes(const ModelDims& d) {
  return linear_shapes(d, d.dense_layers > 0, d.n_moe_blocks() > 0);
}

std::vector<ParamInfo> model_param_table(const ModelDims& d, int64_t pad_replicated) {
  std::vector<ParamInfo> table;
  param_layout<float>(d, model_part_whole(d), static_cast<size_t>(pad_replicated), nullptr,
                      nullptr, &table);
  return table;
}

std::vector<LogicalTensor> model_logical_tensors(const ModelDims& d,
                                                 const std::vector<ParamInfo>& table) {
  std::vector<LogicalTensor> out;
  int64_t layer = 0;
  auto add = [&](const std::string& name, int64_t rows, int64_t cols, size_t offset, int64_t ld,
                 int64_t expert = -1) {
    out.push_back(LogicalTensor{name, rows == 0 ? std::vector<int64_t>{cols}
                                                : std::vector<int64_t>{rows, cols},
                                offset, ld, expert, layer});
  };
  const size_t C = static_cast<size_t>(d.C);
  for (const ParamInfo& p : table) {
    layer = p.layer;
    const std::string& n = p.name;
    auto ends = [&](const char* suffix) {
      const std::string s(suffix);
      return n.size() >= s.size() && n.compare(n.size() - s.size(), s.size(), s) == 0;
    };
    const std::string pre = n.substr(0, n.rfind('/') + 1);
    if (p.shape.size() == 1) {
      add(n, 0, p.shape[0], p.offset, p.shape[0]);
    } else if (ends("attn/wqkv")) {
      const size_t q = static_cast<size_t>(d.NH * d.HD), kv = static_cast<size_t>(d.NKV * d.HD);
      add(pre + "wq", d.NH * d.HD, d.C, p.offset, d.C);
      add(pre + "wk", d.NKV * d.HD, d.C, p.offset + q * C, d.C);
      add(pre + "wv", d.NKV * d.HD, d.C, p.offset + (q + kv) * C, d.C);
    } else if (ends("mlp/w13")) {
      add(pre + "w_gate", d.F, d.C, p.offset, d.C);
      add(pre + "w_up", d.F, d.C, p.offset + static_cast<size_t>(d.F) * C, d.C);
    } else if (ends("mlp/w2")) {
      add(pre + "w_down", d.C, d.F, p.offset, d.F);
    } else if (ends("experts/w13") || ends("experts/w2")) {
      const bool up_gate = ends("experts/w13");
      const size_t per = up_gate ? 2 * static_cast<size_t>(d.FE) * C : C * static_cast<size_t>(d.FE);
      for (int64_t e = 0; e < d.EL(); ++e) {
        const size_t base = p.offset + static_cast<size_t>(e) * per;
        const int64_t id = d.expert0() + e;
        const std::string ep = pre + std::to_string(id) + "/";
        if (up_gate) {
          add(ep + "w_gate", d.FE, d.C, base, d.C, id);
          add(ep + "w_up", d.FE, d.C, base + static_cast<size_t>(d.FE) * C, d.C, id);
        } else {
          add(ep + "w_down", d.C, d.FE, base, d.FE, id);
        }
      }
    } else if (ends("shared/w13") || ends("shared/w2")) {
      // The shared experts are fused into one SwiGLU of width S = ns * FE; expert s owns
      // gate/up rows [s FE, (s+1) FE) of each half and columns [s FE, (s+1) FE) of w_down.
      const int64_t ns = d.S / d.FE;
      for (int64_t s = 0; s < ns; ++s) {
        const std::string sp = pre + std::to_string(s) + "/";
        const size_t row0 = static_cast<size_t>(s * d.FE);
        if (ends("shared/w13")) {
          add(sp + "w_gate", d.FE, d.C, p.offset + row0 * C, d.C);
          add(sp + "w_up", d.FE, d.C, p.offset + (static_cast<size_t>(d.S) + row0) * C, d.C);
        } else {
          add(sp + "w_down", d.C, d.FE, p.offset + row0, d.S);
        }
      }
    } else {
      add(n, p.shape[0], p.shape[1], p.offset, p.shape[1]);
    }
  }
  return out;
}

template <typename T>
void model_build(Model<T>& m, const ModelDims& d, int64_t B_max, int64_t pad_replicated,
                 int64_t pad_experts, ModelPart part, int n_slots, bool split_backward,
                 Device device) {
  dims_check(d);
  // BF16 and FP8 training keep attention in BF16 (DeepSeek-V3 report 3.3): with native GEMMs
  // the GPU runs its core on BF16 tensor cores too.
  m.ops = ops_create<T>(device, ops_limits(d, B_max), d.native_gemm,
                        d.native_gemm && d.precision != PrecisionMode::kFp32);
  // cuBLASLt's FP8 kernels take only widths in multiples of 16: refuse a model they cannot
  // run here, naming the layer, rather than fail inside the first step.
  if (d.precision == PrecisionMode::kFp8 && m.ops->gemm_fp8_native())
    cuda::gemm_fp8_shapes_check(model_linear_shapes(d));
  CHECK(B_max >= 1 && pad_replicated >= 1 && pad_experts >= 1 && n_slots >= 1);
  if (part.layers.empty()) part = model_part_whole(d);
  CHECK(static_cast<int64_t>(part.layers.size()) == d.L);
  // A tied head is the embedding: both or neither.
  CHECK(!d.tie_embeddings || part.embedding == part.head, "tied embeddings split across ranks");
  CHECK(d.mtp == 0 || !part.head || part.embedding, "the MTP modules need the embedding");
  m.d = d;
  m.B_max = B_max;
  m.part = part;
  m.table.clear();
  const size_t n_rep = param_layout<T>(d, part, static_cast<size_t>(pad_replicated), nullptr,
                                       nullptr, &m.table);
  m.replicated = ParamRegion{0, round_up(n_rep, static_cast<size_t>(pad_replicated))};
  size_t n_exp = 0;
  for (const ParamInfo& p : m.table) n_exp += p.routed_experts ? p.count : 0;
  m.experts = ParamRegion{m.replicated.count, round_up(n_exp, static_cast<size_t>(pad_experts))};
  m.n_params = n_rep + n_exp;
  m.n_alloc = m.replicated.count + m.experts.count;
  m.param_arena = Arena("parameters", m.n_alloc * sizeof(T), device);
  m.grad_arena = Arena("gradients", m.n_alloc * sizeof(T), device);
  m.params = reinterpret_cast<T*>(m.param_arena.data());
  m.grads = reinterpret_cast<T*>(m.grad_arena.data());
  param_layout<T>(d, part, static_cast<size_t>(pad_replicated), m.params, &m.p, nullptr);
  param_layout<T>(d, part, static_cast<size_t>(pad_replicated), m.grads, &m.g, nullptr);
  CHECK((std::is_same_v<T, float>) || !d.dispatch_fp8, "FP8 dispatch needs float parameters");
  if (d.precision == PrecisionMode::kFp32) {
    m.gemm_arena = Arena();
    m.q = m.p;
  } else {
    CHECK((std::is_same_v<T, float>), "BF16 / FP8 GEMMs need float parameters");
    m.gemm_arena = Arena("GEMM weights", m.n_alloc * sizeof(T), device);
    T* base = reinterpret_cast<T*>(m.gemm_arena.data());
    param_layout<T>(d, part, static_cast<size_t>(pad_replicated), base, &m.q, nullptr);
    // Only the linear layers' matrices have a GEMM copy.
    m.q.wte = m.p.wte;
    m.q.final_norm = m.p.final_norm;
    m.q.lm_head = m.p.lm_head;
    auto alias_block = [](LayerParams<T>& q, const LayerParams<T>& p) {
      q.attn_norm = p.attn_norm;
      q.ffn_norm = p.ffn_norm;
      q.router = p.router;
      q.q_norm = p.q_norm;
      q.kv_norm = p.kv_norm;
    };
    for (size_t l = 0; l < m.q.layers.size(); ++l) alias_block(m.q.layers[l], m.p.layers[l]);
    // eh_proj stays in T, like the head: the modules read their own parameters from p.
    for (size_t k = 0; k < m.q.mtp.size(); ++k) {
      MtpParams<T>& q = m.q.mtp[k];
      const MtpParams<T>& p = m.p.mtp[k];
      alias_block(q.block, p.block);
      q.enorm = p.enorm;
      q.hnorm = p.hnorm;
      q.eh_proj = p.eh_proj;
      q.final_norm = p.final_norm;
    }
  }
  m.slots.assign(static_cast<size_t>(n_slots), Activations<T>{});
  const size_t rope = static_cast<size_t>(d.T * d.rope_dim() / 2);
  GemmWorkspace<T> ws;
  m.work_arena = arena_build(
      "GEMM workspace", [&](Carver& c) { ws = workspace_layout<T>(d, part, B_max, c); }, device);
  // Activations on the device, their routing plans on the host: measured together, then
  // carved together.
  auto layout_slots = [&](Carver& c, Carver& host) {
    m.rope_cos = c.take<T>(rope);
    m.rope_sin = c.take<T>(rope);
    for (Activations<T>& a : m.slots) {
      act_layout<T>(d, part, B_max, split_backward, device, ws, c, host, a);
      a.rope_cos = m.rope_cos;
      a.rope_sin = m.rope_sin;
    }
  };
  Carver act_measure, plan_measure;
  layout_slots(act_measure, plan_measure);
  m.act_arena = Arena("activations", act_measure.used(), device);
  m.plan_arena = Arena("routing plans", plan_measure.used());
  Carver act_carve(m.act_arena.data()), plan_carve(m.plan_arena.data());
  layout_slots(act_carve, plan_carve);
  const size_t moe_e = static_cast<size_t>(d.n_moe_blocks() * d.E);
  m.state_arena = arena_build("router state", [&](Carver& c) {
    m.router_bias = c.take<float>(moe_e);
    m.expert_load = c.take<int64_t>(moe_e);
  });
  m.bias_arena = Arena();
  m.router_bias_dev = m.router_bias;
  if (device != Device::kCpu) {
    m.bias_arena = Arena("router bias", moe_e * sizeof(float), device);
    m.router_bias_dev = reinterpret_cast<float*>(m.bias_arena.data());
  }
  m.ops->rope_tables(m.rope_cos, m.rope_sin, d.T, d.rope_dim(), d.rope_theta);
}

template <typename T>
void model_init(Model<T>& m, uint64_t seed) {
  // On a device the values are made in host memory and uploaded once.
  std::vector<T> staging;
  T* params = m.params;
  if (m.ops->device() != Device::kCpu) {
    staging.assign(m.n_alloc, T(0));
    params = staging.data();
  }
  for (size_t i = 0; i < m.table.size(); ++i) {
    const ParamInfo& info = m.table[i];
    T* p = params + info.offset;
    const bool is_norm = info.shape.size() == 1;
    const uint64_t stream = rng_stream(RngPurpose::kInit, static_cast<uint64_t>(info.id));
    // Local experts continue the global tensor's counter where their first expert starts.
    const uint64_t first = info.routed_experts
                               ? static_cast<uint64_t>(m.d.expert0()) * (info.count / static_cast<size_t>(m.d.EL()))
                               : 0;
#pragma omp parallel for schedule(static)
    for (size_t j = 0; j < info.count; ++j)
      p[j] = is_norm ? T(1) : static_cast<T>(m.d.init_std * rng_normal(seed, stream, first + j));
  }
  if (params != m.params) m.ops->upload(m.params, params, m.n_alloc * sizeof(T));
  std::memset(m.router_bias, 0, sizeof(float) * static_cast<size_t>(m.d.n_moe_blocks() * m.d.E));
  std::memset(m.expert_load, 0, sizeof(int64_t) * static_cast<size_t>(m.d.n_moe_blocks() * m.d.E));
}

template <typename T>
void model_zero_grads(Model<T>& m) {
  m.ops->zero(m.grads, m.n_alloc * sizeof(T));
}

template <typename T>
void model_quantize_weights(Model<T>& m) {
  const ModelDims& d = m.d;
  if (m.router_bias_dev != m.router_bias)
    m.ops->upload(m.router_bias_dev, m.router_bias,
                  sizeof(float) * static_cast<size_t>(d.n_moe_blocks() * d.E));
  const PrecisionMode mode = d.precision;
  if (mode == PrecisionMode::kFp32) return;
  auto quantize = [&](T* wq, const T* w, int64_t OC, int64_t IC) {
    if (w) linear_quantize_weight<T>(*m.ops, wq, w, OC, IC, IC, mode);
  };
  for (int64_t l = 0; l < d.n_blocks(); ++l) {
    if (!m.part.holds_block(l)) continue;
    const bool mtp = l >= d.L;
    const LayerParams<T>& p = mtp ? m.p.mtp[static_cast<size_t>(l - d.L)].block
                                  : m.p.layers[static_cast<size_t>(l)];
    LayerParams<T>& q = mtp ? m.q.mtp[static_cast<size_t>(l - d.L)].block
                            : m.q.layers[static_cast<size_t>(l)];
    quantize(q.wqkv, p.wqkv, d.qkv(), d.C);
    quantize(q.wq, p.wq, d.NH * d.qk_hd(), d.C);
    quantize(q.wq_a, p.wq_a, d.q_lora, d.C);
    quantize(q.wq_b, p.wq_b, d.NH * d.qk_hd(), d.q_lora);
    quantize(q.wkv_a, p.wkv_a, d.kv_lora + d.qk_rope, d.C);
    quantize(q.wkv_b, p.wkv_b, d.NH * (d.qk_nope + d.v_hd), d.kv_lora);
    quantize(q.wo, p.wo, d.C, d.d_attn());
    if (!d.block_moe(l)) {
      quantize(q.w13, p.w13, 2 * d.F, d.C);
      quantize(q.w2, p.w2, d.C, d.F);
      continue;
    }
    quantize(q.sw13, p.sw13, 2 * d.S, d.C);
    quantize(q.sw2, p.sw2, d.C, d.S);
    for (int64_t e = 0; e < d.EL(); ++e) {
      quantize(q.ew13 + e * 2 * d.FE * d.C, p.ew13 + e * 2 * d.FE * d.C, 2 * d.FE, d.C);
      quantize(q.ew2 + e * d.C * d.FE, p.ew2 + e * d.C * d.FE, d.C, d.FE);
    }
  }
}

ModelCounts model_counts(const ModelDims& dims) {
  const ModelDims d = dims.whole_model();  // whatever this rank holds
  ModelCounts c;
  for (const ParamInfo& p : model_param_table(d))
    (p.name.rfind("mtp/", 0) == 0 ? c.mtp : c.total) += static_cast<int64_t>(p.count);
  c.embedding = d.V * d.C;
  const int64_t attn = d.attn_matmul_params();
  const int64_t dense = 3 * d.F * d.C;
  const int64_t moe = d.E * d.C + 3 * d.K * d.FE * d.C + 3 * d.S * d.C;
  c.active_matmul = d.L * attn + d.dense_layers * dense + d.n_moe_layers() * moe + d.V * d.C;
  c.mtp_active_matmul = d.mtp * (2 * d.C * d.C + attn + (d.mtp_moe() ? moe : dense) + d.V * d.C);
  return c;
}

double model_flops_per_token(const ModelDims& d) {
  return 6.0 * static_cast<double>(model_counts(d).active_matmul) +
         6.0 * static_cast<double>(d.L * d.T * d.NH * (d.qk_hd() + d.v_dim()));
}

double model_mtp_flops_per_token(const ModelDims& d) {
  return 6.0 * static_cast<double>(model_counts(d).mtp_active_matmul) +
         6.0 * static_cast<double>(d.mtp * d.T * d.NH * (d.qk_hd() + d.v_dim()));
}

size_t model_activation_bytes(const ModelDims& d, int64_t B, size_t elem, Device device) {
  Carver measure, host;
  if (elem == sizeof(double)) {
    Activations<double> a;
    act_layout<double>(d, model_part_whole(d), B, false, device, GemmWorkspace<double>{},
                       measure, host, a);
  } else {
    Activations<float> a;
    act_layout<float>(d, model_part_whole(d), B, false, device, GemmWorkspace<float>{}, measure,
                      host, a);
  }
  return measure.used() + host.used();
}

size_t model_workspace_bytes(const ModelDims& d, int64_t B) {
  Carver measure;
  workspace_layout<float>(d, model_part_whole(d), B, measure);
  return measure.used();
}

template void model_build<float>(Model<float>&, const ModelDims&, int64_t, int64_t, int64_t,
                                 ModelPart, int, bool, Device);
template void model_build<double>(Model<double>&, const ModelDims&, int64_t, int64_t, int64_t,
                                  ModelPart, int, bool, Device);
template void model_init<float>(Model<float>&, uint64_t);
template void model_init<double>(Model<double>&, uint64_t);
template void model_zero_grads<float>(Model<float>&);
template void model_zero_grads<double>(Model<double>&);
template void model_quantize_weights<float>(Model<float>&);
template void model_quantize_weights<double>(Model<double>&);

}  // namespace moe
