// A CUDA simulator for tests: the project's kernel files (.cu) compiled as plain C++ with
// this directory first on the include path (its cuda_runtime.h, cublas_v2.h, cuda_bf16.h and
// mma.h stand in for the toolkit's) and MOETRAIN_CUDA_SIM defined, so every launch
// (MOE_LAUNCH, model/kernels/cuda/launch.h) runs the kernel on the CPU. The gpu twin tests of
// the kernels then run unchanged on machines without a GPU (moetrain_gpu_sim_tests).
//
// How: one std::thread per CUDA thread, one block at a time. __syncthreads is a barrier over
// the block; __syncwarp and the warp intrinsics (shuffles, ballot, match, reduce) go through
// a per-warp exchange slot between warp barriers; WMMA fragments are plain 16x16 float arrays
// every lane of a warp computes alike, a store written by lane 0 between warp barriers.
// Static __shared__ variables are function statics (blocks never overlap); dynamic shared
// memory (MOE_DYNAMIC_SMEM) is a per-block buffer filled with 0xFF bytes (NaN in FP32 and
// BF16) before the block runs, so a read of shared memory the block never wrote shows. Device
// memory is host memory; streams and copies are synchronous.
// What it checks: the kernels' index arithmetic, carving, barriers, masks, warp-level logic
// and numerics against the CPU twins. What it cannot: timing, concurrency between blocks,
// the hardware's rules (alignment faults, register and shared-memory limits beyond the
// plans' own checks), and the library calls it does not simulate (cuBLAS, NCCL).
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "model/fp8.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local dim3 threadIdx{0, 0, 0};
inline thread_local dim3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace cuda_sim {

// The block being run: its barrier, its dynamic shared memory, and per warp a barrier and an
// exchange slot per lane.
struct Block {
  Block(int threads, size_t smem_bytes) : barrier(threads), smem(smem_bytes + 128, 0xFF) {
    for (int w = 0; w * 32 < threads; ++w)
      warps.emplace_back(std::make_unique<Warp>(std::min(32, threads - 32 * w)));
  }
  struct Warp {
    explicit Warp(int lanes_) : lanes(lanes_), barrier(lanes_) {}
    int lanes;  // 32, fewer in a block's last warp when its size is not a multiple of 32
    std::barrier<> barrier;
    uint64_t slot[32] = {};
  };
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> smem;
  // Whether the poison past the first `bytes` of the dynamic shared memory is intact.
  bool untouched_past(size_t bytes) {
    const unsigned char* end = smem.data() + smem.size();
    for (const unsigned char* p = smem_base() + bytes; p < end; ++p)
      if (*p != 0xFF) return false;
    return true;
  }
  unsigned char* smem_base() {
    const uintptr_t p = reinterpret_cast<uintptr_t>(smem.data());
    return smem.data() + ((128 - p % 128) % 128);
  }
};
inline thread_local Block* current = nullptr;
inline thread_local int linear_tid = 0;

inline Block::Warp& my_warp() { return *current->warps[static_cast<size_t>(linear_tid / 32)]; }
inline int my_lane() { return linear_tid % 32; }
inline void warp_sync() { my_warp().barrier.arrive_and_wait(); }

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// Every lane of the warp posts v; f(slots) runs on every lane once all have posted.
template <typename T, typename F>
auto warp_collective(T v, F f) {
  Block::Warp& w = my_warp();
  w.slot[my_lane()] = to_bits(v);
  w.barrier.arrive_and_wait();
  const auto r = f(w.slot);
  w.barrier.arrive_and_wait();
  return r;
}

template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(current->smem_base());
}

// MOE_LAUNCH's object: launcher(grid, block, smem, stream, kernel)(args...) runs the kernel.
template <typename... P>
struct Launch {
  dim3 grid, block;
  size_t smem;
  void (*kernel)(P...);
  // One worker per CUDA thread for the whole launch; the blocks run one after another, each
  // set up by the calling thread between two rounds of a start / end barrier.
  template <typename... A>
  void operator()(A&&... args) const {
    const int threads = static_cast<int>(block.x * block.y * block.z);
    const size_t nblocks = static_cast<size_t>(grid.x) * grid.y * grid.z;
    if (threads <= 0 || nblocks == 0) return;
    std::barrier<> start(threads + 1), end(threads + 1);
    std::unique_ptr<Block> b;
    dim3 at;
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(threads));
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        linear_tid = t;
        threadIdx = dim3(static_cast<unsigned>(t) % block.x,
                         static_cast<unsigned>(t) / block.x % block.y,
                         static_cast<unsigned>(t) / (block.x * block.y));
        blockDim = block;
        gridDim = grid;
        for (size_t n = 0; n < nblocks; ++n) {
          start.arrive_and_wait();
          current = b.get();
          blockIdx = at;
          kernel(static_cast<P>(args)...);
          // An exited thread no longer holds back the barriers of the ones still running
          // (as on the device).
          my_warp().barrier.arrive_and_drop();
          current->barrier.arrive_and_drop();
          end.arrive_and_wait();
        }
      });
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          b = std::make_unique<Block>(threads, smem);
          at = dim3(x, y, z);
          start.arrive_and_wait();
          end.arrive_and_wait();
          if (!b->untouched_past(smem)) {
            std::fprintf(stderr, "cuda_sim: a kernel wrote past its %zu bytes of dynamic shared memory\n", smem);
            std::abort();
          }
        }
    for (std::thread& th : pool) th.join();
  }
};

template <typename S, typename... P>
Launch<P...> launcher(dim3 grid, dim3 block, size_t smem, S /*stream*/, void (*kernel)(P...)) {
  return Launch<P...>{grid, block, smem, kernel};
}

}  // namespace cuda_sim

// ---- Intrinsics -----------------------------------------------------------------------------

inline void __syncthreads() { cuda_sim::current->barrier.arrive_and_wait(); }
inline void __syncwarp(unsigned /*mask*/ = 0xffffffffu) { cuda_sim::warp_sync(); }

template <typename T>
T __shfl_sync(unsigned /*mask*/, T v, int src_lane, int /*width*/ = 32) {
  return cuda_sim::warp_collective(v, [&](const uint64_t* s) {
    return cuda_sim::from_bits<T>(s[src_lane & 31]);
  });
}
template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask, int /*width*/ = 32) {
  const int src = cuda_sim::my_lane() ^ lane_mask;
  return cuda_sim::warp_collective(v, [&](const uint64_t* s) { return cuda_sim::from_bits<T>(s[src]); });
}
inline unsigned __ballot_sync(unsigned /*mask*/, int pred) {
  const int n = cuda_sim::my_warp().lanes;
  return cuda_sim::warp_collective(pred != 0 ? 1 : 0, [&](const uint64_t* s) {
    unsigned m = 0;
    for (int l = 0; l < n; ++l) m |= (s[l] != 0 ? 1u : 0u) << l;
    return m;
  });
}
inline int __all_sync(unsigned mask, int pred) {
  const int n = cuda_sim::my_warp().lanes;
  const unsigned full = n == 32 ? 0xffffffffu : (1u << n) - 1;
  return __ballot_sync(mask, pred) == full ? 1 : 0;
}
inline unsigned __reduce_max_sync(unsigned /*mask*/, unsigned v) {
  const int n = cuda_sim::my_warp().lanes;
  return cuda_sim::warp_collective(v, [&](const uint64_t* s) {
    unsigned m = 0;
    for (int l = 0; l < n; ++l) m = std::max(m, static_cast<unsigned>(s[l]));
    return m;
  });
}
template <typename T>
unsigned __match_any_sync(unsigned /*mask*/, T v) {
  const int n = cuda_sim::my_warp().lanes;
  const uint64_t mine = cuda_sim::to_bits(v);
  return cuda_sim::warp_collective(v, [&](const uint64_t* s) {
    unsigned m = 0;
    for (int l = 0; l < n; ++l) m |= (s[l] == mine ? 1u : 0u) << l;
    return m;
  });
}
inline int __popc(unsigned x) { return std::popcount(x); }

// Device min / max over mixed integer types, as CUDA's overloads.
template <typename A, typename B>
std::common_type_t<A, B> min(A a, B b) {
  return a < b ? a : b;
}
template <typename A, typename B>
std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

template <typename T>
T atomicAdd(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_add(v);
}
template <typename T>
T atomicMax(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
[[noreturn]] inline void __trap() { std::abort(); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }

// ---- BF16 (cuda_bf16.h): round to nearest even, through model/fp8.h's conversions ----------

struct __nv_bfloat16 {
  uint16_t bits;
};
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return {moe::bf16_from_float(x)}; }
inline __nv_bfloat16 __float2bfloat16(float x) { return __float2bfloat16_rn(x); }
inline float __bfloat162float(__nv_bfloat16 h) { return moe::bf16_to_float(h.bits); }

// ---- WMMA (mma.h), the 16x16x16 shape --------------------------------------------------------

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the simulator has the 16x16x16 shape only");
  float x[16][16] = {};
};

inline float sim_value(float v) { return v; }
inline float sim_value(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ld) {
  for (unsigned i = 0; i < 16; ++i)
    for (unsigned j = 0; j < 16; ++j)
      f.x[i][j] = sim_value(std::is_same_v<Layout, col_major> ? p[j * ld + i] : p[i * ld + j]);
  cuda_sim::warp_sync();
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ld, layout_t layout) {
  for (unsigned i = 0; i < 16; ++i)
    for (unsigned j = 0; j < 16; ++j)
      f.x[i][j] = layout == mem_row_major ? p[i * ld + j] : p[j * ld + i];
  cuda_sim::warp_sync();
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ld, layout_t layout) {
  cuda_sim::warp_sync();  // every lane has loaded what the store may overwrite
  if (cuda_sim::my_lane() == 0)
    for (unsigned i = 0; i < 16; ++i)
      for (unsigned j = 0; j < 16; ++j)
        (layout == mem_row_major ? p[i * ld + j] : p[j * ld + i]) = f.x[i][j];
  cuda_sim::warp_sync();
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float v) {
  for (auto& r : f.x)
    for (float& e : r) e = v;
}

// d = a b + c, each element summed over k in increasing order.
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
