// GEMM through OpenBLAS (row-major cblas) and the linear layer built on it.
//
// Shapes: linear weight (OC, IC); inp / dinp (N, IC); out / dout (N, OC).
// Accumulation: matmul_backward_input assigns dinp; matmul_backward_weight accumulates dweight.
// NOTE: OpenBLAS is the OpenMP build, so a gemm called from inside our own parallel region
// runs single-threaded (attention relies on that); called outside, it uses all threads.
#include <cblas.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "model/check.h"
#include "model/kernels/cpu/dense_ops.h"

namespace moe::cpu {

namespace {

// cblas takes blasint; refuse sizes that would silently wrap.
bool fits_blasint(int64_t v) { return v >= 0 && v <= static_cast<int64_t>(INT_MAX); }

void gemm_check(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, int64_t lda,
                int64_t ldb, int64_t ldc) {
  CHECK(fits_blasint(M) && fits_blasint(N) && fits_blasint(K), "gemm M=%lld N=%lld K=%lld",
        static_cast<long long>(M), static_cast<long long>(N), static_cast<long long>(K));
  // Row-major leading dimensions are at least the stored row length (and at least 1).
  const int64_t a_cols = trans_a ? M : K;
  const int64_t b_cols = trans_b ? K : N;
  CHECK(fits_blasint(lda) && lda >= (a_cols > 1 ? a_cols : 1), "gemm lda=%lld",
        static_cast<long long>(lda));
  CHECK(fits_blasint(ldb) && ldb >= (b_cols > 1 ? b_cols : 1), "gemm ldb=%lld",
        static_cast<long long>(ldb));
  CHECK(fits_blasint(ldc) && ldc >= (N > 1 ? N : 1), "gemm ldc=%lld", static_cast<long long>(ldc));
}

// K == 0 leaves C = beta * C; handled here so no BLAS has to agree on the empty product.
template <typename T>
void scale_c(int64_t M, int64_t N, T beta, T* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
}

}  // namespace

template <>
void gemm<float>(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                 const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                 int64_t ldc) {
  gemm_check(trans_a, trans_b, M, N, K, lda, ldb, ldc);
  if (M == 0 || N == 0) return;
  if (K == 0) return scale_c(M, N, beta, C, ldc);
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, static_cast<blasint>(M), static_cast<blasint>(N),
              static_cast<blasint>(K), alpha, A, static_cast<blasint>(lda), B,
              static_cast<blasint>(ldb), beta, C, static_cast<blasint>(ldc));
}

template <>
void gemm<double>(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha,
                  const double* A, int64_t lda, const double* B, int64_t ldb, double beta,
                  double* C, int64_t ldc) {
  gemm_check(trans_a, trans_b, M, N, K, lda, ldb, ldc);
  if (M == 0 || N == 0) return;
  if (K == 0) return scale_c(M, N, beta, C, ldc);
  cblas_dgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, static_cast<blasint>(M), static_cast<blasint>(N),
              static_cast<blasint>(K), alpha, A, static_cast<blasint>(lda), B,
              static_cast<blasint>(ldb), beta, C, static_cast<blasint>(ldc));
}

template <typename T>
void gemm_rows_invariant(bool trans_b, int64_t M, int64_t N, int64_t K, const T* A,
                         int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc, T* pad,
                         int64_t pad_count) {
  const int64_t RM = gemm_rows_min(K, N);
  // double runs the gradient checks, one layout each: padding would only slow them.
  if (std::is_same_v<T, double> || M >= RM || M == 0)
    return gemm<T>(false, trans_b, M, N, K, T(1), A, lda, B, ldb, beta, C, ldc);
  CHECK(pad && pad_count >= gemm_rows_invariant_pad_count(K, N), "row pad of %lld, %lld needed",
        static_cast<long long>(pad_count),
        static_cast<long long>(gemm_rows_invariant_pad_count(K, N)));
  T* a = pad;           // (RM, K): A's rows, then zeros
  T* c = pad + RM * K;  // (RM, N)
  for (int64_t i = 0; i < RM; ++i)
    for (int64_t k = 0; k < K; ++k) a[i * K + k] = i < M ? A[i * lda + k] : T(0);
  for (int64_t i = 0; i < RM; ++i)
    for (int64_t j = 0; j < N; ++j) c[i * N + j] = i < M && beta != T(0) ? C[i * ldc + j] : T(0);
  gemm<T>(false, trans_b, RM, N, K, T(1), a, K, B, ldb, beta, c, N);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = c[i * N + j];
}

template <typename T>
void matmul_forward(T* out, const T* inp, const T* weight, int64_t N, int64_t IC, int64_t OC) {
  gemm<T>(false, true, N, OC, IC, T(1), inp, IC, weight, IC, T(0), out, OC);
}

template <typename T>
void matmul_backward_input(T* dinp, const T* dout, const T* weight, int64_t N, int64_t IC,
                           int64_t OC) {
  gemm<T>(false, false, N, IC, OC, T(1), dout, OC, weight, IC, T(0), dinp, IC);
}

template <typename T>
void matmul_backward_weight(T* dweight, const T* dout, const T* inp, int64_t N, int64_t IC,
                            int64_t OC) {
  gemm<T>(true, false, OC, IC, N, T(1), dout, OC, inp, IC, T(1), dweight, IC);
}

#define MOE_INSTANTIATE(T)                                                                   \
  template void gemm_rows_invariant<T>(bool, int64_t, int64_t, int64_t, const T*, int64_t,   \
                                       const T*, int64_t, T, T*, int64_t, T*, int64_t);      \
  template void matmul_forward<T>(T*, const T*, const T*, int64_t, int64_t, int64_t);        \
  template void matmul_backward_input<T>(T*, const T*, const T*, int64_t, int64_t, int64_t); \
  template void matmul_backward_weight<T>(T*, const T*, const T*, int64_t, int64_t, int64_t);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe::cpu
