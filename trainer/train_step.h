// One optimizer step on one process: gradient accumulation over the step's micro-batches,
// global-norm clipping, AdamW, and the auxiliary-loss-free router-bias update.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "io/config.h"
#include "model/model.h"
#include "optim/adamw.h"
#include "parallel/grid.h"

namespace moe {

// Fills `out` (n_seqs, seq_len + 1) with sequences [first_seq, first_seq + n_seqs) of `step`.
using BatchSource = std::function<void(int32_t* out, int64_t step, int64_t first_seq, int64_t n_seqs)>;

// Data parallelism with ZeRO-1: every rank holds the full FP32 parameters and gradients, but
// only its shard [shard_begin, shard_begin + shard) of the Adam moments. A step reduce-scatters
// the gradients, updates the local shard, and all-gathers the parameters. With one process the
// shard is everything.
struct TrainState {
  Config cfg;
  const ProcessGrid* grid = nullptr;  // null or world size 1: single process
  Model<float> model;
  int64_t shard = 0;        // elements per rank (n_alloc / dp)
  int64_t shard_begin = 0;  // this rank's first element
  Arena opt_arena;          // Adam moments of the shard, and the reduced gradient shard
  float* adam_m = nullptr;  // (shard)
  float* adam_v = nullptr;  // (shard)
  float* grad_shard = nullptr;  // (shard) reduce-scatter target (dp > 1)
  std::vector<uint8_t> decay;    // per parameter table entry
  std::vector<int32_t> window;   // (micro_batch, seq_len + 1)
  std::vector<int32_t> inputs;   // (micro_batch, seq_len)
  std::vector<int32_t> targets;  // (micro_batch, seq_len)
  std::vector<double> norm_partials;  // grad_norm_blocks(n_params)
  LrSchedulePlan lr_plan;
  int64_t micro_batches = 1;     // per step
};

struct StepStats {
  double loss = 0;       // mean cross-entropy over the global batch
  double aux_loss = 0;   // balance loss (mean over sequences, summed over layers)
  double grad_norm = 0;  // before clipping
  double lr = 0;
  double imbalance = 0;  // mean over MoE layers of max load / mean load
};

// Allocates everything a step needs (nothing is allocated by train_step afterwards).
// `grid` may be null (single process); it must outlive the state.
void train_state_init(TrainState& s, const Config& cfg, const ProcessGrid* grid = nullptr);

// The data-parallel group, or null when there is none.
Comm* train_dp_comm(const TrainState& s);

StepStats train_step(TrainState& s, int64_t step, const BatchSource& source);

// Mean validation loss over `n_batches` micro-batches drawn by `source` (step is unused).
double eval_loss(TrainState& s, int64_t n_batches, const BatchSource& source);

// Splits windows (B, T + 1) into inputs and next-token targets (B, T).
void windows_split(int32_t* inputs, int32_t* targets, const int32_t* windows, int64_t B, int64_t T_);

}  // namespace moe
