// The native-FP8 building blocks of the backend interface (model/ops.h) on the CPU, against
// independent references: Ops::transpose against an index loop written here, and
// Ops::gemm_fp8 (E4M3 codes with scales in cuBLASLt's layouts, gemm_plan.h) against a
// double-precision product of the values fp8_dequantize gives for fp8_quantize's own layout.
// The scale layouts are made the way a linear layer will make them on a device: 1x128 scales
// by Ops::transpose of fp8_quantize's (R, L), 128x128 ones by copy_rows into rows of L4.
// The CUDA twins are checked against these in tests/gpu/test_cuda_ops.cpp.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "model/fp8_quant.h"
#include "model/kernels/cuda/gemm_plan.h"
#include "model/ops.h"
#include "model/rng.h"

namespace moe {
namespace {

using cuda::Fp8Scaling;

std::vector<float> normal(int64_t n, uint64_t seed, double scale) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    v[static_cast<size_t>(i)] = static_cast<float>(scale * rng_normal(seed, 3, static_cast<uint64_t>(i)));
  return v;
}

TEST(OpsTranspose, EveryElementSizeMovesEveryElement) {
  const std::unique_ptr<Ops<float>> ops = ops_cpu_create<float>();
  struct Shape {
    int64_t R, C;
  };
  for (const Shape sh : {Shape{37, 29}, Shape{1, 50}, Shape{50, 1}, Shape{128, 256}}) {
    SCOPED_TRACE(::testing::Message() << sh.R << "x" << sh.C);
    const int64_t n = sh.R * sh.C;
    std::vector<uint32_t> src(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) src[static_cast<size_t>(i)] = static_cast<uint32_t>(rng_u64(5, 1, static_cast<uint64_t>(i)));
    for (size_t e : {size_t{1}, size_t{2}, size_t{4}}) {
      std::vector<unsigned char> in(static_cast<size_t>(n) * e), out(in.size(), 0xAB), back(in.size());
      for (int64_t i = 0; i < n; ++i) std::memcpy(&in[static_cast<size_t>(i) * e], &src[static_cast<size_t>(i)], e);
      ops->transpose(out.data(), in.data(), sh.R, sh.C, e);
      for (int64_t r = 0; r < sh.R; ++r)
        for (int64_t c = 0; c < sh.C; ++c)
          ASSERT_EQ(0, std::memcmp(&out[static_cast<size_t>(c * sh.R + r) * e],
                                   &in[static_cast<size_t>(r * sh.C + c) * e], e))
              << e << " bytes, (" << r << ", " << c << ")";
      ops->transpose(back.data(), out.data(), sh.C, sh.R, e);
      EXPECT_EQ(in, back);
    }
  }
}

// x (R, K) quantized as the mode's tiles: codes, scales in the GEMM layout (made with the
// backend's own calls) and the dequantized values (fp8_quantize's layout, fp8_dequantize).
struct Fp8Operand {
  std::vector<uint8_t> codes;
  std::vector<float> gemm_scales, values;
};
Fp8Operand quantize_operand(Ops<float>& ops, const std::vector<float>& x, int64_t R, int64_t K,
                            Fp8Scaling mode) {
  const Fp8Tile t = mode == Fp8Scaling::kTile1x128 ? kTileAct : kTileWeight;
  Fp8Operand o;
  o.codes.resize(x.size());
  std::vector<float> scales(static_cast<size_t>(fp8_scale_count(R, K, t)));
  ops.fp8_quantize(o.codes.data(), scales.data(), x.data(), R, K, t);
  o.values.resize(x.size());
  fp8_dequantize(o.values.data(), o.codes.data(), scales.data(), R, K, t);
  o.gemm_scales.assign(static_cast<size_t>(cuda::fp8_gemm_scale_count(R, K, mode)), -1.0f);
  const int64_t L = cuda::fp8_gemm_ktiles(K);
  if (mode == Fp8Scaling::kTile1x128) {
    ops.transpose(o.gemm_scales.data(), scales.data(), R, L, sizeof(float));
  } else {
    const int64_t L4 = cuda::fp8_gemm_block_scale_ld(K), P = (R + 127) / 128;
    ops.zero(o.gemm_scales.data(), o.gemm_scales.size() * sizeof(float));
    ops.copy_rows(o.gemm_scales.data(), L4, scales.data(), L, P, L);
  }
  std::vector<float> want(o.gemm_scales.size());
  cuda::fp8_gemm_scales_from_quant(want.data(), scales.data(), R, K, mode);
  EXPECT_EQ(0, std::memcmp(want.data(), o.gemm_scales.data(), want.size() * sizeof(float)))
      << "the layout made by the backend's calls is gemm_plan's";
  return o;
}

TEST(OpsGemmFp8, CpuMatchesDoubleReferenceInEveryScaleLayout) {
  const std::unique_ptr<Ops<float>> ops = ops_cpu_create<float>();
  EXPECT_FALSE(ops->gemm_fp8_native());
  struct Case {
    int64_t M, N, K;
    Fp8Scaling a, b;
  };
  const Case cases[] = {
      {37, 29, 300, Fp8Scaling::kTile1x128, Fp8Scaling::kBlock128},   // forward / dgrad
      {200, 136, 144, Fp8Scaling::kTile1x128, Fp8Scaling::kTile1x128}, // wgrad
      {29, 140, 256, Fp8Scaling::kBlock128, Fp8Scaling::kTile1x128},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << c.M << "x" << c.N << "x" << c.K << " modes "
                                      << int(c.a) << int(c.b));
    const std::vector<float> a = normal(c.M * c.K, 1, 3.0), b = normal(c.N * c.K, 2, 0.01);
    const Fp8Operand qa = quantize_operand(*ops, a, c.M, c.K, c.a);
    const Fp8Operand qb = quantize_operand(*ops, b, c.N, c.K, c.b);
    const int64_t ldc = c.N + 3;
    for (float beta : {0.0f, -0.5f}) {
      std::vector<float> C = normal(c.M * ldc, 3, 1.0), C0 = C;
      ops->gemm_fp8(c.M, c.N, c.K, qa.codes.data(), qa.gemm_scales.data(), c.a, qb.codes.data(),
                    qb.gemm_scales.data(), c.b, beta, C.data(), ldc);
      for (int64_t i = 0; i < c.M; ++i) {
        for (int64_t j = 0; j < c.N; ++j) {
          double s = 0, abs = 0;
          for (int64_t k = 0; k < c.K; ++k) {
            const double p = double(qa.values[static_cast<size_t>(i * c.K + k)]) *
                             qb.values[static_cast<size_t>(j * c.K + k)];
            s += p;
            abs += std::fabs(p);
          }
          const double want = s + beta * double(C0[static_cast<size_t>(i * ldc + j)]);
          ASSERT_NEAR(C[static_cast<size_t>(i * ldc + j)], want,
                      1e-5 * (abs + std::fabs(want)) + 1e-30)
              << i << "," << j;
        }
        for (int64_t j = c.N; j < ldc; ++j)  // padding untouched
          ASSERT_EQ(C[static_cast<size_t>(i * ldc + j)], C0[static_cast<size_t>(i * ldc + j)]);
      }
    }
  }
}

TEST(OpsGemmFp8DeathTest, TwoBlockScaledInputsAreRefused) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const std::unique_ptr<Ops<float>> ops = ops_cpu_create<float>();
  std::vector<uint8_t> q(16 * 16, 0);
  std::vector<float> s(4, 1.0f), C(16 * 16);
  EXPECT_DEATH(ops->gemm_fp8(16, 16, 16, q.data(), s.data(), Fp8Scaling::kBlock128, q.data(),
                             s.data(), Fp8Scaling::kBlock128, 0.0f, C.data(), 16),
               "two 128x128-scaled inputs");
}

}  // namespace
}  // namespace moe
