// Rotary position embedding arithmetic shared by the CPU kernels (model/kernels/cpu/rope.cpp)
// and the CUDA kernels (model/kernels/cuda/rope.cu), so the CPU tests cover the GPU math.
// Pairs are interleaved: pair i of a head is (x[2i], x[2i+1]); HD is the (even) head dim.
#pragma once

#include <cmath>
#include <cstdint>

#include "model/hd.h"

namespace moe {

// angle(t, i) = t * theta^(-2i/HD), in double whatever the element type.
MOE_HD inline double rope_angle(int64_t t, int64_t i, int64_t HD, double theta) {
  return static_cast<double>(t) * pow(theta, -2.0 * static_cast<double>(i) / HD);
}

template <typename T>
struct RopePair {
  T x0, x1;
};

// (x0, x1) turned by the angle whose cosine is c and sine s (s negated for the backward).
template <typename T>
MOE_HD inline RopePair<T> rope_rotate(T x0, T x1, T c, T s) {
  return {x0 * c - x1 * s, x0 * s + x1 * c};
}

}  // namespace moe
