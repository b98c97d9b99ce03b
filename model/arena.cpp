#include "model/arena.h"

#include <cstdlib>
#include <cstring>
#include <utility>

#include "model/check.h"

namespace moe {

Arena::Arena(std::string name, size_t bytes) : name_(std::move(name)), bytes_(bytes) {
  size_t rounded = (bytes + kArenaAlign - 1) / kArenaAlign * kArenaAlign;
  if (rounded == 0) rounded = kArenaAlign;
  data_ = static_cast<char*>(std::aligned_alloc(kArenaAlign, rounded));
  if (!data_) user_error("out of memory allocating the %s arena (%.1f MiB)", name_.c_str(),
                         static_cast<double>(bytes) / (1 << 20));
  std::memset(data_, 0, rounded);
}

Arena::~Arena() { std::free(data_); }

Arena::Arena(Arena&& o) noexcept
    : name_(std::move(o.name_)), data_(std::exchange(o.data_, nullptr)),
      bytes_(std::exchange(o.bytes_, 0)) {}

Arena& Arena::operator=(Arena&& o) noexcept {
  if (this != &o) {
    std::free(data_);
    name_ = std::move(o.name_);
    data_ = std::exchange(o.data_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

}  // namespace moe
