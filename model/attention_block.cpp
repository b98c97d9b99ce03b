// Pre-norm attention block: RMSNorm -> fused QKV projection -> RoPE on q and k ->
// causal softmax attention -> output projection -> residual add.
#include "model/check.h"
#include "model/layers.h"
#include "model/linear.h"

namespace moe {

template <typename T>
void attention_block_forward(Ops<T>& ops, T* res_out, LayerActs<T>& la, const T* res_in,
                             const LayerParams<T>& lp, const Activations<T>& a,
                             const ModelDims& d, int64_t B, int64_t T_) {
  const int64_t N = B * T_, C = d.C, QKV = d.qkv();
  ops.rmsnorm_forward(la.ln1, la.rstd1, res_in, lp.attn_norm, N, C, static_cast<T>(d.norm_eps));
  const PrecisionMode pm = d.precision;
  linear_forward<T>(ops, la.qkv, la.ln1, lp.wqkv, N, C, QKV, pm, la.lin, &la.saved_ln1);
  ops.rope_forward(la.qkv, a.rope_cos, a.rope_sin, B, T_, d.NH, d.HD, QKV);
  ops.rope_forward(la.qkv + d.NH * d.HD, a.rope_cos, a.rope_sin, B, T_, d.NKV, d.HD, QKV);
  ops.attention_forward(la.attn_out, la.lse, la.qkv, B, T_, d.NH, d.NKV, d.HD, d.HD,
                        a.attn_scratch);
  linear_forward<T>(ops, a.tmp, la.attn_out, lp.wo, N, d.d_attn(), C, pm, la.lin, &la.saved_attn_out);
  ops.residual_forward(res_out, res_in, a.tmp, N * C);
}

template <typename T>
void attention_block_backward_input(Ops<T>& ops, T* dres, LayerActs<T>& la, const T* res_in,
                                    const LayerParams<T>& lp, Activations<T>& a,
                                    const ModelDims& d, int64_t B, int64_t T_) {
  const int64_t N = B * T_, C = d.C, QKV = d.qkv();
  const LayerKept<T>& k = la.kept;
  // dres flows unchanged through the residual add; the branch gets a copy of it.
  ops.copy(k.dres_mid, dres, sizeof(T) * static_cast<size_t>(N * C));
  const PrecisionMode pm = d.precision;
  linear_backward_input<T>(ops, a.dattn, dres, lp.wo, N, d.d_attn(), C, pm, la.lin);
  ops.attention_backward(k.dqkv, a.dattn, la.qkv, la.lse, B, T_, d.NH, d.NKV, d.HD, d.HD,
                         a.attn_scratch);
  ops.rope_backward(k.dqkv, a.rope_cos, a.rope_sin, B, T_, d.NH, d.HD, QKV);
  ops.rope_backward(k.dqkv + d.NH * d.HD, a.rope_cos, a.rope_sin, B, T_, d.NKV, d.HD, QKV);
  linear_backward_input<T>(ops, k.dln1, k.dqkv, lp.wqkv, N, C, QKV, pm, la.lin);
  ops.rmsnorm_backward_input(dres, k.dln1, res_in, lp.attn_norm, la.rstd1, N, C);
}

template <typename T>
void attention_block_backward_weight(Ops<T>& ops, LayerParams<T>& lg, const LayerActs<T>& la,
                                     const T* res_in, const ModelDims& d, int64_t N) {
  const int64_t C = d.C;
  const LayerKept<T>& k = la.kept;
  const PrecisionMode pm = d.precision;
  linear_backward_weight_saved<T>(ops, lg.wo, k.dres_mid, la.attn_out, la.saved_attn_out, N,
                                  d.d_attn(), C, pm, la.lin);
  linear_backward_weight_saved<T>(ops, lg.wqkv, k.dqkv, la.ln1, la.saved_ln1, N, C, d.qkv(), pm,
                                  la.lin);
  ops.rmsnorm_backward_weight(lg.attn_norm, k.dln1, res_in, la.rstd1, N, C);
}

#define MOE_INSTANTIATE(T)                                                                   \
  template void attention_block_forward<T>(Ops<T>&, T*, LayerActs<T>&, const T*, const LayerParams<T>&, \
                                           const Activations<T>&, const ModelDims&, int64_t,   \
                                           int64_t);                                         \
  template void attention_block_backward_input<T>(Ops<T>&, T*, LayerActs<T>&, const T*,               \
                                                  const LayerParams<T>&, Activations<T>&,    \
                                                  const ModelDims&, int64_t, int64_t);       \
  template void attention_block_backward_weight<T>(Ops<T>&, LayerParams<T>&, const LayerActs<T>&,     \
                                                   const T*, const ModelDims&, int64_t);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
