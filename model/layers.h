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
void attention_block_forward(T* res_out, LayerActs<T>& la, const T* res_in,
                             const LayerParams<T>& lp, const Activations<T>& a,
                             const ModelDims& d, int64_t B, int64_t T_);
// Keeps kept.dres_mid, dqkv, dln1.
template <typename T>
void attention_block_backward_input(T* dres, LayerActs<T>& la, const T* res_in,
                                    const LayerParams<T>& lp, Activations<T>& a,
                                    const ModelDims& d, int64_t B, int64_t T_);
// wo, wqkv, attn_norm.
template <typename T>
void attention_block_backward_weight(LayerParams<T>& lg, const LayerActs<T>& la,
                                     const T* res_in, const ModelDims& d, int64_t N);

// Dense SwiGLU FFN: out (N, C) = W2 (silu(x W1^T) * (x W3^T)).
template <typename T>
void dense_ffn_forward(T* out, LayerActs<T>& la, const T* x, const LayerParams<T>& lp,
                       const ModelDims& d, int64_t N);
// dx (N, C) assigned. Keeps kept.dres_out (a copy of dout), dgu.
template <typename T>
void dense_ffn_backward_input(T* dx, LayerActs<T>& la, const T* dout, const LayerParams<T>& lp,
                              Activations<T>& a, const ModelDims& d, int64_t N);
// w2, w13; x is the forward's input.
template <typename T>
void dense_ffn_backward_weight(LayerParams<T>& lg, const LayerActs<T>& la, const T* x,
                               const ModelDims& d, int64_t N);

// MoE FFN: routed experts (top-K of E, dropless) plus the fused shared experts.
// Returns this batch's balance loss summed over sequences (0 when aux_alpha = 0);
// adds the routing counts to `load` (E) when it is not null. With ep > 1, `ex` carries the
// rows of MoE layer `moe_l` to and from the ranks that own their experts.
template <typename T>
double moe_ffn_forward(T* out, LayerActs<T>& la, const T* x, const LayerParams<T>& lp,
                       const float* bias, int64_t* load, Activations<T>& a, const ModelDims& d,
                       int64_t B, int64_t T_, ExpertExchange* ex, int64_t moe_l);
// dx (N, C) assigned; dloss_aux is the weight of this layer's summed balance loss. Does the
// layer's whole EP exchange of the backward. Keeps kept.dres_out, dlogits_r, dyg, degu, dsgu.
template <typename T>
void moe_ffn_backward_input(T* dx, LayerActs<T>& la, const T* dout, const LayerParams<T>& lp,
                            Activations<T>& a, const ModelDims& d, int64_t B, int64_t T_,
                            T dloss_aux, ExpertExchange* ex, int64_t moe_l);
// Local experts' ew13 / ew2, router, sw13 / sw2; x is the forward's input. No communication.
template <typename T>
void moe_ffn_backward_weight(LayerParams<T>& lg, const LayerActs<T>& la, const T* x,
                             const ModelDims& d, int64_t N);

}  // namespace moe
