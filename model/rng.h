// Counter-based randomness: every random number is a pure function of
// (seed, stream, counter), so nothing has to be saved and any rank can reproduce any draw.
#pragma once

#include <cmath>
#include <cstdint>

namespace moe {

// splitmix64 finalizer: a bijective 64-bit mix with good avalanche.
inline uint64_t rng_mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

inline uint64_t rng_u64(uint64_t seed, uint64_t stream, uint64_t counter) {
  return rng_mix(rng_mix(rng_mix(seed) ^ stream) ^ counter);
}

// Uniform in (0, 1): 53 random bits, never exactly 0 (safe for log).
inline double rng_uniform(uint64_t seed, uint64_t stream, uint64_t counter) {
  return (static_cast<double>(rng_u64(seed, stream, counter) >> 11) + 0.5) * 0x1.0p-53;
}

// Standard normal by Box-Muller from two uniforms of the same counter.
inline double rng_normal(uint64_t seed, uint64_t stream, uint64_t counter) {
  double u1 = rng_uniform(seed, stream, 2 * counter);
  double u2 = rng_uniform(seed, stream, 2 * counter + 1);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

// Purposes of random streams (the `stream` argument's high bits), so draws for different
// purposes never collide.
enum class RngPurpose : uint64_t { kInit = 1, kData = 2, kSample = 3 };

inline uint64_t rng_stream(RngPurpose purpose, uint64_t index) {
  return (static_cast<uint64_t>(purpose) << 56) ^ index;
}

}  // namespace moe
