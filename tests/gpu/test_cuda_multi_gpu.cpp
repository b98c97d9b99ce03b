// Several GPUs under mpirun against one: the real binary trains the harness model with
// run.device = cuda, data and expert parallel (dp 2 x ep 2, and dp 4 x ep 4 with four
// devices), and its per-step losses and final checkpoint agree with a one-GPU run within FP32
// summation order (1e-5 relative, the tolerance the CPU layouts meet against one process:
// tests/test_data_parallel.cpp). This is the NCCL path end to end: the ZeRO-1 reduce-scatter
// and all-gather and the expert exchange's all_to_all_v on device memory; and, for pipeline
// layouts, the pipeline's ticks over NCCL (parallel/pipeline_ticks.h). Skips unless this
// machine shows at least two devices and the build's moetrain binary is there (the gpu test
// bundle carries only the test binary).
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "tests/binary_harness.h"
#include "tests/gpu/gpu_test_util.h"

namespace {

using namespace moe_test;

std::string gpu_args(int dp, int ep) {
  return "train --config c.toml --set run.device=cuda --set training.micro_batch=2 --set parallel.dp=" +
         std::to_string(dp) + " --set parallel.ep=" + std::to_string(ep) +
         " --set training.steps=20 --set log.samples=0";
}

TEST(CudaMultiGpu, DataAndExpertParallelMatchOneGpu) {
  SKIP_WITHOUT_GPU();
  const int devices = moe::cuda::device_count();
  if (devices < 2) GTEST_SKIP() << "needs 2 CUDA devices, " << devices << " visible";
  if (!fs::exists(MOETRAIN_BINARY)) GTEST_SKIP() << MOETRAIN_BINARY << " not built here";
  const fs::path one = make_run("gpu_dp1");
  ASSERT_EQ(run(one, gpu_args(1, 1)), 0) << slurp(one / "err.txt");
  EXPECT_NE(slurp(one / "log.txt").find("device: cuda:0"), std::string::npos) << slurp(one / "log.txt");
  const std::vector<std::string> ref = losses(one / "metrics.jsonl");
  ASSERT_EQ(ref.size(), 20u);
  for (const int n : {2, 4}) {
    if (n > devices) continue;
    SCOPED_TRACE(std::to_string(n) + " GPUs");
    const fs::path d = make_run("gpu_dp" + std::to_string(n));
    ASSERT_EQ(run(d, gpu_args(n, n), n), 0) << slurp(d / "err.txt");
    expect_close_losses(losses(d / "metrics.jsonl"), ref, 1e-5);
    expect_close_checkpoint(one / "ckpt" / "step-00000020.h5", d / "ckpt" / "step-00000020.h5", 1e-5);
  }
}

// Every schedule at pp = 2 (and pp = 4 with four devices) on GPUs against one GPU: the
// pipeline's messages go in ticks over NCCL between device buffers. 8 layers and M = 16
// micro-batches per step as tests/test_pipeline.cpp; Adam moments get 1e-3 for the same
// reason as there (DualPipe's two copies sum their halves apart).
TEST(CudaMultiGpu, PipelineSchedulesMatchOneGpu) {
  SKIP_WITHOUT_GPU();
  const int devices = moe::cuda::device_count();
  if (devices < 2) GTEST_SKIP() << "needs 2 CUDA devices, " << devices << " visible";
  if (!fs::exists(MOETRAIN_BINARY)) GTEST_SKIP() << MOETRAIN_BINARY << " not built here";
  auto args = [](int pp, const std::string& kind) {
    return "train --config c.toml --set run.device=cuda --set model.n_layers=8 "
           "--set training.global_batch=16 --set training.micro_batch=1 --set training.steps=20 "
           "--set log.samples=0 --set parallel.pp=" + std::to_string(pp) +
           " --set parallel.schedule=" + kind;
  };
  const fs::path one = make_run("gpu_pp1");
  ASSERT_EQ(run(one, args(1, "1f1b")), 0) << slurp(one / "err.txt");
  const std::vector<std::string> ref = losses(one / "metrics.jsonl");
  ASSERT_EQ(ref.size(), 20u);
  for (const int pp : {2, 4}) {
    if (pp > devices) continue;
    for (const char* kind : {"1f1b", "zb1p", "dualpipe", "dualpipev"}) {
      SCOPED_TRACE(std::string(kind) + " pp " + std::to_string(pp));
      const fs::path d = make_run("gpu_" + std::string(kind) + "_pp" + std::to_string(pp));
      ASSERT_EQ(run(d, args(pp, kind), pp), 0) << slurp(d / "err.txt");
      expect_close_losses(losses(d / "metrics.jsonl"), ref, 1e-5);
      expect_close_checkpoint(one / "ckpt" / "step-00000020.h5", d / "ckpt" / "step-00000020.h5",
                              1e-5, 1e-3);
    }
  }
}

}  // namespace
