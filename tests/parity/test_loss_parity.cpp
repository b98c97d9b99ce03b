// Loss parity, the headline of DeepSeek-V3's FP8 recipe: the default run (configs/tiny.toml on
// Debian's fortunes) trained in FP32, BF16 and FP8 from the same seed on the same batches ends
// with validation losses no more than 0.5% above FP32's (the report reached 0.25% on a far
// longer run). One seed is not enough to see that: runs that differ only in rounding drift
// apart as equally good trajectories, by up to 1.7% here (docs/BENCHMARKS.md), so the gap is
// averaged over three seeds. Minutes of training, so it is its own executable, labelled
// 'parity', outside the sanitizer run.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "tests/binary_harness.h"

namespace {

using namespace moe_test;

// The last "val_loss" of a metrics file, NaN when there is none.
double final_val_loss(const fs::path& metrics) {
  const std::string text = slurp(metrics);
  const size_t at = text.rfind("\"val_loss\": ");
  if (at == std::string::npos) return std::nan("");
  return std::stod(text.substr(at + 12));
}

TEST(LossParity, Bf16AndFp8EndNoMoreThanHalfAPercentAboveFp32OverThreeSeeds) {
  const std::string corpus = "/usr/share/games/fortunes";
  if (!fs::is_directory(corpus)) GTEST_SKIP() << corpus << " not installed (Debian package fortunes)";
  const fs::path root = moe_test::test_folder("moetrain_parity");
  const std::string prepare = "cd '" + root.string() + "' && " + MOETRAIN_BINARY +
                              " prepare --input " + corpus + " --output data >/dev/null";
  ASSERT_EQ(std::system(prepare.c_str()), 0);
  const char* modes[] = {"fp32", "bf16", "fp8"};
  const int seeds[] = {1234, 1235, 1236};  // 1234: the config's own
  double gap_sum[3] = {0, 0, 0};
  for (const int seed : seeds) {
    // The three modes of one seed at once.
    Proc procs[3];
    for (int i = 0; i < 3; ++i) {
      const fs::path d = root / (std::string(modes[i]) + "_" + std::to_string(seed));
      fs::create_directories(d);
      procs[i] = spawn(d, std::string("train --config ") + MOETRAIN_SOURCE_DIR +
                              "/configs/tiny.toml --set precision.mode=" + modes[i] +
                              " --set run.seed=" + std::to_string(seed) +
                              " --set data.train=" + (root / "data/train.bin").string() +
                              " --set data.val=" + (root / "data/val.bin").string() +
                              " --set checkpoint.dir=ckpt --set log.metrics_file=metrics.jsonl"
                              " --set log.samples=0 --set log.eval_every=100000");
    }
    double val[3];
    for (int i = 0; i < 3; ++i) {
      const fs::path d = root / (std::string(modes[i]) + "_" + std::to_string(seed));
      ASSERT_EQ(wait_exit(procs[i]), 0) << modes[i] << ": " << slurp(d / "err.txt");
      val[i] = final_val_loss(d / "metrics.jsonl");
      ASSERT_TRUE(std::isfinite(val[i])) << modes[i];
    }
    for (int i = 1; i < 3; ++i) {
      const double gap = (val[i] - val[0]) / val[0];
      gap_sum[i] += gap;
      std::printf("loss parity, seed %d: %s final val loss %.4f vs fp32 %.4f: gap %+.3f%%\n",
                  seed, modes[i], val[i], val[0], 100 * gap);
    }
  }
  for (int i = 1; i < 3; ++i) {
    const double gap = gap_sum[i] / 3;
    std::printf("loss parity: %s mean relative gap over three seeds %+.3f%%\n", modes[i],
                100 * gap);
    // What the recipe promises is no loss from low precision: at most 0.5% worse. A lower
    // loss is no failure; far lower would be suspicious.
    EXPECT_LT(gap, 0.005) << modes[i];
    EXPECT_GT(gap, -0.015) << modes[i];
  }
}

}  // namespace
