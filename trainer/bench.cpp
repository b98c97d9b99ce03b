#include "trainer/bench.h"
#include "trainer/progress.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include "io/config_model.h"
#include "model/check.h"
#include "model/kernels/cpu/dense_ops.h"
#include "model/rng.h"
#include "parallel/grid.h"
#include "trainer/train_step.h"

namespace moe {

double sgemm_peak_flops(bool quick) {
  double best = 0;
  const std::vector<int64_t> sizes = quick ? std::vector<int64_t>{1024} : std::vector<int64_t>{512, 1024, 2048};
  for (int64_t n : sizes) {
    std::vector<float> a(static_cast<size_t>(n * n)), b(a.size()), c(a.size());
    for (size_t i = 0; i < a.size(); ++i) {
      a[i] = static_cast<float>(rng_uniform(1, 1, i) - 0.5);
      b[i] = static_cast<float>(rng_uniform(1, 2, i) - 0.5);
    }
    cpu::gemm<float>(false, true, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
    const int reps = quick ? 3 : n >= 2048 ? 3 : 8;
    for (int r = 0; r < reps; ++r) {
      const double t0 = now_s();
      cpu::gemm<float>(false, true, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
      const double dt = now_s() - t0;
      best = std::max(best, 2.0 * static_cast<double>(n) * n * n / dt);
    }
  }
  return best;
}

int bench_main(const Config& cfg, const BenchOptions& opt) {
  CHECK(opt.steps >= 1);
  // The peak is measured before and after the timed steps and the higher one is used, so a
  // busy moment during one measurement cannot inflate the MFU.
  double peak = sgemm_peak_flops();
  const ProcessGrid grid = grid_build(cfg);
  grid_check_consistent(grid, cfg);
  TrainState s;
  train_state_init(s, cfg, &grid);
  const int64_t T_ = s.model.d.T;
  const int vocab = cfg.model.vocab_size;
  // Synthetic tokens: the bench measures compute, so it needs no data files.
  BatchSource source = [&](int32_t* out, int64_t step, int64_t first, int64_t n) {
    for (int64_t i = 0; i < n * (T_ + 1); ++i)
      out[i] = static_cast<int32_t>(
          rng_u64(cfg.run.seed, rng_stream(RngPurpose::kData, static_cast<uint64_t>(step)),
                  static_cast<uint64_t>(first * (T_ + 1) + i)) %
          static_cast<uint64_t>(vocab));
  };
  train_step(s, 0, source);  // warm-up: first touch of every arena page
  const double t0 = now_s();
  for (int i = 1; i <= opt.steps; ++i) train_step(s, i, source);
  const double dt = (now_s() - t0) / opt.steps;
  // With several ranks on one machine each measures a share of the cores; the machine's
  // peak is the sum, which is what MFU must be taken against.
  peak = std::max(peak, sgemm_peak_flops());
  if (grid.world) grid.world->all_reduce_sum(&peak, 1);
  if (!grid.is_root()) return 0;
  const double tokens = static_cast<double>(cfg.training.global_batch) * static_cast<double>(T_);
  const double tps = tokens / dt;
  const double fpt = model_flops_per_token(s.model.d);
  const double mfu = tps * fpt / peak;
  const ModelCounts counts = model_counts(s.model.d);
  if (opt.json) {
    std::printf(
        "{\"config\": \"%s\", \"threads\": %d, \"peak_flops\": %.6g, \"step_s\": %.6g, "
        "\"tokens_per_s\": %.6g, \"flops_per_token\": %.6g, \"mfu\": %.6f, "
        "\"params_total\": %lld, \"params_active\": %lld, \"steps\": %d, \"ranks\": %d}\n",
        cfg.source.c_str(), omp_get_max_threads(), peak, dt, tps, fpt, mfu,
        static_cast<long long>(counts.total), static_cast<long long>(counts.active_matmul),
        opt.steps, grid.world_size);
  } else {
    std::printf("bench %s: %d rank%s x %d threads\n", cfg.source.c_str(), grid.world_size,
                grid.world_size > 1 ? "s" : "", omp_get_max_threads());
    std::printf("  sgemm peak (OpenBLAS, measured): %.1f GFLOP/s\n", peak / 1e9);
    std::printf("  step: %.3f s for %.0f tokens -> %.0f tokens/s\n", dt, tokens, tps);
    std::printf("  model FLOPs/token: %.4g (6 x %lld active + attention)\n", fpt,
                static_cast<long long>(counts.active_matmul));
    std::printf("  achieved: %.1f GFLOP/s  MFU: %.1f%%\n", tps * fpt / 1e9, 100.0 * mfu);
  }
  return 0;
}

}  // namespace moe
