// Checkpoints through the real binary: bit-exact resume after SIGKILL at random moments
// (including during saves), graceful SIGTERM, exit_at_step splitting, fallback past corrupt
// checkpoints, and refusal of unsafe config changes.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "io/checkpoint_file.h"
#include "model/rng.h"

namespace {

namespace fs = std::filesystem;

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void write(const fs::path& p, const std::string& text) {
  std::ofstream f(p, std::ios::binary);
  f << text;
}

// A run folder with prepared data and a small, fast config.
fs::path make_run(const std::string& name, const std::string& extra = "") {
  fs::path d = fs::path(::testing::TempDir()) / ("moetrain_resume_" + name);
  fs::remove_all(d);
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

Proc spawn(const fs::path& dir, const std::string& args) {
  Proc p;
  p.pid = fork();
  if (p.pid == 0) {
    if (chdir(dir.c_str()) != 0) _exit(127);
    // One thread: ctest runs tests in parallel, and spinning OpenMP teams of two processes on
    // two cores would slow each step a hundredfold. Bit-exactness holds for any fixed count.
    setenv("OMP_NUM_THREADS", "1", 1);
    const std::string cmd = std::string("exec ") + MOETRAIN_BINARY + " " + args +
                            " >>log.txt 2>>err.txt";
    execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  return p;
}

int wait_exit(Proc p) {
  int status = 0;
  waitpid(p.pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

int run(const fs::path& dir, const std::string& args) { return wait_exit(spawn(dir, args)); }

// "loss" values per step, as written (17 significant digits: bit-exact for a double).
std::vector<std::string> losses(const fs::path& metrics) {
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
void expect_same_checkpoint(const fs::path& a, const fs::path& b) {
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

TEST(Resume, KilledAtRandomMomentsContinuesBitExact) {
  // Long enough (a few seconds, a save after every step) that most kills land mid-run.
  const std::string kSteps = " --set training.steps=150";
  const fs::path straight = make_run("straight");
  ASSERT_EQ(run(straight, "train --config c.toml" + kSteps), 0) << slurp(straight / "err.txt");
  const std::vector<std::string> ref = losses(straight / "metrics.jsonl");
  ASSERT_EQ(ref.size(), 150u);

  const fs::path killed = make_run("killed");
  int kills = 0, kills_mid_save = 0, attempts = 0;
  for (; attempts < 80; ++attempts) {
    Proc p = spawn(killed, "train --config c.toml --resume" + kSteps);
    const double delay = 0.1 + 0.5 * moe::rng_uniform(42, 1, static_cast<uint64_t>(attempts));
    std::this_thread::sleep_for(std::chrono::duration<double>(delay));
    kill(p.pid, SIGKILL);
    const int code = wait_exit(p);
    if (code == 0) break;  // finished before the kill
    ++kills;
    if (!fs::exists(killed / "ckpt")) continue;
    for (const auto& e : fs::directory_iterator(killed / "ckpt"))
      if (e.path().filename().string().ends_with(".tmp." + std::to_string(p.pid))) {
        ++kills_mid_save;
        break;
      }
  }
  // Finish whatever remains without killing.
  ASSERT_EQ(run(killed, "train --config c.toml --resume" + kSteps), 0) << slurp(killed / "err.txt");
  // The killed runs really continued from checkpoints (not from scratch each time).
  const std::string log = slurp(killed / "log.txt");
  int resumes = 0;
  for (size_t at = log.find("resume: ckpt/"); at != std::string::npos; at = log.find("resume: ckpt/", at + 1))
    ++resumes;
  std::printf("kills %d (mid-save %d), resumes %d\n", kills, kills_mid_save, resumes);
  EXPECT_GE(kills, 3);
  EXPECT_GE(resumes, 3);
  EXPECT_GE(kills_mid_save, 1) << "no kill landed inside a save; the test proved less";
  EXPECT_EQ(losses(killed / "metrics.jsonl"), ref);
  expect_same_checkpoint(straight / "ckpt" / "step-00000150.h5", killed / "ckpt" / "step-00000150.h5");
}

TEST(Resume, ExitAtStepThenResumeEqualsStraight) {
  const fs::path straight = make_run("exit_straight");
  ASSERT_EQ(run(straight, "train --config c.toml"), 0);
  const fs::path split = make_run("exit_split");
  ASSERT_EQ(run(split, "train --config c.toml --set training.exit_at_step=10"), 0);
  EXPECT_TRUE(fs::exists(split / "ckpt" / "step-00000010.h5"));
  EXPECT_FALSE(fs::exists(split / "ckpt" / "step-00000011.h5"));
  EXPECT_NE(slurp(split / "log.txt").find("stopped at step 10"), std::string::npos);
  ASSERT_EQ(run(split, "train --config c.toml --resume --set training.exit_at_step=17"), 0);
  ASSERT_EQ(run(split, "train --config c.toml --resume"), 0);
  EXPECT_EQ(losses(split / "metrics.jsonl"), losses(straight / "metrics.jsonl"));
  expect_same_checkpoint(straight / "ckpt" / "step-00000024.h5", split / "ckpt" / "step-00000024.h5");
  // keep_last = 2: only the two newest remain, and latest names the newest.
  int files = 0;
  for (const auto& e : fs::directory_iterator(split / "ckpt")) files += e.path().extension() == ".h5";
  EXPECT_EQ(files, 2);
  EXPECT_EQ(slurp(split / "ckpt" / "latest"), "step-00000024.h5\n");
}

TEST(Resume, SigtermSavesAndExitsZero) {
  const fs::path d = make_run("sigterm");
  Proc p = spawn(d, "train --config c.toml --set training.steps=100000 --set checkpoint.every=0");
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  kill(p.pid, SIGTERM);
  EXPECT_EQ(wait_exit(p), 0);
  const std::string log = slurp(d / "log.txt");
  EXPECT_NE(log.find("SIGTERM"), std::string::npos) << log;
  const std::string latest = slurp(d / "ckpt" / "latest");
  ASSERT_FALSE(latest.empty());
  EXPECT_TRUE(fs::exists(d / "ckpt" / latest.substr(0, latest.size() - 1)));
}

TEST(Resume, CorruptNewestFallsBackToPrevious) {
  const fs::path d = make_run("corrupt");
  ASSERT_EQ(run(d, "train --config c.toml --set training.exit_at_step=6"), 0);
  const fs::path newest = d / "ckpt" / "step-00000006.h5";
  ASSERT_TRUE(fs::exists(newest));
  // Flip bytes in the middle of the file (tensor data, checksummed).
  std::string bytes = slurp(newest);
  for (size_t i = bytes.size() / 2; i < bytes.size() / 2 + 64; ++i) bytes[i] = static_cast<char>(~bytes[i]);
  write(newest, bytes);
  ASSERT_EQ(run(d, "train --config c.toml --resume --set training.exit_at_step=8"), 0);
  const std::string err = slurp(d / "err.txt"), log = slurp(d / "log.txt");
  EXPECT_NE(err.find("step-00000006.h5"), std::string::npos) << err;
  EXPECT_NE(log.find("step-00000005.h5 at step 5"), std::string::npos) << log;

  // Truncated newest, and no latest pointer: still falls back by file order.
  const fs::path n8 = d / "ckpt" / "step-00000008.h5";
  fs::resize_file(n8, fs::file_size(n8) / 3);
  fs::remove(d / "ckpt" / "latest");
  write(d / "err.txt", "");
  ASSERT_EQ(run(d, "train --config c.toml --resume --set training.exit_at_step=9"), 0);
  EXPECT_NE(slurp(d / "log.txt").find("step-00000007.h5 at step 7"), std::string::npos);

  // Garbage everywhere: a clear error, non-zero, nothing started.
  for (const auto& e : fs::directory_iterator(d / "ckpt"))
    if (e.path().extension() == ".h5") write(e.path(), "garbage");
  write(d / "err.txt", "");
  EXPECT_NE(run(d, "train --config c.toml --resume"), 0);
  EXPECT_NE(slurp(d / "err.txt").find("no valid checkpoint"), std::string::npos) << slurp(d / "err.txt");
}

TEST(Resume, UnsafeChangesRefusedSafeOnesReported) {
  const fs::path d = make_run("changes");
  ASSERT_EQ(run(d, "train --config c.toml --set training.exit_at_step=3"), 0);
  EXPECT_NE(run(d, "train --config c.toml --resume --set model.d_model=64"), 0);
  EXPECT_NE(slurp(d / "err.txt").find("model.d_model"), std::string::npos);
  // Starting fresh over an earlier run's checkpoints is refused, not silently pruned.
  EXPECT_NE(run(d, "train --config c.toml"), 0);
  EXPECT_NE(slurp(d / "err.txt").find("--resume"), std::string::npos);
  ASSERT_EQ(run(d, "train --config c.toml --resume --set training.steps=30 "
                   "--set training.exit_at_step=4"), 0);
  EXPECT_NE(slurp(d / "log.txt").find("changed training.steps: 24 -> 30"), std::string::npos)
      << slurp(d / "log.txt");
}

TEST(CheckpointTools, InspectEvalGenerate) {
  const fs::path d = make_run("tools");
  ASSERT_EQ(run(d, "train --config c.toml --set training.steps=6"), 0);
  ASSERT_EQ(run(d, "inspect ckpt"), 0) << slurp(d / "err.txt");
  const std::string log = slurp(d / "log.txt");
  EXPECT_NE(log.find("step 6 of 6"), std::string::npos) << log;
  EXPECT_NE(log.find("/model/layers/1/moe/experts/3/w_down"), std::string::npos);
  EXPECT_NE(log.find("all"), std::string::npos);
  ASSERT_EQ(run(d, "eval --checkpoint ckpt/step-00000006.h5"), 0);
  EXPECT_NE(slurp(d / "log.txt").find("bits per byte"), std::string::npos);
  write(d / "log.txt", "");
  ASSERT_EQ(run(d, "generate --checkpoint ckpt --prompt Hello --tokens 20 --seed 5"), 0);
  const std::string g1 = slurp(d / "log.txt");
  write(d / "log.txt", "");
  ASSERT_EQ(run(d, "generate --checkpoint ckpt --prompt Hello --tokens 20 --seed 5"), 0);
  EXPECT_EQ(slurp(d / "log.txt"), g1);
  EXPECT_EQ(g1.rfind("Hello", 0), 0u);
  // A corrupted checkpoint: inspect reports it in one line and exits non-zero.
  const fs::path f = d / "ckpt" / "step-00000006.h5";
  std::string bytes = slurp(f);
  for (size_t i = bytes.size() / 2; i < bytes.size() / 2 + 16; ++i) bytes[i] = static_cast<char>(~bytes[i]);
  write(f, bytes);
  write(d / "err.txt", "");
  EXPECT_NE(run(d, "inspect ckpt/step-00000006.h5"), 0);
  EXPECT_FALSE(slurp(d / "err.txt").empty());
}

}  // namespace
