// OptimOps on a GPU. AdamW is optim/adamw_cuda.cu's (bit-identical to the CPU's). The sum of
// squares splits n into the CPU's blocks of kGradNormBlock elements, one thread block each;
// a block's threads stride through it in double, then block_sum adds them in warp order, and
// one last block adds the partials the same way. Nothing depends on scheduling, so the norm
// is the same on every run (it differs from the CPU's serial order in the last bits only).
#include <cuda_runtime.h>

#include "model/check.h"
#include "model/kernels/cuda/cuda_check.h"
#include "model/kernels/cuda/reduce.cuh"
#include "optim/adamw_cuda.h"
#include "optim/optim_ops_cuda.h"

namespace moe {

namespace {

constexpr int kNormThreads = 256;

__global__ void __launch_bounds__(kNormThreads)
    sum_squares_blocks(const float* g, int64_t n, double* partial) {
  __shared__ double red[32];
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * kGradNormBlock;
  const int64_t hi = lo + kGradNormBlock < n ? lo + kGradNormBlock : n;
  double acc = 0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kNormThreads) {
    const double x = g[i];
    acc += x * x;
  }
  acc = cuda::block_sum(acc, red);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

__global__ void __launch_bounds__(kNormThreads)
    sum_partials(const double* partial, int64_t nb, double* out) {
  __shared__ double red[32];
  double acc = 0;
  for (int64_t i = threadIdx.x; i < nb; i += kNormThreads) acc += partial[i];
  acc = cuda::block_sum(acc, red);
  if (threadIdx.x == 0) *out = acc;
}

class CudaOptimOps final : public OptimOps {
 public:
  CudaOptimOps(cuda::Stream stream, int64_t max_n)
      : stream_(stream), max_blocks_(grad_norm_blocks(max_n)) {
    // The partials and, after them, the total.
    partial_ = static_cast<double*>(
        cuda::device_alloc(sizeof(double) * static_cast<size_t>(max_blocks_ + 1)));
    CUDA_CHECK(cudaMallocHost(&result_, sizeof(double)));
  }
  ~CudaOptimOps() override {
    cuda::device_free(partial_);
    cudaFreeHost(result_);
  }
  CudaOptimOps(const CudaOptimOps&) = delete;
  CudaOptimOps& operator=(const CudaOptimOps&) = delete;

  void adamw(float* param, const float* grad, float* m, float* v, int64_t n, const AdamWStep& s,
             bool decay) override {
    cuda::adamw_update(param, grad, m, v, n, s, decay, stream_);
  }
  void adamw_bf16(float* param, const float* grad, uint16_t* m, uint16_t* v, int64_t n,
                  const AdamWStep& s, bool decay) override {
    cuda::adamw_update_bf16(param, grad, m, v, n, s, decay, stream_);
  }
  double sum_squares(const float* g, int64_t n) override {
    const int64_t nb = grad_norm_blocks(n);
    CHECK(nb <= max_blocks_, "sum of squares over %lld elements, planned for fewer",
          static_cast<long long>(n));
    if (n == 0) return 0.0;
    double* total = partial_ + max_blocks_;
    MOE_LAUNCH(static_cast<unsigned>(nb), kNormThreads, 0, stream_, sum_squares_blocks)(
        g, n, partial_);
    CUDA_CHECK_LAUNCH();
    MOE_LAUNCH(1, kNormThreads, 0, stream_, sum_partials)(partial_, nb, total);
    CUDA_CHECK_LAUNCH();
    CUDA_CHECK(cudaMemcpyAsync(result_, total, sizeof(double), cudaMemcpyDeviceToHost, stream_));
    CUDA_CHECK(cudaStreamSynchronize(stream_));
    return *result_;
  }

 private:
  cuda::Stream stream_;
  int64_t max_blocks_;
  double* partial_ = nullptr;
  double* result_ = nullptr;  // pinned
};

}  // namespace

std::unique_ptr<OptimOps> optim_ops_cuda(cuda::Stream stream, int64_t max_n) {
  return std::make_unique<CudaOptimOps>(stream, max_n);
}

}  // namespace moe
