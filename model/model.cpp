// Whole-model forward and backward on one process.
#include "model/model.h"

#include <cstring>

#include "model/check.h"
#include "model/kernels/cpu/dense_ops.h"
#include "model/layers.h"

namespace moe {

template <typename T>
double model_forward(Model<T>& m, const int32_t* tokens, const int32_t* targets, int64_t B,
                     int64_t T_, bool training) {
  const ModelDims& d = m.d;
  CHECK(B >= 1 && B <= m.B_max && T_ >= 1 && T_ <= d.T, "B %lld T %lld", (long long)B,
        (long long)T_);
  Activations<T>& a = m.a;
  const int64_t N = B * T_, C = d.C;
  m.B = B;
  m.Tcur = T_;
  std::memcpy(a.tokens, tokens, sizeof(int32_t) * static_cast<size_t>(N));
  if (targets) std::memcpy(a.targets, targets, sizeof(int32_t) * static_cast<size_t>(N));
  cpu::embedding_forward<T>(a.res, a.tokens, m.p.wte, N, C);
  m.aux_loss_sum = 0;
  for (int64_t l = 0; l < d.L; ++l) {
    LayerActs<T>& la = a.layers[static_cast<size_t>(l)];
    const LayerParams<T>& lp = m.p.layers[static_cast<size_t>(l)];
    T* res_in = a.res + l * N * C;
    T* res_out = a.res + (l + 1) * N * C;
    attention_block_forward<T>(la.res_mid, la, res_in, lp, a, d, B, T_);
    cpu::rmsnorm_forward<T>(la.ln2, la.rstd2, la.res_mid, lp.ffn_norm, N, C,
                            static_cast<T>(d.norm_eps));
    if (d.is_moe(l)) {
      const int64_t moe_l = l - d.dense_layers;
      m.aux_loss_sum += moe_ffn_forward<T>(res_out, la, la.ln2, lp, m.router_bias + moe_l * d.E,
                                           training ? m.expert_load + moe_l * d.E : nullptr, a,
                                           d, B, T_, m.exchange, moe_l);
    } else {
      dense_ffn_forward<T>(res_out, la, la.ln2, lp, d, N);
    }
    cpu::residual_forward<T>(res_out, res_out, la.res_mid, N * C);
  }
  const T* res_last = a.res + d.L * N * C;
  cpu::rmsnorm_forward<T>(a.lnf, a.rstdf, res_last, m.p.final_norm, N, C,
                          static_cast<T>(d.norm_eps));
  cpu::matmul_forward<T>(a.logits, a.lnf, m.p.lm_head, N, C, d.V);
  if (!targets) return 0.0;
  cpu::cross_entropy_forward<T>(a.losses, a.probs, a.logits, a.targets, N, d.V);
  double sum = 0;
  int64_t count = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (a.targets[i] < 0) continue;
    sum += static_cast<double>(a.losses[i]);
    ++count;
  }
  return count > 0 ? sum / static_cast<double>(count) : 0.0;
}

template <typename T>
void model_backward(Model<T>& m, T dloss_ce, T dloss_aux) {
  const ModelDims& d = m.d;
  Activations<T>& a = m.a;
  const int64_t B = m.B, T_ = m.Tcur, N = B * T_, C = d.C;
  cpu::cross_entropy_backward<T>(a.dlogits, a.probs, a.targets, dloss_ce, N, d.V);
  cpu::matmul_backward_input<T>(a.dln, a.dlogits, m.p.lm_head, N, C, d.V);
  cpu::matmul_backward_weight<T>(m.g.lm_head, a.dlogits, a.lnf, N, C, d.V);
  const T* res_last = a.res + d.L * N * C;
  std::memset(a.dres, 0, sizeof(T) * static_cast<size_t>(N * C));
  cpu::rmsnorm_backward_input<T>(a.dres, a.dln, res_last, m.p.final_norm, a.rstdf, N, C);
  cpu::rmsnorm_backward_weight<T>(m.g.final_norm, a.dln, res_last, a.rstdf, N, C);
  if (m.grads_ready) m.grads_ready(0);
  for (int64_t l = d.L - 1; l >= 0; --l) {
    const LayerActs<T>& la = a.layers[static_cast<size_t>(l)];
    const LayerParams<T>& lp = m.p.layers[static_cast<size_t>(l)];
    LayerParams<T>& lg = m.g.layers[static_cast<size_t>(l)];
    // FFN branch: dres is dL/d(res_out); the branch's input gradient lands in dln.
    if (d.is_moe(l)) {
      moe_ffn_backward<T>(a.dln, lg, la, a.dres, la.ln2, lp, a, d, B, T_, dloss_aux, m.exchange,
                          l - d.dense_layers);
    } else {
      dense_ffn_backward<T>(a.dln, lg, la, a.dres, la.ln2, lp, a, d, N);
    }
    // Mid-layer: nothing new is final, but in-flight reductions get a chance to progress.
    if (m.grads_ready) m.grads_ready(d.L - l - 1);
    cpu::rmsnorm_backward_input<T>(a.dres, a.dln, la.res_mid, lp.ffn_norm, la.rstd2, N, C);
    cpu::rmsnorm_backward_weight<T>(lg.ffn_norm, a.dln, la.res_mid, la.rstd2, N, C);
    attention_block_backward<T>(a.dres, lg, la, a.res + l * N * C, lp, a, d, B, T_);
    if (m.grads_ready) m.grads_ready(d.L - l);
  }
  cpu::embedding_backward<T>(m.g.wte, a.dres, a.tokens, N, C);
  if (m.grads_ready) m.grads_ready(d.L + 1);
}

template double model_forward<float>(Model<float>&, const int32_t*, const int32_t*, int64_t,
                                     int64_t, bool);
template double model_forward<double>(Model<double>&, const int32_t*, const int32_t*, int64_t,
                                      int64_t, bool);
template void model_backward<float>(Model<float>&, float, float);
template void model_backward<double>(Model<double>&, double, double);

}  // namespace moe
