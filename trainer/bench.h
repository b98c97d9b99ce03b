// Throughput measurement: the machine's sgemm peak through OpenBLAS and the trainer's step
// rate, measured in the same run so MFU is a ratio of two numbers from one machine state.
#pragma once

#include <string>

#include "io/config.h"
#include "trainer/train_step.h"

namespace moe {

// Best sustained FLOP/s of square FP32 GEMMs through OpenBLAS (several sizes, best of a few
// repetitions each), using the current OpenMP thread count. `quick` measures one size only
// (~30 ms, for the training loop's MFU); the bench measures all.
double sgemm_peak_flops(bool quick = false);

// Synthetic tokens for the benches (they measure compute and need no data files): window
// (step, sequence) drawn from the run's seed, uniform over the vocabulary.
BatchSource bench_synthetic_batches(const Config& cfg);

struct BenchOptions {
  int steps = 5;        // timed optimizer steps (after one warm-up step); I/O repetitions
  bool json = false;
  bool checkpoint_io = false;  // measure checkpoint save/load instead of training steps
  bool precision = false;      // compare the precision modes' step time and memory
  std::string io_dir;          // where (default: <checkpoint.dir>/bench-io)
};

// Runs `moetrain bench`; returns the process exit code.
int bench_main(const Config& cfg, const BenchOptions& opt);

// `moetrain bench --checkpoint-io`: save/load MB/s against raw write+fsync / read MB/s.
int bench_checkpoint_main(const Config& cfg, const BenchOptions& opt);

// `moetrain bench --precision`: the config's step in fp32, bf16 and fp8 (one process, round
// robin), their step-time cost over fp32 and activation memory per micro-batch.
int bench_precision_main(const Config& cfg, const BenchOptions& opt);

}  // namespace moe
