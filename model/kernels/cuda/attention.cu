// The CUDA attention core's launchers (attention_kernels.h): the plan on this device, the
// shared-memory opt-in, and the launch of the kernels in attention_device.cuh on the core the
// plan picked.
#include "model/kernels/cuda/attention_device.cuh"
#include "model/kernels/cuda/attention_kernels.h"
#include "model/kernels/cuda/cuda_check.h"

namespace moe::cuda {

namespace {

// The device's opt-in shared-memory limit per block.
int64_t attention_smem_limit() {
  int dev = 0, bytes = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return bytes;
}

// The plan on this device: kBf16 where asked for and the device has BF16 tensor cores (sm_80+).
AttentionPlan attention_device_plan(const AttentionShape& shape, AttentionCore core) {
  int dev = 0, major = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  return attention_plan(shape, attention_smem_limit(), major >= 8 ? core : AttentionCore::kFp32);
}

dim3 attention_grid(const LaunchDims& d) {
  return dim3(static_cast<unsigned>(d.grid_x), static_cast<unsigned>(d.grid_y),
              static_cast<unsigned>(d.grid_z));
}

// Kernels over 48 KiB of dynamic shared memory must opt in before launch.
template <typename Kernel>
void attention_smem_opt_in(Kernel* kernel, const LaunchDims& d) {
  if (d.smem_bytes > kSmemDefaultBytes)
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(d.smem_bytes)));
}

// Opts the kernel into its shared memory where it needs more than the default, then launches
// it with the plan's dimensions.
template <typename... P, typename... A>
void attention_launch(void (*kernel)(P...), const LaunchDims& d, Stream stream, A... args) {
  attention_smem_opt_in(kernel, d);
  MOE_LAUNCH(attention_grid(d), d.block, static_cast<size_t>(d.smem_bytes), stream, kernel)(
      args...);
  CUDA_CHECK_LAUNCH();
}

template <AttentionCore C>
void forward_launch(const AttentionPlan& plan, float* out, float* lse, const float* qkv,
                    int64_t T_, int64_t NH, int64_t NKV, int64_t HD, int64_t HDv, Stream stream) {
  attention_launch(attention_forward_kernel<C>, plan.forward, stream, out, lse, qkv, T_, NH, NKV,
                   static_cast<int>(HD), static_cast<int>(HDv), attention_scale<float>(HD));
}

// backward_rows writes D (B, NH, T) into scratch; backward_cols, after it on the stream,
// reads it.
template <AttentionCore C>
void backward_launch(const AttentionPlan& plan, float* dqkv, const float* dout, const float* qkv,
                     const float* lse, int64_t T_, int64_t NH, int64_t NKV, int64_t HD,
                     int64_t HDv, float* scratch, Stream stream) {
  const int hd = static_cast<int>(HD), hdv = static_cast<int>(HDv);
  const float scale = attention_scale<float>(HD);
  attention_launch(attention_backward_rows_kernel<C>, plan.backward_rows, stream, dqkv, scratch,
                   dout, qkv, lse, T_, NH, NKV, hd, hdv, scale);
  attention_launch(attention_backward_cols_kernel<C>, plan.backward_cols, stream, dqkv, scratch,
                   dout, qkv, lse, T_, NH, NKV, hd, hdv, scale);
}

}  // namespace

// The forward needs no scratch (attention_scratch_floats sizes the backward's D).
void attention_forward(float* out, float* lse, const float* qkv, int64_t B, int64_t T_,
                       int64_t NH, int64_t NKV, int64_t HD, int64_t HDv, float* /*scratch*/,
                       AttentionCore core, Stream stream) {
  const AttentionPlan plan = attention_device_plan({B, T_, NH, NKV, HD, HDv}, core);
  if (B == 0 || T_ == 0) return;
  CHECK(out != nullptr && lse != nullptr && qkv != nullptr, "attention_forward: null buffer");
  if (plan.core == AttentionCore::kBf16) {
    forward_launch<AttentionCore::kBf16>(plan, out, lse, qkv, T_, NH, NKV, HD, HDv, stream);
  } else {
    forward_launch<AttentionCore::kFp32>(plan, out, lse, qkv, T_, NH, NKV, HD, HDv, stream);
  }
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* lse,
                        int64_t B, int64_t T_, int64_t NH, int64_t NKV, int64_t HD, int64_t HDv,
                        float* scratch, AttentionCore core, Stream stream) {
  const AttentionPlan plan = attention_device_plan({B, T_, NH, NKV, HD, HDv}, core);
  if (B == 0 || T_ == 0) return;
  CHECK(dqkv != nullptr && dout != nullptr && qkv != nullptr && lse != nullptr &&
            scratch != nullptr,
        "attention_backward: null buffer");
  if (plan.core == AttentionCore::kBf16) {
    backward_launch<AttentionCore::kBf16>(plan, dqkv, dout, qkv, lse, T_, NH, NKV, HD, HDv,
                                          scratch, stream);
  } else {
    backward_launch<AttentionCore::kFp32>(plan, dqkv, dout, qkv, lse, T_, NH, NKV, HD, HDv,
                                          scratch, stream);
  }
}

}  // namespace moe::cuda
