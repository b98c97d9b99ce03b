// Internal to io/checkpoint_*.cpp: the HDF5 pieces the checkpoint writer and reader share
// (id ownership, error causes, file access properties, chunk shapes, row selections).
//
// Who is to blame for a failing call decides how it is reported:
//  - property lists, dataspaces, datatypes, closes of those: only a bug can fail -> H5_CHECK;
//  - writer calls that reach the disk (create, write, close, flush): the disk (full, gone)
//    -> UserError naming the temporary file, the dataset and errno (write_failed);
//  - every reader call that touches the file: the file (truncated, corrupted, not ours)
//    -> UserError naming the file and dataset, with the cause read off HDF5's error stack.
//
// Layout (HDF5 1.10 file format, so all metadata carries checksums): every dataset is chunked
// (the whole tensor when <= 4 MiB, else equal blocks of whole rows up to 4 MiB) with the
// Fletcher32 filter; float32 as IEEE F32LE, int64 as STD I64LE. A dimension of extent 0 is
// declared unlimited, since a fixed dimension cannot be smaller than its chunk. Strings are
// fixed-length attributes, kept in the checksummed object header.
#pragma once

#include <hdf5.h>

#include <bit>
#include <cstdint>
#include <string>
#include <vector>

namespace moe::ckpt {

static_assert(sizeof(hid_t) == sizeof(int64_t), "CheckpointWriter/Reader keep hid_t in int64_t");
// Chunks are written directly in memory byte order as F32LE / I64LE.
static_assert(std::endian::native == std::endian::little,
              "direct chunk writes assume little-endian");

constexpr hsize_t kChunkBytes = hsize_t(4) << 20;  // target chunk size

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
  hid_t reset(hid_t id);
  herr_t close() {
    const hid_t id = id_;
    id_ = -1;
    return id >= 0 && H5Idec_ref(id) < 0 ? -1 : 0;
  }
  hid_t get() const { return id_; }

 private:
  hid_t id_ = -1;
};

// Turns off HDF5's automatic error-stack printing (process-wide).
void h5_silence();
// strerror(errno), or a generic text when HDF5 failed without setting errno.
std::string errno_text();
// The cause of the HDF5 call that just failed, from the error stack (read before any other
// HDF5 call clears it): "checksum mismatch (data corrupted)", "file truncated", ...
std::string h5_failure_cause();
// The writer's disk-facing failures: "<file>: <object>: <what> (<errno text>)".
[[noreturn]] void write_failed(const std::string& file, const std::string& what,
                               const std::string& object);

std::string shape_str(const std::vector<int64_t>& shape);  // "[71, 229]"
std::vector<hsize_t> to_hsize(const std::vector<int64_t>& shape);
std::string dtype_name(hid_t type);  // "float32", "int64", "string", ...
bool is_float32(hid_t type);
hid_t vl_string_type();  // a new variable-length UTF-8 string type (caller closes)

// 1 if `path` names an object (every intermediate component a group), 0 if not, -1 if HDF5
// failed (for the reader: a corrupted file; then *cause says why).
int link_exists(hid_t file, const std::string& path, std::string* cause = nullptr);

// A new file access property list (caller closes): 1.10 format, strong close degree.
hid_t make_file_access();

// Chunk: the whole tensor up to kChunkBytes, else equal blocks of whole rows up to kChunkBytes
// (a row longer than that is split too). Every chunk dimension >= 1.
std::vector<hsize_t> chunk_dims(const std::vector<hsize_t>& dims, hsize_t elem);

// File and memory selections for rows [row0, row0 + rows) of a 1-D or 2-D dataset, the
// memory rows `ld` apart. Whole dataset with contiguous memory: H5S_ALL for both (no copies
// beyond HDF5's own).
struct Selection {
  H5Id file_space, mem_space;
  hid_t file() const { return file_space.get() >= 0 ? file_space.get() : H5S_ALL; }
  hid_t mem() const { return mem_space.get() >= 0 ? mem_space.get() : H5S_ALL; }
};
void select_rows(Selection& sel, hid_t dset, const std::vector<hsize_t>& dims, hsize_t row0,
                 hsize_t rows, hsize_t ld);

}  // namespace moe::ckpt
