// Where a rank trains: run.device resolved against this build and this machine, one GPU per
// rank chosen from the launcher's local rank, and what a GPU run adds to the data-parallel
// groups and the expert-parallel group (NCCL twins on a stream of their own: the ZeRO-1
// shards' traffic and the expert exchange's rows), and to the pipeline (an NCCL group of the
// replica's pipeline ranks on a second stream, its messages in ticks:
// parallel/pipeline_ticks.h).
#pragma once

#include <memory>
#include <string>

#include "io/config.h"
#include "model/kernels/cuda/cuda_backend.h"
#include "parallel/comm.h"

namespace moe {

// "cpu" -> kCpu; "cuda" -> kCuda (a one-line error naming the config when this build has no
// CUDA or no device is visible); "auto" -> kCuda when both are there, else kCpu. A layout
// this build cannot run on GPUs (shared parameters without NCCL) is refused for "cuda" and
// makes "auto" choose the CPU with a note on stdout.
Device train_device_resolve(const Config& cfg, bool print_note);

// Selects this rank's GPU (local rank modulo the visible devices) and describes it.
std::string train_device_select();

// This rank's GPU's dense GEMM peak in FLOP/s (the MFU denominator), measured now with a
// large cuBLASLt GEMM: FP8 when `fp8` and the device has block-scaled FP8, else BF16. The
// precision measured goes into *what ("bf16" or "fp8").
double gpu_peak_flops(bool fp8, std::string* what);

// The NCCL side of a GPU rank: a communication stream, ordered after the computation stream
// by events, and a device twin of each ZeRO-1 group that has more than one rank and of the
// expert-parallel group; and with pp > 1 the pipeline's group, on a stream of its own so a
// tick waiting for its peer never holds the exchange or the reduction queued behind it. The
// MPI groups stay for host values (loss sums, expert loads, token counts, flags).
struct DeviceComms {
  DeviceComms() = default;
  DeviceComms(const DeviceComms&) = delete;
  DeviceComms& operator=(const DeviceComms&) = delete;
  ~DeviceComms();
  cuda::Stream stream = nullptr, pp_stream = nullptr;
  std::unique_ptr<Comm> param, expert_param, ep, pp;
};

// Collective over each non-null group. `compute` is the model's stream.
void device_comms_init(DeviceComms& dc, Comm* param_comm, Comm* expert_param_comm, Comm* ep_comm,
                       Comm* pp_comm, cuda::Stream compute, double timeout_s);

}  // namespace moe
