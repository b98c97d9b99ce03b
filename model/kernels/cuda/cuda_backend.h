// The CUDA backend's host-side entry points, callable from plain C++ (no CUDA types here).
// Built only when the toolkit is present (MOETRAIN_HAVE_CUDA); the CPU backend is the
// reference every CUDA kernel is tested against.
#pragma once

#include <cstdint>
#include <string>

namespace moe::cuda {

// Visible devices; 0 when no driver or device is present (never an error).
int device_count();

// "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, 79.1 GiB)" for device `dev`.
std::string device_describe(int dev);

// The device this rank uses: its launcher-given local rank modulo the visible devices
// (OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID or LOCAL_RANK; 0 when none is set).
int device_for_local_rank();

// RMSNorm forward on the device, the twin of cpu::rmsnorm_forward<float>, over host
// buffers (copies in, runs, copies out): the first kernel the gpu tests compare.
void rmsnorm_forward_host(float* out, float* rstd, const float* inp, const float* weight,
                          int64_t N, int64_t C, float eps);

}  // namespace moe::cuda
