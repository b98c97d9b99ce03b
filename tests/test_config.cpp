// io/config: every bad config fails with its exact one-line message; good configs load,
// resolve, round-trip through config_to_toml and hash by value.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "io/config.h"
#include "model/check.h"
#include "trainer/resume.h"

namespace moe {
namespace {

using Overrides = std::vector<std::string>;

std::string error_of(const std::string& text, const Overrides& overrides) {
  try {
    config_parse(text, "x.toml", overrides);
  } catch (const UserError& e) {
    return e.what();
  }
  return "(no error)";
}

struct BadCase {
  const char* name;
  const char* toml;
  Overrides overrides;
  const char* expected;
};

const BadCase kBadCases[] = {
    // Structure.
    {"unknown_key", "[model]\nd_modle = 5\n", {}, "x.toml:2:1: unknown key model.d_modle"},
    {"unknown_section", "[run]\nname = \"a\"\n\n[modle]\nd_model = 5\n", {},
     "x.toml:4:1: unknown section [modle]"},
    {"unknown_root_key", "foo = 1\n", {}, "x.toml:1:1: unknown section [foo]"},
    {"unknown_subtable", "[model.sub]\na = 1\n", {}, "x.toml:1:1: unknown key model.sub"},
    {"first_error_in_file_order", "[model]\nzzz = 1\naaa = 2\n", {}, "x.toml:2:1: unknown key model.zzz"},
    {"section_not_table", "model = 5\n", {}, "x.toml:1:9: model expects a table, got integer"},
    {"section_array_of_tables", "[[model]]\nd_model = 1\n", {}, "x.toml:1:1: model expects a table, got array"},
    {"toml_syntax", "[model]\nd_model = \n", {},
     "x.toml:2:11: Error while parsing key-value pair: expected value, saw '\\n'"},
    {"toml_duplicate_key", "[model]\nd_model = 1\nd_model = 2\n", {},
     "x.toml:3:11: Error while parsing key-value pair: cannot redefine existing integer 'd_model'"},
    // Types.
    {"int_got_string", "[model]\nn_layers = \"x\"\n", {},
     "x.toml:2:12: model.n_layers expects an integer, got string"},
    {"int_got_float", "[model]\nd_model = 1.5\n", {}, "x.toml:2:11: model.d_model expects an integer, got float"},
    {"int_got_table", "[model]\nd_model = {a = 1}\n", {}, "x.toml:2:11: model.d_model expects an integer, got table"},
    {"int_out_of_range", "[model]\nd_model = 3000000000\n", {},
     "x.toml:2:11: model.d_model expects a 32-bit integer, got 3000000000"},
    {"int64_got_float", "[training]\nsteps = 1e3\n", {}, "x.toml:2:9: training.steps expects an integer, got float"},
    {"seed_negative", "[run]\nseed = -1\n", {}, "x.toml:2:8: run.seed expects a non-negative integer, got -1"},
    {"float_got_string", "[optim]\nlr = \"fast\"\n", {}, "x.toml:2:6: optim.lr expects a float, got string"},
    {"float_not_finite", "[optim]\nlr = inf\n", {}, "x.toml:2:6: optim.lr expects a finite float, got inf"},
    {"bool_got_int", "[model]\ntie_embeddings = 1\n", {},
     "x.toml:2:18: model.tie_embeddings expects a boolean, got integer"},
    {"string_got_int", "[data]\ntrain = 5\n", {}, "x.toml:2:9: data.train expects a string, got integer"},
    {"string_got_date", "[run]\nname = 1979-05-27\n", {}, "x.toml:2:8: run.name expects a string, got date"},
    {"enum_got_int", "[run]\ndevice = 1\n", {},
     "x.toml:2:10: run.device expects one of \"cpu\", \"cuda\", \"auto\", got integer"},
    {"enum_bad_value", "[moe]\nscore = \"relu\"\n", {},
     "x.toml:2:9: moe.score expects one of \"softmax\", \"sigmoid\", got \"relu\""},
    {"enum_case_sensitive", "[parallel]\nschedule = \"DualPipe\"\n", {},
     "x.toml:2:12: parallel.schedule expects one of \"1f1b\", \"zb1p\", \"dualpipe\", \"dualpipev\", got "
     "\"DualPipe\""},
    {"array_got_float", "[optim]\nbetas = 0.9\n", {},
     "x.toml:2:9: optim.betas expects an array of two floats, got float"},
    {"array_wrong_length", "[optim]\nbetas = [0.9]\n", {},
     "x.toml:2:9: optim.betas expects an array of two floats, got an array of 1"},
    {"array_element_type", "[optim]\nbetas = [0.9, \"x\"]\n", {},
     "x.toml:2:15: optim.betas[1] expects a float, got string"},
    {"int_array_got_int", "[parallel]\nstage_layers = 3\n", {},
     "x.toml:2:16: parallel.stage_layers expects an array of integers, got integer"},
    {"int_array_element_type", "[parallel]\nstage_layers = [3, 1.5]\n", {},
     "x.toml:2:20: parallel.stage_layers[1] expects an integer, got float"},
    // Ranges.
    {"vocab_size", "[model]\nvocab_size = 1\n", {}, "x.toml:2:1: model.vocab_size must be >= 2, got 1"},
    {"d_model", "[model]\nd_model = 0\n", {}, "x.toml:2:1: model.d_model must be >= 1, got 0"},
    {"head_dim_odd", "[model]\nhead_dim = 3\n", {}, "x.toml:2:1: model.head_dim must be even and >= 2 (RoPE), got 3"},
    {"d_ff_negative", "[model]\nd_ff = -1\n", {}, "x.toml:2:1: model.d_ff must be >= 0, got -1"},
    {"init_std", "[model]\ninit_std = 0.0\n", {}, "x.toml:2:1: model.init_std must be > 0, got 0"},
    {"rope_theta", "[attention]\nrope_theta = -1\n", {}, "x.toml:2:1: attention.rope_theta must be > 0, got -1"},
    {"route_scale", "[moe]\nroute_scale = 0\n", {}, "x.toml:2:1: moe.route_scale must be > 0, got 0"},
    {"lr", "[optim]\nlr = 0\n", {}, "x.toml:2:1: optim.lr must be > 0, got 0"},
    {"betas", "[optim]\nbetas = [0.9, 1.0]\n", {}, "x.toml:2:1: optim.betas must each be in [0, 1), got [0.9, 1]"},
    {"min_lr_ratio", "[lr]\nmin_lr_ratio = 1.5\n", {}, "x.toml:2:1: lr.min_lr_ratio must be in [0, 1], got 1.5"},
    {"decay_fraction", "[lr]\ndecay_fraction = 0\n", {}, "x.toml:2:1: lr.decay_fraction must be in (0, 1], got 0"},
    {"data_train_empty", "[data]\ntrain = \"\"\n", {}, "x.toml:2:1: data.train must be non-empty"},
    {"steps", "", {"training.steps=0"}, "--set training.steps=0: training.steps must be >= 1, got 0"},
    {"threads", "", {"run.threads=-1"}, "--set run.threads=-1: run.threads must be >= 0, got -1"},
    {"n_layers", "", {"model.n_layers=0"}, "--set model.n_layers=0: model.n_layers must be >= 1, got 0"},
    {"seq_len", "", {"model.seq_len=0"}, "--set model.seq_len=0: model.seq_len must be >= 1, got 0"},
    {"mtp_depth", "", {"model.mtp_depth=-1"}, "--set model.mtp_depth=-1: model.mtp_depth must be >= 0, got -1"},
    {"norm_eps", "", {"model.norm_eps=0"}, "--set model.norm_eps=0: model.norm_eps must be > 0, got 0"},
    {"d_expert", "", {"moe.d_expert=0"}, "--set moe.d_expert=0: moe.d_expert must be >= 1, got 0"},
    {"aux_loss_alpha", "", {"moe.aux_loss_alpha=-0.5"},
     "--set moe.aux_loss_alpha=-0.5: moe.aux_loss_alpha must be >= 0, got -0.5"},
    {"micro_batch", "", {"training.micro_batch=0"},
     "--set training.micro_batch=0: training.micro_batch must be >= 1, got 0"},
    {"exit_after_minutes", "", {"training.exit_after_minutes=-1"},
     "--set training.exit_after_minutes=-1: training.exit_after_minutes must be >= 0, got -1"},
    {"grad_clip", "", {"optim.grad_clip=-1"}, "--set optim.grad_clip=-1: optim.grad_clip must be >= 0, got -1"},
    {"warmup_steps", "", {"lr.warmup_steps=-1"}, "--set lr.warmup_steps=-1: lr.warmup_steps must be >= 0, got -1"},
    {"pp", "", {"parallel.pp=0"}, "--set parallel.pp=0: parallel.pp must be >= 1, got 0"},
    {"keep_last", "", {"checkpoint.keep_last=0"},
     "--set checkpoint.keep_last=0: checkpoint.keep_last must be >= 1, got 0"},
    {"resume_empty", "", {"checkpoint.resume=\"\""}, "--set checkpoint.resume=\"\": checkpoint.resume must be non-empty"},
    {"log_every", "", {"log.every=0"}, "--set log.every=0: log.every must be >= 1, got 0"},
    {"sample_tokens", "", {"log.sample_tokens=0"},
     "--set log.sample_tokens=0: log.sample_tokens must be >= 1, got 0"},
    // Run-behaviour keys (issue 9).
    {"on_nonfinite", "[training]\non_nonfinite = \"ignore\"\n", {},
     "x.toml:2:16: training.on_nonfinite expects one of \"skip\", \"abort\", got \"ignore\""},
    {"max_skipped_steps", "", {"training.max_skipped_steps=0"},
     "--set training.max_skipped_steps=0: training.max_skipped_steps must be >= 1, got 0"},
    {"spike_factor_below_one", "[training]\nspike_factor = 0.5\n", {},
     "x.toml:2:1: training.spike_factor must be 0 (off) or > 1, got 0.5"},
    {"spike_factor_one", "", {"training.spike_factor=1"},
     "--set training.spike_factor=1: training.spike_factor must be 0 (off) or > 1, got 1"},
    {"spike_window", "", {"training.spike_window=2"},
     "--set training.spike_window=2: training.spike_window must be >= 3, got 2"},
    {"on_spike_value", "", {"training.on_spike=stop"},
     "--set training.on_spike=stop: training.on_spike expects one of \"warn\", \"skip\", \"rollback\", "
     "got \"stop\""},
    {"on_spike_without_detection", "[training]\non_spike = \"rollback\"\n", {},
     "x.toml:2:1: training.on_spike = \"rollback\" needs training.spike_factor > 1 (0 turns spike "
     "detection off)"},
    {"collapse_steps", "", {"moe.collapse_steps=-1"},
     "--set moe.collapse_steps=-1: moe.collapse_steps must be >= 0, got -1"},
    {"imbalance_warn", "[moe]\nimbalance_warn = 0.9\n", {},
     "x.toml:2:1: moe.imbalance_warn must be 0 (off) or >= 1, got 0.9"},
    {"timeout_s_zero", "", {"parallel.timeout_s=0"},
     "--set parallel.timeout_s=0: parallel.timeout_s must be > 0, got 0"},
    {"timeout_s_string", "[parallel]\ntimeout_s = \"10m\"\n", {},
     "x.toml:2:13: parallel.timeout_s expects a float, got string"},
    {"heartbeat_s", "", {"log.heartbeat_s=-1"}, "--set log.heartbeat_s=-1: log.heartbeat_s must be >= 0, got -1"},
    {"on_save_error", "", {"checkpoint.on_save_error=retry"},
     "--set checkpoint.on_save_error=retry: checkpoint.on_save_error expects one of \"stop\", "
     "\"continue\", got \"retry\""},
    // Combinations: reported at the key set last, naming every key involved.
    {"kv_heads_divide", "[model]\nn_heads = 8\nn_kv_heads = 3\n", {},
     "x.toml:3:1: model.n_heads = 8 is not divisible by model.n_kv_heads = 3"},
    {"head_dim_unresolvable", "[model]\nd_model = 100\n", {},
     "x.toml:2:1: model.d_model = 100 is not divisible by model.n_heads = 8; set model.head_dim"},
    {"head_dim_resolved_odd", "[model]\nd_model = 24\n", {},
     "x.toml:2:1: model.head_dim = model.d_model / model.n_heads = 3 must be even and >= 2 (RoPE)"},
    {"dense_layers", "[model]\nn_layers = 2\ndense_layers = 3\n", {},
     "x.toml:3:1: model.dense_layers = 3 exceeds model.n_layers = 2"},
    {"top_k_file", "[moe]\ntop_k = 9\nnum_experts = 8\n", {}, "x.toml:3:1: moe.top_k = 9 exceeds moe.num_experts = 8"},
    {"top_k_default", "[moe]\nnum_experts = 1\n", {}, "x.toml:2:1: moe.top_k = 2 exceeds moe.num_experts = 1"},
    {"top_k_override", "[moe]\nnum_experts = 8\n", {"moe.top_k=9"},
     "--set moe.top_k=9: moe.top_k = 9 exceeds moe.num_experts = 8"},
    {"num_experts_zero", "[moe]\nnum_experts = 0\n", {},
     "x.toml:2:1: moe.num_experts must be >= 1 when model.dense_layers < model.n_layers, got 0"},
    {"num_groups_divide", "[moe]\nnum_groups = 3\n", {},
     "x.toml:2:1: moe.num_experts = 16 is not divisible by moe.num_groups = 3"},
    {"topk_groups_range", "[moe]\nnum_groups = 2\ntopk_groups = 3\n", {},
     "x.toml:3:1: moe.topk_groups = 3 exceeds moe.num_groups = 2"},
    {"top_k_groups_reach", "[moe]\ntop_k = 5\nnum_groups = 4\n", {},
     "x.toml:3:1: moe.top_k = 5 exceeds moe.topk_groups * (moe.num_experts / moe.num_groups) = 4"},
    {"global_batch", "[training]\nglobal_batch = 30\n", {},
     "x.toml:2:1: training.global_batch = 30 is not divisible by training.micro_batch * parallel.dp = 4"},
    {"global_batch_dp", "", {"parallel.dp=3"},
     "--set parallel.dp=3: training.global_batch = 32 is not divisible by training.micro_batch * parallel.dp = 12"},
    {"ep_divides_dp", "[parallel]\ndp = 4\nep = 3\n", {}, "x.toml:3:1: parallel.dp = 4 is not divisible by parallel.ep = 3"},
    {"ep_divides_experts", "[parallel]\nep = 3\ndp = 6\n", {},
     "x.toml:2:1: moe.num_experts = 16 is not divisible by parallel.ep = 3"},
    {"groups_on_whole_ranks", "[moe]\nnum_experts = 24\nnum_groups = 3\n[parallel]\ndp = 2\nep = 2\n", {},
     "x.toml:6:1: moe.num_groups = 3 and parallel.ep = 2: one must divide the other so that each "
     "expert group maps to whole ranks"},
    {"dualpipe_odd_pp", "[parallel]\npp = 3\nschedule = \"dualpipe\"\n", {},
     "x.toml:3:1: parallel.schedule = \"dualpipe\" needs an even parallel.pp, got 3"},
    {"pp_exceeds_layers", "[parallel]\npp = 8\n", {}, "x.toml:2:1: parallel.pp = 8 exceeds model.n_layers = 6"},
    {"dualpipev_stages", "[parallel]\npp = 4\nschedule = \"dualpipev\"\n", {},
     "x.toml:3:1: parallel.schedule = \"dualpipev\" needs model.n_layers >= 2 * parallel.pp = 8, got 6"},
    {"dualpipe_pp_exceeds_layers", "[model]\nn_layers = 4\n[parallel]\npp = 6\nschedule = \"dualpipe\"\n", {},
     "x.toml:4:1: parallel.pp = 6 exceeds model.n_layers = 4"},
    {"stage_layers_count", "[parallel]\npp = 2\nstage_layers = [6]\n", {},
     "x.toml:3:1: parallel.stage_layers = [6] needs 2 entries (one per pipeline stage: parallel.pp = 2), "
     "each >= 1, summing to model.n_layers = 6"},
    {"stage_layers_zero", "[parallel]\npp = 2\nstage_layers = [6, 0]\n", {},
     "x.toml:3:1: parallel.stage_layers = [6, 0] needs 2 entries (one per pipeline stage: parallel.pp = 2), "
     "each >= 1, summing to model.n_layers = 6"},
    {"stage_layers_negative", "[parallel]\npp = 2\nstage_layers = [7, -1]\n", {},
     "x.toml:3:1: parallel.stage_layers = [7, -1] needs 2 entries (one per pipeline stage: parallel.pp = 2), "
     "each >= 1, summing to model.n_layers = 6"},
    {"stage_layers_sum", "", {"parallel.pp=3", "parallel.stage_layers=[2,2,3]"},
     "--set parallel.stage_layers=[2,2,3]: parallel.stage_layers = [2, 2, 3] needs 3 entries (one per "
     "pipeline stage: parallel.pp = 3), each >= 1, summing to model.n_layers = 6"},
    {"stage_layers_dualpipev", "[parallel]\npp = 2\nschedule = \"dualpipev\"\nstage_layers = [3, 3]\n", {},
     "x.toml:4:1: parallel.stage_layers = [3, 3] needs 4 entries (one per pipeline stage: 2 x "
     "parallel.pp = 4 for parallel.schedule = \"dualpipev\"), each >= 1, summing to model.n_layers = 6"},
    {"stage_layers_no_pipeline", "[parallel]\nstage_layers = [3, 3]\n", {},
     "x.toml:2:1: parallel.stage_layers = [3, 3] needs 1 entry (one per pipeline stage: parallel.pp = 1), "
     "each >= 1, summing to model.n_layers = 6"},
    {"stage_layers_at_last_key", "[parallel]\npp = 2\nstage_layers = [3, 3]\n", {"model.n_layers=8"},
     "--set model.n_layers=8: parallel.stage_layers = [3, 3] needs 2 entries (one per pipeline stage: "
     "parallel.pp = 2), each >= 1, summing to model.n_layers = 8"},
    {"dualpipe_micro_batches", "[parallel]\npp = 4\nschedule = \"dualpipe\"\n[training]\nglobal_batch = 24\n", {},
     "x.toml:5:1: parallel.schedule = \"dualpipe\" with parallel.pp = 4 needs an even number of "
     "micro-batches >= 8 per data-parallel rank, got 6 (training.global_batch / (training.micro_batch x "
     "parallel.dp))"},
    {"dualpipe_micro_batches_odd", "[parallel]\npp = 2\nschedule = \"dualpipe\"\n[training]\nglobal_batch = 20\n",
     {}, "x.toml:5:1: parallel.schedule = \"dualpipe\" with parallel.pp = 2 needs an even number of "
     "micro-batches >= 4 per data-parallel rank, got 5 (training.global_batch / (training.micro_batch x "
     "parallel.dp))"},
    {"dualpipev_micro_batches", "", {"parallel.pp=3", "parallel.schedule=dualpipev", "parallel.dp=2"},
     "--set parallel.dp=2: parallel.schedule = \"dualpipev\" with parallel.pp = 3 needs micro-batches "
     ">= 6 per data-parallel rank, got 4 (training.global_batch / (training.micro_batch x parallel.dp))"},
    {"pipeline_message_tags", "", {"parallel.pp=2", "training.global_batch=16384", "training.micro_batch=1"},
     "--set training.micro_batch=1: parallel.pp = 2 with 16384 micro-batches per data-parallel rank "
     "needs 65536 pipeline message tags, more than the 32768 MPI guarantees (raise "
     "training.micro_batch)"},
    {"tie_embeddings_1f1b", "[model]\ntie_embeddings = true\n[parallel]\npp = 2\n", {},
     "x.toml:4:1: model.tie_embeddings = true needs the embedding and the head on one rank, but "
     "parallel.schedule = \"1f1b\" with parallel.pp = 2 puts them on ranks 0 and 1 (use dualpipe or "
     "dualpipev, or untie)"},
    {"tie_embeddings_zb1p", "[parallel]\npp = 3\nschedule = \"zb1p\"\n", {"model.tie_embeddings=true"},
     "--set model.tie_embeddings=true: model.tie_embeddings = true needs the embedding and the head on one "
     "rank, but parallel.schedule = \"zb1p\" with parallel.pp = 3 puts them on ranks 0 and 2 (use "
     "dualpipe or dualpipev, or untie)"},
    {"mla_needs_ranks", "[attention]\nkind = \"mla\"\n", {},
     "x.toml:2:1: attention.kv_lora_rank must be >= 1 when attention.kind = \"mla\", got 0"},
    {"mla_rope_odd", "[attention]\nkind = \"mla\"\nkv_lora_rank = 64\nqk_nope_head_dim = 32\nqk_rope_head_dim = 7\n"
     "v_head_dim = 32\n", {}, "x.toml:5:1: attention.qk_rope_head_dim must be even (RoPE), got 7"},
    // Overrides.
    {"override_no_equals", "", {"model.d_model"}, "--set model.d_model: expected section.key=value"},
    {"override_no_dot", "", {"d_model=5"}, "--set d_model=5: expected section.key=value"},
    {"override_empty_key", "", {"model.=5"}, "--set model.=5: expected section.key=value"},
    {"override_unknown_key", "", {"model.d_modle=5"}, "--set model.d_modle=5: unknown key model.d_modle"},
    {"override_unknown_section", "", {"modle.d_model=5"}, "--set modle.d_model=5: unknown section [modle]"},
    {"override_int_got_string", "", {"model.n_layers=abc"},
     "--set model.n_layers=abc: model.n_layers expects an integer, got string"},
    {"override_int_got_float", "", {"model.d_model=1.5"},
     "--set model.d_model=1.5: model.d_model expects an integer, got float"},
    {"override_string_got_int", "", {"run.name=5"}, "--set run.name=5: run.name expects a string, got integer"},
    {"override_array_length", "", {"optim.betas=[0.9]"},
     "--set optim.betas=[0.9]: optim.betas expects an array of two floats, got an array of 1"},
    {"override_bad_array_is_string", "", {"optim.betas=[0.9,x]"},
     "--set optim.betas=[0.9,x]: optim.betas expects an array of two floats, got string"},
    {"override_int_array_is_string", "", {"parallel.stage_layers=[2,x]"},
     "--set parallel.stage_layers=[2,x]: parallel.stage_layers expects an array of integers, got string"},
    {"override_newline_escaped", "", {"run.device=a\nb"},
     "--set run.device=a\\nb: run.device expects one of \"cpu\", \"cuda\", \"auto\", got \"a\\nb\""},
    {"override_second_bad", "", {"training.steps=5", "training.steps=x"},
     "--set training.steps=x: training.steps expects an integer, got string"},
};

void PrintTo(const BadCase& c, std::ostream* os) { *os << c.name; }

class ConfigBad : public ::testing::TestWithParam<BadCase> {};

TEST_P(ConfigBad, FailsWithExactOneLineMessage) {
  const BadCase& c = GetParam();
  const std::string msg = error_of(c.toml, c.overrides);
  EXPECT_EQ(msg, c.expected);
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
}

INSTANTIATE_TEST_SUITE_P(Table, ConfigBad, ::testing::ValuesIn(kBadCases),
                         [](const ::testing::TestParamInfo<BadCase>& info) { return info.param.name; });

TEST(ConfigLoad, MissingFile) {
  try {
    config_load("/nonexistent/dir/x.toml", {});
    FAIL() << "no error";
  } catch (const UserError& e) {
    EXPECT_STREQ(e.what(), "/nonexistent/dir/x.toml: cannot open config file: No such file or directory");
  }
}

// A folder reads as an empty stream, and an empty file would silently mean "all defaults".
TEST(ConfigLoad, FolderAndEmptyFileAreErrors) {
  const std::string dir = ::testing::TempDir() + "moetrain_test_config_dir_" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  try {
    config_load(dir, {});
    FAIL() << "no error";
  } catch (const UserError& e) {
    EXPECT_EQ(std::string(e.what()), dir + ": is a folder, not a TOML config file");
  }
  const std::string empty = dir + "/empty.toml";
  for (const char* text : {"", "\n  \n", "# only a comment\n\t# another\r\n"}) {
    std::ofstream(empty) << text;
    try {
      config_load(empty, {"training.steps=5"});
      FAIL() << "no error for " << text;
    } catch (const UserError& e) {
      EXPECT_EQ(std::string(e.what()),
                empty + ": config file is empty (no sections or keys); start from configs/tiny.toml");
    }
  }
  std::ofstream(empty) << "# a comment, then one key\n[training]\nsteps = 5\n";
  EXPECT_EQ(config_load(empty, {}).training.steps, 5);
  std::filesystem::remove_all(dir);
}

TEST(ConfigLoad, FileErrorsNameThePath) {
  const std::string path = ::testing::TempDir() + "moetrain_test_config_" + std::to_string(::getpid()) + ".toml";
  {
    std::ofstream out(path);
    out << "[run]\nname = \"from_file\"\n[moe]\ntop_k = 9\nnum_experts = 8\n";
  }
  try {
    config_load(path, {});
    FAIL() << "no error";
  } catch (const UserError& e) {
    EXPECT_EQ(std::string(e.what()), path + ":5:1: moe.top_k = 9 exceeds moe.num_experts = 8");
  }
  const Config cfg = config_load(path, {"moe.num_experts=16"});
  EXPECT_EQ(cfg.run.name, "from_file");
  EXPECT_EQ(cfg.source, path);
  std::remove(path.c_str());
}

TEST(ConfigGood, DefaultsResolveHeadDimAndDff) {
  const Config cfg = config_parse("", "x.toml", {});
  Config expected;
  expected.model.head_dim = 256 / 8;
  expected.model.d_ff = (2 + 1) * 256;
  expected.source = "x.toml";
  EXPECT_EQ(cfg, expected);
}

TEST(ConfigGood, ExplicitHeadDimAndDffAreKept) {
  const Config cfg = config_parse("[model]\nhead_dim = 64\nd_ff = 1000\n", "x.toml", {});
  EXPECT_EQ(cfg.model.head_dim, 64);
  EXPECT_EQ(cfg.model.d_ff, 1000);
  const Config resolved = config_parse("[model]\nd_model = 96\nn_heads = 4\nn_kv_heads = 4\n[moe]\ntop_k = 3\nd_expert = 10\n"
                                       "num_shared_experts = 2\n", "x.toml", {});
  EXPECT_EQ(resolved.model.head_dim, 24);
  EXPECT_EQ(resolved.model.d_ff, 50);
}

TEST(ConfigGood, OverridesApplyInOrderLastWins) {
  const Config cfg = config_parse("[training]\nsteps = 0\n", "x.toml",
                                  {"training.steps=5", "training.steps=7", "data.train=foo/bar.bin",
                                   "data.val=\"a b.bin\"", "run.device=\"cpu\"", "run.name=tiny-2"});
  EXPECT_EQ(cfg.training.steps, 7);  // the file's out-of-range 0 never reaches validation
  EXPECT_EQ(cfg.data.train, "foo/bar.bin");
  EXPECT_EQ(cfg.data.val, "a b.bin");
  EXPECT_EQ(cfg.run.device, Device::kCpu);
  EXPECT_EQ(cfg.run.name, "tiny-2");
}

TEST(ConfigGood, IntegersAcceptedForFloats) {
  const Config cfg = config_parse("[optim]\nlr = 1\nbetas = [0, 0.5]\n", "x.toml", {"optim.eps=2"});
  EXPECT_EQ(cfg.optim.lr, 1.0);
  EXPECT_EQ(cfg.optim.beta1, 0.0);
  EXPECT_EQ(cfg.optim.beta2, 0.5);
  EXPECT_EQ(cfg.optim.eps, 2.0);
}

TEST(ConfigGood, AllDenseModelNeedsNoExperts) {
  const Config cfg = config_parse("[model]\ndense_layers = 6\n[moe]\nnum_experts = 0\n", "x.toml", {});
  EXPECT_EQ(cfg.moe.num_experts, 0);
}

TEST(ConfigGood, MlaAndGroupedRouting) {
  const Config cfg = config_parse(
      "[attention]\nkind = \"mla\"\nq_lora_rank = 0\nkv_lora_rank = 64\nqk_nope_head_dim = 32\n"
      "qk_rope_head_dim = 16\nv_head_dim = 32\n[moe]\nnum_experts = 16\nnum_groups = 4\ntopk_groups = 2\n"
      "top_k = 8\n[parallel]\ndp = 2\nep = 2\npp = 2\nschedule = \"dualpipe\"\n",
      "x.toml", {});
  EXPECT_EQ(cfg.attention.kind, AttentionKind::kMla);
  EXPECT_EQ(cfg.moe.top_k, 8);
  EXPECT_EQ(cfg.parallel.schedule, PipeSchedule::kDualPipe);
}

TEST(ConfigGood, StageLayersFromFileAndOverride) {
  const Config file = config_parse("[parallel]\npp = 3\nstage_layers = [1, 3, 2]\n", "x.toml", {});
  EXPECT_EQ(file.parallel.stage_layers, (std::vector<int64_t>{1, 3, 2}));
  const Config over = config_parse("[parallel]\npp = 3\nstage_layers = [1, 3, 2]\n", "x.toml",
                                   {"parallel.stage_layers=[2,2,2]"});
  EXPECT_EQ(over.parallel.stage_layers, (std::vector<int64_t>{2, 2, 2}));
  const Config cleared = config_parse("[parallel]\npp = 3\nstage_layers = [1, 3, 2]\n", "x.toml",
                                      {"parallel.stage_layers=[]"});
  EXPECT_TRUE(cleared.parallel.stage_layers.empty());
  const std::string text = config_to_toml(file);
  EXPECT_NE(text.find("\nstage_layers = [1, 3, 2]\n"), std::string::npos) << text;
  EXPECT_NE(config_to_toml(cleared).find("\nstage_layers = []\n"), std::string::npos);
  EXPECT_EQ(config_parse(text, "x.toml", {}), file);
  EXPECT_NE(config_hash(file), config_hash(over));
  // DualPipeV cuts 2 pp stages; with pp = 1 there is one.
  const Config v = config_parse("[parallel]\npp = 2\nschedule = \"dualpipev\"\nstage_layers = [1, 2, 2, 1]\n",
                                "x.toml", {});
  EXPECT_EQ(v.parallel.stage_layers, (std::vector<int64_t>{1, 2, 2, 1}));
  EXPECT_EQ(config_parse("[parallel]\nstage_layers = [6]\n", "x.toml", {}).parallel.stage_layers,
            (std::vector<int64_t>{6}));
}

TEST(ConfigGood, PipelineLayouts) {
  // DualPipe has pp stages (two per rank, each on two ranks): pp = 4 fits 6 layers.
  const Config dual = config_parse("[parallel]\npp = 4\nschedule = \"dualpipe\"\n", "x.toml", {});
  EXPECT_EQ(dual.parallel.pp, 4);
  // Stage 0 and the last stage share rank 0 under DualPipe(V), so tied embeddings are fine.
  for (const char* kind : {"dualpipe", "dualpipev"})
    EXPECT_TRUE(config_parse("[model]\ntie_embeddings = true\n[parallel]\npp = 2\n", "x.toml",
                             {std::string("parallel.schedule=") + kind})
                    .model.tie_embeddings);
  // Without a pipeline the schedule asks nothing of the micro-batches or the head.
  const Config one = config_parse("[model]\nn_layers = 1\ntie_embeddings = true\n[parallel]\n"
                                  "schedule = \"dualpipev\"\n[training]\nglobal_batch = 4\n", "x.toml", {});
  EXPECT_EQ(one.parallel.pp, 1);
  // 1f1b and zb1p run any number of micro-batches, even one.
  EXPECT_EQ(config_parse("[parallel]\npp = 6\nschedule = \"zb1p\"\n[training]\nglobal_batch = 4\n",
                         "x.toml", {}).training.global_batch, 4);
}

TEST(ConfigGood, ToStringSpellsTomlValues) {
  EXPECT_STREQ(to_string(Device::kAuto), "auto");
  EXPECT_STREQ(to_string(AttentionKind::kMla), "mla");
  EXPECT_STREQ(to_string(ScoreFn::kSoftmax), "softmax");
  EXPECT_STREQ(to_string(LrSchedule::kWsd), "wsd");
  EXPECT_STREQ(to_string(PipeSchedule::k1F1B), "1f1b");
  EXPECT_STREQ(to_string(PipeSchedule::kDualPipeV), "dualpipev");
  EXPECT_STREQ(to_string(PrecisionMode::kFp8), "fp8");
  EXPECT_STREQ(to_string(StateDtype::kBf16), "bf16");
  EXPECT_STREQ(to_string(NonfiniteAction::kSkip), "skip");
  EXPECT_STREQ(to_string(NonfiniteAction::kAbort), "abort");
  EXPECT_STREQ(to_string(SpikeAction::kRollback), "rollback");
  EXPECT_STREQ(to_string(SaveErrorAction::kContinue), "continue");
}

// The run-behaviour keys of issue 9 default to what the trainer did before they existed.
TEST(ConfigGood, RunBehaviourDefaults) {
  const Config c = config_parse("", "x.toml", {});
  EXPECT_EQ(c.training.on_nonfinite, NonfiniteAction::kAbort);
  EXPECT_EQ(c.training.max_skipped_steps, 10);
  EXPECT_EQ(c.training.spike_factor, 0.0);
  EXPECT_EQ(c.training.spike_window, 20);
  EXPECT_EQ(c.training.on_spike, SpikeAction::kWarn);
  EXPECT_EQ(c.moe.collapse_steps, 0);
  EXPECT_EQ(c.moe.imbalance_warn, 0.0);
  EXPECT_EQ(c.parallel.timeout_s, 600.0);
  EXPECT_EQ(c.log.heartbeat_s, 60.0);
  EXPECT_EQ(c.checkpoint.on_save_error, SaveErrorAction::kStop);
  const Config on = config_parse(
      "[training]\non_nonfinite = \"skip\"\nmax_skipped_steps = 1\nspike_factor = 1.5\n"
      "spike_window = 3\non_spike = \"skip\"\n[moe]\ncollapse_steps = 1\nimbalance_warn = 1\n"
      "[parallel]\ntimeout_s = 0.5\n[log]\nheartbeat_s = 0\n[checkpoint]\non_save_error = \"continue\"\n",
      "x.toml", {});
  EXPECT_EQ(on.training.on_spike, SpikeAction::kSkip);
  EXPECT_EQ(on.moe.imbalance_warn, 1.0);  // the boundary is allowed
  EXPECT_EQ(on.parallel.timeout_s, 0.5);
  EXPECT_EQ(config_parse(config_to_toml(on), "x.toml", {}), on);
  const std::string text = config_to_toml(c);
  EXPECT_NE(text.find("\non_nonfinite = \"abort\"\n"), std::string::npos) << text;
  EXPECT_NE(text.find("\ntimeout_s = 600.0\n"), std::string::npos) << text;
}

// A checkpoint written before these keys existed holds a config without them; resuming with
// any of them changed is allowed (they steer the run, not the model) and is reported.
TEST(ConfigResume, RunBehaviourKeysMayChange) {
  std::string old_toml = config_to_toml(config_parse("", "x.toml", {}));
  for (const char* key : {"on_nonfinite", "max_skipped_steps", "spike_factor", "spike_window",
                          "on_spike", "collapse_steps", "imbalance_warn", "timeout_s", "heartbeat_s",
                          "on_save_error"}) {
    const size_t at = old_toml.find(std::string("\n") + key + " = ");
    ASSERT_NE(at, std::string::npos) << key;
    old_toml.erase(at, old_toml.find('\n', at + 1) - at);
  }
  const Config saved = config_parse(old_toml, "x.toml", {});
  EXPECT_EQ(saved, config_parse("", "x.toml", {}));
  EXPECT_TRUE(config_resume_changes(saved, saved, "ckpt").empty());
  const Config now = config_parse("", "x.toml",
                                  {"training.on_nonfinite=skip", "training.spike_factor=3",
                                   "training.on_spike=rollback", "moe.imbalance_warn=2",
                                   "parallel.timeout_s=30", "log.heartbeat_s=0",
                                   "checkpoint.on_save_error=continue"});
  const std::vector<std::string> changes = config_resume_changes(saved, now, "ckpt");
  EXPECT_EQ(changes.size(), 7u);
  EXPECT_NE(std::find(changes.begin(), changes.end(), "parallel.timeout_s: 600.0 -> 30.0"), changes.end());
}

TEST(ConfigToToml, WritesEveryKeyResolved) {
  const std::string text = config_to_toml(config_parse("", "x.toml", {}));
  EXPECT_NE(text.find("[model]\nvocab_size = 256\n"), std::string::npos) << text;
  EXPECT_NE(text.find("\nhead_dim = 32\n"), std::string::npos);
  EXPECT_NE(text.find("\nd_ff = 768\n"), std::string::npos);
  EXPECT_NE(text.find("\nbetas = [0.9, 0.95]\n"), std::string::npos);
  EXPECT_NE(text.find("\nlr = 0.003\n"), std::string::npos);
  EXPECT_NE(text.find("\nrope_theta = 10000.0\n"), std::string::npos);  // a float stays a float
  EXPECT_NE(text.find("\nschedule = \"1f1b\"\n"), std::string::npos);
}

TEST(ConfigToToml, RoundTripsDefaults) {
  const Config cfg = config_parse("", "x.toml", {});
  EXPECT_EQ(config_parse(config_to_toml(cfg), "x.toml", {}), cfg);
}

TEST(ConfigToToml, RoundTripsAwkwardValues) {
  Config cfg = config_parse(
      "[run]\nname = \"we\\\"ird\\\\ na\\tme\\n\\u00e9 \\u0001\"\nseed = 9223372036854775807\n"
      "device = \"cuda\"\n[model]\ninit_std = 0.1\nnorm_eps = 1e-300\nmtp_loss_weight = 0.3333333333333333\n"
      "[attention]\nrope_theta = 3.0\n[optim]\nlr = 1.7976931348623157e308\nbetas = [0.1, 0.30000000000000004]\n"
      "state_dtype = \"bf16\"\n[lr]\nschedule = \"wsd\"\n[training]\nsteps = 9007199254740993\n"
      "[log]\nmetrics_file = \"\"\n",
      "x.toml", {});
  EXPECT_EQ(cfg.run.seed, 9223372036854775807ull);
  EXPECT_EQ(cfg.run.name, "we\"ird\\ na\tme\n\xc3\xa9 \x01");
  const std::string text = config_to_toml(cfg);
  const Config back = config_parse(text, "x.toml", {});
  EXPECT_EQ(back, cfg) << text;
  EXPECT_EQ(config_to_toml(back), text);
  EXPECT_EQ(config_hash(back), config_hash(cfg));
}

// One override per key (plus what it needs to stay valid). Every key must appear as the
// first override of some case, so a key added to the schema without a test fails here.
const std::vector<Overrides> kOneKeyChanges = {
    {"run.name=other"}, {"run.seed=7"}, {"run.device=cpu"}, {"run.threads=2"},
    {"model.vocab_size=300"}, {"model.d_model=512"}, {"model.n_layers=8"}, {"model.n_heads=16"},
    {"model.n_kv_heads=4"}, {"model.head_dim=16"}, {"model.seq_len=128"}, {"model.dense_layers=2"},
    {"model.d_ff=1000"}, {"model.tie_embeddings=true"}, {"model.mtp_depth=1"},
    {"model.mtp_loss_weight=0.5"}, {"model.init_std=0.01"}, {"model.norm_eps=1e-5"},
    {"attention.kind=mla", "attention.kv_lora_rank=64", "attention.qk_nope_head_dim=32",
     "attention.qk_rope_head_dim=16", "attention.v_head_dim=32"},
    {"attention.rope_theta=5e5"}, {"attention.q_lora_rank=32"}, {"attention.kv_lora_rank=16"},
    {"attention.qk_nope_head_dim=16"}, {"attention.qk_rope_head_dim=8"}, {"attention.v_head_dim=16"},
    {"moe.num_experts=32"}, {"moe.num_shared_experts=0"}, {"moe.top_k=4"}, {"moe.d_expert=128"},
    {"moe.score=softmax"}, {"moe.route_scale=2.5"}, {"moe.bias_update_speed=0"},
    {"moe.aux_loss_alpha=0"}, {"moe.num_groups=2"}, {"moe.topk_groups=2", "moe.num_groups=4"},
    {"moe.collapse_steps=100"}, {"moe.imbalance_warn=4"},
    {"data.train=a.bin"}, {"data.val=b.bin"},
    {"training.steps=5"}, {"training.global_batch=64"}, {"training.micro_batch=8"},
    {"training.exit_at_step=3"}, {"training.exit_after_minutes=1.5"},
    {"training.on_nonfinite=skip"}, {"training.max_skipped_steps=3"}, {"training.spike_factor=3.5"},
    {"training.spike_window=50"}, {"training.on_spike=rollback", "training.spike_factor=2"},
    {"optim.lr=1e-4"}, {"optim.betas=[0.8, 0.99]"}, {"optim.eps=1e-6"}, {"optim.weight_decay=0"},
    {"optim.grad_clip=0"}, {"optim.state_dtype=bf16"},
    {"lr.schedule=wsd"}, {"lr.warmup_steps=0"}, {"lr.min_lr_ratio=0"}, {"lr.decay_fraction=0.5"},
    {"parallel.dp=2"}, {"parallel.ep=2", "parallel.dp=2"}, {"parallel.pp=2"}, {"parallel.schedule=zb1p"}, {"parallel.bucket_mb=2.5"},
    {"parallel.fb_overlap=false"},
    {"parallel.stage_layers=[6]"}, {"parallel.timeout_s=30"},
    {"precision.mode=bf16"}, {"precision.dispatch_fp8=true"}, {"precision.native_gemm=false"},
    {"checkpoint.dir=ck"}, {"checkpoint.every=0"}, {"checkpoint.keep_last=1"}, {"checkpoint.resume=auto"},
    {"checkpoint.on_save_error=continue"},
    {"log.every=1"}, {"log.eval_every=0"}, {"log.eval_batches=2"}, {"log.metrics_file=\"\""},
    {"log.samples=0"}, {"log.sample_tokens=10"}, {"log.heartbeat_s=0"},
};

TEST(ConfigHash, DiffersWhenAnyValueDiffers) {
  const Config base = config_parse("", "x.toml", {});
  const uint64_t base_hash = config_hash(base);
  EXPECT_EQ(config_hash(config_parse("", "other.toml", {})), base_hash);  // the source is not config
  std::set<uint64_t> hashes = {base_hash};
  std::set<std::string> covered;
  for (const Overrides& ov : kOneKeyChanges) {
    SCOPED_TRACE(ov.front());
    const Config cfg = config_parse("", "x.toml", ov);
    EXPECT_NE(cfg, base);
    EXPECT_EQ(config_parse(config_to_toml(cfg), "x.toml", {}), cfg);
    EXPECT_TRUE(hashes.insert(config_hash(cfg)).second);
    covered.insert(ov.front().substr(0, ov.front().find('=')));
  }
  // Every key config_to_toml writes is covered above.
  std::istringstream lines(config_to_toml(base));
  std::string line, section;
  size_t keys = 0;
  while (std::getline(lines, line)) {
    if (line.empty()) continue;
    if (line.front() == '[') {
      section = line.substr(1, line.size() - 2);
      continue;
    }
    const std::string key = section + "." + line.substr(0, line.find(" = "));
    EXPECT_TRUE(covered.count(key)) << key << " has no case in kOneKeyChanges";
    ++keys;
  }
  EXPECT_EQ(keys, covered.size());
}

}  // namespace
}  // namespace moe
