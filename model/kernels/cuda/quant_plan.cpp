// Launch planning of the CUDA quantization and AdamW kernels; see quant_plan.h.
#include "model/kernels/cuda/quant_plan.h"

#include <algorithm>

#include "model/check.h"

namespace moe::cuda {

namespace {

constexpr int64_t kGridXMax = 2147483647;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

LaunchDims elementwise_dims(int64_t n) {
  CHECK(n >= 0, "n=%lld", static_cast<long long>(n));
  LaunchDims d;
  d.grid_x = std::min(ceil_div(n, kQuantThreads), kElementwiseMaxBlocks);
  d.block = kQuantThreads;
  return d;
}

}  // namespace

std::string Fp8QuantPlan::describe() const {
  return strprintf("units of %lld tiles (%lld columns), %lld per row block, %lld tile columns; "
                   "grid %lld x %d threads (%d wide), %lld B smem",
                   static_cast<long long>(tiles_per_unit), static_cast<long long>(unit_cols),
                   static_cast<long long>(unit_col_groups), static_cast<long long>(col_tiles),
                   static_cast<long long>(dims.grid_x), dims.block, threads_x,
                   static_cast<long long>(dims.smem_bytes));
}

Fp8QuantPlan fp8_quant_plan(int64_t R, int64_t C, Fp8Tile t) {
  CHECK(R >= 0 && C >= 0, "R=%lld C=%lld", static_cast<long long>(R), static_cast<long long>(C));
  CHECK(t.rows >= 1 && t.cols >= 1, "tile %lldx%lld", static_cast<long long>(t.rows),
        static_cast<long long>(t.cols));
  Fp8QuantPlan p;
  p.dims.block = kQuantThreads;
  if (R == 0 || C == 0) {
    p.dims.grid_x = 0;
    p.tiles_per_unit = 1;
    p.unit_cols = t.cols;
    return p;
  }
  // Rows a unit really has (a tile taller than the matrix has only R), then the width that
  // gives it about kQuantUnitElems elements, in whole tiles, no more tiles than a row has.
  const int64_t unit_rows = std::min(t.rows, R);
  const int64_t target =
      std::clamp(kQuantUnitElems / unit_rows, kQuantUnitMinCols, kQuantUnitMaxCols);
  p.col_tiles = ceil_div(C, t.cols);
  p.tiles_per_unit = std::min(std::max<int64_t>(1, target / t.cols), p.col_tiles);
  p.unit_cols = p.tiles_per_unit * t.cols;  // <= kQuantUnitMaxCols unless one tile is wider
  p.unit_col_groups = ceil_div(C, p.unit_cols);
  // The narrowest power of two >= 32 spanning the unit's columns, at most the block.
  const int64_t cols = std::min(p.unit_cols, C);
  int tx = 32;
  while (tx < kQuantThreads && tx < cols) tx *= 2;
  p.threads_x = tx;
  const int64_t row_blocks = ceil_div(R, t.rows);
  CHECK(row_blocks <= kGridXMax / p.unit_col_groups,
        "FP8 quantization of %lldx%lld in %lldx%lld tiles needs %lld x %lld blocks, over CUDA's "
        "grid limit", static_cast<long long>(R), static_cast<long long>(C),
        static_cast<long long>(t.rows), static_cast<long long>(t.cols),
        static_cast<long long>(row_blocks), static_cast<long long>(p.unit_col_groups));
  p.dims.grid_x = row_blocks * p.unit_col_groups;
  p.dims.smem_bytes =
      p.tiles_per_unit * static_cast<int64_t>(sizeof(uint32_t) + sizeof(float));
  return p;
}

LaunchDims adamw_plan(int64_t n) { return elementwise_dims(n); }

LaunchDims bf16_round_plan(int64_t n) { return elementwise_dims(n); }

}  // namespace moe::cuda
