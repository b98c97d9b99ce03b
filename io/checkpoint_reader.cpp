// CheckpointReader on the HDF5 C API (serial, 1.10 or newer); layout and error policy in
// io/checkpoint_hdf5.h. Every read goes through H5Dread, so HDF5's Fletcher32 filter verifies
// every chunk, the ones the writer stored directly included. Any failure is the file's fault:
// a UserError naming the file and the object, with the cause read off HDF5's error stack.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <utility>

#include "io/checkpoint_file.h"
#include "io/checkpoint_hdf5.h"
#include "model/check.h"

namespace moe {

using namespace ckpt;

namespace {

constexpr hsize_t kVerifyBytes = hsize_t(64) << 20;  // verify_all reads at most this at once

// HDF5's signature at offset 0 tells "HDF5, but damaged" from "not HDF5 at all".
// Where the HDF5 signature is (HDF5 looks at offset 0, then 512, 1024, 2048, ...: after a
// user block) and the superblock version byte after it; at = -1 when there is none.
struct Hdf5Start {
  int64_t at = -1;
  int version = -1;
};
Hdf5Start hdf5_start(const std::string& path, int64_t size) {
  static const char kSignature[8] = {'\x89', 'H', 'D', 'F', '\r', '\n', '\x1a', '\n'};
  Hdf5Start h;
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return h;
  for (int64_t at = 0; at + 9 <= size; at = at == 0 ? 512 : 2 * at) {
    char buf[9] = {};
    if (std::fseek(f, static_cast<long>(at), SEEK_SET) != 0 || std::fread(buf, 1, 9, f) != 9) break;
    if (std::memcmp(buf, kSignature, sizeof(kSignature)) == 0) {
      h.at = at;
      h.version = static_cast<unsigned char>(buf[8]);
      break;
    }
  }
  std::fclose(f);
  return h;
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
  // moetrain writes superblock version 3 at offset 0 (the 1.10 format), whose metadata all
  // carry checksums that HDF5 verifies before decoding them. The older formats carry none,
  // and HDF5 1.10 decodes them without enough bounds checks (a damaged file overflowed its
  // heap under fuzzing: docs/FUZZING.md), so they are refused before HDF5 sees them.
  const Hdf5Start start = hdf5_start(path, static_cast<int64_t>(st.st_size));
  if (start.at > 0)
    user_error("%s: not a moetrain checkpoint (HDF5 after a %lld-byte user block; moetrain "
               "writes none)", path.c_str(), static_cast<long long>(start.at));
  if (start.at == 0 && start.version < 2)
    user_error("%s: not a moetrain checkpoint (HDF5 superblock version %d; moetrain writes "
               "version 3, whose metadata carry checksums)", path.c_str(), start.version);
  H5Id fapl;
  fapl.reset(make_file_access());
  file_ = H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl.get());
  if (file_ < 0) {
    const std::string cause = h5_failure_cause();
    if (start.at == 0) user_error("%s: cannot open as HDF5: %s", path.c_str(), cause.c_str());
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
bool CheckpointReader::has_attr(const std::string& group, const std::string& name) const {
  std::string cause;
  const int ex = link_exists(file_, group, &cause);
  if (ex < 0) bad_file(path_, group, cause);
  if (ex == 0) return false;
  const htri_t has = H5Aexists_by_name(file_, group.c_str(), name.c_str(), H5P_DEFAULT);
  if (has < 0) bad_file(path_, group + " (attribute " + name + ")", h5_failure_cause());
  return has > 0;
}

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
