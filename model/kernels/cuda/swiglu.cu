// SwiGLU and the residual add on the device: the twins of cpu::swiglu_forward /
// swiglu_backward / residual_forward, with the per-element arithmetic (sigmoid through
// exp_fast_f32, the SwiGLU value and gradients) from model/act_math.h, shared with the CPU.
//
// Shapes: gu / dgu (N, 2F), each row [gate(F) | up(F)]; out / dout (N, F).
// Accumulation: every output is ASSIGNED. Elementwise: every element written by one thread.
// SwiGLU runs one block per row (N may exceed 65535 for expert rows, so rows go on grid x).
#include "model/act_math.h"
#include "model/kernels/cuda/cuda_check.h"
#include "model/kernels/cuda/reduce.cuh"
#include "model/kernels/cuda/dense_kernels.h"
#include "model/kernels/cuda/dense_plan.h"

namespace moe::cuda {

namespace {

__global__ void swiglu_forward_kernel(float* out, const float* gu, int64_t F) {
  const int64_t n = blockIdx.x;
  const float* gate = gu + n * 2 * F;
  const float* up = gate + F;
  float* o = out + n * F;
  for (int64_t f = threadIdx.x; f < F; f += blockDim.x) {
    const float g = gate[f];
    const float sig = sigmoid_from_exp_neg(exp_fast_f32(-g));
    o[f] = swiglu_value(g, up[f], sig);
  }
}

__global__ void swiglu_backward_kernel(float* dgu, const float* dout, const float* gu,
                                       int64_t F) {
  const int64_t n = blockIdx.x;
  const float* gate = gu + n * 2 * F;
  const float* up = gate + F;
  const float* g_out = dout + n * F;
  float* dgate = dgu + n * 2 * F;
  float* dup = dgate + F;
  for (int64_t f = threadIdx.x; f < F; f += blockDim.x) {
    const float g = gate[f], u = up[f], d = g_out[f];
    const float sig = sigmoid_from_exp_neg(exp_fast_f32(-g));
    dgate[f] = swiglu_grad_gate(d, g, u, sig);
    dup[f] = swiglu_grad_up(d, g, sig);
  }
}

__global__ void residual_forward_kernel(float* out, const float* a, const float* b, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = a[i] + b[i];
}

}  // namespace

void swiglu_forward(float* out, const float* gu, int64_t N, int64_t F, Stream stream) {
  CHECK(N >= 0 && F >= 0, "N=%lld F=%lld", static_cast<long long>(N), static_cast<long long>(F));
  const LaunchDims d = plan_swiglu(N, F);
  if (d.grid_x == 0) return;
  MOE_LAUNCH(dims_grid(d), dims_block(d), d.smem_bytes, stream, swiglu_forward_kernel)(out, gu, F);
  CUDA_CHECK_LAUNCH();
}

void swiglu_backward(float* dgu, const float* dout, const float* gu, int64_t N, int64_t F,
                     Stream stream) {
  CHECK(N >= 0 && F >= 0, "N=%lld F=%lld", static_cast<long long>(N), static_cast<long long>(F));
  const LaunchDims d = plan_swiglu(N, F);
  if (d.grid_x == 0) return;
  MOE_LAUNCH(dims_grid(d), dims_block(d), d.smem_bytes, stream, swiglu_backward_kernel)(
      dgu, dout, gu, F);
  CUDA_CHECK_LAUNCH();
}

void residual_forward(float* out, const float* a, const float* b, int64_t n, Stream stream) {
  CHECK(n >= 0, "n=%lld", static_cast<long long>(n));
  const LaunchDims d = plan_residual(n);
  if (d.grid_x == 0) return;
  MOE_LAUNCH(dims_grid(d), dims_block(d), d.smem_bytes, stream, residual_forward_kernel)(
      out, a, b, n);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe::cuda
