// moetrain: the command line. Every subcommand validates its whole input first and fails
// with one line (what and where) and a non-zero exit.
#include <omp.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "io/config.h"
#include "io/dataset.h"
#include "model/check.h"
#include "trainer/bench.h"
#include "trainer/run_summary.h"
#include "trainer/train_loop.h"

namespace {

// CPU threads for this rank: run.threads, else the cores divided by the ranks on this node.
int threads_for(const moe::Config& cfg) {
  if (cfg.run.threads > 0) return cfg.run.threads;
  long cores = sysconf(_SC_NPROCESSORS_ONLN);
  int local_ranks = 1;
  if (const char* s = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE")) local_ranks = std::max(1, std::atoi(s));
  return static_cast<int>(std::max(1L, cores / local_ranks));
}

bool is_subcommand(const CLI::App& app, const std::string& name) {
  for (const CLI::App* sub : app.get_subcommands([](const CLI::App*) { return true; }))
    if (sub->get_name() == name) return true;
  return false;
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

  if (argc >= 2 && argv[1][0] != '-' && !is_subcommand(app, argv[1])) {
    // CLI11 would only say "a subcommand is required"; name the word it did not know.
    std::fprintf(stderr, "error: unknown subcommand '%s' (expected train, prepare or bench)\n", argv[1]);
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
    const moe::Config cfg = moe::config_load(config_path, overrides);
    omp_set_num_threads(threads_for(cfg));
    if (*train) {
      if (dry_run) {
        std::printf("# resolved config (%s)\n%s\n%s", cfg.source.c_str(),
                    moe::config_to_toml(cfg).c_str(), moe::run_summary(cfg).c_str());
        return 0;
      }
      return moe::train_main(cfg);
    }
    if (*bench) return moe::bench_main(cfg, bench_opt);
  } catch (const moe::UserError& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
