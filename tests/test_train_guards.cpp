// The step's numerical guards (trainer/train_step.h): a non-finite loss or gradient, or a loss
// over the spike limit, drops the whole update, leaves parameters, moments and router biases
// exactly as they were, and names the gradient that went bad first.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <unistd.h>
#include <limits>
#include <vector>

#include "tests/train_fixture.h"
#include "trainer/train_checkpoint.h"

namespace moe {
namespace {

std::vector<float> params_of(TrainState& s) {
  std::vector<float> p(s.model.n_alloc);
  s.model.ops->download(p.data(), s.model.params, p.size() * sizeof(float));
  return p;
}

std::vector<float> moments_of(const TrainState& s) {
  return std::vector<float>(s.adam_m, s.adam_m + 2 * s.state_size);  // m then v
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

const ParamInfo& tensor_named(const Model<float>& m, const std::string& name) {
  for (const ParamInfo& p : m.table)
    if (p.name == name) return p;
  ADD_FAILURE() << "no tensor " << name;
  return m.table.front();
}

TEST(TrainGuards, NonFiniteGradientDropsTheUpdateAndNamesTheTensor) {
  const Config cfg = train_fixture_config("fp32", "fp32", 0);
  TrainState s;
  train_state_init(s, cfg, nullptr);
  const BatchSource src = train_fixture_batches(s.model.d.T, s.model.d.V);
  const StepStats first = train_step(s, 0, src);
  ASSERT_TRUE(first.applied);
  ASSERT_FALSE(first.nonfinite);
  // One NaN in the last layer's FFN output weight: the loss goes NaN and with it every
  // gradient; the first to go bad in backward order is the head's.
  const ParamInfo& w = tensor_named(s.model, "layers/2/moe/shared/w2");
  const float nan = std::numeric_limits<float>::quiet_NaN();
  s.model.ops->upload(s.model.params + w.offset + 5, &nan, sizeof(float));
  const std::vector<float> p0 = params_of(s), m0 = moments_of(s);
  const std::vector<float> bias0(s.model.router_bias,
                                 s.model.router_bias + s.model.d.n_moe_blocks() * s.model.d.E);
  const StepStats bad = train_step(s, 1, src);
  EXPECT_TRUE(bad.nonfinite);
  EXPECT_FALSE(bad.applied);
  EXPECT_FALSE(bad.spike);
  EXPECT_EQ(bad.first_bad, "lm_head");
  EXPECT_TRUE(same_bits(p0, params_of(s)));
  EXPECT_TRUE(same_bits(m0, moments_of(s)));
  EXPECT_EQ(0, std::memcmp(bias0.data(), s.model.router_bias, bias0.size() * sizeof(float)));
  // Repaired, the run goes on: the next step applies.
  const float one = 0.01f;
  s.model.ops->upload(s.model.params + w.offset + 5, &one, sizeof(float));
  const StepStats next = train_step(s, 2, src);
  EXPECT_TRUE(next.applied);
  EXPECT_FALSE(same_bits(p0, params_of(s)));
}

// Inf in embedding rows turns the first layer's activations, and so every router's scores,
// non-finite: the router must still pick experts (NaN ranks last) so the step ends with a
// non-finite loss that the guard drops, in every precision, rather than stopping in a kernel.
TEST(TrainGuards, NonFiniteActivationsThroughTheRoutersReachTheGuard) {
  for (const char* precision : {"fp32", "bf16", "fp8"}) {
    SCOPED_TRACE(precision);
    const Config cfg = train_fixture_config(precision, "fp32", 1);
    TrainState s;
    train_state_init(s, cfg, nullptr);
    const BatchSource src = train_fixture_batches(s.model.d.T, s.model.d.V);
    const float inf = std::numeric_limits<float>::infinity();
    const ParamInfo& emb = s.model.table.front();
    ASSERT_EQ(emb.layer, -1);
    for (int64_t i = 0; i < static_cast<int64_t>(emb.count); i += 97)
      s.model.ops->upload(s.model.params + emb.offset + i, &inf, sizeof(float));
    const std::vector<float> p0 = params_of(s);
    const StepStats bad = train_step(s, 0, src);
    EXPECT_TRUE(bad.nonfinite);
    EXPECT_FALSE(bad.applied);
    EXPECT_FALSE(bad.first_bad.empty());
    EXPECT_TRUE(same_bits(p0, params_of(s)));
  }
}

TEST(TrainGuards, LossOverTheSpikeLimitDropsTheUpdate) {
  const Config cfg = train_fixture_config("bf16", "bf16", 1);
  TrainState s;
  train_state_init(s, cfg, nullptr);
  const BatchSource src = train_fixture_batches(s.model.d.T, s.model.d.V);
  ASSERT_TRUE(train_step(s, 0, src).applied);
  const std::vector<float> p0 = params_of(s);
  const std::vector<uint16_t> m0(s.adam_m_bf16, s.adam_m_bf16 + s.state_size);
  s.loss_limit = 0.5;  // below any cross-entropy of a fresh model
  const StepStats st = train_step(s, 1, src);
  EXPECT_TRUE(st.spike);
  EXPECT_FALSE(st.nonfinite);
  EXPECT_FALSE(st.applied);
  EXPECT_GT(st.loss, 0.5);
  EXPECT_TRUE(same_bits(p0, params_of(s)));
  EXPECT_EQ(0, std::memcmp(m0.data(), s.adam_m_bf16, m0.size() * sizeof(uint16_t)));
  s.loss_limit = HUGE_VAL;
  EXPECT_TRUE(train_step(s, 2, src).applied);
}

TEST(TrainGuards, DataBatchesMovePastSkippedOnes) {
  const std::vector<int64_t> none, skip = {5, 6, 9};
  EXPECT_EQ(data_batch_for_step(7, none), 7);
  EXPECT_EQ(data_batch_for_step(4, skip), 4);
  EXPECT_EQ(data_batch_for_step(5, skip), 7);  // 5 and 6 skipped
  EXPECT_EQ(data_batch_for_step(6, skip), 8);
  EXPECT_EQ(data_batch_for_step(7, skip), 10);  // 9 skipped too
}

TEST(TrainGuards, CheckpointsCarryTheRunHealthState) {
  const Config cfg = train_fixture_config("fp32", "fp32", 0);
  TrainState s;
  train_state_init(s, cfg, nullptr);
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("guards_" + std::to_string(getpid()) + ".h5")).string();
  RunPosition pos;
  pos.step = 3;
  pos.spike_history = "2.5 2.25 0.33333333333333331";
  pos.skipped_batches = {4, 17};
  checkpoint_save(s, pos, path);
  const CheckpointInfo info = checkpoint_read_info(path);
  EXPECT_EQ(info.pos.spike_history, pos.spike_history);
  EXPECT_EQ(info.pos.skipped_batches, pos.skipped_batches);
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace moe
