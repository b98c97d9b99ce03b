// CPU kernels for Mixture-of-Experts routing and token dispatch on one process.
//
// Dimension letters: N tokens, B sequences, T tokens per sequence (N = B*T), C model width,
// E routed experts, K experts per token (top-k), G expert groups, KG groups kept per token.
//
// Token layout after dispatch (written down once, see moe_plan): the N*K (token, slot)
// pairs are sorted by expert, and within an expert by token index, then slot. Expert e owns
// the contiguous permuted rows [offsets[e], offsets[e+1]); an expert with no tokens has an
// empty range. No token is ever dropped.
//
// Accumulation contract: every output here is ASSIGNED (=), nothing accumulates.
#pragma once

#include <cstdint>

#include "model/types.h"

namespace moe::cpu {

// NOTE: the router and balance-loss kernels keep their per-token and per-sequence scratch
// in bounded stack arrays (no allocation inside a step), which caps E, and hence G, here.
// DeepSeek-V3 uses E = 256.
inline constexpr int64_t kMoeMaxExperts = 1024;

// Router scores and top-k selection (DeepSeek-V3).
//   scores  (N, E): sigmoid(logits) or softmax(logits) over E.
//   Selection uses scores + bias (bias only picks experts, never weights them). With
//   G > 1 groups (E / G experts each) a token first keeps the KG groups with the largest
//   sum of their top-2 biased scores, then picks its K experts inside those groups.
//   expert_ids (N, K): chosen experts in descending biased score, ties to the lower id.
//   weights    (N, K): sigmoid: s / sum(selected s) * route_scale;
//                      softmax: s * route_scale (no renormalization).
template <typename T>
void router_forward(T* scores, int32_t* expert_ids, T* weights, const T* logits, const float* bias,
                    int64_t N, int64_t E, int64_t K, ScoreFn score, double route_scale,
                    int64_t G, int64_t KG);

// dlogits (N, E), assigned: the gradient through the gate weights (dweights (N, K)) plus,
// when dscores_extra is not null, an extra gradient on the scores (N, E) from the balance
// loss, both taken back through the sigmoid / softmax.
template <typename T>
void router_backward(T* dlogits, const T* dweights, const T* dscores_extra, const T* scores,
                     const int32_t* expert_ids, int64_t N, int64_t E, int64_t K, ScoreFn score,
                     double route_scale);

// Sequence-wise balance loss (DeepSeek-V3 eq. 17-20), per sequence b of T tokens:
//   s'_te = s_te / sum_j s_tj,  P_e = mean_t s'_te,  f_e = E / (K T) * #{t : e chosen by t}
//   L_b = alpha * sum_e f_e P_e
// Returns sum_b L_b. f is a constant (no gradient through the selection).
template <typename T>
T aux_loss_forward(const T* scores, const int32_t* expert_ids, int64_t B, int64_t T_, int64_t E,
                   int64_t K, double alpha);
// dscores (N, E), assigned: gradient of dloss * sum_b L_b with respect to the scores.
template <typename T>
void aux_loss_backward(T* dscores, const T* scores, const int32_t* expert_ids, int64_t B,
                       int64_t T_, int64_t E, int64_t K, double alpha, T dloss);

// Dispatch plan from the expert choices (a counting sort; deterministic).
//   counts (E), offsets (E + 1), row_of (N * K): the permuted row of pair (n, k),
//   token_of (N * K): the token each permuted row came from.
void moe_plan(int64_t* counts, int64_t* offsets, int32_t* row_of, int32_t* token_of,
              const int32_t* expert_ids, int64_t N, int64_t E, int64_t K);

// xp (N*K, C): row r = x[token_of[r]].
template <typename T>
void moe_permute_forward(T* xp, const T* x, const int32_t* token_of, int64_t rows, int64_t C);
// dx (N, C), assigned: dx[n] = sum_k dxp[row_of[n K + k]] in k order.
template <typename T>
void moe_permute_backward(T* dx, const T* dxp, const int32_t* row_of, int64_t N, int64_t K,
                          int64_t C);

// out (N, C), assigned: out[n] = sum_k weights[n, k] * yp[row_of[n K + k]] in k order.
template <typename T>
void moe_combine_forward(T* out, const T* yp, const T* weights, const int32_t* row_of, int64_t N,
                         int64_t K, int64_t C);
// dyp (N*K, C) and dweights (N, K), both assigned:
//   dyp[row_of[n K + k]] = weights[n, k] * dout[n],  dweights[n, k] = <dout[n], yp[row]>.
template <typename T>
void moe_combine_backward(T* dyp, T* dweights, const T* dout, const T* yp, const T* weights,
                          const int32_t* row_of, int64_t N, int64_t K, int64_t C);

// Auxiliary-loss-free balancing: bias[e] += speed * sign(mean_load - load[e]) where
// mean_load = sum(load) / E (overloaded experts go down, underloaded up; equal stays).
void router_bias_update(float* bias, const int64_t* load, int64_t E, double speed);

// max(load) / mean(load); 1 for perfect balance, 0 when nothing was routed.
double expert_load_imbalance(const int64_t* load, int64_t E);

}  // namespace moe::cpu
