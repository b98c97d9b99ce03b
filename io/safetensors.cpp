#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <set>

#include "io/json_lite.h"
#include "model/check.h"

namespace moe {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; this build writes host order");

namespace {

struct DtypeInfo {
  StDtype t;
  const char* name;
  size_t size;
};
constexpr DtypeInfo kDtypes[] = {
    {StDtype::kBool, "BOOL", 1},  {StDtype::kU8, "U8", 1},     {StDtype::kI8, "I8", 1},
    {StDtype::kF8E4M3, "F8_E4M3", 1}, {StDtype::kF8E5M2, "F8_E5M2", 1},
    {StDtype::kI16, "I16", 2},    {StDtype::kU16, "U16", 2},   {StDtype::kF16, "F16", 2},
    {StDtype::kBF16, "BF16", 2},  {StDtype::kI32, "I32", 4},   {StDtype::kU32, "U32", 4},
    {StDtype::kF32, "F32", 4},    {StDtype::kI64, "I64", 8},   {StDtype::kU64, "U64", 8},
    {StDtype::kF64, "F64", 8}};

const DtypeInfo& dtype_info(StDtype t) {
  for (const DtypeInfo& d : kDtypes)
    if (d.t == t) return d;
  CHECK(false, "StDtype %d", static_cast<int>(t));
  return kDtypes[0];
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Bytes of `shape` in `t`, or false when that overflows 64 bits.
bool shape_bytes(const std::vector<int64_t>& shape, StDtype t, uint64_t* out) {
  uint64_t n = st_dtype_size(t);
  for (const int64_t d : shape) {
    if (d < 0) return false;
    const uint64_t u = static_cast<uint64_t>(d);
    if (u != 0 && n > UINT64_MAX / u) return false;
    n *= u;
  }
  *out = n;
  return true;
}

[[noreturn]] void bad(const std::string& where, const std::string& what) {
  user_error("%s: %s", where.c_str(), what.c_str());
}

// A JSON value that must be a non-negative integer.
bool as_count(const JsonValue& v, uint64_t* out) {
  if (v.kind != JsonValue::Kind::kInt || v.i < 0) return false;
  *out = static_cast<uint64_t>(v.i);
  return true;
}

SafetensorsTensor parse_entry(const std::string& name, const JsonValue& v, uint64_t data_size,
                              const std::string& where) {
  const std::string tn = "tensor " + json_quote(name);
  if (name.empty()) bad(where, "a tensor with an empty name");
  if (v.kind != JsonValue::Kind::kObject)
    bad(where, tn + ": expected an object, got " + to_string(v.kind));
  for (const auto& m : v.members)
    if (m.first != "dtype" && m.first != "shape" && m.first != "data_offsets")
      bad(where, tn + ": unknown key " + json_quote(m.first));
  const JsonValue* dtype = v.get("dtype");
  const JsonValue* shape = v.get("shape");
  const JsonValue* offsets = v.get("data_offsets");
  if (!dtype || !shape || !offsets)
    bad(where, tn + ": missing \"" + (!dtype ? "dtype" : !shape ? "shape" : "data_offsets") + "\"");
  SafetensorsTensor t;
  t.name = name;
  if (dtype->kind != JsonValue::Kind::kString) bad(where, tn + ": dtype must be a string");
  const DtypeInfo* info = nullptr;
  for (const DtypeInfo& d : kDtypes)
    if (dtype->s == d.name) info = &d;
  if (!info) bad(where, tn + ": unknown dtype " + json_quote(dtype->s));
  t.dtype = info->t;
  if (shape->kind != JsonValue::Kind::kArray)
    bad(where, tn + ": shape must be an array of non-negative integers");
  for (const JsonValue& d : shape->items) {
    uint64_t n = 0;
    if (!as_count(d, &n)) bad(where, tn + ": shape must be an array of non-negative integers");
    t.shape.push_back(static_cast<int64_t>(n));
  }
  if (offsets->kind != JsonValue::Kind::kArray || offsets->items.size() != 2 ||
      !as_count(offsets->items[0], &t.begin) || !as_count(offsets->items[1], &t.end) ||
      t.begin > t.end)
    bad(where, tn + ": data_offsets must be [begin, end] with 0 <= begin <= end");
  uint64_t need = 0;
  if (!shape_bytes(t.shape, t.dtype, &need))
    bad(where, tn + ": shape " + shape_text(t.shape) + " is too large");
  const std::string span = strprintf("data_offsets [%llu, %llu]", (unsigned long long)t.begin,
                                     (unsigned long long)t.end);
  if (t.end - t.begin != need)
    bad(where, strprintf("%s: %s hold %llu bytes but %s %s needs %llu", tn.c_str(), span.c_str(),
                         (unsigned long long)(t.end - t.begin), info->name,
                         shape_text(t.shape).c_str(), (unsigned long long)need));
  if (t.end > data_size)
    bad(where, strprintf("%s: %s end beyond the data section (%llu bytes)", tn.c_str(),
                         span.c_str(), (unsigned long long)data_size));
  return t;
}

}  // namespace

const char* to_string(StDtype t) { return dtype_info(t).name; }
size_t st_dtype_size(StDtype t) { return dtype_info(t).size; }

uint64_t SafetensorsTensor::numel() const {
  uint64_t n = 1;
  for (const int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

const SafetensorsTensor* SafetensorsHeader::find(std::string_view name) const {
  for (const SafetensorsTensor& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

SafetensorsHeader safetensors_parse_header(std::string_view head, uint64_t file_size,
                                           const std::string& where) {
  CHECK(head.size() <= file_size, "%zu header bytes of a %llu-byte file", head.size(),
        (unsigned long long)file_size);
  if (file_size < 8)
    bad(where, strprintf("truncated: %llu bytes, shorter than the 8-byte header length",
                         (unsigned long long)file_size));
  CHECK(head.size() >= 8, "pass the file's first 8 bytes at least");
  SafetensorsHeader h;
  for (int k = 7; k >= 0; --k) h.header_len = (h.header_len << 8) | static_cast<unsigned char>(head[k]);
  if (h.header_len > kSafetensorsMaxHeader)
    bad(where, strprintf("header length %llu exceeds the limit of %llu bytes",
                         (unsigned long long)h.header_len, (unsigned long long)kSafetensorsMaxHeader));
  if (h.header_len > file_size - 8)
    bad(where, strprintf("header length %llu exceeds the file (%llu bytes follow the length; "
                         "truncated?)", (unsigned long long)h.header_len,
                         (unsigned long long)(file_size - 8)));
  CHECK(head.size() >= 8 + h.header_len, "pass the whole header");
  h.data_start = 8 + h.header_len;
  h.data_size = file_size - h.data_start;
  const std::string_view json = head.substr(8, static_cast<size_t>(h.header_len));
  if (json.empty() || json[0] != '{') bad(where, "header does not start with '{'");
  // json_parse's value bound (4M, ~500k tensors) also bounds the memory a hostile header
  // can make the reader allocate.
  const JsonValue root = json_parse(json, where + ": header");
  // json_parse has rejected duplicate keys, so names are unique.
  for (const auto& [name, v] : root.members) {
    if (name == "__metadata__") {
      if (v.kind != JsonValue::Kind::kObject) bad(where, "__metadata__ must be an object of strings");
      for (const auto& [k, s] : v.members) {
        if (s.kind != JsonValue::Kind::kString)
          bad(where, "__metadata__ " + json_quote(k) + " must be a string");
        h.metadata.emplace_back(k, s.s);
      }
      continue;
    }
    h.tensors.push_back(parse_entry(name, v, h.data_size, where));
  }
  std::stable_sort(h.tensors.begin(), h.tensors.end(),
                   [](const SafetensorsTensor& a, const SafetensorsTensor& b) {
                     return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
                   });
  uint64_t at = 0;
  const SafetensorsTensor* prev = nullptr;
  for (const SafetensorsTensor& t : h.tensors) {
    if (t.begin != at) {
      const std::string before =
          prev ? "the previous tensor " + json_quote(prev->name) + " ends at " + std::to_string(at)
               : std::string("the data section starts at 0");
      bad(where, strprintf("tensor %s begins at byte %llu of the data but %s (%s)",
                           json_quote(t.name).c_str(), (unsigned long long)t.begin, before.c_str(),
                           t.begin > at ? "a gap" : "overlapping"));
    }
    at = t.end;
    prev = &t;
  }
  if (at != h.data_size)
    bad(where, strprintf("the data section holds %llu bytes but the tensors cover %llu "
                         "(trailing bytes)", (unsigned long long)h.data_size, (unsigned long long)at));
  return h;
}

SafetensorsHeader safetensors_read_header(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) user_error("%s: cannot open (%s)", path.c_str(), std::strerror(errno));
  struct FdCloser {
    int fd;
    ~FdCloser() { ::close(fd); }
  } closer{fd};
  struct stat st;
  if (::fstat(fd, &st) != 0) user_error("%s: cannot stat (%s)", path.c_str(), std::strerror(errno));
  if (!S_ISREG(st.st_mode)) user_error("%s: not a regular file", path.c_str());
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  auto read_at = [&](std::string& buf, size_t n) {
    buf.resize(n);
    size_t got = 0;
    while (got < n) {
      const ssize_t r = ::pread(fd, buf.data() + got, n - got, static_cast<off_t>(got));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) user_error("%s: cannot read (%s)", path.c_str(), std::strerror(errno));
      if (r == 0) user_error("%s: the file shrank while being read", path.c_str());
      got += static_cast<size_t>(r);
    }
  };
  std::string head;
  read_at(head, static_cast<size_t>(std::min<uint64_t>(size, 8)));
  if (head.size() == 8) {
    uint64_t n = 0;
    for (int k = 7; k >= 0; --k) n = (n << 8) | static_cast<unsigned char>(head[k]);
    if (n <= kSafetensorsMaxHeader && n <= size - 8) read_at(head, static_cast<size_t>(8 + n));
  }
  return safetensors_parse_header(head, size, path);
}

std::string safetensors_read_bytes(const std::string& path, const SafetensorsHeader& h,
                                   const SafetensorsTensor& t) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) user_error("%s: cannot open (%s)", path.c_str(), std::strerror(errno));
  std::string out(static_cast<size_t>(t.end - t.begin), '\0');
  size_t got = 0;
  while (got < out.size()) {
    const ssize_t r = ::pread(fd, out.data() + got, out.size() - got,
                              static_cast<off_t>(h.data_start + t.begin + got));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    got += static_cast<size_t>(r);
  }
  ::close(fd);
  if (got != out.size()) user_error("%s: cannot read tensor %s", path.c_str(), json_quote(t.name).c_str());
  return out;
}

uint64_t SafetensorsSpec::bytes() const {
  uint64_t n = 0;
  CHECK(shape_bytes(shape, dtype, &n), "%s: shape %s", name.c_str(), shape_text(shape).c_str());
  return n;
}

std::string safetensors_header_bytes(
    const std::vector<SafetensorsSpec>& tensors,
    const std::vector<std::pair<std::string, std::string>>& metadata) {
  std::string json = "{\"__metadata__\":{";
  bool has_format = false;
  for (const auto& [k, v] : metadata) has_format = has_format || k == "format";
  if (!has_format) json += "\"format\":\"pt\"";
  for (size_t i = 0; i < metadata.size(); ++i)
    json += (i || !has_format ? "," : "") + json_quote(metadata[i].first) + ":" +
            json_quote(metadata[i].second);
  json += "}";
  std::set<std::string_view> names;
  uint64_t at = 0;
  for (const SafetensorsSpec& t : tensors) {
    CHECK(!t.name.empty() && t.name != "__metadata__" && names.insert(t.name).second,
          "tensor name '%s' empty, reserved or repeated", t.name.c_str());
    const uint64_t end = at + t.bytes();
    json += "," + json_quote(t.name) + ":{\"dtype\":\"" + to_string(t.dtype) +
            "\",\"shape\":" + shape_text(t.shape) + ",\"data_offsets\":[" + std::to_string(at) +
            "," + std::to_string(end) + "]}";
    at = end;
  }
  json += "}";
  json.append((8 - json.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  const uint64_t n = json.size();
  for (int k = 0; k < 8; ++k) out[static_cast<size_t>(k)] = static_cast<char>((n >> (8 * k)) & 0xFF);
  return out + json;
}

SafetensorsWriter::SafetensorsWriter(const std::string& path,
                                     const std::vector<SafetensorsSpec>& tensors,
                                     const std::vector<std::pair<std::string, std::string>>& metadata)
    : path_(path) {
  for (const SafetensorsSpec& t : tensors) expected_ += t.bytes();
  const std::string header = safetensors_header_bytes(tensors, metadata);
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) user_error("%s: cannot create (%s)", path.c_str(), std::strerror(errno));
  try {
    write_all(header.data(), header.size());
  } catch (...) {
    ::close(fd_);  // the destructor does not run for a constructor that throws
    throw;
  }
}

SafetensorsWriter::~SafetensorsWriter() {
  if (fd_ >= 0) ::close(fd_);
}

void SafetensorsWriter::write_all(const void* data, size_t bytes) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t w = ::write(fd_, p, std::min<size_t>(bytes, size_t(1) << 30));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) user_error("%s: write failed (%s)", path_.c_str(), w < 0 ? std::strerror(errno) : "no progress");
    p += w;
    bytes -= static_cast<size_t>(w);
  }
}

void SafetensorsWriter::append(const void* data, size_t bytes) {
  CHECK(fd_ >= 0 && written_ + bytes <= expected_, "%s: %llu bytes past the header's %llu",
        path_.c_str(), (unsigned long long)(written_ + bytes), (unsigned long long)expected_);
  write_all(data, bytes);
  written_ += bytes;
}

void SafetensorsWriter::finish() {
  CHECK(fd_ >= 0 && written_ == expected_, "%s: %llu of %llu data bytes written", path_.c_str(),
        (unsigned long long)written_, (unsigned long long)expected_);
  const int fd = fd_;
  fd_ = -1;
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    user_error("%s: cannot fsync (%s)", path_.c_str(), std::strerror(err));
  }
  if (::close(fd) != 0) user_error("%s: cannot close (%s)", path_.c_str(), std::strerror(errno));
}

}  // namespace moe
