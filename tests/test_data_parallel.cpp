// Data and expert parallelism with ZeRO-1 through mpirun: the same training run as one
// process (the equivalence principle), resumable across layouts, and refusing bad launches
// without hangs.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "tests/binary_harness.h"

namespace {

using namespace moe_test;

// global_batch 8 = micro_batch 2 x (dp 1, 2 or 4) x micro-batches per rank. The harness
// model has 4 routed experts (top-2), so ep can be 1, 2 or 4. Small buckets (8 KiB) make
// every layer its own gradient bucket, so the overlapped reduction is exercised.
std::string dp_args(int dp, int ep = 1, const std::string& extra = "") {
  return "train --config c.toml --set training.micro_batch=2 --set parallel.dp=" +
         std::to_string(dp) + " --set parallel.ep=" + std::to_string(ep) +
         " --set parallel.bucket_mb=0.0078125 --set training.steps=20 --set log.samples=1 --set log.sample_tokens=4" + extra;
}

// Every (dp, ep) layout trains the single process's run: per-step losses and the final
// checkpoint (weights, both moments, router biases, all under global expert names) agree
// within 1e-5 relative. A multi-rank save is thereby compared with a single-rank save.
TEST(DataParallel, EveryLayoutMatchesSingleProcess) {
  for (const std::string& routing : {std::string(""), std::string(" --set moe.num_groups=2 --set moe.topk_groups=1")}) {
    SCOPED_TRACE(routing.empty() ? "plain routing" : "node-limited routing");
    const std::string tag = routing.empty() ? "" : "_groups";
    const fs::path one = make_run("dp1" + tag);
    ASSERT_EQ(run(one, dp_args(1, 1, routing)), 0) << slurp(one / "err.txt");
    const std::vector<std::string> ref = losses(one / "metrics.jsonl");
    ASSERT_EQ(ref.size(), 20u);
    const std::pair<int, int> layouts[] = {{2, 1}, {2, 2}, {4, 2}, {4, 4}};
    for (const auto& [dp, ep] : layouts) {
      if (!routing.empty() && dp != 4) continue;  // node-limited: (4, 2) and (4, 4) suffice
      SCOPED_TRACE("dp=" + std::to_string(dp) + " ep=" + std::to_string(ep));
      const fs::path d = make_run("dp" + std::to_string(dp) + "_ep" + std::to_string(ep) + tag);
      ASSERT_EQ(run(d, dp_args(dp, ep, routing), dp), 0) << slurp(d / "err.txt");
      expect_close_losses(losses(d / "metrics.jsonl"), ref, 1e-5);
      expect_close_checkpoint(one / "ckpt" / "step-00000020.h5", d / "ckpt" / "step-00000020.h5",
                              1e-5);
      // Only rank 0 logs.
      const std::string log = slurp(d / "log.txt");
      ASSERT_NE(log.find("done:"), std::string::npos) << log;
      EXPECT_EQ(log.find("done:"), log.rfind("done:")) << log;
    }
  }
}

// FP8 GEMMs with the FP8 dispatch / BF16 combine wire: every layout quantizes the same
// tiles as one process (activation tiles are per row; a routed expert's weight-gradient tiles
// restart at each sender's rows; the wire rounds rows as one process does), so a step's
// gradients agree to FP32 summation order, as in FP32: the checkpoint after one step (its
// Adam moments are that step's gradients) within 2e-4 (the router's, a sum with much
// cancellation, differ by 4.9e-5; every other tensor's by at most 1.5e-6), its weights within
// 2e-5 (Adam's first update is about lr sign(g): a router gradient element near zero moves
// its weight by 1.1e-5 of the router's norm). Later steps drift apart faster than in FP32 (a last-bit
// difference in a master weight can flip its FP8 rounding, a 2^-4 jump), so the comparison
// stops at step 1.
TEST(DataParallel, Fp8LayoutsQuantizeLikeOneProcess) {
  const std::string fp8 = " --set precision.mode=fp8 --set precision.dispatch_fp8=true"
                          " --set training.steps=1";
  const fs::path one = make_run("fp8_dp1");
  ASSERT_EQ(run(one, dp_args(1, 1, fp8)), 0) << slurp(one / "err.txt");
  const std::vector<std::string> ref = losses(one / "metrics.jsonl");
  ASSERT_EQ(ref.size(), 1u);
  for (const auto& [dp, ep] : {std::pair<int, int>{2, 2}, std::pair<int, int>{4, 4}}) {
    SCOPED_TRACE("dp=" + std::to_string(dp) + " ep=" + std::to_string(ep));
    const fs::path d = make_run("fp8_dp" + std::to_string(dp) + "_ep" + std::to_string(ep));
    ASSERT_EQ(run(d, dp_args(dp, ep, fp8), dp), 0) << slurp(d / "err.txt");
    expect_close_losses(losses(d / "metrics.jsonl"), ref, 1e-5);
    expect_close_checkpoint(one / "ckpt" / "step-00000001.h5", d / "ckpt" / "step-00000001.h5",
                            2e-5);
  }
}

// A checkpoint written with dp = 2, ep = 2 resumes with dp = 4, ep = 1 and then with one
// process, continuing the same run (tensors are stored whole under global names, never as a
// rank's shard or expert subset).
TEST(DataParallel, ResumesAcrossLayouts) {
  const fs::path one = make_run("dp_layout_ref");
  ASSERT_EQ(run(one, dp_args(1)), 0);
  const fs::path d = make_run("dp_layout");
  ASSERT_EQ(run(d, dp_args(2, 2, " --set training.exit_at_step=7"), 2), 0) << slurp(d / "err.txt");
  ASSERT_EQ(run(d, dp_args(4, 1, " --resume --set training.exit_at_step=14"), 4), 0)
      << slurp(d / "err.txt");
  ASSERT_EQ(run(d, dp_args(1, 1, " --resume")), 0) << slurp(d / "err.txt");
  expect_close_losses(losses(d / "metrics.jsonl"), losses(one / "metrics.jsonl"), 1e-5);
  expect_close_checkpoint(one / "ckpt" / "step-00000020.h5", d / "ckpt" / "step-00000020.h5", 1e-5);
}

TEST(DataParallel, BadLaunchesFailFastWithOneLine) {
  const fs::path d = make_run("dp_bad");
  // Three ranks for dp = 2: every rank refuses, naming the numbers.
  EXPECT_NE(run(d, dp_args(2), 3), 0);
  EXPECT_NE(slurp(d / "err.txt").find("needs 2 ranks, but the job has 3"), std::string::npos)
      << slurp(d / "err.txt");
  // Two ranks that resolved different configs (MPMD launch): refused at start.
  write(d / "err.txt", "");
  write(d / "c2.toml", slurp(d / "c.toml") + "[run]\nname = \"other\"\n");
  const std::string mpmd = dp_args(2) + " : -np 1 " + std::string(MOETRAIN_BINARY) +
                           " train --config c2.toml --set training.micro_batch=2 --set parallel.dp=2";
  EXPECT_NE(run(d, mpmd, 1), 0);
  EXPECT_NE(slurp(d / "err.txt").find("different config"), std::string::npos) << slurp(d / "err.txt");
}

}  // namespace

namespace {

using namespace moe_test;

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// A killed rank, or one that fails on its own, brings the whole job down within seconds,
// with a message naming the rank: no rank is left waiting in a collective.
TEST(DataParallel, LostRankStopsTheJob) {
  const fs::path d = make_run("dp_fault");
  const std::string args = "train --config c.toml --set training.micro_batch=2 --set parallel.dp=2 "
                           "--set training.steps=100000 --set checkpoint.every=0";
  Proc p = spawn(d, args, 2);
  wait_for_first_step(d);
  const std::vector<pid_t> ranks = rank_pids(p.pid);
  ASSERT_EQ(ranks.size(), 2u);
  kill(ranks.back(), SIGKILL);
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_NE(wait_exit(p), 0);
  EXPECT_LT(seconds_since(t0), 10.0);
  EXPECT_NE(slurp(d / "err.txt").find("rank"), std::string::npos) << slurp(d / "err.txt");

  // One rank fails on its own before MPI starts (its config file is missing).
  write(d / "err.txt", "");
  const auto t1 = std::chrono::steady_clock::now();
  const std::string mpmd = "train --config c.toml --set training.micro_batch=2 --set parallel.dp=2 : -np 1 " +
                           std::string(MOETRAIN_BINARY) + " train --config missing.toml";
  EXPECT_NE(run(d, mpmd, 1), 0);
  EXPECT_LT(seconds_since(t1), 10.0);
  EXPECT_NE(slurp(d / "err.txt").find("missing.toml"), std::string::npos) << slurp(d / "err.txt");
}

}  // namespace
