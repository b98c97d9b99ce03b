// GPU twin tests of AdamW and of FP8 / BF16 quantization (model/kernels/cuda/quant_kernels.h)
// against the CPU functions, all BIT FOR BIT:
//   - AdamW: both sides run adamw_element (optim/adamw_math.h) from the same adamw_coeffs,
//     every operation one correctly rounded FP32 operation (the device side through _rn
//     intrinsics, which nvcc never fuses into FMAs; the CPU build does not contract either), so
//     there is no reason for even a 1-ulp difference, and any difference is a bug.
//   - FP8: the amax is an exact max and the scale, encode and decode are model/fp8_quant.h's
//     MOE_HD functions (single IEEE divisions / multiplications and integer work), so codes,
//     scales and values must be identical; the one exception is a NaN's payload, which the
//     comparison ignores (any NaN equals any NaN; both sides give 0x7FFFFFFF in practice).
//   - BF16 rounding is integer work: identical bits, NaN included.
// Shapes are odd (130 x 259, 71 x 229, one element, one column), with partial tiles at both
// edges, all-zero tiles, values beyond FP8's range, +-inf, NaN, subnormals, -0 and padded
// leading dimensions whose padding holds huge values the kernels must not read.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "gpu_test_util.h"
#include "model/fp8.h"
#include "model/fp8_quant.h"
#include "model/kernels/cuda/cuda_backend.h"
#include "model/kernels/cuda/quant_kernels.h"
#include "optim/adamw_cuda.h"
#include "optim/adamw.h"

namespace {

using moe_gpu_test::DeviceVec;
using moe_gpu_test::normal_floats;

// Bitwise equality, except that any NaN equals any NaN.
::testing::AssertionResult same_floats(const std::vector<float>& got,
                                       const std::vector<float>& want) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "sizes " << got.size() << " vs " << want.size();
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i]) && std::isnan(want[i])) continue;
    if (moe::f32_bits(got[i]) != moe::f32_bits(want[i]))
      return ::testing::AssertionFailure()
             << "index " << i << ": " << got[i] << " (0x" << std::hex << moe::f32_bits(got[i])
             << ") vs " << want[i] << " (0x" << moe::f32_bits(want[i]) << ")";
  }
  return ::testing::AssertionSuccess();
}

template <typename T>
::testing::AssertionResult same_ints(const std::vector<T>& got, const std::vector<T>& want) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "sizes " << got.size() << " vs " << want.size();
  for (size_t i = 0; i < got.size(); ++i)
    if (got[i] != want[i])
      return ::testing::AssertionFailure() << "index " << i << ": " << +got[i] << " vs "
                                           << +want[i];
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------- AdamW

// Gradients over 30 orders of magnitude, some zero, so every path of the arithmetic is used.
std::vector<float> adamw_grads(int64_t n, uint64_t step) {
  std::vector<float> g = normal_floats(static_cast<size_t>(n), 100 + step);
  for (int64_t i = 0; i < n; ++i) {
    if (i % 13 == 0) g[i] = 0.0f;
    else if (i % 7 == 0) g[i] *= 1e-20f;
    else if (i % 11 == 0) g[i] *= 1e10f;
  }
  return g;
}

moe::AdamWStep adamw_test_step(int64_t t) {
  moe::AdamWStep s;
  s.lr = 1e-3f * static_cast<float>(t);
  s.beta1 = 0.9f;
  s.beta2 = 0.95f;
  s.eps = 1e-8f;
  s.weight_decay = 0.1f;
  s.t = t;
  s.grad_scale = t % 2 ? 0.625f : 1.0f;
  return s;
}

TEST(CudaAdamW, MatchesCpuBitForBit) {
  SKIP_WITHOUT_GPU();
  const int64_t n = 100003;
  std::vector<float> p = normal_floats(n, 1), m(n, 0.0f), v(n, 0.0f);
  DeviceVec<float> dp(p), dm(m), dv(v);
  for (int64_t t = 1; t <= 6; ++t) {
    const moe::AdamWStep s = adamw_test_step(t);
    const bool decay = t % 3 != 0;
    const std::vector<float> g = adamw_grads(n, static_cast<uint64_t>(t));
    DeviceVec<float> dg(g);
    moe::cuda::adamw_update(dp.get(), dg.get(), dm.get(), dv.get(), n, s, decay, nullptr);
    moe::adamw_update(p.data(), g.data(), m.data(), v.data(), n, s, decay);
    moe::cuda::device_synchronize();
    ASSERT_TRUE(same_floats(dp.host(), p)) << "param, step " << t;
    ASSERT_TRUE(same_floats(dm.host(), m)) << "m, step " << t;
    ASSERT_TRUE(same_floats(dv.host(), v)) << "v, step " << t;
  }
  double moved = 0;
  const std::vector<float> p0 = normal_floats(n, 1);
  for (int64_t i = 0; i < n; ++i) moved += std::fabs(static_cast<double>(p[i]) - p0[i]);
  EXPECT_GT(moved, 1.0);  // the comparison is not of untouched parameters
}

TEST(CudaAdamW, Bf16MomentsMatchCpuBitForBit) {
  SKIP_WITHOUT_GPU();
  const int64_t n = 77777;
  std::vector<float> p = normal_floats(n, 2);
  std::vector<uint16_t> m(n, 0), v(n, 0);
  DeviceVec<float> dp(p);
  DeviceVec<uint16_t> dm(m), dv(v);
  moe::cuda::Stream stream = moe::cuda::stream_create();
  for (int64_t t = 1; t <= 6; ++t) {
    const moe::AdamWStep s = adamw_test_step(t);
    const std::vector<float> g = adamw_grads(n, static_cast<uint64_t>(t) + 50);
    DeviceVec<float> dg(g);
    moe::cuda::adamw_update_bf16(dp.get(), dg.get(), dm.get(), dv.get(), n, s, true, stream);
    moe::adamw_update_bf16(p.data(), g.data(), m.data(), v.data(), n, s, true);
    moe::cuda::stream_synchronize(stream);
    ASSERT_TRUE(same_floats(dp.host(), p)) << "param, step " << t;
    ASSERT_TRUE(same_ints(dm.host(), m)) << "m, step " << t;
    ASSERT_TRUE(same_ints(dv.host(), v)) << "v, step " << t;
  }
  moe::cuda::stream_destroy(stream);
}

TEST(CudaAdamW, EmptyIsANoOp) {
  SKIP_WITHOUT_GPU();
  moe::cuda::adamw_update(nullptr, nullptr, nullptr, nullptr, 0, adamw_test_step(1), true,
                          nullptr);
  moe::cuda::adamw_update_bf16(nullptr, nullptr, nullptr, nullptr, 0, adamw_test_step(1), true,
                               nullptr);
  moe::cuda::device_synchronize();
}

// ---------------------------------------------------------------- FP8

struct QuantCase {
  int64_t R, C;
  moe::Fp8Tile t;
};

void PrintTo(const QuantCase& c, std::ostream* os) {
  *os << c.R << "x" << c.C << " tile " << c.t.rows << "x" << c.t.cols;
}

// (R, ld) row-major: normal values whose magnitude varies by row and column block, the
// special values sprinkled, the first tile all zero, a tile below the scale floor, and the
// padding columns [C, ld) huge (a kernel reading them would change its tiles' scales).
std::vector<float> quant_input(int64_t R, int64_t C, int64_t ld, moe::Fp8Tile t, uint64_t seed) {
  std::vector<float> x = normal_floats(static_cast<size_t>(R * ld), seed);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < ld; ++c) {
      float& e = x[static_cast<size_t>(r * ld + c)];
      if (c >= C) {
        e = 3e38f;
        continue;
      }
      e *= std::pow(10.0f, static_cast<float>((r % 5) + (c / 64) % 3) - 3.0f);
    }
  const float specials[] = {3e38f, -FLT_MAX, std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(), 1e-40f, -1e-38f, -0.0f,
                            500.0f, -448.0f};
  const int64_t n = R * C;
  for (size_t k = 0; k < sizeof(specials) / sizeof(specials[0]); ++k) {
    const int64_t i = (static_cast<int64_t>(k) * 7919 + 31) % n;
    x[static_cast<size_t>((i / C) * ld + i % C)] = specials[k];
  }
  // The first tile all zero (one -0), the last row's first tile tiny (below the floor).
  for (int64_t r = 0; r < std::min(R, t.rows); ++r)
    for (int64_t c = 0; c < std::min(C, t.cols); ++c) x[static_cast<size_t>(r * ld + c)] = 0.0f;
  x[0] = -0.0f;
  if (R > t.rows)
    for (int64_t c = 0; c < std::min(C, t.cols); ++c)
      x[static_cast<size_t>((R - 1) * ld + c)] = 1e-37f * static_cast<float>(c % 3);
  return x;
}

int64_t count_nonzero(const std::vector<float>& x) {
  int64_t k = 0;
  for (float e : x) k += e != 0.0f;
  return k;
}

class CudaFp8Quant : public ::testing::TestWithParam<QuantCase> {};

TEST_P(CudaFp8Quant, CodesAndScalesMatchCpu) {
  SKIP_WITHOUT_GPU();
  const auto [R, C, t] = GetParam();
  const std::vector<float> x = quant_input(R, C, C, t, 3);
  ASSERT_TRUE(R * C == 1 || count_nonzero(x) > R * C / 4);  // the guard: not all zero
  const int64_t ns = moe::fp8_scale_count(R, C, t);
  std::vector<uint8_t> q(static_cast<size_t>(R * C));
  std::vector<float> scales(static_cast<size_t>(ns));
  moe::fp8_quantize(q.data(), scales.data(), x.data(), R, C, t);
  DeviceVec<float> dx(x);
  DeviceVec<uint8_t> dq(static_cast<size_t>(R * C));
  DeviceVec<float> dscales(static_cast<size_t>(ns));
  moe::cuda::fp8_quantize(dq.get(), dscales.get(), dx.get(), R, C, t, nullptr);
  moe::cuda::device_synchronize();
  EXPECT_TRUE(same_ints(dq.host(), q));
  EXPECT_TRUE(same_floats(dscales.host(), scales));
}

TEST_P(CudaFp8Quant, DequantizeMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const auto [R, C, t] = GetParam();
  const std::vector<float> x = quant_input(R, C, C, t, 4);
  const int64_t ns = moe::fp8_scale_count(R, C, t);
  std::vector<uint8_t> q(static_cast<size_t>(R * C));
  std::vector<float> scales(static_cast<size_t>(ns)), want(static_cast<size_t>(R * C));
  moe::fp8_quantize(q.data(), scales.data(), x.data(), R, C, t);
  moe::fp8_dequantize(want.data(), q.data(), scales.data(), R, C, t);
  DeviceVec<uint8_t> dq(q);
  DeviceVec<float> dscales(scales), dout(static_cast<size_t>(R * C));
  moe::cuda::fp8_dequantize(dout.get(), dq.get(), dscales.get(), R, C, t, nullptr);
  moe::cuda::device_synchronize();
  EXPECT_TRUE(same_floats(dout.host(), want));
}

TEST_P(CudaFp8Quant, FakeQuantizeMatchesCpuAlsoInPlace) {
  SKIP_WITHOUT_GPU();
  const auto [R, C, t] = GetParam();
  const std::vector<float> x = quant_input(R, C, C, t, 5);
  std::vector<float> want(static_cast<size_t>(R * C));
  moe::fp8_fake_quantize(want.data(), x.data(), R, C, t);
  DeviceVec<float> dx(x), dout(static_cast<size_t>(R * C));
  moe::cuda::fp8_fake_quantize(dout.get(), dx.get(), R, C, t, nullptr);
  moe::cuda::device_synchronize();
  EXPECT_TRUE(same_floats(dout.host(), want));
  EXPECT_TRUE(same_floats(dx.host(), x));  // the input is untouched
  moe::cuda::fp8_fake_quantize(dx.get(), dx.get(), R, C, t, nullptr);
  moe::cuda::device_synchronize();
  EXPECT_TRUE(same_floats(dx.host(), want)) << "in place";
}

// Leading dimensions wider than C: padding is neither read (huge values there) nor written.
TEST_P(CudaFp8Quant, LeadingDimensionsMatchCpu) {
  SKIP_WITHOUT_GPU();
  const auto [R, C, t] = GetParam();
  const int64_t ld_x = C + 3, ld_q = C + 5, ld_out = C + 2;
  const std::vector<float> x = quant_input(R, C, ld_x, t, 6);
  const int64_t ns = moe::fp8_scale_count(R, C, t);
  std::vector<uint8_t> q(static_cast<size_t>(R * ld_q), 0xAB);
  std::vector<float> scales(static_cast<size_t>(ns));
  std::vector<float> deq(static_cast<size_t>(R * ld_out), 7.0f);
  std::vector<float> fake(static_cast<size_t>(R * ld_out), 7.0f);
  moe::fp8_quantize_ld(q.data(), ld_q, scales.data(), x.data(), ld_x, R, C, t);
  moe::fp8_dequantize_ld(deq.data(), ld_out, q.data(), ld_q, scales.data(), R, C, t);
  moe::fp8_fake_quantize_ld(fake.data(), ld_out, x.data(), ld_x, R, C, t);
  DeviceVec<float> dx(x), dscales(static_cast<size_t>(ns));
  DeviceVec<uint8_t> dq(std::vector<uint8_t>(static_cast<size_t>(R * ld_q), 0xAB));
  DeviceVec<float> ddeq(std::vector<float>(static_cast<size_t>(R * ld_out), 7.0f));
  DeviceVec<float> dfake(std::vector<float>(static_cast<size_t>(R * ld_out), 7.0f));
  moe::cuda::fp8_quantize_ld(dq.get(), ld_q, dscales.get(), dx.get(), ld_x, R, C, t, nullptr);
  moe::cuda::fp8_dequantize_ld(ddeq.get(), ld_out, dq.get(), ld_q, dscales.get(), R, C, t,
                               nullptr);
  moe::cuda::fp8_fake_quantize_ld(dfake.get(), ld_out, dx.get(), ld_x, R, C, t, nullptr);
  moe::cuda::device_synchronize();
  EXPECT_TRUE(same_ints(dq.host(), q));
  EXPECT_TRUE(same_floats(dscales.host(), scales));
  EXPECT_TRUE(same_floats(ddeq.host(), deq));
  EXPECT_TRUE(same_floats(dfake.host(), fake));
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaFp8Quant,
    ::testing::Values(QuantCase{130, 259, moe::kTileAct}, QuantCase{130, 259, moe::kTileActT},
                      QuantCase{130, 259, moe::kTileWeight}, QuantCase{71, 229, moe::kTileAct},
                      QuantCase{71, 229, moe::kTileActT}, QuantCase{71, 229, moe::kTileWeight},
                      QuantCase{300, 1100, moe::kTileAct}, QuantCase{300, 1100, moe::kTileActT},
                      QuantCase{300, 1100, moe::kTileWeight}, QuantCase{1, 1, moe::kTileAct},
                      QuantCase{1, 1, moe::kTileWeight}, QuantCase{257, 1, moe::kTileActT},
                      QuantCase{3, 2049, moe::kTileAct}, QuantCase{130, 259, moe::Fp8Tile{3, 5}},
                      QuantCase{130, 259, moe::Fp8Tile{1, 1}},
                      QuantCase{40, 5000, moe::Fp8Tile{1, 4096}}));

TEST(CudaFp8QuantEdge, EmptyShapesAreNoOps) {
  SKIP_WITHOUT_GPU();
  for (moe::Fp8Tile t : {moe::kTileAct, moe::kTileActT, moe::kTileWeight}) {
    moe::cuda::fp8_quantize(nullptr, nullptr, nullptr, 0, 259, t, nullptr);
    moe::cuda::fp8_dequantize(nullptr, nullptr, nullptr, 130, 0, t, nullptr);
    moe::cuda::fp8_fake_quantize(nullptr, nullptr, 0, 0, t, nullptr);
  }
  moe::cuda::bf16_fake_quantize(nullptr, nullptr, 0, nullptr);
  moe::cuda::device_synchronize();
}

// ---------------------------------------------------------------- BF16

TEST(CudaBf16Round, MatchesCpuBitForBit) {
  SKIP_WITHOUT_GPU();
  const int64_t n = (1 << 20) + 12345;
  std::vector<float> x = normal_floats(static_cast<size_t>(n), 7);
  // Every float pattern class: ties (low half 0x8000 with even and odd upper halves), values
  // that round up into the exponent, past FLT_MAX to inf, subnormals, NaNs with payloads.
  for (int64_t i = 0; i < n; ++i) {
    if (i % 3 == 0) x[i] = moe::f32_from_bits(static_cast<uint32_t>(i * 2654435761u));
    if (i % 17 == 0) x[i] = moe::f32_from_bits((moe::f32_bits(x[i]) & 0xFFFF0000u) | 0x8000u);
  }
  const uint32_t edges[] = {0x7F7FFFFFu, 0xFF7FFFFFu, 0x7F800000u, 0xFF800000u, 0x7FC00001u,
                            0xFFFFFFFFu, 0x7F808000u, 0x00000001u, 0x80008000u, 0x3F80FFFFu};
  for (size_t k = 0; k < sizeof(edges) / sizeof(edges[0]); ++k)
    x[k * 1000] = moe::f32_from_bits(edges[k]);
  std::vector<float> want(static_cast<size_t>(n));
  moe::bf16_fake_quantize(want.data(), x.data(), n);
  DeviceVec<float> dx(x), dout(static_cast<size_t>(n));
  moe::cuda::bf16_fake_quantize(dout.get(), dx.get(), n, nullptr);
  moe::cuda::device_synchronize();
  const std::vector<float> got = dout.host();
  for (int64_t i = 0; i < n; ++i)  // bitwise, NaN payloads included (integer arithmetic)
    ASSERT_EQ(moe::f32_bits(got[i]), moe::f32_bits(want[i])) << i;
  moe::cuda::bf16_fake_quantize(dx.get(), dx.get(), n, nullptr);  // in place
  moe::cuda::device_synchronize();
  const std::vector<float> in_place = dx.host();
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(moe::f32_bits(in_place[i]), moe::f32_bits(want[i]));
}

}  // namespace
