// Pipeline schedules as data (parallel/schedule.h): every schedule respects every data
// dependency, and the simulated bubbles and activations are those of the DeepSeek-V3
// report's Table 2.
//
// Definitions under test (schedule.h): bubble = the largest over ranks of (makespan - the
// rank's summed compute cost); for dualpipev the table's PP is 2 pp (its stages: DualPipeV on
// pp ranks is half of DualPipe on 2 pp ranks); peak activations count one chunk's
// activations of one micro-batch, an F&B pair holding both of its micro-batches.
#include <gtest/gtest.h>
#include <unistd.h>
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "model/check.h"
#include "parallel/schedule.h"

namespace {

using moe::PipeOp;
using moe::PipeOpKind;
using moe::PipeSchedule;
using moe::ScheduleCosts;
using moe::ScheduleSim;

constexpr PipeSchedule kAllKinds[] = {PipeSchedule::k1F1B, PipeSchedule::kZB1P,
                                      PipeSchedule::kDualPipe, PipeSchedule::kDualPipeV};
constexpr int kTablePp[] = {2, 4, 6, 8, 16};

// The micro-batch counts each kind is checked with at a given pp.
std::vector<int> micro_batch_counts(PipeSchedule kind, int pp) {
  switch (kind) {
    case PipeSchedule::kDualPipe: return {2 * pp, 2 * pp + 2, (3 * pp + 1) / 2 * 2};
    case PipeSchedule::kDualPipeV: return {2 * pp, 2 * pp + 1, 3 * pp};
    default: return {pp, 2 * pp, 3 * pp + 1};
  }
}

// Table 2 of the DeepSeek-V3 report, PP as the table means it (2 pp for dualpipev).
double table_bubble(PipeSchedule kind, int pp, const ScheduleCosts& c) {
  switch (kind) {
    case PipeSchedule::k1F1B: return (pp - 1) * (c.f + c.b);
    case PipeSchedule::kZB1P: return (pp - 1) * (c.f + c.b - 2 * c.w);
    case PipeSchedule::kDualPipe: return (pp / 2 - 1) * (c.fb + c.b - 3 * c.w);
    case PipeSchedule::kDualPipeV: return (2 * pp / 2 - 1) * (c.fb + c.b - 3 * c.w);
  }
  return -1;
}

std::string label(PipeSchedule kind, int pp, int M) {
  return moe::strprintf("%s pp=%d M=%d", moe::schedule_kind_name(kind), pp, M);
}

TEST(ScheduleTable2, BubblesMatchTheReport) {
  const ScheduleCosts c;  // F:B:W = 1:2:1, F&B = F + B
  for (PipeSchedule kind : kAllKinds)
    for (int pp : kTablePp)
      for (int M : micro_batch_counts(kind, pp)) {
        SCOPED_TRACE(label(kind, pp, M));
        const ScheduleSim sim = moe::schedule_simulate(kind, pp, M, c);
        EXPECT_EQ(sim.bubble, table_bubble(kind, pp, c));
        // Every rank runs the same number of chunk passes (M, or 2 M for dualpipev's two
        // chunks per micro-batch), each F + B, so every rank idles the same time.
        const double busy = (kind == PipeSchedule::kDualPipeV ? 2 * M : M) * (c.f + c.b);
        for (int r = 0; r < pp; ++r) {
          EXPECT_EQ(sim.rank_busy[static_cast<size_t>(r)], busy);
          EXPECT_EQ(sim.rank_bubble[static_cast<size_t>(r)], sim.bubble);
        }
        EXPECT_EQ(sim.makespan, busy + sim.bubble);
      }
}

// An overlapped pair cheaper than F + B (but not than B) keeps DualPipe on the formula;
// ranks then differ, and the largest bubble is the table's.
TEST(ScheduleTable2, CheaperOverlappedPair) {
  for (double fb : {2.0, 2.5})
    for (PipeSchedule kind : {PipeSchedule::kDualPipe, PipeSchedule::kDualPipeV})
      for (int pp : kTablePp) {
        const int M = 2 * pp + 2;
        SCOPED_TRACE(label(kind, pp, M) + moe::strprintf(" fb=%g", fb));
        const ScheduleCosts c{1, 2, 1, fb};
        EXPECT_EQ(moe::schedule_simulate(kind, pp, M, c).bubble, table_bubble(kind, pp, c));
      }
}

TEST(ScheduleTable2, PeakActivationsAndParameters) {
  for (int pp : kTablePp) {
    const int M = 2 * pp + 2;
    const ScheduleSim f1b = moe::schedule_simulate(PipeSchedule::k1F1B, pp, M, {});
    const ScheduleSim zb = moe::schedule_simulate(PipeSchedule::kZB1P, pp, M, {});
    const ScheduleSim dp = moe::schedule_simulate(PipeSchedule::kDualPipe, pp, M, {});
    const ScheduleSim dv = moe::schedule_simulate(PipeSchedule::kDualPipeV, pp, M, {});
    for (int r = 0; r < pp; ++r) {
      const size_t i = static_cast<size_t>(r);
      EXPECT_EQ(f1b.peak_activations[i], pp - r) << "1f1b pp " << pp << " rank " << r;
      EXPECT_EQ(zb.peak_activations[i], pp) << "zb1p pp " << pp << " rank " << r;
      EXPECT_EQ(dp.peak_activations[i], pp + 1) << "dualpipe pp " << pp << " rank " << r;
      // Half-size chunks: PP + 1 with PP = 2 pp.
      EXPECT_EQ(dv.peak_activations[i], 2 * pp + 1) << "dualpipev pp " << pp << " rank " << r;
    }
    EXPECT_EQ(f1b.param_copies, 1);
    EXPECT_EQ(zb.param_copies, 1);
    EXPECT_EQ(dp.param_copies, 2);
    EXPECT_EQ(dv.param_copies, 1);
  }
}

// Every schedule the builder makes passes the dependency check and runs to the end, with
// the default costs and with uneven ones.
TEST(Schedule, EveryScheduleRespectsEveryDependency) {
  const ScheduleCosts uneven{1, 3, 2, 3.5};
  for (PipeSchedule kind : kAllKinds)
    for (int pp = 1; pp <= 16; pp += pp < 8 ? 1 : 8) {
      if (kind == PipeSchedule::kDualPipe && pp % 2 != 0) continue;
      std::vector<int> Ms = micro_batch_counts(kind, pp);
      if (kind == PipeSchedule::k1F1B || kind == PipeSchedule::kZB1P)
        Ms.insert(Ms.end(), {1, 2, pp + 1});  // fewer micro-batches than ranks too
      for (int M : Ms) {
        if (M < 1) continue;
        SCOPED_TRACE(label(kind, pp, M));
        const auto ranks = moe::schedule_all_ops(kind, pp, M);
        for (const ScheduleCosts& c : {ScheduleCosts{}, uneven}) {
          const ScheduleSim sim = moe::schedule_simulate_ops(kind, pp, M, ranks, c);
          EXPECT_EQ(sim.error, "");
          EXPECT_GT(sim.makespan, 0);
        }
        // Each rank forwards M micro-batches per chunk it holds (DualPipe: M/2 per chunk).
        for (int r = 0; r < pp; ++r) {
          int forwards = 0;
          for (const PipeOp& op : ranks[static_cast<size_t>(r)])
            forwards += op.kind == PipeOpKind::kForward || op.kind == PipeOpKind::kForwardBackward;
          const int expected = kind == PipeSchedule::kDualPipeV ? 2 * M : M;
          EXPECT_EQ(forwards, expected) << "rank " << r;
        }
      }
    }
}

TEST(Schedule, StagePlacement) {
  for (int r = 0; r < 4; ++r) {
    EXPECT_EQ(moe::schedule_stage_of(PipeSchedule::k1F1B, 4, r, 0), r);
    EXPECT_EQ(moe::schedule_stage_of(PipeSchedule::kDualPipe, 4, r, 0), r);
    EXPECT_EQ(moe::schedule_stage_of(PipeSchedule::kDualPipe, 4, r, 1), 3 - r);
    EXPECT_EQ(moe::schedule_stage_of(PipeSchedule::kDualPipeV, 4, r, 0), r);
    EXPECT_EQ(moe::schedule_stage_of(PipeSchedule::kDualPipeV, 4, r, 1), 7 - r);
  }
  EXPECT_EQ(moe::schedule_num_stages(PipeSchedule::kDualPipeV, 4), 8);
  EXPECT_EQ(moe::schedule_num_stages(PipeSchedule::kDualPipe, 4), 4);
  EXPECT_EQ(moe::schedule_chunks_per_rank(PipeSchedule::kZB1P), 1);
  EXPECT_EQ(moe::schedule_chunks_per_rank(PipeSchedule::kDualPipe), 2);
  // DualPipe: the first half of the micro-batches flows down, the second half up.
  EXPECT_EQ(moe::schedule_place(PipeSchedule::kDualPipe, 4, 8, 0, 3).rank, 0);
  EXPECT_EQ(moe::schedule_place(PipeSchedule::kDualPipe, 4, 8, 0, 4).rank, 3);
  EXPECT_EQ(moe::schedule_place(PipeSchedule::kDualPipe, 4, 8, 0, 4).chunk, 1);
  // DualPipeV turns on the last rank and ends on rank 0.
  EXPECT_EQ(moe::schedule_place(PipeSchedule::kDualPipeV, 4, 8, 4, 0).rank, 3);
  EXPECT_EQ(moe::schedule_place(PipeSchedule::kDualPipeV, 4, 8, 7, 0).rank, 0);
  EXPECT_EQ(moe::schedule_place(PipeSchedule::kDualPipeV, 4, 8, 7, 0).chunk, 1);
}

TEST(Schedule, PrintedForm) {
  EXPECT_EQ(moe::schedule_to_string(moe::schedule_rank_ops(PipeSchedule::k1F1B, 2, 2, 0)),
            "F0.0 a>1 F0.1 a>1 g<1 B0.0 g<1 B0.1");
  EXPECT_EQ(moe::schedule_to_string(moe::schedule_rank_ops(PipeSchedule::kZB1P, 2, 2, 1)),
            "a<0 F0.0 Bx0.0 g>0 a<0 F0.1 Bx0.1 g>0 W0.0 W0.1");
  const PipeOp pair{PipeOpKind::kForwardBackward, 0, 3, 1, 5, -1};
  EXPECT_EQ(moe::pipe_op_to_string(pair), "F0.3&B1.5");
}

// The checker names what is wrong with a hand-broken schedule.
TEST(Schedule, CheckerCatchesBrokenSchedules) {
  const PipeSchedule k = PipeSchedule::kZB1P;
  const auto good = moe::schedule_all_ops(k, 2, 2);
  auto expect_error = [&](std::vector<std::vector<PipeOp>> ranks, const std::string& what) {
    const ScheduleSim sim = moe::schedule_simulate_ops(k, 2, 2, ranks, {});
    EXPECT_NE(sim.error.find(what), std::string::npos) << "got '" << sim.error << "'";
  };
  auto ranks = good;
  ranks[1].pop_back();  // the last W
  expect_error(ranks, "stage 1 micro-batch 1 lacks its W");
  ranks = good;
  std::swap(ranks[1][0], ranks[1][1]);  // forward before its input arrived
  expect_error(ranks, "rank 1 op 0 (F0.0): input of stage 1 not here");
  ranks = good;
  std::swap(ranks[1][1], ranks[1][2]);  // backward before the forward
  expect_error(ranks, "rank 1 op 1 (Bx0.0): backward before its forward");
  ranks = good;
  // Rank 0 waits for the first gradient before it sends the first activation.
  ASSERT_EQ(moe::pipe_op_to_string(ranks[0][4]), "g<1");
  const PipeOp recv = ranks[0][4];
  ranks[0].erase(ranks[0].begin() + 4);
  ranks[0].insert(ranks[0].begin(), recv);
  expect_error(ranks, "deadlock: rank 0 at op 0 (g<1), rank 1 at op 0 (a<0)");
  ranks = good;
  ranks[0][1].peer = 0;  // a send to itself
  expect_error(ranks, "stage 1 of micro-batch 0 is not on rank 0");
}

std::string refusal(PipeSchedule kind, int pp, int M) {
  try {
    moe::schedule_check(kind, pp, M);
  } catch (const moe::UserError& e) {
    return e.what();
  }
  return "";
}

TEST(Schedule, ConstraintRefusals) {
  EXPECT_EQ(refusal(PipeSchedule::kDualPipe, 3, 12), "schedule dualpipe needs an even pp, got 3");
  EXPECT_EQ(refusal(PipeSchedule::kDualPipe, 4, 6),
            "schedule dualpipe needs an even number of micro-batches >= 2 * pp = 8, got 6");
  EXPECT_EQ(refusal(PipeSchedule::kDualPipe, 4, 9),
            "schedule dualpipe needs an even number of micro-batches >= 2 * pp = 8, got 9");
  EXPECT_EQ(refusal(PipeSchedule::kDualPipeV, 4, 7),
            "schedule dualpipev needs micro-batches >= 2 * pp = 8, got 7");
  EXPECT_EQ(refusal(PipeSchedule::k1F1B, 0, 4), "schedule 1f1b needs pp >= 1, got 0");
  EXPECT_EQ(refusal(PipeSchedule::kZB1P, 2, 0), "schedule zb1p needs micro-batches >= 1, got 0");
  EXPECT_EQ(refusal(PipeSchedule::kDualPipeV, 1, 2), "");
  EXPECT_EQ(refusal(PipeSchedule::k1F1B, 8, 1), "");
  EXPECT_THROW(moe::schedule_simulate(PipeSchedule::k1F1B, 2, 2, {1, 2, 3, 3}), moe::UserError);
}

// The binary: `moetrain schedule ... --json` is one object with the documented keys.
std::string run_binary(const std::string& args, int* code) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(::testing::TempDir()) / ("moetrain_schedule_cli_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const fs::path out = dir / "out.txt";
  const std::string cmd =
      std::string(MOETRAIN_BINARY) + " " + args + " >'" + out.string() + "' 2>&1";
  const int status = std::system(cmd.c_str());
  *code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream f(out);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

TEST(ScheduleCli, DualPipeJson) {
  int code = -1;
  const std::string out =
      run_binary("schedule --kind dualpipe --pp 4 --micro-batches 8 --json", &code);
  EXPECT_EQ(code, 0) << out;
  ASSERT_FALSE(out.empty());
  EXPECT_EQ(out.front(), '{');
  EXPECT_EQ(out.substr(out.size() - 2), "}\n");
  for (const char* key : {"\"ranks\": [[{\"op\": \"F\", \"chunk\": 0, \"mb\": 0}", "\"bubble\": 2,",
                          "\"makespan\": 26,", "\"peak_activations\": [5, 5, 5, 5]",
                          "\"param_copies\": 2}"})
    EXPECT_NE(out.find(key), std::string::npos) << key << " in " << out;

  const std::string text = run_binary("schedule --kind 1f1b --pp 4 --micro-batches 8", &code);
  EXPECT_EQ(code, 0);
  EXPECT_NE(text.find("bubble: 9 "), std::string::npos) << text;

  // --ticks: the groups NCCL runs (parallel/pipeline_ticks.h; PipelineTicks.* pins the plans).
  const std::string ticks =
      run_binary("schedule --kind dualpipe --pp 2 --micro-batches 4 --ticks", &code);
  EXPECT_EQ(code, 0) << ticks;
  EXPECT_NE(ticks.find("rank 1: F1.2 [a>0 a<0] F0.0 F1.3 [a>0 a<0] B0.0 [g>0 g<0] F0.1&B1.2 "
                       "B0.1 [g>0 g<0] Bx1.3 W1.3\n"), std::string::npos) << ticks;
  const std::string ticks_json =
      run_binary("schedule --kind 1f1b --pp 2 --micro-batches 2 --ticks --json", &code);
  EXPECT_EQ(code, 0) << ticks_json;
  EXPECT_NE(ticks_json.find("\"ticks\": [\"F0.0 [a>1] F0.1 [a>1 g<1] B0.0 [g<1] B0.1\", "
                            "\"[a<0] F0.0 B0.0 [g>0 a<0] F0.1 B0.1 [g>0]\"], \"ticks_moved\": 0,"),
            std::string::npos) << ticks_json;

  const std::string bad = run_binary("schedule --kind dualpipe --pp 3 --micro-batches 8", &code);
  EXPECT_NE(code, 0);
  EXPECT_EQ(bad, "error: schedule dualpipe needs an even pp, got 3\n");
  const std::string kind = run_binary("schedule --kind gpipe --pp 2 --micro-batches 8", &code);
  EXPECT_NE(code, 0);
  EXPECT_EQ(kind,
            "error: schedule: --kind expects one of 1f1b, zb1p, dualpipe, dualpipev, got 'gpipe'\n");
}

}  // namespace
