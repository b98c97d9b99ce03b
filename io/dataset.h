// Token datasets: shard files on disk, memory-mapped, sampled deterministically.
//
// Shard format (ours), little-endian:
//   offset 0  : char magic[8] = "MOETOKS\0"
//   offset 8  : uint32 format version (2 is written; 1, without checksums, is still read)
//   offset 12 : uint32 token dtype (1 = uint8, 2 = uint16, 4 = uint32; the byte width)
//   offset 16 : uint64 token count
//   offset 24 : uint32 vocabulary size the tokens were made for (256 for bytes)
//   offset 28 : uint32 (version 2) checksum block size in bytes, a power of two (1 MiB)
//   offset 32 : 24 bytes reserved, zero
//   offset 56 : uint64 (version 2) checksum of bytes [0, 56)
//   offset 64 : tokens
//   then      : (version 2) one uint64 checksum per block of token bytes (the last one short)
// Opening verifies every checksum (in parallel, at memory speed), so a flipped bit anywhere
// is found before training, with its byte range. A version 1 shard has no checksums: opening
// checks its tokens against the header's vocabulary instead. Reading a window checks each
// token against the model's vocabulary, which is all an llm.c shard can be checked for.
// llm.c's shards are read too: 256 x int32 header (magic 20240520, version 1, token count)
// followed by uint16 tokens.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moe {

enum class TokenDtype : uint32_t { kU8 = 1, kU16 = 2, kU32 = 4 };

constexpr char kShardMagic[8] = {'M', 'O', 'E', 'T', 'O', 'K', 'S', '\0'};
constexpr uint32_t kShardVersion = 2;
constexpr size_t kShardHeaderBytes = 64;
constexpr size_t kShardHeaderSumOffset = 56;     // version 2: the header's own checksum
constexpr uint32_t kShardBlockBytes = 1u << 20;  // version 2: token bytes per checksum

// A read-only, memory-mapped token file. Opening validates the header against the file
// size and verifies the checksums; a missing, truncated, wrong-magic or corrupted file
// throws UserError naming the file and the byte offset of the problem.
class TokenShard {
 public:
  explicit TokenShard(const std::string& path);
  ~TokenShard();
  TokenShard(const TokenShard&) = delete;
  TokenShard& operator=(const TokenShard&) = delete;

  int64_t size() const { return n_tokens_; }
  uint32_t vocab_size() const { return vocab_size_; }  // 0 when the header does not say
  const std::string& path() const { return path_; }
  uint32_t token(int64_t i) const;
  // Copies tokens [begin, begin + n) into out, checking each is < vocab (UserError naming
  // the token's index and byte offset if not).
  void read(int32_t* out, int64_t begin, int64_t n, int vocab) const;

 private:
  std::string path_;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  const uint8_t* tokens_ = nullptr;
  TokenDtype dtype_ = TokenDtype::kU8;
  int64_t n_tokens_ = 0;
  uint32_t vocab_size_ = 0;
};

// Writes a version 2 shard file atomically (temporary name, then rename); every token must
// fit `dtype` and, when vocab_size > 0, be below it.
void shard_write(const std::string& path, const std::vector<uint32_t>& tokens, TokenDtype dtype,
                 uint32_t vocab_size);

// Training windows: sequence g of step s starts at an offset drawn from a counter-based hash
// of (seed, s, g), so the global batch does not depend on how it is split into micro-batches
// or ranks. Each window holds seq_len + 1 tokens (inputs and shifted targets).
//   out: (n_seqs, seq_len + 1) int32, for sequences [first_seq, first_seq + n_seqs) of `step`.
void dataset_train_batch(const TokenShard& shard, int32_t* out, uint64_t seed, int64_t step,
                         int64_t first_seq, int64_t n_seqs, int64_t seq_len, int vocab);

// Validation windows: fixed, evenly spaced over the shard, the same at every evaluation.
//   window w of n_windows total; out: (n_seqs, seq_len + 1) for windows [first, first + n_seqs).
void dataset_val_batch(const TokenShard& shard, int32_t* out, int64_t first, int64_t n_seqs,
                       int64_t n_windows, int64_t seq_len, int vocab);

// `moetrain prepare`: reads text files (folders are walked recursively in sorted order;
// symlinks and binary files, i.e. those containing NUL bytes, are skipped), tokenizes
// bytes (vocab 256), and writes <output>/train.bin and <output>/val.bin. From every file,
// its last `val_fraction` of bytes (starting at a line boundary) goes to validation, so
// the validation text is drawn from the whole corpus. Returns a summary line.
std::string dataset_prepare(const std::vector<std::string>& inputs, const std::string& output,
                            double val_fraction);

}  // namespace moe
