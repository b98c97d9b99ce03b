// CheckpointWriter / CheckpointReader on the HDF5 C API (serial, 1.10 or newer).
//
// Who is to blame for a failing call decides how it is reported:
//  - property lists, dataspaces, datatypes, closes of those: only a bug can fail -> H5_CHECK;
//  - writer calls that reach the disk (create, write, close, flush): the disk (full, gone)
//    -> UserError naming the temporary file, the dataset and errno;
//  - every reader call that touches the file: the file (truncated, corrupted, not ours)
//    -> UserError naming the file and dataset, with the cause read off HDF5's error stack.
//
// Layout (HDF5 1.10 file format, so all metadata carries checksums): every dataset is chunked
// (the whole tensor when <= 4 MiB, else equal blocks of whole rows up to 4 MiB) with the
// Fletcher32 filter; float32 as IEEE F32LE, int64 as STD I64LE. A dimension of extent 0 is
// declared unlimited, since a fixed dimension cannot be smaller than its chunk. Strings are
// fixed-length attributes, kept in the checksummed object header.
//
// Speed: a chunk a write covers completely is gathered once into a staging buffer, its
// Fletcher32 computed here (vectorized) and written with H5Dwrite_chunk, exactly as the filter
// would store it; HDF5's own path costs two more copies and a 3x slower checksum. Reads go
// through H5Dread, so HDF5's filter verifies every chunk, ours included.
#include "io/checkpoint_file.h"

#include <fcntl.h>
#include <hdf5.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <utility>

#include "model/check.h"

namespace moe {

static_assert(sizeof(hid_t) == sizeof(int64_t), "CheckpointWriter/Reader keep hid_t in int64_t");
// Chunks are written directly in memory byte order as F32LE / I64LE.
static_assert(std::endian::native == std::endian::little,
              "direct chunk writes assume little-endian");

namespace {

constexpr hsize_t kChunkBytes = hsize_t(4) << 20;    // target chunk size
constexpr hsize_t kVerifyBytes = hsize_t(64) << 20;  // verify_all reads at most this at once

// Owns one HDF5 id of any kind. The destructor ignores a failing close: it runs on error
// paths (often while unwinding) whose file is abandoned anyway; success paths close what can
// fail on I/O (datasets, attributes) explicitly and check.
class H5Id {
 public:
  H5Id() = default;
  ~H5Id() {
    if (id_ >= 0) (void)H5Idec_ref(id_);
  }
  H5Id(const H5Id&) = delete;
  H5Id& operator=(const H5Id&) = delete;
  // Takes `id` (an empty holder only) and returns it, so that H5_CHECK(x.reset(H5...())) reads
  // naturally. NOTE: never releases anything here: any HDF5 call clears the error stack, which
  // h5_failure_cause reads right after a failed call.
  hid_t reset(hid_t id) {
    CHECK(id_ < 0, "H5Id::reset on a held id");
    id_ = id;
    return id;
  }
  herr_t close() {
    const hid_t id = std::exchange(id_, -1);
    return id >= 0 && H5Idec_ref(id) < 0 ? -1 : 0;
  }
  hid_t get() const { return id_; }

 private:
  hid_t id_ = -1;
};

void h5_silence() { H5_CHECK(H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr)); }

std::string errno_text() { return errno != 0 ? std::strerror(errno) : "HDF5 I/O failed"; }

// The cause of the HDF5 call that just failed, from the error stack (read before any other
// HDF5 call clears it).
herr_t collect_desc(unsigned, const H5E_error2_t* e, void* out) {
  if (e->desc) *static_cast<std::string*>(out) += std::string(e->desc) + "\n";
  return 0;
}
std::string h5_failure_cause() {
  std::string text;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, collect_desc, &text);
  std::transform(text.begin(), text.end(), text.begin(),
                 [](unsigned char c) { return std::tolower(c); });
  if (text.find("metadata") != std::string::npos && text.find("checksum") != std::string::npos)
    return "metadata checksum mismatch (file corrupted or truncated)";
  if (text.find("fletcher32") != std::string::npos || text.find("checksum") != std::string::npos)
    return "checksum mismatch (data corrupted)";
  if (text.find("truncated") != std::string::npos) return "file truncated";
  return "unreadable (file corrupted or truncated)";
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// 1 if `path` names an object (every intermediate component a group), 0 if not, -1 if HDF5
// failed (for the reader: a corrupted file; then *cause says why).
int link_exists(hid_t file, const std::string& path, std::string* cause = nullptr) {
  std::string prefix;
  size_t pos = 0;
  while (pos < path.size()) {
    size_t end = path.find('/', pos);
    if (end == std::string::npos) end = path.size();
    if (end > pos) {
      if (!prefix.empty()) {  // descend only through groups
        H5Id obj;
        if (obj.reset(H5Oopen(file, prefix.c_str(), H5P_DEFAULT)) < 0) {
          if (cause) *cause = h5_failure_cause();
          return -1;
        }
        if (H5Iget_type(obj.get()) != H5I_GROUP) return 0;
      }
      prefix += "/" + path.substr(pos, end - pos);
      const htri_t ex = H5Lexists(file, prefix.c_str(), H5P_DEFAULT);
      if (ex < 0 && cause) *cause = h5_failure_cause();
      if (ex <= 0) return ex < 0 ? -1 : 0;
    }
    pos = end + 1;
  }
  return 1;  // "/" or all components present
}

hid_t make_file_access() {
  hid_t fapl;
  H5_CHECK(fapl = H5Pcreate(H5P_FILE_ACCESS));
  // The 1.10 format: checksums on all metadata, chunk indexes included (the 1.8 format's v1
  // B-tree has none). Readable by HDF5 >= 1.10 (h5py, h5dump of any recent release).
  H5_CHECK(H5Pset_libver_bounds(fapl, H5F_LIBVER_V110, H5F_LIBVER_LATEST));
  H5_CHECK(H5Pset_fclose_degree(fapl, H5F_CLOSE_STRONG));  // close closes everything left
#if (H5_VERS_MAJOR == 1 && H5_VERS_MINOR == 10 && H5_VERS_RELEASE >= 7) || H5_VERSION_GE(1, 12, 1)
  // Keep flock() where the filesystem has it, but do not fail where it does not (Lustre, NFS).
  H5_CHECK(H5Pset_file_locking(fapl, true, true));
#endif
  return fapl;
}

// Chunk: the whole tensor up to kChunkBytes, else equal blocks of whole rows up to kChunkBytes
// (a row longer than that is split too). Equal blocks waste little on the last, partial one,
// which is stored at full chunk size. Every chunk dimension >= 1.
std::vector<hsize_t> chunk_dims(const std::vector<hsize_t>& dims, hsize_t elem) {
  const hsize_t max_elems = kChunkBytes / elem;
  auto equal_split = [](hsize_t n, hsize_t most) {
    if (n <= most) return std::max<hsize_t>(1, n);
    const hsize_t parts = (n + most - 1) / most;
    return (n + parts - 1) / parts;
  };
  if (dims.size() == 1) return {equal_split(dims[0], max_elems)};
  const hsize_t c1 = equal_split(dims[1], max_elems);
  return {equal_split(dims[0], max_elems / c1), c1};
}

// File and memory selections for rows [row0, row0 + rows) of a 1-D or 2-D dataset, the
// memory rows `ld` apart. Whole dataset with contiguous memory: H5S_ALL for both (no copies
// beyond HDF5's own).
struct Selection {
  H5Id file_space, mem_space;
  hid_t file() const { return file_space.get() >= 0 ? file_space.get() : H5S_ALL; }
  hid_t mem() const { return mem_space.get() >= 0 ? mem_space.get() : H5S_ALL; }
};
void select_rows(Selection& sel, hid_t dset, const std::vector<hsize_t>& dims, hsize_t row0,
                 hsize_t rows, hsize_t ld) {
  const hsize_t cols = dims.size() == 2 ? dims[1] : 1;
  if (row0 == 0 && rows == dims[0] && (dims.size() == 1 || ld == cols)) return;
  H5_CHECK(sel.file_space.reset(H5Dget_space(dset)));
  hsize_t start[2] = {row0, 0}, count[2] = {rows, cols};
  H5_CHECK(
      H5Sselect_hyperslab(sel.file_space.get(), H5S_SELECT_SET, start, nullptr, count, nullptr));
  if (dims.size() == 1) {
    H5_CHECK(sel.mem_space.reset(H5Screate_simple(1, count, nullptr)));
  } else {
    hsize_t mem_dims[2] = {rows, ld};
    hsize_t zero[2] = {0, 0};
    H5_CHECK(sel.mem_space.reset(H5Screate_simple(2, mem_dims, nullptr)));
    H5_CHECK(
        H5Sselect_hyperslab(sel.mem_space.get(), H5S_SELECT_SET, zero, nullptr, count, nullptr));
  }
}

// The rows one write covers, in the terms the chunk writer needs.
struct Rows {
  hsize_t rows = 0, cols = 0;  // the dataset's extent (a 1-D dataset: one column)
  hsize_t chunk[2] = {1, 1};   // chunk dims (1-D: {n, 1})
  hsize_t row0 = 0, ld = 0;    // where `data` starts; its row pitch in elements
  size_t elem = 0;             // bytes per element
  const unsigned char* data = nullptr;
};

std::vector<hsize_t> to_hsize(const std::vector<int64_t>& shape) {
  return std::vector<hsize_t>(shape.begin(), shape.end());
}

std::string dtype_name(hid_t type) {
  const size_t bits = H5Tget_size(type) * 8;
  switch (H5Tget_class(type)) {
    case H5T_FLOAT:
      return "float" + std::to_string(bits);
    case H5T_INTEGER:
      return (H5Tget_sign(type) == H5T_SGN_NONE ? "uint" : "int") + std::to_string(bits);
    case H5T_STRING:
      return "string";
    default:
      return "other";
  }
}

bool is_float32(hid_t type) { return H5Tget_class(type) == H5T_FLOAT && H5Tget_size(type) == 4; }

// HDF5's Fletcher32 filter value, bit for bit, fed in pieces: H5_checksum_fletcher32 reads
// big-endian 16-bit words and keeps both sums mod 65535 by end-around carry, which leaves 0
// for an all-zero buffer and otherwise the residue in [1, 0xffff] (0xffff for a non-zero
// multiple of 65535). Here the sums run in 16 independent 32-bit lanes per 8 KiB block (adds
// only, so the compiler vectorizes them; an AVX2 clone is picked at load time where the CPU
// has it: ~10x HDF5's loop) and fold mod 65535 per block.
// The tests read every directly written chunk back through HDF5's own filter.
constexpr size_t kFletcherLanes = 16, kFletcherGroups = 256;  // lane sums stay below 2^32
constexpr size_t kFletcherBlockBytes = 2 * kFletcherLanes * kFletcherGroups;

__attribute__((target_clones("avx2", "default"))) void fletcher32_blocks(const unsigned char* p,
                                                                         size_t n_blocks,
                                                                         uint64_t& s1, uint64_t& s2,
                                                                         bool& nonzero) {
  for (size_t b = 0; b < n_blocks; ++b, p += kFletcherBlockBytes) {
    uint32_t a1[kFletcherLanes] = {}, a2[kFletcherLanes] = {};  // lane l sums words k * kLanes + l
    const unsigned char* q = p;
    for (size_t k = 0; k < kFletcherGroups; ++k, q += 2 * kFletcherLanes) {
      for (size_t l = 0; l < kFletcherLanes; ++l) {
        uint16_t w;
        std::memcpy(&w, q + 2 * l, 2);
        a1[l] += static_cast<uint16_t>(__builtin_bswap16(w));
        a2[l] += a1[l];
      }
    }
    // Word k * kLanes + l of the block adds to sum2 with weight kLanes * (kGroups - k) - l.
    uint64_t sum = 0, weighted = 0;
    for (size_t l = 0; l < kFletcherLanes; ++l) {
      sum += a1[l];
      weighted += kFletcherLanes * uint64_t{a2[l]} - l * uint64_t{a1[l]};
    }
    s2 = (s2 + kFletcherLanes * kFletcherGroups * s1 + weighted) % 65535;
    s1 = (s1 + sum) % 65535;
    nonzero |= sum != 0;
  }
}

class Fletcher32 {
 public:
  // Every call but the last must cover whole blocks, so that the sums continue exactly.
  void add(const unsigned char* p, size_t n_bytes) {
    const size_t n_blocks = n_bytes / kFletcherBlockBytes;
    fletcher32_blocks(p, n_blocks, s1_, s2_, nonzero_);
    size_t i = n_blocks * kFletcherBlockBytes;
    for (; i + 2 <= n_bytes; i += 2) add_word((uint64_t{p[i]} << 8) | p[i + 1]);
    if (i < n_bytes) add_word(uint64_t{p[i]} << 8);  // a last odd byte is a word's high half
  }
  uint32_t value() const { return (canonical(s2_) << 16) | canonical(s1_); }

 private:
  void add_word(uint64_t w) {
    s1_ = (s1_ + w) % 65535;
    s2_ = (s2_ + s1_) % 65535;
    nonzero_ |= w != 0;
  }
  uint32_t canonical(uint64_t s) const {
    return !nonzero_ ? 0u : s == 0 ? 0xffffu : static_cast<uint32_t>(s);
  }

  uint64_t s1_ = 0, s2_ = 0;
  bool nonzero_ = false;
};

// The writer's disk-facing failures.
[[noreturn]] void write_failed(const std::string& file, const std::string& what,
                               const std::string& object) {
  user_error("%s: %s: %s (%s)", file.c_str(), object.c_str(), what.c_str(), errno_text().c_str());
}

// Attributes stay in the object header (checksummed) up to this many per object, instead of
// moving to dense storage after 8, where a value longer than a few KiB is stored without a
// checksum. (A single value over 64 KiB goes dense regardless.)
constexpr unsigned kMaxCompactAttrs = 1000;

void keep_attrs_compact(hid_t ocpl) {
  H5_CHECK(H5Pset_attr_phase_change(ocpl, kMaxCompactAttrs, 0));
}

// Creates the missing groups on the way to `path` (and `path` itself with `include_last`),
// with compact attributes. Instead of H5Pset_create_intermediate_group, whose groups would
// get the default creation properties.
void make_groups(hid_t file, const std::string& temp, const std::string& path, bool include_last) {
  H5Id gcpl;
  H5_CHECK(gcpl.reset(H5Pcreate(H5P_GROUP_CREATE)));
  keep_attrs_compact(gcpl.get());
  size_t stop = path.size();
  if (!include_last) stop = path.rfind('/') == std::string::npos ? 0 : path.rfind('/');
  std::string prefix;
  for (size_t pos = 0; pos < stop;) {
    size_t end = std::min(path.find('/', pos), stop);
    if (end > pos) {
      prefix += "/" + path.substr(pos, end - pos);
      const htri_t ex = H5Lexists(file, prefix.c_str(), H5P_DEFAULT);
      H5_CHECK(ex);
      H5Id group;
      errno = 0;
      if (ex == 0 &&
          group.reset(H5Gcreate2(file, prefix.c_str(), H5P_DEFAULT, gcpl.get(), H5P_DEFAULT)) < 0)
        write_failed(temp, "cannot create group", prefix);
    }
    pos = end + 1;
  }
}

void write_attr(hid_t file, const std::string& temp, const std::string& group,
                const std::string& name, hid_t type, const void* value) {
  CHECK(file >= 0, "%s: attribute after commit", temp.c_str());
  H5Id obj, space, attr;
  make_groups(file, temp, group, true);
  errno = 0;
  if (obj.reset(H5Oopen(file, group.c_str(), H5P_DEFAULT)) < 0)
    write_failed(temp, "cannot open", group);
  const htri_t ex = H5Aexists(obj.get(), name.c_str());
  H5_CHECK(ex);
  const std::string where = group + " attribute " + name;
  errno = 0;
  if (ex > 0 && H5Adelete(obj.get(), name.c_str()) < 0) write_failed(temp, "cannot replace", where);
  H5_CHECK(space.reset(H5Screate(H5S_SCALAR)));
  if (attr.reset(H5Acreate2(obj.get(), name.c_str(), type, space.get(), H5P_DEFAULT, H5P_DEFAULT)) <
          0 ||
      H5Awrite(attr.get(), type, value) < 0 || attr.close() < 0)
    write_failed(temp, "cannot write", where);
}

// A new chunked, Fletcher32-checked dataset (parent groups created as needed).
hid_t create_dataset(hid_t file, const std::string& temp, const std::string& path,
                     const std::vector<int64_t>& shape, hid_t file_type) {
  CHECK(file >= 0, "%s: write after commit", path.c_str());
  CHECK(!path.empty() && path[0] == '/', "dataset path '%s' must be absolute", path.c_str());
  CHECK(link_exists(file, path) == 0, "%s: dataset written twice (or path taken)", path.c_str());
  const std::vector<hsize_t> dims = to_hsize(shape);
  std::vector<hsize_t> max_dims = dims;
  for (size_t i = 0; i < dims.size(); ++i) {
    CHECK(shape[i] >= 0, "%s: shape %s", path.c_str(), shape_str(shape).c_str());
    if (dims[i] == 0) max_dims[i] = H5S_UNLIMITED;  // a fixed dim may not be below its chunk
  }
  const std::vector<hsize_t> chunk = chunk_dims(dims, H5Tget_size(file_type));
  const int rank = static_cast<int>(dims.size());
  H5Id space, dcpl;
  H5_CHECK(space.reset(H5Screate_simple(rank, dims.data(), max_dims.data())));
  H5_CHECK(dcpl.reset(H5Pcreate(H5P_DATASET_CREATE)));
  H5_CHECK(H5Pset_chunk(dcpl.get(), rank, chunk.data()));
  H5_CHECK(H5Pset_fletcher32(dcpl.get()));
  keep_attrs_compact(dcpl.get());
  make_groups(file, temp, path, false);
  errno = 0;
  const hid_t dset =
      H5Dcreate2(file, path.c_str(), file_type, space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT);
  if (dset < 0) write_failed(temp, "cannot create dataset", path);
  return dset;
}

// Writes chunk `chunk_row` of rows (all its column chunks) straight to the file: gathered into
// `staging` with its Fletcher32 appended, as the filter would have stored it, but without
// HDF5's gather copy, its filter copy and its slower checksum. The part of an edge chunk
// outside the dataset is zero, as HDF5 would fill it.
void write_chunk_row(hid_t dset, const std::string& temp, const std::string& path, const Rows& g,
                     hsize_t chunk_row, std::vector<unsigned char>& staging) {
  const hsize_t r0 = chunk_row * g.chunk[0], n_rows = std::min(g.chunk[0], g.rows - r0);
  const size_t row_bytes = g.chunk[1] * g.elem, chunk_bytes = g.chunk[0] * row_bytes;
  staging.resize(std::max(staging.size(), chunk_bytes + 4));
  unsigned char* dst = staging.data();
  for (hsize_t c0 = 0; c0 < g.cols; c0 += g.chunk[1]) {
    const hsize_t n_cols = std::min(g.chunk[1], g.cols - c0);
    const unsigned char* src = g.data + ((r0 - g.row0) * g.ld + c0) * g.elem;
    // Checksum right behind the copy, piece by piece, while the bytes are still in cache.
    constexpr size_t kPiece = 16 * kFletcherBlockBytes;
    Fletcher32 sum;
    size_t summed = 0;
    auto sum_whole_pieces = [&](size_t filled) {
      const size_t n = (filled - summed) / kPiece * kPiece;
      sum.add(dst + summed, n);
      summed += n;
    };
    const size_t data_bytes = n_rows * row_bytes;
    if (n_cols == g.ld) {  // whole rows, contiguous in memory
      for (size_t off = 0; off < data_bytes; off += kPiece) {
        std::memcpy(dst + off, src + off, std::min(kPiece, data_bytes - off));
        sum_whole_pieces(std::min(off + kPiece, data_bytes));
      }
    } else {
      for (hsize_t r = 0; r < n_rows; ++r) {
        std::memcpy(dst + r * row_bytes, src + r * g.ld * g.elem, n_cols * g.elem);
        std::memset(dst + r * row_bytes + n_cols * g.elem, 0, row_bytes - n_cols * g.elem);
        sum_whole_pieces((r + 1) * row_bytes);
      }
    }
    std::memset(dst + data_bytes, 0, chunk_bytes - data_bytes);
    sum.add(dst + summed, chunk_bytes - summed);
    const uint32_t value = sum.value();
    for (int b = 0; b < 4; ++b)
      dst[chunk_bytes + b] = static_cast<unsigned char>(value >> (8 * b));  // LE
    const hsize_t offset[2] = {r0, c0};
    errno = 0;
    if (H5Dwrite_chunk(dset, H5P_DEFAULT, 0, offset, chunk_bytes + 4, dst) < 0)
      write_failed(temp, "cannot write", path);
  }
}

// Rows [row0, row0 + rows) of a 1-D or 2-D dataset from `data` (rows `ld` apart; a 1-D
// dataset is one column). Chunks the rows cover completely go straight to the file; the rows
// of a partly covered chunk (another rank owns the rest) go through H5Dwrite, which merges
// them into the stored chunk.
void write_rows(hid_t dset, const std::string& temp, const std::string& path, hid_t mem_type,
                int64_t row0, int64_t rows, const void* data, int64_t ld,
                std::vector<unsigned char>& staging) {
  H5Id space, dcpl;
  H5_CHECK(space.reset(H5Dget_space(dset)));
  const int rank = H5Sget_simple_extent_ndims(space.get());
  CHECK(rank == 1 || rank == 2, "%s: rank %d", path.c_str(), rank);
  std::vector<hsize_t> dims(static_cast<size_t>(rank));
  H5_CHECK(H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr));
  Rows g;
  g.rows = dims[0];
  g.cols = rank == 2 ? dims[1] : 1;
  g.ld = rank == 2 ? static_cast<hsize_t>(ld) : 1;
  g.row0 = static_cast<hsize_t>(row0);
  g.elem = H5Tget_size(mem_type);
  g.data = static_cast<const unsigned char*>(data);
  CHECK(row0 >= 0 && rows >= 0 && g.row0 + static_cast<hsize_t>(rows) <= g.rows,
        "%s: rows [%lld, %lld) of %llu", path.c_str(), static_cast<long long>(row0),
        static_cast<long long>(row0 + rows), static_cast<unsigned long long>(g.rows));
  CHECK(g.ld >= g.cols, "%s: ld %lld < cols %llu", path.c_str(), static_cast<long long>(ld),
        static_cast<unsigned long long>(g.cols));
  if (rows == 0 || g.cols == 0) return;
  H5_CHECK(dcpl.reset(H5Dget_create_plist(dset)));
  H5_CHECK(H5Pget_chunk(dcpl.get(), rank, g.chunk));
  if (rank == 1) g.chunk[1] = 1;

  const hsize_t end = g.row0 + static_cast<hsize_t>(rows), c = g.chunk[0];
  const hsize_t first_full = (g.row0 + c - 1) / c;  // chunk rows wholly inside
  const hsize_t end_full = end == g.rows ? (g.rows + c - 1) / c : end / c;
  auto write_slab = [&](hsize_t r0, hsize_t n) {  // through HDF5 (read-modify-write)
    if (n == 0) return;
    Selection sel;
    select_rows(sel, dset, dims, r0, n, g.ld);
    errno = 0;
    if (H5Dwrite(dset, mem_type, sel.mem(), sel.file(), H5P_DEFAULT,
                 g.data + (r0 - g.row0) * g.ld * g.elem) < 0)
      write_failed(temp, "cannot write", path);
  };
  if (first_full >= end_full) return write_slab(g.row0, end - g.row0);
  write_slab(g.row0, first_full * c - g.row0);
  for (hsize_t b = first_full; b < end_full; ++b) write_chunk_row(dset, temp, path, g, b, staging);
  const hsize_t full_end = std::min(end_full * c, g.rows);
  write_slab(full_end, end - full_end);
}

hid_t vl_string_type() {
  hid_t t;
  H5_CHECK(t = H5Tcopy(H5T_C_S1));
  H5_CHECK(H5Tset_size(t, H5T_VARIABLE));
  H5_CHECK(H5Tset_cset(t, H5T_CSET_UTF8));
  return t;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Writer

CheckpointWriter::CheckpointWriter(const std::string& final_path)
    : final_path_(final_path), temp_path_(final_path + ".tmp." + std::to_string(::getpid())) {
  CHECK(!final_path.empty());
  h5_silence();
  const std::filesystem::path parent = std::filesystem::path(final_path).parent_path();
  if (!parent.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(parent, ec);
    if (ec)
      user_error("%s: cannot create folder %s (%s)", final_path.c_str(), parent.c_str(),
                 ec.message().c_str());
  }
  H5Id fapl, fcpl;
  fapl.reset(make_file_access());
  H5_CHECK(fcpl.reset(H5Pcreate(H5P_FILE_CREATE)));
  keep_attrs_compact(fcpl.get());  // the root group's
  errno = 0;
  file_ = H5Fcreate(temp_path_.c_str(), H5F_ACC_TRUNC, fcpl.get(), fapl.get());
  if (file_ < 0)
    user_error("%s: cannot create %s (%s)", final_path.c_str(), temp_path_.c_str(),
               errno_text().c_str());
  try {
    attr_i64("/meta", "format_version", kCheckpointFormatVersion);
  } catch (...) {
    (void)H5Fclose(file_);
    ::unlink(temp_path_.c_str());
    throw;
  }
}

CheckpointWriter::~CheckpointWriter() {
  if (file_ >= 0) (void)H5Fclose(file_);  // abandoned: a failing close changes nothing
  if (!committed_) ::unlink(temp_path_.c_str());
}

void CheckpointWriter::create_f32(const std::string& path, const std::vector<int64_t>& shape) {
  CHECK(shape.size() == 1 || shape.size() == 2, "%s: shape %s (1-D or 2-D only)", path.c_str(),
        shape_str(shape).c_str());
  H5Id dset;
  dset.reset(create_dataset(file_, temp_path_, path, shape, H5T_IEEE_F32LE));
  errno = 0;
  if (dset.close() < 0) write_failed(temp_path_, "cannot create dataset", path);
}

void CheckpointWriter::write_f32(const std::string& path, const std::vector<int64_t>& shape,
                                 const float* data, int64_t ld) {
  CHECK(shape.size() == 1 || shape.size() == 2, "%s: shape %s (1-D or 2-D only)", path.c_str(),
        shape_str(shape).c_str());
  H5Id dset;
  dset.reset(create_dataset(file_, temp_path_, path, shape, H5T_IEEE_F32LE));
  write_rows(dset.get(), temp_path_, path, H5T_NATIVE_FLOAT, 0, shape[0], data, ld, staging_);
  errno = 0;
  if (dset.close() < 0) write_failed(temp_path_, "cannot write", path);
}

void CheckpointWriter::write_f32_rows(const std::string& path, int64_t row0, int64_t rows,
                                      const float* data, int64_t ld) {
  CHECK(file_ >= 0, "%s: write after commit", path.c_str());
  CHECK(link_exists(file_, path) == 1, "%s: write_f32_rows before create_f32", path.c_str());
  H5Id dset, type;
  errno = 0;
  if (dset.reset(H5Dopen2(file_, path.c_str(), H5P_DEFAULT)) < 0)
    write_failed(temp_path_, "cannot open dataset", path);
  H5_CHECK(type.reset(H5Dget_type(dset.get())));
  CHECK(is_float32(type.get()), "%s: not a float32 dataset", path.c_str());
  write_rows(dset.get(), temp_path_, path, H5T_NATIVE_FLOAT, row0, rows, data, ld, staging_);
  errno = 0;
  if (dset.close() < 0) write_failed(temp_path_, "cannot write", path);
}

void CheckpointWriter::write_i64(const std::string& path, const std::vector<int64_t>& values) {
  const int64_t n = static_cast<int64_t>(values.size());
  H5Id dset;
  dset.reset(create_dataset(file_, temp_path_, path, {n}, H5T_STD_I64LE));
  write_rows(dset.get(), temp_path_, path, H5T_NATIVE_INT64, 0, n, values.data(), 1, staging_);
  errno = 0;
  if (dset.close() < 0) write_failed(temp_path_, "cannot write", path);
}

void CheckpointWriter::attr_i64(const std::string& group, const std::string& name, int64_t value) {
  write_attr(file_, temp_path_, group, name, H5T_NATIVE_INT64, &value);
}

void CheckpointWriter::attr_f64(const std::string& group, const std::string& name, double value) {
  write_attr(file_, temp_path_, group, name, H5T_NATIVE_DOUBLE, &value);
}

// A fixed-length UTF-8 string of exactly value.size() bytes (NUL-padded), shown as text by
// h5dump and h5py. NOTE: not variable-length: those live in the global heap, which has no
// checksum, and HDF5 1.10 loops forever on some damaged global heaps. A fixed-length value
// sits in the checksummed object header (or, past 64 KiB, in dense attribute storage).
// No embedded NUL (readers stop at the first one).
void CheckpointWriter::attr_str(const std::string& group, const std::string& name,
                                const std::string& value) {
  CHECK(value.find('\0') == std::string::npos, "%s %s: string with NUL", group.c_str(),
        name.c_str());
  H5Id type;
  H5_CHECK(type.reset(H5Tcopy(H5T_C_S1)));
  H5_CHECK(H5Tset_size(type.get(), std::max<size_t>(1, value.size())));  // size 0 is not allowed
  H5_CHECK(H5Tset_strpad(type.get(), H5T_STR_NULLPAD));
  H5_CHECK(H5Tset_cset(type.get(), H5T_CSET_UTF8));
  const std::string padded = value.empty() ? std::string(1, '\0') : value;
  write_attr(file_, temp_path_, group, name, type.get(), padded.data());
}

void CheckpointWriter::commit() {
  CHECK(file_ >= 0 && !committed_, "%s: commit twice", final_path_.c_str());
  errno = 0;
  const herr_t flushed = H5Fflush(file_, H5F_SCOPE_GLOBAL);
  const herr_t closed = H5Fclose(std::exchange(file_, -1));
  if (flushed < 0 || closed < 0)
    user_error("%s: cannot write %s (%s)", final_path_.c_str(), temp_path_.c_str(),
               errno_text().c_str());
  durable_rename(temp_path_, final_path_);
  committed_ = true;
}

// ---------------------------------------------------------------------------------------------
// Reader

namespace {

// HDF5's signature at offset 0 tells "HDF5, but damaged" from "not HDF5 at all".
bool has_hdf5_signature(const std::string& path) {
  static const char kSignature[8] = {'\x89', 'H', 'D', 'F', '\r', '\n', '\x1a', '\n'};
  char buf[8] = {};
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return false;
  const size_t n = std::fread(buf, 1, sizeof(buf), f);
  std::fclose(f);
  return n == sizeof(buf) && std::memcmp(buf, kSignature, sizeof(buf)) == 0;
}

// A reader's failure: the file's fault.
[[noreturn]] void bad_file(const std::string& file, const std::string& object,
                           const std::string& why) {
  user_error("%s: %s: %s", file.c_str(), object.c_str(), why.c_str());
}

// An open dataset with its type and extent (dims empty for a scalar).
struct Dset {
  H5Id dset, type, space;
  std::vector<hsize_t> dims;
  std::vector<int64_t> shape() const { return std::vector<int64_t>(dims.begin(), dims.end()); }
};

void open_dset(Dset& d, hid_t file, const std::string& fpath, const std::string& path) {
  std::string cause;
  const int ex = link_exists(file, path, &cause);
  if (ex < 0) bad_file(fpath, path, cause);
  if (ex == 0) bad_file(fpath, path, "missing (no such dataset)");
  if (d.dset.reset(H5Dopen2(file, path.c_str(), H5P_DEFAULT)) < 0) {
    cause = h5_failure_cause();
    H5Id obj;
    if (obj.reset(H5Oopen(file, path.c_str(), H5P_DEFAULT)) >= 0 &&
        H5Iget_type(obj.get()) != H5I_DATASET)
      cause = "not a dataset";
    bad_file(fpath, path, cause);
  }
  if (d.type.reset(H5Dget_type(d.dset.get())) < 0 || d.space.reset(H5Dget_space(d.dset.get())) < 0)
    bad_file(fpath, path, h5_failure_cause());
  const int rank = H5Sget_simple_extent_ndims(d.space.get());
  if (rank < 0) bad_file(fpath, path, h5_failure_cause());
  d.dims.resize(static_cast<size_t>(rank));
  if (rank > 0 && H5Sget_simple_extent_dims(d.space.get(), d.dims.data(), nullptr) < 0)
    bad_file(fpath, path, h5_failure_cause());
}

void read_dset_rows(const Dset& d, const std::string& fpath, const std::string& path,
                    hid_t mem_type, hsize_t row0, hsize_t rows, void* data, hsize_t ld) {
  if (rows == 0 || (d.dims.size() == 2 && d.dims[1] == 0)) return;
  Selection sel;
  select_rows(sel, d.dset.get(), d.dims, row0, rows, ld);
  if (H5Dread(d.dset.get(), mem_type, sel.mem(), sel.file(), H5P_DEFAULT, data) < 0)
    bad_file(fpath, path, h5_failure_cause());
}

// An open scalar attribute and its type.
struct Attr {
  H5Id attr, type;
  std::string label;  // "/meta (attribute step)"
};

void open_attr(Attr& a, hid_t file, const std::string& fpath, const std::string& group,
               const std::string& name) {
  a.label = group + " (attribute " + name + ")";
  std::string cause;
  const int ex = link_exists(file, group, &cause);
  if (ex < 0) bad_file(fpath, group, cause);
  if (ex == 0) bad_file(fpath, a.label, "missing (no such group)");
  const htri_t has = H5Aexists_by_name(file, group.c_str(), name.c_str(), H5P_DEFAULT);
  if (has < 0) bad_file(fpath, a.label, h5_failure_cause());
  if (has == 0) bad_file(fpath, a.label, "missing");
  H5Id space;
  if (a.attr.reset(H5Aopen_by_name(file, group.c_str(), name.c_str(), H5P_DEFAULT, H5P_DEFAULT)) <
          0 ||
      a.type.reset(H5Aget_type(a.attr.get())) < 0 || space.reset(H5Aget_space(a.attr.get())) < 0)
    bad_file(fpath, a.label, h5_failure_cause());
  if (H5Sget_simple_extent_npoints(space.get()) != 1)
    bad_file(fpath, a.label, "not a single value");
}

herr_t collect_hard_link(hid_t, const char* name, const H5L_info_t* info, void* out) {
  if (info->type == H5L_TYPE_HARD)
    static_cast<std::vector<std::string>*>(out)->push_back(std::string("/") + name);
  return 0;
}

bool has_fletcher32(hid_t dset) {
  H5Id dcpl;
  if (dcpl.reset(H5Dget_create_plist(dset)) < 0) return false;
  const int n = H5Pget_nfilters(dcpl.get());
  for (int i = 0; i < n; ++i) {
    unsigned flags = 0, config = 0;
    size_t n_values = 0;
    if (H5Pget_filter2(dcpl.get(), static_cast<unsigned>(i), &flags, &n_values, nullptr, 0, nullptr,
                       &config) == H5Z_FILTER_FLETCHER32)
      return true;
  }
  return false;
}

// Rows of dataset `d` that verify_all reads at once: whole chunks, up to kVerifyBytes.
hsize_t verify_step_rows(const Dset& d, hsize_t row_bytes) {
  hsize_t unit = 1;
  H5Id dcpl;
  if (dcpl.reset(H5Dget_create_plist(d.dset.get())) >= 0 &&
      H5Pget_layout(dcpl.get()) == H5D_CHUNKED) {
    std::vector<hsize_t> chunk(d.dims.size(), 1);
    if (H5Pget_chunk(dcpl.get(), static_cast<int>(chunk.size()), chunk.data()) >= 0)
      unit = chunk[0];
  }
  return unit * std::max<hsize_t>(1, kVerifyBytes / std::max<hsize_t>(1, unit * row_bytes));
}

}  // namespace

CheckpointReader::CheckpointReader(const std::string& path) : path_(path) {
  h5_silence();
  struct stat st;
  if (::stat(path.c_str(), &st) != 0)
    user_error("%s: cannot open (%s)", path.c_str(), std::strerror(errno));
  if (S_ISDIR(st.st_mode)) user_error("%s: not a moetrain checkpoint (a folder)", path.c_str());
  if (!S_ISREG(st.st_mode))
    user_error("%s: not a moetrain checkpoint (not a regular file)", path.c_str());
  if (st.st_size == 0) user_error("%s: not a moetrain checkpoint (empty file)", path.c_str());
  if (::access(path.c_str(), R_OK) != 0)
    user_error("%s: cannot open (%s)", path.c_str(), std::strerror(errno));
  H5Id fapl;
  fapl.reset(make_file_access());
  file_ = H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl.get());
  if (file_ < 0) {
    const std::string cause = h5_failure_cause();
    if (has_hdf5_signature(path))
      user_error("%s: cannot open as HDF5: %s", path.c_str(), cause.c_str());
    user_error("%s: not a moetrain checkpoint (cannot open as HDF5)", path.c_str());
  }
  try {
    std::string cause;
    const int meta = link_exists(file_, "/meta", &cause);
    if (meta < 0) bad_file(path, "/meta", cause);
    const htri_t has = meta ? H5Aexists_by_name(file_, "/meta", "format_version", H5P_DEFAULT) : 0;
    if (has < 0) bad_file(path, "/meta", h5_failure_cause());
    if (has == 0)
      user_error("%s: not a moetrain checkpoint (no /meta format_version)", path.c_str());
    const int64_t version = attr_i64("/meta", "format_version");
    if (version != kCheckpointFormatVersion)
      user_error("%s: format version %lld, this moetrain reads %d", path.c_str(),
                 static_cast<long long>(version), kCheckpointFormatVersion);
  } catch (...) {
    (void)H5Fclose(std::exchange(file_, -1));
    throw;
  }
}

CheckpointReader::~CheckpointReader() {
  if (file_ >= 0) (void)H5Fclose(file_);  // read-only: nothing to lose
}

bool CheckpointReader::has(const std::string& path) const {
  std::string cause;
  const int ex = link_exists(file_, path, &cause);
  if (ex < 0) bad_file(path_, path, cause);
  return ex == 1;
}

std::vector<int64_t> CheckpointReader::shape(const std::string& path) const {
  Dset d;
  open_dset(d, file_, path_, path);
  return d.shape();
}

void CheckpointReader::read_f32(const std::string& path, const std::vector<int64_t>& shape,
                                float* data, int64_t ld) const {
  CHECK(shape.size() == 1 || shape.size() == 2, "%s: shape %s (1-D or 2-D only)", path.c_str(),
        shape_str(shape).c_str());
  CHECK(shape.size() == 1 || ld >= shape[1], "%s: ld %lld", path.c_str(),
        static_cast<long long>(ld));
  Dset d;
  open_dset(d, file_, path_, path);
  if (!is_float32(d.type.get()))
    bad_file(path_, path, "stored as " + dtype_name(d.type.get()) + ", expected float32");
  if (d.shape() != shape)
    bad_file(path_, path,
             "stored shape " + shape_str(d.shape()) + " but the model expects " + shape_str(shape));
  read_dset_rows(d, path_, path, H5T_NATIVE_FLOAT, 0, d.dims[0], data, static_cast<hsize_t>(ld));
}

void CheckpointReader::read_f32_rows(const std::string& path, int64_t row0, int64_t rows,
                                     float* data, int64_t ld) const {
  Dset d;
  open_dset(d, file_, path_, path);
  if (!is_float32(d.type.get()))
    bad_file(path_, path, "stored as " + dtype_name(d.type.get()) + ", expected float32");
  if (d.dims.size() != 1 && d.dims.size() != 2)
    bad_file(path_, path, "stored shape " + shape_str(d.shape()) + ", expected 1-D or 2-D");
  if (row0 < 0 || rows < 0 || static_cast<hsize_t>(row0 + rows) > d.dims[0])
    bad_file(path_, path,
             strprintf("rows [%lld, %lld) outside stored shape ", static_cast<long long>(row0),
                       static_cast<long long>(row0 + rows)) +
                 shape_str(d.shape()));
  CHECK(d.dims.size() == 1 || static_cast<hsize_t>(ld) >= d.dims[1], "%s: ld %lld", path.c_str(),
        static_cast<long long>(ld));
  read_dset_rows(d, path_, path, H5T_NATIVE_FLOAT, static_cast<hsize_t>(row0),
                 static_cast<hsize_t>(rows), data, static_cast<hsize_t>(ld));
}

std::vector<int64_t> CheckpointReader::read_i64(const std::string& path) const {
  Dset d;
  open_dset(d, file_, path_, path);
  if (H5Tget_class(d.type.get()) != H5T_INTEGER)
    bad_file(path_, path, "stored as " + dtype_name(d.type.get()) + ", expected int64");
  if (d.dims.size() != 1)
    bad_file(path_, path, "stored shape " + shape_str(d.shape()) + ", expected 1-D");
  std::vector<int64_t> out(d.dims[0]);
  read_dset_rows(d, path_, path, H5T_NATIVE_INT64, 0, d.dims[0], out.data(), 1);
  return out;
}

int64_t CheckpointReader::attr_i64(const std::string& group, const std::string& name) const {
  Attr a;
  open_attr(a, file_, path_, group, name);
  if (H5Tget_class(a.type.get()) != H5T_INTEGER)
    bad_file(path_, a.label, "stored as " + dtype_name(a.type.get()) + ", expected an integer");
  int64_t v = 0;
  if (H5Aread(a.attr.get(), H5T_NATIVE_INT64, &v) < 0) bad_file(path_, a.label, h5_failure_cause());
  return v;
}

double CheckpointReader::attr_f64(const std::string& group, const std::string& name) const {
  Attr a;
  open_attr(a, file_, path_, group, name);
  const H5T_class_t c = H5Tget_class(a.type.get());
  if (c != H5T_FLOAT && c != H5T_INTEGER)
    bad_file(path_, a.label, "stored as " + dtype_name(a.type.get()) + ", expected a number");
  double v = 0;
  if (H5Aread(a.attr.get(), H5T_NATIVE_DOUBLE, &v) < 0)
    bad_file(path_, a.label, h5_failure_cause());
  return v;
}

// Variable-length (what the writer stores) or fixed-length (other tools) strings.
std::string CheckpointReader::attr_str(const std::string& group, const std::string& name) const {
  Attr a;
  open_attr(a, file_, path_, group, name);
  const hid_t type = a.type.get();
  if (H5Tget_class(type) != H5T_STRING)
    bad_file(path_, a.label, "stored as " + dtype_name(type) + ", expected a string");
  if (H5Tis_variable_str(type) > 0) {
    H5Id mem;
    mem.reset(vl_string_type());
    H5_CHECK(H5Tset_cset(mem.get(), H5Tget_cset(type)));
    char* p = nullptr;
    if (H5Aread(a.attr.get(), mem.get(), &p) < 0) bad_file(path_, a.label, h5_failure_cause());
    std::string s = p ? p : "";
    H5free_memory(p);
    return s;
  }
  std::string s(H5Tget_size(type), '\0');
  if (H5Aread(a.attr.get(), type, s.data()) < 0) bad_file(path_, a.label, h5_failure_cause());
  if (H5Tget_strpad(type) == H5T_STR_SPACEPAD) {
    s.erase(s.find_last_not_of(' ') + 1);
  } else {
    s.resize(std::strlen(s.c_str()));
  }
  return s;
}

std::vector<CheckpointDataset> CheckpointReader::list() const {
  std::vector<std::string> names;
  if (H5Lvisit(file_, H5_INDEX_NAME, H5_ITER_INC, collect_hard_link, &names) < 0)
    bad_file(path_, "/", h5_failure_cause());
  std::sort(names.begin(), names.end());
  std::vector<CheckpointDataset> out;
  for (const std::string& name : names) {
    H5Id obj;
    if (obj.reset(H5Oopen(file_, name.c_str(), H5P_DEFAULT)) < 0)
      bad_file(path_, name, h5_failure_cause());
    if (H5Iget_type(obj.get()) != H5I_DATASET) continue;
    Dset d;
    open_dset(d, file_, path_, name);
    out.push_back(
        CheckpointDataset{name, d.shape(), dtype_name(d.type.get()), has_fletcher32(d.dset.get())});
  }
  return out;
}

std::string CheckpointReader::verify_all() const {
  try {
    for (const CheckpointDataset& info : list()) {
      Dset d;
      open_dset(d, file_, path_, info.path);
      const hid_t type = d.type.get();
      const H5T_class_t c = H5Tget_class(type);
      if (H5Tis_variable_str(type) > 0 || c == H5T_VLEN || c == H5T_REFERENCE)
        continue;  // not ours
      hsize_t row_elems = 1;
      for (size_t i = 1; i < d.dims.size(); ++i) row_elems *= d.dims[i];
      const hsize_t n_rows = d.dims.empty() ? 1 : d.dims[0];
      if (row_elems == 0 || n_rows == 0) continue;
      const hsize_t row_bytes = row_elems * H5Tget_size(type);
      const hsize_t step = d.dims.empty() ? 1 : std::min(n_rows, verify_step_rows(d, row_bytes));
      std::vector<unsigned char> buf(step * row_bytes);
      for (hsize_t r = 0; r < n_rows; r += step) {
        const hsize_t rows = std::min(step, n_rows - r);
        H5Id file_space, mem_space;
        if (!d.dims
                 .empty()) {  // NOTE: memory shaped like the selection, else HDF5 goes per element
          std::vector<hsize_t> start(d.dims.size(), 0), count = d.dims;
          start[0] = r;
          count[0] = rows;
          H5_CHECK(file_space.reset(H5Dget_space(d.dset.get())));
          H5_CHECK(H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start.data(), nullptr,
                                       count.data(), nullptr));
          H5_CHECK(mem_space.reset(
              H5Screate_simple(static_cast<int>(count.size()), count.data(), nullptr)));
        }
        const hid_t fs = d.dims.empty() ? H5S_ALL : file_space.get();
        const hid_t ms = d.dims.empty() ? H5S_ALL : mem_space.get();
        if (H5Dread(d.dset.get(), type, ms, fs, H5P_DEFAULT, buf.data()) < 0)
          bad_file(path_, info.path, h5_failure_cause());
      }
    }
  } catch (const UserError& e) {
    return e.what();
  }
  return "";
}
}  // namespace moe
