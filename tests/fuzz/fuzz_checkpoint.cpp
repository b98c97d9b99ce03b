// libFuzzer target: the checkpoint reader (io/checkpoint_file.h CheckpointReader over HDF5).
//
// Input: the bytes of a checkpoint file. CheckpointReader opens a path, so each input is
// written to one temporary file of this process (removed at exit) and opened; then it is read
// the way `moetrain train --resume` and `moetrain inspect` read it: the /meta attributes
// (the stored config_toml through the config loader too), the dataset list, every small
// float32 / int64 dataset whole and by rows, and verify_all() when the file's datasets are
// small. A UserError is the expected answer to a bad file; anything else is a finding, and
// so is an HDF5 object left open once the reader is gone.
//
// NOTE: every input reaches the reader. HDF5 1.10.8 decodes the older formats' unchecksummed
// metadata without enough bounds checks and overflowed its own heap on damaged files in the
// first minutes of fuzzing (docs/FUZZING.md); CheckpointReader now refuses anything but the
// format moetrain writes (superblock version 2 or later at offset 0, no user block) before
// HDF5 opens it, so those inputs end in our UserError.
// NOTE: bounded on purpose. Datasets are read only up to kMaxElems elements and verify_all()
// only runs when all datasets together hold at most kMaxVerifyBytes, since a damaged header
// can declare any extent (HDF5 then returns fill values for chunks never written, which is
// correct but can take as long as the extent says).
#include <hdf5.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "io/checkpoint_file.h"
#include "io/config.h"
#include "model/check.h"

namespace {

constexpr uint64_t kMaxElems = uint64_t(1) << 20;
constexpr uint64_t kMaxVerifyBytes = uint64_t(16) << 20;
constexpr size_t kMaxDatasets = 256;

std::string g_path;  // this process's checkpoint file

[[noreturn]] void finding(const char* what, const std::string& detail = "") {
  std::fprintf(stderr, "fuzz_checkpoint: %s %s\n", what, detail.c_str());
  std::abort();
}

// Open HDF5 identifiers of every kind the reader creates: equal before and after an input,
// or the reader leaked one.
std::vector<size_t> open_ids() {
  std::vector<size_t> n;
  for (const H5I_type_t t : {H5I_FILE, H5I_GROUP, H5I_DATATYPE, H5I_DATASPACE, H5I_DATASET,
                             H5I_ATTR, H5I_GENPROP_LST}) {
    hsize_t k = 0;
    if (H5Inmembers(t, &k) < 0) k = 0;  // a kind HDF5 has not set up yet: none open
    n.push_back(static_cast<size_t>(k));
  }
  return n;
}

void remove_file() { std::remove(g_path.c_str()); }

void write_file(const std::string& path, const uint8_t* data, size_t size) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(data, 1, size, f) != size || std::fclose(f) != 0) {
    std::perror(path.c_str());
    std::abort();  // the machine's fault, not the reader's: stop rather than fuzz nothing
  }
}

// Elements of `shape`, or kMaxElems + 1 when more (or negative).
uint64_t elems(const std::vector<int64_t>& shape) {
  uint64_t n = 1;
  for (const int64_t d : shape) {
    if (d < 0) return kMaxElems + 1;
    if (d != 0 && n > kMaxElems / static_cast<uint64_t>(d)) return kMaxElems + 1;
    n *= static_cast<uint64_t>(d);
  }
  return n;
}

template <typename F>
void expect_user_error_only(F&& f) {
  try {
    f();
  } catch (const moe::UserError&) {
  }
}

void read_meta(const moe::CheckpointReader& r) {
  for (const char* name : {"step", "tokens_seen", "dp", "ep", "pp", "created_unix"})
    expect_user_error_only([&] { (void)r.attr_i64("/meta", name); });
  for (const char* name : {"loss", "val_loss"})
    expect_user_error_only([&] { (void)r.attr_f64("/meta", name); });
  for (const char* name : {"moetrain_version", "schedule"})
    expect_user_error_only([&] { (void)r.attr_str("/meta", name); });
  expect_user_error_only([&] { (void)r.attr_i64("/optim", "step"); });
  expect_user_error_only([&] { (void)r.attr_f64("/optim", "lr"); });
  expect_user_error_only([&] { (void)r.attr_i64("/data", "seed"); });
  expect_user_error_only([&] {
    const std::string toml = r.attr_str("/meta", "config_toml");
    (void)moe::config_parse(toml, g_path + " (config_toml)", {});
  });
}

void read_datasets(const moe::CheckpointReader& r) {
  const std::vector<moe::CheckpointDataset> all = r.list();
  uint64_t total_bytes = 0;
  for (size_t i = 0; i < all.size() && i < kMaxDatasets; ++i) {
    const moe::CheckpointDataset& d = all[i];
    const uint64_t n = elems(d.shape);
    total_bytes += n > kMaxElems ? kMaxVerifyBytes + 1 : 8 * n;
    if (n > kMaxElems || !r.has(d.path)) continue;
    if (r.shape(d.path) != d.shape) finding("shape() disagrees with list()", d.path);
    const int64_t cols = d.shape.size() == 2 ? d.shape[1] : 1;
    if (d.dtype == "float32" && (d.shape.size() == 1 || d.shape.size() == 2)) {
      std::vector<float> buf(n + 1);
      expect_user_error_only([&] { r.read_f32(d.path, d.shape, buf.data(), cols); });
      if (d.shape[0] > 0)
        expect_user_error_only([&] {
          r.read_f32_rows(d.path, d.shape[0] - 1, 1, buf.data(), cols);
        });
    }
    if (d.shape.size() == 1) expect_user_error_only([&] { (void)r.read_i64(d.path); });
  }
  if (total_bytes <= kMaxVerifyBytes) {
    const std::string verdict = r.verify_all();
    if (!verdict.empty() && verdict.find('\n') != std::string::npos)
      finding("verify_all() message is not one line", verdict);
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  g_path = (std::filesystem::temp_directory_path() /
            ("moetrain-fuzz-ckpt-" + std::to_string(::getpid()) + ".h5"))
               .string();
  std::atexit(remove_file);
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);  // as the reader does: no HDF5 error stacks
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::vector<size_t> ids_before = open_ids();
  write_file(g_path, data, size);
  try {
    const moe::CheckpointReader r(g_path);
    (void)r.has("/meta");
    (void)r.has("/no/such/group/x");
    read_meta(r);
    expect_user_error_only([&] { read_datasets(r); });
  } catch (const moe::UserError& e) {
    const std::string msg = e.what();
    if (msg.find('\n') != std::string::npos) finding("error message is not one line", msg);
  }
  // The reader is gone (constructor thrown or destroyed): nothing it opened stays open.
  if (open_ids() != ids_before) finding("HDF5 identifiers left open after the reader");
  return 0;
}
