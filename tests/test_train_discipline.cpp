// The trainer reaches the training state's device memory (parameters, gradients, Adam moments,
// gradient shards, activations) only through its backends (model/ops.h, optim/optim_ops.h),
// proven on the CPU with tests/guarded_ops.h: whole optimizer steps, a checkpoint save and a
// load into a guarded state run bit-identical to the unguarded trainer, so on a GPU the same
// code reads and writes no device pointer from the host.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "tests/guarded_train.h"
#include "tests/train_fixture.h"
#include "trainer/train_checkpoint.h"
#include "trainer/train_step.h"

namespace moe {
namespace {

// Two steps, a save, a load of that save, two more steps and an eval; the state's
// device arenas guarded throughout when `guarded`.
TrainRunOut run(const Config& cfg, bool guarded, const std::string& ckpt) {
  TrainState s;
  train_state_init(s, cfg, nullptr);
  std::unique_ptr<StateGuard> g;
  if (guarded) {
    g = std::make_unique<StateGuard>(s);
    g->pages.arm();
  }
  const BatchSource src = train_fixture_batches(s.model.d.T, s.model.d.V);
  TrainRunOut o;
  for (int64_t step = 0; step < 2; ++step) o.stats.push_back(train_step(s, step, src));
  RunPosition pos;
  pos.step = 2;
  checkpoint_save(s, pos, ckpt);
  // Scramble what the load must restore, through the backend, before loading.
  s.model.ops->zero(s.model.params, s.model.n_alloc * sizeof(float));
  s.model.ops->zero(s.opt_arena.data(), s.opt_arena.bytes());
  const CheckpointInfo info = checkpoint_load(s, ckpt);
  EXPECT_EQ(info.pos.step, 2);
  for (int64_t step = 2; step < 4; ++step) o.stats.push_back(train_step(s, step, src));
  o.val = eval_loss(s, 2, src);
  train_run_download_params(s, o);
  return o;
}

struct Case {
  const char* precision;
  const char* state_dtype;
  int mtp;
};

TEST(TrainDiscipline, StepsCheckpointAndEvalTouchDeviceMemoryOnlyThroughBackends) {
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("train_discipline_" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  const Case cases[] = {{"fp32", "fp32", 0}, {"bf16", "bf16", 1}, {"fp8", "fp32", 0}};
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(c.precision) + " state " + c.state_dtype);
    const Config cfg = train_fixture_config(c.precision, c.state_dtype, c.mtp);
    const TrainRunOut plain = run(cfg, false, (dir / "plain.h5").string());
    const TrainRunOut guarded = run(cfg, true, (dir / "guarded.h5").string());
    expect_same_run(plain, guarded);
    // The steps trained: the loss moved.
    EXPECT_NE(plain.stats[0].loss, plain.stats[3].loss);
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace moe
