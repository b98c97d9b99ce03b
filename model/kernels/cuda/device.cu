#include "model/kernels/cuda/cuda_backend.h"
#include "model/kernels/cuda/cuda_check.h"
#include "model/kernels/cuda/device_choice.h"

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

int device_for_local_rank() { return device_for(launcher_local_rank(), device_count()); }

void device_select(int dev) { CUDA_CHECK(cudaSetDevice(dev)); }

void* device_alloc(size_t bytes) {
  if (bytes == 0) return nullptr;
  void* p = nullptr;
  CUDA_CHECK(cudaMalloc(&p, bytes));
  return p;
}

void device_free(void* p) {
  if (p) CUDA_CHECK(cudaFree(p));
}

// A pageable cudaMemcpy to the device may return before the DMA lands, and cudaMemset is
// asynchronous: both wait for the device so that work on any stream (ours are non-blocking,
// unordered with the legacy stream these run on) sees the result.
void copy_to_device(void* dst, const void* src, size_t bytes) {
  if (!bytes) return;
  CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaDeviceSynchronize());
}

void copy_to_host(void* dst, const void* src, size_t bytes) {
  if (bytes) CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}

void device_memset_zero(void* p, size_t bytes) {
  if (!bytes) return;
  CUDA_CHECK(cudaMemset(p, 0, bytes));
  CUDA_CHECK(cudaDeviceSynchronize());
}

void device_synchronize() { CUDA_CHECK(cudaDeviceSynchronize()); }

size_t device_free_bytes() {
  size_t free_bytes = 0, total = 0;
  CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total));
  return free_bytes;
}

Stream stream_create() {
  cudaStream_t s = nullptr;
  CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return s;
}

void stream_destroy(Stream s) {
  if (s) CUDA_CHECK(cudaStreamDestroy(s));
}

void stream_synchronize(Stream s) { CUDA_CHECK(cudaStreamSynchronize(s)); }

}  // namespace moe::cuda
