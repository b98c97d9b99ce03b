// The binary end to end: bad input of every kind gets one line and a non-zero exit;
// prepare + a few dozen training steps reduce the loss and write the metrics file.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "tests/run_binary.h"

namespace {

namespace fs = std::filesystem;

using moe_test::BinaryResult;
using moe_test::expect_one_line_error;

fs::path test_dir(const std::string& name) { return moe_test::fresh_dir("moetrain_cli_", name); }

BinaryResult run(const std::string& args, const fs::path& dir) { return moe_test::run_binary(args, dir); }

void write(const fs::path& p, const std::string& text) { moe_test::write_text(p, text); }

const char* kSmallModel =
    "[model]\nd_model = 32\nn_layers = 2\nn_heads = 2\nn_kv_heads = 1\nseq_len = 32\n"
    "dense_layers = 1\n[moe]\nnum_experts = 4\ntop_k = 2\nd_expert = 32\nnum_shared_experts = 1\n"
    "[training]\nsteps = 40\nglobal_batch = 8\nmicro_batch = 4\n"
    "[optim]\nlr = 1e-2\n[lr]\nwarmup_steps = 5\n"
    "[log]\nevery = 10\neval_every = 20\neval_batches = 2\nmetrics_file = \"metrics.jsonl\"\n"
    "samples = 1\nsample_tokens = 16\n[data]\ntrain = \"data/train.bin\"\nval = \"data/val.bin\"\n";

TEST(Cli, BadCommandLines) {
  const fs::path d = test_dir("badcli");
  expect_one_line_error(run("", d), "subcommand");
  expect_one_line_error(run("frobnicate", d), "frobnicate");
  expect_one_line_error(run("train", d), "--config");
  expect_one_line_error(run("train --config", d), "--config");
  expect_one_line_error(run("train --config x.toml --bogus", d), "--bogus");
  expect_one_line_error(run("bench --config x.toml --steps 0", d), "--steps");
  expect_one_line_error(run("prepare --output out", d), "--input");
  expect_one_line_error(run("train --config missing.toml", d), "missing.toml");
}

TEST(Cli, BadConfigsNameFileLineAndKey) {
  const fs::path d = test_dir("badcfg");
  write(d / "typo.toml", "[model]\nd_model = 64\nn_layrs = 2\n");
  expect_one_line_error(run("train --config typo.toml", d), "typo.toml:3:1");
  write(d / "topk.toml", "[moe]\nnum_experts = 8\ntop_k = 9\n");
  BinaryResult r = run("train --config topk.toml --dry-run", d);
  expect_one_line_error(r, "topk.toml:3:");
  EXPECT_NE(r.err.find("moe.top_k"), std::string::npos);
  write(d / "ok.toml", "[model]\nd_model = 64\n");
  expect_one_line_error(run("train --config ok.toml --set moe.top_k=99", d), "moe.top_k");
  expect_one_line_error(run("train --config ok.toml --set model.d_model=abc", d), "model.d_model");
  expect_one_line_error(run("train --config ok.toml --set nodot=1", d), "nodot");
}

TEST(Cli, BadDataIsOneLine) {
  const fs::path d = test_dir("baddata");
  write(d / "c.toml", kSmallModel);
  expect_one_line_error(run("train --config c.toml", d), "data/train.bin");
  fs::create_directories(d / "data");
  write(d / "data" / "train.bin", "this is not a token shard at all, just text..........................");
  expect_one_line_error(run("train --config c.toml", d), "data/train.bin");
  expect_one_line_error(run("prepare --input nowhere --output data2", d), "nowhere");
}

TEST(Cli, DryRunPrintsSizes) {
  const fs::path d = test_dir("dryrun");
  BinaryResult r = run(std::string("train --config ") + MOETRAIN_SOURCE_DIR +
                        "/configs/tiny.toml --dry-run --set training.steps=7",
                    d);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("steps = 7"), std::string::npos);
  EXPECT_NE(r.out.find("parameters:"), std::string::npos);
  EXPECT_NE(r.out.find("active per token"), std::string::npos);
  EXPECT_NE(r.out.find("memory"), std::string::npos);
  EXPECT_NE(r.out.find("FLOPs per token"), std::string::npos);
}

// A few dozen steps on real text reduce the training loss; metrics lines carry the keys.
TEST(Cli, EndToEndTrainingReducesLoss) {
  const fs::path d = test_dir("e2e");
  fs::create_directories(d / "text");
  std::string text;
  const char* lines[] = {"The quick brown fox jumps over the lazy dog.\n",
                         "A journey of a thousand miles begins with a single step.\n",
                         "To be or not to be, that is the question.\n",
                         "All that glitters is not gold.\n"};
  for (int i = 0; i < 400; ++i) text += lines[(i * 7) % 4];
  write(d / "text" / "a.txt", text);
  BinaryResult p = run("prepare --input text --output data", d);
  ASSERT_EQ(p.code, 0) << p.err;
  write(d / "c.toml", kSmallModel);
  BinaryResult r = run("train --config c.toml", d);
  ASSERT_EQ(r.code, 0) << r.err << r.out;
  std::ifstream f(d / "metrics.jsonl");
  std::string line;
  std::vector<double> losses;
  int val_lines = 0;
  while (std::getline(f, line)) {
    for (const char* key : {"\"step\"", "\"loss\"", "\"lr\"", "\"grad_norm\"", "\"tokens_per_s\"", "\"mfu\""})
      EXPECT_NE(line.find(key), std::string::npos) << key << " missing in " << line;
    const size_t at = line.find("\"loss\": ");
    ASSERT_NE(at, std::string::npos);
    losses.push_back(std::stod(line.substr(at + 8)));
    val_lines += line.find("\"val_loss\"") != std::string::npos;
  }
  ASSERT_EQ(losses.size(), 40u);
  EXPECT_EQ(val_lines, 2);
  EXPECT_GT(losses.front(), 5.0);  // ~ln(256) at init
  EXPECT_LT(losses.back(), losses.front() - 2.0) << "loss did not go down";
  EXPECT_NE(r.out.find("sample 1:"), std::string::npos);
}

}  // namespace
