// Expert-parallel dispatch and combine (parallel/expert_dispatch.h) under mpirun, against
// references that need no communication: every rank regenerates every rank's tokens and
// routing from the seed, so it knows row by row what each of its experts must receive.
//
// Dimension letters: ep ranks in a group, E experts, EL = E / ep, N tokens on a rank, K slots
// per token, C row width, R rows received.
//
// NOTE: every rank runs every test and the tests call collectives, so nothing may return
// early between the first and the last collective of a test: data checks use EXPECT_*, and
// skips depend only on values that are equal on all ranks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <ostream>
#include <set>
#include <string>
#include <vector>

#include "model/fp8.h"
#include "model/fp8_quant.h"
#include "model/kernels/cpu/moe_ops.h"
#include "model/ops.h"
#include "model/rng.h"
#include "parallel/comm.h"
#include "parallel/expert_dispatch.h"
#include "parallel/expert_exchange.h"

namespace moe {
namespace {

// ---- The plan alone (no communication): a hand-worked example and a simulated group. ----

// ep = 2, E = 4 (EL = 2). Per global expert, rank 0 holds rows {1, 2, 0, 3}, rank 1 {4, 0, 5, 1}.
TEST(EpPlanFill, HandWorkedExample) {
  const int64_t counts[2][4] = {{1, 2, 0, 3}, {4, 0, 5, 1}};
  // What the all_to_all delivers: recv[q][p EL + j] = counts[p][q EL + j].
  const int64_t recv[2][4] = {{1, 2, 4, 0}, {0, 3, 5, 1}};
  EpPlan a = ep_plan_create(2, 4, 16), b = ep_plan_create(2, 4, 16);
  ep_plan_fill(a, 0, counts[0], recv[0]);
  ep_plan_fill(b, 1, counts[1], recv[1]);
  a.check_validity();
  b.check_validity();
  using V = std::vector<int64_t>;
  EXPECT_EQ(a.send_counts, (V{3, 3}));
  EXPECT_EQ(a.send_displs, (V{0, 3}));
  EXPECT_EQ(a.recv_counts, (V{3, 4}));
  EXPECT_EQ(a.recv_displs, (V{0, 3}));
  EXPECT_EQ(a.block_wire_off, (V{0, 1, 3, 7}));
  EXPECT_EQ(a.block_grouped_off, (V{0, 5, 1, 7}));  // expert 0: p0 then p1; expert 1: p0, p1
  EXPECT_EQ(a.local_offsets, (V{0, 5, 7}));
  EXPECT_EQ(a.rows_sent, 6);
  EXPECT_EQ(a.rows_recv, 7);
  EXPECT_EQ(b.send_counts, (V{4, 6}));
  EXPECT_EQ(b.recv_counts, (V{3, 6}));
  EXPECT_EQ(b.block_wire_off, (V{0, 0, 3, 8}));
  EXPECT_EQ(b.block_grouped_off, (V{0, 5, 0, 8}));
  EXPECT_EQ(b.local_offsets, (V{0, 5, 9}));
  EXPECT_EQ(b.rows_recv, 9);
  EXPECT_EQ(ep_bytes_sent(a, 2), 3 * 2 * 4);  // 3 rows to rank 1
  EXPECT_EQ(ep_bytes_sent(b, 2), 4 * 2 * 4);  // 4 rows to rank 0
  EXPECT_NE(a.to_string().find("local experts 5 2"), std::string::npos) << a.to_string();
}

// A whole group simulated in one process: what p sends to q is what q expects from p.
TEST(EpPlanFill, SendsMatchReceivesInSimulatedGroup) {
  const int ep = 3;
  const int64_t E = 9, EL = 3;
  std::vector<std::vector<int64_t>> counts(ep, std::vector<int64_t>(E));
  for (int p = 0; p < ep; ++p)
    for (int64_t e = 0; e < E; ++e)
      counts[p][e] = static_cast<int64_t>(rng_u64(7, p, e) % 4);  // zeros included
  std::vector<EpPlan> plans;
  for (int q = 0; q < ep; ++q) {
    std::vector<int64_t> recv(E);
    for (int p = 0; p < ep; ++p)
      for (int64_t j = 0; j < EL; ++j) recv[p * EL + j] = counts[p][q * EL + j];
    plans.push_back(ep_plan_create(ep, E, ep * 3 * E));
    ep_plan_fill(plans.back(), q, counts[q].data(), recv.data());
    plans.back().check_validity();
  }
  for (int p = 0; p < ep; ++p)
    for (int q = 0; q < ep; ++q) EXPECT_EQ(plans[p].send_counts[q], plans[q].recv_counts[p]);
}

// ---- Dispatch and combine through MPI. ----

enum class Routing {
  kRandom,    // K distinct experts per token, uniformly
  kAllToOne,  // every slot of every token of every rank to one expert
  kSubset,    // K distinct experts among {e : e % 3 == 0, e < E / 2}: empty experts and ranks
};

struct DispatchCase {
  const char* name;
  int64_t E, K, C;
  int64_t n_base, n_step;  // N on group rank p: n_base + n_step p
  int zero_rank;           // a group rank with N = 0, or -1
  Routing routing;
};

// ep = 0 stands for the whole world.
struct DispatchParam {
  DispatchCase c;
  int ep;
};

void PrintTo(const DispatchParam& p, std::ostream* os) {
  *os << p.c.name << " ep=" << (p.ep == 0 ? std::string("world") : std::to_string(p.ep));
}

const DispatchCase kCases[] = {
    {"Random", 16, 4, 37, 23, 5, -1, Routing::kRandom},
    {"RandomOddWidth", 12, 2, 71, 19, 3, -1, Routing::kRandom},
    {"RandomC1", 8, 3, 1, 9, 1, -1, Routing::kRandom},
    {"KEqualsE", 8, 8, 5, 6, 2, -1, Routing::kRandom},
    {"AllToOne", 16, 1, 13, 17, 4, -1, Routing::kAllToOne},
    {"AllToOneK2", 8, 2, 3, 11, 0, -1, Routing::kAllToOne},
    {"EmptyExpertsAndRanks", 24, 3, 9, 15, 2, -1, Routing::kSubset},
    {"ZeroTokensOnRank1", 16, 4, 29, 13, 2, 1, Routing::kRandom},
    {"ZeroTokensEverywhere", 8, 2, 4, 0, 0, -1, Routing::kRandom},
    {"WideC200", 8, 2, 200, 7, 3, -1, Routing::kRandom},  // FP8 tiles: 128 + a partial 72
    {"WideC256", 8, 3, 256, 5, 2, -1, Routing::kRandom},  // two whole tiles
};

std::vector<DispatchParam> all_params() {
  std::vector<DispatchParam> out;
  for (int ep : {0, 2, 1})
    for (const DispatchCase& c : kCases) out.push_back({c, ep});
  return out;
}

std::string param_name(const testing::TestParamInfo<DispatchParam>& info) {
  return std::string(info.param.c.name) + "_ep" +
         (info.param.ep == 0 ? std::string("World") : std::to_string(info.param.ep));
}

// One rank's inputs, a pure function of (seed, group rank).
struct RankData {
  int64_t N = 0;
  std::vector<int32_t> ids;   // (N, K)
  std::vector<float> x;       // (N, C)
  std::vector<float> weights; // (N, K)
};

int64_t tokens_on(const DispatchCase& c, int p) {
  return p == c.zero_rank ? 0 : c.n_base + c.n_step * p;
}

RankData make_rank(const DispatchCase& c, uint64_t seed, int p) {
  RankData d;
  d.N = tokens_on(c, p);
  const uint64_t stream = rng_stream(RngPurpose::kData, static_cast<uint64_t>(p));
  std::vector<int32_t> pool;
  for (int64_t e = 0; e < c.E; ++e)
    if (c.routing != Routing::kSubset || (e % 3 == 0 && e < c.E / 2))
      pool.push_back(static_cast<int32_t>(e));
  d.ids.resize(static_cast<size_t>(d.N * c.K));
  uint64_t ctr = 0;
  for (int64_t n = 0; n < d.N; ++n) {
    if (c.routing == Routing::kAllToOne) {
      for (int64_t k = 0; k < c.K; ++k) d.ids[n * c.K + k] = static_cast<int32_t>(c.E / 2 + 1);
      continue;
    }
    // K distinct draws from pool: a partial Fisher-Yates shuffle.
    std::vector<int32_t> v = pool;
    for (int64_t k = 0; k < c.K; ++k) {
      const int64_t left = static_cast<int64_t>(v.size()) - k;
      const int64_t i = k + static_cast<int64_t>(rng_u64(seed, stream, ctr++) % left);
      std::swap(v[k], v[i]);
      d.ids[n * c.K + k] = v[k];
    }
  }
  d.x.resize(static_cast<size_t>(d.N * c.C));
  for (size_t i = 0; i < d.x.size(); ++i)
    d.x[i] = static_cast<float>(2.0 * rng_uniform(seed, stream + 1, i) - 1.0);
  d.weights.resize(d.ids.size());
  for (size_t i = 0; i < d.weights.size(); ++i)
    d.weights[i] = static_cast<float>(rng_uniform(seed, stream + 2, i));
  return d;
}

// The per-expert function the tests apply: row * (global expert + 1), exact enough to
// compare bit for bit against the same product on one process.
float expert_fn(float v, int64_t g) { return v * static_cast<float>(g + 1); }

bool same_bits(const float* a, const float* b, int64_t n) {
  return n == 0 || std::memcmp(a, b, static_cast<size_t>(n) * sizeof(float)) == 0;
}

class ExpertDispatch : public testing::TestWithParam<DispatchParam> {
 protected:
  void SetUp() override {
    const DispatchParam& prm = GetParam();
    world_ = comm_mpi_world();
    const int ws = world_->size();
    ep_ = prm.ep == 0 ? ws : prm.ep;
    // Equal on all ranks, so every rank skips or none does.
    if (ws % ep_ != 0) GTEST_SKIP() << "world size " << ws << " is not a multiple of ep " << ep_;
    if (prm.c.E % ep_ != 0) GTEST_SKIP() << "ep " << ep_ << " does not divide E " << prm.c.E;
    const int color = world_->rank() / ep_;
    comm_ = comm_mpi_split(*world_, color, world_->rank(), "ep");
    seed_ = 1234 + 977 * static_cast<uint64_t>(color);
    me_ = comm_->rank();
    for (int p = 0; p < ep_; ++p) ranks_.push_back(make_rank(prm.c, seed_, p));
    int64_t max_n = 0;
    for (const RankData& d : ranks_) max_n = std::max(max_n, d.N);
    capacity_ = ep_rows_worst_case(ep_, max_n, prm.c.K);
  }

  // Single-process dispatch of this rank's tokens: moe_plan + moe_permute_forward.
  void local_plan() {
    const DispatchCase& c = GetParam().c;
    const RankData& d = ranks_[me_];
    counts_.assign(c.E, 0);
    offsets_.assign(c.E + 1, 0);
    row_of_.assign(d.N * c.K, 0);
    token_of_.assign(d.N * c.K, 0);
    cpu::moe_plan(counts_.data(), offsets_.data(), row_of_.data(), token_of_.data(),
                  d.ids.data(), d.N, c.E, c.K);
    xp_.assign(d.N * c.K * c.C, 0.0f);
    cpu::moe_permute_forward(xp_.data(), d.x.data(), token_of_.data(), d.N * c.K, c.C);
  }

  // Calls fn(row, g, p, n) for every row this rank's experts receive, in the grouped layout's
  // order: local expert g's rows from each sender p in rank order, p's in (token n, slot) order.
  template <typename Fn>
  int64_t for_each_expected_row(const Fn& fn) const {
    const DispatchCase& c = GetParam().c;
    const int64_t EL = c.E / ep_;
    int64_t row = 0;
    for (int64_t j = 0; j < EL; ++j)
      for (int p = 0; p < ep_; ++p) {
        const RankData& d = ranks_[p];
        for (int64_t n = 0; n < d.N; ++n)
          for (int64_t k = 0; k < c.K; ++k)
            if (d.ids[n * c.K + k] == me_ * EL + j) fn(row++, me_ * EL + j, p, n);
      }
    return row;
  }

  // plan_finish's block_offsets: local expert j's rows from sender p start where the
  // reference walk reaches them; local_offsets are the first block of each expert.
  void expect_blocks(const std::vector<int64_t>& blocks, const std::vector<int64_t>& offs) const {
    const DispatchCase& c = GetParam().c;
    const int64_t EL = c.E / ep_;
    std::vector<int64_t> want(EL * ep_ + 1, -1);
    int64_t last = -1;
    const int64_t rows = for_each_expected_row([&](int64_t row, int64_t g, int p, int64_t) {
      const int64_t b = (g - me_ * EL) * ep_ + p;
      if (b != last) want[b] = row;
      last = b;
    });
    // Empty blocks start where the next non-empty one (or the end) does.
    want[EL * ep_] = rows;
    for (int64_t b = EL * ep_ - 1; b >= 0; --b)
      if (want[b] < 0) want[b] = want[b + 1];
    EXPECT_EQ(blocks, want);
    for (int64_t j = 0; j <= EL; ++j) EXPECT_EQ(offs[j], want[j * ep_]) << "expert " << j;
  }

  // For the compact wire: magnitudes from 2^-9 to 2^9 varying by token and 128-column tile
  // (so each tile gets its own scale), and every fifth token all zeros. Same on every rank.
  void vary_magnitudes() {
    const int64_t C = GetParam().c.C;
    for (RankData& d : ranks_)
      for (int64_t n = 0; n < d.N; ++n)
        for (int64_t i = 0; i < C; ++i) {
          const int e = static_cast<int>((n + 3 * (i / 128)) % 7) * 3 - 9;
          d.x[n * C + i] = n % 5 == 2 ? 0.0f : std::ldexp(d.x[n * C + i], e);
        }
  }

  std::unique_ptr<Comm> world_, comm_;
  int ep_ = 1, me_ = 0;
  uint64_t seed_ = 0;
  int64_t capacity_ = 0;
  std::vector<RankData> ranks_;
  std::vector<int64_t> counts_, offsets_;
  std::vector<int32_t> row_of_, token_of_;
  std::vector<float> xp_;
};

TEST_P(ExpertDispatch, MatchesReferenceRowByRow) {
  const DispatchCase& c = GetParam().c;
  const int64_t EL = c.E / ep_, C = c.C;
  local_plan();
  EpPlan plan = ep_plan_create(ep_, c.E, capacity_);
  ep_plan(plan, counts_.data(), *comm_);
  plan.check_validity();

  const float kPoison = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> xg(capacity_ * C, kPoison), scratch(capacity_ * C, kPoison);
  ep_dispatch(xg.data(), scratch.data(), xp_.data(), plan, C, *comm_);

  // What local expert j must hold: from each sender p in rank order, p's rows for global
  // expert g in p's (token, slot) order.
  int64_t row = 0, bad_rows = 0, nonzero = 0;
  std::string first_bad;
  for (int64_t j = 0; j < EL; ++j) {
    const int64_t g = me_ * EL + j;
    EXPECT_EQ(plan.local_offsets[j], row) << "local expert " << j;
    for (int p = 0; p < ep_; ++p) {
      const RankData& d = ranks_[p];
      for (int64_t n = 0; n < d.N; ++n)
        for (int64_t k = 0; k < c.K; ++k) {
          if (d.ids[n * c.K + k] != g) continue;
          const float* want = d.x.data() + n * C;
          if (row >= plan.rows_recv || !same_bits(xg.data() + row * C, want, C)) {
            if (bad_rows++ == 0)
              first_bad = "row " + std::to_string(row) + " (expert " + std::to_string(g) +
                          ", sender " + std::to_string(p) + ", token " + std::to_string(n) + ")";
          }
          for (int64_t i = 0; i < C; ++i) nonzero += want[i] != 0.0f;
          ++row;
        }
    }
  }
  EXPECT_EQ(plan.rows_recv, row);
  EXPECT_EQ(plan.local_offsets[EL], row);
  EXPECT_EQ(bad_rows, 0) << "first mismatch at " << first_bad;
  EXPECT_EQ(nonzero > 0, row > 0) << "inputs must not be all zero";

  int64_t remote = 0;
  for (int64_t e = 0; e < c.E; ++e)
    if (e / EL != me_) remote += counts_[e];
  EXPECT_EQ(ep_bytes_sent(plan, C), remote * C * static_cast<int64_t>(sizeof(float)));

  // The experts: y = x * (g + 1) on each local expert's rows; then combine back.
  std::vector<float> yg(capacity_ * C, kPoison);
  for (int64_t j = 0; j < EL; ++j)
    for (int64_t r = plan.local_offsets[j]; r < plan.local_offsets[j + 1]; ++r)
      for (int64_t i = 0; i < C; ++i) yg[r * C + i] = expert_fn(xg[r * C + i], me_ * EL + j);
  std::vector<float> yp(xp_.size(), kPoison);
  ep_combine(yp.data(), scratch.data(), yg.data(), plan, C, *comm_);

  // Single-process result of the same experts on this rank's own rows.
  const RankData& d = ranks_[me_];
  std::vector<float> yp_ref(xp_.size());
  for (int64_t e = 0; e < c.E; ++e)
    for (int64_t r = offsets_[e]; r < offsets_[e + 1]; ++r)
      for (int64_t i = 0; i < C; ++i) yp_ref[r * C + i] = expert_fn(xp_[r * C + i], e);
  EXPECT_TRUE(same_bits(yp.data(), yp_ref.data(), static_cast<int64_t>(yp.size())));

  // moe_combine_forward works unchanged on the combined rows: against a plain double loop.
  std::vector<float> out(d.N * C, kPoison);
  cpu::moe_combine_forward(out.data(), yp.data(), d.weights.data(), row_of_.data(), d.N, c.K, C);
  int64_t bad_out = 0;
  for (int64_t n = 0; n < d.N; ++n)
    for (int64_t i = 0; i < C; ++i) {
      double want = 0.0;
      for (int64_t k = 0; k < c.K; ++k)
        want += static_cast<double>(d.weights[n * c.K + k]) * d.x[n * C + i] *
                static_cast<double>(d.ids[n * c.K + k] + 1);
      bad_out += !(std::fabs(out[n * C + i] - want) <= 1e-5 * (1.0 + std::fabs(want)));
    }
  EXPECT_EQ(bad_out, 0);
}

TEST_P(ExpertDispatch, RoundTripIsIdentity) {
  const DispatchCase& c = GetParam().c;
  local_plan();
  EpPlan plan = ep_plan_create(ep_, c.E, capacity_);
  ep_plan(plan, counts_.data(), *comm_);
  std::vector<float> xg(capacity_ * c.C), scratch(capacity_ * c.C);
  std::vector<float> back(xp_.size(), std::numeric_limits<float>::quiet_NaN());
  ep_dispatch(xg.data(), scratch.data(), xp_.data(), plan, c.C, *comm_);
  ep_combine(back.data(), scratch.data(), xg.data(), plan, c.C, *comm_);
  EXPECT_TRUE(same_bits(back.data(), xp_.data(), static_cast<int64_t>(xp_.size())));
  // The same plan serves a second micro-batch of the same routing (no state left behind).
  std::vector<float> xp2(xp_.size());
  for (size_t i = 0; i < xp2.size(); ++i) xp2[i] = -2.0f * xp_[i];
  ep_dispatch(xg.data(), scratch.data(), xp2.data(), plan, c.C, *comm_);
  ep_combine(back.data(), scratch.data(), xg.data(), plan, c.C, *comm_);
  EXPECT_TRUE(same_bits(back.data(), xp2.data(), static_cast<int64_t>(xp2.size())));
}

// ---- EpExchange and its wire formats. ----

// fp8_fake_quantize of one row with the activation tiles: what the FP8 dispatch delivers.
std::vector<float> fp8_row(const float* x, int64_t C) {
  std::vector<float> out(static_cast<size_t>(C));
  fp8_fake_quantize(out.data(), x, 1, C, kTileAct);
  return out;
}

TEST(EpWireFormat, RowBytes) {
  EXPECT_EQ(ep_dispatch_row_bytes(EpWireFormat::kFloat, 200), 800);
  EXPECT_EQ(ep_combine_row_bytes(EpWireFormat::kFloat, 200), 800);
  EXPECT_EQ(ep_dispatch_row_bytes(EpWireFormat::kFp8Bf16, 200), 200 + 2 * 4);
  EXPECT_EQ(ep_dispatch_row_bytes(EpWireFormat::kFp8Bf16, 128), 128 + 4);
  EXPECT_EQ(ep_dispatch_row_bytes(EpWireFormat::kFp8Bf16, 129), 129 + 2 * 4);
  EXPECT_EQ(ep_dispatch_row_bytes(EpWireFormat::kFp8Bf16, 7168), 7168 + 56 * 4);
  EXPECT_EQ(ep_dispatch_row_bytes(EpWireFormat::kFp8Bf16, 1), 1 + 4);
  EXPECT_EQ(ep_combine_row_bytes(EpWireFormat::kFp8Bf16, 200), 400);
  EXPECT_EQ(ep_wire_bytes(EpWireFormat::kFp8Bf16, 3, 200), 3 * 400);  // combine is larger
  EXPECT_EQ(ep_wire_bytes(EpWireFormat::kFp8Bf16, 3, 1), 3 * 5);      // dispatch is larger
  EXPECT_EQ(ep_wire_bytes(EpWireFormat::kFloat, 3, 200), 3 * 800);
  EXPECT_EQ(ep_wire_scale_count(3, 200), 6);
  EXPECT_STREQ(ep_wire_format_name(EpWireFormat::kFloat), "float");
}

// The default format is the float wire: exact copies, the same bits as ep_dispatch /
// ep_combine, and 4 C bytes per remote row.
TEST_P(ExpertDispatch, ExchangeDefaultWireIsExactCopy) {
  const DispatchCase& c = GetParam().c;
  const int64_t C = c.C, EL = c.E / ep_;
  local_plan();
  const RankData& d = ranks_[me_];
  EpExchange ex(*comm_, c.E, 1, capacity_, C);
  EXPECT_EQ(ex.format(), EpWireFormat::kFloat);
  std::vector<int64_t> offs(EL + 1, -1), blocks(EL * ep_ + 1, -1);
  ex.plan_start(0, 0, counts_.data(), d.ids.data(), d.N, c.K);
  const int64_t R = ex.plan_finish(0, offs.data(), blocks.data());
  expect_blocks(blocks, offs);
  const float kPoison = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> xg(capacity_ * C, kPoison), back(xp_.size(), kPoison);
  ex.dispatch_start(0, 0, xg.data(), xp_.data(), C);
  ex.finish(0);
  int64_t bad = 0;
  const int64_t rows = for_each_expected_row([&](int64_t row, int64_t, int p, int64_t n) {
    bad += !same_bits(xg.data() + row * C, ranks_[p].x.data() + n * C, C);
  });
  EXPECT_EQ(R, rows);
  EXPECT_EQ(offs[EL], rows);
  EXPECT_EQ(bad, 0);
  ex.combine_start(0, 0, back.data(), xg.data(), C);
  ex.finish(0);
  EXPECT_TRUE(same_bits(back.data(), xp_.data(), static_cast<int64_t>(xp_.size())));

  EpPlan plan = ep_plan_create(ep_, c.E, capacity_);
  ep_plan(plan, counts_.data(), *comm_);
  std::vector<float> xg_ref(capacity_ * C, kPoison), scratch(capacity_ * C);
  ep_dispatch(xg_ref.data(), scratch.data(), xp_.data(), plan, C, *comm_);
  EXPECT_TRUE(same_bits(xg.data(), xg_ref.data(), R * C));
  EXPECT_EQ(ex.traffic().bytes_dispatch, ep_bytes_sent(plan, C));
  EXPECT_EQ(ex.traffic().bytes_combine, ep_rows_recv_remote(plan) * C * 4);
}

// The FP8 / BF16 wire through EpExchange, two lanes in flight at once: every dispatched row
// is the FP8 fake quantization of its source row, every combined row the BF16 rounding of
// what the expert produced, bit for bit; the bytes are the format's.
TEST_P(ExpertDispatch, ExchangeCompactWireRoundsRowByRow) {
  const DispatchCase& c = GetParam().c;
  const int64_t C = c.C, EL = c.E / ep_;
  vary_magnitudes();
  local_plan();
  const RankData& d = ranks_[me_];
  EpExchange ex(*comm_, c.E, 1, capacity_, C, 2, EpWireFormat::kFp8Bf16);
  EXPECT_EQ(ex.format(), EpWireFormat::kFp8Bf16);
  std::vector<int64_t> offs(EL + 1, -1), blocks(EL * ep_ + 1, -1);
  ex.plan_start(0, 0, counts_.data(), d.ids.data(), d.N, c.K);
  const int64_t R = ex.plan_finish(0, offs.data(), blocks.data());
  expect_blocks(blocks, offs);

  const float kPoison = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> xg(capacity_ * C, kPoison);
  ex.dispatch_start(0, 0, xg.data(), xp_.data(), C);
  ex.finish(0);
  // Received rows against the senders' rows, fake-quantized here.
  int64_t bad = 0, changed = 0, nonzero = 0, zero_rows = 0;
  std::string first_bad;
  const int64_t rows = for_each_expected_row([&](int64_t row, int64_t g, int p, int64_t n) {
    const float* src = ranks_[p].x.data() + n * C;
    const std::vector<float> want = fp8_row(src, C);
    if (!same_bits(xg.data() + row * C, want.data(), C) && bad++ == 0)
      first_bad = "row " + std::to_string(row) + " (expert " + std::to_string(g) + ", sender " +
                  std::to_string(p) + ", token " + std::to_string(n) + ")";
    int64_t nz = 0;
    for (int64_t i = 0; i < C; ++i) {
      changed += want[i] != src[i];
      nz += src[i] != 0.0f;
    }
    nonzero += nz;
    zero_rows += nz == 0;
  });
  EXPECT_EQ(R, rows);
  EXPECT_EQ(offs[EL], rows);
  EXPECT_EQ(bad, 0) << "first mismatch at " << first_bad;
  EXPECT_EQ(nonzero > 0, rows > 0) << "inputs must not be all zero";
  // (With C = 1 each row is its own tile's amax, which comes back as itself or a neighbour.)
  if (C > 1) {
    EXPECT_EQ(changed > 0, nonzero > 0) << "FP8 must round some element, or nothing is tested";
  }
  int64_t zero_sent = 0;  // all-zero rows this rank dispatches (token 2 when N > 2)
  for (int64_t r = 0; r < d.N * c.K; ++r)
    zero_sent += std::all_of(xp_.begin() + r * C, xp_.begin() + (r + 1) * C,
                             [](float v) { return v == 0.0f; });
  EXPECT_EQ(zero_sent > 0, d.N > 2) << "all-zero rows must be among the inputs";
  EXPECT_LE(zero_rows, rows);

  // Experts y = x * (g + 1); the combine (lane 0) runs while a second dispatch (lane 1, the
  // backward's dyp = -3 xp) is in flight.
  std::vector<float> yg(capacity_ * C, kPoison);
  for (int64_t j = 0; j < EL; ++j)
    for (int64_t r = offs[j]; r < offs[j + 1]; ++r)
      for (int64_t i = 0; i < C; ++i) yg[r * C + i] = expert_fn(xg[r * C + i], me_ * EL + j);
  std::vector<float> dyp(xp_.size()), dyg(capacity_ * C, kPoison);
  for (size_t i = 0; i < dyp.size(); ++i) dyp[i] = -3.0f * xp_[i];
  std::vector<float> yp(xp_.size(), kPoison);
  ex.combine_start(0, 0, yp.data(), yg.data(), C);
  ex.dispatch_start(1, 0, dyg.data(), dyp.data(), C);
  std::fill(yg.begin(), yg.end(), kPoison);  // the combine no longer reads y_grouped
  ex.finish(0);
  ex.finish(1);

  // yp row r (expert e) = bf16_round(expert_fn(fp8(xp row r), e)), in xp's row order.
  int64_t bad_yp = 0, bf16_changed = 0;
  for (int64_t e = 0; e < c.E; ++e)
    for (int64_t r = offsets_[e]; r < offsets_[e + 1]; ++r) {
      const std::vector<float> q = fp8_row(xp_.data() + r * C, C);
      for (int64_t i = 0; i < C; ++i) {
        const float y = expert_fn(q[i], e), want = bf16_round(y);
        bad_yp += f32_bits(yp[r * C + i]) != f32_bits(want);
        bf16_changed += want != y;
      }
    }
  EXPECT_EQ(bad_yp, 0);
  EXPECT_EQ(bf16_changed > 0, zero_sent < d.N * c.K) << "BF16 must round some element";
  int64_t bad_dy = 0;
  for_each_expected_row([&](int64_t row, int64_t, int p, int64_t n) {
    std::vector<float> src(ranks_[p].x.begin() + n * C, ranks_[p].x.begin() + (n + 1) * C);
    for (float& v : src) v *= -3.0f;
    bad_dy += !same_bits(dyg.data() + row * C, fp8_row(src.data(), C).data(), C);
  });
  EXPECT_EQ(bad_dy, 0);

  // Round trip: combining the dispatched rows gives bf16_round(fp8(xp)) back.
  std::vector<float> back(xp_.size(), kPoison);
  ex.combine_start(1, 0, back.data(), xg.data(), C);
  ex.finish(1);
  int64_t bad_back = 0;
  for (int64_t r = 0; r < d.N * c.K; ++r) {
    const std::vector<float> q = fp8_row(xp_.data() + r * C, C);
    for (int64_t i = 0; i < C; ++i) bad_back += f32_bits(back[r * C + i]) != f32_bits(bf16_round(q[i]));
  }
  EXPECT_EQ(bad_back, 0);

  // Bytes on the wire: two dispatches and two combines, at the format's row sizes.
  EpPlan plan = ep_plan_create(ep_, c.E, capacity_);
  ep_plan(plan, counts_.data(), *comm_);
  const int64_t nt = (C + 127) / 128;
  const int64_t sent = ep_rows_sent_remote(plan), recv = ep_rows_recv_remote(plan);
  const EpTraffic& t = ex.traffic();
  EXPECT_EQ(t.bytes_dispatch, 2 * sent * (C + 4 * nt));
  EXPECT_EQ(t.bytes_combine, 2 * recv * 2 * C);
  // Against the float wire: dispatch (C + 4 ceil(C / 128)) / 4 C, combine exactly 1 / 2.
  EXPECT_EQ(t.bytes_dispatch * 4 * C, 2 * ep_bytes_sent(plan, C) * (C + 4 * nt));
  EXPECT_EQ(t.bytes_combine * 2, 2 * recv * 4 * C);
  if (C >= 128 && sent > 0) {
    EXPECT_LT(t.bytes_dispatch * 100, 2 * ep_bytes_sent(plan, C) * 27);
  }
}

// The device path (parallel/expert_dispatch_device.h) with the CPU backend and MPI as the
// device communicator: in both wire formats, dispatch, combine and a second lane in flight
// give the host path's bits, and the traffic counts agree; either path's buffers are the
// bytes ep_exchange_buffer_bytes (the dry run's figure) says.
TEST_P(ExpertDispatch, DevicePathEqualsHostPath) {
  const DispatchCase& c = GetParam().c;
  const int64_t C = c.C, EL = c.E / ep_;
  vary_magnitudes();
  local_plan();
  const RankData& d = ranks_[me_];
  std::unique_ptr<Ops<float>> ops = ops_cpu_create<float>();
  for (EpWireFormat f : {EpWireFormat::kFloat, EpWireFormat::kFp8Bf16}) {
    SCOPED_TRACE(ep_wire_format_name(f));
    struct Out {
      std::vector<float> xg, yp, dyg;
      int64_t R = 0;
      EpTraffic traffic;
    };
    auto run = [&](bool device, bool count_least) {
      EpExchange ex(*comm_, c.E, 1, capacity_, C, 2, f);
      if (device) ex.set_device(*ops, *comm_, Device::kCpu);
      ex.count_least_traffic(count_least);
      // What the dry run reports is what the exchange holds.
      EXPECT_EQ(ex.buffer_bytes(), ep_exchange_buffer_bytes(f, capacity_, C, 2, device));
      EXPECT_EQ(ex.buffer_bytes() > 0, capacity_ > 0);
      std::vector<int64_t> offs(EL + 1), blocks(EL * ep_ + 1);
      ex.plan_start(0, 0, counts_.data(), d.ids.data(), d.N, c.K);
      Out o;
      o.R = ex.plan_finish(0, offs.data(), blocks.data());
      const float kPoison = std::numeric_limits<float>::quiet_NaN();
      o.xg.assign(static_cast<size_t>(capacity_ * C), kPoison);
      ex.dispatch_start(0, 0, o.xg.data(), xp_.data(), C);
      ex.finish(0);
      std::vector<float> yg(o.xg);
      for (int64_t j = 0; j < EL; ++j)
        for (int64_t r = offs[j]; r < offs[j + 1]; ++r)
          for (int64_t i = 0; i < C; ++i) yg[r * C + i] = expert_fn(o.xg[r * C + i], me_ * EL + j);
      std::vector<float> dyp(xp_.size());
      for (size_t i = 0; i < dyp.size(); ++i) dyp[i] = -3.0f * xp_[i];
      o.yp.assign(xp_.size(), kPoison);
      o.dyg.assign(static_cast<size_t>(capacity_ * C), kPoison);
      ex.combine_start(0, 0, o.yp.data(), yg.data(), C);
      ex.dispatch_start(1, 0, o.dyg.data(), dyp.data(), C);  // two lanes in flight
      ex.progress();
      ex.finish(1);
      ex.finish(0);
      o.traffic = ex.traffic();
      return o;
    };
    const Out host = run(false, true), dev = run(true, true), quiet = run(true, false);
    EXPECT_EQ(dev.R, host.R);
    EXPECT_TRUE(same_bits(dev.xg.data(), host.xg.data(), host.R * C));
    EXPECT_TRUE(same_bits(dev.dyg.data(), host.dyg.data(), host.R * C));
    EXPECT_TRUE(same_bits(dev.yp.data(), host.yp.data(), static_cast<int64_t>(host.yp.size())));
    EXPECT_EQ(dev.traffic.rows_remote, host.traffic.rows_remote);
    EXPECT_EQ(dev.traffic.rows_remote_min, host.traffic.rows_remote_min);
    EXPECT_EQ(dev.traffic.bytes_dispatch, host.traffic.bytes_dispatch);
    EXPECT_EQ(dev.traffic.bytes_combine, host.traffic.bytes_combine);
    // The least traffic counted from the routing itself: per token, its experts' distinct
    // owners other than this rank. Not counted (and the routing not read back from the
    // device) unless asked for; the rest is counted all the same.
    int64_t least = 0;
    for (int64_t i = 0; i < d.N; ++i) {
      std::set<int64_t> owners;
      for (int64_t k = 0; k < c.K; ++k) {
        const int64_t owner = d.ids[static_cast<size_t>(i * c.K + k)] / EL;
        if (owner != me_) owners.insert(owner);
      }
      least += static_cast<int64_t>(owners.size());
    }
    EXPECT_EQ(host.traffic.rows_remote_min, least);
    EXPECT_EQ(quiet.traffic.rows_remote_min, 0);
    EXPECT_EQ(quiet.traffic.rows_remote, host.traffic.rows_remote);
    EXPECT_EQ(quiet.traffic.bytes_dispatch, host.traffic.bytes_dispatch);
    EXPECT_TRUE(same_bits(quiet.yp.data(), host.yp.data(), static_cast<int64_t>(host.yp.size())));
  }
}

// The free split forms of the compact wire: per-peer byte counts are rows times the format's
// row bytes, and the decoded rows equal the reference.
TEST_P(ExpertDispatch, CompactWireBytesPerPeer) {
  const DispatchCase& c = GetParam().c;
  const int64_t C = c.C;
  vary_magnitudes();
  local_plan();
  EpPlan plan = ep_plan_create(ep_, c.E, capacity_);
  ep_plan(plan, counts_.data(), *comm_);
  const EpWireFormat f = EpWireFormat::kFp8Bf16;
  const int64_t bytes = ep_wire_bytes(f, capacity_, C);
  std::vector<uint8_t> send(bytes + 1), recv(bytes + 1);  // + 1: an odd base address
  std::vector<float> scales(ep_wire_scale_count(capacity_, C));
  std::vector<float> xg(capacity_ * C, std::numeric_limits<float>::quiet_NaN());
  EpWire wire = ep_wire_create(ep_);
  CommRequest r = ep_dispatch_fp8_start(recv.data() + 1, send.data() + 1, scales.data(),
                                        xp_.data(), plan, C, wire, *comm_);
  comm_->wait(r);
  ep_dispatch_fp8_finish(xg.data(), scales.data(), recv.data() + 1, plan, C);
  const int64_t rb = ep_dispatch_row_bytes(f, C);
  for (int q = 0; q < ep_; ++q) {
    EXPECT_EQ(wire.send_bytes[q], plan.send_counts[q] * rb) << "peer " << q;
    EXPECT_EQ(wire.send_displs[q], plan.send_displs[q] * rb) << "peer " << q;
    EXPECT_EQ(wire.recv_bytes[q], plan.recv_counts[q] * rb) << "peer " << q;
    EXPECT_EQ(wire.recv_displs[q], plan.recv_displs[q] * rb) << "peer " << q;
  }
  int64_t bad = 0;
  for_each_expected_row([&](int64_t row, int64_t, int p, int64_t n) {
    bad += !same_bits(xg.data() + row * C, fp8_row(ranks_[p].x.data() + n * C, C).data(), C);
  });
  EXPECT_EQ(bad, 0);
  std::vector<float> back(xp_.size(), std::numeric_limits<float>::quiet_NaN());
  r = ep_combine_bf16_start(recv.data() + 1, send.data() + 1, xg.data(), plan, C, wire, *comm_);
  comm_->wait(r);
  ep_combine_bf16_finish(back.data(), recv.data() + 1, plan, C);
  for (int q = 0; q < ep_; ++q) EXPECT_EQ(wire.send_bytes[q], plan.send_counts[q] * 2 * C);
  int64_t bad_back = 0;
  for (int64_t row = 0; row < plan.rows_sent; ++row) {
    const std::vector<float> q = fp8_row(xp_.data() + row * C, C);
    for (int64_t i = 0; i < C; ++i) bad_back += f32_bits(back[row * C + i]) != f32_bits(bf16_round(q[i]));
  }
  EXPECT_EQ(bad_back, 0);
}

INSTANTIATE_TEST_SUITE_P(Cases, ExpertDispatch, testing::ValuesIn(all_params()), param_name);

}  // namespace
}  // namespace moe
