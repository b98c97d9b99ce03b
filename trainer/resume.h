// Choosing the checkpoint a run continues from, and what may change across a resume.
#pragma once

#include <string>
#include <vector>

#include "io/config.h"

namespace moe {

// Compares the config a checkpoint was written with (`saved`) with the current one.
// A change that alters the model's shape or function (model, attention, routing keys) is a
// UserError naming the key and both values; every other change is allowed and returned as
// a line "training.steps: 600 -> 1000" for the log.
std::vector<std::string> config_resume_changes(const Config& saved, const Config& now,
                                               const std::string& ckpt_path);

// The checkpoint files to try, best first, for checkpoint.resume:
//   "none": none (and checkpoint.dir must not already hold checkpoints: starting fresh
//           there would prune a previous run's files; UserError says what to do);
//   "auto": the one "latest" names, then every step-*.h5 newest first (empty: fresh start);
//   a path: that file (or, for a folder, its checkpoints as for "auto").
std::vector<std::string> resume_candidates(const Config& cfg);

}  // namespace moe
