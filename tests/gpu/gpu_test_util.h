// Shared by the gpu twin tests: skipping without a device, and device copies of host vectors.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "model/kernels/cuda/cuda_backend.h"
#include "model/rng.h"

// Every gpu test starts with this: without a visible device it skips, saying why.
#define SKIP_WITHOUT_GPU()                                                              \
  do {                                                                                  \
    if (moe::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device visible";       \
    moe::cuda::device_select(moe::cuda::device_for_local_rank());                       \
  } while (0)

namespace moe_gpu_test {

// A device copy of n elements of T, freed with the object.
template <typename T>
class DeviceVec {
 public:
  explicit DeviceVec(size_t n) : n_(n), p_(static_cast<T*>(moe::cuda::device_alloc(n * sizeof(T)))) {
    moe::cuda::device_memset_zero(p_, n * sizeof(T));
  }
  explicit DeviceVec(const std::vector<T>& h) : DeviceVec(h.size()) {
    moe::cuda::copy_to_device(p_, h.data(), h.size() * sizeof(T));
  }
  ~DeviceVec() { moe::cuda::device_free(p_); }
  DeviceVec(const DeviceVec&) = delete;
  DeviceVec& operator=(const DeviceVec&) = delete;
  T* get() { return p_; }
  const T* get() const { return p_; }
  size_t size() const { return n_; }
  std::vector<T> host() const {
    std::vector<T> h(n_);
    moe::cuda::copy_to_host(h.data(), p_, n_ * sizeof(T));
    return h;
  }

 private:
  size_t n_;
  T* p_;
};

// A non-blocking stream for one test; reads go through sync() first.
struct TestStream {
  moe::cuda::Stream s = moe::cuda::stream_create();
  TestStream() = default;
  TestStream(const TestStream&) = delete;
  TestStream& operator=(const TestStream&) = delete;
  ~TestStream() { moe::cuda::stream_destroy(s); }
  void sync() const { moe::cuda::stream_synchronize(s); }
};

// n normal floats (seeded, counter-based) scaled by `scale`.
inline std::vector<float> normal_floats(size_t n, uint64_t seed, float scale = 1.0f) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = scale * static_cast<float>(moe::rng_normal(seed, 1, i));
  return v;
}

// |got - want| <= atol + rtol |want| everywhere; reports the first failure's index.
inline ::testing::AssertionResult all_close(const std::vector<float>& got,
                                            const std::vector<float>& want, double atol,
                                            double rtol) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "sizes " << got.size() << " vs " << want.size();
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = got[i], w = want[i];
    if (!(std::fabs(g - w) <= atol + rtol * std::fabs(w)))
      return ::testing::AssertionFailure() << "index " << i << ": " << g << " vs " << w;
  }
  return ::testing::AssertionSuccess();
}

}  // namespace moe_gpu_test
