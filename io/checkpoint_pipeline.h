// Internal to io/checkpoint_*.cpp: the writer's direct chunk path, two chunks deep.
//
// push() stages chunk k (gather + Fletcher32, io/checkpoint_fletcher32.h) on a worker thread
// into one of two staging buffers while the calling thread hands chunk k-1 to H5Dwrite_chunk,
// so the copy and checksum hide behind the kernel's page-cache copy. The last chunk pushed
// stays pending until the next push() or flush().
//
// NOTE: HDF5 is called only from the calling thread (the serial library is not thread-safe);
// the worker touches nothing but the caller's source rows and a staging buffer. A failure to
// write a pending chunk is reported by the push() or flush() that writes it, naming that
// chunk's dataset. Not thread-safe itself: one calling thread per pipeline.
#pragma once

#include <hdf5.h>

#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "io/checkpoint_fletcher32.h"
#include "io/checkpoint_hdf5.h"

namespace moe::ckpt {

class ChunkPipeline {
 public:
  explicit ChunkPipeline(const std::string& temp_path);  // names the file in errors
  ~ChunkPipeline();  // joins the worker; drops a pending chunk (the file is abandoned)
  ChunkPipeline(const ChunkPipeline&) = delete;
  ChunkPipeline& operator=(const ChunkPipeline&) = delete;

  // Stages `copy` and leaves it pending as the chunk at (row0, col0) of `dset` (which it keeps
  // open until written); meanwhile writes the chunk pending before. On return the source rows
  // have been read in full and may change.
  void push(hid_t dset, const std::string& path, hsize_t row0, hsize_t col0, const ChunkCopy& copy);
  // Writes the pending chunk, if any.
  void flush();

 private:
  // One thread that runs checkpoint_chunk_stage jobs, one at a time.
  class Worker {
   public:
    Worker();
    ~Worker();
    void start(const ChunkCopy& copy, unsigned char* dst);
    void wait();  // until the started job is done

   private:
    void run();
    std::mutex mu_;
    std::condition_variable cv_;
    ChunkCopy job_;
    unsigned char* dst_ = nullptr;
    bool busy_ = false, quit_ = false;
    std::thread thread_;  // last: starts after the fields above
  };

  struct Pending {
    H5Id dset;
    std::string path;
    hsize_t offset[2] = {0, 0};
    size_t bytes = 0;  // chunk + checksum
    int buf = 0;       // which staging buffer
  };

  std::string temp_path_;
  std::vector<unsigned char> staging_[2];  // (chunk + 4 checksum bytes) each, grown as needed
  int free_ = 0;                           // the staging buffer not pending
  std::unique_ptr<Pending> pending_;
  std::unique_ptr<Worker> worker_;  // started on the first chunk worth a hand-off
  int writeback_fd_ = -1;
  size_t unflushed_ = 0;
};

}  // namespace moe::ckpt
