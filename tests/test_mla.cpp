// Multi-head Latent Attention (attention.kind = "mla", model/mla_block.cpp):
//  - the attention core with value heads of another width than query / key heads against a
//    naive double reference (and HDv = HD bit for bit the HD-only entry points);
//  - the MLA block's forward against an independent naive double reference (projections,
//    latent norms, RoPE with explicit cos / sin, per-head softmax) on random weights;
//  - whole-model gradient checks in double against central differences (low-rank and
//    full-rank queries, dense and MoE layers, no non-RoPE query / key part, v_hd != qk_hd);
//  - the split backward (kInput, then kWeight) equal to kFull bit for bit;
//  - BF16 / FP8 models close to FP32, and the arenas as model_activation_bytes measures them;
//  - through the binary: a tiny MLA config trains, and dp = 2 x ep = 2 and a pp = 2 DualPipe
//    run match one process.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "io/config.h"
#include "model/fp8.h"
#include "model/fp8_quant.h"
#include "model/kernels/cpu/dense_ops.h"
#include "model/model.h"
#include "model/rng.h"
#include "tests/binary_harness.h"
#include "tests/model_gradient_check.h"

namespace moe {
namespace {

// ---- the attention core with HDv != HD ------------------------------------------------

// Naive causal attention over qkv (B, T, (NH + NKV) HD + NKV HDv): out (B, T, NH HDv);
// with dout, also dqkv (assigned).
void ref_attention(std::vector<double>& out, std::vector<double>* dqkv,
                   const std::vector<double>& qkv, const std::vector<double>* dout, int64_t B,
                   int64_t T, int64_t NH, int64_t NKV, int64_t HD, int64_t HDv) {
  const int64_t W = (NH + NKV) * HD + NKV * HDv, OW = NH * HDv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(HD));
  out.assign(static_cast<size_t>(B * T * OW), 0.0);
  if (dqkv) dqkv->assign(qkv.size(), 0.0);
  auto at = [&](int64_t b, int64_t t, int64_t off) {
    return static_cast<size_t>((b * T + t) * W + off);
  };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h) {
      const int64_t g = h / (NH / NKV);
      const int64_t qo = h * HD, ko = (NH + g) * HD, vo = (NH + NKV) * HD + g * HDv;
      for (int64_t i = 0; i < T; ++i) {
        std::vector<double> p(static_cast<size_t>(i + 1));
        double mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j <= i; ++j) {
          double s = 0;
          for (int64_t c = 0; c < HD; ++c) s += qkv[at(b, i, qo + c)] * qkv[at(b, j, ko + c)];
          p[static_cast<size_t>(j)] = s * scale;
          mx = std::max(mx, s * scale);
        }
        for (double& x : p) sum += (x = std::exp(x - mx));
        for (double& x : p) x /= sum;
        double* o = out.data() + (b * T + i) * OW + h * HDv;
        for (int64_t j = 0; j <= i; ++j)
          for (int64_t c = 0; c < HDv; ++c) o[c] += p.data()[j] * qkv[at(b, j, vo + c)];
        if (!dqkv) continue;
        const double* dO = dout->data() + (b * T + i) * OW + h * HDv;
        std::vector<double> dp(static_cast<size_t>(i + 1));
        double dot = 0;
        for (int64_t j = 0; j <= i; ++j) {
          double s = 0;
          for (int64_t c = 0; c < HDv; ++c) {
            s += dO[c] * qkv[at(b, j, vo + c)];
            (*dqkv)[at(b, j, vo + c)] += p[static_cast<size_t>(j)] * dO[c];
          }
          dp[static_cast<size_t>(j)] = s;
          dot += s * p[static_cast<size_t>(j)];
        }
        for (int64_t j = 0; j <= i; ++j) {
          const double ds = p[static_cast<size_t>(j)] * (dp[static_cast<size_t>(j)] - dot) * scale;
          for (int64_t c = 0; c < HD; ++c) {
            (*dqkv)[at(b, i, qo + c)] += ds * qkv[at(b, j, ko + c)];
            (*dqkv)[at(b, j, ko + c)] += ds * qkv[at(b, i, qo + c)];
          }
        }
      }
    }
}

std::vector<double> uniform(size_t n, uint64_t seed, double lo, double hi) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> v(n);
  for (double& x : v) x = static_cast<float>(dist(rng));  // float-exact: both types see the same
  return v;
}

// max |a - b| / max |b|, and that b is not all zero.
double max_rel(const std::vector<double>& a, const std::vector<double>& b) {
  double diff = 0, mx = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    diff = std::max(diff, std::fabs(a[i] - b[i]));
    mx = std::max(mx, std::fabs(b[i]));
  }
  EXPECT_GT(mx, 1e-3) << "reference all ~zero";
  return diff / mx;
}

struct CoreShape {
  int64_t B, T, NH, NKV, HD, HDv;
};

// The fused core; every buffer starts NaN (nothing may be read before it is written), and the
// scratch is refilled with NaN between the passes (the backward needs only lse).
template <typename T>
void run_core(const CoreShape& s, const std::vector<double>& qkv, const std::vector<double>& dout,
              std::vector<double>& out, std::vector<double>& dqkv) {
  std::vector<T> q(qkv.begin(), qkv.end()), dO(dout.begin(), dout.end());
  std::vector<T> o(dout.size(), T(NAN)), lse(static_cast<size_t>(s.B * s.NH * s.T), T(NAN));
  std::vector<T> scratch(
      static_cast<size_t>(cpu::attention_scratch_elems(s.B, s.T, s.NH, s.NKV, s.HD, s.HDv)),
      T(NAN));
  std::vector<T> dq(qkv.size(), T(NAN));
  cpu::attention_forward<T>(o.data(), lse.data(), q.data(), s.B, s.T, s.NH, s.NKV, s.HD, s.HDv,
                            scratch.data());
  std::fill(scratch.begin(), scratch.end(), T(NAN));
  cpu::attention_backward<T>(dq.data(), dO.data(), q.data(), lse.data(), s.B, s.T, s.NH, s.NKV,
                             s.HD, s.HDv, scratch.data());
  out.assign(o.begin(), o.end());
  dqkv.assign(dq.begin(), dq.end());
}

// Several row blocks (T > 32), grouped heads, value heads wider and narrower than HD.
TEST(MlaAttentionCore, ValueWidthDiffersFromQueryKeyWidth) {
  const CoreShape shapes[] = {{2, 45, 3, 1, 10, 6}, {1, 70, 2, 2, 12, 20}, {1, 3, 1, 1, 2, 1},
                              {2, 33, 4, 4, 7, 13}};
  for (const CoreShape& s : shapes) {
    SCOPED_TRACE("T=" + std::to_string(s.T) + " HD=" + std::to_string(s.HD) +
                 " HDv=" + std::to_string(s.HDv));
    const int64_t W = (s.NH + s.NKV) * s.HD + s.NKV * s.HDv;
    const std::vector<double> qkv = uniform(static_cast<size_t>(s.B * s.T * W), 3, -2, 2);
    const size_t n_out = static_cast<size_t>(s.B * s.T * s.NH * s.HDv);
    const std::vector<double> dout = uniform(n_out, 4, -1, 1);
    std::vector<double> out_ref, dqkv_ref, out, dqkv;
    ref_attention(out_ref, &dqkv_ref, qkv, &dout, s.B, s.T, s.NH, s.NKV, s.HD, s.HDv);
    run_core<double>(s, qkv, dout, out, dqkv);
    EXPECT_LT(max_rel(out, out_ref), 1e-13);
    EXPECT_LT(max_rel(dqkv, dqkv_ref), 1e-13);
    run_core<float>(s, qkv, dout, out, dqkv);
    EXPECT_LT(max_rel(out, out_ref), 2e-6);
    EXPECT_LT(max_rel(dqkv, dqkv_ref), 2e-5);
  }
}

// The kernel is bitwise the same for any thread count.
TEST(MlaAttentionCore, ThreadCountsGiveTheSameBits) {
  const CoreShape u{2, 70, 4, 2, 10, 6};
  const int64_t Wu = (u.NH + u.NKV) * u.HD + u.NKV * u.HDv;
  const std::vector<double> qu = uniform(static_cast<size_t>(u.B * u.T * Wu), 7, -2, 2);
  const std::vector<double> du = uniform(static_cast<size_t>(u.B * u.T * u.NH * u.HDv), 8, -1, 1);
  std::vector<double> out[2], dq[2];
  const int threads = omp_get_max_threads();
  for (int i = 0; i < 2; ++i) {
    omp_set_num_threads(i == 0 ? 1 : 3);
    run_core<float>(u, qu, du, out[i], dq[i]);
  }
  omp_set_num_threads(threads);
  EXPECT_EQ(out[0], out[1]);
  EXPECT_EQ(dq[0], dq[1]);
}

// ---- models ------------------------------------------------------------------------------

// A small MLA model: low-rank queries (q_lora 6), a rank-5 latent, query / key heads of
// 3 + 4 and value heads of 5; a dense first layer, then MoE layers with shared experts.
ModelDims mla_dims(int64_t q_lora = 6, int64_t qk_nope = 3, int64_t dense_layers = 1) {
  ModelDims d;
  d.V = 11; d.C = 8; d.L = 3; d.NH = 2; d.NKV = 2; d.HD = 4; d.T = 5; d.F = 12;
  d.dense_layers = dense_layers;
  d.E = 6; d.K = 2; d.FE = 4; d.S = 4;
  d.route_scale = 1.5;
  d.aux_alpha = 0.1;
  d.init_std = 0.4;
  d.attn = AttentionKind::kMla;
  d.q_lora = q_lora; d.kv_lora = 5; d.qk_nope = qk_nope; d.qk_rope = 4; d.v_hd = 5;
  return d;
}

std::vector<int32_t> random_tokens(int64_t n, int64_t V, uint64_t seed) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    t.data()[i] = static_cast<int32_t>(rng_u64(seed, 9, static_cast<uint64_t>(i)) % V);
  return t;
}

using test::perturb_norms;

// ---- the forward against a naive reference ------------------------------------------------

// y (n) = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps).
std::vector<double> rmsnorm(const double* x, const double* w, int64_t n, double eps) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const double r = 1.0 / std::sqrt(ss / static_cast<double>(n) + eps);
  std::vector<double> y(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) y.data()[i] = x[i] * r * w[i];
  return y;
}

// y (rows) = W (rows, cols) x.
std::vector<double> matvec(const double* W, const std::vector<double>& x, int64_t rows) {
  const int64_t cols = static_cast<int64_t>(x.size());
  std::vector<double> y(static_cast<size_t>(rows), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) y.data()[r] += W[r * cols + c] * x.data()[c];
  return y;
}

// Interleaved pairs (v[2i], v[2i+1]) of an n-wide vector turned by t theta^(-2i / n).
void rotate(double* v, int64_t n, int64_t t, double theta) {
  for (int64_t i = 0; i < n / 2; ++i) {
    const double a = static_cast<double>(t) * std::pow(theta, -2.0 * double(i) / double(n));
    const double x0 = v[2 * i], x1 = v[2 * i + 1];
    v[2 * i] = x0 * std::cos(a) - x1 * std::sin(a);
    v[2 * i + 1] = x0 * std::sin(a) + x1 * std::cos(a);
  }
}

// x + MLA(RMSNorm(x)) for x (B, T, C), written from the definition.
std::vector<double> reference_mla_block(const ModelDims& d, const LayerParams<double>& p,
                                        const double* x, int64_t B, int64_t T) {
  const int64_t C = d.C, NH = d.NH, Dn = d.qk_nope, Dr = d.qk_rope, Dq = Dn + Dr, Dv = d.v_hd;
  const int64_t N = B * T;
  // Per token: queries and keys (NH, Dq) after RoPE, values (NH, Dv).
  std::vector<double> qs(static_cast<size_t>(N * NH * Dq)), ks(qs.size());
  std::vector<double> vs(static_cast<size_t>(N * NH * Dv));
  for (int64_t n = 0; n < N; ++n) {
    const int64_t t = n % T;
    const std::vector<double> ln = rmsnorm(x + n * C, p.attn_norm, C, d.norm_eps);
    std::vector<double> q;
    if (d.q_lora > 0) {
      const std::vector<double> qa = matvec(p.wq_a, ln, d.q_lora);
      q = matvec(p.wq_b, rmsnorm(qa.data(), p.q_norm, d.q_lora, d.norm_eps), NH * Dq);
    } else {
      q = matvec(p.wq, ln, NH * Dq);
    }
    std::vector<double> kva = matvec(p.wkv_a, ln, d.kv_lora + Dr);
    double* k_rope = kva.data() + d.kv_lora;
    rotate(k_rope, Dr, t, d.rope_theta);
    const std::vector<double> c = rmsnorm(kva.data(), p.kv_norm, d.kv_lora, d.norm_eps);
    const std::vector<double> kv = matvec(p.wkv_b, c, NH * (Dn + Dv));
    for (int64_t h = 0; h < NH; ++h) {
      rotate(q.data() + h * Dq + Dn, Dr, t, d.rope_theta);
      double* qh = qs.data() + (n * NH + h) * Dq;
      double* kh = ks.data() + (n * NH + h) * Dq;
      double* vh = vs.data() + (n * NH + h) * Dv;
      const double* kvh = kv.data() + h * (Dn + Dv);
      for (int64_t i = 0; i < Dq; ++i) qh[i] = q.data()[h * Dq + i];
      for (int64_t i = 0; i < Dn; ++i) kh[i] = kvh[i];
      for (int64_t i = 0; i < Dr; ++i) kh[Dn + i] = k_rope[i];
      for (int64_t i = 0; i < Dv; ++i) vh[i] = kvh[Dn + i];
    }
  }
  std::vector<double> out(x, x + N * C);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t b = n / T, t = n % T;
    std::vector<double> o(static_cast<size_t>(NH * Dv), 0.0);
    for (int64_t h = 0; h < NH; ++h) {
      std::vector<double> s(static_cast<size_t>(t + 1));
      double mx = -INFINITY, sum = 0;
      for (int64_t j = 0; j <= t; ++j) {
        const double* qh = qs.data() + (n * NH + h) * Dq;
        const double* kh = ks.data() + ((b * T + j) * NH + h) * Dq;
        double dot = 0;
        for (int64_t i = 0; i < Dq; ++i) dot += qh[i] * kh[i];
        s.data()[j] = dot / std::sqrt(static_cast<double>(Dq));
        mx = std::max(mx, s.data()[j]);
      }
      for (double& e : s) sum += (e = std::exp(e - mx));
      for (int64_t j = 0; j <= t; ++j) {
        const double* vh = vs.data() + ((b * T + j) * NH + h) * Dv;
        for (int64_t i = 0; i < Dv; ++i) o.data()[h * Dv + i] += s.data()[j] / sum * vh[i];
      }
    }
    const std::vector<double> y = matvec(p.wo, o, C);
    for (int64_t c = 0; c < C; ++c) out.data()[n * C + c] += y.data()[c];
  }
  return out;
}

// Every layer's attention block (its input res[l], its output res_mid) against the
// reference, relative to the largest attention branch (x + branch - x).
void expect_forward_matches_reference(const ModelDims& d, uint64_t seed) {
  const int64_t B = 2, T = d.T, N = B * T;
  Model<double> m;
  model_build<double>(m, d, B);
  model_init<double>(m, seed);
  perturb_norms(m, seed);
  const std::vector<int32_t> x = random_tokens(N, d.V, seed), y = random_tokens(N, d.V, seed + 1);
  model_forward<double>(m, x.data(), y.data(), B, T, false);
  for (int64_t l = 0; l < d.L; ++l) {
    const double* in = m.slots[0].res + l * N * d.C;
    const std::vector<double> want =
        reference_mla_block(d, m.p.layers[static_cast<size_t>(l)], in, B, T);
    const double* got = m.slots[0].layers[static_cast<size_t>(l)].res_mid;
    double diff = 0, branch = 0;
    for (int64_t i = 0; i < N * d.C; ++i) {
      diff = std::max(diff, std::fabs(got[i] - want[static_cast<size_t>(i)]));
      branch = std::max(branch, std::fabs(want[static_cast<size_t>(i)] - in[i]));
    }
    std::printf("layer %lld: max |got - want| / max |branch| = %.2e\n", static_cast<long long>(l),
                diff / branch);
    EXPECT_GT(branch, 0.05) << "layer " << l << ": the attention branch is ~zero";
    EXPECT_LT(diff, 1e-12 * branch) << "layer " << l;
  }
}

TEST(MlaForward, MatchesNaiveReference) {
  expect_forward_matches_reference(mla_dims(), 51);
  expect_forward_matches_reference(mla_dims(0), 52);     // full-rank queries (wq)
  expect_forward_matches_reference(mla_dims(6, 0), 53);  // keys are the shared RoPE part only
  ModelDims d = mla_dims(0, 5);  // three heads, v_hd < qk_hd, rope width 2
  d.NH = 3;
  d.NKV = 3;
  d.qk_rope = 2;
  d.v_hd = 3;
  d.T = 7;
  expect_forward_matches_reference(d, 54);
}

// The float model computes the double model's loss (to float accuracy).
TEST(MlaForward, FloatMatchesDouble) {
  const ModelDims d = mla_dims();
  const int64_t B = 2, N = B * d.T;
  const std::vector<int32_t> x = random_tokens(N, d.V, 21), y = random_tokens(N, d.V, 22);
  Model<double> md;
  Model<float> mf;
  model_build<double>(md, d, B);
  model_build<float>(mf, d, B);
  model_init<double>(md, 8);
  model_init<float>(mf, 8);
  const double ld = model_forward<double>(md, x.data(), y.data(), B, d.T, false);
  const double lf = model_forward<float>(mf, x.data(), y.data(), B, d.T, false);
  EXPECT_GT(ld, 1.0);
  EXPECT_NEAR(lf, ld, 1e-5 * ld);
}

// ---- gradient checks ---------------------------------------------------------------------

using test::objective;
using test::routing_of;

// Every parameter against central differences of mean CE + balance loss; each MLA tensor
// must have a gradient of its own (a weight skipped by backward would read as all zero).
void gradient_check(const ModelDims& d, uint64_t seed) {
  omp_set_num_threads(1);
  const int64_t B = 2, T = d.T, N = B * T;
  Model<double> m;
  model_build<double>(m, d, B);
  model_init<double>(m, seed);
  perturb_norms(m, seed);
  const std::vector<int32_t> x = random_tokens(N, d.V, seed), y = random_tokens(N, d.V, seed + 1);
  const test::FdCheck fd = test::fd_check_fourth_order(m, x, y, B, T);
  ASSERT_TRUE(std::isfinite(fd.base));
  const double max_err = fd.max_err, max_grad = fd.max_grad;
  const int64_t skipped = fd.skipped;
  const std::vector<double>& analytic = fd.analytic;
  std::printf("max |fd - analytic| %.2e, max |grad| %.2e, %lld routing flips\n", max_err, max_grad,
              static_cast<long long>(skipped));
  EXPECT_GT(max_grad, 1e-3) << "gradients are all ~zero: the check would prove nothing";
  EXPECT_LT(max_err, 1e-9 * std::max(1.0, max_grad));
  EXPECT_LT(skipped, static_cast<int64_t>(m.n_params) / 100) << "too many routing flips";
  int64_t mla_tensors = 0;
  for (const ParamInfo& p : m.table) {
    if (p.name.find("/attn/") == std::string::npos) continue;
    double mx = 0;
    for (size_t i = p.offset; i < p.offset + p.count; ++i)
      mx = std::max(mx, std::fabs(analytic[i]));
    EXPECT_GT(mx, 1e-6) << p.name;
    ++mla_tensors;
  }
  EXPECT_EQ(mla_tensors, d.L * (d.q_lora > 0 ? 7 : 5));
}

TEST(MlaGradient, LowRankQueriesDenseAndMoe) { gradient_check(mla_dims(), 61); }
TEST(MlaGradient, FullRankQueriesAllMoe) { gradient_check(mla_dims(0, 3, 0), 62); }
TEST(MlaGradient, NoNopePartDenseOnly) {
  ModelDims d = mla_dims(6, 0, 3);
  d.v_hd = 3;
  gradient_check(d, 63);
}
TEST(MlaGradient, ThreeHeadsNarrowRope) {
  ModelDims d = mla_dims(0, 5, 1);
  d.NH = 3;
  d.NKV = 3;
  d.qk_rope = 2;
  d.v_hd = 3;
  d.L = 2;
  gradient_check(d, 64);
}

// ---- split backward ----------------------------------------------------------------------

template <typename T>
bool same_bits(const T* a, const T* b, size_t n) {
  return std::memcmp(a, b, sizeof(T) * n) == 0;
}

template <typename T>
class MlaSplitBackward : public ::testing::Test {};
using SplitTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(MlaSplitBackward, SplitTypes);

// Two micro-batches in flight, F0 F1 I0 I1 W0 W1, equal kFull of each in turn bit for bit
// (the weight passes add in the same order): fails if the slots or layers shared their
// MLA kept gradients, or if a weight pass read scratch the other slot overwrote.
TYPED_TEST(MlaSplitBackward, InputThenWeightEqualsFullBitForBit) {
  using T = TypeParam;
  for (const int64_t q_lora : {int64_t{6}, int64_t{0}}) {
    SCOPED_TRACE("q_lora " + std::to_string(q_lora));
    const ModelDims d = mla_dims(q_lora);
    const int64_t B = 2, N = B * d.T, L = d.L;
    Model<T> ref, m;
    model_build<T>(ref, d, B, 1, 1, {}, 1, false);
    model_build<T>(m, d, B, 1, 1, {}, 2, true);
    for (Model<T>* x : {&ref, &m}) {
      model_init<T>(*x, 71);
      model_zero_grads<T>(*x);
    }
    const T dce = T(1) / T(N), daux = T(1) / T(B);
    std::vector<int32_t> xs[2], ys[2];
    std::vector<T> dx[2];
    for (int s = 0; s < 2; ++s) {
      xs[s] = random_tokens(N, d.V, 80 + 2 * s);
      ys[s] = random_tokens(N, d.V, 81 + 2 * s);
      model_chunk_forward<T>(ref, 0, 0, L, xs[s].data(), ys[s].data(), B, d.T, true);
      model_chunk_backward<T>(ref, 0, 0, L, dce, daux, BackwardPart::kFull);
      const T* g = model_chunk_grad<T>(ref, 0);
      dx[s].assign(g, g + N * d.C);
    }
    for (int s = 0; s < 2; ++s)
      model_chunk_forward<T>(m, s, 0, L, xs[s].data(), ys[s].data(), B, d.T, true);
    for (int s = 0; s < 2; ++s)
      model_chunk_backward<T>(m, s, 0, L, dce, daux, BackwardPart::kInput);
    for (size_t i = 0; i < m.n_alloc; ++i)
      ASSERT_EQ(m.grads[i], T(0)) << "kInput wrote a weight gradient";
    for (int s = 0; s < 2; ++s)
      EXPECT_TRUE(same_bits(model_chunk_grad<T>(m, s), dx[s].data(), static_cast<size_t>(N * d.C)));
    for (int s = 0; s < 2; ++s)
      model_chunk_backward<T>(m, s, 0, L, dce, daux, BackwardPart::kWeight);
    EXPECT_TRUE(same_bits(m.grads, ref.grads, m.n_alloc));
    double mx = 0;
    for (size_t i = 0; i < m.n_alloc; ++i) mx = std::max(mx, std::fabs(double(ref.grads[i])));
    EXPECT_GT(mx, 1e-3);
  }
}

// ---- precision modes ---------------------------------------------------------------------

// Widths that are not multiples of 128 (partial tiles and blocks), more than 128 tokens.
ModelDims precision_dims(PrecisionMode mode, int64_t q_lora) {
  ModelDims d;
  d.V = 64; d.C = 160; d.L = 3; d.NH = 2; d.NKV = 2; d.HD = 32; d.T = 40; d.F = 200;
  d.dense_layers = 1;
  d.E = 4; d.K = 2; d.FE = 96; d.S = 96;
  d.aux_alpha = 0.01;
  d.init_std = 0.05;
  d.attn = AttentionKind::kMla;
  d.q_lora = q_lora; d.kv_lora = 72; d.qk_nope = 40; d.qk_rope = 24; d.v_hd = 48;
  d.precision = mode;
  return d;
}

constexpr int64_t kPB = 4;

std::vector<double> gradients(Model<float>& m, double* loss) {
  const int64_t N = kPB * m.d.T;
  const std::vector<int32_t> x = random_tokens(N, m.d.V, 1), y = random_tokens(N, m.d.V, 2);
  model_zero_grads<float>(m);
  *loss = model_forward<float>(m, x.data(), y.data(), kPB, m.d.T, true);
  model_backward<float>(m, 1.0f / static_cast<float>(N), 1.0f);
  std::vector<double> g(m.grads, m.grads + m.n_alloc);
  for (double v : g) EXPECT_TRUE(std::isfinite(v));
  return g;
}

void build(Model<float>& m, PrecisionMode mode, int64_t q_lora) {
  model_build<float>(m, precision_dims(mode, q_lora), kPB);
  model_init<float>(m, 42);
  model_quantize_weights<float>(m);
}

// ||a - b|| / ||b|| over the tensors named "layers/*/<suffix>".
double rel_error(const Model<float>& m, const std::vector<double>& a, const std::vector<double>& b,
                 const std::string& suffix) {
  double num = 0, den = 0;
  for (const ParamInfo& p : m.table) {
    if (p.name.size() < suffix.size() ||
        p.name.compare(p.name.size() - suffix.size(), suffix.size(), suffix) != 0)
      continue;
    for (size_t i = p.offset; i < p.offset + p.count; ++i) {
      num += (a[i] - b[i]) * (a[i] - b[i]);
      den += b[i] * b[i];
    }
  }
  EXPECT_GT(den, 0) << suffix;
  return std::sqrt(num / den);
}

// Loss and each MLA tensor's gradient against the FP32 model's on one batch (see
// test_model_precision.cpp for why whole-model figures are measured, not derived). Measured
// (q_lora 96 / q_lora 0): BF16 loss 3.8e-4 / 5.8e-5, MLA tensors' gradients 2.5e-2..5.3e-2;
// FP8 loss 5.4e-4 / 2.3e-4, gradients 0.17..0.24; all attention gradients FP8 / BF16 = 5.0 /
// 6.3. (The loss figure is noisy: over init seeds it spans 1e-5..7e-4 in BF16 for standard
// attention too.) The limits leave 2x or more and still catch a wiring error (errors of
// order 1); FP8 must stay clearly worse than BF16.
TEST(MlaPrecision, LossAndGradientsStayCloseToFp32) {
  omp_set_num_threads(1);
  for (const int64_t q_lora : {int64_t{96}, int64_t{0}}) {
    SCOPED_TRACE("q_lora " + std::to_string(q_lora));
    Model<float> ref_model;
    build(ref_model, PrecisionMode::kFp32, q_lora);
    double ref_loss = 0;
    const std::vector<double> ref = gradients(ref_model, &ref_loss);
    std::vector<std::string> parts = {"attn/wkv_a", "attn/kv_norm", "attn/wkv_b", "attn/wo",
                                      "attn_norm"};
    if (q_lora > 0) {
      parts.insert(parts.end(), {"attn/wq_a", "attn/q_norm", "attn/wq_b"});
    } else {
      parts.push_back("attn/wq");
    }
    struct Case {
      PrecisionMode mode;
      double loss_tol, grad_tol;
    };
    double err[2] = {0, 0};
    int i = 0;
    for (const Case c :
         {Case{PrecisionMode::kBf16, 1e-3, 0.12}, Case{PrecisionMode::kFp8, 2e-3, 0.5}}) {
      SCOPED_TRACE(to_string(c.mode));
      Model<float> m;
      build(m, c.mode, q_lora);
      double loss = 0;
      const std::vector<double> g = gradients(m, &loss);
      EXPECT_NE(loss, ref_loss);
      EXPECT_LT(std::abs(loss - ref_loss) / ref_loss, c.loss_tol);
      std::printf("%s q_lora %lld: loss %.2e", to_string(c.mode), static_cast<long long>(q_lora),
                  std::abs(loss - ref_loss) / ref_loss);
      for (const std::string& part : parts) {
        const double e = rel_error(m, g, ref, part);
        std::printf(" %s %.2e", part.c_str(), e);
        EXPECT_GT(e, 0) << part;
        EXPECT_LT(e, c.grad_tol) << part;
      }
      std::printf("\n");
      double num = 0, den = 0;
      for (const ParamInfo& p : m.table)
        if (p.name.find("/attn/") != std::string::npos)
          for (size_t j = p.offset; j < p.offset + p.count; ++j) {
            num += (g[j] - ref[j]) * (g[j] - ref[j]);
            den += ref[j] * ref[j];
          }
      err[i++] = std::sqrt(num / den);
    }
    std::printf("MLA gradients: bf16 %.2e fp8 %.2e\n", err[0], err[1]);
    EXPECT_LT(err[0] * 3, err[1]) << "BF16's gradients should be far closer to FP32's than FP8's";
  }
}

// The GEMM copy holds each MLA matrix quantized; the latent norms read the master weights.
TEST(MlaPrecision, ProjectionsReadTheGemmCopy) {
  Model<float> m;
  build(m, PrecisionMode::kFp8, 96);
  const ModelDims& d = m.d;
  const LayerParams<float>& p = m.p.layers[1];
  const LayerParams<float>& q = m.q.layers[1];
  EXPECT_EQ(q.q_norm, p.q_norm);
  EXPECT_EQ(q.kv_norm, p.kv_norm);
  std::vector<float> want(static_cast<size_t>(d.kv_lora * d.C + d.qk_rope * d.C));
  fp8_fake_quantize(want.data(), p.wkv_a, d.kv_lora + d.qk_rope, d.C, kTileWeight);
  EXPECT_EQ(std::memcmp(want.data(), q.wkv_a, want.size() * sizeof(float)), 0);
  // A change to a master projection shows in the loss only once quantized again.
  const int64_t N = kPB * d.T;
  const std::vector<int32_t> x = random_tokens(N, d.V, 1), y = random_tokens(N, d.V, 2);
  const double base = model_forward<float>(m, x.data(), y.data(), kPB, d.T, false);
  for (float* w : {p.wq_a, p.wq_b, p.wkv_a, p.wkv_b}) w[3] += 0.5f;
  EXPECT_EQ(model_forward<float>(m, x.data(), y.data(), kPB, d.T, false), base);
  model_quantize_weights<float>(m);
  const double requantized = model_forward<float>(m, x.data(), y.data(), kPB, d.T, false);
  EXPECT_NE(requantized, base);
  p.kv_norm[2] += 0.5f;
  EXPECT_NE(model_forward<float>(m, x.data(), y.data(), kPB, d.T, false), requantized)
      << "kv_norm did not read the master weights";
}

// The arenas are what model_activation_bytes / model_workspace_bytes measure (one slot,
// after the two rope tables), and saving the MLA GEMM inputs in BF16 / FP8 shrinks them.
TEST(MlaPrecision, ArenasAreWhatTheSizeFunctionsMeasure) {
  size_t bytes[3];
  int i = 0;
  for (PrecisionMode mode : {PrecisionMode::kFp32, PrecisionMode::kBf16, PrecisionMode::kFp8}) {
    SCOPED_TRACE(to_string(mode));
    const ModelDims d = precision_dims(mode, 96);
    Model<float> m;
    model_build<float>(m, d, kPB);
    const size_t rope = (static_cast<size_t>(d.T * d.qk_rope / 2) * 4 + kArenaAlign - 1) /
                        kArenaAlign * kArenaAlign;
    bytes[i] = model_activation_bytes(d, kPB, 4, moe::Device::kCpu);
    EXPECT_EQ(m.act_arena.bytes() + m.plan_arena.bytes(), 2 * rope + bytes[i]);
    EXPECT_EQ(m.work_arena.bytes(), model_workspace_bytes(d, kPB));
    ++i;
  }
  EXPECT_LT(bytes[1], bytes[0]);
  EXPECT_LT(bytes[2], bytes[1]);
}

}  // namespace
}  // namespace moe

// ---- through the binary ------------------------------------------------------------------

namespace {

using namespace moe_test;

// The harness's tiny model (d_model 32, 2 heads, 2 layers: dense then MoE) with MLA.
const std::string kMla =
    " --set attention.kind=mla --set attention.q_lora_rank=24 --set attention.kv_lora_rank=16"
    " --set attention.qk_nope_head_dim=8 --set attention.qk_rope_head_dim=8"
    " --set attention.v_head_dim=12";

std::string mla_args(int micro_batch, const std::string& extra) {
  return "train --config c.toml --set training.micro_batch=" + std::to_string(micro_batch) +
         " --set training.steps=12 --set parallel.bucket_mb=0.0078125" + kMla + extra;
}

// It trains (the loss falls), and dp = 2 x ep = 2 is the single process's run: per-step
// losses and the final checkpoint (weights, both moments, router biases) within 1e-5.
TEST(MlaBinary, TrainsAndDataParallelMatchesOneProcess) {
  const fs::path one = make_run("mla_dp1");
  ASSERT_EQ(run(one, mla_args(2, "")), 0) << slurp(one / "err.txt");
  const std::vector<std::string> ref = losses(one / "metrics.jsonl");
  ASSERT_EQ(ref.size(), 12u);
  EXPECT_LT(std::stod(ref.back()), std::stod(ref.front()) - 0.5) << "the loss did not fall";
  moe::CheckpointReader ckpt((one / "ckpt" / "step-00000012.h5").string());
  bool saw = false;
  for (const auto& e : ckpt.list()) saw |= e.path.find("attn/wkv_b") != std::string::npos;
  EXPECT_TRUE(saw) << "no MLA tensor in the checkpoint";
  const fs::path d = make_run("mla_dp2_ep2");
  ASSERT_EQ(run(d, mla_args(2, " --set parallel.dp=2 --set parallel.ep=2"), 2), 0)
      << slurp(d / "err.txt");
  expect_close_losses(losses(d / "metrics.jsonl"), ref, 1e-5);
  expect_close_checkpoint(one / "ckpt" / "step-00000012.h5", d / "ckpt" / "step-00000012.h5", 1e-5);
}

// DualPipe over pp = 2 (4 layers, 8 micro-batches of one sequence per step) is the single
// process's run: losses and weights within 1e-5, the Adam moments within 1e-3 (as in
// Pipeline.EveryScheduleMatchesSingleProcess: DualPipe sums its two halves of the
// micro-batches apart).
TEST(MlaBinary, DualPipeMatchesOneProcess) {
  const std::string pp = " --set model.n_layers=4 --set checkpoint.every=0";
  const fs::path one = make_run("mla_pp1");
  ASSERT_EQ(run(one, mla_args(1, pp + " --set parallel.pp=1 --set parallel.schedule=1f1b")), 0)
      << slurp(one / "err.txt");
  const fs::path d = make_run("mla_pp2");
  ASSERT_EQ(run(d, mla_args(1, pp + " --set parallel.pp=2 --set parallel.schedule=dualpipe"), 2), 0)
      << slurp(d / "err.txt");
  const std::vector<std::string> ref = losses(one / "metrics.jsonl");
  ASSERT_EQ(ref.size(), 12u);
  expect_close_losses(losses(d / "metrics.jsonl"), ref, 1e-5);
  expect_close_checkpoint(one / "ckpt" / "step-00000012.h5", d / "ckpt" / "step-00000012.h5", 1e-5,
                          1e-3);
}

}  // namespace

namespace {

using namespace moe_test;

// FP8 GEMMs (and the FP8 dispatch wire) through DualPipe over pp = 2: step 1 is the single
// process's within the bounds of Pipeline.Fp8PairsEqualSequentialAndOneProcess (a step's
// gradients agree to FP32 summation order; later steps drift apart as a last-bit difference
// can flip an FP8 rounding).
TEST(MlaBinary, Fp8DualPipeMatchesOneProcessAtStepOne) {
  const std::string fp8 = " --set model.n_layers=4 --set checkpoint.every=0"
                          " --set precision.mode=fp8 --set precision.dispatch_fp8=true"
                          " --set training.steps=1";
  const fs::path one = make_run("mla_fp8_pp1");
  ASSERT_EQ(run(one, mla_args(1, fp8 + " --set parallel.pp=1 --set parallel.schedule=1f1b")), 0)
      << slurp(one / "err.txt");
  const fs::path d = make_run("mla_fp8_pp2");
  const std::string pp2 = " --set parallel.pp=2 --set parallel.schedule=dualpipe";
  ASSERT_EQ(run(d, mla_args(1, fp8 + pp2), 2), 0) << slurp(d / "err.txt");
  const std::vector<std::string> ref = losses(one / "metrics.jsonl");
  ASSERT_EQ(ref.size(), 1u);
  EXPECT_NE(slurp(one / "log.txt").find("fp8"), std::string::npos) << slurp(one / "log.txt");
  expect_close_losses(losses(d / "metrics.jsonl"), ref, 1e-5);
  expect_close_checkpoint(one / "ckpt" / "step-00000001.h5", d / "ckpt" / "step-00000001.h5", 2e-5,
                          1e-3);
}

}  // namespace
