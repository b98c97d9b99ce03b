// SwiGLU activation and the fused softmax + cross-entropy loss.
//
// Shapes: gu / dgu (N, 2F), each row [gate(F) | up(F)]; out / dout (N, F);
// logits / probs / dlogits (N, V); targets, losses (N).
// Accumulation: every output is ASSIGNED.
// Targets < 0 mark ignored tokens: loss 0 and a zero gradient row.
// Determinism: parallel over rows only; each row is reduced in a fixed order by one thread.
#include <cmath>
#include <cstdint>

#include "model/check.h"
#include "model/act_math.h"
#include "model/kernels/cpu/dense_ops.h"

namespace moe::cpu {

namespace {

constexpr int64_t kParallelMin = 1 << 14;

// Row kernels. The float versions get SIMD clones: the exp pass dominates all three.

// silu(g) = g sigmoid(g); out = silu(g) u.
template <typename T>
[[gnu::always_inline]] inline void swiglu_forward_row_impl(T* out, const T* gate, const T* up,
                                                           int64_t F) {
#pragma omp simd
  for (int64_t f = 0; f < F; ++f) {
    const T sig = sigmoid_from_exp_neg(exp_fast(-gate[f]));
    out[f] = swiglu_value(gate[f], up[f], sig);
  }
}

// d silu(g) / dg = sig (1 + g (1 - sig)).
template <typename T>
[[gnu::always_inline]] inline void swiglu_backward_row_impl(T* dgate, T* dup, const T* dout,
                                                            const T* gate, const T* up, int64_t F) {
#pragma omp simd
  for (int64_t f = 0; f < F; ++f) {
    const T g = gate[f];
    const T sig = sigmoid_from_exp_neg(exp_fast(-g));
    dgate[f] = swiglu_grad_gate(dout[f], g, up[f], sig);
    dup[f] = swiglu_grad_up(dout[f], g, sig);
  }
}

// probs = softmax(x); returns log(sum_v exp(x_v - m)) + m, m the row max. The sum is kept in
// double: V may be 100k+ and the loss is what users read.
template <typename T>
[[gnu::always_inline]] inline double softmax_lse_row_impl(T* p, const T* x, int64_t V) {
  T m = x[0];
#pragma omp simd reduction(max : m)
  for (int64_t v = 0; v < V; ++v) m = x[v] > m ? x[v] : m;
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t v = 0; v < V; ++v) {
    const T e = exp_fast(x[v] - m);
    p[v] = e;
    sum += e;
  }
  const T inv = static_cast<T>(1.0 / sum);
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) p[v] *= inv;
  return std::log(sum) + static_cast<double>(m);
}

// Overloads: float through the SIMD clones, double straight to the template.
MOE_SIMD_CLONES void swiglu_forward_row(float* out, const float* gate, const float* up, int64_t F) {
  swiglu_forward_row_impl(out, gate, up, F);
}
void swiglu_forward_row(double* out, const double* gate, const double* up, int64_t F) {
  swiglu_forward_row_impl(out, gate, up, F);
}
MOE_SIMD_CLONES void swiglu_backward_row(float* dgate, float* dup, const float* dout,
                                         const float* gate, const float* up, int64_t F) {
  swiglu_backward_row_impl(dgate, dup, dout, gate, up, F);
}
void swiglu_backward_row(double* dgate, double* dup, const double* dout, const double* gate,
                         const double* up, int64_t F) {
  swiglu_backward_row_impl(dgate, dup, dout, gate, up, F);
}
MOE_SIMD_CLONES double softmax_lse_row(float* p, const float* x, int64_t V) {
  return softmax_lse_row_impl(p, x, V);
}
double softmax_lse_row(double* p, const double* x, int64_t V) {
  return softmax_lse_row_impl(p, x, V);
}

}  // namespace

template <typename T>
void swiglu_forward(T* out, const T* gu, int64_t N, int64_t F) {
  CHECK(N >= 0 && F >= 0, "N=%lld F=%lld", static_cast<long long>(N), static_cast<long long>(F));
#pragma omp parallel for schedule(static) if (N * F >= kParallelMin)
  for (int64_t n = 0; n < N; ++n) {
    const T* gate = gu + n * 2 * F;
    swiglu_forward_row(out + n * F, gate, gate + F, F);
  }
}

template <typename T>
void swiglu_backward(T* dgu, const T* dout, const T* gu, int64_t N, int64_t F) {
  CHECK(N >= 0 && F >= 0, "N=%lld F=%lld", static_cast<long long>(N), static_cast<long long>(F));
#pragma omp parallel for schedule(static) if (N * F >= kParallelMin)
  for (int64_t n = 0; n < N; ++n) {
    const T* gate = gu + n * 2 * F;
    T* dgate = dgu + n * 2 * F;
    swiglu_backward_row(dgate, dgate + F, dout + n * F, gate, gate + F, F);
  }
}

// loss = log(sum_v exp(x_v)) - x_target, from the max-subtracted log-sum-exp.
template <typename T>
void cross_entropy_forward(T* losses, T* probs, const T* logits, const int32_t* targets, int64_t N,
                           int64_t V) {
  CHECK(N >= 0 && V > 0, "N=%lld V=%lld", static_cast<long long>(N), static_cast<long long>(V));
#pragma omp parallel for schedule(static) if (N * V >= kParallelMin)
  for (int64_t n = 0; n < N; ++n) {
    const int32_t t = targets[n];
    CHECK(t < V, "target %d >= V=%lld at row %lld", t, static_cast<long long>(V),
          static_cast<long long>(n));
    const double lse = softmax_lse_row(probs + n * V, logits + n * V, V);
    losses[n] = t < 0 ? T(0) : static_cast<T>(lse - static_cast<double>(logits[n * V + t]));
  }
}

template <typename T>
void cross_entropy_backward(T* dlogits, const T* probs, const int32_t* targets, T dloss, int64_t N,
                            int64_t V) {
  CHECK(N >= 0 && V > 0, "N=%lld V=%lld", static_cast<long long>(N), static_cast<long long>(V));
#pragma omp parallel for schedule(static) if (N * V >= kParallelMin)
  for (int64_t n = 0; n < N; ++n) {
    const T* p = probs + n * V;
    T* d = dlogits + n * V;
    const int32_t t = targets[n];
    if (t < 0) {
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) d[v] = T(0);
      continue;
    }
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) d[v] = p[v] * dloss;
    d[t] = (p[t] - T(1)) * dloss;
  }
}

#define MOE_INSTANTIATE(T)                                                                    \
  template void swiglu_forward<T>(T*, const T*, int64_t, int64_t);                            \
  template void swiglu_backward<T>(T*, const T*, const T*, int64_t, int64_t);                 \
  template void cross_entropy_forward<T>(T*, T*, const T*, const int32_t*, int64_t, int64_t); \
  template void cross_entropy_backward<T>(T*, const T*, const int32_t*, T, int64_t, int64_t);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe::cpu
