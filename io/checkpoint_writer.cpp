// CheckpointWriter on the HDF5 C API (serial, 1.10 or newer); layout and error policy in
// io/checkpoint_hdf5.h.
//
// Speed: a chunk a write covers completely is gathered into a staging buffer with its
// Fletcher32 computed here (vectorized) and written with H5Dwrite_chunk, exactly as the filter
// would store it; HDF5's own path costs two more copies and a slower checksum. The staging
// runs one chunk ahead on a worker thread (io/checkpoint_pipeline.h): the first chunk of a
// dataset is staged while the dataset is created, and a write returns with its last chunk
// still pending, written by the next call or commit(). The writer made every object in its
// file, so it keeps their paths and shapes instead of asking HDF5. Reads go through H5Dread,
// so HDF5's filter verifies every chunk, ours included.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <unordered_map>
#include <utility>

#include "io/checkpoint_file.h"
#include "io/checkpoint_hdf5.h"
#include "io/checkpoint_pipeline.h"
#include "io/checkpoint_rows.h"
#include "model/check.h"

namespace moe {

namespace ckpt {

struct WriterState {
  explicit WriterState(const std::string& temp_path) : pipeline(temp_path) {
    objects["/"] = DatasetLayout{};
  }
  ChunkPipeline pipeline;
  // Every object made so far, by absolute path; a group has file_type -1.
  std::unordered_map<std::string, DatasetLayout> objects;
};

}  // namespace ckpt

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
// get the default creation properties. A component that is a dataset is left to fail later.
void make_groups(hid_t file, const std::string& temp, const std::string& path, bool include_last,
                 WriterState& st) {
  size_t stop = path.size();
  if (!include_last) stop = path.rfind('/') == std::string::npos ? 0 : path.rfind('/');
  H5Id gcpl;
  std::string prefix;
  for (size_t pos = 0; pos < stop;) {
    size_t end = std::min(path.find('/', pos), stop);
    if (end > pos) {
      prefix += "/" + path.substr(pos, end - pos);
      if (st.objects.count(prefix) == 0) {
        if (gcpl.get() < 0) {
          H5_CHECK(gcpl.reset(H5Pcreate(H5P_GROUP_CREATE)));
          keep_attrs_compact(gcpl.get());
        }
        H5Id group;
        errno = 0;
        if (group.reset(H5Gcreate2(file, prefix.c_str(), H5P_DEFAULT, gcpl.get(), H5P_DEFAULT)) < 0)
          write_failed(temp, "cannot create group", prefix);
        st.objects[prefix] = DatasetLayout{};
      }
    }
    pos = end + 1;
  }
}

void write_attr(hid_t file, const std::string& temp, const std::string& group,
                const std::string& name, hid_t type, const void* value, WriterState& st) {
  CHECK(file >= 0, "%s: attribute after commit", temp.c_str());
  H5Id obj, space, attr;
  make_groups(file, temp, group, true, st);
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

// Creates the chunked, Fletcher32-checked dataset `o` (parent groups as needed).
hid_t create_dataset(hid_t file, const std::string& temp, const std::string& path,
                     const DatasetLayout& o, WriterState& st) {
  CHECK(file >= 0, "%s: write after commit", path.c_str());
  CHECK(st.objects.count(path) == 0, "%s: dataset written twice (or path taken)", path.c_str());
  std::vector<hsize_t> max_dims = o.dims;
  for (hsize_t& d : max_dims)
    if (d == 0) d = H5S_UNLIMITED;  // a fixed dim may not be below its chunk
  const int rank = static_cast<int>(o.dims.size());
  H5Id space, dcpl;
  H5_CHECK(space.reset(H5Screate_simple(rank, o.dims.data(), max_dims.data())));
  H5_CHECK(dcpl.reset(H5Pcreate(H5P_DATASET_CREATE)));
  H5_CHECK(H5Pset_chunk(dcpl.get(), rank, o.chunk));
  H5_CHECK(H5Pset_fletcher32(dcpl.get()));
  keep_attrs_compact(dcpl.get());
  make_groups(file, temp, path, false, st);
  errno = 0;
  const hid_t dset = H5Dcreate2(file, path.c_str(), o.file_type, space.get(), H5P_DEFAULT,
                                dcpl.get(), H5P_DEFAULT);
  if (dset < 0) write_failed(temp, "cannot create dataset", path);
  st.objects[path] = o;
  return dset;
}

// Closes a file abandoned after a failed write (it is deleted next). The close still writes
// HDF5's metadata and extends the file to its allocated size; when that fails too, HDF5 1.10
// keeps the half-closed file in its tables and crashes on it at exit (H5F__close_cb), i.e.
// a failed save would end the process with SIGSEGV. So the close is given the room it
// needs: the contents, garbage now, are dropped first (a full disk or quota gets its blocks
// back), and a soft RLIMIT_FSIZE that the file crossed (EFBIG) is lifted to the hard limit
// for the duration of the close only.
void close_abandoned(hid_t file) {
  void* handle = nullptr;
  if (H5Fget_vfd_handle(file, H5P_DEFAULT, &handle) >= 0 && handle)
    (void)!::ftruncate(*static_cast<int*>(handle), 0);  // the sec2 driver's descriptor
  rlimit limit{};
  const bool lift = ::getrlimit(RLIMIT_FSIZE, &limit) == 0 && limit.rlim_cur != limit.rlim_max;
  if (lift) {
    rlimit up = limit;
    up.rlim_cur = limit.rlim_max;
    (void)::setrlimit(RLIMIT_FSIZE, &up);
  }
  (void)H5Fclose(file);  // abandoned: a failing close changes nothing more
  if (lift) (void)::setrlimit(RLIMIT_FSIZE, &limit);
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
    state_ = std::make_unique<WriterState>(temp_path_);
    attr_i64("/meta", "format_version", kCheckpointFormatVersion);
  } catch (...) {
    close_abandoned(file_);
    ::unlink(temp_path_.c_str());
    throw;
  }
}

CheckpointWriter::~CheckpointWriter() {
  state_.reset();  // joins the pipeline's threads, drops a pending chunk before the file closes
  if (file_ >= 0) close_abandoned(file_);
  if (!committed_) ::unlink(temp_path_.c_str());
}

void CheckpointWriter::create_f32(const std::string& path, const std::vector<int64_t>& shape) {
  CHECK(shape.size() == 1 || shape.size() == 2, "%s: shape %s (1-D or 2-D only)", path.c_str(),
        shape_str(shape).c_str());
  H5Id dset;
  dset.reset(
      create_dataset(file_, temp_path_, path, plan_dataset(path, shape, H5T_IEEE_F32LE), *state_));
  errno = 0;
  if (dset.close() < 0) write_failed(temp_path_, "cannot create dataset", path);
}

// A new dataset written whole: its first chunk is staged while the dataset is created.
static void write_new(hid_t file, const std::string& temp, const std::string& path,
                      const std::vector<int64_t>& shape, hid_t file_type, hid_t mem_type,
                      const void* data, int64_t ld, WriterState& st) {
  CHECK(file >= 0, "%s: write after commit", path.c_str());
  const DatasetLayout o = plan_dataset(path, shape, file_type);
  const RowWrite w = plan_rows(path, o, 0, shape[0], data, ld, H5Tget_size(mem_type));
  hsize_t offset[2];
  const bool staged = w.n_full() > 0;
  if (staged) st.pipeline.stage(w.full_chunk(0, offset));
  H5Id dset;
  try {
    dset.reset(create_dataset(file, temp, path, o, st));
  } catch (...) {
    st.pipeline.settle();
    throw;
  }
  write_planned_rows(dset.get(), temp, path, mem_type, w, staged, st.pipeline);
  errno = 0;
  if (dset.close() < 0) write_failed(temp, "cannot write", path);
}

void CheckpointWriter::write_f32(const std::string& path, const std::vector<int64_t>& shape,
                                 const float* data, int64_t ld) {
  CHECK(shape.size() == 1 || shape.size() == 2, "%s: shape %s (1-D or 2-D only)", path.c_str(),
        shape_str(shape).c_str());
  write_new(file_, temp_path_, path, shape, H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, data, ld, *state_);
}

void CheckpointWriter::write_f32_rows(const std::string& path, int64_t row0, int64_t rows,
                                      const float* data, int64_t ld) {
  CHECK(file_ >= 0, "%s: write after commit", path.c_str());
  const auto it = state_->objects.find(path);
  CHECK(it != state_->objects.end() && it->second.file_type >= 0,
        "%s: write_f32_rows before create_f32", path.c_str());
  CHECK(it->second.file_type == H5T_IEEE_F32LE, "%s: not a float32 dataset", path.c_str());
  const RowWrite w = plan_rows(path, it->second, row0, rows, data, ld, sizeof(float));
  H5Id dset;
  errno = 0;
  if (dset.reset(H5Dopen2(file_, path.c_str(), H5P_DEFAULT)) < 0)
    write_failed(temp_path_, "cannot open dataset", path);
  write_planned_rows(dset.get(), temp_path_, path, H5T_NATIVE_FLOAT, w, false, state_->pipeline);
  errno = 0;
  if (dset.close() < 0) write_failed(temp_path_, "cannot write", path);
}

void CheckpointWriter::write_i64(const std::string& path, const std::vector<int64_t>& values) {
  const int64_t n = static_cast<int64_t>(values.size());
  write_new(file_, temp_path_, path, {n}, H5T_STD_I64LE, H5T_NATIVE_INT64, values.data(), 1,
            *state_);
}

void CheckpointWriter::attr_i64(const std::string& group, const std::string& name, int64_t value) {
  write_attr(file_, temp_path_, group, name, H5T_NATIVE_INT64, &value, *state_);
}

void CheckpointWriter::attr_f64(const std::string& group, const std::string& name, double value) {
  write_attr(file_, temp_path_, group, name, H5T_NATIVE_DOUBLE, &value, *state_);
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
  write_attr(file_, temp_path_, group, name, type.get(), padded.data(), *state_);
}

void CheckpointWriter::commit() {
  CHECK(file_ >= 0 && !committed_, "%s: commit twice", final_path_.c_str());
  state_->pipeline.flush();
  errno = 0;
  if (H5Fflush(file_, H5F_SCOPE_GLOBAL) < 0) {
    const std::string cause = errno_text();
    close_abandoned(std::exchange(file_, -1));
    user_error("%s: cannot write %s (%s)", final_path_.c_str(), temp_path_.c_str(), cause.c_str());
  }
  if (H5Fclose(std::exchange(file_, -1)) < 0)
    user_error("%s: cannot write %s (%s)", final_path_.c_str(), temp_path_.c_str(),
               errno_text().c_str());
  durable_rename(temp_path_, final_path_);
  committed_ = true;
}

}  // namespace moe
