// AdamW on the device: a grid-stride loop of adamw_element (optim/adamw_math.h), the CPU
// optimizer's own element function, with the step constants from the CPU's adamw_coeffs.
// Every operation is a correctly rounded FP32 _rn intrinsic (never contracted into an FMA),
// so parameters and moments equal moe::adamw_update's bit for bit.
// Accumulation: param, m and v are updated in place; every element by one thread.
#include "model/kernels/cuda/cuda_check.h"
#include "model/kernels/cuda/quant_plan.h"
#include "optim/adamw_cuda.h"
#include "optim/adamw_math.h"

namespace moe::cuda {

namespace {

__global__ void __launch_bounds__(kQuantThreads)
    adamw_kernel(float* param, const float* grad, float* m, float* v, int64_t n, AdamWCoeffs k) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    float p = param[i], mi = m[i], vi = v[i];
    adamw_element(p, grad[i], mi, vi, k);
    param[i] = p;
    m[i] = mi;
    v[i] = vi;
  }
}

__global__ void __launch_bounds__(kQuantThreads)
    adamw_bf16_kernel(float* param, const float* grad, uint16_t* m, uint16_t* v, int64_t n,
                      AdamWCoeffs k) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    float p = param[i];
    uint16_t mi = m[i], vi = v[i];
    adamw_element_bf16(p, grad[i], mi, vi, k);
    param[i] = p;
    m[i] = mi;
    v[i] = vi;
  }
}

void adamw_check(const void* param, const void* grad, const void* m, const void* v, int64_t n) {
  CHECK(n >= 0, "n=%lld", static_cast<long long>(n));
  CHECK(n == 0 || (param && grad && m && v), "null pointer with n=%lld",
        static_cast<long long>(n));
}

}  // namespace

void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n,
                  const AdamWStep& s, bool decay, Stream stream) {
  adamw_check(param, grad, m, v, n);
  const LaunchDims d = adamw_plan(n);
  if (d.grid_x == 0) return;
  MOE_LAUNCH(static_cast<unsigned>(d.grid_x), d.block, 0, stream, adamw_kernel)(
      param, grad, m, v, n, adamw_coeffs(s, decay));
  CUDA_CHECK_LAUNCH();
}

void adamw_update_bf16(float* param, const float* grad, uint16_t* m, uint16_t* v, int64_t n,
                       const AdamWStep& s, bool decay, Stream stream) {
  adamw_check(param, grad, m, v, n);
  const LaunchDims d = adamw_plan(n);
  if (d.grid_x == 0) return;
  MOE_LAUNCH(static_cast<unsigned>(d.grid_x), d.block, 0, stream, adamw_bf16_kernel)(
      param, grad, m, v, n, adamw_coeffs(s, decay));
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe::cuda
