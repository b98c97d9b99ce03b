// The CUDA backend of model/ops.h (float only): every call forwards to the kernels of
// model/kernels/cuda on one stream of the current device. Plain C++ (no CUDA types).
//
// Scratch: ops_cuda_create takes ONE device allocation, sized from the limits, for all the
// scratch any call will need (the cuBLAS workspace, rmsnorm_backward_weight's partial sums,
// the MoE dispatch histograms, the aux-loss terms, the few values handed back to the host);
// no call allocates. A call larger than the limits is a CHECK failure that names them.
// Streams: every call is queued on the backend's stream; ops_cuda_stream hands it out so a
// caller can order other work (NCCL collectives, copies on other streams) after it.
#pragma once

#include <memory>

#include "model/kernels/cuda/cuda_backend.h"
#include "model/ops.h"

namespace moe {

// On the current device (cuda::device_select first). Creates the stream, the cuBLAS context
// and the scratch allocation; they are released with the object. native_bf16: the linear
// layers' BF16 GEMMs run on BF16 tensor cores (Ops::gemm_bf16); false keeps the CPU's exact
// emulation (FP32 GEMMs of BF16-rounded floats), for comparing against the CPU bit by bit.
// native_fp8: their FP8 GEMMs multiply E4M3 codes (Ops::gemm_fp8) where cuBLASLt has block
// scaling (sm_90); false, or another device, keeps the emulation.
// attention_bf16: the attention core multiplies on BF16 tensor cores (attention_plan.h's
// AttentionCore::kBf16, where head widths are multiples of 16), as BF16 and FP8 training do;
// false keeps every product in FP32, as the CPU computes it.
std::unique_ptr<Ops<float>> ops_cuda_create(const OpsLimits& limits, bool native_bf16 = true,
                                            bool native_fp8 = true, bool attention_bf16 = false);

// The stream `ops` queues its work on. CHECKs that `ops` is a CUDA backend.
cuda::Stream ops_cuda_stream(Ops<float>& ops);

}  // namespace moe
