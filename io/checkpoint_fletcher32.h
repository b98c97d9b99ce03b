// Internal to io/checkpoint_*.cpp: HDF5's Fletcher32 checksum, vectorized, and the staging of
// one chunk exactly as HDF5's Fletcher32 filter stores it (data, then 4 checksum bytes), so
// that the writer can hand it to H5Dwrite_chunk and readers verify it through HDF5's filter.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moe::ckpt {

// HDF5's Fletcher32 filter value (H5_checksum_fletcher32), bit for bit, fed in pieces.
class Fletcher32 {
 public:
  static constexpr size_t kBlockBytes = 8192;  // the unit of the vectorized sums
  // Every call but the last must cover whole blocks, so that the sums continue exactly.
  void add(const unsigned char* p, size_t n_bytes);
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

// One chunk to gather: `rows` rows of `row_bytes` bytes, `src_pitch` bytes apart in the
// source, stored `chunk_row_bytes` apart; the rest of each chunk row and of the chunk is zero
// (as HDF5 fills the part of an edge chunk outside the dataset).
struct ChunkCopy {
  const unsigned char* src = nullptr;
  size_t src_pitch = 0;        // bytes between source rows
  size_t rows = 0;             // rows present, <= chunk_bytes / chunk_row_bytes
  size_t row_bytes = 0;        // bytes present per row, <= chunk_row_bytes
  size_t chunk_row_bytes = 0;  // bytes per chunk row
  size_t chunk_bytes = 0;      // the whole chunk (a multiple of chunk_row_bytes)
};

// Fills dst[0, c.chunk_bytes + 4): the chunk, then its Fletcher32 (little-endian). One pass
// over the source: each piece is checksummed right behind its copy, while still in cache.
// Touches nothing but c.src and dst, so it may run on any thread.
void checkpoint_chunk_stage(const ChunkCopy& c, unsigned char* dst);

}  // namespace moe::ckpt
