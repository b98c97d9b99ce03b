// GPU twin tests of the dense kernels (model/kernels/cuda/dense_kernels.h): every kernel
// against its CPU reference (moe::cpu, model/kernels/cpu/dense_ops.h) on random inputs of
// several shapes, odd ones included (N = 71, C = 229, V = 257), on a non-default stream.
// Gradients that accumulate start non-zero; gradients that are assigned start as garbage.
// They skip (with the reason) where no device is visible.
//
// Tolerances (|gpu - cpu| <= atol + rtol |cpu|), float:
//   kernel                      atol   rtol   why
//   embedding fwd / bwd         exact         copies; the same adds in the same order
//   residual, ce backward       exact         one rounding each, nothing to contract
//   rmsnorm forward, rstd       1e-6   1e-5   double sums in another order, rsqrt rounding
//   rmsnorm backward input      1e-5   1e-5   as above plus FMA contraction
//   rmsnorm backward weight     1e-6 * (|dweight| + sum_n |g x r|): float sums over N rows,
//                                             in chunks vs one chain
//   rope tables / apply         1e-6   1e-5   device cos/sin, FMA contraction
//   swiglu forward              1e-6   1e-5   exp_fast polynomial contracted into FMAs
//   swiglu backward             1e-5   1e-5   as above, and 1 + g (1 - sig) cancels near g=-1.28
//   cross-entropy loss / probs  1e-5   1e-5   double sums in another order, FMA in exp
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "gpu_test_util.h"
#include "model/kernels/cpu/dense_ops.h"
#include "model/kernels/cuda/cuda_backend.h"
#include "model/kernels/cuda/dense_kernels.h"
#include "model/kernels/cuda/dense_plan.h"
#include "model/rng.h"

namespace {

using moe_gpu_test::all_close;
using moe_gpu_test::DeviceVec;
using moe_gpu_test::normal_floats;

using moe_gpu_test::TestStream;

// n tokens in [0, V): uniform, with every third one drawn from the first 3 ids (repeats and a
// hot row, as in text).
std::vector<int32_t> random_tokens(size_t n, int64_t V, uint64_t seed) {
  std::vector<int32_t> t(n);
  for (size_t i = 0; i < n; ++i) {
    const uint64_t r = moe::rng_u64(seed, 3, i);
    t[i] = static_cast<int32_t>(i % 3 == 0 ? r % static_cast<uint64_t>(V < 3 ? V : 3)
                                           : r % static_cast<uint64_t>(V));
  }
  return t;
}

bool any_nonzero(const std::vector<float>& v) {
  for (float x : v)
    if (x != 0.0f) return true;
  return false;
}

struct RowShape {
  int64_t N, C;
};
// Odd sizes, a single row, widths below and above one block's reach.
const RowShape kRowShapes[] = {{71, 229}, {1, 1}, {3, 7}, {64, 128}, {33, 1500}, {5, 7168}};

TEST(CudaDense, EmbeddingForwardMatchesCpu) {
  SKIP_WITHOUT_GPU();
  TestStream ts;
  struct Shape {
    int64_t N, C, V;
  };
  for (const Shape sh : {Shape{71, 229, 257}, Shape{1, 1, 1}, Shape{300, 128, 256}, Shape{9, 2100, 11}}) {
    const auto tokens = random_tokens(sh.N, sh.V, 1);
    const auto wte = normal_floats(sh.V * sh.C, 2);
    std::vector<float> want(sh.N * sh.C);
    moe::cpu::embedding_forward<float>(want.data(), tokens.data(), wte.data(), sh.N, sh.C);
    DeviceVec<int32_t> d_tok(tokens);
    DeviceVec<float> d_wte(wte), d_out(normal_floats(sh.N * sh.C, 3));  // garbage: assigned
    moe::cuda::embedding_forward(d_out.get(), d_tok.get(), d_wte.get(), sh.N, sh.C, sh.V, ts.s);
    ts.sync();
    EXPECT_TRUE(all_close(d_out.host(), want, 0, 0)) << sh.N << "x" << sh.C;
  }
}

// Bitwise the CPU result: the same additions in the same order (embedding.cu header).
// Covers several token tiles (N > block), several column tiles (C = 2100: grid_y 3), several
// row groups (V > 64), repeated tokens and a hot row.
TEST(CudaDense, EmbeddingBackwardMatchesCpuBitwiseAndAccumulates) {
  SKIP_WITHOUT_GPU();
  TestStream ts;
  struct Shape {
    int64_t N, C, V;
  };
  for (const Shape sh : {Shape{71, 229, 257}, Shape{1, 1, 1}, Shape{700, 130, 300},
                         Shape{260, 2100, 70}}) {
    const auto tokens = random_tokens(sh.N, sh.V, 4);
    const auto dout = normal_floats(sh.N * sh.C, 5);
    std::vector<float> want = normal_floats(sh.V * sh.C, 6);  // non-zero: += is checked
    ASSERT_TRUE(any_nonzero(want) && any_nonzero(dout));
    DeviceVec<int32_t> d_tok(tokens);
    DeviceVec<float> d_dout(dout), d_dwte(want);
    moe::cpu::embedding_backward<float>(want.data(), dout.data(), tokens.data(), sh.N, sh.C);
    moe::cuda::embedding_backward(d_dwte.get(), d_dout.get(), d_tok.get(), sh.N, sh.C, sh.V, ts.s);
    ts.sync();
    EXPECT_TRUE(all_close(d_dwte.host(), want, 0, 0)) << sh.N << "x" << sh.C << " V " << sh.V;
  }
}

TEST(CudaDense, RmsnormForwardMatchesCpu) {
  SKIP_WITHOUT_GPU();
  TestStream ts;
  for (const RowShape sh : kRowShapes) {
    const auto x = normal_floats(sh.N * sh.C, 7);
    auto w = normal_floats(sh.C, 8, 0.1f);
    for (float& v : w) v += 1.0f;
    std::vector<float> out(sh.N * sh.C), rstd(sh.N);
    moe::cpu::rmsnorm_forward<float>(out.data(), rstd.data(), x.data(), w.data(), sh.N, sh.C, 1e-6f);
    DeviceVec<float> d_x(x), d_w(w), d_out(sh.N * sh.C), d_rstd(sh.N);
    moe::cuda::rmsnorm_forward(d_out.get(), d_rstd.get(), d_x.get(), d_w.get(), sh.N, sh.C, 1e-6f,
                               ts.s);
    ts.sync();
    EXPECT_TRUE(all_close(d_out.host(), out, 1e-6, 1e-5)) << sh.N << "x" << sh.C;
    EXPECT_TRUE(all_close(d_rstd.host(), rstd, 1e-6, 1e-5)) << sh.N << "x" << sh.C;
  }
}

TEST(CudaDense, RmsnormBackwardInputMatchesCpuAndAccumulates) {
  SKIP_WITHOUT_GPU();
  TestStream ts;
  for (const RowShape sh : kRowShapes) {
    const auto x = normal_floats(sh.N * sh.C, 9);
    const auto g = normal_floats(sh.N * sh.C, 10);
    auto w = normal_floats(sh.C, 11, 0.1f);
    for (float& v : w) v += 1.0f;
    std::vector<float> out(sh.N * sh.C), rstd(sh.N);
    moe::cpu::rmsnorm_forward<float>(out.data(), rstd.data(), x.data(), w.data(), sh.N, sh.C, 1e-6f);
    std::vector<float> want = normal_floats(sh.N * sh.C, 12);  // non-zero: += is checked
    DeviceVec<float> d_x(x), d_g(g), d_w(w), d_rstd(rstd), d_dx(want);
    moe::cpu::rmsnorm_backward_input<float>(want.data(), g.data(), x.data(), w.data(), rstd.data(),
                                            sh.N, sh.C);
    moe::cuda::rmsnorm_backward_input(d_dx.get(), d_g.get(), d_x.get(), d_w.get(), d_rstd.get(),
                                      sh.N, sh.C, ts.s);
    ts.sync();
    EXPECT_TRUE(all_close(d_dx.host(), want, 1e-5, 1e-5)) << sh.N << "x" << sh.C;
  }
}

// Also deterministic: a second run from the same start gives the same bits. N = 300 spans
// three row chunks of the two-pass reduction.
TEST(CudaDense, RmsnormBackwardWeightMatchesCpuAccumulatesAndIsDeterministic) {
  SKIP_WITHOUT_GPU();
  TestStream ts;
  std::vector<RowShape> shapes(std::begin(kRowShapes), std::end(kRowShapes));
  shapes.push_back({300, 229});
  shapes.push_back({1000, 64});
  for (const RowShape sh : shapes) {
    const auto x = normal_floats(sh.N * sh.C, 13);
    const auto g = normal_floats(sh.N * sh.C, 14);
    auto rstd = normal_floats(sh.N, 15, 0.1f);
    for (float& v : rstd) v = 1.0f + std::fabs(v);
    const auto start = normal_floats(sh.C, 16);  // non-zero: += is checked
    std::vector<float> want = start;
    moe::cpu::rmsnorm_backward_weight<float>(want.data(), g.data(), x.data(), rstd.data(), sh.N,
                                             sh.C);
    const int64_t scratch_n = moe::cuda::rmsnorm_backward_weight_scratch_count(sh.N, sh.C);
    DeviceVec<float> d_x(x), d_g(g), d_rstd(rstd), d_dw(start), d_dw2(start), d_scratch(scratch_n);
    moe::cuda::rmsnorm_backward_weight(d_dw.get(), d_g.get(), d_x.get(), d_rstd.get(), sh.N, sh.C,
                                       d_scratch.get(), scratch_n, ts.s);
    moe::cuda::rmsnorm_backward_weight(d_dw2.get(), d_g.get(), d_x.get(), d_rstd.get(), sh.N, sh.C,
                                       d_scratch.get(), scratch_n, ts.s);
    ts.sync();
    const auto got = d_dw.host();
    // Float sums in two different orders: the error scales with the sum of |terms|.
    for (int64_t c = 0; c < sh.C; ++c) {
      double mag = std::fabs(start[c]);
      for (int64_t n = 0; n < sh.N; ++n)
        mag += std::fabs(static_cast<double>(g[n * sh.C + c]) * x[n * sh.C + c] * rstd[n]);
      ASSERT_NEAR(got[c], want[c], 1e-6 * mag) << sh.N << "x" << sh.C << " column " << c;
    }
    EXPECT_TRUE(all_close(d_dw2.host(), got, 0, 0)) << sh.N << "x" << sh.C;
  }
}

TEST(CudaDense, RopeTablesMatchCpu) {
  SKIP_WITHOUT_GPU();
  TestStream ts;
  for (const auto& [T_, HD] : {std::pair<int64_t, int64_t>{71, 64}, {1, 2}, {4096, 64}, {9, 30}}) {
    const int64_t n = T_ * HD / 2;
    std::vector<float> c(n), s(n);
    moe::cpu::rope_tables<float>(c.data(), s.data(), T_, HD, 10000.0);
    DeviceVec<float> d_c(n), d_s(n);
    moe::cuda::rope_tables(d_c.get(), d_s.get(), T_, HD, 10000.0, ts.s);
    ts.sync();
    EXPECT_TRUE(all_close(d_c.host(), c, 1e-6, 1e-5)) << T_ << " " << HD;
    EXPECT_TRUE(all_close(d_s.host(), s, 1e-6, 1e-5)) << T_ << " " << HD;
  }
}

// In place inside a wider row (stride > H * HD, as q and k sit inside a fused qkv row): the
// elements outside the rotated heads must come back untouched, which the full compare checks.
TEST(CudaDense, RopeForwardBackwardMatchCpu) {
  SKIP_WITHOUT_GPU();
  TestStream ts;
  struct Shape {
    int64_t B, T, H, HD, stride;
  };
  for (const Shape sh : {Shape{2, 71, 3, 64, 3 * 64 + 5}, Shape{1, 1, 1, 2, 2},
                         Shape{3, 17, 4, 16, 4 * 16}, Shape{1, 33, 1, 30, 229}}) {
    std::vector<float> c(sh.T * sh.HD / 2), s(sh.T * sh.HD / 2);
    moe::cpu::rope_tables<float>(c.data(), s.data(), sh.T, sh.HD, 10000.0);
    const int64_t n = sh.B * sh.T * sh.stride;
    const auto x = normal_floats(n, 17);
    DeviceVec<float> d_c(c), d_s(s), d_x(x), d_dx(x);
    std::vector<float> fwd = x, bwd = x;
    moe::cpu::rope_forward<float>(fwd.data(), c.data(), s.data(), sh.B, sh.T, sh.H, sh.HD, sh.stride);
    moe::cpu::rope_backward<float>(bwd.data(), c.data(), s.data(), sh.B, sh.T, sh.H, sh.HD,
                                   sh.stride);
    moe::cuda::rope_forward(d_x.get(), d_c.get(), d_s.get(), sh.B, sh.T, sh.H, sh.HD, sh.stride,
                            ts.s);
    moe::cuda::rope_backward(d_dx.get(), d_c.get(), d_s.get(), sh.B, sh.T, sh.H, sh.HD, sh.stride,
                             ts.s);
    ts.sync();
    EXPECT_TRUE(all_close(d_x.host(), fwd, 1e-6, 1e-5)) << sh.B << "x" << sh.T << "x" << sh.H;
    EXPECT_TRUE(all_close(d_dx.host(), bwd, 1e-6, 1e-5)) << sh.B << "x" << sh.T << "x" << sh.H;
  }
}

TEST(CudaDense, SwigluForwardBackwardMatchCpu) {
  SKIP_WITHOUT_GPU();
  TestStream ts;
  for (const RowShape sh : {RowShape{71, 229}, RowShape{1, 1}, RowShape{16, 1408},
                            RowShape{3, 2048}}) {
    const int64_t N = sh.N, F = sh.C;
    const auto gu = normal_floats(N * 2 * F, 18, 3.0f);  // reaches sigmoid's flat tails
    const auto dout = normal_floats(N * F, 19);
    std::vector<float> out(N * F), dgu(N * 2 * F);
    moe::cpu::swiglu_forward<float>(out.data(), gu.data(), N, F);
    moe::cpu::swiglu_backward<float>(dgu.data(), dout.data(), gu.data(), N, F);
    DeviceVec<float> d_gu(gu), d_dout(dout), d_out(normal_floats(N * F, 20)),
        d_dgu(normal_floats(N * 2 * F, 21));  // garbage: assigned
    moe::cuda::swiglu_forward(d_out.get(), d_gu.get(), N, F, ts.s);
    moe::cuda::swiglu_backward(d_dgu.get(), d_dout.get(), d_gu.get(), N, F, ts.s);
    ts.sync();
    EXPECT_TRUE(all_close(d_out.host(), out, 1e-6, 1e-5)) << N << "x" << F;
    EXPECT_TRUE(all_close(d_dgu.host(), dgu, 1e-5, 1e-5)) << N << "x" << F;
  }
}

TEST(CudaDense, ResidualMatchesCpuAndMayAlias) {
  SKIP_WITHOUT_GPU();
  TestStream ts;
  for (const int64_t n : {int64_t(1), int64_t(71 * 229), int64_t(3) << 21}) {
    const auto a = normal_floats(n, 22), b = normal_floats(n, 23);
    std::vector<float> want(n);
    moe::cpu::residual_forward<float>(want.data(), a.data(), b.data(), n);
    DeviceVec<float> d_a(a), d_b(b), d_out(n);
    moe::cuda::residual_forward(d_out.get(), d_a.get(), d_b.get(), n, ts.s);
    moe::cuda::residual_forward(d_a.get(), d_a.get(), d_b.get(), n, ts.s);  // out aliases a
    ts.sync();
    EXPECT_TRUE(all_close(d_out.host(), want, 0, 0)) << n;
    EXPECT_TRUE(all_close(d_a.host(), want, 0, 0)) << n;
  }
}

// Some targets ignored (< 0); logits with a wide range so the max subtraction matters.
TEST(CudaDense, CrossEntropyMatchesCpu) {
  SKIP_WITHOUT_GPU();
  TestStream ts;
  struct Shape {
    int64_t N, V;
  };
  for (const Shape sh : {Shape{71, 257}, Shape{1, 1}, Shape{8, 129280}, Shape{33, 1000}}) {
    const auto logits = normal_floats(sh.N * sh.V, 24, 4.0f);
    auto targets = random_tokens(sh.N, sh.V, 25);
    for (size_t i = 0; i < targets.size(); i += 5) targets[i] = -1;
    if (targets.size() > 1) targets[1] = static_cast<int32_t>(sh.V - 1);
    std::vector<float> losses(sh.N), probs(sh.N * sh.V), dlogits(sh.N * sh.V);
    moe::cpu::cross_entropy_forward<float>(losses.data(), probs.data(), logits.data(),
                                           targets.data(), sh.N, sh.V);
    const float dloss = 1.0f / 37.0f;
    moe::cpu::cross_entropy_backward<float>(dlogits.data(), probs.data(), targets.data(), dloss,
                                            sh.N, sh.V);
    DeviceVec<float> d_logits(logits), d_losses(normal_floats(sh.N, 26)),
        d_probs(normal_floats(sh.N * sh.V, 27)), d_cpu_probs(probs),
        d_dlogits(normal_floats(sh.N * sh.V, 28));  // garbage: assigned
    DeviceVec<int32_t> d_targets(targets);
    moe::cuda::cross_entropy_forward(d_losses.get(), d_probs.get(), d_logits.get(), d_targets.get(),
                                     sh.N, sh.V, ts.s);
    // The backward from the CPU's probs: one rounding per element, so bitwise.
    moe::cuda::cross_entropy_backward(d_dlogits.get(), d_cpu_probs.get(), d_targets.get(), dloss,
                                      sh.N, sh.V, ts.s);
    ts.sync();
    EXPECT_TRUE(all_close(d_losses.host(), losses, 1e-5, 1e-5)) << sh.N << "x" << sh.V;
    EXPECT_TRUE(all_close(d_probs.host(), probs, 1e-7, 1e-5)) << sh.N << "x" << sh.V;
    EXPECT_TRUE(all_close(d_dlogits.host(), dlogits, 0, 0)) << sh.N << "x" << sh.V;
  }
}

// Empty problems launch nothing and leave the outputs alone.
TEST(CudaDense, EmptyShapesAreNoOps) {
  SKIP_WITHOUT_GPU();
  TestStream ts;
  DeviceVec<float> buf(normal_floats(64, 29));
  const auto before = buf.host();
  DeviceVec<int32_t> tok(std::vector<int32_t>(4, 0));
  moe::cuda::embedding_forward(buf.get(), tok.get(), buf.get(), 0, 8, 8, ts.s);
  moe::cuda::embedding_backward(buf.get(), buf.get(), tok.get(), 0, 8, 8, ts.s);
  moe::cuda::rmsnorm_forward(buf.get(), buf.get(), buf.get(), buf.get(), 0, 8, 1e-6f, ts.s);
  moe::cuda::rmsnorm_backward_input(buf.get(), buf.get(), buf.get(), buf.get(), buf.get(), 0, 8,
                                    ts.s);
  moe::cuda::rmsnorm_backward_weight(buf.get(), buf.get(), buf.get(), buf.get(), 0, 8, nullptr, 0,
                                     ts.s);
  moe::cuda::rope_forward(buf.get(), buf.get(), buf.get(), 0, 4, 1, 2, 2, ts.s);
  moe::cuda::swiglu_forward(buf.get(), buf.get(), 0, 4, ts.s);
  moe::cuda::swiglu_backward(buf.get(), buf.get(), buf.get(), 4, 0, ts.s);
  moe::cuda::residual_forward(buf.get(), buf.get(), buf.get(), 0, ts.s);
  moe::cuda::cross_entropy_forward(buf.get(), buf.get(), buf.get(), tok.get(), 0, 8, ts.s);
  moe::cuda::cross_entropy_backward(buf.get(), buf.get(), tok.get(), 1.0f, 0, 8, ts.s);
  ts.sync();
  EXPECT_TRUE(all_close(buf.host(), before, 0, 0));
}

TEST(CudaDevice, DescribeSelected) {
  SKIP_WITHOUT_GPU();
  const int dev = moe::cuda::device_for_local_rank();
  ASSERT_GE(dev, 0);
  EXPECT_NE(moe::cuda::device_describe(dev).find("sm_"), std::string::npos);
}

}  // namespace
