// Internal to io/checkpoint_*.cpp: the writer's direct chunk path, two chunks deep.
//
// stage() starts gathering chunk k (copy + Fletcher32, io/checkpoint_fletcher32.h) on a worker
// thread into one of two staging buffers; push() then hands chunk k-1 to H5Dwrite_chunk on the
// calling thread meanwhile, so the copy and checksum hide behind the kernel's page-cache copy
// (and behind whatever the caller does between the two, such as creating the dataset). The
// last chunk pushed stays pending until the next push() or flush().
//
// Every kWritebackBytes written, a second thread asks the kernel to start writing the file's
// dirty pages out (sync_file_range, SYNC_FILE_RANGE_WRITE: no waiting, no durability promise),
// so the disk works while the save goes on and the fsync at commit finds little left to do.
//
// NOTE: HDF5 is called only from the calling thread (the serial library is not thread-safe);
// the threads touch nothing but the caller's source rows, a staging buffer and a file
// descriptor of their own. A failure to write a pending chunk is reported by the push() or
// flush() that writes it, naming that chunk's dataset. One calling thread per pipeline.
#pragma once

#include <hdf5.h>

#include <condition_variable>
#include <functional>
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
  explicit ChunkPipeline(const std::string& temp_path);  // the file, created already
  ~ChunkPipeline();  // joins the threads; drops a pending chunk (the file is abandoned)
  ChunkPipeline(const ChunkPipeline&) = delete;
  ChunkPipeline& operator=(const ChunkPipeline&) = delete;

  // Starts staging `copy` (one staged chunk at a time; push() or settle() ends it).
  void stage(const ChunkCopy& copy);
  // Writes the chunk pending before, if any, then waits for the staged chunk and leaves it
  // pending as the chunk at (row0, col0) of `dset` (kept open until written). On return the
  // staged source rows have been read in full and may change.
  void push(hid_t dset, const std::string& path, hsize_t row0, hsize_t col0);
  // Writes the pending chunk, if any.
  void flush();
  // Waits for a chunk being staged and drops it: for error paths, before the rows it reads go.
  void settle();

 private:
  // One thread running one job at a time, started by start() and waited for by wait().
  class Worker {
   public:
    Worker();
    ~Worker();  // waits for a running job
    void start(std::function<void()> job);
    bool busy();
    void wait();

   private:
    void run();
    std::mutex mu_;
    std::condition_variable cv_;
    std::function<void()> job_;
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

  void start_threads();
  void settle_wait();  // waits for the stager, keeps the staged chunk

  std::string temp_path_;
  std::vector<unsigned char> staging_[2];  // (chunk + 4 checksum bytes) each, grown as needed
  int free_ = 0;                           // the staging buffer not pending
  size_t staged_bytes_ = 0;                // the staged chunk + checksum; 0: none
  bool staging_async_ = false;             // on the stager thread
  std::unique_ptr<Pending> pending_;
  int writeback_fd_ = -1;  // read-only, ours; -1: no early writeback
  size_t written_since_kick_ = 0;
  bool threads_tried_ = false;
  std::unique_ptr<Worker> stager_, flusher_;  // both or neither; before writeback_fd_ closes
};

}  // namespace moe::ckpt
