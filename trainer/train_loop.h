// `moetrain train`: data, model, the step loop, evaluation, metrics and samples.
#pragma once

#include "io/config.h"

namespace moe {

// Runs training to the end; returns the process exit code. Throws UserError on bad input.
int train_main(const Config& cfg);

}  // namespace moe
