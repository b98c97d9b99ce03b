// The writer's two-deep direct chunk path (see io/checkpoint_pipeline.h).
#include "io/checkpoint_pipeline.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <system_error>
#include <utility>

#include "model/check.h"

namespace moe::ckpt {

namespace {

// Chunks smaller than this are staged on the calling thread: waking the worker costs more.
constexpr size_t kHandOffBytes = size_t(64) << 10;
// Bytes written between two early-writeback requests.
constexpr size_t kWritebackBytes = size_t(16) << 20;

}  // namespace

ChunkPipeline::Worker::Worker() : thread_([this] { run(); }) {}

ChunkPipeline::Worker::~Worker() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    quit_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void ChunkPipeline::Worker::start(std::function<void()> job) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    CHECK(!busy_, "checkpoint worker: a job is running");
    job_ = std::move(job);
    busy_ = true;
  }
  cv_.notify_all();
}

bool ChunkPipeline::Worker::busy() {
  std::lock_guard<std::mutex> lock(mu_);
  return busy_;
}

void ChunkPipeline::Worker::wait() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [this] { return !busy_; });
}

void ChunkPipeline::Worker::run() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_.wait(lock, [this] { return busy_ || quit_; });
    if (!busy_) return;  // quit_, nothing running
    const std::function<void()> job = std::move(job_);
    lock.unlock();
    job();  // no HDF5 here
    lock.lock();
    busy_ = false;
    cv_.notify_all();
  }
}

ChunkPipeline::ChunkPipeline(const std::string& temp_path) : temp_path_(temp_path) {}

ChunkPipeline::~ChunkPipeline() {
  stager_.reset();
  flusher_.reset();  // before its descriptor closes
  if (writeback_fd_ >= 0) ::close(writeback_fd_);
}

// Lazily, on the first chunk worth a hand-off: small files never start threads. Without
// threads (none to be had) everything runs on the calling thread, without early writeback.
void ChunkPipeline::start_threads() {
  threads_tried_ = true;
  try {
    stager_ = std::make_unique<Worker>();
    flusher_ = std::make_unique<Worker>();
  } catch (const std::system_error&) {
    stager_.reset();
    flusher_.reset();
    return;
  }
#ifdef SYNC_FILE_RANGE_WRITE
  writeback_fd_ = ::open(temp_path_.c_str(), O_RDONLY | O_CLOEXEC);  // -1: none, no harm
#endif
}

void ChunkPipeline::stage(const ChunkCopy& copy) {
  CHECK(staged_bytes_ == 0, "%s: a chunk is staged already", temp_path_.c_str());
  const size_t bytes = copy.chunk_bytes + 4;
  std::vector<unsigned char>& buf = staging_[free_];
  if (buf.size() < bytes) buf.resize(bytes);
  const bool hand_off = copy.chunk_bytes >= kHandOffBytes;
  if (hand_off && !threads_tried_) start_threads();
  staging_async_ = hand_off && stager_;
  if (staging_async_) {
    unsigned char* dst = buf.data();
    stager_->start([copy, dst] { checkpoint_chunk_stage(copy, dst); });
  } else {
    checkpoint_chunk_stage(copy, buf.data());
  }
  staged_bytes_ = bytes;
}

void ChunkPipeline::push(hid_t dset, const std::string& path, hsize_t row0, hsize_t col0) {
  CHECK(staged_bytes_ > 0, "%s: %s: push without a staged chunk", temp_path_.c_str(), path.c_str());
  try {
    flush();
  } catch (...) {
    settle();  // the stager reads the caller's rows: done before unwinding
    throw;
  }
  settle_wait();
  auto p = std::make_unique<Pending>();
  H5_CHECK(H5Iinc_ref(dset));
  p->dset.reset(dset);
  p->path = path;
  p->offset[0] = row0;
  p->offset[1] = col0;
  p->bytes = std::exchange(staged_bytes_, 0);
  p->buf = free_;
  pending_ = std::move(p);
  free_ ^= 1;
}

void ChunkPipeline::settle_wait() {
  if (staging_async_) stager_->wait();
  staging_async_ = false;
}

void ChunkPipeline::settle() {
  settle_wait();
  staged_bytes_ = 0;
}

void ChunkPipeline::flush() {
  if (!pending_) return;
  const std::unique_ptr<Pending> p = std::move(pending_);
  errno = 0;
  const unsigned char* chunk = staging_[p->buf].data();  // all filters applied: mask 0
  if (H5Dwrite_chunk(p->dset.get(), H5P_DEFAULT, 0, p->offset, p->bytes, chunk) < 0 ||
      p->dset.close() < 0)
    write_failed(temp_path_, "cannot write", p->path);
  written_since_kick_ += p->bytes;
#ifdef SYNC_FILE_RANGE_WRITE
  // Whole file: pages already on their way are skipped. A busy flusher covers these next time.
  if (writeback_fd_ >= 0 && written_since_kick_ >= kWritebackBytes && !flusher_->busy()) {
    const int fd = writeback_fd_;
    flusher_->start([fd] { (void)::sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE); });
    written_since_kick_ = 0;
  }
#endif
}

}  // namespace moe::ckpt
