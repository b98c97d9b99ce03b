// cuBLAS as the simulator has it: only the status type model/kernels/cuda/cuda_check.h names.
// GEMMs are not simulated (their tests need a GPU).
#pragma once

enum cublasStatus_t { CUBLAS_STATUS_SUCCESS = 0 };
inline const char* cublasGetStatusString(cublasStatus_t) { return "simulated cuBLAS status"; }
