#include "parallel/nccl/comm_nccl.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <array>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "model/kernels/cuda/cuda_check.h"
#include "parallel/nccl/nccl_check.h"
#include "parallel/nccl_bootstrap.h"

static_assert(moe::kNcclIdBytes == NCCL_UNIQUE_ID_BYTES, "NCCL's unique id size changed");
static_assert(sizeof(ncclUniqueId) == NCCL_UNIQUE_ID_BYTES);

namespace moe {

namespace {

// What a request waits for, for the timeout message.
enum class Op : uint8_t { kAllReduce, kReduceScatter, kAllToAll, kSend, kRecv, kP2pGroup };
const char* op_name(Op op) {
  switch (op) {
    case Op::kAllReduce: return "all-reduce";
    case Op::kReduceScatter: return "reduce-scatter";
    case Op::kAllToAll: return "all-to-all";
    case Op::kSend: return "send";
    case Op::kRecv: return "recv";
    case Op::kP2pGroup: return "point-to-point group";
  }
  return "?";
}

// The request's handle bytes: the event slot and the operation.
struct Handle {
  uint32_t slot;
  Op op;
};
static_assert(sizeof(Handle) <= sizeof(CommRequest::handle));

class NcclComm final : public Comm {
 public:
  NcclComm(Comm& boot, cuda::Stream stream, double timeout_s, cuda::Stream producer)
      : name_(boot.name()), rank_(boot.rank()), size_(boot.size()), stream_(stream),
        producer_(producer), timeout_s_(timeout_s) {
    NcclBootstrapOps ops;
    ops.make_id = [] {
      ncclUniqueId id;
      NCCL_CHECK(ncclGetUniqueId(&id));
      NcclId out;
      std::memcpy(out.bytes.data(), &id, sizeof(id));
      return out;
    };
    ops.init = [this](const NcclId& id, int size, int rank) {
      ncclUniqueId nid;
      std::memcpy(&nid, id.bytes.data(), sizeof(nid));
      NCCL_CHECK(ncclCommInitRank(&comm_, size, nid, rank));
    };
    nccl_bootstrap(boot, ops);
    // Events for the non-blocking operations, made once: a step never creates one.
    for (cudaEvent_t& e : events_) CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&produced_, cudaEventDisableTiming));
    in_use_.fill(false);
    CUDA_CHECK(cudaMalloc(&scratch_, sizeof(float)));
  }

  ~NcclComm() override {
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
    cudaEventDestroy(produced_);
    cudaFree(scratch_);
    if (comm_) ncclCommDestroy(comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }

  void all_reduce_sum(float* data, int64_t n) override { reduce(data, n, ncclFloat, ncclSum); }
  void all_reduce_sum(double* data, int64_t n) override { reduce(data, n, ncclDouble, ncclSum); }
  void all_reduce_sum(int64_t* data, int64_t n) override { reduce(data, n, ncclInt64, ncclSum); }
  void all_reduce_max(double* data, int64_t n) override { reduce(data, n, ncclDouble, ncclMax); }

  CommRequest all_reduce_sum_start(float* data, int64_t n) override {
    after_producer();
    NCCL_CHECK(ncclAllReduce(data, data, count(n), ncclFloat, ncclSum, comm_, stream_));
    return record(Op::kAllReduce);
  }

  CommRequest reduce_scatter_sum_start(float* recv, const float* send,
                                       const int* recv_counts) override {
    after_producer();
    // Unequal blocks: one reduce per block, rooted at the block's owner, in one group.
    NCCL_CHECK(ncclGroupStart());
    int64_t off = 0;
    for (int r = 0; r < size_; ++r) {
      const int64_t n = recv_counts[r];
      CHECK(n >= 0, "reduce-scatter count %lld for rank %d", (long long)n, r);
      if (n > 0)
        NCCL_CHECK(ncclReduce(send + off, r == rank_ ? recv : nullptr, count(n), ncclFloat,
                              ncclSum, r, comm_, stream_));
      off += n;
    }
    NCCL_CHECK(ncclGroupEnd());
    return record(Op::kReduceScatter);
  }

  bool test(CommRequest& req) override {
    if (!req.active) return true;
    const cudaError_t rc = cudaEventQuery(events_[handle(req).slot]);
    if (rc == cudaErrorNotReady) return false;
    CUDA_CHECK(rc);
    release(req);
    return true;
  }

  void wait(CommRequest& req) override {
    if (!req.active) return;
    const Handle h = handle(req);
    const auto t0 = std::chrono::steady_clock::now();
    for (;;) {
      const cudaError_t rc = cudaEventQuery(events_[h.slot]);
      if (rc == cudaSuccess) break;
      if (rc != cudaErrorNotReady) CUDA_CHECK(rc);
      check_async(op_name(h.op));
      const double waited =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (timeout_s_ > 0 && waited > timeout_s_) {
        ncclCommAbort(comm_);
        comm_ = nullptr;
        check_failed("NCCL timeout", __FILE__, __LINE__,
                     strprintf("%s in group %s (rank %d of %d) not complete after %.0f s",
                               op_name(h.op), name_.c_str(), rank_, size_, waited));
      }
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
    release(req);
  }

  void reduce_scatter_sum(float* recv, const float* send, int64_t n) override {
    after_producer();
    NCCL_CHECK(ncclReduceScatter(send, recv, count(n), ncclFloat, ncclSum, comm_, stream_));
    complete(Op::kReduceScatter);
  }

  void reduce_sum(float* recv, const float* send, int64_t n, int root) override {
    after_producer();
    NCCL_CHECK(ncclReduce(send, recv, count(n), ncclFloat, ncclSum, root, comm_, stream_));
    complete(Op::kAllReduce);
  }

  void all_gather(float* recv, const float* send, int64_t n) override {
    after_producer();
    // In place when send is null: NCCL's in-place form is send == recv + rank * n.
    const float* src = send ? send : recv + static_cast<int64_t>(rank_) * n;
    NCCL_CHECK(ncclAllGather(src, recv, count(n), ncclFloat, comm_, stream_));
    complete(Op::kAllReduce);
  }

  CommRequest all_to_all_v_start(const void* send, const int* send_bytes, const int* send_displs,
                                 void* recv, const int* recv_bytes,
                                 const int* recv_displs) override {
    after_producer();
    const char* s = static_cast<const char*>(send);
    char* r = static_cast<char*>(recv);
    NCCL_CHECK(ncclGroupStart());
    for (int p = 0; p < size_; ++p) {
      if (send_bytes[p] > 0)
        NCCL_CHECK(ncclSend(s + send_displs[p], static_cast<size_t>(send_bytes[p]), ncclChar, p,
                            comm_, stream_));
      if (recv_bytes[p] > 0)
        NCCL_CHECK(ncclRecv(r + recv_displs[p], static_cast<size_t>(recv_bytes[p]), ncclChar, p,
                            comm_, stream_));
    }
    NCCL_CHECK(ncclGroupEnd());
    return record(Op::kAllToAll);
  }

  CommRequest all_to_all_start(const int64_t* send, int64_t* recv, int64_t n) override {
    after_producer();
    NCCL_CHECK(ncclGroupStart());
    for (int p = 0; p < size_; ++p) {
      NCCL_CHECK(ncclSend(send + p * n, count(n), ncclInt64, p, comm_, stream_));
      NCCL_CHECK(ncclRecv(recv + p * n, count(n), ncclInt64, p, comm_, stream_));
    }
    NCCL_CHECK(ncclGroupEnd());
    return record(Op::kAllToAll);
  }

  void broadcast(void* data, size_t bytes, int root) override {
    after_producer();
    NCCL_CHECK(ncclBroadcast(data, data, bytes, ncclChar, root, comm_, stream_));
    complete(Op::kAllReduce);
  }

  // NCCL has no tags: transfers between two ranks match in the order they are issued, which
  // the schedules keep identical on both sides.
  void send(const void* data, size_t bytes, int peer, int) override {
    after_producer();
    NCCL_CHECK(ncclSend(data, bytes, ncclChar, peer, comm_, stream_));
    complete(Op::kSend);
  }
  void recv(void* data, size_t bytes, int peer, int) override {
    after_producer();
    NCCL_CHECK(ncclRecv(data, bytes, ncclChar, peer, comm_, stream_));
    complete(Op::kRecv);
  }
  CommRequest send_start(const void* data, size_t bytes, int peer, int) override {
    after_producer();
    NCCL_CHECK(ncclSend(data, bytes, ncclChar, peer, comm_, stream_));
    return record(Op::kSend);
  }
  CommRequest recv_start(void* data, size_t bytes, int peer, int) override {
    after_producer();
    NCCL_CHECK(ncclRecv(data, bytes, ncclChar, peer, comm_, stream_));
    return record(Op::kRecv);
  }

  CommRequest p2p_group_start(const P2pTransfer* t, int n) override {
    CHECK(n > 0 && n <= kP2pGroupMax, "point-to-point group of %d transfers", n);
    after_producer();
    NCCL_CHECK(ncclGroupStart());
    for (int i = 0; i < n; ++i) {
      CHECK((t[i].send == nullptr) != (t[i].recv == nullptr), "transfer %d: one of send, recv", i);
      if (t[i].send)
        NCCL_CHECK(ncclSend(t[i].send, t[i].bytes, ncclChar, t[i].peer, comm_, stream_));
      else
        NCCL_CHECK(ncclRecv(t[i].recv, t[i].bytes, ncclChar, t[i].peer, comm_, stream_));
    }
    NCCL_CHECK(ncclGroupEnd());
    return record(Op::kP2pGroup);
  }

  void barrier() override {
    after_producer();
    NCCL_CHECK(ncclAllReduce(scratch_, scratch_, 1, ncclFloat, ncclSum, comm_, stream_));
    complete(Op::kAllReduce);
  }

 private:
  static constexpr size_t kEvents = 256;

  static size_t count(int64_t n) {
    CHECK(n >= 0, "NCCL element count %lld", (long long)n);
    return static_cast<size_t>(n);
  }

  template <typename T>
  void reduce(T* data, int64_t n, ncclDataType_t type, ncclRedOp_t op) {
    after_producer();
    NCCL_CHECK(ncclAllReduce(data, data, count(n), type, op, comm_, stream_));
    complete(Op::kAllReduce);
  }

  // Every operation starts after the work already queued on the producer (compute) stream,
  // which wrote the buffers it reads; the host waits in wait() order what comes after.
  void after_producer() {
    if (!producer_) return;
    CUDA_CHECK(cudaEventRecord(produced_, producer_));
    CUDA_CHECK(cudaStreamWaitEvent(stream_, produced_, 0));
  }

  // Blocking calls: the same watchdog as a started operation's wait.
  void complete(Op op) {
    CommRequest req = record(op);
    wait(req);
  }

  CommRequest record(Op op) {
    size_t slot = kEvents;
    for (size_t i = 0; i < kEvents; ++i) {
      const size_t s = (next_ + i) % kEvents;
      if (!in_use_[s]) {
        slot = s;
        break;
      }
    }
    CHECK(slot < kEvents, "more than %zu NCCL operations in flight in group %s", kEvents,
          name_.c_str());
    next_ = (slot + 1) % kEvents;
    in_use_[slot] = true;
    CUDA_CHECK(cudaEventRecord(events_[slot], stream_));
    CommRequest req;
    const Handle h{static_cast<uint32_t>(slot), op};
    std::memcpy(req.handle, &h, sizeof(h));
    req.active = true;
    return req;
  }

  static Handle handle(const CommRequest& req) {
    Handle h;
    std::memcpy(&h, req.handle, sizeof(h));
    return h;
  }

  void release(CommRequest& req) {
    in_use_[handle(req).slot] = false;
    req.active = false;
  }

  void check_async(const char* what) {
    ncclResult_t async = ncclSuccess;
    NCCL_CHECK(ncclCommGetAsyncError(comm_, &async));
    if (async != ncclSuccess && async != ncclInProgress) {
      ncclCommAbort(comm_);
      comm_ = nullptr;
      check_failed("NCCL asynchronous error", __FILE__, __LINE__,
                   strprintf("%s in group %s (rank %d of %d): %s", what, name_.c_str(), rank_,
                             size_, ncclGetErrorString(async)));
    }
  }

  std::string name_;
  int rank_, size_;
  cudaStream_t stream_;
  cudaStream_t producer_;  // null: none
  cudaEvent_t produced_ = nullptr;
  double timeout_s_;
  ncclComm_t comm_ = nullptr;
  std::array<cudaEvent_t, kEvents> events_{};
  std::array<bool, kEvents> in_use_{};
  size_t next_ = 0;
  float* scratch_ = nullptr;
};

}  // namespace

std::unique_ptr<Comm> comm_nccl_create(Comm& bootstrap, cuda::Stream stream, double timeout_s,
                                       cuda::Stream producer) {
  return std::make_unique<NcclComm>(bootstrap, stream, timeout_s, producer);
}

}  // namespace moe
