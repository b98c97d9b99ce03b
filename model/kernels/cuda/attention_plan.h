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

// Row stride of a staged chunk that lanes read one row each (K, V, Q or dO rows): lane l's
// element d sits in bank (l (D + 1) + d) mod 32, distinct across a warp when D + 1 is odd
// (every even head width). The (32, 32) P / dS chunks get it too: a warp that spans two
// accumulator rows reads two P rows at once, 33 apart, in different banks.
MOE_HD constexpr int64_t attention_padded(int64_t D) { return D + 1; }

// Shared-memory floats of the three kernels, in the order each carves them (attention.cu):
//   forward:       Q tile (32, HD), K chunk (32, HD + 1), V chunk (32, HDv), P chunk (32, 33),
//                  O accumulator (32, HDv), per-row rescale, then row sum (32);
//   backward_rows: Q tile (32, HD), dO tile (32, HDv), K chunk (32, HD + 1),
//                  V chunk (32, HDv + 1), dS chunk (32, 33), dQ accumulator (32, HD);
//   backward_cols: K tile (32, HD), V tile (32, HDv), Q chunk (32, HD + 1),
//                  dO chunk (32, HDv + 1), P^T and dS^T chunks (32, 33) each,
//                  dK accumulator (32, HD), dV accumulator (32, HDv).
MOE_HD constexpr int64_t attention_forward_smem_floats(int64_t HD, int64_t HDv) {
  return kAttnTile * (HD + attention_padded(HD) + HDv + attention_padded(kAttnTile) + HDv + 1);
}
MOE_HD constexpr int64_t attention_backward_rows_smem_floats(int64_t HD, int64_t HDv) {
  return kAttnTile * (HD + HDv + attention_padded(HD) + attention_padded(HDv) +
                      attention_padded(kAttnTile) + HD);
}
MOE_HD constexpr int64_t attention_backward_cols_smem_floats(int64_t HD, int64_t HDv) {
  return kAttnTile * (HD + HDv + attention_padded(HD) + attention_padded(HDv) +
                      2 * attention_padded(kAttnTile) + HD + HDv);
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
  LaunchDims forward;        // online softmax, O = P V, lse: grid (row tiles, NH, B)
  LaunchDims backward_rows;  // D = rowsum(P dP), dS, dQ = dS K: grid (row tiles, NH, B)
  LaunchDims backward_cols;  // dK = sum_h dS^T Q, dV = sum_h P^T dO: grid (column tiles, NKV, B)
  std::string describe() const;
};

// The scratch floats the kernels need for `shape`: the backward's per-row dot
// D_i = sum_j P_ij dP_ij, (B, NH, T).
int64_t attention_scratch_floats(const AttentionShape& shape);

// The plan of `shape` on a device allowing `smem_limit_bytes` of dynamic shared memory per
// block (227 KiB on sm_90, 163 KiB on sm_80). CHECK-fails with the shape and the bytes needed
// where a kernel would need more, or where a grid dimension exceeds CUDA's limits. B = 0 or
// T = 0 plans empty grids (grid_x = 0): the launchers then do nothing.
AttentionPlan attention_plan(const AttentionShape& shape, int64_t smem_limit_bytes);

}  // namespace moe::cuda
