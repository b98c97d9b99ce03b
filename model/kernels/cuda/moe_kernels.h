// CUDA twins (float) of the MoE routing and dispatch kernels of model/kernels/cpu/moe_ops.h.
// Plain C++: every pointer is DEVICE memory, the work is queued on `stream` (nothing here
// synchronizes), and arguments mean what they mean for the CPU function of the same name;
// the token layout after dispatch is the CPU's, row for row.
//
// Dimension letters: N tokens, B sequences, T tokens per sequence (N = B*T), C model width,
// E routed experts (<= cpu::kMoeMaxExperts), K experts per token, G expert groups, KG groups
// kept per token.
//
// Accumulation contract: every output is ASSIGNED (=), nothing accumulates.
//
// Determinism: no float atomics anywhere; every sum runs in an order fixed by the shapes, so
// a launch repeated on the same inputs gives the same bits. Against the CPU: selection from
// equal scores is identical (same ordering rule, router_math.h); scores agree to the device's
// expf (a few ulp), the dispatch plan and permutations exactly, float sums to rounding.
//
// Scratch: callers pass it in, sized by the moe_*_scratch_bytes functions of moe_plan.h;
// nothing allocates.
#pragma once

#include <cstdint>

#include "model/kernels/cuda/cuda_backend.h"
#include "model/kernels/cuda/moe_plan.h"
#include "model/types.h"

namespace moe::cuda {

// scores (N, E), expert_ids (N, K), weights (N, K) from logits (N, E) and the selection bias
// (E); see cpu::router_forward. NOTE: a token with no selectable expert (NaN scores) traps the
// kernel, the device form of the CPU's CHECK; the error surfaces at the next CUDA_CHECK.
void router_forward(float* scores, int32_t* expert_ids, float* weights, const float* logits,
                    const float* bias, int64_t N, int64_t E, int64_t K, ScoreFn score,
                    double route_scale, int64_t G, int64_t KG, Stream stream);

// dlogits (N, E) from dweights (N, K) and, when not null, dscores_extra (N, E).
void router_backward(float* dlogits, const float* dweights, const float* dscores_extra,
                     const float* scores, const int32_t* expert_ids, int64_t N, int64_t E,
                     int64_t K, ScoreFn score, double route_scale, Stream stream);

// loss (1 float on the device) = sum_b L_b, the value cpu::aux_loss_forward returns.
// scratch: moe_aux_loss_scratch_bytes(B, T_, E) bytes, 8-byte aligned.
void aux_loss_forward(float* loss, const float* scores, const int32_t* expert_ids, int64_t B,
                      int64_t T_, int64_t E, int64_t K, double alpha, void* scratch,
                      Stream stream);
// dscores (N, E); dloss is the host-side scale of the loss, as on the CPU. Same scratch.
void aux_loss_backward(float* dscores, const float* scores, const int32_t* expert_ids,
                       int64_t B, int64_t T_, int64_t E, int64_t K, double alpha, float dloss,
                       void* scratch, Stream stream);

// counts (E), offsets (E + 1), row_of (N K), token_of (N K): the CPU's counting sort, row for
// row (each expert's rows by token, then slot). An expert id outside [0, E) traps.
// scratch: moe_dispatch_scratch_bytes(N, E, K) bytes, 4-byte aligned (may be null if 0).
void moe_plan(int64_t* counts, int64_t* offsets, int32_t* row_of, int32_t* token_of,
              const int32_t* expert_ids, int64_t N, int64_t E, int64_t K, void* scratch,
              Stream stream);

// xp (rows, C): row r = x[token_of[r]].
void moe_permute_forward(float* xp, const float* x, const int32_t* token_of, int64_t rows,
                         int64_t C, Stream stream);
// dx (N, C) = sum_k dxp[row_of[n K + k]], in k order.
void moe_permute_backward(float* dx, const float* dxp, const int32_t* row_of, int64_t N,
                          int64_t K, int64_t C, Stream stream);

// out (N, C) = sum_k weights[n, k] yp[row_of[n K + k]], in k order.
void moe_combine_forward(float* out, const float* yp, const float* weights,
                         const int32_t* row_of, int64_t N, int64_t K, int64_t C, Stream stream);
// dyp (N K, C) and dweights (N, K).
void moe_combine_backward(float* dyp, float* dweights, const float* dout, const float* yp,
                          const float* weights, const int32_t* row_of, int64_t N, int64_t K,
                          int64_t C, Stream stream);

}  // namespace moe::cuda
