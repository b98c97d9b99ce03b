// The Ops backend's small kernels (model/kernels/cuda/ops_kernels.h) called directly, against
// the CPU backend's methods of the same names (model/ops_cpu.cpp) and naive references:
// row accumulation, BF16 encode / decode, transposes of 1-, 2- and 4-byte elements, the MTP
// target shift (bit for bit), and the device-side loss sums (the sum within 1e-12 of an FP64
// sum in any order, the count exact, the accumulation in the CPU's arithmetic exactly).
// Also on the CPU simulator (tests/cuda_sim), as every kernel twin test without cuBLAS.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "model/fp8.h"
#include "model/kernels/cuda/ops_kernels.h"
#include "model/ops.h"
#include "tests/gpu/gpu_test_util.h"

namespace {

using moe_gpu_test::DeviceVec;
using moe_gpu_test::normal_floats;

std::unique_ptr<moe::Ops<float>> cpu_ops() { return moe::ops_cpu_create<float>(); }

TEST(CudaOpsKernels, AddRowsMatchesCpuBitForBit) {
  SKIP_WITHOUT_GPU();
  const int64_t rows = 37, cols = 70, ld_dst = 75, ld_src = 72;
  std::vector<float> dst = normal_floats(static_cast<size_t>(rows * ld_dst), 1);
  const std::vector<float> src = normal_floats(static_cast<size_t>(rows * ld_src), 2);
  DeviceVec<float> d_dst(dst), d_src(src);
  moe::cuda::add_rows(d_dst.get(), ld_dst, d_src.get(), ld_src, rows, cols, nullptr);
  cpu_ops()->add_rows(dst.data(), ld_dst, src.data(), ld_src, rows, cols);
  moe::cuda::device_synchronize();
  EXPECT_EQ(d_dst.host(), dst);  // the gaps between rows (cols..ld) untouched on both
}

TEST(CudaOpsKernels, Bf16EncodeDecodeMatchBitForBit) {
  SKIP_WITHOUT_GPU();
  std::vector<float> x = normal_floats(1000, 3, 3.0f);
  x[0] = 0.0f;
  x[1] = -0.0f;
  x[2] = 1e-40f;  // subnormal
  x[3] = 3.3895314e38f;  // rounds to BF16's infinity
  x[4] = std::nanf("");
  const int64_t n = static_cast<int64_t>(x.size());
  DeviceVec<float> d_x(x), d_rounded(x.size()), d_back(x.size());
  DeviceVec<uint16_t> d_bits(x.size());
  moe::cuda::bf16_encode(d_bits.get(), d_rounded.get(), d_x.get(), n, nullptr);
  moe::cuda::bf16_decode(d_back.get(), d_bits.get(), n, nullptr);
  moe::cuda::device_synchronize();
  const std::vector<uint16_t> bits = d_bits.host();
  const std::vector<float> rounded = d_rounded.host(), back = d_back.host();
  for (size_t i = 0; i < x.size(); ++i) {
    ASSERT_EQ(bits[i], moe::bf16_from_float(x[i])) << i;
    uint32_t a, b;
    std::memcpy(&a, &rounded[i], 4);
    const float want = moe::bf16_to_float(bits[i]);
    std::memcpy(&b, &want, 4);
    ASSERT_EQ(a, b) << i;
    std::memcpy(&a, &back[i], 4);
    ASSERT_EQ(a, b) << i;
  }
  // Without the rounded copy.
  DeviceVec<uint16_t> d_bits2(x.size());
  moe::cuda::bf16_encode(d_bits2.get(), nullptr, d_x.get(), n, nullptr);
  moe::cuda::device_synchronize();
  EXPECT_EQ(d_bits2.host(), bits);
}

template <typename E>
void expect_transpose(int64_t R, int64_t C) {
  std::vector<E> src(static_cast<size_t>(R * C));
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<E>(i * 2654435761u);
  DeviceVec<E> d_src(src), d_dst(src.size());
  moe::cuda::transpose(d_dst.get(), d_src.get(), R, C, sizeof(E), nullptr);
  moe::cuda::device_synchronize();
  const std::vector<E> dst = d_dst.host();
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c)
      ASSERT_EQ(dst[static_cast<size_t>(c * R + r)], src[static_cast<size_t>(r * C + c)])
          << sizeof(E) << "-byte (" << R << ", " << C << ") at " << r << ", " << c;
}

TEST(CudaOpsKernels, TransposeIsExactForEveryElementSize) {
  SKIP_WITHOUT_GPU();
  for (const auto& [R, C] : {std::pair<int64_t, int64_t>{1, 1}, {33, 65}, {64, 128}, {130, 7}}) {
    expect_transpose<uint8_t>(R, C);
    expect_transpose<uint16_t>(R, C);
    expect_transpose<uint32_t>(R, C);
  }
}

TEST(CudaOpsKernels, MtpShiftMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const int64_t B = 3, T = 9;
  std::vector<int32_t> y(static_cast<size_t>(B * T));
  for (size_t i = 0; i < y.size(); ++i) y[i] = i % 5 == 3 ? -1 : static_cast<int32_t>(i * 7 % 50);
  for (const int64_t k : {int64_t{1}, int64_t{2}, int64_t{8}}) {
    std::vector<int32_t> tokens(y.size(), 99), targets(y.size(), 99);
    cpu_ops()->mtp_shift(tokens.data(), targets.data(), y.data(), B, T, k);
    DeviceVec<int32_t> d_y(y), d_tokens(y.size()), d_targets(y.size());
    moe::cuda::mtp_shift(d_tokens.get(), d_targets.get(), d_y.get(), B, T, k, nullptr);
    moe::cuda::device_synchronize();
    EXPECT_EQ(d_tokens.host(), tokens) << k;
    EXPECT_EQ(d_targets.host(), targets) << k;
  }
}

TEST(CudaOpsKernels, LossSumsAccumulateInTheCpusArithmetic) {
  SKIP_WITHOUT_GPU();
  const int64_t N = 3001;
  std::vector<float> losses = normal_floats(static_cast<size_t>(N), 4);
  std::vector<int32_t> targets(static_cast<size_t>(N));
  double want = 0;
  int64_t want_count = 0;
  for (int64_t i = 0; i < N; ++i) {
    losses[static_cast<size_t>(i)] = std::fabs(losses[static_cast<size_t>(i)]) + 1.0f;
    targets[static_cast<size_t>(i)] = i % 7 == 0 ? -1 : static_cast<int32_t>(i % 11);
    if (i % 7 != 0) {
      want += losses[static_cast<size_t>(i)];
      ++want_count;
    }
  }
  DeviceVec<float> d_losses(losses);
  DeviceVec<int32_t> d_targets(targets);
  DeviceVec<double> d_sum(1), d_acc(std::vector<double>{0.25, 7.5});
  DeviceVec<int64_t> d_count(1);
  moe::cuda::scored_loss_sum(d_sum.get(), d_count.get(), d_losses.get(), d_targets.get(), N,
                             nullptr);
  moe::cuda::loss_mean_accumulate(d_acc.get(), d_sum.get(), d_count.get(), 4.0, nullptr);
  moe::cuda::device_synchronize();
  const double sum = d_sum.host()[0];
  EXPECT_EQ(d_count.host()[0], want_count);
  EXPECT_NEAR(sum, want, 1e-12 * want);
  const std::vector<double> acc = d_acc.host();
  EXPECT_EQ(acc[0], 0.25 + sum / static_cast<double>(want_count) / 4.0);
  EXPECT_EQ(acc[1], 7.5 + sum);
  // No scored token: the mean is not added, the sum (0) is.
  std::vector<int32_t> none(targets.size(), -1);
  DeviceVec<int32_t> d_none(none);
  moe::cuda::scored_loss_sum(d_sum.get(), d_count.get(), d_losses.get(), d_none.get(), N, nullptr);
  moe::cuda::loss_mean_accumulate(d_acc.get(), d_sum.get(), d_count.get(), 4.0, nullptr);
  DeviceVec<float> d_value(std::vector<float>{1.5f});
  moe::cuda::accumulate_to_double(d_acc.get(), d_value.get(), nullptr);
  moe::cuda::device_synchronize();
  EXPECT_EQ(d_count.host()[0], 0);
  const std::vector<double> acc2 = d_acc.host();
  EXPECT_EQ(acc2[0], acc[0] + 1.5);
  EXPECT_EQ(acc2[1], acc[1]);
}

}  // namespace
