// A kernel's launch configuration as plain data: chosen by host-side planning functions
// (plain C++, tested on every machine), turned into dim3 only inside the .cu launchers.
#pragma once

#include <cstdint>

namespace moe::cuda {

struct LaunchDims {
  int64_t grid_x = 1, grid_y = 1, grid_z = 1;
  int block = 1;
  int64_t smem_bytes = 0;
};

}  // namespace moe::cuda
