// The whole model on the GPU against the same model on the CPU: one training forward and
// backward (init, weight quantization, every layer kind, the MTP module, split backward) built
// once with Device::kCuda and once with Device::kCpu from the same seed and tokens. The GPU
// sums in other orders (cuBLAS, block reductions), so the comparison is of the loss, the
// gradient's norm and its direction; FP8 rounding turns last-bit differences into a code
// step now and then, hence its wider bounds.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "model/model.h"
#include "model/rng.h"
#include "tests/gpu/gpu_test_util.h"

namespace moe {
namespace {

ModelDims gpu_model_dims(PrecisionMode pm, bool mla, int64_t mtp) {
  ModelDims d;
  d.V = 96; d.C = 128; d.L = 3; d.NH = 4; d.NKV = 2; d.HD = 32; d.T = 32; d.F = 256;
  d.dense_layers = 1;
  d.E = 8; d.K = 2; d.FE = 64; d.S = 64; d.G = 2; d.KG = 1;
  d.aux_alpha = 0.01;
  d.precision = pm;
  d.dispatch_fp8 = pm == PrecisionMode::kFp8;
  if (mla) {
    d.attn = AttentionKind::kMla;
    d.q_lora = 64; d.kv_lora = 32; d.qk_nope = 16; d.qk_rope = 16; d.v_hd = 32;
  }
  d.mtp = mtp;
  return d;
}

struct StepOut {
  double loss = 0, aux = 0, mtp = 0;
  std::vector<float> grads;
  std::vector<int64_t> load;
};

StepOut run_step(const ModelDims& d, Device dev, bool split) {
  const int64_t B = 2;
  Model<float> m;
  model_build<float>(m, d, B, 1, 1, {}, 1, split, dev);
  model_init<float>(m, 11);
  model_zero_grads<float>(m);
  model_quantize_weights<float>(m);
  std::vector<int32_t> x(static_cast<size_t>(B * d.T)), y(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = static_cast<int32_t>(rng_u64(5, 1, i) % static_cast<uint64_t>(d.V));
    y[i] = i % 9 == 4 ? -1 : static_cast<int32_t>(rng_u64(5, 2, i) % static_cast<uint64_t>(d.V));
  }
  StepOut o;
  o.loss = model_forward<float>(m, x.data(), y.data(), B, d.T, true);
  o.aux = m.aux_loss_sum;
  o.mtp = m.mtp_ce_sum;
  const float dloss = 1.0f / static_cast<float>(B * d.T);
  if (split) {
    model_chunk_backward<float>(m, 0, 0, d.L, dloss, 1.0f, BackwardPart::kInput);
    model_chunk_backward<float>(m, 0, 0, d.L, dloss, 1.0f, BackwardPart::kWeight);
  } else {
    model_backward<float>(m, dloss, 1.0f);
  }
  o.grads.resize(m.n_alloc);
  m.ops->download(o.grads.data(), m.grads, m.n_alloc * sizeof(float));
  o.load.assign(m.expert_load, m.expert_load + d.n_moe_blocks() * d.E);
  return o;
}

double norm(const std::vector<float>& v) {
  double s = 0;
  for (float x : v) s += static_cast<double>(x) * x;
  return std::sqrt(s);
}

double cosine(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s / (norm(a) * norm(b));
}

struct ModelCase {
  const char* name;
  PrecisionMode pm;
  bool mla;
  int64_t mtp;
  bool split;
  double loss_rtol, norm_rtol, min_cosine;
};

TEST(CudaModel, OneStepMatchesTheCpuModel) {
  SKIP_WITHOUT_GPU();
  const ModelCase cases[] = {
      {"fp32 gqa", PrecisionMode::kFp32, false, 0, false, 1e-5, 1e-4, 1 - 1e-6},
      {"fp32 mla mtp split", PrecisionMode::kFp32, true, 1, true, 1e-5, 1e-4, 1 - 1e-6},
      {"bf16 gqa", PrecisionMode::kBf16, false, 0, false, 1e-4, 1e-3, 1 - 1e-4},
      {"fp8 mla mtp", PrecisionMode::kFp8, true, 1, false, 2e-3, 2e-2, 0.999},
  };
  for (const ModelCase& c : cases) {
    SCOPED_TRACE(c.name);
    const ModelDims d = gpu_model_dims(c.pm, c.mla, c.mtp);
    const StepOut cpu = run_step(d, Device::kCpu, c.split);
    const StepOut gpu = run_step(d, Device::kCuda, c.split);
    EXPECT_NEAR(gpu.loss, cpu.loss, c.loss_rtol * cpu.loss);
    EXPECT_NEAR(gpu.aux, cpu.aux, c.loss_rtol * cpu.aux + 1e-9);
    EXPECT_NEAR(gpu.mtp, cpu.mtp, c.loss_rtol * cpu.mtp + 1e-9);
    EXPECT_NEAR(norm(gpu.grads), norm(cpu.grads), c.norm_rtol * norm(cpu.grads));
    EXPECT_GT(cosine(gpu.grads, cpu.grads), c.min_cosine);
    // Routing is a discrete choice: in FP32 the same experts get the same tokens.
    if (c.pm == PrecisionMode::kFp32) {
      EXPECT_EQ(gpu.load, cpu.load);
    }
  }
}

// Everything the model allocates, it allocates in model_build: a step allocates no device
// memory.
TEST(CudaModel, AStepAllocatesNoDeviceMemory) {
  SKIP_WITHOUT_GPU();
  const ModelDims d = gpu_model_dims(PrecisionMode::kFp8, true, 1);
  Model<float> m;
  model_build<float>(m, d, 2, 1, 1, {}, 1, false, Device::kCuda);
  model_init<float>(m, 3);
  std::vector<int32_t> x(static_cast<size_t>(2 * d.T), 1), y(x.size(), 2);
  auto step = [&] {
    model_zero_grads<float>(m);
    model_quantize_weights<float>(m);
    model_forward<float>(m, x.data(), y.data(), 2, d.T, true);
    model_backward<float>(m, 1.0f / 64, 1.0f);
    m.ops->synchronize();
  };
  step();  // the first may initialize library state (cuBLAS handles are made at build)
  const size_t before = cuda::device_free_bytes();
  step();
  EXPECT_EQ(cuda::device_free_bytes(), before);
}

}  // namespace
}  // namespace moe
