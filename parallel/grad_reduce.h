// Data-parallel gradient reduction for ZeRO-1, in buckets overlapped with backward.
//
// The flat gradient buffer is split into regions, each sharded over one group (replicated
// tensors over all data-parallel ranks, routed experts over the ranks holding the same
// experts). Within a region, buckets are contiguous ranges of whole tensors, formed in the
// order backward finishes them. As soon as backward has finished every tensor of a bucket
// (its stage), the bucket's reduce-scatter starts without blocking, so the sum over ranks
// of early buckets runs while backward computes the rest; finish() waits for the tail.
// Each rank ends up with the sum of its own shard of every region.
//
// Sizes and the order of collectives come from the plan only (identical on every rank of a
// group), never from data. Built once; a step allocates nothing.
#pragma once

#include <cstdint>
#include <vector>

#include "parallel/comm.h"

namespace moe {

struct GradRegion {
  Comm* comm = nullptr;       // the group sharding this region; null: held whole, no reduction
  int64_t begin = 0;          // first element in the flat buffer
  int64_t count = 0;          // elements, a multiple of the group size
  float* shard_out = nullptr; // (count / size): this rank's reduced shard
};

// One tensor's place: flat range [begin, end) of region `region`, final after backward
// stage `stage` (stages complete in increasing order).
struct GradSpan {
  int region = 0;
  int64_t begin = 0, end = 0;
  int64_t stage = 0;
};

struct GradBucket {
  int region = 0;
  int64_t begin = 0, end = 0;    // flat range
  int64_t stage = 0;             // startable once this stage is complete
  std::vector<int> recv_counts;  // per rank of the region's group
  float* recv = nullptr;         // where this rank's part of the bucket lands
  CommRequest req;
  bool started = false;
};

struct GradReducer {
  std::vector<GradRegion> regions;
  std::vector<GradBucket> buckets;  // in start order
  const float* grads = nullptr;     // the gradient buffer being reduced
  size_t next = 0;                  // first bucket not yet started
  double wait_s = 0;                // time spent blocked in finish() (exposed), summed
  double busy_s = 0;                // time spent starting and testing requests, summed
};

// Plans the buckets: spans must cover each region's tensors without overlap; a bucket closes
// at a stage boundary once it holds at least bucket_elems elements. Region padding joins the
// nearest bucket.
void grad_reducer_init(GradReducer& r, std::vector<GradRegion> regions,
                       const std::vector<GradSpan>& spans, int64_t bucket_elems);

// Arms the reducer for one reduction of `grads` (the whole flat buffer).
void grad_reducer_begin(GradReducer& r, const float* grads);
// Backward finished `stage`: starts every bucket it completes and drives progress of the
// ones in flight (MPI progresses non-blocking collectives only inside MPI calls).
void grad_reducer_stage_done(GradReducer& r, int64_t stage);
// Starts whatever is left and waits for everything.
void grad_reducer_finish(GradReducer& r);

// Number of buckets per region (for logs and the benchmark).
int64_t grad_reducer_buckets(const GradReducer& r, int region);

}  // namespace moe
