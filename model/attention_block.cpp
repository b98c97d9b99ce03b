// Pre-norm attention block: RMSNorm -> fused QKV projection -> RoPE on q and k ->
// causal softmax attention -> output projection -> residual add.
#include <cstring>

#include "model/check.h"
#include "model/kernels/cpu/dense_ops.h"
#include "model/layers.h"
#include "model/linear.h"

namespace moe {

template <typename T>
void attention_block_forward(T* res_out, LayerActs<T>& la, const T* res_in,
                             const LayerParams<T>& lp, const Activations<T>& a,
                             const ModelDims& d, int64_t B, int64_t T_) {
  const int64_t N = B * T_, C = d.C, QKV = d.qkv();
  cpu::rmsnorm_forward<T>(la.ln1, la.rstd1, res_in, lp.attn_norm, N, C, static_cast<T>(d.norm_eps));
  const PrecisionMode pm = d.precision;
  linear_forward<T>(la.qkv, la.ln1, lp.wqkv, N, C, QKV, pm, la.lin, &la.saved_ln1);
  cpu::rope_forward<T>(la.qkv, a.rope_cos, a.rope_sin, B, T_, d.NH, d.HD, QKV);
  cpu::rope_forward<T>(la.qkv + d.NH * d.HD, a.rope_cos, a.rope_sin, B, T_, d.NKV, d.HD, QKV);
  cpu::attention_forward<T>(la.attn_out, la.probs, la.qkv, B, T_, d.NH, d.NKV, d.HD);
  linear_forward<T>(a.tmp, la.attn_out, lp.wo, N, d.d_attn(), C, pm, la.lin, &la.saved_attn_out);
  cpu::residual_forward<T>(res_out, res_in, a.tmp, N * C);
}

template <typename T>
void attention_block_backward_input(T* dres, LayerActs<T>& la, const T* res_in,
                                    const LayerParams<T>& lp, Activations<T>& a,
                                    const ModelDims& d, int64_t B, int64_t T_) {
  const int64_t N = B * T_, C = d.C, QKV = d.qkv();
  const LayerKept<T>& k = la.kept;
  // dres flows unchanged through the residual add; the branch gets a copy of it.
  std::memcpy(k.dres_mid, dres, sizeof(T) * static_cast<size_t>(N * C));
  const PrecisionMode pm = d.precision;
  linear_backward_input<T>(a.dattn, dres, lp.wo, N, d.d_attn(), C, pm, la.lin);
  cpu::attention_backward<T>(k.dqkv, a.dattn, la.qkv, la.probs, B, T_, d.NH, d.NKV, d.HD,
                             a.attn_scratch);
  cpu::rope_backward<T>(k.dqkv, a.rope_cos, a.rope_sin, B, T_, d.NH, d.HD, QKV);
  cpu::rope_backward<T>(k.dqkv + d.NH * d.HD, a.rope_cos, a.rope_sin, B, T_, d.NKV, d.HD, QKV);
  linear_backward_input<T>(k.dln1, k.dqkv, lp.wqkv, N, C, QKV, pm, la.lin);
  cpu::rmsnorm_backward_input<T>(dres, k.dln1, res_in, lp.attn_norm, la.rstd1, N, C);
}

template <typename T>
void attention_block_backward_weight(LayerParams<T>& lg, const LayerActs<T>& la,
                                     const T* res_in, const ModelDims& d, int64_t N) {
  const int64_t C = d.C;
  const LayerKept<T>& k = la.kept;
  const PrecisionMode pm = d.precision;
  linear_backward_weight_saved<T>(lg.wo, k.dres_mid, la.attn_out, la.saved_attn_out, N,
                                  d.d_attn(), C, pm, la.lin);
  linear_backward_weight_saved<T>(lg.wqkv, k.dqkv, la.ln1, la.saved_ln1, N, C, d.qkv(), pm,
                                  la.lin);
  cpu::rmsnorm_backward_weight<T>(lg.attn_norm, k.dln1, res_in, la.rstd1, N, C);
}

#define MOE_INSTANTIATE(T)                                                                   \
  template void attention_block_forward<T>(T*, LayerActs<T>&, const T*, const LayerParams<T>&, \
                                           const Activations<T>&, const ModelDims&, int64_t,   \
                                           int64_t);                                         \
  template void attention_block_backward_input<T>(T*, LayerActs<T>&, const T*,               \
                                                  const LayerParams<T>&, Activations<T>&,    \
                                                  const ModelDims&, int64_t, int64_t);       \
  template void attention_block_backward_weight<T>(LayerParams<T>&, const LayerActs<T>&,     \
                                                   const T*, const ModelDims&, int64_t);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
