// Throughput measurement: the machine's sgemm peak through OpenBLAS and the trainer's step
// rate, measured in the same run so MFU is a ratio of two numbers from one machine state.
#pragma once

#include "io/config.h"

namespace moe {

// Best sustained FLOP/s of square FP32 GEMMs through OpenBLAS (several sizes, best of a few
// repetitions each), using the current OpenMP thread count.
double sgemm_peak_flops();

struct BenchOptions {
  int steps = 5;        // timed optimizer steps (after one warm-up step)
  bool json = false;
};

// Runs `moetrain bench`; returns the process exit code.
int bench_main(const Config& cfg, const BenchOptions& opt);

}  // namespace moe
