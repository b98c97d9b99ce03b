// The training loop's step boundary: whether to save and whether to stop after a step (agreed
// by every rank), and the save itself with what a failure means (checkpoint.on_save_error).
#pragma once

#include <cstdint>

#include "io/checkpoint_file.h"
#include "io/config.h"
#include "parallel/grid.h"
#include "parallel/watchdog.h"
#include "trainer/train_checkpoint.h"
#include "trainer/train_step.h"

namespace moe {

// After the step that brought the run to pos.step: save when `reason` is set (a signal, an
// exit setting, checkpoint.every, the end of training) and stop when `stop`. Ranks see signals
// and clocks at different moments, so the inputs are all-reduced first: every rank decides
// alike. t_launch: when the process started (training.exit_after_minutes).
struct StepEnd {
  const char* reason = nullptr;
  bool stop = false;
};
StepEnd step_end_decide(const Config& cfg, const ProcessGrid& grid, int64_t step, double t_launch);

// Saves the run at pos.step into `dir` (collective; rank 0 writes and publishes) and prints
// the checkpoint line on rank 0. A failed save (disk full, quota, file-size limit, I/O error)
// leaves the previous checkpoint the newest valid one; then "stop" throws one UserError
// naming it, and "continue" prints a warning on rank 0 and returns. A save on the way out
// (`leaving`: end of training, exit_at_step, exit_after_minutes, a signal) fails the run
// either way: nothing after it would save the work. Every rank returns or throws alike.
void train_save(TrainState& s, const Config& cfg, const ProcessGrid& grid, Watchdog& watchdog,
                const CheckpointDir& dir, const RunPosition& pos, const char* why, bool leaving);

}  // namespace moe
