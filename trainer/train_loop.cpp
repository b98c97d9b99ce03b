#include "trainer/train_loop.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "io/checkpoint_file.h"
#include "io/config_model.h"
#include "io/dataset.h"
#include "io/metrics.h"
#include "model/check.h"
#include "parallel/grid.h"
#include "parallel/watchdog.h"
#include "trainer/bench.h"
#include "trainer/generate.h"
#include "trainer/progress.h"
#include "trainer/resume.h"
#include "trainer/run_health.h"
#include "trainer/run_summary.h"
#include "trainer/stop_signal.h"
#include "trainer/test_injection.h"
#include "trainer/train_checkpoint.h"
#include "trainer/train_device.h"
#include "trainer/train_save.h"
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

// The heartbeat's output (rank 0, from the watchdog's thread): one write per line, so it
// never splits another line; on a terminal the progress bar is cleared first (the next step
// redraws it).
void print_heartbeat(const std::string& line) {
  const std::string text = (isatty(STDOUT_FILENO) == 1 ? "\r\033[2K" : "") + line + "\n";
  std::fputs(text.c_str(), stdout);
  std::fflush(stdout);
}

// Hands the watchdog to every communicator of the grid.
void grid_watch(const ProcessGrid& g, Watchdog* wd) {
  for (Comm* c : {g.world.get(), g.dp_comm.get(), g.ep_comm.get(), g.edp_comm.get(),
                  g.param_comm.get(), g.expert_param_comm.get()})
    if (c) c->set_watchdog(wd);
}

}  // namespace

int train_main(const Config& cfg) {
  const double t_launch = now_s();
  // From the start: a preemption during set-up must not kill the process with nothing saved.
  stop_signals_install();
  // A file-size limit (ulimit -f) must fail the write that crosses it (EFBIG, reported like
  // a full disk) instead of killing the process with SIGXFSZ in the middle of a save.
  std::signal(SIGXFSZ, SIG_IGN);
  // Run health (parallel/watchdog.h): under MPI a communication wait longer than
  // parallel.timeout_s stops the job naming it; rank 0 prints a heartbeat when stdout has
  // been quiet for log.heartbeat_s. Declared before the grid: it outlives the communicators
  // that point to it.
  WatchdogOptions wopt;
  wopt.rank = mpi_world_rank();
  wopt.timeout_s = mpi_world_size() > 1 ? cfg.parallel.timeout_s : 0;
  if (wopt.rank == 0 && cfg.log.heartbeat_s > 0) {
    wopt.heartbeat_s = cfg.log.heartbeat_s;
    wopt.heartbeat = print_heartbeat;
  }
  Watchdog watchdog(std::move(wopt));
  const ProcessGrid grid = grid_build(cfg);
  grid_watch(grid, &watchdog);
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
  train_state_set_watchdog(s, &watchdog);
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
  // Step s reads data batch s, moved past the batches loss-spike rollbacks skipped.
  BatchSource train_source = [&](int32_t* out, int64_t step, int64_t first, int64_t n) {
    dataset_train_batch(train, out, seed, data_batch_for_step(step, pos.skipped_batches), first,
                        n, T_, vocab);
  };
  const int64_t B = cfg.training.micro_batch;
  const int64_t val_windows = static_cast<int64_t>(cfg.log.eval_batches) * B;
  BatchSource val_source = [&](int32_t* out, int64_t, int64_t first, int64_t n) {
    dataset_val_batch(*val, out, first, n, val_windows, T_, vocab);
  };

  if (resumed && root) metrics_truncate_after(cfg.log.metrics_file, pos.step);
  MetricsFile metrics(root ? cfg.log.metrics_file : std::string(), resumed);
  const CheckpointDir ckdir{cfg.checkpoint.dir};
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
  // Run health (trainer/run_health.h): the guards' verdicts, the same on every rank.
  const ModelDims& md = s.model.d;
  std::vector<std::string> block_names;
  for (int64_t b = 0; b < md.n_moe_blocks(); ++b)
    block_names.push_back(b < md.n_moe_layers()
                              ? "layer " + std::to_string(md.dense_layers + b)
                              : "MTP module " + std::to_string(b - md.n_moe_layers()));
  RunHealth health(cfg, md.n_moe_blocks(), md.E, block_names);
  if (!health.spikes().from_string(pos.spike_history) && root)
    std::fprintf(stderr, "warning: the checkpoint's spike history is unreadable; starting it "
                 "afresh\n");
  TestInjections inject = test_injections_read(grid.world_rank);
  for (int64_t step = pos.step; step < steps; ++step) {
    watchdog.set_step(step + 1);
    watchdog.set_phase("training step");
    test_injections_apply(inject, s, step + 1);
    const double t0 = now_s();
    s.loss_limit = health.loss_limit();
    const StepStats st = train_step(s, step, train_source);
    const double dt = now_s() - t0;
    const StepVerdict verdict = health.after_step(step, st, s.model.expert_load);
    if (root && !verdict.lines.empty()) {
      bar.clear();
      for (const std::string& line : verdict.lines) std::fprintf(stderr, "warning: %s\n", line.c_str());
      std::fflush(stderr);
      watchdog.note_output();
    }
    const long long step1 = static_cast<long long>(step + 1);
    if (verdict.action == StepVerdict::Action::kAbort)
      nonfinite_abort(cfg, grid, step1, data_batch_for_step(step, pos.skipped_batches), st);
    if (verdict.action == StepVerdict::Action::kStop)
      user_error("%s: %s; the newest checkpoint is in %s", cfg.source.c_str(),
                 verdict.lines.back().c_str(), cfg.checkpoint.dir.c_str());
    if (verdict.action == StepVerdict::Action::kRollback) {
      // Back to the newest checkpoint, with this step's batch skipped from now on (saved in
      // every later checkpoint, so a resume reads the same data).
      const std::string latest = ckdir.latest();
      const int64_t bad_batch = data_batch_for_step(step, pos.skipped_batches);
      if (!latest.empty()) {
        std::vector<int64_t> skipped = pos.skipped_batches;
        skipped.insert(std::upper_bound(skipped.begin(), skipped.end(), bad_batch), bad_batch);
        const std::string path = (std::filesystem::path(ckdir.dir) / latest).string();
        const CheckpointInfo info = checkpoint_load(s, path);
        pos = info.pos;
        pos.skipped_batches = skipped;
        health.spikes().from_string(pos.spike_history);
        MetricsRecord rb;
        rb.add_int("step", step + 1).add_int("rollback_to", pos.step).add_int("skipped_batch", bad_batch);
        metrics.write(rb);
        if (root) {
          std::printf("rollback: step %lld -> %s (step %lld); data batch %lld skipped\n", step1,
                      path.c_str(), static_cast<long long>(pos.step),
                      static_cast<long long>(bad_batch));
          std::fflush(stdout);
        }
        step = pos.step - 1;  // the loop's ++step continues at the checkpoint's step
        continue;
      }
      if (root)
        std::fprintf(stderr, "warning: step %lld: no checkpoint to roll back to yet; the update "
                     "is dropped and the run goes on\n", step1);
    }
    pos.spike_history = health.spikes().to_string();
    const double tps = tokens_per_step / dt;
    const double mfu = tps * flops_per_token / peak;
    MetricsRecord rec;
    rec.add_int("step", step + 1).add("loss", st.loss).add("lr", st.lr)
        .add("grad_norm", st.grad_norm).add("tokens_per_s", tps).add("mfu", mfu)
        .add("imbalance", st.imbalance).add("aux_loss", st.aux_loss);
    if (cfg.model.mtp_depth > 0) rec.add("mtp_loss", st.mtp_loss);
    if (!st.applied) rec.add_int("skipped", 1);
    if (st.nonfinite) rec.add_int("nonfinite", 1);
    if (verdict.spike) rec.add_int("spike", 1);
    const bool eval_now = val && cfg.log.eval_every > 0 &&
                          ((step + 1) % cfg.log.eval_every == 0 || step + 1 == steps);
    if (eval_now) {
      watchdog.set_phase("evaluating");
      last_val = eval_loss(s, cfg.log.eval_batches, val_source);
      watchdog.set_phase("training step");
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
                  "MFU %.1f%% | imbalance %.2f%s%s\n",
                  static_cast<long long>(step + 1), static_cast<long long>(steps), st.loss,
                  cfg.model.mtp_depth > 0 ? strprintf(" (mtp %.4f)", st.mtp_loss).c_str() : "",
                  st.lr, st.grad_norm, tps, 100.0 * mfu, st.imbalance,
                  eval_now ? strprintf(" | val loss %.4f", last_val).c_str() : "",
                  st.applied ? "" : " | update dropped");
      std::fflush(stdout);
      watchdog.note_output();
    }
    // Save, and possibly stop, between steps: never with a half-applied update.
    const StepEnd end = step_end_decide(cfg, grid, pos.step, t_launch);
    if (end.reason) {
      bar.clear();
      train_save(s, cfg, grid, watchdog, ckdir, pos, end.reason, end.stop || pos.step == steps);
    }
    if (end.stop) {
      if (root) std::printf("stopped at step %lld of %lld (%s); continue with --resume\n",
                  static_cast<long long>(pos.step), static_cast<long long>(steps), end.reason);
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
  watchdog.set_phase("generating samples");
  print_samples(s.model, cfg.log.samples, cfg.log.sample_tokens, seed, root);
  return 0;
}

}  // namespace moe
