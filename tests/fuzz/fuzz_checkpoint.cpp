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
// NOTE: only the HDF5 files moetrain writes are fuzzed through HDF5: a superblock of version
// 2 or later at offset 0, whose metadata all carry checksums that HDF5 verifies before
// decoding (moetrain writes version 3, the 1.10 format). Files without any HDF5 signature are
// fuzzed too (our "not HDF5" path). Other inputs are skipped: in the older formats HDF5 1.10.8
// decodes unchecksummed metadata and overflows its own heap on damaged files (found in the
// first minutes of fuzzing; see docs/FUZZING.md), which no caller can prevent.
//
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

// Where HDF5 looks for its signature: offset 0, then 512, 1024, 2048, ... (a user block).
constexpr unsigned char kHdf5Signature[8] = {0x89, 'H', 'D', 'F', '\r', '\n', 0x1a, '\n'};

bool signature_at(const uint8_t* data, size_t size, size_t at) {
  return size >= at + sizeof(kHdf5Signature) &&
         std::memcmp(data + at, kHdf5Signature, sizeof(kHdf5Signature)) == 0;
}

// See the NOTE at the top: true for our format and for bytes HDF5 rejects as not HDF5.
bool fuzzed_through_hdf5(const uint8_t* data, size_t size) {
  if (signature_at(data, size, 0)) return size > 8 && data[8] >= 2;
  for (size_t at = 512; at < size; at *= 2)
    if (signature_at(data, size, at)) return false;
  return true;
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
  if (!fuzzed_through_hdf5(data, size)) return -1;  // not added to the corpus
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
