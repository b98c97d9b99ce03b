// AdamW on the device (optim/adamw_cuda.cu), over DEVICE pointers, enqueued on `stream` (no
// synchronisation, no allocation). The element arithmetic is adamw_element
// (optim/adamw_math.h) and the step's constants are adamw_coeffs (optim/adamw.cpp), both
// shared with the CPU, every operation a single correctly rounded FP32 one: the result
// equals the CPU step bit for bit (tests/gpu/test_cuda_quant.cpp).
#pragma once

#include <cstdint>

#include "model/kernels/cuda/cuda_backend.h"
#include "optim/adamw.h"

namespace moe::cuda {

// One AdamW update of n elements (moments m, v in FP32), as moe::adamw_update.
void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n,
                  const AdamWStep& s, bool decay, Stream stream);

// The same with BF16-stored moments, as moe::adamw_update_bf16.
void adamw_update_bf16(float* param, const float* grad, uint16_t* m, uint16_t* v, int64_t n,
                       const AdamWStep& s, bool decay, Stream stream);

}  // namespace moe::cuda
