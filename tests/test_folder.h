// Scratch folders for tests that run the binary: <TempDir>/<name>_<pid>, made afresh and
// removed when the process exits (kept with MOETRAIN_KEEP_TEST_DIRS=1, to look at a failure).
// The pid keeps two test runs on one machine (a developer's and CI's) apart.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

namespace moe_test {

inline std::vector<std::filesystem::path>& test_folders_made() {
  static std::vector<std::filesystem::path> folders;
  static const bool registered = [] {
    std::atexit([] {
      if (std::getenv("MOETRAIN_KEEP_TEST_DIRS")) return;
      std::error_code ec;
      for (const std::filesystem::path& d : test_folders_made()) std::filesystem::remove_all(d, ec);
    });
    return true;
  }();
  (void)registered;
  return folders;
}

inline std::filesystem::path test_folder(const std::string& name) {
  std::filesystem::path d = std::filesystem::path(::testing::TempDir()) /
                            (name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  test_folders_made().push_back(d);
  return d;
}

}  // namespace moe_test
