// The dense CUDA kernels: device twins of model/kernels/cpu/dense_ops.h (float only), over
// DEVICE pointers, each enqueued on `stream` (nothing synchronizes, nothing allocates:
// scratch comes in as an argument). Plain C++: no CUDA types.
//
// Dimension letters: N = tokens (B*T), B batch, T sequence, C model width, V vocabulary,
// H heads, HD head dim, F FFN width.
//
// Accumulation contract (the CPU twins'):
//   - weight gradients (dwte, dweight) are ACCUMULATED (+=);
//   - activation gradients are ASSIGNED (=), except rmsnorm_backward_input, which
//     ACCUMULATES into dinp (inp is the residual stream).
// Determinism: no float atomics anywhere; every output element is reduced in a fixed order,
// so results are bitwise identical run to run for a given shape. Launch configurations come
// from dense_plan.h.
#pragma once

#include <cstdint>

#include "model/kernels/cuda/cuda_backend.h"

namespace moe::cuda {

// out (N, C) = wte (V, C)[tokens[n]]. A token outside [0, V) is a bug: the kernel traps.
void embedding_forward(float* out, const int32_t* tokens, const float* wte, int64_t N, int64_t C,
                       int64_t V, Stream stream);
// dwte[tokens[n]] += dout[n], tokens taken in increasing n for every element: bitwise the
// CPU twin's result. Tokens outside [0, V) are ignored. N < 2^31.
void embedding_backward(float* dwte, const float* dout, const int32_t* tokens, int64_t N,
                        int64_t C, int64_t V, Stream stream);

// out (N, C) = inp * rstd * weight, rstd (N) = 1 / sqrt(mean(inp^2) + eps), saved.
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N,
                     int64_t C, float eps, Stream stream);
// dinp (N, C) += d(out)/d(inp)^T dout   (ACCUMULATES)
void rmsnorm_backward_input(float* dinp, const float* dout, const float* inp,
                            const float* weight, const float* rstd, int64_t N, int64_t C,
                            Stream stream);
// dweight (C) += sum_n dout * inp * rstd. scratch: scratch_count >=
// rmsnorm_backward_weight_scratch_count(N, C) floats (dense_plan.h), overwritten.
void rmsnorm_backward_weight(float* dweight, const float* dout, const float* inp,
                             const float* rstd, int64_t N, int64_t C, float* scratch,
                             int64_t scratch_count, Stream stream);

// cos / sin (T, HD/2): angle(t, i) = t * theta^(-2i/HD) (model/rope_math.h).
void rope_tables(float* cos_out, float* sin_out, int64_t T_, int64_t HD, double theta,
                 Stream stream);
// In place on x viewed as (B, T, H, HD), `stride` elements between tokens: pair
// (x[2i], x[2i+1]) at position t turned by angle(t, i); backward turns by -angle (dx
// overwritten). MLA calls these per head with H = 1, as the CPU path does.
void rope_forward(float* x, const float* cos_t, const float* sin_t, int64_t B, int64_t T_,
                  int64_t H, int64_t HD, int64_t stride, Stream stream);
void rope_backward(float* dx, const float* cos_t, const float* sin_t, int64_t B, int64_t T_,
                   int64_t H, int64_t HD, int64_t stride, Stream stream);

// gu (N, 2F), rows [gate(F) | up(F)]: out (N, F) = silu(gate) * up.
void swiglu_forward(float* out, const float* gu, int64_t N, int64_t F, Stream stream);
// dgu (N, 2F), assigned.
void swiglu_backward(float* dgu, const float* dout, const float* gu, int64_t N, int64_t F,
                     Stream stream);

// out = a + b over n elements (out may alias a or b).
void residual_forward(float* out, const float* a, const float* b, int64_t n, Stream stream);

// losses (N) = -log softmax(logits)[target], probs (N, V) saved; targets < 0 ignored (loss 0).
// A target >= V is a bug: the kernel traps.
void cross_entropy_forward(float* losses, float* probs, const float* logits,
                           const int32_t* targets, int64_t N, int64_t V, Stream stream);
// dlogits (N, V) = (probs - onehot(target)) * dloss, assigned; rows with target < 0 zero.
void cross_entropy_backward(float* dlogits, const float* probs, const int32_t* targets,
                            float dloss, int64_t N, int64_t V, Stream stream);

}  // namespace moe::cuda
