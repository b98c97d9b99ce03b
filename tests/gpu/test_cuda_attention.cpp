// The CUDA attention core (model/kernels/cuda/attention_kernels.h) against the CPU reference
// (cpu::attention_forward / attention_backward<float>, run with its own scratch): outputs, the
// saved per-row log-sum-exp and the gradient of the whole packed qkv, over standard
// (HDv = HD), grouped-query and MLA-like (HDv != HD) shapes with T off the 32-row tile (70,
// 130), a single token, odd head widths and the DeepSeek-V3 head widths (whose kernels need
// the > 48 KiB shared-memory opt-in).
//
// Tolerances (float; the GPU's online softmax and the CPU's sum in other orders, the GPU
// contracts to FMA, the exp is the same Cephes polynomial on both sides):
//   out, lse:  |gpu - cpu| <= 2e-5 + 1e-4 |cpu|
//   dqkv:      |gpu - cpu| <= 1e-4 + 1e-3 |cpu|  (dS = P (dP - D) cancels)
// The BF16 tensor-core core (AttentionCore::kBf16, head widths multiples of 16) is checked
// against the CPU run on the same inputs rounded to BF16 (Q, K, V and dO as the kernels stage
// them), so the scores agree to FP32 rounding and what remains is P and dS rounded to BF16
// before their products: lse within 1e-4 + 1e-4 |cpu|, out and dqkv within 1e-2 of the CPU's
// norm (relative L2 error), and every element within 0.05 of the CPU's largest.
// Output buffers are pre-filled with a sentinel, so an element a kernel fails to write fails;
// the device scratch is filled with NaN, so a kernel that reads scratch it did not write fails.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <vector>

#include "model/fp8.h"
#include "model/kernels/cpu/dense_ops.h"
#include "model/kernels/cuda/attention_kernels.h"
#include "model/kernels/cuda/attention_plan.h"
#include "tests/gpu/gpu_test_util.h"

namespace {

using moe_gpu_test::all_close;
using moe_gpu_test::DeviceVec;
using moe_gpu_test::normal_floats;

constexpr double kFwdAtol = 2e-5, kFwdRtol = 1e-4;
constexpr double kBwdAtol = 1e-4, kBwdRtol = 1e-3;
constexpr float kSentinel = 12345.0f;

struct Shape {
  int64_t B, T, NH, NKV, HD, HDv;
};

std::ostream& operator<<(std::ostream& os, const Shape& s) {
  return os << "B" << s.B << "_T" << s.T << "_NH" << s.NH << "_NKV" << s.NKV << "_HD" << s.HD
            << "_HDv" << s.HDv;
}

bool any_nonzero(const std::vector<float>& v) {
  for (float x : v)
    if (x != 0.0f) return true;
  return false;
}

struct Results {
  std::vector<float> out, lse, dqkv;
};

// The GPU forward and backward.
Results run_gpu(const Shape& s, const std::vector<float>& qkv, const std::vector<float>& dout,
                moe::cuda::AttentionCore core = moe::cuda::AttentionCore::kFp32) {
  const size_t n_out = static_cast<size_t>(s.B * s.T * s.NH * s.HDv);
  const size_t n_lse = static_cast<size_t>(s.B * s.NH * s.T);
  const size_t n_scratch = static_cast<size_t>(
      moe::cuda::attention_scratch_floats({s.B, s.T, s.NH, s.NKV, s.HD, s.HDv}));
  DeviceVec<float> d_qkv(qkv), d_dout(dout);
  DeviceVec<float> d_out(std::vector<float>(n_out, kSentinel));
  DeviceVec<float> d_lse(std::vector<float>(n_lse, kSentinel));
  DeviceVec<float> d_scratch(
      std::vector<float>(n_scratch, std::numeric_limits<float>::quiet_NaN()));
  DeviceVec<float> d_dqkv(std::vector<float>(qkv.size(), kSentinel));
  moe::cuda::attention_forward(d_out.get(), d_lse.get(), d_qkv.get(), s.B, s.T, s.NH, s.NKV, s.HD,
                               s.HDv, d_scratch.get(), core, nullptr);
  moe::cuda::attention_backward(d_dqkv.get(), d_dout.get(), d_qkv.get(), d_lse.get(), s.B, s.T,
                                s.NH, s.NKV, s.HD, s.HDv, d_scratch.get(), core, nullptr);
  moe::cuda::device_synchronize();
  return {d_out.host(), d_lse.host(), d_dqkv.host()};
}

// The CPU reference, with its own scratch.
Results run_cpu(const Shape& s, const std::vector<float>& qkv, const std::vector<float>& dout) {
  Results cpu;
  cpu.out.resize(dout.size());
  cpu.lse.resize(static_cast<size_t>(s.B * s.NH * s.T));
  cpu.dqkv.resize(qkv.size());
  std::vector<float> scratch(static_cast<size_t>(
      moe::cpu::attention_scratch_elems(s.B, s.T, s.NH, s.NKV, s.HD, s.HDv)));
  moe::cpu::attention_forward<float>(cpu.out.data(), cpu.lse.data(), qkv.data(), s.B, s.T, s.NH,
                                     s.NKV, s.HD, s.HDv, scratch.data());
  moe::cpu::attention_backward<float>(cpu.dqkv.data(), dout.data(), qkv.data(), cpu.lse.data(),
                                      s.B, s.T, s.NH, s.NKV, s.HD, s.HDv, scratch.data());
  return cpu;
}

// ||got - want|| / ||want|| within rel, and every element within frac of max |want|.
::testing::AssertionResult near_by_norm(const std::vector<float>& got,
                                        const std::vector<float>& want, double rel, double frac) {
  double d2 = 0, w2 = 0, wmax = 0, worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = static_cast<double>(got[i]) - want[i];
    d2 += d * d;
    w2 += static_cast<double>(want[i]) * want[i];
    wmax = std::max(wmax, std::fabs(static_cast<double>(want[i])));
    worst = std::max(worst, std::fabs(d));
  }
  const double e = std::sqrt(d2 / w2);
  if (!(e <= rel) || !(worst <= frac * wmax))
    return ::testing::AssertionFailure() << "relative L2 error " << e << " (bound " << rel
                                         << "), worst element " << worst << " of max " << wmax;
  return ::testing::AssertionSuccess();
}

class CudaAttention : public ::testing::TestWithParam<Shape> {};

TEST_P(CudaAttention, MatchesCpuForwardAndBackward) {
  SKIP_WITHOUT_GPU();
  const Shape s = GetParam();
  const int64_t W = (s.NH + s.NKV) * s.HD + s.NKV * s.HDv;
  const std::vector<float> qkv = normal_floats(static_cast<size_t>(s.B * s.T * W), 11);
  const std::vector<float> dout = normal_floats(static_cast<size_t>(s.B * s.T * s.NH * s.HDv), 12);
  ASSERT_TRUE(any_nonzero(qkv) && any_nonzero(dout));

  const Results cpu = run_cpu(s, qkv, dout);
  ASSERT_TRUE(any_nonzero(cpu.out) && any_nonzero(cpu.lse) && any_nonzero(cpu.dqkv));

  const Results gpu = run_gpu(s, qkv, dout);
  EXPECT_TRUE(all_close(gpu.out, cpu.out, kFwdAtol, kFwdRtol)) << "out";
  EXPECT_TRUE(all_close(gpu.lse, cpu.lse, kFwdAtol, kFwdRtol)) << "lse";
  EXPECT_TRUE(all_close(gpu.dqkv, cpu.dqkv, kBwdAtol, kBwdRtol)) << "dqkv";

  // Deterministic: a second run is bitwise the same.
  const Results again = run_gpu(s, qkv, dout);
  EXPECT_EQ(again.out, gpu.out);
  EXPECT_EQ(again.lse, gpu.lse);
  EXPECT_EQ(again.dqkv, gpu.dqkv);
}

// The BF16 tensor-core kernels: against the CPU on BF16-rounded inputs; deterministic too.
TEST_P(CudaAttention, Bf16TensorCoresMatchCpuOnRoundedInputs) {
  SKIP_WITHOUT_GPU();
  const Shape s = GetParam();
  if (!moe::cuda::attention_tc_fits(s.HD, s.HDv))
    GTEST_SKIP() << "head widths not multiples of 16: the plan keeps the FP32 core";
  const int64_t W = (s.NH + s.NKV) * s.HD + s.NKV * s.HDv;
  std::vector<float> qkv = normal_floats(static_cast<size_t>(s.B * s.T * W), 11);
  std::vector<float> dout = normal_floats(static_cast<size_t>(s.B * s.T * s.NH * s.HDv), 12);
  for (float& x : qkv) x = moe::bf16_round(x);
  for (float& x : dout) x = moe::bf16_round(x);
  const Results cpu = run_cpu(s, qkv, dout);
  const Results gpu = run_gpu(s, qkv, dout, moe::cuda::AttentionCore::kBf16);
  EXPECT_TRUE(all_close(gpu.lse, cpu.lse, 1e-4, 1e-4)) << "lse";
  EXPECT_TRUE(near_by_norm(gpu.out, cpu.out, 1e-2, 0.05)) << "out";
  EXPECT_TRUE(near_by_norm(gpu.dqkv, cpu.dqkv, 1e-2, 0.05)) << "dqkv";
  // Not the FP32 core under another name: P rounded to BF16 moves the output.
  const Results fp32 = run_gpu(s, qkv, dout);
  EXPECT_NE(fp32.out, gpu.out);
  const Results again = run_gpu(s, qkv, dout, moe::cuda::AttentionCore::kBf16);
  EXPECT_EQ(again.out, gpu.out);
  EXPECT_EQ(again.lse, gpu.lse);
  EXPECT_EQ(again.dqkv, gpu.dqkv);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaAttention,
    ::testing::Values(Shape{2, 64, 4, 4, 32, 32},    // MHA, whole tiles
                      Shape{2, 70, 8, 2, 16, 16},    // GQA (4 query heads per kv head), T = 70
                      Shape{1, 130, 4, 2, 32, 32},   // GQA, T = 130
                      Shape{2, 70, 3, 3, 48, 32},    // MLA-like: qk 48, v 32
                      Shape{1, 130, 2, 2, 48, 32},   // MLA-like, T = 130
                      Shape{1, 33, 6, 3, 20, 12},    // odd sizes, HDv < HD, GQA
                      Shape{1, 1, 2, 1, 8, 8},       // a single token
                      Shape{1, 100, 2, 2, 192, 128}  // DeepSeek-V3 heads: > 48 KiB smem
                      ),
    [](const ::testing::TestParamInfo<Shape>& info) {
      std::ostringstream os;
      os << info.param;
      return os.str();
    });

// An empty batch launches nothing and touches nothing.
TEST(CudaAttentionEmpty, ZeroTokensIsANoOp) {
  SKIP_WITHOUT_GPU();
  DeviceVec<float> sentinel(std::vector<float>(4, kSentinel));
  for (const auto core : {moe::cuda::AttentionCore::kFp32, moe::cuda::AttentionCore::kBf16}) {
    moe::cuda::attention_forward(sentinel.get(), sentinel.get(), sentinel.get(), 0, 0, 4, 4, 32,
                                 32, sentinel.get(), core, nullptr);
    moe::cuda::attention_backward(sentinel.get(), sentinel.get(), sentinel.get(), sentinel.get(),
                                  0, 0, 4, 4, 32, 32, sentinel.get(), core, nullptr);
  }
  moe::cuda::device_synchronize();
  EXPECT_EQ(sentinel.host(), std::vector<float>(4, kSentinel));
}

}  // namespace
