// The numerical guards through the real binary: a weight poisoned at a chosen step
// (MOETRAIN_TEST_POISON_AT) makes the run abort with a diagnostic, skip until
// training.max_skipped_steps, or (a loss spike) roll back to the last checkpoint and skip the
// batch, each with one clear line; under mpirun a NaN on one rank stops every rank alike.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <string>
#include <vector>

#include "tests/binary_harness.h"

namespace {

using namespace moe_test;

// Lines of `text` that start with `prefix`.
std::vector<std::string> lines_starting(const std::string& text, const std::string& prefix) {
  std::vector<std::string> out;
  size_t at = 0;
  while (at < text.size()) {
    const size_t end = text.find('\n', at);
    const std::string line = text.substr(at, end == std::string::npos ? std::string::npos : end - at);
    if (line.rfind(prefix, 0) == 0) out.push_back(line);
    if (end == std::string::npos) break;
    at = end + 1;
  }
  return out;
}

struct Poison {
  explicit Poison(const std::string& v) { setenv("MOETRAIN_TEST_POISON_AT", v.c_str(), 1); }
  ~Poison() { unsetenv("MOETRAIN_TEST_POISON_AT"); }
};

TEST(GuardRuns, NonFiniteStepAbortsWithADiagnosticAndKeepsTheLastCheckpoint) {
  const fs::path d = make_run("guard_abort");
  Poison p("0:5:nan");
  EXPECT_NE(run(d, "train --config c.toml --set training.steps=8"), 0);
  const std::string err = slurp(d / "err.txt");
  const std::vector<std::string> errors = lines_starting(err, "error:");
  ASSERT_EQ(errors.size(), 1u) << err;
  EXPECT_NE(errors[0].find("non-finite"), std::string::npos) << errors[0];
  EXPECT_NE(errors[0].find("at step 5, update not applied; diagnostic in ckpt/nonfinite-step-00000005.txt"),
            std::string::npos) << errors[0];
  const std::string diag = slurp(d / "ckpt" / "nonfinite-step-00000005.txt");
  EXPECT_NE(diag.find("step: 5"), std::string::npos) << diag;
  EXPECT_NE(diag.find("first non-finite gradient (backward order): "), std::string::npos);
  EXPECT_NE(diag.find("data/train.bin, batch 4"), std::string::npos) << diag;
  EXPECT_EQ(slurp(d / "ckpt" / "latest"), "step-00000004.h5\n");
  EXPECT_EQ(run(d, "inspect ckpt"), 0) << slurp(d / "err.txt");  // verifies the checksums
}

TEST(GuardRuns, SkippedStepsEndTheRunAtTheLimit) {
  const fs::path d = make_run("guard_skip");
  Poison p("0:5:nan");
  EXPECT_NE(run(d, "train --config c.toml --set training.steps=12 --set "
                   "training.on_nonfinite=\"skip\" --set training.max_skipped_steps=3"), 0);
  const std::string err = slurp(d / "err.txt");
  const std::vector<std::string> errors = lines_starting(err, "error:");
  ASSERT_EQ(errors.size(), 1u) << err;
  EXPECT_NE(errors[0].find("3 steps in a row dropped their update (training.max_skipped_steps = 3)"),
            std::string::npos) << errors[0];
  EXPECT_EQ(lines_starting(err, "warning: step ").size(), 3u) << err;
  const std::string metrics = slurp(d / "metrics.jsonl");
  EXPECT_EQ(lines_starting(metrics, "{\"step\": 5,").size(), 1u);
  size_t skipped = 0;
  for (size_t at = metrics.find("\"skipped\": 1"); at != std::string::npos;
       at = metrics.find("\"skipped\": 1", at + 1))
    ++skipped;
  EXPECT_EQ(skipped, 2u) << metrics;  // steps 5 and 6; the run stops at 7 before writing it
}

TEST(GuardRuns, LossSpikeRollsBackAndSkipsTheBatch) {
  const fs::path d = make_run("guard_rollback");
  Poison p("0:8:1e6");
  ASSERT_EQ(run(d, "train --config c.toml --set training.steps=12 --set training.spike_factor=3 "
                   "--set training.spike_window=3 --set training.on_spike=\"rollback\""), 0)
      << slurp(d / "err.txt");
  const std::string log = slurp(d / "log.txt");
  EXPECT_NE(log.find("rollback: step 8 -> ckpt/step-00000007.h5 (step 7); data batch 7 skipped"),
            std::string::npos) << log;
  const std::string err = slurp(d / "err.txt");
  EXPECT_NE(err.find("warning: step 8: loss spike"), std::string::npos) << err;
  EXPECT_NE(slurp(d / "metrics.jsonl").find("\"rollback_to\": 7"), std::string::npos);
  EXPECT_EQ(lines_starting(err, "error:").size(), 0u) << err;
  EXPECT_NE(log.find("step    12/12"), std::string::npos) << log;
}

TEST(GuardRuns, NaNOnOneRankStopsEveryRankWithOneLine) {
  const fs::path d = make_run("guard_mpi");
  Poison p("1:3:nan");
  EXPECT_NE(run(d, "train --config c.toml --set training.steps=6 --set parallel.dp=2", 2), 0);
  const std::string err = slurp(d / "err.txt");
  const std::vector<std::string> errors = lines_starting(err, "error:");
  ASSERT_GE(errors.size(), 1u) << err;
  for (const std::string& e : errors)
    EXPECT_NE(e.find("non-finite"), std::string::npos) << e;
  EXPECT_TRUE(fs::exists(d / "ckpt" / "nonfinite-step-00000003.txt"));
  EXPECT_EQ(slurp(d / "ckpt" / "latest"), "step-00000002.h5\n");
}

}  // namespace
