// Multi-token prediction (model.mtp_depth, DeepSeek-V3 section 2.2):
//  - alignment: module k at position i sees tokens up to t_{i+k+1} and is scored on t_{i+k+2},
//    checked by changing one token of a sequence and watching which losses move;
//  - whole-model gradient checks in double against fourth-order central differences (MoE
//    blocks with shared experts and group-limited routing, dense blocks, MLA), the objective
//    CE + lambda / D sum_k CE_k;
//  - the split backward (kInput / kWeight over chunks and slots) equal to kFull;
//  - through the binary: it trains, dp = 2 x ep = 2 and DualPipe pp = 2 match one process,
//    FP8 at step 1, a stopped run resumes bit for bit, 1f1b with pp > 1 is refused, and the
//    export writes (or with --drop-mtp leaves out) the modules.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "io/checkpoint_file.h"
#include "io/json_lite.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "model/rng.h"
#include "tests/binary_harness.h"
#include "tests/model_gradient_check.h"

namespace moe {
namespace {

ModelDims mtp_dims(int64_t depth, int64_t dense_layers) {
  ModelDims d;
  d.V = 11; d.C = 8; d.L = 2; d.NH = 2; d.NKV = 1; d.HD = 4; d.T = 6; d.F = 12;
  d.dense_layers = dense_layers;
  d.E = 6; d.K = 2; d.FE = 4; d.S = 4; d.G = 3; d.KG = 2;
  d.route_scale = 1.5;
  d.aux_alpha = 0.1;
  d.init_std = 0.4;
  d.mtp = depth;
  d.mtp_weight = 0.7;
  return d;
}

ModelDims mtp_mla_dims() {
  ModelDims d = mtp_dims(1, 1);
  d.attn = AttentionKind::kMla;
  d.q_lora = 6; d.kv_lora = 4; d.qk_nope = 2; d.qk_rope = 2; d.v_hd = 3;
  return d;
}

// B windows of T + 1 tokens: inputs are the first T, targets the last T of each.
void split_windows(const std::vector<int32_t>& w, int64_t B, int64_t T, std::vector<int32_t>& x,
                   std::vector<int32_t>& y) {
  x.assign(static_cast<size_t>(B * T), 0);
  y.assign(static_cast<size_t>(B * T), 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      x[static_cast<size_t>(b * T + t)] = w[static_cast<size_t>(b * (T + 1) + t)];
      y[static_cast<size_t>(b * T + t)] = w[static_cast<size_t>(b * (T + 1) + t + 1)];
    }
}

std::vector<int32_t> random_window(int64_t n, int64_t V, uint64_t seed) {
  std::vector<int32_t> w(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) w[static_cast<size_t>(i)] = static_cast<int32_t>(rng_u64(seed, 5, i) % V);
  return w;
}

// Per-token losses of the main head and of each module after a training forward, and each
// module's block output (per position, C values).
struct TokenOutputs {
  std::vector<std::vector<double>> losses, outs;
};
TokenOutputs token_outputs(Model<double>& m, const std::vector<int32_t>& w, int64_t B) {
  std::vector<int32_t> x, y;
  split_windows(w, B, m.d.T, x, y);
  model_forward<double>(m, x.data(), y.data(), B, m.d.T, true);
  const Activations<double>& a = m.slots[0];
  const int64_t N = B * m.d.T;
  TokenOutputs o;
  o.losses.emplace_back(a.losses, a.losses + N);
  for (const MtpActs<double>& ma : a.mtp) {
    o.losses.emplace_back(ma.losses, ma.losses + N);
    o.outs.emplace_back(ma.out, ma.out + N * m.d.C);
  }
  return o;
}

// Changing token j of a window (t_j) may change the main loss at i only when t_j is among
// t_0 .. t_{i+1}, and module k's only when it is among t_0 .. t_{i+k+2}; the position that is
// scored on t_j must change. Past the end (i + k + 2 > T) a module has no target: loss 0.
// Module k's block output at i sees t_0 .. t_{i+k+1} and no further (its own target must not
// leak into its input).
TEST(MtpForward, ModuleKSeesUpToTokenIPlusKPlusOneAndIsScoredOnTheNext) {
  const ModelDims d = mtp_dims(2, 1);
  Model<double> m;
  model_build<double>(m, d, 1);
  model_init<double>(m, 3);
  const int64_t T = d.T;
  const std::vector<int32_t> w = random_window(T + 1, d.V, 4);
  const TokenOutputs base_o = token_outputs(m, w, 1);
  const auto& base = base_o.losses;
  ASSERT_EQ(base.size(), 3u);
  for (int64_t j = 1; j <= T; ++j) {
    std::vector<int32_t> w2 = w;
    w2[static_cast<size_t>(j)] = (w2[static_cast<size_t>(j)] + 1) % static_cast<int32_t>(d.V);
    const TokenOutputs got_o = token_outputs(m, w2, 1);
    const auto& got = got_o.losses;
    for (int64_t k = 0; k < d.mtp; ++k)
      for (int64_t i = 0; i < T; ++i) {
        const double* b = base_o.outs[static_cast<size_t>(k)].data() + i * d.C;
        const double* g = got_o.outs[static_cast<size_t>(k)].data() + i * d.C;
        const bool same = std::memcmp(b, g, sizeof(double) * static_cast<size_t>(d.C)) == 0;
        if (i + k + 1 < j) {
          EXPECT_TRUE(same) << "module " << k << " pos " << i << " sees t_" << j;
        } else if (i + k + 1 == j) {
          EXPECT_FALSE(same) << "module " << k << " pos " << i << " misses t_" << j;
        }
      }
    for (int64_t head = 0; head < 3; ++head) {
      const int64_t ahead = head + 1;  // head 0 scores t_{i+1}, module k t_{i+k+2}
      for (int64_t i = 0; i < T; ++i) {
        SCOPED_TRACE("token " + std::to_string(j) + " head " + std::to_string(head) + " pos " +
                     std::to_string(i));
        const double b = base[static_cast<size_t>(head)][static_cast<size_t>(i)];
        const double g = got[static_cast<size_t>(head)][static_cast<size_t>(i)];
        if (i + ahead > T) {
          EXPECT_EQ(b, 0.0);
          EXPECT_EQ(g, 0.0);
        } else if (i + ahead < j) {
          EXPECT_EQ(b, g);
        } else if (i + ahead == j) {
          EXPECT_NE(b, g);
        }
      }
    }
  }
}

// eh_proj's input is [enorm(embedding) | hnorm(h_prev)], the released weights' order: each
// half against an independent RMSNorm of what it should hold.
TEST(MtpForward, ProjectionInputIsEmbeddingThenHiddenState) {
  const ModelDims d = mtp_dims(2, 1);
  Model<double> m;
  model_build<double>(m, d, 1);
  model_init<double>(m, 6);
  for (const ParamInfo& p : m.table)  // norms away from 1, so that a swap would show
    if (p.shape.size() == 1)
      for (size_t i = 0; i < p.count; ++i) m.params[p.offset + i] = 0.5 + 0.1 * static_cast<double>(i);
  std::vector<int32_t> x, y;
  split_windows(random_window(d.T + 1, d.V, 8), 1, d.T, x, y);
  model_forward<double>(m, x.data(), y.data(), 1, d.T, true);
  const Activations<double>& a = m.slots[0];
  const int64_t C = d.C;
  auto rmsnorm = [&](const double* v, const double* w, int64_t c) {
    double ss = 0;
    for (int64_t j = 0; j < C; ++j) ss += v[j] * v[j];
    return v[c] / std::sqrt(ss / static_cast<double>(C) + d.norm_eps) * w[c];
  };
  for (int64_t k = 0; k < d.mtp; ++k) {
    const MtpActs<double>& ma = a.mtp[static_cast<size_t>(k)];
    const double* h = k == 0 ? a.res + d.L * d.T * C : a.mtp[static_cast<size_t>(k - 1)].out;
    for (int64_t i = 0; i < d.T; ++i) {
      const int32_t tok = i + k < d.T ? y[static_cast<size_t>(i + k)] : 0;
      EXPECT_EQ(ma.tokens[i], tok);
      for (int64_t c = 0; c < C; ++c) {
        EXPECT_NEAR(ma.cat[i * 2 * C + c], rmsnorm(m.p.wte + tok * C, m.p.mtp[k].enorm, c), 1e-12);
        EXPECT_NEAR(ma.cat[i * 2 * C + C + c], rmsnorm(h + i * C, m.p.mtp[k].hnorm, c), 1e-12);
      }
    }
  }
}

// Fourth-order central differences of test::objective against model_backward, every
// parameter; every MTP tensor must get a gradient.
void gradient_check(const ModelDims& d, uint64_t seed) {
  omp_set_num_threads(1);
  const int64_t B = 2, T = d.T;
  Model<double> m;
  model_build<double>(m, d, B);
  model_init<double>(m, seed);
  test::perturb_norms(m, seed);
  for (int64_t i = 0; i < d.n_moe_blocks() * d.E; ++i)
    m.router_bias[i] = static_cast<float>(0.05 * rng_normal(seed, 77, static_cast<uint64_t>(i)));
  std::vector<int32_t> x, y;
  split_windows(random_window(B * (T + 1), d.V, seed), B, T, x, y);
  const test::FdCheck fd = test::fd_check_fourth_order(m, x, y, B, T);
  ASSERT_TRUE(std::isfinite(fd.base));
  ASSERT_GT(m.mtp_ce_sum, 0.0);
  const double max_err = fd.max_err, max_grad = fd.max_grad;
  const int64_t skipped = fd.skipped;
  const std::vector<double>& analytic = fd.analytic;
  std::printf("max |fd - analytic| %.2e, max |grad| %.2e, %lld routing flips\n", max_err, max_grad,
              static_cast<long long>(skipped));
  EXPECT_GT(max_grad, 1e-3);
  EXPECT_LT(max_err, 1e-9 * std::max(1.0, max_grad));
  EXPECT_LT(skipped, static_cast<int64_t>(m.n_params) / 100) << "too many routing flips";
  int64_t mtp_tensors = 0;
  for (const ParamInfo& p : m.table) {
    if (p.name.rfind("mtp/", 0) != 0) continue;
    double mx = 0;
    for (size_t i = p.offset; i < p.offset + p.count; ++i) mx = std::max(mx, std::fabs(analytic[i]));
    EXPECT_GT(mx, 1e-6) << p.name;
    ++mtp_tensors;
  }
  EXPECT_GT(mtp_tensors, 8 * d.mtp);
}

TEST(MtpGradient, TwoModulesMoeBlocksGroupLimited) { gradient_check(mtp_dims(2, 1), 71); }
TEST(MtpGradient, OneModuleDenseBlocks) { gradient_check(mtp_dims(1, 2), 72); }
TEST(MtpGradient, MlaMoe) { gradient_check(mtp_mla_dims(), 73); }

TEST(MtpGradient, TiedEmbeddings) {
  ModelDims d = mtp_dims(1, 1);
  d.tie_embeddings = true;
  gradient_check(d, 74);
}

// Without targets (generation) or outside training (evaluation) the modules do not run, and
// the main loss is the same as with them.
TEST(MtpForward, EvaluationSkipsTheModulesAndKeepsTheMainLoss) {
  const ModelDims d = mtp_dims(1, 1);
  Model<double> m;
  model_build<double>(m, d, 2);
  model_init<double>(m, 9);
  std::vector<int32_t> x, y;
  split_windows(random_window(2 * (d.T + 1), d.V, 9), 2, d.T, x, y);
  const double train = model_forward<double>(m, x.data(), y.data(), 2, d.T, true);
  EXPECT_GT(m.mtp_ce_sum, 0.0);
  EXPECT_EQ(m.slots[0].mtp_run, 1);
  const double eval = model_forward<double>(m, x.data(), y.data(), 2, d.T, false);
  EXPECT_EQ(m.mtp_ce_sum, 0.0);
  EXPECT_EQ(m.slots[0].mtp_run, 0);
  EXPECT_EQ(train, eval);
}

// grads_ready(stage) promises that every tensor of that stage (model_grad_stage) is final, so
// that its reduction may start: snapshot each tensor when its stage is reported, and compare
// with the gradients at the end. The MTP modules' tensors are stage 0's (with the head).
TEST(MtpBackward, EveryStageIsFinalWhenReported) {
  ModelDims d = mtp_dims(2, 1);
  d.L = 3;
  const int64_t B = 2, N = B * d.T;
  Model<float> m;
  model_build<float>(m, d, B);
  model_init<float>(m, 12);
  model_zero_grads<float>(m);
  std::vector<int32_t> x, y;
  split_windows(random_window(B * (d.T + 1), d.V, 12), B, d.T, x, y);
  model_forward<float>(m, x.data(), y.data(), B, d.T, true);
  std::vector<std::vector<float>> snap(m.table.size());
  std::vector<int64_t> stages;
  m.grads_ready = [&](int64_t stage) {
    stages.push_back(stage);
    for (size_t i = 0; i < m.table.size(); ++i) {
      const ParamInfo& p = m.table[i];
      if (snap[i].empty() && model_grad_stage(d, p) <= stage)
        snap[i].assign(m.grads + p.offset, m.grads + p.offset + p.count);
    }
  };
  model_backward<float>(m, 1.0f / static_cast<float>(N), 1.0f);
  m.grads_ready = nullptr;
  ASSERT_FALSE(stages.empty());
  EXPECT_EQ(stages.front(), 0);
  EXPECT_EQ(stages.back(), d.L + 1);
  EXPECT_TRUE(std::is_sorted(stages.begin(), stages.end()));
  for (size_t i = 0; i < m.table.size(); ++i) {
    const ParamInfo& p = m.table[i];
    ASSERT_EQ(snap[i].size(), p.count) << p.name << " never reported";
    EXPECT_EQ(std::memcmp(snap[i].data(), m.grads + p.offset, sizeof(float) * p.count), 0)
        << p.name << " changed after its stage was reported";
  }
}

// kInput / kWeight over two chunks and two slots (the weight passes late and out of order)
// give kFull's gradients; with MTP the head's kInput also writes the modules' weight
// gradients, which model.h allows.
template <typename T>
class MtpSplitBackward : public ::testing::Test {};
using SplitTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(MtpSplitBackward, SplitTypes);

TYPED_TEST(MtpSplitBackward, ChunksAndSlotsMatchFull) {
  using T = TypeParam;
  ModelDims d = mtp_dims(2, 1);
  d.L = 3;
  const int64_t B = 2, N = B * d.T, L = d.L, l = 2;
  std::vector<std::vector<int32_t>> xs(2), ys(2);
  for (int s = 0; s < 2; ++s) split_windows(random_window(B * (d.T + 1), d.V, 40 + s), B, d.T, xs[s], ys[s]);
  Model<T> ref, m;
  model_build<T>(ref, d, B, 1, 1, {}, 1, false);
  model_build<T>(m, d, B, 1, 1, {}, 2, true);
  model_init<T>(ref, 5);
  model_init<T>(m, 5);
  model_zero_grads<T>(ref);
  model_zero_grads<T>(m);
  const T dce = T(1) / T(N), daux = T(1) / T(B);
  std::vector<std::vector<T>> dx;
  for (int s = 0; s < 2; ++s) {
    model_chunk_forward<T>(ref, 0, 0, L, xs[s].data(), ys[s].data(), B, d.T, true);
    model_chunk_backward<T>(ref, 0, 0, L, dce, daux, BackwardPart::kFull);
    const T* g = model_chunk_grad<T>(ref, 0);
    dx.emplace_back(g, g + N * d.C);
  }
  const int32_t* const x[2] = {xs[0].data(), xs[1].data()};
  const int32_t* const y[2] = {ys[0].data(), ys[1].data()};
  test::run_interleaved_split_backward<T>(m, l, L, x, y, B, d.T, dce, daux);
  const double tol = std::is_same_v<T, float> ? 1e-6 : 1e-13;
  for (int s = 0; s < 2; ++s) {
    const T* g = model_chunk_grad<T>(m, s);
    double mx = 0, err = 0;
    for (int64_t i = 0; i < N * d.C; ++i) {
      mx = std::max(mx, std::fabs(static_cast<double>(dx[s][static_cast<size_t>(i)])));
      err = std::max(err, std::fabs(static_cast<double>(g[i] - dx[s][static_cast<size_t>(i)])));
    }
    EXPECT_LE(err, tol * mx) << "slot " << s;
  }
  for (const ParamInfo& p : ref.table) {
    double mx = 0, err = 0;
    for (size_t i = p.offset; i < p.offset + p.count; ++i) {
      mx = std::max(mx, std::fabs(static_cast<double>(ref.grads[i])));
      err = std::max(err, std::fabs(static_cast<double>(m.grads[i] - ref.grads[i])));
    }
    EXPECT_LE(err, tol * mx) << p.name;
  }
}

}  // namespace
}  // namespace moe

// ---- through the binary ------------------------------------------------------------------

namespace {

using namespace moe_test;

// The harness's tiny model (2 layers: dense then MoE), one MTP module (a MoE block), with
// shared experts so that every kind of tensor is in the module.
std::string mtp_args(int micro_batch, const std::string& extra) {
  return "train --config c.toml --set model.mtp_depth=1 --set moe.num_shared_experts=1"
         " --set training.micro_batch=" + std::to_string(micro_batch) +
         " --set training.steps=12 --set parallel.bucket_mb=0.0078125" + extra;
}

// "mtp_loss" values per step.
std::vector<double> mtp_losses(const fs::path& metrics) {
  std::vector<double> out;
  std::istringstream in(slurp(metrics));
  std::string line;
  while (std::getline(in, line)) {
    const size_t at = line.find("\"mtp_loss\": ");
    if (at != std::string::npos) out.push_back(std::stod(line.substr(at + 12)));
  }
  return out;
}

// It trains (both losses fall; the module predicts two ahead, so its loss stays above the
// main one), the checkpoint holds the module and its router bias, and dp = 2 x ep = 2 is the
// single process's run: losses and the final checkpoint within 1e-5.
TEST(MtpBinary, TrainsAndDataExpertParallelMatchesOneProcess) {
  const fs::path one = make_run("mtp_dp1");
  ASSERT_EQ(run(one, mtp_args(2, "")), 0) << slurp(one / "err.txt");
  const std::vector<std::string> ref = losses(one / "metrics.jsonl");
  const std::vector<double> mtp = mtp_losses(one / "metrics.jsonl");
  ASSERT_EQ(ref.size(), 12u);
  ASSERT_EQ(mtp.size(), 12u);
  EXPECT_LT(std::stod(ref.back()), std::stod(ref.front()) - 0.5) << "the loss did not fall";
  EXPECT_LT(mtp.back(), mtp.front() - 0.3) << "the MTP loss did not fall";
  EXPECT_NE(slurp(one / "log.txt").find("(mtp "), std::string::npos) << slurp(one / "log.txt");
  const fs::path last = one / "ckpt" / "step-00000012.h5";
  moe::CheckpointReader ckpt(last.string());
  int mtp_sets = 0;
  bool bias = false;
  for (const auto& e : ckpt.list()) {
    mtp_sets += e.path.rfind("/model/mtp/0/", 0) == 0;
    bias |= e.path == "/router/mtp/0/bias";
  }
  EXPECT_GT(mtp_sets, 10);
  EXPECT_TRUE(bias);
  const fs::path d = make_run("mtp_dp2_ep2");
  ASSERT_EQ(run(d, mtp_args(2, " --set parallel.dp=2 --set parallel.ep=2"), 2), 0)
      << slurp(d / "err.txt");
  expect_close_losses(losses(d / "metrics.jsonl"), ref, 1e-5);
  const std::vector<double> mtp2 = mtp_losses(d / "metrics.jsonl");
  ASSERT_EQ(mtp2.size(), mtp.size());
  for (size_t i = 0; i < mtp.size(); ++i) EXPECT_NEAR(mtp2[i], mtp[i], 1e-5 * mtp[i]) << i;
  expect_close_checkpoint(last, d / "ckpt" / "step-00000012.h5", 1e-5);
}

// DualPipe over pp = 2 (the head, with the module, and the embedding both on rank 0 and
// rank 1) is the single process's run, in FP32 over 12 steps and with FP8 GEMMs and the FP8
// dispatch at step 1 (as MlaBinary.Fp8DualPipeMatchesOneProcessAtStepOne).
TEST(MtpBinary, DualPipeMatchesOneProcessFp32AndFp8) {
  const std::string pp = " --set model.n_layers=4 --set checkpoint.every=0";
  const std::string one_args = pp + " --set parallel.pp=1 --set parallel.schedule=1f1b";
  const std::string two_args = pp + " --set parallel.pp=2 --set parallel.schedule=dualpipe";
  const fs::path one = make_run("mtp_pp1");
  ASSERT_EQ(run(one, mtp_args(1, one_args)), 0) << slurp(one / "err.txt");
  const fs::path d = make_run("mtp_pp2");
  ASSERT_EQ(run(d, mtp_args(1, two_args), 2), 0) << slurp(d / "err.txt");
  const std::vector<std::string> ref = losses(one / "metrics.jsonl");
  ASSERT_EQ(ref.size(), 12u);
  expect_close_losses(losses(d / "metrics.jsonl"), ref, 1e-5);
  const std::vector<double> mtp1 = mtp_losses(one / "metrics.jsonl"),
                            mtp2 = mtp_losses(d / "metrics.jsonl");
  ASSERT_EQ(mtp1.size(), mtp2.size());
  for (size_t i = 0; i < mtp1.size(); ++i) EXPECT_NEAR(mtp2[i], mtp1[i], 1e-5 * mtp1[i]) << i;
  expect_close_checkpoint(one / "ckpt" / "step-00000012.h5", d / "ckpt" / "step-00000012.h5", 1e-5,
                          1e-3);

  const std::string fp8 = " --set precision.mode=fp8 --set precision.dispatch_fp8=true"
                          " --set training.steps=1";
  const fs::path one8 = make_run("mtp_fp8_pp1");
  ASSERT_EQ(run(one8, mtp_args(1, one_args + fp8)), 0) << slurp(one8 / "err.txt");
  const fs::path d8 = make_run("mtp_fp8_pp2");
  ASSERT_EQ(run(d8, mtp_args(1, two_args + fp8), 2), 0) << slurp(d8 / "err.txt");
  expect_close_losses(losses(d8 / "metrics.jsonl"), losses(one8 / "metrics.jsonl"), 1e-5);
  expect_close_checkpoint(one8 / "ckpt" / "step-00000001.h5", d8 / "ckpt" / "step-00000001.h5",
                          2e-5, 1e-3);
}

// Stopped at step 5 and resumed: the straight run bit for bit (the module's router bias is
// in the checkpoint).
TEST(MtpBinary, ExitAtStepThenResumeEqualsStraight) {
  const fs::path straight = make_run("mtp_straight");
  ASSERT_EQ(run(straight, mtp_args(4, "")), 0) << slurp(straight / "err.txt");
  const fs::path split = make_run("mtp_split");
  ASSERT_EQ(run(split, mtp_args(4, " --set training.exit_at_step=5")), 0) << slurp(split / "err.txt");
  ASSERT_EQ(run(split, mtp_args(4, "") + " --resume"), 0) << slurp(split / "err.txt");
  EXPECT_EQ(losses(split / "metrics.jsonl"), losses(straight / "metrics.jsonl"));
  expect_same_checkpoint(straight / "ckpt" / "step-00000012.h5", split / "ckpt" / "step-00000012.h5");
}

TEST(MtpBinary, OneChunkPipelineIsRefusedInOneLine) {
  const fs::path d = make_run("mtp_1f1b");
  EXPECT_NE(run(d, mtp_args(1, " --set parallel.pp=2 --set parallel.schedule=1f1b"), 2), 0);
  const std::string err = slurp(d / "err.txt");
  EXPECT_NE(err.find("model.mtp_depth > 0 needs the embedding on the head's rank"), std::string::npos)
      << err;
  EXPECT_FALSE(fs::exists(d / "ckpt"));
}

// The export writes the module as the release's layer L (its own embedding and head copies,
// norms, eh_proj, block and router bias), bit for bit from the checkpoint; --drop-mtp leaves
// layer L out and says so in config.json.
TEST(MtpBinary, ExportWritesTheModuleOrDropsIt) {
  const fs::path d = make_run("mtp_export");
  ASSERT_EQ(run(d, mtp_args(4, " --set training.steps=3")), 0) << slurp(d / "err.txt");
  ASSERT_EQ(run(d, "export --checkpoint ckpt --output hf --dtype fp32"), 0) << slurp(d / "err.txt");
  ASSERT_EQ(run(d, "export --checkpoint ckpt --output hf_drop --drop-mtp"), 0) << slurp(d / "err.txt");
  moe::CheckpointReader r((d / "ckpt" / "step-00000003.h5").string());
  auto ckpt = [&](const std::string& path) {
    for (const auto& e : r.list())
      if (e.path == path) {
        int64_t n = 1;
        for (int64_t s : e.shape) n *= s;
        std::vector<float> v(static_cast<size_t>(n));
        r.read_f32(path, e.shape, v.data(), e.shape.back());
        return v;
      }
    ADD_FAILURE() << "no " << path;
    return std::vector<float>{};
  };
  const moe::SafetensorsHeader h = moe::safetensors_read_header((d / "hf" / "model.safetensors").string());
  auto exported = [&](const std::string& name) {
    for (const moe::SafetensorsTensor& t : h.tensors)
      if (t.name == name) {
        const std::string bytes = moe::safetensors_read_bytes((d / "hf" / "model.safetensors").string(), h, t);
        std::vector<float> v(bytes.size() / 4);
        std::memcpy(v.data(), bytes.data(), bytes.size());
        return v;
      }
    ADD_FAILURE() << "no " << name;
    return std::vector<float>{};
  };
  const std::string P = "model.layers.2.";
  const std::pair<std::string, std::string> pairs[] = {
      {P + "embed_tokens.weight", "/model/embed/wte"},
      {P + "enorm.weight", "/model/mtp/0/enorm"},
      {P + "hnorm.weight", "/model/mtp/0/hnorm"},
      {P + "eh_proj.weight", "/model/mtp/0/eh_proj"},
      {P + "shared_head.norm.weight", "/model/mtp/0/final_norm"},
      {P + "shared_head.head.weight", "/model/lm_head"},
      {P + "mlp.gate.weight", "/model/mtp/0/moe/router"},
      {P + "mlp.gate.e_score_correction_bias", "/router/mtp/0/bias"},
      {P + "mlp.experts.3.down_proj.weight", "/model/mtp/0/moe/experts/3/w_down"},
      {P + "self_attn.o_proj.weight", "/model/mtp/0/attn/wo"}};
  for (const auto& [name, path] : pairs) {
    const std::vector<float> a = exported(name), b = ckpt(path);
    ASSERT_EQ(a.size(), b.size()) << name;
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0) << name;
  }
  bool bias_moved = false;
  for (float x : ckpt("/router/mtp/0/bias")) bias_moved |= x != 0;
  EXPECT_TRUE(bias_moved) << "the module's router bias was never updated";
  auto nextn = [&](const char* dir) {
    return moe::json_parse(slurp(d / dir / "config.json"), "config.json").get("num_nextn_predict_layers")->i;
  };
  EXPECT_EQ(nextn("hf"), 1);
  EXPECT_EQ(nextn("hf_drop"), 0);
  const moe::SafetensorsHeader hd =
      moe::safetensors_read_header((d / "hf_drop" / "model.safetensors").string());
  size_t main_tensors = 0;
  for (const moe::SafetensorsTensor& t : hd.tensors) {
    EXPECT_EQ(t.name.rfind(P, 0), std::string::npos) << t.name;
    ++main_tensors;
  }
  size_t layer2 = 0;
  for (const moe::SafetensorsTensor& t : h.tensors) layer2 += t.name.rfind(P, 0) == 0;
  EXPECT_EQ(h.tensors.size(), main_tensors + layer2);
  EXPECT_GT(layer2, 15u);
}

// configs/deepseek-v3-tiny.toml itself (MLA, group-limited sigmoid routing, a shared expert,
// one MTP module), shortened to sequences of 32 on the harness's data, over dp = 2 x ep = 2 x
// pp = 2 under DualPipe on 4 ranks: in FP32 two steps match the single process; with its FP8
// GEMMs and FP8 dispatch, step 1 matches, its Adam moments (the step's gradients) within
// 1e-5 (FP8 runs drift apart after it, see MlaBinary.Fp8DualPipeMatchesOneProcessAtStepOne).
// This holds because the routed experts' GEMMs give each row its own bits whatever rows ep
// puts beside it (cpu::gemm_rows_invariant): with OpenBLAS choosing kernels by row count, the
// FP8/BF16 rounding after the experts turned last-bit differences into a 1e-4 difference of
// the step-1 gradient norm.
TEST(MtpBinary, V3TinyConfigDpEpDualPipeMatchesOneProcess) {
  const std::string args = std::string("train --config ") + MOETRAIN_SOURCE_DIR +
                           "/configs/deepseek-v3-tiny.toml --set data.train=data/train.bin"
                           " --set data.val=data/val.bin --set training.global_batch=8"
                           " --set training.micro_batch=1 --set model.seq_len=32"
                           " --set checkpoint.dir=ckpt --set log.samples=0"
                           " --set log.metrics_file=metrics.jsonl --set log.eval_every=0";
  const std::string fp32 = " --set precision.mode=fp32 --set precision.dispatch_fp8=false"
                           " --set training.steps=2";
  const std::string fp8 = " --set training.steps=1";
  const std::string dualpipe = " --set parallel.pp=2 --set parallel.schedule=dualpipe";
  struct Case {
    const char *name, *one, *four;
    std::string opts, layout;
    const char* last;
    double rel, moment_rel;
  } cases[] = {
      {"fp32", "mtp_v3tiny_fp32_1", "mtp_v3tiny_fp32_4", fp32,
       " --set parallel.dp=2 --set parallel.ep=2" + dualpipe, "step-00000002.h5", 1e-5, 1e-3},
      {"fp8", "mtp_v3tiny_fp8_1", "mtp_v3tiny_fp8_4", fp8,
       " --set parallel.dp=2 --set parallel.ep=2" + dualpipe, "step-00000001.h5", 2e-5, 1e-5}};
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const fs::path one = make_run(c.one);
    ASSERT_EQ(run(one, args + c.opts), 0) << slurp(one / "err.txt");
    const std::string log = slurp(one / "log.txt");
    EXPECT_NE(log.find("(mtp "), std::string::npos) << log;
    const fs::path d = make_run(c.four);
    ASSERT_EQ(run(d, args + c.opts + c.layout, 4), 0) << slurp(d / "err.txt");
    const std::vector<std::string> ref = losses(one / "metrics.jsonl");
    ASSERT_FALSE(ref.empty());
    expect_close_losses(losses(d / "metrics.jsonl"), ref, 1e-5);
    const std::vector<double> m1 = mtp_losses(one / "metrics.jsonl"),
                              m4 = mtp_losses(d / "metrics.jsonl");
    ASSERT_EQ(m1.size(), ref.size());
    ASSERT_EQ(m4.size(), ref.size());
    for (size_t i = 0; i < m1.size(); ++i) EXPECT_NEAR(m4[i], m1[i], 1e-5 * m1[i]) << i;
    expect_close_checkpoint(one / "ckpt" / c.last, d / "ckpt" / c.last, c.rel, c.moment_rel);
  }
}

}  // namespace
