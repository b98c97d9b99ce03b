// Issue 9: every bad config and bad command line fails through the real binary with one line
// on stderr that says what and where, a non-zero exit, and nothing written. One table row per
// mistake; each row is its own CTest entry. Every row fails during validation, before any
// training step, so the whole table runs in seconds.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "io/dataset.h"
#include "tests/run_binary.h"

namespace {

namespace fs = std::filesystem;

// A small, valid run: if a row's mistake went unnoticed it would train 4 steps and write
// ckpt/ and metrics.jsonl, which the test would see.
const char* kConfig =
    "[model]\nd_model = 32\nn_layers = 2\nn_heads = 2\nn_kv_heads = 1\nseq_len = 32\n"
    "dense_layers = 1\n"
    "[moe]\nnum_experts = 4\ntop_k = 2\nd_expert = 32\n"
    "[training]\nsteps = 4\nglobal_batch = 8\nmicro_batch = 4\n"
    "[data]\ntrain = \"data/train.bin\"\nval = \"data/val.bin\"\n"
    "[checkpoint]\ndir = \"ckpt\"\nevery = 1\n"
    "[log]\nevery = 1\neval_every = 2\neval_batches = 1\nmetrics_file = \"metrics.jsonl\"\nsamples = 0\n";

// Our shard header (see io/dataset.h) for `count` byte tokens, followed by `token_bytes` bytes.
std::string shard_bytes(uint64_t count, size_t token_bytes) {
  std::string h(moe::kShardHeaderBytes, '\0');
  const uint32_t version = 1, dtype = 1, vocab = 256;
  std::memcpy(h.data(), moe::kShardMagic, 8);
  std::memcpy(h.data() + 8, &version, 4);
  std::memcpy(h.data() + 12, &dtype, 4);
  std::memcpy(h.data() + 16, &count, 8);
  std::memcpy(h.data() + 24, &vocab, 4);
  return h + std::string(token_bytes, 'a');
}

struct BadInput {
  const char* name;
  // Files to create in the run folder before the run (a name ending in '/' is a folder).
  std::vector<std::pair<std::string, std::string>> files;
  std::string args;
  std::vector<std::string> expected;  // substrings of the error line
};

const std::vector<BadInput>& bad_inputs() {
  static const std::vector<BadInput> cases = {
      // ---- the command line ----
      {"no_subcommand", {}, "", {"subcommand is required"}},
      {"unknown_subcommand", {}, "frobnicate --config c.toml", {"unknown subcommand 'frobnicate'"}},
      {"train_without_config", {}, "train", {"--config is required"}},
      {"config_without_value", {}, "train --config", {"--config"}},
      {"unknown_flag", {}, "train --config c.toml --bogus", {"--bogus"}},
      {"extra_argument", {}, "train --config c.toml extra", {"not expected", "extra"}},
      {"set_without_value", {}, "train --config c.toml --set", {"--set"}},
      {"bench_steps_zero", {}, "bench --config c.toml --steps 0", {"--steps", "not in range 1 to 100000"}},
      {"bench_two_measurements", {}, "bench --config c.toml --checkpoint-io --precision",
       {"--checkpoint-io and --precision"}},
      {"prepare_without_input", {}, "prepare --output out", {"--input is required"}},
      {"prepare_missing_input", {}, "prepare --input nowhere --output out",
       {"nowhere: cannot open: No such file or directory"}},
      {"prepare_val_fraction", {}, "prepare --input c.toml --output out --val-fraction 1.5",
       {"--val-fraction", "not in range"}},
      {"schedule_bad_kind", {}, "schedule --kind gpipe --pp 2 --micro-batches 4",
       {"--kind expects one of 1f1b, zb1p, dualpipe, dualpipev, got 'gpipe'"}},
      {"schedule_dualpipe_odd_pp", {}, "schedule --kind dualpipe --pp 3 --micro-batches 6",
       {"dualpipe needs an even pp, got 3"}},
      {"schedule_micro_batches_not_a_number", {}, "schedule --kind 1f1b --pp 2 --micro-batches many",
       {"--micro-batches", "many"}},
      {"generate_tokens_zero", {}, "generate --checkpoint ckpt --tokens 0", {"--tokens", "not in range"}},
      {"generate_negative_temperature", {}, "generate --checkpoint ckpt --temperature -1",
       {"--temperature", "not in range"}},
      {"export_bad_format", {}, "export --checkpoint ckpt --output hf --format gguf", {"--format", "gguf"}},
      {"export_without_output", {}, "export --checkpoint ckpt", {"--output is required"}},
      {"inspect_without_checkpoint", {}, "inspect", {"checkpoint is required"}},
      {"eval_batches_zero", {}, "eval --checkpoint ckpt --batches 0", {"--batches", "not in range"}},
      // ---- checkpoints that are not there ----
      {"eval_missing_checkpoint", {}, "eval --checkpoint nowhere.h5", {"nowhere.h5: no such checkpoint file or folder"}},
      {"generate_missing_checkpoint", {}, "generate --checkpoint nowhere", {"nowhere: no such checkpoint file or folder"}},
      {"inspect_missing_checkpoint", {}, "inspect nowhere.h5", {"nowhere.h5: no such checkpoint file or folder"}},
      {"export_missing_checkpoint", {}, "export --checkpoint nowhere.h5 --output hf",
       {"nowhere.h5: no such checkpoint file or folder"}},
      {"eval_not_a_checkpoint", {}, "eval --checkpoint c.toml", {"c.toml: not a moetrain checkpoint"}},
      {"inspect_folder_without_checkpoints", {{"old/", ""}}, "inspect old",
       {"old: no checkpoint in this folder"}},
      {"generate_folder_of_corrupt_checkpoints", {{"old/", ""}, {"old/step-00000002.h5", "garbage"},
                                                  {"old/step-00000001.h5", "more garbage"}},
       "generate --checkpoint old",
       {"old: no readable checkpoint in this folder (2 tried; newest: old/step-00000002.h5: not a "
        "moetrain checkpoint"}},
      // ---- the config file ----
      {"config_missing", {}, "train --config nowhere.toml", {"nowhere.toml: cannot open config file"}},
      {"config_is_folder", {{"cfg/", ""}}, "train --config cfg", {"cfg: is a folder, not a TOML config file"}},
      {"config_empty", {{"empty.toml", ""}}, "train --config empty.toml", {"empty.toml: config file is empty"}},
      {"config_only_comments", {{"empty.toml", "# nothing here\n\n"}}, "train --config empty.toml",
       {"empty.toml: config file is empty"}},
      {"config_binary", {{"bin.toml", std::string("\x7f" "ELF\x02\x01\x01\0\0\0", 10)}},
       "train --config bin.toml", {"bin.toml:1:"}},
      {"toml_syntax", {{"bad.toml", "[model]\nd_model = 32\nn_layers = = 2\n"}}, "train --config bad.toml",
       {"bad.toml:3:12:", "could not determine value type"}},
      {"toml_unterminated_string", {{"bad.toml", "[run]\nname = \"tiny\n[model]\n"}}, "train --config bad.toml",
       {"bad.toml:2:"}},
      {"toml_duplicate_key", {{"bad.toml", "[model]\nd_model = 32\nd_model = 64\n"}}, "train --config bad.toml",
       {"bad.toml:3:", "d_model"}},
      {"unknown_key", {{"bad.toml", "[model]\nd_model = 32\nn_layrs = 2\n"}}, "train --config bad.toml",
       {"bad.toml:3:1: unknown key model.n_layrs"}},
      {"unknown_section", {{"bad.toml", "[run]\nname = \"x\"\n[modle]\nd_model = 32\n"}}, "train --config bad.toml",
       {"bad.toml:3:1: unknown section [modle]"}},
      {"int_got_string", {{"bad.toml", "[training]\nsteps = \"many\"\n"}}, "train --config bad.toml",
       {"bad.toml:2:9: training.steps expects an integer, got string"}},
      {"float_got_string", {{"bad.toml", "[optim]\nlr = \"fast\"\n"}}, "train --config bad.toml",
       {"bad.toml:2:6: optim.lr expects a float, got string"}},
      {"bool_got_string", {{"bad.toml", "[model]\ntie_embeddings = \"yes\"\n"}}, "train --config bad.toml",
       {"bad.toml:2:18: model.tie_embeddings expects a boolean, got string"}},
      {"enum_bad_value", {{"bad.toml", "[precision]\nmode = \"fp4\"\n"}}, "train --config bad.toml",
       {"bad.toml:2:8: precision.mode expects one of \"fp32\", \"bf16\", \"fp8\", got \"fp4\""}},
      {"betas_wrong_length", {{"bad.toml", "[optim]\nbetas = [0.9]\n"}}, "train --config bad.toml",
       {"bad.toml:2:9: optim.betas expects an array of two floats, got an array of 1"}},
      {"vocab_too_small", {{"bad.toml", "[model]\nvocab_size = 1\n"}}, "train --config bad.toml",
       {"bad.toml:2:1: model.vocab_size must be >= 2, got 1"}},
      {"lr_negative", {}, "train --config c.toml --set optim.lr=-0.1",
       {"--set optim.lr=-0.1: optim.lr must be > 0, got -0.1"}},
      {"min_lr_ratio_range", {}, "train --config c.toml --set lr.min_lr_ratio=2",
       {"lr.min_lr_ratio must be in [0, 1], got 2"}},
      // ---- impossible combinations ----
      {"ep_not_dividing_experts", {}, "train --config c.toml --set moe.num_experts=6 --set parallel.dp=4 --set parallel.ep=4",
       {"moe.num_experts = 6 is not divisible by parallel.ep = 4"}},
      {"dualpipe_odd_pp", {}, "train --config c.toml --set parallel.pp=3 --set parallel.schedule=dualpipe",
       {"--set parallel.schedule=dualpipe: parallel.schedule = \"dualpipe\" needs an even parallel.pp, got 3"}},
      {"micro_batch_not_dividing_global", {}, "train --config c.toml --set training.micro_batch=3",
       {"--set training.micro_batch=3: training.global_batch = 8 is not divisible by training.micro_batch * "
        "parallel.dp = 3"}},
      {"top_k_exceeds_experts", {}, "train --config c.toml --set moe.top_k=5",
       {"moe.top_k = 5 exceeds moe.num_experts = 4"}},
      {"kv_heads_not_dividing_heads", {}, "train --config c.toml --set model.n_kv_heads=3",
       {"model.n_heads = 2 is not divisible by model.n_kv_heads = 3"}},
      {"dense_layers_exceed_layers", {}, "train --config c.toml --set model.dense_layers=3",
       {"model.dense_layers = 3 exceeds model.n_layers = 2"}},
      {"mtp_across_1f1b_pipeline", {}, "train --config c.toml --set parallel.pp=2 --set model.mtp_depth=1",
       {"model.mtp_depth > 0 needs the embedding on the head's rank"}},
      {"pipeline_without_ranks", {}, "train --config c.toml --set parallel.pp=2",
       {"c.toml: parallel.dp = 1 x parallel.pp = 2 needs 2 ranks, but the job has 1"}},
      // ---- run-behaviour keys (issue 9) ----
      {"on_nonfinite_value", {}, "train --config c.toml --set training.on_nonfinite=ignore",
       {"training.on_nonfinite expects one of \"skip\", \"abort\", got \"ignore\""}},
      {"spike_factor_range", {}, "train --config c.toml --set training.spike_factor=0.5",
       {"training.spike_factor must be 0 (off) or > 1, got 0.5"}},
      {"timeout_s_zero", {}, "train --config c.toml --set parallel.timeout_s=0",
       {"parallel.timeout_s must be > 0, got 0"}},
      // ---- --set overrides ----
      {"set_unknown_key", {}, "train --config c.toml --set model.d_modle=64",
       {"--set model.d_modle=64: unknown key model.d_modle"}},
      {"set_unknown_section", {}, "train --config c.toml --set modle.d_model=64",
       {"--set modle.d_model=64: unknown section [modle]"}},
      {"set_bad_value", {}, "train --config c.toml --set training.steps=abc",
       {"--set training.steps=abc: training.steps expects an integer, got string"}},
      {"set_missing_equals", {}, "train --config c.toml --set training.steps",
       {"--set training.steps: expected section.key=value"}},
      {"set_empty_value", {}, "train --config c.toml --set training.steps=",
       {"--set training.steps=: training.steps expects an integer, got string"}},
      // ---- data and output paths ----
      {"train_data_missing", {}, "train --config c.toml --set data.train=nowhere.bin",
       {"nowhere.bin: cannot open: No such file or directory"}},
      {"val_data_missing", {}, "train --config c.toml --set data.val=nowhere.bin",
       {"nowhere.bin: cannot open: No such file or directory"}},
      {"train_data_is_folder", {}, "train --config c.toml --set data.train=data",
       {"data: is a folder, not a token shard file"}},
      {"train_data_not_a_shard", {}, "train --config c.toml --set data.train=c.toml",
       {"c.toml: not a token shard (bad magic"}},
      {"train_data_truncated", {{"short.bin", shard_bytes(1000, 100)}},
       "train --config c.toml --set data.train=short.bin", {"short.bin: truncated", "1000 tokens"}},
      {"vocab_mismatch", {}, "train --config c.toml --set model.vocab_size=128",
       {"data/train.bin: tokens were made for vocabulary 256 but model.vocab_size = 128"}},
      {"seq_len_longer_than_val", {}, "train --config c.toml --set model.seq_len=1000",
       {"data/val.bin", "fewer than model.seq_len + 1 = 1001"}},
      {"resume_missing_path", {}, "train --config c.toml --set checkpoint.resume=nowhere.h5",
       {"nowhere.h5: checkpoint.resume: no such file"}},
      {"checkpoint_dir_is_file", {}, "train --config c.toml --set checkpoint.dir=c.toml/ckpt",
       {"checkpoint.dir = \"c.toml/ckpt\" cannot be created: c.toml is a file, not a folder"}},
      {"metrics_file_is_folder", {}, "train --config c.toml --set log.metrics_file=data",
       {"data: cannot open metrics file"}},
  };
  return cases;
}

void PrintTo(const BadInput& c, std::ostream* os) { *os << c.name; }

// Every path under `root` with its size: what a failed run must leave unchanged.
std::map<std::string, uintmax_t> tree(const fs::path& root) {
  std::map<std::string, uintmax_t> out;
  for (const auto& e : fs::recursive_directory_iterator(root)) {
    std::error_code ec;
    const uintmax_t size = e.is_regular_file(ec) ? e.file_size(ec) : 0;
    out[fs::relative(e.path(), root).string()] = size;
  }
  return out;
}

class BadInputs : public ::testing::TestWithParam<BadInput> {};

TEST_P(BadInputs, FailWithOneLineAndWriteNothing) {
  const BadInput& c = GetParam();
  // The pid keeps concurrent runs of this suite (other build folders) apart.
  const std::string unique = std::string(c.name) + "_" + std::to_string(::getpid());
  const fs::path dir = moe_test::fresh_dir("moetrain_bad_", unique);
  const fs::path capture = moe_test::fresh_dir("moetrain_bad_out_", unique);
  moe_test::write_text(dir / "c.toml", kConfig);
  std::vector<uint32_t> train, val;
  const std::string text = "It was the best of times, it was the worst of times.\n";
  for (size_t i = 0; i < 4000; ++i) (i < 3400 ? train : val).push_back(static_cast<uint8_t>(text[i % text.size()]));
  moe::shard_write((dir / "data" / "train.bin").string(), train, moe::TokenDtype::kU8, 256);
  moe::shard_write((dir / "data" / "val.bin").string(), val, moe::TokenDtype::kU8, 256);
  for (const auto& [name, content] : c.files) {
    if (name.back() == '/') fs::create_directories(dir / name);
    else moe_test::write_text(dir / name, content);
  }
  const auto before = tree(dir);

  const moe_test::BinaryResult r = moe_test::run_binary(c.args, dir, 60, capture);

  EXPECT_GE(r.code, 1) << "exit status (-1: killed by a signal)\nstdout: " << r.out;
  EXPECT_LT(r.code, 124) << "124: timed out; above: a signal";
  // Exactly one non-empty line, the error, naming what and where.
  ASSERT_FALSE(r.err.empty());
  EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << "not one line:\n" << r.err;
  EXPECT_EQ(r.err.rfind("error: ", 0), 0u) << r.err;
  EXPECT_GT(r.err.size(), std::string("error: \n").size()) << r.err;
  for (const std::string& want : c.expected)
    EXPECT_NE(r.err.find(want), std::string::npos) << "stderr: " << r.err << "expected: " << want;
  EXPECT_EQ(tree(dir), before) << "the failed run wrote into its folder";
  fs::remove_all(dir);
  fs::remove_all(capture);
}

INSTANTIATE_TEST_SUITE_P(Table, BadInputs, ::testing::ValuesIn(bad_inputs()),
                         [](const ::testing::TestParamInfo<BadInput>& info) { return info.param.name; });

}  // namespace
