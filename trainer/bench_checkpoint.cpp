// `moetrain bench --checkpoint-io`: checkpoint save and load throughput against the raw
// speed of the same disk, measured in the same run (plain write + fsync, plain read).
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <vector>

#include "model/check.h"
#include "trainer/bench.h"
#include "trainer/progress.h"
#include "trainer/train_checkpoint.h"

namespace moe {

namespace {

// Writes `bytes` from `buf` (cycled) with write() in large blocks, then fsync: the disk's
// speed for exactly what a checkpoint must do. Returns seconds.
double raw_write(const std::string& path, const std::vector<char>& buf, size_t bytes) {
  const double t0 = now_s();
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) user_error("%s: cannot create: %s", path.c_str(), std::strerror(errno));
  for (size_t done = 0; done < bytes;) {
    const size_t n = std::min(buf.size(), bytes - done);
    const ssize_t w = ::write(fd, buf.data(), n);
    if (w <= 0) user_error("%s: write failed: %s", path.c_str(), std::strerror(errno));
    done += static_cast<size_t>(w);
  }
  if (::fsync(fd) != 0) user_error("%s: fsync failed: %s", path.c_str(), std::strerror(errno));
  ::close(fd);
  return now_s() - t0;
}

double raw_read(const std::string& path, std::vector<char>& buf) {
  const double t0 = now_s();
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) user_error("%s: cannot open: %s", path.c_str(), std::strerror(errno));
  while (::read(fd, buf.data(), buf.size()) > 0) {
  }
  ::close(fd);
  return now_s() - t0;
}

}  // namespace

int bench_checkpoint_main(const Config& cfg, const BenchOptions& opt) {
  namespace fs = std::filesystem;
  const std::string dir = opt.io_dir.empty() ? cfg.checkpoint.dir + "/bench-io" : opt.io_dir;
  fs::create_directories(dir);
  TrainState s;
  train_state_init(s, cfg);
  const std::string ckpt = dir + "/bench-checkpoint.h5", raw = dir + "/bench-raw.bin";
  const int reps = std::max(1, opt.steps);
  double save_s = 1e30, load_s = 1e30, write_s = 1e30, read_s = 1e30;
  size_t bytes = 0;
  std::vector<char> block(8u << 20);
  for (size_t i = 0; i < block.size(); ++i) block[i] = static_cast<char>(i * 131);
  for (int r = 0; r < reps; ++r) {
    double t0 = now_s();
    checkpoint_save(s, RunPosition{}, ckpt);
    save_s = std::min(save_s, now_s() - t0);
    bytes = static_cast<size_t>(fs::file_size(ckpt));
    write_s = std::min(write_s, raw_write(raw, block, bytes));
    t0 = now_s();
    checkpoint_load(s, ckpt);
    load_s = std::min(load_s, now_s() - t0);
    read_s = std::min(read_s, raw_read(raw, block));
  }
  fs::remove(ckpt);
  fs::remove(raw);
  const double mb = static_cast<double>(bytes) / 1e6;
  if (opt.json) {
    std::printf("{\"checkpoint_mb\": %.1f, \"save_mb_s\": %.1f, \"raw_write_mb_s\": %.1f, "
                "\"save_ratio\": %.3f, \"load_mb_s\": %.1f, \"raw_read_mb_s\": %.1f, "
                "\"load_ratio\": %.3f, \"reps\": %d}\n",
                mb, mb / save_s, mb / write_s, write_s / save_s, mb / load_s, mb / read_s,
                read_s / load_s, reps);
  } else {
    std::printf("checkpoint I/O in %s: %.1f MB (params + both Adam moments, %zu tensors each), best of %d\n",
                dir.c_str(), mb, model_logical_tensors(s.model.d).size(), reps);
    std::printf("  save: %.1f MB/s vs raw write+fsync %.1f MB/s -> %.0f%%\n", mb / save_s,
                mb / write_s, 100.0 * write_s / save_s);
    std::printf("  load: %.1f MB/s vs raw read %.1f MB/s -> %.0f%% (checksums verified; page cache warm)\n",
                mb / load_s, mb / read_s, 100.0 * read_s / load_s);
  }
  return 0;
}

}  // namespace moe
