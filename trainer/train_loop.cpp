#include "trainer/train_loop.h"

#include <csignal>
#include <chrono>
#include <filesystem>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>

#include "io/checkpoint_file.h"
#include "io/config_model.h"
#include "io/dataset.h"
#include "io/metrics.h"
#include "model/check.h"
#include "trainer/bench.h"
#include "trainer/generate.h"
#include "trainer/progress.h"
#include "trainer/resume.h"
#include "trainer/run_summary.h"
#include "trainer/stop_signal.h"
#include "trainer/train_checkpoint.h"
#include "trainer/train_device.h"
#include "parallel/grid.h"
#include "trainer/train_step.h"

namespace moe {

namespace {

void check_shard_vocab(const TokenShard& shard, const Config& cfg, const char* key) {
  if (shard.vocab_size() > static_cast<uint32_t>(cfg.model.vocab_size))
    user_error("%s: tokens were made for vocabulary %u but model.vocab_size = %d (%s)",
               shard.path().c_str(), shard.vocab_size(), cfg.model.vocab_size, key);
}

// Restores the newest valid checkpoint into `s`, falling back past corrupted ones.
// Returns the position to continue from (step 0 for a fresh start).
RunPosition resume_run(TrainState& s, const Config& cfg, bool root) {
  const std::vector<std::string> candidates = resume_candidates(cfg);
  if (candidates.empty()) {
    if (cfg.checkpoint.resume != "none" && root)
      std::printf("resume: no checkpoint in %s, starting fresh\n", cfg.checkpoint.dir.c_str());
    return RunPosition{};
  }
  std::string first_failure;
  for (const std::string& path : candidates) {
    CheckpointInfo info;
    try {
      info = checkpoint_read_info(path);
    } catch (const UserError& e) {
      if (root) std::fprintf(stderr, "warning: %s; trying an older checkpoint\n", e.what());
      if (first_failure.empty()) first_failure = e.what();
      continue;
    }
    // A config that changes the model stops the run: falling back would not help.
    const Config saved = config_parse(info.config_toml, path + " (saved config)", {});
    const std::vector<std::string> changes = config_resume_changes(saved, cfg, path);
    try {
      info = checkpoint_load(s, path);
    } catch (const UserError& e) {
      if (root) std::fprintf(stderr, "warning: %s; trying an older checkpoint\n", e.what());
      if (first_failure.empty()) first_failure = e.what();
      continue;
    }
    if (!root) return info.pos;
    std::printf("resume: %s at step %lld (%lld tokens seen, loss %.4f)\n", path.c_str(),
                static_cast<long long>(info.pos.step),
                static_cast<long long>(info.pos.tokens_seen), info.pos.loss);
    for (const std::string& c : changes) std::printf("resume: changed %s\n", c.c_str());
    return info.pos;
  }
  user_error("%s: no valid checkpoint among %zu tried (newest: %s); set checkpoint.resume = "
             "\"none\" and another checkpoint.dir to start fresh",
             cfg.checkpoint.dir.c_str(), candidates.size(), first_failure.c_str());
}

// Fault injection for the tests that prove a failing rank stops the job:
// MOETRAIN_TEST_THROW_AT="<world rank>:<step>" makes that rank fail as it starts that step.
// Read once at start; 0 when unset or meant for another rank.
int64_t injected_fault_step(int world_rank) {
  const char* v = std::getenv("MOETRAIN_TEST_THROW_AT");
  int rank = -1;
  long long step = 0;
  if (!v || std::sscanf(v, "%d:%lld", &rank, &step) != 2 || rank != world_rank) return 0;
  return step;
}

}  // namespace

int train_main(const Config& cfg) {
  const double t_launch = now_s();
  // From the start: a preemption during set-up must not kill the process with nothing saved.
  stop_signals_install();
  const ProcessGrid grid = grid_build(cfg);
  grid_check_consistent(grid, cfg);
  const bool root = grid.is_root();
  // Every rank resolves the same answer (same config, same build; a machine without a GPU
  // among GPU machines fails its own "cuda" check, and "auto" must not split the job).
  const Device device = train_device_resolve(cfg, root);
  if (grid.world) {
    double on_gpu[2] = {device == Device::kCuda ? 1.0 : 0.0, device == Device::kCuda ? 0.0 : 1.0};
    grid.world->all_reduce_max(on_gpu, 2);
    if (on_gpu[0] > 0 && on_gpu[1] > 0)
      user_error("%s: run.device = \"auto\" found a GPU on some ranks and none on others; "
                 "set run.device explicitly", cfg.source.c_str());
  }
  std::string device_name = "cpu";
  if (device == Device::kCuda) device_name = train_device_select();
  // Open and validate the data before any memory is allocated.
  TokenShard train(cfg.data.train);
  check_shard_vocab(train, cfg, "data.train");
  std::unique_ptr<TokenShard> val;
  if (!cfg.data.val.empty()) {
    val = std::make_unique<TokenShard>(cfg.data.val);
    check_shard_vocab(*val, cfg, "data.val");
  }
  const int64_t T_ = cfg.model.seq_len;
  if (train.size() < T_ + 1)
    user_error("%s: %lld tokens is fewer than model.seq_len + 1 = %lld", train.path().c_str(),
               static_cast<long long>(train.size()), static_cast<long long>(T_ + 1));
  if (val && val->size() < T_ + 1)
    user_error("%s: %lld tokens is fewer than model.seq_len + 1 = %lld", val->path().c_str(),
               static_cast<long long>(val->size()), static_cast<long long>(T_ + 1));

  if (root) {
    std::printf("moetrain %s: run \"%s\" from %s, %d rank%s (dp %d, ep %d, pp %d%s%s)\n%s",
                MOETRAIN_VERSION, cfg.run.name.c_str(), cfg.source.c_str(), grid.world_size,
                grid.world_size > 1 ? "s" : "", grid.dp, grid.ep, grid.pp,
                grid.pp > 1 ? " " : "", grid.pp > 1 ? to_string(cfg.parallel.schedule) : "",
                run_summary(cfg).c_str());
    std::printf("data: %s (%lld tokens)%s%s\n", train.path().c_str(),
                static_cast<long long>(train.size()), val ? ", validation " : "",
                val ? strprintf("%s (%lld tokens)", val->path().c_str(),
                                static_cast<long long>(val->size())).c_str() : "");
  }

  if (root) std::printf("device: %s%s\n", device_name.c_str(),
                        grid.world_size > 1 && device == Device::kCuda ? " (rank 0)" : "");
  TrainState s;
  train_state_init(s, cfg, &grid, device);
  RunPosition pos = resume_run(s, cfg, root);
  if (grid.world) {
    // Every rank chose its checkpoint on its own (a node-local folder or a stale pointer could
    // make them differ): training from different steps would hang in the first collective.
    double steps[2] = {static_cast<double>(pos.step), -static_cast<double>(pos.step)};
    grid.world->all_reduce_max(steps, 2);
    if (static_cast<int64_t>(steps[0]) != -static_cast<int64_t>(steps[1]))
      user_error("%s: ranks resumed at different steps (%lld to %lld): checkpoint.dir must be "
                 "one folder every rank sees", cfg.checkpoint.dir.c_str(),
                 static_cast<long long>(-steps[1]), static_cast<long long>(steps[0]));
  }
  const bool resumed = pos.step > 0;
  // MFU is the job's throughput over the job's peak: the sum of every rank's measured share.
  std::string peak_kind = "sgemm";
  double peak = device == Device::kCuda
                    ? gpu_peak_flops(cfg.precision.mode == PrecisionMode::kFp8, &peak_kind)
                    : sgemm_peak_flops(true);
  if (grid.world) grid.world->all_reduce_sum(&peak, 1);
  const double flops_per_token =
      model_flops_per_token(s.model.d) + model_mtp_flops_per_token(s.model.d);
  if (root) std::printf("%s peak (measured): %.1f GFLOP/s\n", peak_kind.c_str(), peak / 1e9);
  std::fflush(stdout);

  const int vocab = cfg.model.vocab_size;
  const uint64_t seed = cfg.run.seed;
  BatchSource train_source = [&](int32_t* out, int64_t step, int64_t first, int64_t n) {
    dataset_train_batch(train, out, seed, step, first, n, T_, vocab);
  };
  const int64_t B = cfg.training.micro_batch;
  const int64_t val_windows = static_cast<int64_t>(cfg.log.eval_batches) * B;
  BatchSource val_source = [&](int32_t* out, int64_t, int64_t first, int64_t n) {
    dataset_val_batch(*val, out, first, n, val_windows, T_, vocab);
  };

  if (resumed && root) metrics_truncate_after(cfg.log.metrics_file, pos.step);
  MetricsFile metrics(root ? cfg.log.metrics_file : std::string(), resumed);
  const CheckpointDir ckdir{cfg.checkpoint.dir};
  auto save = [&](const char* why) {
    const double t0 = now_s();
    const std::string path = ckdir.path_for_step(pos.step);
    checkpoint_save(s, pos, path);  // collective: every rank takes part, rank 0 writes
    if (!root) return;
    ckdir.publish(std::filesystem::path(path).filename().string(), cfg.checkpoint.keep_last);
    std::printf("checkpoint: step %lld -> %s (%.1f MB in %.2f s; %s)\n",
                static_cast<long long>(pos.step), path.c_str(),
                static_cast<double>(std::filesystem::file_size(path)) / 1e6, now_s() - t0, why);
    std::fflush(stdout);
  };

  const int64_t steps = cfg.training.steps;
  const int64_t exit_at = cfg.training.exit_at_step;
  if (exit_at > 0 && pos.step >= exit_at && pos.step < steps) {
    if (root) std::printf("already at step %lld >= training.exit_at_step = %lld: nothing to do\n",
                static_cast<long long>(pos.step), static_cast<long long>(exit_at));
    return 0;
  }
  if (pos.step >= steps && root)
    std::printf("run already complete at step %lld of %lld\n", static_cast<long long>(pos.step),
                static_cast<long long>(steps));
  const double tokens_per_step = static_cast<double>(cfg.training.global_batch) * T_;
  ProgressBar bar(pos.step, steps, root);
  const double t_start = now_s();
  double last_val = pos.val_loss >= 0 ? pos.val_loss : NAN;
  const int64_t throw_at = injected_fault_step(grid.world_rank);
  for (int64_t step = pos.step; step < steps; ++step) {
    if (step + 1 == throw_at)
      user_error("injected fault at step %lld (MOETRAIN_TEST_THROW_AT)", static_cast<long long>(throw_at));
    const double t0 = now_s();
    const StepStats st = train_step(s, step, train_source);
    const double dt = now_s() - t0;
    if (!std::isfinite(st.loss))
      user_error("%s: training diverged: non-finite loss at step %lld (try a lower optim.lr)",
                 cfg.source.c_str(), static_cast<long long>(step + 1));
    const double tps = tokens_per_step / dt;
    const double mfu = tps * flops_per_token / peak;
    MetricsRecord rec;
    rec.add_int("step", step + 1).add("loss", st.loss).add("lr", st.lr)
        .add("grad_norm", st.grad_norm).add("tokens_per_s", tps).add("mfu", mfu)
        .add("imbalance", st.imbalance).add("aux_loss", st.aux_loss);
    if (cfg.model.mtp_depth > 0) rec.add("mtp_loss", st.mtp_loss);
    const bool eval_now = val && cfg.log.eval_every > 0 &&
                          ((step + 1) % cfg.log.eval_every == 0 || step + 1 == steps);
    if (eval_now) {
      last_val = eval_loss(s, cfg.log.eval_batches, val_source);
      rec.add("val_loss", last_val);
    }
    metrics.write(rec);
    pos.step = step + 1;
    pos.tokens_seen += static_cast<int64_t>(tokens_per_step);
    pos.loss = st.loss;
    if (std::isfinite(last_val)) pos.val_loss = last_val;
    if (root && ((step + 1) % cfg.log.every == 0 || step == 0 || eval_now || step + 1 == steps)) {
      bar.clear();
      std::printf("step %5lld/%lld | loss %.4f%s | lr %.2e | grad norm %.3f | %.0f tok/s | "
                  "MFU %.1f%% | imbalance %.2f%s\n",
                  static_cast<long long>(step + 1), static_cast<long long>(steps), st.loss,
                  cfg.model.mtp_depth > 0 ? strprintf(" (mtp %.4f)", st.mtp_loss).c_str() : "",
                  st.lr, st.grad_norm, tps, 100.0 * mfu, st.imbalance,
                  eval_now ? strprintf(" | val loss %.4f", last_val).c_str() : "");
      std::fflush(stdout);
    }
    // Save, and possibly stop, between steps: never with a half-applied update. Ranks see
    // signals and clocks at different moments, so they agree on the decision first.
    double flags[2] = {static_cast<double>(stop_signal_received()),
                       cfg.training.exit_after_minutes > 0 &&
                               now_s() - t_launch >= 60.0 * cfg.training.exit_after_minutes
                           ? 1.0
                           : 0.0};
    if (grid.world) grid.world->all_reduce_max(flags, 2);
    const char* reason = nullptr;
    bool stop = true;
    if (const int sig = static_cast<int>(flags[0])) {
      reason = sig == SIGINT ? "SIGINT" : "SIGTERM";
    } else if (exit_at > 0 && pos.step >= exit_at && pos.step < steps) {
      reason = "training.exit_at_step";
    } else if (flags[1] > 0 && pos.step < steps) {
      reason = "training.exit_after_minutes";
    } else {
      stop = false;
      if (pos.step == steps) reason = "end of training";
      else if (cfg.checkpoint.every > 0 && pos.step % cfg.checkpoint.every == 0) reason = "checkpoint.every";
    }
    if (reason) {
      bar.clear();
      save(reason);
    }
    if (stop) {
      if (root) std::printf("stopped at step %lld of %lld (%s); continue with --resume\n",
                  static_cast<long long>(pos.step), static_cast<long long>(steps), reason);
      return 0;
    }
    bar.update(step + 1, now_s() - t_start, strprintf("loss %.3f", st.loss));
  }
  bar.clear();
  if (root) {
    std::printf("done: step %lld in %s", static_cast<long long>(pos.step),
                format_duration(now_s() - t_start).c_str());
    if (std::isfinite(last_val)) std::printf(", final val loss %.4f nats/token", last_val);
    std::printf("\n");
    if (s.exchange)
      std::printf("expert exchange: at most %d in flight at once on rank 0\n",
                  s.exchange->max_in_flight());
  }
  // With expert parallelism every forward is collective over the EP group, so all ranks
  // sample in lockstep (same prompt, seed and length); rank 0 prints.
  if (!root && !s.exchange) return 0;
  if (s.pipe) {
    // Sampling runs the whole model on one rank; a pipeline rank holds only its stages.
    if (root && cfg.log.samples > 0)
      std::printf("samples: skipped with parallel.pp > 1; run `moetrain generate --checkpoint` "
                  "on the final checkpoint\n");
    return 0;
  }
  static const char* kPrompts[] = {"The ", "Q: ", "A man ", "Love ", "It is "};
  for (int i = 0; i < cfg.log.samples; ++i) {
    const std::string prompt = kPrompts[i % 5];
    const std::string text = generate_text(s.model, prompt, cfg.log.sample_tokens, 0.8, 0, seed,
                                           static_cast<uint64_t>(i));
    if (root) std::printf("sample %d: %s\n", i + 1, printable_line(prompt + text).c_str());
  }
  return 0;
}

}  // namespace moe
