// The pipeline's messages under NCCL's rules (parallel/pipeline_ticks.h): every built-in
// schedule gets a tick plan that keeps the message order on both sides of each pair of ranks
// and finishes with rendezvous sends; lists that cannot are refused with a line naming why.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "parallel/pipeline_ticks.h"
#include "parallel/schedule.h"

namespace {

using moe::PipeOp;
using moe::PipeOpKind;
using moe::PipeSchedule;
using moe::PipeTickPlan;
using K = PipeOpKind;

constexpr PipeSchedule kAllKinds[] = {PipeSchedule::k1F1B, PipeSchedule::kZB1P,
                                      PipeSchedule::kDualPipe, PipeSchedule::kDualPipeV};

std::vector<int> micro_batch_counts(PipeSchedule kind, int pp) {
  switch (kind) {
    case PipeSchedule::kDualPipe: return {2 * pp, 2 * pp + 2, 4 * pp, 6 * pp + 2};
    case PipeSchedule::kDualPipeV: return {2 * pp, 2 * pp + 1, 3 * pp, 5 * pp + 3};
    default: return {1, 2, pp, 2 * pp, 3 * pp + 1, 8 * pp};
  }
}

PipeOp op(K k, int mb, int peer = -1, int chunk = 0) {
  PipeOp o;
  o.kind = k;
  o.mb = mb;
  o.peer = peer;
  o.chunk = chunk;
  return o;
}

// Every message op is in exactly one tick: a receive no earlier than its slot is taken and no
// later than the list places it, a send no earlier than the list places it and no later than
// its micro-batch's next compute op on the rank (its buffer's life).
// Returns how many sends wait past the tick right after their compute op.
int expect_plan_covers_lists(PipeSchedule kind, int pp, int M, const PipeTickPlan& plan) {
  int delayed_sends = 0;
  const auto lists = moe::schedule_all_ops(kind, pp, M);
  for (int r = 0; r < pp; ++r) {
    const auto& ops = lists[static_cast<size_t>(r)];
    const int n = static_cast<int>(ops.size());
    const std::vector<int> take = moe::pipe_slot_take_index(ops, M);
    std::vector<int> seen(ops.size(), 0);
    int last_before = -1;
    for (const moe::PipeTick& t : plan.ranks[static_cast<size_t>(r)]) {
      EXPECT_GT(t.before, last_before) << "rank " << r;  // ticks in order, one per place
      last_before = t.before;
      EXPECT_TRUE(t.before == n || !moe::pipe_op_is_message(ops[static_cast<size_t>(t.before)].kind));
      for (int i : t.ops) {
        ++seen[static_cast<size_t>(i)];
        const PipeOp& o = ops[static_cast<size_t>(i)];
        int next = i;
        while (next < n && moe::pipe_op_is_message(ops[static_cast<size_t>(next)].kind)) ++next;
        if (o.kind == K::kSendActivation || o.kind == K::kSendGradient) {
          // Made before `next`; its buffer stays put until the micro-batch's next compute op.
          int touch = next;
          while (touch < n && (moe::pipe_op_is_message(ops[static_cast<size_t>(touch)].kind) ||
                               (ops[static_cast<size_t>(touch)].mb != o.mb &&
                                ops[static_cast<size_t>(touch)].mb2 != o.mb)))
            ++touch;
          EXPECT_GE(t.before, next) << "rank " << r << " op " << i;
          EXPECT_LE(t.before, touch) << "rank " << r << " op " << i;
          delayed_sends += t.before > next ? 1 : 0;
        } else {
          EXPECT_LE(t.before, next) << "rank " << r << " op " << i;
          EXPECT_GE(t.before, take[static_cast<size_t>(o.mb)]) << "rank " << r << " op " << i;
        }
      }
    }
    for (int i = 0; i < n; ++i)
      EXPECT_EQ(moe::pipe_op_is_message(ops[static_cast<size_t>(i)].kind) ? 1 : 0,
                seen[static_cast<size_t>(i)]) << "rank " << r << " op " << i;
  }
  return delayed_sends;
}

TEST(PipelineTicks, EverySchedulePlansWithOrderAndProgress) {
  int checked = 0, moved = 0, delayed = 0;
  for (PipeSchedule kind : kAllKinds)
    for (int pp : {2, 3, 4, 6, 8, 16}) {
      if (kind == PipeSchedule::kDualPipe && pp % 2 != 0) continue;
      for (int M : micro_batch_counts(kind, pp)) {
        const PipeTickPlan plan = moe::pipeline_ticks_plan(kind, pp, M);
        EXPECT_EQ("", plan.error) << moe::schedule_kind_name(kind) << " pp " << pp << " M " << M;
        delayed += expect_plan_covers_lists(kind, pp, M, plan);
        // 1F1B and ZB1P run as their lists place them (Megatron's pairing is already there).
        if (kind == PipeSchedule::k1F1B || kind == PipeSchedule::kZB1P) {
          EXPECT_EQ(0, plan.moved);
        }
        moved += plan.moved;
        ++checked;
      }
    }
  EXPECT_GT(checked, 80);
  // DualPipe's two directions need receives posted earlier and sends held back.
  EXPECT_GT(moved, 0);
  EXPECT_GT(delayed, 0);
}

// The plans of pp 2, as they run. 1F1B pairs each send with the next receive (Megatron-LM's
// send_forward_recv_backward). In DualPipe both neighbours send an activation at once after
// F0.1 / F1.3; rank 1 posts the receive of micro-batch 1 there, a whole compute op earlier
// than its list places it, so the two sends meet.
TEST(PipelineTicks, PlansOfTwoRanksRead) {
  auto plan_of = [](PipeSchedule kind, int r) {
    const PipeTickPlan plan = moe::pipeline_ticks_plan(kind, 2, 4);
    EXPECT_EQ("", plan.error);
    return moe::pipeline_ticks_to_string(moe::schedule_rank_ops(kind, 2, 4, r),
                                         plan.ranks[static_cast<size_t>(r)]);
  };
  EXPECT_EQ("F0.0 [a>1] F0.1 [a>1 g<1] B0.0 F0.2 [a>1 g<1] B0.1 F0.3 [a>1 g<1] B0.2 [g<1] B0.3",
            plan_of(PipeSchedule::k1F1B, 0));
  EXPECT_EQ("[a<0] F0.0 B0.0 [g>0 a<0] F0.1 B0.1 [g>0 a<0] F0.2 B0.2 [g>0 a<0] F0.3 B0.3 [g>0]",
            plan_of(PipeSchedule::k1F1B, 1));
  EXPECT_EQ("F0.0 [a>1 a<1] F1.2 F0.1 [a>1] B1.2 [g>1 a<1 g<1] F1.3&B0.0 B1.3 [g>1 g<1] Bx0.1 W0.1",
            plan_of(PipeSchedule::kDualPipe, 0));
  EXPECT_EQ("F1.2 [a>0 a<0] F0.0 F1.3 [a>0 a<0] B0.0 [g>0 g<0] F0.1&B1.2 B0.1 [g>0 g<0] Bx1.3 W1.3",
            plan_of(PipeSchedule::kDualPipe, 1));
  // The list itself places rank 1's a<0 of micro-batch 1 only before F0.1&B1.2.
  EXPECT_EQ("F1.2 a>0 a<0 F0.0 F1.3 a>0 B0.0 g>0 a<0 g<0 F0.1&B1.2 B0.1 g>0 g<0 Bx1.3 W1.3",
            moe::schedule_to_string(moe::schedule_rank_ops(PipeSchedule::kDualPipe, 2, 4, 1)));
}

// Two receives from one peer swapped in one tick: the sender issues its sends in the order
// the receiver needs them.
TEST(PipelineTicks, SendsFollowTheReceiversOrder) {
  auto ranks = moe::schedule_all_ops(PipeSchedule::kDualPipe, 4, 8);
  auto& ops = ranks[1];  // "a<0 g<0 F0.3&B1.5": an activation and a gradient from rank 0
  size_t at = 0;
  for (size_t i = 0; i + 1 < ops.size() && at == 0; ++i)
    if (ops[i].kind == K::kRecvActivation && ops[i + 1].kind == K::kRecvGradient &&
        ops[i].peer == 0 && ops[i + 1].peer == 0)
      at = i;
  ASSERT_GT(at, 0u);
  const int mb_act = ops[at].mb, mb_grad = ops[at + 1].mb;
  for (int swap = 0; swap < 2; ++swap) {
    if (swap) std::swap(ops[at], ops[at + 1]);
    const PipeTickPlan plan = moe::pipeline_ticks_plan_ops(PipeSchedule::kDualPipe, 4, 8, ranks);
    ASSERT_EQ("", plan.error);
    // Rank 0's tick that sends both: the gradient first once rank 1 receives it first.
    const auto& ops0 = ranks[0];
    int found = 0;
    for (const moe::PipeTick& t : plan.ranks[0]) {
      int a = -1, g = -1;
      for (size_t j = 0; j < t.ops.size(); ++j) {
        const PipeOp& o = ops0[static_cast<size_t>(t.ops[j])];
        if (o.kind == K::kSendActivation && o.mb == mb_act) a = static_cast<int>(j);
        if (o.kind == K::kSendGradient && o.mb == mb_grad) g = static_cast<int>(j);
      }
      if (a < 0 || g < 0) continue;
      ++found;
      if (swap) {
        EXPECT_LT(g, a);
      } else {
        EXPECT_LT(a, g);
      }
    }
    EXPECT_EQ(1, found) << "swap " << swap;
  }
}

// A hand-written pair of 1F1B lists with each "send, receive" pair split by a compute op:
// rank 0 waits in "a>1" and rank 1 in "g>0" (Megatron-LM's send_forward_recv_backward
// exists for this). The plan posts the receives early and runs it.
TEST(PipelineTicks, SplitPairsAreJoinedByEarlyReceives) {
  const PipeOp F0 = op(K::kForward, 0), F1 = op(K::kForward, 1), F2 = op(K::kForward, 2);
  const PipeOp B0 = op(K::kBackward, 0), B1 = op(K::kBackward, 1);
  std::vector<std::vector<PipeOp>> ranks = {
      {F0, op(K::kSendActivation, 0, 1), F1, op(K::kSendActivation, 1, 1), F2,
       op(K::kRecvGradient, 0, 1), B0, op(K::kRecvGradient, 1, 1), B1},
      {op(K::kRecvActivation, 0, 0), F0, B0, op(K::kSendGradient, 0, 0), F2,
       op(K::kRecvActivation, 1, 0), F1, B1, op(K::kSendGradient, 1, 0)}};
  const PipeTickPlan plan = moe::pipeline_ticks_plan_ops(PipeSchedule::k1F1B, 2, 3, ranks);
  EXPECT_EQ("", plan.error);
  EXPECT_GT(plan.moved, 0);
}

// Lists no plan can run: a receive of a message nobody sends, a send nobody receives, and two
// ranks each receiving first what the other sends only afterwards.
TEST(PipelineTicks, BrokenListsAreRefusedWithOneLine) {
  const PipeOp F0 = op(K::kForward, 0), F1 = op(K::kForward, 1), B0 = op(K::kBackward, 0);
  {
    std::vector<std::vector<PipeOp>> ranks = {{F0}, {op(K::kRecvActivation, 1, 0), F1}};
    const std::string e = moe::pipeline_ticks_plan_ops(PipeSchedule::k1F1B, 2, 2, ranks).error;
    EXPECT_EQ("rank 1 receives the activation of stage 1 micro-batch 1 from rank 0, which never "
              "sends it", e);
  }
  {
    std::vector<std::vector<PipeOp>> ranks = {{F0, op(K::kSendActivation, 0, 1)}, {F0}};
    const std::string e = moe::pipeline_ticks_plan_ops(PipeSchedule::k1F1B, 2, 1, ranks).error;
    EXPECT_EQ("rank 0 sends the activation of stage 1 micro-batch 0 to rank 1, which never "
              "receives it", e);
  }
  {
    std::vector<std::vector<PipeOp>> ranks = {
        {op(K::kRecvGradient, 0, 1), B0, F1, op(K::kSendActivation, 1, 1)},
        {op(K::kRecvActivation, 1, 0), F1, B0, op(K::kSendGradient, 0, 0)}};
    const std::string e = moe::pipeline_ticks_plan_ops(PipeSchedule::k1F1B, 2, 2, ranks).error;
    EXPECT_EQ("deadlock under rendezvous sends: rank 0 in tick 0 (g<1), rank 1 in tick 0 (a<0)", e);
  }
}

}  // namespace
