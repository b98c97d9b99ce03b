// One optimizer step on one process: gradient accumulation over the step's micro-batches,
// global-norm clipping, AdamW, and the auxiliary-loss-free router-bias update.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "io/config.h"
#include "model/model.h"
#include "optim/adamw.h"
#include "optim/optim_ops.h"
#include "parallel/expert_exchange.h"
#include "parallel/grad_reduce.h"
#include "parallel/grid.h"
#include "parallel/pipeline.h"
#include "trainer/train_device.h"

namespace moe {

class Watchdog;

// Fills `out` (n_seqs, seq_len + 1) with sequences [first_seq, first_seq + n_seqs) of `step`.
using BatchSource = std::function<void(int32_t* out, int64_t step, int64_t first_seq, int64_t n_seqs)>;

// One ZeRO-1 region of the flat buffers (model.h's ParamRegion) and this rank's shard of it.
struct ShardRegion {
  Comm* comm = nullptr;      // the group sharding it; null: this rank holds it whole
  int64_t begin = 0;         // flat
  int64_t count = 0;         // flat elements, padding included
  int64_t shard = 0;         // elements per rank of the group
  int64_t shard_begin = 0;   // this rank's first flat element
  int64_t state_offset = 0;  // where the shard starts in the Adam moments and grad_shard
};

// Data parallelism with ZeRO-1 and expert parallelism: every rank holds the full FP32
// replicated parameters and its EP rank's routed experts, but only its shard of the Adam
// moments of each: replicated tensors are sharded over all dp ranks, routed experts over the
// dp / ep ranks holding the same experts. A step reduce-scatters the gradients (in buckets,
// during the last micro-batch's backward), updates the local shards, and all-gathers the
// parameters. With one process the shards are everything.
//
// On a GPU the parameters, gradients and moments are device memory: the step reaches them
// only through model.ops and optim, and the ZeRO-1 groups through their NCCL twins in
// `dev`; host values (losses, loads, flags, the norm) go over the grid's MPI groups.
struct TrainState {
  Config cfg;
  const ProcessGrid* grid = nullptr;  // null or world size 1: single process
  Device device = Device::kCpu;       // where model, gradients and optimizer state live
  DeviceComms dev;                    // kCuda with dp > 1 (declared before what uses it)
  Model<float> model;
  std::unique_ptr<OptimOps> optim;    // AdamW and the norm, on `device`
  std::unique_ptr<EpExchange> exchange;  // ep > 1
  ShardRegion regions[2];   // [0] replicated, [1] routed experts
  int64_t state_size = 0;   // shard elements over both regions
  Arena opt_arena;          // Adam moments of the shards, and the reduced gradient shards (device)
  // The Adam moments in cfg.optim.state_dtype: FP32 in adam_m / adam_v, or BF16 bits
  // (model/fp8.h) in adam_m_bf16 / adam_v_bf16; the other pair is null. Zero at start.
  float* adam_m = nullptr;          // (state_size) FP32 state
  float* adam_v = nullptr;          // (state_size) FP32 state
  uint16_t* adam_m_bf16 = nullptr;  // (state_size) BF16 state
  uint16_t* adam_v_bf16 = nullptr;  // (state_size) BF16 state
  float* grad_shard = nullptr;  // (state_size) reduce-scatter target (dp > 1)
  GradReducer reducer;
  std::vector<uint8_t> decay;    // per parameter table entry
  std::vector<int32_t> window;   // (micro_batch, seq_len + 1)
  std::vector<int32_t> inputs;   // (micro_batch, seq_len)
  std::vector<int32_t> targets;  // (micro_batch, seq_len)
  LrSchedulePlan lr_plan;
  int64_t micro_batches = 1;     // per step and data-parallel rank
  // Pipeline parallelism (pp > 1): the stages' layer bounds, this rank's executor, and what
  // pipeline rank 0 holds (it writes checkpoints).
  std::vector<int64_t> stage_bounds;
  std::unique_ptr<Pipeline> pipe;
  ModelPart root_part;
  bool overlap_reduction = true; // false: reduce after backward (the benchmark's baseline)
  // A step whose loss exceeds this drops its update (the loss-spike guard; the loop sets it
  // from the running median). +inf: off.
  double loss_limit = HUGE_VAL;
  // Told the micro-batch (and, through the pipeline, the schedule op) in progress, for its
  // timeout message; null: none. Set with train_state_set_watchdog.
  Watchdog* watchdog = nullptr;
};

struct StepStats {
  double loss = 0;       // mean cross-entropy over the global batch
  double aux_loss = 0;   // balance loss (mean over sequences, summed over layers)
  double grad_norm = 0;  // before clipping
  double lr = 0;
  double imbalance = 0;  // mean over MoE blocks of max load / mean load
  double mtp_loss = 0;   // mean over the MTP modules of their cross-entropy (0 without)
  // The guards (the same on every rank): a non-finite loss or gradient, or a loss over
  // TrainState::loss_limit, drops the step's update (applied = false). first_bad: the
  // gradient tensor that went bad first in backward order ("" when only the loss did).
  bool nonfinite = false;
  bool spike = false;
  bool applied = true;
  std::string first_bad;
};

// Allocates everything a step needs (nothing is allocated by train_step afterwards).
// `grid` may be null (single process); it must outlive the state. `device` is resolved
// (train_device_resolve) and, for kCuda, selected (train_device_select).
void train_state_init(TrainState& s, const Config& cfg, const ProcessGrid* grid = nullptr,
                      Device device = Device::kCpu);

// Reports the step's micro-batch and pipeline op to `w` (may be null) from now on.
void train_state_set_watchdog(TrainState& s, Watchdog* w);

// Every rank of the job, or null when running as one process.
Comm* train_world_comm(const TrainState& s);

StepStats train_step(TrainState& s, int64_t step, const BatchSource& source);

// Mean validation loss over `n_batches` micro-batches drawn by `source` (step is unused).
double eval_loss(TrainState& s, int64_t n_batches, const BatchSource& source);

// Splits windows (B, T + 1) into inputs and next-token targets (B, T).
void windows_split(int32_t* inputs, int32_t* targets, const int32_t* windows, int64_t B, int64_t T_);

}  // namespace moe
