// Router (scores, group-limited top-k, gate weights) and the sequence-wise balance loss on the
// device: the twins of model/kernels/cpu/router.cpp. Contracts in moe_kernels.h, launch
// plans in moe_plan.h.
//
// Dimension letters: N tokens, B sequences, T tokens per sequence, E experts, K per token,
// G groups, KG kept groups.
//
// One warp per token. Sums run lane-strided and then through a butterfly over the warp, an
// order fixed by the shapes, so every launch gives the same bits. Selection reuses
// router_math.h: its ordering (higher biased score, ties to the lower id) is a strict total
// order, so "the best candidate worse than the previous pick", found by a warp argmax,
// is exactly what router_select picks from the same scores, group by group and then
// expert by expert. The balance-loss counts use integer atomics (order-free); its sum is a
// per-token term, then one block adding those in a fixed tree.
#include "model/kernels/cuda/cuda_check.h"
#include "model/kernels/cuda/reduce.cuh"
#include "model/kernels/cuda/moe_kernels.h"
#include "model/kernels/cpu/moe_ops.h"
#include "model/router_math.h"

namespace moe::cuda {

namespace {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ float warp_fmax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Every lane ends with the best (value, id) of the warp under router_better; id -1 is "no
// candidate" and loses to any candidate. Unique for non-NaN values, so all lanes agree.
__device__ void warp_best(float& v, int32_t& id) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(kFullMask, v, o);
    const int32_t oid = __shfl_xor_sync(kFullMask, id, o);
    if (oid >= 0 && (id < 0 || router_better(ov, oid, v, id))) {
      v = ov;
      id = oid;
    }
  }
}

// The token this warp owns; the whole warp shares it, so a warp returns as one.
__device__ int64_t warp_token() {
  return static_cast<int64_t>(blockIdx.x) * (blockDim.x / kMoeWarpSize) +
         threadIdx.x / kMoeWarpSize;
}

__global__ void router_forward_kernel(float* scores, int32_t* expert_ids, float* weights,
                                      const float* logits, const float* bias, int64_t N,
                                      int64_t E, int64_t K, ScoreFn score, double route_scale,
                                      int64_t G, int64_t KG) {
  MOE_DYNAMIC_SMEM(unsigned char, smem_raw);
  const int64_t n = warp_token();
  if (n >= N) return;
  const int lane = threadIdx.x % kMoeWarpSize;
  const int64_t warp = threadIdx.x / kMoeWarpSize;
  // Per warp: s (E), group scores (G), kept-group flags (G).
  float* s = reinterpret_cast<float*>(smem_raw) + warp * moe_router_forward_warp_words(E, G);
  float* gscore = s + E;
  int32_t* kept = reinterpret_cast<int32_t*>(gscore + G);

  const float* lg = logits + n * E;
  if (score == ScoreFn::kSigmoid) {
    for (int64_t e = lane; e < E; e += kMoeWarpSize) s[e] = router_sigmoid(lg[e]);
  } else {
    float mx = -INFINITY;
    for (int64_t e = lane; e < E; e += kMoeWarpSize) mx = fmaxf(mx, lg[e]);
    mx = warp_fmax(mx);
    double sum = 0.0;
    for (int64_t e = lane; e < E; e += kMoeWarpSize) {
      s[e] = router_exp(lg[e] - mx);
      sum += static_cast<double>(s[e]);
    }
    const double inv = 1.0 / warp_sum(sum);
    for (int64_t e = lane; e < E; e += kMoeWarpSize)
      s[e] = static_cast<float>(static_cast<double>(s[e]) * inv);
  }
  for (int64_t e = lane; e < E; e += kMoeWarpSize) scores[n * E + e] = s[e];
  __syncwarp();

  // Kept groups: KG rounds of "the best group worse than the last kept", as router_select.
  const int64_t Eg = E / G;
  if (G > 1) {
    for (int64_t g = lane; g < G; g += kMoeWarpSize) {
      gscore[g] = router_group_score(s + g * Eg, bias + g * Eg, Eg);
      kept[g] = 0;
    }
    __syncwarp();
    float prev_s = 0.0f;
    int32_t prev_g = -1;
    for (int64_t j = 0; j < KG; ++j) {
      float best_s = 0.0f;
      int32_t best = -1;
      for (int64_t g = lane; g < G; g += kMoeWarpSize) {
        const float v = gscore[g];
        if (j > 0 && !router_better(prev_s, prev_g, v, g)) continue;
        if (best < 0 || router_better(v, g, best_s, best)) {
          best = static_cast<int32_t>(g);
          best_s = v;
        }
      }
      warp_best(best_s, best);
      if (lane == 0 && best >= 0) kept[best] = 1;
      prev_s = best_s;
      prev_g = best;
    }
    __syncwarp();
  }

  // Experts: K rounds over the kept groups' experts.
  int32_t* ids = expert_ids + n * K;
  float prev_v = 0.0f;
  int32_t prev_id = -1;
  for (int64_t k = 0; k < K; ++k) {
    float best_v = 0.0f;
    int32_t best = -1;
    for (int64_t e = lane; e < E; e += kMoeWarpSize) {
      if (G > 1 && kept[e / Eg] == 0) continue;
      const float v = router_biased(s[e], bias[e]);
      if (k > 0 && !router_better(prev_v, prev_id, v, e)) continue;
      if (best < 0 || router_better(v, e, best_v, best)) {
        best = static_cast<int32_t>(e);
        best_v = v;
      }
    }
    warp_best(best_v, best);
    // NOTE: only NaN scores leave a round without a candidate; the CPU CHECK-fails there.
    if (best < 0) __trap();
    if (lane == 0) ids[k] = best;
    prev_v = best_v;
    prev_id = best;
  }
  __syncwarp();

  // Gate weights: the CPU's double arithmetic, its sum in k order.
  float* w = weights + n * K;
  if (score == ScoreFn::kSigmoid) {
    double sum = 0.0;
    for (int64_t k = 0; k < K; ++k) sum += static_cast<double>(s[ids[k]]);
    for (int64_t k = lane; k < K; k += kMoeWarpSize)
      w[k] = static_cast<float>(static_cast<double>(s[ids[k]]) / sum * route_scale);
  } else {
    for (int64_t k = lane; k < K; k += kMoeWarpSize)
      w[k] = static_cast<float>(static_cast<double>(s[ids[k]]) * route_scale);
  }
}

__global__ void router_backward_kernel(float* dlogits, const float* dweights,
                                       const float* dscores_extra, const float* scores,
                                       const int32_t* expert_ids, int64_t N, int64_t E,
                                       int64_t K, ScoreFn score, double route_scale) {
  MOE_DYNAMIC_SMEM(unsigned char, smem_raw);
  const int64_t n = warp_token();
  if (n >= N) return;
  const int lane = threadIdx.x % kMoeWarpSize;
  float* d = reinterpret_cast<float*>(smem_raw) + (threadIdx.x / kMoeWarpSize) * E;  // (E)
  const float* s = scores + n * E;
  const int32_t* ids = expert_ids + n * K;
  const float* dw = dweights + n * K;
  for (int64_t e = lane; e < E; e += kMoeWarpSize)
    d[e] = dscores_extra != nullptr ? dscores_extra[n * E + e] : 0.0f;
  __syncwarp();
  // The selected ids are distinct, so each d[ids[k]] has one writer.
  if (score == ScoreFn::kSigmoid) {
    // w_k = r s_k / S with S = sum_j s_j over the selected: ds_i = r (dw_i - <dw, s> / S) / S.
    double sum = 0.0, dot = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      const double sk = static_cast<double>(s[ids[k]]);
      sum += sk;
      dot += static_cast<double>(dw[k]) * sk;
    }
    for (int64_t k = lane; k < K; k += kMoeWarpSize)
      d[ids[k]] += static_cast<float>(route_scale * (static_cast<double>(dw[k]) - dot / sum) / sum);
    __syncwarp();
    for (int64_t e = lane; e < E; e += kMoeWarpSize)
      dlogits[n * E + e] = d[e] * router_sigmoid_grad(s[e]);
  } else {
    for (int64_t k = lane; k < K; k += kMoeWarpSize)
      d[ids[k]] += static_cast<float>(route_scale * dw[k]);
    __syncwarp();
    double dot = 0.0;
    for (int64_t e = lane; e < E; e += kMoeWarpSize)
      dot += static_cast<double>(d[e]) * static_cast<double>(s[e]);
    dot = warp_sum(dot);
    for (int64_t e = lane; e < E; e += kMoeWarpSize)
      dlogits[n * E + e] =
          static_cast<float>(static_cast<double>(s[e]) * (static_cast<double>(d[e]) - dot));
  }
}

// counts (B, E), zeroed by the launcher: one thread per (token, slot) pair.
__global__ void aux_count_kernel(int32_t* counts, const int32_t* expert_ids, int64_t pairs,
                                 int64_t T_, int64_t E, int64_t K) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= pairs) return;
  const int32_t e = expert_ids[i];
  if (e < 0 || e >= E) __trap();  // the CPU CHECK-fails on such an id
  atomicAdd(&counts[(i / (T_ * K)) * E + e], 1);
}

// Token n's score sum S = sum_e s_e and dot D = sum_e (c_e f) s_e (c its sequence's counts),
// lanes striding over e, then the warp butterfly: every lane ends with both. f = 1 is exact,
// so the forward's plain <c, s> is the same computation.
__device__ void token_sum_dot(double& sum, double& dot, const float* s, const int32_t* c,
                              int64_t E, double f, int lane) {
  sum = 0.0;
  dot = 0.0;
  for (int64_t e = lane; e < E; e += kMoeWarpSize) {
    const double sv = static_cast<double>(s[e]);
    sum += sv;
    dot += static_cast<double>(c[e]) * f * sv;
  }
  sum = warp_sum(sum);
  dot = warp_sum(dot);
}

// tok (N): <counts_b, s_t> / sum_e s_te for token t of sequence b.
__global__ void aux_token_kernel(double* tok, const float* scores, const int32_t* counts,
                                 int64_t N, int64_t T_, int64_t E) {
  const int64_t n = warp_token();
  if (n >= N) return;
  const int lane = threadIdx.x % kMoeWarpSize;
  const float* s = scores + n * E;
  const int32_t* c = counts + (n / T_) * E;
  double sum, dot;
  token_sum_dot(sum, dot, s, c, E, 1.0, lane);
  if (lane == 0) tok[n] = dot / sum;
}

// loss = sum_b coef * sum_t tok[b T + t]; one block (a power of two), fixed tree per sequence.
__global__ void aux_reduce_kernel(float* loss, const double* tok, int64_t B, int64_t T_,
                                  double coef) {
  MOE_DYNAMIC_SMEM(unsigned char, smem_raw);
  double* part = reinterpret_cast<double*>(smem_raw);  // (blockDim.x)
  double total = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    double acc = 0.0;
    for (int64_t t = threadIdx.x; t < T_; t += blockDim.x) acc += tok[b * T_ + t];
    part[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned h = blockDim.x / 2; h > 0; h >>= 1) {
      if (threadIdx.x < h) part[threadIdx.x] += part[threadIdx.x + h];
      __syncthreads();
    }
    if (threadIdx.x == 0) total += coef * part[0];
    __syncthreads();  // part is rewritten by the next sequence
  }
  if (threadIdx.x == 0) *loss = static_cast<float>(total);
}

// dscores (N, E): g (f_e - <f, s_t> / S_t) with f = counts fscale, g = gscale / S_t.
__global__ void aux_backward_kernel(float* dscores, const float* scores, const int32_t* counts,
                                    int64_t N, int64_t T_, int64_t E, double fscale,
                                    double gscale) {
  const int64_t n = warp_token();
  if (n >= N) return;
  const int lane = threadIdx.x % kMoeWarpSize;
  const float* s = scores + n * E;
  const int32_t* c = counts + (n / T_) * E;
  double sum, dot;
  token_sum_dot(sum, dot, s, c, E, fscale, lane);
  const double g = gscale / sum, fs = dot / sum;
  for (int64_t e = lane; e < E; e += kMoeWarpSize)
    dscores[n * E + e] = static_cast<float>(g * (static_cast<double>(c[e]) * fscale - fs));
}

void check_router_dims(int64_t N, int64_t E, int64_t K) {
  CHECK(N >= 0 && E >= 1 && K >= 1 && K <= E, "N=%lld E=%lld K=%lld", (long long)N,
        (long long)E, (long long)K);
  CHECK(E <= cpu::kMoeMaxExperts, "E=%lld exceeds kMoeMaxExperts=%lld", (long long)E,
        (long long)cpu::kMoeMaxExperts);
  CHECK(N <= INT32_MAX, "N=%lld", (long long)N);
}

void check_aux_dims(int64_t B, int64_t T_, int64_t E, int64_t K, const void* scratch) {
  CHECK(B >= 0 && T_ >= 1, "B=%lld T=%lld", (long long)B, (long long)T_);
  check_router_dims(B * T_, E, K);
  CHECK(scratch != nullptr && reinterpret_cast<uintptr_t>(scratch) % alignof(double) == 0,
        "aux-loss scratch %p must be 8-byte aligned", scratch);
}

dim3 grid_of(const LaunchDims& d) {
  CHECK(moe_dims_fit(d), "grid (%lld, %lld, %lld) block %d smem %lld", (long long)d.grid_x,
        (long long)d.grid_y, (long long)d.grid_z, d.block, (long long)d.smem_bytes);
  return dim3(static_cast<unsigned>(d.grid_x), static_cast<unsigned>(d.grid_y),
              static_cast<unsigned>(d.grid_z));
}

// Per-sequence counts into the scratch's int32 (B, E) part.
int32_t* aux_counts(const int32_t* expert_ids, int64_t B, int64_t T_, int64_t E, int64_t K,
                    void* scratch, Stream stream) {
  int32_t* counts = reinterpret_cast<int32_t*>(static_cast<unsigned char*>(scratch) +
                                               moe_aux_counts_offset(B, T_));
  CUDA_CHECK(cudaMemsetAsync(counts, 0, sizeof(int32_t) * static_cast<size_t>(B * E), stream));
  const LaunchDims d = moe_aux_count_dims(B * T_, K);
  MOE_LAUNCH(grid_of(d), d.block, 0, stream, aux_count_kernel)(
      counts, expert_ids, B * T_ * K, T_, E, K);
  CUDA_CHECK_LAUNCH();
  return counts;
}

}  // namespace

void router_forward(float* scores, int32_t* expert_ids, float* weights, const float* logits,
                    const float* bias, int64_t N, int64_t E, int64_t K, ScoreFn score,
                    double route_scale, int64_t G, int64_t KG, Stream stream) {
  check_router_dims(N, E, K);
  CHECK(G >= 1 && E % G == 0 && KG >= 1 && KG <= G, "E=%lld G=%lld KG=%lld", (long long)E,
        (long long)G, (long long)KG);
  CHECK(K <= KG * (E / G), "K=%lld experts cannot come from %lld groups of %lld", (long long)K,
        (long long)KG, (long long)(E / G));
  const LaunchDims d = moe_router_forward_dims(N, E, G);
  MOE_LAUNCH(grid_of(d), d.block, d.smem_bytes, stream, router_forward_kernel)(
      scores, expert_ids, weights, logits, bias, N, E, K, score, route_scale, G, KG);
  CUDA_CHECK_LAUNCH();
}

void router_backward(float* dlogits, const float* dweights, const float* dscores_extra,
                     const float* scores, const int32_t* expert_ids, int64_t N, int64_t E,
                     int64_t K, ScoreFn score, double route_scale, Stream stream) {
  check_router_dims(N, E, K);
  const LaunchDims d = moe_router_backward_dims(N, E);
  MOE_LAUNCH(grid_of(d), d.block, d.smem_bytes, stream, router_backward_kernel)(
      dlogits, dweights, dscores_extra, scores, expert_ids, N, E, K, score, route_scale);
  CUDA_CHECK_LAUNCH();
}

void aux_loss_forward(float* loss, const float* scores, const int32_t* expert_ids, int64_t B,
                      int64_t T_, int64_t E, int64_t K, double alpha, void* scratch,
                      Stream stream) {
  check_aux_dims(B, T_, E, K, scratch);
  // L_b = alpha * sum_e f_e P_e = alpha E / (K T^2) * sum_t <counts, s_t> / sum_e s_te.
  const double coef = alpha * static_cast<double>(E) /
                      (static_cast<double>(K) * static_cast<double>(T_) * static_cast<double>(T_));
  const int32_t* counts = aux_counts(expert_ids, B, T_, E, K, scratch, stream);
  double* tok = static_cast<double*>(scratch);  // (N)
  const LaunchDims dt = moe_aux_token_dims(B * T_);
  MOE_LAUNCH(grid_of(dt), dt.block, 0, stream, aux_token_kernel)(
      tok, scores, counts, B * T_, T_, E);
  CUDA_CHECK_LAUNCH();
  const LaunchDims dr = moe_aux_reduce_dims();
  MOE_LAUNCH(grid_of(dr), dr.block, dr.smem_bytes, stream, aux_reduce_kernel)(
      loss, tok, B, T_, coef);
  CUDA_CHECK_LAUNCH();
}

void aux_loss_backward(float* dscores, const float* scores, const int32_t* expert_ids,
                       int64_t B, int64_t T_, int64_t E, int64_t K, double alpha, float dloss,
                       void* scratch, Stream stream) {
  check_aux_dims(B, T_, E, K, scratch);
  // dL_b/ds_tj = alpha / (T S_t) * (f_j - <f, s_t> / S_t),  S_t = sum_e s_te.
  const double fscale = static_cast<double>(E) / (static_cast<double>(K) * static_cast<double>(T_));
  const double gscale = static_cast<double>(dloss) * alpha / static_cast<double>(T_);
  const int32_t* counts = aux_counts(expert_ids, B, T_, E, K, scratch, stream);
  const LaunchDims d = moe_aux_token_dims(B * T_);
  MOE_LAUNCH(grid_of(d), d.block, 0, stream, aux_backward_kernel)(
      dscores, scores, counts, B * T_, T_, E, fscale, gscale);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe::cuda
