// The checkpoint folder: step-<8 digits>.h5 files, the "latest" pointer, pruning, and the
// durable rename every atomic write here ends with.
//
// NOTE: publish() deletes stray step-*.h5.tmp.* and latest.tmp.* files, which assumes one
// writer per folder (rank 0 of one run): a second run saving into the same folder at the same
// moment could lose its temporary file.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <utility>

#include "io/checkpoint_file.h"
#include "model/check.h"

namespace moe {

namespace {

namespace fs = std::filesystem;

std::string join(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

bool starts_with(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

// The step of "step-<digits>.h5", or -1 for any other name.
int64_t parse_step(const std::string& name) {
  constexpr size_t kPrefix = 5, kSuffix = 3;  // "step-", ".h5"
  if (name.size() <= kPrefix + kSuffix || !starts_with(name, "step-") ||
      name.compare(name.size() - kSuffix, kSuffix, ".h5") != 0)
    return -1;
  const std::string digits = name.substr(kPrefix, name.size() - kPrefix - kSuffix);
  if (digits.size() > 18 ||
      !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return -1;
  return std::stoll(digits);
}

// Step files present: (step, name), newest first.
std::vector<std::pair<int64_t, std::string>> step_files(const std::string& dir) {
  std::vector<std::pair<int64_t, std::string>> out;
  std::error_code ec;
  for (fs::directory_iterator it(dir.empty() ? "." : dir, ec), end; !ec && it != end;
       it.increment(ec)) {
    const std::string name = it->path().filename().string();
    const int64_t step = parse_step(name);
    std::error_code type_ec;
    if (step >= 0 && it->is_regular_file(type_ec)) out.emplace_back(step, name);
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second > b.second;
  });
  return out;
}

}  // namespace

void durable_rename(const std::string& from, const std::string& to) {
  const int fd = ::open(from.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0 || ::fsync(fd) != 0) {
    const int err = errno;
    if (fd >= 0) ::close(fd);
    user_error("%s: cannot fsync %s (%s)", to.c_str(), from.c_str(), std::strerror(err));
  }
  ::close(fd);
  if (::rename(from.c_str(), to.c_str()) != 0)
    user_error("%s: cannot rename %s into place (%s)", to.c_str(), from.c_str(),
               std::strerror(errno));
  std::string folder = fs::path(to).parent_path().string();
  if (folder.empty()) folder = ".";
  const int dfd = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0 || ::fsync(dfd) != 0) {
    const int err = errno;
    if (dfd >= 0) ::close(dfd);
    user_error("%s: cannot fsync folder %s (%s)", to.c_str(), folder.c_str(), std::strerror(err));
  }
  ::close(dfd);
}

std::string CheckpointDir::path_for_step(int64_t step) const {
  CHECK(step >= 0, "step %lld", static_cast<long long>(step));
  return join(dir, strprintf("step-%08lld.h5", static_cast<long long>(step)));
}

void CheckpointDir::publish(const std::string& file_name, int keep_last) const {
  CHECK(!file_name.empty() && file_name.find('/') == std::string::npos, "file name '%s'",
        file_name.c_str());
  CHECK(fs::exists(join(dir, file_name)), "publishing %s, which does not exist",
        join(dir, file_name).c_str());
  const std::string pointer = join(dir, "latest");
  const std::string temp = join(dir, "latest.tmp." + std::to_string(::getpid()));
  const std::string text = file_name + "\n";
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0)
    user_error("%s: cannot create %s (%s)", pointer.c_str(), temp.c_str(), std::strerror(errno));
  const ssize_t written = ::write(fd, text.data(), text.size());
  const int err = errno;
  ::close(fd);
  if (written != static_cast<ssize_t>(text.size())) {
    ::unlink(temp.c_str());
    user_error("%s: cannot write %s (%s)", pointer.c_str(), temp.c_str(),
               written < 0 ? std::strerror(err) : "short write");
  }
  try {
    durable_rename(temp, pointer);
  } catch (...) {
    ::unlink(temp.c_str());
    throw;
  }

  // Best effort from here: a file left behind costs disk, not correctness.
  if (keep_last > 0) {
    const auto files = step_files(dir);
    for (size_t i = static_cast<size_t>(keep_last); i < files.size(); ++i) {
      if (files[i].second == file_name) continue;  // never the one just published
      std::error_code ec;
      fs::remove(join(dir, files[i].second), ec);
    }
  }
  std::vector<fs::path> strays;  // collected first: no removing while the folder is read
  std::error_code ec;
  for (fs::directory_iterator it(dir.empty() ? "." : dir, ec), end; !ec && it != end;
       it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if ((starts_with(name, "step-") && name.find(".h5.tmp.") != std::string::npos) ||
        starts_with(name, "latest.tmp."))
      strays.push_back(it->path());
  }
  for (const fs::path& p : strays) fs::remove(p, ec);
}

std::vector<std::string> CheckpointDir::list_newest_first() const {
  std::vector<std::string> out;
  for (const auto& [step, name] : step_files(dir)) out.push_back(join(dir, name));
  return out;
}

std::string CheckpointDir::latest() const {
  constexpr size_t kMaxName = 255;  // NAME_MAX on Linux
  std::ifstream in(join(dir, "latest"), std::ios::binary);
  if (!in) return "";
  char buf[kMaxName + 2];
  in.read(buf, sizeof(buf));
  std::string text(buf, static_cast<size_t>(in.gcount()));
  if (!text.empty() && text.back() == '\n') text.pop_back();
  if (!text.empty() && text.back() == '\r') text.pop_back();
  const bool printable = std::all_of(text.begin(), text.end(), [](char c) {
    return static_cast<unsigned char>(c) >= 0x20 && c != 0x7f;
  });
  if (text.empty() || text.size() > kMaxName || !printable || text.find('/') != std::string::npos ||
      text == "." || text == "..")
    return "";
  return text;
}

}  // namespace moe
