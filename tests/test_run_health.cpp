// The loop's run-health bookkeeping (trainer/run_health.h) against hand-worked values.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "io/config.h"
#include "trainer/run_health.h"

namespace moe {
namespace {

TEST(SpikeGuard, LimitIsFactorTimesTheMedianOfAFullWindow) {
  SpikeGuard g(3.0, 4);
  EXPECT_TRUE(std::isinf(g.limit()));
  for (double x : {5.0, 1.0, 3.0}) g.accept(x);
  EXPECT_TRUE(std::isinf(g.limit()));  // 3 of 4
  g.accept(2.0);
  EXPECT_DOUBLE_EQ(g.median(), 2.5);  // {1, 2, 3, 5}
  EXPECT_DOUBLE_EQ(g.limit(), 7.5);
  g.accept(9.0);  // drops the oldest (5): {1, 3, 2, 9}
  EXPECT_DOUBLE_EQ(g.median(), 2.5);
  g.accept(NAN);  // never enters
  EXPECT_DOUBLE_EQ(g.median(), 2.5);
  SpikeGuard off(0.0, 4);
  for (double x : {1.0, 1.0, 1.0, 1.0, 1.0}) off.accept(x);
  EXPECT_TRUE(std::isinf(off.limit()));
}

TEST(SpikeGuard, SavedTextRestoresTheSameDecisions) {
  SpikeGuard a(2.0, 3);
  for (double x : {0.1, 1.0 / 3.0, 2.718281828459045, 7.25}) a.accept(x);
  SpikeGuard b(2.0, 3);
  ASSERT_TRUE(b.from_string(a.to_string()));
  EXPECT_EQ(a.limit(), b.limit());
  EXPECT_EQ(a.to_string(), b.to_string());
  EXPECT_FALSE(b.from_string("1.0 x"));
  EXPECT_FALSE(b.from_string("1.0 nan"));
  ASSERT_TRUE(b.from_string(""));
  EXPECT_TRUE(std::isinf(b.limit()));
}

TEST(ExpertWatch, WarnsAtEveryMultipleOfTheIdleStreakAndOverTheImbalance) {
  ExpertWatch w(2, 4, 2, 2.5);
  const std::vector<std::string> names = {"layer 1", "layer 2"};
  std::vector<std::string> out;
  const int64_t balanced[8] = {4, 4, 4, 4, 4, 4, 4, 4};
  const int64_t idle3[8] = {5, 5, 6, 0, 4, 4, 4, 4};       // expert 3 of layer 1 idle
  const int64_t skewed[8] = {4, 4, 4, 4, 13, 1, 1, 1};     // layer 2: 13 * 4 / 16 = 3.25
  w.update(balanced, 1, names, &out);
  EXPECT_TRUE(out.empty());
  w.update(idle3, 2, names, &out);
  EXPECT_TRUE(out.empty());  // one step idle
  w.update(idle3, 3, names, &out);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0], "step 3: expert 3 of layer 1 has received no tokens for 2 steps");
  out.clear();
  w.update(idle3, 4, names, &out);
  EXPECT_TRUE(out.empty());
  w.update(idle3, 5, names, &out);
  ASSERT_EQ(out.size(), 1u);  // 4 steps
  out.clear();
  w.update(skewed, 6, names, &out);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0], "step 6: layer 2 load imbalance 3.25 (max / mean) > moe.imbalance_warn = 2.50");
}

}  // namespace
}  // namespace moe

namespace moe {
namespace {

Config health_config(const std::vector<std::string>& overrides) {
  return config_parse("[run]\nname = \"h\"\n", "h.toml", overrides);
}

StepStats stats(double loss, bool applied, bool nonfinite = false, std::string bad = "") {
  StepStats st;
  st.loss = loss;
  st.applied = applied;
  st.nonfinite = nonfinite;
  st.spike = !applied && !nonfinite;
  st.first_bad = std::move(bad);
  return st;
}

TEST(RunHealth, SpikesWarnSkipOrRollBackAsConfigured) {
  const int64_t load[4] = {1, 1, 1, 1};
  for (const char* mode : {"warn", "skip", "rollback"}) {
    SCOPED_TRACE(mode);
    RunHealth h(health_config({"training.spike_factor=2.0", "training.spike_window=3",
                               std::string("training.on_spike=\"") + mode + "\""}),
                1, 4, {"layer 1"});
    for (int64_t s = 0; s < 3; ++s) {
      const StepVerdict ok = h.after_step(s, stats(1.0, true), load);
      EXPECT_EQ(ok.action, StepVerdict::Action::kContinue);
      EXPECT_FALSE(ok.spike);
    }
    const bool drops = std::string(mode) != "warn";
    EXPECT_EQ(h.loss_limit(), drops ? 2.0 : HUGE_VAL);
    const StepVerdict v = h.after_step(3, stats(5.0, !drops), load);
    EXPECT_TRUE(v.spike);
    ASSERT_EQ(v.lines.size(), 1u);
    EXPECT_NE(v.lines[0].find("step 4: loss spike 5.0000 > training.spike_factor 2.00 x running "
                              "median 1.0000"), std::string::npos) << v.lines[0];
    EXPECT_EQ(v.action, std::string(mode) == "rollback" ? StepVerdict::Action::kRollback
                                                         : StepVerdict::Action::kContinue);
    // A warned (applied) spike enters the window; a dropped one does not.
    EXPECT_EQ(h.spikes().median(), 1.0);
  }
}

TEST(RunHealth, NonFiniteStepsAbortOrSkipUntilTheLimit) {
  const int64_t load[4] = {1, 1, 1, 1};
  RunHealth abort(health_config({}), 1, 4, {"layer 1"});
  const StepVerdict a = abort.after_step(6, stats(NAN, false, true, "layers/2/attn/wo"), load);
  EXPECT_EQ(a.action, StepVerdict::Action::kAbort);
  ASSERT_EQ(a.lines.size(), 1u);
  EXPECT_NE(a.lines[0].find("step 7: non-finite gradients"), std::string::npos);
  EXPECT_NE(a.lines[0].find("first in backward order: layers/2/attn/wo"), std::string::npos);
  RunHealth skip(health_config({"training.on_nonfinite=\"skip\"", "training.max_skipped_steps=3"}),
                 1, 4, {"layer 1"});
  EXPECT_EQ(skip.after_step(0, stats(NAN, false, true), load).action,
            StepVerdict::Action::kContinue);
  EXPECT_EQ(skip.after_step(1, stats(NAN, false, true), load).action,
            StepVerdict::Action::kContinue);
  EXPECT_EQ(skip.after_step(2, stats(1.0, true), load).action, StepVerdict::Action::kContinue);
  for (int64_t s = 3; s < 5; ++s)
    EXPECT_EQ(skip.after_step(s, stats(NAN, false, true), load).action,
              StepVerdict::Action::kContinue);
  const StepVerdict stop = skip.after_step(5, stats(NAN, false, true), load);
  EXPECT_EQ(stop.action, StepVerdict::Action::kStop);  // 3 in a row
  EXPECT_NE(stop.lines.back().find("3 steps in a row dropped their update"), std::string::npos);
}

}  // namespace
}  // namespace moe
