// The CUDA attention kernels (model/kernels/cuda/attention_device.cuh) run on the CPU under
// tests/cuda_sim.h: both cores, forward and backward, against the CPU attention core. This is
// the kernels' own code (carving, indices, masks, barriers, WMMA fragment addressing), not
// the device: the GPU twins are tests/gpu/test_cuda_attention.cpp.
// Shared memory is poisoned (0xFF bytes: NaN in FP32 and in BF16) before every block, so a
// read of a byte the block did not write turns the results NaN, and the bytes past the
// plan's carving must still be poison after the block.
// Bounds: the FP32 core as the GPU test's (2e-5 + 1e-4 |cpu| forward, 1e-4 + 1e-3 |cpu|
// backward; no FMA contraction here, other summation orders); the BF16 core against the CPU
// on BF16-rounded inputs (lse 1e-4 + 1e-4 |cpu|, out and dqkv within 1e-2 by relative L2
// norm and every element within 0.05 of the largest): P and dS rounded to BF16.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "tests/cuda_sim.h"

namespace moe::cuda {
namespace {
constexpr size_t kSimSmemBytes = 232 * 1024;
alignas(128) unsigned char smem[kSimSmemBytes];
}  // namespace
}  // namespace moe::cuda

#include "model/fp8.h"
#include "model/kernels/cpu/dense_ops.h"
#include "model/kernels/cuda/attention_device.cuh"
#include "model/rng.h"

namespace moe::cuda {
namespace {

struct Shape {
  int64_t B, T, NH, NKV, HD, HDv;
};

struct Results {
  std::vector<float> out, lse, dqkv;
};

std::vector<float> normal(size_t n, uint64_t seed, bool bf16) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    v[i] = static_cast<float>(rng_normal(seed, 1, i));
    if (bf16) v[i] = bf16_round(v[i]);
  }
  return v;
}

Results run_cpu(const Shape& s, const std::vector<float>& qkv, const std::vector<float>& dout) {
  Results r;
  r.out.resize(dout.size());
  r.lse.resize(static_cast<size_t>(s.B * s.NH * s.T));
  r.dqkv.resize(qkv.size());
  std::vector<float> scratch(
      static_cast<size_t>(cpu::attention_scratch_elems(s.B, s.T, s.NH, s.NKV, s.HD, s.HDv)));
  cpu::attention_forward<float>(r.out.data(), r.lse.data(), qkv.data(), s.B, s.T, s.NH, s.NKV,
                                s.HD, s.HDv, scratch.data());
  cpu::attention_backward<float>(r.dqkv.data(), dout.data(), qkv.data(), r.lse.data(), s.B, s.T,
                                 s.NH, s.NKV, s.HD, s.HDv, scratch.data());
  return r;
}

// Launches one kernel of the plan under the simulation, shared memory poisoned per block and
// checked untouched past the kernel's carving.
void sim(const LaunchDims& d, const std::function<void()>& body) {
  ASSERT_LE(static_cast<size_t>(d.smem_bytes), kSimSmemBytes);
  const size_t used = static_cast<size_t>(d.smem_bytes);
  bool clean = true;
  cuda_sim::launch(
      static_cast<unsigned>(d.grid_x), static_cast<unsigned>(d.grid_y),
      static_cast<unsigned>(d.grid_z), d.block, body, [] { std::memset(smem, 0xFF, kSimSmemBytes); },
      [&] {
        for (size_t i = used; i < kSimSmemBytes && clean; ++i) clean = smem[i] == 0xFF;
      });
  EXPECT_TRUE(clean) << "a block wrote shared memory past its carving (" << used << " bytes)";
}

template <AttentionCore C>
Results run_sim(const Shape& s, const std::vector<float>& qkv, const std::vector<float>& dout) {
  const AttentionPlan plan = attention_plan({s.B, s.T, s.NH, s.NKV, s.HD, s.HDv}, kSmemLimitSm90, C);
  EXPECT_EQ(plan.core, C);
  Results r;
  r.out.assign(dout.size(), 12345.0f);
  r.lse.assign(static_cast<size_t>(s.B * s.NH * s.T), 12345.0f);
  r.dqkv.assign(qkv.size(), 12345.0f);
  std::vector<float> dots(static_cast<size_t>(s.B * s.NH * s.T), std::nanf(""));
  const int hd = static_cast<int>(s.HD), hdv = static_cast<int>(s.HDv);
  const float scale = attention_scale<float>(s.HD);
  sim(plan.forward, [&] {
    attention_forward_kernel<C>(r.out.data(), r.lse.data(), qkv.data(), s.T, s.NH, s.NKV, hd, hdv,
                                scale);
  });
  sim(plan.backward_rows, [&] {
    attention_backward_rows_kernel<C>(r.dqkv.data(), dots.data(), dout.data(), qkv.data(),
                                      r.lse.data(), s.T, s.NH, s.NKV, hd, hdv, scale);
  });
  sim(plan.backward_cols, [&] {
    attention_backward_cols_kernel<C>(r.dqkv.data(), dots.data(), dout.data(), qkv.data(),
                                      r.lse.data(), s.T, s.NH, s.NKV, hd, hdv, scale);
  });
  return r;
}

::testing::AssertionResult all_close(const std::vector<float>& got, const std::vector<float>& want,
                                     double atol, double rtol) {
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = got[i], w = want[i];
    if (!(std::fabs(g - w) <= atol + rtol * std::fabs(w)))
      return ::testing::AssertionFailure() << "element " << i << ": " << g << " vs " << w;
  }
  return ::testing::AssertionSuccess();
}

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

const Shape kShapes[] = {
    {1, 70, 4, 2, 32, 32},  // GQA, T off the tile: masked and out-of-range rows and keys
    {2, 40, 2, 2, 48, 32},  // MLA-like (HDv != HD), two sequences
};

TEST(AttentionSim, Fp32CoreMatchesTheCpu) {
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(::testing::Message() << "T " << s.T << " HD " << s.HD << " HDv " << s.HDv);
    const int64_t W = (s.NH + s.NKV) * s.HD + s.NKV * s.HDv;
    const std::vector<float> qkv = normal(static_cast<size_t>(s.B * s.T * W), 11, false);
    const std::vector<float> dout = normal(static_cast<size_t>(s.B * s.T * s.NH * s.HDv), 12, false);
    const Results cpu = run_cpu(s, qkv, dout);
    const Results k = run_sim<AttentionCore::kFp32>(s, qkv, dout);
    EXPECT_TRUE(all_close(k.out, cpu.out, 2e-5, 1e-4)) << "out";
    EXPECT_TRUE(all_close(k.lse, cpu.lse, 2e-5, 1e-4)) << "lse";
    EXPECT_TRUE(all_close(k.dqkv, cpu.dqkv, 1e-4, 1e-3)) << "dqkv";
  }
}

// Odd head widths (no tensor cores for them) on the FP32 core.
TEST(AttentionSim, Fp32CoreOddHeads) {
  const Shape s{1, 33, 6, 3, 20, 12};
  const int64_t W = (s.NH + s.NKV) * s.HD + s.NKV * s.HDv;
  const std::vector<float> qkv = normal(static_cast<size_t>(s.B * s.T * W), 13, false);
  const std::vector<float> dout = normal(static_cast<size_t>(s.B * s.T * s.NH * s.HDv), 14, false);
  const Results cpu = run_cpu(s, qkv, dout);
  const Results k = run_sim<AttentionCore::kFp32>(s, qkv, dout);
  EXPECT_TRUE(all_close(k.out, cpu.out, 2e-5, 1e-4)) << "out";
  EXPECT_TRUE(all_close(k.dqkv, cpu.dqkv, 1e-4, 1e-3)) << "dqkv";
}

TEST(AttentionSim, Bf16CoreMatchesTheCpuOnRoundedInputs) {
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(::testing::Message() << "T " << s.T << " HD " << s.HD << " HDv " << s.HDv);
    const int64_t W = (s.NH + s.NKV) * s.HD + s.NKV * s.HDv;
    const std::vector<float> qkv = normal(static_cast<size_t>(s.B * s.T * W), 11, true);
    const std::vector<float> dout = normal(static_cast<size_t>(s.B * s.T * s.NH * s.HDv), 12, true);
    const Results cpu = run_cpu(s, qkv, dout);
    const Results k = run_sim<AttentionCore::kBf16>(s, qkv, dout);
    EXPECT_TRUE(all_close(k.lse, cpu.lse, 1e-4, 1e-4)) << "lse";
    EXPECT_TRUE(near_by_norm(k.out, cpu.out, 1e-2, 0.05)) << "out";
    EXPECT_TRUE(near_by_norm(k.dqkv, cpu.dqkv, 1e-2, 0.05)) << "dqkv";
    // P rounded to BF16 moves the output: not the FP32 core under another name.
    const Results f = run_sim<AttentionCore::kFp32>(s, qkv, dout);
    EXPECT_NE(f.out, k.out);
  }
}

}  // namespace
}  // namespace moe::cuda
