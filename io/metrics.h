// Metrics as JSON Lines: one flat object per line, written and flushed as it happens so a
// crash loses at most the line being written.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

namespace moe {

class MetricsRecord {
 public:
  MetricsRecord& add(const std::string& key, double value);
  MetricsRecord& add_int(const std::string& key, long long value);
  MetricsRecord& add_str(const std::string& key, const std::string& value);
  std::string json() const;  // {"k": v, ...} in insertion order, no newline

 private:
  std::vector<std::pair<std::string, std::string>> fields_;  // key, JSON text of the value
};

class MetricsFile {
 public:
  MetricsFile() = default;
  // Opens (creating parent folders) for writing; `append` keeps earlier lines.
  // An empty path makes a file that writes nothing.
  MetricsFile(const std::string& path, bool append);
  ~MetricsFile();
  MetricsFile(const MetricsFile&) = delete;
  MetricsFile& operator=(const MetricsFile&) = delete;
  void write(const MetricsRecord& r);

 private:
  std::FILE* f_ = nullptr;
  std::string path_;
};

// On resume: drops the records of steps after `step` (they will be recomputed) and any
// torn last line, so the file again describes exactly one run.
void metrics_truncate_after(const std::string& path, int64_t step);

}  // namespace moe
