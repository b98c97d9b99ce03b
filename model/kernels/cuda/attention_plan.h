// Host-side launch planning for the CUDA attention core (model/kernels/cuda/attention.cu):
// plain C++, compiled into the core library on every machine, so the CPU tests check that every
// shipped config's shapes fit the device limits before anyone owns a GPU.
//
// What is computed is an AttentionShape (the layouts of model/kernels/cpu/dense_ops.h's
// attention_forward / attention_backward, HDv = HD for standard attention, HDv != HD for MLA);
// how is an AttentionPlan: the core (FP32 or BF16 tensor cores), the launch dimensions and
// dynamic shared memory of the three kernels.
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

// The two cores. kFp32: every product in FP32 on CUDA cores (exactly the CPU's arithmetic up
// to summation order). kBf16: the products S = Q K^T, dP = dO V^T, O += P V, dQ += dS K,
// dK += dS^T Q and dV += P^T dO on BF16 tensor cores (WMMA 16x16x16, FP32 accumulation): the
// operands Q, K, V, dO are staged as BF16 and P, dS rounded to BF16 before their products, as
// FlashAttention does in BF16 training; the softmax, lse and D stay FP32. kBf16 needs HD and
// HDv multiples of kAttnTcAlign; attention_plan falls back to kFp32 otherwise.
enum class AttentionCore { kFp32, kBf16 };
inline constexpr int64_t kAttnTcAlign = 16;
MOE_HD constexpr bool attention_tc_fits(int64_t HD, int64_t HDv) {
  return HD % kAttnTcAlign == 0 && HDv % kAttnTcAlign == 0;
}

// Row stride (elements) of a staged (32, D) operand. kFp32: D + 1 for the chunks that lanes
// read one row each (K, V, Q or dO rows: lane l's element d in bank (l (D + 1) + d) mod 32,
// distinct across a warp for even D), D for the tiles read as warp broadcasts. kBf16: D + 8
// everywhere (WMMA's leading dimensions are multiples of 16 bytes; rows 4 banks apart).
MOE_HD constexpr int64_t attention_ld(int64_t D, bool lane_rows, AttentionCore c) {
  return c == AttentionCore::kBf16 ? D + 8 : lane_rows ? D + 1 : D;
}
// Row stride of the (32, 32) P / dS chunk: 33 in FP32 (a warp spanning two accumulator rows
// reads two P rows at once, in different banks), 40 BF16 elements for WMMA.
MOE_HD constexpr int64_t attention_p_ld(AttentionCore c) {
  return c == AttentionCore::kBf16 ? 40 : kAttnTile + 1;
}
// kBf16's FP32 (32, 32) score tiles, written by WMMA (ld a multiple of 4 floats).
inline constexpr int64_t kAttnScoreLd = 36;

// Byte offsets of each kernel's pieces of dynamic shared memory, in carving order; `bytes` is
// the total. FP32 pieces are packed (4-byte aligned); BF16 ones start on 128 bytes (WMMA
// needs 32). Operands are float in kFp32 and BF16 in kBf16, as are P and dS; accumulators
// and the per-row values are float. Score tiles (s) exist in kBf16 only (kFp32 keeps scores
// in registers).
//   forward:       q (32, HD), k chunk, v chunk, s (one tile), p, o acc (32, HDv), row (32)
//   backward_rows: q, dout (32, HDv), k chunk, v chunk, s (S and dP tiles), p (dS), dq acc
//   backward_cols: k tile, v tile, q chunk, dout chunk, s (two tiles), p (P^T) and ds (dS^T),
//                  dk acc (32, HD), dv acc (32, HDv)
struct AttentionSmem {
  int64_t q = 0, k = 0, v = 0, dout = 0, s = 0, p = 0, ds = 0, acc0 = 0, acc1 = 0, row = 0,
          bytes = 0;
  // Row strides (elements, attention_ld) of the operand pieces, as this kernel stages them.
  int64_t ld_q = 0, ld_k = 0, ld_v = 0, ld_dout = 0;
};
enum class AttentionKernel { kForward, kBackwardRows, kBackwardCols };

MOE_HD constexpr AttentionSmem attention_smem(AttentionKernel k, int64_t HD, int64_t HDv,
                                              AttentionCore c) {
  const bool tc = c == AttentionCore::kBf16;
  const int64_t eb = tc ? 2 : 4, align = tc ? 128 : 4, T = kAttnTile;
  AttentionSmem m;
  int64_t at = 0;
  const auto take = [&](int64_t bytes) {
    const int64_t off = (at + align - 1) / align * align;
    at = off + bytes;
    return off;
  };
  // A (32, D) operand piece: its row stride into ld, its offset returned.
  const auto operand = [&](int64_t& ld, int64_t D, bool lane_rows) {
    ld = attention_ld(D, lane_rows, c);
    return take(T * ld * eb);
  };
  const int64_t s_tile = tc ? T * kAttnScoreLd * 4 : 0;
  const int64_t p_bytes = T * attention_p_ld(c) * eb;
  if (k == AttentionKernel::kForward) {
    m.q = operand(m.ld_q, HD, false);
    m.k = operand(m.ld_k, HD, true);
    m.v = operand(m.ld_v, HDv, false);
    m.s = take(s_tile);
    m.p = take(p_bytes);
    m.acc0 = take(T * HDv * 4);
    m.row = take(T * 4);
  } else if (k == AttentionKernel::kBackwardRows) {
    m.q = operand(m.ld_q, HD, false);
    m.dout = operand(m.ld_dout, HDv, false);
    m.k = operand(m.ld_k, HD, true);
    m.v = operand(m.ld_v, HDv, true);
    m.s = take(2 * s_tile);
    m.p = take(p_bytes);
    m.acc0 = take(T * HD * 4);
  } else {
    m.k = operand(m.ld_k, HD, false);
    m.v = operand(m.ld_v, HDv, false);
    m.q = operand(m.ld_q, HD, true);
    m.dout = operand(m.ld_dout, HDv, true);
    m.s = take(2 * s_tile);
    m.p = take(p_bytes);
    m.ds = take(p_bytes);
    m.acc0 = take(T * HD * 4);
    m.acc1 = take(T * HDv * 4);
  }
  m.bytes = (at + align - 1) / align * align;
  return m;
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
  AttentionCore core = AttentionCore::kFp32;
  LaunchDims forward;        // online softmax, O = P V, lse: grid (row tiles, NH, B)
  LaunchDims backward_rows;  // D = rowsum(P dP), dS, dQ = dS K: grid (row tiles, NH, B)
  LaunchDims backward_cols;  // dK = sum_h dS^T Q, dV = sum_h P^T dO: grid (column tiles, NKV, B)
  std::string describe() const;
};

// The scratch floats the kernels need for `shape`: the backward's per-row dot
// D_i = sum_j P_ij dP_ij, (B, NH, T).
int64_t attention_scratch_floats(const AttentionShape& shape);

// The plan of `shape` on a device allowing `smem_limit_bytes` of dynamic shared memory per
// block (227 KiB on sm_90, 163 KiB on sm_80), on `core` where the head widths allow it
// (attention_tc_fits; kFp32 otherwise). CHECK-fails with the shape and the bytes needed
// where a kernel would need more, or where a grid dimension exceeds CUDA's limits. B = 0 or
// T = 0 plans empty grids (grid_x = 0): the launchers then do nothing.
AttentionPlan attention_plan(const AttentionShape& shape, int64_t smem_limit_bytes,
                             AttentionCore core = AttentionCore::kFp32);

}  // namespace moe::cuda
