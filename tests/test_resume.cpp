// Checkpoints through the real binary: bit-exact resume after SIGKILL at random moments
// (including during saves), graceful SIGTERM, exit_at_step splitting, fallback past corrupt
// checkpoints, and refusal of unsafe config changes.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "model/fp8.h"
#include "model/rng.h"
#include "tests/binary_harness.h"

namespace {

using namespace moe_test;

TEST(Resume, KilledAtRandomMomentsContinuesBitExact) {
  // Long enough (a few seconds, a save after every step) that most kills land mid-run.
  const std::string kSteps = " --set training.steps=150";
  const fs::path straight = make_run("straight");
  ASSERT_EQ(run(straight, "train --config c.toml" + kSteps), 0) << slurp(straight / "err.txt");
  const std::vector<std::string> ref = losses(straight / "metrics.jsonl");
  ASSERT_EQ(ref.size(), 150u);

  const fs::path killed = make_run("killed");
  int kills = 0, kills_mid_save = 0, attempts = 0;
  for (; attempts < 80; ++attempts) {
    Proc p = spawn(killed, "train --config c.toml --resume" + kSteps);
    const double delay = 0.1 + 0.5 * moe::rng_uniform(42, 1, static_cast<uint64_t>(attempts));
    std::this_thread::sleep_for(std::chrono::duration<double>(delay));
    kill(p.pid, SIGKILL);
    const int code = wait_exit(p);
    if (code == 0) break;  // finished before the kill
    ++kills;
    if (!fs::exists(killed / "ckpt")) continue;
    for (const auto& e : fs::directory_iterator(killed / "ckpt"))
      if (e.path().filename().string().ends_with(".tmp." + std::to_string(p.pid))) {
        ++kills_mid_save;
        break;
      }
  }
  // Finish whatever remains without killing.
  ASSERT_EQ(run(killed, "train --config c.toml --resume" + kSteps), 0) << slurp(killed / "err.txt");
  // The killed runs really continued from checkpoints (not from scratch each time).
  const std::string log = slurp(killed / "log.txt");
  int resumes = 0;
  for (size_t at = log.find("resume: ckpt/"); at != std::string::npos; at = log.find("resume: ckpt/", at + 1))
    ++resumes;
  std::printf("kills %d (mid-save %d), resumes %d\n", kills, kills_mid_save, resumes);
  EXPECT_GE(kills, 3);
  EXPECT_GE(resumes, 3);
  EXPECT_GE(kills_mid_save, 1) << "no kill landed inside a save; the test proved less";
  EXPECT_EQ(losses(killed / "metrics.jsonl"), ref);
  expect_same_checkpoint(straight / "ckpt" / "step-00000150.h5", killed / "ckpt" / "step-00000150.h5");
}

TEST(Resume, ExitAtStepThenResumeEqualsStraight) {
  const fs::path straight = make_run("exit_straight");
  ASSERT_EQ(run(straight, "train --config c.toml"), 0);
  const fs::path split = make_run("exit_split");
  ASSERT_EQ(run(split, "train --config c.toml --set training.exit_at_step=10"), 0);
  EXPECT_TRUE(fs::exists(split / "ckpt" / "step-00000010.h5"));
  EXPECT_FALSE(fs::exists(split / "ckpt" / "step-00000011.h5"));
  EXPECT_NE(slurp(split / "log.txt").find("stopped at step 10"), std::string::npos);
  ASSERT_EQ(run(split, "train --config c.toml --resume --set training.exit_at_step=17"), 0);
  ASSERT_EQ(run(split, "train --config c.toml --resume"), 0);
  EXPECT_EQ(losses(split / "metrics.jsonl"), losses(straight / "metrics.jsonl"));
  expect_same_checkpoint(straight / "ckpt" / "step-00000024.h5", split / "ckpt" / "step-00000024.h5");
  // keep_last = 2: only the two newest remain, and latest names the newest.
  int files = 0;
  for (const auto& e : fs::directory_iterator(split / "ckpt")) files += e.path().extension() == ".h5";
  EXPECT_EQ(files, 2);
  EXPECT_EQ(slurp(split / "ckpt" / "latest"), "step-00000024.h5\n");
}

// Checkpoint datasets under `prefix`: how many elements in all, and how many are not
// BF16-representable (bf16_round(x) != x, bit for bit) or are nonzero.
struct Bf16Census {
  int64_t elements = 0, not_bf16 = 0, nonzero = 0;
};
Bf16Census bf16_census(const fs::path& file, const std::string& prefix) {
  moe::CheckpointReader r(file.string());
  Bf16Census c;
  for (const moe::CheckpointDataset& ds : r.list()) {
    if (ds.path.rfind(prefix, 0) != 0 || ds.dtype != "float32") continue;
    int64_t n = 1;
    for (int64_t d : ds.shape) n *= d;
    std::vector<float> x(static_cast<size_t>(n));
    r.read_f32(ds.path, ds.shape, x.data(), ds.shape.back());
    for (float e : x) {
      c.elements += 1;
      c.not_bf16 += moe::f32_bits(moe::bf16_round(e)) != moe::f32_bits(e);
      c.nonzero += e != 0.0f;
    }
  }
  return c;
}

// optim.state_dtype = "bf16": the file still holds FP32 moments, every one of them a widened
// BF16 value, so stopping and resuming continues bit for bit. The weights stay FP32.
TEST(Resume, Bf16StateExitAtStepThenResumeEqualsStraight) {
  const std::string kBf16 = " --set optim.state_dtype=bf16";
  const fs::path straight = make_run("bf16_straight");
  ASSERT_EQ(run(straight, "train --config c.toml" + kBf16), 0) << slurp(straight / "err.txt");
  EXPECT_NE(slurp(straight / "log.txt").find("bf16 moments"), std::string::npos);
  const fs::path split = make_run("bf16_split");
  ASSERT_EQ(run(split, "train --config c.toml --set training.exit_at_step=10" + kBf16), 0)
      << slurp(split / "err.txt");
  ASSERT_TRUE(fs::exists(split / "ckpt" / "step-00000010.h5"));
  ASSERT_EQ(run(split, "train --config c.toml --resume" + kBf16), 0) << slurp(split / "err.txt");
  const std::vector<std::string> ref = losses(straight / "metrics.jsonl");
  ASSERT_EQ(ref.size(), 24u);
  EXPECT_EQ(losses(split / "metrics.jsonl"), ref);
  const fs::path last = straight / "ckpt" / "step-00000024.h5";
  expect_same_checkpoint(last, split / "ckpt" / "step-00000024.h5");

  for (const char* moment : {"/optim/m/", "/optim/v/"}) {
    const Bf16Census c = bf16_census(last, moment);
    EXPECT_GT(c.elements, 1000) << moment;
    EXPECT_GT(c.nonzero, c.elements / 2) << moment;
    EXPECT_EQ(c.not_bf16, 0) << moment;
  }
  // The master weights are FP32, and an FP32-state run's moments are not BF16 values: the
  // census above can fail.
  EXPECT_GT(bf16_census(last, "/model/").not_bf16, 1000);
  const fs::path fp32 = make_run("bf16_vs_fp32");
  ASSERT_EQ(run(fp32, "train --config c.toml --set training.steps=3"), 0);
  EXPECT_GT(bf16_census(fp32 / "ckpt" / "step-00000003.h5", "/optim/m/").not_bf16, 1000);
}

// Every low-precision option at once (FP8 GEMMs, the FP8 dispatch rounding, BF16 moments):
// the GEMM copy of the weights is rebuilt from the master weights at each step, so a resumed
// run is still the straight run bit for bit.
TEST(Resume, Fp8ExitAtStepThenResumeEqualsStraight) {
  const std::string fp8 = " --set precision.mode=fp8 --set precision.dispatch_fp8=true"
                          " --set optim.state_dtype=bf16";
  const fs::path straight = make_run("fp8_straight");
  ASSERT_EQ(run(straight, "train --config c.toml" + fp8), 0) << slurp(straight / "err.txt");
  const fs::path split = make_run("fp8_split");
  ASSERT_EQ(run(split, "train --config c.toml --set training.exit_at_step=10" + fp8), 0);
  ASSERT_EQ(run(split, "train --config c.toml --resume" + fp8), 0) << slurp(split / "err.txt");
  EXPECT_EQ(losses(split / "metrics.jsonl"), losses(straight / "metrics.jsonl"));
  expect_same_checkpoint(straight / "ckpt" / "step-00000024.h5", split / "ckpt" / "step-00000024.h5");
}

TEST(Resume, SigtermSavesAndExitsZero) {
  const fs::path d = make_run("sigterm");
  Proc p = spawn(d, "train --config c.toml --set training.steps=100000 --set checkpoint.every=0");
  wait_for_first_step(d);
  kill(p.pid, SIGTERM);
  EXPECT_EQ(wait_exit(p), 0);
  const std::string log = slurp(d / "log.txt");
  EXPECT_NE(log.find("SIGTERM"), std::string::npos) << log;
  const std::string latest = slurp(d / "ckpt" / "latest");
  ASSERT_FALSE(latest.empty());
  EXPECT_TRUE(fs::exists(d / "ckpt" / latest.substr(0, latest.size() - 1)));
}

// A second signal while the job is stopping does not prevent or corrupt the save.
TEST(Resume, SecondSignalStillSaves) {
  const fs::path d = make_run("sigterm2");
  Proc p = spawn(d, "train --config c.toml --set training.steps=100000 --set checkpoint.every=0");
  wait_for_first_step(d);
  kill(p.pid, SIGTERM);
  std::this_thread::sleep_for(std::chrono::milliseconds(2));
  kill(p.pid, SIGINT);
  EXPECT_EQ(wait_exit(p), 0);
  const std::string latest = slurp(d / "ckpt" / "latest");
  ASSERT_FALSE(latest.empty());
  moe::CheckpointReader r((d / "ckpt" / latest.substr(0, latest.size() - 1)).string());
  EXPECT_EQ(r.verify_all(), "");
}

TEST(Resume, ExitAfterMinutesSavesAndStops) {
  const fs::path d = make_run("minutes");
  ASSERT_EQ(run(d, "train --config c.toml --set training.steps=100000 --set checkpoint.every=0 "
                   "--set training.exit_after_minutes=0.01"), 0);
  const std::string log = slurp(d / "log.txt");
  EXPECT_NE(log.find("training.exit_after_minutes"), std::string::npos) << log;
  EXPECT_FALSE(slurp(d / "ckpt" / "latest").empty());
}

TEST(Resume, CorruptNewestFallsBackToPrevious) {
  const fs::path d = make_run("corrupt");
  ASSERT_EQ(run(d, "train --config c.toml --set training.exit_at_step=6"), 0);
  const fs::path newest = d / "ckpt" / "step-00000006.h5";
  ASSERT_TRUE(fs::exists(newest));
  // Flip bytes in the middle of the file (tensor data, checksummed).
  std::string bytes = slurp(newest);
  for (size_t i = bytes.size() / 2; i < bytes.size() / 2 + 64; ++i) bytes[i] = static_cast<char>(~bytes[i]);
  write(newest, bytes);
  ASSERT_EQ(run(d, "train --config c.toml --resume --set training.exit_at_step=8"), 0);
  const std::string err = slurp(d / "err.txt"), log = slurp(d / "log.txt");
  EXPECT_NE(err.find("step-00000006.h5"), std::string::npos) << err;
  EXPECT_NE(log.find("step-00000005.h5 at step 5"), std::string::npos) << log;

  // Truncated newest, and no latest pointer: still falls back by file order.
  const fs::path n8 = d / "ckpt" / "step-00000008.h5";
  fs::resize_file(n8, fs::file_size(n8) / 3);
  fs::remove(d / "ckpt" / "latest");
  write(d / "err.txt", "");
  ASSERT_EQ(run(d, "train --config c.toml --resume --set training.exit_at_step=9"), 0);
  EXPECT_NE(slurp(d / "log.txt").find("step-00000007.h5 at step 7"), std::string::npos);

  // Garbage everywhere: a clear error, non-zero, nothing started.
  for (const auto& e : fs::directory_iterator(d / "ckpt"))
    if (e.path().extension() == ".h5") write(e.path(), "garbage");
  write(d / "err.txt", "");
  EXPECT_NE(run(d, "train --config c.toml --resume"), 0);
  EXPECT_NE(slurp(d / "err.txt").find("no valid checkpoint"), std::string::npos) << slurp(d / "err.txt");
}

TEST(Resume, UnsafeChangesRefusedSafeOnesReported) {
  const fs::path d = make_run("changes");
  ASSERT_EQ(run(d, "train --config c.toml --set training.exit_at_step=3"), 0);
  EXPECT_NE(run(d, "train --config c.toml --resume --set model.d_model=64"), 0);
  EXPECT_NE(slurp(d / "err.txt").find("model.d_model"), std::string::npos);
  // Starting fresh over an earlier run's checkpoints is refused, not silently pruned.
  EXPECT_NE(run(d, "train --config c.toml"), 0);
  EXPECT_NE(slurp(d / "err.txt").find("--resume"), std::string::npos);
  ASSERT_EQ(run(d, "train --config c.toml --resume --set training.steps=30 "
                   "--set training.exit_at_step=4"), 0);
  EXPECT_NE(slurp(d / "log.txt").find("changed training.steps: 24 -> 30"), std::string::npos)
      << slurp(d / "log.txt");
}

TEST(CheckpointTools, InspectEvalGenerate) {
  const fs::path d = make_run("tools");
  ASSERT_EQ(run(d, "train --config c.toml --set training.steps=6"), 0);
  ASSERT_EQ(run(d, "inspect ckpt"), 0) << slurp(d / "err.txt");
  const std::string log = slurp(d / "log.txt");
  EXPECT_NE(log.find("step 6 of 6"), std::string::npos) << log;
  EXPECT_NE(log.find("/model/layers/1/moe/experts/3/w_down"), std::string::npos);
  EXPECT_NE(log.find("all"), std::string::npos);
  ASSERT_EQ(run(d, "eval --checkpoint ckpt/step-00000006.h5"), 0);
  EXPECT_NE(slurp(d / "log.txt").find("bits per byte"), std::string::npos);
  write(d / "log.txt", "");
  ASSERT_EQ(run(d, "generate --checkpoint ckpt --prompt Hello --tokens 20 --seed 5"), 0);
  const std::string g1 = slurp(d / "log.txt");
  write(d / "log.txt", "");
  ASSERT_EQ(run(d, "generate --checkpoint ckpt --prompt Hello --tokens 20 --seed 5"), 0);
  EXPECT_EQ(slurp(d / "log.txt"), g1);
  EXPECT_EQ(g1.rfind("Hello", 0), 0u);
  // A corrupted checkpoint: inspect reports it in one line and exits non-zero.
  const fs::path f = d / "ckpt" / "step-00000006.h5";
  std::string bytes = slurp(f);
  for (size_t i = bytes.size() / 2; i < bytes.size() / 2 + 16; ++i) bytes[i] = static_cast<char>(~bytes[i]);
  write(f, bytes);
  write(d / "err.txt", "");
  EXPECT_NE(run(d, "inspect ckpt/step-00000006.h5"), 0);
  EXPECT_FALSE(slurp(d / "err.txt").empty());
}

}  // namespace
