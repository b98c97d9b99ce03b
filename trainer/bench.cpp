#include "trainer/bench.h"
#include "trainer/progress.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <utility>
#include <vector>

#include "io/config_model.h"
#include "model/check.h"
#include "model/kernels/cpu/dense_ops.h"
#include "model/rng.h"
#include "parallel/grid.h"
#include "trainer/train_device.h"
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

BatchSource bench_synthetic_batches(const Config& cfg) {
  const int64_t T_ = cfg.model.seq_len;
  const uint64_t vocab = static_cast<uint64_t>(cfg.model.vocab_size), seed = cfg.run.seed;
  return [T_, vocab, seed](int32_t* out, int64_t step, int64_t first, int64_t n) {
    for (int64_t i = 0; i < n * (T_ + 1); ++i)
      out[i] = static_cast<int32_t>(
          rng_u64(seed, rng_stream(RngPurpose::kData, static_cast<uint64_t>(step)),
                  static_cast<uint64_t>(first * (T_ + 1) + i)) % vocab);
  };
}

int bench_main(const Config& cfg, const BenchOptions& opt) {
  CHECK(opt.steps >= 1);
  const ProcessGrid grid = grid_build(cfg);
  grid_check_consistent(grid, cfg);
  const Device device = train_device_resolve(cfg, grid.is_root());
  const bool gpu = device == Device::kCuda;
  std::string device_name = "cpu";
  if (gpu) device_name = train_device_select();
  // The peak is measured before and after the timed steps and the higher one is used, so a
  // busy moment during one measurement cannot inflate the MFU. On a GPU: a large cuBLASLt
  // GEMM in BF16, or FP8 for FP8 training (the dense peak MFU is taken against).
  const bool fp8 = cfg.precision.mode == PrecisionMode::kFp8;
  std::string peak_kind = "sgemm";
  auto measure_peak = [&] { return gpu ? gpu_peak_flops(fp8, &peak_kind) : sgemm_peak_flops(); };
  double peak = measure_peak();
  TrainState s;
  train_state_init(s, cfg, &grid, device);
  const int64_t T_ = s.model.d.T;
  const BatchSource source = bench_synthetic_batches(cfg);
  train_step(s, 0, source);  // warm-up: first touch of every arena page
  // Timed steps, gradient reduction overlapped with backward (the trainer's default).
  s.reducer.wait_s = s.reducer.busy_s = 0;
  if (s.exchange) {
    s.exchange->reset_traffic();
    s.exchange->count_least_traffic(true);
  }
  const double t0 = now_s();
  // Pipeline: each rank's idle share of its op list (waiting for messages, or for the
  // schedule), the measured bubble; the largest over ranks is the step's.
  double pipe[3] = {0, 0, 0};  // wall, compute, receive waits, summed over steps
  // F&B pairs, overlapped [0..2] and one chunk after the other [3..5]: their time, their
  // time blocked on communication, and their number, summed over steps.
  double fb[6] = {0, 0, 0, 0, 0, 0};
  auto add_fb = [&](double* to) {
    to[0] += s.pipe->times.fb_wall;
    to[1] += s.pipe->times.fb_comm_wait;
    to[2] += s.pipe->times.fb_pairs;
  };
  for (int i = 1; i <= opt.steps; ++i) {
    train_step(s, i, source);
    if (s.pipe) {
      pipe[0] += s.pipe->times.wall;
      pipe[1] += s.pipe->times.compute;
      pipe[2] += s.pipe->times.recv_wait;
    }
  }
  s.model.ops->synchronize();  // a step's last kernels (the update) may still be queued
  const double dt = (now_s() - t0) / opt.steps;
  // Reduction time the step still pays: blocked at the end, plus starting and testing
  // requests during backward (with MPI, communication progresses inside those calls).
  double red[2] = {(s.reducer.wait_s + s.reducer.busy_s) / opt.steps, 0};
  EpTraffic traffic = s.exchange ? s.exchange->traffic() : EpTraffic{};
  const bool has_fb = s.pipe && s.pipe->plan.has_fb;
  if (has_fb) {
    // The same pairs with their chunks run one after the other have all of their
    // communication exposed; what the overlapped pairs did not wait for is what they hid.
    // Steps alternate between the two so a busy moment of the machine hits both alike.
    const bool was = s.pipe->overlap_fb;
    for (int i = 1; i <= 2 * opt.steps; ++i) {
      const bool overlapped = i % 2 == 0;
      s.pipe->overlap_fb = overlapped;
      train_step(s, 2 * opt.steps + i, source);
      add_fb(overlapped ? fb : fb + 3);
    }
    s.pipe->overlap_fb = was;
  }
  // Summed over ranks: the job's communication time inside pairs.
  if (grid.world && has_fb) grid.world->all_reduce_sum(fb, 6);
  const double fb_hidden = fb[4] > 0 ? std::max(0.0, 1.0 - fb[1] / fb[4]) : 0.0;
  const double fb_pair_s[2] = {fb[2] > 0 ? fb[0] / fb[2] : 0.0, fb[5] > 0 ? fb[3] / fb[5] : 0.0};
  const double fb_comm_share[2] = {fb[0] > 0 ? fb[1] / fb[0] : 0.0, fb[3] > 0 ? fb[4] / fb[3] : 0.0};
  double bubble[2] = {pipe[0] > 0 ? 1.0 - pipe[1] / pipe[0] : 0.0, pipe[2] / opt.steps};
  if (grid.world) grid.world->all_reduce_max(bubble, 2);
  if (grid.world) {
    // The same steps with the whole reduction after backward: its full, unhidden cost.
    s.overlap_reduction = false;
    s.reducer.wait_s = s.reducer.busy_s = 0;
    for (int i = 1; i <= opt.steps; ++i) train_step(s, opt.steps + i, source);
    red[1] = (s.reducer.wait_s + s.reducer.busy_s) / opt.steps;
    s.overlap_reduction = true;
    // The slowest rank sets the pace; traffic sums over ranks.
    grid.world->all_reduce_max(red, 2);
    int64_t t[3] = {traffic.tokens, traffic.rows_remote, traffic.rows_remote_min};
    grid.world->all_reduce_sum(t, 3);
    traffic = EpTraffic{t[0], t[1], t[2]};
  }
  const double hidden = red[1] > 0 ? std::max(0.0, 1.0 - red[0] / red[1]) : 0.0;
  // Dispatch bytes per routed token (per MoE layer), and the least the routing allows.
  const double row_bytes = static_cast<double>(ep_dispatch_row_bytes(
      s.exchange ? s.exchange->format() : EpWireFormat::kFloat, s.model.d.C));
  const double tok = std::max<double>(1, static_cast<double>(traffic.tokens));
  const double a2a = static_cast<double>(traffic.rows_remote) * row_bytes / tok;
  const double a2a_min = static_cast<double>(traffic.rows_remote_min) * row_bytes / tok;
  // With several ranks on one machine each measures a share of the cores; the machine's
  // peak is the sum, which is what MFU must be taken against.
  peak = std::max(peak, measure_peak());
  if (grid.world) grid.world->all_reduce_sum(&peak, 1);
  if (!grid.is_root()) return 0;
  const double tokens = static_cast<double>(cfg.training.global_batch) * static_cast<double>(T_);
  const double tps = tokens / dt;
  const double fpt = model_flops_per_token(s.model.d) + model_mtp_flops_per_token(s.model.d);
  const double mfu = tps * fpt / peak;
  const ModelCounts counts = model_counts(s.model.d);
  if (opt.json) {
    std::printf(
        "{\"config\": \"%s\", \"device\": \"%s\", \"peak_kind\": \"%s\", \"threads\": %d, "
        "\"peak_flops\": %.6g, \"step_s\": %.6g, "
        "\"tokens_per_s\": %.6g, \"flops_per_token\": %.6g, \"mfu\": %.6f, "
        "\"params_total\": %lld, \"params_active\": %lld, \"steps\": %d, \"ranks\": %d, "
        "\"dp\": %d, \"ep\": %d, \"reduction_exposed_s\": %.6g, \"reduction_blocking_s\": %.6g, "
        "\"reduction_hidden\": %.4f, \"a2a_bytes_per_token\": %.6g, "
        "\"a2a_min_bytes_per_token\": %.6g, \"pp\": %d, \"schedule\": \"%s\", "
        "\"pipe_bubble\": %.4f, \"pipe_recv_wait_s\": %.6g, \"fb_pair_s\": %.6g, "
        "\"fb_pair_sequential_s\": %.6g, \"fb_comm_share\": %.4f, "
        "\"fb_comm_share_sequential\": %.4f, \"fb_comm_hidden\": %.4f}\n",
        cfg.source.c_str(), device_name.c_str(), peak_kind.c_str(), omp_get_max_threads(), peak,
        dt, tps, fpt, mfu,
        static_cast<long long>(counts.total), static_cast<long long>(counts.active_matmul),
        opt.steps, grid.world_size, grid.dp, grid.ep, red[0], red[1], hidden, a2a, a2a_min,
        grid.pp, to_string(cfg.parallel.schedule), bubble[0], bubble[1], fb_pair_s[0],
        fb_pair_s[1], fb_comm_share[0], fb_comm_share[1], fb_hidden);
  } else {
    std::printf("bench %s: %d rank%s x %d threads on %s\n", cfg.source.c_str(), grid.world_size,
                grid.world_size > 1 ? "s" : "", omp_get_max_threads(), device_name.c_str());
    std::printf("  %s peak (%s, measured): %.1f GFLOP/s\n", peak_kind.c_str(),
                gpu ? "cuBLASLt" : "OpenBLAS", peak / 1e9);
    std::printf("  step: %.3f s for %.0f tokens -> %.0f tokens/s\n", dt, tokens, tps);
    std::printf("  model FLOPs/token: %.4g (6 x %lld active + attention)\n", fpt,
                static_cast<long long>(counts.active_matmul));
    std::printf("  achieved: %.1f GFLOP/s  MFU: %.1f%%\n", tps * fpt / 1e9, 100.0 * mfu);
    if (grid.world)
      std::printf("  gradient reduction per step: %.4f s exposed with overlap, %.4f s after "
                  "backward -> %.1f%% hidden\n", red[0], red[1], 100.0 * hidden);
    if (s.pipe)
      std::printf("  pipeline pp %d %s: bubble %.1f%% of the step on the idlest rank "
                  "(%.4f s per step waiting for messages)\n",
                  grid.pp, to_string(cfg.parallel.schedule), 100.0 * bubble[0], bubble[1]);
    if (has_fb)
      std::printf("  F&B pairs: %.4f s each overlapped, %.4f s one chunk after the other; "
                  "communication %.1f%% vs %.1f%% of their time -> %.1f%% of it hidden\n",
                  fb_pair_s[0], fb_pair_s[1], 100.0 * fb_comm_share[0],
                  100.0 * fb_comm_share[1], 100.0 * fb_hidden);
    if (s.exchange)
      std::printf("  expert dispatch: %.0f bytes per token per MoE layer to other ranks, "
                  "routing minimum %.0f (x%.2f)\n", a2a, a2a_min, a2a_min > 0 ? a2a / a2a_min : 0.0);
  }
  return 0;
}

}  // namespace moe
