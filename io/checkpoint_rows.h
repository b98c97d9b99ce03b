// Internal to io/checkpoint_*.cpp: the layout of a dataset the writer makes, and how one write
// of its rows splits into chunks.
//
// A write covers rows [start, end) of a 1-D or 2-D dataset (a 1-D dataset is one column).
// Chunk rows it covers completely go through the pipeline (io/checkpoint_pipeline.h); the
// rows of a partly covered chunk (another rank owns the rest) go through H5Dwrite, which
// merges them into the stored chunk. The part of an edge chunk outside the dataset is zero,
// as HDF5 would fill it.
#pragma once

#include <hdf5.h>

#include <string>
#include <vector>

#include "io/checkpoint_fletcher32.h"
#include "io/checkpoint_pipeline.h"

namespace moe::ckpt {

// A dataset's type, extent and chunk shape (file_type -1 marks a group in the writer's list).
struct DatasetLayout {
  hid_t file_type = -1;  // H5T_IEEE_F32LE or H5T_STD_I64LE
  std::vector<hsize_t> dims;
  hsize_t chunk[2] = {1, 1};  // 1-D: {n, 1}
};

// The layout a new dataset of `shape` gets (chunk_dims); CHECKs the path and shape.
DatasetLayout plan_dataset(const std::string& path, const std::vector<int64_t>& shape,
                           hid_t file_type);

// One planned write: rows [start, end) of dataset `o`, `pitch` elements apart in memory.
struct RowWrite {
  const DatasetLayout* o = nullptr;  // outlives the RowWrite
  hsize_t start = 0, end = 0, pitch = 0;
  size_t elem = 0;
  const unsigned char* bytes = nullptr;
  hsize_t first_full = 0, end_full = 0, col_chunks = 0;  // chunk rows wholly inside

  hsize_t n_rows() const { return o->dims[0]; }
  hsize_t cols() const { return o->dims.size() == 2 ? o->dims[1] : 1; }
  size_t n_full() const { return (end_full - first_full) * col_chunks; }
  // Full chunk k (row-major over chunk rows, then column chunks) and its offset.
  ChunkCopy full_chunk(size_t k, hsize_t offset[2]) const;
};

// Plans rows [row0, row0 + rows) of `o` from `data` (rows `ld` apart); CHECKs the range.
RowWrite plan_rows(const std::string& path, const DatasetLayout& o, int64_t row0, int64_t rows,
                   const void* data, int64_t ld, size_t elem);

// Writes `w` into `dset` (errors name `temp` and `path`). Its first full chunk is staged in
// `pipe` already when `first_staged`; the last one is left pending there.
void write_planned_rows(hid_t dset, const std::string& temp, const std::string& path,
                        hid_t mem_type, const RowWrite& w, bool first_staged, ChunkPipeline& pipe);

}  // namespace moe::ckpt
