// The small device kernels the Ops backend (model/ops.h, model/kernels/cuda/cuda_ops.cu) needs
// beyond the layer twins of dense_kernels.h / moe_kernels.h / quant_kernels.h. Plain C++ (no
// CUDA types); every pointer is DEVICE memory, the work is queued on `stream` (nothing here
// synchronizes or allocates). Each mirrors the CpuOps method of the same name (model/ops_cpu.cpp).
//
// Accumulation: add_rows ACCUMULATES (+=), everything else
// is ASSIGNED.
// Determinism: no atomics; every output element is written by one thread, and the one
// reduction (scored_loss_sum) runs in one block in an order fixed by N, so a call repeated on
// the same inputs gives the same bits.
#pragma once

#include <cstdint>

#include "model/kernels/cuda/cuda_backend.h"

namespace moe::cuda {

// dst (rows, cols), rows ld_dst apart, += src (rows, cols), rows ld_src apart (elements).
void add_rows(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows,
              int64_t cols, Stream stream);

// bits (n) = x rounded to BF16 (bf16_from_float, model/fp8.h); with `rounded` (nullable) also
// the rounded values as floats. Bit for bit the CPU's.
void bf16_encode(uint16_t* bits, float* rounded, const float* x, int64_t n, Stream stream);
// x (n) = bf16_to_float(bits).
void bf16_decode(float* x, const uint16_t* bits, int64_t n, Stream stream);

// dst (C, R) = src (R, C)^T, both compact, elements of elem_bytes (1, 2 or 4). Exact.
void transpose(void* dst, const void* src, int64_t R, int64_t C, size_t elem_bytes,
               Stream stream);

// Multi-token prediction module k's inputs from the main targets y (B, T_): at position t
// tokens = y[t + k] (0 past the end or where y < 0), targets = y[t + k + 1] (-1 past the end).
void mtp_shift(int32_t* tokens, int32_t* targets, const int32_t* y, int64_t B, int64_t T_,
               int64_t k, Stream stream);

// sum (1 double) = the losses (N) of the tokens whose target is >= 0, added in double;
// count (1 int64) = how many there are. One block: per-thread strided partial sums, then the
// fixed-order block reduction of reduce.cuh. NOTE: not the CPU's sequential order, so the sum
// may differ from CpuOps's in the last bits; it is the same on every run.
void scored_loss_sum(double* sum, int64_t* count, const float* losses, const int32_t* targets,
                     int64_t N, Stream stream);
// One thread, after them on the stream: acc[0] += (*sum / *count) / divisor when *count > 0,
// acc[1] += *sum (Ops::scored_loss_accumulate's arithmetic, in the CPU's order).
void loss_mean_accumulate(double* acc, const double* sum, const int64_t* count, double divisor,
                          Stream stream);
// One thread: acc[0] += *value, widened to double.
void accumulate_to_double(double* acc, const float* value, Stream stream);

}  // namespace moe::cuda
