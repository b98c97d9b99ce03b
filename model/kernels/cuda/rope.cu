// Rotary position embedding on the device: the twins of cpu::rope_tables / rope_forward /
// rope_backward, with the per-element arithmetic from model/rope_math.h (shared with the CPU).
//
// Shapes: cos / sin tables (T, HD/2); x / dx viewed as (B, T, H, HD) with `stride` elements
// between consecutive tokens. In place; the backward overwrites dx (assigned).
// One block per token, its threads over the H * HD/2 pairs; every element written once.
#include "model/kernels/cuda/cuda_check.h"
#include "model/kernels/cuda/reduce.cuh"
#include "model/kernels/cuda/dense_kernels.h"
#include "model/kernels/cuda/dense_plan.h"
#include "model/rope_math.h"

namespace moe::cuda {

namespace {

__global__ void rope_tables_kernel(float* cos_out, float* sin_out, int64_t total, int64_t HD,
                                   double theta) {
  const int64_t half = HD / 2;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx / half, i = idx - t * half;
    const double angle = rope_angle(t, i, HD, theta);
    cos_out[idx] = static_cast<float>(cos(angle));
    sin_out[idx] = static_cast<float>(sin(angle));
  }
}

// sign = +1 turns by +angle (forward), -1 by -angle (backward).
__global__ void rope_apply_kernel(float* x, const float* cos_t, const float* sin_t, int64_t T_,
                                  int64_t H, int64_t HD, int64_t stride, float sign) {
  const int64_t bt = blockIdx.x;
  const int64_t t = bt % T_;
  const int64_t half = HD / 2;
  const float* c = cos_t + t * half;
  const float* s = sin_t + t * half;
  float* row = x + bt * stride;
  for (int64_t j = threadIdx.x; j < H * half; j += blockDim.x) {
    const int64_t h = j / half, i = j - h * half;
    float* v = row + h * HD + 2 * i;
    const RopePair<float> y = rope_rotate(v[0], v[1], c[i], sign * s[i]);
    v[0] = y.x0;
    v[1] = y.x1;
  }
}

void rope_apply(float* x, const float* cos_t, const float* sin_t, int64_t B, int64_t T_,
                int64_t H, int64_t HD, int64_t stride, float sign, Stream stream) {
  CHECK(B >= 0 && T_ >= 0 && H >= 0 && HD > 0 && HD % 2 == 0, "rope HD=%lld must be even",
        static_cast<long long>(HD));
  CHECK(stride >= H * HD, "stride=%lld < H*HD", static_cast<long long>(stride));
  const LaunchDims d = plan_rope(B * T_, H, HD);
  if (d.grid_x == 0) return;
  MOE_LAUNCH(dims_grid(d), dims_block(d), d.smem_bytes, stream, rope_apply_kernel)(
      x, cos_t, sin_t, T_, H, HD, stride, sign);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void rope_tables(float* cos_out, float* sin_out, int64_t T_, int64_t HD, double theta,
                 Stream stream) {
  CHECK(T_ >= 0 && HD > 0 && HD % 2 == 0 && theta > 0.0, "T=%lld HD=%lld theta=%g",
        static_cast<long long>(T_), static_cast<long long>(HD), theta);
  const LaunchDims d = plan_rope_tables(T_, HD);
  if (d.grid_x == 0) return;
  MOE_LAUNCH(dims_grid(d), dims_block(d), d.smem_bytes, stream, rope_tables_kernel)(
      cos_out, sin_out, T_ * (HD / 2), HD, theta);
  CUDA_CHECK_LAUNCH();
}

void rope_forward(float* x, const float* cos_t, const float* sin_t, int64_t B, int64_t T_,
                  int64_t H, int64_t HD, int64_t stride, Stream stream) {
  rope_apply(x, cos_t, sin_t, B, T_, H, HD, stride, 1.0f, stream);
}

void rope_backward(float* dx, const float* cos_t, const float* sin_t, int64_t B, int64_t T_,
                   int64_t H, int64_t HD, int64_t stride, Stream stream) {
  rope_apply(dx, cos_t, sin_t, B, T_, H, HD, stride, -1.0f, stream);
}

}  // namespace moe::cuda
