// Router (scores, top-k, gate weights), the sequence-wise balance loss and the
// auxiliary-loss-free bias update, on CPU. Contracts in moe_ops.h.
//
// Dimension letters: N tokens, B sequences, T tokens per sequence, E experts, K per token,
// G groups, KG kept groups.
//
// Parallel over tokens; every output row is written by one thread and every sum runs in a
// fixed order (double accumulators), so results do not depend on the thread count.
// Scratch is bounded stack arrays of kMoeMaxExperts, checked at each op's entry.
#include <algorithm>
#include <cmath>

#include "model/check.h"
#include "model/kernels/cpu/moe_ops.h"
#include "model/router_math.h"

namespace moe::cpu {

namespace {

void check_router_dims(int64_t N, int64_t E, int64_t K) {
  CHECK(N >= 0 && E >= 1 && K >= 1 && K <= E, "N=%lld E=%lld K=%lld", (long long)N,
        (long long)E, (long long)K);
  CHECK(E <= kMoeMaxExperts, "E=%lld exceeds kMoeMaxExperts=%lld", (long long)E,
        (long long)kMoeMaxExperts);
}

// Per-sequence expert counts, as doubles (exact) so they enter the loss directly.
void count_sequence(double* counts, const int32_t* ids, int64_t T_, int64_t E, int64_t K) {
  std::fill(counts, counts + E, 0.0);
  for (int64_t i = 0; i < T_ * K; ++i) {
    CHECK(ids[i] >= 0 && ids[i] < E, "expert id %d out of [0, %lld)", ids[i], (long long)E);
    counts[ids[i]] += 1.0;
  }
}

// The balance-loss forward splits a sequence into this many token chunks regardless of the
// thread count, so the partial sums (and their order) are always the same.
constexpr int64_t kAuxChunks = 64;

}  // namespace

template <typename T>
void router_forward(T* scores, int32_t* expert_ids, T* weights, const T* logits, const float* bias,
                    int64_t N, int64_t E, int64_t K, ScoreFn score, double route_scale,
                    int64_t G, int64_t KG) {
  check_router_dims(N, E, K);
  CHECK(G >= 1 && E % G == 0 && KG >= 1 && KG <= G, "E=%lld G=%lld KG=%lld", (long long)E,
        (long long)G, (long long)KG);
  CHECK(K <= KG * (E / G), "K=%lld experts cannot come from %lld groups of %lld", (long long)K,
        (long long)KG, (long long)(E / G));
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const T* lg = logits + n * E;
    T* s = scores + n * E;
    int32_t* ids = expert_ids + n * K;
    T* w = weights + n * K;
    if (score == ScoreFn::kSigmoid) {
      for (int64_t e = 0; e < E; ++e) s[e] = router_sigmoid(lg[e]);
    } else {
      T mx = lg[0];
      for (int64_t e = 1; e < E; ++e) mx = std::max(mx, lg[e]);
      double sum = 0.0;
      for (int64_t e = 0; e < E; ++e) {
        s[e] = router_exp(lg[e] - mx);
        sum += static_cast<double>(s[e]);
      }
      const double inv = 1.0 / sum;
      for (int64_t e = 0; e < E; ++e) s[e] = static_cast<T>(static_cast<double>(s[e]) * inv);
    }
    int32_t kept[kMoeMaxExperts];
    router_select(ids, kept, s, bias, E, K, G, KG);
    CHECK(ids[K - 1] >= 0, "token %lld: no expert selected", (long long)n);
    if (score == ScoreFn::kSigmoid) {
      double sum = 0.0;
      for (int64_t k = 0; k < K; ++k) sum += static_cast<double>(s[ids[k]]);
      for (int64_t k = 0; k < K; ++k)
        w[k] = static_cast<T>(static_cast<double>(s[ids[k]]) / sum * route_scale);
    } else {
      for (int64_t k = 0; k < K; ++k)
        w[k] = static_cast<T>(static_cast<double>(s[ids[k]]) * route_scale);
    }
  }
}

template <typename T>
void router_backward(T* dlogits, const T* dweights, const T* dscores_extra, const T* scores,
                     const int32_t* expert_ids, int64_t N, int64_t E, int64_t K, ScoreFn score,
                     double route_scale) {
  check_router_dims(N, E, K);
  // The score gradient is built in the dlogits row, then taken through the score function
  // in place (both maps only need the scores themselves).
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const T* s = scores + n * E;
    const int32_t* ids = expert_ids + n * K;
    const T* dw = dweights + n * K;
    T* d = dlogits + n * E;
    if (dscores_extra != nullptr) {
      std::copy(dscores_extra + n * E, dscores_extra + (n + 1) * E, d);
    } else {
      std::fill(d, d + E, T(0));
    }
    if (score == ScoreFn::kSigmoid) {
      // w_k = r s_k / S with S = sum_j s_j over the selected: ds_i = r (dw_i - <dw, s> / S) / S.
      double sum = 0.0, dot = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        sum += static_cast<double>(s[ids[k]]);
        dot += static_cast<double>(dw[k]) * static_cast<double>(s[ids[k]]);
      }
      for (int64_t k = 0; k < K; ++k)
        d[ids[k]] += static_cast<T>(route_scale * (static_cast<double>(dw[k]) - dot / sum) / sum);
      for (int64_t e = 0; e < E; ++e) d[e] *= router_sigmoid_grad(s[e]);
    } else {
      for (int64_t k = 0; k < K; ++k) d[ids[k]] += static_cast<T>(route_scale * dw[k]);
      double dot = 0.0;
      for (int64_t e = 0; e < E; ++e) dot += static_cast<double>(d[e]) * static_cast<double>(s[e]);
      for (int64_t e = 0; e < E; ++e)
        d[e] = static_cast<T>(static_cast<double>(s[e]) * (static_cast<double>(d[e]) - dot));
    }
  }
}

template <typename T>
T aux_loss_forward(const T* scores, const int32_t* expert_ids, int64_t B, int64_t T_, int64_t E,
                   int64_t K, double alpha) {
  check_router_dims(B * T_, E, K);
  CHECK(B >= 0 && T_ >= 1, "B=%lld T=%lld", (long long)B, (long long)T_);
  // L_b = alpha * sum_e f_e P_e = alpha E / (K T^2) * sum_t <counts, s_t> / sum_e s_te.
  const double coef = alpha * static_cast<double>(E) /
                      (static_cast<double>(K) * static_cast<double>(T_) * static_cast<double>(T_));
  const int64_t chunk = (T_ + kAuxChunks - 1) / kAuxChunks;
  double total = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    double counts[kMoeMaxExperts];
    count_sequence(counts, expert_ids + b * T_ * K, T_, E, K);
    double part[kAuxChunks];
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < kAuxChunks; ++c) {
      double acc = 0.0;
      for (int64_t t = c * chunk; t < std::min(T_, (c + 1) * chunk); ++t) {
        const T* s = scores + (b * T_ + t) * E;
        double sum = 0.0, dot = 0.0;
        for (int64_t e = 0; e < E; ++e) {
          sum += static_cast<double>(s[e]);
          dot += counts[e] * static_cast<double>(s[e]);
        }
        acc += dot / sum;
      }
      part[c] = acc;
    }
    double seq = 0.0;
    for (int64_t c = 0; c < kAuxChunks; ++c) seq += part[c];
    total += coef * seq;
  }
  return static_cast<T>(total);
}

template <typename T>
void aux_loss_backward(T* dscores, const T* scores, const int32_t* expert_ids, int64_t B,
                       int64_t T_, int64_t E, int64_t K, double alpha, T dloss) {
  check_router_dims(B * T_, E, K);
  CHECK(B >= 0 && T_ >= 1, "B=%lld T=%lld", (long long)B, (long long)T_);
  // dL_b/ds_tj = alpha / (T S_t) * (f_j - <f, s_t> / S_t),  S_t = sum_e s_te.
  const double fscale = static_cast<double>(E) / (static_cast<double>(K) * static_cast<double>(T_));
  const double gscale = static_cast<double>(dloss) * alpha / static_cast<double>(T_);
  for (int64_t b = 0; b < B; ++b) {
    double f[kMoeMaxExperts];
    count_sequence(f, expert_ids + b * T_ * K, T_, E, K);
    for (int64_t e = 0; e < E; ++e) f[e] *= fscale;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T_; ++t) {
      const T* s = scores + (b * T_ + t) * E;
      T* d = dscores + (b * T_ + t) * E;
      double sum = 0.0, dot = 0.0;
      for (int64_t e = 0; e < E; ++e) {
        sum += static_cast<double>(s[e]);
        dot += f[e] * static_cast<double>(s[e]);
      }
      const double g = gscale / sum, fs = dot / sum;
      for (int64_t e = 0; e < E; ++e) d[e] = static_cast<T>(g * (f[e] - fs));
    }
  }
}

void router_bias_update(float* bias, const int64_t* load, int64_t E, double speed) {
  CHECK(E >= 1, "E=%lld", (long long)E);
  int64_t total = 0;
  for (int64_t e = 0; e < E; ++e) {
    CHECK(load[e] >= 0, "load[%lld]=%lld", (long long)e, (long long)load[e]);
    total += load[e];
  }
  const float step = static_cast<float>(speed);
  // sign(total / E - load) compared in integers, so "equal to the mean" is exact.
  for (int64_t e = 0; e < E; ++e) {
    const int64_t diff = total - load[e] * E;
    const float sgn = diff > 0 ? 1.0f : (diff < 0 ? -1.0f : 0.0f);
    bias[e] += step * sgn;
  }
}

double expert_load_imbalance(const int64_t* load, int64_t E) {
  CHECK(E >= 1, "E=%lld", (long long)E);
  int64_t total = 0, mx = 0;
  for (int64_t e = 0; e < E; ++e) {
    total += load[e];
    mx = std::max(mx, load[e]);
  }
  if (total == 0) return 0.0;
  return static_cast<double>(mx) * static_cast<double>(E) / static_cast<double>(total);
}

#define MOE_INSTANTIATE_ROUTER(T)                                                              \
  template void router_forward<T>(T*, int32_t*, T*, const T*, const float*, int64_t, int64_t,  \
                                  int64_t, ScoreFn, double, int64_t, int64_t);                 \
  template void router_backward<T>(T*, const T*, const T*, const T*, const int32_t*, int64_t,  \
                                   int64_t, int64_t, ScoreFn, double);                         \
  template T aux_loss_forward<T>(const T*, const int32_t*, int64_t, int64_t, int64_t, int64_t, \
                                 double);                                                      \
  template void aux_loss_backward<T>(T*, const T*, const int32_t*, int64_t, int64_t, int64_t,  \
                                     int64_t, double, T);
MOE_INSTANTIATE_ROUTER(float)
MOE_INSTANTIATE_ROUTER(double)
#undef MOE_INSTANTIATE_ROUTER

}  // namespace moe::cpu
