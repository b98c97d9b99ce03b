#include "trainer/train_device.h"

#include <cstdio>

#include "model/check.h"
#include "parallel/grid.h"
#ifdef MOETRAIN_HAVE_CUDA
#include "model/kernels/cuda/cuda_backend.h"
#include "model/kernels/cuda/gemm_cublas.h"
#endif
#ifdef MOETRAIN_HAVE_NCCL
#include "parallel/nccl/comm_nccl.h"
#endif

namespace moe {

namespace {

int visible_devices() {
#ifdef MOETRAIN_HAVE_CUDA
  return cuda::device_count();
#else
  return -1;  // no CUDA in this build
#endif
}

// What the GPU trainer cannot run in this build, or "" when it can: the ZeRO-1 groups
// (more than one rank holding the same parameters) move device tensors over NCCL.
std::string gpu_layout_gap(const Config& cfg) {
#ifndef MOETRAIN_HAVE_NCCL
  if (cfg.parallel.dp > 1 || grid_layout(cfg.parallel, 0).copies > 1)
    return "parameters shared by several ranks (parallel.dp > 1 or DualPipe) without NCCL in "
           "this build";
#else
  (void)cfg;
#endif
  return "";
}

}  // namespace

Device train_device_resolve(const Config& cfg, bool print_note) {
  const char* src = cfg.source.c_str();
  if (cfg.run.device == Device::kCpu) return Device::kCpu;
  const int n = visible_devices();
  const std::string gap = gpu_layout_gap(cfg);
  if (cfg.run.device == Device::kCuda) {
    if (n < 0)
      user_error("%s: run.device = \"cuda\", but this build has no CUDA backend (rebuild with "
                 "the CUDA toolkit, or set run.device = \"cpu\")", src);
    if (n == 0)
      user_error("%s: run.device = \"cuda\", but no CUDA device is visible on this machine", src);
    if (!gap.empty())
      user_error("%s: run.device = \"cuda\" does not support %s yet (use run.device = \"cpu\")",
                 src, gap.c_str());
    return Device::kCuda;
  }
  if (n <= 0) return Device::kCpu;
  if (!gap.empty()) {
    if (print_note)
      std::printf("run.device = \"auto\": training on the CPU: the GPU trainer does not run %s "
                  "yet\n", gap.c_str());
    return Device::kCpu;
  }
  return Device::kCuda;
}

std::string train_device_select() {
#ifdef MOETRAIN_HAVE_CUDA
  const int dev = cuda::device_for_local_rank();
  CHECK(dev >= 0, "no CUDA device to select");
  cuda::device_select(dev);
  return strprintf("cuda:%d %s", dev, cuda::device_describe(dev).c_str());
#else
  CHECK(false, "this build has no CUDA backend");
  return "";
#endif
}

double gpu_peak_flops(bool fp8, std::string* what) {
#ifdef MOETRAIN_HAVE_CUDA
  // Set-up, not a step: the stream, context and scratch live only for the measurement.
  const cuda::Stream stream = cuda::stream_create();
  const size_t ws_bytes = cuda::gemm_workspace_bytes(9);  // the largest any device takes
  void* ws = cuda::device_alloc(ws_bytes);
  cuda::GemmContext* ctx = cuda::gemm_context_create(ws, ws_bytes, stream);
  const cuda::GemmPrecision p = fp8 && cuda::gemm_fp8_block_scaling_supported(*ctx)
                                    ? cuda::GemmPrecision::kFp8
                                    : cuda::GemmPrecision::kBf16;
  const size_t scratch_bytes = cuda::gemm_peak_scratch_bytes(p);
  void* scratch = cuda::device_alloc(scratch_bytes);
  const double peak = cuda::measure_peak_flops(*ctx, p, scratch, scratch_bytes, stream);
  cuda::device_free(scratch);
  cuda::gemm_context_destroy(ctx);
  cuda::device_free(ws);
  cuda::stream_destroy(stream);
  if (what) *what = cuda::gemm_precision_name(p);
  return peak;
#else
  (void)fp8;
  (void)what;
  CHECK(false, "this build has no CUDA backend");
  return 0;
#endif
}

DeviceComms::~DeviceComms() {
  param.reset();
  expert_param.reset();
  ep.reset();
  pp.reset();
#ifdef MOETRAIN_HAVE_CUDA
  if (stream) cuda::stream_destroy(stream);
  if (pp_stream) cuda::stream_destroy(pp_stream);
#endif
}

void device_comms_init(DeviceComms& dc, Comm* param_comm, Comm* expert_param_comm, Comm* ep_comm,
                       Comm* pp_comm, cuda::Stream compute, double timeout_s) {
  if (!param_comm && !expert_param_comm && !ep_comm && !pp_comm) return;
#ifdef MOETRAIN_HAVE_NCCL
  dc.stream = cuda::stream_create();
  if (param_comm) dc.param = comm_nccl_create(*param_comm, dc.stream, timeout_s, compute);
  if (expert_param_comm)
    dc.expert_param = comm_nccl_create(*expert_param_comm, dc.stream, timeout_s, compute);
  if (ep_comm) dc.ep = comm_nccl_create(*ep_comm, dc.stream, timeout_s, compute);
  if (pp_comm) {
    dc.pp_stream = cuda::stream_create();
    dc.pp = comm_nccl_create(*pp_comm, dc.pp_stream, timeout_s, compute);
  }
#else
  (void)dc;
  (void)ep_comm;
  (void)pp_comm;
  (void)compute;
  (void)timeout_s;
  CHECK(false, "device communicators need NCCL, and this build has none");
#endif
}

}  // namespace moe
