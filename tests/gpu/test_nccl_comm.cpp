// The NCCL communicator (parallel/nccl/comm_nccl.h) on one device as a group of one: every
// operation the trainer uses runs and moves the bytes it should (a group of one reduces to
// copies, so the expected values need no second GPU). Several GPUs under mpirun are for
// `moetrain train` runs (docs/GPU.md).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "tests/gpu/gpu_test_util.h"

#ifdef MOETRAIN_HAVE_NCCL
#include "parallel/nccl/comm_nccl.h"
#include "tests/loopback_comm.h"

namespace {

using moe_gpu_test::DeviceVec;

TEST(NcclComm, GroupOfOneMovesTheBytes) {
  SKIP_WITHOUT_GPU();
  moe::LoopbackComm boot;  // broadcast from rank 0 to itself is nothing
  moe::cuda::Stream stream = moe::cuda::stream_create();
  {
    std::unique_ptr<moe::Comm> c = moe::comm_nccl_create(boot, stream, 60.0);
    ASSERT_EQ(c->size(), 1);
    const std::vector<float> x = moe_gpu_test::normal_floats(1000, 5);
    DeviceVec<float> a(x);
    c->all_reduce_sum(a.get(), 1000);
    EXPECT_EQ(a.host(), x);
    moe::CommRequest r = c->all_reduce_sum_start(a.get(), 1000);
    c->wait(r);
    EXPECT_FALSE(r.active);
    EXPECT_EQ(a.host(), x);
    DeviceVec<float> out(1000);
    const int counts[1] = {1000};
    r = c->reduce_scatter_sum_start(out.get(), a.get(), counts);
    c->wait(r);
    EXPECT_EQ(out.host(), x);
    DeviceVec<float> g(1000);
    c->all_gather(g.get(), a.get(), 1000);
    EXPECT_EQ(g.host(), x);
    // The expert exchange's byte all-to-all to oneself, at an offset.
    DeviceVec<float> dst(1000);
    const int bytes[1] = {400}, sdispl[1] = {40}, rdispl[1] = {80};
    r = c->all_to_all_v_start(a.get(), bytes, sdispl, dst.get(), bytes, rdispl);
    c->wait(r);
    const std::vector<float> d = dst.host();
    for (int i = 0; i < 100; ++i) EXPECT_EQ(d[20 + i], x[10 + i]) << i;
    EXPECT_EQ(d[19], 0.0f);
    EXPECT_EQ(d[120], 0.0f);
    c->barrier();
  }
  moe::cuda::stream_destroy(stream);
}

}  // namespace
#endif
