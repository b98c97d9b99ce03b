// Runs CUDA device code on the CPU, for tests of a kernel's logic (indices, shared-memory
// carving, barriers, WMMA fragment addressing) on machines without a GPU: include this, then
// the kernels' .cuh, and launch with sim_launch. One std::thread per CUDA thread, one block at
// a time; __syncthreads is a barrier over the block's threads; warp shuffles go through a
// per-warp exchange slot between two warp barriers; WMMA fragments are plain 16x16 float
// arrays that every lane of the warp computes alike (a store is written by lane 0 between two
// warp barriers). Dynamic shared memory is the kernel file's `smem` array, which the test
// defines (sim_smem_bytes of it) in the kernels' namespace.
// What it cannot check: timing, real concurrency between blocks, bank conflicts, the
// hardware's own rules (alignment faults, register limits): a test under it checks logic only.
#pragma once

#include <barrier>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "model/fp8.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__
#define __align__(n)

struct SimDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local SimDim3 threadIdx;
inline thread_local SimDim3 blockIdx;

namespace cuda_sim {

// The block being run: its barrier, and per warp a barrier and an exchange slot.
struct Block {
  explicit Block(int threads)
      : block_barrier(threads), warps(static_cast<size_t>((threads + 31) / 32)) {}
  struct Warp {
    std::barrier<> barrier{32};
    float slot[32] = {};
  };
  std::barrier<> block_barrier;
  std::vector<Warp> warps;
};
inline thread_local Block* current = nullptr;

inline Block::Warp& my_warp() { return current->warps[threadIdx.x / 32]; }
inline int my_lane() { return static_cast<int>(threadIdx.x % 32); }

// Every lane of the warp must call it (as the hardware's *_sync calls).
inline float warp_exchange(float v, int src_lane) {
  Block::Warp& w = my_warp();
  w.slot[my_lane()] = v;
  w.barrier.arrive_and_wait();
  const float r = w.slot[src_lane];
  w.barrier.arrive_and_wait();
  return r;
}

inline void warp_sync() { my_warp().barrier.arrive_and_wait(); }

}  // namespace cuda_sim

inline void __syncthreads() { cuda_sim::current->block_barrier.arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
  return cuda_sim::warp_exchange(v, cuda_sim::my_lane() ^ lane_mask);
}
inline float __shfl_sync(unsigned /*mask*/, float v, int src_lane) {
  return cuda_sim::warp_exchange(v, src_lane);
}
[[noreturn]] inline void __trap() { std::abort(); }

// BF16 as cuda_bf16.h has it (round to nearest even), through model/fp8.h's conversions.
struct __nv_bfloat16 {
  uint16_t bits = 0;
};
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return {moe::bf16_from_float(x)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return moe::bf16_to_float(h.bits); }

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the simulation has the 16x16x16 shape only");
  float x[16][16] = {};
};

inline float sim_value(float v) { return v; }
inline float sim_value(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ld) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      f.x[i][j] = sim_value(std::is_same_v<Layout, col_major> ? p[j * ld + i] : p[i * ld + j]);
  cuda_sim::warp_sync();  // every lane has read before any lane of the warp writes
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ld, layout_t layout) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.x[i][j] = layout == mem_row_major ? p[i * ld + j] : p[j * ld + i];
  cuda_sim::warp_sync();
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ld, layout_t layout) {
  cuda_sim::warp_sync();
  if (cuda_sim::my_lane() == 0)
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) (layout == mem_row_major ? p[i * ld + j] : p[j * ld + i]) = f.x[i][j];
  cuda_sim::warp_sync();
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float v) {
  for (auto& r : f.x)
    for (float& e : r) e = v;
}

// d = a b + c, each element's sum over k in increasing order.
template <typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  fragment<accumulator, 16, 16, 16, float> r;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.x[i][j];
      for (int k = 0; k < 16; ++k) s += a.x[i][k] * b.x[k][j];
      r.x[i][j] = s;
    }
  d = r;
}

}  // namespace nvcuda::wmma

namespace cuda_sim {

// Runs body() as every thread of every block of a (gx, gy, gz) x threads launch, one block at
// a time; before_block / after_block (may be empty) run on the calling thread around each
// block (a test poisons and inspects the shared memory there).
inline void launch(unsigned gx, unsigned gy, unsigned gz, int threads,
                   const std::function<void()>& body,
                   const std::function<void()>& before_block = {},
                   const std::function<void()>& after_block = {}) {
  for (unsigned z = 0; z < gz; ++z)
    for (unsigned y = 0; y < gy; ++y)
      for (unsigned x = 0; x < gx; ++x) {
        if (before_block) before_block();
        Block block(threads);
        std::vector<std::thread> pool;
        pool.reserve(static_cast<size_t>(threads));
        for (int t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            current = &block;
            threadIdx = SimDim3{static_cast<unsigned>(t), 0, 0};
            blockIdx = SimDim3{x, y, z};
            body();
          });
        for (std::thread& th : pool) th.join();
        if (after_block) after_block();
      }
}

}  // namespace cuda_sim
