// `moetrain prepare`: text files -> byte-token shards <output>/train.bin and <output>/val.bin.
//
// Inputs are files or folders. Folders are walked recursively and their files taken in sorted
// path order, so the shards are the same on every machine; inside folders, symlinks and binary
// files (any NUL byte) are skipped. A file named explicitly must be text. Each file's last
// val_fraction of bytes, moved forward to the next line start, goes to validation.
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include "io/dataset.h"
#include "model/check.h"

namespace moe {

namespace {

namespace fs = std::filesystem;

constexpr uint32_t kByteVocab = 256;

std::string file_read(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) user_error("%s: cannot open: %s", path.c_str(), std::strerror(errno));
  std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) user_error("%s: cannot read: %s", path.c_str(), std::strerror(errno));
  return data;
}

// Files to read, in order. An explicit input is taken as is (symlinks followed); a folder
// contributes its regular, non-symlink files in sorted order.
struct Source {
  fs::path path;
  bool explicit_input;
};

std::vector<Source> sources_list(const std::vector<std::string>& inputs, int64_t* n_symlinks) {
  std::vector<Source> out;
  for (const std::string& input : inputs) {
    std::error_code ec;
    const fs::file_status st = fs::status(input, ec);
    if (!fs::exists(st)) user_error("%s: cannot open: No such file or directory", input.c_str());
    if (fs::is_regular_file(st)) {
      out.push_back({input, true});
      continue;
    }
    if (!fs::is_directory(st)) user_error("%s: not a regular file or folder", input.c_str());
    std::vector<fs::path> files;
    fs::recursive_directory_iterator it(input, ec), end;
    for (; !ec && it != end; it.increment(ec)) {
      if (it->is_symlink(ec)) {
        ++*n_symlinks;
        continue;
      }
      if (it->is_regular_file(ec)) files.push_back(it->path());
    }
    if (ec) user_error("%s: cannot list folder: %s", input.c_str(), ec.message().c_str());
    std::sort(files.begin(), files.end());
    for (fs::path& f : files) out.push_back({std::move(f), false});
  }
  return out;
}

// Where a file's validation part starts: the last val_fraction of its bytes, moved forward to
// the next line start. Returns data.size() (all to train) when the file is too short to split.
size_t val_start(const std::string& data, double val_fraction) {
  const size_t n = data.size();
  size_t cut = n - static_cast<size_t>(static_cast<double>(n) * val_fraction);
  while (cut > 0 && cut < n && data[cut - 1] != '\n') ++cut;
  return cut == 0 ? n : cut;  // a file wholly in validation would leave nothing to train on
}

}  // namespace

std::string dataset_prepare(const std::vector<std::string>& inputs, const std::string& output,
                            double val_fraction) {
  if (inputs.empty()) user_error("prepare: no input files or folders given");
  if (!(val_fraction > 0.0 && val_fraction < 1.0))
    user_error("prepare: val_fraction %g must be in (0, 1)", val_fraction);

  int64_t n_symlinks = 0, n_binary = 0, n_files = 0, n_bytes = 0;
  std::vector<uint32_t> train, val;
  std::set<fs::path> seen;  // a file named twice (directly and via its folder) counts once
  for (const Source& src : sources_list(inputs, &n_symlinks)) {
    std::error_code ec;
    fs::path key = fs::weakly_canonical(src.path, ec);
    if (ec) key = src.path;
    if (!seen.insert(key).second) continue;
    const std::string data = file_read(src.path);
    if (std::memchr(data.data(), '\0', data.size()) != nullptr) {
      if (src.explicit_input)
        user_error("%s: binary file (contains NUL bytes), not text", src.path.c_str());
      ++n_binary;
      continue;
    }
    if (data.empty()) continue;
    const size_t cut = val_start(data, val_fraction);
    for (size_t i = 0; i < data.size(); ++i)
      (i < cut ? train : val).push_back(static_cast<unsigned char>(data[i]));
    ++n_files;
    n_bytes += static_cast<int64_t>(data.size());
  }

  std::string where;
  for (const std::string& s : inputs) where += (where.empty() ? "" : " ") + s;
  if (n_bytes == 0) user_error("prepare: no text found in %s", where.c_str());
  if (val.empty())
    user_error("prepare: validation split is empty: the %lld text files in %s are too short "
               "for val_fraction %g",
               static_cast<long long>(n_files), where.c_str(), val_fraction);

  shard_write((fs::path(output) / "train.bin").string(), train, TokenDtype::kU8, kByteVocab);
  shard_write((fs::path(output) / "val.bin").string(), val, TokenDtype::kU8, kByteVocab);

  std::string summary = strprintf("prepared %lld files, %lld bytes: %zu train tokens, %zu val tokens -> %s",
                                  static_cast<long long>(n_files), static_cast<long long>(n_bytes),
                                  train.size(), val.size(), output.c_str());
  if (n_binary > 0 || n_symlinks > 0)
    summary += strprintf(" (skipped %lld binary files, %lld symlinks)",
                         static_cast<long long>(n_binary), static_cast<long long>(n_symlinks));
  return summary;
}

}  // namespace moe
