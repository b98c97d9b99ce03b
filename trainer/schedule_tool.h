// `moetrain schedule`: prints each pipeline rank's op list for a schedule kind and simulates
// it with given per-chunk costs (bubble, makespan, peak activations, parameter copies).
// Needs no config and no MPI. Definitions in parallel/schedule.h.
#pragma once

#include <optional>
#include <string>

#include "parallel/schedule.h"

namespace moe {

struct ScheduleToolOptions {
  std::string kind;                // 1f1b | zb1p | dualpipe | dualpipev
  int pp = 0;                      // pipeline ranks
  int micro_batches = 0;           // per optimizer step
  double f = 1, b = 2, w = 1;      // forward, full backward, its weight part, per chunk
  std::optional<double> fb;        // overlapped F&B pair; unset: f + b
  bool json = false;               // one JSON object instead of text
  bool ticks = false;              // also the tick plan NCCL runs (parallel/pipeline_ticks.h)
};

// Returns the process exit code; bad input is a UserError.
int schedule_main(const ScheduleToolOptions& opt);

}  // namespace moe
