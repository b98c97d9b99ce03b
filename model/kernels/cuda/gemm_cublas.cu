// The GEMM layer on the GPU (gemm_cublas.h): cuBLAS for fp32 / tf32 / bf16 (any transposes),
// cuBLASLt for FP8 with DeepSeek-V3 block scales (sm_90, TN only), grouped expert GEMMs as a
// loop of those on one stream, and the peak FLOP/s measurement.
//
// Row-major to column-major, the one mapping every call goes through (col_major_of): a
// row-major (R, C) matrix with row stride ld is the column-major (C, R) matrix with the same
// ld, so row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands
// (and their transposes and leading dimensions) and swap M with N.
// For FP8 that turns our C (M, N) = A (M, K) B (N, K)^T into cuBLASLt's D (N x M, ld ldc) =
// op(Lt A) op(Lt B) with Lt A = our B seen as a column-major K x N matrix (TRANSA = T) and
// Lt B = our A as a column-major K x M matrix (TRANSB = N); Lt's (m, n, k) = our (N, M, K).
// Both inputs are K-contiguous: the "TN" form Hopper's FP8 kernels need. Lt's A scales are
// then our B's and its B scales our A's; gemm_plan.h states their layouts in our row terms.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <map>

#include "model/fp8.h"
#include "model/kernels/cuda/cuda_check.h"
#include "model/kernels/cuda/gemm_cublas.h"

namespace moe::cuda {

struct GemmContext {
  cublasHandle_t blas = nullptr;
  cublasLtHandle_t lt = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  cudaStream_t stream = nullptr;
  int sm_major = 0, sm_minor = 0;
  // (M, N, K, lda, ldb, ldc, a_mode, b_mode, beta != 0) -> the heuristic's first algorithm.
  std::map<std::array<int64_t, 9>, cublasLtMatmulAlgo_t> fp8_algos;
};

namespace {

constexpr int kThreads = 256;

int64_t max1(int64_t v) { return v > 1 ? v : 1; }
bool aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

// The checks of cpu::gemm: sizes non-negative, row-major leading dimensions >= row length.
void gemm_check(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, int64_t lda,
                int64_t ldb, int64_t ldc) {
  CHECK(M >= 0 && N >= 0 && K >= 0, "gemm M=%lld N=%lld K=%lld", (long long)M, (long long)N,
        (long long)K);
  CHECK(lda >= max1(trans_a ? M : K), "gemm lda=%lld", (long long)lda);
  CHECK(ldb >= max1(trans_b ? K : N), "gemm ldb=%lld", (long long)ldb);
  CHECK(ldc >= max1(N), "gemm ldc=%lld", (long long)ldc);
}

// Column-major view of a row-major GEMM (file header): C^T (m = N, n = M) = opA' opB'.
struct ColMajorGemm {
  cublasOperation_t ta, tb;
  int64_t m, n, k;
  const void* A;
  int64_t lda;
  const void* B;
  int64_t ldb;
};

ColMajorGemm col_major_of(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                          const void* A, int64_t lda, const void* B, int64_t ldb) {
  return ColMajorGemm{trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                      N, M, K, B, ldb, A, lda};
}

// C (M, N) row-major, row stride ldc: C = beta C (0 where beta == 0).
__global__ void scale_c_kernel(float* C, int64_t ldc, int64_t M, int64_t N, float beta) {
  const int64_t total = M * N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    float* p = C + (i / N) * ldc + i % N;
    *p = beta == 0.0f ? 0.0f : beta * *p;
  }
}

unsigned grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

void scale_c(GemmContext& ctx, int64_t M, int64_t N, float beta, float* C, int64_t ldc) {
  MOE_LAUNCH(grid_for(M * N), kThreads, 0, ctx.stream, scale_c_kernel)(C, ldc, M, N, beta);
  CUDA_CHECK_LAUNCH();
}

// fp32 / tf32 / bf16 through cublasGemmEx (64-bit sizes), FP32 output.
void gemm_ex(GemmContext& ctx, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
             float alpha, const void* A, int64_t lda, const void* B, int64_t ldb, float beta,
             float* C, int64_t ldc, cudaDataType_t in_type, cublasComputeType_t compute) {
  gemm_check(trans_a, trans_b, M, N, K, lda, ldb, ldc);
  if (M == 0 || N == 0) return;
  if (K == 0) return scale_c(ctx, M, N, beta, C, ldc);
  const ColMajorGemm g = col_major_of(trans_a, trans_b, M, N, K, A, lda, B, ldb);
  CUBLAS_CHECK(cublasGemmEx_64(ctx.blas, g.ta, g.tb, g.m, g.n, g.k, &alpha, g.A, in_type, g.lda,
                               g.B, in_type, g.ldb, &beta, C, CUDA_R_32F, ldc, compute,
                               CUBLAS_GEMM_DEFAULT));
}

int32_t lt_scale_mode(Fp8Scaling s) {
  return s == Fp8Scaling::kTile1x128 ? CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F
                                     : CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
}

// The cuBLASLt descriptors of one FP8 call, destroyed with the object.
struct LtFp8Call {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  LtFp8Call() = default;
  LtFp8Call(const LtFp8Call&) = delete;
  LtFp8Call& operator=(const LtFp8Call&) = delete;
  ~LtFp8Call() {
    if (c) CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(c));
    if (b) CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(b));
    if (a) CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(a));
    if (op) CUBLAS_CHECK(cublasLtMatmulDescDestroy(op));
  }
};

template <typename V>
void set_desc(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr, const V& v) {
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d, attr, &v, sizeof(v)));
}

// The FP8 alignment of gemm_plan.h, each violation named.
void fp8_check(const GemmContext& ctx, bool trans_a, bool trans_b, int64_t M, int64_t N,
               int64_t K, const uint8_t* A, int64_t lda, const float* a_scales, Fp8Scaling a_mode,
               const uint8_t* B, int64_t ldb, const float* b_scales, Fp8Scaling b_mode,
               const float* C, int64_t ldc) {
  CHECK(!trans_a && trans_b,
        "FP8 GEMM takes only C = A B^T (trans_a = false, trans_b = true; got %d, %d): "
        "cuBLASLt's FP8 kernels on Hopper are TN only, pass a transposed copy instead",
        int(trans_a), int(trans_b));
  CHECK(gemm_fp8_block_scaling_supported(ctx),
        "FP8 block-scaled GEMM needs an sm_90 device (cuBLASLt's VEC128_32F / BLK128x128_32F "
        "scaling); this one is sm_%d%d",
        ctx.sm_major, ctx.sm_minor);
  CHECK(!(a_mode == Fp8Scaling::kBlock128 && b_mode == Fp8Scaling::kBlock128),
        "FP8 GEMM: cuBLASLt does not support 128x128 block scales on both inputs");
  gemm_check(false, true, M, N, K, lda, ldb, ldc);
  CHECK(K % kFp8DimAlign == 0 && lda % kFp8DimAlign == 0 && ldb % kFp8DimAlign == 0,
        "FP8 GEMM: K=%lld lda=%lld ldb=%lld must be multiples of 16", (long long)K,
        (long long)lda, (long long)ldb);
  CHECK(M % kFp8OuterAlign == 0 && N % kFp8OuterAlign == 0 && ldc % kFp8OuterAlign == 0,
        "FP8 GEMM: M=%lld N=%lld ldc=%lld must be multiples of 4", (long long)M, (long long)N,
        (long long)ldc);
  CHECK(aligned(A, kGemmPtrAlign) && aligned(B, kGemmPtrAlign) && aligned(C, kGemmPtrAlign) &&
            aligned(a_scales, kGemmPtrAlign) && aligned(b_scales, kGemmPtrAlign),
        "FP8 GEMM: A, B, C and the scale pointers must be 16-byte aligned");
  CHECK(a_scales && b_scales, "FP8 GEMM without scales");
}

}  // namespace

GemmContext* gemm_context_create(void* workspace, size_t workspace_bytes, Stream stream) {
  CHECK(workspace && workspace_bytes > 0 && aligned(workspace, kGemmWorkspaceAlign),
        "GEMM workspace of %zu bytes at %p (256-byte aligned, non-empty)", workspace_bytes,
        workspace);
  GemmContext* ctx = new GemmContext();
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&ctx->sm_major, cudaDevAttrComputeCapabilityMajor, dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&ctx->sm_minor, cudaDevAttrComputeCapabilityMinor, dev));
  ctx->workspace = workspace;
  ctx->workspace_bytes = workspace_bytes;
  CUBLAS_CHECK(cublasCreate(&ctx->blas));
  CUBLAS_CHECK(cublasLtCreate(&ctx->lt));
  gemm_context_set_stream(*ctx, stream);
  return ctx;
}

void gemm_context_destroy(GemmContext* ctx) {
  if (!ctx) return;
  CUBLAS_CHECK(cublasLtDestroy(ctx->lt));
  CUBLAS_CHECK(cublasDestroy(ctx->blas));
  delete ctx;
}

void gemm_context_set_stream(GemmContext& ctx, Stream stream) {
  ctx.stream = stream;
  CUBLAS_CHECK(cublasSetStream(ctx.blas, stream));
  // NOTE: cublasSetStream resets the handle to cuBLAS's own workspace pool: set ours again.
  CUBLAS_CHECK(cublasSetWorkspace(ctx.blas, ctx.workspace, ctx.workspace_bytes));
}

Stream gemm_context_stream(const GemmContext& ctx) { return ctx.stream; }

bool gemm_fp8_block_scaling_supported(const GemmContext& ctx) { return ctx.sm_major == 9; }

void gemm_f32(GemmContext& ctx, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
              float alpha, const float* A, int64_t lda, const float* B, int64_t ldb, float beta,
              float* C, int64_t ldc, Fp32Math math) {
  gemm_ex(ctx, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, CUDA_R_32F,
          math == Fp32Math::kTf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F);
}

void gemm_bf16(GemmContext& ctx, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
               float alpha, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb,
               float beta, float* C, int64_t ldc) {
  gemm_ex(ctx, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, CUDA_R_16BF,
          CUBLAS_COMPUTE_32F);
}

void gemm_fp8(GemmContext& ctx, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
              float alpha, const uint8_t* A, int64_t lda, const float* a_scales,
              Fp8Scaling a_mode, const uint8_t* B, int64_t ldb, const float* b_scales,
              Fp8Scaling b_mode, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return gemm_check(trans_a, trans_b, M, N, K, lda, ldb, ldc);
  fp8_check(ctx, trans_a, trans_b, M, N, K, A, lda, a_scales, a_mode, B, ldb, b_scales, b_mode,
            C, ldc);
  if (K == 0) return scale_c(ctx, M, N, beta, C, ldc);
  // cuBLASLt's view (file header): Lt A = our B (K x N, TRANSA = T), Lt B = our A (K x M,
  // TRANSB = N), D = C^T (N x M, ld ldc).
  LtFp8Call call;
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&call.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  set_desc(call.op, CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T);
  set_desc(call.op, CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N);
  set_desc(call.op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, lt_scale_mode(b_mode));
  set_desc(call.op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, lt_scale_mode(a_mode));
  set_desc(call.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, static_cast<const void*>(b_scales));
  set_desc(call.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, static_cast<const void*>(a_scales));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&call.a, CUDA_R_8F_E4M3, static_cast<uint64_t>(K),
                                          static_cast<uint64_t>(N), ldb));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&call.b, CUDA_R_8F_E4M3, static_cast<uint64_t>(K),
                                          static_cast<uint64_t>(M), lda));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&call.c, CUDA_R_32F, static_cast<uint64_t>(N),
                                          static_cast<uint64_t>(M), ldc));
  const std::array<int64_t, 9> key{M, N, K, lda, ldb, ldc, static_cast<int64_t>(a_mode),
                                   static_cast<int64_t>(b_mode), beta != 0.0f ? 1 : 0};
  auto it = ctx.fp8_algos.find(key);
  if (it == ctx.fp8_algos.end()) {
    cublasLtMatmulPreference_t pref = nullptr;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t ws = ctx.workspace_bytes;
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    cublasLtMatmulHeuristicResult_t result = {};
    int found = 0;
    const cublasStatus_t rc = cublasLtMatmulAlgoGetHeuristic(
        ctx.lt, call.op, call.a, call.b, call.c, call.c, pref, 1, &result, &found);
    CUBLAS_CHECK(cublasLtMatmulPreferenceDestroy(pref));
    CHECK(rc == CUBLAS_STATUS_SUCCESS && found > 0,
          "cuBLASLt has no FP8 block-scaled algorithm for M=%lld N=%lld K=%lld (A %s, B %s "
          "scales) on sm_%d%d: %s (precision.native_gemm = false trains on the FP32 emulation "
          "of the FP8 GEMMs instead)",
          (long long)M, (long long)N, (long long)K,
          a_mode == Fp8Scaling::kTile1x128 ? "1x128" : "128x128",
          b_mode == Fp8Scaling::kTile1x128 ? "1x128" : "128x128", ctx.sm_major, ctx.sm_minor,
          cublasGetStatusString(rc));
    it = ctx.fp8_algos.emplace(key, result.algo).first;
  }
  CUBLAS_CHECK(cublasLtMatmul(ctx.lt, call.op, &alpha, B, call.a, A, call.b, &beta, C, call.c, C,
                              call.c, &it->second, ctx.workspace, ctx.workspace_bytes,
                              ctx.stream));
}

// ---- Grouped expert GEMMs -------------------------------------------------------------------

namespace {

// One dense (non-FP8) GEMM in precision p over untyped input pointers.
void gemm_dense(GemmContext& ctx, GemmPrecision p, bool trans_a, bool trans_b, int64_t M,
                int64_t N, int64_t K, const void* A, int64_t lda, const void* B, int64_t ldb,
                float beta, float* C, int64_t ldc) {
  switch (p) {
    case GemmPrecision::kFp32:
    case GemmPrecision::kTf32:
      return gemm_f32(ctx, trans_a, trans_b, M, N, K, 1.0f, static_cast<const float*>(A), lda,
                      static_cast<const float*>(B), ldb, beta, C, ldc,
                      p == GemmPrecision::kTf32 ? Fp32Math::kTf32 : Fp32Math::kFp32);
    case GemmPrecision::kBf16:
      return gemm_bf16(ctx, trans_a, trans_b, M, N, K, 1.0f, static_cast<const uint16_t*>(A),
                       lda, static_cast<const uint16_t*>(B), ldb, beta, C, ldc);
    case GemmPrecision::kFp8: break;
  }
  CHECK(false, "gemm_dense: fp8 goes through gemm_fp8");
}

// Element offset `n` into an input of precision p.
const void* input_at(const void* base, GemmPrecision p, int64_t n) {
  return static_cast<const char*>(base) + static_cast<size_t>(n) * gemm_input_bytes(p);
}

const uint8_t* codes_at(GemmInput x, int64_t n) { return static_cast<const uint8_t*>(x.data) + n; }

void experts_check(GemmPrecision p, GemmInput a, GemmInput b, const int64_t* row_offsets,
                   int64_t E) {
  CHECK(E >= 0 && row_offsets && row_offsets[0] == 0, "expert row offsets");
  for (int64_t e = 0; e < E; ++e)
    CHECK(row_offsets[e + 1] >= row_offsets[e], "expert %lld ends before it starts",
          (long long)e);
  if (p == GemmPrecision::kFp8)
    CHECK(a.scales && b.scales, "FP8 expert GEMM inputs without scales");
}

}  // namespace

void gemm_experts_forward(GemmContext& ctx, GemmPrecision p, float* Y, GemmInput X,
                          GemmInput W, const int64_t* row_offsets, int64_t E, int64_t IC,
                          int64_t OC) {
  experts_check(p, X, W, row_offsets, E);
  const int64_t w_count = OC * IC;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = row_offsets[e], n = row_offsets[e + 1] - r0;
    if (n == 0) continue;
    if (p != GemmPrecision::kFp8) {
      gemm_dense(ctx, p, false, true, n, OC, IC, input_at(X.data, p, r0 * IC), IC,
                 input_at(W.data, p, e * w_count), IC, 0.0f, Y + r0 * OC, OC);
      continue;
    }
    const int64_t ws = fp8_gemm_scale_count(OC, IC, Fp8Scaling::kBlock128);
    gemm_fp8(ctx, false, true, n, OC, IC, 1.0f, codes_at(X, r0 * IC), IC,
             X.scales + r0 * fp8_gemm_ktiles(IC), Fp8Scaling::kTile1x128,
             codes_at(W, e * w_count), IC, W.scales + e * ws, Fp8Scaling::kBlock128, 0.0f,
             Y + r0 * OC, OC);
  }
}

void gemm_experts_backward_input(GemmContext& ctx, GemmPrecision p, float* dX, GemmInput dY,
                                 GemmInput W, const int64_t* row_offsets, int64_t E,
                                 int64_t IC, int64_t OC, GemmOutput out) {
  experts_check(p, dY, W, row_offsets, E);
  const float beta = out == GemmOutput::kAccumulate ? 1.0f : 0.0f;
  const int64_t w_count = OC * IC;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = row_offsets[e], n = row_offsets[e + 1] - r0;
    if (n == 0) continue;
    if (p != GemmPrecision::kFp8) {
      gemm_dense(ctx, p, false, false, n, IC, OC, input_at(dY.data, p, r0 * OC), OC,
                 input_at(W.data, p, e * w_count), IC, beta, dX + r0 * IC, IC);
      continue;
    }
    // W arrives transposed: Wt_e (IC, OC), 128x128 scales over (IC, OC).
    const int64_t ws = fp8_gemm_scale_count(IC, OC, Fp8Scaling::kBlock128);
    gemm_fp8(ctx, false, true, n, IC, OC, 1.0f, codes_at(dY, r0 * OC), OC,
             dY.scales + r0 * fp8_gemm_ktiles(OC), Fp8Scaling::kTile1x128,
             codes_at(W, e * w_count), OC, W.scales + e * ws, Fp8Scaling::kBlock128, beta,
             dX + r0 * IC, IC);
  }
}

void gemm_experts_backward_weight(GemmContext& ctx, GemmPrecision p, float* dW, GemmInput dY,
                                  GemmInput X, const int64_t* row_offsets, int64_t E,
                                  int64_t IC, int64_t OC) {
  experts_check(p, dY, X, row_offsets, E);
  const int64_t w_count = OC * IC;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = row_offsets[e], n = row_offsets[e + 1] - r0;
    if (n == 0) continue;  // dW_e += 0
    if (p != GemmPrecision::kFp8) {
      gemm_dense(ctx, p, true, false, OC, IC, n, input_at(dY.data, p, r0 * OC), OC,
                 input_at(X.data, p, r0 * IC), IC, 1.0f, dW + e * w_count, IC);
      continue;
    }
    // dY_e^T (OC, n) and X_e^T (IC, n), compact per expert; 1x128 tiles along n.
    gemm_fp8(ctx, false, true, OC, IC, n, 1.0f, codes_at(dY, r0 * OC), n,
             dY.scales + fp8_expert_t_scale_offset(row_offsets, e, OC), Fp8Scaling::kTile1x128,
             codes_at(X, r0 * IC), n, X.scales + fp8_expert_t_scale_offset(row_offsets, e, IC),
             Fp8Scaling::kTile1x128, 1.0f, dW + e * w_count, IC);
  }
}

// ---- Peak FLOP/s ------------------------------------------------------------------------------

namespace {

// A deterministic value in [-1, 1) for element i (hash of the index and a seed).
__device__ float fill_value(uint64_t i, uint32_t seed) {
  uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ static_cast<uint32_t>(i >> 32) ^ seed;
  h ^= h >> 15;
  h *= 2246822519u;
  h ^= h >> 13;
  return static_cast<float>(h >> 8) * 0x1p-23f - 1.0f;
}

// n elements of precision p (bytes per element `elem`) at `out`: fill_value in its format.
__global__ void fill_input_kernel(void* out, int64_t n, int elem, uint32_t seed) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const float v = fill_value(static_cast<uint64_t>(i), seed);
    if (elem == 4) static_cast<float*>(out)[i] = v;
    if (elem == 2) static_cast<uint16_t*>(out)[i] = bf16_from_float(v);
    if (elem == 1) static_cast<uint8_t*>(out)[i] = fp8_e4m3_from_float(v * 448.0f);
  }
}

__global__ void fill_scales_kernel(float* out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride)
    out[i] = 1.0f / 448.0f;
}

}  // namespace

double measure_peak_flops(GemmContext& ctx, GemmPrecision p, void* scratch,
                          size_t scratch_bytes, Stream stream, int64_t n, int warmup,
                          int iters) {
  const PeakScratchLayout l = gemm_peak_scratch_layout(p, n);
  CHECK(scratch && scratch_bytes >= l.total && aligned(scratch, kGemmWorkspaceAlign),
        "peak GEMM scratch of %zu bytes, %zu needed (256-byte aligned)", scratch_bytes, l.total);
  CHECK(warmup >= 0 && iters >= 1, "peak GEMM warmup %d iters %d", warmup, iters);
  char* base = static_cast<char*>(scratch);
  void* A = base + l.a;
  void* B = base + l.b;
  float* C = reinterpret_cast<float*>(base + l.c);
  float* as = reinterpret_cast<float*>(base + l.a_scales);
  float* bs = reinterpret_cast<float*>(base + l.b_scales);
  const Stream saved = ctx.stream;
  gemm_context_set_stream(ctx, stream);
  const int64_t nn = n * n;
  const int elem = static_cast<int>(gemm_input_bytes(p));
  MOE_LAUNCH(grid_for(nn), kThreads, 0, stream, fill_input_kernel)(A, nn, elem, 1u);
  CUDA_CHECK_LAUNCH();
  MOE_LAUNCH(grid_for(nn), kThreads, 0, stream, fill_input_kernel)(B, nn, elem, 2u);
  CUDA_CHECK_LAUNCH();
  if (p == GemmPrecision::kFp8) {
    const int64_t na = fp8_gemm_scale_count(n, n, Fp8Scaling::kTile1x128);
    const int64_t nb = fp8_gemm_scale_count(n, n, Fp8Scaling::kBlock128);
    MOE_LAUNCH(grid_for(na), kThreads, 0, stream, fill_scales_kernel)(as, na);
    CUDA_CHECK_LAUNCH();
    MOE_LAUNCH(grid_for(nb), kThreads, 0, stream, fill_scales_kernel)(bs, nb);
    CUDA_CHECK_LAUNCH();
  }
  auto run = [&]() {
    switch (p) {
      case GemmPrecision::kFp32:
      case GemmPrecision::kTf32:
        return gemm_f32(ctx, false, true, n, n, n, 1.0f, static_cast<const float*>(A), n,
                        static_cast<const float*>(B), n, 0.0f, C, n,
                        p == GemmPrecision::kTf32 ? Fp32Math::kTf32 : Fp32Math::kFp32);
      case GemmPrecision::kBf16:
        return gemm_bf16(ctx, false, true, n, n, n, 1.0f, static_cast<const uint16_t*>(A), n,
                         static_cast<const uint16_t*>(B), n, 0.0f, C, n);
      case GemmPrecision::kFp8:
        return gemm_fp8(ctx, false, true, n, n, n, 1.0f, static_cast<const uint8_t*>(A), n, as,
                        Fp8Scaling::kTile1x128, static_cast<const uint8_t*>(B), n, bs,
                        Fp8Scaling::kBlock128, 0.0f, C, n);
    }
  };
  for (int i = 0; i < warmup; ++i) run();
  cudaEvent_t start = nullptr, stop = nullptr;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  CUDA_CHECK(cudaEventRecord(start, stream));
  for (int i = 0; i < iters; ++i) run();
  CUDA_CHECK(cudaEventRecord(stop, stream));
  CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0.0f;
  CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  gemm_context_set_stream(ctx, saved);
  CHECK(ms > 0.0f, "peak GEMM timed %f ms", static_cast<double>(ms));
  const double flops = 2.0 * static_cast<double>(n) * static_cast<double>(n) *
                       static_cast<double>(n) * static_cast<double>(iters);
  return flops / (static_cast<double>(ms) * 1e-3);
}

}  // namespace moe::cuda
