// libFuzzer target: the token-shard reader (io/dataset.h TokenShard, ours and llm.c's
// format) and the window sampling the trainer runs on it.
//
// Input: the bytes of a shard file. TokenShard opens a path, so each input is written to one
// temporary file of this process (removed at exit) and opened; then the first and last
// tokens are read one by one and as windows, and a few training and validation windows are
// drawn. A UserError is the expected answer to a bad file (wrong magic, truncated, a token
// beyond the vocabulary, fewer tokens than a window); anything else is a finding. Tokens read
// as a window must equal the same tokens read one by one.
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "io/dataset.h"
#include "model/check.h"

namespace {

std::string g_path;  // this process's shard file

void remove_file() { std::remove(g_path.c_str()); }

[[noreturn]] void finding(const char* what) {
  std::fprintf(stderr, "fuzz_token_shard: %s\n", what);
  std::abort();
}

void write_file(const std::string& path, const uint8_t* data, size_t size) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(data, 1, size, f) != size || std::fclose(f) != 0) {
    std::perror(path.c_str());
    std::abort();  // the machine's fault, not the reader's: stop rather than fuzz nothing
  }
}

// Reads [begin, begin + n) as a window and checks it against token() one by one.
void check_window(const moe::TokenShard& shard, int64_t begin, int64_t n) {
  std::vector<int32_t> out(static_cast<size_t>(n));
  try {
    shard.read(out.data(), begin, n, 0);
  } catch (const moe::UserError&) {
    // A token above INT32_MAX (uint32 shards): read() must have refused for a real reason.
    for (int64_t i = begin; i < begin + n; ++i)
      if (shard.token(i) > static_cast<uint32_t>(INT32_MAX)) return;
    finding("read() refused a window whose tokens all fit int32");
  }
  for (int64_t i = 0; i < n; ++i)
    if (static_cast<uint32_t>(out[static_cast<size_t>(i)]) != shard.token(begin + i))
      finding("read() and token() disagree");
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  g_path = (std::filesystem::temp_directory_path() /
            ("moetrain-fuzz-shard-" + std::to_string(::getpid()) + ".bin"))
               .string();
  std::atexit(remove_file);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  write_file(g_path, data, size);
  try {
    const moe::TokenShard shard(g_path);
    const int64_t n = shard.size();
    if (n <= 0) finding("an open shard holds no tokens");
    const int64_t k = std::min<int64_t>(n, 64);
    check_window(shard, 0, k);
    check_window(shard, n - k, k);

    // The trainer's windows, with the header's vocabulary when it names one (then a token
    // beyond it is a UserError) and a window length taken from the input's last byte.
    const uint32_t hv = shard.vocab_size();
    const int vocab = hv > 0 && hv <= static_cast<uint32_t>(INT_MAX) ? static_cast<int>(hv) : 0;
    const int64_t seq_len = 1 + (size > 0 ? data[size - 1] : 0) % 48;
    std::vector<int32_t> out(static_cast<size_t>(3 * (seq_len + 1)));
    try {
      moe::dataset_train_batch(shard, out.data(), /*seed=*/size, /*step=*/7, /*first_seq=*/0,
                               /*n_seqs=*/3, seq_len, vocab);
    } catch (const moe::UserError&) {
    }
    try {
      moe::dataset_val_batch(shard, out.data(), /*first=*/1, /*n_seqs=*/3, /*n_windows=*/4,
                             seq_len, vocab);
    } catch (const moe::UserError&) {
    }
  } catch (const moe::UserError&) {
  }
  return 0;
}
