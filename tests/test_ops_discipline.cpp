// The model reaches its device memory only through its Ops backend (model/ops.h), proven on
// the CPU: a backend that forwards to the CPU one but keeps the model's device arenas
// (parameters, gradients, activations, GEMM weights and workspace) unreadable
// (mprotect PROT_NONE) except while one of its calls runs. A host read or write of device
// memory anywhere in init, forward, backward or weight quantization then faults, which is
// exactly what such an access would do to a cudaMalloc'd pointer on a GPU run (there the
// failure would be a crash or garbage; here it is a test failure on every CI run).
#include <gtest/gtest.h>

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
OpsStepOut one_step(const ModelDims& d, bool split, bool guarded) {
  const int64_t B = 2;
  Model<float> m;
  model_build<float>(m, d, B, 1, 1, {}, 1, split);
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
};

TEST(OpsDiscipline, ModelTouchesDeviceMemoryOnlyThroughItsBackend) {
  const DisciplineCase cases[] = {
      {"fp32 gqa", PrecisionMode::kFp32, false, 0, false},
      {"bf16 gqa split", PrecisionMode::kBf16, false, 0, true},
      {"fp8 mla mtp", PrecisionMode::kFp8, true, 1, false},
      {"fp8 mla mtp split", PrecisionMode::kFp8, true, 1, true},
  };
  for (const DisciplineCase& c : cases) {
    SCOPED_TRACE(c.name);
    const ModelDims d = ops_step_dims(c.pm, c.mla, c.mtp, 16);
    const OpsStepOut plain = one_step(d, c.split, false);
    const OpsStepOut guarded = one_step(d, c.split, true);
    EXPECT_EQ(plain.loss, guarded.loss);
    ASSERT_EQ(plain.grads.size(), guarded.grads.size());
    EXPECT_EQ(0, std::memcmp(plain.grads.data(), guarded.grads.data(),
                             plain.grads.size() * sizeof(float)));
    double norm = 0;
    for (float v : plain.grads) norm += static_cast<double>(v) * v;
    EXPECT_GT(norm, 0.0);
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
