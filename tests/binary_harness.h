// Helpers for tests that run the real moetrain binary: a run folder with prepared data and
// a small config, spawning (optionally under mpirun), reading metrics and checkpoints.
#pragma once

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "io/checkpoint_file.h"
#include "tests/test_folder.h"

namespace moe_test {

namespace fs = std::filesystem;

inline std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

inline void write(const fs::path& p, const std::string& text) {
  std::ofstream f(p, std::ios::binary);
  f << text;
}

// A run folder (tests/test_folder.h) with prepared data and a small, fast config.
inline fs::path make_run(const std::string& name, const std::string& extra = "") {
  const fs::path d = test_folder("moetrain_run_" + name);
  fs::create_directories(d / "text");
  std::string text;
  const char* lines[] = {"It was the best of times, it was the worst of times.\n",
                         "Call me Ishmael. Some years ago, never mind how long.\n",
                         "Happy families are all alike.\n", "In the beginning was the word.\n"};
  for (int i = 0; i < 300; ++i) text += lines[(i * 5) % 4];
  write(d / "text" / "a.txt", text);
  const std::string cmd = "cd '" + d.string() + "' && " + MOETRAIN_BINARY +
                          " prepare --input text --output data >/dev/null";
  EXPECT_EQ(std::system(cmd.c_str()), 0);
  write(d / "c.toml",
        "[model]\nd_model = 32\nn_layers = 2\nn_heads = 2\nn_kv_heads = 2\nseq_len = 32\ndense_layers = 1\n"
        "[moe]\nnum_experts = 4\ntop_k = 2\nd_expert = 32\n"
        "[training]\nsteps = 24\nglobal_batch = 8\nmicro_batch = 4\n"
        "[optim]\nlr = 1e-2\n[lr]\nwarmup_steps = 4\n"
        "[data]\ntrain = \"data/train.bin\"\nval = \"data/val.bin\"\n"
        "[checkpoint]\ndir = \"ckpt\"\nevery = 1\nkeep_last = 2\n"
        "[log]\nevery = 100\neval_every = 8\neval_batches = 2\nsamples = 0\n"
        "metrics_file = \"metrics.jsonl\"\n" + extra);
  return d;
}

struct Proc {
  pid_t pid = -1;
};

// Runs `moetrain <args>` in `dir`, stdout appended to log.txt and stderr to err.txt. With
// np > 0 it runs under `mpirun -np <np>` (allowed as root, oversubscribed, and bounded by
// a timeout so a hang fails the test instead of stalling the suite).
inline Proc spawn(const fs::path& dir, const std::string& args, int np = 0) {
  Proc p;
  p.pid = fork();
  if (p.pid == 0) {
    if (chdir(dir.c_str()) != 0) _exit(127);
    // One thread: ctest runs tests in parallel, and spinning OpenMP teams of two processes on
    // two cores would slow each step a hundredfold. Bit-exactness holds for any fixed count.
    setenv("OMP_NUM_THREADS", "1", 1);
    // Under the sanitizer build the binary runs with leak checking off: Open MPI's own
    // allocations at exit are reported as leaks. Memory errors still abort it.
    setenv("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
    const std::string launcher =
        np > 0 ? "timeout 150 mpirun --oversubscribe -np " + std::to_string(np) + " " : "";
    const std::string cmd = "exec " + launcher + MOETRAIN_BINARY + " " + args +
                            " >>log.txt 2>>err.txt";
    execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  return p;
}

// Waits (up to 20 s) until the run has finished a step, i.e. its metrics file has a line.
inline void wait_for_first_step(const fs::path& d) {
  for (int i = 0; i < 400 && slurp(d / "metrics.jsonl").empty(); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
}

inline int wait_exit(Proc p) {
  int status = 0;
  waitpid(p.pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

inline int run(const fs::path& dir, const std::string& args, int np = 0) {
  return wait_exit(spawn(dir, args, np));
}

// The training ranks started under `root` (mpirun's children), found through /proc so a test
// never touches another test's processes.
inline std::vector<pid_t> rank_pids(pid_t root) {
  std::vector<std::pair<pid_t, pid_t>> procs;  // (pid, parent)
  for (const auto& e : fs::directory_iterator("/proc")) {
    const std::string name = e.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream stat(e.path() / "stat");
    std::string line;
    if (!std::getline(stat, line)) continue;
    const size_t close = line.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream rest(line.substr(close + 2));
    char state = 0;
    pid_t ppid = 0;
    rest >> state >> ppid;
    procs.emplace_back(static_cast<pid_t>(std::stol(name)), ppid);
  }
  std::vector<pid_t> tree = {root}, ranks;
  for (size_t i = 0; i < tree.size(); ++i)
    for (const auto& [pid, ppid] : procs)
      if (ppid == tree[i]) {
        tree.push_back(pid);
        std::ifstream comm(fs::path("/proc") / std::to_string(pid) / "comm");
        std::string c;
        std::getline(comm, c);
        if (c == "moetrain") ranks.push_back(pid);
      }
  return ranks;
}

// "loss" values per step, as written (17 significant digits: bit-exact for a double).
inline std::vector<std::string> losses(const fs::path& metrics) {
  std::vector<std::string> out;
  std::istringstream in(slurp(metrics));
  std::string line;
  while (std::getline(in, line)) {
    const size_t at = line.find("\"loss\": ");
    if (at == std::string::npos) continue;
    out.push_back(line.substr(at + 8, line.find(',', at) - at - 8));
  }
  return out;
}

// Every dataset of two checkpoints equal byte for byte.
inline void expect_same_checkpoint(const fs::path& a, const fs::path& b) {
  moe::CheckpointReader ra(a.string()), rb(b.string());
  const auto la = ra.list(), lb = rb.list();
  ASSERT_EQ(la.size(), lb.size());
  ASSERT_GT(la.size(), 10u);
  for (size_t i = 0; i < la.size(); ++i) {
    ASSERT_EQ(la[i].path, lb[i].path);
    if (la[i].dtype != "float32") continue;
    int64_t n = 1;
    for (int64_t s : la[i].shape) n *= s;
    std::vector<float> va(static_cast<size_t>(n)), vb(static_cast<size_t>(n));
    const int64_t ld = la[i].shape.back();
    ra.read_f32(la[i].path, la[i].shape, va.data(), ld);
    rb.read_f32(lb[i].path, lb[i].shape, vb.data(), ld);
    ASSERT_EQ(std::memcmp(va.data(), vb.data(), va.size() * sizeof(float)), 0) << la[i].path;
  }
  EXPECT_EQ(ra.attr_i64("/meta", "step"), rb.attr_i64("/meta", "step"));
}

// Every float dataset of two checkpoints close: for weights and router biases the relative
// error of the tensor, |a - b| / |a| in the 2-norm, is within `rel`; the Adam moments are
// gradient statistics, which react to the weights' rounding differences more strongly, and
// get 10 rel; no single element differs by more than 10 rel of the tensor's largest
// magnitude. (Different layouts sum gradients in different orders; over a run, Adam turns
// those last-bit differences into slightly larger ones.) moment_rel overrides 10 rel for the
// moments.
inline void expect_close_checkpoint(const fs::path& a, const fs::path& b, double rel,
                                    double moment_rel = 0) {
  moe::CheckpointReader ra(a.string()), rb(b.string());
  const auto la = ra.list(), lb = rb.list();
  ASSERT_EQ(la.size(), lb.size());
  for (size_t i = 0; i < la.size(); ++i) {
    ASSERT_EQ(la[i].path, lb[i].path);
    if (la[i].dtype != "float32") continue;  // weights, both Adam moments, router biases
    int64_t n = 1;
    for (int64_t s : la[i].shape) n *= s;
    std::vector<float> va(static_cast<size_t>(n)), vb(static_cast<size_t>(n));
    ra.read_f32(la[i].path, la[i].shape, va.data(), la[i].shape.back());
    rb.read_f32(lb[i].path, lb[i].shape, vb.data(), lb[i].shape.back());
    double max_abs = 0, max_diff = 0, norm2 = 0, diff2 = 0;
    for (size_t j = 0; j < va.size(); ++j) {
      const double x = va[j], dx = static_cast<double>(va[j]) - vb[j];
      max_abs = std::max(max_abs, std::fabs(x));
      max_diff = std::max(max_diff, std::fabs(dx));
      norm2 += x * x;
      diff2 += dx * dx;
    }
    const bool moment = la[i].path.rfind("/optim/", 0) == 0;
    const double mrel = moment_rel > 0 ? moment_rel : 10 * rel;
    EXPECT_LE(std::sqrt(diff2), (moment ? mrel : rel) * std::sqrt(norm2)) << la[i].path;
    EXPECT_LE(max_diff, (moment ? mrel : 10 * rel) * max_abs) << la[i].path;
  }
}

// Per-step losses equal within `rel`.
inline void expect_close_losses(const std::vector<std::string>& a, const std::vector<std::string>& b,
                                double rel) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    const double x = std::stod(a[i]), y = std::stod(b[i]);
    EXPECT_LE(std::fabs(x - y), rel * std::fabs(x)) << "step " << i + 1 << ": " << a[i] << " vs " << b[i];
  }
}

}  // namespace moe_test
