// How the NCCL communicators come to be: for each process group (dp, ep, pp, the DualPipe
// mirror pairs, ...) every member calls ncclCommInitRank with the same unique id, its rank in
// the group and the group's size. The id is made by the group's rank 0 and travels over the
// group's MPI communicator, which already exists (parallel/grid.h): NCCL needs no launcher
// support of its own. The NCCL calls come in through NcclBootstrapOps, so the logic (which
// rank makes the id, who receives it, which rank and size each member initializes with) is
// tested on the CPU under mpirun with fakes (tests/mpi/test_nccl_bootstrap.cpp); the CUDA
// build passes the real ncclGetUniqueId / ncclCommInitRank (parallel/nccl/comm_nccl.cpp).
#pragma once

#include <array>
#include <cstddef>
#include <functional>

#include "parallel/comm.h"

namespace moe {

// NCCL_UNIQUE_ID_BYTES; comm_nccl.cpp asserts that the header agrees.
constexpr size_t kNcclIdBytes = 128;

struct NcclId {
  std::array<unsigned char, kNcclIdBytes> bytes{};
};

struct NcclBootstrapOps {
  // Called on the group's rank 0 only.
  std::function<NcclId()> make_id;
  // Called on every member once the id has arrived: (id, group size, rank in the group).
  std::function<void(const NcclId&, int, int)> init;
};

// Collective over `group`: every member must call it. Returns the id the group used.
NcclId nccl_bootstrap(Comm& group, const NcclBootstrapOps& ops);

}  // namespace moe
