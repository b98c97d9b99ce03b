#include "optim/adamw.h"

#include <algorithm>
#include <cmath>

namespace moe {

AdamWCoeffs adamw_coeffs(const AdamWStep& s, bool decay) {
  AdamWCoeffs k;
  k.lr = s.lr;
  k.b1 = s.beta1;
  k.b2 = s.beta2;
  k.c1 = 1.0f / (1.0f - std::pow(s.beta1, static_cast<float>(s.t)));
  k.c2 = 1.0f / (1.0f - std::pow(s.beta2, static_cast<float>(s.t)));
  k.eps = s.eps;
  k.wd = decay ? s.weight_decay : 0.0f;
  k.grad_scale = s.grad_scale;
  return k;
}

// The element arithmetic is adamw_element (optim/adamw_math.h), shared with the CUDA kernel.
void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n,
                  const AdamWStep& s, bool decay) {
  const AdamWCoeffs k = adamw_coeffs(s, decay);
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) adamw_element(param[i], grad[i], m[i], v[i], k);
}

// NOTE: the parameter update reads the new moments before they are rounded to BF16. They are
// the most accurate values this step has, so BF16 storage only perturbs later steps (through
// the moments they start from), never the step that computed them, and a step from BF16-
// representable moments equals adamw_update's bit for bit. A fused GPU kernel would do the
// same: the moments live in FP32 registers and only the store rounds.
void adamw_update_bf16(float* param, const float* grad, uint16_t* m, uint16_t* v, int64_t n,
                       const AdamWStep& s, bool decay) {
  const AdamWCoeffs k = adamw_coeffs(s, decay);
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) adamw_element_bf16(param[i], grad[i], m[i], v[i], k);
}

int64_t grad_norm_blocks(int64_t n) { return (n + kGradNormBlock - 1) / kGradNormBlock; }

double grad_sum_squares(const float* g, int64_t n, double* partial) {
  constexpr int64_t kBlock = kGradNormBlock;
  const int64_t nb = grad_norm_blocks(n);
  // The partial per block does not depend on the thread count; the final sum is in block order.
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nb; ++b) {
    double acc = 0;
    const int64_t end = std::min(n, (b + 1) * kBlock);
    for (int64_t i = b * kBlock; i < end; ++i) acc += static_cast<double>(g[i]) * g[i];
    partial[b] = acc;
  }
  double total = 0;
  for (int64_t b = 0; b < nb; ++b) total += partial[b];
  return total;
}

float grad_clip_scale(double norm, double max_norm) {
  if (max_norm <= 0 || !(norm > max_norm)) return 1.0f;
  return static_cast<float>(max_norm / (norm + 1e-6));
}

double lr_at(const LrSchedulePlan& p, int64_t step) {
  if (p.warmup > 0 && step < p.warmup)
    return p.peak * static_cast<double>(step + 1) / static_cast<double>(p.warmup);
  const double min_lr = p.peak * p.min_ratio;
  switch (p.kind) {
    case LrSchedule::kConstant:
      return p.peak;
    case LrSchedule::kCosine: {
      const double span = static_cast<double>(std::max<int64_t>(1, p.total - p.warmup));
      const double progress = std::clamp(static_cast<double>(step - p.warmup) / span, 0.0, 1.0);
      return min_lr + 0.5 * (p.peak - min_lr) * (1.0 + std::cos(M_PI * progress));
    }
    case LrSchedule::kWsd: {
      const int64_t decay_steps = std::max<int64_t>(
          1, static_cast<int64_t>(std::ceil(p.decay_fraction * static_cast<double>(p.total))));
      const int64_t decay_start = std::max(p.warmup, p.total - decay_steps);
      if (step < decay_start) return p.peak;
      const double progress = std::clamp(
          static_cast<double>(step - decay_start) /
              static_cast<double>(std::max<int64_t>(1, p.total - decay_start)),
          0.0, 1.0);
      return p.peak + (min_lr - p.peak) * progress;
    }
  }
  return p.peak;
}

}  // namespace moe
