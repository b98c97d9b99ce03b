// The model reaches its device memory only through its Ops backend (model/ops.h), proven on
// the CPU: a backend that forwards to the CPU one but keeps the model's device arenas
// (parameters, gradients, activations, GEMM weights and workspace) unreadable
// (mprotect PROT_NONE) except while one of its calls runs. A host read or write of device
// memory anywhere in init, forward, backward or weight quantization then faults, which is
// exactly what such an access would do to a cudaMalloc'd pointer on a GPU run (there the
// failure would be a crash or garbage; here it is a test failure on every CI run).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "model/model.h"
#include "tests/guarded_ops.h"
#include "tests/ops_model_step.h"

namespace moe {
namespace {

// One step (tests/ops_model_step.h) on a model whose device arenas are guarded when
// `guarded`.
// native_bf16: the CPU backend in its native-BF16 mode (model/ops.h), so the linear layers
// take the path a GPU's tensor cores take (weights as bits, gemm_bf16).
OpsStepOut one_step(const ModelDims& d, bool split, bool guarded, bool native_bf16 = false) {
  const int64_t B = 2;
  Model<float> m;
  model_build<float>(m, d, B, 1, 1, {}, 1, split);
  if (native_bf16) m.ops = ops_cpu_create<float>(true);
  std::unique_ptr<Guard> g;
  if (guarded) {
    g = std::make_unique<Guard>(m);
    // Nearly all of the device memory is under guard (the test is not vacuous).
    const size_t total = m.param_arena.bytes() + m.grad_arena.bytes() + m.act_arena.bytes() +
                         m.work_arena.bytes() + m.gemm_arena.bytes();
    EXPECT_GT(static_cast<double>(g->pages.guarded_bytes()), 0.9 * static_cast<double>(total));
    g->pages.arm();
  }
  return ops_model_step(m, B, split, 7);
}

struct DisciplineCase {
  const char* name;
  PrecisionMode pm;
  bool mla;
  int64_t mtp;
  bool split;
  bool native_bf16 = false;
};

TEST(OpsDiscipline, ModelTouchesDeviceMemoryOnlyThroughItsBackend) {
  const DisciplineCase cases[] = {
      {"fp32 gqa", PrecisionMode::kFp32, false, 0, false},
      {"bf16 gqa split", PrecisionMode::kBf16, false, 0, true},
      {"fp8 mla mtp", PrecisionMode::kFp8, true, 1, false},
      {"fp8 mla mtp split", PrecisionMode::kFp8, true, 1, true},
      {"bf16 gqa split native", PrecisionMode::kBf16, false, 0, true, true},
      {"bf16 mla mtp native", PrecisionMode::kBf16, true, 1, false, true},
  };
  for (const DisciplineCase& c : cases) {
    SCOPED_TRACE(c.name);
    const ModelDims d = ops_step_dims(c.pm, c.mla, c.mtp, 16);
    const OpsStepOut plain = one_step(d, c.split, false, c.native_bf16);
    const OpsStepOut guarded = one_step(d, c.split, true, c.native_bf16);
    EXPECT_EQ(plain.loss, guarded.loss);
    ASSERT_EQ(plain.grads.size(), guarded.grads.size());
    EXPECT_EQ(0, std::memcmp(plain.grads.data(), guarded.grads.data(),
                             plain.grads.size() * sizeof(float)));
    double norm = 0;
    for (float v : plain.grads) norm += static_cast<double>(v) * v;
    EXPECT_GT(norm, 0.0);
  }
}

// The native BF16 path through the whole model (every linear of GQA, MLA, the experts and
// the MTP module) against the emulation: the same numbers up to the FP32 summation order of
// the routed experts' GEMMs, which the emulation makes independent of the row count
// (gemm_rows_invariant) and the native path does not.
TEST(OpsDiscipline, NativeBf16ModelMatchesTheEmulation) {
  for (bool mla : {false, true}) {
    SCOPED_TRACE(mla ? "mla mtp" : "gqa");
    const ModelDims d = ops_step_dims(PrecisionMode::kBf16, mla, mla ? 1 : 0, 16);
    const OpsStepOut emulated = one_step(d, false, false, false);
    const OpsStepOut native = one_step(d, false, false, true);
    EXPECT_NEAR(native.loss, emulated.loss, 1e-6 * std::fabs(emulated.loss));
    ASSERT_EQ(native.grads.size(), emulated.grads.size());
    double worst = 0, scale = 0;
    for (size_t i = 0; i < native.grads.size(); ++i) {
      worst = std::max(worst, std::fabs(double(native.grads[i]) - emulated.grads[i]));
      scale = std::max(scale, std::fabs(double(emulated.grads[i])));
    }
    EXPECT_GT(scale, 0.0);
    EXPECT_LE(worst, 1e-6 * scale);  // seen: 1.5e-8 of 0.2
  }
}

// The guard catches what it claims to: a host read of a guarded parameter faults.
TEST(OpsDisciplineDeathTest, HostReadOfDeviceMemoryFaults) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const ModelDims d = ops_step_dims(PrecisionMode::kFp32, false, 0, 16);
  EXPECT_DEATH(
      {
        Model<float> m;
        model_build<float>(m, d, 2);
        Guard g(m);
        g.pages.arm();
        volatile float v = m.params[m.n_alloc / 2];
        (void)v;
      },
      "");
}

}  // namespace
}  // namespace moe
