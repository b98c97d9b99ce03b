// `moetrain bench --precision`: the cost of the BF16 / FP8 GEMM inputs over FP32 and the
// activation memory of each mode, in one run. On CPU both are emulations (the quantized
// inputs are rounded floats fed to the FP32 GEMM), so they can only cost time; the ratio
// says how well the quantization is fused and vectorized.
#include <omp.h>

#include <cstdio>
#include <vector>

#include "io/config_model.h"
#include "model/check.h"
#include "trainer/bench.h"
#include "trainer/progress.h"
#include "trainer/train_step.h"

namespace moe {

int bench_precision_main(const Config& base, const BenchOptions& opt) {
  CHECK(opt.steps >= 1);
  const PrecisionMode modes[3] = {PrecisionMode::kFp32, PrecisionMode::kBf16, PrecisionMode::kFp8};
  std::vector<TrainState> states(3);
  for (int i = 0; i < 3; ++i) {
    Config cfg = base;
    cfg.precision.mode = modes[i];
    train_state_init(states[static_cast<size_t>(i)], cfg);
  }
  const BatchSource source = bench_synthetic_batches(base);
  for (TrainState& s : states) train_step(s, 0, source);  // warm-up: first touch of the arenas
  // Round robin, so a busy moment of the machine slows every mode alike; the best step of
  // each is its figure (the least disturbed).
  double best[3] = {1e30, 1e30, 1e30}, sum[3] = {0, 0, 0};
  for (int r = 1; r <= opt.steps; ++r)
    for (int i = 0; i < 3; ++i) {
      const double t0 = now_s();
      train_step(states[static_cast<size_t>(i)], r, source);
      const double dt = now_s() - t0;
      best[i] = dt < best[i] ? dt : best[i];
      sum[i] += dt;
    }
  size_t act[3], gemm_weights[3], workspace[3];
  for (int i = 0; i < 3; ++i) {
    const Model<float>& m = states[static_cast<size_t>(i)].model;
    act[i] = model_activation_bytes(m.d, base.training.micro_batch, sizeof(float),
                                    states[static_cast<size_t>(i)].device);
    gemm_weights[i] = m.gemm_arena.bytes();
    workspace[i] = m.work_arena.bytes();
  }
  const double cost[2] = {best[1] / best[0] - 1, best[2] / best[0] - 1};
  if (opt.json) {
    std::printf("{\"config\": \"%s\", \"threads\": %d, \"steps\": %d, \"micro_batch\": %lld, "
                "\"step_s\": {\"fp32\": %.6g, \"bf16\": %.6g, \"fp8\": %.6g}, "
                "\"step_mean_s\": {\"fp32\": %.6g, \"bf16\": %.6g, \"fp8\": %.6g}, "
                "\"cost_over_fp32\": {\"bf16\": %.4f, \"fp8\": %.4f}, "
                "\"activation_bytes\": {\"fp32\": %zu, \"bf16\": %zu, \"fp8\": %zu}, "
                "\"gemm_weight_bytes\": {\"fp32\": %zu, \"bf16\": %zu, \"fp8\": %zu}, "
                "\"workspace_bytes\": {\"fp32\": %zu, \"bf16\": %zu, \"fp8\": %zu}}\n",
                base.source.c_str(), omp_get_max_threads(), opt.steps,
                static_cast<long long>(base.training.micro_batch), best[0], best[1], best[2],
                sum[0] / opt.steps, sum[1] / opt.steps, sum[2] / opt.steps, cost[0], cost[1],
                act[0], act[1], act[2], gemm_weights[0], gemm_weights[1], gemm_weights[2],
                workspace[0], workspace[1], workspace[2]);
    return 0;
  }
  std::printf("bench --precision %s: 1 rank x %d threads, best of %d steps each (round robin)\n",
              base.source.c_str(), omp_get_max_threads(), opt.steps);
  for (int i = 0; i < 3; ++i)
    std::printf("  %-4s step %.3f s (mean %.3f)  activations per micro-batch of %lld: %.1f MiB"
                " (%.1f%% of fp32)  GEMM weight copy %.1f MiB, workspace %.1f MiB\n",
                to_string(modes[i]), best[i], sum[i] / opt.steps,
                static_cast<long long>(base.training.micro_batch),
                static_cast<double>(act[i]) / (1 << 20),
                100.0 * static_cast<double>(act[i]) / static_cast<double>(act[0]),
                static_cast<double>(gemm_weights[i]) / (1 << 20),
                static_cast<double>(workspace[i]) / (1 << 20));
  std::printf("  cost over fp32: bf16 %+.1f%%, fp8 %+.1f%% of the step\n", 100 * cost[0],
              100 * cost[1]);
  return 0;
}

}  // namespace moe
