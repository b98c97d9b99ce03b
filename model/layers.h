// The model's layers as forward/backward pairs over the views in model.h.
//
// Accumulation contract (every layer):
//   - weight gradients ACCUMULATE (+=) into the gradient views;
//   - `dx` outputs of the FFN layers are ASSIGNED (=);
//   - the attention block and the FFN block update the residual-stream gradient `dres`
//     in place: on entry it holds dL/d(block output), on return dL/d(block input).
// backward_input and backward_weight are separate kernel calls inside each backward, in
// the order a zero-bubble schedule will later split them.
#pragma once

#include <cstdint>

#include "model/model.h"

namespace moe {

// res_out = res_in + Attn(RMSNorm(res_in)). tmp (N, C) scratch.
template <typename T>
void attention_block_forward(T* res_out, LayerActs<T>& la, const T* res_in,
                             const LayerParams<T>& lp, const Activations<T>& a,
                             const ModelDims& d, int64_t B, int64_t T_);
template <typename T>
void attention_block_backward(T* dres, LayerParams<T>& lg, const LayerActs<T>& la,
                              const T* res_in, const LayerParams<T>& lp, Activations<T>& a,
                              const ModelDims& d, int64_t B, int64_t T_);

// Dense SwiGLU FFN: out (N, C) = W2 (silu(x W1^T) * (x W3^T)).
template <typename T>
void dense_ffn_forward(T* out, LayerActs<T>& la, const T* x, const LayerParams<T>& lp,
                       const ModelDims& d, int64_t N);
// dx (N, C) assigned.
template <typename T>
void dense_ffn_backward(T* dx, LayerParams<T>& lg, const LayerActs<T>& la, const T* dout,
                        const T* x, const LayerParams<T>& lp, Activations<T>& a,
                        const ModelDims& d, int64_t N);

// MoE FFN: routed experts (top-K of E, dropless) plus the fused shared experts.
// Returns this batch's balance loss summed over sequences (0 when aux_alpha = 0);
// adds the routing counts to `load` (E) when it is not null. With ep > 1, `ex` carries the
// rows of MoE layer `moe_l` to and from the ranks that own their experts.
template <typename T>
double moe_ffn_forward(T* out, LayerActs<T>& la, const T* x, const LayerParams<T>& lp,
                       const float* bias, int64_t* load, Activations<T>& a, const ModelDims& d,
                       int64_t B, int64_t T_, ExpertExchange* ex, int64_t moe_l);
// dx (N, C) assigned; dloss_aux is the weight of this layer's summed balance loss.
template <typename T>
void moe_ffn_backward(T* dx, LayerParams<T>& lg, const LayerActs<T>& la, const T* dout,
                      const T* x, const LayerParams<T>& lp, Activations<T>& a,
                      const ModelDims& d, int64_t B, int64_t T_, T dloss_aux,
                      ExpertExchange* ex, int64_t moe_l);

}  // namespace moe
