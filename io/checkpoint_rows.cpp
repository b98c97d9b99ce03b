// Planning and running one write of rows (see io/checkpoint_rows.h).
#include "io/checkpoint_rows.h"

#include <algorithm>
#include <cerrno>

#include "io/checkpoint_hdf5.h"
#include "model/check.h"

namespace moe::ckpt {

DatasetLayout plan_dataset(const std::string& path, const std::vector<int64_t>& shape,
                           hid_t file_type) {
  CHECK(!path.empty() && path[0] == '/', "dataset path '%s' must be absolute", path.c_str());
  for (int64_t n : shape) CHECK(n >= 0, "%s: shape %s", path.c_str(), shape_str(shape).c_str());
  DatasetLayout o;
  o.file_type = file_type;
  o.dims = to_hsize(shape);
  const std::vector<hsize_t> chunk = chunk_dims(o.dims, H5Tget_size(file_type));
  std::copy(chunk.begin(), chunk.end(), o.chunk);
  return o;
}

ChunkCopy RowWrite::full_chunk(size_t k, hsize_t offset[2]) const {
  const hsize_t c = o->chunk[0], r0 = (first_full + k / col_chunks) * c;
  const hsize_t c0 = (k % col_chunks) * o->chunk[1];
  ChunkCopy copy;
  copy.src = bytes + ((r0 - start) * pitch + c0) * elem;
  copy.src_pitch = pitch * elem;
  copy.rows = std::min(c, n_rows() - r0);
  copy.row_bytes = std::min(o->chunk[1], cols() - c0) * elem;
  copy.chunk_row_bytes = o->chunk[1] * elem;
  copy.chunk_bytes = c * copy.chunk_row_bytes;
  offset[0] = r0;
  offset[1] = c0;
  return copy;
}

RowWrite plan_rows(const std::string& path, const DatasetLayout& o, int64_t row0, int64_t rows,
                   const void* data, int64_t ld, size_t elem) {
  RowWrite w;
  w.o = &o;
  w.start = static_cast<hsize_t>(row0);
  w.end = w.start + static_cast<hsize_t>(rows);
  w.pitch = o.dims.size() == 2 ? static_cast<hsize_t>(ld) : 1;
  w.elem = elem;
  w.bytes = static_cast<const unsigned char*>(data);
  CHECK(row0 >= 0 && rows >= 0 && w.end <= w.n_rows(), "%s: rows [%lld, %lld) of %llu",
        path.c_str(), static_cast<long long>(row0), static_cast<long long>(row0 + rows),
        static_cast<unsigned long long>(w.n_rows()));
  CHECK(w.pitch >= w.cols(), "%s: ld %lld < cols %llu", path.c_str(), static_cast<long long>(ld),
        static_cast<unsigned long long>(w.cols()));
  if (rows == 0 || w.cols() == 0) return w;  // nothing to write
  const hsize_t c = o.chunk[0];
  w.first_full = (w.start + c - 1) / c;
  w.end_full = std::max(w.first_full, w.end == w.n_rows() ? (w.n_rows() + c - 1) / c : w.end / c);
  w.col_chunks = (w.cols() + o.chunk[1] - 1) / o.chunk[1];
  return w;
}

void write_planned_rows(hid_t dset, const std::string& temp, const std::string& path,
                        hid_t mem_type, const RowWrite& w, bool first_staged, ChunkPipeline& pipe) {
  if (w.end == w.start || w.cols() == 0) return;
  auto write_slab = [&](hsize_t r0, hsize_t n) {  // through HDF5 (read-modify-write)
    if (n == 0) return;
    Selection sel;
    select_rows(sel, dset, w.o->dims, r0, n, w.pitch);
    errno = 0;
    if (H5Dwrite(dset, mem_type, sel.mem(), sel.file(), H5P_DEFAULT,
                 w.bytes + (r0 - w.start) * w.pitch * w.elem) < 0)
      write_failed(temp, "cannot write", path);
  };
  const size_t n = w.n_full();
  if (n == 0) return write_slab(w.start, w.end - w.start);
  const hsize_t c = w.o->chunk[0], full_end = std::min(w.end_full * c, w.n_rows());
  try {
    write_slab(w.start, w.first_full * c - w.start);
    hsize_t offset[2];
    if (!first_staged) pipe.stage(w.full_chunk(0, offset));
    for (size_t k = 0; k < n; ++k) {
      w.full_chunk(k, offset);
      pipe.push(dset, path, offset[0], offset[1]);
      if (k + 1 < n) pipe.stage(w.full_chunk(k + 1, offset));
    }
  } catch (...) {
    pipe.settle();
    throw;
  }
  write_slab(full_end, w.end - full_end);
}

}  // namespace moe::ckpt
