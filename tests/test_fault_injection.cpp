// Fault injection through the real binary under mpirun (CTest label 'fault'; not 'unit': no
// sanitizer run). docs/RELIABILITY.md lists what each test proves.
//  - A random rank of a 2- or 4-rank job is SIGKILLed 20 times in all: in turn at a random
//    moment, while the other ranks wait inside a step's collective for one that sleeps there,
//    and as soon as a checkpoint save has begun: each time the job ends
//    within 10 s, every published checkpoint verifies, and resuming ends with the
//    uninterrupted run's per-step losses and final checkpoint, bit for bit.
//  - The disk fills up during a save (a soft RLIMIT_FSIZE on the writing process: writes past
//    it fail with EFBIG): one clear line, the previous checkpoint stays valid, and the run
//    stops non-zero or continues as checkpoint.on_save_error says.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "model/check.h"
#include "model/rng.h"
#include "tests/binary_harness.h"

namespace {

using namespace moe_test;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Every checkpoint under its final name in d/ckpt verifies (all checksums), and `latest`,
// when present, names one of them. Returns how many there are.
int verify_published(const fs::path& d) {
  int n = 0;
  if (!fs::exists(d / "ckpt")) return 0;
  for (const auto& e : fs::directory_iterator(d / "ckpt")) {
    const std::string name = e.path().filename().string();
    if (!name.starts_with("step-") || !name.ends_with(".h5")) continue;
    ++n;
    try {
      moe::CheckpointReader r(e.path().string());
      EXPECT_EQ(r.verify_all(), "") << e.path();
    } catch (const moe::UserError& err) {
      ADD_FAILURE() << "published checkpoint does not load: " << err.what();
    }
  }
  const std::string latest = slurp(d / "ckpt" / "latest");
  if (!latest.empty()) {
    EXPECT_TRUE(fs::exists(d / "ckpt" / latest.substr(0, latest.size() - 1))) << latest;
  }
  return n;
}

// The checkpoint temporary files in d/ckpt (a save in progress, or one cut short).
std::vector<std::string> temp_files(const fs::path& d) {
  std::vector<std::string> out;
  if (!fs::exists(d / "ckpt")) return out;
  for (const auto& e : fs::directory_iterator(d / "ckpt"))
    if (e.path().filename().string().find(".h5.tmp.") != std::string::npos)
      out.push_back(e.path().filename().string());
  return out;
}
bool temp_file_left(const fs::path& d) { return !temp_files(d).empty(); }

int count_lines(const std::string& s) { return static_cast<int>(std::count(s.begin(), s.end(), '\n')); }

int64_t steps_done(const fs::path& d) { return static_cast<int64_t>(losses(d / "metrics.jsonl").size()); }

// The step of the checkpoint `latest` names; 0 before the first.
int64_t latest_step(const fs::path& d) {
  const std::string latest = slurp(d / "ckpt" / "latest");  // "step-00000012.h5\n"
  return latest.size() > 5 ? std::stoll(latest.substr(5)) : 0;
}

// Polls until `pred` holds or `timeout_s` passes; returns pred().
template <typename Pred>
bool wait_until(Pred pred, double timeout_s, Clock::duration poll = std::chrono::milliseconds(5)) {
  const auto t0 = Clock::now();
  while (!pred() && seconds_since(t0) < timeout_s) std::this_thread::sleep_for(poll);
  return pred();
}

// The world rank of a training process, from its environment (Open MPI sets it).
int world_rank_of(pid_t pid) {
  const std::string env = slurp(fs::path("/proc") / std::to_string(pid) / "environ");
  const std::string key = std::string("OMPI_COMM_WORLD_RANK=");
  for (size_t at = 0; at < env.size(); at = env.find('\0', at) + 1) {
    if (env.compare(at, key.size(), key) == 0) return std::atoi(env.c_str() + at + key.size());
    if (env.find('\0', at) == std::string::npos) break;
  }
  return -1;
}

// Sets a soft file-size limit on a running process (the hard limit stays: the writer lifts
// the soft one to close an abandoned file). Writes past it fail with EFBIG; moetrain ignores
// SIGXFSZ.
void limit_file_size(pid_t pid, rlim_t bytes) {
  rlimit now{};
  ASSERT_EQ(prlimit(pid, RLIMIT_FSIZE, nullptr, &now), 0);
  rlimit lim{bytes, now.rlim_max};
  ASSERT_EQ(prlimit(pid, RLIMIT_FSIZE, &lim, nullptr), 0);
}
void unlimit_file_size(pid_t pid) {
  rlimit now{};
  ASSERT_EQ(prlimit(pid, RLIMIT_FSIZE, nullptr, &now), 0);
  rlimit lim{now.rlim_max, now.rlim_max};
  ASSERT_EQ(prlimit(pid, RLIMIT_FSIZE, &lim, nullptr), 0);
}

// Runs `moetrain <args>` like spawn(), with MOETRAIN_TEST_SLEEP_AT set for it.
Proc spawn_sleeping(const fs::path& d, const std::string& args, const std::string& sleep_at, int np = 0) {
  ::setenv("MOETRAIN_TEST_SLEEP_AT", sleep_at.c_str(), 1);
  Proc p = spawn(d, args, np);
  ::unsetenv("MOETRAIN_TEST_SLEEP_AT");
  return p;
}

// When a kill comes: 0.1-1.5 s after launch, wherever the job is; while the other ranks wait
// in a step's collective for one that sleeps there; as soon as a save has begun.
enum class Aim { kAnywhere, kStep, kSave };

struct KillCounts {
  // Where the kills landed: before this launch's first step, while a save's temporary file
  // existed, or in training (steps, evaluations and their collectives). saves_cut: jobs that
  // left a temporary file (the survivors of a kill start their SIGTERM save, which cannot
  // finish without the dead rank).
  int kills = 0, in_startup = 0, in_save = 0, in_steps = 0, saves_cut = 0, by_rank[4] = {};
  // Kills aimed at a step (a rank sleeps in it) or a save, and how many landed there.
  int aimed_at_step = 0, aimed_in_steps = 0, aimed_at_save = 0, aimed_in_saves = 0;
  double slowest_end_s = 0;
};

// `kills` times: launch (or resume) the job and SIGKILL a random rank at the moment `Aim`
// picks in turn (timing alone put too few kills in steps on a loaded machine); check the job
// ends within 10 s and that every published checkpoint verifies. A kill aimed at a step sets
// a random rank to sleep 4 s in the second step after the resumed checkpoint and comes once
// the first step's checkpoint is published. Then finish the run and compare it with an
// uninterrupted one.
void kill_and_resume(const std::string& name, int np, const std::string& args, int kills,
                     uint64_t stream, KillCounts& c) {
  SCOPED_TRACE(name);
  const auto t_start = Clock::now();
  const fs::path ref = make_run("fault_" + name + "_ref");
  ASSERT_EQ(run(ref, args, np), 0) << slurp(ref / "err.txt");
  const std::vector<std::string> ref_losses = losses(ref / "metrics.jsonl");

  const fs::path d = make_run("fault_" + name);
  int done = 0;
  for (int attempt = 0; done < kills && attempt < 3 * kills; ++attempt) {
    const int64_t resumed_at = latest_step(d), lines_before = steps_done(d);
    const std::vector<std::string> stale = temp_files(d);  // from the job before: not a save now
    const auto saving_now = [&] {
      for (const std::string& t : temp_files(d))
        if (std::find(stale.begin(), stale.end(), t) == stale.end()) return true;
      return false;
    };
    const auto launch = Clock::now();
    const Aim aim = static_cast<Aim>(attempt % 3);
    const int sleeper = static_cast<int>(moe::rng_u64(2024, stream + 2, static_cast<uint64_t>(attempt)) % np);
    Proc p = aim == Aim::kStep ? spawn_sleeping(d, args + " --resume",
                                  std::to_string(sleeper) + ":" + std::to_string(resumed_at + 2) + ":4", np)
                 : spawn(d, args + " --resume", np);
    if (aim == Aim::kStep) {
      wait_until([&] { return latest_step(d) > resumed_at && !saving_now(); }, 20.0);
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    } else if (aim == Aim::kAnywhere) {
      const double delay = 0.1 + 1.4 * moe::rng_uniform(2024, stream, static_cast<uint64_t>(attempt));
      std::this_thread::sleep_until(launch + std::chrono::duration_cast<Clock::duration>(
                                                 std::chrono::duration<double>(delay)));
    }
    // mpirun starts its ranks within a fraction of a second; a kill time before that waits.
    std::vector<pid_t> ranks;
    wait_until([&] { return (ranks = rank_pids(p.pid)).size() == static_cast<size_t>(np); }, 10.0);
    if (ranks.size() != static_cast<size_t>(np)) {  // the job is gone already: finished?
      const int code = wait_exit(p);
      ASSERT_EQ(code, 0) << slurp(d / "err.txt");
      break;
    }
    // Aimed at a save: the kill follows the sight of this job's temporary file by microseconds.
    if (aim == Aim::kSave) wait_until(saving_now, 20.0, std::chrono::microseconds(200));
    const pid_t victim = ranks[moe::rng_u64(2024, stream + 1, static_cast<uint64_t>(attempt)) % ranks.size()];
    const int victim_rank = world_rank_of(victim);
    const bool saving = saving_now();  // a temporary file this job made exists
    kill(victim, SIGKILL);
    const auto t_kill = Clock::now();
    const int code = wait_exit(p);
    const double took = seconds_since(t_kill);
    if (code == 0) break;  // finished before the kill
    ++done;
    EXPECT_NE(code, 124) << "the job hung after rank " << victim_rank << " was killed";
    EXPECT_LT(took, 10.0) << "kill " << done << " (rank " << victim_rank << ")";
    c.slowest_end_s = std::max(c.slowest_end_s, took);
    if (victim_rank >= 0 && victim_rank < 4) ++c.by_rank[victim_rank];
    c.saves_cut += temp_file_left(d);
    // This job finished a step: it published a checkpoint, or wrote more metrics lines than
    // the job before left.
    const bool stepped = latest_step(d) > resumed_at || steps_done(d) > lines_before;
    if (saving) ++c.in_save;
    else if (!stepped) ++c.in_startup;
    else ++c.in_steps;
    if (aim == Aim::kStep) {
      ++c.aimed_at_step;
      if (!saving && stepped) ++c.aimed_in_steps;
    }
    if (aim == Aim::kSave) {
      ++c.aimed_at_save;
      c.aimed_in_saves += saving;
    }
    verify_published(d);
  }
  c.kills += done;
  EXPECT_EQ(done, kills) << "the run ended before every kill landed: lengthen it";
  ASSERT_EQ(run(d, args + " --resume", np), 0) << slurp(d / "err.txt");
  EXPECT_FALSE(temp_file_left(d));
  const std::vector<std::string> got = losses(d / "metrics.jsonl");
  ASSERT_EQ(got.size(), ref_losses.size());
  EXPECT_EQ(got, ref_losses);
  const std::string last = "step-" + std::string(8 - std::to_string(ref_losses.size()).size(), '0') +
                           std::to_string(ref_losses.size()) + ".h5";
  expect_same_checkpoint(ref / "ckpt" / last, d / "ckpt" / last);
  std::printf("%s: %d kills in %.1f s\n", name.c_str(), done, seconds_since(t_start));
}

// 20 SIGKILLs of a random rank: 10 on 2 ranks (data + expert parallel: all-to-alls and
// reductions in every step), 10 on 4 ranks (pipeline 2 x data 2 x expert 2: point-to-point
// transfers as well). A checkpoint after every step, so many kills land inside a save.
TEST(FaultInjection, KillRandomRankTwentyTimesResumesBitExact) {
  const std::string common = "train --config c.toml --set training.micro_batch=2 --set parallel.dp=2 "
                             "--set parallel.ep=2 --set log.samples=0";
  KillCounts c;
  kill_and_resume("dp2_ep2", 2, common + " --set training.steps=600", 10, 10, c);
  kill_and_resume("pp2_dp2_ep2", 4, common + " --set parallel.pp=2 --set training.steps=400", 10, 20, c);
  std::printf("kills %d: %d during start-up, %d during a save, %d during training steps; "
              "%d jobs left a save unfinished; by rank %d/%d/%d/%d; slowest job end %.1f s "
              "after its kill; aimed at a step %d, in one %d; at a save %d, in one %d\n",
              c.kills, c.in_startup, c.in_save, c.in_steps, c.saves_cut, c.by_rank[0],
              c.by_rank[1], c.by_rank[2], c.by_rank[3], c.slowest_end_s, c.aimed_at_step, c.aimed_in_steps, c.aimed_at_save,
              c.aimed_in_saves);
  EXPECT_EQ(c.kills, 20);
  EXPECT_GE(c.in_save, 1) << "no kill landed inside a save; the test proved less";
  EXPECT_EQ(c.aimed_at_step, 6);
  EXPECT_EQ(c.aimed_in_steps, c.aimed_at_step) << "a kill aimed at a step landed elsewhere";
  EXPECT_EQ(c.aimed_at_save, 6);
  EXPECT_GE(c.aimed_in_saves, 1) << "no kill aimed at a save landed in one";
}

// "continue" after the save at step 10 hit the file-size limit of `writer` (the process that
// writes checkpoints, inside job p): once the warning is out the limit is lifted (the trainer
// sleeps in step 12 meanwhile), and the job must end 0 with exactly that one warning, saves
// at 20 and 24 published, and the losses and final checkpoint of the run in `ref`.
void expect_trained_past_disk_full(Proc p, pid_t writer, const fs::path& d, const fs::path& ref) {
  const bool warned = wait_until([&] { return slurp(d / "err.txt").find("warning: checkpoint at step 10") != std::string::npos; }, 20.0);
  unlimit_file_size(writer);
  ASSERT_EQ(wait_exit(p), 0) << slurp(d / "err.txt");
  ASSERT_TRUE(warned);
  const std::string err = slurp(d / "err.txt");
  EXPECT_EQ(count_lines(err), 1) << err;
  EXPECT_EQ(err.rfind("warning: checkpoint at step 10 not saved: ckpt/step-00000010.h5.tmp.", 0), 0u) << err;
  EXPECT_NE(err.find("(File too large); training continues (checkpoint.on_save_error = \"continue\"); "
                     "the newest checkpoint is ckpt/step-00000005.h5\n"), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(d / "ckpt" / "step-00000010.h5"));
  EXPECT_FALSE(temp_file_left(d));
  EXPECT_EQ(verify_published(d), 2);  // keep_last = 2: steps 20 and 24
  EXPECT_EQ(slurp(d / "ckpt" / "latest"), "step-00000024.h5\n");
  EXPECT_EQ(losses(d / "metrics.jsonl"), losses(ref / "metrics.jsonl"));
  expect_same_checkpoint(ref / "ckpt" / "step-00000024.h5", d / "ckpt" / "step-00000024.h5");
}

// One process, checkpoint.on_save_error = "continue": the save at step 10 hits the file-size
// limit, a warning names it, training goes on; the limit is lifted during step 12 (the trainer
// sleeps there for the test), and the later saves succeed. The losses are the straight run's.
TEST(FaultInjection, DiskFullContinueWarnsAndLaterSavesSucceed) {
  const std::string args = "train --config c.toml --set checkpoint.every=5";
  const fs::path ref = make_run("diskfull_ref");
  ASSERT_EQ(run(ref, args), 0) << slurp(ref / "err.txt");
  const fs::path d = make_run("diskfull_continue");
  ASSERT_EQ(run(d, args + " --set training.exit_at_step=5"), 0) << slurp(d / "err.txt");
  Proc p = spawn_sleeping(d, args + " --resume --set checkpoint.on_save_error=continue", "0:12:2");
  limit_file_size(p.pid, 64 << 10);  // spawn exec'ed moetrain as p.pid
  expect_trained_past_disk_full(p, p.pid, d, ref);
}

// One process, the default checkpoint.on_save_error = "stop": one error line naming the
// checkpoint and the OS error, exit 1, the previous checkpoint intact and resumable.
TEST(FaultInjection, DiskFullStopEndsWithOneLineAndKeepsPrevious) {
  const std::string args = "train --config c.toml --set checkpoint.every=5";
  const fs::path d = make_run("diskfull_stop");
  ASSERT_EQ(run(d, args + " --set training.exit_at_step=5"), 0) << slurp(d / "err.txt");
  Proc p = spawn(d, args + " --resume");
  limit_file_size(p.pid, 64 << 10);  // before the first save (step 10: tens of ms away)
  EXPECT_EQ(wait_exit(p), 1);
  const std::string err = slurp(d / "err.txt");
  EXPECT_EQ(count_lines(err), 1) << err;
  EXPECT_EQ(err.rfind("error: checkpoint at step 10 not saved: ckpt/step-00000010.h5.tmp.", 0), 0u) << err;
  EXPECT_NE(err.find("(File too large); stopping (checkpoint.on_save_error = \"stop\"); the newest "
                     "checkpoint is ckpt/step-00000005.h5\n"), std::string::npos) << err;
  EXPECT_EQ(steps_done(d), 10);
  EXPECT_FALSE(temp_file_left(d));
  EXPECT_EQ(verify_published(d), 1);
  write(d / "log.txt", "");
  ASSERT_EQ(run(d, args + " --resume --set training.exit_at_step=12"), 0) << slurp(d / "err.txt");
  EXPECT_NE(slurp(d / "log.txt").find("resume: ckpt/step-00000005.h5 at step 5"), std::string::npos);
}

// Two ranks, rank 0 (the writer) hits the file-size limit inside the collective save at step
// 10. Rank 0 sleeps in step 7 so the limit is set after MPI's start-up (whose shared-memory
// files it would refuse) and before that save. Returns the running job and rank 0's pid.
struct MpiDiskFull {
  Proc p;
  pid_t rank0 = -1;
};
MpiDiskFull start_mpi_disk_full(const fs::path& d, const std::string& args, const std::string& sleeps) {
  MpiDiskFull j;
  EXPECT_EQ(run(d, args + " --set training.exit_at_step=5", 2), 0) << slurp(d / "err.txt");
  j.p = spawn_sleeping(d, args + " --resume", sleeps, 2);
  EXPECT_TRUE(wait_until([&] { return steps_done(d) >= 6; }, 20.0)) << slurp(d / "err.txt");
  for (pid_t r : rank_pids(j.p.pid))
    if (world_rank_of(r) == 0) j.rank0 = r;
  EXPECT_GT(j.rank0, 0);
  if (j.rank0 > 0) limit_file_size(j.rank0, 64 << 10);
  return j;
}

const char* kMpiDiskFullArgs = "train --config c.toml --set checkpoint.every=5 --set training.micro_batch=2 "
                               "--set parallel.dp=2";

// "continue" with two ranks: the failed save leaves both ranks outside its collectives, so the
// job warns once and trains on; the limit is lifted while rank 0 sleeps in step 12, and the
// later saves succeed. The losses and the final checkpoint are the straight run's.
TEST(FaultInjection, DiskFullUnderMpiContinueWarnsAndTrainsOn) {
  const std::string args = kMpiDiskFullArgs;
  const fs::path ref = make_run("diskfull_mpi_ref");
  ASSERT_EQ(run(ref, args, 2), 0) << slurp(ref / "err.txt");
  const fs::path d = make_run("diskfull_mpi_continue");
  MpiDiskFull j = start_mpi_disk_full(d, args + " --set checkpoint.on_save_error=continue", "0:7:2,0:12:2");
  ASSERT_GT(j.rank0, 0);
  expect_trained_past_disk_full(j.p, j.rank0, d, ref);
}

// The default "stop" with two ranks: the job ends within seconds, non-zero, with one line from
// rank 0 naming the cause; the previous checkpoint stays valid.
TEST(FaultInjection, DiskFullUnderMpiStopEndsEveryRankWithOneLine) {
  const fs::path d = make_run("diskfull_mpi");
  MpiDiskFull j = start_mpi_disk_full(d, kMpiDiskFullArgs, "0:7:2");
  ASSERT_GT(j.rank0, 0);
  const auto t0 = Clock::now();
  const int code = wait_exit(j.p);
  const double took = seconds_since(t0);
  EXPECT_NE(code, 0);
  EXPECT_NE(code, 124) << "hung";
  EXPECT_LT(took, 12.0);  // 2 s of injected sleep + 4 steps + the abort
  const std::string err = slurp(d / "err.txt");
  size_t lines = 0, at = 0;
  for (; (at = err.find("checkpoint at step 10 not saved", at)) != std::string::npos; ++at) ++lines;
  EXPECT_EQ(lines, 1u) << err;
  EXPECT_NE(err.find("error: rank 0: checkpoint at step 10 not saved: ckpt/step-00000010.h5.tmp."),
            std::string::npos) << err;
  EXPECT_NE(err.find("(File too large); stopping (checkpoint.on_save_error = \"stop\"); the newest "
                     "checkpoint is ckpt/step-00000005.h5"), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(d / "ckpt" / "step-00000010.h5"));
  EXPECT_EQ(verify_published(d), 1);
}

}  // namespace
