// The MPI communicator. Large messages are split so every count fits MPI's int.
//
// Every blocking MPI call and every wait() is bracketed for the hang watchdog
// (parallel/watchdog.h) when one is attached: two relaxed stores on entry, one on exit.
// A non-blocking request remembers the operation and peer that started it, so a stuck
// wait() is reported as, e.g., "wait(recv_start) ... with peer 2".
#include <mpi.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdlib>

#include "model/check.h"
#include "parallel/comm.h"
#include "parallel/watchdog.h"

namespace moe {

namespace {

constexpr int64_t kMaxCount = INT_MAX / 2;  // per MPI call, in elements

// What a CommRequest's handle holds: the MPI request, and what started it (for the watchdog).
struct MpiRequest {
  MPI_Request req;
  int32_t peer;   // rank in the group, -1 for collectives
  int16_t group;  // p2p_group_start: its slot of requests; -1 otherwise
  CommOp op;
};
static_assert(sizeof(MpiRequest) <= sizeof(CommRequest::handle));
static_assert(alignof(MpiRequest) <= alignof(CommRequest));

// Brackets one blocking call for the watchdog (nothing when none is attached).
class WaitScope {
 public:
  WaitScope(Watchdog* wd, const Comm* comm, CommOp op, int peer = -1, bool wait = false) : wd_(wd) {
    if (wd_) wd_->wait_begin(comm, op, peer, wait);
  }
  ~WaitScope() {
    if (wd_) wd_->wait_end();
  }
  WaitScope(const WaitScope&) = delete;
  WaitScope& operator=(const WaitScope&) = delete;

 private:
  Watchdog* wd_;
};

class MpiComm final : public Comm {
 public:
  MpiComm(MPI_Comm comm, std::string name, bool owned) : comm_(comm), name_(std::move(name)), owned_(owned) {
    MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    MPI_CHECK(MPI_Comm_size(comm_, &size_));
  }
  ~MpiComm() override {
    if (owned_ && mpi_started()) MPI_Comm_free(&comm_);
  }
  MPI_Comm raw() const { return comm_; }
  Watchdog* watchdog() const { return wd_; }
  void set_watchdog(Watchdog* watchdog) override { wd_ = watchdog; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }

  template <typename T>
  void reduce(T* data, int64_t n, MPI_Datatype type, MPI_Op op) {
    const WaitScope ws(wd_, this, op == MPI_MAX ? CommOp::kAllReduceMax : CommOp::kAllReduceSum);
    for (int64_t off = 0; off < n; off += kMaxCount) {
      const int c = static_cast<int>(std::min(kMaxCount, n - off));
      MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, data + off, c, type, op, comm_));
    }
  }
  void all_reduce_sum(float* d, int64_t n) override { reduce(d, n, MPI_FLOAT, MPI_SUM); }
  void all_reduce_sum(double* d, int64_t n) override { reduce(d, n, MPI_DOUBLE, MPI_SUM); }
  void all_reduce_sum(int64_t* d, int64_t n) override { reduce(d, n, MPI_INT64_T, MPI_SUM); }
  void all_reduce_max(double* d, int64_t n) override { reduce(d, n, MPI_DOUBLE, MPI_MAX); }

  // A new active request started by `op` (with `peer`); its MPI_Request is filled by the
  // caller through request().
  static CommRequest started(CommOp op, int peer = -1) {
    CommRequest r;
    slot(r)->op = op;
    slot(r)->peer = peer;
    slot(r)->group = -1;
    r.active = true;
    return r;
  }
  static MpiRequest* slot(CommRequest& r) { return reinterpret_cast<MpiRequest*>(r.handle); }
  static MPI_Request* request(CommRequest& r) { return &slot(r)->req; }
  CommRequest all_reduce_sum_start(float* data, int64_t n) override {
    CHECK(n <= kMaxCount, "bucket of %lld floats is too large for one request", (long long)n);
    CommRequest r = started(CommOp::kAllReduceSumStart);
    MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, data, static_cast<int>(n), MPI_FLOAT, MPI_SUM, comm_,
                             request(r)));
    return r;
  }
  CommRequest reduce_scatter_sum_start(float* recv, const float* send,
                                       const int* recv_counts) override {
    CommRequest r = started(CommOp::kReduceScatterSumStart);
    MPI_CHECK(MPI_Ireduce_scatter(send, recv, recv_counts, MPI_FLOAT, MPI_SUM, comm_, request(r)));
    return r;
  }
  bool test(CommRequest& r) override {
    if (!r.active) return true;
    int done = 0;
    const int g = slot(r)->group;
    if (g >= 0) {
      const size_t G = static_cast<size_t>(g);
      MPI_CHECK(MPI_Testall(group_n_[G], group_reqs_[G].data(), &done, MPI_STATUSES_IGNORE));
      if (done) group_n_[G] = 0;
    } else {
      MPI_CHECK(MPI_Test(request(r), &done, MPI_STATUS_IGNORE));
    }
    if (done) r = CommRequest{};
    return done != 0;
  }
  void wait(CommRequest& r) override {
    if (!r.active) return;
    const WaitScope ws(wd_, this, slot(r)->op, slot(r)->peer, true);
    const int g = slot(r)->group;
    if (g >= 0) {
      const size_t G = static_cast<size_t>(g);
      MPI_CHECK(MPI_Waitall(group_n_[G], group_reqs_[G].data(), MPI_STATUSES_IGNORE));
      group_n_[G] = 0;
    } else {
      MPI_CHECK(MPI_Wait(request(r), MPI_STATUS_IGNORE));
    }
    r = CommRequest{};
  }
  void reduce_scatter_sum(float* recv, const float* send, int64_t n) override {
    CHECK(n <= kMaxCount);
    const WaitScope ws(wd_, this, CommOp::kReduceScatterSum);
    MPI_CHECK(MPI_Reduce_scatter_block(send, recv, static_cast<int>(n), MPI_FLOAT, MPI_SUM, comm_));
  }
  void reduce_sum(float* recv, const float* send, int64_t n, int root) override {
    const WaitScope ws(wd_, this, CommOp::kReduceSum);
    for (int64_t off = 0; off < n; off += kMaxCount) {
      const int c = static_cast<int>(std::min(kMaxCount, n - off));
      MPI_CHECK(MPI_Reduce(send + off, rank_ == root ? recv + off : nullptr, c, MPI_FLOAT, MPI_SUM,
                           root, comm_));
    }
  }
  void all_gather(float* recv, const float* send, int64_t n) override {
    CHECK(n <= kMaxCount);
    const WaitScope ws(wd_, this, CommOp::kAllGather);
    MPI_CHECK(MPI_Allgather(send ? send : MPI_IN_PLACE, send ? static_cast<int>(n) : 0, MPI_FLOAT,
                            recv, static_cast<int>(n), MPI_FLOAT, comm_));
  }
  CommRequest all_to_all_v_start(const void* send, const int* sb, const int* sd, void* recv,
                                 const int* rb, const int* rd) override {
    CommRequest r = started(CommOp::kAllToAllVStart);
    MPI_CHECK(MPI_Ialltoallv(send, sb, sd, MPI_BYTE, recv, rb, rd, MPI_BYTE, comm_, request(r)));
    return r;
  }
  CommRequest all_to_all_start(const int64_t* send, int64_t* recv, int64_t n) override {
    CommRequest r = started(CommOp::kAllToAllStart);
    MPI_CHECK(MPI_Ialltoall(send, static_cast<int>(n), MPI_INT64_T, recv, static_cast<int>(n),
                            MPI_INT64_T, comm_, request(r)));
    return r;
  }
  void broadcast(void* data, size_t bytes, int root) override {
    CHECK(bytes <= static_cast<size_t>(INT_MAX));
    const WaitScope ws(wd_, this, CommOp::kBroadcast);
    MPI_CHECK(MPI_Bcast(data, static_cast<int>(bytes), MPI_BYTE, root, comm_));
  }
  void send(const void* data, size_t bytes, int peer, int tag) override {
    CHECK(bytes <= static_cast<size_t>(INT_MAX));
    const WaitScope ws(wd_, this, CommOp::kSend, peer);
    MPI_CHECK(MPI_Send(data, static_cast<int>(bytes), MPI_BYTE, peer, tag, comm_));
  }
  void recv(void* data, size_t bytes, int peer, int tag) override {
    CHECK(bytes <= static_cast<size_t>(INT_MAX));
    const WaitScope ws(wd_, this, CommOp::kRecv, peer);
    MPI_CHECK(MPI_Recv(data, static_cast<int>(bytes), MPI_BYTE, peer, tag, comm_, MPI_STATUS_IGNORE));
  }
  CommRequest send_start(const void* data, size_t bytes, int peer, int tag) override {
    CHECK(bytes <= static_cast<size_t>(INT_MAX));
    CommRequest r = started(CommOp::kSendStart, peer);
    MPI_CHECK(MPI_Isend(data, static_cast<int>(bytes), MPI_BYTE, peer, tag, comm_, request(r)));
    return r;
  }
  CommRequest recv_start(void* data, size_t bytes, int peer, int tag) override {
    CHECK(bytes <= static_cast<size_t>(INT_MAX));
    CommRequest r = started(CommOp::kRecvStart, peer);
    MPI_CHECK(MPI_Irecv(data, static_cast<int>(bytes), MPI_BYTE, peer, tag, comm_, request(r)));
    return r;
  }
  // Synchronous sends (MPI_Issend) and one tag: NCCL's rendezvous and in-order matching.
  CommRequest p2p_group_start(const P2pTransfer* t, int n) override {
    CHECK(n > 0 && n <= kP2pGroupMax, "point-to-point group of %d transfers", n);
    size_t g = kGroups;
    for (size_t i = 0; i < kGroups; ++i)
      if (group_n_[i] == 0) {
        g = i;
        break;
      }
    CHECK(g < kGroups, "more than %zu point-to-point groups in flight on %s", kGroups, name_.c_str());
    MPI_Request* reqs = group_reqs_[g].data();
    for (int i = 0; i < n; ++i) {
      CHECK(t[i].bytes <= static_cast<size_t>(INT_MAX) && (t[i].send == nullptr) != (t[i].recv == nullptr),
            "point-to-point transfer %d of %zu bytes", i, t[i].bytes);
      const int count = static_cast<int>(t[i].bytes);
      if (t[i].send)
        MPI_CHECK(MPI_Issend(t[i].send, count, MPI_BYTE, t[i].peer, kGroupTag, comm_, &reqs[i]));
      else
        MPI_CHECK(MPI_Irecv(t[i].recv, count, MPI_BYTE, t[i].peer, kGroupTag, comm_, &reqs[i]));
    }
    group_n_[g] = n;
    CommRequest r = started(CommOp::kP2pGroupStart, t[0].peer);
    slot(r)->req = MPI_REQUEST_NULL;
    slot(r)->group = static_cast<int16_t>(g);
    return r;
  }
  void barrier() override {
    const WaitScope ws(wd_, this, CommOp::kBarrier);
    MPI_CHECK(MPI_Barrier(comm_));
  }

 private:
  // Point-to-point groups in flight, each up to kP2pGroupMax requests (no allocation).
  static constexpr size_t kGroups = 8;
  static constexpr int kGroupTag = 32767;  // the pipeline's tagged messages stay below it
  std::array<std::array<MPI_Request, kP2pGroupMax>, kGroups> group_reqs_{};
  std::array<int, kGroups> group_n_{};

  MPI_Comm comm_;
  std::string name_;
  bool owned_;
  int rank_ = 0, size_ = 1;
  Watchdog* wd_ = nullptr;  // not owned; outlives every call that uses it
};

}  // namespace

void mpi_start(int* argc, char*** argv) {
  int provided = 0;
  MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
  // Errors come back as codes so MPI_CHECK can name the call, instead of MPI's own abort.
  MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  check_set_context(mpi_world_rank(), -1);
}

bool mpi_launched() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE"})
    if (std::getenv(var)) return true;
  return false;
}

bool mpi_started() {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  return init && !fin;
}

void mpi_finish() {
  if (mpi_started()) MPI_Finalize();
}

int mpi_world_rank() {
  int r = 0;
  if (mpi_started()) MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

int mpi_world_size() {
  int s = 1;
  if (mpi_started()) MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

void mpi_abort_job(int code) {
  if (mpi_started() && mpi_world_size() > 1) MPI_Abort(MPI_COMM_WORLD, code);
  std::exit(code);
}

std::unique_ptr<Comm> comm_mpi_world() {
  CHECK(mpi_started(), "MPI is not initialized");
  return std::make_unique<MpiComm>(MPI_COMM_WORLD, "world", false);
}

std::unique_ptr<Comm> comm_mpi_split(const Comm& parent, int color, int key, const std::string& name) {
  const auto& p = dynamic_cast<const MpiComm&>(parent);
  MPI_Comm out;
  {
    const WaitScope ws(p.watchdog(), &p, CommOp::kSplit);
    MPI_CHECK(MPI_Comm_split(p.raw(), color, key, &out));
  }
  MPI_CHECK(MPI_Comm_set_errhandler(out, MPI_ERRORS_RETURN));
  auto c = std::make_unique<MpiComm>(out, name, true);
  c->set_watchdog(p.watchdog());
  return c;
}

}  // namespace moe
