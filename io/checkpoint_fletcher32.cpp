// Fletcher32 and chunk staging (see io/checkpoint_fletcher32.h).
//
// H5_checksum_fletcher32 reads big-endian 16-bit words and keeps both sums mod 65535 by
// end-around carry, which leaves 0 for an all-zero buffer and otherwise the residue in
// [1, 0xffff] (0xffff for a non-zero multiple of 65535). Here the sums run in 16 independent
// 32-bit lanes per 8 KiB block, as explicit vectors (GCC 12 does not vectorize the scalar
// loop): per 32 bytes one load, a byte swap, two masks and four adds. An AVX2 clone is picked
// at load time where the CPU has it (~20 GB/s from cache; HDF5's loop ~1.5 GB/s), SSE2
// otherwise. The sums fold mod 65535 per block.
// The tests read every directly written chunk back through HDF5's own filter.
#include "io/checkpoint_fletcher32.h"

#include <algorithm>
#include <cstring>

namespace moe::ckpt {

namespace {

constexpr size_t kGroups = 256;  // 16-word groups per block: lane sums stay below 2^32
static_assert(Fletcher32::kBlockBytes == 32 * kGroups);

typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef uint32_t U32x8 __attribute__((vector_size(32)));

// Word j of a block (j = 16 k + i, group k) is lane i / 2 of the even (i even) or odd sums.
// a1 sums a lane's words; a2 sums a1 after every group, so word j counts (kGroups - k) times.
__attribute__((target_clones("avx2", "default"))) void fletcher32_blocks(const unsigned char* p,
                                                                         size_t n_blocks,
                                                                         uint64_t& s1, uint64_t& s2,
                                                                         bool& nonzero) {
  for (size_t b = 0; b < n_blocks; ++b, p += Fletcher32::kBlockBytes) {
    U32x8 a1_even = {}, a1_odd = {}, a2_even = {}, a2_odd = {};
    const unsigned char* q = p;
    for (size_t k = 0; k < kGroups; ++k, q += 32) {
      U16x16 w;
      std::memcpy(&w, q, 32);
      w = (w << 8) | (w >> 8);  // big-endian words
      const U32x8 pair = reinterpret_cast<U32x8>(w);
      a1_even += pair & 0xffff;
      a1_odd += pair >> 16;
      a2_even += a1_even;
      a2_odd += a1_odd;
    }
    // Block word j = 16 k + i adds to sum2 with weight 16 (kGroups - k) - i.
    uint64_t sum = 0, weighted = 0;
    for (size_t e = 0; e < 8; ++e) {
      sum += uint64_t{a1_even[e]} + a1_odd[e];
      weighted += 16 * (uint64_t{a2_even[e]} + a2_odd[e]) - 2 * e * uint64_t{a1_even[e]} -
                  (2 * e + 1) * uint64_t{a1_odd[e]};
    }
    s2 = (s2 + 16 * kGroups * s1 + weighted) % 65535;
    s1 = (s1 + sum) % 65535;
    nonzero |= sum != 0;
  }
}

}  // namespace

void Fletcher32::add(const unsigned char* p, size_t n_bytes) {
  const size_t n_blocks = n_bytes / kBlockBytes;
  fletcher32_blocks(p, n_blocks, s1_, s2_, nonzero_);
  size_t i = n_blocks * kBlockBytes;
  for (; i + 2 <= n_bytes; i += 2) add_word((uint64_t{p[i]} << 8) | p[i + 1]);
  if (i < n_bytes) add_word(uint64_t{p[i]} << 8);  // a last odd byte is a word's high half
}

void checkpoint_chunk_stage(const ChunkCopy& c, unsigned char* dst) {
  constexpr size_t kPiece = 16 * Fletcher32::kBlockBytes;  // 128 KiB: stays in L2
  Fletcher32 sum;
  size_t summed = 0;
  auto sum_whole_pieces = [&](size_t filled) {
    const size_t n = (filled - summed) / kPiece * kPiece;
    sum.add(dst + summed, n);
    summed += n;
  };
  const size_t data_bytes = c.rows * c.chunk_row_bytes;
  if (c.row_bytes == c.src_pitch && c.row_bytes == c.chunk_row_bytes) {  // one contiguous run
    for (size_t off = 0; off < data_bytes; off += kPiece) {
      const size_t n = std::min(kPiece, data_bytes - off);
      std::memcpy(dst + off, c.src + off, n);
      sum_whole_pieces(off + n);
    }
  } else {
    const size_t pad = c.chunk_row_bytes - c.row_bytes;
    for (size_t r = 0; r < c.rows; ++r) {
      unsigned char* row = dst + r * c.chunk_row_bytes;
      std::memcpy(row, c.src + r * c.src_pitch, c.row_bytes);
      std::memset(row + c.row_bytes, 0, pad);
      sum_whole_pieces((r + 1) * c.chunk_row_bytes);
    }
  }
  std::memset(dst + data_bytes, 0, c.chunk_bytes - data_bytes);
  sum.add(dst + summed, c.chunk_bytes - summed);
  const uint32_t value = sum.value();
  for (int b = 0; b < 4; ++b)
    dst[c.chunk_bytes + b] = static_cast<unsigned char>(value >> (8 * b));  // LE
}

}  // namespace moe::ckpt
