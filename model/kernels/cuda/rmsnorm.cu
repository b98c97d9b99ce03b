// RMSNorm forward on the device: one block per row, a shared-memory reduction of the
// squares in a fixed tree order (deterministic), then the scaled write.
#include "model/kernels/cuda/cuda_backend.h"
#include "model/kernels/cuda/cuda_check.h"

namespace moe::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void rmsnorm_forward_kernel(float* out, float* rstd, const float* inp,
                                       const float* weight, int64_t C, float eps) {
  __shared__ float partial[kThreads];
  const int64_t row = blockIdx.x;
  const float* x = inp + row * C;
  float acc = 0.0f;
  for (int64_t i = threadIdx.x; i < C; i += blockDim.x) acc += x[i] * x[i];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  const float r = rsqrtf(partial[0] / static_cast<float>(C) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int64_t i = threadIdx.x; i < C; i += blockDim.x) out[row * C + i] = x[i] * r * weight[i];
}

}  // namespace

void rmsnorm_forward_host(float* out, float* rstd, const float* inp, const float* weight,
                          int64_t N, int64_t C, float eps) {
  CHECK(N >= 1 && C >= 1);
  const size_t bytes_nc = sizeof(float) * static_cast<size_t>(N * C);
  float *d_out = nullptr, *d_rstd = nullptr, *d_inp = nullptr, *d_w = nullptr;
  CUDA_CHECK(cudaMalloc(&d_out, bytes_nc));
  CUDA_CHECK(cudaMalloc(&d_rstd, sizeof(float) * static_cast<size_t>(N)));
  CUDA_CHECK(cudaMalloc(&d_inp, bytes_nc));
  CUDA_CHECK(cudaMalloc(&d_w, sizeof(float) * static_cast<size_t>(C)));
  CUDA_CHECK(cudaMemcpy(d_inp, inp, bytes_nc, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(d_w, weight, sizeof(float) * static_cast<size_t>(C), cudaMemcpyHostToDevice));
  rmsnorm_forward_kernel<<<static_cast<unsigned>(N), kThreads>>>(d_out, d_rstd, d_inp, d_w, C, eps);
  CUDA_CHECK_LAUNCH();
  CUDA_CHECK(cudaMemcpy(out, d_out, bytes_nc, cudaMemcpyDeviceToHost));
  CUDA_CHECK(cudaMemcpy(rstd, d_rstd, sizeof(float) * static_cast<size_t>(N), cudaMemcpyDeviceToHost));
  CUDA_CHECK(cudaFree(d_out));
  CUDA_CHECK(cudaFree(d_rstd));
  CUDA_CHECK(cudaFree(d_inp));
  CUDA_CHECK(cudaFree(d_w));
}

}  // namespace moe::cuda
