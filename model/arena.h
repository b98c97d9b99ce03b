// Arenas: one allocation per lifetime (parameters, gradients, optimizer state,
// activations), sized from a table before anything is allocated.
//
// A layout function is written once against a Carver and run twice: first with no base
// (it only measures), then over the allocated block (it hands out pointers). So the size
// table and the pointer assignment can never disagree.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "model/types.h"

namespace moe {

constexpr size_t kArenaAlign = 64;  // cache line; also AVX-512 friendly

class Carver {
 public:
  explicit Carver(char* base = nullptr) : base_(base) {}
  template <typename T>
  T* take(size_t count) {
    used_ = (used_ + kArenaAlign - 1) / kArenaAlign * kArenaAlign;
    T* p = base_ ? reinterpret_cast<T*>(base_ + used_) : nullptr;
    used_ += count * sizeof(T);
    return p;
  }
  size_t used() const { return used_; }

 private:
  char* base_;
  size_t used_ = 0;
};

// An owned, zero-filled, aligned block of memory: host memory, or with Device::kCuda one
// cudaMalloc on the current device (never managed memory; refused in a build without CUDA).
class Arena {
 public:
  Arena() = default;
  Arena(std::string name, size_t bytes, Device device = Device::kCpu);
  ~Arena();
  Arena(Arena&& o) noexcept;
  Arena& operator=(Arena&& o) noexcept;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  char* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  const std::string& name() const { return name_; }
  Device device() const { return device_; }

 private:
  void release();
  std::string name_;
  char* data_ = nullptr;
  size_t bytes_ = 0;
  Device device_ = Device::kCpu;
};

// Runs `layout(Carver&)` to size an arena, allocates it, runs it again to point into it.
template <typename Layout>
Arena arena_build(const std::string& name, Layout&& layout, Device device = Device::kCpu) {
  Carver measure;
  layout(measure);
  Arena arena(name, measure.used(), device);
  Carver carve(arena.data());
  layout(carve);
  return arena;
}

}  // namespace moe
