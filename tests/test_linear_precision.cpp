// The linear layer's three GEMMs in BF16 and FP8 (model/linear.h) against independent
// references: each input quantized by a straightforward scalar loop written here from the
// recipe's definition, then a double-precision GEMM. The emulation must feed OpenBLAS
// exactly those inputs (checked bit for bit on the scratch copies) and differ from the FP64
// result by FP32 accumulation only; against the unquantized FP32 layer it must stay within
// the error the format implies, and never produce a NaN.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "model/fp8.h"
#include "model/fp8_quant.h"
#include "model/kernels/cpu/dense_ops.h"
#include "model/kernels/cuda/gemm_plan.h"
#include "model/linear.h"
#include "model/rng.h"

namespace moe {
namespace {

// The CPU backend the linear layer runs on here.
moe::Ops<float>& cpu_ops() {
  static const std::unique_ptr<moe::Ops<float>> ops = moe::ops_cpu_create<float>();
  return *ops;
}

// Per-tile magnitudes spread over 1e-6 .. 1e3 so tiles get very different scales.
std::vector<float> random_matrix(int64_t R, int64_t C, uint64_t seed) {
  std::vector<float> m(static_cast<size_t>(R * C));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const double mag = std::pow(10.0, -6.0 + 9.0 * rng_uniform(seed, 1, static_cast<uint64_t>((r / 7) * 1000 + c / 50)));
      m[static_cast<size_t>(r * C + c)] =
          static_cast<float>(mag * (rng_uniform(seed, 2, static_cast<uint64_t>(r * C + c)) - 0.5));
    }
  return m;
}

// The recipe, element by element: tile amax, scale = amax clamped / 448, code of x / scale.
std::vector<float> reference_quantize(const std::vector<float>& x, int64_t R, int64_t C,
                                      int64_t tr, int64_t tc, PrecisionMode mode) {
  std::vector<float> out(x.size());
  if (mode == PrecisionMode::kBf16) {
    for (size_t i = 0; i < x.size(); ++i) out[i] = bf16_to_float(bf16_from_float(x[i]));
    return out;
  }
  for (int64_t r0 = 0; r0 < R; r0 += tr)
    for (int64_t c0 = 0; c0 < C; c0 += tc) {
      float amax = 0;
      for (int64_t r = r0; r < std::min(R, r0 + tr); ++r)
        for (int64_t c = c0; c < std::min(C, c0 + tc); ++c)
          amax = std::max(amax, std::fabs(x[static_cast<size_t>(r * C + c)]));
      const float scale = std::min(std::max(amax, 448.0f * FLT_MIN), FLT_MAX) / 448.0f;
      for (int64_t r = r0; r < std::min(R, r0 + tr); ++r)
        for (int64_t c = c0; c < std::min(C, c0 + tc); ++c) {
          const size_t i = static_cast<size_t>(r * C + c);
          out[i] = fp8_e4m3_to_float(fp8_e4m3_from_float(x[i] / scale)) * scale;
        }
    }
  return out;
}

// Of one (M, K) x (K, N) product, a[i, k] = A[i * sa_i + k * sa_k] etc.: the FP64 result and
// the sum of |a||b| that bounds every rounding error.
struct Gemm64 {
  std::vector<double> c, abs;
};
Gemm64 gemm64(const float* A, int64_t sa_i, int64_t sa_k, const float* B, int64_t sb_k,
              int64_t sb_j, int64_t M, int64_t N, int64_t K) {
  Gemm64 g{std::vector<double>(static_cast<size_t>(M * N)), std::vector<double>(static_cast<size_t>(M * N))};
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = 0, a = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double p = double(A[i * sa_i + k * sa_k]) * double(B[k * sb_k + j * sb_j]);
        s += p;
        a += std::fabs(p);
      }
      g.c[static_cast<size_t>(i * N + j)] = s;
      g.abs[static_cast<size_t>(i * N + j)] = a;
    }
  return g;
}

struct Case {
  PrecisionMode mode;
  int64_t N, IC, OC;
};

class LinearPrecision : public ::testing::TestWithParam<Case> {};

// got within FP32 accumulation of the FP64 reference, element by element (K terms: K 2^-24 of
// sum |a||b|, doubled for OpenBLAS's blocking), and within `format_rel` of the FP32 layer in
// norm: per element the error is at most format_rel sum |a||b| plus, for inputs below their
// tile's normal range, 2^-10 of the tile scale each, which no per-element bound on sum |a||b|
// can hold when a tile mixes magnitudes 1e9 apart (as here), but which vanishes in the norm.
void expect_product(const std::vector<float>& got, const Gemm64& ref, const Gemm64& fp32,
                    int64_t K, double format_rel, const std::vector<float>& base = {}) {
  const double acc_rel = 2.0 * static_cast<double>(K) * std::ldexp(1.0, -24);
  double diff2 = 0, abs2 = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double b = base.empty() ? 0.0 : double(base[i]);
    const double g = double(got[i]) - b;
    ASSERT_FALSE(std::isnan(got[i])) << i;
    // Accumulating into base rounds once more, by at most 2^-24 of the sum.
    const double add = std::ldexp(std::fabs(b + ref.c[i]), -24);
    ASSERT_LE(std::fabs(g - ref.c[i]), acc_rel * ref.abs[i] + add + 1e-30) << i;
    diff2 += (g - fp32.c[i]) * (g - fp32.c[i]);
    abs2 += fp32.abs[i] * fp32.abs[i];
  }
  const double rel = std::sqrt(diff2 / abs2);
  EXPECT_LE(rel, format_rel);
  // The quantization did change something (a test that cannot fail proves nothing).
  EXPECT_GT(rel, format_rel / 1000);
}

TEST_P(LinearPrecision, ThreeGemmsMatchQuantizedFp64Reference) {
  const Case c = GetParam();
  const bool fp8 = c.mode == PrecisionMode::kFp8;
  // Per element, each input is off by at most 1/17 (E4M3, normal range; tiny elements add
  // at most 2^-10 of their tile scale) or 2^-9 (BF16): a product by (1 + e)^2 - 1.
  const double e = fp8 ? 1.0 / 16 : std::ldexp(1.0, -8);
  const double format_rel = 2 * e + e * e;
  const std::vector<float> x = random_matrix(c.N, c.IC, 11), w = random_matrix(c.OC, c.IC, 12),
                           dy = random_matrix(c.N, c.OC, 13);
  const int64_t cap = c.N * std::max(c.IC, c.OC);
  std::vector<float> sa(static_cast<size_t>(cap)), sb(static_cast<size_t>(cap));
  const LinearScratch<float> s{sa.data(), sb.data(), cap};
  std::vector<float> wq(w.size());
  linear_quantize_weight<float>(cpu_ops(), wq.data(), w.data(), c.OC, c.IC, c.IC, c.mode);
  EXPECT_EQ(0, std::memcmp(wq.data(), reference_quantize(w, c.OC, c.IC, 128, 128, c.mode).data(),
                           wq.size() * sizeof(float)));
  {  // forward: out = x wq^T, x in 1x128 tiles along IC
    SCOPED_TRACE("forward");
    std::vector<float> out(static_cast<size_t>(c.N * c.OC));
    linear_forward<float>(cpu_ops(), out.data(), x.data(), wq.data(), c.N, c.IC, c.OC, c.mode, s);
    const std::vector<float> xq = reference_quantize(x, c.N, c.IC, 1, 128, c.mode);
    EXPECT_EQ(0, std::memcmp(sa.data(), xq.data(), xq.size() * sizeof(float)));
    expect_product(out, gemm64(xq.data(), c.IC, 1, wq.data(), 1, c.IC, c.N, c.OC, c.IC),
                   gemm64(x.data(), c.IC, 1, w.data(), 1, c.IC, c.N, c.OC, c.IC), c.IC,
                   format_rel);
  }
  {  // input gradient: dx = dy wq, dy in 1x128 tiles along OC
    SCOPED_TRACE("backward_input");
    std::vector<float> dx(static_cast<size_t>(c.N * c.IC));
    linear_backward_input<float>(cpu_ops(), dx.data(), dy.data(), wq.data(), c.N, c.IC, c.OC, c.mode, s);
    const std::vector<float> dyq = reference_quantize(dy, c.N, c.OC, 1, 128, c.mode);
    EXPECT_EQ(0, std::memcmp(sa.data(), dyq.data(), dyq.size() * sizeof(float)));
    expect_product(dx, gemm64(dyq.data(), c.OC, 1, wq.data(), c.IC, 1, c.N, c.IC, c.OC),
                   gemm64(dy.data(), c.OC, 1, w.data(), c.IC, 1, c.N, c.IC, c.OC), c.OC,
                   format_rel);
  }
  {  // weight gradient: dw += dy^T x, both in 128x1 tiles along the N tokens
    SCOPED_TRACE("backward_weight");
    const std::vector<float> base = random_matrix(c.OC, c.IC, 14);
    std::vector<float> dw = base;
    linear_backward_weight<float>(cpu_ops(), dw.data(), dy.data(), x.data(), c.N, c.IC, c.OC, c.mode, s);
    const std::vector<float> dyq = reference_quantize(dy, c.N, c.OC, 128, 1, c.mode);
    const std::vector<float> xq = reference_quantize(x, c.N, c.IC, 128, 1, c.mode);
    EXPECT_EQ(0, std::memcmp(sa.data(), dyq.data(), dyq.size() * sizeof(float)));
    EXPECT_EQ(0, std::memcmp(sb.data(), xq.data(), xq.size() * sizeof(float)));
    expect_product(dw, gemm64(dyq.data(), 1, c.OC, xq.data(), c.IC, 1, c.OC, c.IC, c.N),
                   gemm64(dy.data(), 1, c.OC, x.data(), c.IC, 1, c.OC, c.IC, c.N), c.N,
                   format_rel, base);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Modes, LinearPrecision,
    ::testing::Values(Case{PrecisionMode::kFp8, 37, 200, 130}, Case{PrecisionMode::kFp8, 256, 256, 384},
                      Case{PrecisionMode::kFp8, 130, 64, 129}, Case{PrecisionMode::kBf16, 37, 200, 130},
                      Case{PrecisionMode::kBf16, 256, 256, 384}),
    [](const ::testing::TestParamInfo<Case>& i) {
      return std::string(i.param.mode == PrecisionMode::kFp8 ? "Fp8" : "Bf16") + "N" +
             std::to_string(i.param.N) + "IC" + std::to_string(i.param.IC) + "OC" +
             std::to_string(i.param.OC);
    });

// Token blocks (a routed expert's rows from several EP ranks): each block's 128x1 tiles start
// at its own first row, bit for bit as if the blocks were quantized one by one, and the
// result differs from one block (so the blocks did change the tiles).
TEST(LinearPrecision, WeightGradientTilesRestartAtEveryBlock) {
  const int64_t N = 300, IC = 96, OC = 40;
  const int64_t blocks[] = {0, 70, 70, 250, 300};  // an empty block and 180 rows
  const std::vector<float> x = random_matrix(N, IC, 21), dy = random_matrix(N, OC, 22);
  const int64_t cap = N * IC;
  std::vector<float> sa(static_cast<size_t>(cap)), sb(static_cast<size_t>(cap));
  const LinearScratch<float> s{sa.data(), sb.data(), cap};
  std::vector<float> dw(static_cast<size_t>(OC * IC), 0.0f), dw_one = dw;
  linear_backward_weight<float>(cpu_ops(), dw.data(), dy.data(), x.data(), N, IC, OC, PrecisionMode::kFp8, s,
                                blocks, 4);
  std::vector<float> dyq(dy.size()), xq(x.size());
  for (int b = 0; b < 4; ++b) {
    const int64_t r0 = blocks[b], n = blocks[b + 1] - r0;
    const std::vector<float> dyb(dy.begin() + r0 * OC, dy.begin() + (r0 + n) * OC);
    const std::vector<float> xb(x.begin() + r0 * IC, x.begin() + (r0 + n) * IC);
    const std::vector<float> qd = reference_quantize(dyb, n, OC, 128, 1, PrecisionMode::kFp8);
    const std::vector<float> qx = reference_quantize(xb, n, IC, 128, 1, PrecisionMode::kFp8);
    std::copy(qd.begin(), qd.end(), dyq.begin() + r0 * OC);
    std::copy(qx.begin(), qx.end(), xq.begin() + r0 * IC);
  }
  EXPECT_EQ(0, std::memcmp(sa.data(), dyq.data(), dyq.size() * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(sb.data(), xq.data(), xq.size() * sizeof(float)));
  std::vector<float> ref(dw.size(), 0.0f);
  cpu::matmul_backward_weight<float>(ref.data(), dyq.data(), xq.data(), N, IC, OC);
  EXPECT_EQ(0, std::memcmp(dw.data(), ref.data(), dw.size() * sizeof(float)));
  linear_backward_weight<float>(cpu_ops(), dw_one.data(), dy.data(), x.data(), N, IC, OC,
                                PrecisionMode::kFp8, s);
  EXPECT_NE(0, std::memcmp(dw.data(), dw_one.data(), dw.size() * sizeof(float)));
}

// The forward saves its input in the GEMM input format; the weight gradient from the saved
// input is the report's recipe: BF16 exactly the gradient from the float input (BF16 rounds
// to itself), FP8 the 1x128 codes dequantized and quantized again in 128x1 tiles.
TEST(LinearPrecision, WeightGradientFromTheSavedInput) {
  const int64_t N = 200, IC = 160, OC = 72;
  const std::vector<float> x = random_matrix(N, IC, 31), w = random_matrix(OC, IC, 32),
                           dy = random_matrix(N, OC, 33);
  const int64_t cap = N * IC;
  std::vector<float> sa(static_cast<size_t>(cap)), sb(static_cast<size_t>(cap));
  const LinearScratch<float> s{sa.data(), sb.data(), cap};
  for (PrecisionMode mode : {PrecisionMode::kBf16, PrecisionMode::kFp8}) {
    SCOPED_TRACE(mode == PrecisionMode::kFp8 ? "fp8" : "bf16");
    std::vector<uint16_t> bf16(static_cast<size_t>(N * IC));
    std::vector<uint8_t> codes(static_cast<size_t>(N * IC));
    std::vector<float> scales(static_cast<size_t>(fp8_scale_count(N, IC, kTileAct)));
    const LinearSaved saved{bf16.data(), codes.data(), scales.data()};
    EXPECT_EQ(linear_saved_bytes(N, IC, mode),
              mode == PrecisionMode::kFp8 ? N * IC + N * 2 * 4 : N * IC * 2);
    std::vector<float> wq(w.size()), out(static_cast<size_t>(N * OC)), plain = out;
    linear_quantize_weight<float>(cpu_ops(), wq.data(), w.data(), OC, IC, IC, mode);
    linear_forward<float>(cpu_ops(), plain.data(), x.data(), wq.data(), N, IC, OC, mode, s);
    linear_forward<float>(cpu_ops(), out.data(), x.data(), wq.data(), N, IC, OC, mode, s, &saved);
    EXPECT_EQ(0, std::memcmp(out.data(), plain.data(), out.size() * sizeof(float)))
        << "saving changed the forward";
    // The forward's operand, restored from what was saved, is the 1x128 quantization.
    const std::vector<float> xq = reference_quantize(x, N, IC, 1, 128, mode);
    std::vector<float> restored(x.size());
    if (mode == PrecisionMode::kFp8) {
      fp8_dequantize(restored.data(), codes.data(), scales.data(), N, IC, kTileAct);
    } else {
      for (size_t i = 0; i < restored.size(); ++i) restored[i] = bf16_to_float(bf16[i]);
    }
    EXPECT_EQ(0, std::memcmp(restored.data(), xq.data(), xq.size() * sizeof(float)));
    std::vector<float> dw(static_cast<size_t>(OC * IC), 0.0f), ref = dw;
    const std::vector<float> garbage(x.size(), 1e30f);  // the float input is not read
    linear_backward_weight_saved<float>(cpu_ops(), dw.data(), dy.data(), garbage.data(), saved, N, IC, OC,
                                        mode, s);
    if (mode == PrecisionMode::kBf16) {
      linear_backward_weight<float>(cpu_ops(), ref.data(), dy.data(), x.data(), N, IC, OC, mode, s);
    } else {
      const std::vector<float> xt = reference_quantize(xq, N, IC, 128, 1, mode);
      const std::vector<float> dyt = reference_quantize(dy, N, OC, 128, 1, mode);
      cpu::matmul_backward_weight<float>(ref.data(), dyt.data(), xt.data(), N, IC, OC);
      // Quantizing twice is not quantizing once: the test can tell the two recipes apart.
      std::vector<float> once(dw.size(), 0.0f);
      linear_backward_weight<float>(cpu_ops(), once.data(), dy.data(), x.data(), N, IC, OC, mode, s);
      EXPECT_NE(0, std::memcmp(once.data(), ref.data(), ref.size() * sizeof(float)));
    }
    EXPECT_EQ(0, std::memcmp(dw.data(), ref.data(), dw.size() * sizeof(float)));
  }
}

// A backend that multiplies BF16 operands natively (Ops::gemm_bf16_native; the CUDA one on
// tensor cores) takes another path through the layer: the weight kept as bits, activations
// encoded to bits, gemm_bf16. The CPU's native mode decodes the bits and runs the same FP32
// GEMM as the emulation, so every output must be the emulation's, bit for bit: what this
// proves is the path's operands (which buffer, which rows, which transposes).
TEST(LinearPrecision, NativeBf16EqualsTheEmulation) {
  const std::unique_ptr<Ops<float>> native = ops_cpu_create<float>(/*native_bf16=*/true);
  ASSERT_TRUE(native->gemm_bf16_native());
  ASSERT_FALSE(cpu_ops().gemm_bf16_native());
  const PrecisionMode mode = PrecisionMode::kBf16;
  const int64_t N = 37, IC = 48, OC = 80, ld = 64;  // weight rows padded to ld
  const std::vector<float> x = random_matrix(N, IC, 41), dy = random_matrix(N, OC, 43);
  std::vector<float> w = random_matrix(OC, ld, 42);
  const int64_t cap = N * OC;
  std::vector<float> sa(static_cast<size_t>(cap)), sb(sa.size()), na(sa.size()), nb(sa.size());
  const LinearScratch<float> se{sa.data(), sb.data(), cap}, sn{na.data(), nb.data(), cap};

  std::vector<float> wq_n(w.size(), 0.0f);
  linear_quantize_weight<float>(*native, wq_n.data(), w.data(), OC, IC, ld, mode);
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(wq_n.data());
  for (int64_t r = 0; r < OC; ++r)
    for (int64_t c = 0; c < IC; ++c)
      ASSERT_EQ(bits[r * ld + c], bf16_from_float(w[static_cast<size_t>(r * ld + c)]))
          << r << "," << c;
  // The layer reads weights of row stride IC: repack both formats that way.
  std::vector<float> we(static_cast<size_t>(OC * IC)), wn(we.size()), w_packed(we.size());
  for (int64_t r = 0; r < OC; ++r)
    std::copy_n(w.begin() + r * ld, IC, w_packed.begin() + r * IC);
  linear_quantize_weight<float>(cpu_ops(), we.data(), w_packed.data(), OC, IC, IC, mode);
  linear_quantize_weight<float>(*native, wn.data(), w_packed.data(), OC, IC, IC, mode);
  ASSERT_NE(0, std::memcmp(we.data(), wn.data(), we.size() * sizeof(float)))
      << "the native weight is bits, not floats";

  const auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  std::vector<uint16_t> saved_e(static_cast<size_t>(N * IC)), saved_n(saved_e.size());
  const LinearSaved sv_e{saved_e.data(), nullptr, nullptr}, sv_n{saved_n.data(), nullptr, nullptr};
  std::vector<float> ye(static_cast<size_t>(N * OC)), yn(ye.size());
  linear_forward<float>(cpu_ops(), ye.data(), x.data(), we.data(), N, IC, OC, mode, se, &sv_e);
  linear_forward<float>(*native, yn.data(), x.data(), wn.data(), N, IC, OC, mode, sn, &sv_n);
  EXPECT_TRUE(same(ye, yn)) << "forward";
  EXPECT_EQ(saved_e, saved_n) << "the saved input";
  std::fill(yn.begin(), yn.end(), 0.0f);
  linear_forward<float>(*native, yn.data(), x.data(), wn.data(), N, IC, OC, mode, sn);
  EXPECT_TRUE(same(ye, yn)) << "forward without saving";
  const std::vector<float> garbage(x.size(), 1e30f);  // the float input is not read
  std::fill(yn.begin(), yn.end(), 0.0f);
  linear_forward_saved<float>(*native, yn.data(), garbage.data(), sv_n, wn.data(), N, IC, OC,
                              mode, sn);
  EXPECT_TRUE(same(ye, yn)) << "forward from the saved input";
  std::vector<float> ys(ye.size());
  linear_forward_saved<float>(cpu_ops(), ys.data(), garbage.data(), sv_e, we.data(), N, IC, OC,
                              mode, se);
  EXPECT_TRUE(same(ye, ys)) << "the emulation's forward from the saved input";

  for (bool accumulate : {false, true}) {
    SCOPED_TRACE(accumulate ? "dx accumulated" : "dx assigned");
    std::vector<float> dxe = random_matrix(N, IC, 44), dxn = dxe;
    linear_backward_input<float>(cpu_ops(), dxe.data(), dy.data(), we.data(), N, IC, OC, mode, se,
                                 accumulate);
    linear_backward_input<float>(*native, dxn.data(), dy.data(), wn.data(), N, IC, OC, mode, sn,
                                 accumulate);
    EXPECT_TRUE(same(dxe, dxn));
  }
  std::vector<float> dwe = random_matrix(OC, IC, 45), dwn = dwe, dws = dwe;
  linear_backward_weight<float>(cpu_ops(), dwe.data(), dy.data(), x.data(), N, IC, OC, mode, se);
  linear_backward_weight<float>(*native, dwn.data(), dy.data(), x.data(), N, IC, OC, mode, sn);
  EXPECT_TRUE(same(dwe, dwn)) << "weight gradient";
  linear_backward_weight_saved<float>(*native, dws.data(), dy.data(), garbage.data(), sv_n, N, IC,
                                      OC, mode, sn);
  EXPECT_TRUE(same(dwe, dws)) << "weight gradient from the saved input";
}

// Native FP8 (Ops::gemm_fp8_native; cuBLASLt's block-scaled GEMMs on Hopper): the weight
// copy holds codes, transposed codes and scale tables in the GEMM layouts; the activations are
// quantized into LinearScratch::fp8 with their rows padded to 16. The CPU's native mode
// decodes the codes and runs an FP32 GEMM, so every output must be the emulation's up to the
// order of the FP32 sums (the input gradient goes through W^T, the weight gradient through
// the transposed 128x1 codes, per block): what this proves is the path's operands.
TEST(LinearPrecision, NativeFp8MatchesTheEmulation) {
  const std::unique_ptr<Ops<float>> native = ops_cpu_create<float>(false, /*native_fp8=*/true);
  ASSERT_TRUE(native->gemm_fp8_native());
  ASSERT_FALSE(cpu_ops().gemm_fp8_native());
  const PrecisionMode mode = PrecisionMode::kFp8;
  const int64_t IC = 144, OC = 160;  // both widths end in a partial 128-wide tile or block
  const std::vector<float> w = random_matrix(OC, IC, 42);

  // The weight copy: W's codes, W^T's codes, both 128x128 scale tables in gemm_plan's layout.
  std::vector<float> we(w.size()), wn(w.size(), 0.0f);
  linear_quantize_weight<float>(cpu_ops(), we.data(), w.data(), OC, IC, IC, mode);
  linear_quantize_weight<float>(*native, wn.data(), w.data(), OC, IC, IC, mode);
  std::vector<uint8_t> codes(w.size());
  std::vector<float> sc(static_cast<size_t>(fp8_scale_count(OC, IC, kTileWeight)));
  fp8_quantize(codes.data(), sc.data(), w.data(), OC, IC, kTileWeight);
  const LinearFp8Weight l = linear_fp8_weight_layout(OC, IC);
  ASSERT_LE(l.total, static_cast<int64_t>(wn.size() * sizeof(float)));
  const uint8_t* packed = reinterpret_cast<const uint8_t*>(wn.data());
  EXPECT_EQ(0, std::memcmp(packed, codes.data(), codes.size())) << "W's codes";
  for (int64_t r = 0; r < OC; ++r)
    for (int64_t c = 0; c < IC; ++c)
      ASSERT_EQ(packed[l.codes_t + c * OC + r], codes[static_cast<size_t>(r * IC + c)]) << r << "," << c;
  const int64_t BO = (OC + 127) / 128, BI = (IC + 127) / 128;
  std::vector<float> sc_t(sc.size());
  for (int64_t p = 0; p < BO; ++p)
    for (int64_t b = 0; b < BI; ++b) sc_t[static_cast<size_t>(b * BO + p)] = sc[static_cast<size_t>(p * BI + b)];
  std::vector<float> want(static_cast<size_t>(cuda::fp8_gemm_scale_count(OC, IC, cuda::Fp8Scaling::kBlock128)));
  cuda::fp8_gemm_scales_from_quant(want.data(), sc.data(), OC, IC, cuda::Fp8Scaling::kBlock128);
  EXPECT_EQ(0, std::memcmp(packed + l.scales, want.data(), want.size() * sizeof(float))) << "W's scales";
  want.assign(static_cast<size_t>(cuda::fp8_gemm_scale_count(IC, OC, cuda::Fp8Scaling::kBlock128)), 0.0f);
  cuda::fp8_gemm_scales_from_quant(want.data(), sc_t.data(), IC, OC, cuda::Fp8Scaling::kBlock128);
  EXPECT_EQ(0, std::memcmp(packed + l.scales_t, want.data(), want.size() * sizeof(float))) << "W^T's scales";

  // got within 1e-5 of the sum of |products| of each element (raw values: quantization moves
  // them by at most 1/16) of want; a wrong operand is off by the products themselves.
  const auto close = [](const std::vector<float>& got, const std::vector<float>& ref,
                        const std::vector<double>& abs_sum) {
    for (size_t i = 0; i < ref.size(); ++i)
      if (!(std::fabs(double(got[i]) - ref[i]) <= 1e-5 * abs_sum[i] + 1e-30)) {
        ADD_FAILURE() << "element " << i << ": " << got[i] << " vs " << ref[i] << " (sum |products| " << abs_sum[i] << ")";
        return;
      }
  };
  // sum_k |A(i, k)| |B(j, k)| (+ |C0(i, j)|) over raw values, A (M, K) or, transposed, (K, M).
  const auto abs_gemm = [](const std::vector<float>& A, bool ta, const std::vector<float>& B, bool tb,
                           int64_t M, int64_t N, int64_t K, const std::vector<float>* C0) {
    std::vector<double> out(static_cast<size_t>(M * N));
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        double acc = C0 ? std::fabs(double((*C0)[static_cast<size_t>(i * N + j)])) : 0.0;
        for (int64_t k = 0; k < K; ++k)
          acc += std::fabs(double(A[static_cast<size_t>(ta ? k * M + i : i * K + k)])) *
                 std::fabs(double(B[static_cast<size_t>(tb ? k * N + j : j * K + k)]));
        out[static_cast<size_t>(i * N + j)] = acc;
      }
    return out;
  };
  for (int64_t N : {5, 32, 37}) {  // 5: only padded rows; 32: none; 37: 32 and 5 padded
    SCOPED_TRACE(::testing::Message() << N << " tokens");
    const std::vector<float> x = random_matrix(N, IC, 41), dy = random_matrix(N, OC, 43);
    // The native path's operands are bytes in the first buffer: a few rows more than N.
    const int64_t cap = std::max(N * std::max(IC, OC), (linear_fp8_scratch_bytes(N, IC, OC) + 3) / 4);
    EXPECT_LE(cap, (N + 32) * std::max(IC, OC));
    std::vector<float> sa(static_cast<size_t>(cap)), sb(sa.size()), na(sa.size(), 1e30f), nb(sa.size());
    const LinearScratch<float> se{sa.data(), sb.data(), cap}, sn{na.data(), nb.data(), cap};

    std::vector<uint8_t> codes_e(static_cast<size_t>(N * IC)), codes_n(codes_e.size());
    std::vector<float> scales_e(static_cast<size_t>(fp8_scale_count(N, IC, kTileAct))), scales_n(scales_e.size());
    const LinearSaved sv_e{nullptr, codes_e.data(), scales_e.data()};
    const LinearSaved sv_n{nullptr, codes_n.data(), scales_n.data()};
    std::vector<float> ye(static_cast<size_t>(N * OC)), yn(ye.size(), 7.0f);
    linear_forward<float>(cpu_ops(), ye.data(), x.data(), we.data(), N, IC, OC, mode, se, &sv_e);
    linear_forward<float>(*native, yn.data(), x.data(), wn.data(), N, IC, OC, mode, sn, &sv_n);
    const std::vector<double> fwd_abs = abs_gemm(x, false, w, false, N, OC, IC, nullptr);
    close(yn, ye, fwd_abs);
    EXPECT_EQ(codes_e, codes_n) << "the saved codes";
    EXPECT_EQ(0, std::memcmp(scales_e.data(), scales_n.data(), scales_e.size() * sizeof(float)));
    std::vector<float> y2(ye.size(), 7.0f);
    linear_forward<float>(*native, y2.data(), x.data(), wn.data(), N, IC, OC, mode, sn);
    EXPECT_EQ(0, std::memcmp(y2.data(), yn.data(), yn.size() * sizeof(float))) << "without saving";
    const std::vector<float> garbage(x.size(), 1e30f);  // the float input is not read
    std::fill(y2.begin(), y2.end(), 7.0f);
    linear_forward_saved<float>(*native, y2.data(), garbage.data(), sv_n, wn.data(), N, IC, OC, mode, sn);
    EXPECT_EQ(0, std::memcmp(y2.data(), yn.data(), yn.size() * sizeof(float))) << "from the saved input";

    for (bool accumulate : {false, true}) {
      SCOPED_TRACE(accumulate ? "dx accumulated" : "dx assigned");
      const std::vector<float> dx0 = random_matrix(N, IC, 44);
      std::vector<float> dxe = dx0, dxn = dx0;
      linear_backward_input<float>(cpu_ops(), dxe.data(), dy.data(), we.data(), N, IC, OC, mode, se, accumulate);
      linear_backward_input<float>(*native, dxn.data(), dy.data(), wn.data(), N, IC, OC, mode, sn, accumulate);
      close(dxn, dxe, abs_gemm(dy, false, w, true, N, IC, OC, accumulate ? &dx0 : nullptr));
    }
    const std::vector<float> dw0 = random_matrix(OC, IC, 45);
    const std::vector<double> wgrad_abs = abs_gemm(dy, true, x, true, OC, IC, N, &dw0);
    const int64_t blocks[3] = {0, 5, N};  // 5 and N - 5 rows: both padded, tiles restart at 5
    for (bool split : {false, true}) {
      SCOPED_TRACE(split ? "two blocks" : "one block");
      const int64_t* b = split ? blocks : nullptr;
      const int64_t nb_ = split ? 2 : 1;
      std::vector<float> dwe = dw0, dwn = dw0, dws = dw0, dwse = dw0;
      linear_backward_weight<float>(cpu_ops(), dwe.data(), dy.data(), x.data(), N, IC, OC, mode, se, b, nb_);
      linear_backward_weight<float>(*native, dwn.data(), dy.data(), x.data(), N, IC, OC, mode, sn, b, nb_);
      close(dwn, dwe, wgrad_abs);
      linear_backward_weight_saved<float>(cpu_ops(), dwse.data(), dy.data(), garbage.data(), sv_e, N, IC, OC, mode, se, b, nb_);
      linear_backward_weight_saved<float>(*native, dws.data(), dy.data(), garbage.data(), sv_n, N, IC, OC, mode, sn, b, nb_);
      close(dws, dwse, wgrad_abs);
      EXPECT_NE(0, std::memcmp(dwn.data(), dw0.data(), dw0.size() * sizeof(float)));
    }
  }
}

// fp32 is the plain layer, and the only mode the double instantiation takes.
TEST(LinearPrecision, Fp32IsThePlainGemm) {
  const std::vector<float> x = random_matrix(5, 7, 1), w = random_matrix(3, 7, 2);
  std::vector<float> out(15);
  linear_forward<float>(cpu_ops(), out.data(), x.data(), w.data(), 5, 7, 3, PrecisionMode::kFp32, {});
  const Gemm64 r = gemm64(x.data(), 7, 1, w.data(), 1, 7, 5, 3, 7);
  for (size_t i = 0; i < out.size(); ++i) EXPECT_NEAR(out[i], r.c[i], 1e-6 * r.abs[i] + 1e-30);
}

}  // namespace
}  // namespace moe
