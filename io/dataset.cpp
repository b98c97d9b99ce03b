// Sampling windows from a token shard: training windows at hashed offsets, validation windows
// evenly spaced. Both are pure functions of their arguments, so any split of a batch across
// micro-batches or ranks reads the same windows.
//
// A window holds seq_len + 1 tokens: inputs [0, seq_len) and targets shifted by one.
#include <algorithm>

#include "io/dataset.h"
#include "model/check.h"
#include "model/rng.h"

namespace moe {

namespace {

// Distinguishes training-data draws from other users of (seed, step, ...) hashes.
constexpr uint64_t kPurposeTrainWindow = 0x7472'6169'6e77'696eull;  // "trainwin"

// Counter-based hash of (seed, step, seq): no state, any rank can draw any sequence.
uint64_t hash_mix(uint64_t seed, uint64_t step, uint64_t seq) {
  uint64_t h = rng_mix(seed ^ kPurposeTrainWindow);
  h = rng_mix(h ^ step);
  return rng_mix(h ^ seq);
}

// Uniform in [0, n) by multiply-high (bias <= n / 2^64).
uint64_t hash_below(uint64_t h, uint64_t n) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(h) * n) >> 64);
}

void check_window_fits(const TokenShard& shard, int64_t seq_len) {
  CHECK(seq_len >= 1, "seq_len %lld", static_cast<long long>(seq_len));
  if (shard.size() < seq_len + 1)
    user_error("%s: %lld tokens is fewer than seq_len + 1 = %lld", shard.path().c_str(),
               static_cast<long long>(shard.size()), static_cast<long long>(seq_len + 1));
}

}  // namespace

void dataset_train_batch(const TokenShard& shard, int32_t* out, uint64_t seed, int64_t step,
                         int64_t first_seq, int64_t n_seqs, int64_t seq_len, int vocab) {
  CHECK(first_seq >= 0 && n_seqs >= 0, "sequences [%lld, +%lld)",
        static_cast<long long>(first_seq), static_cast<long long>(n_seqs));
  check_window_fits(shard, seq_len);
  const int64_t T1 = seq_len + 1;
  const uint64_t n_starts = static_cast<uint64_t>(shard.size() - seq_len);  // offsets [0, size - T1]
  for (int64_t i = 0; i < n_seqs; ++i) {
    const uint64_t g = static_cast<uint64_t>(first_seq + i);
    const uint64_t h = hash_mix(seed, static_cast<uint64_t>(step), g);
    const int64_t begin = static_cast<int64_t>(hash_below(h, n_starts));
    shard.read(out + static_cast<size_t>(i) * static_cast<size_t>(T1), begin, T1, vocab);
  }
}

void dataset_val_batch(const TokenShard& shard, int32_t* out, int64_t first, int64_t n_seqs,
                       int64_t n_windows, int64_t seq_len, int vocab) {
  CHECK(n_windows >= 1 && first >= 0 && n_seqs >= 0 && first <= n_windows - n_seqs,
        "windows [%lld, %lld) of %lld", static_cast<long long>(first),
        static_cast<long long>(first + n_seqs), static_cast<long long>(n_windows));
  check_window_fits(shard, seq_len);
  const int64_t T1 = seq_len + 1;
  const __int128 span = shard.size() - T1;  // last valid start
  const __int128 gaps = std::max<int64_t>(1, n_windows - 1);
  for (int64_t i = 0; i < n_seqs; ++i) {
    const __int128 w = first + i;
    const int64_t begin = static_cast<int64_t>(w * span / gaps);
    shard.read(out + static_cast<size_t>(i) * static_cast<size_t>(T1), begin, T1, vocab);
  }
}

}  // namespace moe
