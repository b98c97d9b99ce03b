// What the training loop watches between steps (issue: run health): the loss-spike limit
// from a running median, the consecutive steps the guards dropped, and experts that stop
// receiving tokens or a load imbalance over a threshold. Pure bookkeeping on host values
// that are the same on every rank, so every rank decides alike; no communication here.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "io/config.h"
#include "parallel/grid.h"
#include "trainer/train_step.h"

namespace moe {

// The running median of the last `window` losses of applied steps; limit() is factor x
// median once the window is full (+inf before, or when factor is 0). Saved in checkpoints
// (to_string / from_string), so a resumed run makes the same decisions bit for bit.
class SpikeGuard {
 public:
  SpikeGuard(double factor, int64_t window);
  double limit() const;
  double median() const;
  void accept(double loss);  // a step whose update was applied
  std::string to_string() const;
  // Restores what to_string wrote; "" leaves it empty. Returns false on malformed text.
  bool from_string(const std::string& s);

 private:
  double factor_;
  size_t window_;
  std::vector<double> last_;  // oldest first, at most window_
};

// Consecutive steps of each MoE block's experts with no token, and the warnings due.
class ExpertWatch {
 public:
  ExpertWatch(int64_t n_blocks, int64_t E, int64_t collapse_steps, double imbalance_warn);
  // After a step, from the job's loads (n_blocks x E). Appends one line per warning: an
  // expert whose streak without tokens reaches collapse_steps (again at every multiple), and
  // a block whose max / mean load exceeds imbalance_warn. `block_name(b)` names block b.
  void update(const int64_t* load, int64_t step, const std::vector<std::string>& block_names,
              std::vector<std::string>* warnings);

 private:
  int64_t n_blocks_, E_, collapse_steps_;
  double imbalance_warn_;
  std::vector<int64_t> idle_;  // (n_blocks, E) steps in a row with no token
};

// The loop's verdict on one step, the same on every rank (its inputs are job-wide).
struct StepVerdict {
  enum class Action {
    kContinue,  // go on (the update may have been dropped: StepStats::applied)
    kAbort,     // a non-finite step with training.on_nonfinite = "abort": write `diagnostic`
    kStop,      // training.max_skipped_steps consecutive steps dropped
    kRollback,  // a loss spike with training.on_spike = "rollback": reload the last checkpoint
  };
  Action action = Action::kContinue;
  bool spike = false;  // the loss exceeded the spike limit (whatever on_spike did about it)
  std::vector<std::string> lines;  // warnings for the log, one per line, without "warning: "
};

// The run-health state of a training loop: the spike guard, the dropped-step streak and the
// expert watch, with the decisions training.on_nonfinite / on_spike / max_skipped_steps and
// moe.collapse_steps / imbalance_warn call for.
class RunHealth {
 public:
  // n_blocks MoE blocks of E experts (their names for warnings: "layer 3", "MTP module 0").
  RunHealth(const Config& cfg, int64_t n_blocks, int64_t E, std::vector<std::string> block_names);
  // The loss over which train_step drops the update (TrainState::loss_limit): the spike limit
  // when on_spike skips or rolls back, +inf when it only warns.
  double loss_limit() const;
  // After train_step of 0-based `step` (job-wide stats and loads).
  StepVerdict after_step(int64_t step, const StepStats& st, const int64_t* expert_load);
  const SpikeGuard& spikes() const { return spike_; }
  SpikeGuard& spikes() { return spike_; }

 private:
  Config cfg_;
  SpikeGuard spike_;
  ExpertWatch experts_;
  std::vector<std::string> block_names_;
  int64_t dropped_in_row_ = 0;
};

// The text of the diagnostic a non-finite step writes before an abort: the step, what went
// non-finite (the loss, or the first gradient in backward order), and which data it saw.
std::string nonfinite_diagnostic(const Config& cfg, int64_t step, int64_t data_batch,
                                 double loss, double grad_norm, const std::string& first_bad);

// training.on_nonfinite = "abort": rank 0 writes the diagnostic to
// <checkpoint.dir>/nonfinite-step-<step>.txt, every rank waits for it to be on disk (a
// stopping rank takes the job down), then throws the one-line error naming the file.
[[noreturn]] void nonfinite_abort(const Config& cfg, const ProcessGrid& grid, int64_t step,
                                  int64_t data_batch, const StepStats& st);

}  // namespace moe
