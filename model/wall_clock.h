// Monotonic wall-clock seconds, for step timing, time limits and communication timing.
#pragma once

#include <chrono>

namespace moe {

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace moe
