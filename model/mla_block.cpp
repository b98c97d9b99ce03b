// Pre-norm attention block with DeepSeek-V3's Multi-head Latent Attention (report section
// 2.1.1; the MLA class of its inference code, "naive" attention): RMSNorm -> low-rank query
// and key / value projections -> RoPE on each query head's last qk_rope dims and on one key
// part shared by all heads -> causal softmax attention -> output projection -> residual add.
//
// Dimension letters: NH heads, Dn = qk_nope, Dr = qk_rope, Dq = Dn + Dr (query / key head),
// Dv = v_hd, QL = q_lora, KVL = kv_lora; QD = NH Dq, KVA = KVL + Dr, KVB = NH (Dn + Dv),
// W = 2 QD + NH Dv (the packed attention input). Per token, x = ln1:
//   q = wq_b RMSNorm_{q_norm}(wq_a x)   (QL > 0; else q = wq x)       NH heads [q_nope | q_rope]
//   [c | k_rope] = wkv_a x                                             c (KVL), k_rope (Dr)
//   [k_nope_h | v_h] = (wkv_b RMSNorm_{kv_norm}(c))_h                  per head
//   k_h = [k_nope_h | RoPE(k_rope)], q_h's q_rope turned by RoPE too
//   o_h = softmax_causal(q_h k_h^T / sqrt(Dq)) v_h;  out = wo [o_1 .. o_NH]
// The attention core is Ops::attention_forward over [q | k | v] with NKV = NH, HD = Dq and
// HDv = Dv. The projections go through model/linear.h in d.precision; the latent norms, RoPE
// and the attention core stay in T.
//
// Accumulation contract (model/layers.h): weight gradients += (the weight pass only; the
// latent norms' weights like attn_norm's), la.kept assigned, dres updated in place. The
// gradient of the shared k_rope sums its heads' gradients in head order (deterministic).
#include <type_traits>

#include "model/check.h"
#include "model/fp8_quant.h"
#include "model/layers.h"
#include "model/linear.h"

namespace moe {

namespace {

struct MlaDims {
  int64_t NH, Dn, Dr, Dq, Dv, QL, KVL, QD, KVA, KVB, W, HA;
};

MlaDims mla_dims(const ModelDims& d) {
  CHECK(d.mla(), "MLA block on a model with standard attention");
  MlaDims m;
  m.NH = d.NH;
  m.Dn = d.qk_nope;
  m.Dr = d.qk_rope;
  m.Dq = d.qk_hd();
  m.Dv = d.v_hd;
  m.QL = d.q_lora;
  m.KVL = d.kv_lora;
  m.QD = m.NH * m.Dq;
  m.KVA = m.KVL + m.Dr;
  m.KVB = m.NH * (m.Dn + m.Dv);
  m.HA = m.NH * m.Dv;
  m.W = 2 * m.QD + m.HA;
  return m;
}

// RoPE (forward or backward) on the last Dr dims of each of the NH heads (Dq apart) of rows
// `stride` apart: one rope call per head, as the heads' RoPE parts are not adjacent.
template <typename T>
void rope_heads(Ops<T>& ops, bool forward, T* x, const T* cos_t, const T* sin_t, const MlaDims& m, int64_t B,
                int64_t T_, int64_t stride) {
  for (int64_t h = 0; h < m.NH; ++h) {
    T* xh = x + h * m.Dq + m.Dn;
    if (forward) {
      ops.rope_forward(xh, cos_t, sin_t, B, T_, 1, m.Dr, stride);
    } else {
      ops.rope_backward(xh, cos_t, sin_t, B, T_, 1, m.Dr, stride);
    }
  }
}

// Packs wkv_b's output kv (N, KVB) into the key heads' k_nope and the value heads of qkv.
template <typename T>
void pack_kv(Ops<T>& ops, T* qkv, const T* kv, const MlaDims& m, int64_t N) {
  for (int64_t h = 0; h < m.NH; ++h) {
    const T* kvh = kv + h * (m.Dn + m.Dv);
    ops.copy_rows(qkv + m.QD + h * m.Dq, m.W, kvh, m.KVB, N, m.Dn);
    ops.copy_rows(qkv + 2 * m.QD + h * m.Dv, m.W, kvh + m.Dn, m.KVB, N, m.Dv);
  }
}

// The shared k_rope (N, Dr; rows ld apart) into every key head's last Dr dims.
template <typename T>
void broadcast_k_rope(Ops<T>& ops, T* qkv, const T* k_rope, int64_t ld, const MlaDims& m,
                      int64_t N) {
  for (int64_t h = 0; h < m.NH; ++h)
    ops.copy_rows(qkv + m.QD + h * m.Dq + m.Dn, m.W, k_rope, ld, N, m.Dr);
}

// The attention core's input gradient dqkv (N, W) into dkv (N, KVB: each head's [d k_nope |
// d v]) and d k_rope (N, Dr; rows ld apart) = the key heads' last Dr dims summed in head order.
template <typename T>
void unpack_dkv(Ops<T>& ops, T* dkv, T* dk_rope, int64_t ld, const T* dqkv, const MlaDims& m,
                int64_t N) {
  for (int64_t h = 0; h < m.NH; ++h) {
    T* dkvh = dkv + h * (m.Dn + m.Dv);
    ops.copy_rows(dkvh, m.KVB, dqkv + m.QD + h * m.Dq, m.W, N, m.Dn);
    ops.copy_rows(dkvh + m.Dn, m.KVB, dqkv + 2 * m.QD + h * m.Dv, m.W, N, m.Dv);
  }
  ops.copy_rows(dk_rope, ld, dqkv + m.QD + m.Dn, m.W, N, m.Dr);
  for (int64_t h = 1; h < m.NH; ++h)
    ops.add_rows(dk_rope, ld, dqkv + m.QD + h * m.Dq + m.Dn, m.W, N, m.Dr);
}

}  // namespace

template <typename T>
void mla_block_forward(Ops<T>& ops, T* res_out, LayerActs<T>& la, const T* res_in, const LayerParams<T>& lp,
                       const Activations<T>& a, const ModelDims& d, int64_t B, int64_t T_) {
  const MlaDims m = mla_dims(d);
  const int64_t N = B * T_, C = d.C;
  const PrecisionMode pm = d.precision;
  const T eps = static_cast<T>(d.norm_eps);
  T* qkv = la.qkv_mla;
  T* proj = a.mla_proj;
  ops.rmsnorm_forward(la.ln1, la.rstd1, res_in, lp.attn_norm, N, C, eps);
  // [c | k_rope] = wkv_a ln1: the latent kept, k_rope turned and given to every key head.
  linear_forward<T>(ops, proj, la.ln1, lp.wkv_a, N, C, m.KVA, pm, la.lin, &la.saved_ln1);
  ops.copy_rows(la.kv_c, m.KVL, proj, m.KVA, N, m.KVL);
  ops.rope_forward(proj + m.KVL, a.rope_cos, a.rope_sin, B, T_, 1, m.Dr, m.KVA);
  broadcast_k_rope(ops, qkv, proj + m.KVL, m.KVA, m, N);
  // Queries, their RoPE parts turned in place.
  if (m.QL > 0) {
    linear_forward_saved<T>(ops, la.q_a, la.ln1, la.saved_ln1, lp.wq_a, N, C, m.QL, pm, la.lin);
    ops.rmsnorm_forward(la.q_an, la.q_rstd, la.q_a, lp.q_norm, N, m.QL, eps);
    linear_forward<T>(ops, proj, la.q_an, lp.wq_b, N, m.QL, m.QD, pm, la.lin, &la.saved_q_an);
  } else {
    linear_forward_saved<T>(ops, proj, la.ln1, la.saved_ln1, lp.wq, N, C, m.QD, pm, la.lin);
  }
  ops.copy_rows(qkv, m.W, proj, m.QD, N, m.QD);
  rope_heads(ops, true, qkv, a.rope_cos, a.rope_sin, m, B, T_, m.W);
  // k_nope and v of every head from the normalized latent.
  ops.rmsnorm_forward(la.kv_an, la.kv_rstd, la.kv_c, lp.kv_norm, N, m.KVL, eps);
  linear_forward<T>(ops, proj, la.kv_an, lp.wkv_b, N, m.KVL, m.KVB, pm, la.lin, &la.saved_kv_an);
  pack_kv(ops, qkv, proj, m, N);
  ops.attention_forward(la.attn_out, la.lse, qkv, B, T_, m.NH, m.NH, m.Dq, m.Dv, a.attn_scratch);
  linear_forward<T>(ops, a.tmp, la.attn_out, lp.wo, N, m.HA, C, pm, la.lin, &la.saved_attn_out);
  ops.residual_forward(res_out, res_in, a.tmp, N * C);
}

template <typename T>
void mla_block_backward_input(Ops<T>& ops, T* dres, LayerActs<T>& la, const T* res_in,
                              const LayerParams<T>& lp, Activations<T>& a, const ModelDims& d,
                              int64_t B, int64_t T_) {
  const MlaDims m = mla_dims(d);
  const int64_t N = B * T_, C = d.C;
  const PrecisionMode pm = d.precision;
  const LayerKept<T>& k = la.kept;
  // dres flows unchanged through the residual add; the branch gets a copy of it.
  ops.copy(k.dres_mid, dres, sizeof(T) * static_cast<size_t>(N * C));
  linear_backward_input<T>(ops, a.dattn, dres, lp.wo, N, m.HA, C, pm, la.lin);
  ops.attention_backward(a.dqkv_mla, a.dattn, la.qkv_mla, la.lse, B, T_, m.NH, m.NH, m.Dq,
                         m.Dv, a.attn_scratch);
  // Split the packed gradient: queries, per head [d k_nope | d v], the shared d k_rope.
  ops.copy_rows(k.dq, m.QD, a.dqkv_mla, m.W, N, m.QD);
  rope_heads(ops, false, k.dq, a.rope_cos, a.rope_sin, m, B, T_, m.QD);
  unpack_dkv(ops, k.dkv, k.dkv_a + m.KVL, m.KVA, a.dqkv_mla, m, N);
  ops.rope_backward(k.dkv_a + m.KVL, a.rope_cos, a.rope_sin, B, T_, 1, m.Dr, m.KVA);
  // Through wkv_b and kv_norm to the latent, next to d k_rope in wkv_a's output gradient.
  linear_backward_input<T>(ops, k.dkv_an, k.dkv, lp.wkv_b, N, m.KVL, m.KVB, pm, la.lin);
  ops.zero(a.dkv_c, sizeof(T) * static_cast<size_t>(N * m.KVL));
  ops.rmsnorm_backward_input(a.dkv_c, k.dkv_an, la.kv_c, lp.kv_norm, la.kv_rstd, N, m.KVL);
  ops.copy_rows(k.dkv_a, m.KVA, a.dkv_c, m.KVL, N, m.KVL);
  // ln1 feeds wkv_a and the query path: its gradient is the sum of both.
  linear_backward_input<T>(ops, k.dln1, k.dkv_a, lp.wkv_a, N, C, m.KVA, pm, la.lin);
  if (m.QL > 0) {
    linear_backward_input<T>(ops, k.dq_an, k.dq, lp.wq_b, N, m.QL, m.QD, pm, la.lin);
    ops.zero(k.dq_a, sizeof(T) * static_cast<size_t>(N * m.QL));
    ops.rmsnorm_backward_input(k.dq_a, k.dq_an, la.q_a, lp.q_norm, la.q_rstd, N, m.QL);
    linear_backward_input<T>(ops, k.dln1, k.dq_a, lp.wq_a, N, C, m.QL, pm, la.lin, true);
  } else {
    linear_backward_input<T>(ops, k.dln1, k.dq, lp.wq, N, C, m.QD, pm, la.lin, true);
  }
  ops.rmsnorm_backward_input(dres, k.dln1, res_in, lp.attn_norm, la.rstd1, N, C);
}

template <typename T>
void mla_block_backward_weight(Ops<T>& ops, LayerParams<T>& lg, const LayerActs<T>& la, const T* res_in,
                               const ModelDims& d, int64_t N) {
  const MlaDims m = mla_dims(d);
  const int64_t C = d.C;
  const LayerKept<T>& k = la.kept;
  const PrecisionMode pm = d.precision;
  linear_backward_weight_saved<T>(ops, lg.wo, k.dres_mid, la.attn_out, la.saved_attn_out, N, m.HA, C,
                                  pm, la.lin);
  linear_backward_weight_saved<T>(ops, lg.wkv_b, k.dkv, la.kv_an, la.saved_kv_an, N, m.KVL, m.KVB, pm,
                                  la.lin);
  ops.rmsnorm_backward_weight(lg.kv_norm, k.dkv_an, la.kv_c, la.kv_rstd, N, m.KVL);
  linear_backward_weight_saved<T>(ops, lg.wkv_a, k.dkv_a, la.ln1, la.saved_ln1, N, C, m.KVA, pm,
                                  la.lin);
  if (m.QL > 0) {
    linear_backward_weight_saved<T>(ops, lg.wq_b, k.dq, la.q_an, la.saved_q_an, N, m.QL, m.QD, pm,
                                    la.lin);
    ops.rmsnorm_backward_weight(lg.q_norm, k.dq_an, la.q_a, la.q_rstd, N, m.QL);
    linear_backward_weight_saved<T>(ops, lg.wq_a, k.dq_a, la.ln1, la.saved_ln1, N, C, m.QL, pm,
                                    la.lin);
  } else {
    linear_backward_weight_saved<T>(ops, lg.wq, k.dq, la.ln1, la.saved_ln1, N, C, m.QD, pm, la.lin);
  }
  ops.rmsnorm_backward_weight(lg.attn_norm, k.dln1, res_in, la.rstd1, N, C);
}

#define MOE_INSTANTIATE(T)                                                                    \
  template void mla_block_forward<T>(Ops<T>&, T*, LayerActs<T>&, const T*, const LayerParams<T>&,     \
                                     const Activations<T>&, const ModelDims&, int64_t,        \
                                     int64_t);                                                \
  template void mla_block_backward_input<T>(Ops<T>&, T*, LayerActs<T>&, const T*, const LayerParams<T>&, \
                                            Activations<T>&, const ModelDims&, int64_t,       \
                                            int64_t);                                         \
  template void mla_block_backward_weight<T>(Ops<T>&, LayerParams<T>&, const LayerActs<T>&, const T*,  \
                                             const ModelDims&, int64_t);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
