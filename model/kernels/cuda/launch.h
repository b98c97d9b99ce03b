// Kernel launches and dynamic shared memory, spelled once for nvcc and for the CPU simulator
// (tests/cuda_sim: the same kernel files compiled as C++ with MOETRAIN_CUDA_SIM, each launch
// running the kernel on the CPU thread by thread, so the gpu twin tests of the kernels run on
// machines without a GPU).
//   MOE_LAUNCH(grid, block, smem_bytes, stream, kernel)(args...);
//   MOE_DYNAMIC_SMEM(float, smem);  // inside a kernel: its dynamic shared memory
#pragma once

#ifdef MOETRAIN_CUDA_SIM
#define MOE_LAUNCH(grid, block, smem, stream, ...) \
  ::cuda_sim::launcher(grid, block, smem, stream, __VA_ARGS__)
#define MOE_DYNAMIC_SMEM(T, name) T* const name = ::cuda_sim::dynamic_smem<T>()
#else
#define MOE_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define MOE_DYNAMIC_SMEM(T, name) extern __shared__ __align__(128) T name[]
#endif
