// RMSNorm on the device: the twins of cpu::rmsnorm_forward / rmsnorm_backward_input /
// rmsnorm_backward_weight.
//
// Shapes: inp, out, dout, dinp (N, C); weight, dweight (C); rstd (N).
// Accumulation: out and rstd ASSIGNED; dinp ACCUMULATED (inp is the residual stream);
// dweight ACCUMULATED.
// Precision, as on the CPU: the sum of squares and the row dot product accumulate in double.
// Determinism: forward and backward_input run one block per row with a fixed-order block
// reduction (dense_common.cuh); backward_weight sums fixed row chunks per column into
// scratch, then adds the chunks in chunk order (dense_plan.h), with no atomics.
#include "model/kernels/cuda/cuda_check.h"
#include "model/kernels/cuda/reduce.cuh"
#include "model/kernels/cuda/dense_kernels.h"
#include "model/kernels/cuda/dense_plan.h"

namespace moe::cuda {

namespace {

__global__ void rmsnorm_forward_kernel(float* out, float* rstd, const float* inp,
                                       const float* weight, int64_t C, float eps) {
  __shared__ double red[32];
  const int64_t row = blockIdx.x;
  const float* x = inp + row * C;
  double ss = 0.0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const double v = x[c];
    ss += v * v;
  }
  ss = block_sum(ss, red);
  const float r =
      static_cast<float>(1.0 / sqrt(ss / static_cast<double>(C) + static_cast<double>(eps)));
  if (threadIdx.x == 0) rstd[row] = r;
  float* o = out + row * C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) o[c] = x[c] * r * weight[c];
}

// dx_c += r w_c g_c - x_c r^3 / C * sum_j g_j w_j x_j.
__global__ void rmsnorm_backward_input_kernel(float* dinp, const float* dout, const float* inp,
                                              const float* weight, const float* rstd,
                                              int64_t C) {
  __shared__ double red[32];
  const int64_t row = blockIdx.x;
  const float* x = inp + row * C;
  const float* g = dout + row * C;
  double dot = 0.0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
    dot += static_cast<double>(g[c]) * weight[c] * x[c];
  dot = block_sum(dot, red);
  const float r = rstd[row];
  const float k = static_cast<float>(dot * r * r * r / static_cast<double>(C));
  float* dx = dinp + row * C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) dx[c] += r * weight[c] * g[c] - x[c] * k;
}

// grid (column tiles, row chunks): partial[chunk, c] = sum over the chunk's rows of g x r.
__global__ void rmsnorm_backward_weight_partial_kernel(float* partial, const float* dout,
                                                       const float* inp, const float* rstd,
                                                       int64_t N, int64_t C, int64_t chunk_rows) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * chunk_rows;
  const int64_t r1 = r0 + chunk_rows < N ? r0 + chunk_rows : N;
  float acc = 0.0f;
  for (int64_t n = r0; n < r1; ++n) acc += dout[n * C + c] * inp[n * C + c] * rstd[n];
  partial[static_cast<int64_t>(blockIdx.y) * C + c] = acc;
}

// dweight[c] += sum over chunks, in chunk order.
__global__ void rmsnorm_backward_weight_final_kernel(float* dweight, const float* partial,
                                                     int64_t chunks, int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float s = 0.0f;
  for (int64_t k = 0; k < chunks; ++k) s += partial[k * C + c];
  dweight[c] += s;
}

}  // namespace

void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N,
                     int64_t C, float eps, Stream stream) {
  CHECK(N >= 0 && C > 0, "N=%lld C=%lld", static_cast<long long>(N), static_cast<long long>(C));
  const LaunchDims d = plan_rmsnorm_forward(N, C);
  if (d.grid_x == 0) return;
  MOE_LAUNCH(dims_grid(d), dims_block(d), d.smem_bytes, stream, rmsnorm_forward_kernel)(
      out, rstd, inp, weight, C, eps);
  CUDA_CHECK_LAUNCH();
}

void rmsnorm_backward_input(float* dinp, const float* dout, const float* inp,
                            const float* weight, const float* rstd, int64_t N, int64_t C,
                            Stream stream) {
  CHECK(N >= 0 && C > 0, "N=%lld C=%lld", static_cast<long long>(N), static_cast<long long>(C));
  const LaunchDims d = plan_rmsnorm_backward_input(N, C);
  if (d.grid_x == 0) return;
  MOE_LAUNCH(dims_grid(d), dims_block(d), d.smem_bytes, stream, rmsnorm_backward_input_kernel)(
      dinp, dout, inp, weight, rstd, C);
  CUDA_CHECK_LAUNCH();
}

void rmsnorm_backward_weight(float* dweight, const float* dout, const float* inp,
                             const float* rstd, int64_t N, int64_t C, float* scratch,
                             int64_t scratch_count, Stream stream) {
  CHECK(N >= 0 && C > 0, "N=%lld C=%lld", static_cast<long long>(N), static_cast<long long>(C));
  CHECK(scratch_count >= rmsnorm_backward_weight_scratch_count(N, C),
        "scratch %lld floats < %lld", static_cast<long long>(scratch_count),
        static_cast<long long>(rmsnorm_backward_weight_scratch_count(N, C)));
  const int64_t chunks = rmsnorm_backward_weight_chunks(N);
  if (chunks == 0) return;  // N = 0: nothing to add
  const LaunchDims p = plan_rmsnorm_backward_weight_partial(N, C);
  MOE_LAUNCH(dims_grid(p), dims_block(p), p.smem_bytes, stream,
             rmsnorm_backward_weight_partial_kernel)(
      scratch, dout, inp, rstd, N, C, rmsnorm_backward_weight_chunk_rows(N));
  CUDA_CHECK_LAUNCH();
  const LaunchDims f = plan_rmsnorm_backward_weight_final(C);
  MOE_LAUNCH(dims_grid(f), dims_block(f), f.smem_bytes, stream,
             rmsnorm_backward_weight_final_kernel)(dweight, scratch, chunks, C);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe::cuda
