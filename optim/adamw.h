// AdamW with decoupled weight decay over FP32 master weights, global gradient-norm
// clipping and the learning-rate schedules. The moments are stored in FP32 (adamw_update) or
// BF16 (adamw_update_bf16, optim.state_dtype = "bf16", as DeepSeek-V3 does); the arithmetic
// is FP32 either way.
#pragma once

#include <cstdint>

#include "model/types.h"
#include "optim/adamw_math.h"

namespace moe {

struct AdamWStep {
  float lr = 0;
  float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
  float weight_decay = 0;  // applied as param -= lr * wd * param (decoupled)
  int64_t t = 1;           // 1-based step count, for bias correction
  float grad_scale = 1;    // multiplies every gradient first (clipping)
};

// The step's constants (bias corrections, the decay that applies), for adamw_element
// (optim/adamw_math.h). The CUDA launchers take them from here too, so both backends start
// from the same bits.
AdamWCoeffs adamw_coeffs(const AdamWStep& s, bool decay);

// One AdamW update of n elements. m and v are the first and second moments.
void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n,
                  const AdamWStep& s, bool decay);

// The same update with BF16 moments (bits as model/fp8.h's bf16_from_float makes them): m and
// v are widened to float, updated with exactly adamw_update's FP32 arithmetic, and stored
// rounded to nearest even. The parameter moves by the unrounded FP32 moments of this step.
void adamw_update_bf16(float* param, const float* grad, uint16_t* m, uint16_t* v, int64_t n,
                       const AdamWStep& s, bool decay);

// Sum of squares of n gradients, in double, in a fixed order (deterministic for any
// thread count: fixed-size blocks reduced in block order). `partials` holds
// grad_norm_blocks(n) doubles, allocated once by the caller.
// The blocks are kGradNormBlock elements; the CUDA sum (optim/optim_ops_cuda.cu) uses the same.
inline constexpr int64_t kGradNormBlock = int64_t{1} << 14;
int64_t grad_norm_blocks(int64_t n);
double grad_sum_squares(const float* g, int64_t n, double* partials);

// The factor that scales gradients so their global norm is at most max_norm
// (1 when max_norm <= 0 or the norm is already smaller).
float grad_clip_scale(double norm, double max_norm);

struct LrSchedulePlan {
  LrSchedule kind = LrSchedule::kCosine;
  double peak = 3e-3;
  int64_t warmup = 0;
  int64_t total = 1;
  double min_ratio = 0.1;
  double decay_fraction = 0.2;  // WSD only
};

// Learning rate for 0-based optimizer step `step`: linear warm-up from peak/warmup to peak
// over `warmup` steps, then cosine to min_ratio * peak at `total`, or WSD (constant, then a
// linear decay over the last decay_fraction of the steps), or constant.
double lr_at(const LrSchedulePlan& p, int64_t step);

}  // namespace moe
