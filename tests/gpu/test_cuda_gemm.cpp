// GPU twin tests of the GEMM layer (model/kernels/cuda/gemm_cublas.h) against the CPU:
// fp32 / tf32 against cpu::gemm over every transpose with padded leading dimensions; bf16
// against the bf16 linear path; FP8 block-scaled against the CPU's FP8 emulation on the same
// quantized inputs (forward, input gradient, weight gradient); grouped expert GEMMs with
// empty experts; the peak FLOP/s measurement. Each test skips without a device (FP8 without
// sm_90).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "model/fp8.h"
#include "model/fp8_quant.h"
#include "model/kernels/cpu/dense_ops.h"
#include "model/kernels/cuda/gemm_cublas.h"
#include "model/linear.h"
#include "tests/gpu/gpu_test_util.h"

namespace {

// The CPU backend the linear layer runs on here.
moe::Ops<float>& cpu_ops() {
  static const std::unique_ptr<moe::Ops<float>> ops = moe::ops_cpu_create<float>();
  return *ops;
}

using moe::PrecisionMode;
using moe_gpu_test::all_close;
using moe_gpu_test::DeviceVec;
using moe_gpu_test::normal_floats;
using namespace moe::cuda;

// A context over a device workspace, on the legacy default stream (DeviceVec's copies are
// synchronous with it).
class Ctx {
 public:
  Ctx() : ws_(gemm_workspace_bytes(9)), ctx_(gemm_context_create(ws_.get(), ws_.size(), nullptr)) {}
  ~Ctx() { gemm_context_destroy(ctx_); }
  GemmContext& operator*() { return *ctx_; }

 private:
  DeviceVec<uint8_t> ws_;
  GemmContext* ctx_;
};

std::vector<uint16_t> to_bf16(const std::vector<float>& x) {
  std::vector<uint16_t> b(x.size());
  for (size_t i = 0; i < x.size(); ++i) b[i] = moe::bf16_from_float(x[i]);
  return b;
}

std::vector<float> transpose(const std::vector<float>& x, int64_t R, int64_t C) {
  std::vector<float> t(x.size());
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) t[c * R + r] = x[r * C + c];
  return t;
}

std::vector<float> abs_of(const std::vector<float>& x) {
  std::vector<float> a(x.size());
  for (size_t i = 0; i < x.size(); ++i) a[i] = std::fabs(x[i]);
  return a;
}

// An FP8 GEMM input: codes, scales in fp8_quantize's layout, their dequantized values, and
// the scales in the GEMM layout (gemm_plan.h).
struct Fp8Input {
  std::vector<uint8_t> codes;
  std::vector<float> q_scales, values, gemm_scales;
};

Fp8Input fp8_input(const std::vector<float>& x, int64_t R, int64_t K, Fp8Scaling s) {
  const moe::Fp8Tile t = s == Fp8Scaling::kTile1x128 ? moe::kTileAct : moe::kTileWeight;
  Fp8Input in;
  in.codes.resize(static_cast<size_t>(R * K));
  in.q_scales.resize(static_cast<size_t>(moe::fp8_scale_count(R, K, t)));
  in.values.resize(static_cast<size_t>(R * K));
  in.gemm_scales.resize(static_cast<size_t>(fp8_gemm_scale_count(R, K, s)));
  moe::fp8_quantize(in.codes.data(), in.q_scales.data(), x.data(), R, K, t);
  moe::fp8_dequantize(in.values.data(), in.codes.data(), in.q_scales.data(), R, K, t);
  fp8_gemm_scales_from_quant(in.gemm_scales.data(), in.q_scales.data(), R, K, s);
  return in;
}

// Values whose 1x128 tiles and 128x128 blocks have scales apart by powers of two, so a
// scale applied to the wrong tile shows.
std::vector<float> tiled_floats(int64_t R, int64_t C, uint64_t seed, float scale) {
  std::vector<float> x = normal_floats(static_cast<size_t>(R * C), seed, scale);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c)
      x[r * C + c] *= std::ldexp(1.0f, static_cast<int>((r % 3) + 2 * ((c / 128) % 2) +
                                                        (r / 128) % 2) - 2);
  return x;
}

// |got - want| <= 1e-6 + rtol * bound elementwise; bound = |A| |B| (the sum of |terms|).
::testing::AssertionResult within_bound(const std::vector<float>& got,
                                        const std::vector<float>& want,
                                        const std::vector<float>& bound, double rtol) {
  if (got.size() != want.size() || bound.size() != want.size())
    return ::testing::AssertionFailure() << "sizes";
  for (size_t i = 0; i < got.size(); ++i)
    if (!(std::fabs(double(got[i]) - want[i]) <= 1e-6 + rtol * bound[i]))
      return ::testing::AssertionFailure()
             << "index " << i << ": " << got[i] << " vs " << want[i] << " (bound " << bound[i]
             << ")";
  return ::testing::AssertionSuccess();
}

bool any_nonzero(const std::vector<float>& v) {
  for (float x : v)
    if (x != 0.0f) return true;
  return false;
}

// ---- fp32 / tf32 --------------------------------------------------------------------------

void check_f32(Fp32Math math, double atol, double rtol) {
  Ctx ctx;
  const int64_t M = 37, N = 29, K = 71;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb)
      for (int zero_beta = 0; zero_beta < 2; ++zero_beta) {
        const int64_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 5, ldc = N + 2;
        const std::vector<float> A = normal_floats(static_cast<size_t>((ta ? K : M) * lda), 11);
        const std::vector<float> B = normal_floats(static_cast<size_t>((tb ? N : K) * ldb), 12);
        std::vector<float> C = normal_floats(static_cast<size_t>(M * ldc), 13);
        // beta == 0 must not read C: poison it.
        if (zero_beta) C.assign(C.size(), std::numeric_limits<float>::quiet_NaN());
        const float alpha = 0.75f, beta = zero_beta ? 0.0f : -0.5f;
        DeviceVec<float> dA(A), dB(B), dC(C);
        gemm_f32(*ctx, ta, tb, M, N, K, alpha, dA.get(), lda, dB.get(), ldb, beta, dC.get(), ldc,
                 math);
        std::vector<float> want = C;
        moe::cpu::gemm<float>(ta, tb, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta,
                              want.data(), ldc);
        // The padding columns of C must be untouched (NaN stays NaN: compare them apart).
        std::vector<float> got = dC.host();
        for (int64_t i = 0; i < M; ++i)
          for (int64_t j = N; j < ldc; ++j) {
            const size_t k = static_cast<size_t>(i * ldc + j);
            EXPECT_TRUE(got[k] == C[k] || (std::isnan(got[k]) && std::isnan(C[k])));
            got[k] = want[k] = 0.0f;
          }
        EXPECT_TRUE(any_nonzero(want));
        EXPECT_TRUE(all_close(got, want, atol, rtol)) << "ta " << ta << " tb " << tb
                                                     << " zero_beta " << zero_beta;
      }
}

TEST(CudaGemm, Fp32AllTransposes) {
  SKIP_WITHOUT_GPU();
  check_f32(Fp32Math::kFp32, 1e-4, 1e-4);
}

TEST(CudaGemm, Tf32AllTransposes) {
  SKIP_WITHOUT_GPU();
  check_f32(Fp32Math::kTf32, 5e-2, 1e-2);
}

TEST(CudaGemm, EmptyReductionScalesC) {
  SKIP_WITHOUT_GPU();
  Ctx ctx;
  const int64_t M = 5, N = 7, ldc = 9;
  std::vector<float> C = normal_floats(static_cast<size_t>(M * ldc), 21);
  DeviceVec<float> dC(C), dummy(16);
  gemm_f32(*ctx, false, false, M, N, 0, 1.0f, dummy.get(), 1, dummy.get(), N, 0.5f, dC.get(),
           ldc);
  std::vector<float> want = C;
  moe::cpu::gemm<float>(false, false, M, N, 0, 1.0f, dummy.host().data(), 1, dummy.host().data(),
                        N, 0.5f, want.data(), ldc);
  EXPECT_TRUE(all_close(dC.host(), want, 0.0, 0.0));
  std::vector<float> nan(C.size(), std::numeric_limits<float>::quiet_NaN());
  DeviceVec<float> dN(nan);
  gemm_f32(*ctx, false, false, M, N, 0, 1.0f, dummy.get(), 1, dummy.get(), N, 0.0f, dN.get(),
           ldc);
  const std::vector<float> got = dN.host();
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) EXPECT_EQ(got[static_cast<size_t>(i * ldc + j)], 0.0f);
}

// ---- bf16 against the bf16 linear path -----------------------------------------------------

TEST(CudaGemm, Bf16MatchesLinearBf16) {
  SKIP_WITHOUT_GPU();
  Ctx ctx;
  const int64_t N = 48, IC = 192, OC = 80;
  const std::vector<float> x = normal_floats(static_cast<size_t>(N * IC), 31);
  const std::vector<float> w = normal_floats(static_cast<size_t>(OC * IC), 32, 0.1f);
  const std::vector<float> dout = normal_floats(static_cast<size_t>(N * OC), 33);
  std::vector<float> wq(w.size());
  moe::linear_quantize_weight<float>(cpu_ops(), wq.data(), w.data(), OC, IC, IC, PrecisionMode::kBf16);
  const int64_t cap = N * std::max(IC, OC);
  std::vector<float> sa(static_cast<size_t>(cap)), sb(static_cast<size_t>(cap));
  const moe::LinearScratch<float> s{sa.data(), sb.data(), cap};

  std::vector<float> y(static_cast<size_t>(N * OC)), dx(static_cast<size_t>(N * IC));
  std::vector<float> dw = normal_floats(static_cast<size_t>(OC * IC), 34);
  const std::vector<float> dw0 = dw;
  moe::linear_forward<float>(cpu_ops(), y.data(), x.data(), wq.data(), N, IC, OC, PrecisionMode::kBf16, s);
  moe::linear_backward_input<float>(cpu_ops(), dx.data(), dout.data(), wq.data(), N, IC, OC,
                                    PrecisionMode::kBf16, s);
  moe::linear_backward_weight<float>(cpu_ops(), dw.data(), dout.data(), x.data(), N, IC, OC,
                                     PrecisionMode::kBf16, s);

  DeviceVec<uint16_t> dx_b(to_bf16(x)), dw_b(to_bf16(wq)), ddout_b(to_bf16(dout));
  DeviceVec<float> dy(static_cast<size_t>(N * OC)), ddx(static_cast<size_t>(N * IC)), ddw(dw0);
  gemm_bf16(*ctx, false, true, N, OC, IC, 1.0f, dx_b.get(), IC, dw_b.get(), IC, 0.0f, dy.get(),
            OC);
  gemm_bf16(*ctx, false, false, N, IC, OC, 1.0f, ddout_b.get(), OC, dw_b.get(), IC, 0.0f,
            ddx.get(), IC);
  gemm_bf16(*ctx, true, false, OC, IC, N, 1.0f, ddout_b.get(), OC, dx_b.get(), IC, 1.0f,
            ddw.get(), IC);
  EXPECT_TRUE(any_nonzero(y));
  EXPECT_TRUE(all_close(dy.host(), y, 1e-3, 1e-3));
  EXPECT_TRUE(all_close(ddx.host(), dx, 1e-3, 1e-3));
  EXPECT_TRUE(all_close(ddw.host(), dw, 1e-3, 1e-3));
}

// ---- FP8 against the FP8 emulation ---------------------------------------------------------

#define SKIP_WITHOUT_FP8(ctx)                                                      \
  do {                                                                             \
    if (!gemm_fp8_block_scaling_supported(*ctx))                                   \
      GTEST_SKIP() << "FP8 block-scaled cuBLASLt GEMMs need an sm_90 device";       \
  } while (0)

// Odd-sized edges: partial 1x128 tiles and 128x128 blocks on every side.
constexpr int64_t kN = 68, kIC = 320, kOC = 272;
constexpr double kFp8Rtol = 2e-3;  // of sum |a b|: FP32 vs the tensor cores' accumulation

TEST(CudaGemm, Fp8ForwardMatchesLinearFp8) {
  SKIP_WITHOUT_GPU();
  Ctx ctx;
  SKIP_WITHOUT_FP8(ctx);
  const std::vector<float> x = tiled_floats(kN, kIC, 41, 1.0f);
  const std::vector<float> w = tiled_floats(kOC, kIC, 42, 0.05f);
  std::vector<float> wq(w.size());
  moe::linear_quantize_weight<float>(cpu_ops(), wq.data(), w.data(), kOC, kIC, kIC, PrecisionMode::kFp8);
  const int64_t cap = kN * std::max(kIC, kOC);
  std::vector<float> sa(static_cast<size_t>(cap)), sb(static_cast<size_t>(cap));
  const moe::LinearScratch<float> s{sa.data(), sb.data(), cap};
  std::vector<uint8_t> codes(static_cast<size_t>(kN * kIC));
  std::vector<float> scales(static_cast<size_t>(moe::fp8_scale_count(kN, kIC, moe::kTileAct)));
  const moe::LinearSaved saved{nullptr, codes.data(), scales.data()};
  std::vector<float> y(static_cast<size_t>(kN * kOC));
  moe::linear_forward<float>(cpu_ops(), y.data(), x.data(), wq.data(), kN, kIC, kOC, PrecisionMode::kFp8, s,
                             &saved);

  // The same quantized inputs: the forward's saved codes and scales, W's 128x128 blocks.
  const Fp8Input W = fp8_input(w, kOC, kIC, Fp8Scaling::kBlock128);
  ASSERT_EQ(W.values, wq);  // linear_quantize_weight is exactly this quantization
  std::vector<float> xs(static_cast<size_t>(fp8_gemm_scale_count(kN, kIC, Fp8Scaling::kTile1x128)));
  fp8_gemm_scales_from_quant(xs.data(), scales.data(), kN, kIC, Fp8Scaling::kTile1x128);
  std::vector<float> xv(x.size());
  moe::fp8_dequantize(xv.data(), codes.data(), scales.data(), kN, kIC, moe::kTileAct);

  DeviceVec<uint8_t> dxc(codes), dwc(W.codes);
  DeviceVec<float> dxs(xs), dws(W.gemm_scales), dy(static_cast<size_t>(kN * kOC));
  gemm_fp8(*ctx, false, true, kN, kOC, kIC, 1.0f, dxc.get(), kIC, dxs.get(),
           Fp8Scaling::kTile1x128, dwc.get(), kIC, dws.get(), Fp8Scaling::kBlock128, 0.0f,
           dy.get(), kOC);
  std::vector<float> bound(y.size());
  moe::cpu::gemm<float>(false, true, kN, kOC, kIC, 1.0f, abs_of(xv).data(), kIC,
                        abs_of(W.values).data(), kIC, 0.0f, bound.data(), kOC);
  EXPECT_TRUE(any_nonzero(y));
  EXPECT_TRUE(within_bound(dy.host(), y, bound, kFp8Rtol));
}

TEST(CudaGemm, Fp8InputGradientMatchesLinearFp8) {
  SKIP_WITHOUT_GPU();
  Ctx ctx;
  SKIP_WITHOUT_FP8(ctx);
  const std::vector<float> dout = tiled_floats(kN, kOC, 51, 1.0f);
  const std::vector<float> w = tiled_floats(kOC, kIC, 52, 0.05f);
  std::vector<float> wq(w.size());
  moe::linear_quantize_weight<float>(cpu_ops(), wq.data(), w.data(), kOC, kIC, kIC, PrecisionMode::kFp8);
  const int64_t cap = kN * std::max(kIC, kOC);
  std::vector<float> sa(static_cast<size_t>(cap)), sb(static_cast<size_t>(cap));
  const moe::LinearScratch<float> s{sa.data(), sb.data(), cap};
  std::vector<float> dx(static_cast<size_t>(kN * kIC));
  moe::linear_backward_input<float>(cpu_ops(), dx.data(), dout.data(), wq.data(), kN, kIC, kOC,
                                    PrecisionMode::kFp8, s);

  // dY in 1x128 tiles along OC; W transposed (IC, OC): its blocks are W's blocks transposed.
  const Fp8Input D = fp8_input(dout, kN, kOC, Fp8Scaling::kTile1x128);
  const Fp8Input Wt = fp8_input(transpose(w, kOC, kIC), kIC, kOC, Fp8Scaling::kBlock128);
  ASSERT_EQ(Wt.values, transpose(wq, kOC, kIC));
  DeviceVec<uint8_t> ddc(D.codes), dwc(Wt.codes);
  DeviceVec<float> dds(D.gemm_scales), dws(Wt.gemm_scales), ddx(static_cast<size_t>(kN * kIC));
  gemm_fp8(*ctx, false, true, kN, kIC, kOC, 1.0f, ddc.get(), kOC, dds.get(),
           Fp8Scaling::kTile1x128, dwc.get(), kOC, dws.get(), Fp8Scaling::kBlock128, 0.0f,
           ddx.get(), kIC);
  std::vector<float> bound(dx.size());
  moe::cpu::gemm<float>(false, true, kN, kIC, kOC, 1.0f, abs_of(D.values).data(), kOC,
                        abs_of(Wt.values).data(), kOC, 0.0f, bound.data(), kIC);
  EXPECT_TRUE(any_nonzero(dx));
  EXPECT_TRUE(within_bound(ddx.host(), dx, bound, kFp8Rtol));
}

TEST(CudaGemm, Fp8WeightGradientMatchesLinearFp8) {
  SKIP_WITHOUT_GPU();
  Ctx ctx;
  SKIP_WITHOUT_FP8(ctx);
  const int64_t T = 144;  // tokens: K of this GEMM, a partial 128-token tile
  const std::vector<float> dout = tiled_floats(T, kOC, 61, 1.0f);
  const std::vector<float> x = tiled_floats(T, kIC, 62, 1.0f);
  std::vector<float> dw = normal_floats(static_cast<size_t>(kOC * kIC), 63);
  const std::vector<float> dw0 = dw;
  const int64_t cap = T * std::max(kIC, kOC);
  std::vector<float> sa(static_cast<size_t>(cap)), sb(static_cast<size_t>(cap));
  const moe::LinearScratch<float> s{sa.data(), sb.data(), cap};
  moe::linear_backward_weight<float>(cpu_ops(), dw.data(), dout.data(), x.data(), T, kIC, kOC,
                                     PrecisionMode::kFp8, s);

  // dY^T (OC, T) and X^T (IC, T) in 1x128 tiles along T: the 128x1 tiles of dY and X.
  const Fp8Input Dt = fp8_input(transpose(dout, T, kOC), kOC, T, Fp8Scaling::kTile1x128);
  const Fp8Input Xt = fp8_input(transpose(x, T, kIC), kIC, T, Fp8Scaling::kTile1x128);
  DeviceVec<uint8_t> ddc(Dt.codes), dxc(Xt.codes);
  DeviceVec<float> dds(Dt.gemm_scales), dxs(Xt.gemm_scales), ddw(dw0);
  gemm_fp8(*ctx, false, true, kOC, kIC, T, 1.0f, ddc.get(), T, dds.get(), Fp8Scaling::kTile1x128,
           dxc.get(), T, dxs.get(), Fp8Scaling::kTile1x128, 1.0f, ddw.get(), kIC);
  std::vector<float> bound = abs_of(dw0);
  moe::cpu::gemm<float>(false, true, kOC, kIC, T, 1.0f, abs_of(Dt.values).data(), T,
                        abs_of(Xt.values).data(), T, 1.0f, bound.data(), kIC);
  EXPECT_TRUE(within_bound(ddw.host(), dw, bound, kFp8Rtol));
}

// ---- Grouped expert GEMMs -------------------------------------------------------------------

TEST(CudaGemm, ExpertsFp32MatchPerExpertCpu) {
  SKIP_WITHOUT_GPU();
  Ctx ctx;
  const int64_t E = 5, IC = 48, OC = 40;
  const int64_t off[E + 1] = {0, 7, 7, 19, 19, 24};  // experts 1 and 3 empty
  const int64_t R = off[E];
  const std::vector<float> x = normal_floats(static_cast<size_t>(R * IC), 71);
  const std::vector<float> dy = normal_floats(static_cast<size_t>(R * OC), 72);
  const std::vector<float> w = normal_floats(static_cast<size_t>(E * OC * IC), 73, 0.2f);
  const std::vector<float> dw0 = normal_floats(static_cast<size_t>(E * OC * IC), 74);
  const std::vector<float> dx0 = normal_floats(static_cast<size_t>(R * IC), 75);
  std::vector<float> y(static_cast<size_t>(R * OC)), dx = dx0, dw = dw0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = off[e], n = off[e + 1] - off[e];
    const float* we = w.data() + e * OC * IC;
    moe::cpu::gemm<float>(false, true, n, OC, IC, 1.0f, x.data() + r0 * IC, IC, we, IC, 0.0f,
                          y.data() + r0 * OC, OC);
    moe::cpu::gemm<float>(false, false, n, IC, OC, 1.0f, dy.data() + r0 * OC, OC, we, IC, 1.0f,
                          dx.data() + r0 * IC, IC);
    moe::cpu::gemm<float>(true, false, OC, IC, n, 1.0f, dy.data() + r0 * OC, OC,
                          x.data() + r0 * IC, IC, 1.0f, dw.data() + e * OC * IC, IC);
  }
  DeviceVec<float> dX(x), dDY(dy), dW(w), dY(y.size()), dDX(dx0), dDW(dw0);
  gemm_experts_forward(*ctx, GemmPrecision::kFp32, dY.get(), {dX.get()}, {dW.get()}, off, E, IC,
                       OC);
  gemm_experts_backward_input(*ctx, GemmPrecision::kFp32, dDX.get(), {dDY.get()}, {dW.get()},
                              off, E, IC, OC, GemmOutput::kAccumulate);
  gemm_experts_backward_weight(*ctx, GemmPrecision::kFp32, dDW.get(), {dDY.get()}, {dX.get()},
                               off, E, IC, OC);
  EXPECT_TRUE(any_nonzero(y));
  EXPECT_TRUE(all_close(dY.host(), y, 1e-4, 1e-4));
  EXPECT_TRUE(all_close(dDX.host(), dx, 1e-4, 1e-4));
  // Empty experts' dW blocks are untouched (bit for bit).
  EXPECT_TRUE(all_close(dDW.host(), dw, 1e-4, 1e-4));
  const std::vector<float> got = dDW.host();
  for (int64_t i = 0; i < OC * IC; ++i) {
    EXPECT_EQ(got[static_cast<size_t>(1 * OC * IC + i)], dw0[static_cast<size_t>(1 * OC * IC + i)]);
    EXPECT_EQ(got[static_cast<size_t>(3 * OC * IC + i)], dw0[static_cast<size_t>(3 * OC * IC + i)]);
  }
}

TEST(CudaGemm, ExpertsFp8MatchPerExpertEmulation) {
  SKIP_WITHOUT_GPU();
  Ctx ctx;
  SKIP_WITHOUT_FP8(ctx);
  const int64_t E = 4, IC = 256, OC = 144;
  const int64_t off[E + 1] = {0, 16, 16, 160, 176};  // rows padded to 16; expert 1 empty
  const int64_t R = off[E], L = fp8_gemm_ktiles(IC);
  const std::vector<float> x = tiled_floats(R, IC, 81, 1.0f);
  const std::vector<float> dy = tiled_floats(R, OC, 82, 1.0f);
  const std::vector<float> w = tiled_floats(E * OC, IC, 83, 0.05f);
  const std::vector<float> dw0 = normal_floats(static_cast<size_t>(E * OC * IC), 84);

  // Forward inputs: X's 1x128 scales per expert block (L, n_e) at off[e] * L; W stacked.
  const Fp8Input X = fp8_input(x, R, IC, Fp8Scaling::kTile1x128);
  std::vector<float> xs(static_cast<size_t>(R * L));
  std::vector<uint8_t> wc;
  std::vector<float> wv, ws;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    fp8_gemm_scales_from_quant(xs.data() + off[e] * L, X.q_scales.data() + off[e] * L, n, IC,
                               Fp8Scaling::kTile1x128);
    const std::vector<float> we(w.begin() + e * OC * IC, w.begin() + (e + 1) * OC * IC);
    const Fp8Input We = fp8_input(we, OC, IC, Fp8Scaling::kBlock128);
    wc.insert(wc.end(), We.codes.begin(), We.codes.end());
    wv.insert(wv.end(), We.values.begin(), We.values.end());
    ws.insert(ws.end(), We.gemm_scales.begin(), We.gemm_scales.end());
  }
  // Weight-gradient inputs: per expert dY_e^T (OC, n_e), X_e^T (IC, n_e), compact.
  std::vector<uint8_t> dtc, xtc;
  std::vector<float> dts, xts, dw = dw0, dwb = abs_of(dw0);
  std::vector<float> y(static_cast<size_t>(R * OC)), yb(y.size());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = off[e], n = off[e + 1] - off[e];
    moe::cpu::gemm<float>(false, true, n, OC, IC, 1.0f, X.values.data() + r0 * IC, IC,
                          wv.data() + e * OC * IC, IC, 0.0f, y.data() + r0 * OC, OC);
    moe::cpu::gemm<float>(false, true, n, OC, IC, 1.0f, abs_of(X.values).data() + r0 * IC, IC,
                          abs_of(wv).data() + e * OC * IC, IC, 0.0f, yb.data() + r0 * OC, OC);
    if (n == 0) continue;
    const std::vector<float> dye(dy.begin() + r0 * OC, dy.begin() + (r0 + n) * OC);
    const std::vector<float> xe(x.begin() + r0 * IC, x.begin() + (r0 + n) * IC);
    const Fp8Input Dt = fp8_input(transpose(dye, n, OC), OC, n, Fp8Scaling::kTile1x128);
    const Fp8Input Xt = fp8_input(transpose(xe, n, IC), IC, n, Fp8Scaling::kTile1x128);
    EXPECT_EQ(static_cast<int64_t>(dts.size()), fp8_expert_t_scale_offset(off, e, OC));
    dtc.insert(dtc.end(), Dt.codes.begin(), Dt.codes.end());
    xtc.insert(xtc.end(), Xt.codes.begin(), Xt.codes.end());
    dts.insert(dts.end(), Dt.gemm_scales.begin(), Dt.gemm_scales.end());
    xts.insert(xts.end(), Xt.gemm_scales.begin(), Xt.gemm_scales.end());
    moe::cpu::gemm<float>(false, true, OC, IC, n, 1.0f, Dt.values.data(), n, Xt.values.data(), n,
                          1.0f, dw.data() + e * OC * IC, IC);
    moe::cpu::gemm<float>(false, true, OC, IC, n, 1.0f, abs_of(Dt.values).data(), n,
                          abs_of(Xt.values).data(), n, 1.0f, dwb.data() + e * OC * IC, IC);
  }

  DeviceVec<uint8_t> dXc(X.codes), dWc(wc), dDtc(dtc), dXtc(xtc);
  DeviceVec<float> dXs(xs), dWs(ws), dDts(dts), dXts(xts), dY(y.size()), dDW(dw0);
  gemm_experts_forward(*ctx, GemmPrecision::kFp8, dY.get(), {dXc.get(), dXs.get()},
                       {dWc.get(), dWs.get()}, off, E, IC, OC);
  gemm_experts_backward_weight(*ctx, GemmPrecision::kFp8, dDW.get(), {dDtc.get(), dDts.get()},
                               {dXtc.get(), dXts.get()}, off, E, IC, OC);
  EXPECT_TRUE(any_nonzero(y));
  EXPECT_TRUE(within_bound(dY.host(), y, yb, kFp8Rtol));
  EXPECT_TRUE(within_bound(dDW.host(), dw, dwb, kFp8Rtol));
}

// ---- Peak FLOP/s ------------------------------------------------------------------------------

TEST(CudaGemm, PeakFlopsIsPositive) {
  SKIP_WITHOUT_GPU();
  Ctx ctx;
  const int64_t n = 1024;
  for (GemmPrecision p : {GemmPrecision::kBf16, GemmPrecision::kFp8}) {
    if (p == GemmPrecision::kFp8 && !gemm_fp8_block_scaling_supported(*ctx)) continue;
    DeviceVec<uint8_t> scratch(gemm_peak_scratch_bytes(p, n));
    const double f = measure_peak_flops(*ctx, p, scratch.get(), scratch.size(), nullptr, n, 1, 3);
    EXPECT_TRUE(std::isfinite(f) && f > 1e9) << gemm_precision_name(p) << " " << f;
  }
}

}  // namespace
