// One checkpoint = one HDF5 file (readable by h5dump and any HDF5 binding).
//
// This layer knows HDF5, atomicity and checksums, not the model: callers name datasets by
// path and hand over float32 row-major tensors. Every dataset is chunked with the Fletcher32
// filter, so any flipped byte is detected when it is read.
//
// Crash safety: the writer creates "<final>.tmp.<pid>", and commit() flushes and closes it,
// fsyncs it, renames it to <final> and fsyncs the folder. A writer destroyed without commit()
// (an exception, a signal that unwinds) removes its temporary file. So a file under a final
// name is always complete; a SIGKILL mid-save leaves at most a stray *.tmp.* file, which the
// checkpoint folder logic ignores and cleans up.
//
// All errors are UserError with one line naming the file (and dataset). A failing HDF5 call
// that can only be a bug in moetrain goes through H5_CHECK instead.
//
// Speed: the writer copies and checksums the next chunk on a thread of its own while HDF5
// writes the last one, and has the kernel start writing the file out as it grows, so commit()'s
// fsync finds little left (io/checkpoint_pipeline.h). A write returns once its source has been
// read, but its last chunk may reach the file only at the next call: a disk failure can thus
// surface one call later (or in commit()), still naming its dataset.
//
// NOTE: the writer and reader turn off HDF5's automatic error-stack printing
// (H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr)), which is process-wide in HDF5, so that a bad
// file prints only our one line. Serial HDF5 is not thread-safe: use these classes from one
// thread at a time (the writer's own threads never call HDF5).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moe {

namespace ckpt {
struct WriterState;
}

constexpr int kCheckpointFormatVersion = 1;

class CheckpointWriter {
 public:
  // Creates missing parent folders and the temporary file, and stamps /meta format_version =
  // kCheckpointFormatVersion (callers may write it again; attributes are overwritten).
  explicit CheckpointWriter(const std::string& final_path);
  ~CheckpointWriter();  // removes the temporary file unless committed
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;

  // Creates a float32 dataset (intermediate groups included) with `shape` (1-D or 2-D) and
  // writes all of it from `data`, whose rows are `ld` elements apart (ld >= last dim; pass
  // the last dim for contiguous data). `data` may change as soon as the call returns.
  void write_f32(const std::string& path, const std::vector<int64_t>& shape, const float* data,
                 int64_t ld);
  // For multi-rank writes of one logical tensor: create once with the global shape, then
  // each owner writes its own rows [row0, row0 + rows) (all columns) of a 2-D dataset or
  // elements of a 1-D one.
  void create_f32(const std::string& path, const std::vector<int64_t>& shape);
  void write_f32_rows(const std::string& path, int64_t row0, int64_t rows, const float* data,
                      int64_t ld);
  void write_i64(const std::string& path, const std::vector<int64_t>& values);  // 1-D int64
  // Attributes on a group (created if missing), e.g. ("/meta", "step", 100).
  void attr_i64(const std::string& group, const std::string& name, int64_t value);
  void attr_f64(const std::string& group, const std::string& name, double value);
  void attr_str(const std::string& group, const std::string& name, const std::string& value);

  // Flush, close, fsync, rename to the final path, fsync the folder.
  void commit();
  const std::string& temp_path() const { return temp_path_; }

 private:
  std::string final_path_, temp_path_;
  int64_t file_ = -1;  // hid_t
  bool committed_ = false;
  // io/checkpoint_writer.cpp: the chunk pipeline and the objects made so far.
  std::unique_ptr<ckpt::WriterState> state_;
};

struct CheckpointDataset {
  std::string path;
  std::vector<int64_t> shape;
  std::string dtype;  // "float32", "int64", ...
  bool fletcher32 = false;
};

class CheckpointReader {
 public:
  // Opens and checks that the file is HDF5 and carries /meta format_version ==
  // kCheckpointFormatVersion; UserError otherwise ("<path>: not a moetrain checkpoint ...").
  explicit CheckpointReader(const std::string& path);
  ~CheckpointReader();
  CheckpointReader(const CheckpointReader&) = delete;
  CheckpointReader& operator=(const CheckpointReader&) = delete;

  bool has(const std::string& path) const;
  std::vector<int64_t> shape(const std::string& path) const;
  // Reads a whole float32 dataset into rows `ld` apart; the stored shape must equal `shape`
  // (UserError naming both shapes otherwise). A checksum failure is a UserError.
  void read_f32(const std::string& path, const std::vector<int64_t>& shape, float* data,
                int64_t ld) const;
  void read_f32_rows(const std::string& path, int64_t row0, int64_t rows, float* data,
                     int64_t ld) const;
  std::vector<int64_t> read_i64(const std::string& path) const;
  int64_t attr_i64(const std::string& group, const std::string& name) const;
  double attr_f64(const std::string& group, const std::string& name) const;
  std::string attr_str(const std::string& group, const std::string& name) const;
  // Whether the attribute exists (keys added in later versions of the file are optional).
  bool has_attr(const std::string& group, const std::string& name) const;

  // Every dataset in the file, in a stable (sorted) order.
  std::vector<CheckpointDataset> list() const;
  // Reads every dataset fully (so Fletcher32 is checked everywhere); returns "" when all are
  // intact, else a one-line description of the first failure.
  std::string verify_all() const;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int64_t file_ = -1;  // hid_t
};

// The checkpoint folder: files "step-<8 digits>.h5" and a pointer file "latest" holding the
// file name of the newest complete checkpoint.
struct CheckpointDir {
  std::string dir;

  std::string path_for_step(int64_t step) const;  // dir/step-00000100.h5
  // Points "latest" at `file_name` atomically (temp + fsync + rename), then deletes all but
  // the newest keep_last step-*.h5 files (never `file_name` itself), and any stray
  // step-*.h5.tmp.* / latest.tmp.* files. keep_last <= 0 keeps every step file. Pruning is
  // best effort (a file that cannot be removed stays); only the pointer write is checked.
  void publish(const std::string& file_name, int keep_last) const;
  // Checkpoint files present (full paths, dir/step-*.h5), newest (highest step) first,
  // whatever "latest" says. Names that are not step-<digits>.h5 are ignored.
  std::vector<std::string> list_newest_first() const;
  // The file "latest" names, or "" if there is no (readable) pointer: missing, empty, not
  // printable text, or naming anything but a plain file name (no path separator, no "..").
  std::string latest() const;
};

// fsyncs `from`, renames it to `to` and fsyncs the folder of `to`: the durable last step of
// every atomic write here. UserError naming `to` on failure.
void durable_rename(const std::string& from, const std::string& to);

}  // namespace moe
