// Parallel plans without MPI: the expert-parallel parameter layout (every ep rank holds the
// single process's experts, bit for bit, under their global names) and the gradient
// reducer's bucket plan and start order, driven through a recording fake communicator.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "model/model.h"
#include "parallel/comm.h"
#include "parallel/grad_reduce.h"

namespace moe {
namespace {

// Tiny MoE (8 experts, top-2, one shared expert, 3 layers of which 1 dense). C = 6 and FE = 3
// make the region sizes (990 replicated, 864 / ep expert elements) miss most group sizes, so
// padding really occurs and its placement is checked.
ModelDims plan_dims() {
  ModelDims d;
  d.V = 11; d.C = 6; d.L = 3; d.NH = 2; d.NKV = 1; d.HD = 4; d.T = 5; d.F = 10;
  d.dense_layers = 1;
  d.E = 8; d.K = 2; d.FE = 3; d.S = 3; d.G = 1; d.KG = 1;
  d.init_std = 0.4;
  return d;
}

// A logical tensor's elements row by row (rows are ld apart in the flat buffer).
std::vector<float> values(const Model<float>& m, const LogicalTensor& t) {
  const int64_t rows = t.shape.size() == 2 ? t.shape[0] : 1, cols = t.shape.back();
  std::vector<float> v;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = m.params + t.offset + static_cast<size_t>(r * t.ld);
    v.insert(v.end(), row, row + cols);
  }
  return v;
}

TEST(ParallelPlanModel, ExpertShardsHoldTheSingleProcessTensors) {
  const ModelDims d1 = plan_dims();
  Model<float> ref;
  model_build<float>(ref, d1, 1);
  model_init<float>(ref, 1234);
  std::map<std::string, std::vector<float>> ref_values;
  std::set<std::string> ref_experts;
  for (const LogicalTensor& t : model_logical_tensors(d1, ref.table)) {
    ref_values[t.name] = values(ref, t);
    if (t.expert >= 0) ref_experts.insert(t.name);
  }
  // 2 MoE layers x 8 experts x (w_gate, w_up, w_down).
  ASSERT_EQ(ref_experts.size(), 48u);
  // Distinct experts hold distinct values, so an expert taken from the wrong offset or init
  // counter could not pass the comparisons below by accident.
  const auto& v = ref_values;
  EXPECT_NE(v.at("layers/1/moe/experts/0/w_gate"), v.at("layers/1/moe/experts/1/w_gate"));
  EXPECT_NE(v.at("layers/1/moe/experts/5/w_down"), v.at("layers/2/moe/experts/5/w_down"));

  for (int64_t ep : {2, 4}) {
    std::map<std::string, int> seen;
    for (int64_t rank = 0; rank < ep; ++rank) {
      SCOPED_TRACE("ep " + std::to_string(ep) + " rank " + std::to_string(rank));
      ModelDims d = d1;
      d.ep = ep;
      d.ep_rank = rank;
      Model<float> m;
      model_build<float>(m, d, 1);
      model_init<float>(m, 1234);
      size_t replicated = 0;
      for (const LogicalTensor& t : model_logical_tensors(d, m.table)) {
        SCOPED_TRACE(t.name);
        const auto it = ref_values.find(t.name);
        ASSERT_NE(it, ref_values.end());
        if (t.expert >= 0) {
          EXPECT_GE(t.expert, d.expert0());
          EXPECT_LT(t.expert, d.expert0() + d.EL());
          EXPECT_NE(t.name.find("/experts/" + std::to_string(t.expert) + "/"), std::string::npos);
          ++seen[t.name];
        } else {
          EXPECT_EQ(ref_experts.count(t.name), 0u);
          ++replicated;
        }
        EXPECT_EQ(values(m, t), it->second);  // exact: init depends on global position only
      }
      EXPECT_EQ(replicated, ref_values.size() - ref_experts.size());
    }
    // The ranks partition the experts: each one held exactly once across the group.
    EXPECT_EQ(seen.size(), ref_experts.size());
    for (const auto& [name, n] : seen) {
      EXPECT_EQ(n, 1) << name;
      EXPECT_EQ(ref_experts.count(name), 1u) << name;
    }
  }
}

TEST(ParallelPlanModel, RegionsArePaddedAndSeparate) {
  struct Case { int64_t ep, rank, pad_rep, pad_exp; };
  size_t rep_padding = 0, exp_padding = 0;
  for (const Case& c : {Case{1, 0, 7, 5}, Case{2, 1, 4, 5}, Case{4, 3, 7, 3}, Case{4, 0, 1, 1}}) {
    SCOPED_TRACE("ep " + std::to_string(c.ep) + " pads " + std::to_string(c.pad_rep) + "/" +
                 std::to_string(c.pad_exp));
    ModelDims d = plan_dims();
    d.ep = c.ep;
    d.ep_rank = c.rank;
    Model<float> m;
    model_build<float>(m, d, 1, c.pad_rep, c.pad_exp);
    model_init<float>(m, 99);
    EXPECT_EQ(m.replicated.offset, 0u);
    EXPECT_EQ(m.experts.offset, m.replicated.count);
    EXPECT_EQ(m.replicated.count % static_cast<size_t>(c.pad_rep), 0u);
    EXPECT_EQ(m.experts.count % static_cast<size_t>(c.pad_exp), 0u);
    EXPECT_EQ(m.n_alloc, m.replicated.count + m.experts.count);
    std::vector<int> owner(m.n_alloc, 0);
    size_t rep = 0, exp = 0;
    for (const ParamInfo& p : m.table) {
      const ParamRegion& g = p.routed_experts ? m.experts : m.replicated;
      EXPECT_GE(p.offset, g.offset) << p.name;
      EXPECT_LE(p.offset + p.count, g.offset + g.count) << p.name;
      (p.routed_experts ? exp : rep) += p.count;
      for (size_t i = p.offset; i < p.offset + p.count && i < m.n_alloc; ++i) ++owner[i];
    }
    EXPECT_EQ(rep, 990u);
    EXPECT_EQ(exp, 864u / static_cast<size_t>(c.ep));
    EXPECT_EQ(rep + exp, m.n_params);
    // Padding is the least that makes each region divisible.
    EXPECT_LT(m.replicated.count - rep, static_cast<size_t>(c.pad_rep));
    EXPECT_LT(m.experts.count - exp, static_cast<size_t>(c.pad_exp));
    rep_padding += m.replicated.count - rep;
    exp_padding += m.experts.count - exp;
    for (size_t i = 0; i < m.n_alloc; ++i) {
      EXPECT_LE(owner[i], 1) << "element " << i << " in two tensors";
      if (owner[i] == 0) {
        EXPECT_EQ(m.params[i], 0.0f) << "padding element " << i;
      }
    }
  }
  // The cases above do exercise padding in both regions.
  EXPECT_GT(rep_padding, 0u);
  EXPECT_GT(exp_padding, 0u);
}

TEST(ParallelPlanModel, GradStagesFollowBackwardOrder) {
  const ModelDims d = plan_dims();
  std::map<int64_t, int> per_stage;
  for (const ParamInfo& p : model_param_table(d)) {
    int64_t want = 0;
    if (p.name == "embed/wte") {
      want = d.L + 1;
    } else if (p.name.rfind("layers/", 0) == 0) {
      want = d.L - std::stoll(p.name.substr(7));
    } else {
      EXPECT_TRUE(p.name == "final_norm" || p.name == "lm_head") << p.name;
    }
    EXPECT_EQ(model_grad_stage(d, p), want) << p.name;
    ++per_stage[want];
  }
  // Head: final_norm, lm_head. Layers 2 and 1 are MoE (4 attention-side tensors, router,
  // shared w13/w2, expert w13/w2); layer 0 is dense (4 + w13, w2). Embedding last.
  EXPECT_EQ(per_stage, (std::map<int64_t, int>{{0, 2}, {1, 9}, {2, 9}, {3, 6}, {4, 1}}));
}

// One reduce-scatter start as the fake saw it.
struct Start {
  const Comm* comm;
  float* recv;
  const float* send;
  std::vector<int> counts;
};

// A group of `size` ranks seen from `rank`: records reduce-scatter starts into a shared log
// (so the order across both regions' groups is visible); any other collective is a bug in
// the plan and fails the test. test() completes requests only when test_completes is set,
// so finish() can be seen to wait on everything still in flight.
class FakeComm final : public Comm {
 public:
  FakeComm(int rank, int size, std::vector<Start>* log) : rank_(rank), size_(size), log_(log) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  void all_reduce_sum(float*, int64_t) override { unexpected("all_reduce_sum"); }
  void all_reduce_sum(double*, int64_t) override { unexpected("all_reduce_sum"); }
  void all_reduce_sum(int64_t*, int64_t) override { unexpected("all_reduce_sum"); }
  void all_reduce_max(double*, int64_t) override { unexpected("all_reduce_max"); }
  CommRequest all_reduce_sum_start(float*, int64_t) override {
    unexpected("all_reduce_sum_start");
    return {};
  }
  CommRequest reduce_scatter_sum_start(float* recv, const float* send,
                                       const int* recv_counts) override {
    log_->push_back(Start{this, recv, send, std::vector<int>(recv_counts, recv_counts + size_)});
    return CommRequest{{}, true};
  }
  bool test(CommRequest& req) override {
    if (test_completes) req.active = false;
    return !req.active;
  }
  void wait(CommRequest& req) override { req.active = false; }
  void reduce_scatter_sum(float*, const float*, int64_t) override {
    unexpected("reduce_scatter_sum");
  }
  void reduce_sum(float*, const float*, int64_t, int) override { unexpected("reduce_sum"); }
  void all_gather(float*, const float*, int64_t) override { unexpected("all_gather"); }
  CommRequest all_to_all_v_start(const void*, const int*, const int*, void*, const int*,
                                 const int*) override {
    unexpected("all_to_all_v_start");
    return {};
  }
  CommRequest all_to_all_start(const int64_t*, int64_t*, int64_t) override {
    unexpected("all_to_all_start");
    return {};
  }
  void broadcast(void*, size_t, int) override { unexpected("broadcast"); }
  void send(const void*, size_t, int, int) override { unexpected("send"); }
  void recv(void*, size_t, int, int) override { unexpected("recv"); }
  CommRequest send_start(const void*, size_t, int, int) override {
    unexpected("send_start");
    return {};
  }
  CommRequest recv_start(void*, size_t, int, int) override {
    unexpected("recv_start");
    return {};
  }
  CommRequest p2p_group_start(const P2pTransfer*, int) override {
    unexpected("p2p_group_start");
    return {};
  }
  void barrier() override { unexpected("barrier"); }
  bool test_completes = true;

 private:
  static void unexpected(const char* what) { ADD_FAILURE() << "unexpected Comm::" << what; }
  int rank_, size_;
  std::vector<Start>* log_;
  std::string name_ = "fake";
};

// P data-parallel ranks shard the replicated region; the experts are sharded over the P / ep
// ranks holding the same ones (ep rank = rank % ep, rank among them = rank / ep).
struct PlanCase { int P, ep, rank; int64_t bucket_elems; };

// The reducer as train_state_init plans it, over fake groups. Holds pointers into itself,
// so it is built in place and never moved.
struct Plan {
  Model<float> m;
  std::vector<Start> log;
  FakeComm dp, edp;
  std::vector<float> shard0, shard1;
  std::vector<GradSpan> spans;
  GradReducer r;
  explicit Plan(const PlanCase& c) : dp(c.rank, c.P, &log), edp(c.rank / c.ep, c.P / c.ep, &log) {
    ModelDims d = plan_dims();
    d.ep = c.ep;
    d.ep_rank = c.rank % c.ep;
    model_build<float>(m, d, 1, c.P, c.P / c.ep);
    shard0.resize(m.replicated.count / static_cast<size_t>(c.P));
    shard1.resize(m.experts.count / static_cast<size_t>(c.P / c.ep));
    std::vector<GradRegion> regions = {
        {&dp, 0, static_cast<int64_t>(m.replicated.count), shard0.data()},
        {&edp, static_cast<int64_t>(m.experts.offset), static_cast<int64_t>(m.experts.count),
         shard1.data()}};
    for (const ParamInfo& p : m.table)
      spans.push_back(GradSpan{p.routed_experts ? 1 : 0, static_cast<int64_t>(p.offset),
                               static_cast<int64_t>(p.offset + p.count), model_grad_stage(d, p)});
    grad_reducer_init(r, std::move(regions), spans, c.bucket_elems);
  }
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
};

// What one bucket of region g must satisfy, derived from the plan's own inputs.
void check_bucket(const Plan& pl, const GradRegion& g, const GradBucket& b, int64_t bucket_elems) {
  const int64_t P = g.comm->size(), shard = g.count / P, my_lo = g.begin + g.comm->rank() * shard;
  ASSERT_EQ(b.recv_counts.size(), static_cast<size_t>(P));
  int64_t sum = 0;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t lo = std::max(b.begin, g.begin + p * shard);
    const int64_t hi = std::min(b.end, g.begin + (p + 1) * shard);
    EXPECT_EQ(b.recv_counts[static_cast<size_t>(p)], std::max<int64_t>(0, hi - lo)) << "rank " << p;
    sum += b.recv_counts[static_cast<size_t>(p)];
  }
  EXPECT_EQ(sum, b.end - b.begin);
  if (b.end > my_lo && b.begin < my_lo + shard) {
    EXPECT_EQ(b.recv, g.shard_out + std::max<int64_t>(0, b.begin - my_lo));
  } else {  // nothing of it lands here; the pointer must still be inside the shard
    EXPECT_TRUE(b.recv >= g.shard_out && b.recv <= g.shard_out + shard);
  }
  // Whole tensors only, and whole stages (buckets close at stage boundaries); the bucket's
  // stage is the latest of them. Before that stage joined, the bucket was short of
  // bucket_elems (else it would have closed), and a closed bucket holds at least
  // bucket_elems unless it is the region's last (lowest) one.
  std::set<int64_t> stages;
  int64_t total = 0, before_last = 0;
  for (const GradSpan& s : pl.spans)
    if (s.region == b.region && s.end > b.begin && s.begin < b.end) {
      EXPECT_TRUE(s.begin >= b.begin && s.end <= b.end) << "tensor at " << s.begin << " split";
      stages.insert(s.stage);
      total += s.end - s.begin;
    }
  ASSERT_FALSE(stages.empty());
  const int64_t stage = *stages.rbegin();
  for (const GradSpan& s : pl.spans) {
    const bool inside = s.region == b.region && s.begin >= b.begin && s.end <= b.end;
    if (s.region == b.region && stages.count(s.stage)) {
      EXPECT_TRUE(inside) << "stage " << s.stage << " split at " << s.begin;
    }
    if (inside && s.stage < stage) before_last += s.end - s.begin;
  }
  EXPECT_EQ(b.stage, stage);
  EXPECT_LT(before_last, bucket_elems);
  if (b.begin != g.begin) {
    EXPECT_GE(total, bucket_elems);
  }
}

TEST(ParallelPlanBuckets, BucketsTileRegionsAndStartInStageOrder) {
  const int64_t huge = int64_t{1} << 40;
  // 72 = final_norm + lm_head (C + V C): the head alone exactly fills a bucket, so ">=" vs ">"
  // in the closing rule changes the plan.
  for (const PlanCase& c : {PlanCase{1, 1, 0, 1}, PlanCase{4, 2, 3, 1}, PlanCase{4, 1, 1, 72},
                            PlanCase{5, 1, 2, 100}, PlanCase{10, 2, 7, 300},
                            PlanCase{8, 8, 5, huge}, PlanCase{8, 4, 6, huge}}) {
    SCOPED_TRACE("P " + std::to_string(c.P) + " ep " + std::to_string(c.ep) + " rank " +
                 std::to_string(c.rank) + " bucket " + std::to_string(c.bucket_elems));
    Plan pl(c);
    const GradReducer& r = pl.r;
    for (int ri = 0; ri < 2; ++ri) {
      const GradRegion& g = r.regions[static_cast<size_t>(ri)];
      std::vector<const GradBucket*> bs;
      for (const GradBucket& b : r.buckets)
        if (b.region == ri) bs.push_back(&b);
      ASSERT_FALSE(bs.empty());
      std::sort(bs.begin(), bs.end(),
                [](const GradBucket* a, const GradBucket* b) { return a->begin < b->begin; });
      EXPECT_EQ(bs.front()->begin, g.begin);
      EXPECT_EQ(bs.back()->end, g.begin + g.count);
      for (size_t i = 0; i < bs.size(); ++i) {
        EXPECT_LT(bs[i]->begin, bs[i]->end);
        if (i > 0) {
          EXPECT_EQ(bs[i]->begin, bs[i - 1]->end) << "gap or overlap";
        }
        check_bucket(pl, g, *bs[i], c.bucket_elems);
      }
      if (c.bucket_elems == huge) {
        EXPECT_EQ(bs.size(), 1u);
      }
    }
    for (size_t i = 1; i < r.buckets.size(); ++i) {
      EXPECT_LE(r.buckets[i - 1].stage, r.buckets[i].stage) << "start order, bucket " << i;
    }

    // Backward, twice: requests left in flight for finish(), then completing in test(); the
    // second round also shows the reducer re-arms after a finished reduction.
    const int64_t L = pl.m.d.L;
    std::vector<float> grads(pl.m.n_alloc);
    for (bool completes : {false, true}) {
      pl.dp.test_completes = pl.edp.test_completes = completes;
      pl.log.clear();
      grad_reducer_begin(pl.r, grads.data());
      EXPECT_TRUE(pl.log.empty());
      for (int64_t s = 0; s <= L + 1; ++s) {
        grad_reducer_stage_done(pl.r, s);
        const auto ready = std::count_if(r.buckets.begin(), r.buckets.end(),
                                         [&](const GradBucket& b) { return b.stage <= s; });
        EXPECT_EQ(pl.log.size(), static_cast<size_t>(ready)) << "after stage " << s;
      }
      ASSERT_EQ(pl.log.size(), r.buckets.size());
      for (const GradBucket& b : r.buckets) EXPECT_EQ(b.req.active, !completes);
      grad_reducer_finish(pl.r);
      ASSERT_EQ(pl.log.size(), r.buckets.size());
      for (size_t i = 0; i < r.buckets.size(); ++i) {
        const GradBucket& b = r.buckets[i];
        const Start& st = pl.log[i];
        EXPECT_EQ(st.comm, r.regions[static_cast<size_t>(b.region)].comm) << "bucket " << i;
        EXPECT_EQ(st.recv, b.recv) << "bucket " << i;
        EXPECT_EQ(st.send, grads.data() + b.begin) << "bucket " << i;
        EXPECT_EQ(st.counts, b.recv_counts) << "bucket " << i;
        EXPECT_FALSE(b.req.active) << "bucket " << i;
      }
    }
  }
}

TEST(ParallelPlanBuckets, SmallestBucketsAreOnePerStage) {
  Plan pl(PlanCase{4, 2, 1, 1});
  std::set<int64_t> stages[2];
  for (const GradSpan& s : pl.spans) stages[s.region].insert(s.stage);
  // Replicated: embedding, 3 layers, head; experts: the 2 MoE layers.
  EXPECT_EQ(stages[0].size(), 5u);
  EXPECT_EQ(stages[1].size(), 2u);
  EXPECT_EQ(grad_reducer_buckets(pl.r, 0), static_cast<int64_t>(stages[0].size()));
  EXPECT_EQ(grad_reducer_buckets(pl.r, 1), static_cast<int64_t>(stages[1].size()));
}

}  // namespace
}  // namespace moe
