// Tests for model/fp8.h (FP8 E4M3 / E5M2 and BF16 conversions):
//  - spec tests, needing nothing but our header: hand-checked codes for boundaries, ties to
//    even between every pair of consecutive FP8 codes, encode(decode(c)) == c for every code;
//  - bit-for-bit agreement with CUDA's own conversions (<cuda_fp8.h> with __NV_SATFINITE,
//    <cuda_bf16.h>), compiled here for the host from the header-only inline functions: every
//    code decoded, every code's float neighbourhood, every midpoint and the ulps around it,
//    the boundaries, and millions of random floats (bit patterns over the whole float range
//    and values within +-1000). They skip where the build found no CUDA toolkit.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <ios>
#include <limits>
#include <ostream>
#include <string>
#include <vector>

#include "model/fp8.h"
#include "model/rng.h"

#ifdef MOETRAIN_HAVE_CUDA_HEADERS
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#endif

namespace {

using moe::f32_bits;
using moe::f32_from_bits;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
#else
constexpr bool kSanitized = false;
#endif
// Random floats per sampled distribution and format; fewer under the sanitizers.
constexpr int64_t kRandomSamples = kSanitized ? (int64_t{1} << 22) : (int64_t{1} << 24);

// One FP8 format: ours, plus the code of its max finite value.
struct Fp8Format {
  const char* name;
  uint8_t (*encode)(float);
  float (*decode)(uint8_t);
  uint8_t max_code;
};

const Fp8Format kE4M3{"E4M3", moe::fp8_e4m3_from_float, moe::fp8_e4m3_to_float, 0x7E};
const Fp8Format kE5M2{"E5M2", moe::fp8_e5m2_from_float, moe::fp8_e5m2_to_float, 0x7B};

bool is_nan_code(const Fp8Format& f, int c) {
  return std::isnan(f.decode(static_cast<uint8_t>(c)));
}

// x moved by k float ulps (k < 0: towards -inf).
float step_ulps(float x, int k) {
  for (; k > 0; --k) x = std::nextafter(x, kInf);
  for (; k < 0; ++k) x = std::nextafter(x, -kInf);
  return x;
}

// ----- Spec tests: our header alone -----

TEST(Fp8Spec, E4M3KnownCodes) {
  const float tiny = 0x1p-9f;  // smallest subnormal
  struct Case {
    float x;
    uint8_t code;
  };
  const Case cases[] = {
      {0.0f, 0x00},         {-0.0f, 0x80},       {1.0f, 0x38},
      {-2.0f, 0xC0},        {448.0f, 0x7E},      {-448.0f, 0xFE},
      {416.0f, 0x7D},       {432.0f, 0x7E},      {step_ulps(432.0f, -1), 0x7D},
      {464.0f, 0x7E},       {1e6f, 0x7E},        {kInf, 0x7E},
      {-kInf, 0xFE},        {kNaN, 0x7F},        {-kNaN, 0x7F},
      {tiny, 0x01},         {0.5f * tiny, 0x00}, {step_ulps(0.5f * tiny, 1), 0x01},
      {-0.5f * tiny, 0x80}, {1.5f * tiny, 0x02}, {2.5f * tiny, 0x02},
      {7.5f * tiny, 0x08},  {0x1p-6f, 0x08},     {1.0625f, 0x38},
      {1.1875f, 0x3A},      {-1e-30f, 0x80},     {std::numeric_limits<float>::denorm_min(), 0x00},
  };
  for (const Case& c : cases)
    EXPECT_EQ(int{moe::fp8_e4m3_from_float(c.x)}, int{c.code}) << std::hexfloat << c.x;
  EXPECT_EQ(moe::fp8_e4m3_to_float(0x7E), moe::kFp8E4M3Max);
  EXPECT_EQ(moe::fp8_e4m3_to_float(0x01), tiny);
  EXPECT_EQ(moe::fp8_e4m3_to_float(0x08), 0x1p-6f);
  EXPECT_EQ(f32_bits(moe::fp8_e4m3_to_float(0x80)), 0x80000000u);
  EXPECT_EQ(f32_bits(moe::fp8_e4m3_to_float(0xFF)), 0x7FFFFFFFu);
  EXPECT_EQ(moe::fp8_e4m3_round(300.0f), 288.0f);
}

TEST(Fp8Spec, E5M2KnownCodes) {
  const float tiny = 0x1p-16f;
  struct Case {
    float x;
    uint8_t code;
  };
  const Case cases[] = {
      {0.0f, 0x00},          {-0.0f, 0x80},
      {1.0f, 0x3C},          {57344.0f, 0x7B},
      {61440.0f, 0x7B},      {1e30f, 0x7B},
      {kInf, 0x7B},          {-kInf, 0xFB},
      {kNaN, 0x7F},          {-kNaN, 0x7F},
      {tiny, 0x01},          {0.5f * tiny, 0x00},
      {1.5f * tiny, 0x02},   {3.5f * tiny, 0x04},
      {-0.25f * tiny, 0x80}, {1.125f, 0x3C},
      {1.375f, 0x3E},        {49152.0f, 0x7A},
      {53248.0f, 0x7A},      {step_ulps(53248.0f, 1), 0x7B},
  };
  for (const Case& c : cases)
    EXPECT_EQ(int{moe::fp8_e5m2_from_float(c.x)}, int{c.code}) << std::hexfloat << c.x;
  EXPECT_EQ(moe::fp8_e5m2_to_float(0x7B), moe::kFp8E5M2Max);
  EXPECT_EQ(moe::fp8_e5m2_to_float(0x7C), kInf);
  EXPECT_EQ(moe::fp8_e5m2_to_float(0xFC), -kInf);
  EXPECT_TRUE(std::isnan(moe::fp8_e5m2_to_float(0x7D)));
  EXPECT_EQ(moe::fp8_e5m2_to_float(0x01), tiny);
  EXPECT_EQ(moe::fp8_e5m2_round(100.0f), 96.0f);
}

// Every midpoint between consecutive codes goes to the even code, one float ulp off it goes
// to the nearer code, and every code survives a round trip.
TEST(Fp8Spec, TiesToEvenAndRoundTrip) {
  for (const Fp8Format* f : {&kE4M3, &kE5M2}) {
    for (int c = 0; c < f->max_code; ++c) {
      const float lo = f->decode(static_cast<uint8_t>(c));
      const float hi = f->decode(static_cast<uint8_t>(c + 1));
      const float mid = 0.5f * (lo + hi);
      const int even = c % 2 == 0 ? c : c + 1;
      EXPECT_EQ(int{f->encode(mid)}, even) << f->name << " tie above code " << c;
      EXPECT_EQ(int{f->encode(-mid)}, even | 0x80) << f->name << " tie below -code " << c;
      EXPECT_EQ(int{f->encode(step_ulps(mid, -1))}, c) << f->name << " code " << c;
      EXPECT_EQ(int{f->encode(step_ulps(mid, 1))}, c + 1) << f->name << " code " << c;
    }
    for (int c = 0; c < 256; ++c) {
      if (is_nan_code(*f, c) || (c & 0x7F) > f->max_code) continue;
      EXPECT_EQ(int{f->encode(f->decode(static_cast<uint8_t>(c)))}, c) << f->name;
    }
  }
}

TEST(Bf16Spec, KnownCodes) {
  EXPECT_EQ(moe::bf16_from_float(1.0f), 0x3F80);
  EXPECT_EQ(moe::bf16_from_float(1.0f + 0x1p-8f), 0x3F80);      // tie, even below
  EXPECT_EQ(moe::bf16_from_float(1.0f + 3 * 0x1p-8f), 0x3F82);  // tie, even above
  EXPECT_EQ(moe::bf16_from_float(step_ulps(1.0f + 0x1p-8f, 1)), 0x3F81);
  EXPECT_EQ(moe::bf16_from_float(-0.0f), 0x8000);
  EXPECT_EQ(moe::bf16_from_float(kInf), 0x7F80);
  EXPECT_EQ(moe::bf16_from_float(-kInf), 0xFF80);
  EXPECT_EQ(moe::bf16_from_float(std::numeric_limits<float>::max()), 0x7F80);  // no saturation
  EXPECT_EQ(moe::bf16_from_float(kNaN), 0x7FFF);
  EXPECT_EQ(moe::bf16_from_float(-kNaN), 0x7FFF);
  EXPECT_EQ(moe::bf16_from_float(f32_from_bits(0x7F800001u)), 0x7FFF);  // would round to inf
  EXPECT_EQ(moe::bf16_from_float(f32_from_bits(0x00008000u)), 0x0000);  // subnormal tie
  EXPECT_EQ(moe::bf16_from_float(f32_from_bits(0x00018000u)), 0x0002);
  EXPECT_EQ(f32_bits(moe::bf16_to_float(0xFFC1)), 0xFFC10000u);
  EXPECT_EQ(moe::bf16_round(3.14159265f), 3.140625f);
}

#ifdef MOETRAIN_HAVE_CUDA_HEADERS

// ----- Against CUDA's host conversions -----

// The floats worth checking around one representable value v of a narrow format: v itself
// and up to `ulps` float ulps either side.
void push_neighbourhood(std::vector<float>& xs, float v, int ulps) {
  for (int k = -ulps; k <= ulps; ++k) xs.push_back(step_ulps(v, k));
}

// Values around every finite FP8 code, every midpoint of consecutive codes (each a tie) with
// its neighbours, and the boundaries; both signs.
std::vector<float> fp8_probe_values(const Fp8Format& f) {
  std::vector<float> xs;
  for (int c = 0; c <= f.max_code; ++c) {
    const float v = f.decode(static_cast<uint8_t>(c));
    push_neighbourhood(xs, v, 8);
    // Past the max: where the next code would be (E4M3 480, E5M2 65536).
    const float next = c < f.max_code ? f.decode(static_cast<uint8_t>(c + 1))
                                      : 2.0f * v - f.decode(static_cast<uint8_t>(c - 1));
    // Exact in float: the midpoint has one mantissa bit more than the codes.
    push_neighbourhood(xs, 0.5f * (v + next), 3);
    push_neighbourhood(xs, next, 3);
  }
  const float tiny = f.decode(1);  // smallest subnormal
  for (float v :
       {tiny * 0.5f, tiny * 0.25f, tiny * 1.5f, std::numeric_limits<float>::denorm_min(),
        std::numeric_limits<float>::min(), std::numeric_limits<float>::max(), 1e30f, kInf})
    push_neighbourhood(xs, v, 3);
  const size_t n = xs.size();
  for (size_t i = 0; i < n; ++i) xs.push_back(-xs[i]);
  for (uint32_t nan : {0x7FC00000u, 0x7F800001u, 0x7FFFFFFFu, 0x7FA5A5A5u})
    for (uint32_t sign : {0u, 0x80000000u}) xs.push_back(f32_from_bits(nan | sign));
  return xs;
}

uint8_t cuda_e4m3_from_float(float x) {
  return __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
}
uint8_t cuda_e5m2_from_float(float x) {
  return __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E5M2);
}
float cuda_e4m3_to_float(uint8_t c) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(c, __NV_E4M3)));
}
float cuda_e5m2_to_float(uint8_t c) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(c, __NV_E5M2)));
}
uint16_t cuda_bf16_from_float(float x) { return __nv_bfloat16_raw(__float2bfloat16_rn(x)).x; }
float cuda_bf16_to_float(uint16_t h) {
  __nv_bfloat16_raw raw;
  raw.x = h;
  return __bfloat162float(__nv_bfloat16(raw));
}

struct Fp8Pair {
  Fp8Format ours;
  uint8_t (*cuda_encode)(float);
  float (*cuda_decode)(uint8_t);
};

void PrintTo(const Fp8Pair& p, std::ostream* os) { *os << p.ours.name; }

// Counts the inputs whose codes differ, reporting the first few. gen(i) gives input i.
template <typename Code, typename Gen>
int64_t count_encode_mismatches(const char* what, int64_t n, Gen gen, Code (*ours)(float),
                                Code (*cuda)(float)) {
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float x = gen(i);
    const Code got = ours(x), want = cuda(x);
    if (got != want && bad++ < 8)
      ADD_FAILURE() << what << ": x = " << std::hexfloat << x << " (bits 0x" << std::hex
                    << f32_bits(x) << "): ours 0x" << int{got} << ", CUDA 0x" << int{want};
  }
  return bad;
}

class Fp8VsCuda : public testing::TestWithParam<Fp8Pair> {};

TEST_P(Fp8VsCuda, DecodeEveryCode) {
  const Fp8Pair& p = GetParam();
  int nans = 0;
  for (int c = 0; c < 256; ++c) {
    const uint8_t code = static_cast<uint8_t>(c);
    const float got = p.ours.decode(code), want = p.cuda_decode(code);
    nans += std::isnan(want);
    // Bits, so -0 vs +0 and the NaN CUDA produces (0x7FFFFFFF) count too.
    EXPECT_EQ(f32_bits(got), f32_bits(want))
        << "code 0x" << std::hex << c << ": ours " << got << ", CUDA " << want;
  }
  EXPECT_EQ(nans, p.ours.max_code == 0x7E ? 2 : 6);  // E4M3: S.1111.111; E5M2: S.11111.{01,10,11}
}

TEST_P(Fp8VsCuda, EncodeNeighbourhoodsTiesAndBoundaries) {
  const Fp8Pair& p = GetParam();
  const std::vector<float> xs = fp8_probe_values(p.ours);
  ASSERT_GT(xs.size(), size_t{5000});
  const int64_t bad = count_encode_mismatches(
      "probe", static_cast<int64_t>(xs.size()),
      [&](int64_t i) { return xs[static_cast<size_t>(i)]; }, p.ours.encode, p.cuda_encode);
  EXPECT_EQ(bad, 0) << "of " << xs.size();
}

TEST_P(Fp8VsCuda, EncodeRandomBitPatterns) {
  const Fp8Pair& p = GetParam();
  auto gen = [](int64_t i) {
    return f32_from_bits(static_cast<uint32_t>(moe::rng_u64(17, 1, static_cast<uint64_t>(i))));
  };
  EXPECT_EQ(
      count_encode_mismatches("random bits", kRandomSamples, gen, p.ours.encode, p.cuda_encode), 0);
}

// Half uniform in [-1000, 1000], half log-uniform in magnitude over [2^-20, 2^10] (so the
// subnormal and small codes are hit thousands of times each), random sign.
TEST_P(Fp8VsCuda, EncodeRandomValuesWithin1000) {
  const Fp8Pair& p = GetParam();
  auto gen = [](int64_t i) {
    const uint64_t r = moe::rng_u64(17, 2, static_cast<uint64_t>(i));
    const double u = static_cast<double>(r >> 11) * 0x1p-53;
    if (i % 2 == 0) return static_cast<float>(2000.0 * u - 1000.0);
    const float mag = static_cast<float>(std::exp2(-20.0 + 30.0 * u));
    return (r & 1) ? -mag : mag;
  };
  EXPECT_EQ(count_encode_mismatches("random within 1000", kRandomSamples, gen, p.ours.encode,
                                    p.cuda_encode),
            0);
  // Guard: the samples reached every code whose value lies within the range.
  std::vector<bool> seen(256, false);
  for (int64_t i = 0; i < kRandomSamples; ++i) seen[p.ours.encode(gen(i))] = true;
  for (int c = 0; c < 256; ++c) {
    const float v = p.ours.decode(static_cast<uint8_t>(c));
    if (std::fabs(v) <= 990.0f) {
      EXPECT_TRUE(seen[static_cast<size_t>(c)]) << p.ours.name << " code 0x" << std::hex << c;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fp8, Fp8VsCuda,
                         testing::Values(Fp8Pair{kE4M3, cuda_e4m3_from_float, cuda_e4m3_to_float},
                                         Fp8Pair{kE5M2, cuda_e5m2_from_float, cuda_e5m2_to_float}),
                         [](const testing::TestParamInfo<Fp8Pair>& info) {
                           return std::string(info.param.ours.name);
                         });

TEST(Bf16VsCuda, DecodeEveryCode) {
  for (uint32_t h = 0; h <= 0xFFFF; ++h) {
    const uint16_t code = static_cast<uint16_t>(h);
    ASSERT_EQ(f32_bits(moe::bf16_to_float(code)), f32_bits(cuda_bf16_to_float(code)))
        << "code 0x" << std::hex << h;
  }
}

// Every code's value with its float neighbours, and every midpoint (a tie) with its own.
TEST(Bf16VsCuda, EncodeNeighbourhoodsAndTies) {
  std::vector<float> xs;
  for (uint32_t h = 0; h <= 0xFFFF; ++h) {
    const uint32_t v = h << 16;
    if ((v & 0x7FFFFFFFu) > 0x7F800000u) continue;
    push_neighbourhood(xs, f32_from_bits(v), 4);
    if ((v & 0x7FFFFFFFu) < 0x7F800000u) push_neighbourhood(xs, f32_from_bits(v | 0x8000u), 2);
  }
  const int64_t bad = count_encode_mismatches(
      "probe", static_cast<int64_t>(xs.size()),
      [&](int64_t i) { return xs[static_cast<size_t>(i)]; }, moe::bf16_from_float,
      cuda_bf16_from_float);
  EXPECT_EQ(bad, 0) << "of " << xs.size();
}

// Every 4099th float bit pattern (all exponents, NaNs included), then random ones.
TEST(Bf16VsCuda, EncodeSampledBitPatterns) {
  const int64_t stride = 4099;
  const int64_t strided = (int64_t{1} << 32) / stride;
  auto every = [&](int64_t i) { return f32_from_bits(static_cast<uint32_t>(i * stride)); };
  EXPECT_EQ(count_encode_mismatches("strided bits", strided, every, moe::bf16_from_float,
                                    cuda_bf16_from_float),
            0);
  auto random = [](int64_t i) {
    return f32_from_bits(static_cast<uint32_t>(moe::rng_u64(17, 3, static_cast<uint64_t>(i))));
  };
  EXPECT_EQ(count_encode_mismatches("random bits", kRandomSamples, random, moe::bf16_from_float,
                                    cuda_bf16_from_float),
            0);
}

#else

TEST(Fp8VsCuda, CudaReferenceUnavailable) {
  GTEST_SKIP() << "built without the CUDA toolkit's headers: nothing to compare against";
}

#endif  // MOETRAIN_HAVE_CUDA_HEADERS

}  // namespace
