// The process grid: world = pp x dp; expert parallelism ep divides dp. For now the trainer
// runs data parallelism (pp = ep = 1); the grid already checks the whole layout.
#pragma once

#include <memory>

#include "io/config.h"
#include "parallel/comm.h"

namespace moe {

struct ProcessGrid {
  int world_rank = 0, world_size = 1;
  int dp = 1, ep = 1, pp = 1;
  int dp_rank = 0;
  std::unique_ptr<Comm> world;  // null when running without MPI
  std::unique_ptr<Comm> dp_comm;
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
