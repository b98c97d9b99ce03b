// A communicator of one process on host memory: every collective is a copy to itself. The
// bootstrap of a one-GPU NCCL communicator (its broadcast is nothing) and the host side of a
// one-rank expert exchange (its token-count all_to_all), in tests without mpirun.
#pragma once

#include <cstring>
#include <string>

#include "model/check.h"
#include "parallel/comm.h"

namespace moe {

class LoopbackComm final : public Comm {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const std::string& name() const override { return name_; }
  void broadcast(void*, size_t, int) override {}
  void all_reduce_sum(float*, int64_t) override {}
  void all_reduce_sum(double*, int64_t) override {}
  void all_reduce_sum(int64_t*, int64_t) override {}
  void all_reduce_max(double*, int64_t) override {}
  CommRequest all_reduce_sum_start(float*, int64_t) override { return {}; }
  CommRequest reduce_scatter_sum_start(float* recv, const float* send, const int* counts) override {
    std::memmove(recv, send, static_cast<size_t>(counts[0]) * sizeof(float));
    return {};
  }
  bool test(CommRequest&) override { return true; }
  void wait(CommRequest&) override {}
  void reduce_scatter_sum(float* recv, const float* send, int64_t n) override {
    std::memmove(recv, send, static_cast<size_t>(n) * sizeof(float));
  }
  void reduce_sum(float* recv, const float* send, int64_t n, int) override {
    std::memmove(recv, send, static_cast<size_t>(n) * sizeof(float));
  }
  void all_gather(float* recv, const float* send, int64_t n) override {
    if (send) std::memmove(recv, send, static_cast<size_t>(n) * sizeof(float));
  }
  CommRequest all_to_all_v_start(const void* send, const int* send_bytes, const int* send_displs,
                                 void* recv, const int* recv_bytes, const int* recv_displs) override {
    CHECK(send_bytes[0] == recv_bytes[0], "loopback all_to_all_v: %d bytes sent, %d received",
          send_bytes[0], recv_bytes[0]);
    if (send_bytes[0] > 0)
      std::memmove(static_cast<char*>(recv) + recv_displs[0],
                   static_cast<const char*>(send) + send_displs[0], static_cast<size_t>(send_bytes[0]));
    return {};
  }
  CommRequest all_to_all_start(const int64_t* send, int64_t* recv, int64_t n) override {
    std::memmove(recv, send, static_cast<size_t>(n) * sizeof(int64_t));
    return {};
  }
  void send(const void*, size_t, int, int) override { unused(); }
  void recv(void*, size_t, int, int) override { unused(); }
  CommRequest send_start(const void*, size_t, int, int) override { unused(); }
  CommRequest recv_start(void*, size_t, int, int) override { unused(); }
  CommRequest p2p_group_start(const P2pTransfer*, int) override { unused(); }
  void barrier() override {}

 private:
  [[noreturn]] static void unused() {
    CHECK(false, "a group of one has no peer to send to");
    __builtin_unreachable();
  }
  std::string name_ = "self";
};

}  // namespace moe
