// The HDF5 helpers the checkpoint writer and reader share (see io/checkpoint_hdf5.h).
#include "io/checkpoint_hdf5.h"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "model/check.h"

namespace moe::ckpt {

hid_t H5Id::reset(hid_t id) {
  CHECK(id_ < 0, "H5Id::reset on a held id");
  id_ = id;
  return id;
}

void h5_silence() { H5_CHECK(H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr)); }

std::string errno_text() { return errno != 0 ? std::strerror(errno) : "HDF5 I/O failed"; }

namespace {

herr_t collect_desc(unsigned, const H5E_error2_t* e, void* out) {
  if (e->desc) *static_cast<std::string*>(out) += std::string(e->desc) + "\n";
  return 0;
}

}  // namespace

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

void write_failed(const std::string& file, const std::string& what, const std::string& object) {
  user_error("%s: %s: %s (%s)", file.c_str(), object.c_str(), what.c_str(), errno_text().c_str());
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

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

hid_t vl_string_type() {
  hid_t t;
  H5_CHECK(t = H5Tcopy(H5T_C_S1));
  H5_CHECK(H5Tset_size(t, H5T_VARIABLE));
  H5_CHECK(H5Tset_cset(t, H5T_CSET_UTF8));
  return t;
}

int link_exists(hid_t file, const std::string& path, std::string* cause) {
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

// Equal blocks waste little on the last, partial one, which is stored at full chunk size.
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

}  // namespace moe::ckpt
