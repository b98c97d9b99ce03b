// The loop's run-health bookkeeping (trainer/run_health.h) against hand-worked values.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

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
