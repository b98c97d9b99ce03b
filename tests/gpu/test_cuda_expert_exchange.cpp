// The expert exchange's device path (parallel/expert_dispatch_device.h) on one GPU: the CUDA
// backend's copies, FP8 quantization and BF16 rounding, and NCCL as a group of one (every row
// goes to itself through ncclSend/ncclRecv), against the host path on the same inputs, bit for
// bit, in both wire formats, with two lanes in flight. Several GPUs exchange the same way.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <vector>

#include "tests/gpu/gpu_test_util.h"

#ifdef MOETRAIN_HAVE_NCCL
#include "model/kernels/cuda/cuda_ops.h"
#include "model/rng.h"
#include "parallel/expert_exchange.h"
#include "parallel/nccl/comm_nccl.h"
#include "tests/loopback_comm.h"

namespace {

using moe_gpu_test::DeviceVec;

constexpr int64_t kE = 8, kK = 2, kN = 37, kC = 200;  // C: a whole FP8 tile and a partial one
constexpr int64_t kRows = kN * kK;

// Rows per expert (expert 3 gets none) and matching routing ids, in the sender layout's order.
void routing(std::vector<int64_t>& counts, std::vector<int32_t>& ids) {
  counts.assign(kE, 0);
  ids.assign(kRows, 0);
  for (int64_t r = 0; r < kRows; ++r) {
    int64_t e = static_cast<int64_t>(moe::rng_u64(11, 2, static_cast<uint64_t>(r)) % kE);
    if (e == 3) e = 4;
    ++counts[e];
  }
  int64_t r = 0;
  for (int64_t e = 0; e < kE; ++e)
    for (int64_t i = 0; i < counts[e]; ++i) ids[r++] = static_cast<int32_t>(e);
}

struct Out {
  std::vector<float> xg, yp, dyg;
};

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Dispatch xp; the experts multiply by (expert + 1) (on the host); combine while a second
// dispatch (-3 xp) is in flight on lane 1. `ops` null: the host path.
Out run(moe::EpWireFormat f, moe::Ops<float>* ops, moe::Comm* device_comm) {
  std::vector<int64_t> counts;
  std::vector<int32_t> ids;
  routing(counts, ids);
  const std::vector<float> xp = moe_gpu_test::normal_floats(kRows * kC, 5);
  std::vector<float> dyp(xp);
  for (float& v : dyp) v *= -3.0f;
  moe::LoopbackComm host;
  moe::EpExchange ex(host, kE, 1, kRows, kC, 2, f);
  if (ops) ex.set_device(*ops, *device_comm, moe::Device::kCuda);
  std::vector<int64_t> offs(kE + 1), blocks(kE + 1);
  Out o;
  if (!ops) {
    ex.plan_start(0, 0, counts.data(), ids.data(), kN, kK);
    const int64_t R = ex.plan_finish(0, offs.data(), blocks.data());
    o.xg.assign(static_cast<size_t>(R * kC), 0.0f);
    ex.dispatch_start(0, 0, o.xg.data(), xp.data(), kC);
    ex.finish(0);
    std::vector<float> yg(o.xg);
    for (int64_t j = 0; j < kE; ++j)
      for (int64_t i = offs[j] * kC; i < offs[j + 1] * kC; ++i) yg[i] *= static_cast<float>(j + 1);
    o.yp.assign(xp.size(), 0.0f);
    o.dyg.assign(o.xg.size(), 0.0f);
    ex.combine_start(0, 0, o.yp.data(), yg.data(), kC);
    ex.dispatch_start(1, 0, o.dyg.data(), dyp.data(), kC);
    ex.finish(1);
    ex.finish(0);
    return o;
  }
  DeviceVec<int32_t> d_ids(ids);
  DeviceVec<float> d_xp(xp), d_dyp(dyp), d_xg(kRows * kC), d_yg(kRows * kC), d_yp(xp.size()),
      d_dyg(kRows * kC);
  ex.plan_start(0, 0, counts.data(), d_ids.get(), kN, kK);
  const int64_t R = ex.plan_finish(0, offs.data(), blocks.data());
  ex.dispatch_start(0, 0, d_xg.get(), d_xp.get(), kC);
  ex.finish(0);
  o.xg.resize(static_cast<size_t>(R * kC));
  ops->download(o.xg.data(), d_xg.get(), o.xg.size() * sizeof(float));
  std::vector<float> yg(o.xg);
  for (int64_t j = 0; j < kE; ++j)
    for (int64_t i = offs[j] * kC; i < offs[j + 1] * kC; ++i) yg[i] *= static_cast<float>(j + 1);
  ops->upload(d_yg.get(), yg.data(), yg.size() * sizeof(float));
  ex.combine_start(0, 0, d_yp.get(), d_yg.get(), kC);
  ex.dispatch_start(1, 0, d_dyg.get(), d_dyp.get(), kC);
  ex.finish(1);
  ex.finish(0);
  o.yp.resize(xp.size());
  o.dyg.resize(o.xg.size());
  ops->download(o.yp.data(), d_yp.get(), o.yp.size() * sizeof(float));
  ops->download(o.dyg.data(), d_dyg.get(), o.dyg.size() * sizeof(float));
  return o;
}

TEST(CudaExpertExchange, DevicePathMatchesTheHostPathBitForBit) {
  SKIP_WITHOUT_GPU();
  std::unique_ptr<moe::Ops<float>> ops = moe::ops_cuda_create(
      moe::OpsLimits{.tokens = kN, .width = kC, .batch = 1, .seq_len = kN, .experts = kE, .top_k = kK});
  moe_gpu_test::TestStream comm_stream;
  moe::LoopbackComm boot;
  std::unique_ptr<moe::Comm> nccl =
      moe::comm_nccl_create(boot, comm_stream.s, 60.0, moe::ops_cuda_stream(*ops));
  for (moe::EpWireFormat f : {moe::EpWireFormat::kFloat, moe::EpWireFormat::kFp8Bf16}) {
    SCOPED_TRACE(moe::ep_wire_format_name(f));
    const Out host = run(f, nullptr, nullptr), dev = run(f, ops.get(), nccl.get());
    EXPECT_FALSE(host.xg.empty());
    EXPECT_TRUE(same_bits(dev.xg, host.xg));
    EXPECT_TRUE(same_bits(dev.yp, host.yp));
    EXPECT_TRUE(same_bits(dev.dyg, host.dyg));
  }
}

}  // namespace
#endif
