// MOE_HD marks inline arithmetic that both the CPU kernels and the CUDA kernels compile, so
// the CPU tests cover the GPU math too. Empty under a host compiler.
#pragma once

#ifdef __CUDACC__
#define MOE_HD __host__ __device__
#else
#define MOE_HD
#endif
