// The safetensors format (Hugging Face), written and validated by our own code.
//
// File layout:
//   u64 N (little-endian) | N bytes of JSON header | data section
//   header = {"__metadata__": {"k": "v", ...},
//             "<name>": {"dtype": "BF16", "shape": [r, c], "data_offsets": [begin, end]}, ...}
// Offsets are byte offsets into the data section; the tensors tile it exactly: sorted by
// begin they start at 0, each begins where the previous one ends, and the last ends at the
// end of the file. Data is row-major, little-endian. Our writer pads the header with spaces
// to a multiple of 8 bytes, so the data section starts 8-byte aligned.
//
// The reader validates strictly (header length bounds, JSON shape, known dtypes, offsets
// contiguous / in bounds / non-overlapping, sizes = dtype size x shape) and reports the
// first defect as a UserError with one line naming the file. It is meant to be fuzzed:
// safetensors_parse_header takes raw bytes and has no undefined behaviour on any input.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace moe {

// Every dtype of the safetensors specification that we recognise.
enum class StDtype { kBool, kU8, kI8, kF8E4M3, kF8E5M2, kI16, kU16, kF16, kBF16, kI32, kU32,
                     kF32, kI64, kU64, kF64 };
const char* to_string(StDtype t);  // "BF16", "F32", ...
size_t st_dtype_size(StDtype t);   // bytes per element

constexpr uint64_t kSafetensorsMaxHeader = uint64_t(100) << 20;  // as the reference reader

// One tensor in a file; begin/end are offsets into the data section.
struct SafetensorsTensor {
  std::string name;
  StDtype dtype = StDtype::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;
  uint64_t numel() const;
};

struct SafetensorsHeader {
  std::vector<SafetensorsTensor> tensors;  // in data order (by begin offset)
  std::vector<std::pair<std::string, std::string>> metadata;  // "__metadata__", in file order
  uint64_t header_len = 0;  // N
  uint64_t data_start = 0;  // 8 + N: file offset of the data section
  uint64_t data_size = 0;   // bytes in the data section

  const SafetensorsTensor* find(std::string_view name) const;  // nullptr when absent
};

// Validates a file's leading bytes. `head` holds the file's first bytes: at least 8 + N of
// them, or all of the file when it is shorter; `file_size` is the whole file's size.
// UserError "<where>: <defect>" on the first problem found.
SafetensorsHeader safetensors_parse_header(std::string_view head, uint64_t file_size,
                                           const std::string& where);

// Opens `path`, reads and validates its header (UserError "<path>: ..." on any problem).
SafetensorsHeader safetensors_read_header(const std::string& path);

// The raw bytes of one tensor of a file read with safetensors_read_header.
std::string safetensors_read_bytes(const std::string& path, const SafetensorsHeader& h,
                                   const SafetensorsTensor& t);

// What the writer is told up front: the tensors in file order.
struct SafetensorsSpec {
  std::string name;
  StDtype dtype = StDtype::kF32;
  std::vector<int64_t> shape;
  uint64_t bytes() const;  // dtype size x shape
};

// The 8-byte length and the space-padded JSON header for `tensors` laid out in order,
// with __metadata__ {"format": "pt"} plus `metadata`.
std::string safetensors_header_bytes(
    const std::vector<SafetensorsSpec>& tensors,
    const std::vector<std::pair<std::string, std::string>>& metadata = {});

// Streams one safetensors file: the constructor creates (truncates) `path` and writes the
// header; append() takes the tensors' bytes in file order, in pieces of any size; finish()
// checks that exactly the announced bytes arrived, fsyncs and closes. Every failure (disk
// full included) is a UserError naming the file. Destroying an unfinished writer closes the
// file and leaves it for the caller to remove (it writes under a temporary name).
class SafetensorsWriter {
 public:
  SafetensorsWriter(const std::string& path, const std::vector<SafetensorsSpec>& tensors,
                    const std::vector<std::pair<std::string, std::string>>& metadata = {});
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  void append(const void* data, size_t bytes);
  void finish();
  uint64_t data_bytes() const { return expected_; }

 private:
  void write_all(const void* data, size_t bytes);
  std::string path_;
  int fd_ = -1;
  uint64_t expected_ = 0, written_ = 0;
};

}  // namespace moe
