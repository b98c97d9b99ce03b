// Running the real moetrain binary from a test and checking how it fails: its exit code,
// stdout and stderr captured, and the one-line error every user mistake must produce.
// (tests/binary_harness.h holds the helpers for tests that train.)
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "tests/test_folder.h"

namespace moe_test {

struct BinaryResult {
  int code = -1;  // the exit status; -1 when killed by a signal
  std::string out, err;
};

inline std::string read_text(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

inline void write_text(const std::filesystem::path& p, const std::string& text) {
  std::ofstream f(p, std::ios::binary);
  f << text;
}

// An empty folder for one case (tests/test_folder.h).
inline std::filesystem::path fresh_dir(const std::string& prefix, const std::string& name) {
  return moe_test::test_folder(prefix + name);
}

// Runs `moetrain <args>` (shell words) in `dir` with one OpenMP thread, killed after
// `timeout_s` seconds when > 0 (exit status 124); stdout and stderr are captured through `capture_dir`/stdout.txt and
// stderr.txt (default: `dir`).
inline BinaryResult run_binary(const std::string& args, const std::filesystem::path& dir,
                               int timeout_s = 0, std::filesystem::path capture_dir = {}) {
  if (capture_dir.empty()) capture_dir = dir;
  const std::filesystem::path out = capture_dir / "stdout.txt", err = capture_dir / "stderr.txt";
  // Leak checking off for the spawned binary under ASan: Open MPI's exit-time allocations.
  const std::string limit = timeout_s > 0 ? "timeout " + std::to_string(timeout_s) + " " : "";
  const std::string cmd = "cd '" + dir.string() +
                          "' && OMP_NUM_THREADS=1 ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 " + limit +
                          MOETRAIN_BINARY + " " + args + " >'" + out.string() + "' 2>'" + err.string() + "'";
  const int status = std::system(cmd.c_str());
  BinaryResult r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = read_text(out);
  r.err = read_text(err);
  std::filesystem::remove(out);
  std::filesystem::remove(err);
  return r;
}

inline int count_lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

// One line on stderr, non-zero exit, and the line contains `what`.
inline void expect_one_line_error(const BinaryResult& r, const std::string& what) {
  EXPECT_NE(r.code, 0);
  EXPECT_EQ(count_lines(r.err), 1) << r.err;
  EXPECT_NE(r.err.find(what), std::string::npos) << "stderr: " << r.err << "expected: " << what;
}

}  // namespace moe_test
