// The CUDA twins of FP8 / BF16 quantization (model/fp8_quant.h),
// over DEVICE pointers, enqueued on `stream` (no synchronisation, no allocation). Same layouts,
// semantics and bits as the CPU functions, which are the reference tests/gpu/test_cuda_quant.cpp
// compares against:
//
//   FP8: (R, C) row-major with leading dimensions, tiles t of any size >= 1 (kTileAct,
//     kTileActT, kTileWeight), partial tiles at the edges, scales (ceil(R / t.rows),
//     ceil(C / t.cols)) compact. The scale, encode and decode are fp8_tile_scale /
//     fp8_tile_encode / fp8_tile_decode (model/fp8_quant.h) and the per-tile amax is an exact
//     max (NaN ignored), so codes, scales and values equal the CPU's bit for bit.
//
// Accumulation: every output is ASSIGNED. Every output element is written by one thread, so
// results do not depend on the launch configuration (model/kernels/cuda/quant_plan.h).
// fp8_fake_quantize and bf16_fake_quantize may run in place (out == x, equal leading
// dimensions); no other overlap.
#pragma once

#include <cstdint>

#include "model/fp8_quant.h"
#include "model/kernels/cuda/cuda_backend.h"

namespace moe::cuda {

// q (R, C) codes and scales from x (R, C), as moe::fp8_quantize_ld.
void fp8_quantize_ld(uint8_t* q, int64_t ld_q, float* scales, const float* x, int64_t ld_x,
                     int64_t R, int64_t C, Fp8Tile t, Stream stream);
void fp8_quantize(uint8_t* q, float* scales, const float* x, int64_t R, int64_t C, Fp8Tile t,
                  Stream stream);

// x (R, C) = decode(q) * scale of its tile, as moe::fp8_dequantize_ld.
void fp8_dequantize_ld(float* x, int64_t ld_x, const uint8_t* q, int64_t ld_q, const float* scales,
                       int64_t R, int64_t C, Fp8Tile t, Stream stream);
void fp8_dequantize(float* x, const uint8_t* q, const float* scales, int64_t R, int64_t C,
                    Fp8Tile t, Stream stream);

// out = dequantize(quantize(x)) without a code or scale buffer, as moe::fp8_fake_quantize_ld.
void fp8_fake_quantize_ld(float* out, int64_t ld_out, const float* x, int64_t ld_x, int64_t R,
                          int64_t C, Fp8Tile t, Stream stream);
void fp8_fake_quantize(float* out, const float* x, int64_t R, int64_t C, Fp8Tile t,
                       Stream stream);

// out[i] = bf16_round(x[i]) over n elements, as moe::bf16_fake_quantize.
void bf16_fake_quantize(float* out, const float* x, int64_t n, Stream stream);

}  // namespace moe::cuda
