// Tests for the dense CPU kernels (model/kernels/cpu/dense_ops.h):
//  - each float kernel against the naive double reference (tests/reference_ops.h) over
//    shapes that include odd ones, with one tolerance table;
//  - finite-difference gradient checks of every backward in double precision;
//  - the accumulation contract (weight grads +=, activation grads =, rmsnorm dinp +=);
//  - bitwise determinism across OpenMP thread counts where threads share a reduction.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "model/kernels/cpu/dense_ops.h"
#include "tests/reference_ops.h"

namespace {

namespace cpu = moe::cpu;
namespace ref = moe::ref;
using Vec = std::vector<double>;
using VecF = std::vector<float>;
using Tokens = std::vector<int32_t>;

// Float kernel vs double reference: |got - want| <= atol + rtol |want| elementwise.
struct Tol {
  double atol, rtol;
};
constexpr Tol kTolExact{0.0, 0.0};
constexpr Tol kTolMatmul{3e-5, 1e-5};
constexpr Tol kTolNorm{1e-6, 1e-5};
constexpr Tol kTolRope{1e-6, 1e-6};
constexpr Tol kTolAttention{1e-6, 1e-5};
constexpr Tol kTolAttentionGrad{1e-5, 1e-4};
constexpr Tol kTolSwiglu{1e-6, 1e-5};
constexpr Tol kTolLoss{1e-6, 1e-5};
// Double kernel vs central differences: max |fd - grad| / max |grad|.
constexpr double kFdStep = 1e-6;
constexpr double kFdTol = 1e-6;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

Vec random_vec(size_t n, uint64_t seed, double lo = -1.0, double hi = 1.0) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  Vec v(n);
  for (double& x : v) x = dist(rng);
  return v;
}

// Values exactly representable in float, so the reference sees the kernel's inputs.
Vec random_floats(size_t n, uint64_t seed, double lo = -1.0, double hi = 1.0) {
  Vec v = random_vec(n, seed, lo, hi);
  for (double& x : v) x = static_cast<float>(x);
  return v;
}

Tokens random_tokens(size_t n, int32_t V, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> dist(0, V - 1);
  Tokens t(n);
  for (int32_t& x : t) x = dist(rng);
  return t;
}

VecF to_float(const Vec& v) { return VecF(v.begin(), v.end()); }

template <typename T>
bool any_nonzero(const std::vector<T>& v) {
  for (T x : v)
    if (x != T(0)) return true;
  return false;
}

double dot(const Vec& a, const Vec& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

::testing::AssertionResult all_near(const VecF& got, const Vec& want, Tol tol) {
  if (got.size() != want.size()) return ::testing::AssertionFailure() << "size mismatch";
  if (!any_nonzero(want)) return ::testing::AssertionFailure() << "reference is all zero";
  size_t worst = 0;
  double worst_excess = -1.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - want[i]);
    const double excess = err - (tol.atol + tol.rtol * std::fabs(want[i]));
    if (!(excess <= 0.0) && (excess > worst_excess || std::isnan(excess))) {
      worst = i;
      worst_excess = std::isnan(excess) ? INFINITY : excess;
    }
  }
  if (worst_excess < 0.0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "at " << worst << ": got " << got[worst] << " want " << want[worst] << " (atol "
         << tol.atol << ", rtol " << tol.rtol << ")";
}

// Central differences of loss() with respect to every x[i].
Vec finite_diff(Vec& x, const std::function<double()>& loss) {
  Vec fd(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + kFdStep;
    const double lp = loss();
    x[i] = x0 - kFdStep;
    const double lm = loss();
    x[i] = x0;
    fd[i] = (lp - lm) / (2.0 * kFdStep);
  }
  return fd;
}

// max |fd - grad| / max |grad| over the indices where keep(i); fails on an all-zero gradient.
double fd_rel_error(
    const Vec& fd, const Vec& grad,
    const std::function<bool(size_t)>& keep = [](size_t) { return true; }) {
  double err = 0.0, mag = 0.0;
  for (size_t i = 0; i < fd.size(); ++i) {
    if (!keep(i)) continue;
    err = std::max(err, std::fabs(fd[i] - grad[i]));
    mag = std::max(mag, std::fabs(grad[i]));
  }
  EXPECT_GT(mag, 0.0) << "gradient is all zero";
  return mag > 0.0 ? err / mag : INFINITY;
}

// Runs f with n OpenMP threads, restoring the previous setting.
template <typename F>
void with_threads(int n, F&& f) {
  const int prev = omp_get_max_threads();
  omp_set_num_threads(n);
  f();
  omp_set_num_threads(prev);
}

// ---------------------------------------------------------------------------------------
// exp_fast and gemm

TEST(ExpFast, MatchesStdExp) {
  double worst = 0.0;
  for (double x = -87.0; x <= 88.0; x += 0.00137) {
    const float xf = static_cast<float>(x);
    const double want = std::exp(static_cast<double>(xf));
    worst = std::max(worst, std::fabs(cpu::exp_fast(xf) - want) / want);
  }
  EXPECT_LT(worst, 3e-7);
  EXPECT_EQ(cpu::exp_fast(0.0f), 1.0f);
  EXPECT_TRUE(std::isnan(cpu::exp_fast(kNaN)));
  EXPECT_LT(cpu::exp_fast(-INFINITY), 1e-37f);
  EXPECT_GE(cpu::exp_fast(-INFINITY), 0.0f);
  EXPECT_TRUE(std::isfinite(cpu::exp_fast(INFINITY)));
}

TEST(Gemm, AllTransposesWithLeadingDims) {
  const int64_t M = 13, N = 9, K = 11, pad = 3;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      SCOPED_TRACE("trans_a=" + std::to_string(ta) + " trans_b=" + std::to_string(tb));
      const int64_t lda = (ta ? M : K) + pad, ldb = (tb ? K : N) + pad, ldc = N + pad;
      const Vec A = random_floats((ta ? K : M) * lda, 1);
      const Vec B = random_floats((tb ? N : K) * ldb, 2);
      Vec C = random_floats(M * ldc, 3);
      VecF Cf = to_float(C);
      cpu::gemm<float>(ta, tb, M, N, K, 0.5f, to_float(A).data(), lda, to_float(B).data(), ldb,
                       -1.5f, Cf.data(), ldc);
      ref::gemm(ta, tb, M, N, K, 0.5, A.data(), lda, B.data(), ldb, -1.5, C.data(), ldc);
      EXPECT_TRUE(all_near(Cf, C, kTolMatmul));
    }
}

TEST(Gemm, EmptyInnerDimensionScalesC) {
  VecF C = {1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f};
  cpu::gemm<float>(false, false, 2, 3, 0, 1.0f, nullptr, 1, nullptr, 3, 2.0f, C.data(), 3);
  EXPECT_EQ(C, (VecF{2.0f, 4.0f, 6.0f, 8.0f, 10.0f, 12.0f}));
  VecF D(6, kNaN);  // beta = 0 never reads C
  cpu::gemm<float>(false, false, 2, 3, 0, 1.0f, nullptr, 1, nullptr, 3, 0.0f, D.data(), 3);
  EXPECT_EQ(D, VecF(6, 0.0f));
}

// A row of gemm_rows_invariant's output is the same bits whatever rows share the call: every
// prefix (M = 1 .. 300) at three offsets against one 300-row call, forward (op(B) = B^T) and
// input-gradient (op(B) = B) orientations, beta 0 and 1, over the routed experts' shapes of
// the tiny and bench configs and small odd ones (where OpenBLAS's small-matrix kernels take
// over below some M, and plain cpu::gemm fails this). And it is a GEMM: the 300-row result
// against the double reference.
TEST(Gemm, RowsInvariantGivesEachRowItsOwnBits) {
  const int64_t MM = 300, kOffsets[] = {0, 1, 7};
  const std::pair<int64_t, int64_t> shapes[] = {{128, 256}, {128, 128}, {256, 128}, {512, 1024},
                                                {64, 96},   {32, 16},   {24, 40}};
  for (const auto& [K, N] : shapes)
    for (int tb = 0; tb < 2; ++tb)
      for (const float beta : {0.0f, 1.0f}) {
        SCOPED_TRACE("K=" + std::to_string(K) + " N=" + std::to_string(N) +
                     " trans_b=" + std::to_string(tb) + " beta=" + std::to_string(beta));
        const Vec A = random_floats((MM + 7) * K, 31), B = random_floats(N * K, 32);
        const Vec C0 = random_floats((MM + 7) * N, 33);
        const VecF Af = to_float(A), Bf = to_float(B);
        const int64_t ldb = tb ? K : N;
        VecF pad(static_cast<size_t>(cpu::gemm_rows_invariant_pad_count(K, N)), kNaN);
        VecF whole = to_float(C0);
        cpu::gemm_rows_invariant<float>(tb, MM, N, K, Af.data(), K, Bf.data(), ldb, beta,
                                        whole.data(), N, pad.data(),
                                        static_cast<int64_t>(pad.size()));
        Vec want = C0;
        ref::gemm(false, tb, MM, N, K, 1.0, A.data(), K, B.data(), ldb, beta, want.data(), N);
        want.resize(static_cast<size_t>(MM * N));
        EXPECT_TRUE(all_near(VecF(whole.begin(), whole.begin() + MM * N), want, kTolMatmul));
        int64_t mismatched_calls = 0;
        for (const int64_t o : kOffsets) {
          const VecF Ao(Af.begin() + o * K, Af.end());
          // Every row of [o, MM) in one call, then each prefix of it alone.
          VecF tail(C0.begin() + o * N, C0.begin() + MM * N);
          cpu::gemm_rows_invariant<float>(tb, MM - o, N, K, Ao.data(), K, Bf.data(), ldb, beta,
                                          tail.data(), N, pad.data(),
                                          static_cast<int64_t>(pad.size()));
          for (int64_t M = 1; M + o <= MM; M += M < 40 ? 1 : 23) {
            VecF got(C0.begin() + o * N, C0.begin() + (o + M) * N);
            cpu::gemm_rows_invariant<float>(tb, M, N, K, Ao.data(), K, Bf.data(), ldb, beta,
                                            got.data(), N, pad.data(),
                                            static_cast<int64_t>(pad.size()));
            if (std::memcmp(got.data(), tail.data(), got.size() * sizeof(float)) != 0)
              ++mismatched_calls;
          }
          // Offset 0: the rows inside the very first call too.
          if (o == 0) {
            VecF first(C0.begin(), C0.begin() + 5 * N);
            cpu::gemm_rows_invariant<float>(tb, 5, N, K, Af.data(), K, Bf.data(), ldb, beta,
                                            first.data(), N, pad.data(),
                                            static_cast<int64_t>(pad.size()));
            EXPECT_EQ(std::memcmp(first.data(), whole.data(), first.size() * sizeof(float)), 0);
          }
        }
        EXPECT_EQ(mismatched_calls, 0);
      }
}

// ---------------------------------------------------------------------------------------
// Float kernels against the double reference, parameterized over shapes.

struct MatmulShape {
  int64_t N, IC, OC;
};
std::ostream& operator<<(std::ostream& os, const MatmulShape& s) {
  return os << "N=" << s.N << " IC=" << s.IC << " OC=" << s.OC;
}
class MatmulTest : public ::testing::TestWithParam<MatmulShape> {};

TEST_P(MatmulTest, MatchesReference) {
  const auto [N, IC, OC] = GetParam();
  const Vec inp = random_floats(N * IC, 11), w = random_floats(OC * IC, 12);
  const Vec dout = random_floats(N * OC, 13), dw0 = random_floats(OC * IC, 14);
  ASSERT_TRUE(any_nonzero(inp) && any_nonzero(w) && any_nonzero(dout));
  Vec out(N * OC), dinp(N * IC), dw = dw0;
  ref::matmul_forward(out.data(), inp.data(), w.data(), N, IC, OC);
  ref::matmul_backward(dinp.data(), dw.data(), dout.data(), inp.data(), w.data(), N, IC, OC);

  VecF outf(N * OC, kNaN), dinpf(N * IC, kNaN), dwf = to_float(dw0);
  cpu::matmul_forward(outf.data(), to_float(inp).data(), to_float(w).data(), N, IC, OC);
  cpu::matmul_backward_input(dinpf.data(), to_float(dout).data(), to_float(w).data(), N, IC, OC);
  cpu::matmul_backward_weight(dwf.data(), to_float(dout).data(), to_float(inp).data(), N, IC, OC);
  EXPECT_TRUE(all_near(outf, out, kTolMatmul));
  EXPECT_TRUE(all_near(dinpf, dinp, kTolMatmul));
  EXPECT_TRUE(all_near(dwf, dw, kTolMatmul));
}

INSTANTIATE_TEST_SUITE_P(Shapes, MatmulTest,
                         ::testing::Values(MatmulShape{1, 1, 1}, MatmulShape{71, 229, 37},
                                           MatmulShape{64, 128, 256}, MatmulShape{5, 600, 3}));

struct RowShape {
  int64_t N, C;
};
std::ostream& operator<<(std::ostream& os, const RowShape& s) {
  return os << "N=" << s.N << " C=" << s.C;
}
class EmbeddingTest : public ::testing::TestWithParam<RowShape> {};

TEST_P(EmbeddingTest, MatchesReference) {
  const auto [N, C] = GetParam();
  const int32_t V = 257;
  const Vec wte = random_floats(V * C, 21), dout = random_floats(N * C, 22);
  // Few distinct tokens so rows repeat and dwte rows sum several tokens.
  Tokens tokens = random_tokens(N, 13, 23);
  tokens[0] = V - 1;
  const Vec dwte0 = random_floats(V * C, 24);
  Vec out(N * C), dwte = dwte0;
  ref::embedding_forward(out.data(), tokens.data(), wte.data(), N, C);
  ref::embedding_backward(dwte.data(), dout.data(), tokens.data(), N, C);

  VecF outf(N * C, kNaN), dwtef = to_float(dwte0);
  cpu::embedding_forward(outf.data(), tokens.data(), to_float(wte).data(), N, C);
  cpu::embedding_backward(dwtef.data(), to_float(dout).data(), tokens.data(), N, C);
  EXPECT_TRUE(all_near(outf, out, kTolExact));
  EXPECT_TRUE(all_near(dwtef, dwte, kTolNorm));
}

INSTANTIATE_TEST_SUITE_P(Shapes, EmbeddingTest,
                         ::testing::Values(RowShape{1, 1}, RowShape{71, 229}, RowShape{300, 64},
                                           RowShape{8, 1000}));

class RmsnormTest : public ::testing::TestWithParam<RowShape> {};

TEST_P(RmsnormTest, MatchesReference) {
  const auto [N, C] = GetParam();
  const double eps = 1e-5;
  const Vec inp = random_floats(N * C, 31, -2.0, 2.0), w = random_floats(C, 32, 0.5, 1.5);
  const Vec dout = random_floats(N * C, 33), dinp0 = random_floats(N * C, 34);
  const Vec dw0 = random_floats(C, 35);
  Vec out(N * C), rstd(N), dinp = dinp0, dw = dw0;
  ref::rmsnorm_forward(out.data(), rstd.data(), inp.data(), w.data(), N, C, eps);
  ref::rmsnorm_backward(dinp.data(), dw.data(), dout.data(), inp.data(), w.data(), N, C, eps);

  VecF outf(N * C, kNaN), rstdf(N, kNaN), dinpf = to_float(dinp0), dwf = to_float(dw0);
  const VecF inpf = to_float(inp), wf = to_float(w), doutf = to_float(dout);
  cpu::rmsnorm_forward(outf.data(), rstdf.data(), inpf.data(), wf.data(), N, C, 1e-5f);
  cpu::rmsnorm_backward_input(dinpf.data(), doutf.data(), inpf.data(), wf.data(), rstdf.data(), N,
                              C);
  cpu::rmsnorm_backward_weight(dwf.data(), doutf.data(), inpf.data(), rstdf.data(), N, C);
  EXPECT_TRUE(all_near(outf, out, kTolNorm));
  EXPECT_TRUE(all_near(rstdf, rstd, kTolNorm));
  EXPECT_TRUE(all_near(dinpf, dinp, kTolNorm));
  EXPECT_TRUE(all_near(dwf, dw, kTolNorm));
}

INSTANTIATE_TEST_SUITE_P(Shapes, RmsnormTest,
                         ::testing::Values(RowShape{1, 1}, RowShape{71, 229}, RowShape{8, 1024},
                                           RowShape{200, 96}));

struct RopeShape {
  int64_t B, T, H, HD, pad;  // token stride = H * HD + pad
};
std::ostream& operator<<(std::ostream& os, const RopeShape& s) {
  return os << "B=" << s.B << " T=" << s.T << " H=" << s.H << " HD=" << s.HD << " pad=" << s.pad;
}
class RopeTest : public ::testing::TestWithParam<RopeShape> {};

TEST_P(RopeTest, MatchesReference) {
  const auto [B, T, H, HD, pad] = GetParam();
  const double theta = 10000.0;
  const int64_t stride = H * HD + pad;
  VecF cosf(T * HD / 2), sinf(T * HD / 2);
  cpu::rope_tables(cosf.data(), sinf.data(), T, HD, theta);
  const Vec x0 = random_floats(B * T * stride, 41);
  for (const double sign : {1.0, -1.0}) {
    SCOPED_TRACE(sign > 0 ? "forward" : "backward");
    Vec x = x0;
    ref::rope_apply(x.data(), B, T, H, HD, stride, theta, sign);
    VecF xf = to_float(x0);
    if (sign > 0)
      cpu::rope_forward(xf.data(), cosf.data(), sinf.data(), B, T, H, HD, stride);
    else
      cpu::rope_backward(xf.data(), cosf.data(), sinf.data(), B, T, H, HD, stride);
    EXPECT_TRUE(all_near(xf, x, kTolRope));
    // The pad columns between tokens are not touched.
    for (int64_t bt = 0; bt < B * T; ++bt)
      for (int64_t c = H * HD; c < stride; ++c)
        ASSERT_EQ(xf[bt * stride + c], static_cast<float>(x0[bt * stride + c]));
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, RopeTest,
                         ::testing::Values(RopeShape{1, 1, 1, 2, 0}, RopeShape{2, 37, 3, 10, 7},
                                           RopeShape{2, 70, 4, 16, 0},
                                           RopeShape{1, 300, 2, 64, 5}));

struct AttnShape {
  int64_t B, T, NH, NKV, HD;
};
std::ostream& operator<<(std::ostream& os, const AttnShape& s) {
  return os << "B=" << s.B << " T=" << s.T << " NH=" << s.NH << " NKV=" << s.NKV << " HD=" << s.HD;
}
class AttentionTest : public ::testing::TestWithParam<AttnShape> {};

TEST_P(AttentionTest, MatchesReference) {
  const auto [B, T, NH, NKV, HD] = GetParam();
  const int64_t W = (NH + 2 * NKV) * HD;
  const Vec qkv = random_floats(B * T * W, 51, -2.0, 2.0);
  const Vec dout = random_floats(B * T * NH * HD, 52);
  Vec out(B * T * NH * HD), probs(B * NH * T * T), lse(B * NH * T), dqkv(B * T * W);
  ref::attention_forward(out.data(), probs.data(), qkv.data(), B, T, NH, NKV, HD);
  ref::attention_lse(lse.data(), qkv.data(), B, T, NH, NKV, HD);
  ref::attention_backward(dqkv.data(), dout.data(), qkv.data(), B, T, NH, NKV, HD);

  // NaN in every output and in the scratch: nothing may be read before it is written.
  VecF outf(out.size(), kNaN), lsef(lse.size(), kNaN), dqkvf(dqkv.size(), kNaN);
  VecF scratch(static_cast<size_t>(cpu::attention_scratch_elems(B, T, NH, NKV, HD, HD)), kNaN);
  const VecF qkvf = to_float(qkv);
  cpu::attention_forward(outf.data(), lsef.data(), qkvf.data(), B, T, NH, NKV, HD, HD,
                         scratch.data());
  std::fill(scratch.begin(), scratch.end(), kNaN);
  cpu::attention_backward(dqkvf.data(), to_float(dout).data(), qkvf.data(), lsef.data(), B, T, NH,
                          NKV, HD, HD, scratch.data());
  EXPECT_TRUE(all_near(outf, out, kTolAttention));
  EXPECT_TRUE(all_near(lsef, lse, kTolAttention));
  EXPECT_TRUE(all_near(dqkvf, dqkv, kTolAttentionGrad));
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionTest,
                         ::testing::Values(AttnShape{1, 1, 2, 1, 4}, AttnShape{2, 37, 6, 2, 10},
                                           AttnShape{2, 70, 4, 4, 8}, AttnShape{1, 130, 6, 3, 8},
                                           AttnShape{3, 64, 2, 1, 16}));

class SwigluTest : public ::testing::TestWithParam<RowShape> {};

TEST_P(SwigluTest, MatchesReference) {
  const auto [N, F] = GetParam();
  Vec gu = random_floats(N * 2 * F, 61, -4.0, 4.0);
  gu[0] = -100.0;  // saturated gates
  if (F > 1) gu[1] = 100.0;
  const Vec dout = random_floats(N * F, 62);
  Vec out(N * F), dgu(N * 2 * F);
  ref::swiglu_forward(out.data(), gu.data(), N, F);
  ref::swiglu_backward(dgu.data(), dout.data(), gu.data(), N, F);
  VecF outf(out.size(), kNaN), dguf(dgu.size(), kNaN);
  const VecF guf = to_float(gu);
  cpu::swiglu_forward(outf.data(), guf.data(), N, F);
  cpu::swiglu_backward(dguf.data(), to_float(dout).data(), guf.data(), N, F);
  EXPECT_TRUE(all_near(outf, out, kTolSwiglu));
  EXPECT_TRUE(all_near(dguf, dgu, kTolSwiglu));
}

INSTANTIATE_TEST_SUITE_P(Shapes, SwigluTest,
                         ::testing::Values(RowShape{1, 1}, RowShape{71, 229}, RowShape{16, 512}));

class CrossEntropyTest : public ::testing::TestWithParam<RowShape> {};

TEST_P(CrossEntropyTest, MatchesReference) {
  const auto [N, V] = GetParam();
  const Vec logits = random_floats(N * V, 71, -8.0, 8.0);
  Tokens targets = random_tokens(N, static_cast<int32_t>(V), 72);
  if (N > 2) targets[1] = -1;  // ignored token
  const float dloss = 0.37f;
  Vec losses(N), probs(N * V), dlogits(N * V);
  ref::cross_entropy_forward(losses.data(), probs.data(), logits.data(), targets.data(), N, V);
  ref::cross_entropy_backward(dlogits.data(), probs.data(), targets.data(), dloss, N, V);
  VecF lossesf(N, kNaN), probsf(N * V, kNaN), dlogitsf(N * V, kNaN);
  cpu::cross_entropy_forward(lossesf.data(), probsf.data(), to_float(logits).data(), targets.data(),
                             N, V);
  cpu::cross_entropy_backward(dlogitsf.data(), probsf.data(), targets.data(), dloss, N, V);
  EXPECT_TRUE(all_near(probsf, probs, kTolLoss));
  if (V > 1) {  // with V = 1 the loss and its gradient are exactly zero
    EXPECT_TRUE(all_near(lossesf, losses, kTolLoss));
    EXPECT_TRUE(all_near(dlogitsf, dlogits, kTolLoss));
  }
  if (N > 2) {
    EXPECT_EQ(lossesf[1], 0.0f);
    for (int64_t v = 0; v < V; ++v) ASSERT_EQ(dlogitsf[V + v], 0.0f);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CrossEntropyTest,
                         ::testing::Values(RowShape{1, 1}, RowShape{71, 257}, RowShape{4, 32000}));

TEST(Residual, AddsAndMayAlias) {
  const Vec a = random_floats(1 << 15, 81), b = random_floats(1 << 15, 82);
  Vec want(a.size());
  ref::residual_forward(want.data(), a.data(), b.data(), static_cast<int64_t>(a.size()));
  VecF out = to_float(a);
  cpu::residual_forward(out.data(), out.data(), to_float(b).data(), static_cast<int64_t>(a.size()));
  EXPECT_TRUE(all_near(out, want, kTolNorm));
}

// ---------------------------------------------------------------------------------------
// Gradient checks: double kernels against central differences of L = sum(out * R).

TEST(GradCheck, Matmul) {
  const int64_t N = 5, IC = 7, OC = 6;
  Vec inp = random_vec(N * IC, 101), w = random_vec(OC * IC, 102);
  const Vec R = random_vec(N * OC, 103);
  Vec out(N * OC), dinp(N * IC), dw(OC * IC, 0.0);
  auto loss = [&] {
    cpu::matmul_forward(out.data(), inp.data(), w.data(), N, IC, OC);
    return dot(out, R);
  };
  cpu::matmul_backward_input(dinp.data(), R.data(), w.data(), N, IC, OC);
  cpu::matmul_backward_weight(dw.data(), R.data(), inp.data(), N, IC, OC);
  EXPECT_LT(fd_rel_error(finite_diff(inp, loss), dinp), kFdTol);
  EXPECT_LT(fd_rel_error(finite_diff(w, loss), dw), kFdTol);
}

TEST(GradCheck, Embedding) {
  const int64_t N = 9, C = 5, V = 7;
  Vec wte = random_vec(V * C, 111);
  Tokens tokens = random_tokens(N, 5, 112);  // tokens 5, 6 unused: zero gradient rows
  const Vec R = random_vec(N * C, 113);
  Vec out(N * C), dwte(V * C, 0.0);
  auto loss = [&] {
    cpu::embedding_forward(out.data(), tokens.data(), wte.data(), N, C);
    return dot(out, R);
  };
  cpu::embedding_backward(dwte.data(), R.data(), tokens.data(), N, C);
  EXPECT_LT(fd_rel_error(finite_diff(wte, loss), dwte), kFdTol);
}

TEST(GradCheck, Rmsnorm) {
  const int64_t N = 4, C = 11;
  Vec inp = random_vec(N * C, 121, -2.0, 2.0), w = random_vec(C, 122, 0.5, 1.5);
  const Vec R = random_vec(N * C, 123);
  Vec out(N * C), rstd(N), dinp(N * C, 0.0), dw(C, 0.0);
  auto loss = [&] {
    cpu::rmsnorm_forward(out.data(), rstd.data(), inp.data(), w.data(), N, C, 1e-5);
    return dot(out, R);
  };
  loss();
  cpu::rmsnorm_backward_input(dinp.data(), R.data(), inp.data(), w.data(), rstd.data(), N, C);
  cpu::rmsnorm_backward_weight(dw.data(), R.data(), inp.data(), rstd.data(), N, C);
  EXPECT_LT(fd_rel_error(finite_diff(inp, loss), dinp), kFdTol);
  EXPECT_LT(fd_rel_error(finite_diff(w, loss), dw), kFdTol);
}

TEST(GradCheck, Rope) {
  const int64_t B = 2, T = 5, H = 3, HD = 6, stride = H * HD + 2;
  Vec cos_t(T * HD / 2), sin_t(T * HD / 2);
  cpu::rope_tables(cos_t.data(), sin_t.data(), T, HD, 500.0);
  Vec x = random_vec(B * T * stride, 131);
  const Vec R = random_vec(B * T * stride, 132);
  Vec y;
  auto loss = [&] {
    y = x;
    cpu::rope_forward(y.data(), cos_t.data(), sin_t.data(), B, T, H, HD, stride);
    return dot(y, R);
  };
  Vec dx = R;
  cpu::rope_backward(dx.data(), cos_t.data(), sin_t.data(), B, T, H, HD, stride);
  EXPECT_LT(fd_rel_error(finite_diff(x, loss), dx), kFdTol);
}

void attention_grad_check(int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HD) {
  const int64_t W = (NH + 2 * NKV) * HD;
  Vec qkv = random_vec(B * T * W, 141, -2.0, 2.0);
  const Vec R = random_vec(B * T * NH * HD, 142);
  Vec out(B * T * NH * HD), lse(B * NH * T), dqkv(B * T * W);
  Vec scratch(static_cast<size_t>(cpu::attention_scratch_elems(B, T, NH, NKV, HD, HD)));
  auto loss = [&] {
    cpu::attention_forward(out.data(), lse.data(), qkv.data(), B, T, NH, NKV, HD, HD,
                           scratch.data());
    return dot(out, R);
  };
  loss();
  cpu::attention_backward(dqkv.data(), R.data(), qkv.data(), lse.data(), B, T, NH, NKV, HD, HD,
                          scratch.data());
  const Vec fd = finite_diff(qkv, loss);
  // Checked per part, so a wrong dK cannot hide behind a large dQ.
  auto part = [&](int64_t lo, int64_t hi) {
    return [=](size_t i) {
      const int64_t c = static_cast<int64_t>(i) % W;
      return c >= lo * HD && c < hi * HD;
    };
  };
  EXPECT_LT(fd_rel_error(fd, dqkv, part(0, NH)), kFdTol) << "dq";
  EXPECT_LT(fd_rel_error(fd, dqkv, part(NH, NH + NKV)), kFdTol) << "dk";
  EXPECT_LT(fd_rel_error(fd, dqkv, part(NH + NKV, NH + 2 * NKV)), kFdTol) << "dv";
}

TEST(GradCheck, AttentionMHA) { attention_grad_check(2, 6, 2, 2, 3); }
TEST(GradCheck, AttentionGQA) { attention_grad_check(2, 7, 4, 2, 4); }
// T = 70 spans three of the kernel's 32-row blocks (the last one partial).
TEST(GradCheck, AttentionGQAMultiBlock) { attention_grad_check(1, 70, 3, 1, 2); }

TEST(GradCheck, Swiglu) {
  const int64_t N = 3, F = 7;
  Vec gu = random_vec(N * 2 * F, 151, -4.0, 4.0);
  const Vec R = random_vec(N * F, 152);
  Vec out(N * F), dgu(N * 2 * F);
  auto loss = [&] {
    cpu::swiglu_forward(out.data(), gu.data(), N, F);
    return dot(out, R);
  };
  cpu::swiglu_backward(dgu.data(), R.data(), gu.data(), N, F);
  EXPECT_LT(fd_rel_error(finite_diff(gu, loss), dgu), kFdTol);
}

TEST(GradCheck, CrossEntropy) {
  const int64_t N = 5, V = 9;
  const double dloss = 0.37;
  Vec logits = random_vec(N * V, 161, -3.0, 3.0);
  Tokens targets = random_tokens(N, V, 162);
  targets[2] = -1;
  Vec losses(N), probs(N * V), dlogits(N * V);
  auto loss = [&] {
    cpu::cross_entropy_forward(losses.data(), probs.data(), logits.data(), targets.data(), N, V);
    double s = 0.0;
    for (double l : losses) s += l;
    return dloss * s;
  };
  loss();
  cpu::cross_entropy_backward(dlogits.data(), probs.data(), targets.data(), dloss, N, V);
  EXPECT_LT(fd_rel_error(finite_diff(logits, loss), dlogits), kFdTol);
}

// ---------------------------------------------------------------------------------------
// Accumulation contract.

TEST(Accumulation, WeightGradientsAccumulate) {
  const int64_t N = 33, C = 70, V = 19;
  const VecF x = to_float(random_vec(N * C, 171)), g = to_float(random_vec(N * C, 172));
  const VecF rstd = to_float(random_vec(N, 173, 0.5, 2.0));
  const Tokens tokens = random_tokens(N, V, 174);
  VecF dw(C * C, 0.0f), dwte(V * C, 0.0f), dnorm(C, 0.0f);
  auto step = [&] {
    cpu::matmul_backward_weight(dw.data(), g.data(), x.data(), N, C, C);
    cpu::embedding_backward(dwte.data(), g.data(), tokens.data(), N, C);
    cpu::rmsnorm_backward_weight(dnorm.data(), g.data(), x.data(), rstd.data(), N, C);
  };
  step();
  const VecF dw1 = dw, dwte1 = dwte, dnorm1 = dnorm;
  ASSERT_TRUE(any_nonzero(dw1) && any_nonzero(dwte1) && any_nonzero(dnorm1));
  step();
  auto twice = [](const VecF& v) {
    Vec r(v.begin(), v.end());
    for (double& e : r) e *= 2.0;
    return r;
  };
  EXPECT_TRUE(all_near(dw, twice(dw1), kTolNorm));
  EXPECT_TRUE(all_near(dwte, twice(dwte1), kTolNorm));
  EXPECT_TRUE(all_near(dnorm, twice(dnorm1), kTolNorm));
}

// k micro-batches accumulated equal one batch k times larger.
TEST(Accumulation, MicroBatchesEqualOneBatch) {
  const int64_t N = 40, C = 24, V = 11, half = N / 2;
  const VecF x = to_float(random_vec(N * C, 181)), g = to_float(random_vec(N * C, 182));
  const VecF rstd = to_float(random_vec(N, 183, 0.5, 2.0));
  const Tokens tokens = random_tokens(N, V, 184);
  VecF dw_whole(C * C, 0.0f), dwte_whole(V * C, 0.0f), dnorm_whole(C, 0.0f);
  cpu::matmul_backward_weight(dw_whole.data(), g.data(), x.data(), N, C, C);
  cpu::embedding_backward(dwte_whole.data(), g.data(), tokens.data(), N, C);
  cpu::rmsnorm_backward_weight(dnorm_whole.data(), g.data(), x.data(), rstd.data(), N, C);
  VecF dw(C * C, 0.0f), dwte(V * C, 0.0f), dnorm(C, 0.0f);
  for (int64_t m = 0; m < 2; ++m) {
    const int64_t off = m * half;
    cpu::matmul_backward_weight(dw.data(), g.data() + off * C, x.data() + off * C, half, C, C);
    cpu::embedding_backward(dwte.data(), g.data() + off * C, tokens.data() + off, half, C);
    cpu::rmsnorm_backward_weight(dnorm.data(), g.data() + off * C, x.data() + off * C,
                                 rstd.data() + off, half, C);
  }
  EXPECT_TRUE(all_near(dw, Vec(dw_whole.begin(), dw_whole.end()), kTolNorm));
  EXPECT_TRUE(all_near(dwte, Vec(dwte_whole.begin(), dwte_whole.end()), kTolNorm));
  EXPECT_TRUE(all_near(dnorm, Vec(dnorm_whole.begin(), dnorm_whole.end()), kTolNorm));
}

TEST(Accumulation, RmsnormBackwardInputAddsToResidualGradient) {
  const int64_t N = 7, C = 33;
  const VecF x = to_float(random_vec(N * C, 191)), g = to_float(random_vec(N * C, 192));
  const VecF w = to_float(random_vec(C, 193)), prior = to_float(random_vec(N * C, 194));
  VecF out(N * C), rstd(N), fresh(N * C, 0.0f), dinp = prior;
  cpu::rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, C, 1e-5f);
  cpu::rmsnorm_backward_input(fresh.data(), g.data(), x.data(), w.data(), rstd.data(), N, C);
  cpu::rmsnorm_backward_input(dinp.data(), g.data(), x.data(), w.data(), rstd.data(), N, C);
  Vec want(N * C);
  for (int64_t i = 0; i < N * C; ++i) want[i] = static_cast<double>(prior[i]) + fresh[i];
  EXPECT_TRUE(all_near(dinp, want, kTolNorm));
}

// Activation gradients (and forward outputs) are assigned: NaN garbage in the destination
// must not survive or leak into the result.
TEST(Accumulation, ActivationGradientsAreAssigned) {
  const int64_t N = 12, C = 10, F = 6, V = 13;
  const int64_t B = 2, T = 9, NH = 4, NKV = 2, HD = 4, W = (NH + 2 * NKV) * HD;
  const VecF x = to_float(random_vec(N * 2 * F, 201)), g = to_float(random_vec(N * C, 202));
  const VecF w = to_float(random_vec(C * C, 203));
  const VecF qkv = to_float(random_vec(B * T * W, 204)),
             dout = to_float(random_vec(B * T * NH * HD, 205));
  const Tokens targets = random_tokens(N, V, 206);
  auto all_finite = [](const VecF& v) {
    for (float e : v)
      if (!std::isfinite(e)) return false;
    return any_nonzero(v);
  };
  VecF dinp(N * C, kNaN);
  cpu::matmul_backward_input(dinp.data(), g.data(), w.data(), N, C, C);
  EXPECT_TRUE(all_finite(dinp)) << "matmul_backward_input";
  VecF out(N * F, kNaN), dgu(N * 2 * F, kNaN);
  cpu::swiglu_forward(out.data(), x.data(), N, F);
  cpu::swiglu_backward(dgu.data(), g.data(), x.data(), N, F);
  EXPECT_TRUE(all_finite(out) && all_finite(dgu)) << "swiglu";
  VecF losses(N, kNaN), probs(N * V, kNaN), dlogits(N * V, kNaN);
  const VecF logits = to_float(random_vec(N * V, 207, -4.0, 4.0));
  cpu::cross_entropy_forward(losses.data(), probs.data(), logits.data(), targets.data(), N, V);
  cpu::cross_entropy_backward(dlogits.data(), probs.data(), targets.data(), 1.0f, N, V);
  EXPECT_TRUE(all_finite(losses) && all_finite(probs) && all_finite(dlogits)) << "cross_entropy";
  VecF aout(B * T * NH * HD, kNaN), alse(B * NH * T, kNaN), dqkv(B * T * W, kNaN);
  VecF scratch(static_cast<size_t>(cpu::attention_scratch_elems(B, T, NH, NKV, HD, HD)), kNaN);
  cpu::attention_forward(aout.data(), alse.data(), qkv.data(), B, T, NH, NKV, HD, HD,
                         scratch.data());
  cpu::attention_backward(dqkv.data(), dout.data(), qkv.data(), alse.data(), B, T, NH, NKV, HD, HD,
                          scratch.data());
  EXPECT_TRUE(all_finite(aout) && all_finite(alse) && all_finite(dqkv)) << "attention";
}

// ---------------------------------------------------------------------------------------
// Determinism: bitwise identical results for 1, 2 and 3 threads.

template <typename F>
void expect_same_bits_across_threads(F&& run) {
  VecF base;
  with_threads(1, [&] { base = run(); });
  ASSERT_TRUE(any_nonzero(base));
  for (int n : {2, 3}) {
    VecF got;
    with_threads(n, [&] { got = run(); });
    ASSERT_EQ(got.size(), base.size());
    EXPECT_EQ(std::memcmp(got.data(), base.data(), base.size() * sizeof(float)), 0)
        << n << " threads";
  }
}

TEST(Determinism, AttentionAcrossThreadCounts) {
  const int64_t B = 2, T = 130, NH = 6, NKV = 2, HD = 16, W = (NH + 2 * NKV) * HD;
  const VecF qkv = to_float(random_vec(B * T * W, 211, -2.0, 2.0));
  const VecF dout = to_float(random_vec(B * T * NH * HD, 212));
  expect_same_bits_across_threads([&] {
    VecF out(B * T * NH * HD), lse(B * NH * T), dqkv(B * T * W);
    VecF scratch(static_cast<size_t>(cpu::attention_scratch_elems(B, T, NH, NKV, HD, HD)));
    cpu::attention_forward(out.data(), lse.data(), qkv.data(), B, T, NH, NKV, HD, HD,
                           scratch.data());
    cpu::attention_backward(dqkv.data(), dout.data(), qkv.data(), lse.data(), B, T, NH, NKV, HD,
                            HD, scratch.data());
    VecF all = out;
    all.insert(all.end(), lse.begin(), lse.end());
    all.insert(all.end(), dqkv.begin(), dqkv.end());
    return all;
  });
}

TEST(Determinism, WeightGradientReductionsAcrossThreadCounts) {
  const int64_t N = 300, C = 229, V = 17;
  const VecF g = to_float(random_vec(N * C, 221)), x = to_float(random_vec(N * C, 222));
  const VecF rstd = to_float(random_vec(N, 223, 0.5, 2.0));
  const Tokens tokens = random_tokens(N, V, 224);
  expect_same_bits_across_threads([&] {
    VecF dwte(V * C, 0.0f), dnorm(C, 0.0f);
    cpu::embedding_backward(dwte.data(), g.data(), tokens.data(), N, C);
    cpu::rmsnorm_backward_weight(dnorm.data(), g.data(), x.data(), rstd.data(), N, C);
    dwte.insert(dwte.end(), dnorm.begin(), dnorm.end());
    return dwte;
  });
}

}  // namespace
