// Run health on one process: the hang watchdog and the heartbeat, both driven by one
// monitor thread.
//
// Watchdog: a communicator (parallel/comm_mpi.cpp) brackets every blocking call and every
// wait() with wait_begin / wait_end. When one wait lasts longer than timeout_s, the monitor
// builds ONE line naming the operation, its group, the peer, and the trainer's context (step,
// phase, micro-batch, schedule op) and hands it to `fire`, which by default prints it and
// ends the process (see watchdog_fire_exit). Only communication waits are timed: a long
// evaluation, save or compute phase between two collectives never fires.
//
// Heartbeat: when nothing was printed for heartbeat_s seconds (note_output() marks a line the
// trainer printed), the monitor prints `heartbeat: step 120, saving checkpoint (41 s)`: the
// step in progress, the phase and how long it has lasted, so a user can tell slow from stuck.
//
// Cost on the hot path: every setter and wait_begin/wait_end is a few relaxed (or release)
// atomic stores on the calling thread, no clock, no lock, no syscall. The monitor wakes every
// poll_s (0.5 s by default) and decides from sequence numbers whether a wait or a phase is
// still the same one it saw before; a wait therefore fires between timeout_s and
// timeout_s + poll_s after it began, never earlier.
//
// Threads: the context setters and wait_begin/wait_end are called from ONE thread (the one
// that makes MPI calls; MPI is FUNNELED). The monitor only reads. Strings passed by pointer
// (phase, schedule op kind) must be static; the Comm passed to wait_begin must outlive the
// wait (it always does: the wait is inside one of its methods).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

namespace moe {

class Comm;

// The blocking communication a rank can be waiting in. A wait() on a non-blocking request is
// reported as the operation that started it, marked as a wait ("wait(recv_start)").
enum class CommOp : uint8_t {
  kAllReduceSum,
  kAllReduceMax,
  kAllReduceSumStart,
  kReduceScatterSumStart,
  kReduceScatterSum,
  kReduceSum,
  kAllGather,
  kAllToAllVStart,
  kAllToAllStart,
  kBroadcast,
  kSend,
  kRecv,
  kSendStart,
  kRecvStart,
  kBarrier,
  kSplit,
  kP2pGroupStart,
};
const char* comm_op_name(CommOp op);  // "all_reduce_sum", "recv_start", ...

struct WatchdogOptions {
  int rank = 0;            // world rank, for the message
  double timeout_s = 0;    // a communication wait longer than this fires; 0: not watched
  double heartbeat_s = 0;  // heartbeat period; 0: no heartbeat
  // How often the monitor looks; 0: 0.5 s, or less when timeout_s / 4 or heartbeat_s / 4 is.
  double poll_s = 0;
  // Receives the one-line report of a stuck wait (no newline); null: watchdog_fire_exit.
  // Called at most once, from the monitor thread.
  std::function<void(const std::string&)> fire;
  // Receives each heartbeat line (no newline), from the monitor thread; null: none.
  std::function<void(const std::string&)> heartbeat;
  // false: no thread; the caller drives tick() with its own clock (tests).
  bool start_thread = true;
};

// The default `fire`: prints the line on stderr (after flushing stdout) and ends the process
// with exit code 1, which makes mpirun take the whole job down.
[[noreturn]] void watchdog_fire_exit(const std::string& line);

class Watchdog {
 public:
  explicit Watchdog(WatchdogOptions opt);
  ~Watchdog();  // stops and joins the monitor
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // Whether the monitor thread runs (a timeout or a heartbeat is set and start_thread).
  bool running() const { return thread_.joinable(); }

  // --- the trainer's context (main thread) ---
  // The training step in progress, 1-based as printed in the log (0: before the first).
  void set_step(int64_t step);
  // What the process is doing: "training step", "evaluating", "saving checkpoint" (static).
  void set_phase(const char* phase);
  // The micro-batch in progress within the step, -1 when none or not tracked.
  void set_micro_batch(int micro_batch);
  // The pipeline schedule op in progress: its index in this rank's op list and its kind
  // ("F", "B", "W", "F&B", ...; static), or (-1, nullptr) outside a pipeline step.
  void set_schedule_op(int index, const char* kind);
  // The trainer printed a line on stdout: the next heartbeat is due heartbeat_s from now.
  void note_output();

  // --- communication waits (the communicator, main thread) ---
  // `peer` is the rank in comm's group for point-to-point operations, else -1; `wait` marks
  // a wait() on a request that `op` started.
  void wait_begin(const Comm* comm, CommOp op, int peer, bool wait) {
    comm_.store(comm, std::memory_order_relaxed);
    what_.store(pack(op, peer, wait), std::memory_order_relaxed);
    // One writer: load + store, no read-modify-write. Odd: inside a wait.
    wait_seq_.store(wait_seq_.load(std::memory_order_relaxed) + 1, std::memory_order_release);
  }
  void wait_end() {
    wait_seq_.store(wait_seq_.load(std::memory_order_relaxed) + 1, std::memory_order_release);
  }

  // One look at the state at monotonic time now_s: fires a wait stuck for timeout_s, prints
  // a heartbeat when due. The monitor thread calls it every poll_s; tests call it directly.
  void tick(double now_s);

  // The report line for the wait in progress, had it lasted waited_s ("" when none).
  std::string describe_wait(double waited_s) const;
  // The heartbeat line for the current context, its phase having lasted phase_s.
  std::string describe_heartbeat(double phase_s) const;

 private:
  static uint64_t pack(CommOp op, int peer, bool wait) {
    return static_cast<uint64_t>(op) | (wait ? 0x100u : 0u) |
           (static_cast<uint64_t>(static_cast<uint32_t>(peer)) << 32);
  }
  void run();

  WatchdogOptions opt_;
  // Written by the main thread, read by the monitor.
  std::atomic<uint64_t> wait_seq_{0};  // odd while inside a wait
  std::atomic<const Comm*> comm_{nullptr};
  std::atomic<uint64_t> what_{0};  // op | wait << 8 | peer << 32
  std::atomic<int64_t> step_{0};
  std::atomic<const char*> phase_{"starting up"};
  std::atomic<int> micro_batch_{-1};
  std::atomic<int> sched_index_{-1};
  std::atomic<const char*> sched_kind_{nullptr};
  std::atomic<uint64_t> phase_seq_{0};   // bumped by set_step / set_phase
  std::atomic<uint64_t> output_seq_{0};  // bumped by note_output
  // The monitor's own view (tick() only).
  bool started_ = false, fired_ = false;
  uint64_t seen_wait_ = 0, seen_phase_ = 0, seen_output_ = 0;
  double wait_since_ = 0, phase_since_ = 0, last_line_ = 0;
  // The thread and its stop signal.
  std::mutex mu_;
  std::condition_variable cv_;
  bool quit_ = false;
  std::thread thread_;  // last: starts after everything above is initialized
};

}  // namespace moe
