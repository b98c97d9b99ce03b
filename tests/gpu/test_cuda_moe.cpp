// GPU twin tests of the MoE routing and dispatch kernels (model/kernels/cuda/moe_kernels.h):
// every kernel against its CPU reference (moe::cpu, model/kernels/cpu/moe_ops.h) on random
// inputs of several shapes (E=8 K=2; E=64 K=6 in 8 groups / 3 kept; E=256 K=8 in 8 groups /
// 4 kept; odd token counts), on a non-default stream. Outputs start as garbage (all assigned).
// They skip (with the reason) where no device is visible.
//
// Integer outputs (expert ids, counts, offsets, row_of, token_of) are compared exactly. The
// router's scores go through the device's expf (a few ulp from the host's), so its ids are
// checked exactly against router_select run on the GPU's own scores, and against the CPU's
// ids wherever the two backends' scores for a token are bitwise equal; the tie test uses
// exact ties, where the ids must equal the CPU's everywhere.
//
// Tolerances (|gpu - cpu| <= atol + rtol |cpu|), float:
//   kernel                      atol   rtol   why
//   router scores               1e-6   1e-5   device expf (a few ulp), double sums reordered
//   gate weights (own scores)   0      1e-6   the CPU's double formula on the same scores
//   gate weights vs cpu         1e-6   1e-5   the scores' ulps
//   router backward             1e-6   1e-5   double dot products reordered, FMA contraction
//   aux loss / dscores          1e-7   1e-5   double sums reordered
//   permute fwd / bwd           exact         copies; the same adds in the same order
//   combine forward             1e-7   1e-6   no contraction on the device; the host may fuse
//   combine backward dyp        exact         one rounding each
//   combine backward dweights   1e-6   1e-5   double dot product reordered
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gpu_test_util.h"
#include "model/kernels/cpu/moe_ops.h"
#include "model/kernels/cuda/cuda_backend.h"
#include "model/kernels/cuda/moe_kernels.h"
#include "model/kernels/cuda/moe_plan.h"
#include "model/rng.h"
#include "model/router_math.h"

namespace {

using moe::ScoreFn;
using moe_gpu_test::all_close;
using moe_gpu_test::DeviceVec;
using moe_gpu_test::normal_floats;

using moe_gpu_test::TestStream;

struct RouterShape {
  int64_t B, T, E, K, G, KG;
  int64_t N() const { return B * T; }
};
const RouterShape kRouterShapes[] = {
    {2, 37, 8, 2, 1, 1},      // tiny: E=8 top-2, odd sequence length
    {1, 71, 64, 6, 8, 3},     // E=64 top-6, 8 groups / 3 kept
    {3, 129, 256, 8, 8, 4},   // DeepSeek-V3: E=256 top-8, 8 groups / 4 kept
    {1, 1, 8, 2, 4, 2},       // a single token
    {2, 50, 1024, 16, 32, 4}, // the most experts the kernels take
};
const ScoreFn kScoreFns[] = {ScoreFn::kSigmoid, ScoreFn::kSoftmax};

bool any_nonzero(const std::vector<float>& v) {
  return std::any_of(v.begin(), v.end(), [](float x) { return x != 0.0f; });
}

// The CPU's routing of `logits` (used as the input of the backward and dispatch tests).
struct CpuRouting {
  std::vector<float> scores, weights;
  std::vector<int32_t> ids;
};
CpuRouting cpu_route(const std::vector<float>& logits, const std::vector<float>& bias,
                     const RouterShape& sh, ScoreFn fn, double route_scale) {
  CpuRouting r{std::vector<float>(sh.N() * sh.E), std::vector<float>(sh.N() * sh.K),
               std::vector<int32_t>(sh.N() * sh.K)};
  moe::cpu::router_forward<float>(r.scores.data(), r.ids.data(), r.weights.data(), logits.data(),
                                  bias.data(), sh.N(), sh.E, sh.K, fn, route_scale, sh.G, sh.KG);
  return r;
}

// Runs the GPU router; returns scores, ids, weights on the host.
CpuRouting gpu_route(const std::vector<float>& logits, const std::vector<float>& bias,
                     const RouterShape& sh, ScoreFn fn, double route_scale,
                     const TestStream& ts) {
  DeviceVec<float> d_logits(logits), d_bias(bias);
  DeviceVec<float> d_scores(normal_floats(sh.N() * sh.E, 91)), d_w(normal_floats(sh.N() * sh.K, 92));
  DeviceVec<int32_t> d_ids(std::vector<int32_t>(sh.N() * sh.K, 12345));
  moe::cuda::router_forward(d_scores.get(), d_ids.get(), d_w.get(), d_logits.get(), d_bias.get(),
                            sh.N(), sh.E, sh.K, fn, route_scale, sh.G, sh.KG, ts.s);
  ts.sync();
  return {d_scores.host(), d_w.host(), d_ids.host()};
}

// The CPU's gate-weight formula on given scores and ids.
std::vector<float> weights_of(const std::vector<float>& scores, const std::vector<int32_t>& ids,
                              const RouterShape& sh, ScoreFn fn, double route_scale) {
  std::vector<float> w(sh.N() * sh.K);
  for (int64_t n = 0; n < sh.N(); ++n) {
    const float* s = scores.data() + n * sh.E;
    const int32_t* id = ids.data() + n * sh.K;
    double sum = 0.0;
    for (int64_t k = 0; k < sh.K; ++k) sum += static_cast<double>(s[id[k]]);
    for (int64_t k = 0; k < sh.K; ++k)
      w[n * sh.K + k] = fn == ScoreFn::kSigmoid
                            ? static_cast<float>(static_cast<double>(s[id[k]]) / sum * route_scale)
                            : static_cast<float>(static_cast<double>(s[id[k]]) * route_scale);
  }
  return w;
}

TEST(CudaMoe, RouterForwardMatchesCpu) {
  SKIP_WITHOUT_GPU();
  TestStream ts;
  for (const RouterShape& sh : kRouterShapes) {
    for (ScoreFn fn : kScoreFns) {
      SCOPED_TRACE(::testing::Message() << "E=" << sh.E << " K=" << sh.K << " G=" << sh.G
                                        << " N=" << sh.N() << " sigmoid=" << (fn == ScoreFn::kSigmoid));
      const double rs = 2.5;
      const auto logits = normal_floats(sh.N() * sh.E, 1, 2.0f);
      const auto bias = normal_floats(sh.E, 2, 0.05f);
      const CpuRouting want = cpu_route(logits, bias, sh, fn, rs);
      const CpuRouting got = gpu_route(logits, bias, sh, fn, rs, ts);
      ASSERT_TRUE(any_nonzero(want.scores));
      EXPECT_TRUE(all_close(got.scores, want.scores, 1e-6, 1e-5));
      std::vector<int32_t> kept(sh.KG), ids(sh.K);
      int64_t same_as_cpu = 0;
      for (int64_t n = 0; n < sh.N(); ++n) {
        // Exact: the GPU's ids are router_select of the GPU's scores.
        moe::router_select<float>(ids.data(), kept.data(), got.scores.data() + n * sh.E,
                                  bias.data(), sh.E, sh.K, sh.G, sh.KG);
        for (int64_t k = 0; k < sh.K; ++k)
          ASSERT_EQ(got.ids[n * sh.K + k], ids[k]) << "token " << n << " slot " << k;
        const bool scores_equal = std::memcmp(got.scores.data() + n * sh.E,
                                              want.scores.data() + n * sh.E, 4 * sh.E) == 0;
        const bool ids_equal = std::equal(ids.begin(), ids.end(), want.ids.begin() + n * sh.K);
        EXPECT_TRUE(ids_equal || !scores_equal) << "token " << n << ": equal scores, other ids";
        same_as_cpu += ids_equal;
      }
      // Ulp-level score differences flip a selection only at near-ties: rare.
      EXPECT_GE(same_as_cpu * 100, sh.N() * 95);
      EXPECT_TRUE(all_close(got.weights, weights_of(got.scores, got.ids, sh, fn, rs), 0.0, 1e-6));
      for (int64_t n = 0; n < sh.N(); ++n) {
        if (!std::equal(got.ids.begin() + n * sh.K, got.ids.begin() + (n + 1) * sh.K,
                        want.ids.begin() + n * sh.K))
          continue;
        for (int64_t k = 0; k < sh.K; ++k)
          EXPECT_NEAR(got.weights[n * sh.K + k], want.weights[n * sh.K + k],
                      1e-6 + 1e-5 * std::fabs(want.weights[n * sh.K + k]));
      }
      // Deterministic: a second launch gives the same bits.
      const CpuRouting again = gpu_route(logits, bias, sh, fn, rs, ts);
      EXPECT_EQ(again.scores, got.scores);
      EXPECT_EQ(again.ids, got.ids);
      EXPECT_EQ(again.weights, got.weights);
    }
  }
}

TEST(CudaMoe, RouterForwardTiesGoToLowerIds) {
  SKIP_WITHOUT_GPU();
  TestStream ts;
  for (const RouterShape& sh : kRouterShapes) {
    for (ScoreFn fn : kScoreFns) {
      SCOPED_TRACE(::testing::Message() << "E=" << sh.E << " G=" << sh.G);
      // Logits on a coarse grid (many exact ties in every token), the first token all equal;
      // bias zero, so ties in the scores are ties in the selection. Non-negative, so no two
      // group scores are equal only in exact arithmetic (sigmoid(x) + sigmoid(-x) = 1).
      auto logits = normal_floats(sh.N() * sh.E, 3, 1.0f);
      for (float& x : logits) x = std::round(std::fabs(x) * 2.0f) / 2.0f;
      std::fill(logits.begin(), logits.begin() + sh.E, 0.25f);
      const std::vector<float> bias(sh.E, 0.0f);
      const CpuRouting want = cpu_route(logits, bias, sh, fn, 1.0);
      const CpuRouting got = gpu_route(logits, bias, sh, fn, 1.0, ts);
      EXPECT_EQ(got.ids, want.ids);
      for (int64_t k = 0; k < sh.K; ++k) EXPECT_EQ(got.ids[k], k);  // all tied: lowest ids
      EXPECT_TRUE(all_close(got.weights, want.weights, 1e-6, 1e-5));
    }
  }
}

TEST(CudaMoe, RouterBackwardMatchesCpu) {
  SKIP_WITHOUT_GPU();
  TestStream ts;
  for (const RouterShape& sh : kRouterShapes) {
    for (ScoreFn fn : kScoreFns) {
      for (bool extra : {false, true}) {
        SCOPED_TRACE(::testing::Message() << "E=" << sh.E << " N=" << sh.N() << " extra=" << extra
                                          << " sigmoid=" << (fn == ScoreFn::kSigmoid));
        const double rs = 1.5;
        const CpuRouting r = cpu_route(normal_floats(sh.N() * sh.E, 4, 2.0f),
                                       normal_floats(sh.E, 5, 0.05f), sh, fn, rs);
        const auto dw = normal_floats(sh.N() * sh.K, 6);
        const auto dextra = normal_floats(sh.N() * sh.E, 7, 0.1f);
        std::vector<float> want(sh.N() * sh.E);
        moe::cpu::router_backward<float>(want.data(), dw.data(), extra ? dextra.data() : nullptr,
                                         r.scores.data(), r.ids.data(), sh.N(), sh.E, sh.K, fn, rs);
        DeviceVec<float> d_dlogits(normal_floats(sh.N() * sh.E, 8)), d_dw(dw), d_extra(dextra),
            d_scores(r.scores);
        DeviceVec<int32_t> d_ids(r.ids);
        moe::cuda::router_backward(d_dlogits.get(), d_dw.get(), extra ? d_extra.get() : nullptr,
                                   d_scores.get(), d_ids.get(), sh.N(), sh.E, sh.K, fn, rs, ts.s);
        ts.sync();
        ASSERT_TRUE(any_nonzero(want));
        EXPECT_TRUE(all_close(d_dlogits.host(), want, 1e-6, 1e-5));
      }
    }
  }
}

TEST(CudaMoe, AuxLossMatchesCpu) {
  SKIP_WITHOUT_GPU();
  TestStream ts;
  for (const RouterShape& sh : kRouterShapes) {
    SCOPED_TRACE(::testing::Message() << "B=" << sh.B << " T=" << sh.T << " E=" << sh.E);
    const double alpha = 0.01;
    const float dloss = 0.7f;
    const CpuRouting r = cpu_route(normal_floats(sh.N() * sh.E, 9, 2.0f),
                                   normal_floats(sh.E, 10, 0.05f), sh, ScoreFn::kSigmoid, 1.0);
    const float want_loss =
        moe::cpu::aux_loss_forward<float>(r.scores.data(), r.ids.data(), sh.B, sh.T, sh.E, sh.K, alpha);
    std::vector<float> want_d(sh.N() * sh.E);
    moe::cpu::aux_loss_backward<float>(want_d.data(), r.scores.data(), r.ids.data(), sh.B, sh.T,
                                       sh.E, sh.K, alpha, dloss);
    DeviceVec<float> d_scores(r.scores), d_loss(std::vector<float>{-1.0f}),
        d_d(normal_floats(sh.N() * sh.E, 11));
    DeviceVec<int32_t> d_ids(r.ids);
    DeviceVec<unsigned char> scratch(moe::cuda::moe_aux_loss_scratch_bytes(sh.B, sh.T, sh.E));
    moe::cuda::aux_loss_forward(d_loss.get(), d_scores.get(), d_ids.get(), sh.B, sh.T, sh.E, sh.K,
                                alpha, scratch.get(), ts.s);
    moe::cuda::aux_loss_backward(d_d.get(), d_scores.get(), d_ids.get(), sh.B, sh.T, sh.E, sh.K,
                                 alpha, dloss, scratch.get(), ts.s);
    ts.sync();
    ASSERT_GT(want_loss, 0.0f);
    ASSERT_TRUE(any_nonzero(want_d));
    EXPECT_TRUE(all_close(d_loss.host(), {want_loss}, 1e-7, 1e-5));
    EXPECT_TRUE(all_close(d_d.host(), want_d, 1e-7, 1e-5));
    // Deterministic: a second forward gives the same bits.
    const std::vector<float> first = d_loss.host();
    moe::cuda::aux_loss_forward(d_loss.get(), d_scores.get(), d_ids.get(), sh.B, sh.T, sh.E, sh.K,
                                alpha, scratch.get(), ts.s);
    ts.sync();
    EXPECT_EQ(d_loss.host(), first);
  }
}

struct DispatchShape {
  int64_t N, E, K, C;
};
// Odd token counts and widths (C = 229: scalar rows; C = 256: 16-byte rows), several tiles
// (N K > 512) and several blocks of tiles (N K > 2048), a single token, an empty batch.
const DispatchShape kDispatchShapes[] = {{71, 8, 2, 229},   {300, 64, 6, 256}, {1, 8, 2, 4},
                                         {1000, 256, 8, 64}, {4096, 256, 8, 32}, {0, 8, 2, 16},
                                         {37, 1024, 16, 12}};

// Expert ids for N tokens: distinct per token (as the router gives), biased towards the low
// half of the experts so the high ones are often empty; every 5th token repeats the first.
std::vector<int32_t> skewed_ids(const DispatchShape& sh, uint64_t seed) {
  std::vector<int32_t> ids(sh.N * sh.K);
  for (int64_t n = 0; n < sh.N; ++n) {
    const int64_t src = n % 5 == 4 ? 0 : n;
    for (int64_t k = 0; k < sh.K; ++k) {
      const uint64_t span = static_cast<uint64_t>(std::max<int64_t>(sh.K, sh.E / 2));
      const int64_t start = static_cast<int64_t>(moe::rng_u64(seed, 4, src) % span);
      ids[n * sh.K + k] = static_cast<int32_t>((start + k) % sh.E);
    }
  }
  return ids;
}

TEST(CudaMoe, DispatchPlanMatchesCpuExactly) {
  SKIP_WITHOUT_GPU();
  TestStream ts;
  for (const DispatchShape& sh : kDispatchShapes) {
    SCOPED_TRACE(::testing::Message() << "N=" << sh.N << " E=" << sh.E << " K=" << sh.K);
    const auto ids = skewed_ids(sh, 12);
    const int64_t pairs = sh.N * sh.K;
    std::vector<int64_t> counts(sh.E), offsets(sh.E + 1);
    std::vector<int32_t> row_of(pairs), token_of(pairs);
    moe::cpu::moe_plan(counts.data(), offsets.data(), row_of.data(), token_of.data(), ids.data(),
                       sh.N, sh.E, sh.K);
    DeviceVec<int32_t> d_ids(ids), d_row(std::vector<int32_t>(pairs, -7)),
        d_tok(std::vector<int32_t>(pairs, -7));
    DeviceVec<int64_t> d_counts(std::vector<int64_t>(sh.E, -7)),
        d_offsets(std::vector<int64_t>(sh.E + 1, -7));
    DeviceVec<unsigned char> scratch(moe::cuda::moe_dispatch_scratch_bytes(sh.N, sh.E, sh.K));
    moe::cuda::moe_plan(d_counts.get(), d_offsets.get(), d_row.get(), d_tok.get(), d_ids.get(),
                        sh.N, sh.E, sh.K, scratch.get(), ts.s);
    ts.sync();
    EXPECT_EQ(d_counts.host(), counts);
    EXPECT_EQ(d_offsets.host(), offsets);
    EXPECT_EQ(d_row.host(), row_of);
    EXPECT_EQ(d_tok.host(), token_of);
    if (sh.E > 2 * sh.K) {
      EXPECT_EQ(counts[sh.E - 1], 0) << "the test means to cover empty experts";
    }
  }
}

TEST(CudaMoe, PermuteAndCombineMatchCpu) {
  SKIP_WITHOUT_GPU();
  TestStream ts;
  for (const DispatchShape& sh : kDispatchShapes) {
    for (int64_t shift : {0, 1}) {  // shift 1: rows not 16-byte aligned, the scalar path
      SCOPED_TRACE(::testing::Message() << "N=" << sh.N << " K=" << sh.K << " C=" << sh.C
                                        << " shift=" << shift);
      const int64_t N = sh.N, K = sh.K, C = sh.C, rows = N * K;
      const auto ids = skewed_ids(sh, 13);
      std::vector<int64_t> counts(sh.E), offsets(sh.E + 1);
      std::vector<int32_t> row_of(rows), token_of(rows);
      moe::cpu::moe_plan(counts.data(), offsets.data(), row_of.data(), token_of.data(),
                         ids.data(), N, sh.E, K);
      const auto x = normal_floats(N * C, 14), dxp = normal_floats(rows * C, 15);
      const auto yp = normal_floats(rows * C, 16), w = normal_floats(N * K, 17);
      const auto dout = normal_floats(N * C, 18);
      std::vector<float> xp(rows * C), dx(N * C), out(N * C), dyp(rows * C), dw(N * K);
      moe::cpu::moe_permute_forward<float>(xp.data(), x.data(), token_of.data(), rows, C);
      moe::cpu::moe_permute_backward<float>(dx.data(), dxp.data(), row_of.data(), N, K, C);
      moe::cpu::moe_combine_forward<float>(out.data(), yp.data(), w.data(), row_of.data(), N, K, C);
      moe::cpu::moe_combine_backward<float>(dyp.data(), dw.data(), dout.data(), yp.data(), w.data(),
                                            row_of.data(), N, K, C);
      // Device copies `shift` floats into their buffers; outputs start as garbage.
      auto shifted = [&](const std::vector<float>& h) {
        std::vector<float> v(h.size() + 1, 3.0f);
        std::copy(h.begin(), h.end(), v.begin() + shift);
        return v;
      };
      auto unshift = [&](const DeviceVec<float>& d) {
        const std::vector<float> h = d.host();
        return std::vector<float>(h.begin() + shift, h.end() - (1 - shift));
      };
      DeviceVec<int32_t> d_row(row_of), d_tok(token_of);
      DeviceVec<float> d_x(shifted(x)), d_dxp(shifted(dxp)), d_yp(shifted(yp)), d_w(w),
          d_dout(shifted(dout));
      DeviceVec<float> d_xp(shifted(normal_floats(rows * C, 19))),
          d_dx(shifted(normal_floats(N * C, 20))), d_out(shifted(normal_floats(N * C, 21))),
          d_dyp(shifted(normal_floats(rows * C, 22))), d_dw(normal_floats(N * K, 23));
      moe::cuda::moe_permute_forward(d_xp.get() + shift, d_x.get() + shift, d_tok.get(), rows, C, ts.s);
      moe::cuda::moe_permute_backward(d_dx.get() + shift, d_dxp.get() + shift, d_row.get(), N, K, C,
                                      ts.s);
      moe::cuda::moe_combine_forward(d_out.get() + shift, d_yp.get() + shift, d_w.get(), d_row.get(),
                                     N, K, C, ts.s);
      moe::cuda::moe_combine_backward(d_dyp.get() + shift, d_dw.get(), d_dout.get() + shift,
                                      d_yp.get() + shift, d_w.get(), d_row.get(), N, K, C, ts.s);
      ts.sync();
      if (N > 0) {
        ASSERT_TRUE(any_nonzero(out));
      }
      EXPECT_TRUE(all_close(unshift(d_xp), xp, 0.0, 0.0));
      EXPECT_TRUE(all_close(unshift(d_dx), dx, 0.0, 0.0));
      EXPECT_TRUE(all_close(unshift(d_out), out, 1e-7, 1e-6));
      EXPECT_TRUE(all_close(unshift(d_dyp), dyp, 0.0, 0.0));
      EXPECT_TRUE(all_close(d_dw.host(), dw, 1e-6, 1e-5));
    }
  }
}

}  // namespace
