// The reference configs of the DeepSeek-V3 family (configs/deepseek-v3-*.toml): they load,
// and the 671B one has the published size: 671B total parameters (within 0.5%), ~37B
// activated per token, the MTP module beside it; --dry-run prints these without allocating
// the model (it runs under a 2 GiB address-space limit).
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "io/config.h"
#include "io/config_model.h"
#include "model/model.h"
#include "model/model_stages.h"
#include "parallel/pipeline.h"
#include "parallel/schedule.h"
#include "tests/loopback_comm.h"
#include "trainer/run_summary.h"

namespace moe {
namespace {

std::string config_path(const std::string& name) {
  return std::string(MOETRAIN_SOURCE_DIR) + "/configs/" + name + ".toml";
}

TEST(ReferenceConfigs, EveryConfigLoads) {
  int n = 0;
  for (const auto& e : std::filesystem::directory_iterator(std::string(MOETRAIN_SOURCE_DIR) + "/configs")) {
    if (e.path().extension() != ".toml") continue;
    SCOPED_TRACE(e.path().string());
    const Config cfg = config_load(e.path().string(), {});
    EXPECT_GT(model_counts(config_model_dims(cfg)).total, 0);
    ++n;
  }
  EXPECT_GE(n, 6);
}

TEST(ReferenceConfigs, DeepSeekV3_671B) {
  const Config cfg = config_load(config_path("deepseek-v3-671b"), {});
  const ModelDims d = config_model_dims(cfg);
  ASSERT_TRUE(d.mla());
  const ModelCounts c = model_counts(d);
  // Counted by hand from the architecture: embedding and head 129280 x 7168 each; per layer
  // MLA 187.1M matmul weights (q 1536 x 7168 + 24576 x 1536, kv 576 x 7168 + 32768 x 512,
  // o 7168 x 16384) and norms; 3 dense FFNs of 3 x 18432 x 7168; 58 MoE layers of 256 routed
  // + 1 shared experts of 3 x 2048 x 7168 and a 256 x 7168 router.
  const int64_t C = 7168, V = 129280;
  const int64_t attn = 1536 * C + 128 * 192 * 1536 + 576 * C + 128 * 256 * 512 + C * 128 * 128;
  const int64_t norms = 2 * C + 1536 + 512;
  const int64_t dense = 3 * 18432 * C, moe = 257 * 3 * 2048 * C + 256 * C;
  const int64_t total = 2 * V * C + C + 61 * (attn + norms) + 3 * dense + 58 * moe;
  EXPECT_EQ(c.total, total);
  EXPECT_EQ(c.total, 671026404352);
  EXPECT_NEAR(static_cast<double>(c.total) / 671e9, 1.0, 0.005);
  // Activated: the attention, 3 dense FFNs, and per MoE layer the router, the shared and 8
  // routed experts; the head. The report's "37B" counts the embedding row as well.
  const int64_t active = 61 * attn + 3 * dense + 58 * (256 * C + 9 * 3 * 2048 * C) + V * C;
  EXPECT_EQ(c.active_matmul, active);
  EXPECT_NEAR(static_cast<double>(c.active_matmul + c.embedding) / 37e9, 1.0, 0.02);
  EXPECT_DOUBLE_EQ(model_flops_per_token(d),
                   6.0 * static_cast<double>(active) + 6.0 * 61 * 4096 * 128 * (192 + 128));
  const std::string summary = run_summary(cfg);
  EXPECT_NE(summary.find("671026404352 total"), std::string::npos) << summary;
  // The MTP module: norms, the (C, 2C) projection, one MoE block, its output norm.
  const int64_t mtp = 3 * C + 2 * C * C + attn + norms + moe;
  EXPECT_NE(summary.find(std::to_string(mtp) + " parameters"), std::string::npos) << summary;
  EXPECT_NE(summary.find("dp 128 x pp 16 = 2048 ranks; ep 64"), std::string::npos) << summary;
}

TEST(ReferenceConfigs, FamilySizes) {
  struct Want {
    const char* name;
    double total, active;  // with the embedding
  } wants[] = {{"deepseek-v3-16b", 15.8e9, 2.77e9}, {"deepseek-v3-1b", 1.08e9, 0.41e9}};
  for (const Want& w : wants) {
    SCOPED_TRACE(w.name);
    const ModelCounts c = model_counts(config_model_dims(config_load(config_path(w.name), {})));
    EXPECT_NEAR(static_cast<double>(c.total) / w.total, 1.0, 0.01);
    EXPECT_NEAR(static_cast<double>(c.active_matmul + c.embedding) / w.active, 1.0, 0.02);
  }
}

// The dry run counts the pipeline's message buffers as the executor allocates them: the
// host path's (pipeline_init) for a CPU run, measured on a built Pipeline, and the largest
// over the pipeline ranks of the 671B layout (pp 16, DualPipe) in the summary.
TEST(ReferenceConfigs, DryRunCountsThePipelineBuffers) {
  const Config cfg = config_load(config_path("deepseek-v3-671b"), {});
  const ModelDims d = config_model_dims(cfg);
  const int pp = cfg.parallel.pp;
  const int64_t B = cfg.training.micro_batch, T = cfg.model.seq_len;
  const int M = static_cast<int>(cfg.training.global_batch / (B * cfg.parallel.dp));
  const std::vector<int64_t> bounds = model_stage_bounds(
      d, schedule_num_stages(cfg.parallel.schedule, pp), cfg.parallel.stage_layers);
  // On GPUs with NCCL in the build, the ticked executor's device buffer.
#ifdef MOETRAIN_HAVE_NCCL
  const bool ticked = cfg.run.device == Device::kCuda;
#else
  const bool ticked = false;
#endif
  int64_t most = 0;
  for (int r = 0; r < pp; ++r) {
    const PipelinePlan plan = pipeline_plan(cfg.parallel.schedule, pp, M, r, bounds, d);
    most = std::max(most, pipeline_buffer_bytes(plan, B, T, d.C, ticked));
  }
  // Two slots of each of two chunks at least: a real amount, not a rounding.
  EXPECT_GE(most, 2 * 2 * B * T * d.C * 4);
  char want[64];
  std::snprintf(want, sizeof want, "pipeline buffers %.1f,", static_cast<double>(most) / 1048576.0);
  const std::string summary = run_summary(cfg);
  EXPECT_NE(summary.find(want), std::string::npos) << want << "\n" << summary;

  // A small pipeline built for real: what pipeline_init holds is what the count says.
  const int64_t b = 2, t = 8, c = 16;
  for (PipeSchedule kind : {PipeSchedule::k1F1B, PipeSchedule::kDualPipeV}) {
    ModelDims small = d;
    small.L = 4;
    small.dense_layers = 4;
    small.mtp = 0;
    const std::vector<int64_t> sb = model_stage_bounds(small, schedule_num_stages(kind, 2), {});
    LoopbackComm comm;
    for (int r = 0; r < 2; ++r) {
      Pipeline p;
      pipeline_init(p, pipeline_plan(kind, 2, 4, r, sb, small), &comm, {0, 1}, b, t, c);
      const size_t floats = p.grad_in.size() + p.act_in.size() + p.act_out.size() + p.grad_out.size();
      EXPECT_EQ(static_cast<int64_t>(floats * sizeof(float)),
                pipeline_buffer_bytes(p.plan, b, t, c, false));
      EXPECT_EQ(pipeline_buffer_bytes(p.plan, b, t, c, true),
                int64_t{p.plan.n_slots} * p.plan.chunks * b * t * c * 4);
    }
  }
}

// The attention core is fused (it saves a log-sum-exp per row, not B x heads x T x T
// probabilities), so a slot's activations grow linearly with the sequence on both backends.
// With the probabilities, doubling T = 4096 at the 671B shape would nearly quadruple them.
TEST(ReferenceConfigs, ActivationsAreLinearInTheSequenceLength) {
  const Config cfg = config_load(config_path("deepseek-v3-671b"), {});
  ModelDims d = config_model_dims(cfg);
  const int64_t B = cfg.training.micro_batch;
  for (Device device : {Device::kCpu, Device::kCuda}) {
    SCOPED_TRACE(device == Device::kCpu ? "cpu" : "cuda");
    d.T = 2048;
    const double half = static_cast<double>(model_activation_bytes(d, B, 4, device));
    d.T = 4096;
    const double full = static_cast<double>(model_activation_bytes(d, B, 4, device));
    EXPECT_NEAR(full / half, 2.0, 0.01);
    // What the probabilities alone would have been (one (B, NH, T, T) float tensor per layer,
    // 488 GiB) is more than twice all that is left.
    const double probs = static_cast<double>(d.L) * static_cast<double>(B * d.NH) * 4096.0 *
                         4096.0 * 4.0;
    EXPECT_LT(full, probs / 2);
    std::printf("671B, one micro-batch of %lld x 4096 tokens: %.1f GiB of activations\n",
                static_cast<long long>(B), full / 1073741824.0);
  }
}

// 671B in FP32 is 2.7 TB: a dry run that allocated the model could not run in 2 GiB.
TEST(ReferenceConfigs, DryRunAllocatesNothing) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "AddressSanitizer reserves terabytes of address space; the Release suite runs this";
#endif
  const std::string out = ::testing::TempDir() + "/dry_run_671b_" + std::to_string(::getpid()) + ".txt";
  const std::string cmd = "ulimit -v 2097152; " + std::string(MOETRAIN_BINARY) +
                          " train --config " + config_path("deepseek-v3-671b") +
                          " --dry-run > " + out + " 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  std::ifstream f(out);
  std::stringstream ss;
  ss << f.rdbuf();
  EXPECT_NE(ss.str().find("671026404352 total"), std::string::npos) << ss.str();
}

}  // namespace
}  // namespace moe
