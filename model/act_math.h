// Per-element activation arithmetic shared by the CPU kernels (swiglu_loss.cpp) and the CUDA
// kernels (swiglu.cu, cross_entropy.cu), so the CPU tests cover the GPU math.
//
// exp_fast_f32 is the one fast exp of the project: cpu::exp_fast<float> (the softmax and SiLU
// loops, model/kernels/cpu/dense_ops.h) and softmax_exp (model/softmax_math.h) call it, and the
// CUDA kernels compile it. Cephes expf: round x / ln2 to n, reduce by n ln2 in two parts,
// degree-6 polynomial, scale by 2^n; about 2 ulp; x clamped to [-87, 88] so 2^n stays a normal
// float; NaN propagates. Branch-free, so `#pragma omp simd` loops vectorize it (at -O2 without
// -ffast-math std::exp is a scalar call). On the device nvcc contracts the polynomial into
// FMAs, so GPU results may differ from the CPU's in the last bit.
#pragma once

#include <cstdint>

#include "model/hd.h"

namespace moe {

// The float's bits and back (std::bit_cast is C++20; device code is compiled as C++17).
MOE_HD inline int32_t float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_int(f);
#else
  return __builtin_bit_cast(int32_t, f);
#endif
}

MOE_HD inline float bits_to_float(int32_t i) {
#ifdef __CUDA_ARCH__
  return __int_as_float(i);
#else
  return __builtin_bit_cast(float, i);
#endif
}

// NOTE: the clamp is a select between two non-constant arms, as in cpu::exp_fast (a plain
// `x = x < lo ? lo : x` stops GCC vectorizing the loops that call it).
MOE_HD inline float exp_fast_f32(float x) {
  const float lo = x < -87.0f ? -87.0f : x;
  const float hi = x > 88.0f ? 88.0f : x;
  x = x < 0.0f ? lo : hi;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float r = x * 1.44269504088896341f + kRound;
  const float n = r - kRound;
  const int32_t ni = float_to_bits(r) - float_to_bits(kRound);
  x = x - n * 0.693359375f;
  x = x - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * x + 1.3981999507e-3f;
  p = p * x + 8.3334519073e-3f;
  p = p * x + 4.1665795894e-2f;
  p = p * x + 1.6666665459e-1f;
  p = p * x + 5.0000001201e-1f;
  p = p * x * x + x + 1.0f;
  // The shift on unsigned: the exponent field of 2^n (a signed shift of a NaN's n overflows).
  return p * bits_to_float(static_cast<int32_t>(static_cast<uint32_t>(ni + 127) << 23));
}

// sigmoid(g) from e = exp(-g).
template <typename T>
MOE_HD inline T sigmoid_from_exp_neg(T e) {
  return T(1) / (T(1) + e);
}

// SwiGLU on one element, sig = sigmoid(g): out = silu(g) u = g sig u.
template <typename T>
MOE_HD inline T swiglu_value(T g, T u, T sig) {
  return g * sig * u;
}

// d out / d g = u sig (1 + g (1 - sig)), times dout.
template <typename T>
MOE_HD inline T swiglu_grad_gate(T dout, T g, T u, T sig) {
  return dout * u * sig * (T(1) + g * (T(1) - sig));
}

// d out / d u = g sig, times dout.
template <typename T>
MOE_HD inline T swiglu_grad_up(T dout, T g, T sig) {
  return dout * g * sig;
}

}  // namespace moe
