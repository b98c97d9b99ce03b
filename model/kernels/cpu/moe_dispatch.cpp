// Token dispatch for one process: the dispatch plan (counting sort of (token, slot) pairs by
// expert), the permutation into expert-contiguous rows, and the weighted combine back.
// Contracts and the token layout in moe_ops.h.
//
// Dimension letters: N tokens, K slots per token, E experts, C row width; rows = N * K.
//
// Permute and combine run parallel over the rows they write (each output row has exactly one
// writer, so no atomics), and every sum over k runs in k order, so results do not depend on
// the thread count. Nothing allocates.
#include <algorithm>
#include <limits>

#include "model/check.h"
#include "model/kernels/cpu/moe_ops.h"

namespace moe::cpu {

void moe_plan(int64_t* counts, int64_t* offsets, int32_t* row_of, int32_t* token_of,
              const int32_t* expert_ids, int64_t N, int64_t E, int64_t K) {
  CHECK(N >= 0 && E >= 1 && K >= 1, "N=%lld E=%lld K=%lld", (long long)N, (long long)E,
        (long long)K);
  CHECK(N * K <= std::numeric_limits<int32_t>::max(), "N*K=%lld does not fit row ids",
        (long long)(N * K));
  const int64_t pairs = N * K;
  std::fill(counts, counts + E, int64_t{0});
  for (int64_t i = 0; i < pairs; ++i) {
    CHECK(expert_ids[i] >= 0 && expert_ids[i] < E, "expert_ids[%lld]=%d out of [0, %lld)",
          (long long)i, expert_ids[i], (long long)E);
    ++counts[expert_ids[i]];
  }
  offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
  // Serial on purpose: O(N K) integer work, and visiting pairs in (token, slot) order is what
  // orders each expert's rows by token then slot. counts doubles as the fill cursor and ends
  // up restored.
  std::fill(counts, counts + E, int64_t{0});
  for (int64_t i = 0; i < pairs; ++i) {
    const int32_t e = expert_ids[i];
    const int64_t r = offsets[e] + counts[e]++;
    row_of[i] = static_cast<int32_t>(r);
    token_of[r] = static_cast<int32_t>(i / K);
  }
}

template <typename T>
void moe_permute_forward(T* xp, const T* x, const int32_t* token_of, int64_t rows, int64_t C) {
  CHECK(rows >= 0 && C >= 0, "rows=%lld C=%lld", (long long)rows, (long long)C);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = x + static_cast<int64_t>(token_of[r]) * C;
    std::copy(src, src + C, xp + r * C);
  }
}

template <typename T>
void moe_permute_backward(T* dx, const T* dxp, const int32_t* row_of, int64_t N, int64_t K,
                          int64_t C) {
  CHECK(N >= 0 && K >= 1 && C >= 0, "N=%lld K=%lld C=%lld", (long long)N, (long long)K,
        (long long)C);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    T* d = dx + n * C;
    const T* src0 = dxp + static_cast<int64_t>(row_of[n * K]) * C;
    std::copy(src0, src0 + C, d);
    for (int64_t k = 1; k < K; ++k) {
      const T* src = dxp + static_cast<int64_t>(row_of[n * K + k]) * C;
      for (int64_t c = 0; c < C; ++c) d[c] += src[c];
    }
  }
}

template <typename T>
void moe_combine_forward(T* out, const T* yp, const T* weights, const int32_t* row_of, int64_t N,
                         int64_t K, int64_t C) {
  CHECK(N >= 0 && K >= 1 && C >= 0, "N=%lld K=%lld C=%lld", (long long)N, (long long)K,
        (long long)C);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    T* o = out + n * C;
    const T w0 = weights[n * K];
    const T* y0 = yp + static_cast<int64_t>(row_of[n * K]) * C;
    for (int64_t c = 0; c < C; ++c) o[c] = w0 * y0[c];
    for (int64_t k = 1; k < K; ++k) {
      const T w = weights[n * K + k];
      const T* y = yp + static_cast<int64_t>(row_of[n * K + k]) * C;
      for (int64_t c = 0; c < C; ++c) o[c] += w * y[c];
    }
  }
}

template <typename T>
void moe_combine_backward(T* dyp, T* dweights, const T* dout, const T* yp, const T* weights,
                          const int32_t* row_of, int64_t N, int64_t K, int64_t C) {
  CHECK(N >= 0 && K >= 1 && C >= 0, "N=%lld K=%lld C=%lld", (long long)N, (long long)K,
        (long long)C);
  // Each permuted row belongs to exactly one (n, k), so writing dyp from the token side
  // still gives every row a single writer.
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const T* g = dout + n * C;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = row_of[n * K + k];
      const T w = weights[n * K + k];
      const T* y = yp + r * C;
      T* dy = dyp + r * C;
      double dot = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        dy[c] = w * g[c];
        dot += static_cast<double>(g[c]) * static_cast<double>(y[c]);
      }
      dweights[n * K + k] = static_cast<T>(dot);
    }
  }
}

#define MOE_INSTANTIATE_DISPATCH(T)                                                             \
  template void moe_permute_forward<T>(T*, const T*, const int32_t*, int64_t, int64_t);         \
  template void moe_permute_backward<T>(T*, const T*, const int32_t*, int64_t, int64_t,         \
                                        int64_t);                                               \
  template void moe_combine_forward<T>(T*, const T*, const T*, const int32_t*, int64_t, int64_t, \
                                       int64_t);                                                \
  template void moe_combine_backward<T>(T*, T*, const T*, const T*, const T*, const int32_t*,   \
                                        int64_t, int64_t, int64_t);
MOE_INSTANTIATE_DISPATCH(float)
MOE_INSTANTIATE_DISPATCH(double)
#undef MOE_INSTANTIATE_DISPATCH

}  // namespace moe::cpu
