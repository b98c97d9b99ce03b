// The trainer with expert and pipeline parallelism when the model's memory is a device's, proven
// on the CPU under mpirun: every device arena is guarded (tests/guarded_ops.h), so the expert
// exchange must run its device path (rows touched only by the backend and the EP group's
// device twin, here a guarded MPI communicator), the pipeline must move rows through its host
// staging buffers, and the ZeRO-1 groups must touch parameters and gradients only inside
// their (guarded) calls, as NCCL does on a GPU. Two steps and an eval run bit-identical to the
// unguarded trainer, whose exchange takes the host path: the device path gives the same bits,
// in the float wire and in FP8 dispatch / BF16 combine.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "parallel/grid.h"
#include "tests/guarded_comm.h"
#include "tests/guarded_train.h"
#include "tests/train_fixture.h"
#include "trainer/train_step.h"

namespace moe {
namespace {

// Two steps and an eval; with `guarded`, the state is turned into a device-memory one after
// init: guarded backends, the exchange on its device path (StateGuard), and the ZeRO-1 groups
// behind guarded communicators (the reduction after backward, so no MPI request on guarded
// memory is in flight while another group's call progresses it).
enum class Mode { kPlain, kGuardedTicked, kGuardedStaged };

TrainRunOut run(const Config& cfg, const ProcessGrid& grid, Mode mode) {
  TrainState s;
  train_state_init(s, cfg, &grid);
  s.overlap_reduction = false;
  std::unique_ptr<StateGuard> g;
  std::vector<std::unique_ptr<GuardedComm>> comms;  // after g: they go first
  if (mode != Mode::kPlain) {
    g = std::make_unique<StateGuard>(s, mode == Mode::kGuardedTicked);
    for (int k = 0; k < 2; ++k) {
      if (!s.regions[k].comm) continue;
      comms.push_back(std::make_unique<GuardedComm>(*s.regions[k].comm, g->pages));
      s.regions[k].comm = comms.back().get();
      s.reducer.regions[static_cast<size_t>(k)].comm = comms.back().get();
    }
    g->pages.arm();
  }
  const BatchSource src = train_fixture_batches(s.model.d.T, s.model.d.V);
  TrainRunOut o;
  for (int64_t step = 0; step < 2; ++step) o.stats.push_back(train_step(s, step, src));
  o.val = eval_loss(s, 2, src);
  train_run_download_params(s, o);
  return o;
}

TEST(TrainStaged, ExpertAndPipelineParallelOnDeviceMemory) {
  ASSERT_EQ(mpi_world_size(), 4) << "run under mpirun -np 4";
  const std::vector<std::string> base = {"model.n_layers=4", "training.global_batch=8",
                                         "training.micro_batch=1"};
  auto with = [&](std::vector<std::string> o) {
    o.insert(o.end(), base.begin(), base.end());
    return o;
  };
  // (layout, also through the staged pipeline): the pipeline layouts run ticked (NCCL's way)
  // and one also staged (a build without NCCL). pp 4 DualPipe needs receives posted early and
  // sends held back (parallel/pipeline_ticks.h).
  const std::vector<std::pair<std::vector<std::string>, bool>> layouts = {
      {{"parallel.dp=4", "parallel.ep=2", "training.global_batch=8", "training.micro_batch=2"}, false},
      {with({"parallel.dp=2", "parallel.ep=2", "parallel.pp=2", "parallel.schedule=\"1f1b\""}), true},
      {with({"parallel.dp=2", "parallel.ep=2", "parallel.pp=2", "parallel.schedule=\"dualpipe\"",
             "precision.dispatch_fp8=true"}), false},
      {with({"parallel.dp=1", "parallel.pp=4", "parallel.schedule=\"dualpipe\""}), false},
      {with({"parallel.dp=2", "parallel.ep=2", "parallel.pp=2", "parallel.schedule=\"dualpipev\""}), false},
  };
  for (const auto& [layout, staged_too] : layouts) {
    std::string name;
    for (const std::string& o : layout) name += o + " ";
    SCOPED_TRACE(name);
    const Config cfg = train_fixture_config("fp8", "fp32", 0, layout);
    const ProcessGrid grid = grid_build(cfg);
    const TrainRunOut plain = run(cfg, grid, Mode::kPlain);
    expect_same_run(plain, run(cfg, grid, Mode::kGuardedTicked));
    if (staged_too) expect_same_run(plain, run(cfg, grid, Mode::kGuardedStaged));
  }
}

}  // namespace
}  // namespace moe
