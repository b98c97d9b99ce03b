// Forward and backward of model chunks (a contiguous range of layers of one micro-batch's
// activation slot); the whole model on one process is the chunk [0, L) in slot 0.
//
// A chunk runs as a state machine (ChunkRun: layer, phase) so that it can stop after starting
// an expert exchange and resume later. The pieces of a MoE layer:
//   forward   0 attention, norm, route; plan start        1 plan finish; dispatch start;
//               shared experts                            2 dispatch finish; experts;
//               combine start                             3 combine finish; combine, residual
//   backward  0 combine backward (router, shared experts' output gradients); dispatch start
//             1 dispatch finish; experts' input gradient; combine start; experts' weights (kFull)
//             2 combine finish; permute backward, norm; router, shared, norm weights (kFull);
//               attention
// Without an exchange (ep = 1) a layer runs its pieces in one go. The head chunk runs the
// multi-token-prediction modules as blocks L.. (block L + k is module k's): forward after
// the last layer, each between its input (embedding, norms, eh_proj) and its output (final
// norm, shared head, loss); backward in reverse before the main head. Every tensor is computed by
// the same operations in the same order either way, so a chunk gives the same bits however
// its steps interleave with another chunk's.
#include "model/model.h"

#include <cstring>
#include <type_traits>

#include "model/check.h"
#include "model/fp8_quant.h"
#include "model/layers.h"

namespace moe {

namespace {

template <typename T>
void chunk_check(const Model<T>& m, int slot, int64_t l0, int64_t l1) {
  CHECK(slot >= 0 && slot < static_cast<int>(m.slots.size()), "slot %d of %zu", slot,
        m.slots.size());
  CHECK(0 <= l0 && l0 < l1 && l1 <= m.d.L, "chunk [%lld, %lld) of %lld layers", (long long)l0,
        (long long)l1, (long long)m.d.L);
  for (int64_t l = l0; l < l1; ++l) CHECK(m.part.holds_layer(l), "layer %lld not held", (long long)l);
  CHECK(l0 > 0 || m.part.embedding, "embedding not held");
  CHECK(l1 < m.d.L || m.part.head, "head not held");
}

// The exchange key of MoE block moe_l for the micro-batch in `slot`: every micro-batch in
// flight keeps its own routing plan until its backward.
template <typename T>
int64_t exchange_key(const Model<T>& m, int slot, int64_t moe_l) {
  return static_cast<int64_t>(slot) * m.d.n_moe_blocks() + moe_l;
}

// Block b's parameters (a layer's, or MTP module b - L's block).
template <typename T>
LayerParams<T>& block_params(ModelParams<T>& p, const ModelDims& d, int64_t b) {
  return b < d.L ? p.layers[static_cast<size_t>(b)] : p.mtp[static_cast<size_t>(b - d.L)].block;
}

// Block b's input and output in the slot: the residual stream, or an MTP module's x and out.
template <typename T>
T* block_input(Activations<T>& a, const ModelDims& d, int64_t b) {
  return b < d.L ? a.res + b * a.B * a.Tcur * d.C : a.mtp[static_cast<size_t>(b - d.L)].x;
}
template <typename T>
T* block_output(Activations<T>& a, const ModelDims& d, int64_t b) {
  return b < d.L ? a.res + (b + 1) * a.B * a.Tcur * d.C : a.mtp[static_cast<size_t>(b - d.L)].out;
}

// The exchange moves float rows only; the double instantiation (gradient checks) runs with
// every expert local.
template <typename T>
void exchange_start(ExpertExchange* ex, bool dispatch, int lane, int64_t key, T* to,
                    const T* from, int64_t C) {
  if constexpr (std::is_same_v<T, float>) {
    if (dispatch) {
      ex->dispatch_start(lane, key, to, from, C);
    } else {
      ex->combine_start(lane, key, to, from, C);
    }
  } else {
    CHECK(false, "expert parallelism needs float parameters");
  }
}

// dispatch_fp8 with every expert local: n rows of C rounded in place as the EP wire rounds
// them, FP8 (1x128 tiles) for a dispatch, BF16 for a combine.
template <typename T>
void local_wire_round(Model<T>& m, bool dispatch, T* rows, int64_t n) {
  const ModelDims& d = m.d;
  if (!d.dispatch_fp8) return;
  if constexpr (std::is_same_v<T, float>) {
    if (dispatch) {
      m.ops->fp8_fake_quantize(rows, rows, n, d.C, kTileAct);
    } else {
      m.ops->bf16_fake_quantize(rows, rows, n * d.C);
    }
  }
}

template <typename T>
void grads_ready(Model<T>& m, int64_t stage) {
  if (m.grads_ready) m.grads_ready(stage);
}

// Inside a long piece: exchanges in flight (this chunk's, or an interleaved chunk's) move only
// when the communication library is called.
template <typename T>
void exchange_progress(Model<T>& m) {
  if (m.exchange) m.exchange->progress();
}

// ---- forward ---------------------------------------------------------------------------

template <typename T>
void forward_begin(Model<T>& m, ChunkRun& r) {
  const ModelDims& d = m.d;
  chunk_check(m, r.slot, r.l0, r.l1);
  CHECK(r.B >= 1 && r.B <= m.B_max && r.T >= 1 && r.T <= d.T, "B %lld T %lld", (long long)r.B,
        (long long)r.T);
  Activations<T>& a = m.slots[static_cast<size_t>(r.slot)];
  // A pending weight pass reads this chunk's saved activations (split backward).
  CHECK(!(r.l0 == 0 && a.embedding_weight_pending) && !(r.l1 == d.L && a.head_weight_pending),
        "slot %d: forward over a pending BackwardPart::kWeight", r.slot);
  for (int64_t l = r.l0; l < r.l1; ++l)
    CHECK(!a.layers[static_cast<size_t>(l)].weight_pending,
          "slot %d layer %lld: forward over a pending BackwardPart::kWeight", r.slot,
          (long long)l);
  const int64_t N = r.B * r.T;
  a.B = r.B;
  a.Tcur = r.T;
  if (r.l0 == 0) {
    m.ops->upload(a.tokens, r.tokens, sizeof(int32_t) * static_cast<size_t>(N));
    m.ops->embedding_forward(a.res, a.tokens, m.p.wte, N, d.C, m.d.V);
  }
  if (r.l1 == d.L) {
    if (r.targets) m.ops->upload(a.targets, r.targets, sizeof(int32_t) * static_cast<size_t>(N));
    a.mtp_run = r.targets && r.training ? d.mtp : 0;
  }
  m.ops->zero(a.loss_acc, sizeof(double) * kLossSlots);
  r.layer = r.l0;
  r.phase = 0;
  r.started = true;
}

template <typename T>
void forward_head(Model<T>& m, ChunkRun& r) {
  const ModelDims& d = m.d;
  Activations<T>& a = m.slots[static_cast<size_t>(r.slot)];
  const int64_t N = r.B * r.T, C = d.C;
  const T* res_last = a.res + d.L * N * C;
  m.ops->rmsnorm_forward(a.lnf, a.rstdf, res_last, m.p.final_norm, N, C,
                          static_cast<T>(d.norm_eps));
  m.ops->matmul_forward(a.logits, a.lnf, m.p.lm_head, N, C, d.V);
  if (!r.targets) return;
  m.ops->cross_entropy_forward(a.losses, a.probs, a.logits, a.targets, N, d.V);
  m.ops->scored_loss_accumulate(a.loss_acc + kLossCeMean, a.losses, a.targets, N, 1.0);
}

// The hidden state MTP module k starts from: the last layer's output (before the final norm),
// or the previous module's block output.
template <typename T>
const T* mtp_h_prev(const Model<T>& m, const Activations<T>& a, int64_t k) {
  return k == 0 ? a.res + m.d.L * a.B * a.Tcur * m.d.C : a.mtp[static_cast<size_t>(k - 1)].out;
}

// MTP module k up to its block: the shifted tokens and targets, [enorm(emb) | hnorm(h_prev)],
// eh_proj -> the block's input.
template <typename T>
void mtp_forward_input(Model<T>& m, Activations<T>& a, int64_t k) {
  const ModelDims& d = m.d;
  const int64_t Tn = a.Tcur, N = a.B * Tn, C = d.C;
  CHECK(m.part.embedding, "the MTP modules need the embedding on the head's rank");
  MtpActs<T>& ma = a.mtp[static_cast<size_t>(k)];
  const MtpParams<T>& mp = m.p.mtp[static_cast<size_t>(k)];
  m.ops->mtp_shift(ma.tokens, ma.targets, a.targets, a.B, Tn, k);
  m.ops->embedding_forward(ma.emb, ma.tokens, m.p.wte, N, C, m.d.V);
  const T eps = static_cast<T>(d.norm_eps);
  m.ops->rmsnorm_forward(a.tmp, ma.e_rstd, ma.emb, mp.enorm, N, C, eps);
  m.ops->copy_rows(ma.cat, 2 * C, a.tmp, C, N, C);
  m.ops->rmsnorm_forward(a.tmp, ma.h_rstd, mtp_h_prev(m, a, k), mp.hnorm, N, C, eps);
  m.ops->copy_rows(ma.cat + C, 2 * C, a.tmp, C, N, C);
  m.ops->matmul_forward(ma.x, ma.cat, mp.eh_proj, N, 2 * C, C);
}

// MTP module k after its block: final norm, the shared head, cross-entropy.
template <typename T>
void mtp_forward_output(Model<T>& m, Activations<T>& a, int64_t k) {
  const ModelDims& d = m.d;
  const int64_t N = a.B * a.Tcur, C = d.C;
  MtpActs<T>& ma = a.mtp[static_cast<size_t>(k)];
  const MtpParams<T>& mp = m.p.mtp[static_cast<size_t>(k)];
  m.ops->rmsnorm_forward(ma.lnf, ma.rstdf, ma.out, mp.final_norm, N, C,
                          static_cast<T>(d.norm_eps));
  m.ops->matmul_forward(a.mtp_logits, ma.lnf, m.p.lm_head, N, C, d.V);
  m.ops->cross_entropy_forward(ma.losses, ma.probs, a.mtp_logits, ma.targets, N, d.V);
  m.ops->scored_loss_accumulate(a.loss_acc + kLossMtpMean, ma.losses, ma.targets, N,
                                static_cast<double>(d.mtp));
}

// Runs block r.layer from r.phase; true when it stopped with an exchange in flight.
template <typename T>
bool forward_layer(Model<T>& m, ChunkRun& r) {
  const ModelDims& d = m.d;
  const int64_t l = r.layer, N = r.B * r.T, C = d.C;
  Activations<T>& a = m.slots[static_cast<size_t>(r.slot)];
  LayerActs<T>& la = a.layers[static_cast<size_t>(l)];
  const LayerParams<T>& lp = block_params(m.q, d, l);
  T* res_in = block_input(a, d, l);
  T* res_out = block_output(a, d, l);
  ExpertExchange* ex = m.exchange;
  const bool moe = d.block_moe(l);
  const int64_t moe_l = d.moe_index(l);
  const int64_t key = moe ? exchange_key(m, r.slot, moe_l) : 0;
  switch (r.phase) {
    case 0:
      if (d.mla()) {
        mla_block_forward<T>(*m.ops, la.res_mid, la, res_in, lp, a, d, r.B, r.T);
      } else {
        attention_block_forward<T>(*m.ops, la.res_mid, la, res_in, lp, a, d, r.B, r.T);
      }
      exchange_progress(m);
      m.ops->rmsnorm_forward(la.ln2, la.rstd2, la.res_mid, lp.ffn_norm, N, C,
                              static_cast<T>(d.norm_eps));
      if (!moe) {
        dense_ffn_forward<T>(*m.ops, res_out, la, la.ln2, lp, d, N);
        break;
      }
      CHECK((ex != nullptr) == (d.ep > 1), "expert exchange must be set exactly when ep > 1");
      moe_layer_route_forward<T>(*m.ops, la, la.ln2, lp, m.router_bias_dev + moe_l * d.E, a, d,
                                 N);
      if (ex) {
        ex->plan_start(r.lane, key, la.counts, la.expert_ids, N, d.K);
        r.phase = 1;
        return true;
      }
      local_wire_round(m, true, la.xp, N * d.K);
      moe_layer_shared_forward<T>(*m.ops, a.tmp, la, la.ln2, lp, d, N);
      moe_layer_experts_forward<T>(*m.ops, la.yp, la, la.xp, lp, d);
      local_wire_round(m, false, la.yp, N * d.K);
      r.phase = 3;
      [[fallthrough]];
    case 3:
      if (ex) ex->finish(r.lane);
      moe_layer_combine_forward<T>(*m.ops, res_out, la, a.tmp,
                                   r.training ? m.expert_load + moe_l * d.E : nullptr, d, r.B,
                                   r.T, a.loss_acc + kLossAux);
      break;
    case 1:
      la.rows_recv = ex->plan_finish(r.lane, la.local_offsets, la.block_offsets);
      CHECK(la.rows_recv <= moe_rows_max(d, N));
      exchange_start<T>(ex, true, r.lane, key, la.xg, la.xp, C);
      moe_layer_shared_forward<T>(*m.ops, a.tmp, la, la.ln2, lp, d, N);
      exchange_progress(m);
      r.phase = 2;
      return true;
    case 2:
      ex->finish(r.lane);
      moe_layer_experts_forward<T>(*m.ops, a.yg, la, la.xg, lp, d);
      exchange_start<T>(ex, false, r.lane, key, la.yp, a.yg, C);
      r.phase = 3;
      return true;
  }
  m.ops->residual_forward(res_out, res_out, la.res_mid, N * C);
  r.phase = 0;
  ++r.layer;
  return false;
}

template <typename T>
bool forward_step(Model<T>& m, ChunkRun& r) {
  const ModelDims& d = m.d;
  if (!r.started) forward_begin(m, r);
  Activations<T>& a = m.slots[static_cast<size_t>(r.slot)];
  const int64_t end = r.l1 == d.L ? d.L + a.mtp_run : r.l1;
  while (r.layer < end) {
    const bool mtp = r.layer >= d.L;
    if (mtp && r.phase == 0) mtp_forward_input(m, a, r.layer - d.L);
    if (forward_layer(m, r)) return true;
    if (mtp) mtp_forward_output(m, a, r.layer - 1 - d.L);
  }
  if (r.l1 == d.L) forward_head(m, r);
  // The chunk's one host read of its losses.
  double acc[kLossSlots];
  m.ops->download(acc, a.loss_acc, sizeof(acc));
  r.loss.ce_mean = acc[kLossCeMean];
  r.loss.aux_sum = acc[kLossAux];
  r.loss.mtp_ce_mean = acc[kLossMtpMean];
  r.loss.mtp_ce_sum = acc[kLossMtpSum];
  r.done = true;
  return false;
}

// ---- backward --------------------------------------------------------------------------

// Head input pass: a.dres = dL/d res[L]; keeps a.dlogits and a.dlnf.
template <typename T>
void head_backward_input(Model<T>& m, Activations<T>& a, T dloss_ce, int64_t N) {
  const ModelDims& d = m.d;
  const int64_t C = d.C;
  const T* res_last = a.res + d.L * N * C;
  m.ops->cross_entropy_backward(a.dlogits, a.probs, a.targets, dloss_ce, N, d.V);
  m.ops->matmul_backward_input(a.dlnf, a.dlogits, m.p.lm_head, N, C, d.V);
  // The first MTP module's hidden-state gradient joins the final norm's.
  if (a.mtp_run > 0) {
    m.ops->copy(a.dres, a.mtp_dh, sizeof(T) * static_cast<size_t>(N * C));
  } else {
    m.ops->zero(a.dres, sizeof(T) * static_cast<size_t>(N * C));
  }
  m.ops->rmsnorm_backward_input(a.dres, a.dlnf, res_last, m.p.final_norm, a.rstdf, N, C);
}

// MTP module k's loss back to its block's output: a.dres = the next module's hidden-state
// gradient + the final norm's input gradient. Weight gradients too (the head's and the
// final norm's). a.dlogits and a.dlnf serve as scratch: the main head's input pass, which
// keeps them, comes after the modules.
template <typename T>
void mtp_backward_output(Model<T>& m, Activations<T>& a, int64_t k, T dloss_ce) {
  const ModelDims& d = m.d;
  const int64_t N = a.B * a.Tcur, C = d.C;
  const MtpActs<T>& ma = a.mtp[static_cast<size_t>(k)];
  const MtpParams<T>& mp = m.p.mtp[static_cast<size_t>(k)];
  const T dloss = dloss_ce * static_cast<T>(d.mtp_weight / static_cast<double>(d.mtp));
  m.ops->cross_entropy_backward(a.dlogits, ma.probs, ma.targets, dloss, N, d.V);
  m.ops->matmul_backward_input(a.dlnf, a.dlogits, m.p.lm_head, N, C, d.V);
  m.ops->matmul_backward_weight(m.g.lm_head, a.dlogits, ma.lnf, N, C, d.V);
  if (k + 1 == a.mtp_run) {
    m.ops->zero(a.dres, sizeof(T) * static_cast<size_t>(N * C));
  } else {
    m.ops->copy(a.dres, a.mtp_dh, sizeof(T) * static_cast<size_t>(N * C));
  }
  m.ops->rmsnorm_backward_input(a.dres, a.dlnf, ma.out, mp.final_norm, ma.rstdf, N, C);
  m.ops->rmsnorm_backward_weight(m.g.mtp[static_cast<size_t>(k)].final_norm, a.dlnf, ma.out,
                                  ma.rstdf, N, C);
}

// MTP module k's block input gradient (a.dres) back through eh_proj, the two norms and the
// embedding (into g.wte); leaves the previous depth's hidden-state gradient in a.mtp_dh.
template <typename T>
void mtp_backward_input(Model<T>& m, Activations<T>& a, int64_t k) {
  const ModelDims& d = m.d;
  const int64_t N = a.B * a.Tcur, C = d.C;
  const MtpActs<T>& ma = a.mtp[static_cast<size_t>(k)];
  const MtpParams<T>& mp = m.p.mtp[static_cast<size_t>(k)];
  MtpParams<T>& mg = m.g.mtp[static_cast<size_t>(k)];
  m.ops->matmul_backward_input(a.mtp_dcat, a.dres, mp.eh_proj, N, 2 * C, C);
  m.ops->matmul_backward_weight(mg.eh_proj, a.dres, ma.cat, N, 2 * C, C);
  // [d enorm out | d hnorm out], each through its norm.
  T* de = a.tmp;
  T* dh = a.dlnf;
  m.ops->copy_rows(de, C, a.mtp_dcat, 2 * C, N, C);
  m.ops->copy_rows(dh, C, a.mtp_dcat + C, 2 * C, N, C);
  const size_t NC = static_cast<size_t>(N * C);
  m.ops->zero(a.mtp_demb, sizeof(T) * NC);
  m.ops->rmsnorm_backward_input(a.mtp_demb, de, ma.emb, mp.enorm, ma.e_rstd, N, C);
  m.ops->rmsnorm_backward_weight(mg.enorm, de, ma.emb, ma.e_rstd, N, C);
  m.ops->embedding_backward(m.g.wte, a.mtp_demb, ma.tokens, N, C, m.d.V);
  const T* h_prev = mtp_h_prev(m, a, k);
  m.ops->zero(a.mtp_dh, sizeof(T) * NC);
  m.ops->rmsnorm_backward_input(a.mtp_dh, dh, h_prev, mp.hnorm, ma.h_rstd, N, C);
  m.ops->rmsnorm_backward_weight(mg.hnorm, dh, h_prev, ma.h_rstd, N, C);
}

template <typename T>
void head_backward_weight(Model<T>& m, const Activations<T>& a, int64_t N) {
  const ModelDims& d = m.d;
  const int64_t C = d.C;
  m.ops->matmul_backward_weight(m.g.lm_head, a.dlogits, a.lnf, N, C, d.V);
  m.ops->rmsnorm_backward_weight(m.g.final_norm, a.dlnf, a.res + d.L * N * C, a.rstdf, N, C);
}

// The FFN's weights but a MoE layer's local experts (which kFull does while the combine is in
// flight), and the FFN norm.
template <typename T>
void ffn_half_backward_weight(Model<T>& m, const Activations<T>& a, int64_t l) {
  const ModelDims& d = m.d;
  const int64_t N = a.B * a.Tcur;
  const LayerActs<T>& la = a.layers[static_cast<size_t>(l)];
  LayerParams<T>& lg = block_params(m.g, d, l);
  if (d.block_moe(l)) {
    moe_layer_router_shared_backward_weight<T>(*m.ops, lg, la, la.ln2, d, N);
  } else {
    dense_ffn_backward_weight<T>(*m.ops, lg, la, la.ln2, d, N);
  }
  m.ops->rmsnorm_backward_weight(lg.ffn_norm, la.kept.dln2, la.res_mid, la.rstd2, N, d.C);
}

template <typename T>
void attention_half_backward_input(Model<T>& m, Activations<T>& a, int64_t l) {
  LayerActs<T>& la = a.layers[static_cast<size_t>(l)];
  const T* res_in = block_input(a, m.d, l);
  const LayerParams<T>& lp = block_params(m.q, m.d, l);
  if (m.d.mla()) {
    mla_block_backward_input<T>(*m.ops, a.dres, la, res_in, lp, a, m.d, a.B, a.Tcur);
  } else {
    attention_block_backward_input<T>(*m.ops, a.dres, la, res_in, lp, a, m.d, a.B, a.Tcur);
  }
}

template <typename T>
void attention_half_backward_weight(Model<T>& m, Activations<T>& a, int64_t l) {
  const int64_t N = a.B * a.Tcur;
  LayerParams<T>& lg = block_params(m.g, m.d, l);
  const LayerActs<T>& la = a.layers[static_cast<size_t>(l)];
  const T* res_in = block_input(a, m.d, l);
  if (m.d.mla()) {
    mla_block_backward_weight<T>(*m.ops, lg, la, res_in, m.d, N);
  } else {
    attention_block_backward_weight<T>(*m.ops, lg, la, res_in, m.d, N);
  }
}

template <typename T>
void backward_begin(Model<T>& m, ChunkRun& r) {
  const ModelDims& d = m.d;
  chunk_check(m, r.slot, r.l0, r.l1);
  Activations<T>& a = m.slots[static_cast<size_t>(r.slot)];
  const bool head = r.l1 == d.L, embedding = r.l0 == 0;
  CHECK(r.part == BackwardPart::kFull || a.split_backward,
        "BackwardPart::kInput / kWeight need a model built with split_backward = true");
  // A kInput and its kWeight pair up per layer: no pass may run over a pending weight pass
  // (its kept gradients would be overwritten) and no weight pass without its input pass.
  const bool want_pending = r.part == BackwardPart::kWeight;
  const char* why = want_pending ? "kWeight without its kInput" : "weight pass still pending";
  CHECK(!head || a.head_weight_pending == want_pending, "slot %d head: %s", r.slot, why);
  for (int64_t l = r.l0; l < r.l1; ++l)
    CHECK(a.layers[static_cast<size_t>(l)].weight_pending == want_pending,
          "slot %d layer %lld: %s", r.slot, (long long)l, why);
  CHECK(!embedding || a.embedding_weight_pending == want_pending, "slot %d embedding: %s",
        r.slot, why);
  // The MTP modules' blocks come first, when the forward ran them.
  const bool mtp = head && r.part != BackwardPart::kWeight && a.mtp_run > 0;
  r.layer = mtp ? d.L + a.mtp_run - 1 : r.l1 - 1;
  r.phase = 0;
  r.started = true;
  r.head_done = !head || r.part == BackwardPart::kWeight;
}

// The main head's input pass (after the MTP modules, whose gradient it adds).
template <typename T>
void backward_head(Model<T>& m, ChunkRun& r) {
  Activations<T>& a = m.slots[static_cast<size_t>(r.slot)];
  // Stage numbers for grads_ready count from the loss side of the whole model.
  head_backward_input(m, a, static_cast<T>(r.dloss_ce), a.B * a.Tcur);
  if (r.part == BackwardPart::kFull) {
    head_backward_weight(m, a, a.B * a.Tcur);
    grads_ready(m, 0);
  } else {
    a.head_weight_pending = true;
  }
  r.head_done = true;
}

// The weight pass of a split backward: no communication, so one piece.
template <typename T>
void backward_weight(Model<T>& m, ChunkRun& r) {
  const ModelDims& d = m.d;
  Activations<T>& a = m.slots[static_cast<size_t>(r.slot)];
  const int64_t N = a.B * a.Tcur;
  if (r.l1 == d.L) {
    head_backward_weight(m, a, N);
    a.head_weight_pending = false;
    grads_ready(m, 0);
  }
  for (int64_t l = r.l1 - 1; l >= r.l0; --l) {
    if (d.is_moe(l)) moe_layer_experts_backward_weight<T>(*m.ops, m.g.layers[static_cast<size_t>(l)],
                                                          a.layers[static_cast<size_t>(l)], d);
    ffn_half_backward_weight(m, a, l);
    attention_half_backward_weight(m, a, l);
    a.layers[static_cast<size_t>(l)].weight_pending = false;
    grads_ready(m, d.L - l);
  }
  if (r.l0 == 0) {
    m.ops->embedding_backward(m.g.wte, a.dres0, a.tokens, N, d.C, m.d.V);
    a.embedding_weight_pending = false;
    grads_ready(m, d.L + 1);
  }
}

// Runs the input (and, for kFull, weight) pass of layer r.layer from r.phase; true when it
// stopped with an exchange in flight.
template <typename T>
bool backward_layer(Model<T>& m, ChunkRun& r) {
  const ModelDims& d = m.d;
  Activations<T>& a = m.slots[static_cast<size_t>(r.slot)];
  const int64_t l = r.layer, N = a.B * a.Tcur, C = d.C;
  LayerActs<T>& la = a.layers[static_cast<size_t>(l)];
  const LayerParams<T>& lp = block_params(m.q, d, l);
  LayerParams<T>& lg = block_params(m.g, d, l);
  const LayerKept<T>& k = la.kept;
  // An MTP block's weight gradients come with its input gradients (model.h).
  const bool full = r.part == BackwardPart::kFull || l >= d.L;
  ExpertExchange* ex = m.exchange;
  const bool moe = d.block_moe(l);
  const int64_t key = moe ? exchange_key(m, r.slot, d.moe_index(l)) : 0;
  // Mirror of the forward: output gradients travel to the experts (into kept.dyg, in xg's
  // rows), input gradients come back into dxp. With ep = 1 xg's rows are xp's: dyg is dyp
  // itself and the experts write dxp directly.
  switch (r.phase) {
    case 0:
      if (!moe) {
        dense_ffn_backward_input<T>(*m.ops, k.dln2, la, a.dres, lp, a, d, N);
        break;
      }
      CHECK((ex != nullptr) == (d.ep > 1), "expert exchange must be set exactly when ep > 1");
      moe_layer_combine_backward_input<T>(*m.ops, ex ? a.dyp : k.dyg, la, a.dres, lp, a, d, a.B, a.Tcur,
                                          static_cast<T>(r.dloss_aux));
      if (ex) {
        exchange_start<T>(ex, true, r.lane, key, k.dyg, a.dyp, C);
        r.phase = 1;
        return true;
      }
      local_wire_round(m, true, k.dyg, N * d.K);
      moe_layer_experts_backward_input<T>(*m.ops, a.dxp, la, lp, a, d);
      local_wire_round(m, false, a.dxp, N * d.K);
      if (full) moe_layer_experts_backward_weight<T>(*m.ops, lg, la, d);
      r.phase = 2;
      [[fallthrough]];
    case 2:
      if (ex) ex->finish(r.lane);
      moe_layer_permute_backward_input<T>(*m.ops, k.dln2, la, a.dxp, lp, d, N);
      break;
    case 1:
      ex->finish(r.lane);
      moe_layer_experts_backward_input<T>(*m.ops, a.dxg, la, lp, a, d);
      exchange_start<T>(ex, false, r.lane, key, a.dxp, a.dxg, C);
      if (full) moe_layer_experts_backward_weight<T>(*m.ops, lg, la, d);
      exchange_progress(m);
      r.phase = 2;
      return true;
  }
  // FFN input gradient is in kept.dln2: through the norm, onto the residual gradient.
  m.ops->rmsnorm_backward_input(a.dres, k.dln2, la.res_mid, lp.ffn_norm, la.rstd2, N, C);
  // An MTP block's gradients are part of stage 0, which the main head reports after them.
  const bool report = l < d.L;
  if (full) {
    ffn_half_backward_weight(m, a, l);
    // Mid-layer: nothing new is final, but in-flight reductions get a chance to progress.
    if (report) grads_ready(m, d.L - l - 1);
  }
  exchange_progress(m);
  attention_half_backward_input(m, a, l);
  if (full) {
    attention_half_backward_weight(m, a, l);
    if (report) grads_ready(m, d.L - l);
  } else {
    la.weight_pending = true;
  }
  r.phase = 0;
  --r.layer;
  return false;
}

template <typename T>
bool backward_step(Model<T>& m, ChunkRun& r) {
  if (!r.started) backward_begin(m, r);
  if (r.part == BackwardPart::kWeight) {
    backward_weight(m, r);
    r.done = true;
    return false;
  }
  const ModelDims& d = m.d;
  Activations<T>& a = m.slots[static_cast<size_t>(r.slot)];
  while (r.layer >= d.L) {  // the MTP modules, last first
    const int64_t k = r.layer - d.L;
    if (r.phase == 0) mtp_backward_output(m, a, k, static_cast<T>(r.dloss_ce));
    if (backward_layer(m, r)) return true;
    mtp_backward_input(m, a, k);
  }
  if (!r.head_done) backward_head(m, r);
  while (r.layer >= r.l0)
    if (backward_layer(m, r)) return true;
  if (r.l0 == 0) {
    const int64_t N = a.B * a.Tcur;
    if (r.part == BackwardPart::kFull) {
      m.ops->embedding_backward(m.g.wte, a.dres, a.tokens, N, m.d.C, m.d.V);
      grads_ready(m, m.d.L + 1);
    } else {
      m.ops->copy(a.dres0, a.dres, sizeof(T) * static_cast<size_t>(N * m.d.C));
      a.embedding_weight_pending = true;
    }
  }
  r.done = true;
  return false;
}

}  // namespace

ChunkRun chunk_run_forward(int slot, int64_t l0, int64_t l1, const int32_t* tokens,
                           const int32_t* targets, int64_t B, int64_t T_, bool training,
                           int lane) {
  ChunkRun r;
  r.slot = slot;
  r.l0 = l0;
  r.l1 = l1;
  r.tokens = tokens;
  r.targets = targets;
  r.B = B;
  r.T = T_;
  r.training = training;
  r.lane = lane;
  return r;
}

ChunkRun chunk_run_backward(int slot, int64_t l0, int64_t l1, double dloss_ce, double dloss_aux,
                            BackwardPart part, int lane) {
  ChunkRun r;
  r.slot = slot;
  r.l0 = l0;
  r.l1 = l1;
  r.backward = true;
  r.part = part;
  r.dloss_ce = dloss_ce;
  r.dloss_aux = dloss_aux;
  r.lane = lane;
  return r;
}

template <typename T>
bool model_chunk_step(Model<T>& m, ChunkRun& r) {
  CHECK(!r.done, "model_chunk_step on a finished chunk");
  return r.backward ? backward_step(m, r) : forward_step(m, r);
}

template <typename T>
T* model_chunk_residual(Model<T>& m, int slot, int64_t l, int64_t B, int64_t T_) {
  return m.slots[static_cast<size_t>(slot)].res + l * B * T_ * m.d.C;
}

template <typename T>
T* model_chunk_grad(Model<T>& m, int slot) {
  return m.slots[static_cast<size_t>(slot)].dres;
}

template <typename T>
ChunkLoss model_chunk_forward(Model<T>& m, int slot, int64_t l0, int64_t l1,
                              const int32_t* tokens, const int32_t* targets, int64_t B,
                              int64_t T_, bool training) {
  ChunkRun r = chunk_run_forward(slot, l0, l1, tokens, targets, B, T_, training);
  while (model_chunk_step(m, r)) {
  }
  return r.loss;
}

template <typename T>
void model_chunk_backward(Model<T>& m, int slot, int64_t l0, int64_t l1, T dloss_ce,
                          T dloss_aux, BackwardPart part) {
  ChunkRun r = chunk_run_backward(slot, l0, l1, static_cast<double>(dloss_ce),
                                  static_cast<double>(dloss_aux), part);
  while (model_chunk_step(m, r)) {
  }
}

template <typename T>
double model_forward(Model<T>& m, const int32_t* tokens, const int32_t* targets, int64_t B,
                     int64_t T_, bool training) {
  const ChunkLoss r = model_chunk_forward<T>(m, 0, 0, m.d.L, tokens, targets, B, T_, training);
  m.aux_loss_sum = targets ? r.aux_sum : 0.0;
  m.mtp_ce_sum = r.mtp_ce_sum;
  return r.ce_mean;
}

template <typename T>
void model_backward(Model<T>& m, T dloss_ce, T dloss_aux) {
  model_chunk_backward<T>(m, 0, 0, m.d.L, dloss_ce, dloss_aux, BackwardPart::kFull);
}

#define MOE_INSTANTIATE(T)                                                                   \
  template double model_forward<T>(Model<T>&, const int32_t*, const int32_t*, int64_t,        \
                                   int64_t, bool);                                           \
  template void model_backward<T>(Model<T>&, T, T);                                          \
  template ChunkLoss model_chunk_forward<T>(Model<T>&, int, int64_t, int64_t, const int32_t*, \
                                            const int32_t*, int64_t, int64_t, bool);         \
  template void model_chunk_backward<T>(Model<T>&, int, int64_t, int64_t, T, T, BackwardPart); \
  template bool model_chunk_step<T>(Model<T>&, ChunkRun&);                                   \
  template T* model_chunk_residual<T>(Model<T>&, int, int64_t, int64_t, int64_t);           \
  template T* model_chunk_grad<T>(Model<T>&, int);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
