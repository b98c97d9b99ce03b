// Router arithmetic shared by the CPU and CUDA backends (DeepSeek-V3 section 2.1.2).
//
// Dimension letters: E routed experts, K experts per token, G expert groups (E / G experts
// each, consecutive ids), KG groups kept per token.
//
// One ordering rule decides every selection, for experts and for groups: the higher biased
// score wins, and equal scores go to the lower id. It is a strict total order (for non-NaN
// scores, which rank as -inf), which is what lets router_select pick the k-th best as "the
// best of those worse than the (k-1)-th" without any per-token scratch over E.
#pragma once

#include <math.h>

#include <cstdint>

#include "model/hd.h"

namespace moe {

MOE_HD inline float router_exp(float x) { return expf(x); }
MOE_HD inline double router_exp(double x) { return exp(x); }

// Split by sign so exp never overflows.
template <typename T>
MOE_HD inline T router_sigmoid(T x) {
  if (x >= T(0)) return T(1) / (T(1) + router_exp(-x));
  const T e = router_exp(x);
  return e / (T(1) + e);
}

// d sigmoid / dx written in terms of the output s = sigmoid(x).
template <typename T>
MOE_HD inline T router_sigmoid_grad(T s) {
  return s * (T(1) - s);
}

// Bias only selects; it is float in every precision (it is trained by sign steps, not SGD).
template <typename T>
MOE_HD inline T router_biased(T score, float bias) {
  return score + static_cast<T>(bias);
}

// A NaN score ranks as -inf (below every number, ties to the lower id), so the order stays
// total and every token still gets K experts when its activations have gone non-finite: the
// step then finishes with a non-finite loss for the trainer's guard to drop, instead of
// stopping inside the router.
template <typename T>
MOE_HD inline T router_order_value(T v) {
  return v != v ? static_cast<T>(-INFINITY) : v;
}

// True when (va, ia) ranks strictly before (vb, ib).
template <typename T>
MOE_HD inline bool router_better(T va, int64_t ia, T vb, int64_t ib) {
  va = router_order_value(va);
  vb = router_order_value(vb);
  return va > vb || (va == vb && ia < ib);
}

// Score of a group of n >= 1 experts: the sum of its two largest biased scores (the largest
// alone when n == 1).
template <typename T>
MOE_HD inline T router_group_score(const T* scores, const float* bias, int64_t n) {
  T m1 = router_biased(scores[0], bias[0]);
  if (n == 1) return m1;
  T m2 = router_biased(scores[1], bias[1]);
  if (m2 > m1) {
    const T t = m1;
    m1 = m2;
    m2 = t;
  }
  for (int64_t i = 2; i < n; ++i) {
    const T v = router_biased(scores[i], bias[i]);
    if (v > m1) {
      m2 = m1;
      m1 = v;
    } else if (v > m2) {
      m2 = v;
    }
  }
  return m1 + m2;
}

// Top-K selection for one token. scores (E) unbiased, bias (E). Writes ids (K) in descending
// biased score, ties to the lower id. With G > 1, only experts of the KG best groups are
// candidates; kept_groups (KG) is caller scratch and receives those groups, best first.
// Preconditions (checked by the caller once per op): E % G == 0, 1 <= KG <= G,
// 1 <= K <= KG * (E / G). Every id is a valid expert, NaN scores included.
// Cost O(KG * E + K * KG * E / G) per token, no scratch over E.
template <typename T>
MOE_HD inline void router_select(int32_t* ids, int32_t* kept_groups, const T* scores,
                                 const float* bias, int64_t E, int64_t K, int64_t G, int64_t KG) {
  const int64_t Eg = E / G;
  if (G <= 1) {
    kept_groups[0] = 0;
    KG = 1;
  } else {
    T prev_s = T(0);
    for (int64_t j = 0; j < KG; ++j) {
      int64_t best = -1;
      T best_s = T(0);
      for (int64_t g = 0; g < G; ++g) {
        const T s = router_group_score(scores + g * Eg, bias + g * Eg, Eg);
        if (j > 0 && !router_better(prev_s, kept_groups[j - 1], s, g)) continue;
        if (best < 0 || router_better(s, g, best_s, best)) {
          best = g;
          best_s = s;
        }
      }
      kept_groups[j] = static_cast<int32_t>(best);
      prev_s = best_s;
    }
  }
  T prev_v = T(0);
  for (int64_t k = 0; k < K; ++k) {
    int64_t best = -1;
    T best_v = T(0);
    for (int64_t j = 0; j < KG; ++j) {
      if (kept_groups[j] < 0) continue;
      const int64_t e0 = static_cast<int64_t>(kept_groups[j]) * Eg;
      for (int64_t e = e0; e < e0 + Eg; ++e) {
        const T v = router_biased(scores[e], bias[e]);
        if (k > 0 && !router_better(prev_v, ids[k - 1], v, e)) continue;
        if (best < 0 || router_better(v, e, best_v, best)) {
          best = e;
          best_v = v;
        }
      }
    }
    ids[k] = static_cast<int32_t>(best);
    prev_v = best_v;
  }
}

}  // namespace moe
