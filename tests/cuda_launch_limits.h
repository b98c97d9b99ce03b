// For the CPU tests of the CUDA launch plans: whether a LaunchDims is launchable on any GPU
// we build for (grid_x < 2^31, grid_y/z in [1, 65535], block a multiple of 32 in [32, 1024],
// dynamic shared memory within `smem_max`). grid_x = 0 (nothing to launch) only if
// `empty_ok`.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>

#include "model/kernels/cuda/launch_dims.h"

namespace moe_test {

inline ::testing::AssertionResult within_cuda_limits(const moe::cuda::LaunchDims& d,
                                                     bool empty_ok,
                                                     int64_t smem_max = 48 * 1024) {
  if (d.grid_x < (empty_ok ? 0 : 1) || d.grid_x >= (int64_t(1) << 31))
    return ::testing::AssertionFailure() << "grid_x " << d.grid_x;
  if (d.grid_y < 1 || d.grid_y > 65535 || d.grid_z < 1 || d.grid_z > 65535)
    return ::testing::AssertionFailure() << "grid_y " << d.grid_y << " grid_z " << d.grid_z;
  if (d.block < 32 || d.block > 1024 || d.block % 32 != 0)
    return ::testing::AssertionFailure() << "block " << d.block;
  if (d.smem_bytes < 0 || d.smem_bytes > smem_max)
    return ::testing::AssertionFailure() << "smem " << d.smem_bytes;
  return ::testing::AssertionSuccess();
}

}  // namespace moe_test
