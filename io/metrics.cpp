#include "io/metrics.h"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "io/quoted_string.h"
#include "model/check.h"

namespace moe {


MetricsRecord& MetricsRecord::add(const std::string& key, double value) {
  // JSON has no NaN/Infinity; null keeps the line parseable and the gap visible.
  fields_.emplace_back(key, std::isfinite(value) ? strprintf("%.17g", value) : "null");
  return *this;
}

MetricsRecord& MetricsRecord::add_int(const std::string& key, long long value) {
  fields_.emplace_back(key, strprintf("%lld", value));
  return *this;
}

MetricsRecord& MetricsRecord::add_str(const std::string& key, const std::string& value) {
  fields_.emplace_back(key, quoted_string(value));
  return *this;
}

std::string MetricsRecord::json() const {
  std::string out = "{";
  for (size_t i = 0; i < fields_.size(); ++i) {
    if (i) out += ", ";
    out += quoted_string(fields_[i].first) + ": " + fields_[i].second;
  }
  return out + "}";
}

void metrics_truncate_after(const std::string& path, int64_t step) {
  if (path.empty() || !std::filesystem::exists(path)) return;
  std::ifstream in(path);
  std::string line, kept;
  const std::string key = "\"step\": ";
  while (std::getline(in, line)) {
    const size_t at = line.find(key);
    if (at == std::string::npos) continue;  // a torn last line from a crash
    if (std::strtoll(line.c_str() + at + key.size(), nullptr, 10) <= step) kept += line + "\n";
  }
  in.close();
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << kept;
    if (!out) user_error("%s: cannot rewrite metrics file", path.c_str());
  }
  std::filesystem::rename(tmp, path);
}

MetricsFile::MetricsFile(const std::string& path, bool append) : path_(path) {
  if (path.empty()) return;
  std::error_code ec;
  std::filesystem::path parent = std::filesystem::path(path).parent_path();
  if (!parent.empty()) std::filesystem::create_directories(parent, ec);
  f_ = std::fopen(path.c_str(), append ? "a" : "w");
  if (!f_) user_error("%s: cannot open metrics file: %s", path.c_str(), std::strerror(errno));
}

MetricsFile::~MetricsFile() {
  if (f_) std::fclose(f_);
}

void MetricsFile::write(const MetricsRecord& r) {
  if (!f_) return;
  std::string line = r.json() + "\n";
  if (std::fwrite(line.data(), 1, line.size(), f_) != line.size() || std::fflush(f_) != 0)
    user_error("%s: cannot write metrics: %s", path_.c_str(), std::strerror(errno));
}

}  // namespace moe
