// optim/adamw_math.h, the per-element AdamW arithmetic the CPU optimizer and the CUDA kernel
// share, against the AdamW formulas written out again here in double precision, one step at a
// time from the same (float) state; and the CPU optimizer against the shared function bit for
// bit (so what the CPU suite checks of the optimizer covers the CUDA kernel's arithmetic).
//
// Tolerances, u = 2^-24 (FP32 unit roundoff): every FP32 operation errs by at most u of its
// result, so with S the sum of the magnitudes of a moment's terms
//   m, v:   |err| <= 6 u S     (m: 3 u from the scale, a product, the sum; v: 5 u, g twice)
// The bias corrections c = 1 / (1 - powf(beta, t)) amplify powf's ulp by beta^t / (1 - beta^t),
// about 16 u for beta2 = 0.95 at t = 2, so
//   c1, c2: |err| <= 64 u c
//   param:  |err| <= u |p'| + 64 u lr (|m^ / (sqrt(v^) + eps)| + |wd p|).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "model/fp8.h"
#include "model/rng.h"
#include "optim/adamw.h"
#include "optim/adamw_math.h"

namespace moe {
namespace {

constexpr double kU = 0x1p-24;

struct RefStep {
  double p, m, v;
};

// AdamW with decoupled weight decay, textbook form, in double, from float inputs.
RefStep adamw_reference(double p, double g_raw, double m, double v, const AdamWStep& s,
                        bool decay) {
  const double b1 = s.beta1, b2 = s.beta2, t = static_cast<double>(s.t);
  const double g = g_raw * s.grad_scale;
  RefStep r;
  r.m = b1 * m + (1 - b1) * g;
  r.v = b2 * v + (1 - b2) * g * g;
  const double m_hat = r.m / (1 - std::pow(b1, t));
  const double v_hat = r.v / (1 - std::pow(b2, t));
  const double wd = decay ? s.weight_decay : 0.0;
  r.p = p - s.lr * (m_hat / (std::sqrt(v_hat) + s.eps) + wd * p);
  return r;
}

// The tolerance of the parameter (see the file comment).
double param_tol(double p_ref, double p, double m, double v, const AdamWStep& s, bool decay) {
  const double t = static_cast<double>(s.t);
  const double m_hat = m / (1 - std::pow(static_cast<double>(s.beta1), t));
  const double v_hat = v / (1 - std::pow(static_cast<double>(s.beta2), t));
  const double wd = decay ? s.weight_decay : 0.0;
  const double step = s.lr * (std::fabs(m_hat) / (std::sqrt(v_hat) + s.eps) + std::fabs(wd * p));
  return kU * std::fabs(p_ref) + 64 * kU * step + 1e-45;
}

AdamWStep test_step(int64_t t) {
  AdamWStep s;
  s.lr = 3e-3f * static_cast<float>(t);
  s.beta1 = 0.9f;
  s.beta2 = 0.95f;
  s.eps = 1e-8f;
  s.weight_decay = 0.1f;
  s.t = t;
  s.grad_scale = 0.75f;
  return s;
}

TEST(AdamWMath, ElementMatchesDoubleFormula) {
  const int64_t n = 4099;
  std::vector<float> p(n), m(n, 0.0f), v(n, 0.0f);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(rng_normal(11, 1, i));
  double sum_abs_update = 0;
  for (int64_t t = 1; t <= 8; ++t) {
    const AdamWStep s = test_step(t);
    const bool decay = t % 3 != 0;
    const AdamWCoeffs k = adamw_coeffs(s, decay);
    for (int64_t i = 0; i < n; ++i) {
      // Gradients over many magnitudes, some exactly zero.
      const double mag = std::pow(10.0, static_cast<double>(i % 9) - 4.0);
      const float g = i % 97 == 0 ? 0.0f : static_cast<float>(mag * rng_normal(12, t, i));
      const RefStep r = adamw_reference(p[i], g, m[i], v[i], s, decay);
      const double gs = static_cast<double>(g) * s.grad_scale;
      const double b1 = s.beta1, b2 = s.beta2;
      const double tol_m = 6 * kU * (b1 * std::fabs(m[i]) + (1 - b1) * std::fabs(gs)) + 1e-45;
      const double tol_v = 6 * kU * (b2 * v[i] + (1 - b2) * gs * gs) + 1e-45;
      float pf = p[i], mf = m[i], vf = v[i];
      adamw_element(pf, g, mf, vf, k);
      ASSERT_NEAR(mf, r.m, tol_m) << "t=" << t << " i=" << i;
      ASSERT_NEAR(vf, r.v, tol_v) << "t=" << t << " i=" << i;
      ASSERT_NEAR(pf, r.p, param_tol(r.p, p[i], r.m, r.v, s, decay)) << "t=" << t << " i=" << i;
      sum_abs_update += std::fabs(static_cast<double>(pf) - p[i]);
      p[i] = pf, m[i] = mf, v[i] = vf;
    }
  }
  EXPECT_GT(sum_abs_update, 1.0);  // the parameters did move
}

// The first step from zero moments: m^ = g and v^ = g^2 (to rounding), so without decay every
// parameter with a gradient well above eps moves by lr times the gradient's sign.
TEST(AdamWMath, FirstStepMovesByLrTimesSign) {
  AdamWStep s = test_step(1);
  s.grad_scale = 1.0f;
  const AdamWCoeffs k = adamw_coeffs(s, false);
  for (int64_t i = 0; i < 1000; ++i) {
    const float g = static_cast<float>(rng_normal(13, 1, i));
    if (std::fabs(g) < 1e-3f) continue;
    float p = 1.0f, m = 0.0f, v = 0.0f;
    adamw_element(p, g, m, v, k);
    EXPECT_NEAR(1.0 - p, s.lr * (g > 0 ? 1.0 : -1.0), 1e-6) << i;
  }
}

TEST(AdamWMath, ZeroGradientWithoutDecayLeavesEverythingAlone) {
  const AdamWCoeffs k = adamw_coeffs(test_step(5), false);
  for (float p0 : {1.0f, -2.5f, 0.0f, 1e-30f, 3e30f}) {
    float p = p0, m = 0.0f, v = 0.0f;
    adamw_element(p, 0.0f, m, v, k);
    EXPECT_EQ(p, p0);
    EXPECT_EQ(m, 0.0f);
    EXPECT_EQ(v, 0.0f);
  }
}

TEST(AdamWMath, CoeffsMatchDouble) {
  for (int64_t t : {1, 2, 7, 100, 10000, 1000000}) {
    const AdamWStep s = test_step(t);
    const AdamWCoeffs k = adamw_coeffs(s, true);
    const double c1 = 1 / (1 - std::pow(static_cast<double>(s.beta1), static_cast<double>(t)));
    const double c2 = 1 / (1 - std::pow(static_cast<double>(s.beta2), static_cast<double>(t)));
    EXPECT_NEAR(k.c1, c1, 64 * kU * c1) << t;
    EXPECT_NEAR(k.c2, c2, 64 * kU * c2) << t;
    EXPECT_EQ(k.wd, s.weight_decay);
    EXPECT_EQ(adamw_coeffs(s, false).wd, 0.0f);
    EXPECT_EQ(k.lr, s.lr);
    EXPECT_EQ(k.grad_scale, s.grad_scale);
  }
}

// BF16 moments: the stored moments are the BF16 roundings of the FP32 ones, and the parameter
// moves by the unrounded ones, i.e. exactly as adamw_element from the widened moments.
TEST(AdamWMath, Bf16ElementRoundsOnlyTheStores) {
  const AdamWStep s = test_step(3);
  const AdamWCoeffs k = adamw_coeffs(s, true);
  for (int64_t i = 0; i < 2000; ++i) {
    const float g = static_cast<float>(rng_normal(14, 1, i));
    const uint16_t m0 = bf16_from_float(static_cast<float>(0.1 * rng_normal(14, 2, i)));
    const uint16_t v0 = bf16_from_float(static_cast<float>(0.01 * std::fabs(rng_normal(14, 3, i))));
    float p16 = 0.5f, p32 = 0.5f, m32 = bf16_to_float(m0), v32 = bf16_to_float(v0);
    uint16_t m16 = m0, v16 = v0;
    adamw_element_bf16(p16, g, m16, v16, k);
    adamw_element(p32, g, m32, v32, k);
    ASSERT_EQ(f32_bits(p16), f32_bits(p32)) << i;
    ASSERT_EQ(m16, bf16_from_float(m32)) << i;
    ASSERT_EQ(v16, bf16_from_float(v32)) << i;
    const RefStep r = adamw_reference(0.5, g, bf16_to_float(m0), bf16_to_float(v0), s, true);
    ASSERT_NEAR(p16, r.p, param_tol(r.p, 0.5, r.m, r.v, s, true)) << i;
    ASSERT_NEAR(bf16_to_float(m16), r.m, 0x1p-8 * std::fabs(r.m) + 1e-12) << i;
  }
}

// The CPU optimizer is adamw_element with adamw_coeffs, bit for bit (vectorized or not).
TEST(AdamWMath, CpuOptimizerIsTheSharedElement) {
  const int64_t n = 1031;
  std::vector<float> p(n), m(n), v(n), g(n);
  std::vector<uint16_t> m16(n), v16(n);
  for (int64_t i = 0; i < n; ++i) {
    p[i] = static_cast<float>(rng_normal(15, 1, i));
    g[i] = static_cast<float>(rng_normal(15, 2, i));
    m[i] = static_cast<float>(0.1 * rng_normal(15, 3, i));
    v[i] = static_cast<float>(0.01 * std::fabs(rng_normal(15, 4, i)));
    m16[i] = bf16_from_float(m[i]);
    v16[i] = bf16_from_float(v[i]);
  }
  const AdamWStep s = test_step(4);
  const AdamWCoeffs k = adamw_coeffs(s, true);
  std::vector<float> ep = p, em = m, ev = v, ep16 = p;
  std::vector<uint16_t> em16 = m16, ev16 = v16;
  for (int64_t i = 0; i < n; ++i) {
    adamw_element(ep[i], g[i], em[i], ev[i], k);
    adamw_element_bf16(ep16[i], g[i], em16[i], ev16[i], k);
  }
  std::vector<float> p16 = p;
  adamw_update(p.data(), g.data(), m.data(), v.data(), n, s, true);
  adamw_update_bf16(p16.data(), g.data(), m16.data(), v16.data(), n, s, true);
  EXPECT_EQ(std::memcmp(p.data(), ep.data(), n * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(m.data(), em.data(), n * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(v.data(), ev.data(), n * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(p16.data(), ep16.data(), n * sizeof(float)), 0);
  EXPECT_EQ(m16, em16);
  EXPECT_EQ(v16, ev16);
}

}  // namespace
}  // namespace moe
