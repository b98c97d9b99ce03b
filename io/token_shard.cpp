// Token shard files: opening (memory-mapped, validated against the file size) and writing
// (temporary name, fsync, rename). The format is described in io/dataset.h.
//
// NOTE: every field is little-endian and read with memcpy; the mapping is page-aligned and
// tokens start at byte 64 (ours) or 1024 (llm.c), so token loads are naturally aligned.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

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

// Parsed header, or an error message when the file is not a valid shard.
struct ShardLayout {
  std::string error;
  size_t header_bytes = 0;
  TokenDtype dtype = TokenDtype::kU8;
  int64_t n_tokens = 0;
  uint32_t vocab_size = 0;
};

// Checks that `count` tokens of `width` bytes after the header fill the file exactly.
std::string size_error(uint64_t count, size_t width, size_t token_bytes) {
  // NOTE: compare in tokens first so a corrupted 64-bit count cannot overflow the multiply.
  if (count > token_bytes / width || count * width < token_bytes) {
    const bool short_file = count > token_bytes / width;
    return strprintf("%s: header says %llu tokens (%zu bytes each) but file holds %zu bytes of tokens",
                     short_file ? "truncated" : "trailing bytes after the tokens",
                     static_cast<unsigned long long>(count), width, token_bytes);
  }
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
      s.error = "not a token shard (bad magic)";
    return s;
  }
  s.header_bytes = ours ? kShardHeaderBytes : kLlmcHeaderBytes;
  if (bytes < s.header_bytes) {
    s.error = strprintf("truncated: %zu bytes is smaller than the %zu-byte %s header", bytes,
                        s.header_bytes, ours ? "shard" : "llm.c shard");
    return s;
  }
  const size_t token_bytes = bytes - s.header_bytes;
  if (ours) {
    const uint32_t version = load<uint32_t>(p + 8);
    const uint32_t dtype = load<uint32_t>(p + 12);
    const uint64_t count = load<uint64_t>(p + 16);
    if (version != kShardVersion) {
      s.error = strprintf("unsupported shard version %u (this build reads version %u)", version,
                          kShardVersion);
      return s;
    }
    if (!dtype_valid(dtype)) {
      s.error = strprintf("unknown token dtype %u (expected 1, 2 or 4 bytes per token)", dtype);
      return s;
    }
    s.dtype = static_cast<TokenDtype>(dtype);
    s.vocab_size = load<uint32_t>(p + 24);
    s.error = size_error(count, dtype, token_bytes);
    s.n_tokens = static_cast<int64_t>(count);
  } else {
    const int32_t version = load<int32_t>(p + 4);
    const int32_t count = load<int32_t>(p + 8);
    if (version != kLlmcVersion) {
      s.error = strprintf("unsupported llm.c shard version %d (this build reads version %d)",
                          version, kLlmcVersion);
      return s;
    }
    if (count < 0) {
      s.error = strprintf("llm.c header has a negative token count %d", count);
      return s;
    }
    s.dtype = TokenDtype::kU16;
    s.error = size_error(static_cast<uint64_t>(count), sizeof(uint16_t), token_bytes);
    s.n_tokens = count;
  }
  return s;
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
  if (!S_ISREG(st.st_mode)) user_error("%s: not a regular file", path.c_str());
  const size_t bytes = static_cast<size_t>(st.st_size);
  if (bytes == 0) user_error("%s: not a token shard (file is empty)", path.c_str());

  void* map = ::mmap(nullptr, bytes, PROT_READ, MAP_PRIVATE, f.fd, 0);
  if (map == MAP_FAILED) user_error("%s: cannot map: %s", path.c_str(), std::strerror(errno));
  ShardLayout s = shard_parse(static_cast<const uint8_t*>(map), bytes);
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
  const size_t off = static_cast<size_t>(i) * static_cast<size_t>(dtype_);
  switch (dtype_) {
    case TokenDtype::kU8: return tokens_[off];
    case TokenDtype::kU16: return load<uint16_t>(tokens_ + off);
    case TokenDtype::kU32: return load<uint32_t>(tokens_ + off);
  }
  return 0;
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
    if (vocab > 0)
      user_error("%s: token %u at index %lld exceeds vocabulary %d", path_.c_str(), t,
                 static_cast<long long>(i), vocab);
    user_error("%s: token %u at index %lld does not fit int32", path_.c_str(), t,
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
  std::memcpy(header, kShardMagic, sizeof(kShardMagic));
  std::memcpy(header + 8, &version, 4);
  std::memcpy(header + 12, &width, 4);
  std::memcpy(header + 16, &count, 8);
  std::memcpy(header + 24, &vocab_size, 4);

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
  // Pack tokens to their byte width in bounded chunks.
  constexpr size_t kChunkTokens = size_t{1} << 18;
  std::vector<uint8_t> buf;
  for (size_t begin = 0; begin < tokens.size(); begin += kChunkTokens) {
    const size_t n = std::min(kChunkTokens, tokens.size() - begin);
    buf.resize(n * width);
    for (size_t i = 0; i < n; ++i) {
      const uint32_t t = tokens[begin + i];
      std::memcpy(buf.data() + i * width, &t, width);  // little-endian: low bytes first
    }
    if (!write_all(f.fd, buf.data(), buf.size())) fail("cannot write");
  }
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
