#include "parallel/grid.h"

#include <cstring>
#include <string>
#include <vector>

#include "model/check.h"

namespace moe {

ProcessGrid grid_build(const Config& cfg) {
  ProcessGrid g;
  const ParallelConfig& p = cfg.parallel;
  g.dp = p.dp;
  g.ep = p.ep;
  g.pp = p.pp;
  g.world_size = mpi_world_size();
  g.world_rank = mpi_world_rank();
  if (g.world_size != p.dp * p.pp)
    user_error("%s: parallel.dp = %d x parallel.pp = %d needs %d ranks, but the job has %d",
               cfg.source.c_str(), p.dp, p.pp, p.dp * p.pp, g.world_size);
  if (p.pp != 1)
    user_error("%s: parallel.pp > 1 is not supported by this build yet (data and expert "
               "parallelism only)", cfg.source.c_str());
  CHECK(p.ep >= 1 && p.dp % p.ep == 0);  // the config validator already refused this
  g.dp_rank = g.world_rank;
  g.ep_rank = g.dp_rank % p.ep;
  g.edp = p.dp / p.ep;
  g.edp_rank = g.dp_rank / p.ep;
  if (g.world_size > 1) {
    g.world = comm_mpi_world();
    g.dp_comm = comm_mpi_split(*g.world, 0, g.world_rank, "dp");
    // Every rank joins every split (MPI_Comm_split is collective); sizes-1 groups are dropped.
    std::unique_ptr<Comm> ep = comm_mpi_split(*g.world, g.dp_rank / p.ep, g.ep_rank, "ep");
    std::unique_ptr<Comm> edp = comm_mpi_split(*g.world, g.ep_rank, g.edp_rank, "edp");
    if (p.ep > 1) g.ep_comm = std::move(ep);
    if (g.edp > 1) g.edp_comm = std::move(edp);
  }
  return g;
}

void grid_check_consistent(const ProcessGrid& g, const Config& cfg) {
  if (!g.world) return;
  // Each rank contributes (hash, version hash) at its slot; all compare against rank 0.
  const uint64_t vh = text_hash(MOETRAIN_VERSION);
  const int n = g.world_size;
  std::vector<int64_t> mine(2 * static_cast<size_t>(n), 0);
  mine[2 * static_cast<size_t>(g.world_rank)] = static_cast<int64_t>(config_hash(cfg));
  mine[2 * static_cast<size_t>(g.world_rank) + 1] = static_cast<int64_t>(vh);
  g.world->all_reduce_sum(mine.data(), 2 * n);
  for (int r = 1; r < n; ++r) {
    if (mine[2 * r + 1] != mine[1])
      user_error("rank %d runs a different moetrain binary than rank 0", r);
    if (mine[2 * r] != mine[0])
      user_error("rank %d resolved a different config than rank 0 (config hash %016llx vs %016llx)",
                 r, static_cast<unsigned long long>(mine[2 * r]),
                 static_cast<unsigned long long>(mine[0]));
  }
}

}  // namespace moe
