// Fine-grained FP8 (E4M3) quantization with per-tile FP32 scales, and BF16 rounding, on the
// device: the twins of model/kernels/cpu/fp8_quant.cpp. The definition (scale floor, division,
// partial tiles, signs, NaN) is model/fp8_quant.h's, through its MOE_HD functions.
//
// One block per unit (quant_plan.h: a row block times a group of whole column tiles), two
// passes like the CPU's:
//   1. amax: each thread folds |x| over its rows of one column at a time, as uint32 bits (for
//      non-negative floats the bit order is the value order; NaN bits are skipped, as the CPU's
//      `a > max` skips them), then merges into its tile's shared amax with atomicMax: one
//      __reduce_max_sync + one atomic per warp when the warp's columns share a tile (kTileAct,
//      kTileWeight), one atomic per lane otherwise (kTileActT: a tile per column). Max is
//      exact and order-independent, so the amax, and with it the scale, is the CPU's.
//   2. encode (and decode) every element against its tile's scale.
// In place (fake quantize, out == x) is safe: a block reads all its elements in pass 1 before
// the barrier and writes in pass 2, and units are disjoint.
// NOTE: __reduce_max_sync needs sm_80 or newer (the build's targets are sm_80 and sm_90a).
// NOTE: fp8_tile_encode / decode are single IEEE divisions and multiplications (nvcc's default
// -prec-div=true; no --use_fast_math) plus integer work: no FMA can form there.
// Accumulation: every output is ASSIGNED.
#include "model/fp8.h"
#include "model/fp8_quant.h"
#include "model/kernels/cuda/cuda_check.h"
#include "model/kernels/cuda/quant_kernels.h"
#include "model/kernels/cuda/quant_plan.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "fp8_quant.cu needs sm_80 or newer (__reduce_max_sync)"
#endif

namespace moe::cuda {

namespace {

constexpr unsigned kFullMask = 0xFFFFFFFFu;

// Pass 1: tile_scale[k] = fp8_tile_scale(amax of the unit's tile k) for k < u.ntiles, in
// shared memory, visible to the whole block on return. tile_amax: u.ntiles shared words.
// NOTE: every thread of the block must call this (barriers), and the loop over columns runs
// the same trip count in every thread, so each warp reaches the _sync intrinsics whole.
__device__ void unit_tile_scales(float* tile_scale, unsigned* tile_amax, const float* x,
                                 int64_t ld_x, const Fp8QuantUnit& u, int64_t tc, int threads_x) {
  const int tid = threadIdx.x;
  const int tx = tid % threads_x, ty = tid / threads_x;
  const int ty_count = blockDim.x / threads_x;
  for (int64_t k = tid; k < u.ntiles; k += blockDim.x) tile_amax[k] = 0u;
  __syncthreads();
  const int64_t iters = (u.nc + threads_x - 1) / threads_x;  // the same in every thread
  for (int64_t i = 0; i < iters; ++i) {
    const int64_t cc = tx + i * threads_x;  // column within the unit
    unsigned m = 0u;
    int k = -1;  // the column's tile within the unit; -1: past the unit's last column
    if (cc < u.nc) {
      k = static_cast<int>(cc / tc);
      const float* col = x + u.r0 * ld_x + u.c0 + cc;
      for (int64_t rr = ty; rr < u.nr; rr += ty_count) {
        const unsigned a = f32_bits(col[rr * ld_x]) & kF32AbsMask;
        m = (a <= kF32InfBits && a > m) ? a : m;  // NaN (a > inf's bits) never counts
      }
    }
    const int k0 = __shfl_sync(kFullMask, k, 0);
    if (__all_sync(kFullMask, k == k0)) {
      const unsigned wm = __reduce_max_sync(kFullMask, m);
      if ((tid & 31) == 0 && k0 >= 0) atomicMax(&tile_amax[k0], wm);
    } else if (k >= 0) {
      atomicMax(&tile_amax[k], m);
    }
  }
  __syncthreads();
  for (int64_t k = tid; k < u.ntiles; k += blockDim.x)
    tile_scale[k] = fp8_tile_scale(f32_from_bits(tile_amax[k]));
  __syncthreads();
}

// Every element of the unit with its tile's scale: f(row, column, scale). Threads walk
// columns (threads_x of them, adjacent: coalesced) and rows; each element has one thread.
template <typename F>
__device__ __forceinline__ void unit_elements(const Fp8QuantUnit& u, int64_t tc, int threads_x,
                                              const float* tile_scale, F f) {
  const int tx = threadIdx.x % threads_x, ty = threadIdx.x / threads_x;
  const int ty_count = blockDim.x / threads_x;
  for (int64_t cc = tx; cc < u.nc; cc += threads_x) {
    const float s = tile_scale[cc / tc];
    for (int64_t rr = ty; rr < u.nr; rr += ty_count) f(u.r0 + rr, u.c0 + cc, s);
  }
}

// Shared memory: tiles_per_unit amax words, then tiles_per_unit scales.
__global__ void __launch_bounds__(kQuantThreads)
    fp8_quantize_kernel(uint8_t* q, int64_t ld_q, float* scales, const float* x, int64_t ld_x,
                        int64_t R, int64_t C, int64_t tr, int64_t tc, int64_t unit_cols,
                        int64_t col_groups, int64_t col_tiles, int64_t tiles_per_unit,
                        int threads_x) {
  MOE_DYNAMIC_SMEM(unsigned, quant_smem);
  unsigned* tile_amax = quant_smem;
  float* tile_scale = reinterpret_cast<float*>(quant_smem + tiles_per_unit);
  const Fp8QuantUnit u =
      fp8_quant_unit(blockIdx.x, R, C, tr, tc, unit_cols, col_groups, col_tiles);
  unit_tile_scales(tile_scale, tile_amax, x, ld_x, u, tc, threads_x);
  const int tid = threadIdx.x;
  for (int64_t k = tid; k < u.ntiles; k += blockDim.x) scales[u.s + k] = tile_scale[k];
  unit_elements(u, tc, threads_x, tile_scale, [&](int64_t r, int64_t c, float s) {
    q[r * ld_q + c] = fp8_tile_encode(x[r * ld_x + c], s);
  });
}

// out may equal x (then ld_out == ld_x): see the file comment.
__global__ void __launch_bounds__(kQuantThreads)
    fp8_fake_quantize_kernel(float* out, int64_t ld_out, const float* x, int64_t ld_x,
                             int64_t R, int64_t C, int64_t tr, int64_t tc, int64_t unit_cols,
                             int64_t col_groups, int64_t col_tiles, int64_t tiles_per_unit,
                             int threads_x) {
  MOE_DYNAMIC_SMEM(unsigned, quant_smem);
  unsigned* tile_amax = quant_smem;
  float* tile_scale = reinterpret_cast<float*>(quant_smem + tiles_per_unit);
  const Fp8QuantUnit u =
      fp8_quant_unit(blockIdx.x, R, C, tr, tc, unit_cols, col_groups, col_tiles);
  unit_tile_scales(tile_scale, tile_amax, x, ld_x, u, tc, threads_x);
  unit_elements(u, tc, threads_x, tile_scale, [&](int64_t r, int64_t c, float s) {
    out[r * ld_out + c] = fp8_tile_decode(fp8_tile_encode(x[r * ld_x + c], s), s);
  });
}

// Shared memory: the same layout as the others; only the scales part is used.
__global__ void __launch_bounds__(kQuantThreads)
    fp8_dequantize_kernel(float* x, int64_t ld_x, const uint8_t* q, int64_t ld_q,
                          const float* scales, int64_t R, int64_t C, int64_t tr, int64_t tc,
                          int64_t unit_cols, int64_t col_groups, int64_t col_tiles,
                          int64_t tiles_per_unit, int threads_x) {
  MOE_DYNAMIC_SMEM(unsigned, quant_smem);
  float* tile_scale = reinterpret_cast<float*>(quant_smem + tiles_per_unit);
  const Fp8QuantUnit u =
      fp8_quant_unit(blockIdx.x, R, C, tr, tc, unit_cols, col_groups, col_tiles);
  const int tid = threadIdx.x;
  for (int64_t k = tid; k < u.ntiles; k += blockDim.x) tile_scale[k] = scales[u.s + k];
  __syncthreads();
  unit_elements(u, tc, threads_x, tile_scale, [&](int64_t r, int64_t c, float s) {
    x[r * ld_x + c] = fp8_tile_decode(q[r * ld_q + c], s);
  });
}

__global__ void __launch_bounds__(kQuantThreads)
    bf16_round_kernel(float* out, const float* x, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride)
    out[i] = bf16_round(x[i]);
}

void check_ld(const char* name, int64_t ld, int64_t C) {
  CHECK(ld >= C, "%s=%lld < C=%lld", name, static_cast<long long>(ld), static_cast<long long>(C));
}

}  // namespace

void fp8_quantize_ld(uint8_t* q, int64_t ld_q, float* scales, const float* x, int64_t ld_x,
                     int64_t R, int64_t C, Fp8Tile t, Stream stream) {
  const Fp8QuantPlan p = fp8_quant_plan(R, C, t);  // checks R, C and t
  check_ld("ld_q", ld_q, C);
  check_ld("ld_x", ld_x, C);
  if (p.dims.grid_x == 0) return;
  CHECK(q && scales && x, "null pointer");
  MOE_LAUNCH(static_cast<unsigned>(p.dims.grid_x), p.dims.block,
             static_cast<size_t>(p.dims.smem_bytes), stream, fp8_quantize_kernel)(
      q, ld_q, scales, x, ld_x, R, C, t.rows, t.cols, p.unit_cols, p.unit_col_groups, p.col_tiles,
      p.tiles_per_unit, p.threads_x);
  CUDA_CHECK_LAUNCH();
}

void fp8_quantize(uint8_t* q, float* scales, const float* x, int64_t R, int64_t C, Fp8Tile t,
                  Stream stream) {
  fp8_quantize_ld(q, C, scales, x, C, R, C, t, stream);
}

void fp8_dequantize_ld(float* x, int64_t ld_x, const uint8_t* q, int64_t ld_q, const float* scales,
                       int64_t R, int64_t C, Fp8Tile t, Stream stream) {
  const Fp8QuantPlan p = fp8_quant_plan(R, C, t);
  check_ld("ld_x", ld_x, C);
  check_ld("ld_q", ld_q, C);
  if (p.dims.grid_x == 0) return;
  CHECK(x && q && scales, "null pointer");
  MOE_LAUNCH(static_cast<unsigned>(p.dims.grid_x), p.dims.block,
             static_cast<size_t>(p.dims.smem_bytes), stream, fp8_dequantize_kernel)(
      x, ld_x, q, ld_q, scales, R, C, t.rows, t.cols, p.unit_cols, p.unit_col_groups, p.col_tiles,
      p.tiles_per_unit, p.threads_x);
  CUDA_CHECK_LAUNCH();
}

void fp8_dequantize(float* x, const uint8_t* q, const float* scales, int64_t R, int64_t C,
                    Fp8Tile t, Stream stream) {
  fp8_dequantize_ld(x, C, q, C, scales, R, C, t, stream);
}

void fp8_fake_quantize_ld(float* out, int64_t ld_out, const float* x, int64_t ld_x, int64_t R,
                          int64_t C, Fp8Tile t, Stream stream) {
  const Fp8QuantPlan p = fp8_quant_plan(R, C, t);
  check_ld("ld_out", ld_out, C);
  check_ld("ld_x", ld_x, C);
  CHECK(out != x || ld_out == ld_x || R == 0 || C == 0,
        "in place needs ld_out == ld_x (%lld != %lld)", static_cast<long long>(ld_out),
        static_cast<long long>(ld_x));
  if (p.dims.grid_x == 0) return;
  CHECK(out && x, "null pointer");
  MOE_LAUNCH(static_cast<unsigned>(p.dims.grid_x), p.dims.block,
             static_cast<size_t>(p.dims.smem_bytes), stream, fp8_fake_quantize_kernel)(
      out, ld_out, x, ld_x, R, C, t.rows, t.cols, p.unit_cols, p.unit_col_groups, p.col_tiles,
      p.tiles_per_unit, p.threads_x);
  CUDA_CHECK_LAUNCH();
}

void fp8_fake_quantize(float* out, const float* x, int64_t R, int64_t C, Fp8Tile t,
                       Stream stream) {
  fp8_fake_quantize_ld(out, C, x, C, R, C, t, stream);
}

void bf16_fake_quantize(float* out, const float* x, int64_t n, Stream stream) {
  const LaunchDims d = bf16_round_plan(n);  // checks n >= 0
  if (d.grid_x == 0) return;
  CHECK(out && x, "null pointer");
  MOE_LAUNCH(static_cast<unsigned>(d.grid_x), d.block, 0, stream, bf16_round_kernel)(out, x, n);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe::cuda
