// The CUDA backend's host-side entry points, callable from plain C++ (no CUDA types here).
// Built only when the toolkit is present (MOETRAIN_HAVE_CUDA); the CPU backend is the
// reference every CUDA kernel is tested against.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

// cudaStream_t is `struct CUstream_st*`: named here so plain C++ can hold and pass streams.
struct CUstream_st;

namespace moe::cuda {

using Stream = CUstream_st*;  // nullptr: the legacy default stream

// Visible devices; 0 when no driver or device is present (never an error).
int device_count();

// "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, 79.1 GiB)" for device `dev`.
std::string device_describe(int dev);

// The device this rank uses: its launcher-given local rank modulo the visible devices
// (model/kernels/cuda/device_choice.h); -1 when none is visible.
int device_for_local_rank();

// Selects `dev` for this thread (cudaSetDevice).
void device_select(int dev);

// Device memory. The trainer takes one allocation per arena (model/arena.h) and carves it;
// tests use these directly. device_alloc(0) returns nullptr.
void* device_alloc(size_t bytes);
void device_free(void* p);
// Blocking: complete on the device when they return (every stream sees the result).
void copy_to_device(void* dst, const void* src, size_t bytes);
void copy_to_host(void* dst, const void* src, size_t bytes);
void device_memset_zero(void* p, size_t bytes);
void device_synchronize();
// Free memory on the current device (cudaMemGetInfo): tests check a step allocates none.
size_t device_free_bytes();
Stream stream_create();
void stream_destroy(Stream s);
void stream_synchronize(Stream s);

}  // namespace moe::cuda
