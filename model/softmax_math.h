// The arithmetic of causal softmax attention that the CPU kernel (model/kernels/cpu/attention.cpp)
// and its CUDA twin (model/kernels/cuda/attention.cu) both compile, so the CPU tests cover the
// GPU's element math too: the score scale, the causal mask rule, the stable softmax pieces
// (running max, exp, normalisation), the saved log-sum-exp and the probability recomputed from
// it, the online rescale, and the softmax backward of one element.
//
// NOTE: only the per-element pieces are shared. The reductions over a row are not: the CPU sums
// in `#pragma omp simd` lanes, the GPU in a warp butterfly, so the two agree to rounding, not
// bit for bit (and both compilers contract a * b + c to an FMA where the target has one).
#pragma once

#include <cmath>
#include <cstdint>

#include "model/act_math.h"
#include "model/hd.h"

namespace moe {

// Scores are scaled by 1 / sqrt(HD) (HD the query / key head width), rounded once from double.
template <typename T>
MOE_HD inline T attention_scale(int64_t hd) {
  return static_cast<T>(1.0 / sqrt(static_cast<double>(hd)));
}

// The causal mask: query row i sees keys [0, causal_keys(i)) = [0, i]; key j > i is masked
// (probability 0, no gradient).
MOE_HD constexpr int64_t causal_keys(int64_t i) { return i + 1; }

// The running max of a softmax row, written as the CPU's SIMD reduction writes it.
template <typename T>
MOE_HD inline T softmax_max(T m, T x) {
  return x > m ? x : m;
}

// exp(x) for the softmax numerators: the project's fast exp (model/act_math.h).
MOE_HD inline float softmax_exp(float x) { return exp_fast_f32(x); }
// Double (the gradient checks): the library exp.
MOE_HD inline double softmax_exp(double x) { return exp(x); }

// The log-sum-exp of a row of scaled scores, the one statistic the fused attention saves per
// query row: lse = m + log(sum_j exp(s_j - m)), m the row's max and `sum` that sum.
MOE_HD inline float softmax_lse(float m, float sum) { return m + logf(sum); }
MOE_HD inline double softmax_lse(double m, double sum) { return m + log(sum); }

// A probability recomputed in the backward from the saved log-sum-exp: exp(s - lse).
template <typename T>
MOE_HD inline T softmax_prob(T s, T lse) {
  return softmax_exp(s - lse);
}

// The online softmax's rescale of what was summed under the running max m_old once the max
// grows to m_new (m_old <= m_new): exp(m_old - m_new).
template <typename T>
MOE_HD inline T softmax_rescale(T m_old, T m_new) {
  return softmax_exp(m_old - m_new);
}

// The softmax backward of one element: dS = P (dP - sum_j dP_j P_j) scale, the scale of the
// forward's scores folded in.
template <typename T>
MOE_HD inline T softmax_backward_value(T p, T dp, T dot, T scale) {
  return p * (dp - dot) * scale;
}

}  // namespace moe
