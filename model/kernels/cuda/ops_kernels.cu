// The Ops backend's small kernels (ops_kernels.h): row add, BF16 encode / decode, the MTP
// shift, the scored-loss sum and the embedding backward without a vocabulary size.
//
// Shapes: add_rows (rows, cols) with row strides; bf16 (n); mtp_shift y / tokens / targets
// (B, T_); scored_loss_sum losses / targets (N); embedding dwte (V, C), dout (N, C), tokens (N).
// Accumulation: add_rows +=, the rest assigned.
#include "model/fp8.h"
#include "model/kernels/cuda/cuda_check.h"
#include "model/kernels/cuda/dense_plan.h"
#include "model/kernels/cuda/ops_kernels.h"
#include "model/kernels/cuda/reduce.cuh"

namespace moe::cuda {

namespace {

// scored_loss_sum's one block: a multiple of 32 (block_sum), wide enough that N = B T of a
// large micro-batch (10^5..10^6 tokens) is a few hundred loads per thread.
constexpr int kLossSumThreads = 512;

// One block per row (plan_rows), threads striding over the columns.
__global__ void add_rows_kernel(float* dst, int64_t ld_dst, const float* src, int64_t ld_src,
                                int64_t cols) {
  const int64_t r = blockIdx.x;
  float* d = dst + r * ld_dst;
  const float* s = src + r * ld_src;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) d[c] += s[c];
}

__global__ void bf16_encode_kernel(uint16_t* bits, float* rounded, const float* x, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint16_t b = bf16_from_float(x[i]);
    bits[i] = b;
    if (rounded) rounded[i] = bf16_to_float(b);
  }
}

__global__ void bf16_decode_kernel(float* x, const uint16_t* bits, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] = bf16_to_float(bits[i]);
}

// One (32, 32) tile per block: read along src's rows, written along dst's rows (both
// coalesced), the padded shared tile keeping the column reads free of bank conflicts.
template <typename E>
__global__ void __launch_bounds__(kTransposeBlock)
    transpose_kernel(E* dst, const E* src, int64_t R, int64_t C) {
  __shared__ E tile[kTransposeTile][kTransposeTile + 1];
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTransposeTile;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTransposeTile;
  const int lane = static_cast<int>(threadIdx.x % kTransposeTile);
  const int pass = static_cast<int>(threadIdx.x / kTransposeTile);
  constexpr int kPasses = kTransposeBlock / kTransposeTile;
  for (int i = pass; i < kTransposeTile; i += kPasses) {
    const int64_t r = r0 + i, c = c0 + lane;
    if (r < R && c < C) tile[i][lane] = src[r * C + c];
  }
  __syncthreads();
  for (int i = pass; i < kTransposeTile; i += kPasses) {
    const int64_t c = c0 + i, r = r0 + lane;  // dst (c, r)
    if (c < C && r < R) dst[c * R + r] = tile[lane][i];
  }
}

template <typename E>
void transpose_as(void* dst, const void* src, int64_t R, int64_t C, Stream stream) {
  const LaunchDims d = plan_transpose(R, C);
  if (d.grid_x == 0) return;
  MOE_LAUNCH(dims_grid(d), dims_block(d), 0, stream, transpose_kernel<E>)(
      static_cast<E*>(dst), static_cast<const E*>(src), R, C);
  CUDA_CHECK_LAUNCH();
}

__global__ void mtp_shift_kernel(int32_t* tokens, int32_t* targets, const int32_t* y,
                                 int64_t BT, int64_t T_, int64_t k) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < BT;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i % T_;
    const int32_t* yb = y + (i - t);  // this sequence's row of y
    tokens[i] = t + k < T_ && yb[t + k] >= 0 ? yb[t + k] : 0;
    targets[i] = t + k + 1 < T_ ? yb[t + k + 1] : -1;
  }
}

// One block of kLossSumThreads: thread j adds elements j, j + blockDim, ... in that order,
// then block_sum adds the threads' partials in an order fixed by the thread numbers.
__global__ void scored_loss_sum_kernel(double* sum, int64_t* count, const float* losses,
                                       const int32_t* targets, int64_t N) {
  __shared__ double red_sum[32];
  __shared__ long long red_count[32];
  double s = 0.0;
  long long c = 0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x)
    if (targets[i] >= 0) {
      s += static_cast<double>(losses[i]);
      ++c;
    }
  s = block_sum(s, red_sum);
  c = block_sum(c, red_count);
  if (threadIdx.x == 0) {
    *sum = s;
    *count = static_cast<int64_t>(c);
  }
}

__global__ void loss_mean_accumulate_kernel(double* acc, const double* sum, const int64_t* count,
                                            double divisor) {
  if (*count > 0) acc[0] += *sum / static_cast<double>(*count) / divisor;
  acc[1] += *sum;
}

__global__ void accumulate_to_double_kernel(double* acc, const float* value) {
  acc[0] += static_cast<double>(*value);
}

}  // namespace

void add_rows(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows,
              int64_t cols, Stream stream) {
  CHECK(rows >= 0 && cols >= 0, "rows=%lld cols=%lld", (long long)rows, (long long)cols);
  if (rows == 0 || cols == 0) return;
  CHECK(rows == 1 || (ld_dst >= cols && ld_src >= cols), "ld_dst=%lld ld_src=%lld < cols=%lld",
        (long long)ld_dst, (long long)ld_src, (long long)cols);
  const LaunchDims d = plan_rows(rows, cols, 4, 256);
  MOE_LAUNCH(dims_grid(d), dims_block(d), d.smem_bytes, stream, add_rows_kernel)(
      dst, ld_dst, src, ld_src, cols);
  CUDA_CHECK_LAUNCH();
}

void bf16_encode(uint16_t* bits, float* rounded, const float* x, int64_t n, Stream stream) {
  CHECK(n >= 0, "n=%lld", (long long)n);
  const LaunchDims d = plan_elementwise(n);
  if (d.grid_x == 0) return;
  MOE_LAUNCH(dims_grid(d), dims_block(d), d.smem_bytes, stream, bf16_encode_kernel)(
      bits, rounded, x, n);
  CUDA_CHECK_LAUNCH();
}

void bf16_decode(float* x, const uint16_t* bits, int64_t n, Stream stream) {
  CHECK(n >= 0, "n=%lld", (long long)n);
  const LaunchDims d = plan_elementwise(n);
  if (d.grid_x == 0) return;
  MOE_LAUNCH(dims_grid(d), dims_block(d), d.smem_bytes, stream, bf16_decode_kernel)(x, bits, n);
  CUDA_CHECK_LAUNCH();
}

void transpose(void* dst, const void* src, int64_t R, int64_t C, size_t elem_bytes,
               Stream stream) {
  CHECK(R >= 0 && C >= 0, "R=%lld C=%lld", (long long)R, (long long)C);
  switch (elem_bytes) {
    case 1: return transpose_as<uint8_t>(dst, src, R, C, stream);
    case 2: return transpose_as<uint16_t>(dst, src, R, C, stream);
    case 4: return transpose_as<uint32_t>(dst, src, R, C, stream);
  }
  CHECK(false, "transpose of %zu-byte elements", elem_bytes);
}

void mtp_shift(int32_t* tokens, int32_t* targets, const int32_t* y, int64_t B, int64_t T_,
               int64_t k, Stream stream) {
  CHECK(B >= 0 && T_ >= 0 && k >= 0, "B=%lld T=%lld k=%lld", (long long)B, (long long)T_,
        (long long)k);
  const LaunchDims d = plan_elementwise(B * T_);
  if (d.grid_x == 0) return;
  MOE_LAUNCH(dims_grid(d), dims_block(d), d.smem_bytes, stream, mtp_shift_kernel)(
      tokens, targets, y, B * T_, T_, k);
  CUDA_CHECK_LAUNCH();
}

void scored_loss_sum(double* sum, int64_t* count, const float* losses, const int32_t* targets,
                     int64_t N, Stream stream) {
  CHECK(N >= 0, "N=%lld", (long long)N);
  // Launched for N = 0 too: the block writes the zero sum and count.
  MOE_LAUNCH(1, kLossSumThreads, 0, stream, scored_loss_sum_kernel)(sum, count, losses, targets, N);
  CUDA_CHECK_LAUNCH();
}

void loss_mean_accumulate(double* acc, const double* sum, const int64_t* count, double divisor,
                          Stream stream) {
  MOE_LAUNCH(1, 1, 0, stream, loss_mean_accumulate_kernel)(acc, sum, count, divisor);
  CUDA_CHECK_LAUNCH();
}

void accumulate_to_double(double* acc, const float* value, Stream stream) {
  MOE_LAUNCH(1, 1, 0, stream, accumulate_to_double_kernel)(acc, value);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe::cuda
