// The monitor thread behind the hang watchdog and the heartbeat (see parallel/watchdog.h).
#include "parallel/watchdog.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "model/check.h"
#include "model/wall_clock.h"
#include "parallel/comm.h"

namespace moe {

const char* comm_op_name(CommOp op) {
  switch (op) {
    case CommOp::kAllReduceSum: return "all_reduce_sum";
    case CommOp::kAllReduceMax: return "all_reduce_max";
    case CommOp::kAllReduceSumStart: return "all_reduce_sum_start";
    case CommOp::kReduceScatterSumStart: return "reduce_scatter_sum_start";
    case CommOp::kReduceScatterSum: return "reduce_scatter_sum";
    case CommOp::kReduceSum: return "reduce_sum";
    case CommOp::kAllGather: return "all_gather";
    case CommOp::kAllToAllVStart: return "all_to_all_v_start";
    case CommOp::kAllToAllStart: return "all_to_all_start";
    case CommOp::kBroadcast: return "broadcast";
    case CommOp::kSend: return "send";
    case CommOp::kRecv: return "recv";
    case CommOp::kSendStart: return "send_start";
    case CommOp::kRecvStart: return "recv_start";
    case CommOp::kBarrier: return "barrier";
    case CommOp::kSplit: return "split";
    case CommOp::kP2pGroupStart: return "p2p_group_start";
  }
  return "communication";
}

// NOTE: the monitor thread cannot call MPI_Abort: MPI runs FUNNELED (only the main thread
// may call MPI), and the main thread is the one stuck inside MPI. So the process ends itself
// with _Exit (no atexit handlers: mpi_finish would call MPI_Finalize from this thread, and
// would wait for the stuck rank). Every rank of the job still ends within seconds: mpirun
// (and srun with --kill-on-bad-exit) kills the rest of a job when one rank exits non-zero
// without finalizing, and every other rank waiting on the same collective fires its own
// watchdog anyway.
void watchdog_fire_exit(const std::string& line) {
  std::fflush(stdout);
  std::fputs((line + "\n").c_str(), stderr);  // one call: the line is not interleaved
  std::fflush(stderr);
  std::_Exit(1);
}

Watchdog::Watchdog(WatchdogOptions opt) : opt_(std::move(opt)) {
  if (!opt_.fire) opt_.fire = watchdog_fire_exit;
  if (opt_.poll_s <= 0) {
    opt_.poll_s = 0.5;
    if (opt_.timeout_s > 0) opt_.poll_s = std::min(opt_.poll_s, opt_.timeout_s / 4);
    if (opt_.heartbeat_s > 0 && opt_.heartbeat) opt_.poll_s = std::min(opt_.poll_s, opt_.heartbeat_s / 4);
  }
  const bool needed = opt_.timeout_s > 0 || (opt_.heartbeat_s > 0 && opt_.heartbeat);
  if (opt_.start_thread && needed) thread_ = std::thread([this] { run(); });
}

Watchdog::~Watchdog() {
  if (!thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    quit_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void Watchdog::run() {
  std::unique_lock<std::mutex> lock(mu_);
  const auto period = std::chrono::duration<double>(opt_.poll_s);
  while (!cv_.wait_for(lock, period, [this] { return quit_; })) {
    lock.unlock();
    tick(now_s());
    lock.lock();
  }
}

void Watchdog::set_step(int64_t step) {
  step_.store(step, std::memory_order_relaxed);
  phase_seq_.store(phase_seq_.load(std::memory_order_relaxed) + 1, std::memory_order_release);
}

void Watchdog::set_phase(const char* phase) {
  phase_.store(phase, std::memory_order_relaxed);
  phase_seq_.store(phase_seq_.load(std::memory_order_relaxed) + 1, std::memory_order_release);
}

void Watchdog::set_micro_batch(int micro_batch) {
  micro_batch_.store(micro_batch, std::memory_order_relaxed);
}

void Watchdog::set_schedule_op(int index, const char* kind) {
  sched_kind_.store(kind, std::memory_order_relaxed);
  sched_index_.store(index, std::memory_order_relaxed);
}

void Watchdog::note_output() {
  output_seq_.store(output_seq_.load(std::memory_order_relaxed) + 1, std::memory_order_release);
}

namespace {

// "at step 3 (training step; micro-batch 2, schedule op 14 F)"; outside a micro-batch (the
// step's reductions, evaluation, a save) it says so.
std::string context_text(int64_t step, const char* phase, int mb, int op_index, const char* op_kind) {
  std::string where = step > 0 ? strprintf("at step %lld (%s; ", static_cast<long long>(step), phase)
                               : strprintf("before the first step (%s; ", phase);
  if (mb < 0 && op_index < 0) return where + "outside any micro-batch)";
  where += mb >= 0 ? strprintf("micro-batch %d", mb) : std::string("no micro-batch");
  if (op_index >= 0) where += strprintf(", schedule op %d %s", op_index, op_kind ? op_kind : "?");
  return where + ")";
}

}  // namespace

std::string Watchdog::describe_wait(double waited_s) const {
  const uint64_t seq = wait_seq_.load(std::memory_order_acquire);
  if (seq % 2 == 0) return "";
  const Comm* comm = comm_.load(std::memory_order_relaxed);
  const uint64_t what = what_.load(std::memory_order_relaxed);
  const auto op = static_cast<CommOp>(what & 0xff);
  const bool wait = (what & 0x100) != 0;
  const int peer = static_cast<int>(static_cast<uint32_t>(what >> 32));
  std::string text = strprintf("error: rank %d: watchdog: ", opt_.rank);
  text += wait ? strprintf("wait(%s)", comm_op_name(op)) : std::string(comm_op_name(op));
  if (comm)
    text += strprintf(" on group \"%s\" (rank %d of %d)", comm->name().c_str(), comm->rank(),
                      comm->size());
  if (peer >= 0) text += strprintf(" with peer %d", peer);
  text += strprintf(" not complete after %.1f s (parallel.timeout_s = %g) ", waited_s, opt_.timeout_s);
  text += context_text(step_.load(std::memory_order_relaxed), phase_.load(std::memory_order_relaxed),
                       micro_batch_.load(std::memory_order_relaxed),
                       sched_index_.load(std::memory_order_relaxed),
                       sched_kind_.load(std::memory_order_relaxed));
  return text + "; a rank is stuck or gone: stopping the job";
}

std::string Watchdog::describe_heartbeat(double phase_s) const {
  const int64_t step = step_.load(std::memory_order_relaxed);
  const char* phase = phase_.load(std::memory_order_relaxed);
  const std::string lasted = strprintf(phase_s < 10 ? "%.1f s" : "%.0f s", phase_s);
  if (step <= 0) return strprintf("heartbeat: %s (%s)", phase, lasted.c_str());
  return strprintf("heartbeat: step %lld, %s (%s)", static_cast<long long>(step), phase,
                   lasted.c_str());
}

void Watchdog::tick(double now) {
  if (!started_) {
    started_ = true;
    phase_since_ = last_line_ = now;
    seen_phase_ = phase_seq_.load(std::memory_order_acquire);
    seen_output_ = output_seq_.load(std::memory_order_acquire);
  }
  if (opt_.timeout_s > 0 && !fired_) {
    const uint64_t seq = wait_seq_.load(std::memory_order_acquire);
    if (seq % 2 == 0) {
      seen_wait_ = 0;
    } else if (seq != seen_wait_) {
      seen_wait_ = seq;  // a new wait: timed from now (it began at most poll_s earlier)
      wait_since_ = now;
    } else if (now - wait_since_ >= opt_.timeout_s) {
      const std::string line = describe_wait(now - wait_since_);
      // Still the same wait after reading its description (it may have ended meanwhile).
      if (!line.empty() && wait_seq_.load(std::memory_order_acquire) == seq) {
        fired_ = true;
        opt_.fire(line);
      }
    }
  }
  if (opt_.heartbeat_s > 0 && opt_.heartbeat) {
    const uint64_t ph = phase_seq_.load(std::memory_order_acquire);
    if (ph != seen_phase_) {
      seen_phase_ = ph;
      phase_since_ = now;
    }
    const uint64_t out = output_seq_.load(std::memory_order_acquire);
    if (out != seen_output_) {
      seen_output_ = out;
      last_line_ = now;
    }
    if (now - last_line_ >= opt_.heartbeat_s) {
      opt_.heartbeat(describe_heartbeat(now - phase_since_));
      last_line_ = now;
    }
  }
}

}  // namespace moe
