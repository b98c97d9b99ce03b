// The compute order of each schedule kind on one rank (messages are added by
// schedule_rank_ops). Letters as in schedule.h.
#include <algorithm>
#include <deque>

#include "model/check.h"
#include "parallel/schedule.h"

namespace moe {

namespace {

// Hands out one rank's compute ops in order. A chunk takes its micro-batches in the order
// they reach it, forwards and backwards counted separately; a split backward queues its W,
// and weight() runs the oldest queued W (first in, first out).
struct RankProgram {
  std::vector<PipeOp> ops;
  int next_f[2] = {0, 0};  // next micro-batch to forward, per chunk
  int next_b[2] = {0, 0};  // next micro-batch to backward, per chunk
  std::deque<PipeOp> pending_w;

  RankProgram(int first_mb0, int first_mb1) {
    next_f[0] = next_b[0] = first_mb0;
    next_f[1] = next_b[1] = first_mb1;
  }
  void forward(int c) { ops.push_back({PipeOpKind::kForward, c, next_f[c]++}); }
  void backward(int c, bool split) {
    const int mb = next_b[c]++;
    if (split) {
      ops.push_back({PipeOpKind::kBackwardInput, c, mb});
      pending_w.push_back({PipeOpKind::kBackwardWeight, c, mb});
    } else {
      ops.push_back({PipeOpKind::kBackward, c, mb});
    }
  }
  void weight() {
    CHECK(!pending_w.empty());
    ops.push_back(pending_w.front());
    pending_w.pop_front();
  }
  void forward_backward(int cf, int cb) {
    ops.push_back({PipeOpKind::kForwardBackward, cf, next_f[cf]++, cb, next_b[cb]++});
  }
};

// 1F1B: rank r runs pp-1-r warm-up forwards, then alternates one forward and one backward,
// then drains the backwards left. ZB1P (ZB-H1 of the zero-bubble paper) keeps that order
// with split backwards: each Bx queues its W, and once more than r are queued the oldest
// runs at once. The r left run at the end, in the time 1F1B's rank r spends waiting for the
// last gradients. Rank r then holds at most pp activations, as many as 1F1B's rank 0.
std::vector<PipeOp> build_1f1b(int pp, int M, int r, bool split) {
  RankProgram p(0, 0);
  const int warm = std::min(pp - 1 - r, M);
  auto backward = [&] {
    p.backward(0, split);
    while (static_cast<int>(p.pending_w.size()) > r) p.weight();
  };
  for (int i = 0; i < warm; ++i) p.forward(0);
  for (int i = warm; i < M; ++i) {
    p.forward(0);
    backward();
  }
  for (int i = 0; i < warm; ++i) backward();
  while (!p.pending_w.empty()) p.weight();
  return p.ops;
}

// DualPipe on one rank, in eight phases (DeepSeek-V3 report section 3.2; the reference is
// deepseek-ai/DualPipe). near: the chunk whose micro-batches enter at the closer end of the
// pipeline; far: the other one. h: the rank's distance to that end; H: half the ranks;
// N: micro-batches per direction.
//   1. 2(H-h-1) x F near                           fill from the near end
//   2. h+1 x (F near, F far)                       the far direction arrives
//   3. H-h-1 x (Bx far, W far, F far)              first far backwards, split
//   4. N-2H+h+1 x (F near & B far, F far & B near) steady state: overlapped pairs
//   5. H-h-1 x (B far, F far & B near)             the near forwards are done
//   6. 2(h+1) backwards alternating far, near      the first h+1 full, the rest split
//   7. H-h-1 x (W, Bx near)                        the pending W's fill the drain
//   8. h+1 x W                                     the last W's
// NOTE: a middle rank (h = H-1) runs the first step of phase 4 as F near, then B far, not
// as a pair, as the reference does: the other middle rank waits for that forward, which so
// leaves after F instead of after F&B, hiding message latency. With free messages (our
// simulator) this costs f + b - fb of makespan when the pair is cheaper than F + B; the
// bubble as defined in schedule.h is the table's either way.
// DualPipeV runs the same program with H = pp, h = r, N = M, near = 0, far = 1: it is the
// first half of DualPipe on 2 pp ranks, folded at rank pp-1 (its "middle" rank).
struct DualProgram {
  int H, h, N;
  int near, far;
  int first_mb1;  // chunk 1's first micro-batch (chunk 0 starts at 0)
};

std::vector<PipeOp> build_dual(const DualProgram& d) {
  RankProgram p(0, d.first_mb1);
  const int n = d.near, f = d.far;
  const int outer = d.H - d.h - 1;  // ranks between this one and the middle
  CHECK(d.N - 2 * d.H + d.h + 1 >= 1, "too few micro-batches: N %d H %d", d.N, d.H);
  for (int i = 0; i < 2 * outer; ++i) p.forward(n);
  for (int i = 0; i < d.h + 1; ++i) {
    p.forward(n);
    p.forward(f);
  }
  for (int i = 0; i < outer; ++i) {
    p.backward(f, true);
    p.weight();
    p.forward(f);
  }
  for (int i = 0; i < d.N - 2 * d.H + d.h + 1; ++i) {
    if (i == 0 && outer == 0) {
      p.forward(n);
      p.backward(f, false);
    } else {
      p.forward_backward(n, f);
    }
    p.forward_backward(f, n);
  }
  for (int i = 0; i < outer; ++i) {
    p.backward(f, false);
    p.forward_backward(f, n);
  }
  for (int i = 0; i < 2 * (d.h + 1); ++i) p.backward(i % 2 == 0 ? f : n, i >= d.h + 1);
  for (int i = 0; i < outer; ++i) {
    p.weight();
    p.backward(n, true);
  }
  while (!p.pending_w.empty()) p.weight();
  return p.ops;
}

}  // namespace

std::vector<PipeOp> schedule_rank_compute(PipeSchedule kind, int pp, int M, int rank) {
  schedule_check(kind, pp, M);
  CHECK(rank >= 0 && rank < pp, "rank %d of %d", rank, pp);
  switch (kind) {
    case PipeSchedule::k1F1B: return build_1f1b(pp, M, rank, false);
    case PipeSchedule::kZB1P: return build_1f1b(pp, M, rank, true);
    case PipeSchedule::kDualPipe: {
      // The first half of the ranks are near the entry of direction 0 (chunk 0), the second
      // half near the entry of direction 1 (chunk 1, micro-batches [M/2, M)).
      const bool second_half = rank >= pp / 2;
      return build_dual({pp / 2, std::min(rank, pp - 1 - rank), M / 2, second_half ? 1 : 0,
                         second_half ? 0 : 1, M / 2});
    }
    case PipeSchedule::kDualPipeV: return build_dual({pp, rank, M, 0, 1, 0});
  }
  return {};
}

}  // namespace moe
