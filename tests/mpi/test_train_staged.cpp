// The trainer with expert and pipeline parallelism when the model's memory is a device's, proven
// on the CPU under mpirun: every device arena is guarded (tests/guarded_ops.h), so the expert
// exchange and the pipeline must move rows through their host staging buffers and the ZeRO-1
// groups must touch parameters and gradients only inside their (here: guarded MPI) calls, as
// NCCL does on a GPU. Two steps and an eval run bit-identical to the unguarded trainer.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "parallel/grid.h"
#include "tests/guarded_train.h"
#include "tests/train_fixture.h"
#include "trainer/train_step.h"

namespace moe {
namespace {

// A communicator whose calls run with the guard's pages open: the stand-in for a device
// communicator (NCCL), the only other code that may touch device memory.
class GuardedComm final : public Comm {
 public:
  GuardedComm(Comm& inner, PageGuard& g) : in_(inner), g_(g) {}
  int rank() const override { return in_.rank(); }
  int size() const override { return in_.size(); }
  const std::string& name() const override { return in_.name(); }
  void all_reduce_sum(float* d, int64_t n) override { g_.run([&] { in_.all_reduce_sum(d, n); }); }
  void all_reduce_sum(double* d, int64_t n) override { g_.run([&] { in_.all_reduce_sum(d, n); }); }
  void all_reduce_sum(int64_t* d, int64_t n) override { g_.run([&] { in_.all_reduce_sum(d, n); }); }
  void all_reduce_max(double* d, int64_t n) override { g_.run([&] { in_.all_reduce_max(d, n); }); }
  CommRequest all_reduce_sum_start(float* d, int64_t n) override {
    return ret([&] { return in_.all_reduce_sum_start(d, n); });
  }
  CommRequest reduce_scatter_sum_start(float* r, const float* s, const int* c) override {
    return ret([&] { return in_.reduce_scatter_sum_start(r, s, c); });
  }
  bool test(CommRequest& q) override {
    bool b = false;
    g_.run([&] { b = in_.test(q); });
    return b;
  }
  void wait(CommRequest& q) override { g_.run([&] { in_.wait(q); }); }
  void reduce_scatter_sum(float* r, const float* s, int64_t n) override {
    g_.run([&] { in_.reduce_scatter_sum(r, s, n); });
  }
  void reduce_sum(float* r, const float* s, int64_t n, int root) override {
    g_.run([&] { in_.reduce_sum(r, s, n, root); });
  }
  void all_gather(float* r, const float* s, int64_t n) override {
    g_.run([&] { in_.all_gather(r, s, n); });
  }
  CommRequest all_to_all_v_start(const void* s, const int* sb, const int* sd, void* r,
                                 const int* rb, const int* rd) override {
    return ret([&] { return in_.all_to_all_v_start(s, sb, sd, r, rb, rd); });
  }
  CommRequest all_to_all_start(const int64_t* s, int64_t* r, int64_t n) override {
    return ret([&] { return in_.all_to_all_start(s, r, n); });
  }
  void broadcast(void* d, size_t b, int root) override { g_.run([&] { in_.broadcast(d, b, root); }); }
  void send(const void* d, size_t b, int p, int t) override { g_.run([&] { in_.send(d, b, p, t); }); }
  void recv(void* d, size_t b, int p, int t) override { g_.run([&] { in_.recv(d, b, p, t); }); }
  CommRequest send_start(const void* d, size_t b, int p, int t) override {
    return ret([&] { return in_.send_start(d, b, p, t); });
  }
  CommRequest recv_start(void* d, size_t b, int p, int t) override {
    return ret([&] { return in_.recv_start(d, b, p, t); });
  }
  void barrier() override { g_.run([&] { in_.barrier(); }); }

 private:
  template <typename F>
  CommRequest ret(const F& f) {
    CommRequest q;
    g_.run([&] { q = f(); });
    return q;
  }
  Comm& in_;
  PageGuard& g_;
};

// Two steps and an eval; with `guarded`, the state is turned into a device-memory one after
// init: guarded backends, the exchange staging through the guarded backend, and the ZeRO-1
// groups behind guarded communicators (the reduction after backward, so no MPI request on
// guarded memory is in flight while another group's call progresses it).
TrainRunOut run(const Config& cfg, const ProcessGrid& grid, bool guarded) {
  TrainState s;
  train_state_init(s, cfg, &grid);
  s.overlap_reduction = false;
  std::unique_ptr<StateGuard> g;
  std::vector<std::unique_ptr<GuardedComm>> comms;  // after g: they go first
  if (guarded) {
    g = std::make_unique<StateGuard>(s);
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

TEST(TrainStaged, ExpertAndPipelineParallelRunThroughDeviceStaging) {
  ASSERT_EQ(mpi_world_size(), 4) << "run under mpirun -np 4";
  const std::vector<std::vector<std::string>> layouts = {
      {"parallel.dp=4", "parallel.ep=2", "training.global_batch=8", "training.micro_batch=2"},
      {"parallel.dp=2", "parallel.ep=2", "parallel.pp=2", "parallel.schedule=\"1f1b\"",
       "model.n_layers=4", "training.global_batch=8", "training.micro_batch=1"},
      {"parallel.dp=2", "parallel.ep=2", "parallel.pp=2", "parallel.schedule=\"dualpipe\"",
       "model.n_layers=4", "training.global_batch=8", "training.micro_batch=1"},
  };
  for (const std::vector<std::string>& layout : layouts) {
    std::string name;
    for (const std::string& o : layout) name += o + " ";
    SCOPED_TRACE(name);
    const Config cfg = train_fixture_config("fp8", "fp32", 0, layout);
    const ProcessGrid grid = grid_build(cfg);
    const TrainRunOut plain = run(cfg, grid, false);
    const TrainRunOut guarded = run(cfg, grid, true);
    expect_same_run(plain, guarded);
  }
}

}  // namespace
}  // namespace moe
