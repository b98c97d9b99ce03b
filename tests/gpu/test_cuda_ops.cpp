// The CUDA backend (model/kernels/cuda/cuda_ops.h) against the CPU backend (ops_cpu_create):
// every Ops<float> method run on both, the CPU on host data and the GPU on device copies of
// the same data, outputs that are assigned starting as garbage and outputs that accumulate
// starting non-zero. Plus what only the backend itself promises: no device allocation after
// ops_cuda_create, download and the host-value calls returning finished values while work is
// still queued, upload's source reusable at once (pageable and pinned). They skip (with the
// reason) where no device is visible.
//
// Tolerances (|gpu - cpu| <= atol + rtol |cpu|), float; the kernel files' own gpu tests give
// the reasons in detail:
//   op                                   atol   rtol   why
//   memory ops, permutes, embedding      exact         copies; the same adds in the same order
//   moe_plan, mtp_shift, fp8, bf16       exact         integer work, one IEEE op per element
//   residual, ce backward, combine dyp   exact         one rounding per element
//   gemm (fp32), gemm_bf16               1e-4   1e-4   cuBLAS vs OpenBLAS summation order
//   rmsnorm fwd / bwd input              1e-6 / 1e-5   double sums reordered, FMA
//   rmsnorm bwd weight                   1e-6 * sum |terms|  float chunks vs one chain
//   rope, swiglu fwd                     1e-6   1e-5   device sin/cos/exp, FMA
//   swiglu bwd                           1e-5   1e-5   cancellation near g = -1.28
//   cross-entropy loss / probs           1e-5 / 1e-7   1e-5   double sums reordered
//   attention out, lse / dqkv            2e-5 / 1e-4   1e-4 / 1e-3   reordered, dS cancels
//   router scores / bwd / combine dw     1e-6   1e-5   device expf, double dots reordered
//   aux loss, dscores                    1e-7   1e-5   double sums reordered
//   combine forward                      1e-7   1e-6   the host may fuse, the device not
//   scored_loss_accumulate               0      1e-12  double sum of floats, another order
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <iterator>
#include <limits>
#include <memory>
#include <vector>

#include "gpu_test_util.h"
#include "model/fp8_quant.h"
#include "model/kernels/cpu/dense_ops.h"
#include "model/kernels/cuda/attention_plan.h"
#include "model/kernels/cuda/cuda_backend.h"
#include "model/kernels/cuda/cuda_ops.h"
#include "model/linear.h"
#include "model/ops.h"
#include "model/rng.h"

namespace {

using moe::ScoreFn;
using moe_gpu_test::all_close;
using moe_gpu_test::DeviceVec;
using moe_gpu_test::normal_floats;

// Wide enough for every shape below (rmsnorm dW: 300 x 1500; router: 3 x 71 tokens, E = 64).
constexpr moe::OpsLimits kLimits{
    .tokens = 4096, .width = 2048, .batch = 4, .seq_len = 128, .experts = 64, .top_k = 8};

bool any_nonzero(const std::vector<float>& v) {
  return std::any_of(v.begin(), v.end(), [](float x) { return x != 0.0f; });
}

// Bitwise equality of float vectors (NaN and -0 included).
bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Every element equal to `want`; reports the first that is not (the vectors are large).
::testing::AssertionResult all_equal(const std::vector<float>& v, float want) {
  for (size_t i = 0; i < v.size(); ++i)
    if (v[i] != want)
      return ::testing::AssertionFailure() << "index " << i << ": " << v[i] << " vs " << want;
  return ::testing::AssertionSuccess();
}

// n ints in [lo, hi), seeded.
std::vector<int32_t> random_ints(size_t n, int64_t lo, int64_t hi, uint64_t seed) {
  std::vector<int32_t> v(n);
  for (size_t i = 0; i < n; ++i)
    v[i] = static_cast<int32_t>(lo + static_cast<int64_t>(moe::rng_u64(seed, 7, i) %
                                                          static_cast<uint64_t>(hi - lo)));
  return v;
}

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_GPU();
    cpu_ = moe::ops_cpu_create<float>();
    gpu_ = moe::ops_cuda_create(kLimits);
  }
  moe::Ops<float>& cpu() { return *cpu_; }
  moe::Ops<float>& gpu() { return *gpu_; }
  // DeviceVec fills through the legacy default stream, which the backend's non-blocking
  // stream does not wait for: call once the inputs are on the device.
  static void ready() { moe::cuda::device_synchronize(); }
  // Through the backend's download (it waits for the queued work).
  template <typename T>
  std::vector<T> fetch(const DeviceVec<T>& d) {
    std::vector<T> h(d.size());
    gpu_->download(h.data(), d.get(), h.size() * sizeof(T));
    return h;
  }

  std::unique_ptr<moe::Ops<float>> cpu_, gpu_;
};

TEST_F(CudaOps, IsCudaWithItsOwnStream) {
  EXPECT_EQ(gpu().device(), moe::Device::kCuda);
  EXPECT_NE(moe::ops_cuda_stream(gpu()), nullptr);  // non-blocking, never the legacy stream
}

// copy, zero, copy_rows and add_rows over padded rows, a single row with ld < cols, empty.
TEST_F(CudaOps, MemoryOpsMatchCpuExactly) {
  const int64_t n = 4000;
  const auto x = normal_floats(n, 1);
  auto want = normal_floats(n, 2);
  DeviceVec<float> d_x(n), d_y(want);
  ready();
  gpu().upload(d_x.get(), x.data(), n * sizeof(float));
  EXPECT_TRUE(same_bits(fetch(d_x), x));
  cpu().copy(want.data() + 10, x.data() + 20, 900 * sizeof(float));
  gpu().copy(d_y.get() + 10, d_x.get() + 20, 900 * sizeof(float));
  cpu().zero(want.data() + 1500, 333 * sizeof(float));
  gpu().zero(d_y.get() + 1500, 333 * sizeof(float));
  EXPECT_TRUE(same_bits(fetch(d_y), want));

  struct Shape {
    int64_t rows, cols, ld_dst, ld_src;
  };
  for (const Shape sh : {Shape{37, 29, 33, 41}, Shape{5, 64, 64, 64}, Shape{1, 50, 3, 3},
                         Shape{0, 7, 7, 7}, Shape{5, 0, 1, 1}, Shape{71, 229, 300, 229}}) {
    SCOPED_TRACE(::testing::Message() << sh.rows << "x" << sh.cols);
    const int64_t nd = std::max<int64_t>(sh.rows * sh.ld_dst + sh.cols, 1);
    const int64_t ns = std::max<int64_t>(sh.rows * sh.ld_src + sh.cols, 1);
    const auto src = normal_floats(ns, 3);
    auto dst_copy = normal_floats(nd, 4), dst_add = normal_floats(nd, 5);
    DeviceVec<float> d_src(src), d_copy(dst_copy), d_add(dst_add);
    ready();
    cpu().copy_rows(dst_copy.data(), sh.ld_dst, src.data(), sh.ld_src, sh.rows, sh.cols);
    gpu().copy_rows(d_copy.get(), sh.ld_dst, d_src.get(), sh.ld_src, sh.rows, sh.cols);
    cpu().add_rows(dst_add.data(), sh.ld_dst, src.data(), sh.ld_src, sh.rows, sh.cols);
    gpu().add_rows(d_add.get(), sh.ld_dst, d_src.get(), sh.ld_src, sh.rows, sh.cols);
    EXPECT_TRUE(same_bits(fetch(d_copy), dst_copy));
    EXPECT_TRUE(same_bits(fetch(d_add), dst_add));
  }
}

// 64 queued passes over 16 MiB, then at once a download: it must see all of them (each pass
// adds exactly 1, so the value says how many ran). synchronize, then a plain copy, too.
TEST_F(CudaOps, DownloadAndSynchronizeWaitForQueuedWork) {
  const int64_t rows = 4096, cols = 1024, n = rows * cols, passes = 64;
  DeviceVec<float> d_acc(n), d_ones(std::vector<float>(n, 1.0f));
  ready();
  for (int64_t p = 0; p < passes; ++p)
    gpu().add_rows(d_acc.get(), cols, d_ones.get(), cols, rows, cols);
  EXPECT_TRUE(all_equal(fetch(d_acc), float(passes)));
  for (int64_t p = 0; p < passes; ++p)
    gpu().add_rows(d_acc.get(), cols, d_ones.get(), cols, rows, cols);
  gpu().synchronize();
  EXPECT_TRUE(all_equal(d_acc.host(), float(2 * passes)));
}

// src_host is overwritten as soon as upload returns, while the stream is busy; pageable and
// pinned sources (a pinned source is what an unsynchronized async copy would read late).
TEST_F(CudaOps, UploadSourceIsReusableAtOnce) {
  const int64_t rows = 2048, cols = 1024, n = rows * cols;
  DeviceVec<float> d_busy(n), d_ones(std::vector<float>(n, 1.0f)), d_a(n), d_b(n);
  float* pinned = nullptr;
  ASSERT_EQ(cudaMallocHost(&pinned, n * sizeof(float)), cudaSuccess);
  std::vector<float> pageable(n);
  ready();
  for (int pin = 0; pin < 2; ++pin) {
    SCOPED_TRACE(pin ? "pinned" : "pageable");
    float* src = pin ? pinned : pageable.data();
    const float a = 3.0f + 10.0f * pin, b = -5.0f - 10.0f * pin;  // new values each round
    for (int64_t p = 0; p < 32; ++p)  // keep the stream busy
      gpu().add_rows(d_busy.get(), cols, d_ones.get(), cols, rows, cols);
    std::fill(src, src + n, a);
    gpu().upload(d_a.get(), src, n * sizeof(float));
    std::fill(src, src + n, b);
    gpu().upload(d_b.get(), src, n * sizeof(float));
    std::fill(src, src + n, 7.0f);
    EXPECT_TRUE(all_equal(fetch(d_a), a));
    EXPECT_TRUE(all_equal(fetch(d_b), b));
  }
  ASSERT_EQ(cudaFreeHost(pinned), cudaSuccess);
}

// After a warm-up (lazy module loading and cuBLAS's first calls may allocate once), a batch
// of every scratch-using call leaves the device's free memory unchanged.
TEST_F(CudaOps, AllocatesNothingAfterCreate) {
  const int64_t B = 2, T = 64, N = B * T, C = 256, E = 64, K = 6, NH = 4, HD = 16;
  DeviceVec<float> x(N * C), w(C * C), y(N * C), dw(C), rstd(N), logits(N * E), scores(N * E),
      gw(N * K), qkv(N * 3 * NH * HD), att(N * NH * HD), lse(B * NH * T),
      dqkv(N * 3 * NH * HD), ascratch(moe::cuda::attention_scratch_floats({B, T, NH, NH, HD, HD})),
      losses(N);
  DeviceVec<float> bias(E);
  DeviceVec<int32_t> ids(N * K), row_of(N * K), token_of(N * K), targets(N);
  DeviceVec<double> acc(3);
  std::vector<int64_t> counts(E), offsets(E + 1);
  auto batch = [&] {
    gpu().matmul_forward(y.get(), x.get(), w.get(), N, C, C);
    gpu().matmul_backward_weight(w.get(), y.get(), x.get(), N, C, C);
    gpu().rmsnorm_forward(y.get(), rstd.get(), x.get(), dw.get(), N, C, 1e-6f);
    gpu().rmsnorm_backward_weight(dw.get(), y.get(), x.get(), rstd.get(), N, C);
    gpu().attention_forward(att.get(), lse.get(), qkv.get(), B, T, NH, NH, HD, HD, ascratch.get());
    gpu().attention_backward(dqkv.get(), att.get(), qkv.get(), lse.get(), B, T, NH, NH, HD, HD,
                             ascratch.get());
    gpu().router_forward(scores.get(), ids.get(), gw.get(), logits.get(), bias.get(), N, E, K,
                         ScoreFn::kSigmoid, 1.0, 1, 1);
    gpu().aux_loss_forward(acc.get() + 2, scores.get(), ids.get(), B, T, E, K, 0.01);
    gpu().aux_loss_backward(logits.get(), scores.get(), ids.get(), B, T, E, K, 0.01, 1.0f);
    gpu().moe_plan(counts.data(), offsets.data(), row_of.get(), token_of.get(), ids.get(), N, E, K);
    gpu().scored_loss_accumulate(acc.get(), losses.get(), targets.get(), N, 1.0);
    gpu().synchronize();
  };
  ready();
  batch();
  size_t free0 = 0, free1 = 0, total = 0;
  ASSERT_EQ(cudaMemGetInfo(&free0, &total), cudaSuccess);
  for (int i = 0; i < 3; ++i) batch();
  ASSERT_EQ(cudaMemGetInfo(&free1, &total), cudaSuccess);
  EXPECT_EQ(free1, free0);
}

// ---- GEMMs ----------------------------------------------------------------------------------

// The GEMM tests' sweep: every transpose, padded leading dimensions, beta 0 (C poisoned with
// NaN: never read) and not. run(ta, tb, lda, ldb, ldc, A, B, beta, C) runs the CPU on C in
// place and returns the GPU's C; the padding columns must be untouched (NaN included) and the
// rest close to the CPU's.
constexpr int64_t kGemmM = 37, kGemmN = 29, kGemmK = 71;
template <typename Run>
void sweep_gemm(uint64_t seed, const Run& run) {
  const int64_t M = kGemmM, N = kGemmN, K = kGemmK;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb)
      for (int zero_beta = 0; zero_beta < 2; ++zero_beta) {
        SCOPED_TRACE(::testing::Message() << "ta " << ta << " tb " << tb << " beta0 " << zero_beta);
        const int64_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 5, ldc = N + 2;
        const auto A = normal_floats((ta ? K : M) * lda, seed);
        const auto B = normal_floats((tb ? N : K) * ldb, seed + 1);
        std::vector<float> C = normal_floats(M * ldc, seed + 2);
        if (zero_beta) C.assign(C.size(), std::numeric_limits<float>::quiet_NaN());
        const float beta = zero_beta ? 0.0f : -0.5f;
        std::vector<float> got = run(ta != 0, tb != 0, lda, ldb, ldc, A, B, beta, C);
        for (int64_t i = 0; i < M; ++i)
          for (int64_t j = N; j < ldc; ++j) {
            EXPECT_EQ(std::isnan(got[i * ldc + j]), std::isnan(C[i * ldc + j]));
            got[i * ldc + j] = C[i * ldc + j] = 0.0f;
          }
        ASSERT_TRUE(any_nonzero(C));
        EXPECT_TRUE(all_close(got, C, 1e-4, 1e-4));
      }
}

TEST_F(CudaOps, GemmMatchesCpu) {
  sweep_gemm(11, [&](bool ta, bool tb, int64_t lda, int64_t ldb, int64_t ldc,
                     const std::vector<float>& A, const std::vector<float>& B, float beta,
                     std::vector<float>& C) {
    const float alpha = 0.75f;
    DeviceVec<float> dA(A), dB(B), dC(C);
    ready();
    cpu().gemm(ta, tb, kGemmM, kGemmN, kGemmK, alpha, A.data(), lda, B.data(), ldb, beta,
               C.data(), ldc);
    gpu().gemm(ta, tb, kGemmM, kGemmN, kGemmK, alpha, dA.get(), lda, dB.get(), ldb, beta,
               dC.get(), ldc);
    return fetch(dC);
  });
}

// gemm_bf16 (tensor cores) against the CPU's native-BF16 mode (the bits decoded, OpenBLAS in
// FP32): products of BF16 values are exact in FP32, so only the summation order differs.
TEST_F(CudaOps, GemmBf16MatchesCpu) {
  ASSERT_TRUE(gpu().gemm_bf16_native());
  const std::unique_ptr<moe::Ops<float>> cpu_bf16 = moe::ops_cpu_create<float>(true);
  ASSERT_FALSE(moe::ops_cuda_create(kLimits, false)->gemm_bf16_native());
  const auto to_bf16 = [](const std::vector<float>& x) {
    std::vector<uint16_t> bits(x.size());
    for (size_t i = 0; i < x.size(); ++i) bits[i] = moe::bf16_from_float(x[i]);
    return bits;
  };
  sweep_gemm(21, [&](bool ta, bool tb, int64_t lda, int64_t ldb, int64_t ldc,
                     const std::vector<float>& fa, const std::vector<float>& fb, float beta,
                     std::vector<float>& C) {
    const std::vector<uint16_t> A = to_bf16(fa), B = to_bf16(fb);
    DeviceVec<uint16_t> dA(A), dB(B);
    DeviceVec<float> dC(C);
    ready();
    cpu_bf16->gemm_bf16(ta, tb, kGemmM, kGemmN, kGemmK, A.data(), lda, B.data(), ldb, beta,
                        C.data(), ldc);
    gpu().gemm_bf16(ta, tb, kGemmM, kGemmN, kGemmK, dA.get(), lda, dB.get(), ldb, beta,
                    dC.get(), ldc);
    return fetch(dC);
  });
}

// Every element size, odd shapes and shapes past one tile: bit for bit (a copy).
TEST_F(CudaOps, TransposeMatchesCpuExactly) {
  struct Shape {
    int64_t R, C;
  };
  for (const Shape sh : {Shape{37, 29}, Shape{1, 50}, Shape{50, 1}, Shape{130, 257}, Shape{0, 5}}) {
    for (size_t e : {size_t{1}, size_t{2}, size_t{4}}) {
      SCOPED_TRACE(::testing::Message() << sh.R << "x" << sh.C << " " << e << " bytes");
      const int64_t n = sh.R * sh.C;
      const size_t words = (static_cast<size_t>(n) * e + 3) / 4 + 1;
      const auto f = normal_floats(static_cast<int64_t>(words), 31);
      std::vector<unsigned char> in(words * 4), want(in.size(), 0), got(in.size());
      std::memcpy(in.data(), f.data(), in.size());
      DeviceVec<unsigned char> d_in(in), d_out(want);
      ready();
      cpu().transpose(want.data(), in.data(), sh.R, sh.C, e);
      gpu().transpose(d_out.get(), d_in.get(), sh.R, sh.C, e);
      gpu().download(got.data(), d_out.get(), got.size());
      EXPECT_EQ(got, want);
    }
  }
}

// gemm_fp8 (cuBLASLt block scaling) against the CPU's reference of the same codes and
// scales, in the three scale pairings a linear layer uses. Hopper only.
TEST_F(CudaOps, GemmFp8MatchesCpu) {
  if (!gpu().gemm_fp8_native()) GTEST_SKIP() << "cuBLASLt FP8 block scaling needs sm_90";
  using moe::cuda::Fp8Scaling;
  struct Case {
    int64_t M, N, K;
    Fp8Scaling a, b;
  };
  const Case cases[] = {{48, 32, 304, Fp8Scaling::kTile1x128, Fp8Scaling::kBlock128},
                        {208, 144, 144, Fp8Scaling::kTile1x128, Fp8Scaling::kTile1x128},
                        {32, 144, 256, Fp8Scaling::kBlock128, Fp8Scaling::kTile1x128}};
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << c.M << "x" << c.N << "x" << c.K);
    std::vector<uint8_t> A(static_cast<size_t>(c.M * c.K)), B(static_cast<size_t>(c.N * c.K));
    // Any E4M3 code but the NaNs (0x7F, 0xFF), both signs.
    const auto code = [](uint64_t seed, size_t i) {
      const auto q = static_cast<uint8_t>(moe::rng_u64(seed, 1, i));
      return static_cast<uint8_t>((q & 0x7F) == 0x7F ? q ^ 1 : q);
    };
    for (size_t i = 0; i < A.size(); ++i) A[i] = code(1, i);
    for (size_t i = 0; i < B.size(); ++i) B[i] = code(2, i);
    const auto scale_of = [](int64_t R, int64_t K, Fp8Scaling m, uint64_t seed) {
      std::vector<float> s(static_cast<size_t>(moe::cuda::fp8_gemm_scale_count(R, K, m)));
      for (size_t i = 0; i < s.size(); ++i)
        s[i] = std::ldexp(1.0f + static_cast<float>(moe::rng_u64(seed, 2, i) % 64) / 64.0f,
                          -static_cast<int>(moe::rng_u64(seed, 3, i) % 8));
      return s;
    };
    const auto sa = scale_of(c.M, c.K, c.a, 3), sb = scale_of(c.N, c.K, c.b, 4);
    const int64_t ldc = c.N + 4;
    std::vector<float> C = normal_floats(c.M * ldc, 5);
    DeviceVec<uint8_t> dA(A), dB(B);
    DeviceVec<float> dsa(sa), dsb(sb), dC(C);
    ready();
    cpu().gemm_fp8(c.M, c.N, c.K, A.data(), sa.data(), c.a, B.data(), sb.data(), c.b, -0.5f,
                   C.data(), ldc);
    gpu().gemm_fp8(c.M, c.N, c.K, dA.get(), dsa.get(), c.a, dB.get(), dsb.get(), c.b, -0.5f,
                   dC.get(), ldc);
    ASSERT_TRUE(any_nonzero(C));
    // Sums of hundreds of products cancel: the bound is relative to the largest output
    // (Hopper's FP8 tensor cores accumulate in reduced precision between promotions).
    double most = 0;
    for (float v : C) most = std::max(most, std::fabs(static_cast<double>(v)));
    EXPECT_TRUE(all_close(fetch(dC), C, 1e-4 * most, 1e-4));
  }
}

// The linear layer's native FP8 path (model/linear.h: codes and transposed codes in the
// weight copy, activations quantized into the FP8 scratch with rows padded to 16) on cuBLASLt
// against the CPU's native mode, which builds the same operands and decodes them into an FP32
// GEMM: the packed weight bit for bit, the three GEMMs within the FP8 GEMM bound above.
// 37 tokens (padded to 48), two weight-gradient blocks. Hopper only.
TEST_F(CudaOps, LinearFp8NativeMatchesCpu) {
  if (!gpu().gemm_fp8_native()) GTEST_SKIP() << "cuBLASLt FP8 block scaling needs sm_90";
  ASSERT_FALSE(moe::ops_cuda_create(kLimits, true, false)->gemm_fp8_native())
      << "precision.native_gemm = false keeps the emulation";
  const std::unique_ptr<moe::Ops<float>> cpu8 = moe::ops_cpu_create<float>(false, true);
  const moe::PrecisionMode mode = moe::PrecisionMode::kFp8;
  const int64_t N = 37, IC = 144, OC = 160;
  const int64_t cap = std::max(N * OC, (moe::linear_fp8_scratch_bytes(N, IC, OC) + 3) / 4);
  const auto w = normal_floats(OC * IC, 71, 0.05f), x = normal_floats(N * IC, 72),
             dy = normal_floats(N * OC, 73);
  const std::vector<float> zeros(static_cast<size_t>(cap));
  std::vector<float> wq(w.size()), sa(zeros), sb(zeros);
  const moe::LinearScratch<float> hs{sa.data(), sb.data(), cap};
  DeviceVec<float> d_w(w), d_wq(wq), d_sa(zeros), d_sb(zeros), d_x(x), d_dy(dy);
  const moe::LinearScratch<float> gs{d_sa.get(), d_sb.get(), cap};
  ready();

  moe::linear_quantize_weight<float>(*cpu8, wq.data(), w.data(), OC, IC, IC, mode);
  moe::linear_quantize_weight<float>(gpu(), d_wq.get(), d_w.get(), OC, IC, IC, mode);
  const int64_t packed = moe::linear_fp8_weight_layout(OC, IC).tmp;  // codes and scale tables
  const std::vector<float> got_wq = fetch(d_wq);
  EXPECT_EQ(0, std::memcmp(got_wq.data(), wq.data(), static_cast<size_t>(packed)));

  const auto bound = [](const std::vector<float>& v) {
    double most = 0;
    for (float e : v) most = std::max(most, std::fabs(static_cast<double>(e)));
    return 1e-4 * most;
  };
  std::vector<float> y(static_cast<size_t>(N * OC));
  DeviceVec<float> d_y(y);
  moe::linear_forward<float>(*cpu8, y.data(), x.data(), wq.data(), N, IC, OC, mode, hs);
  moe::linear_forward<float>(gpu(), d_y.get(), d_x.get(), d_wq.get(), N, IC, OC, mode, gs);
  ASSERT_TRUE(any_nonzero(y));
  EXPECT_TRUE(all_close(fetch(d_y), y, bound(y), 1e-4)) << "forward";

  std::vector<float> dx = normal_floats(N * IC, 74);
  DeviceVec<float> d_dx(dx);
  moe::linear_backward_input<float>(*cpu8, dx.data(), dy.data(), wq.data(), N, IC, OC, mode, hs,
                                    true);
  moe::linear_backward_input<float>(gpu(), d_dx.get(), d_dy.get(), d_wq.get(), N, IC, OC, mode,
                                    gs, true);
  EXPECT_TRUE(all_close(fetch(d_dx), dx, bound(dx), 1e-4)) << "input gradient (accumulated)";

  const int64_t blocks[3] = {0, 5, N};
  std::vector<float> dw(w.size());
  DeviceVec<float> d_dw(dw);
  moe::linear_backward_weight<float>(*cpu8, dw.data(), dy.data(), x.data(), N, IC, OC, mode, hs,
                                     blocks, 2);
  moe::linear_backward_weight<float>(gpu(), d_dw.get(), d_dy.get(), d_x.get(), N, IC, OC, mode,
                                     gs, blocks, 2);
  ASSERT_TRUE(any_nonzero(dw));
  EXPECT_TRUE(all_close(fetch(d_dw), dw, bound(dw), 1e-4)) << "weight gradient";
}

// The linear layer's three GEMMs (dweight accumulates) and an empty reduction (K = 0: beta C).
TEST_F(CudaOps, MatmulsAndEmptyReductionMatchCpu) {
  const int64_t N = 71, IC = 229, OC = 130;
  const auto inp = normal_floats(N * IC, 14), wt = normal_floats(OC * IC, 15, 0.1f),
             dout = normal_floats(N * OC, 16);
  std::vector<float> out(N * OC), dinp(N * IC), dwt = normal_floats(OC * IC, 17);
  DeviceVec<float> d_inp(inp), d_w(wt), d_dout(dout), d_out(normal_floats(N * OC, 18)),
      d_dinp(normal_floats(N * IC, 19)), d_dw(dwt);
  ready();
  cpu().matmul_forward(out.data(), inp.data(), wt.data(), N, IC, OC);
  cpu().matmul_backward_input(dinp.data(), dout.data(), wt.data(), N, IC, OC);
  cpu().matmul_backward_weight(dwt.data(), dout.data(), inp.data(), N, IC, OC);
  gpu().matmul_forward(d_out.get(), d_inp.get(), d_w.get(), N, IC, OC);
  gpu().matmul_backward_input(d_dinp.get(), d_dout.get(), d_w.get(), N, IC, OC);
  gpu().matmul_backward_weight(d_dw.get(), d_dout.get(), d_inp.get(), N, IC, OC);
  EXPECT_TRUE(all_close(fetch(d_out), out, 1e-4, 1e-4));
  EXPECT_TRUE(all_close(fetch(d_dinp), dinp, 1e-4, 1e-4));
  EXPECT_TRUE(all_close(fetch(d_dw), dwt, 1e-4, 1e-4));

  std::vector<float> C = normal_floats(5 * 7, 20);
  DeviceVec<float> dC(C);
  ready();
  cpu().gemm(false, false, 5, 7, 0, 1.0f, nullptr, 1, nullptr, 7, 0.5f, C.data(), 7);
  gpu().gemm(false, false, 5, 7, 0, 1.0f, nullptr, 1, nullptr, 7, 0.5f, dC.get(), 7);
  EXPECT_TRUE(same_bits(fetch(dC), C));
}

// Against the CPU's padded form; per shape, the same bits every run. Whether a row's bits are
// the same in a 3-row and a 300-row call is printed, not asserted (cuda_ops.cu: unverified).
TEST_F(CudaOps, GemmRowsInvariantMatchesCpu) {
  const int64_t K = 64, N = 48, ldc = N;
  const auto B = normal_floats(N * K, 21);
  std::vector<float> pad(moe::cpu::gemm_rows_invariant_pad_count(K, N));
  std::vector<std::vector<float>> rows_of;
  for (const int64_t M : {int64_t(3), int64_t(300)}) {
    const auto A = normal_floats(300 * K, 22);  // the same first rows for both M
    std::vector<float> C(M * ldc);
    DeviceVec<float> dA(A), dB(B), dC(M * ldc), dC2(M * ldc);
    ready();
    cpu().gemm_rows_invariant(true, M, N, K, A.data(), K, B.data(), K, 0.0f, C.data(), ldc,
                              pad.data(), static_cast<int64_t>(pad.size()));
    gpu().gemm_rows_invariant(true, M, N, K, dA.get(), K, dB.get(), K, 0.0f, dC.get(), ldc,
                              nullptr, 0);
    gpu().gemm_rows_invariant(true, M, N, K, dA.get(), K, dB.get(), K, 0.0f, dC2.get(), ldc,
                              nullptr, 0);
    const auto got = fetch(dC);
    EXPECT_TRUE(all_close(got, C, 1e-4, 1e-4)) << "M " << M;
    EXPECT_TRUE(same_bits(fetch(dC2), got)) << "M " << M;
    rows_of.push_back(std::vector<float>(got.begin(), got.begin() + 3 * ldc));
  }
  std::cout << "NOTE: cuBLAS rows of a 3-row and a 300-row GEMM are "
            << (same_bits(rows_of[0], rows_of[1]) ? "bitwise equal" : "NOT bitwise equal")
            << " (K " << K << ", N " << N << ")\n";
}

// ---- dense kernels ----------------------------------------------------------------------------

TEST_F(CudaOps, EmbeddingMatchesCpuBitwise) {
  const int64_t N = 300, C = 229, V = 257;
  auto tokens = random_ints(N, 0, V, 30);
  for (int64_t i = 0; i < N; i += 3) tokens[i] = 1;  // a hot row
  const auto wte = normal_floats(V * C, 31), dout = normal_floats(N * C, 32);
  std::vector<float> out(N * C), dwte = normal_floats(V * C, 33);
  DeviceVec<int32_t> d_tok(tokens);
  DeviceVec<float> d_wte(wte), d_dout(dout), d_out(normal_floats(N * C, 34)), d_dwte(dwte);
  ready();
  cpu().embedding_forward(out.data(), tokens.data(), wte.data(), N, C, V);
  cpu().embedding_backward(dwte.data(), dout.data(), tokens.data(), N, C, V);
  gpu().embedding_forward(d_out.get(), d_tok.get(), d_wte.get(), N, C, V);
  gpu().embedding_backward(d_dwte.get(), d_dout.get(), d_tok.get(), N, C, V);
  EXPECT_TRUE(same_bits(fetch(d_out), out));
  EXPECT_TRUE(same_bits(fetch(d_dwte), dwte));
}

TEST_F(CudaOps, RmsnormMatchesCpu) {
  for (const auto& [N, C] : {std::pair<int64_t, int64_t>{71, 229}, {300, 1500}, {1, 1}}) {
    SCOPED_TRACE(::testing::Message() << N << "x" << C);
    const auto x = normal_floats(N * C, 40), g = normal_floats(N * C, 41);
    auto w = normal_floats(C, 42, 0.1f);
    for (float& v : w) v += 1.0f;
    std::vector<float> out(N * C), rstd(N), dx = normal_floats(N * C, 43),
                                           dw = normal_floats(C, 44);
    const std::vector<float> dw0 = dw;
    DeviceVec<float> d_x(x), d_g(g), d_w(w), d_out(normal_floats(N * C, 45)),
        d_rstd(normal_floats(N, 46)), d_dx(dx), d_dw(dw);
    ready();
    cpu().rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, C, 1e-6f);
    cpu().rmsnorm_backward_input(dx.data(), g.data(), x.data(), w.data(), rstd.data(), N, C);
    cpu().rmsnorm_backward_weight(dw.data(), g.data(), x.data(), rstd.data(), N, C);
    gpu().rmsnorm_forward(d_out.get(), d_rstd.get(), d_x.get(), d_w.get(), N, C, 1e-6f);
    // The backward from the CPU's rstd, so only the backward's own error is measured.
    DeviceVec<float> d_rstd_cpu(rstd);
    ready();
    gpu().rmsnorm_backward_input(d_dx.get(), d_g.get(), d_x.get(), d_w.get(), d_rstd_cpu.get(), N,
                                 C);
    gpu().rmsnorm_backward_weight(d_dw.get(), d_g.get(), d_x.get(), d_rstd_cpu.get(), N, C);
    EXPECT_TRUE(all_close(fetch(d_out), out, 1e-6, 1e-5));
    EXPECT_TRUE(all_close(fetch(d_rstd), rstd, 1e-6, 1e-5));
    EXPECT_TRUE(all_close(fetch(d_dx), dx, 1e-5, 1e-5));
    const auto got = fetch(d_dw);
    for (int64_t c = 0; c < C; ++c) {
      double mag = std::fabs(dw0[c]);
      for (int64_t n = 0; n < N; ++n)
        mag += std::fabs(double(g[n * C + c]) * x[n * C + c] * rstd[n]);
      ASSERT_NEAR(got[c], dw[c], 1e-6 * mag) << "column " << c;
    }
  }
}

// In place inside wider rows (stride > H HD): the untouched elements are compared too.
TEST_F(CudaOps, RopeMatchesCpu) {
  const int64_t B = 2, T = 37, H = 3, HD = 16, stride = H * HD + 5;
  std::vector<float> c(T * HD / 2), s(T * HD / 2);
  DeviceVec<float> d_c(T * HD / 2), d_s(T * HD / 2);
  ready();
  cpu().rope_tables(c.data(), s.data(), T, HD, 10000.0);
  gpu().rope_tables(d_c.get(), d_s.get(), T, HD, 10000.0);
  EXPECT_TRUE(all_close(fetch(d_c), c, 1e-6, 1e-5));
  EXPECT_TRUE(all_close(fetch(d_s), s, 1e-6, 1e-5));
  auto fwd = normal_floats(B * T * stride, 47), bwd = fwd;
  DeviceVec<float> d_cc(c), d_ss(s), d_x(fwd), d_dx(bwd);  // the CPU's tables on both sides
  ready();
  cpu().rope_forward(fwd.data(), c.data(), s.data(), B, T, H, HD, stride);
  cpu().rope_backward(bwd.data(), c.data(), s.data(), B, T, H, HD, stride);
  gpu().rope_forward(d_x.get(), d_cc.get(), d_ss.get(), B, T, H, HD, stride);
  gpu().rope_backward(d_dx.get(), d_cc.get(), d_ss.get(), B, T, H, HD, stride);
  EXPECT_TRUE(all_close(fetch(d_x), fwd, 1e-6, 1e-5));
  EXPECT_TRUE(all_close(fetch(d_dx), bwd, 1e-6, 1e-5));
}

// GQA (NKV < NH) and MLA-like (HDv != HD) shapes, T off the 32-row tile.
TEST_F(CudaOps, AttentionMatchesCpu) {
  struct Shape {
    int64_t B, T, NH, NKV, HD, HDv;
  };
  for (const Shape sh : {Shape{2, 37, 4, 2, 16, 16}, Shape{1, 70, 2, 2, 24, 16}}) {
    SCOPED_TRACE(::testing::Message() << "T " << sh.T << " HD " << sh.HD << " HDv " << sh.HDv);
    const int64_t N = sh.B * sh.T, W = (sh.NH + sh.NKV) * sh.HD + sh.NKV * sh.HDv;
    const int64_t nl = sh.B * sh.NH * sh.T;
    const int64_t ns_cpu =
        moe::cpu::attention_scratch_elems(sh.B, sh.T, sh.NH, sh.NKV, sh.HD, sh.HDv);
    const int64_t ns_gpu =
        moe::cuda::attention_scratch_floats({sh.B, sh.T, sh.NH, sh.NKV, sh.HD, sh.HDv});
    const auto qkv = normal_floats(N * W, 50), dout = normal_floats(N * sh.NH * sh.HDv, 51);
    std::vector<float> out(N * sh.NH * sh.HDv), lse(nl), dqkv(N * W), scratch(ns_cpu);
    DeviceVec<float> d_qkv(qkv), d_dout(dout), d_out(out.size()), d_lse(nl), d_dqkv(N * W),
        d_scratch(ns_gpu);
    ready();
    cpu().attention_forward(out.data(), lse.data(), qkv.data(), sh.B, sh.T, sh.NH, sh.NKV, sh.HD,
                            sh.HDv, scratch.data());
    cpu().attention_backward(dqkv.data(), dout.data(), qkv.data(), lse.data(), sh.B, sh.T, sh.NH,
                             sh.NKV, sh.HD, sh.HDv, scratch.data());
    gpu().attention_forward(d_out.get(), d_lse.get(), d_qkv.get(), sh.B, sh.T, sh.NH, sh.NKV,
                            sh.HD, sh.HDv, d_scratch.get());
    gpu().attention_backward(d_dqkv.get(), d_dout.get(), d_qkv.get(), d_lse.get(), sh.B, sh.T,
                             sh.NH, sh.NKV, sh.HD, sh.HDv, d_scratch.get());
    EXPECT_TRUE(all_close(fetch(d_out), out, 2e-5, 1e-4));
    EXPECT_TRUE(all_close(fetch(d_lse), lse, 2e-5, 1e-4));
    ASSERT_TRUE(any_nonzero(dqkv));
    EXPECT_TRUE(all_close(fetch(d_dqkv), dqkv, 1e-4, 1e-3));
  }
}

TEST_F(CudaOps, SwigluAndResidualMatchCpu) {
  const int64_t N = 71, F = 229;
  const auto gu = normal_floats(N * 2 * F, 52, 3.0f), dout = normal_floats(N * F, 53);
  std::vector<float> out(N * F), dgu(N * 2 * F), res(N * F);
  DeviceVec<float> d_gu(gu), d_dout(dout), d_out(normal_floats(N * F, 54)),
      d_dgu(normal_floats(N * 2 * F, 55)), d_res(N * F);
  ready();
  cpu().swiglu_forward(out.data(), gu.data(), N, F);
  cpu().swiglu_backward(dgu.data(), dout.data(), gu.data(), N, F);
  cpu().residual_forward(res.data(), gu.data(), dout.data(), N * F);
  gpu().swiglu_forward(d_out.get(), d_gu.get(), N, F);
  gpu().swiglu_backward(d_dgu.get(), d_dout.get(), d_gu.get(), N, F);
  gpu().residual_forward(d_res.get(), d_gu.get(), d_dout.get(), N * F);
  EXPECT_TRUE(all_close(fetch(d_out), out, 1e-6, 1e-5));
  EXPECT_TRUE(all_close(fetch(d_dgu), dgu, 1e-5, 1e-5));
  EXPECT_TRUE(same_bits(fetch(d_res), res));
}

TEST_F(CudaOps, CrossEntropyAndScoredLossMatchCpu) {
  const int64_t N = 71, V = 257;
  const auto logits = normal_floats(N * V, 56, 4.0f);
  auto targets = random_ints(N, 0, V, 57);
  for (int64_t i = 0; i < N; i += 5) targets[i] = -1;
  std::vector<float> losses(N), probs(N * V), dlogits(N * V);
  const float dloss = 1.0f / 37.0f;
  DeviceVec<float> d_logits(logits), d_losses(normal_floats(N, 58)),
      d_probs(normal_floats(N * V, 59)), d_dlogits(normal_floats(N * V, 60));
  DeviceVec<int32_t> d_targets(targets);
  ready();
  cpu().cross_entropy_forward(losses.data(), probs.data(), logits.data(), targets.data(), N, V);
  cpu().cross_entropy_backward(dlogits.data(), probs.data(), targets.data(), dloss, N, V);
  gpu().cross_entropy_forward(d_losses.get(), d_probs.get(), d_logits.get(), d_targets.get(), N, V);
  EXPECT_TRUE(all_close(fetch(d_losses), losses, 1e-5, 1e-5));
  EXPECT_TRUE(all_close(fetch(d_probs), probs, 1e-7, 1e-5));
  DeviceVec<float> d_cpu_probs(probs);  // the backward from the CPU's probs: bitwise
  ready();
  gpu().cross_entropy_backward(d_dlogits.get(), d_cpu_probs.get(), d_targets.get(), dloss, N, V);
  EXPECT_TRUE(same_bits(fetch(d_dlogits), dlogits));

  // scored_loss_accumulate over many tokens, twice onto non-zero sums: the mean (over the
  // counted tokens, divided) and the sum to rounding, the same bits every run (one block,
  // fixed order), nothing added to the mean when no token counts.
  for (const int64_t n : {int64_t(0), int64_t(1), int64_t(5000)}) {
    auto l = normal_floats(std::max<int64_t>(n, 1), 61);
    for (float& v : l) v = std::fabs(v) * 3.0f;
    auto t = random_ints(std::max<int64_t>(n, 1), -1, 4, 62);  // about a quarter ignored
    const std::vector<double> start = {0.25, 1.5};
    std::vector<double> want = start;
    cpu().scored_loss_accumulate(want.data(), l.data(), t.data(), n, 3.0);
    cpu().scored_loss_accumulate(want.data(), l.data(), t.data(), n, 3.0);
    DeviceVec<float> d_l(l);
    DeviceVec<int32_t> d_t(t);
    DeviceVec<double> d_acc(start), d_again(start);
    ready();
    gpu().scored_loss_accumulate(d_acc.get(), d_l.get(), d_t.get(), n, 3.0);
    gpu().scored_loss_accumulate(d_acc.get(), d_l.get(), d_t.get(), n, 3.0);
    gpu().scored_loss_accumulate(d_again.get(), d_l.get(), d_t.get(), n, 3.0);
    gpu().scored_loss_accumulate(d_again.get(), d_l.get(), d_t.get(), n, 3.0);
    const std::vector<double> got = fetch(d_acc), again = fetch(d_again);
    if (n == 0) {
      EXPECT_EQ(want, start);
    }
    for (int i = 0; i < 2; ++i) {
      EXPECT_NEAR(got[i], want[i], 1e-12 * std::fabs(want[i])) << n << " " << i;
      EXPECT_EQ(std::memcmp(&got[i], &again[i], sizeof(double)), 0) << n << " " << i;
    }
  }
}

TEST_F(CudaOps, MtpShiftMatchesCpuExactly) {
  const int64_t B = 3, T = 17;
  auto y = random_ints(B * T, 0, 1000, 63);
  for (int64_t i = 0; i < B * T; i += 7) y[i] = -1;  // ignored targets become token 0
  DeviceVec<int32_t> d_y(y), d_tok(B * T), d_tgt(B * T);
  ready();
  for (const int64_t k : {int64_t(0), int64_t(1), int64_t(2), int64_t(16), int64_t(17),
                          int64_t(20)}) {
    std::vector<int32_t> tok(B * T), tgt(B * T);
    cpu().mtp_shift(tok.data(), tgt.data(), y.data(), B, T, k);
    gpu().mtp_shift(d_tok.get(), d_tgt.get(), d_y.get(), B, T, k);
    EXPECT_EQ(fetch(d_tok), tok) << "k " << k;
    EXPECT_EQ(fetch(d_tgt), tgt) << "k " << k;
  }
}

// ---- MoE kernels --------------------------------------------------------------------------------

struct RouterShape {
  int64_t B, T, E, K, G, KG;
  int64_t N() const { return B * T; }
};
const RouterShape kRouterShapes[] = {{2, 37, 8, 2, 1, 1}, {3, 71, 64, 6, 8, 3}};

// Forward: scores to expf's ulps, ids equal for (nearly) every token (a few ulps can swap two
// close scores), weights wherever the ids agree. Backward and aux loss from the CPU's routing.
TEST_F(CudaOps, RouterAndAuxLossMatchCpu) {
  for (const RouterShape& sh : kRouterShapes)
    for (const ScoreFn fn : {ScoreFn::kSigmoid, ScoreFn::kSoftmax}) {
      SCOPED_TRACE(::testing::Message() << "E " << sh.E << " fn " << int(fn));
      const int64_t N = sh.N(), E = sh.E, K = sh.K;
      const double rs = 2.5, alpha = 0.01;
      const auto logits = normal_floats(N * E, 70, 2.0f), bias = normal_floats(E, 71, 0.05f);
      std::vector<float> scores(N * E), weights(N * K);
      std::vector<int32_t> ids(N * K);
      DeviceVec<float> d_logits(logits), d_bias(bias), d_scores(normal_floats(N * E, 72)),
          d_weights(normal_floats(N * K, 73));
      DeviceVec<int32_t> d_ids(N * K);
      ready();
      cpu().router_forward(scores.data(), ids.data(), weights.data(), logits.data(), bias.data(),
                           N, E, K, fn, rs, sh.G, sh.KG);
      gpu().router_forward(d_scores.get(), d_ids.get(), d_weights.get(), d_logits.get(),
                           d_bias.get(), N, E, K, fn, rs, sh.G, sh.KG);
      EXPECT_TRUE(all_close(fetch(d_scores), scores, 1e-6, 1e-5));
      const auto got_ids = fetch(d_ids);
      const auto got_w = fetch(d_weights);
      int64_t same = 0;
      for (int64_t n = 0; n < N; ++n) {
        if (!std::equal(ids.begin() + n * K, ids.begin() + (n + 1) * K, got_ids.begin() + n * K))
          continue;
        ++same;
        for (int64_t k = 0; k < K; ++k)
          EXPECT_NEAR(got_w[n * K + k], weights[n * K + k], 1e-6 + 1e-5 * std::fabs(weights[n * K + k]));
      }
      EXPECT_GE(same * 100, N * 95);

      const auto dweights = normal_floats(N * K, 74), extra = normal_floats(N * E, 75);
      std::vector<float> dlogits(N * E), dlogits_x(N * E), dscores(N * E);
      DeviceVec<float> c_scores(scores), d_dw(dweights), d_extra(extra),
          d_dl(normal_floats(N * E, 76)), d_dlx(normal_floats(N * E, 77)),
          d_ds(normal_floats(N * E, 78));
      DeviceVec<int32_t> c_ids(ids);
      ready();
      cpu().router_backward(dlogits.data(), dweights.data(), nullptr, scores.data(), ids.data(), N,
                            E, K, fn, rs);
      cpu().router_backward(dlogits_x.data(), dweights.data(), extra.data(), scores.data(),
                            ids.data(), N, E, K, fn, rs);
      gpu().router_backward(d_dl.get(), d_dw.get(), nullptr, c_scores.get(), c_ids.get(), N, E, K,
                            fn, rs);
      gpu().router_backward(d_dlx.get(), d_dw.get(), d_extra.get(), c_scores.get(), c_ids.get(), N,
                            E, K, fn, rs);
      ASSERT_TRUE(any_nonzero(dlogits));
      EXPECT_TRUE(all_close(fetch(d_dl), dlogits, 1e-6, 1e-5));
      EXPECT_TRUE(all_close(fetch(d_dlx), dlogits_x, 1e-6, 1e-5));

      // Added onto 0.5, twice: the loss itself is the difference of the two sums.
      double want_acc = 0.5;
      cpu().aux_loss_forward(&want_acc, scores.data(), ids.data(), sh.B, sh.T, E, K, alpha);
      const double want_loss = want_acc - 0.5;
      cpu().aux_loss_backward(dscores.data(), scores.data(), ids.data(), sh.B, sh.T, E, K, alpha,
                              0.7f);
      DeviceVec<double> d_acc(std::vector<double>{0.5});
      gpu().aux_loss_forward(d_acc.get(), c_scores.get(), c_ids.get(), sh.B, sh.T, E, K, alpha);
      const double once = fetch(d_acc)[0];
      gpu().aux_loss_forward(d_acc.get(), c_scores.get(), c_ids.get(), sh.B, sh.T, E, K, alpha);
      const double got_loss = once - 0.5, again = fetch(d_acc)[0] - once;
      gpu().aux_loss_backward(d_ds.get(), c_scores.get(), c_ids.get(), sh.B, sh.T, E, K, alpha,
                              0.7f);
      ASSERT_GT(want_loss, 0.0);
      EXPECT_NEAR(got_loss, want_loss, 1e-7 + 1e-5 * want_loss);
      EXPECT_EQ(got_loss, again);
      ASSERT_TRUE(any_nonzero(dscores));
      EXPECT_TRUE(all_close(fetch(d_ds), dscores, 1e-7, 1e-5));
    }
}

// Expert ids biased towards the low experts (the high ones empty), one token repeated.
std::vector<int32_t> skewed_ids(int64_t N, int64_t E, int64_t K, uint64_t seed) {
  std::vector<int32_t> ids(N * K);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t src = n % 5 == 4 ? 0 : n;
    const int64_t start =
        static_cast<int64_t>(moe::rng_u64(seed, 4, src) % static_cast<uint64_t>(E / 2));
    for (int64_t k = 0; k < K; ++k) ids[n * K + k] = static_cast<int32_t>((start + k) % E);
  }
  return ids;
}

TEST_F(CudaOps, MoePlanPermuteAndCombineMatchCpu) {
  struct Shape {
    int64_t N, E, K, C;
  };
  for (const Shape sh : {Shape{300, 64, 6, 256}, Shape{71, 8, 2, 229}, Shape{0, 8, 2, 16}}) {
    SCOPED_TRACE(::testing::Message() << "N " << sh.N << " E " << sh.E);
    const int64_t N = sh.N, E = sh.E, K = sh.K, C = sh.C, P = N * K;
    const auto ids = skewed_ids(N, E, K, 80);
    std::vector<int64_t> counts(E, -7), offsets(E + 1, -7), g_counts(E, -7), g_offsets(E + 1, -7);
    std::vector<int32_t> row_of(P), token_of(P);
    DeviceVec<int32_t> d_ids(ids), d_row(std::vector<int32_t>(P, -7)),
        d_tok(std::vector<int32_t>(P, -7));
    ready();
    cpu().moe_plan(counts.data(), offsets.data(), row_of.data(), token_of.data(), ids.data(), N,
                   E, K);
    gpu().moe_plan(g_counts.data(), g_offsets.data(), d_row.get(), d_tok.get(), d_ids.get(), N, E,
                   K);
    EXPECT_EQ(g_counts, counts);
    EXPECT_EQ(g_offsets, offsets);
    EXPECT_EQ(fetch(d_row), row_of);
    EXPECT_EQ(fetch(d_tok), token_of);
    if (N > 0) {
      EXPECT_EQ(counts[E - 1], 0) << "the test means to cover empty experts";
    }

    const auto x = normal_floats(N * C, 81), dxp = normal_floats(P * C, 82),
               yp = normal_floats(P * C, 83), w = normal_floats(N * K, 84),
               dout = normal_floats(N * C, 85);
    std::vector<float> xp(P * C), dx(N * C), out(N * C), dyp(P * C), dw(N * K);
    DeviceVec<float> d_x(x), d_dxp(dxp), d_yp(yp), d_w(w), d_dout(dout),
        d_xp(normal_floats(P * C, 86)), d_dx(normal_floats(N * C, 87)),
        d_out(normal_floats(N * C, 88)), d_dyp(normal_floats(P * C, 89)),
        d_dw(normal_floats(N * K, 90));
    DeviceVec<int32_t> c_row(row_of), c_tok(token_of);
    ready();
    cpu().moe_permute_forward(xp.data(), x.data(), token_of.data(), P, C);
    cpu().moe_permute_backward(dx.data(), dxp.data(), row_of.data(), N, K, C);
    cpu().moe_combine_forward(out.data(), yp.data(), w.data(), row_of.data(), N, K, C);
    cpu().moe_combine_backward(dyp.data(), dw.data(), dout.data(), yp.data(), w.data(),
                               row_of.data(), N, K, C);
    gpu().moe_permute_forward(d_xp.get(), d_x.get(), c_tok.get(), P, C);
    gpu().moe_permute_backward(d_dx.get(), d_dxp.get(), c_row.get(), N, K, C);
    gpu().moe_combine_forward(d_out.get(), d_yp.get(), d_w.get(), c_row.get(), N, K, C);
    gpu().moe_combine_backward(d_dyp.get(), d_dw.get(), d_dout.get(), d_yp.get(), d_w.get(),
                               c_row.get(), N, K, C);
    EXPECT_TRUE(same_bits(fetch(d_xp), xp));
    EXPECT_TRUE(same_bits(fetch(d_dx), dx));
    EXPECT_EQ(any_nonzero(out), N > 0);
    EXPECT_TRUE(all_close(fetch(d_out), out, 1e-7, 1e-6));
    EXPECT_TRUE(same_bits(fetch(d_dyp), dyp));
    EXPECT_TRUE(all_close(fetch(d_dw), dw, 1e-6, 1e-5));
  }
}

// ---- quantization ---------------------------------------------------------------------------

// Normal values over many binades, with the specials a rounding must keep: +-0, +-inf,
// subnormals, values past FP8's range, BF16 ties (1 + 2^-8 rounds to 1, 1 + 3 2^-8 up).
std::vector<float> quant_inputs(size_t n, uint64_t seed, bool with_nan) {
  auto v = normal_floats(n, seed);
  for (size_t i = 0; i < n; ++i) v[i] *= std::ldexp(1.0f, static_cast<int>(i % 29) - 14);
  const float specials[] = {0.0f, -0.0f, INFINITY, -INFINITY, 1e-40f, -3e-39f, 1000.0f,
                            -1e6f, 1.00390625f, 1.01171875f, FLT_MAX};
  for (size_t i = 0; i < std::size(specials) && 7 * i < n; ++i) v[7 * i] = specials[i];
  if (with_nan && n > 100) v[100] = std::numeric_limits<float>::quiet_NaN();
  return v;
}

TEST_F(CudaOps, QuantizationMatchesCpuBitwise) {
  const int64_t R = 130, C = 259;
  const auto x = quant_inputs(R * C, 91, false);
  for (const moe::Fp8Tile t : {moe::kTileAct, moe::kTileActT, moe::kTileWeight}) {
    SCOPED_TRACE(::testing::Message() << "tile " << t.rows << "x" << t.cols);
    const int64_t ns = moe::fp8_scale_count(R, C, t);
    std::vector<uint8_t> q(R * C);
    std::vector<float> scales(ns), back(R * C);
    DeviceVec<float> d_x(x), d_scales(ns), d_back(R * C);
    DeviceVec<uint8_t> d_q(R * C);
    ready();
    cpu().fp8_quantize(q.data(), scales.data(), x.data(), R, C, t);
    cpu().fp8_dequantize(back.data(), q.data(), scales.data(), R, C, t);
    gpu().fp8_quantize(d_q.get(), d_scales.get(), d_x.get(), R, C, t);
    gpu().fp8_dequantize(d_back.get(), d_q.get(), d_scales.get(), R, C, t);
    EXPECT_EQ(fetch(d_q), q);
    EXPECT_TRUE(same_bits(fetch(d_scales), scales));
    EXPECT_TRUE(same_bits(fetch(d_back), back));

    // Padded rows; the padding of out keeps its garbage on both sides.
    const int64_t ld_x = C + 3, ld_out = C + 5;
    const auto xp = quant_inputs(R * ld_x, 92, false);
    auto out = normal_floats(R * ld_out, 93);
    DeviceVec<float> d_xp(xp), d_out(out);
    ready();
    cpu().fp8_fake_quantize_ld(out.data(), ld_out, xp.data(), ld_x, R, C, t);
    gpu().fp8_fake_quantize_ld(d_out.get(), ld_out, d_xp.get(), ld_x, R, C, t);
    EXPECT_TRUE(same_bits(fetch(d_out), out));
  }

  // BF16, NaN included (integer work on both sides: 0x7FFF whatever the payload).
  const int64_t n = 71 * 229;
  const auto xb = quant_inputs(n, 94, true);
  std::vector<float> fake(n), rounded(n), decoded(n);
  std::vector<uint16_t> bits(n), bits_only(n);
  DeviceVec<float> d_xb(xb), d_fake(n), d_rounded(n), d_decoded(n);
  DeviceVec<uint16_t> d_bits(n), d_bits_only(n);
  ready();
  cpu().bf16_fake_quantize(fake.data(), xb.data(), n);
  cpu().bf16_encode(bits.data(), rounded.data(), xb.data(), n);
  cpu().bf16_encode(bits_only.data(), nullptr, xb.data(), n);
  cpu().bf16_decode(decoded.data(), bits.data(), n);
  gpu().bf16_fake_quantize(d_fake.get(), d_xb.get(), n);
  gpu().bf16_encode(d_bits.get(), d_rounded.get(), d_xb.get(), n);
  gpu().bf16_encode(d_bits_only.get(), nullptr, d_xb.get(), n);
  gpu().bf16_decode(d_decoded.get(), d_bits.get(), n);
  EXPECT_TRUE(same_bits(fetch(d_fake), fake));
  EXPECT_EQ(fetch(d_bits), bits);
  EXPECT_EQ(fetch(d_bits_only), bits);
  EXPECT_TRUE(same_bits(fetch(d_rounded), rounded));
  EXPECT_TRUE(same_bits(fetch(d_decoded), decoded));
}

}  // namespace
