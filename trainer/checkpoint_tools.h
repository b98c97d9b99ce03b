// The subcommands that work on a finished checkpoint: inspect, eval, generate.
// Each takes a checkpoint file, or a checkpoint folder (its newest valid checkpoint).
#pragma once

#include <cstdint>
#include <string>

namespace moe {

// A file as given, or a folder's newest checkpoint that opens (warning about the ones that do
// not); a UserError when there is none.
std::string resolve_checkpoint(const std::string& given);

int inspect_main(const std::string& ckpt);

struct EvalOptions {
  std::string data;  // token shard; empty = the run's data.val
  int batches = 0;   // micro-batches; 0 = the run's log.eval_batches
};
int eval_main(const std::string& ckpt, const EvalOptions& opt);

struct GenerateOptions {
  std::string prompt;
  int tokens = 200;
  double temperature = 0.8;
  int top_k = 0;
  uint64_t seed = 1;
  int samples = 1;
};
int generate_main(const std::string& ckpt, const GenerateOptions& opt);

}  // namespace moe
