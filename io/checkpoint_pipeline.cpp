// The writer's two-deep direct chunk path (see io/checkpoint_pipeline.h).
#include "io/checkpoint_pipeline.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <system_error>

#include "model/check.h"

namespace moe::ckpt {

namespace {

// Chunks smaller than this are staged on the calling thread: waking the worker costs more.
constexpr size_t kHandOffBytes = size_t(64) << 10;

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

void ChunkPipeline::Worker::start(const ChunkCopy& copy, unsigned char* dst) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    CHECK(!busy_, "staging worker: a job is running");
    job_ = copy;
    dst_ = dst;
    busy_ = true;
  }
  cv_.notify_all();
}

void ChunkPipeline::Worker::wait() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [this] { return !busy_; });
}

void ChunkPipeline::Worker::run() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_.wait(lock, [this] { return busy_ || quit_; });
    if (busy_) {
      const ChunkCopy job = job_;
      unsigned char* dst = dst_;
      lock.unlock();
      checkpoint_chunk_stage(job, dst);  // no HDF5 here
      lock.lock();
      busy_ = false;
      cv_.notify_all();
    } else {
      return;  // quit_, nothing running
    }
  }
}

ChunkPipeline::ChunkPipeline(const std::string& temp_path) : temp_path_(temp_path) {
  if (!getenv("NOWB")) writeback_fd_ = ::open(temp_path.c_str(), O_RDONLY | O_CLOEXEC);
}

ChunkPipeline::~ChunkPipeline() {
  if (writeback_fd_ >= 0) ::close(writeback_fd_);
}

void ChunkPipeline::push(hid_t dset, const std::string& path, hsize_t row0, hsize_t col0,
                         const ChunkCopy& copy) {
  const size_t bytes = copy.chunk_bytes + 4;
  std::vector<unsigned char>& buf = staging_[free_];
  if (buf.size() < bytes) buf.resize(bytes);
  if (!worker_ && copy.chunk_bytes >= kHandOffBytes) {
    try {
      worker_ = std::make_unique<Worker>();
    } catch (const std::system_error&) {
      // No thread to be had: stage on this thread, as for small chunks.
    }
  }
  if (worker_ && copy.chunk_bytes >= kHandOffBytes) {
    worker_->start(copy, buf.data());
    try {
      flush();
    } catch (...) {
      worker_->wait();  // it reads the caller's rows and our buffer: done before unwinding
      throw;
    }
    worker_->wait();
  } else {
    checkpoint_chunk_stage(copy, buf.data());
    flush();
  }
  auto p = std::make_unique<Pending>();
  H5_CHECK(H5Iinc_ref(dset));
  p->dset.reset(dset);
  p->path = path;
  p->offset[0] = row0;
  p->offset[1] = col0;
  p->bytes = bytes;
  p->buf = free_;
  pending_ = std::move(p);
  free_ ^= 1;
}

void ChunkPipeline::flush() {
  if (!pending_) return;
  const std::unique_ptr<Pending> p = std::move(pending_);
  errno = 0;
  if (H5Dwrite_chunk(p->dset.get(), H5P_DEFAULT, 0, p->offset, p->bytes,
                     staging_[p->buf].data()) < 0 ||
      p->dset.close() < 0)
    write_failed(temp_path_, "cannot write", p->path);
  unflushed_ += p->bytes;
  if (writeback_fd_ >= 0 && unflushed_ >= (size_t(16) << 20)) {
    (void)::sync_file_range(writeback_fd_, 0, 0, SYNC_FILE_RANGE_WRITE);
    unflushed_ = 0;
  }
}

}  // namespace moe::ckpt
