// A small training run's config and batches, for tests that build a TrainState in process:
// the trainer's discipline test (CPU) and the GPU trainer test share them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "io/config.h"
#include "model/rng.h"
#include "trainer/train_step.h"

namespace moe {

// configs/tiny.toml shrunk to seconds per step: 3 layers (one dense), 8 experts, T = 16,
// two micro-batches of 2 per step.
// `more` overrides come last (e.g. a parallel layout).
inline Config train_fixture_config(const std::string& precision, const std::string& state_dtype,
                                   int mtp, const std::vector<std::string>& more = {}) {
  std::vector<std::string> o = {"model.d_model=64", "model.n_layers=3", "model.n_heads=2",
                                "model.n_kv_heads=2", "model.seq_len=16", "moe.d_expert=32",
                                "training.global_batch=4", "training.micro_batch=2",
                                "training.steps=10", "lr.warmup_steps=2",
                                "precision.mode=\"" + precision + "\"",
                                "optim.state_dtype=\"" + state_dtype + "\"",
                                "model.mtp_depth=" + std::to_string(mtp)};
  o.insert(o.end(), more.begin(), more.end());
  return config_load(std::string(MOETRAIN_SOURCE_DIR) + "/configs/tiny.toml", o);
}

// Counter-based windows of the model's vocabulary: the same batch for the same (step, seq).
inline BatchSource train_fixture_batches(int64_t T_, int64_t V) {
  return [T_, V](int32_t* out, int64_t step, int64_t first, int64_t n) {
    for (int64_t s = 0; s < n; ++s)
      for (int64_t t = 0; t <= T_; ++t)
        out[s * (T_ + 1) + t] = static_cast<int32_t>(
            rng_u64(99, static_cast<uint64_t>(step),
                    static_cast<uint64_t>((first + s) * 1000 + t)) %
            static_cast<uint64_t>(V));
  };
}

}  // namespace moe
