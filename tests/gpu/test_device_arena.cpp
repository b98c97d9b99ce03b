// Device arenas (model/arena.h with Device::kCuda): one cudaMalloc, zero-filled, carved
// like a host arena, and the carved views hold what is copied into them.
#include <gtest/gtest.h>

#include <vector>

#include "model/arena.h"
#include "tests/gpu/gpu_test_util.h"

namespace {

TEST(DeviceArena, CarvesZeroFilledDeviceMemory) {
  SKIP_WITHOUT_GPU();
  float* a = nullptr;
  int64_t* b = nullptr;
  moe::Arena arena = moe::arena_build(
      "test", [&](moe::Carver& c) {
        a = c.take<float>(1000);
        b = c.take<int64_t>(3);
      },
      moe::Device::kCuda);
  EXPECT_EQ(arena.device(), moe::Device::kCuda);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b) % moe::kArenaAlign, 0u);
  std::vector<float> h(1000, 1.0f);
  moe::cuda::copy_to_host(h.data(), a, h.size() * sizeof(float));
  EXPECT_EQ(h, std::vector<float>(1000, 0.0f));
  const std::vector<int64_t> v = {7, -8, 9};
  moe::cuda::copy_to_device(b, v.data(), 3 * sizeof(int64_t));
  std::vector<int64_t> back(3);
  moe::cuda::copy_to_host(back.data(), b, 3 * sizeof(int64_t));
  EXPECT_EQ(back, v);
  moe::Arena moved = std::move(arena);
  EXPECT_EQ(moved.device(), moe::Device::kCuda);
  EXPECT_EQ(arena.data(), nullptr);
}

}  // namespace
