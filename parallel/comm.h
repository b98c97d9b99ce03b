// Communicators: one group of ranks and the collectives the trainer needs. MPI implements
// it now (CPU); NCCL will implement the same interface for device buffers.
//
// Every collective is called by all ranks of the group with the same sizes; the sizes come
// from the plan (never from local data), which is what keeps stages from hanging.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moe {

class Watchdog;  // parallel/watchdog.h

// A started non-blocking operation; wait() completes it. The implementation's request
// handle lives inside (no allocation per operation).
struct CommRequest {
  alignas(8) unsigned char handle[16] = {};
  bool active = false;
};

// One transfer of a point-to-point group (Comm::p2p_group_start): exactly one of send and
// recv is set.
struct P2pTransfer {
  const void* send = nullptr;
  void* recv = nullptr;
  size_t bytes = 0;
  int peer = 0;
};

class Comm {
 public:
  virtual ~Comm() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const std::string& name() const = 0;  // "world", "dp", "ep", ... for messages

  virtual void all_reduce_sum(float* data, int64_t n) = 0;
  virtual void all_reduce_sum(double* data, int64_t n) = 0;
  virtual void all_reduce_sum(int64_t* data, int64_t n) = 0;
  virtual void all_reduce_max(double* data, int64_t n) = 0;
  // Non-blocking in-place sum, so a gradient bucket reduces while backward continues.
  virtual CommRequest all_reduce_sum_start(float* data, int64_t n) = 0;
  // Non-blocking reduce-scatter with a count per rank: send holds sum(recv_counts) floats,
  // rank r's block (after the blocks of ranks < r) is summed over ranks into r's recv. The
  // buffers must stay untouched until wait().
  virtual CommRequest reduce_scatter_sum_start(float* recv, const float* send,
                                               const int* recv_counts) = 0;
  // Drives progress of a started operation; true once it has completed (then inactive).
  virtual bool test(CommRequest& req) = 0;
  virtual void wait(CommRequest& req) = 0;
  // recv (n) = the sum over ranks of send[rank * n, (rank + 1) * n).
  virtual void reduce_scatter_sum(float* recv, const float* send, int64_t n) = 0;
  // recv (n, on root only) = the sum over ranks of send (n).
  virtual void reduce_sum(float* recv, const float* send, int64_t n, int root) = 0;
  // recv (size * n) = every rank's send (n), in rank order. send == nullptr means in place:
  // this rank's block is already at recv + rank * n.
  virtual void all_gather(float* recv, const float* send, int64_t n) = 0;
  // The expert exchange's all-to-alls, non-blocking so computation runs while they are in
  // flight (overlapped F&B pairs). all_to_all_v_start: variable, counts and displacements in
  // bytes, one int per rank; all_to_all_start: n int64 per rank (the token counts before a
  // dispatch). Counts, displacements and both buffers stay untouched until wait() or a true
  // test().
  virtual CommRequest all_to_all_v_start(const void* send, const int* send_bytes,
                                         const int* send_displs, void* recv,
                                         const int* recv_bytes, const int* recv_displs) = 0;
  virtual CommRequest all_to_all_start(const int64_t* send, int64_t* recv, int64_t n) = 0;
  virtual void broadcast(void* data, size_t bytes, int root) = 0;
  virtual void send(const void* data, size_t bytes, int peer, int tag) = 0;
  virtual void recv(void* data, size_t bytes, int peer, int tag) = 0;
  // Non-blocking point-to-point (pipeline transfers): the buffer stays untouched until
  // wait() or a true test().
  virtual CommRequest send_start(const void* data, size_t bytes, int peer, int tag) = 0;
  virtual CommRequest recv_start(void* data, size_t bytes, int peer, int tag) = 0;
  // NCCL's point-to-point model, which the pipeline's ticks are planned for
  // (parallel/pipeline_ticks.h): the n transfers start together and one request completes
  // them all. No tags: between two ranks, transfers match in the order they are issued,
  // across groups; a send may wait until its receive is posted. At most kP2pGroupMax
  // transfers per group. MPI keeps those rules exactly (synchronous sends, one tag), so a
  // plan that runs on MPI's groups runs on NCCL's.
  static constexpr int kP2pGroupMax = 16;
  virtual CommRequest p2p_group_start(const P2pTransfer* t, int n) = 0;
  virtual void barrier() = 0;
  // Reports every blocking call and wait() to `watchdog` (null: none), which names the one
  // that does not complete in time (parallel/watchdog.h). Groups split from this one after
  // the call inherit it. Communicators without blocking host waits ignore it.
  virtual void set_watchdog(Watchdog* watchdog) { (void)watchdog; }
};

// MPI: the world communicator, and subgroups of it by color (ranks with the same color form
// one group, ordered by key).
std::unique_ptr<Comm> comm_mpi_world();
std::unique_ptr<Comm> comm_mpi_split(const Comm& parent, int color, int key, const std::string& name);

// MPI start-up and shut-down for the process (MPI_Init_thread with FUNNELED), and the
// job-wide abort used when a rank hits an error: the message is printed with the rank and
// every other rank is brought down instead of hanging in a collective.
void mpi_start(int* argc, char*** argv);
// Whether a launcher (mpirun, srun with PMI/PMIx) started this process. A plain single
// process skips MPI entirely: no singleton start-up cost, nothing shared between unrelated
// runs on one machine.
bool mpi_launched();
void mpi_finish();
bool mpi_started();
int mpi_world_rank();
int mpi_world_size();
[[noreturn]] void mpi_abort_job(int code);

}  // namespace moe
