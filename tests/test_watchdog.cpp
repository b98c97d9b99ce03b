// The hang watchdog and the heartbeat (parallel/watchdog.h): the object alone, on an
// injected clock and on its own thread, and the real binary under mpirun with one rank put
// to sleep inside a step (MOETRAIN_TEST_SLEEP_AT).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "parallel/comm.h"
#include "parallel/watchdog.h"
#include "tests/binary_harness.h"

namespace {

using moe::CommOp;
using moe::CommRequest;
using moe::Watchdog;
using moe::WatchdogOptions;

// A group that only has a name, a rank and a size: all the watchdog asks of a Comm.
class NamedComm final : public moe::Comm {
 public:
  NamedComm(std::string name, int rank, int size) : name_(std::move(name)), rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  void all_reduce_sum(float*, int64_t) override { unused(); }
  void all_reduce_sum(double*, int64_t) override { unused(); }
  void all_reduce_sum(int64_t*, int64_t) override { unused(); }
  void all_reduce_max(double*, int64_t) override { unused(); }
  CommRequest all_reduce_sum_start(float*, int64_t) override { return unused_request(); }
  CommRequest reduce_scatter_sum_start(float*, const float*, const int*) override {
    return unused_request();
  }
  bool test(CommRequest&) override { return unused(), true; }
  void wait(CommRequest&) override { unused(); }
  void reduce_scatter_sum(float*, const float*, int64_t) override { unused(); }
  void reduce_sum(float*, const float*, int64_t, int) override { unused(); }
  void all_gather(float*, const float*, int64_t) override { unused(); }
  CommRequest all_to_all_v_start(const void*, const int*, const int*, void*, const int*,
                                 const int*) override {
    return unused_request();
  }
  CommRequest all_to_all_start(const int64_t*, int64_t*, int64_t) override {
    return unused_request();
  }
  void broadcast(void*, size_t, int) override { unused(); }
  void send(const void*, size_t, int, int) override { unused(); }
  void recv(void*, size_t, int, int) override { unused(); }
  CommRequest send_start(const void*, size_t, int, int) override { return unused_request(); }
  CommRequest recv_start(void*, size_t, int, int) override { return unused_request(); }
  CommRequest p2p_group_start(const moe::P2pTransfer*, int) override { return unused_request(); }
  void barrier() override { unused(); }

 private:
  static void unused() { ADD_FAILURE() << "the watchdog called a communication method"; }
  static CommRequest unused_request() {
    unused();
    return {};
  }
  std::string name_;
  int rank_, size_;
};

// The lines a watchdog handed to its callbacks (from any thread).
struct Sink {
  std::mutex mu;
  std::vector<std::string> fired, beats;
  void fire(const std::string& s) {
    std::lock_guard<std::mutex> lock(mu);
    fired.push_back(s);
  }
  void beat(const std::string& s) {
    std::lock_guard<std::mutex> lock(mu);
    beats.push_back(s);
  }
  size_t n_fired() {
    std::lock_guard<std::mutex> lock(mu);
    return fired.size();
  }
  size_t n_beats() {
    std::lock_guard<std::mutex> lock(mu);
    return beats.size();
  }
};

WatchdogOptions manual(Sink& sink, double timeout_s, double heartbeat_s = 0) {
  WatchdogOptions o;
  o.rank = 1;
  o.timeout_s = timeout_s;
  o.heartbeat_s = heartbeat_s;
  o.fire = [&sink](const std::string& s) { sink.fire(s); };
  if (heartbeat_s > 0) o.heartbeat = [&sink](const std::string& s) { sink.beat(s); };
  o.start_thread = false;
  return o;
}

bool has(const std::string& text, const std::string& what) {
  return text.find(what) != std::string::npos;
}

TEST(Watchdog, FiresOnceAfterTimeoutNamingTheWait) {
  Sink sink;
  Watchdog wd(manual(sink, 3.0));
  EXPECT_FALSE(wd.running());
  NamedComm dp("dp", 1, 4);
  wd.set_step(7);
  wd.set_phase("training step");
  wd.tick(0.0);
  wd.wait_begin(&dp, CommOp::kAllReduceSum, -1, false);
  wd.tick(0.5);  // first seen here: timed from 0.5
  wd.tick(3.4);
  EXPECT_EQ(sink.n_fired(), 0u);
  wd.tick(3.5);
  ASSERT_EQ(sink.n_fired(), 1u);
  const std::string& line = sink.fired[0];
  EXPECT_EQ(line,
            "error: rank 1: watchdog: all_reduce_sum on group \"dp\" (rank 1 of 4) not complete "
            "after 3.0 s (parallel.timeout_s = 3) at step 7 (training step; outside any "
            "micro-batch); a rank is stuck or gone: stopping the job");
  EXPECT_EQ(line.find('\n'), std::string::npos);
  wd.tick(10.0);  // once only
  EXPECT_EQ(sink.n_fired(), 1u);
}

TEST(Watchdog, NamesPeerMicroBatchAndScheduleOp) {
  Sink sink;
  Watchdog wd(manual(sink, 2.0));
  NamedComm world("world", 0, 4);
  wd.set_step(3);
  wd.set_phase("training step");
  wd.set_micro_batch(5);
  wd.set_schedule_op(14, "F&B");
  wd.tick(0.0);
  wd.wait_begin(&world, CommOp::kRecvStart, 2, true);
  wd.tick(1.0);
  wd.tick(3.3);
  ASSERT_EQ(sink.n_fired(), 1u);
  const std::string& line = sink.fired[0];
  EXPECT_TRUE(has(line, "wait(recv_start) on group \"world\" (rank 0 of 4) with peer 2")) << line;
  EXPECT_TRUE(has(line, "after 2.3 s")) << line;
  EXPECT_TRUE(has(line, "at step 3 (training step; micro-batch 5, schedule op 14 F&B)")) << line;
}

// Communication that completes, however long the phase around it, never fires: only a
// single wait is timed, and a new wait restarts the clock.
TEST(Watchdog, QuietWhenWaitsCompleteInTime) {
  Sink sink;
  Watchdog wd(manual(sink, 1.0));
  NamedComm ep("ep", 0, 2);
  double t = 0;
  wd.tick(t);
  for (int i = 0; i < 100; ++i) {  // 100 short waits over 50 s of ticks
    wd.wait_begin(&ep, CommOp::kAllToAllVStart, -1, true);
    wd.tick(t += 0.5);
    wd.wait_end();
    wd.tick(t += 0.01);
  }
  wd.set_phase("evaluating");  // a long phase without communication
  for (int i = 0; i < 100; ++i) wd.tick(t += 1.0);
  // Waits that each outlast a poll but not the timeout: a new wait is a new clock.
  for (int i = 0; i < 20; ++i) {
    wd.wait_begin(&ep, CommOp::kBarrier, -1, false);
    wd.tick(t += 0.5);
    wd.tick(t += 0.49);
    wd.wait_end();
  }
  EXPECT_EQ(sink.n_fired(), 0u);
  EXPECT_EQ(wd.describe_wait(1.0), "");
}

// The monitor thread on the real clock: a wait left open fires between the timeout and the
// timeout plus a poll (0.3 s / 4 here); waits that end in time never do.
TEST(Watchdog, ThreadFiresOnlyOnAStuckWait) {
  NamedComm world("world", 1, 2);
  Sink quiet_sink;
  {
    WatchdogOptions o = manual(quiet_sink, 0.3);
    o.start_thread = true;
    Watchdog wd(std::move(o));
    ASSERT_TRUE(wd.running());
    for (int i = 0; i < 60; ++i) {  // 1.2 s of 20 ms waits
      wd.wait_begin(&world, CommOp::kBroadcast, -1, false);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      wd.wait_end();
    }
  }
  EXPECT_EQ(quiet_sink.n_fired(), 0u);

  Sink sink;
  WatchdogOptions o = manual(sink, 0.3);
  o.start_thread = true;
  Watchdog wd(std::move(o));
  wd.set_step(2);
  const auto t0 = std::chrono::steady_clock::now();
  wd.wait_begin(&world, CommOp::kSend, 0, false);
  while (sink.n_fired() == 0 && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5))
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  wd.wait_end();
  ASSERT_EQ(sink.n_fired(), 1u);
  EXPECT_GE(waited, 0.3);
  EXPECT_LT(waited, 1.5);
  EXPECT_TRUE(has(sink.fired[0], "send on group \"world\" (rank 1 of 2) with peer 0")) << sink.fired[0];
  EXPECT_TRUE(has(sink.fired[0], "at step 2")) << sink.fired[0];
}

// Heartbeat on an injected clock: a line when stdout was quiet for heartbeat_s, with the step,
// the phase and how long the phase has lasted; a line the trainer printed resets the timer.
TEST(Watchdog, HeartbeatWhenQuietForTheInterval) {
  Sink sink;
  Watchdog wd(manual(sink, 0, 0.2));
  wd.tick(0.0);
  wd.tick(0.15);
  EXPECT_EQ(sink.n_beats(), 0u);
  wd.tick(0.3);
  ASSERT_EQ(sink.n_beats(), 1u);
  EXPECT_EQ(sink.beats[0], "heartbeat: starting up (0.3 s)");
  wd.set_step(120);
  wd.set_phase("saving checkpoint");
  wd.tick(0.4);  // the new phase is seen here
  wd.tick(0.49);
  EXPECT_EQ(sink.n_beats(), 1u);
  wd.tick(0.6);
  ASSERT_EQ(sink.n_beats(), 2u);
  EXPECT_EQ(sink.beats[1], "heartbeat: step 120, saving checkpoint (0.2 s)");
  wd.tick(41.4);
  ASSERT_EQ(sink.n_beats(), 3u);
  EXPECT_EQ(sink.beats[2], "heartbeat: step 120, saving checkpoint (41 s)");
  wd.note_output();  // the trainer printed: quiet from here
  wd.tick(41.5);
  wd.tick(41.65);
  EXPECT_EQ(sink.n_beats(), 3u);
  wd.tick(41.75);
  EXPECT_EQ(sink.n_beats(), 4u);
  EXPECT_EQ(sink.n_fired(), 0u);  // no timeout set: waits are not watched
}

// The same on the real clock: about one line per 0.2 s over a second of silence.
TEST(Watchdog, HeartbeatThreadOnTheRealClock) {
  Sink sink;
  WatchdogOptions o = manual(sink, 0, 0.2);
  o.start_thread = true;
  {
    Watchdog wd(std::move(o));
    wd.set_step(3);
    wd.set_phase("evaluating");
    std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  }
  const size_t n = sink.n_beats();
  EXPECT_GE(n, 3u);
  EXPECT_LE(n, 6u);
  for (const std::string& b : sink.beats)
    EXPECT_EQ(b.rfind("heartbeat: step 3, evaluating (", 0), 0u) << b;
}

// The real binary: rank 1 sleeps inside step 3, rank 0 waits for it in the first collective
// of the step, and with parallel.timeout_s = 3 the job ends non-zero within seconds with one
// watchdog line naming the wait, its group and the step. Data parallel (a collective) and
// pipeline (a point-to-point transfer with its peer).
TEST(Watchdog, StuckRankStopsTheJobNamingTheWait) {
  using namespace moe_test;
  struct Case {
    const char* name;
    const char* layout;
    const char* expect;  // in the watchdog line
  };
  const Case cases[] = {
      {"dp", " --set parallel.dp=2", " on group \""},
      {"pp", " --set parallel.pp=2", "wait(recv_start) on group \"world\" (rank 0 of 2) with peer 1"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const fs::path d = make_run(std::string("watchdog_") + c.name);
    ::setenv("MOETRAIN_TEST_SLEEP_AT", "1:3:60", 1);
    Proc p = spawn(d, std::string("train --config c.toml --set training.micro_batch=2 "
                                  "--set parallel.timeout_s=3 --set training.steps=1000") + c.layout,
                   2);
    ::unsetenv("MOETRAIN_TEST_SLEEP_AT");
    wait_for_first_step(d);
    const auto t0 = std::chrono::steady_clock::now();
    const int code = wait_exit(p);
    const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%s: job ended %.1f s after its first step (exit %d)\n", c.name, took, code);
    EXPECT_NE(code, 0);
    EXPECT_NE(code, 124) << "the job hung until the harness's timeout";
    EXPECT_LT(took, 10.0);
    const std::string err = slurp(d / "err.txt");
    int lines = 0;
    std::string line;
    for (size_t at = err.find("watchdog:"); at != std::string::npos; at = err.find("watchdog:", at + 1)) {
      ++lines;
      const size_t begin = err.rfind('\n', at) == std::string::npos ? 0 : err.rfind('\n', at) + 1;
      line = err.substr(begin, err.find('\n', at) - begin);
    }
    EXPECT_EQ(lines, 1) << err;
    EXPECT_EQ(line.rfind("error: rank 0: watchdog: ", 0), 0u) << line;
    EXPECT_TRUE(has(line, c.expect)) << line;
    EXPECT_TRUE(has(line, "(parallel.timeout_s = 3) at step 3 (training step; ")) << line;
  }
}

}  // namespace
