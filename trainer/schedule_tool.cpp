#include "trainer/schedule_tool.h"

#include <cstdint>
#include <cstdio>

#include "model/check.h"
#include "parallel/pipeline_ticks.h"

namespace moe {

namespace {

// Bigger lists are no use printed, and the simulator's tables grow with pp x M.
constexpr int64_t kMaxWork = int64_t{1} << 18;

PipeSchedule parse_kind(const std::string& s) {
  for (PipeSchedule k : {PipeSchedule::k1F1B, PipeSchedule::kZB1P, PipeSchedule::kDualPipe,
                         PipeSchedule::kDualPipeV})
    if (s == schedule_kind_name(k)) return k;
  user_error("schedule: --kind expects one of 1f1b, zb1p, dualpipe, dualpipev, got '%s'",
             s.c_str());
}

std::string op_json(const PipeOp& op) {
  std::string s = strprintf("{\"op\": \"%s\", \"chunk\": %d, \"mb\": %d",
                            pipe_op_kind_name(op.kind), op.chunk, op.mb);
  if (op.kind == PipeOpKind::kForwardBackward)
    s += strprintf(", \"chunk2\": %d, \"mb2\": %d", op.chunk2, op.mb2);
  if (op.peer >= 0) s += strprintf(", \"peer\": %d", op.peer);
  return s + "}";
}

template <typename T>
std::string list_text(const std::vector<T>& v, const char* fmt, const char* sep) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? sep : "") + strprintf(fmt, v[i]);
  return s;
}

std::string stages_text(PipeSchedule kind, int pp, int r) {
  std::vector<int> st;
  for (int c = 0; c < schedule_chunks_per_rank(kind); ++c)
    st.push_back(schedule_stage_of(kind, pp, r, c));
  return list_text(st, "%d", ",");
}

}  // namespace

int schedule_main(const ScheduleToolOptions& opt) {
  const PipeSchedule kind = parse_kind(opt.kind);
  const int pp = opt.pp, M = opt.micro_batches;
  schedule_check(kind, pp, M);
  if (static_cast<int64_t>(pp) * M > kMaxWork)
    user_error("schedule: pp x micro-batches = %lld is more than %lld",
               static_cast<long long>(pp) * M, static_cast<long long>(kMaxWork));
  const ScheduleCosts costs{opt.f, opt.b, opt.w, opt.fb ? *opt.fb : opt.f + opt.b};
  schedule_costs_check(costs);

  const std::vector<std::vector<PipeOp>> ranks = schedule_all_ops(kind, pp, M);
  const ScheduleSim sim = schedule_simulate(kind, pp, M, costs);
  const char* name = schedule_kind_name(kind);
  const int S = schedule_num_stages(kind, pp);
  PipeTickPlan tick_plan;
  if (opt.ticks) {
    tick_plan = pipeline_ticks_plan(kind, pp, M);
    CHECK(tick_plan.error.empty(), "schedule %s pp %d M %d has no tick plan: %s", name, pp, M,
          tick_plan.error.c_str());
  }
  auto ticks_text = [&](int r) {
    return pipeline_ticks_to_string(ranks[static_cast<size_t>(r)],
                                    tick_plan.ranks[static_cast<size_t>(r)]);
  };

  if (opt.json) {
    std::string s = strprintf(
        "{\"kind\": \"%s\", \"pp\": %d, \"micro_batches\": %d, \"stages\": %d, "
        "\"costs\": {\"f\": %.10g, \"b\": %.10g, \"w\": %.10g, \"fb\": %.10g}, \"ranks\": [",
        name, pp, M, S, costs.f, costs.b, costs.w, costs.fb);
    for (int r = 0; r < pp; ++r) {
      s += r ? ", [" : "[";
      const std::vector<PipeOp>& ops = ranks[static_cast<size_t>(r)];
      for (size_t i = 0; i < ops.size(); ++i) s += (i ? ", " : "") + op_json(ops[i]);
      s += "]";
    }
    s += "]";
    if (opt.ticks) {
      s += ", \"ticks\": [";
      for (int r = 0; r < pp; ++r) s += (r ? ", \"" : "\"") + ticks_text(r) + "\"";
      s += strprintf("], \"ticks_moved\": %d", tick_plan.moved);
    }
    s += strprintf(", \"bubble\": %.10g, \"rank_bubble\": [%s], \"makespan\": %.10g, "
                   "\"peak_activations\": [%s], \"param_copies\": %d}\n",
                   sim.bubble, list_text(sim.rank_bubble, "%.10g", ", ").c_str(), sim.makespan,
                   list_text(sim.peak_activations, "%d", ", ").c_str(), sim.param_copies);
    std::fputs(s.c_str(), stdout);
    return 0;
  }

  std::printf("schedule %s: pp %d, %d micro-batches, %d stages, %d chunk%s per rank\n", name, pp,
              M, S, schedule_chunks_per_rank(kind), schedule_chunks_per_rank(kind) > 1 ? "s" : "");
  std::printf("ops: F forward, B backward, Bx backward for input, W backward for weights, "
              "F&B overlapped pair, as <chunk>.<micro-batch>;\n"
              "     a>r g>r send activation / gradient to rank r, a<r g<r receive from rank r\n");
  for (int r = 0; r < pp; ++r)
    std::printf("rank %d (stage%s %s): %s\n", r, schedule_chunks_per_rank(kind) > 1 ? "s" : "",
                stages_text(kind, pp, r).c_str(),
                schedule_to_string(ranks[static_cast<size_t>(r)]).c_str());
  std::printf("costs: F %.10g, B %.10g, W %.10g, F&B %.10g (Bx = B - W)\n", costs.f, costs.b,
              costs.w, costs.fb);
  std::printf("makespan: %.10g\n", sim.makespan);
  std::printf("bubble: %.10g (largest of makespan - busy time; per rank: %s)\n", sim.bubble,
              list_text(sim.rank_bubble, "%.10g", " ").c_str());
  std::printf("peak activations per rank: %s (in-flight micro-batch activations of one chunk)\n",
              list_text(sim.peak_activations, "%d", " ").c_str());
  std::printf("parameter copies: %d\n", sim.param_copies);
  if (opt.ticks) {
    std::printf("ticks (on NCCL: each [...] is one group of sends and receives, completed before "
                "the compute op after it; %d receive%s posted early or send%s held back):\n",
                tick_plan.moved, tick_plan.moved == 1 ? "" : "s", tick_plan.moved == 1 ? "" : "s");
    for (int r = 0; r < pp; ++r) std::printf("rank %d: %s\n", r, ticks_text(r).c_str());
  }
  return 0;
}

}  // namespace moe
