// The process grid: world = pp x dp; expert parallelism ep divides dp.
//
// Layout: world rank w is pipeline rank pp_rank = w / dp and data-parallel rank
// dp_rank = w % dp, so the dp ranks of one pipeline rank are consecutive (and an EP group,
// ep consecutive of them, stays on one node where possible). Pipeline neighbours of one
// replica share dp_rank: pp_peer(q) = q * dp + dp_rank; the executor sends point-to-point
// over `world`.
//
// Groups, all within one pipeline rank unless said otherwise: data-parallel rank r is EP
// rank r % ep of EP group r / ep, and expert-data-parallel rank r / ep among the dp / ep
// ranks holding the same experts. Across pipeline ranks: pp_comm, the pp ranks of one
// replica (same dp_rank), in pipeline order. The ZeRO-1 groups (param_comm,
// expert_param_comm) are the ranks holding the same parameters: the same as dp_comm /
// edp_comm, except that
// DualPipe keeps two copies of every stage (pipeline ranks q and pp-1-q hold the same two
// stages), so its groups span both mirror pipeline ranks: their gradients are summed and
// they share the optimizer shards.
#pragma once

#include <memory>

#include "io/config.h"
#include "parallel/comm.h"

namespace moe {

// One communicator split: ranks with the same color form a group, ordered by key.
struct GridSplit {
  int color = 0, key = 0;
};

// Where world rank w sits in the grid, and the splits that build its groups (pure
// arithmetic, so every rank's groups can be checked without MPI).
struct GridLayout {
  int pp_rank = 0, dp_rank = 0, ep_rank = 0, edp_rank = 0;
  int copies = 1;  // parameter copies across the pipeline ranks: 2 for dualpipe
  GridSplit dp, ep, edp, pp, param, expert_param;
};
GridLayout grid_layout(const ParallelConfig& p, int world_rank);

struct ProcessGrid {
  int world_rank = 0, world_size = 1;
  int dp = 1, ep = 1, pp = 1;
  int pp_rank = 0;   // pipeline rank: which stages this rank holds
  int dp_rank = 0;   // among the dp ranks of this pipeline rank
  int ep_rank = 0;   // in the EP group
  int edp = 1;       // dp / ep: ranks of one pipeline rank holding the same experts
  int edp_rank = 0;  // among them
  int copies = 1;    // copies of each stage's parameters: 2 for dualpipe, else 1
  std::unique_ptr<Comm> world;     // null when running without MPI
  std::unique_ptr<Comm> dp_comm;   // the dp ranks of this pipeline rank, when dp > 1
  std::unique_ptr<Comm> ep_comm;   // the EP group (token dispatch), when ep > 1
  std::unique_ptr<Comm> edp_comm;  // ranks with the same experts (expert gradients), edp > 1
  // The pipeline ranks of this replica (same dp_rank) in order, when pp > 1: the bootstrap of
  // the pipeline's NCCL group (its MPI messages go over `world`).
  std::unique_ptr<Comm> pp_comm;
  // ZeRO-1 group of the replicated parameters (dp x copies ranks; null when 1): the dp ranks
  // of this pipeline rank, and for dualpipe those of its mirror pp-1-pp_rank after them.
  std::unique_ptr<Comm> param_comm;
  // ZeRO-1 group of the routed experts (edp x copies ranks; null when 1): as param_comm,
  // restricted to this ep_rank.
  std::unique_ptr<Comm> expert_param_comm;
  bool is_root() const { return world_rank == 0; }
  // The world rank of pipeline rank q in this rank's replica (same dp_rank).
  int pp_peer(int q) const { return q * dp + dp_rank; }
};

// Checks the launch against [parallel] (one line naming the mismatch, e.g.
// "configs/x.toml: parallel.dp = 4 x parallel.pp = 1 needs 4 ranks, but mpirun started 6")
// and builds the communicators. Without MPI (world size 1) every comm is null.
ProcessGrid grid_build(const Config& cfg);

// Every rank must have resolved the same config and run the same binary; a mismatch stops
// all ranks with a line naming the first rank that differs.
void grid_check_consistent(const ProcessGrid& g, const Config& cfg);

}  // namespace moe
