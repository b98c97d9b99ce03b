// The CUDA twins of the CPU attention core (model/kernels/cpu/dense_ops.h), float only, over
// DEVICE pointers, enqueued on `stream` (no synchronisation, no allocation). Same layouts and
// semantics as the CPU functions, which are the reference the gpu tests compare against:
//
//   qkv / dqkv (B, T, W), W = (NH + NKV) HD + NKV HDv: per token the NH query heads and NKV key
//     heads (HD wide), then the NKV value heads (HDv wide); query head h reads kv head
//     h / (NH / NKV); scale = 1 / sqrt(HD) (model/softmax_math.h);
//   out / dout (B, T, NH HDv);
//   lse (B, NH, T): per query row the log-sum-exp of its scaled causal scores (softmax_lse),
//     saved for backward instead of the (T, T) probabilities (fused, flash-style);
//   scratch: attention_scratch_floats(shape) floats (model/kernels/cuda/attention_plan.h).
// Standard attention / GQA: HDv = HD. MLA (model/mla_block.cpp): NKV = NH,
// HD = qk_nope + qk_rope, HDv = v_head_dim.
// Accumulation: everything is ASSIGNED (dqkv included).
// Determinism: every output element is written by one thread and summed in a fixed order
// (no atomics), so results are bitwise reproducible run to run on one device.
// Shapes whose shared memory exceeds the device's per-block limit CHECK-fail
// (model/kernels/cuda/attention_plan.h).
// core: kFp32 multiplies in FP32; kBf16 on BF16 tensor cores (attention_plan.h) where the
// device (sm_80+) and the head widths (multiples of 16) allow it, kFp32 otherwise.
#pragma once

#include <cstdint>

#include "model/kernels/cuda/attention_plan.h"
#include "model/kernels/cuda/cuda_backend.h"

namespace moe::cuda {

void attention_forward(float* out, float* lse, const float* qkv, int64_t B, int64_t T_,
                       int64_t NH, int64_t NKV, int64_t HD, int64_t HDv, float* scratch,
                       AttentionCore core, Stream stream);

// dqkv assigned.
void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* lse,
                        int64_t B, int64_t T_, int64_t NH, int64_t NKV, int64_t HD, int64_t HDv,
                        float* scratch, AttentionCore core, Stream stream);

}  // namespace moe::cuda
