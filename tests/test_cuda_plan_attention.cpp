// Launch planning of the CUDA attention core (model/kernels/cuda/attention_plan.h), checked on
// every machine: the shapes of every shipped config fit the shared-memory limits of sm_80 and
// sm_90 and CUDA's grid limits; oversized heads are refused. Also the shared softmax element
// math (model/softmax_math.h) against the CPU's own pieces, which the GPU kernels compile too.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "model/kernels/cpu/dense_ops.h"
#include "model/kernels/cuda/attention_plan.h"
#include "model/softmax_math.h"

namespace {

using moe::cuda::AttentionCore;
using moe::cuda::AttentionKernel;
using moe::cuda::AttentionPlan;
using moe::cuda::AttentionSmem;
using moe::cuda::AttentionShape;
using moe::cuda::LaunchDims;

struct ConfigShape {
  const char* config;
  AttentionShape shape;  // B = micro_batch; HD = d_model / n_heads (mha) or qk_nope + qk_rope
};

// From configs/*.toml (hard-coded: update with the configs).
const std::vector<ConfigShape>& config_shapes() {
  static const std::vector<ConfigShape> shapes = {
      {"tiny.toml", {16, 128, 4, 4, 32, 32}},
      {"bench-cpu.toml", {8, 256, 8, 8, 64, 64}},
      {"deepseek-v3-tiny.toml", {16, 128, 4, 4, 32 + 16, 32}},
      {"deepseek-v3-1b.toml", {4, 2048, 8, 8, 64 + 32, 64}},
      {"deepseek-v3-16b.toml", {1, 4096, 16, 16, 128 + 64, 128}},
      {"deepseek-v3-671b.toml", {1, 4096, 128, 128, 128 + 64, 128}},
  };
  return shapes;
}

void expect_dims_fit(const LaunchDims& d, int64_t tiles, int64_t heads, int64_t B,
                     int64_t smem_limit, const char* what) {
  SCOPED_TRACE(what);
  EXPECT_EQ(d.grid_x, tiles);
  EXPECT_EQ(d.grid_y, heads);
  EXPECT_EQ(d.grid_z, B);
  EXPECT_GE(d.grid_x, 1);
  EXPECT_LE(d.grid_x, int64_t{2147483647});
  EXPECT_LE(d.grid_y, 65535);
  EXPECT_LE(d.grid_z, 65535);
  EXPECT_GE(d.block, 32);
  EXPECT_LE(d.block, 1024);
  EXPECT_EQ(d.block % 32, 0);
  EXPECT_GT(d.smem_bytes, 0);
  EXPECT_LE(d.smem_bytes, smem_limit);
}

TEST(CudaPlanAttention, EveryConfigFitsSm80AndSm90) {
  for (const ConfigShape& c : config_shapes()) {
    for (const int64_t limit : {moe::cuda::kSmemLimitSm80, moe::cuda::kSmemLimitSm90})
    for (const AttentionCore core : {AttentionCore::kFp32, AttentionCore::kBf16}) {
      SCOPED_TRACE(::testing::Message() << c.config << " limit " << limit << " core "
                                        << static_cast<int>(core));
      const AttentionShape& s = c.shape;
      const AttentionPlan p = moe::cuda::attention_plan(s, limit, core);
      // Every shipped config's heads are multiples of 16: the tensor cores take them all.
      EXPECT_EQ(p.core, core);
      const int64_t tiles = (s.T + moe::cuda::kAttnTile - 1) / moe::cuda::kAttnTile;
      expect_dims_fit(p.forward, tiles, s.NH, s.B, limit, "forward");
      expect_dims_fit(p.backward_rows, tiles, s.NH, s.B, limit, "backward_rows");
      expect_dims_fit(p.backward_cols, tiles, s.NKV, s.B, limit, "backward_cols");
      EXPECT_FALSE(p.describe().empty());
    }
  }
}

// The kernels' shared memory, float for float (attention_plan.h's carving): the 671B heads
// (qk 192, v 128) need more than the default 48 KiB, so the launchers opt in.
TEST(CudaPlanAttention, SharedMemoryMatchesTheKernelsCarving) {
  const AttentionPlan p =
      moe::cuda::attention_plan({1, 4096, 128, 128, 192, 128}, moe::cuda::kSmemLimitSm80);
  // forward: Q (32, 192), K (32, 193), V (32, 128), P (32, 33), O (32, 128), per row (32).
  EXPECT_EQ(p.forward.smem_bytes, 4 * 32 * (192 + 193 + 128 + 33 + 128 + 1));  // 86400
  // backward_rows: Q (32, 192), dO (32, 128), K (32, 193), V (32, 129), dS (32, 33),
  // dQ (32, 192).
  EXPECT_EQ(p.backward_rows.smem_bytes, 4 * 32 * (192 + 128 + 193 + 129 + 33 + 192));  // 110976
  // backward_cols: K (32, 192), V (32, 128), Q (32, 193), dO (32, 129), P^T and dS^T
  // (32, 33), dK (32, 192), dV (32, 128).
  EXPECT_EQ(p.backward_cols.smem_bytes,
            4 * 32 * (192 + 128 + 193 + 129 + 2 * 33 + 192 + 128));  // 131584
  for (const LaunchDims* d : {&p.forward, &p.backward_rows, &p.backward_cols})
    EXPECT_GT(d->smem_bytes, moe::cuda::kSmemDefaultBytes);
  EXPECT_EQ(p.forward.grid_x, 128);
  EXPECT_EQ(p.backward_cols.grid_y, 128);

  // HD = HDv = 64: the forward and backward_rows stay under 48 KiB, backward_cols opts in.
  const AttentionPlan q =
      moe::cuda::attention_plan({8, 256, 8, 8, 64, 64}, moe::cuda::kSmemLimitSm80);
  EXPECT_EQ(q.forward.smem_bytes, 4 * 32 * (64 + 65 + 64 + 33 + 64 + 1));  // 37248
  EXPECT_EQ(q.backward_rows.smem_bytes, 4 * 32 * (64 + 64 + 65 + 65 + 33 + 64));  // 45440
  EXPECT_EQ(q.backward_cols.smem_bytes,
            4 * 32 * (64 + 64 + 65 + 65 + 2 * 33 + 64 + 64));  // 57856
  EXPECT_LE(q.backward_rows.smem_bytes, moe::cuda::kSmemDefaultBytes);
  EXPECT_GT(q.backward_cols.smem_bytes, moe::cuda::kSmemDefaultBytes);
}

// The BF16 core's carving: BF16 operands with rows D + 8 apart, FP32 score tiles (32, 36),
// P / dS (32, 40) BF16, FP32 accumulators, every piece on 128 bytes (WMMA needs 32-byte
// aligned fragment pointers: each fragment starts 16 rows and 16 columns into a piece).
TEST(CudaPlanAttention, Bf16CoreCarvesAlignedPieces) {
  const AttentionSmem f =
      moe::cuda::attention_smem(AttentionKernel::kForward, 192, 128, AttentionCore::kBf16);
  EXPECT_EQ(f.q, 0);
  EXPECT_EQ(f.k, 32 * 200 * 2);
  EXPECT_EQ(f.v, 2 * 32 * 200 * 2);
  EXPECT_EQ(f.s, 2 * 32 * 200 * 2 + 32 * 136 * 2);
  EXPECT_EQ(f.p, f.s + 32 * 36 * 4);
  EXPECT_EQ(f.acc0, f.p + 32 * 40 * 2);
  EXPECT_EQ(f.row, f.acc0 + 32 * 128 * 4);
  EXPECT_EQ(f.bytes, f.row + 128);  // 57984, against 86400 in FP32
  EXPECT_EQ(f.ld_q, 200);  // the row strides the kernels stage with
  EXPECT_EQ(f.ld_k, 200);
  EXPECT_EQ(f.ld_v, 136);
  const AttentionSmem r32 =
      moe::cuda::attention_smem(AttentionKernel::kBackwardRows, 192, 128, AttentionCore::kFp32);
  EXPECT_EQ(r32.ld_q, 192);  // FP32: lane-read chunks padded by one, broadcast tiles not
  EXPECT_EQ(r32.ld_dout, 128);
  EXPECT_EQ(r32.ld_k, 193);
  EXPECT_EQ(r32.ld_v, 129);
  const AttentionPlan p = moe::cuda::attention_plan({1, 4096, 128, 128, 192, 128},
                                                    moe::cuda::kSmemLimitSm80, AttentionCore::kBf16);
  EXPECT_EQ(p.core, AttentionCore::kBf16);
  EXPECT_EQ(p.forward.smem_bytes, 57984);
  EXPECT_NE(p.describe().find("bf16 tensor cores"), std::string::npos);
  for (const AttentionKernel k :
       {AttentionKernel::kForward, AttentionKernel::kBackwardRows, AttentionKernel::kBackwardCols}) {
    for (const int64_t hd : {16, 32, 48, 64, 128, 192}) {
      for (const int64_t hdv : {16, 32, 128}) {
        SCOPED_TRACE(::testing::Message() << static_cast<int>(k) << " " << hd << " " << hdv);
        const AttentionSmem m = moe::cuda::attention_smem(k, hd, hdv, AttentionCore::kBf16);
        for (const int64_t off : {m.q, m.k, m.v, m.dout, m.s, m.p, m.ds, m.acc0, m.acc1, m.row})
          EXPECT_EQ(off % 128, 0);
        EXPECT_EQ(m.bytes % 128, 0);
        // Fragment strides: 16 rows of a BF16 operand, of a P tile, of an accumulator and of
        // a score tile are whole 32-byte units.
        EXPECT_EQ(16 * moe::cuda::attention_ld(hd, true, AttentionCore::kBf16) * 2 % 32, 0);
        EXPECT_EQ(16 * moe::cuda::attention_p_ld(AttentionCore::kBf16) * 2 % 32, 0);
        EXPECT_EQ(16 * hdv * 4 % 32, 0);
        EXPECT_EQ(16 * moe::cuda::kAttnScoreLd * 4 % 32, 0);
        // Wider heads: smaller than the FP32 core's (BF16 operands); at most the two score
        // tiles and the alignment more on any.
        const int64_t fp32 = moe::cuda::attention_smem(k, hd, hdv, AttentionCore::kFp32).bytes;
        EXPECT_LE(m.bytes, fp32 + 2 * 32 * moe::cuda::kAttnScoreLd * 4 + 10 * 128);
        if (hd >= 64 && hdv >= 32) {
          EXPECT_LT(m.bytes, fp32);
        }
      }
    }
  }
  const AttentionSmem c =
      moe::cuda::attention_smem(AttentionKernel::kBackwardCols, 64, 64, AttentionCore::kBf16);
  EXPECT_EQ(c.p - c.s, 2 * 32 * 36 * 4);  // S^T and dP^T tiles
  EXPECT_EQ(c.ds - c.p, 32 * 40 * 2);
}

// Head widths the tensor cores cannot take keep the FP32 core, with its carving.
TEST(CudaPlanAttention, Bf16CoreFallsBackOnOddHeads) {
  for (const AttentionShape s : {AttentionShape{1, 33, 6, 3, 20, 12}, AttentionShape{1, 8, 2, 2, 48, 40},
                                 AttentionShape{1, 8, 2, 2, 8, 8}}) {
    const AttentionPlan p = moe::cuda::attention_plan(s, moe::cuda::kSmemLimitSm90, AttentionCore::kBf16);
    EXPECT_EQ(p.core, AttentionCore::kFp32) << s.describe();
    EXPECT_EQ(p.forward.smem_bytes,
              moe::cuda::attention_smem(AttentionKernel::kForward, s.HD, s.HDv, AttentionCore::kFp32).bytes);
  }
  EXPECT_TRUE(moe::cuda::attention_tc_fits(192, 128));
  EXPECT_FALSE(moe::cuda::attention_tc_fits(192, 120));
}

// T not a multiple of the tile, a single token, and an empty batch.
TEST(CudaPlanAttention, PartialTilesAndEmpty) {
  const AttentionPlan p = moe::cuda::attention_plan({2, 70, 8, 2, 16, 16}, 48 * 1024);
  EXPECT_EQ(p.forward.grid_x, 3);
  EXPECT_EQ(p.backward_cols.grid_y, 2);
  EXPECT_EQ(moe::cuda::attention_plan({1, 1, 1, 1, 8, 8}, 48 * 1024).forward.grid_x, 1);
  EXPECT_EQ(moe::cuda::attention_plan({0, 0, 4, 4, 32, 32}, 48 * 1024).forward.grid_x, 0);
}

TEST(CudaPlanAttentionDeathTest, RefusesHeadsOverTheSharedMemoryLimit) {
  // HD = HDv = 512: even the forward needs 32 (4 512 + 35) floats = 260 KiB > 227 KiB.
  EXPECT_DEATH(moe::cuda::attention_plan({1, 128, 4, 4, 512, 512}, moe::cuda::kSmemLimitSm90),
               "shared memory");
  // HD = HDv = 256: the forward fits sm_80's 163 KiB (132 KiB), backward_rows does not
  // (32 (3 256 + 2 257 + 33) floats = 164 KiB); backward_cols (200.5 KiB) fits only sm_90.
  EXPECT_DEATH(moe::cuda::attention_plan({1, 128, 4, 4, 256, 256}, moe::cuda::kSmemLimitSm80),
               "backward_rows kernel needs");
  EXPECT_EQ(moe::cuda::attention_plan({1, 128, 4, 4, 256, 256}, moe::cuda::kSmemLimitSm90)
                .backward_cols.smem_bytes,
            4 * 32 * (4 * 256 + 2 * 257 + 2 * 33));
  // HD = HDv = 128 fits both targets, but not a device without the opt-in's 48 KiB.
  EXPECT_DEATH(moe::cuda::attention_plan({1, 128, 4, 4, 128, 128}, 48 * 1024), "shared memory");
  EXPECT_DEATH(moe::cuda::attention_plan({1, 128, 6, 4, 32, 32}, moe::cuda::kSmemLimitSm90),
               "attention shape");
  EXPECT_DEATH(moe::cuda::attention_plan({70000, 128, 4, 4, 32, 32}, moe::cuda::kSmemLimitSm90),
               "grid");
}

// The backward's scratch is the per-row dot D, (B, NH, T): O(T), not O(T^2).
TEST(CudaPlanAttention, ScratchIsOneFloatPerQueryRow) {
  EXPECT_EQ(moe::cuda::attention_scratch_floats({2, 70, 8, 2, 16, 16}), 2 * 8 * 70);
  EXPECT_EQ(moe::cuda::attention_scratch_floats({1, 4096, 128, 128, 192, 128}), 128 * 4096);
  EXPECT_EQ(moe::cuda::attention_scratch_floats({0, 0, 4, 4, 32, 32}), 0);
}

// softmax_math.h's exp is the CPU's exp_fast step for step: bitwise equal over a sweep.
TEST(SoftmaxMath, ExpMatchesCpuExpFast) {
  for (int k = -200000; k <= 200000; ++k) {
    const float x = static_cast<float>(k) * 4.5e-4f;  // [-90, 90]: both clamps
    ASSERT_EQ(moe::softmax_exp(x), moe::cpu::exp_fast(x)) << x;
  }
  EXPECT_TRUE(std::isnan(moe::softmax_exp(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_EQ(moe::softmax_exp(0.0f), 1.0f);
  EXPECT_EQ(moe::softmax_exp(-1.5), std::exp(-1.5));
}

TEST(SoftmaxMath, ScaleAndMask) {
  EXPECT_EQ(moe::attention_scale<float>(48), static_cast<float>(1.0 / std::sqrt(48.0)));
  EXPECT_EQ(moe::attention_scale<double>(192), 1.0 / std::sqrt(192.0));
  EXPECT_EQ(moe::causal_keys(0), 1);
  EXPECT_EQ(moe::causal_keys(69), 70);
  EXPECT_EQ(moe::softmax_max(1.0f, 2.0f), 2.0f);
  EXPECT_EQ(moe::softmax_max(2.0f, 1.0f), 2.0f);
  EXPECT_EQ(moe::softmax_backward_value(0.5f, 2.0f, 1.0f, 0.25f), 0.125f);
}

}  // namespace
