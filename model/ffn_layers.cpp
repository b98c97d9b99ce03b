// The feed-forward layers: dense SwiGLU and the MoE layer (router -> dispatch ->
// per-expert SwiGLU -> combine, plus the shared experts).
#include <algorithm>

#include "model/check.h"
#include "model/kernels/cpu/dense_ops.h"
#include "model/kernels/cpu/moe_ops.h"
#include "model/layers.h"
#include "model/linear.h"

namespace moe {

namespace {

// The most EP ranks an expert's rows come from (a bound for the stack array of blocks).
constexpr int kMaxEpBlocks = 4096;

// SwiGLU MLP on rows: gu (n, 2F) = x W13^T, h (n, F) = silu(g) * u, out (n, C) = h W2^T.
// The GEMMs run in pm (model/linear.h) with scratch ls.
// save_x / save_h: where x and h are saved for the weight pass (null: x is kept as is).
template <typename T>
void swiglu_mlp_forward(Ops<T>& ops, T* out, T* gu, T* h, const T* x, const T* w13, const T* w2, int64_t n,
                        int64_t C, int64_t F, PrecisionMode pm, const LinearScratch<T>& ls,
                        const LinearSaved* save_x, const LinearSaved* save_h) {
  linear_forward<T>(ops, gu, x, w13, n, C, 2 * F, pm, ls, save_x);
  ops.swiglu_forward(h, gu, n, F);
  linear_forward<T>(ops, out, h, w2, n, F, C, pm, ls, save_h);
}

// Input pass: dx (n, C) assigned when accumulate_dx is false, += otherwise; dgu (n, 2F) is
// kept for the weight pass, dh (n, F) is scratch.
template <typename T>
void swiglu_mlp_backward_input(Ops<T>& ops, T* dx, T* dgu, T* dh, const T* dout, const T* gu, const T* w13,
                               const T* w2, int64_t n, int64_t C, int64_t F, bool accumulate_dx,
                               PrecisionMode pm, const LinearScratch<T>& ls) {
  linear_backward_input<T>(ops, dh, dout, w2, n, F, C, pm, ls);
  ops.swiglu_backward(dgu, dh, gu, n, F);
  linear_backward_input<T>(ops, dx, dgu, w13, n, C, 2 * F, pm, ls, accumulate_dx);
}

// Weight pass: dw2 += dout^T h, dw13 += dgu^T x.
// blocks (n_blocks + 1 row offsets, null: one block) restart the FP8 128-row tiles.
// saved_x / saved_h as the forward's save_x / save_h.
template <typename T>
void swiglu_mlp_backward_weight(Ops<T>& ops, T* dw13, T* dw2, const T* dgu, const T* dout, const T* x,
                                const T* h, const LinearSaved* saved_x,
                                const LinearSaved& saved_h, int64_t n, int64_t C, int64_t F,
                                PrecisionMode pm, const LinearScratch<T>& ls,
                                const int64_t* blocks = nullptr, int64_t n_blocks = 1) {
  linear_backward_weight_saved<T>(ops, dw2, dout, h, saved_h, n, F, C, pm, ls, blocks, n_blocks);
  if (saved_x) {
    linear_backward_weight_saved<T>(ops, dw13, dgu, x, *saved_x, n, C, 2 * F, pm, ls, blocks,
                                    n_blocks);
  } else {
    linear_backward_weight<T>(ops, dw13, dgu, x, n, C, 2 * F, pm, ls, blocks, n_blocks);
  }
}

}  // namespace

template <typename T>
void dense_ffn_forward(Ops<T>& ops, T* out, LayerActs<T>& la, const T* x, const LayerParams<T>& lp,
                       const ModelDims& d, int64_t N) {
  swiglu_mlp_forward<T>(ops, out, la.gu, la.h, x, lp.w13, lp.w2, N, d.C, d.F, d.precision, la.lin,
                        &la.saved_ln2, &la.saved_h);
}

template <typename T>
void dense_ffn_backward_input(Ops<T>& ops, T* dx, LayerActs<T>& la, const T* dout, const LayerParams<T>& lp,
                              Activations<T>& a, const ModelDims& d, int64_t N) {
  const LayerKept<T>& k = la.kept;
  ops.copy(k.dres_out, dout, sizeof(T) * static_cast<size_t>(N * d.C));
  swiglu_mlp_backward_input<T>(ops, dx, k.dgu, a.dh, k.dres_out, la.gu, lp.w13, lp.w2, N, d.C, d.F,
                               false, d.precision, la.lin);
}

template <typename T>
void dense_ffn_backward_weight(Ops<T>& ops, LayerParams<T>& lg, const LayerActs<T>& la, const T* x,
                               const ModelDims& d, int64_t N) {
  const LayerKept<T>& k = la.kept;
  swiglu_mlp_backward_weight<T>(ops, lg.w13, lg.w2, k.dgu, k.dres_out, x, la.h, &la.saved_ln2,
                                la.saved_h, N, d.C, d.F, d.precision, la.lin);
}

template <typename T>
void moe_layer_route_forward(Ops<T>& ops, LayerActs<T>& la, const T* x, const LayerParams<T>& lp, const float* bias,
                       Activations<T>& a, const ModelDims& d, int64_t N) {
  const int64_t C = d.C, E = d.E, K = d.K;
  // Router in full precision of T: logits -> scores -> top-k with the selection bias.
  ops.matmul_forward(a.router_logits, x, lp.router, N, C, E);
  ops.router_forward(la.scores, la.expert_ids, la.gate_weights, a.router_logits, bias, N, E,
                         K, d.score, d.route_scale, d.G, d.KG);
  ops.moe_plan(la.counts, la.offsets, la.row_of, la.token_of, la.expert_ids, N, E, K);
  ops.moe_permute_forward(la.xp, x, la.token_of, N * K, C);
  if (d.ep == 1) {
    std::copy(la.offsets, la.offsets + E + 1, la.local_offsets);
    std::copy(la.offsets, la.offsets + E + 1, la.block_offsets);
    la.rows_recv = N * K;
  }
}

template <typename T>
void moe_layer_experts_forward(Ops<T>& ops, T* yg, LayerActs<T>& la, const T* xg, const LayerParams<T>& lp,
                         const ModelDims& d) {
  const int64_t C = d.C, FE = d.FE;
  for (int64_t e = 0; e < d.EL(); ++e) {
    const int64_t r0 = la.local_offsets[e], n = la.local_offsets[e + 1] - r0;
    if (n == 0) continue;
    const LinearSaved sx = linear_saved_rows(la.saved_xg, r0, C);
    const LinearSaved sh = linear_saved_rows(la.saved_eh, r0, FE);
    swiglu_mlp_forward<T>(ops, yg + r0 * C, la.egu + r0 * 2 * FE, la.eh + r0 * FE, xg + r0 * C,
                          lp.ew13 + e * 2 * FE * C, lp.ew2 + e * C * FE, n, C, FE, d.precision,
                          la.lin_experts, &sx, &sh);
  }
}

template <typename T>
void moe_layer_shared_forward(Ops<T>& ops, T* out, LayerActs<T>& la, const T* x, const LayerParams<T>& lp,
                        const ModelDims& d, int64_t N) {
  if (d.S > 0)
    swiglu_mlp_forward<T>(ops, out, la.sgu, la.sh, x, lp.sw13, lp.sw2, N, d.C, d.S, d.precision,
                          la.lin, nullptr, &la.saved_sh);
}

template <typename T>
void moe_layer_combine_forward(Ops<T>& ops, T* out, LayerActs<T>& la, const T* shared_out, int64_t* load,
                               const ModelDims& d, int64_t B, int64_t T_, double* aux_acc) {
  const int64_t N = B * T_, C = d.C, E = d.E, K = d.K;
  ops.moe_combine_forward(out, la.yp, la.gate_weights, la.row_of, N, K, C);
  if (d.S > 0) ops.residual_forward(out, out, shared_out, N * C);
  if (load)
    for (int64_t e = 0; e < E; ++e) load[e] += la.counts[e];
  if (d.aux_alpha > 0)
    ops.aux_loss_forward(aux_acc, la.scores, la.expert_ids, B, T_, E, K, d.aux_alpha);
}

template <typename T>
void moe_layer_combine_backward_input(Ops<T>& ops, T* dyp, LayerActs<T>& la, const T* dout,
                                const LayerParams<T>& lp, Activations<T>& a, const ModelDims& d,
                                int64_t B, int64_t T_, T dloss_aux) {
  const int64_t N = B * T_, C = d.C, E = d.E, K = d.K;
  const LayerKept<T>& k = la.kept;
  ops.copy(k.dres_out, dout, sizeof(T) * static_cast<size_t>(N * C));
  ops.moe_combine_backward(dyp, a.dgate, dout, la.yp, la.gate_weights, la.row_of, N, K, C);
  const T* dscores_extra = nullptr;
  if (d.aux_alpha > 0) {
    ops.aux_loss_backward(a.dscores, la.scores, la.expert_ids, B, T_, E, K, d.aux_alpha,
                              dloss_aux);
    dscores_extra = a.dscores;
  }
  ops.router_backward(k.dlogits_r, a.dgate, dscores_extra, la.scores, la.expert_ids, N, E, K,
                          d.score, d.route_scale);
  if (d.S > 0) {
    linear_backward_input<T>(ops, a.dh, k.dres_out, lp.sw2, N, d.S, C, d.precision, la.lin);
    ops.swiglu_backward(k.dsgu, a.dh, la.sgu, N, d.S);
  }
}

template <typename T>
void moe_layer_experts_backward_input(Ops<T>& ops, T* dxg, LayerActs<T>& la, const LayerParams<T>& lp,
                                Activations<T>& a, const ModelDims& d) {
  const int64_t C = d.C, FE = d.FE;
  const LayerKept<T>& k = la.kept;
  for (int64_t e = 0; e < d.EL(); ++e) {
    const int64_t r0 = la.local_offsets[e], n = la.local_offsets[e + 1] - r0;
    if (n == 0) continue;
    swiglu_mlp_backward_input<T>(ops, dxg + r0 * C, k.degu + r0 * 2 * FE, a.dh, k.dyg + r0 * C,
                                 la.egu + r0 * 2 * FE, lp.ew13 + e * 2 * FE * C,
                                 lp.ew2 + e * C * FE, n, C, FE, false, d.precision, la.lin_experts);
  }
}

template <typename T>
void moe_layer_permute_backward_input(Ops<T>& ops, T* dx, LayerActs<T>& la, const T* dxp, const LayerParams<T>& lp,
                                const ModelDims& d, int64_t N) {
  const int64_t C = d.C, E = d.E;
  const LayerKept<T>& k = la.kept;
  ops.moe_permute_backward(dx, dxp, la.row_of, N, d.K, C);
  ops.gemm(false, false, N, C, E, T(1), k.dlogits_r, E, lp.router, C, T(1), dx, C);
  if (d.S > 0)
    linear_backward_input<T>(ops, dx, k.dsgu, lp.sw13, N, C, 2 * d.S, d.precision, la.lin, true);
}

template <typename T>
void moe_layer_experts_backward_weight(Ops<T>& ops, LayerParams<T>& lg, const LayerActs<T>& la, const ModelDims& d) {
  const int64_t C = d.C, FE = d.FE;
  const LayerKept<T>& k = la.kept;
  const T* xg = d.ep > 1 ? la.xg : la.xp;
  // Each expert's rows from each EP rank are a block of their own (see LayerActs).
  int64_t blocks[kMaxEpBlocks + 1];
  CHECK(d.ep <= kMaxEpBlocks, "ep %lld > %d", (long long)d.ep, kMaxEpBlocks);
  for (int64_t e = 0; e < d.EL(); ++e) {
    const int64_t r0 = la.local_offsets[e], n = la.local_offsets[e + 1] - r0;
    if (n == 0) continue;
    for (int64_t p = 0; p <= d.ep; ++p) blocks[p] = la.block_offsets[e * d.ep + p] - r0;
    const LinearSaved sx = linear_saved_rows(la.saved_xg, r0, C);
    swiglu_mlp_backward_weight<T>(ops, lg.ew13 + e * 2 * FE * C, lg.ew2 + e * C * FE,
                                  k.degu + r0 * 2 * FE, k.dyg + r0 * C, xg + r0 * C,
                                  la.eh + r0 * FE, &sx, linear_saved_rows(la.saved_eh, r0, FE), n,
                                  C, FE, d.precision, la.lin, blocks, d.ep);
  }
}

template <typename T>
void moe_layer_router_shared_backward_weight(Ops<T>& ops, LayerParams<T>& lg, const LayerActs<T>& la, const T* x,
                                       const ModelDims& d, int64_t N) {
  const LayerKept<T>& k = la.kept;
  ops.matmul_backward_weight(lg.router, k.dlogits_r, x, N, d.C, d.E);
  if (d.S > 0)
    swiglu_mlp_backward_weight<T>(ops, lg.sw13, lg.sw2, k.dsgu, k.dres_out, x, la.sh, nullptr,
                                  la.saved_sh, N, d.C, d.S, d.precision, la.lin);
}

#define MOE_INSTANTIATE(T)                                                                     \
  template void dense_ffn_forward<T>(Ops<T>&, T*, LayerActs<T>&, const T*, const LayerParams<T>&,      \
                                     const ModelDims&, int64_t);                              \
  template void dense_ffn_backward_input<T>(Ops<T>&, T*, LayerActs<T>&, const T*, const LayerParams<T>&, \
                                            Activations<T>&, const ModelDims&, int64_t);      \
  template void dense_ffn_backward_weight<T>(Ops<T>&, LayerParams<T>&, const LayerActs<T>&, const T*,  \
                                             const ModelDims&, int64_t);                      \
  template void moe_layer_route_forward<T>(Ops<T>&, LayerActs<T>&, const T*, const LayerParams<T>&,        \
                                     const float*, Activations<T>&, const ModelDims&, int64_t); \
  template void moe_layer_experts_forward<T>(Ops<T>&, T*, LayerActs<T>&, const T*, const LayerParams<T>&,    \
                                       const ModelDims&);                                     \
  template void moe_layer_shared_forward<T>(Ops<T>&, T*, LayerActs<T>&, const T*, const LayerParams<T>&,     \
                                      const ModelDims&, int64_t);                             \
  template void moe_layer_combine_forward<T>(Ops<T>&, T*, LayerActs<T>&, const T*, int64_t*,                 \
                                             const ModelDims&, int64_t, int64_t, double*);    \
  template void moe_layer_combine_backward_input<T>(Ops<T>&, T*, LayerActs<T>&, const T*,                    \
                                              const LayerParams<T>&, Activations<T>&,         \
                                              const ModelDims&, int64_t, int64_t, T);         \
  template void moe_layer_experts_backward_input<T>(Ops<T>&, T*, LayerActs<T>&, const LayerParams<T>&,       \
                                              Activations<T>&, const ModelDims&);             \
  template void moe_layer_permute_backward_input<T>(Ops<T>&, T*, LayerActs<T>&, const T*,                    \
                                              const LayerParams<T>&, const ModelDims&, int64_t); \
  template void moe_layer_experts_backward_weight<T>(Ops<T>&, LayerParams<T>&, const LayerActs<T>&,          \
                                               const ModelDims&);                             \
  template void moe_layer_router_shared_backward_weight<T>(Ops<T>&, LayerParams<T>&, const LayerActs<T>&,    \
                                                     const T*, const ModelDims&, int64_t);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
