#include "trainer/train_save.h"

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <string>

#include "model/check.h"
#include "model/wall_clock.h"
#include "trainer/stop_signal.h"

namespace moe {

StepEnd step_end_decide(const Config& cfg, const ProcessGrid& grid, int64_t step, double t_launch) {
  const int64_t steps = cfg.training.steps, exit_at = cfg.training.exit_at_step;
  double flags[2] = {static_cast<double>(stop_signal_received()),
                     cfg.training.exit_after_minutes > 0 &&
                             now_s() - t_launch >= 60.0 * cfg.training.exit_after_minutes
                         ? 1.0
                         : 0.0};
  if (grid.world) grid.world->all_reduce_max(flags, 2);
  StepEnd e;
  e.stop = true;
  if (const int sig = static_cast<int>(flags[0])) {
    e.reason = sig == SIGINT ? "SIGINT" : "SIGTERM";
  } else if (exit_at > 0 && step >= exit_at && step < steps) {
    e.reason = "training.exit_at_step";
  } else if (flags[1] > 0 && step < steps) {
    e.reason = "training.exit_after_minutes";
  } else {
    e.stop = false;
    if (step == steps) e.reason = "end of training";
    else if (cfg.checkpoint.every > 0 && step % cfg.checkpoint.every == 0) e.reason = "checkpoint.every";
  }
  return e;
}

// With several ranks checkpoint_save is collective and only rank 0 writes; a failed write
// throws on every rank once all have left the save's collectives. Publishing `latest` (rank 0
// alone) may fail too, so the outcome is all-reduced after every save.
void train_save(TrainState& s, const Config& cfg, const ProcessGrid& grid, Watchdog& watchdog,
                const CheckpointDir& dir, const RunPosition& pos, const char* why, bool leaving) {
  const bool root = grid.is_root();
  watchdog.set_phase("saving checkpoint");
  const double t0 = now_s();
  const std::string path = dir.path_for_step(pos.step);
  std::string failure;
  try {
    checkpoint_save(s, pos, path);  // collective: every rank takes part, rank 0 writes
    if (root) dir.publish(std::filesystem::path(path).filename().string(), cfg.checkpoint.keep_last);
  } catch (const UserError& e) {
    failure = e.what();
  }
  const bool cont = !leaving && cfg.checkpoint.on_save_error == SaveErrorAction::kContinue;
  auto newest = [&] {
    const std::string latest = dir.latest();
    return latest.empty() ? std::string("no checkpoint was saved yet")
                          : "the newest checkpoint is " + (std::filesystem::path(dir.dir) / latest).string();
  };
  const long long at = static_cast<long long>(pos.step);
  if (grid.world) {
    double failed = failure.empty() ? 0.0 : 1.0;
    grid.world->all_reduce_max(&failed, 1);
    if (failed > 0 && !root && !cont) {
      // Rank 0 reports the failure and takes the job down (main: mpi_abort_job): one line,
      // not one per rank. The watchdog bounds this wait should that not happen.
      grid.world->barrier();
      user_error("checkpoint at step %lld not saved (rank 0 says why)", at);
    }
    if (failed > 0 && failure.empty()) failure = "rank 0 could not save it";
  }
  watchdog.set_phase("training step");
  if (!failure.empty()) {
    if (!cont)
      user_error("checkpoint at step %lld not saved: %s; stopping (%s); %s", at, failure.c_str(),
                 leaving ? why : "checkpoint.on_save_error = \"stop\"", newest().c_str());
    if (root) {
      std::fprintf(stderr, "warning: checkpoint at step %lld not saved: %s; training continues "
                   "(checkpoint.on_save_error = \"continue\"); %s\n", at, failure.c_str(),
                   newest().c_str());
      std::fflush(stderr);
    }
    return;
  }
  if (!root) return;
  std::printf("checkpoint: step %lld -> %s (%.1f MB in %.2f s; %s)\n",
              static_cast<long long>(pos.step), path.c_str(),
              static_cast<double>(std::filesystem::file_size(path)) / 1e6, now_s() - t0, why);
  std::fflush(stdout);
  watchdog.note_output();
}

}  // namespace moe
