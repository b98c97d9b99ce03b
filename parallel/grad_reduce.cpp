#include "parallel/grad_reduce.h"

#include <algorithm>
#include <climits>

#include "model/check.h"
#include "model/wall_clock.h"

namespace moe {

namespace {

void start(GradReducer& r, GradBucket& b) {
  const GradRegion& g = r.regions[static_cast<size_t>(b.region)];
  b.req = g.comm->reduce_scatter_sum_start(b.recv, r.grads + b.begin, b.recv_counts.data());
  b.started = true;
}

}  // namespace

void grad_reducer_init(GradReducer& r, std::vector<GradRegion> regions,
                       const std::vector<GradSpan>& spans, int64_t bucket_elems) {
  CHECK(bucket_elems >= 1);
  r = GradReducer{};
  r.regions = std::move(regions);
  for (int ri = 0; ri < static_cast<int>(r.regions.size()); ++ri) {
    const GradRegion& g = r.regions[static_cast<size_t>(ri)];
    if (!g.comm || g.count == 0) continue;
    const int64_t P = g.comm->size(), shard = g.count / P, mine = g.comm->rank();
    CHECK(g.count % P == 0, "region %d of %lld elements over %lld ranks", ri, (long long)g.count,
          (long long)P);
    std::vector<GradSpan> in;
    for (const GradSpan& s : spans)
      if (s.region == ri && s.end > s.begin) in.push_back(s);
    // Backward finishes the tensors from the end of the buffer towards its start.
    std::sort(in.begin(), in.end(), [](const GradSpan& a, const GradSpan& b) { return a.begin > b.begin; });
    const size_t first = r.buckets.size();
    GradBucket cur;
    bool open = false;
    for (size_t i = 0; i < in.size(); ++i) {
      const GradSpan& s = in[i];
      if (!open) {
        cur = GradBucket{};
        cur.region = ri;
        cur.end = s.end;
        cur.stage = s.stage;
        open = true;
      }
      cur.begin = s.begin;
      cur.stage = std::max(cur.stage, s.stage);
      const bool boundary = i + 1 == in.size() || in[i + 1].stage != s.stage;
      if (boundary && (cur.end - cur.begin >= bucket_elems || i + 1 == in.size())) {
        r.buckets.push_back(cur);
        open = false;
      }
    }
    if (r.buckets.size() == first) continue;
    // Padding: the region's tail joins the first bucket, its head the last one.
    r.buckets[first].end = g.begin + g.count;
    r.buckets.back().begin = g.begin;
    for (size_t b = first; b < r.buckets.size(); ++b) {
      GradBucket& k = r.buckets[b];
      CHECK(b == first || k.end == r.buckets[b - 1].begin, "gradient spans leave a gap");
      CHECK(k.end - k.begin <= INT_MAX, "gradient bucket too large");
      k.recv_counts.assign(static_cast<size_t>(P), 0);
      for (int64_t p = 0; p < P; ++p) {
        const int64_t lo = std::max(k.begin, g.begin + p * shard);
        const int64_t hi = std::min(k.end, g.begin + (p + 1) * shard);
        k.recv_counts[static_cast<size_t>(p)] = static_cast<int>(std::max<int64_t>(0, hi - lo));
      }
      const int64_t my_lo = g.begin + mine * shard;
      k.recv = g.shard_out + std::clamp<int64_t>(k.begin - my_lo, 0, shard);
    }
  }
  // Start order: by stage, so buckets of different regions interleave as backward runs. The
  // order is the same on every rank (it depends on the plan only).
  std::stable_sort(r.buckets.begin(), r.buckets.end(),
                   [](const GradBucket& a, const GradBucket& b) { return a.stage < b.stage; });
}

void grad_reducer_begin(GradReducer& r, const float* grads) {
  r.grads = grads;
  r.next = 0;
  for (GradBucket& b : r.buckets) {
    CHECK(!b.req.active, "gradient reduction begun while the last one is in flight");
    b.started = false;
  }
}

void grad_reducer_stage_done(GradReducer& r, int64_t stage) {
  if (r.buckets.empty()) return;
  const double t0 = now_s();
  while (r.next < r.buckets.size() && r.buckets[r.next].stage <= stage) start(r, r.buckets[r.next++]);
  for (size_t i = 0; i < r.next; ++i) {
    GradBucket& b = r.buckets[i];
    if (b.req.active) r.regions[static_cast<size_t>(b.region)].comm->test(b.req);
  }
  r.busy_s += now_s() - t0;
}

void grad_reducer_finish(GradReducer& r) {
  if (r.buckets.empty()) return;
  const double t0 = now_s();
  while (r.next < r.buckets.size()) start(r, r.buckets[r.next++]);
  for (GradBucket& b : r.buckets) r.regions[static_cast<size_t>(b.region)].comm->wait(b.req);
  r.wait_s += now_s() - t0;
}

int64_t grad_reducer_buckets(const GradReducer& r, int region) {
  return std::count_if(r.buckets.begin(), r.buckets.end(),
                       [&](const GradBucket& b) { return b.region == region; });
}

}  // namespace moe
