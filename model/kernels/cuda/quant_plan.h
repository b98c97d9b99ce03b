// Host-side launch planning for the CUDA FP8 / BF16 quantization kernels
// (model/kernels/cuda/fp8_quant.cu) and the AdamW kernel (model/kernels/cuda/adamw.cu): plain
// C++, compiled into the core library on every machine, so the CPU tests check every shipped
// config's shapes against CUDA's limits without a GPU.
//
// Tiled FP8 kernels (quantize, dequantize, fake quantize), the split the CPU uses too
// (model/kernels/cpu/fp8_quant.cpp): a unit is one row block of t.rows rows times a group of
// whole column tiles, unit_cols = tiles_per_unit * t.cols wide (the unit at the right edge may
// be narrower); one thread block per unit, units numbered row block major, so unit u covers
// row block u / unit_col_groups and column group u % unit_col_groups. Inside a unit the block
// is threads_x x (kQuantThreads / threads_x) threads: thread (tx, ty) owns the unit's columns
// tx, tx + threads_x, ... and rows ty, ty + TY, ...; threads_x is a multiple of 32, so a warp
// lies in one ty row and its lanes read consecutive columns. Dynamic shared memory: per tile
// of the unit, its amax (as uint32 bits) and its scale.
//
// Elementwise kernels (AdamW, BF16 rounding): a grid-stride loop over n, the grid capped.
#pragma once

#include <cstdint>
#include <string>

#include "model/fp8_quant.h"
#include "model/hd.h"
#include "model/kernels/cuda/launch_dims.h"

namespace moe::cuda {

inline constexpr int kQuantThreads = 256;
// A unit aims at kQuantUnitElems elements, between kQuantUnitMinCols and kQuantUnitMaxCols
// columns wide (rounded down to whole tiles, at least one tile).
inline constexpr int64_t kQuantUnitElems = 16384;
inline constexpr int64_t kQuantUnitMinCols = 256;
inline constexpr int64_t kQuantUnitMaxCols = 1024;
// Blocks of an elementwise grid-stride loop: enough to fill any current GPU several times.
inline constexpr int64_t kElementwiseMaxBlocks = 4096;

struct Fp8QuantPlan {
  int64_t tiles_per_unit = 0;   // column tiles of a full unit
  int64_t unit_cols = 0;        // tiles_per_unit * t.cols
  int64_t unit_col_groups = 0;  // ceil(C / unit_cols): units per row block
  int64_t col_tiles = 0;        // ceil(C / t.cols): a row of the scales
  int threads_x = 32;           // TX: 32, 64, 128 or 256
  LaunchDims dims;              // grid_x units (0: nothing to do), kQuantThreads, smem
  std::string describe() const;
};

// The plan for an (R, C) matrix in tiles t. CHECK-fails on bad arguments or a grid beyond
// CUDA's limits. R = 0 or C = 0 plans an empty grid (grid_x = 0): the launchers do nothing.
Fp8QuantPlan fp8_quant_plan(int64_t R, int64_t C, Fp8Tile t);

// Unit u of a plan for an (R, C) matrix in (tile_rows, tile_cols) tiles: rows [r0, r0 + nr),
// columns [c0, c0 + nc) (c0 a multiple of tile_cols), and its ntiles tiles' scales
// scales[s, s + ntiles), part of one row of the scales. The kernels' own geometry, here so the
// CPU tests can check it covers every element once.
struct Fp8QuantUnit {
  int64_t r0, nr, c0, nc, s, ntiles;
};

MOE_HD inline Fp8QuantUnit fp8_quant_unit(int64_t u, int64_t R, int64_t C, int64_t tile_rows,
                                          int64_t tile_cols, int64_t unit_cols,
                                          int64_t unit_col_groups, int64_t col_tiles) {
  const int64_t rb = u / unit_col_groups;
  Fp8QuantUnit q;
  q.r0 = rb * tile_rows;
  q.nr = R - q.r0 < tile_rows ? R - q.r0 : tile_rows;
  q.c0 = (u % unit_col_groups) * unit_cols;
  q.nc = C - q.c0 < unit_cols ? C - q.c0 : unit_cols;
  q.s = rb * col_tiles + q.c0 / tile_cols;
  q.ntiles = (q.nc + tile_cols - 1) / tile_cols;
  return q;
}

// Grid-stride loops over n elements: grid_x = min(ceil(n / kQuantThreads), kElementwiseMaxBlocks)
// (0 for n = 0), kQuantThreads threads, no shared memory.
LaunchDims adamw_plan(int64_t n);
LaunchDims bf16_round_plan(int64_t n);

}  // namespace moe::cuda
