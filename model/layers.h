// The model's layers as forward / backward functions over the views in model.h. Each
// backward is two passes (the zero-bubble split):
//   _backward_input   the gradient with respect to the layer's input, and the layer's output
//                     gradients each weight needs, saved in la.kept (LayerKept);
//   _backward_weight  the weight gradients, from la.kept and the saved forward activations.
// A weight pass may run any time after its input pass and before the slot's next forward
// of the layer; it reads only la, the slot's saved tensors and the weights' gradients views.
//
// Accumulation contract (every layer):
//   - weight gradients ACCUMULATE (+=) into the gradient views, in the weight pass only;
//   - `dx` outputs of the FFN layers are ASSIGNED (=); la.kept is ASSIGNED;
//   - the attention block's input pass updates the residual-stream gradient `dres` in
//     place: on entry it holds dL/d(block output), on return dL/d(block input).
#pragma once

#include <cstdint>

#include "model/model.h"

namespace moe {

// res_out = res_in + Attn(RMSNorm(res_in)). tmp (N, C) scratch.
template <typename T>
void attention_block_forward(Ops<T>& ops, T* res_out, LayerActs<T>& la, const T* res_in,
                             const LayerParams<T>& lp, const Activations<T>& a,
                             const ModelDims& d, int64_t B, int64_t T_);
// Keeps kept.dres_mid, dqkv, dln1.
template <typename T>
void attention_block_backward_input(Ops<T>& ops, T* dres, LayerActs<T>& la, const T* res_in,
                                    const LayerParams<T>& lp, Activations<T>& a,
                                    const ModelDims& d, int64_t B, int64_t T_);
// wo, wqkv, attn_norm.
template <typename T>
void attention_block_backward_weight(Ops<T>& ops, LayerParams<T>& lg, const LayerActs<T>& la,
                                     const T* res_in, const ModelDims& d, int64_t N);

// The same block with DeepSeek-V3's Multi-head Latent Attention (d.mla(), model/mla_block.cpp):
// res_out = res_in + MLA(RMSNorm(res_in)); same contract as the attention_block functions.
template <typename T>
void mla_block_forward(Ops<T>& ops, T* res_out, LayerActs<T>& la, const T* res_in, const LayerParams<T>& lp,
                       const Activations<T>& a, const ModelDims& d, int64_t B, int64_t T_);
// Keeps kept.dres_mid, dq, dq_an, dq_a (q_lora > 0), dkv, dkv_an, dkv_a, dln1.
template <typename T>
void mla_block_backward_input(Ops<T>& ops, T* dres, LayerActs<T>& la, const T* res_in,
                              const LayerParams<T>& lp, Activations<T>& a, const ModelDims& d,
                              int64_t B, int64_t T_);
// wo, wkv_b, kv_norm, wkv_a, wq_b, q_norm, wq_a (or wq), attn_norm.
template <typename T>
void mla_block_backward_weight(Ops<T>& ops, LayerParams<T>& lg, const LayerActs<T>& la, const T* res_in,
                               const ModelDims& d, int64_t N);

// Dense SwiGLU FFN: out (N, C) = W2 (silu(x W1^T) * (x W3^T)).
template <typename T>
void dense_ffn_forward(Ops<T>& ops, T* out, LayerActs<T>& la, const T* x, const LayerParams<T>& lp,
                       const ModelDims& d, int64_t N);
// dx (N, C) assigned. Keeps kept.dres_out (a copy of dout), dgu.
template <typename T>
void dense_ffn_backward_input(Ops<T>& ops, T* dx, LayerActs<T>& la, const T* dout, const LayerParams<T>& lp,
                              Activations<T>& a, const ModelDims& d, int64_t N);
// w2, w13; x is the forward's input.
template <typename T>
void dense_ffn_backward_weight(Ops<T>& ops, LayerParams<T>& lg, const LayerActs<T>& la, const T* x,
                               const ModelDims& d, int64_t N);

// MoE FFN: routed experts (top-K of E, dropless) plus the fused shared experts, in pieces
// that stop where rows move to and from the ranks owning their experts (the EP exchange
// runs between them, started and finished by the caller). With ep = 1 the local experts'
// rows are xp's (xg = la.xp, yg = la.yp, local_offsets = offsets).
//   forward:  route -> [plan, dispatch xp -> xg] -> experts xg -> yg -> [combine yg -> yp]
//             -> combine (out = gathered yp + shared, the balance loss); shared any time
//             between route and combine.
//   backward: combine_backward (dyp, the router's and shared experts' output gradients)
//             -> [dispatch dyp -> kept.dyg] -> experts_backward (dxg) -> [combine dxg -> dxp]
//             -> permute_backward (dx).
// Sets scores, expert ids, gate weights, the plan and xp; with ep = 1 also local_offsets and
// rows_recv.
template <typename T>
void moe_layer_route_forward(Ops<T>& ops, LayerActs<T>& la, const T* x, const LayerParams<T>& lp,
                             const float* bias, Activations<T>& a, const ModelDims& d, int64_t N);
// yg (rows_recv, C) = every local expert's SwiGLU of its rows of xg.
template <typename T>
void moe_layer_experts_forward(Ops<T>& ops, T* yg, LayerActs<T>& la, const T* xg, const LayerParams<T>& lp,
                               const ModelDims& d);
// out (N, C) = the shared experts' output (nothing when S = 0).
template <typename T>
void moe_layer_shared_forward(Ops<T>& ops, T* out, LayerActs<T>& la, const T* x, const LayerParams<T>& lp,
                              const ModelDims& d, int64_t N);
// out (N, C) = the gate-weighted sum of la.yp per token, + shared_out; adds the routing counts
// to `load` (E) when not null. Adds the batch's balance loss summed over sequences to
// aux_acc[0] (device memory; nothing when aux_alpha = 0).
template <typename T>
void moe_layer_combine_forward(Ops<T>& ops, T* out, LayerActs<T>& la, const T* shared_out, int64_t* load,
                               const ModelDims& d, int64_t B, int64_t T_, double* aux_acc);
// dyp (N K, C) = the experts' output gradients in xp's rows; keeps kept.dres_out, dlogits_r
// (dloss_aux weights the layer's summed balance loss) and dsgu.
template <typename T>
void moe_layer_combine_backward_input(Ops<T>& ops, T* dyp, LayerActs<T>& la, const T* dout,
                                      const LayerParams<T>& lp, Activations<T>& a,
                                      const ModelDims& d, int64_t B, int64_t T_, T dloss_aux);
// dxg (rows_recv, C) from kept.dyg; keeps kept.degu.
template <typename T>
void moe_layer_experts_backward_input(Ops<T>& ops, T* dxg, LayerActs<T>& la, const LayerParams<T>& lp,
                                      Activations<T>& a, const ModelDims& d);
// dx (N, C) assigned: dxp gathered per token, + the router's and shared experts' terms.
template <typename T>
void moe_layer_permute_backward_input(Ops<T>& ops, T* dx, LayerActs<T>& la, const T* dxp,
                                      const LayerParams<T>& lp, const ModelDims& d, int64_t N);
// Weight passes, no communication: the local experts' ew13 / ew2 (from the rows they
// computed on), and the router with sw13 / sw2 (x is the layer's input).
template <typename T>
void moe_layer_experts_backward_weight(Ops<T>& ops, LayerParams<T>& lg, const LayerActs<T>& la,
                                       const ModelDims& d);
template <typename T>
void moe_layer_router_shared_backward_weight(Ops<T>& ops, LayerParams<T>& lg, const LayerActs<T>& la,
                                             const T* x, const ModelDims& d, int64_t N);

}  // namespace moe
