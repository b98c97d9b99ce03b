// The process grid: world = pp x dp; expert parallelism ep divides dp. For now the trainer
// runs data and expert parallelism (pp = 1); the grid already checks the whole layout.
//
// Groups (pp = 1): data-parallel rank r is EP rank r % ep of EP group r / ep (consecutive
// ranks, so an EP group's all-to-all stays on one node where possible), and expert-data-
// parallel rank r / ep among the dp / ep ranks holding the same experts.
#pragma once

#include <memory>

#include "io/config.h"
#include "parallel/comm.h"

namespace moe {

struct ProcessGrid {
  int world_rank = 0, world_size = 1;
  int dp = 1, ep = 1, pp = 1;
  int dp_rank = 0;
  int ep_rank = 0;   // in the EP group
  int edp = 1;       // dp / ep: ranks holding the same experts
  int edp_rank = 0;  // among them
  std::unique_ptr<Comm> world;     // null when running without MPI
  std::unique_ptr<Comm> dp_comm;   // all data-parallel ranks (replicated tensors)
  std::unique_ptr<Comm> ep_comm;   // the EP group (token dispatch), when ep > 1
  std::unique_ptr<Comm> edp_comm;  // ranks with the same experts (expert gradients), edp > 1
  bool is_root() const { return world_rank == 0; }
};

// Checks the launch against [parallel] (one line naming the mismatch, e.g.
// "configs/x.toml: parallel.dp = 4 x parallel.pp = 1 needs 4 ranks, but mpirun started 6")
// and builds the communicators. Without MPI (world size 1) every comm is null.
ProcessGrid grid_build(const Config& cfg);

// Every rank must have resolved the same config and run the same binary; a mismatch stops
// all ranks with a line naming the first rank that differs.
void grid_check_consistent(const ProcessGrid& g, const Config& cfg);

}  // namespace moe
