// The trainer on the GPU: the optimizer's backend against the CPU's, and whole optimizer steps
// of a TrainState built on Device::kCuda against the same run on the CPU (losses, norms and
// the parameters after the steps), a GPU checkpoint loaded into a CPU state, and a step that
// allocates no device memory.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "optim/optim_ops.h"
#include "optim/optim_ops_cuda.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/train_fixture.h"
#include "trainer/train_checkpoint.h"

namespace moe {
namespace {

using moe_gpu_test::DeviceVec;

std::vector<float> random_floats(size_t n, uint64_t seed) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i)
    v[i] = static_cast<float>(rng_uniform(seed, 3, i) * 2.0 - 1.0) * (i % 7 == 0 ? 100.f : 1.f);
  return v;
}

TEST(CudaOptimOps, SumOfSquaresIsDeterministicAndMatchesTheCpu) {
  SKIP_WITHOUT_GPU();
  const int64_t sizes[] = {0, 1, 255, kGradNormBlock, kGradNormBlock + 1, 3 * kGradNormBlock + 77,
                           1000003};
  auto gpu = optim_ops_cuda(nullptr, 1000003);
  auto cpu = optim_ops_cpu(1000003);
  for (int64_t n : sizes) {
    SCOPED_TRACE(n);
    const std::vector<float> g = random_floats(static_cast<size_t>(n), static_cast<uint64_t>(n));
    DeviceVec<float> dg(g.size() ? g : std::vector<float>{0.f});
    const double a = gpu->sum_squares(dg.get(), n), b = gpu->sum_squares(dg.get(), n);
    const double ref = cpu->sum_squares(g.data(), n);
    EXPECT_EQ(0, std::memcmp(&a, &b, sizeof(a)));  // the same bits every time
    EXPECT_NEAR(a, ref, 1e-12 * ref);
  }
}

TEST(CudaOptimOps, AdamWMatchesTheCpuBitForBit) {
  SKIP_WITHOUT_GPU();
  const size_t n = 50001;
  std::vector<float> p = random_floats(n, 1), g = random_floats(n, 2), m = random_floats(n, 3),
                     v = random_floats(n, 4);
  for (float& x : v) x = std::fabs(x);
  DeviceVec<float> dp(p), dg(g), dm(m), dv(v);
  AdamWStep st;
  st.lr = 1e-3f;
  st.weight_decay = 0.1f;
  st.t = 7;
  st.grad_scale = 0.5f;
  auto gpu = optim_ops_cuda(nullptr, 16);
  gpu->adamw(dp.get(), dg.get(), dm.get(), dv.get(), static_cast<int64_t>(n), st, true);
  moe::cuda::device_synchronize();
  optim_ops_cpu(16)->adamw(p.data(), g.data(), m.data(), v.data(), static_cast<int64_t>(n), st,
                           true);
  EXPECT_EQ(0, std::memcmp(p.data(), dp.host().data(), n * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(m.data(), dm.host().data(), n * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(v.data(), dv.host().data(), n * sizeof(float)));
}

struct TrainOut {
  std::vector<StepStats> stats;
  std::vector<float> params;
  double val = 0;
  size_t free_before_step = 0, free_after_step = 0;
};

TrainOut train(const Config& cfg, Device dev, int64_t steps, const std::string& ckpt) {
  TrainState s;
  train_state_init(s, cfg, nullptr, dev);
  const BatchSource src = train_fixture_batches(s.model.d.T, s.model.d.V);
  TrainOut o;
  for (int64_t step = 0; step < steps; ++step) {
    if (dev == Device::kCuda && step == 1) o.free_before_step = moe::cuda::device_free_bytes();
    o.stats.push_back(train_step(s, step, src));
    if (dev == Device::kCuda && step == 1) o.free_after_step = moe::cuda::device_free_bytes();
  }
  o.val = eval_loss(s, 2, src);
  o.params.resize(s.model.n_alloc);
  s.model.ops->download(o.params.data(), s.model.params, o.params.size() * sizeof(float));
  if (!ckpt.empty()) {
    RunPosition pos;
    pos.step = steps;
    checkpoint_save(s, pos, ckpt);
  }
  return o;
}

struct TrainCase {
  const char* precision;
  const char* state_dtype;
  int mtp;
  double loss_rtol, norm_rtol, param_atol;
};

TEST(CudaTrain, StepsMatchTheCpuTrainer) {
  SKIP_WITHOUT_GPU();
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("cuda_train_" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  // A few steps amplify the backends' different summation orders only a little; the bounds
  // are for lr 3e-3 (tiny.toml) with warm-up.
  const TrainCase cases[] = {{"fp32", "fp32", 0, 1e-4, 1e-3, 1e-4},
                             {"bf16", "bf16", 1, 1e-3, 1e-2, 1e-3},
                             {"fp8", "fp32", 0, 5e-3, 5e-2, 5e-3}};
  for (const TrainCase& c : cases) {
    SCOPED_TRACE(std::string(c.precision) + " state " + c.state_dtype);
    const Config cfg = train_fixture_config(c.precision, c.state_dtype, c.mtp);
    const std::string ckpt = (dir / (std::string(c.precision) + ".h5")).string();
    const TrainOut cpu = train(cfg, Device::kCpu, 4, "");
    const TrainOut gpu = train(cfg, Device::kCuda, 4, ckpt);
    for (size_t i = 0; i < cpu.stats.size(); ++i) {
      EXPECT_NEAR(gpu.stats[i].loss, cpu.stats[i].loss, c.loss_rtol * cpu.stats[i].loss) << i;
      EXPECT_NEAR(gpu.stats[i].grad_norm, cpu.stats[i].grad_norm,
                  c.norm_rtol * cpu.stats[i].grad_norm) << i;
    }
    EXPECT_NEAR(gpu.val, cpu.val, c.loss_rtol * cpu.val);
    double worst = 0;
    for (size_t i = 0; i < cpu.params.size(); ++i)
      worst = std::max(worst, std::fabs(static_cast<double>(gpu.params[i]) - cpu.params[i]));
    EXPECT_LT(worst, c.param_atol);
    EXPECT_EQ(gpu.free_before_step, gpu.free_after_step) << "a GPU step allocated device memory";
    // The GPU's checkpoint restores the GPU's parameters exactly into a CPU state.
    TrainState back;
    train_state_init(back, cfg, nullptr, Device::kCpu);
    checkpoint_load(back, ckpt);
    EXPECT_EQ(0, std::memcmp(back.model.params, gpu.params.data(),
                             gpu.params.size() * sizeof(float)));
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace moe
