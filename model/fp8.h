// FP8 (E4M3, E5M2) and BF16 conversions shared by the CPU code and the CUDA kernels. Every
// function reproduces CUDA's own conversion bit for bit (<cuda_fp8.h> with __NV_SATFINITE,
// <cuda_bf16.h> __float2bfloat16_rn); tests/test_fp8_formats.cpp checks that exhaustively.
//
//   format  bits     bias  max finite      min normal  min subnormal  inf/NaN codes
//   E4M3    1.4.3    7     448 (0x7E)      2^-6        2^-9           no inf; NaN S.1111.111
//   E5M2    1.5.2    15    57344 (0x7B)    2^-14       2^-16          inf S.11111.00, NaN rest
//   BF16    1.8.7    127   ~3.39e38        2^-126      2^-133         as float
//
// Encoding rounds to nearest, ties to even. The FP8 encoders saturate: a finite value beyond
// the max, and +-inf too, become +-max (CUDA's __NV_SATFINITE). Scaled FP8 tensors are sized
// so the max-abs maps to the max, so anything larger is a rounding spill, and clamping it
// costs less than a poisoned inf or NaN in a GEMM. Signed zero is kept (-1e-30 -> -0).
// NaN becomes the positive NaN 0x7F in both FP8 formats and 0x7FFF in BF16, whatever the
// input's sign and payload; decoding an FP8 NaN gives the float 0x7FFFFFFF. BF16 does not
// saturate: a value that rounds past its max becomes inf, as in CUDA.
//
// NOTE: the FP8 encoders round subnormals by adding a power of two in float arithmetic, so
// they need the default round-to-nearest mode; flush-to-zero is harmless (every float
// subnormal encodes to zero anyway). Everything else is integer bit manipulation, no loops.
#pragma once

#include <cstdint>
#include <cstring>

#include "model/hd.h"

namespace moe {

constexpr float kFp8E4M3Max = 448.0f;
constexpr float kFp8E5M2Max = 57344.0f;

MOE_HD inline uint32_t f32_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

MOE_HD inline float f32_from_bits(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

constexpr uint32_t kF32AbsMask = 0x7FFFFFFFu;
constexpr uint32_t kF32InfBits = 0x7F800000u;

// Shared by both FP8 encoders. M mantissa bits, B bias; max_bits/min_normal_bits are the
// float bits of the max finite value and of the smallest normal; max_code is the max's code.
// Normal range: drop 23 - M float mantissa bits with ties to even on the integer bits, then
// rebias the exponent (a carry out of the mantissa lands in the exponent, as it should).
// Subnormal range: |x| + 2^(24 - B - M) has an ulp of 2^(1 - B - M), exactly the format's
// smallest subnormal, so the FPU's own ties-to-even addition yields the code in the low bits (a
// value that rounds up to the smallest normal comes out as its code, 1 << M).
template <int M, int B, uint32_t max_bits, uint32_t min_normal_bits, uint32_t max_code>
MOE_HD inline uint8_t fp8_from_float(float x) {
  constexpr int kDrop = 23 - M;
  constexpr uint32_t kRebias = static_cast<uint32_t>(127 - B) << M;
  constexpr uint32_t kMagicBits = static_cast<uint32_t>(127 + 24 - B - M) << 23;  // 2^(24-B-M)
  const uint32_t u = f32_bits(x);
  const uint32_t a = u & kF32AbsMask;
  const uint32_t sign = (u >> 24) & 0x80u;
  const uint32_t normal =
      ((a + ((1u << (kDrop - 1)) - 1u) + ((a >> kDrop) & 1u)) >> kDrop) - kRebias;
  const uint32_t subnormal = f32_bits(f32_from_bits(a) + f32_from_bits(kMagicBits)) - kMagicBits;
  const uint32_t mag = a >= max_bits ? max_code : (a >= min_normal_bits ? normal : subnormal);
  return a > kF32InfBits ? uint8_t{0x7F} : static_cast<uint8_t>(sign | mag);
}

MOE_HD inline uint8_t fp8_e4m3_from_float(float x) {
  return fp8_from_float<3, 7, 0x43E00000u, 0x3C800000u, 0x7Eu>(x);
}

MOE_HD inline uint8_t fp8_e5m2_from_float(float x) {
  return fp8_from_float<2, 15, 0x47600000u, 0x38800000u, 0x7Bu>(x);
}

// Normals: the code's exponent and mantissa bits, shifted into place and rebiased.
// Subnormals: mantissa * 2^(1 - B - M), exact in float (no float subnormal is involved).
MOE_HD inline float fp8_e4m3_to_float(uint8_t c) {
  const uint32_t sign = static_cast<uint32_t>(c & 0x80u) << 24;
  const uint32_t mag = c & 0x7Fu;
  const uint32_t normal = (mag << 20) + (120u << 23);
  const uint32_t subnormal = f32_bits(static_cast<float>(mag) * 0x1p-9f);
  const uint32_t bits = sign | (mag >= 0x08u ? normal : subnormal);
  return f32_from_bits(mag == 0x7Fu ? kF32AbsMask : bits);
}

MOE_HD inline float fp8_e5m2_to_float(uint8_t c) {
  const uint32_t sign = static_cast<uint32_t>(c & 0x80u) << 24;
  const uint32_t mag = c & 0x7Fu;
  const uint32_t normal = (mag << 21) + (112u << 23);
  const uint32_t subnormal = f32_bits(static_cast<float>(mag) * 0x1p-16f);
  const uint32_t bits = sign | (mag == 0x7Cu ? kF32InfBits : mag >= 0x04u ? normal : subnormal);
  return f32_from_bits(mag > 0x7Cu ? kF32AbsMask : bits);
}

MOE_HD inline float fp8_e4m3_round(float x) { return fp8_e4m3_to_float(fp8_e4m3_from_float(x)); }
MOE_HD inline float fp8_e5m2_round(float x) { return fp8_e5m2_to_float(fp8_e5m2_from_float(x)); }

// Ties to even on the upper 16 bits; inf stays inf, the max rounds up to inf.
MOE_HD inline uint16_t bf16_from_float(float x) {
  const uint32_t u = f32_bits(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & kF32AbsMask) > kF32InfBits ? 0x7FFFu : rounded);
}

MOE_HD inline float bf16_to_float(uint16_t h) {
  return f32_from_bits(static_cast<uint32_t>(h) << 16);
}

MOE_HD inline float bf16_round(float x) { return bf16_to_float(bf16_from_float(x)); }

}  // namespace moe
