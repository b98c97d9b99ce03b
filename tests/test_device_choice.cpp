// The rank-to-GPU rule (model/kernels/cuda/device_choice.h), without a GPU: the launchers'
// variables in their order of precedence, round robin over the visible devices, and a
// malformed variable refused with its name.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "model/check.h"
#include "model/kernels/cuda/device_choice.h"

namespace {

// Sets the three variables for one test and restores them after.
class LauncherEnv {
 public:
  LauncherEnv(const char* ompi, const char* slurm, const char* local) {
    for (int i = 0; i < 3; ++i) {
      const char* v = std::getenv(kVars[i]);
      saved_[i] = v ? v : "";
      had_[i] = v != nullptr;
    }
    set(0, ompi);
    set(1, slurm);
    set(2, local);
  }
  ~LauncherEnv() {
    for (int i = 0; i < 3; ++i) set(i, had_[i] ? saved_[i].c_str() : nullptr);
  }

 private:
  static void set(int i, const char* v) {
    if (v) {
      setenv(kVars[i], v, 1);
    } else {
      unsetenv(kVars[i]);
    }
  }
  static constexpr const char* kVars[3] = {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID",
                                           "LOCAL_RANK"};
  std::string saved_[3];
  bool had_[3] = {};
};

TEST(DeviceChoice, LauncherVariablesInOrder) {
  {
    LauncherEnv e(nullptr, nullptr, nullptr);
    EXPECT_EQ(moe::cuda::launcher_local_rank(), 0);
  }
  {
    LauncherEnv e("3", "5", "7");
    EXPECT_EQ(moe::cuda::launcher_local_rank(), 3);
  }
  {
    LauncherEnv e(nullptr, "5", "7");
    EXPECT_EQ(moe::cuda::launcher_local_rank(), 5);
  }
  {
    LauncherEnv e(nullptr, nullptr, "7");
    EXPECT_EQ(moe::cuda::launcher_local_rank(), 7);
  }
}

TEST(DeviceChoice, MalformedVariableNamesItself) {
  for (const char* bad : {"", "x", "-1", "2a", "99999999999"}) {
    LauncherEnv e(nullptr, bad, "1");
    try {
      moe::cuda::launcher_local_rank();
      ADD_FAILURE() << "accepted SLURM_LOCALID=\"" << bad << "\"";
    } catch (const moe::UserError& err) {
      EXPECT_NE(std::string(err.what()).find("SLURM_LOCALID"), std::string::npos) << err.what();
    }
  }
}

TEST(DeviceChoice, RoundRobinOverVisibleDevices) {
  EXPECT_EQ(moe::cuda::device_for(0, 8), 0);
  EXPECT_EQ(moe::cuda::device_for(7, 8), 7);
  EXPECT_EQ(moe::cuda::device_for(9, 8), 1);
  EXPECT_EQ(moe::cuda::device_for(3, 1), 0);
  EXPECT_EQ(moe::cuda::device_for(0, 0), -1);
}

}  // namespace
