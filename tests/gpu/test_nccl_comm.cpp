// The NCCL communicator (parallel/nccl/comm_nccl.h) on one device as a group of one: every
// operation the trainer uses runs and moves the bytes it should (a group of one reduces to
// copies, so the expected values need no second GPU). Several GPUs under mpirun are for
// `moetrain train` runs (docs/GPU.md).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "tests/gpu/gpu_test_util.h"

#ifdef MOETRAIN_HAVE_NCCL
#include "model/check.h"
#include "parallel/nccl/comm_nccl.h"

namespace {

using moe_gpu_test::DeviceVec;

// A bootstrap group of one process: broadcast from rank 0 to itself is nothing.
class SelfComm final : public moe::Comm {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const std::string& name() const override { return name_; }
  void broadcast(void*, size_t, int) override {}
  void all_reduce_sum(float*, int64_t) override { unused(); }
  void all_reduce_sum(double*, int64_t) override { unused(); }
  void all_reduce_sum(int64_t*, int64_t) override { unused(); }
  void all_reduce_max(double*, int64_t) override { unused(); }
  moe::CommRequest all_reduce_sum_start(float*, int64_t) override { unused(); }
  moe::CommRequest reduce_scatter_sum_start(float*, const float*, const int*) override { unused(); }
  bool test(moe::CommRequest&) override { unused(); }
  void wait(moe::CommRequest&) override { unused(); }
  void reduce_scatter_sum(float*, const float*, int64_t) override { unused(); }
  void reduce_sum(float*, const float*, int64_t, int) override { unused(); }
  void all_gather(float*, const float*, int64_t) override { unused(); }
  moe::CommRequest all_to_all_v_start(const void*, const int*, const int*, void*, const int*,
                                      const int*) override { unused(); }
  moe::CommRequest all_to_all_start(const int64_t*, int64_t*, int64_t) override { unused(); }
  void send(const void*, size_t, int, int) override { unused(); }
  void recv(void*, size_t, int, int) override { unused(); }
  moe::CommRequest send_start(const void*, size_t, int, int) override { unused(); }
  moe::CommRequest recv_start(void*, size_t, int, int) override { unused(); }
  void barrier() override {}

 private:
  [[noreturn]] static void unused() { CHECK(false, "the bootstrap only broadcasts"); __builtin_unreachable(); }
  std::string name_ = "self";
};

TEST(NcclComm, GroupOfOneMovesTheBytes) {
  SKIP_WITHOUT_GPU();
  SelfComm boot;
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
