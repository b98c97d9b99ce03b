// What a run will be, before it starts: sizes, memory, FLOPs.
#pragma once

#include <string>

#include "io/config.h"

namespace moe {

// Parameter counts, the per-arena memory estimate (MiB) and FLOPs per token, as text.
std::string run_summary(const Config& cfg);

}  // namespace moe
