// AdamW, gradient clipping and LR schedules against independent double references.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "model/rng.h"
#include "optim/adamw.h"

namespace moe {
namespace {

TEST(AdamW, MatchesDoubleReferenceOverSteps) {
  const int64_t n = 1037;
  std::vector<float> p(n), m(n, 0), v(n, 0);
  std::vector<double> rp(n), rm(n, 0), rv(n, 0);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(rng_normal(1, 1, i)), rp[i] = p[i];
  AdamWStep s;
  s.lr = 1e-2f; s.beta1 = 0.9f; s.beta2 = 0.95f; s.eps = 1e-8f; s.weight_decay = 0.1f;
  for (int64_t t = 1; t <= 5; ++t) {
    std::vector<float> g(n);
    for (int64_t i = 0; i < n; ++i) g[i] = static_cast<float>(rng_normal(2, t, i));
    s.t = t;
    s.grad_scale = 0.5f;
    adamw_update(p.data(), g.data(), m.data(), v.data(), n, s, true);
    for (int64_t i = 0; i < n; ++i) {
      const double gi = 0.5 * g[i];
      rm[i] = 0.9 * rm[i] + 0.1 * gi;
      rv[i] = 0.95 * rv[i] + 0.05 * gi * gi;
      const double mh = rm[i] / (1 - std::pow(0.9, t)), vh = rv[i] / (1 - std::pow(0.95, t));
      rp[i] -= 1e-2 * (mh / (std::sqrt(vh) + 1e-8) + 0.1 * rp[i]);
    }
  }
  for (int64_t i = 0; i < n; ++i) ASSERT_NEAR(p[i], rp[i], 1e-5 * (1 + std::fabs(rp[i]))) << i;
}

TEST(AdamW, NoDecayLeavesZeroGradientParamsAlone) {
  std::vector<float> p = {1.0f, -2.0f}, g = {0, 0}, m = {0, 0}, v = {0, 0};
  AdamWStep s;
  s.lr = 0.1f; s.weight_decay = 0.5f; s.t = 1;
  adamw_update(p.data(), g.data(), m.data(), v.data(), 2, s, false);
  EXPECT_EQ(p[0], 1.0f);
  EXPECT_EQ(p[1], -2.0f);
  adamw_update(p.data(), g.data(), m.data(), v.data(), 2, s, true);
  EXPECT_NEAR(p[0], 1.0f - 0.1f * 0.5f * 1.0f, 1e-7);  // decoupled: lr * wd * p
}

TEST(GradClip, NormAndScale) {
  const int64_t n = 100000;
  std::vector<float> g(n);
  double ref = 0;
  for (int64_t i = 0; i < n; ++i) {
    g[i] = static_cast<float>(rng_normal(3, 3, i));
    ref += static_cast<double>(g[i]) * g[i];
  }
  std::vector<double> partials(static_cast<size_t>(grad_norm_blocks(n)));
  EXPECT_NEAR(grad_sum_squares(g.data(), n, partials.data()), ref, 1e-9 * ref);
  EXPECT_EQ(grad_clip_scale(0.5, 1.0), 1.0f);
  EXPECT_EQ(grad_clip_scale(5.0, 0.0), 1.0f);
  EXPECT_NEAR(grad_clip_scale(4.0, 1.0), 0.25f, 1e-6);
}

TEST(LrSchedule, WarmupCosineWsdConstant) {
  LrSchedulePlan p;
  p.peak = 1.0; p.warmup = 10; p.total = 110; p.min_ratio = 0.1;
  p.kind = LrSchedule::kCosine;
  EXPECT_NEAR(lr_at(p, 0), 0.1, 1e-12);   // (0 + 1) / 10
  EXPECT_NEAR(lr_at(p, 9), 1.0, 1e-12);
  EXPECT_NEAR(lr_at(p, 10), 1.0, 1e-12);
  EXPECT_NEAR(lr_at(p, 60), 0.55, 1e-12);  // halfway: min + (peak - min) / 2
  EXPECT_NEAR(lr_at(p, 110), 0.1, 1e-12);
  p.kind = LrSchedule::kWsd;
  p.decay_fraction = 0.2;  // decay over the last 22 steps: [88, 110)
  EXPECT_NEAR(lr_at(p, 50), 1.0, 1e-12);
  EXPECT_NEAR(lr_at(p, 87), 1.0, 1e-12);
  EXPECT_NEAR(lr_at(p, 99), 1.0 - 0.9 * 11.0 / 22.0, 1e-12);
  EXPECT_NEAR(lr_at(p, 110), 0.1, 1e-12);
  p.kind = LrSchedule::kConstant;
  EXPECT_NEAR(lr_at(p, 100), 1.0, 1e-12);
  p.warmup = 200;  // warm-up longer than the run: no division by zero anywhere
  p.kind = LrSchedule::kWsd;
  EXPECT_TRUE(std::isfinite(lr_at(p, 109)));
}

}  // namespace
}  // namespace moe
