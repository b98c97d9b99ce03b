// Host-side launch planning for the CUDA attention core (model/kernels/cuda/attention.cu):
// plain C++, compiled into the core library on every machine, so the CPU tests check that every
// shipped config's shapes fit the device limits before anyone owns a GPU.
//
// What is computed is an AttentionShape (the layouts of model/kernels/cpu/dense_ops.h's
// attention_forward / attention_backward, HDv = HD for standard attention, HDv != HD for MLA);
// how is an AttentionPlan: the launch dimensions and dynamic shared memory of the three kernels.
// The tile constants and the shared-memory layouts below are the kernels' own: they carve
// their dynamic shared memory with exactly these sizes.
#pragma once

#include <cstdint>
#include <string>

#include "model/hd.h"
#include "model/kernels/cuda/launch_dims.h"

namespace moe::cuda {

// Query rows per block (forward, dS / dQ), keys per staged chunk, key columns per block (dK / dV).
inline constexpr int kAttnTile = 32;
// Threads per block: 8 warps; warp w owns rows w, w + 8, w + 16, w + 24 of a tile.
inline constexpr int kAttnThreads = 256;
// Beyond this many bytes of dynamic shared memory a kernel must opt in
// (cudaFuncAttributeMaxDynamicSharedMemorySize).
inline constexpr int64_t kSmemDefaultBytes = 48 * 1024;
// The opt-in per-block limits (cudaDevAttrMaxSharedMemoryPerBlockOptin) of the targets.
inline constexpr int64_t kSmemLimitSm80 = 163 * 1024;
inline constexpr int64_t kSmemLimitSm90 = 227 * 1024;

// Shared-memory floats of the kernels' two building blocks over a head width D:
//   dots:   S = A B^T of one tile: the A rows (kAttnTile, D), a chunk of B rows
//           (kAttnTile, D + 1; the +1 pad makes the lanes' column reads conflict-free);
//   matmul: O = P M of one tile: the O accumulator (kAttnTile, D), a chunk of M rows
//           (kAttnTile, D), a chunk of P (kAttnTile, kAttnTile + 1).
MOE_HD constexpr int64_t attention_dots_smem_floats(int64_t D) {
  return kAttnTile * D + kAttnTile * (D + 1);
}
MOE_HD constexpr int64_t attention_matmul_smem_floats(int64_t D) {
  return 2 * kAttnTile * D + kAttnTile * (kAttnTile + 1);
}

// The problem: B sequences of T tokens, NH query heads over NKV kv heads (NKV divides NH),
// query / key heads HD wide, value heads HDv wide.
struct AttentionShape {
  int64_t B = 0, T = 0, NH = 0, NKV = 0, HD = 0, HDv = 0;
  void check_validity() const;  // CHECK-fails naming the shape
  std::string describe() const;
};

// The kernels' configuration.
struct AttentionPlan {
  LaunchDims forward;        // scores, softmax, P V: grid (row tiles, NH, B)
  LaunchDims backward_rows;  // dP = dO V^T, dS, dQ = dS K: grid (row tiles, NH, B)
  LaunchDims backward_cols;  // dK = sum_h dS^T Q, dV = sum_h P^T dO: grid (column tiles, NKV, B)
  std::string describe() const;
};

// The plan of `shape` on a device allowing `smem_limit_bytes` of dynamic shared memory per
// block (227 KiB on sm_90, 163 KiB on sm_80). CHECK-fails with the shape and the bytes needed
// where a kernel would need more, or where a grid dimension exceeds CUDA's limits. B = 0 or
// T = 0 plans empty grids (grid_x = 0): the launchers then do nothing.
AttentionPlan attention_plan(const AttentionShape& shape, int64_t smem_limit_bytes);

}  // namespace moe::cuda
