// Fault injection for the tests of run health (never set in production): environment
// variables, read once at start, that make one rank fail, sleep or corrupt a weight at a given
// step. Each is "<world rank>:<step>[:<value>]"; the valued ones take several entries
// separated by commas.
//   MOETRAIN_TEST_THROW_AT="r:s": rank r fails as it starts step s (a failing rank stops the
//     job).
//   MOETRAIN_TEST_SLEEP_AT="r:s:sec": rank r sleeps sec seconds inside step s, before its
//     first collective, so the other ranks wait for it (the watchdog and fault tests).
//   MOETRAIN_TEST_POISON_AT="r:s:v": rank r writes v (e.g. nan, or 1e6 for a loss spike) into
//     one weight of the final RMSNorm (which scales every logit) as it starts step s, once
//     (the numerical guards' tests).
#pragma once

#include <cstdint>
#include <vector>

#include "trainer/train_step.h"

namespace moe {

struct TestInjections {
  struct At {
    int64_t step = 0;  // 1-based
    double value = 0;
  };
  int64_t throw_at = 0;  // 0: none
  std::vector<At> sleeps, poisons;
};

// The entries meant for this rank.
TestInjections test_injections_read(int world_rank);
// As step `step` (1-based) starts.
void test_injections_apply(TestInjections& in, TrainState& s, int64_t step);

}  // namespace moe
