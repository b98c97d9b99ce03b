// Saving and restoring a training run: the model's logical tensors, both Adam moments,
// the router biases and the run's position, through io/checkpoint_file.
//
// File layout (documented for users in docs/CHECKPOINTS.md):
//   /meta              attrs: format_version, moetrain_version, step, tokens_seen, loss,
//                             val_loss, config_toml, dp, ep, pp, schedule, created_unix
//   /model/<name>      FP32 master weights, logical layout (model_logical_tensors)
//   /optim/m/<name>    Adam first moments, same names and shapes
//   /optim/v/<name>    Adam second moments;  /optim attrs: step (Adam t), lr
//   /router/layers/<l>/bias   selection bias of MoE layer l (global layer index)
//   /data              attrs: seed, next_step (the counter the sampler resumes from),
//                             spike_history, skipped_batches (run health; optional)
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "trainer/train_step.h"

namespace moe {

struct RunPosition {
  int64_t step = 0;         // optimizer steps completed
  int64_t tokens_seen = 0;  // training tokens consumed so far
  double loss = 0;          // loss of the last completed step
  double val_loss = -1;     // last validation loss, -1 if none yet
  // Run health, so a resumed run decides as the uninterrupted one would: the spike guard's
  // window (SpikeGuard::to_string) and the data batches skipped after loss-spike rollbacks
  // (training step s reads data batch data_batch_for_step(s, skipped_batches)).
  std::string spike_history;
  std::vector<int64_t> skipped_batches;  // ascending
};

// The data batch training step `step` reads: the step itself, moved past every batch a
// rollback skipped.
int64_t data_batch_for_step(int64_t step, const std::vector<int64_t>& skipped_batches);

// Writes the run to `path` atomically (temp file, fsync, rename). Collective over the job;
// rank 0 writes. A write that fails throws UserError on every rank alike (rank 0 with the
// cause, the others saying rank 0 failed), after every rank has left the save's collectives:
// the job may carry on. No file is left under `path` or its temporary name.
void checkpoint_save(const TrainState& s, const RunPosition& pos, const std::string& path);

struct CheckpointInfo {
  RunPosition pos;
  std::string config_toml;
  std::string version;
};

// Reads only /meta (fast; for inspect and for choosing a config before building a model).
CheckpointInfo checkpoint_read_info(const std::string& path);

// Restores params, moments and router biases into an already built state whose model shape
// must match the file (UserError naming the tensor otherwise). Verifies every checksum.
CheckpointInfo checkpoint_load(TrainState& s, const std::string& path);

// Loads only the model weights and router biases (eval, generate, export).
CheckpointInfo checkpoint_load_model(Model<float>& m, const std::string& path);

}  // namespace moe
