#include "parallel/grid.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "model/check.h"

namespace moe {

GridLayout grid_layout(const ParallelConfig& p, int world_rank) {
  CHECK(p.ep >= 1 && p.dp % p.ep == 0);  // the config validator already refused this
  const bool dualpipe = p.schedule == PipeSchedule::kDualPipe;
  CHECK(!dualpipe || p.pp % 2 == 0);
  GridLayout l;
  l.pp_rank = world_rank / p.dp;
  l.dp_rank = world_rank % p.dp;
  l.ep_rank = l.dp_rank % p.ep;
  l.edp_rank = l.dp_rank / p.ep;
  l.copies = dualpipe ? 2 : 1;
  const int edp = p.dp / p.ep;
  l.dp = {l.pp_rank, l.dp_rank};
  l.ep = {l.pp_rank * edp + l.dp_rank / p.ep, l.ep_rank};
  l.edp = {l.pp_rank * p.ep + l.ep_rank, l.edp_rank};
  l.pp = {l.dp_rank, l.pp_rank};
  // DualPipe's mirror ranks q and pp-1-q hold the same stages: one group, the lower half's
  // ranks first. Otherwise each pipeline rank holds its own parameters.
  const int mirror = dualpipe ? std::min(l.pp_rank, p.pp - 1 - l.pp_rank) : l.pp_rank;
  const int half = dualpipe && l.pp_rank >= p.pp / 2 ? 1 : 0;
  l.param = {mirror, half * p.dp + l.dp_rank};
  l.expert_param = {mirror * p.ep + l.ep_rank, half * edp + l.edp_rank};
  return l;
}

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
  const GridLayout l = grid_layout(p, g.world_rank);
  g.pp_rank = l.pp_rank;
  g.dp_rank = l.dp_rank;
  g.ep_rank = l.ep_rank;
  g.edp = p.dp / p.ep;
  g.edp_rank = l.edp_rank;
  g.copies = l.copies;
  if (g.world_size == 1) return g;
  g.world = comm_mpi_world();
  // Every rank joins every split (MPI_Comm_split is collective); size-1 groups are dropped.
  auto split = [&](const GridSplit& s, const char* name, int size) {
    std::unique_ptr<Comm> c = comm_mpi_split(*g.world, s.color, s.key, name);
    CHECK(c->size() == size, "%s group of %d ranks, expected %d", name, c->size(), size);
    return size > 1 ? std::move(c) : nullptr;
  };
  g.dp_comm = split(l.dp, "dp", p.dp);
  g.ep_comm = split(l.ep, "ep", p.ep);
  g.edp_comm = split(l.edp, "edp", g.edp);
  g.pp_comm = split(l.pp, "pp", p.pp);
  g.param_comm = split(l.param, "param", p.dp * g.copies);
  g.expert_param_comm = split(l.expert_param, "expert_param", g.edp * g.copies);
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
