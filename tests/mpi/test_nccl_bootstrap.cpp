// The NCCL bootstrap's logic (parallel/nccl_bootstrap.h) under mpirun with fake NCCL calls:
// in every group exactly rank 0 makes the id, every member initializes once with that same
// id and with its own rank and the group's size, and distinct groups get distinct ids.
//
// NOTE: every rank runs every test and the tests call collectives (see test_expert_dispatch).
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "parallel/comm.h"
#include "parallel/nccl_bootstrap.h"

namespace moe {
namespace {

// A fake id naming its maker: the world rank and a per-group tag, so a test can tell whose
// id arrived.
NcclId fake_id(int world_rank, int tag) {
  NcclId id;
  for (size_t i = 0; i < id.bytes.size(); ++i)
    id.bytes[i] = static_cast<unsigned char>((world_rank * 31 + tag * 7 + static_cast<int>(i)) & 0xff);
  return id;
}

TEST(NcclBootstrap, EveryGroupSharesItsRankZerosId) {
  std::unique_ptr<Comm> world = comm_mpi_world();
  const int wr = world->rank(), ws = world->size();
  ASSERT_GE(ws, 2);
  // Two ways to group the world, as dp and ep cut the same ranks: contiguous pairs, and
  // ranks with the same parity. Keys reversed in the second, so rank 0 of a group is not
  // the member with the smallest world rank.
  struct Grouping {
    const char* name;
    int color, key;
  } groupings[] = {{"pairs", wr / 2, wr}, {"parity", wr % 2, ws - wr}};
  for (int g = 0; g < 2; ++g) {
    const Grouping& gr = groupings[g];
    SCOPED_TRACE(gr.name);
    std::unique_ptr<Comm> group = comm_mpi_split(*world, gr.color, gr.key, gr.name);
    int made = 0, inits = 0, init_rank = -1, init_size = -1;
    NcclId seen;
    NcclBootstrapOps ops;
    ops.make_id = [&] {
      ++made;
      return fake_id(wr, g);
    };
    ops.init = [&](const NcclId& id, int size, int rank) {
      ++inits;
      seen = id;
      init_size = size;
      init_rank = rank;
    };
    const NcclId used = nccl_bootstrap(*group, ops);
    EXPECT_EQ(made, group->rank() == 0 ? 1 : 0);
    EXPECT_EQ(inits, 1);
    EXPECT_EQ(init_rank, group->rank());
    EXPECT_EQ(init_size, group->size());
    EXPECT_EQ(std::memcmp(used.bytes.data(), seen.bytes.data(), kNcclIdBytes), 0);
    // The group's rank 0's world rank, gathered, tells which id every member must hold.
    std::vector<float> maker(static_cast<size_t>(group->size()));
    const float me = group->rank() == 0 ? static_cast<float>(wr) : -1.0f;
    group->all_gather(maker.data(), &me, 1);
    const NcclId want = fake_id(static_cast<int>(maker[0]), g);
    EXPECT_EQ(std::memcmp(seen.bytes.data(), want.bytes.data(), kNcclIdBytes), 0);
    // Across the world: members of other groups hold other ids (their makers differ).
    std::vector<float> first_byte(static_cast<size_t>(ws)), colors(static_cast<size_t>(ws));
    const float fb = static_cast<float>(seen.bytes[0]), col = static_cast<float>(gr.color);
    world->all_gather(first_byte.data(), &fb, 1);
    world->all_gather(colors.data(), &col, 1);
    for (int r = 0; r < ws; ++r) {
      const size_t i = static_cast<size_t>(r);
      if (colors[i] == col) {
        EXPECT_EQ(first_byte[i], fb) << "rank " << r;
      } else {
        EXPECT_NE(first_byte[i], fb) << "rank " << r;
      }
    }
  }
}

}  // namespace
}  // namespace moe
