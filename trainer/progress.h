// A one-line progress bar with ETA, drawn only when stdout is a terminal.
#pragma once

#include <cstdint>
#include <string>

#include "model/wall_clock.h"  // now_s(), used with the bar

namespace moe {

class ProgressBar {
 public:
  // `enabled` false (e.g. on ranks other than 0) draws nothing.
  ProgressBar(int64_t first, int64_t total, bool enabled = true);
  // Redraws the bar after step `done` (exclusive count) with a short status text.
  void update(int64_t done, double elapsed_s, const std::string& status);
  // Clears the bar so a log line can be printed in its place.
  void clear();
  bool active() const { return active_; }

 private:
  int64_t first_, total_;
  bool active_;
  bool drawn_ = false;
};

std::string format_duration(double seconds);

}  // namespace moe
