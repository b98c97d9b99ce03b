#include "model/arena.h"

#include <cstdlib>
#include <cstring>
#include <utility>

#include "model/check.h"
#ifdef MOETRAIN_HAVE_CUDA
#include "model/kernels/cuda/cuda_backend.h"
#endif

namespace moe {

Arena::Arena(std::string name, size_t bytes, Device device)
    : name_(std::move(name)), bytes_(bytes), device_(device) {
  size_t rounded = (bytes + kArenaAlign - 1) / kArenaAlign * kArenaAlign;
  if (rounded == 0) rounded = kArenaAlign;
  CHECK(device != Device::kAuto, "the %s arena needs a resolved device", name_.c_str());
  if (device == Device::kCuda) {
#ifdef MOETRAIN_HAVE_CUDA
    // cudaMalloc aligns to 256 bytes, more than kArenaAlign.
    data_ = static_cast<char*>(cuda::device_alloc(rounded));
    cuda::device_memset_zero(data_, rounded);
    return;
#else
    user_error("the %s arena needs CUDA, and this build has none", name_.c_str());
#endif
  }
  data_ = static_cast<char*>(std::aligned_alloc(kArenaAlign, rounded));
  if (!data_) user_error("out of memory allocating the %s arena (%.1f MiB)", name_.c_str(),
                         static_cast<double>(bytes) / (1 << 20));
  std::memset(data_, 0, rounded);
}

void Arena::release() {
  if (!data_) return;
#ifdef MOETRAIN_HAVE_CUDA
  if (device_ == Device::kCuda) {
    cuda::device_free(data_);
    data_ = nullptr;
    return;
  }
#endif
  std::free(data_);
  data_ = nullptr;
}

Arena::~Arena() { release(); }

Arena::Arena(Arena&& o) noexcept
    : name_(std::move(o.name_)), data_(std::exchange(o.data_, nullptr)),
      bytes_(std::exchange(o.bytes_, 0)), device_(o.device_) {}

Arena& Arena::operator=(Arena&& o) noexcept {
  if (this != &o) {
    release();
    name_ = std::move(o.name_);
    data_ = std::exchange(o.data_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    device_ = o.device_;
  }
  return *this;
}

}  // namespace moe
