// The whole model on the GPU against the same model on the CPU: one training forward and
// backward (init, weight quantization, every layer kind, the MTP module, split backward) built
// once with Device::kCuda and once with Device::kCpu from the same seed and tokens. The GPU
// sums in other orders (cuBLAS, block reductions), so the comparison is of the loss, the
// gradient's norm and its direction; FP8 rounding turns last-bit differences into a code
// step now and then, hence its wider bounds.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "model/check.h"
#include "model/model.h"
#include "tests/ops_model_step.h"
#include "tests/gpu/gpu_test_util.h"

namespace moe {
namespace {

OpsStepOut run_step(const ModelDims& d, Device dev, bool split) {
  Model<float> m;
  model_build<float>(m, d, 2, 1, 1, {}, 1, split, dev);
  return ops_model_step(m, 2, split, 11);
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
  bool native_gemm = true;  // false: precision.native_gemm = false, the GPU emulates as the CPU
};

TEST(CudaModel, OneStepMatchesTheCpuModel) {
  SKIP_WITHOUT_GPU();
  const ModelCase cases[] = {
      {"fp32 gqa", PrecisionMode::kFp32, false, 0, false, 1e-5, 1e-4, 1 - 1e-6},
      {"fp32 mla mtp split", PrecisionMode::kFp32, true, 1, true, 1e-5, 1e-4, 1 - 1e-6},
      // Native bf16 also takes attention to BF16 tensor cores (P and dS rounded to BF16).
      {"bf16 gqa", PrecisionMode::kBf16, false, 0, false, 1e-3, 1e-2, 1 - 1e-3},
      {"fp8 mla mtp", PrecisionMode::kFp8, true, 1, false, 2e-3, 2e-2, 0.999},
      {"fp8 mla mtp emulated", PrecisionMode::kFp8, true, 1, false, 2e-3, 2e-2, 0.999, false},
      {"bf16 gqa emulated", PrecisionMode::kBf16, false, 0, false, 1e-4, 1e-3, 1 - 1e-4, false},
  };
  for (const ModelCase& c : cases) {
    SCOPED_TRACE(c.name);
    ModelDims d = ops_step_dims(c.pm, c.mla, c.mtp, 32);
    d.native_gemm = c.native_gemm;
    const OpsStepOut cpu = run_step(d, Device::kCpu, c.split);
    const OpsStepOut gpu = run_step(d, Device::kCuda, c.split);
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
  const ModelDims d = ops_step_dims(PrecisionMode::kFp8, true, 1, 32);
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

// cuBLASLt's FP8 GEMMs take widths in multiples of 16 only: a model with another width is
// refused when it is built, naming the layer, where the native path would run it; the FP32
// emulation (precision.native_gemm = false) still builds it.
TEST(CudaModel, Fp8WidthsTheGemmCannotTakeAreRefusedAtBuild) {
  SKIP_WITHOUT_GPU();
  ModelDims d = ops_step_dims(PrecisionMode::kFp8, true, 1, 32);
  bool native = false;
  {
    Model<float> m;
    model_build<float>(m, d, 2, 1, 1, {}, 1, false, Device::kCuda);
    native = m.ops->gemm_fp8_native();
  }
  d.FE = 72;  // the routed experts' w2 takes 72 columns
  {
    Model<float> m;
    if (native) {
      try {
        model_build<float>(m, d, 2, 1, 1, {}, 1, false, Device::kCuda);
        ADD_FAILURE() << "built an FP8 model cuBLASLt cannot run";
      } catch (const UserError& e) {
        EXPECT_NE(std::string(e.what()).find("moe/experts/w2 has in_features = 72"),
                  std::string::npos) << e.what();
      }
    } else {
      EXPECT_NO_THROW(model_build<float>(m, d, 2, 1, 1, {}, 1, false, Device::kCuda));
    }
  }
  d.native_gemm = false;
  Model<float> m;
  EXPECT_NO_THROW(model_build<float>(m, d, 2, 1, 1, {}, 1, false, Device::kCuda));
}

}  // namespace
}  // namespace moe
