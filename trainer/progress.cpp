#include "trainer/progress.h"

#include <unistd.h>

#include <cstdio>

#include "model/check.h"

namespace moe {

std::string format_duration(double seconds) {
  if (!(seconds >= 0) || seconds > 1e8) return "--:--";
  const long s = static_cast<long>(seconds + 0.5);
  if (s >= 3600) return strprintf("%ld:%02ld:%02ld", s / 3600, (s / 60) % 60, s % 60);
  return strprintf("%02ld:%02ld", s / 60, s % 60);
}

ProgressBar::ProgressBar(int64_t first, int64_t total, bool enabled)
    : first_(first), total_(total), active_(enabled && isatty(STDOUT_FILENO) == 1) {}

void ProgressBar::update(int64_t done, double elapsed_s, const std::string& status) {
  if (!active_) return;
  const int64_t span = total_ - first_, progressed = done - first_;
  const double frac = span > 0 ? static_cast<double>(progressed) / static_cast<double>(span) : 1.0;
  const double eta = progressed > 0 ? elapsed_s / static_cast<double>(progressed) *
                                          static_cast<double>(total_ - done)
                                    : -1.0;
  constexpr int kWidth = 30;
  const int filled = static_cast<int>(frac * kWidth);
  std::string bar(static_cast<size_t>(filled), '#');
  bar.append(static_cast<size_t>(kWidth - filled), '.');
  std::printf("\r\033[2K[%s] %lld/%lld %s ETA %s", bar.c_str(), static_cast<long long>(done),
              static_cast<long long>(total_), status.c_str(), format_duration(eta).c_str());
  std::fflush(stdout);
  drawn_ = true;
}

void ProgressBar::clear() {
  if (!active_ || !drawn_) return;
  std::printf("\r\033[2K");
  std::fflush(stdout);
  drawn_ = false;
}

}  // namespace moe
