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
// Output buffers are pre-filled with a sentinel, so an element a kernel fails to write fails;
// the device scratch is filled with NaN, so a kernel that reads scratch it did not write fails.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <vector>

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
Results run_gpu(const Shape& s, const std::vector<float>& qkv, const std::vector<float>& dout) {
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
                               s.HDv, d_scratch.get(), nullptr);
  moe::cuda::attention_backward(d_dqkv.get(), d_dout.get(), d_qkv.get(), d_lse.get(), s.B, s.T,
                                s.NH, s.NKV, s.HD, s.HDv, d_scratch.get(), nullptr);
  moe::cuda::device_synchronize();
  return {d_out.host(), d_lse.host(), d_dqkv.host()};
}

class CudaAttention : public ::testing::TestWithParam<Shape> {};

TEST_P(CudaAttention, MatchesCpuForwardAndBackward) {
  SKIP_WITHOUT_GPU();
  const Shape s = GetParam();
  const int64_t W = (s.NH + s.NKV) * s.HD + s.NKV * s.HDv;
  const std::vector<float> qkv = normal_floats(static_cast<size_t>(s.B * s.T * W), 11);
  const std::vector<float> dout = normal_floats(static_cast<size_t>(s.B * s.T * s.NH * s.HDv), 12);
  ASSERT_TRUE(any_nonzero(qkv) && any_nonzero(dout));

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
  moe::cuda::attention_forward(sentinel.get(), sentinel.get(), sentinel.get(), 0, 0, 4, 4, 32, 32,
                               sentinel.get(), nullptr);
  moe::cuda::attention_backward(sentinel.get(), sentinel.get(), sentinel.get(), sentinel.get(), 0,
                                0, 4, 4, 32, 32, sentinel.get(), nullptr);
  moe::cuda::device_synchronize();
  EXPECT_EQ(sentinel.host(), std::vector<float>(4, kSentinel));
}

}  // namespace
