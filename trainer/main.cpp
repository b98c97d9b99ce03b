// moetrain: the command line. Every subcommand validates its whole input first and fails
// with one line (what and where) and a non-zero exit.
#include <omp.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "io/config.h"
#include "io/dataset.h"
#include "model/check.h"
#include "parallel/comm.h"
#include "trainer/bench.h"
#include "trainer/checkpoint_tools.h"
#include "trainer/export.h"
#include "trainer/run_summary.h"
#include "trainer/schedule_tool.h"
#include "trainer/train_loop.h"

namespace {

// CPU threads for this rank: run.threads, else OMP_NUM_THREADS when set, else the cores
// divided by the ranks on this node.
int threads_for(const moe::Config& cfg) {
  if (cfg.run.threads > 0) return cfg.run.threads;
  if (const char* s = std::getenv("OMP_NUM_THREADS"); s && std::atoi(s) > 0) return std::atoi(s);
  long cores = sysconf(_SC_NPROCESSORS_ONLN);
  int local_ranks = 1;
  if (const char* s = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE")) local_ranks = std::max(1, std::atoi(s));
  return static_cast<int>(std::max(1L, cores / local_ranks));
}

// A run writes checkpoints into checkpoint.dir: a file there, or in place of one of its
// parent folders, would otherwise be found only at the first save, after training.
void train_outputs_check(const moe::Config& cfg) {
  namespace fs = std::filesystem;
  std::error_code ec;
  for (fs::path p = cfg.checkpoint.dir; !p.empty(); p = p.parent_path()) {
    const fs::file_status st = fs::status(p, ec);
    if (!fs::exists(st)) {
      if (p == p.parent_path()) break;
      continue;
    }
    if (!fs::is_directory(st))
      moe::user_error("%s: checkpoint.dir = \"%s\" cannot be created: %s is a file, not a folder",
                      cfg.source.c_str(), cfg.checkpoint.dir.c_str(), p.c_str());
    if (::access(p.c_str(), W_OK | X_OK) != 0)
      moe::user_error("%s: checkpoint.dir = \"%s\": cannot write in %s (%s)", cfg.source.c_str(),
                      cfg.checkpoint.dir.c_str(), p.c_str(), std::strerror(errno));
    break;
  }
}

bool is_subcommand(CLI::App& app, const std::string& name) {
  try {
    return app.get_subcommand(name) != nullptr;
  } catch (const CLI::OptionNotFound&) {
    return false;
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moetrain: trains Mixture-of-Experts transformers (DeepSeek-V3 style)"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("moetrain ") + MOETRAIN_VERSION);

  std::string config_path;
  std::vector<std::string> overrides;
  bool dry_run = false;
  CLI::App* train = app.add_subcommand("train", "train a model from a TOML config");
  train->add_option("--config", config_path, "TOML config file")->required();
  train->add_option("--set", overrides, "override a key: section.key=value (repeatable)");
  train->add_flag("--dry-run", dry_run, "print the resolved config, sizes and FLOPs, then exit");
  bool resume = false;
  train->add_flag("--resume", resume,
                  "continue from the newest valid checkpoint in checkpoint.dir (= checkpoint.resume=auto)");

  std::vector<std::string> inputs;
  std::string output;
  double val_fraction = 0.05;
  CLI::App* prepare = app.add_subcommand("prepare", "turn text files into token shards");
  prepare->add_option("--input", inputs, "text files or folders")->required();
  prepare->add_option("--output", output, "output folder (train.bin, val.bin)")->required();
  prepare->add_option("--val-fraction", val_fraction, "share of each file held out for validation")
      ->check(CLI::Range(0.0, 1.0));

  moe::BenchOptions bench_opt;
  CLI::App* bench = app.add_subcommand("bench", "measure throughput and MFU of a config");
  bench->add_option("--config", config_path, "TOML config file")->required();
  bench->add_option("--set", overrides, "override a key: section.key=value (repeatable)");
  bench->add_option("--steps", bench_opt.steps, "timed optimizer steps")->check(CLI::Range(1, 100000));
  bench->add_flag("--json", bench_opt.json, "print one JSON object");
  bench->add_flag("--checkpoint-io", bench_opt.checkpoint_io,
                  "measure checkpoint save/load MB/s against raw disk speed instead");
  bench->add_flag("--precision", bench_opt.precision,
                  "compare fp32 / bf16 / fp8: step-time cost and activation memory (one process)");
  bench->add_option("--io-dir", bench_opt.io_dir, "folder for --checkpoint-io (default <checkpoint.dir>/bench-io)");

  std::string ckpt;
  CLI::App* inspect = app.add_subcommand("inspect", "show what a checkpoint holds and verify its checksums");
  inspect->add_option("checkpoint", ckpt, "checkpoint file or folder")->required();

  moe::EvalOptions eval_opt;
  CLI::App* eval = app.add_subcommand("eval", "validation loss and perplexity of a checkpoint");
  eval->add_option("--checkpoint", ckpt, "checkpoint file or folder")->required();
  eval->add_option("--data", eval_opt.data, "token shard (default: the run's data.val)");
  eval->add_option("--batches", eval_opt.batches, "micro-batches (default: the run's log.eval_batches)")
      ->check(CLI::Range(1, 1000000));

  moe::GenerateOptions gen_opt;
  CLI::App* generate = app.add_subcommand("generate", "sample text from a checkpoint");
  generate->add_option("--checkpoint", ckpt, "checkpoint file or folder")->required();
  generate->add_option("--prompt", gen_opt.prompt, "text to continue");
  generate->add_option("--tokens", gen_opt.tokens, "tokens to generate")->check(CLI::Range(1, 1000000));
  generate->add_option("--temperature", gen_opt.temperature, "0 = greedy")->check(CLI::Range(0.0, 100.0));
  generate->add_option("--top-k", gen_opt.top_k, "sample among the k most likely tokens (0 = all)")
      ->check(CLI::Range(0, 1 << 30));
  generate->add_option("--seed", gen_opt.seed, "sampling seed (same seed, same text)");
  generate->add_option("--samples", gen_opt.samples, "independent samples")->check(CLI::Range(1, 1000));

  moe::ExportArgs export_args;
  std::string export_dtype = "bf16";
  CLI::App* export_cmd =
      app.add_subcommand("export", "write a checkpoint as Hugging Face safetensors (DeepSeek-V3 names)");
  export_cmd->add_option("--checkpoint", export_args.checkpoint, "checkpoint file or folder")->required();
  export_cmd->add_option("--format", export_args.format, "output format (safetensors)")
      ->check(CLI::IsMember({"safetensors"}));
  export_cmd->add_option("--output", export_args.output, "output folder (created when missing)")
      ->required();
  export_cmd->add_option("--dtype", export_dtype, "bf16 (default) or fp32")
      ->check(CLI::IsMember({"bf16", "fp32"}));
  export_cmd->add_option("--shard-mb", export_args.opt.shard_mb,
                         "largest file in MiB before splitting into shards (default 4768 = 5 GB)")
      ->check(CLI::PositiveNumber);
  export_cmd->add_flag("--drop-mtp", export_args.opt.drop_mtp, "leave out the MTP modules");

  moe::ScheduleToolOptions sched_opt;
  CLI::App* schedule =
      app.add_subcommand("schedule", "print and simulate a pipeline schedule (no config needed)");
  schedule->add_option("--kind", sched_opt.kind, "1f1b | zb1p | dualpipe | dualpipev")->required();
  schedule->add_option("--pp", sched_opt.pp, "pipeline ranks")->required();
  schedule->add_option("--micro-batches", sched_opt.micro_batches, "micro-batches per step")
      ->required();
  schedule->add_option("--f", sched_opt.f, "cost of a forward chunk (default 1)");
  schedule->add_option("--b", sched_opt.b, "cost of a full backward chunk (default 2)");
  schedule->add_option("--w", sched_opt.w, "cost of the weight part of a backward (default 1)");
  double sched_fb = 0;
  CLI::Option* fb_opt = schedule->add_option(
      "--fb", sched_fb, "cost of an overlapped forward & backward pair (default F + B)");
  schedule->add_flag("--json", sched_opt.json, "print one JSON object");
  schedule->add_flag("--ticks", sched_opt.ticks,
                     "also print the messages' ticks as NCCL runs them on GPUs");

  if (argc >= 2 && argv[1][0] != '-' && !is_subcommand(app, argv[1])) {
    // CLI11 would only say "a subcommand is required"; name the word it did not know.
    std::fprintf(stderr, "error: unknown subcommand '%s' (expected train, prepare, bench, inspect, eval, generate, export or schedule)\n", argv[1]);
    return 2;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "error: %s (see moetrain --help)\n", e.what());
    return 2;
  }

  try {
    if (*prepare) {
      std::printf("%s\n", moe::dataset_prepare(inputs, output, val_fraction).c_str());
      return 0;
    }
    if (*inspect) return moe::inspect_main(ckpt);
    if (*eval) return moe::eval_main(ckpt, eval_opt);
    if (*generate) return moe::generate_main(ckpt, gen_opt);
    if (*export_cmd) {
      export_args.opt.dtype = export_dtype == "fp32" ? moe::ExportDtype::kFp32 : moe::ExportDtype::kBf16;
      return moe::export_main(export_args);
    }
    if (*schedule) {
      if (fb_opt->count() > 0) sched_opt.fb = sched_fb;
      return moe::schedule_main(sched_opt);
    }
    if (resume) overrides.insert(overrides.begin(), "checkpoint.resume=auto");
    const moe::Config cfg = moe::config_load(config_path, overrides);
    omp_set_num_threads(threads_for(cfg));
    if (*train) {
      if (!dry_run && moe::mpi_launched()) {
        moe::mpi_start(&argc, &argv);
        std::atexit(moe::mpi_finish);
      }
      if (dry_run) {
        std::printf("# resolved config (%s)\n%s\n%s", cfg.source.c_str(),
                    moe::config_to_toml(cfg).c_str(), moe::run_summary(cfg).c_str());
        return 0;
      }
      train_outputs_check(cfg);
      return moe::train_main(cfg);
    }
    if (*bench && bench_opt.checkpoint_io && bench_opt.precision)
      moe::user_error("bench: --checkpoint-io and --precision are separate measurements; pass one");
    if (*bench && bench_opt.precision) return moe::bench_precision_main(cfg, bench_opt);
    if (*bench && !bench_opt.checkpoint_io && moe::mpi_launched()) {
      moe::mpi_start(&argc, &argv);
      std::atexit(moe::mpi_finish);
    }
    if (*bench)
      return bench_opt.checkpoint_io ? moe::bench_checkpoint_main(cfg, bench_opt)
                                     : moe::bench_main(cfg, bench_opt);
  } catch (const moe::UserError& e) {
    std::fflush(stdout);
    if (moe::mpi_world_size() > 1) {
      // Under MPI the other ranks may be waiting in a collective: name the rank, then bring
      // the whole job down rather than leave it hanging.
      std::fprintf(stderr, "error: rank %d: %s\n", moe::mpi_world_rank(), e.what());
      std::fflush(stderr);
      moe::mpi_abort_job(1);
    }
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
