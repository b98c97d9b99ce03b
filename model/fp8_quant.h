// Fine-grained FP8 quantization, the DeepSeek-V3 recipe (technical report, section 3.3): every
// FP8 GEMM operand is E4M3 with one FP32 scale per tile. Activation-like operands use 1x128
// tiles along the GEMM's reduction dimension (kTileAct; kTileActT = 128x1 when the reduction
// runs down the rows, as in the weight-gradient GEMM X^T dY), weights 128x128 blocks.
//
// Matrices are (R, C) row-major with a leading dimension (row stride, elements) >= C; the
// plain functions are the _ld ones with ld = C. Tiles are (t.rows, t.cols), any size >= 1,
// laid from the top-left corner; a partial tile at the bottom or right edge is a tile of its
// own, its scale taken over the elements present. Scales: (ceil(R / t.rows), ceil(C / t.cols))
// row-major, compact (no leading dimension).
//
// The definition, one for the CPU, the CUDA kernels and the tests' references:
//   amax    = max |x| over the tile (NaN elements are ignored: a NaN stays NaN, see below)
//   scale   = fp8_tile_scale(amax) = clamp(amax, kFp8AmaxFloor, FLT_MAX) / 448
//   code    = fp8_e4m3_from_float(x / scale)        IEEE division, never x * (1 / scale)
//   x~      = fp8_e4m3_to_float(code) * scale
// NOTE: division and multiplication are single correctly rounded float operations, so a CUDA
// kernel reproduces them bit for bit with `/` and `*` (no --use_fast_math, no __fdividef).
//
// Why the floor kFp8AmaxFloor = 448 * FLT_MIN (about 5.3e-36): it is the smallest amax whose
// scale, FLT_MIN = 2^-126, is still a normal float; a smaller (subnormal) scale would lose
// bits in scale itself and in x / scale. An all-zero tile gets scale 2^-126 and codes 0, and
// 0 * 2^-126 = 0, so it round-trips exactly. A tile with 0 < amax < the floor is quantized
// against the floor (its codes stay below 448), which only matters for values ~1e-36.
// NOTE: DeepGEMM's test casts (per_token_cast_to_fp8) clamp amax at 1e-4 and multiply by
// 448 / amax; our floor keeps tiles of tiny values (small gradients) at full E4M3 precision,
// and the division makes the code the correctly rounded one of x / scale.
// Why the ceiling FLT_MAX: a tile holding +-inf gets the finite scale FLT_MAX / 448, so its
// finite elements quantize normally and the inf saturates to code +-448 (fp8.h saturates),
// that is to +-FLT_MAX: no inf or NaN appears where there was none. For every finite amax
// (FLT_MAX included) 448 * scale is finite: amax or one of its float neighbours.
//
// Signs: every code keeps the sign of x, so -0 and negatives that underflow come back as -0
// (code 0x80). A NaN element becomes code 0x7F and dequantizes to NaN; it does not enter the
// tile's amax, so the other elements of its tile are unaffected.
//
// Error (derived in tests/test_fp8_quant.cpp, asserted there), s the tile scale: an element
// with |x| >= 2^-6 s (E4M3's normal range) has |x~ - x| <= (1/17 + 2^-22) |x|, inside the
// textbook 2^-4 |x|; one below it has |x~ - x| <= 2^-10 s (1 + 2^-18); both while 2^-9 s is a
// normal float (s >= 2^-117; below, float subnormal rounding adds up to 2^-150). If amax >=
// kFp8AmaxFloor, the amax element comes back as +-(448 * s): amax or a float neighbour of it.
#pragma once

#include <cfloat>
#include <cstdint>

#include "model/fp8.h"
#include "model/hd.h"

namespace moe {

struct Fp8Tile {
  int64_t rows, cols;
};
constexpr Fp8Tile kTileAct{1, 128};       // activations: 1x128 along the reduction dimension
constexpr Fp8Tile kTileActT{128, 1};      // activations when the reduction runs down the rows
constexpr Fp8Tile kTileWeight{128, 128};  // weights

constexpr float kFp8AmaxFloor = kFp8E4M3Max * FLT_MIN;  // 7 * 2^-120: scale >= 2^-126
constexpr float kFp8AmaxCeil = FLT_MAX;

// The tile scale from the tile's max-abs. NaN in, floor scale out.
MOE_HD inline float fp8_tile_scale(float amax) {
  const float lo = amax > kFp8AmaxFloor ? amax : kFp8AmaxFloor;
  const float a = lo < kFp8AmaxCeil ? lo : kFp8AmaxCeil;
  return a / kFp8E4M3Max;
}

MOE_HD inline uint8_t fp8_tile_encode(float x, float scale) {
  return fp8_e4m3_from_float(x / scale);
}

MOE_HD inline float fp8_tile_decode(uint8_t code, float scale) {
  return fp8_e4m3_to_float(code) * scale;
}

// Number of scales of an (R, C) matrix: ceil(R / t.rows) * ceil(C / t.cols).
int64_t fp8_scale_count(int64_t R, int64_t C, Fp8Tile t);

// q (R, C) codes, scales (ceil(R / t.rows), ceil(C / t.cols)) from x (R, C).
void fp8_quantize(uint8_t* q, float* scales, const float* x, int64_t R, int64_t C, Fp8Tile t);
void fp8_quantize_ld(uint8_t* q, int64_t ld_q, float* scales, const float* x, int64_t ld_x,
                     int64_t R, int64_t C, Fp8Tile t);

// x (R, C) = decode(q) * scale of its tile.
void fp8_dequantize(float* x, const uint8_t* q, const float* scales, int64_t R, int64_t C,
                    Fp8Tile t);
void fp8_dequantize_ld(float* x, int64_t ld_x, const uint8_t* q, int64_t ld_q, const float* scales,
                       int64_t R, int64_t C, Fp8Tile t);

// out = dequantize(quantize(x)) bit for bit, without a code or scale buffer from the caller
// (two passes per tile: amax, then encode and decode): what the CPU FP8 GEMM emulation feeds
// OpenBLAS. out may equal x (in place, then with ld_out == ld_x); no other overlap.
void fp8_fake_quantize(float* out, const float* x, int64_t R, int64_t C, Fp8Tile t);
void fp8_fake_quantize_ld(float* out, int64_t ld_out, const float* x, int64_t ld_x, int64_t R,
                          int64_t C, Fp8Tile t);

// BF16 mode: out[i] = bf16_round(x[i]) over n elements; out may equal x.
void bf16_fake_quantize(float* out, const float* x, int64_t n);

}  // namespace moe
