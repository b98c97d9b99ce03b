// CheckpointWriter on the HDF5 C API (serial, 1.10 or newer); layout and error policy in
// io/checkpoint_hdf5.h.
//
// Speed: a chunk a write covers completely is gathered into a staging buffer with its
// Fletcher32 computed here (vectorized) and written with H5Dwrite_chunk, exactly as the filter
// would store it; HDF5's own path costs two more copies and a 3x slower checksum. The staging
// runs one chunk ahead on a worker thread (io/checkpoint_pipeline.h), so a write returns with
// its last chunk still pending: the next call or commit() writes it. Reads go through
// H5Dread, so HDF5's filter verifies every chunk, ours included.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <utility>

#include "io/checkpoint_file.h"
#include "io/checkpoint_hdf5.h"
#include "io/checkpoint_pipeline.h"
#include "model/check.h"

namespace moe {

using namespace ckpt;

namespace {

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

// Rows [row0, row0 + rows) of a 1-D or 2-D dataset from `data` (rows `ld` apart; a 1-D
// dataset is one column). Chunks the rows cover completely go through the pipeline; the rows
// of a partly covered chunk (another rank owns the rest) go through H5Dwrite, which merges
// them into the stored chunk. The part of an edge chunk outside the dataset is zero, as HDF5
// would fill it.
void write_rows(hid_t dset, const std::string& temp, const std::string& path, hid_t mem_type,
                int64_t row0, int64_t rows, const void* data, int64_t ld, ChunkPipeline& pipe) {
  H5Id space, dcpl;
  H5_CHECK(space.reset(H5Dget_space(dset)));
  const int rank = H5Sget_simple_extent_ndims(space.get());
  CHECK(rank == 1 || rank == 2, "%s: rank %d", path.c_str(), rank);
  std::vector<hsize_t> dims(static_cast<size_t>(rank));
  H5_CHECK(H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr));
  const hsize_t n_rows = dims[0], cols = rank == 2 ? dims[1] : 1;
  const hsize_t pitch = rank == 2 ? static_cast<hsize_t>(ld) : 1, start = static_cast<hsize_t>(row0);
  const size_t elem = H5Tget_size(mem_type);
  const auto* bytes = static_cast<const unsigned char*>(data);
  CHECK(row0 >= 0 && rows >= 0 && start + static_cast<hsize_t>(rows) <= n_rows,
        "%s: rows [%lld, %lld) of %llu", path.c_str(), static_cast<long long>(row0),
        static_cast<long long>(row0 + rows), static_cast<unsigned long long>(n_rows));
  CHECK(pitch >= cols, "%s: ld %lld < cols %llu", path.c_str(), static_cast<long long>(ld),
        static_cast<unsigned long long>(cols));
  if (rows == 0 || cols == 0) return;
  hsize_t chunk[2] = {1, 1};  // 1-D: {n, 1}
  H5_CHECK(dcpl.reset(H5Dget_create_plist(dset)));
  H5_CHECK(H5Pget_chunk(dcpl.get(), rank, chunk));

  const hsize_t end = start + static_cast<hsize_t>(rows), c = chunk[0];
  const hsize_t first_full = (start + c - 1) / c;  // chunk rows wholly inside
  const hsize_t end_full = end == n_rows ? (n_rows + c - 1) / c : end / c;
  auto write_slab = [&](hsize_t r0, hsize_t n) {  // through HDF5 (read-modify-write)
    if (n == 0) return;
    Selection sel;
    select_rows(sel, dset, dims, r0, n, pitch);
    errno = 0;
    if (H5Dwrite(dset, mem_type, sel.mem(), sel.file(), H5P_DEFAULT,
                 bytes + (r0 - start) * pitch * elem) < 0)
      write_failed(temp, "cannot write", path);
  };
  if (first_full >= end_full) return write_slab(start, end - start);
  write_slab(start, first_full * c - start);
  for (hsize_t b = first_full; b < end_full; ++b) {
    const hsize_t r0 = b * c;
    for (hsize_t c0 = 0; c0 < cols; c0 += chunk[1]) {
      ChunkCopy copy;
      copy.src = bytes + ((r0 - start) * pitch + c0) * elem;
      copy.src_pitch = pitch * elem;
      copy.rows = std::min(c, n_rows - r0);
      copy.row_bytes = std::min(chunk[1], cols - c0) * elem;
      copy.chunk_row_bytes = chunk[1] * elem;
      copy.chunk_bytes = c * copy.chunk_row_bytes;
      pipe.push(dset, path, r0, c0, copy);
    }
  }
  const hsize_t full_end = std::min(end_full * c, n_rows);
  write_slab(full_end, end - full_end);
}

}  // namespace

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
    pipeline_ = std::make_unique<ChunkPipeline>(temp_path_);
    attr_i64("/meta", "format_version", kCheckpointFormatVersion);
  } catch (...) {
    (void)H5Fclose(file_);
    ::unlink(temp_path_.c_str());
    throw;
  }
}

CheckpointWriter::~CheckpointWriter() {
  pipeline_.reset();  // joins the worker and drops a pending chunk before the file closes
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
  write_rows(dset.get(), temp_path_, path, H5T_NATIVE_FLOAT, 0, shape[0], data, ld, *pipeline_);
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
  write_rows(dset.get(), temp_path_, path, H5T_NATIVE_FLOAT, row0, rows, data, ld, *pipeline_);
  errno = 0;
  if (dset.close() < 0) write_failed(temp_path_, "cannot write", path);
}

void CheckpointWriter::write_i64(const std::string& path, const std::vector<int64_t>& values) {
  const int64_t n = static_cast<int64_t>(values.size());
  H5Id dset;
  dset.reset(create_dataset(file_, temp_path_, path, {n}, H5T_STD_I64LE));
  write_rows(dset.get(), temp_path_, path, H5T_NATIVE_INT64, 0, n, values.data(), 1, *pipeline_);
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
  pipeline_->flush();
  errno = 0;
  const herr_t flushed = H5Fflush(file_, H5F_SCOPE_GLOBAL);
  const herr_t closed = H5Fclose(std::exchange(file_, -1));
  if (flushed < 0 || closed < 0)
    user_error("%s: cannot write %s (%s)", final_path_.c_str(), temp_path_.c_str(),
               errno_text().c_str());
  durable_rename(temp_path_, final_path_);
  committed_ = true;
}

}  // namespace moe
