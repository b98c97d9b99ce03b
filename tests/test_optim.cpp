// AdamW, gradient clipping and LR schedules against independent double references.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <vector>

#include "model/fp8.h"
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

// BF16 moments: every stored moment is the BF16 round-to-nearest-even of the FP32 moment
// that adamw_update's arithmetic gives from the widened stored moments, and the parameter moves
// by the unrounded FP32 moments. The float reference below repeats the kernel's expressions
// in the same order.
// NOTE: exact equality of the moments relies on no floating-point contraction, the default
// for ISO C++ (-std=c++20) in GCC and Clang, as in the library's own build.
TEST(AdamWBf16, MomentsAreRoundedFp32MomentsExactly) {
  const int64_t n = 1037;
  std::vector<float> p(n), rp(n);
  std::vector<uint16_t> m(n, 0), v(n, 0), rm(n, 0), rv(n, 0);
  for (int64_t i = 0; i < n; ++i) p[i] = rp[i] = static_cast<float>(rng_normal(4, 1, i));
  AdamWStep s;
  s.lr = 1e-2f; s.beta1 = 0.9f; s.beta2 = 0.95f; s.eps = 1e-8f; s.weight_decay = 0.1f;
  s.grad_scale = 0.5f;
  int64_t rounded_up = 0;  // moments where RNE differs from truncation: rounding is exercised
  for (int64_t t = 1; t <= 6; ++t) {
    std::vector<float> g(n);
    for (int64_t i = 0; i < n; ++i) g[i] = static_cast<float>(rng_normal(5, t, i));
    s.t = t;
    const bool decay = t % 2 == 1;
    adamw_update_bf16(p.data(), g.data(), m.data(), v.data(), n, s, decay);
    const float b1 = s.beta1, b2 = s.beta2, wd = decay ? s.weight_decay : 0.0f;
    const float c1 = 1.0f / (1.0f - std::pow(b1, static_cast<float>(t)));
    const float c2 = 1.0f / (1.0f - std::pow(b2, static_cast<float>(t)));
    for (int64_t i = 0; i < n; ++i) {
      const float gi = g[i] * s.grad_scale;
      const float mi = b1 * bf16_to_float(rm[i]) + (1.0f - b1) * gi;
      const float vi = b2 * bf16_to_float(rv[i]) + (1.0f - b2) * gi * gi;
      rm[i] = bf16_from_float(mi);
      rv[i] = bf16_from_float(vi);
      rounded_up += rm[i] != static_cast<uint16_t>(f32_bits(mi) >> 16);
      ASSERT_EQ(m[i], rm[i]) << "t " << t << " i " << i << " fp32 m " << mi;
      ASSERT_EQ(v[i], rv[i]) << "t " << t << " i " << i << " fp32 v " << vi;
      // The parameter from the same unrounded moments, in float and in double.
      const float update = (mi * c1) / (std::sqrt(vi * c2) + s.eps) + wd * rp[i];
      const double dupdate = static_cast<double>(mi) * c1 /
                                 (std::sqrt(static_cast<double>(vi) * c2) + s.eps) +
                             static_cast<double>(wd) * rp[i];
      const double dp = rp[i] - static_cast<double>(s.lr) * dupdate;
      rp[i] -= s.lr * update;
      // A few float roundings of the parameter and of the step it takes.
      const double tol = 4 * FLT_EPSILON * (std::fabs(dp) + s.lr * std::fabs(dupdate));
      ASSERT_NEAR(p[i], rp[i], tol) << "t " << t << " i " << i;
      ASSERT_NEAR(p[i], dp, tol) << "t " << t << " i " << i;
    }
  }
  EXPECT_GT(rounded_up, n);  // about half of all 6n stores round up
  int64_t nonzero = 0;
  for (int64_t i = 0; i < n; ++i) nonzero += m[i] != 0 && v[i] != 0;
  EXPECT_EQ(nonzero, n);
}

// From BF16-representable moments (zeros: the first step) the parameter update is adamw_update's
// bit for bit: BF16 storage perturbs only later steps, through the moments they start from.
TEST(AdamWBf16, FirstStepParamsEqualFp32State) {
  const int64_t n = 229;
  std::vector<float> p32(n), pbf(n), g(n), m32(n, 0), v32(n, 0);
  std::vector<uint16_t> mbf(n, 0), vbf(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    p32[i] = pbf[i] = static_cast<float>(rng_normal(6, 1, i));
    g[i] = static_cast<float>(rng_normal(6, 2, i));
  }
  AdamWStep s;
  s.lr = 3e-3f; s.weight_decay = 0.1f; s.t = 1;
  adamw_update(p32.data(), g.data(), m32.data(), v32.data(), n, s, true);
  adamw_update_bf16(pbf.data(), g.data(), mbf.data(), vbf.data(), n, s, true);
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(f32_bits(pbf[i]), f32_bits(p32[i])) << i;
    ASSERT_EQ(mbf[i], bf16_from_float(m32[i])) << i;
    ASSERT_EQ(vbf[i], bf16_from_float(v32[i])) << i;
  }
}

TEST(AdamWBf16, EmptyIsANoOp) {
  AdamWStep s;
  s.lr = 0.1f;
  adamw_update_bf16(nullptr, nullptr, nullptr, nullptr, 0, s, true);
  float p = 1.5f, g = 0.25f;
  uint16_t m = 0, v = 0;
  adamw_update_bf16(&p, &g, &m, &v, 0, s, true);
  EXPECT_EQ(p, 1.5f);
  EXPECT_EQ(m, 0);
  EXPECT_EQ(v, 0);
}

// 100 steps on f(x) = sum a_i (x_i - c_i)^2 / 2, starting far enough from the minimum that no
// element reaches it (the gradient keeps its sign), with BF16 and with FP32 moments.
//
// Bound: BF16 keeps 8 significant bits, unit roundoff u = 2^-8. Each store errs by at most u
// relative, and the moment carries its past errors with weight beta, so m is off by at most
// u / (1 - beta1) = 10u relative and v by u / (1 - beta2) = 20u, i.e. 10u in sqrt(v) (the
// worst case is a stagnating moment that rounds the same way every step). So each step's
// update m_hat / sqrt(v_hat) is off by at most about 20u relative, and every element ends
// within 20u = 7.8% of the distance the FP32 run moved it (the gradients of the two runs
// differ only by a * dx, negligible next to a * (x - c) here). Measured over seeds: 0.5-0.8%.
TEST(AdamWBf16, TrajectoryStaysCloseToFp32) {
  const int64_t n = 257, kSteps = 100;
  std::vector<float> a(n), c(n), x32(n), xbf(n), m32(n, 0), v32(n, 0), g(n);
  std::vector<uint16_t> mbf(n, 0), vbf(n, 0);
  std::vector<double> path(n, 0);  // sum over steps of |x32 step|
  for (int64_t i = 0; i < n; ++i) {
    a[i] = 0.5f + 1.5f * static_cast<float>(rng_uniform(7, 1, i));
    c[i] = static_cast<float>(rng_normal(7, 2, i));
    const float off = static_cast<float>(rng_normal(7, 3, i));
    x32[i] = xbf[i] = c[i] + off + (off < 0 ? -0.5f : 0.5f);  // |x - c| >= 0.5 > lr * steps
  }
  AdamWStep s;
  s.lr = 1e-3f; s.beta1 = 0.9f; s.beta2 = 0.95f; s.eps = 1e-8f; s.weight_decay = 0;
  for (int64_t t = 1; t <= kSteps; ++t) {
    s.t = t;
    const std::vector<float> before = x32;
    for (int64_t i = 0; i < n; ++i) g[i] = a[i] * (x32[i] - c[i]);
    adamw_update(x32.data(), g.data(), m32.data(), v32.data(), n, s, false);
    for (int64_t i = 0; i < n; ++i) g[i] = a[i] * (xbf[i] - c[i]);
    adamw_update_bf16(xbf.data(), g.data(), mbf.data(), vbf.data(), n, s, false);
    for (int64_t i = 0; i < n; ++i) path[i] += std::fabs(static_cast<double>(x32[i]) - before[i]);
  }
  constexpr double kU = 0x1p-8;
  double max_diff = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double diff = std::fabs(static_cast<double>(xbf[i]) - x32[i]);
    max_diff = std::max(max_diff, diff);
    ASSERT_GT(path[i], 0.5 * s.lr * kSteps) << i;  // it really moved
    EXPECT_LE(diff, 20 * kU * path[i]) << "element " << i << " moved " << path[i];
  }
  EXPECT_GT(max_diff, 0.0);  // the BF16 moments really rounded
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
