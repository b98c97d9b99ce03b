// Pipeline parallelism through mpirun: every schedule trains the single process's run (the
// equivalence principle), checkpoints resume across pipeline layouts, and a failing stage
// stops the whole job.
#include <gtest/gtest.h>

#include <chrono>
#include <csignal>

#include "tests/binary_harness.h"

namespace {

using namespace moe_test;

// 8 layers (1 dense, 7 MoE) so pp = 4 DualPipeV has a layer per stage; global_batch 16 of
// micro_batch 1 gives M = 16 micro-batches per step (8 with dp = 2), enough for DualPipe at
// pp = 4. Small buckets make the reduction overlap the last backward op layer by layer.
std::string pp_args(int pp, const std::string& schedule, const std::string& extra = "") {
  return "train --config c.toml --set model.n_layers=8 --set training.global_batch=16 "
         "--set training.micro_batch=1 --set training.steps=20 --set checkpoint.every=0 "
         "--set parallel.bucket_mb=0.0078125 --set parallel.pp=" + std::to_string(pp) +
         " --set parallel.schedule=" + schedule + extra;
}

// Each kind at pp = 2 and 4, and DualPipe over pp = 2 x dp = 2 x ep = 2, against one
// process: per-step losses and the final weights and router biases within 1e-5 relative.
// The Adam moments get 1e-3: DualPipe sums each copy's half of the micro-batches before
// adding the halves, and the second moment of a rarely routed expert (v ~ 1e-9) squares
// that different rounding.
TEST(Pipeline, EveryScheduleMatchesSingleProcess) {
  const fs::path one = make_run("pp_ref");
  ASSERT_EQ(run(one, pp_args(1, "1f1b")), 0) << slurp(one / "err.txt");
  const std::vector<std::string> ref = losses(one / "metrics.jsonl");
  ASSERT_EQ(ref.size(), 20u);
  struct Layout { int pp; const char* kind; int dp, ep; };
  const Layout layouts[] = {{2, "1f1b", 1, 1},     {4, "1f1b", 1, 1},      {2, "zb1p", 1, 1},
                            {4, "zb1p", 1, 1},     {2, "dualpipe", 1, 1},  {4, "dualpipe", 1, 1},
                            {2, "dualpipev", 1, 1}, {4, "dualpipev", 1, 1}, {2, "dualpipe", 2, 2}};
  for (const Layout& l : layouts) {
    const std::string name = std::string(l.kind) + "_pp" + std::to_string(l.pp) + "_dp" +
                             std::to_string(l.dp) + "_ep" + std::to_string(l.ep);
    SCOPED_TRACE(name);
    const fs::path d = make_run("pp_" + name);
    const std::string extra = " --set parallel.dp=" + std::to_string(l.dp) +
                              " --set parallel.ep=" + std::to_string(l.ep);
    ASSERT_EQ(run(d, pp_args(l.pp, l.kind, extra), l.pp * l.dp), 0) << slurp(d / "err.txt");
    expect_close_losses(losses(d / "metrics.jsonl"), ref, 1e-5);
    expect_close_checkpoint(one / "ckpt" / "step-00000020.h5", d / "ckpt" / "step-00000020.h5",
                            1e-5, 1e-3);
    // Validation runs through the pipeline too, and matches.
    const std::string log = slurp(d / "log.txt"), ref_log = slurp(one / "log.txt");
    const size_t at = log.rfind("val loss "), ref_at = ref_log.rfind("val loss ");
    ASSERT_NE(at, std::string::npos) << log;
    EXPECT_NEAR(std::stod(log.substr(at + 9)), std::stod(ref_log.substr(ref_at + 9)), 1e-4);
  }
}

// F&B pairs interleave their two chunks piece by piece, each expert exchange in flight while
// the other chunk computes (two at once, which the run reports); running the same pieces one
// after the other gives the same run bit for bit (every loss line and every tensor of the
// checkpoint), and both are one process's run (pp 2 x dp 2 x ep 2, 6 steps).
TEST(Pipeline, OverlappedPairsEqualSequentialBitForBit) {
  const fs::path one = make_run("pp_fb_ref");
  ASSERT_EQ(run(one, pp_args(1, "1f1b", " --set training.steps=6")), 0) << slurp(one / "err.txt");
  for (const char* kind : {"dualpipe", "dualpipev"}) {
    SCOPED_TRACE(kind);
    const std::string base = std::string("pp_fb_") + kind;
    const std::string extra = " --set parallel.dp=2 --set parallel.ep=2 --set training.steps=6";
    const fs::path on = make_run(base + "_on"), off = make_run(base + "_off");
    ASSERT_EQ(run(on, pp_args(2, kind, extra), 4), 0) << slurp(on / "err.txt");
    ASSERT_EQ(run(off, pp_args(2, kind, extra + " --set parallel.fb_overlap=false"), 4), 0)
        << slurp(off / "err.txt");
    const std::vector<std::string> a = losses(on / "metrics.jsonl"), b = losses(off / "metrics.jsonl");
    ASSERT_EQ(a.size(), 6u);
    EXPECT_EQ(a, b);
    // The overlap really happened: two exchanges in flight at once, never with it off.
    EXPECT_NE(slurp(on / "log.txt").find("at most 2 in flight"), std::string::npos)
        << slurp(on / "log.txt");
    EXPECT_NE(slurp(off / "log.txt").find("at most 1 in flight"), std::string::npos)
        << slurp(off / "log.txt");
    expect_close_checkpoint(on / "ckpt" / "step-00000006.h5", off / "ckpt" / "step-00000006.h5",
                            0.0, 0.0);
    expect_close_losses(a, losses(one / "metrics.jsonl"), 1e-5);
    expect_close_checkpoint(one / "ckpt" / "step-00000006.h5", on / "ckpt" / "step-00000006.h5",
                            1e-5, 1e-3);
  }
}

// FP8 GEMMs with the FP8 dispatch wire through DualPipe's overlapped pairs (pp 2 x dp 2 x
// ep 2): interleaved and sequential pairs agree bit for bit over 3 steps (the GEMM workspace
// every slot shares is never held across a chunk step), and step 1 is one process's within
// the bounds of DataParallel.Fp8LayoutsQuantizeLikeOneProcess.
TEST(Pipeline, Fp8PairsEqualSequentialAndOneProcess) {
  const std::string fp8 = " --set precision.mode=fp8 --set precision.dispatch_fp8=true"
                          " --set training.steps=3 --set checkpoint.every=1"
                          " --set checkpoint.keep_last=3";
  const fs::path one = make_run("pp_fp8_ref");
  ASSERT_EQ(run(one, pp_args(1, "1f1b", fp8)), 0) << slurp(one / "err.txt");
  const std::string extra = fp8 + " --set parallel.dp=2 --set parallel.ep=2";
  const fs::path on = make_run("pp_fp8_on"), off = make_run("pp_fp8_off");
  ASSERT_EQ(run(on, pp_args(2, "dualpipe", extra), 4), 0) << slurp(on / "err.txt");
  ASSERT_EQ(run(off, pp_args(2, "dualpipe", extra + " --set parallel.fb_overlap=false"), 4), 0)
      << slurp(off / "err.txt");
  const std::vector<std::string> a = losses(on / "metrics.jsonl");
  ASSERT_EQ(a.size(), 3u);
  EXPECT_EQ(a, losses(off / "metrics.jsonl"));
  expect_close_checkpoint(on / "ckpt" / "step-00000003.h5", off / "ckpt" / "step-00000003.h5",
                          0.0, 0.0);
  expect_close_losses({a[0]}, {losses(one / "metrics.jsonl")[0]}, 1e-5);
  expect_close_checkpoint(one / "ckpt" / "step-00000001.h5", on / "ckpt" / "step-00000001.h5",
                          2e-5, 1e-3);
}

// A checkpoint written by one pipeline layout resumes under another and continues the run.
TEST(Pipeline, ResumesAcrossLayouts) {
  const fs::path one = make_run("pp_resume_ref");
  ASSERT_EQ(run(one, pp_args(1, "1f1b")), 0);
  {
    const fs::path d = make_run("pp_resume_dual");
    ASSERT_EQ(run(d, pp_args(2, "dualpipe", " --set training.exit_at_step=9"), 2), 0)
        << slurp(d / "err.txt");
    ASSERT_EQ(run(d, pp_args(1, "1f1b", " --resume")), 0) << slurp(d / "err.txt");
    expect_close_losses(losses(d / "metrics.jsonl"), losses(one / "metrics.jsonl"), 1e-5);
    expect_close_checkpoint(one / "ckpt" / "step-00000020.h5", d / "ckpt" / "step-00000020.h5",
                            1e-5, 1e-3);
  }
  {
    const fs::path d = make_run("pp_resume_1f1b");
    ASSERT_EQ(run(d, pp_args(4, "1f1b", " --set training.exit_at_step=11"), 4), 0)
        << slurp(d / "err.txt");
    ASSERT_EQ(run(d, pp_args(2, "dualpipev", " --resume"), 2), 0) << slurp(d / "err.txt");
    expect_close_losses(losses(d / "metrics.jsonl"), losses(one / "metrics.jsonl"), 1e-5);
    expect_close_checkpoint(one / "ckpt" / "step-00000020.h5", d / "ckpt" / "step-00000020.h5",
                            1e-5, 1e-3);
  }
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// A stage that throws, or whose rank dies, brings every stage down within seconds with a
// message naming the rank: no stage is left waiting for a message that never comes.
TEST(Pipeline, FailingStageStopsTheJob) {
  const fs::path d = make_run("pp_fault");
  const std::string forever = " --set training.steps=100000";
  // Rank 2 (a middle stage of pp = 4) throws at step 3.
  const auto t0 = std::chrono::steady_clock::now();
  setenv("MOETRAIN_TEST_THROW_AT", "2:3", 1);  // inherited by mpirun's local ranks
  EXPECT_NE(run(d, pp_args(4, "dualpipev", forever), 4), 0);
  unsetenv("MOETRAIN_TEST_THROW_AT");
  EXPECT_LT(seconds_since(t0), 30.0);
  const std::string err = slurp(d / "err.txt");
  EXPECT_NE(err.find("rank 2"), std::string::npos) << err;
  EXPECT_NE(err.find("injected"), std::string::npos) << err;
  // A middle stage's rank is killed mid-run.
  write(d / "err.txt", "");
  fs::remove(d / "metrics.jsonl");
  Proc p = spawn(d, pp_args(4, "1f1b", forever), 4);
  wait_for_first_step(d);
  const std::vector<pid_t> ranks = rank_pids(p.pid);
  ASSERT_EQ(ranks.size(), 4u);
  kill(ranks[1], SIGKILL);
  const auto t1 = std::chrono::steady_clock::now();
  EXPECT_NE(wait_exit(p), 0);
  EXPECT_LT(seconds_since(t1), 10.0);
}

// Bad pipeline layouts are refused before any rank allocates, with one line naming the keys.
TEST(Pipeline, BadLayoutsFailFast) {
  const fs::path d = make_run("pp_bad");
  // DualPipe at pp = 4 needs an even number of micro-batches >= 8; global_batch 6 gives 6.
  EXPECT_NE(run(d, pp_args(4, "dualpipe", " --set training.global_batch=6"), 4), 0);
  EXPECT_NE(slurp(d / "err.txt").find("micro-batches"), std::string::npos) << slurp(d / "err.txt");
  write(d / "err.txt", "");
  EXPECT_NE(run(d, pp_args(2, "1f1b", " --set parallel.stage_layers=[3,3]"), 2), 0);
  EXPECT_NE(slurp(d / "err.txt").find("parallel.stage_layers"), std::string::npos)
      << slurp(d / "err.txt");
}

}  // namespace
