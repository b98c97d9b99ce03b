#include <cstdlib>

#include "model/kernels/cuda/cuda_backend.h"
#include "model/kernels/cuda/cuda_check.h"

namespace moe::cuda {

int device_count() {
  int n = 0;
  // No driver or no device is a normal state on CPU machines, not an error.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

std::string device_describe(int dev) {
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  return strprintf("%s (sm_%d%d, %d SMs, %.1f GiB)", prop.name, prop.major, prop.minor,
                   prop.multiProcessorCount,
                   static_cast<double>(prop.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0));
}

int device_for_local_rank() {
  const int n = device_count();
  if (n == 0) return -1;
  for (const char* var : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK"}) {
    if (const char* v = std::getenv(var)) return std::atoi(v) % n;
  }
  return 0;
}

}  // namespace moe::cuda
