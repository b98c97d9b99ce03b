// Token shard files: opening (memory-mapped, validated against the file size, the checksums
// or, without them, the header's vocabulary) and writing (temporary name, fsync, rename).
// The format is described in io/dataset.h. Every error names the file and the byte.
//
// NOTE: every field is little-endian and read with memcpy; the mapping is page-aligned and
// tokens start at byte 64 (ours) or 1024 (llm.c), so token loads are naturally aligned.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <climits>
#include <cstring>
#include <filesystem>

#include "io/dataset.h"
#include "model/check.h"

static_assert(std::endian::native == std::endian::little, "shard files are little-endian");

namespace moe {

namespace {

// llm.c's shard header: 256 x int32, [0] = magic, [1] = version, [2] = token count.
constexpr int32_t kLlmcMagic = 20240520;
constexpr int32_t kLlmcVersion = 1;
constexpr size_t kLlmcHeaderBytes = 256 * sizeof(int32_t);

template <typename T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

bool dtype_valid(uint32_t d) { return d == 1 || d == 2 || d == 4; }

const char* dtype_name(TokenDtype d) {
  switch (d) {
    case TokenDtype::kU8: return "uint8";
    case TokenDtype::kU16: return "uint16";
    case TokenDtype::kU32: return "uint32";
  }
  return "?";
}

uint64_t dtype_max(TokenDtype d) {
  switch (d) {
    case TokenDtype::kU8: return UINT8_MAX;
    case TokenDtype::kU16: return UINT16_MAX;
    case TokenDtype::kU32: return UINT32_MAX;
  }
  return 0;
}

// Version 2's checksum: a 64-bit hash of `n` bytes in four independent lanes of 8-byte words
// (the round of xxHash64), so it runs at memory speed; `seed` is the block index, so blocks
// swapped or shifted do not match either.
constexpr uint64_t kP1 = 0x9E3779B185EBCA87ull, kP2 = 0xC2B2AE3D27D4EB4Full,
                   kP3 = 0x165667B19E3779F9ull;
constexpr uint64_t kHeaderSeed = 0x4d4f45544f4b5348ull;  // "MOETOKSH"

uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

uint64_t shard_checksum(const uint8_t* p, size_t n, uint64_t seed) {
  uint64_t a[4] = {seed + kP1 + kP2, seed + kP2, seed, seed - kP1};
  size_t i = 0;
  for (; i + 32 <= n; i += 32)
    for (int l = 0; l < 4; ++l) a[l] = rotl64(a[l] + load<uint64_t>(p + i + 8 * l) * kP2, 31) * kP1;
  uint64_t h = rotl64(a[0], 1) + rotl64(a[1], 7) + rotl64(a[2], 12) + rotl64(a[3], 18) + n;
  for (; i < n; ++i) h = rotl64(h ^ (p[i] * kP3), 11) * kP1;
  h ^= h >> 33;
  h *= kP2;
  h ^= h >> 29;
  h *= kP3;
  return h ^ (h >> 32);
}

// Parsed header, or an error message when the file is not a valid shard.
struct ShardLayout {
  std::string error;
  size_t header_bytes = 0;
  TokenDtype dtype = TokenDtype::kU8;
  int64_t n_tokens = 0;
  uint32_t vocab_size = 0;
  size_t block_bytes = 0;  // version 2: token bytes per checksum (0: no checksums)
  bool vocab_scan = false;  // version 1 naming a vocabulary: check every token at open
};

std::string u128_str(unsigned __int128 v) {
  std::string s;
  do {
    s.insert(s.begin(), static_cast<char>('0' + static_cast<int>(v % 10)));
    v /= 10;
  } while (v != 0);
  return s;
}

// Checks that the header, `count` tokens of `width` bytes and (version 2) one checksum per
// block of `block_bytes` fill the file of `bytes` bytes exactly; the message names the byte
// where the file ends (truncated) or where the extra bytes start (trailing).
std::string size_error(uint64_t count, size_t width, size_t header_bytes, size_t block_bytes,
                       size_t bytes) {
  // NOTE: in 128 bits, so a corrupted 64-bit count cannot overflow.
  const unsigned __int128 token_bytes = static_cast<unsigned __int128>(count) * width;
  const unsigned __int128 blocks = block_bytes ? (token_bytes + block_bytes - 1) / block_bytes : 0;
  const unsigned __int128 need = header_bytes + token_bytes + blocks * sizeof(uint64_t);
  const std::string what =
      strprintf("header says %llu tokens (%zu bytes each)", static_cast<unsigned long long>(count), width) +
      (block_bytes ? " and " + u128_str(blocks) + " block checksums (8 bytes each)" : std::string()) +
      ", which need " + u128_str(need) + " bytes";
  if (need > bytes) return strprintf("truncated at byte %zu: %s", bytes, what.c_str());
  if (need < bytes)
    return strprintf("trailing bytes from byte %s: %s, but the file holds %zu", u128_str(need).c_str(),
                     what.c_str(), bytes);
  if (count == 0) return "holds zero tokens";
  if (count > static_cast<uint64_t>(INT64_MAX)) return "token count does not fit int64";
  return std::string();
}

ShardLayout shard_parse(const uint8_t* p, size_t bytes) {
  ShardLayout s;
  const bool ours = bytes >= sizeof(kShardMagic) && std::memcmp(p, kShardMagic, sizeof(kShardMagic)) == 0;
  const bool llmc = !ours && bytes >= sizeof(int32_t) && load<int32_t>(p) == kLlmcMagic;
  if (!ours && !llmc) {
    if (bytes < sizeof(kShardMagic))
      s.error = strprintf("not a token shard (file is only %zu bytes)", bytes);
    else
      s.error = "not a token shard (bad magic at byte 0: neither \"MOETOKS\" nor llm.c's 20240520)";
    return s;
  }
  s.header_bytes = ours ? kShardHeaderBytes : kLlmcHeaderBytes;
  if (bytes < s.header_bytes) {
    s.error = strprintf("truncated at byte %zu: smaller than the %zu-byte %s header", bytes,
                        s.header_bytes, ours ? "shard" : "llm.c shard");
    return s;
  }
  if (ours) {
    const uint32_t version = load<uint32_t>(p + 8);
    const uint32_t dtype = load<uint32_t>(p + 12);
    const uint64_t count = load<uint64_t>(p + 16);
    if (version != 1 && version != kShardVersion) {
      s.error = strprintf("unsupported shard version %u at byte 8 (this build reads versions 1 to %u)",
                          version, kShardVersion);
      return s;
    }
    if (version >= 2) {
      const uint64_t stored = load<uint64_t>(p + kShardHeaderSumOffset);
      if (stored != shard_checksum(p, kShardHeaderSumOffset, kHeaderSeed)) {
        s.error = strprintf("header checksum mismatch: bytes 0 to %zu do not match the checksum at "
                            "byte %zu (file corrupted)", kShardHeaderSumOffset - 1, kShardHeaderSumOffset);
        return s;
      }
      const uint32_t block = load<uint32_t>(p + 28);
      if (block < 64 || block > (1u << 30) || (block & (block - 1)) != 0) {
        s.error = strprintf("checksum block size %u at byte 28 is not a power of two in [64, 2^30]", block);
        return s;
      }
      s.block_bytes = block;
    }
    if (!dtype_valid(dtype)) {
      s.error = strprintf("unknown token dtype %u at byte 12 (expected 1, 2 or 4 bytes per token)", dtype);
      return s;
    }
    s.dtype = static_cast<TokenDtype>(dtype);
    s.vocab_size = load<uint32_t>(p + 24);
    s.error = size_error(count, dtype, s.header_bytes, s.block_bytes, bytes);
    s.n_tokens = static_cast<int64_t>(count);
    s.vocab_scan = version == 1 && s.vocab_size > 0 && s.vocab_size <= dtype_max(s.dtype);
  } else {
    const int32_t version = load<int32_t>(p + 4);
    const int32_t count = load<int32_t>(p + 8);
    if (version != kLlmcVersion) {
      s.error = strprintf("unsupported llm.c shard version %d at byte 4 (this build reads version %d)",
                          version, kLlmcVersion);
      return s;
    }
    if (count < 0) {
      s.error = strprintf("llm.c header has a negative token count %d at byte 8", count);
      return s;
    }
    s.dtype = TokenDtype::kU16;
    s.error = size_error(static_cast<uint64_t>(count), sizeof(uint16_t), s.header_bytes, 0, bytes);
    s.n_tokens = count;
  }
  return s;
}

// Version 2: the first token block whose checksum does not match, as an error message
// naming its bytes and its checksum's ("" when all match). Blocks are checked in parallel.
std::string blocks_verify(const uint8_t* p, const ShardLayout& s) {
  const size_t token_bytes = static_cast<size_t>(s.n_tokens) * static_cast<size_t>(s.dtype);
  const int64_t n_blocks = static_cast<int64_t>((token_bytes + s.block_bytes - 1) / s.block_bytes);
  const uint8_t* tokens = p + s.header_bytes;
  const uint8_t* sums = tokens + token_bytes;
  int64_t first_bad = n_blocks;
#pragma omp parallel for schedule(static) reduction(min : first_bad)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const size_t begin = static_cast<size_t>(b) * s.block_bytes;
    const size_t n = std::min(s.block_bytes, token_bytes - begin);
    if (shard_checksum(tokens + begin, n, static_cast<uint64_t>(b)) !=
        load<uint64_t>(sums + static_cast<size_t>(b) * sizeof(uint64_t)))
      first_bad = std::min(first_bad, b);
  }
  if (first_bad == n_blocks) return std::string();
  const size_t begin = s.header_bytes + static_cast<size_t>(first_bad) * s.block_bytes;
  const size_t end = std::min(begin + s.block_bytes, s.header_bytes + token_bytes);
  return strprintf("checksum mismatch in bytes %zu to %zu (block %lld of %lld, checksum at byte %zu): "
                   "file corrupted", begin, end - 1, static_cast<long long>(first_bad),
                   static_cast<long long>(n_blocks),
                   s.header_bytes + token_bytes + static_cast<size_t>(first_bad) * sizeof(uint64_t));
}

uint32_t token_at(const uint8_t* tokens, TokenDtype dtype, size_t i) {
  switch (dtype) {
    case TokenDtype::kU8: return tokens[i];
    case TokenDtype::kU16: return load<uint16_t>(tokens + 2 * i);
    case TokenDtype::kU32: return load<uint32_t>(tokens + 4 * i);
  }
  return 0;
}

// Version 1 (no checksums) with a vocabulary in its header: the first token outside it, as
// an error message naming its byte ("" when there is none). The scan runs in parallel.
std::string tokens_verify(const uint8_t* p, const ShardLayout& s) {
  const uint8_t* tokens = p + s.header_bytes;
  int64_t first_bad = s.n_tokens;
#pragma omp parallel for schedule(static) reduction(min : first_bad)
  for (int64_t i = 0; i < s.n_tokens; ++i)
    if (token_at(tokens, s.dtype, static_cast<size_t>(i)) >= s.vocab_size) first_bad = std::min(first_bad, i);
  if (first_bad == s.n_tokens) return std::string();
  const size_t i = static_cast<size_t>(first_bad);
  return strprintf("token %u at byte %zu (index %lld) exceeds the header's vocabulary %u (file corrupted)",
                   token_at(tokens, s.dtype, i), s.header_bytes + i * static_cast<size_t>(s.dtype),
                   static_cast<long long>(first_bad), s.vocab_size);
}

// RAII file descriptor so every error path closes it.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

// Writes all of buf, retrying short writes and EINTR. Returns false with errno set on failure.
bool write_all(int fd, const uint8_t* buf, size_t n) {
  while (n > 0) {
    ssize_t w = ::write(fd, buf, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    buf += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

}  // namespace

TokenShard::TokenShard(const std::string& path) : path_(path) {
  Fd f;
  f.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f.fd < 0) user_error("%s: cannot open: %s", path.c_str(), std::strerror(errno));
  struct stat st;
  if (::fstat(f.fd, &st) != 0) user_error("%s: cannot stat: %s", path.c_str(), std::strerror(errno));
  if (S_ISDIR(st.st_mode)) user_error("%s: is a folder, not a token shard file", path.c_str());
  if (!S_ISREG(st.st_mode)) user_error("%s: not a regular file", path.c_str());
  const size_t bytes = static_cast<size_t>(st.st_size);
  if (bytes == 0) user_error("%s: not a token shard (file is empty)", path.c_str());

  void* map = ::mmap(nullptr, bytes, PROT_READ, MAP_PRIVATE, f.fd, 0);
  if (map == MAP_FAILED) user_error("%s: cannot map: %s", path.c_str(), std::strerror(errno));
  ShardLayout s = shard_parse(static_cast<const uint8_t*>(map), bytes);
  if (s.error.empty() && s.block_bytes > 0) s.error = blocks_verify(static_cast<const uint8_t*>(map), s);
  if (s.error.empty() && s.vocab_scan) s.error = tokens_verify(static_cast<const uint8_t*>(map), s);
  if (!s.error.empty()) {
    ::munmap(map, bytes);
    throw UserError(path + ": " + s.error);
  }
  map_ = map;
  map_bytes_ = bytes;
  tokens_ = static_cast<const uint8_t*>(map) + s.header_bytes;
  dtype_ = s.dtype;
  n_tokens_ = s.n_tokens;
  vocab_size_ = s.vocab_size;
}

TokenShard::~TokenShard() {
  if (map_ != nullptr) ::munmap(map_, map_bytes_);
}

uint32_t TokenShard::token(int64_t i) const {
  CHECK(i >= 0 && i < n_tokens_, "token %lld of %lld in %s", static_cast<long long>(i),
        static_cast<long long>(n_tokens_), path_.c_str());
  return token_at(tokens_, dtype_, static_cast<size_t>(i));
}

void TokenShard::read(int32_t* out, int64_t begin, int64_t n, int vocab) const {
  CHECK(begin >= 0 && n >= 0 && begin <= n_tokens_ - n, "tokens [%lld, %lld) of %lld in %s",
        static_cast<long long>(begin), static_cast<long long>(begin + n),
        static_cast<long long>(n_tokens_), path_.c_str());
  // A token must fit int32 even when no vocabulary is given.
  const uint64_t limit = vocab > 0 ? static_cast<uint64_t>(vocab) : static_cast<uint64_t>(INT32_MAX) + 1;
  const size_t width = static_cast<size_t>(dtype_);
  const uint8_t* p = tokens_ + static_cast<size_t>(begin) * width;
  uint64_t bad = 0;  // OR of (token >= limit) over the copy; located only on failure
  switch (dtype_) {
    case TokenDtype::kU8:
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t t = p[i];
        bad |= t >= limit;
        out[i] = static_cast<int32_t>(t);
      }
      break;
    case TokenDtype::kU16:
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t t = load<uint16_t>(p + 2 * i);
        bad |= t >= limit;
        out[i] = static_cast<int32_t>(t);
      }
      break;
    case TokenDtype::kU32:
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t t = load<uint32_t>(p + 4 * i);
        bad |= t >= limit;
        out[i] = static_cast<int32_t>(t);
      }
      break;
  }
  if (bad == 0) return;
  for (int64_t i = begin; i < begin + n; ++i) {
    const uint32_t t = token(i);
    if (t < limit) continue;
    const size_t at = static_cast<size_t>(tokens_ - static_cast<const uint8_t*>(map_)) +
                      static_cast<size_t>(i) * width;
    if (vocab > 0)
      user_error("%s: token %u at byte %zu (index %lld) exceeds vocabulary %d", path_.c_str(), t, at,
                 static_cast<long long>(i), vocab);
    user_error("%s: token %u at byte %zu (index %lld) does not fit int32", path_.c_str(), t, at,
               static_cast<long long>(i));
  }
}

void shard_write(const std::string& path, const std::vector<uint32_t>& tokens, TokenDtype dtype,
                 uint32_t vocab_size) {
  namespace fs = std::filesystem;
  if (tokens.empty()) user_error("%s: refusing to write a shard with zero tokens", path.c_str());
  const uint64_t max = dtype_max(dtype);
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] > max)
      user_error("%s: token %u at index %zu does not fit %s", path.c_str(), tokens[i], i,
                 dtype_name(dtype));
    if (vocab_size > 0 && tokens[i] >= vocab_size)
      user_error("%s: token %u at index %zu exceeds vocabulary %u", path.c_str(), tokens[i], i,
                 vocab_size);
  }

  const fs::path parent = fs::path(path).parent_path();
  if (!parent.empty()) {
    std::error_code ec;
    fs::create_directories(parent, ec);
    if (ec) user_error("%s: cannot create directory %s: %s", path.c_str(), parent.c_str(),
                       ec.message().c_str());
  }

  uint8_t header[kShardHeaderBytes] = {};
  const uint32_t version = kShardVersion;
  const uint32_t width = static_cast<uint32_t>(dtype);
  const uint64_t count = tokens.size();
  const uint32_t block_bytes = kShardBlockBytes;
  std::memcpy(header, kShardMagic, sizeof(kShardMagic));
  std::memcpy(header + 8, &version, 4);
  std::memcpy(header + 12, &width, 4);
  std::memcpy(header + 16, &count, 8);
  std::memcpy(header + 24, &vocab_size, 4);
  std::memcpy(header + 28, &block_bytes, 4);
  const uint64_t header_sum = shard_checksum(header, kShardHeaderSumOffset, kHeaderSeed);
  std::memcpy(header + kShardHeaderSumOffset, &header_sum, 8);

  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  Fd f;
  f.fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (f.fd < 0) user_error("%s: cannot create: %s", tmp.c_str(), std::strerror(errno));
  auto fail = [&](const char* what) {
    const int err = errno;
    ::close(f.fd);
    f.fd = -1;
    ::unlink(tmp.c_str());
    user_error("%s: %s: %s", path.c_str(), what, std::strerror(err));
  };
  if (!write_all(f.fd, header, sizeof(header))) fail("cannot write");
  // Pack tokens to their byte width one checksum block at a time (a whole number of tokens,
  // as the block size is a power of two >= 4), checksumming each; the sums follow the tokens.
  const size_t block_tokens = block_bytes / width;
  std::vector<uint8_t> buf;
  std::vector<uint64_t> sums;
  for (size_t begin = 0; begin < tokens.size(); begin += block_tokens) {
    const size_t n = std::min(block_tokens, tokens.size() - begin);
    buf.resize(n * width);
    for (size_t i = 0; i < n; ++i) {
      const uint32_t t = tokens[begin + i];
      std::memcpy(buf.data() + i * width, &t, width);  // little-endian: low bytes first
    }
    sums.push_back(shard_checksum(buf.data(), buf.size(), sums.size()));
    if (!write_all(f.fd, buf.data(), buf.size())) fail("cannot write");
  }
  if (!write_all(f.fd, reinterpret_cast<const uint8_t*>(sums.data()), sums.size() * sizeof(uint64_t)))
    fail("cannot write");
  if (::fsync(f.fd) != 0) fail("cannot fsync");
  const int fd = f.fd;
  f.fd = -1;
  if (::close(fd) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    user_error("%s: cannot close: %s", path.c_str(), std::strerror(err));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    user_error("%s: cannot rename %s into place: %s", path.c_str(), tmp.c_str(), std::strerror(err));
  }
  // Make the rename itself durable.
  Fd dir;
  dir.fd = ::open(parent.empty() ? "." : parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir.fd >= 0) ::fsync(dir.fd);
}

}  // namespace moe
