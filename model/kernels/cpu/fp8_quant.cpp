// Fine-grained FP8 (E4M3) quantization with per-tile FP32 scales, and BF16 rounding, on the
// CPU. The definition (scale floor, division, partial tiles, signs) is in model/fp8_quant.h.
//
// Work split: a unit is one row block of t.rows rows times a group of whole column tiles
// about kSpan columns wide (one tile when tiles are wider). Units are independent and every
// output element is written by one thread, so results do not depend on the thread count.
// Each unit makes two passes over its elements, both along rows (contiguous):
//   1. a running max-abs per column over the unit's rows, folded into per-tile amax;
//   2. encode (and decode) each row against a row of per-column scales.
// So 128x1 tiles never walk down a column, and the second pass finds the unit in cache.
// Speed, fake-quantizing 4096x4096 on one core of an AVX-512 EPYC: 13 ms with 1x128 tiles,
// 16-18 ms with 128x1 or 128x128 (their first pass reads 128 rows at once), 12-15 ms in
// place; about 20 ms with the AVX2 clone, 115 ms if the loops do not vectorize (see
// MOE_FP8_LOOP). The BF16 rounding pass, pure bandwidth, takes 4 ms.
// Accumulation: every output is ASSIGNED.
#include "model/fp8_quant.h"

#include <cmath>
#include <cstdint>

#include "model/check.h"
#include "model/kernels/cpu/dense_ops.h"

namespace moe {

namespace {

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelMin = 1 << 14;
// Columns one pass handles at once: the per-column max and scale rows (2 KiB each) stay in
// L1, and a 128-row unit (256 KiB of floats) stays in L2 between the two passes.
constexpr int64_t kSpan = 512;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Columns per unit: whole tiles, as many as fit in kSpan, or one tile if it is wider.
int64_t unit_cols(Fp8Tile t) { return t.cols >= kSpan ? t.cols : t.cols * (kSpan / t.cols); }

void check_args(int64_t R, int64_t C, Fp8Tile t) {
  CHECK(R >= 0 && C >= 0, "R=%lld C=%lld", static_cast<long long>(R), static_cast<long long>(C));
  CHECK(t.rows >= 1 && t.cols >= 1, "tile %lldx%lld", static_cast<long long>(t.rows),
        static_cast<long long>(t.cols));
}

void check_ld(const char* name, int64_t ld, int64_t C) {
  CHECK(ld >= C, "%s=%lld < C=%lld", name, static_cast<long long>(ld), static_cast<long long>(C));
}

// ----- Row kernels (float only; SIMD clones picked at load time) -----

// NOTE: without MOE_FP8_LOOP the encode/decode loops stay scalar, 5x slower. GCC moves the
// float arithmetic of fp8.h's subnormal arms into branches, and under the default
// -ftrapping-math it will not if-convert them back (a float add "could trap"). With
// no-trapping-math it computes both arms and selects; no value changes (FP exceptions are
// never unmasked, rounding stays to nearest). flatten, because GCC does not inline a callee
// whose optimize options differ from the caller's.
// MOE_FP8_CLONES adds an AVX-512 clone to MOE_SIMD_CLONES: native unsigned compares and
// 32-to-8-bit narrowing make the encode about 1.5x faster there. The row functions use
// integer operations and single IEEE divisions and multiplications only, so every clone
// gives the same bits.
#if defined(__GNUC__) && !defined(__clang__)
#define MOE_FP8_LOOP [[gnu::flatten, gnu::optimize("no-trapping-math")]]
#else
#define MOE_FP8_LOOP
#endif
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MOE_FP8_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MOE_FP8_CLONES MOE_SIMD_CLONES
#endif

// colmax[c] = max(colmax[c], |x[c]|). NaN never wins the comparison, so it is ignored.
MOE_FP8_CLONES void amax_row(float* colmax, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const float a = std::fabs(x[c]);
    colmax[c] = a > colmax[c] ? a : colmax[c];
  }
}

float max_of(const float* v, int64_t n) {
  float m = 0.0f;
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < n; ++c) m = v[c] > m ? v[c] : m;
  return m;
}

MOE_FP8_LOOP MOE_FP8_CLONES void quantize_row(uint8_t* q, const float* x, const float* scale,
                                              int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) q[c] = fp8_tile_encode(x[c], scale[c]);
}

MOE_FP8_LOOP MOE_FP8_CLONES void dequantize_row(float* x, const uint8_t* q, const float* scale,
                                                int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) x[c] = fp8_tile_decode(q[c], scale[c]);
}

// out may equal x: the codes of the whole row are made before any of it is written.
void fake_quantize_row(float* out, const float* x, const float* scale, int64_t n) {
  uint8_t q[kSpan];
  quantize_row(q, x, scale, n);
  dequantize_row(out, q, scale, n);
}

// ----- Unit helpers. A unit: rows [r0, r1), columns [c0, c1), its first tile column at c0 -----

// tile_amax[k] = max |x| over the unit's k-th tile; pass 1, in spans of kSpan columns.
void unit_amax(float* tile_amax, const float* x, int64_t ld_x, int64_t r0, int64_t r1, int64_t c0,
               int64_t c1, int64_t tc) {
  float colmax[kSpan];
  const int64_t ntiles = ceil_div(c1 - c0, tc);
  for (int64_t k = 0; k < ntiles; ++k) tile_amax[k] = 0.0f;
  for (int64_t s0 = c0; s0 < c1; s0 += kSpan) {
    const int64_t s1 = min64(c1, s0 + kSpan);
    for (int64_t c = 0; c < s1 - s0; ++c) colmax[c] = 0.0f;
    for (int64_t r = r0; r < r1; ++r) amax_row(colmax, x + r * ld_x + s0, s1 - s0);
    for (int64_t c = s0; c < s1;) {  // one tile's segment of this span at a time
      const int64_t k = (c - c0) / tc;
      const int64_t end = min64(s1, c0 + (k + 1) * tc);
      const float m = max_of(colmax + (c - s0), end - c);
      tile_amax[k] = m > tile_amax[k] ? m : tile_amax[k];
      c = end;
    }
  }
}

// col_scale[c - s0] = the scale of column c's tile, for c in [s0, s1).
void span_scales(float* col_scale, const float* tile_scale, int64_t s0, int64_t s1, int64_t c0,
                 int64_t tc) {
  for (int64_t c = s0; c < s1;) {
    const int64_t k = (c - c0) / tc;
    const int64_t end = min64(s1, c0 + (k + 1) * tc);
    for (int64_t j = c; j < end; ++j) col_scale[j - s0] = tile_scale[k];
    c = end;
  }
}

// Runs fn(s, r0, r1, c0, c1) over every unit in parallel; s is the index of the unit's first
// tile in the (ceil(R / t.rows), ceil(C / t.cols)) scales.
template <typename Fn>
void for_each_unit(int64_t R, int64_t C, Fp8Tile t, const Fn& fn) {
  const int64_t W = unit_cols(t);
  const int64_t nrb = ceil_div(R, t.rows);
  const int64_t ncg = ceil_div(C, W);
  const int64_t nct = ceil_div(C, t.cols);
#pragma omp parallel for schedule(static) if (R * C >= kParallelMin)
  for (int64_t u = 0; u < nrb * ncg; ++u) {
    const int64_t rb = u / ncg;
    const int64_t c0 = (u % ncg) * W;
    const int64_t r0 = rb * t.rows;
    fn(rb * nct + c0 / t.cols, r0, min64(R, r0 + t.rows), c0, min64(C, c0 + W));
  }
}

// Both passes over one unit: writes the unit's tile scales to tile_scale, then calls
// row(r, s0, col_scale, n) for every row r of the unit and span [s0, s0 + n) of its columns.
template <typename RowFn>
void unit_quantize(float* tile_scale, const float* x, int64_t ld_x, int64_t r0, int64_t r1,
                   int64_t c0, int64_t c1, int64_t tc, const RowFn& row) {
  float tile_amax[kSpan];
  float col_scale[kSpan];
  unit_amax(tile_amax, x, ld_x, r0, r1, c0, c1, tc);
  for (int64_t k = 0; k < ceil_div(c1 - c0, tc); ++k) tile_scale[k] = fp8_tile_scale(tile_amax[k]);
  for (int64_t s0 = c0; s0 < c1; s0 += kSpan) {
    const int64_t s1 = min64(c1, s0 + kSpan);
    span_scales(col_scale, tile_scale, s0, s1, c0, tc);
    for (int64_t r = r0; r < r1; ++r) row(r, s0, col_scale, s1 - s0);
  }
}

}  // namespace

int64_t fp8_scale_count(int64_t R, int64_t C, Fp8Tile t) {
  check_args(R, C, t);
  return ceil_div(R, t.rows) * ceil_div(C, t.cols);
}

void fp8_quantize_ld(uint8_t* q, int64_t ld_q, float* scales, const float* x, int64_t ld_x,
                     int64_t R, int64_t C, Fp8Tile t) {
  check_args(R, C, t);
  check_ld("ld_q", ld_q, C);
  check_ld("ld_x", ld_x, C);
  for_each_unit(R, C, t, [&](int64_t s, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    unit_quantize(scales + s, x, ld_x, r0, r1, c0, c1, t.cols,
                  [&](int64_t r, int64_t s0, const float* col_scale, int64_t n) {
                    quantize_row(q + r * ld_q + s0, x + r * ld_x + s0, col_scale, n);
                  });
  });
}

void fp8_quantize(uint8_t* q, float* scales, const float* x, int64_t R, int64_t C, Fp8Tile t) {
  fp8_quantize_ld(q, C, scales, x, C, R, C, t);
}

void fp8_dequantize_ld(float* x, int64_t ld_x, const uint8_t* q, int64_t ld_q, const float* scales,
                       int64_t R, int64_t C, Fp8Tile t) {
  check_args(R, C, t);
  check_ld("ld_x", ld_x, C);
  check_ld("ld_q", ld_q, C);
  for_each_unit(R, C, t, [&](int64_t s, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    const float* tile_scale = scales + s;
    float col_scale[kSpan];
    for (int64_t s0 = c0; s0 < c1; s0 += kSpan) {
      const int64_t s1 = min64(c1, s0 + kSpan);
      span_scales(col_scale, tile_scale, s0, s1, c0, t.cols);
      for (int64_t r = r0; r < r1; ++r)
        dequantize_row(x + r * ld_x + s0, q + r * ld_q + s0, col_scale, s1 - s0);
    }
  });
}

void fp8_dequantize(float* x, const uint8_t* q, const float* scales, int64_t R, int64_t C,
                    Fp8Tile t) {
  fp8_dequantize_ld(x, C, q, C, scales, R, C, t);
}

void fp8_fake_quantize_ld(float* out, int64_t ld_out, const float* x, int64_t ld_x, int64_t R,
                          int64_t C, Fp8Tile t) {
  check_args(R, C, t);
  check_ld("ld_out", ld_out, C);
  check_ld("ld_x", ld_x, C);
  CHECK(out != x || ld_out == ld_x || R == 0 || C == 0,
        "in place needs ld_out == ld_x (%lld != %lld)", static_cast<long long>(ld_out),
        static_cast<long long>(ld_x));
  // A unit reads all its elements (pass 1) before it writes any (pass 2), and units are
  // disjoint, so out == x is safe.
  for_each_unit(R, C, t, [&](int64_t, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    float tile_scale[kSpan];
    unit_quantize(tile_scale, x, ld_x, r0, r1, c0, c1, t.cols,
                  [&](int64_t r, int64_t s0, const float* col_scale, int64_t n) {
                    fake_quantize_row(out + r * ld_out + s0, x + r * ld_x + s0, col_scale, n);
                  });
  });
}

void fp8_fake_quantize(float* out, const float* x, int64_t R, int64_t C, Fp8Tile t) {
  fp8_fake_quantize_ld(out, C, x, C, R, C, t);
}

void bf16_fake_quantize(float* out, const float* x, int64_t n) {
  CHECK(n >= 0, "n=%lld", static_cast<long long>(n));
#pragma omp parallel for simd schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_round(x[i]);
}

}  // namespace moe
