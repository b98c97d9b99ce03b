// The per-element AdamW arithmetic, one definition for the CPU optimizer (optim/adamw.cpp)
// and the CUDA kernel (model/kernels/cuda/adamw.cu), so a step on either gives the same bits.
//
//   g      = grad * grad_scale
//   m      = b1 * m + (1 - b1) * g
//   v      = b2 * v + (1 - b2) * g * g
//   update = (m * c1) / (sqrt(v * c2) + eps) + wd * param     c1, c2: bias corrections
//   param  = param - lr * update
//
// NOTE: every operation is one correctly rounded FP32 operation, in the order written. On
// the device the adamw_* helpers below are the _rn intrinsics, which nvcc never contracts into
// an FMA (its default --fmad=true would fuse `b1 * m + (1 - b1) * g` and change the last
// bit); on the host they are the plain operators, which GCC and Clang do not contract under
// ISO C++ (-std=c++20, no -ffp-contract=fast). IEEE division and square root, never the
// approximate forms.
#pragma once

#include <cmath>
#include <cstdint>

#include "model/fp8.h"
#include "model/hd.h"

namespace moe {

// The step's constants, made once per update on the host (adamw_coeffs in optim/adamw.h).
struct AdamWCoeffs {
  float lr;
  float b1, b2;      // beta1, beta2
  float c1, c2;      // 1 / (1 - beta1^t), 1 / (1 - beta2^t)
  float eps;
  float wd;          // weight decay, 0 where the tensor is not decayed
  float grad_scale;  // multiplies every gradient first (clipping)
};

MOE_HD inline float adamw_add(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

MOE_HD inline float adamw_sub(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

MOE_HD inline float adamw_mul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

MOE_HD inline float adamw_div(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

MOE_HD inline float adamw_sqrt(float a) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// One element: the moments m, v (FP32) move to this step's, and the parameter with them.
MOE_HD inline void adamw_element(float& param, float grad, float& m, float& v,
                                 const AdamWCoeffs& k) {
  const float g = adamw_mul(grad, k.grad_scale);
  m = adamw_add(adamw_mul(k.b1, m), adamw_mul(adamw_sub(1.0f, k.b1), g));
  v = adamw_add(adamw_mul(k.b2, v), adamw_mul(adamw_mul(adamw_sub(1.0f, k.b2), g), g));
  const float denom = adamw_add(adamw_sqrt(adamw_mul(v, k.c2)), k.eps);
  const float update = adamw_add(adamw_div(adamw_mul(m, k.c1), denom), adamw_mul(k.wd, param));
  param = adamw_sub(param, adamw_mul(k.lr, update));
}

// The same with BF16-stored moments: widened, updated in FP32, the parameter moved by the
// unrounded moments, and only the stores rounded (to nearest even).
MOE_HD inline void adamw_element_bf16(float& param, float grad, uint16_t& m, uint16_t& v,
                                      const AdamWCoeffs& k) {
  float mf = bf16_to_float(m), vf = bf16_to_float(v);
  adamw_element(param, grad, mf, vf, k);
  m = bf16_from_float(mf);
  v = bf16_from_float(vf);
}

}  // namespace moe
