// A training state turned into a device-memory one on the CPU (tests/guarded_ops.h over every
// device arena of a TrainState), and the comparison of a guarded run with a plain one.
// Shared by the trainer's discipline test and its mpirun twin with expert and pipeline
// parallelism.
#pragma once

#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <vector>

#include "parallel/grid.h"
#include "tests/guarded_comm.h"
#include "tests/guarded_ops.h"
#include "trainer/train_step.h"

namespace moe {

// Puts every device arena of a built state under one guard: the model's backend and the
// optimizer's forward to the CPU ones with the pages open only during their calls, and the
// expert exchange takes its device path (parallel/expert_dispatch_device.h) through the
// guarded backend and a guarded twin of the EP group, its own buffers guarded too. With
// `ticked_pipeline`, the pipeline sends its messages in ticks (as on NCCL) over a guarded twin
// of the replica's pipeline group, straight between the guarded arenas (its gradient buffer
// guarded too); else it stages them through its host buffers over MPI (a build without NCCL).
// Declared after the state, so it opens the pages before the state frees them.
struct StateGuard {
  explicit StateGuard(TrainState& s, bool ticked_pipeline = true) {
    Model<float>& m = s.model;
    for (const Arena* a : {&m.param_arena, &m.grad_arena, &m.act_arena, &m.work_arena,
                           &m.gemm_arena, &s.opt_arena})
      pages.guard(*a);
    m.ops = std::make_unique<GuardedOps<float>>(std::move(m.ops), pages);
    s.optim = std::make_unique<GuardedOptimOps>(std::move(s.optim), pages);
    if (s.exchange) {
      ep = std::make_unique<GuardedComm>(*s.grid->ep_comm, pages, true);
      s.exchange->set_device(*m.ops, *ep, Device::kCpu);
      pages.guard(s.exchange->device_arena());
    }
    if (s.pipe && ticked_pipeline) {
      pp = std::make_unique<GuardedComm>(*s.grid->pp_comm, pages, true);
      pipeline_set_p2p(*s.pipe, pp.get(), Device::kCpu);
      pages.guard(s.pipe->grad_arena);
    }
    // Nearly all of the device memory is under guard (the test is not vacuous).
    const size_t total = m.param_arena.bytes() + m.grad_arena.bytes() + m.act_arena.bytes() +
                         m.work_arena.bytes() + m.gemm_arena.bytes() + s.opt_arena.bytes();
    EXPECT_GT(static_cast<double>(pages.guarded_bytes()), 0.9 * static_cast<double>(total));
  }
  ~StateGuard() { pages.disarm(); }
  PageGuard pages;
  std::unique_ptr<GuardedComm> ep;  // the EP group's stand-in device twin
  std::unique_ptr<GuardedComm> pp;  // the pipeline group's
};

// What a run produced: per-step stats, the final parameters (downloaded) and an eval loss.
struct TrainRunOut {
  std::vector<StepStats> stats;
  std::vector<float> params;
  double val = 0;
};

inline void train_run_download_params(TrainState& s, TrainRunOut& o) {
  o.params.resize(s.model.n_alloc);
  s.model.ops->download(o.params.data(), s.model.params, o.params.size() * sizeof(float));
}

// The guarded run equals the plain one bit for bit, and the plain one trained.
inline void expect_same_run(const TrainRunOut& plain, const TrainRunOut& guarded) {
  ASSERT_EQ(plain.stats.size(), guarded.stats.size());
  for (size_t i = 0; i < plain.stats.size(); ++i) {
    EXPECT_EQ(plain.stats[i].loss, guarded.stats[i].loss) << "step " << i;
    EXPECT_EQ(plain.stats[i].grad_norm, guarded.stats[i].grad_norm) << "step " << i;
    EXPECT_EQ(plain.stats[i].imbalance, guarded.stats[i].imbalance) << "step " << i;
  }
  EXPECT_EQ(plain.val, guarded.val);
  ASSERT_EQ(plain.params.size(), guarded.params.size());
  EXPECT_EQ(0, std::memcmp(plain.params.data(), guarded.params.data(),
                           plain.params.size() * sizeof(float)));
  EXPECT_GT(plain.stats[0].grad_norm, 0.0);
}

}  // namespace moe
