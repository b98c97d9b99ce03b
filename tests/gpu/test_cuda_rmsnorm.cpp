// GPU twin tests: the CUDA kernels against the CPU reference kernels. They skip (with the
// reason) where no device is visible, so CPU-only CI stays green while still compiling them.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "model/kernels/cpu/dense_ops.h"
#include "model/kernels/cuda/cuda_backend.h"
#include "model/rng.h"

namespace {

TEST(CudaRmsnorm, MatchesCpu) {
  if (moe::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device visible";
  const int64_t N = 71, C = 229;
  std::vector<float> x(N * C), w(C), out_gpu(N * C), out_cpu(N * C), r_gpu(N), r_cpu(N);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(moe::rng_normal(7, 1, i));
  for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>(1.0 + 0.1 * moe::rng_normal(7, 2, i));
  moe::cuda::rmsnorm_forward_host(out_gpu.data(), r_gpu.data(), x.data(), w.data(), N, C, 1e-6f);
  moe::cpu::rmsnorm_forward<float>(out_cpu.data(), r_cpu.data(), x.data(), w.data(), N, C, 1e-6f);
  for (size_t i = 0; i < out_cpu.size(); ++i)
    ASSERT_NEAR(out_gpu[i], out_cpu[i], 1e-5f * (1 + std::fabs(out_cpu[i]))) << i;
  for (size_t i = 0; i < r_cpu.size(); ++i) ASSERT_NEAR(r_gpu[i], r_cpu[i], 1e-5f * r_cpu[i]);
}

TEST(CudaDevice, DescribeSelected) {
  if (moe::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device visible";
  const int dev = moe::cuda::device_for_local_rank();
  ASSERT_GE(dev, 0);
  EXPECT_NE(moe::cuda::device_describe(dev).find("sm_"), std::string::npos);
}

}  // namespace
