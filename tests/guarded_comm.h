// A communicator whose calls run with a PageGuard's pages open: the stand-in, on the CPU, for
// a device communicator (NCCL), the only code besides the backend that may touch device
// memory. Shared by the trainer's guarded tests and the device expert-dispatch test.
#pragma once

#include <string>

#include "parallel/comm.h"
#include "tests/guarded_ops.h"

namespace moe {

// With complete_at_start, every *_start call also waits for its operation (with the pages
// open) and returns an inactive request: MPI may otherwise move a started operation's bytes
// inside any later MPI call, another communicator's included, with the pages closed.
class GuardedComm final : public Comm {
 public:
  GuardedComm(Comm& inner, PageGuard& g, bool complete_at_start = false)
      : in_(inner), g_(g), complete_(complete_at_start) {}
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
  CommRequest p2p_group_start(const P2pTransfer* t, int n) override {
    return ret([&] { return in_.p2p_group_start(t, n); });
  }
  void barrier() override { g_.run([&] { in_.barrier(); }); }

 private:
  template <typename F>
  CommRequest ret(const F& f) {
    CommRequest q;
    g_.run([&] {
      q = f();
      if (complete_) in_.wait(q);
    });
    return q;
  }
  Comm& in_;
  PageGuard& g_;
  bool complete_;
};

}  // namespace moe
