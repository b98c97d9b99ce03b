// Tests for model/fp8_quant.h (fine-grained FP8 quantization with per-tile scales, BF16 mode):
//  - codes and scales bit-identical to a plain-loop reference written here from the definition
//    (double amax loop, per-element encode through fp8.h), over every tile shape and sizes
//    that are not multiples of the tile, on data whose tile magnitudes span 1e-8 to 1e4;
//  - dequantize(quantize(x)) == fake_quantize(x) bit for bit, in place too, and the _ld views;
//  - per-element error bounds, derived below, and checks that they are attained;
//  - edge cases: all-zero tiles, one nonzero, +-FLT_MAX and +-inf, the scale floor, signed
//    zero, NaN; thread-count independence; BF16 mode against bf16_round.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <ios>
#include <limits>
#include <ostream>
#include <string>
#include <vector>

#include "model/fp8.h"
#include "model/fp8_quant.h"
#include "model/rng.h"

namespace {

using moe::f32_bits;
using moe::Fp8Tile;
using VecF = std::vector<float>;
using Codes = std::vector<uint8_t>;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// ----- Error bounds -----
// u = 2^-24 (float's unit roundoff), s the tile scale, y = fl(x / s), q = E4M3(y),
// x~ = fl(q s); so y = (x / s)(1 + d1) and x~ = q s (1 + d3) with |d1|, |d3| <= u while the
// results are normal floats.
//  (a) |x| >= 2^-6 s (E4M3's normal range): then |y| >= 2^-6 (rounding is monotone). For y in
//      [2^e, 2^(e+1)) the nearest code is at most 2^(e-4) away, and relative to |y| at most
//      1/17: the worst case is the tie y = 2^e (1 + 1/16), which rounds to even, down to 2^e
//      (just below 2^(e+1) the error is only 2^-5 |y|). Above 448 only rounding spill from the
//      amax element lands, saturated at a relative cost ~3u. So q = y (1 + e), |e| <= 1/17,
//      and x~ = x (1 + d1)(1 + e)(1 + d3):
//        |x~ - x| <= ((1 + u)^2 (18/17) - 1) |x| < (1/17 + 2^-22) |x|     (< 2^-4 |x|)
//      if q s is a normal float: |q| >= 2^-6, so s >= 2^-120 suffices.
//  (b) |x| < 2^-6 s: E4M3 subnormals are 2^-9 apart, so |q - y| <= 2^-10, |y| <= 2^-6, and
//      x~ - x = s ((q - y)(1 + d3) + y d3 + (y - x / s)), hence
//        |x~ - x| <= s (2^-10 (1 + u) + 2^-6 u + 2^-6 u) = 2^-10 s (1 + 33u) < 2^-10 s (1 + 2^-18)
//      if 2^-9 s is a normal float (s >= 2^-117); a float-subnormal y only costs 2^-150 more.
//  (c) the amax element (amax >= the floor): y = fl(amax / fl(amax / 448)) is 448 within a few
//      u, so its code is +-448 (0x7E / 0xFE: the codes below 448 are 416 and lower), and
//      x~ = +-fl(448 fl(amax / 448)), which is amax or one of its two float neighbours. 448 is
//      7 * 2^6 and s stays normal, so only amax's mantissa matters: AmaxRoundTripExhaustive
//      checks every mantissa of one binade, and FLT_MAX (which comes back as itself).
constexpr double kRelBound = 1.0 / 17.0 + 0x1p-22;       // (a), relative to |x|
constexpr double kAbsBound = 0x1p-10 * (1.0 + 0x1p-18);  // (b), relative to s
constexpr float kMinScaleForBounds = 0x1p-117f;

// ----- The reference: the definition, element by element -----

struct Quantized {
  Codes q;      // (R, C)
  VecF scales;  // (ceil(R / t.rows), ceil(C / t.cols))
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// amax in double over the tile (std::max keeps amax when |x| is NaN), clamped to
// [448 * 2^-126, FLT_MAX], divided by 448 in float; code = E4M3(x / s).
Quantized ref_quantize(const VecF& x, int64_t R, int64_t C, Fp8Tile t) {
  const int64_t nrt = ceil_div(R, t.rows), nct = ceil_div(C, t.cols);
  Quantized out{Codes(static_cast<size_t>(R * C)), VecF(static_cast<size_t>(nrt * nct))};
  for (int64_t i = 0; i < nrt; ++i) {
    for (int64_t j = 0; j < nct; ++j) {
      const int64_t r1 = std::min(R, (i + 1) * t.rows), c1 = std::min(C, (j + 1) * t.cols);
      double amax = 0.0;
      for (int64_t r = i * t.rows; r < r1; ++r)
        for (int64_t c = j * t.cols; c < c1; ++c)
          amax = std::max(amax, std::fabs(static_cast<double>(x[r * C + c])));
      const double clamped = std::min(std::max(amax, 448.0 * 0x1p-126), double{FLT_MAX});
      const float s = static_cast<float>(clamped) / 448.0f;
      out.scales[i * nct + j] = s;
      for (int64_t r = i * t.rows; r < r1; ++r)
        for (int64_t c = j * t.cols; c < c1; ++c)
          out.q[r * C + c] = moe::fp8_e4m3_from_float(x[r * C + c] / s);
    }
  }
  return out;
}

float ref_scale_of(const Quantized& qz, int64_t r, int64_t c, int64_t C, Fp8Tile t) {
  return qz.scales[(r / t.rows) * ceil_div(C, t.cols) + c / t.cols];
}

// ----- Data -----

// Tile (i, j) of shape t gets magnitude 10^U(-8, 4); within it, 3/4 of the elements are
// uniform in (-1, 1) times it, 1/4 log-uniform down to 1e-6 times it (E4M3 subnormals and
// underflow), and about 1 in 64 are +0 or -0.
VecF wide_range(int64_t R, int64_t C, Fp8Tile t, uint64_t seed) {
  VecF x(static_cast<size_t>(R * C));
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      const uint64_t tile = static_cast<uint64_t>((r / t.rows) * ceil_div(C, t.cols) + c / t.cols);
      const double mag = std::pow(10.0, -8.0 + 12.0 * moe::rng_uniform(seed, 1, tile));
      const uint64_t k = static_cast<uint64_t>(r * C + c);
      const double u = moe::rng_uniform(seed, 2, k);
      const double v = moe::rng_uniform(seed, 3, k);
      double e;
      if (u < 1.0 / 128.0) {
        e = 0.0;
      } else if (u < 1.0 / 64.0) {
        e = -0.0;
      } else if (u < 0.25) {
        e = std::pow(10.0, -6.0 * v) * (u < 0.125 ? -1.0 : 1.0);
      } else {
        e = 2.0 * v - 1.0;
      }
      x[static_cast<size_t>(k)] = static_cast<float>(mag * e);
    }
  }
  return x;
}

// Hard cases for the encode: tile (i, j) gets amax A = (1 + U(0, 1)) 2^e, e spread over
// -20..20, held by its top-left element; every other element is x = fl(m s) moved by -2..2 float
// ulps, s = A / 448 and m a midpoint between two consecutive E4M3 codes (subnormal ones included).
// So x / s lands within a few ulps of a rounding boundary: there x * (1 / s) in place of x / s, or
// a scale off by one ulp, changes the code.
VecF near_midpoints(int64_t R, int64_t C, Fp8Tile t, uint64_t seed) {
  VecF x(static_cast<size_t>(R * C));
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      const uint64_t tile = static_cast<uint64_t>((r / t.rows) * ceil_div(C, t.cols) + c / t.cols);
      const float a = static_cast<float>(
          std::ldexp(1.0 + moe::rng_uniform(seed, 1, tile), -20 + static_cast<int>(tile * 7 % 41)));
      const uint64_t k = static_cast<uint64_t>(r * C + c);
      const uint64_t bits = moe::rng_u64(seed, 2, k);
      const float sign = bits & 1 ? -1.0f : 1.0f;
      if (r % t.rows == 0 && c % t.cols == 0) {
        x[k] = sign * a;
        continue;
      }
      const uint8_t code = static_cast<uint8_t>((bits >> 1) % 0x7E);  // 0 .. 0x7D
      const float mid = 0.5f * (moe::fp8_e4m3_to_float(code) +
                                moe::fp8_e4m3_to_float(static_cast<uint8_t>(code + 1)));
      float v = mid * (a / 448.0f);
      for (int64_t j = static_cast<int64_t>((bits >> 8) % 5) - 2; j != 0; j += j > 0 ? -1 : 1)
        v = std::nextafter(v, j > 0 ? kInf : 0.0f);
      x[k] = sign * v;
    }
  }
  return x;
}

bool any_nonzero(const VecF& v) {
  for (float x : v)
    if (x != 0.0f) return true;
  return false;
}

// Bitwise equality of two float arrays, reporting the first difference.
::testing::AssertionResult same_bits(const VecF& got, const VecF& want) {
  if (got.size() != want.size()) return ::testing::AssertionFailure() << "size mismatch";
  for (size_t i = 0; i < got.size(); ++i)
    if (f32_bits(got[i]) != f32_bits(want[i]))
      return ::testing::AssertionFailure()
             << "at " << i << ": got " << got[i] << " (" << std::hexfloat << got[i] << ") want "
             << want[i] << std::defaultfloat;
  return ::testing::AssertionSuccess();
}

std::string tile_name(Fp8Tile t) { return std::to_string(t.rows) + "x" + std::to_string(t.cols); }

// ----- Tiles x shapes against the reference -----
// One test per tile shape (3x5: a general tile; 2x1000: wider than one pass of the kernel,
// 512 columns), each over every shape (sizes that are not multiples of the tile, and empty).

// The parameter: a tile, wrapped so that gtest prints it by name.
struct TileParam {
  Fp8Tile t;
};
std::ostream& operator<<(std::ostream& os, const TileParam& p) { return os << tile_name(p.t); }

const TileParam kTiles[] = {
    {moe::kTileAct}, {moe::kTileActT}, {moe::kTileWeight}, {{3, 5}}, {{2, 1000}}};
const int64_t kShapes[][2] = {{1, 1},     {3, 130},  {257, 129}, {128, 128}, {300, 70},
                              {129, 385}, {5, 2100}, {0, 7},     {6, 0}};

class Fp8QuantShapes : public ::testing::TestWithParam<TileParam> {
 protected:
  // Sets R, C and the wide-range input x for one shape.
  void load(const int64_t (&shape)[2]) {
    R = shape[0];
    C = shape[1];
    x = wide_range(R, C, t, 1000 + static_cast<uint64_t>(R * 7 + C * 13 + t.rows * 3 + t.cols));
    if (R * C > 1) {
      ASSERT_TRUE(any_nonzero(x)) << "inputs are all zero";
    }
    nscales = moe::fp8_scale_count(R, C, t);
  }
  static std::string shape_name(const int64_t (&shape)[2]) {
    return std::to_string(shape[0]) + "x" + std::to_string(shape[1]);
  }
  const Fp8Tile t = GetParam().t;
  int64_t R = 0, C = 0, nscales = 0;
  VecF x;
};

TEST_P(Fp8QuantShapes, MatchesReference) {
  for (const auto& shape : kShapes) {
    SCOPED_TRACE(shape_name(shape));
    load(shape);
    for (const VecF& in : {x, near_midpoints(R, C, t, 99)}) {
      const Quantized want = ref_quantize(in, R, C, t);
      ASSERT_EQ(nscales, static_cast<int64_t>(want.scales.size()));
      Codes q(in.size(), 0xAA);
      VecF scales(static_cast<size_t>(nscales), -1.0f);
      moe::fp8_quantize(q.data(), scales.data(), in.data(), R, C, t);
      EXPECT_TRUE(same_bits(scales, want.scales));
      for (size_t i = 0; i < q.size(); ++i)
        ASSERT_EQ(q[i], want.q[i]) << "element " << i << " x=" << std::hexfloat << in[i];
    }
  }
}

TEST_P(Fp8QuantShapes, DequantizeOfQuantizeIsFakeQuantize) {
  for (const auto& shape : kShapes) {
    SCOPED_TRACE(shape_name(shape));
    load(shape);
    Codes q(x.size());
    VecF scales(static_cast<size_t>(nscales));
    moe::fp8_quantize(q.data(), scales.data(), x.data(), R, C, t);
    VecF deq(x.size(), kNaN);
    moe::fp8_dequantize(deq.data(), q.data(), scales.data(), R, C, t);

    const Quantized ref = ref_quantize(x, R, C, t);
    VecF want(x.size());
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < C; ++c)
        want[r * C + c] = moe::fp8_e4m3_to_float(ref.q[r * C + c]) * ref_scale_of(ref, r, c, C, t);
    EXPECT_TRUE(same_bits(deq, want));

    VecF fake(x.size(), kNaN);
    moe::fp8_fake_quantize(fake.data(), x.data(), R, C, t);
    EXPECT_TRUE(same_bits(fake, deq));

    VecF inplace = x;
    moe::fp8_fake_quantize(inplace.data(), inplace.data(), R, C, t);
    EXPECT_TRUE(same_bits(inplace, deq));
  }
}

// The bounds (a), (b), (c) above, element by element; scales from quantize (checked against
// the reference by MatchesReference).
void check_error_bounds(const VecF& x, int64_t R, int64_t C, Fp8Tile t) {
  const int64_t nscales = moe::fp8_scale_count(R, C, t);
  Codes q(x.size());
  VecF scales(static_cast<size_t>(nscales));
  moe::fp8_quantize(q.data(), scales.data(), x.data(), R, C, t);
  VecF xq(x.size());
  moe::fp8_dequantize(xq.data(), q.data(), scales.data(), R, C, t);
  // Tile amax, to find the amax elements.
  VecF amax(static_cast<size_t>(nscales), 0.0f);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) {
      float& a = amax[(r / t.rows) * ceil_div(C, t.cols) + c / t.cols];
      a = std::max(a, std::fabs(x[r * C + c]));
    }
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = r * C + c;
      const int64_t tile = (r / t.rows) * ceil_div(C, t.cols) + c / t.cols;
      const float s = scales[tile];
      if (x[i] == 0.0f) {  // +-0 comes back as itself, whatever the scale
        ASSERT_EQ(f32_bits(xq[i]), f32_bits(x[i]));
        continue;
      }
      ASSERT_GE(s, kMinScaleForBounds) << "data outside the range the bounds are derived for";
      const double xd = x[i], err = std::fabs(static_cast<double>(xq[i]) - xd);
      if (std::fabs(xd) >= 0x1p-6 * s)
        ASSERT_LE(err, kRelBound * std::fabs(xd)) << "normal range, x=" << x[i] << " s=" << s;
      else
        ASSERT_LE(err, kAbsBound * s) << "subnormal range, x=" << x[i] << " s=" << s;
      ASSERT_EQ(std::signbit(xq[i]), std::signbit(x[i])) << "x=" << x[i];
      const float a = amax[tile];
      if (std::fabs(x[i]) == a && a >= moe::kFp8AmaxFloor) {
        ASSERT_EQ(q[i] & 0x7F, 0x7E) << "amax element x=" << x[i];
        const float back = std::fabs(xq[i]);
        ASSERT_EQ(back, 448.0f * s);
        ASSERT_TRUE(back == a || back == std::nextafter(a, 0.0f) || back == std::nextafter(a, kInf))
            << "amax " << a << " came back as " << back;
      }
    }
  }
}

TEST_P(Fp8QuantShapes, ErrorBounds) {
  for (const auto& shape : kShapes) {
    SCOPED_TRACE(shape_name(shape));
    load(shape);
    check_error_bounds(x, R, C, t);
    check_error_bounds(near_midpoints(R, C, t, 99), R, C, t);
  }
}

TEST_P(Fp8QuantShapes, LeadingDimensionViews) {
  for (const auto& shape : kShapes) {
    SCOPED_TRACE(shape_name(shape));
    load(shape);
    // The matrix sits in wider buffers: x with ld C + 7, codes with C + 3, outputs with C + 5;
    // the padding must come back untouched.
    const int64_t ldx = C + 7, ldq = C + 3, ldo = C + 5;
    const float kPad = -1234.5f;
    VecF xb(static_cast<size_t>(R * ldx), kPad);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < C; ++c) xb[r * ldx + c] = x[r * C + c];

    VecF want(x.size());
    moe::fp8_fake_quantize(want.data(), x.data(), R, C, t);
    Codes want_q(x.size());
    VecF want_scales(static_cast<size_t>(nscales));
    moe::fp8_quantize(want_q.data(), want_scales.data(), x.data(), R, C, t);

    VecF ob(static_cast<size_t>(R * ldo), kPad);
    moe::fp8_fake_quantize_ld(ob.data(), ldo, xb.data(), ldx, R, C, t);
    Codes qb(static_cast<size_t>(R * ldq), 0xAA);
    VecF scales(static_cast<size_t>(nscales));
    moe::fp8_quantize_ld(qb.data(), ldq, scales.data(), xb.data(), ldx, R, C, t);
    VecF db(static_cast<size_t>(R * ldo), kPad);
    moe::fp8_dequantize_ld(db.data(), ldo, qb.data(), ldq, scales.data(), R, C, t);
    VecF ib = xb;  // in place on the view
    moe::fp8_fake_quantize_ld(ib.data(), ldx, ib.data(), ldx, R, C, t);

    EXPECT_TRUE(same_bits(scales, want_scales));
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t c = 0; c < ldo; ++c) {
        const bool in = c < C;
        ASSERT_EQ(f32_bits(ob[r * ldo + c]), f32_bits(in ? want[r * C + c] : kPad))
            << r << "," << c;
        ASSERT_EQ(f32_bits(db[r * ldo + c]), f32_bits(in ? want[r * C + c] : kPad))
            << r << "," << c;
      }
      for (int64_t c = 0; c < ldq; ++c)
        ASSERT_EQ(qb[r * ldq + c], c < C ? want_q[r * C + c] : 0xAA) << r << "," << c;
      for (int64_t c = 0; c < ldx; ++c)
        ASSERT_EQ(f32_bits(ib[r * ldx + c]), f32_bits(c < C ? want[r * C + c] : kPad))
            << r << "," << c;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fp8Quant, Fp8QuantShapes, ::testing::ValuesIn(kTiles),
                         [](const ::testing::TestParamInfo<TileParam>& info) {
                           return "tile" + tile_name(info.param.t);
                         });

// ----- The bounds themselves -----

// (c) above, for every mantissa of one binade: fl(448 fl(a / 448)) is a or a neighbour, and
// a / fl(a / 448) encodes to 448. Plus FLT_MAX, which must not come back as inf.
TEST(Fp8QuantBounds, AmaxRoundTripExhaustive) {
  int64_t off_by_one = 0;
  for (uint32_t m = 0; m < (1u << 23); ++m) {
    const float a = moe::f32_from_bits((127u << 23) | m);
    const float s = moe::fp8_tile_scale(a);
    const float back = 448.0f * s;
    ASSERT_TRUE(back == a || back == std::nextafter(a, 0.0f) || back == std::nextafter(a, kInf))
        << std::hexfloat << a;
    ASSERT_EQ(moe::fp8_tile_encode(a, s), 0x7E) << std::hexfloat << a;
    off_by_one += back != a;
  }
  EXPECT_GT(off_by_one, 0) << "the one-ulp allowance is needed";
  const float s = moe::fp8_tile_scale(FLT_MAX);
  EXPECT_EQ(moe::fp8_tile_decode(moe::fp8_tile_encode(FLT_MAX, s), s), FLT_MAX);
}

// The bounds (a) and (b) are attained: with amax 448 the scale is exactly 1.
TEST(Fp8QuantBounds, BoundsAreAttained) {
  const float x[] = {448.0f, 17.0f / 16.0f, -17.0f / 16.0f, 0x1p-10f, 3.0f * 0x1p-10f, 0x1p-11f};
  const int64_t n = 6;
  VecF out(n);
  moe::fp8_fake_quantize(out.data(), x, 1, n, moe::kTileAct);
  EXPECT_EQ(out[0], 448.0f);
  EXPECT_EQ(out[1], 1.0f);  // the tie 1 + 1/16 rounds to even: relative error exactly 1/17
  EXPECT_EQ(out[2], -1.0f);
  EXPECT_EQ(x[1] - out[1], x[1] / 17.0f);  // exactly 1/16 = (17/16) / 17
  EXPECT_LE(x[1] - out[1], kRelBound * x[1]);
  EXPECT_EQ(out[3], 0.0f);             // the subnormal tie 2^-10 rounds to even, to 0
  EXPECT_EQ(out[4], 4.0f * 0x1p-10f);  // 3 * 2^-10 rounds to even, to 2 * 2^-9
  EXPECT_EQ(out[5], 0.0f);
}

// ----- Edge cases -----

TEST(Fp8QuantEdge, ScaleCount) {
  EXPECT_EQ(moe::fp8_scale_count(0, 0, moe::kTileAct), 0);
  EXPECT_EQ(moe::fp8_scale_count(1, 1, moe::kTileWeight), 1);
  EXPECT_EQ(moe::fp8_scale_count(257, 129, moe::kTileAct), 257 * 2);
  EXPECT_EQ(moe::fp8_scale_count(257, 129, moe::kTileActT), 3 * 129);
  EXPECT_EQ(moe::fp8_scale_count(257, 129, moe::kTileWeight), 3 * 2);
  EXPECT_EQ(moe::fp8_scale_count(4096, 7168, moe::kTileWeight), 32 * 56);
}

// All-zero tiles: the scale is the floor's, 2^-126 = FLT_MIN (finite, positive, normal);
// codes are 0x00, or 0x80 for -0 (the sign is kept, as fp8.h does); the output is the input.
TEST(Fp8QuantEdge, AllZeroTiles) {
  const int64_t R = 130, C = 260;
  for (const Fp8Tile t : {moe::kTileAct, moe::kTileActT, moe::kTileWeight}) {
    VecF x(static_cast<size_t>(R * C), 0.0f);
    for (size_t i = 0; i < x.size(); i += 3) x[i] = -0.0f;
    Codes q(x.size());
    VecF scales(static_cast<size_t>(moe::fp8_scale_count(R, C, t)));
    moe::fp8_quantize(q.data(), scales.data(), x.data(), R, C, t);
    for (float s : scales) ASSERT_EQ(s, FLT_MIN) << tile_name(t);
    for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(q[i], std::signbit(x[i]) ? 0x80 : 0x00);
    VecF out(x.size(), kNaN);
    moe::fp8_fake_quantize(out.data(), x.data(), R, C, t);
    EXPECT_TRUE(same_bits(out, x)) << tile_name(t);
  }
}

// One nonzero per tile, of any magnitude: it comes back within a float ulp, the rest as 0.
TEST(Fp8QuantEdge, OneNonzero) {
  const float values[] = {1.0f, -3.5f, 1e-30f, -7e-20f, 6.5e4f, 1e30f, -3e38f, 0x1p-117f};
  for (const float v : values) {
    VecF x(128 * 128, 0.0f);
    x[77 * 128 + 5] = v;
    Codes q(x.size());
    float scale = 0.0f;
    moe::fp8_quantize(q.data(), &scale, x.data(), 128, 128, moe::kTileWeight);
    EXPECT_EQ(scale, std::fabs(v) / 448.0f) << v;
    VecF out(x.size());
    moe::fp8_fake_quantize(out.data(), x.data(), 128, 128, moe::kTileWeight);
    for (size_t i = 0; i < x.size(); ++i) {
      if (x[i] == 0.0f) {
        ASSERT_EQ(q[i], 0x00);
        ASSERT_EQ(f32_bits(out[i]), 0u);
      } else {
        EXPECT_EQ(q[i], v < 0.0f ? 0xFE : 0x7E) << v;
        const float a = std::fabs(v), b = std::fabs(out[i]);
        EXPECT_TRUE(b == a || b == std::nextafter(a, 0.0f) || b == std::nextafter(a, kInf))
            << v << " came back as " << out[i];
        EXPECT_EQ(std::signbit(out[i]), std::signbit(v));
      }
    }
  }
}

// Values at the top of the float range never overflow: 448 * fl(amax / 448) stays finite,
// +-inf is clamped to +-FLT_MAX's scale and saturates to +-(448 * scale).
TEST(Fp8QuantEdge, HugeValuesStayFinite) {
  const float row[] = {FLT_MAX, -FLT_MAX, 3e38f, -1e38f, 1.0f, kInf, -kInf, 2e38f};
  const int64_t n = 8;
  for (const Fp8Tile t : {moe::kTileAct, Fp8Tile{1, 1}, Fp8Tile{1, 2}}) {
    VecF out(n, kNaN);
    moe::fp8_fake_quantize(out.data(), row, 1, n, t);
    for (int64_t i = 0; i < n; ++i) {
      EXPECT_TRUE(std::isfinite(out[i])) << tile_name(t) << " element " << i << ": " << out[i];
      EXPECT_EQ(std::signbit(out[i]), std::signbit(row[i]));
    }
    if (t.cols == 128) {
      EXPECT_EQ(out[0], FLT_MAX);
      EXPECT_EQ(out[1], -FLT_MAX);
      EXPECT_EQ(out[5], FLT_MAX);
      EXPECT_EQ(out[6], -FLT_MAX);
      EXPECT_EQ(out[4], 0.0f);  // 1 is far below the subnormal range of a 2^119 scale
    }
  }
  // The reference agrees on codes and scales.
  Codes q(n);
  VecF scales(1);
  moe::fp8_quantize(q.data(), scales.data(), row, 1, n, moe::kTileAct);
  const Quantized want = ref_quantize(VecF(row, row + n), 1, n, moe::kTileAct);
  EXPECT_TRUE(same_bits(scales, want.scales));
  EXPECT_EQ(q, want.q);
}

// Tiles whose amax is below the floor 448 * FLT_MIN (about 5.3e-36) are quantized against the
// floor scale FLT_MIN; float subnormal inputs included.
TEST(Fp8QuantEdge, AmaxBelowFloor) {
  const float row[] = {1e-36f, -2e-37f, 1e-40f, -1e-45f, 0.0f, 3e-38f};
  const int64_t n = 6;
  Codes q(n);
  float scale = 0.0f;
  moe::fp8_quantize(q.data(), &scale, row, 1, n, moe::kTileAct);
  EXPECT_EQ(scale, FLT_MIN);
  const Quantized want = ref_quantize(VecF(row, row + n), 1, n, moe::kTileAct);
  EXPECT_EQ(q, want.q);
  VecF out(n);
  moe::fp8_fake_quantize(out.data(), row, 1, n, moe::kTileAct);
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_TRUE(std::isfinite(out[i]));
    EXPECT_LE(std::fabs(static_cast<double>(out[i]) - row[i]),
              0x1p-4 * std::fabs(row[i]) + 0x1p-136)
        << row[i];
  }
  EXPECT_NE(out[0], 0.0f);
}

// -0 and negatives that underflow come back as -0 (code 0x80), positives as +0.
TEST(Fp8QuantEdge, SignedZero) {
  const float row[] = {448.0f, -0.0f, 0.0f, -1e-30f, 1e-30f, -0x1p-11f};
  const int64_t n = 6;
  Codes q(n);
  float scale = 0.0f;
  moe::fp8_quantize(q.data(), &scale, row, 1, n, moe::kTileAct);
  const uint8_t want_q[] = {0x7E, 0x80, 0x00, 0x80, 0x00, 0x80};
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(q[i], want_q[i]) << row[i];
  VecF out(n);
  moe::fp8_fake_quantize(out.data(), row, 1, n, moe::kTileAct);
  const float want[] = {448.0f, -0.0f, 0.0f, -0.0f, 0.0f, -0.0f};
  EXPECT_TRUE(same_bits(out, VecF(want, want + n)));
}

// A NaN stays NaN (code 0x7F) and does not enter its tile's amax.
TEST(Fp8QuantEdge, NanStaysLocal) {
  const int64_t C = 200;
  VecF x = wide_range(1, C, moe::kTileAct, 7);
  VecF clean = x;
  x[3] = kNaN;
  clean[3] = 0.0f;
  VecF out(C), want(C);
  moe::fp8_fake_quantize(out.data(), x.data(), 1, C, moe::kTileAct);
  moe::fp8_fake_quantize(want.data(), clean.data(), 1, C, moe::kTileAct);
  EXPECT_TRUE(std::isnan(out[3]));
  out[3] = want[3];
  EXPECT_TRUE(same_bits(out, want));
  Codes q(C);
  VecF scales(2);
  moe::fp8_quantize(q.data(), scales.data(), x.data(), 1, C, moe::kTileAct);
  EXPECT_EQ(q[3], 0x7F);
}

// Every output element is owned by one thread: results are identical for any thread count.
TEST(Fp8QuantEdge, ThreadCountIndependent) {
  const int64_t R = 515, C = 1100;
  const int prev = omp_get_max_threads();
  for (const Fp8Tile t : {moe::kTileAct, moe::kTileActT, moe::kTileWeight}) {
    const VecF x = wide_range(R, C, t, 11);
    VecF one(x.size()), many(x.size());
    omp_set_num_threads(1);
    moe::fp8_fake_quantize(one.data(), x.data(), R, C, t);
    omp_set_num_threads(4);
    moe::fp8_fake_quantize(many.data(), x.data(), R, C, t);
    EXPECT_TRUE(same_bits(many, one)) << tile_name(t);
  }
  omp_set_num_threads(prev);
}

// ----- BF16 mode -----

TEST(Fp8QuantBf16, MatchesBf16Round) {
  const int64_t n = (1 << 16) + 3;
  VecF x(n);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(moe::rng_u64(5, 0, static_cast<uint64_t>(i)));
    // Half random bit patterns (every exponent, inf and NaN included), half plain values.
    x[i] = i % 2 ? moe::f32_from_bits(bits) : static_cast<float>(moe::rng_normal(5, 1, i));
  }
  x[0] = FLT_MAX;
  x[2] = -0.0f;
  x[4] = kInf;
  VecF want(n);
  for (int64_t i = 0; i < n; ++i) want[i] = moe::bf16_round(x[i]);
  VecF out(n, 0.0f);
  moe::bf16_fake_quantize(out.data(), x.data(), n);
  EXPECT_TRUE(same_bits(out, want));
  moe::bf16_fake_quantize(x.data(), x.data(), n);
  EXPECT_TRUE(same_bits(x, want));
}

}  // namespace
