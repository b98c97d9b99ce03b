// The decoder-only MoE transformer on one process: parameter layout, activations,
// forward and backward, over raw buffers allocated once (llm.c style).
//
//   tokens -> embedding -> L x [ RMSNorm -> causal attention (RoPE; GQA or MLA) -> +residual
//                                RMSNorm -> FFN -> +residual ] -> RMSNorm -> head -> CE
// FFN is a dense SwiGLU for the first `dense_layers` layers and a MoE layer after:
// E routed SwiGLU experts (top-K, DeepSeek-V3 routing with a selection-only bias) plus
// shared experts, fused as one SwiGLU of width S.
//
// Dimension letters: B batch, T sequence, N = B*T, C d_model, V vocab, L layers, NH/NKV
// query/kv heads, HD head dim, F dense FFN width, E experts, K top-k, FE expert width,
// S shared width (num_shared * FE), QKV = (NH + 2 NKV) * HD.
//
// Weights are (out, in) row-major. Fused weights: wqkv (QKV, C) = [q rows | k rows | v rows];
// w13 (2F, C) = [gate rows | up rows]. The element type T is float for training and double
// for gradient checks.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "model/arena.h"
#include "model/expert_exchange.h"
#include "model/kernels/cuda/gemm_plan.h"
#include "model/linear.h"
#include "model/ops.h"
#include "model/types.h"

namespace moe {

struct ModelDims {
  int64_t V = 256, C = 256, L = 6, NH = 8, NKV = 8, HD = 32, T = 256, F = 768;
  int64_t dense_layers = 1;
  int64_t E = 16, K = 2, FE = 256, S = 256, G = 1, KG = 1;
  ScoreFn score = ScoreFn::kSigmoid;
  double route_scale = 1.0;
  double aux_alpha = 0.0;
  double norm_eps = 1e-6;
  double rope_theta = 10000.0;
  double init_std = 0.02;
  bool tie_embeddings = false;
  // Multi-head Latent Attention (attn = kMla, DeepSeek-V3 section 2.1.1): queries through a
  // rank-q_lora bottleneck (0: one full-rank projection), keys and values through a rank-kv_lora
  // latent; qk_nope + qk_rope query/key dims per head (the RoPE part of the key shared by all
  // heads), v_hd value dims. NKV and HD are unused then.
  AttentionKind attn = AttentionKind::kMha;
  int64_t q_lora = 0, kv_lora = 0, qk_nope = 0, qk_rope = 0, v_hd = 0;
  // Multi-token prediction (DeepSeek-V3 section 2.2): depth (MtpParams; their blocks are MoE
  // when the model has MoE layers) and the loss weight lambda: the objective is
  // CE + (lambda / mtp) sum_k CE_k.
  int64_t mtp = 0;
  double mtp_weight = 0.3;
  // The inputs of the linear layers' GEMMs (attention projections, dense FFN, shared and
  // routed experts; see model/linear.h); embedding, head, router, norms and the attention
  // core stay in T.
  PrecisionMode precision = PrecisionMode::kFp32;
  // Routed experts' rows travel as DeepSeek-V3 sends them: dispatches (inputs, and output
  // gradients in backward) in FP8 with 1x128 scales, combines in BF16. With ep > 1 the
  // exchange's wire rounds them (parallel/expert_dispatch.h); with every expert local the
  // model applies the same rounding, so the numbers do not depend on where experts live.
  bool dispatch_fp8 = false;
  // A CUDA backend multiplies bf16 / fp8 GEMM inputs in their own formats (BF16 tensor cores;
  // FP8 with cuBLASLt's block scaling on Hopper; model/linear.h's native paths); false keeps
  // the exact FP32 emulation the CPU runs. The CPU always emulates.
  bool native_gemm = true;
  // Expert parallelism: this model holds routed experts [ep_rank EL, (ep_rank + 1) EL) of E
  // (EL = E / ep); everything else is replicated. ep = 1 holds them all.
  int64_t ep = 1, ep_rank = 0;

  int64_t EL() const { return E / ep; }
  // The same model as one process holds it (every routed expert).
  ModelDims whole_model() const {
    ModelDims d = *this;
    d.ep = 1;
    d.ep_rank = 0;
    return d;
  }
  int64_t expert0() const { return ep_rank * EL(); }
  // Standard attention's fused projection width.
  int64_t qkv() const { return (NH + 2 * NKV) * HD; }
  bool mla() const { return attn == AttentionKind::kMla; }
  // Per head: query/key width, value width, and the RoPE part of the query/key.
  int64_t qk_hd() const { return mla() ? qk_nope + qk_rope : HD; }
  int64_t v_dim() const { return mla() ? v_hd : HD; }
  int64_t rope_dim() const { return mla() ? qk_rope : HD; }
  // The attention output's width (wo's input).
  int64_t d_attn() const { return NH * v_dim(); }
  // Matmul weights of one layer's attention (what a token passes through).
  int64_t attn_matmul_params() const {
    if (!mla()) return qkv() * C + C * d_attn();
    const int64_t q = q_lora > 0 ? q_lora * C + NH * qk_hd() * q_lora : NH * qk_hd() * C;
    return q + (kv_lora + qk_rope) * C + NH * (qk_nope + v_hd) * kv_lora + C * d_attn();
  }
  bool is_moe(int64_t l) const { return l >= dense_layers; }
  bool mtp_moe() const { return dense_layers < L; }
  int64_t n_moe_layers() const { return L - dense_layers; }
  // Transformer blocks: the L layers, then the mtp modules' blocks (block L + k is module
  // k's). MoE blocks are numbered 0.. in the same order: the router-bias, load and exchange
  // arrays hold n_moe_blocks rows.
  int64_t n_blocks() const { return L + mtp; }
  bool block_moe(int64_t b) const { return b < L ? is_moe(b) : mtp_moe(); }
  int64_t n_moe_blocks() const { return n_moe_layers() + (mtp_moe() ? mtp : 0); }
  int64_t moe_index(int64_t b) const { return b < L ? b - dense_layers : n_moe_layers() + (b - L); }
};

// One named parameter tensor inside the flat parameter buffer.
struct ParamInfo {
  std::string name;            // e.g. "layers/3/moe/experts/w13"
  std::vector<int64_t> shape;  // logical shape, row-major
  size_t offset = 0;           // in elements from the start of the buffer
  size_t count = 0;
  bool decay = true;           // weight decay applies (not to norms)
  bool routed_experts = false; // in the expert region: (EL, ...) local experts of the E
  int64_t layer = 0;           // -1 embedding, 0..L-1 layers, L final norm and head
  int64_t id = 0;              // index in the whole model's table (fixes its init stream)
};

// The parts of the model a rank holds (pipeline parallelism): some layers, and whether the
// embedding and the final norm + head. A rank holds the union of its pipeline stages.
struct ModelPart {
  std::vector<uint8_t> layers;  // (L) 1 where held
  bool embedding = true;
  bool head = true;
  bool holds_layer(int64_t l) const { return layers[static_cast<size_t>(l)] != 0; }
  // By ParamInfo::layer numbering: -1 the embedding, L the final norm and head.
  bool holds(int64_t layer) const {
    if (layer < 0) return embedding;
    if (layer >= static_cast<int64_t>(layers.size())) return head;
    return holds_layer(layer);
  }
  // Transformer block b (ModelDims::n_blocks): the MTP modules' are held with the head.
  bool holds_block(int64_t b) const {
    return b < static_cast<int64_t>(layers.size()) ? holds_layer(b) : head;
  }
};
inline ModelPart model_part_whole(const ModelDims& d) {
  return ModelPart{std::vector<uint8_t>(static_cast<size_t>(d.L), 1), true, true};
}

// When backward makes a tensor's gradient final: stages complete in increasing order,
// 0 (head and final norm), then L - l for layer l, then L + 1 (embedding).
inline int64_t model_grad_stage(const ModelDims& d, const ParamInfo& p) { return d.L - p.layer; }

template <typename T>
struct LayerParams {
  T* attn_norm;  // (C)
  T* wqkv;       // standard attention (QKV, C)
  // MLA (null otherwise): wq (NH qk_hd, C) when q_lora = 0, else wq_a (q_lora, C), q_norm
  // (q_lora), wq_b (NH qk_hd, q_lora); wkv_a (kv_lora + qk_rope, C) = [latent | k_rope];
  // kv_norm (kv_lora); wkv_b (NH (qk_nope + v_hd), kv_lora), each head's [k_nope | v] rows.
  T *wq, *wq_a, *q_norm, *wq_b, *wkv_a, *kv_norm, *wkv_b;
  T* wo;         // (C, d_attn)
  T* ffn_norm;   // (C)
  T* w13;        // dense (2F, C)
  T* w2;         // dense (C, F)
  T* router;     // moe (E, C)
  T* ew13;       // moe local routed experts (EL, 2FE, C)
  T* ew2;        // moe local routed experts (EL, C, FE)
  T* sw13;       // moe shared (2S, C), null when S = 0
  T* sw2;        // moe shared (C, S)
};

// One multi-token-prediction module (DeepSeek-V3 section 2.2): the next token's embedding and
// the previous depth's hidden state, each RMSNormed, concatenated [e | h] and projected by
// eh_proj (C, 2C), then one transformer block of the last layer's kind, then final_norm
// before the shared head. The report writes the concatenation [h; e]; the released weights'
// eh_proj reads [enorm(emb) | hnorm(h)] (as the inference engines that load them do), and
// exported checkpoints must load there, so that is the order here.
template <typename T>
struct MtpParams {
  T *enorm, *hnorm;  // (C)
  T* eh_proj;        // (C, 2C)
  LayerParams<T> block;
  T* final_norm;     // (C)
};

template <typename T>
struct ModelParams {
  T* wte;         // (V, C)
  std::vector<LayerParams<T>> layers;
  std::vector<MtpParams<T>> mtp;  // (mtp), held with the head
  T* final_norm;  // (C)
  T* lm_head;     // (V, C); aliases wte when tied
};

// What a layer's input-gradient pass (BackwardPart::kInput) keeps for its weight-gradient
// pass (kWeight): the output gradient of every weight GEMM and norm of the layer, which the
// weight pass multiplies with the saved forward activations. Row counts as in LayerActs.
// NOTE: built with split_backward, each held layer of each slot owns a set; otherwise every
// layer of a slot points at one set, which suffices because kFull runs a layer's weight pass
// right after its input pass.
template <typename T>
struct LayerKept {
  T* dres_mid;   // (N, C) dL/d res_mid: wo's output gradient
  T* dqkv;       // standard attention (N, QKV) after RoPE backward: wqkv's
  // MLA (null otherwise; QD = NH qk_hd, KVA = kv_lora + qk_rope, KVB = NH (qk_nope + v_hd)):
  T* dq;         // (N, QD) after RoPE backward: wq's or wq_b's
  T* dq_an;      // (N, q_lora) q_norm's (q_lora > 0)
  T* dq_a;       // (N, q_lora) wq_a's (q_lora > 0)
  T* dkv;        // (N, KVB) each head's [d k_nope | d v]: wkv_b's
  T* dkv_an;     // (N, kv_lora) kv_norm's
  T* dkv_a;      // (N, KVA) [d latent | d k_rope after RoPE backward]: wkv_a's
  T* dln1;       // (N, C) attn_norm's
  T* dln2;       // (N, C) ffn_norm's (the FFN's input gradient)
  T* dres_out;   // (N, C) dL/d res_out: w2's and sw2's
  T* dgu;        // dense (N, 2F): w13's
  T* dlogits_r;  // moe (N, E): the router's (balance loss included)
  T* dyg;        // moe (R_max, C) the local experts' output gradients, in xg's rows (after the
                 // EP exchange when ep > 1): ew2's
  T* degu;       // moe (R_max, 2FE) every local expert's rows at la.local_offsets: ew13's
  T* dsgu;       // moe (N, 2S): sw13's
};

// Activations of one micro-batch of up to B_max x T tokens, saved for backward.
template <typename T>
struct LayerActs {
  T* res_mid;   // (N, C) residual after attention
  T* ln1;       // (N, C)
  T* rstd1;     // (N)
  T* qkv;       // standard attention (N, QKV) after RoPE
  // MLA (null otherwise; QD = NH qk_hd, QKVm = NH (2 qk_hd + v_hd)):
  T* q_a;       // (N, q_lora) wq_a's output (q_lora > 0)
  T* q_rstd;    // (N) q_norm's (q_lora > 0)
  T* q_an;      // (N, q_lora) q_norm's output: wq_b's input (q_lora > 0)
  T* kv_c;      // (N, kv_lora) the latent, wkv_a's first kv_lora outputs
  T* kv_rstd;   // (N) kv_norm's
  T* kv_an;     // (N, kv_lora) kv_norm's output: wkv_b's input
  T* qkv_mla;   // (N, QKVm) the attention core's input after RoPE, per token [q | k | v]: NH
                // query heads [q_nope | q_rope] and NH key heads [k_nope_h | k_rope] (qk_hd
                // wide; k_rope is the one shared key), then NH value heads (v_hd wide)
  T* lse;       // (B, NH, T) the attention rows' log-sum-exp (the core is fused: no T x T)
  T* attn_out;  // (N, d_attn) = (N, NH v_dim)
  T* ln2;       // (N, C)
  T* rstd2;     // (N)
  T* gu;        // dense (N, 2F)
  T* h;         // dense (N, F)
  T* scores;    // moe (N, E)
  int32_t* expert_ids;  // (N, K)
  T* gate_weights;      // (N, K)
  // counts, offsets, local_offsets and block_offsets are host memory (Model::plan_arena):
  // the expert loop and the exchange read them there whatever the device.
  int64_t* counts;      // (E)
  int64_t* offsets;     // (E + 1)
  int32_t* row_of;      // (N K)
  int32_t* token_of;    // (N K)
  T* xp;   // (N K, C) permuted inputs, sorted by global expert
  // What the local experts compute on: rows [local_offsets[j], local_offsets[j + 1]) belong
  // to local expert j. With ep = 1 these are xp's own rows (xg is null); with ep > 1 they
  // arrive from the EP group (rows_recv <= R_max = ep N min(K, EL), dropless).
  T* xg;                   // (R_max, C), ep > 1 only
  int64_t* local_offsets;  // (EL + 1)
  // (EL ep + 1): local expert j's rows from EP rank p start at block_offsets[j ep + p]
  // (ExpertExchange::plan_finish); with ep = 1 these are local_offsets.
  int64_t* block_offsets;
  int64_t rows_recv;
  T* egu;  // (R_max, 2FE)
  T* eh;   // (R_max, FE)
  T* yp;   // (N K, C) expert outputs, back in xp's row order
  T* sgu;  // (N, 2S)
  T* sh;   // (N, S)
  // Scratch for the quantized inputs of the layer's GEMMs (bf16 / fp8): the model's work_arena,
  // shared by every layer and slot (a GEMM call uses it and is done). Empty in fp32.
  LinearScratch<T> lin;
  // The same with the row pad for the routed experts' GEMMs (any precision): their rows
  // come out the same whatever the EP layout puts beside them (LinearScratch).
  LinearScratch<T> lin_experts;
  // bf16 / fp8: the linear layers' inputs that only weight gradients read are saved here in
  // the GEMM input format (model/linear.h), and ln1, attn_out, h, sh, eh (and ln2 of a dense
  // layer) point into the model's work_arena, xp and xg into slot scratch (an exchange in
  // flight holds them across chunk steps). The MoE layer's ln2 stays: the router's weight
  // gradient is FP32. Empty in fp32.
  LinearSaved saved_ln1, saved_attn_out, saved_ln2, saved_h, saved_sh, saved_eh, saved_xg;
  // MLA: wq_b's and wkv_b's inputs (q_an, kv_an point into the work_arena then). ln1 feeds
  // wq_a (or wq) and wkv_a: saved_ln1 serves both.
  LinearSaved saved_q_an, saved_kv_an;
  LayerKept<T> kept;       // from the input pass to the weight pass of this layer
  bool weight_pending;     // split backward: kInput ran, its kWeight has not yet
};

// What multi-token-prediction module k saves (held with the head). Module k predicts the
// token k + 2 ahead: at position i it embeds t_{i+k+1} (targets[i + k]) and is scored on
// t_{i+k+2} (targets[i + k + 1]); past the sequence's end the token is 0 and the target -1.
template <typename T>
struct MtpActs {
  int32_t* tokens;   // (N) embedded
  int32_t* targets;  // (N)
  T* emb;            // (N, C) the embedding of tokens
  T* e_rstd;         // (N) enorm's
  T* h_rstd;         // (N) hnorm's (of the previous depth's hidden state)
  T* cat;            // (N, 2C) [enorm(emb) | hnorm(h_prev)]: eh_proj's input
  T* x;              // (N, C) eh_proj's output: the block's input
  T* out;            // (N, C) the block's output: the next module's h_prev
  T* lnf;            // (N, C) final_norm's output
  T* rstdf;          // (N)
  T* probs;          // (N, V)
  T* losses;         // (N)
};

// One activation slot: what one micro-batch in flight saves for its backward (every held
// layer), and the scratch its forward and backward use. A pipeline rank has one slot per
// micro-batch it may hold at once; one process has one.
template <typename T>
struct Activations {
  int64_t B = 0, Tcur = 0;  // of the micro-batch in the slot, set by its first forward chunk
  int32_t* tokens;   // (N)
  int32_t* targets;  // (N)
  T* res;            // (L + 1, N, C) residual stream entering each layer, and the last
  std::vector<LayerActs<T>> layers;  // (n_blocks): the layers, then the MTP modules' blocks;
                                     // only held ones have buffers
  std::vector<MtpActs<T>> mtp;       // (mtp) with the head
  // MTP modules the last forward of the head ran: d.mtp when training with targets, else 0.
  // Its backward runs them too.
  int64_t mtp_run = 0;
  T* lnf;     // (N, C)
  T* rstdf;   // (N)
  T* logits;  // (N, V)
  T* probs;   // (N, V)
  T* losses;  // (N)
  // The chunk forward's loss sums, accumulated on the device and read once when it ends
  // (no host wait per MoE layer or MTP module): [kLossCeMean], [kLossCeSum], [kLossAux],
  // [kLossMtpMean] (each module's mean over d.mtp, summed), [kLossMtpSum].
  double* loss_acc;
  const T* rope_cos;  // (T, rope_dim/2) shared by every slot
  const T* rope_sin;  // (T, rope_dim/2)
  // Kept by the input pass for the weight pass of the head and the embedding (see LayerKept).
  T* dlogits;  // (N, V) lm_head's output gradient
  T* dlnf;     // (N, C) final_norm's
  T* dres0;    // (N, C) dL/d res[0]: wte's
  bool split_backward = false;  // every held layer has its own LayerKept (model_build)
  bool head_weight_pending = false, embedding_weight_pending = false;
  // Scratch reused by every layer (forward temporaries and backward gradients).
  T* tmp;           // (N, C)
  T* router_logits; // (N, E)
  T* dres;          // (N, C) gradient of the residual stream
  T* dattn;         // (N, d_attn)
  T* attn_scratch;  // the attention core's scratch, sized per backend (attention_scratch_elems)
  // MLA only (null otherwise):
  T* mla_proj;      // (N, max(QD, KVA, KVB)) forward: a projection's output before packing
  T* dqkv_mla;      // (N, QKVm) backward: the attention core's input gradient
  T* dkv_c;         // (N, kv_lora) backward: the latent's gradient
  T* dh;            // (max(N F, R_max FE, N S))
  T* dxp;           // (N K, C)
  T* dyp;           // (N K, C) ep > 1 only: the experts' output gradients before the exchange
  T* yg;            // (R_max, C) local experts' outputs, ep > 1
  T* dxg;           // (R_max, C) local experts' input gradient (ep > 1)
  T* dgate;         // (N, K)
  T* dscores;       // (N, E)
  // MTP only (null otherwise): the modules' logits (forward), eh_proj's input gradient, the
  // embedding's gradient, and the gradient flowing to the previous depth's hidden state.
  T* mtp_logits;    // (N, V)
  T* mtp_dcat;      // (N, 2C)
  T* mtp_demb;      // (N, C)
  T* mtp_dh;        // (N, C)
};

// Rows the local experts of one MoE layer may receive, whatever the routing: every token of
// every rank in the EP group picks at most min(K, EL) of this rank's experts.
inline int64_t moe_rows_max(const ModelDims& d, int64_t N) {
  return d.ep == 1 ? N * d.K : d.ep * N * (d.K < d.EL() ? d.K : d.EL());
}

// The flat parameter buffer is two regions, each padded with zeros so that its data-parallel
// shards are equal: replicated tensors first (sharded over dp), then the local routed
// experts (sharded over the dp / ep ranks that hold the same experts).
struct ParamRegion {
  size_t offset = 0;  // first element
  size_t count = 0;   // elements, padding included
};

template <typename T>
struct Model {
  ModelDims d;
  int64_t B_max = 0;
  std::vector<ParamInfo> table;
  size_t n_params = 0;  // elements of the tensors (no padding)
  size_t n_alloc = 0;   // both regions with their padding
  ParamRegion replicated, experts;
  ModelPart part;      // what this model holds (everything on one process)
  ExpertExchange* exchange = nullptr;  // set when ep > 1 (float only); plans per (slot, MoE layer)
  // Called by model_backward as each stage's weight gradients become final (see
  // model_grad_stage); empty: not called. Lets the trainer start reducing them early.
  std::function<void(int64_t stage)> grads_ready;
  // The backend every kernel runs through (model/ops.h); the arenas but state_arena and
  // plan_arena are memory of its device.
  std::unique_ptr<Ops<T>> ops;
  Arena param_arena, grad_arena, act_arena, state_arena;
  Arena work_arena;  // bf16 / fp8: GEMM operands and the floats of saved inputs (one set)
  Arena plan_arena;  // host: the MoE layers' routing counts and offsets (LayerActs)
  Arena bias_arena;  // on a device: router_bias_dev
  T* params = nullptr;  // flat, in table order
  T* grads = nullptr;   // same layout as params
  ModelParams<T> p, g;  // null views for tensors of parts not held
  // The weights as the GEMMs read them (model_quantize_weights): the linear layers' matrices
  // in d.precision's input format, held in gemm_arena; every other view aliases p's. In fp32
  // q is p.
  Arena gemm_arena;
  ModelParams<T> q;
  std::vector<Activations<T>> slots;  // activation slots, at least one
  T* rope_cos = nullptr;  // (T, rope_dim/2)
  T* rope_sin = nullptr;
  // Host memory (state_arena): the trainer updates and checkpoints them there.
  float* router_bias = nullptr;   // (n_moe_blocks, E): selection-only bias, no gradient
  int64_t* expert_load = nullptr; // (n_moe_blocks, E): tokens routed this step
  // The router's copy of router_bias on the device (model_quantize_weights refreshes it);
  // router_bias itself on the CPU.
  float* router_bias_dev = nullptr;
  double aux_loss_sum = 0;  // set by model_forward: summed over sequences and MoE blocks
  double mtp_ce_sum = 0;    // set by model_forward: sum over modules and tokens of their CE
};

// The parameter table (names, shapes, offsets) of a model; the same for every T. Replicated
// tensors come first in model order, then each MoE layer's local experts; the order and the
// number of entries do not depend on ep. The expert region starts at the replicated
// elements rounded up to pad_replicated.
std::vector<ParamInfo> model_param_table(const ModelDims& d, int64_t pad_replicated = 1);

// Every distinct linear layer of the model with its widths and whether it follows the run's
// precision (gemm_plan.h; what the native FP8 GEMMs must be able to run).
std::vector<cuda::GemmLinearShape> model_linear_shapes(const ModelDims& d);

// A parameter as users and checkpoints see it: unfused and per expert, e.g.
// "layers/3/moe/experts/17/w_gate" (FE, C) or "layers/0/attn/wq" (NH*HD, C). Each is a
// (rows, cols) block of the flat parameter buffer starting at `offset`, rows `ld` apart
// (ld == cols except for a shared expert's slice of the fused w_down). The same views apply
// to the gradient and optimizer-state buffers, which share the parameter layout. Only the
// local experts are listed, under their global ids, at the offsets of `table`.
struct LogicalTensor {
  std::string name;
  std::vector<int64_t> shape;  // {n} or {rows, cols}
  size_t offset = 0;
  int64_t ld = 0;
  int64_t expert = -1;  // global id of the routed expert it belongs to, -1 for the rest
  int64_t layer = 0;    // as ParamInfo::layer: -1 embedding, L final norm and head
};
std::vector<LogicalTensor> model_logical_tensors(const ModelDims& d,
                                                 const std::vector<ParamInfo>& table);
inline std::vector<LogicalTensor> model_logical_tensors(const ModelDims& d) {
  return model_logical_tensors(d, model_param_table(d));
}

// Validates dims, allocates all arenas for micro-batches of up to B_max sequences of d.T.
// The replicated region is padded to a multiple of pad_replicated and the expert region to
// one of pad_experts (the sizes of the groups that shard them, so ZeRO-1 shards are equal);
// the padding stays zero.
// `part` (empty layers: the whole model) says which tensors and layer activations exist;
// n_slots is the number of micro-batches whose activations may be held at once.
// split_backward gives every held layer of every slot its own LayerKept, which
// BackwardPart::kInput / kWeight need (zero-bubble schedules); without it only kFull runs.
// `device` picks the backend (model/ops.h) and where the arenas live: kCpu, or kCuda (float
// only; the current device, in a build with the CUDA backend). On a device, params, grads and
// activations are device memory: read and write them through m.ops (upload / download).
template <typename T>
void model_build(Model<T>& m, const ModelDims& d, int64_t B_max, int64_t pad_replicated = 1,
                 int64_t pad_experts = 1, ModelPart part = {}, int n_slots = 1,
                 bool split_backward = false, Device device = Device::kCpu);

// Counter-based init: N(0, init_std) for matrices, 1 for norms, 0 for router biases. Every
// element's value depends on its global position only, so any expert-parallel layout holds
// the same experts as one process.
template <typename T>
void model_init(Model<T>& m, uint64_t seed);

template <typename T>
void model_zero_grads(Model<T>& m);

// Refreshes m.q from the master weights: every linear layer's matrix quantized as one GEMM
// operand (wqkv, wo, w13, w2, sw13, sw2, and each routed expert's w13 and w2 on its own, as a
// grouped GEMM reads them), 128x128 blocks in fp8; and on a device the router's copy of
// router_bias. Call whenever the master weights or the bias changed (init, load, an
// optimizer step) before the next forward; the trainer does it at the start of every step
// and evaluation. On the CPU in fp32 there is nothing to do.
template <typename T>
void model_quantize_weights(Model<T>& m);

// Forward over tokens (B, T) (T <= d.T). With targets, returns the mean cross-entropy over
// targets >= 0 (and sets aux_loss_sum); without, computes logits only and returns 0.
// `training` adds this batch's routing counts to expert_load and, with targets, runs the MTP
// modules (setting mtp_ce_sum; evaluation skips them).
template <typename T>
double model_forward(Model<T>& m, const int32_t* tokens, const int32_t* targets, int64_t B,
                     int64_t T_, bool training);

// Backward of the last forward: accumulates (+=) into m.grads the gradient of
//   dloss_ce * (sum_tokens(CE) + mtp_weight / mtp * mtp_ce_sum) + dloss_aux * aux_loss_sum.
template <typename T>
void model_backward(Model<T>& m, T dloss_ce, T dloss_aux);

// Model chunks: a contiguous range of layers [l0, l1) run for the micro-batch held in an
// activation slot. l0 == 0 includes the embedding, l1 == L the final norm, head and loss,
// and the MTP modules (which read the embedding: a rank holding the head of a model with
// d.mtp > 0 must hold the embedding too). The MTP modules' weight gradients are computed
// with their input gradients (in kFull and kInput alike): their block's expert exchange
// must run in a pass that communicates, and it saves keeping their output gradients.
// model_forward / model_backward are the chunk [0, L) in slot 0.
enum LossSlot { kLossCeMean, kLossCeSum, kLossAux, kLossMtpMean, kLossMtpSum, kLossSlots };
struct ChunkLoss {
  double ce_mean = 0;  // mean cross-entropy over targets >= 0 (l1 == L with targets)
  double aux_sum = 0;  // balance loss of the chunk's MoE blocks, summed over sequences
  double mtp_ce_sum = 0;   // the MTP modules' cross-entropy summed over modules and targets
  double mtp_ce_mean = 0;  // the mean over modules of each one's mean cross-entropy
};
// Forward of layers [l0, l1) over (B, T_) tokens. tokens are read when l0 == 0 and targets
// when l1 == L (may be null: logits only); otherwise the chunk's input must already be in
// model_chunk_residual(m, slot, l0) (a previous chunk, or a received message).
template <typename T>
ChunkLoss model_chunk_forward(Model<T>& m, int slot, int64_t l0, int64_t l1,
                              const int32_t* tokens, const int32_t* targets, int64_t B,
                              int64_t T_, bool training);
// The residual stream entering layer l (l == L: leaving the last layer) of the (B, T_)
// micro-batch in `slot`, (B T_, C): a chunk's input when l == l0 and its output when l == l1.
template <typename T>
T* model_chunk_residual(Model<T>& m, int slot, int64_t l, int64_t B, int64_t T_);
// The residual-stream gradient of slot's micro-batch (N, C). A backward with l1 < L starts
// from dL/d res[l1] found here (received, or left by the chunk above on this rank); it leaves
// dL/d res[l0] here.
template <typename T>
T* model_chunk_grad(Model<T>& m, int slot);
// What a backward computes (the zero-bubble "B" / "W" split):
//   kFull   both gradients; calls grads_ready as each stage completes (and mid-layer).
//   kInput  the input gradients only: the residual gradient flows from l1 down to l0 (the
//           EP exchange included); what the weight gradients need stays in the slot
//           (LayerKept, dlogits / dlnf / dres0). No grads_ready calls, no weight gradient
//           (but the MTP modules', see above).
//   kWeight later, the chunk's weight gradients (+=) from what its kInput kept; no
//           communication. Walks the head (when l1 == L), then layers l1 - 1 down to l0,
//           then the embedding (l0 == 0), calling grads_ready after each.
// kInput and kWeight need a model built with split_backward; kFull gives the same bits on
// either. dloss_ce and dloss_aux are read by kFull and kInput (kWeight ignores them). A
// kInput's kWeight must come before the slot's next forward or backward of those layers
// (both CHECKed); between them other slots and chunks may run.
enum class BackwardPart { kFull, kInput, kWeight };
template <typename T>
void model_chunk_backward(Model<T>& m, int slot, int64_t l0, int64_t l1, T dloss_ce,
                          T dloss_aux, BackwardPart part = BackwardPart::kFull);

// A chunk's forward or backward in pieces, so that two chunks can interleave (DualPipe's
// overlapped F&B pairs): each model_chunk_step runs the chunk up to and including the start
// of its next expert exchange and returns true, leaving the exchange in flight for the other
// chunk's computation to hide; the next step finishes it first. It returns false once the
// chunk is done (loss then holds the forward's ChunkLoss). Without expert parallelism a chunk
// is one step. Running the steps of one chunk back to back is exactly model_chunk_forward /
// model_chunk_backward (they are written that way). Two chunks in progress at once must use
// different slots and lanes (ExpertExchange) and disjoint layers, and every rank of the EP
// group must step its chunks in the same order.
struct ChunkRun {
  int slot = 0;
  int64_t l0 = 0, l1 = 0;
  bool backward = false;
  BackwardPart part = BackwardPart::kFull;
  int lane = 0;  // expert-exchange lane
  const int32_t* tokens = nullptr;   // forward: as model_chunk_forward
  const int32_t* targets = nullptr;
  int64_t B = 0, T = 0;
  bool training = false;
  double dloss_ce = 0, dloss_aux = 0;  // backward
  // Progress, owned by model_chunk_step.
  bool started = false, done = false, head_done = false;
  int64_t layer = 0;  // the block in progress (>= L: an MTP module's)
  int phase = 0;      // where in it
  ChunkLoss loss;
};
ChunkRun chunk_run_forward(int slot, int64_t l0, int64_t l1, const int32_t* tokens,
                           const int32_t* targets, int64_t B, int64_t T_, bool training,
                           int lane = 0);
ChunkRun chunk_run_backward(int slot, int64_t l0, int64_t l1, double dloss_ce, double dloss_aux,
                            BackwardPart part, int lane = 0);
template <typename T>
bool model_chunk_step(Model<T>& m, ChunkRun& r);

// Parameter counts: total, and active per token (matmul weights a token passes through:
// attention, dense FFN, router, shared experts, top-K routed experts, head; the embedding
// lookup and norms are excluded).
struct ModelCounts {
  int64_t total = 0;  // the main model (the MTP modules not included)
  int64_t active_matmul = 0;
  int64_t embedding = 0;
  int64_t mtp = 0;    // the MTP modules' own parameters (embedding and head are shared)
  // Matmul weights a token passes through in the MTP modules: each module's eh_proj, block
  // (as active_matmul counts a layer) and the shared head.
  int64_t mtp_active_matmul = 0;
};
ModelCounts model_counts(const ModelDims& d);

// Training FLOPs per token: 6 * active_matmul + 6 * L * T * NH * (qk_hd + v_dim) (forward and
// backward of QK^T and PV over the full T x T window, the PaLM convention; 12 L T d_attn for
// standard attention).
double model_flops_per_token(const ModelDims& d);
// The same for the MTP modules (what training adds to the main model's FLOPs).
double model_mtp_flops_per_token(const ModelDims& d);

// Activation bytes for one micro-batch of B sequences (element size elem) on `device` (the
// attention core's scratch is the backend's own): what an activation slot holds, saved tensors
// and per-slot scratch.
size_t model_activation_bytes(const ModelDims& d, int64_t B, size_t elem, Device device);
// bf16 / fp8: the workspace every slot shares (quantized GEMM operands, the floats of inputs
// saved in the GEMM input format) for micro-batches of B sequences; 0 in fp32.
size_t model_workspace_bytes(const ModelDims& d, int64_t B);

}  // namespace moe
