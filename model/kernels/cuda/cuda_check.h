// CUDA_CHECK / CUBLAS_CHECK: every CUDA runtime and cuBLAS return code goes through these,
// ending in the one reporter of model/check.h. Include only from .cu files.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "model/check.h"
#include "model/kernels/cuda/launch.h"

#define CUDA_CHECK(stmt)                                                              \
  do {                                                                                \
    cudaError_t moe_cuda_rc_ = (stmt);                                                \
    if (moe_cuda_rc_ != cudaSuccess)                                                  \
      ::moe::check_failed(#stmt, __FILE__, __LINE__, cudaGetErrorString(moe_cuda_rc_)); \
  } while (0)

#define CUBLAS_CHECK(stmt)                                                            \
  do {                                                                                \
    cublasStatus_t moe_cublas_rc_ = (stmt);                                           \
    if (moe_cublas_rc_ != CUBLAS_STATUS_SUCCESS)                                      \
      ::moe::check_failed(#stmt, __FILE__, __LINE__, cublasGetStatusString(moe_cublas_rc_)); \
  } while (0)

// After every kernel launch: launch-configuration errors surface here, at the launch site.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())
