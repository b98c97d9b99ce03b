// Expert-parallel dispatch and combine: moving moe_plan's permuted rows to the ranks that own
// their experts, and the results back.
//
// Dimension letters: ep ranks in the expert-parallel group, E routed experts (global),
// EL = E / ep local experts per rank, N tokens on this rank, K slots per token, C row width
// (floats), R rows received by this rank.
//
// Ownership: rank p of the EP group owns global experts [p EL, (p + 1) EL); its local expert j
// is global expert p EL + j.
//
// Layouts (written down once; the tests check each of them row by row):
//  - xp (N K, C), "sender layout": moe_plan's permuted rows, sorted by (global expert, token,
//    slot). Sorted by expert means sorted by destination rank, so the rows for rank q are the
//    contiguous range [send_displs[q], send_displs[q] + send_counts[q]); within it, the rows
//    of q's local expert j come in order of j. xp is sent as is (kFloat) or encoded row by
//    row in the same order (send_wire, compact formats).
//  - scratch (R, C), "wire layout": what all_to_all_v delivers, blocks [sender p][local expert
//    j] in that order; block (p, j) holds recv_expert_counts[p EL + j] rows and starts at row
//    block_wire_off[p EL + j]; sender p's blocks start at recv_displs[p]. The compact formats
//    keep the same row order in byte buffers with their own row size (EpWireFormat).
//  - x_grouped (R, C), "grouped layout": what the local experts compute on. Local expert j
//    owns the contiguous rows [local_offsets[j], local_offsets[j + 1]); inside them the rows
//    come from senders in rank order, each sender's rows in the sender's (token, slot) order.
//    Block (p, j) starts at row block_grouped_off[p EL + j]. An expert with no rows has an
//    empty range. No padding; no row is ever dropped.
//
// Forward:  x_grouped = ep_dispatch(xp)   experts: y_grouped   yp = ep_combine(y_grouped),
// then moe_combine_forward(out, yp, ...) unchanged. Backward reuses the same plan:
// dy_grouped = ep_dispatch(dyp), dxp = ep_combine(dx_grouped).
//
// Collectives: ep_plan makes one all_to_all of EL int64 per peer; ep_dispatch and ep_combine
// one all_to_all_v each. All ranks of the group call them together with the same C and wire
// format. The split forms allocate nothing after ep_plan_create / ep_wire_create; results are
// deterministic (kFloat: copies only, no arithmetic; compact: each row rounded on its own).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "parallel/comm.h"

namespace moe {

// The dispatch problem of one micro-batch on one rank: sized at creation (ep, E, capacity),
// filled by ep_plan each time the routing changes. Printable (to_string) and self-checking
// (check_validity).
struct EpPlan {
  int ep = 1;                 // ranks in the EP group
  int rank = 0;               // this rank in the EP group
  int64_t E = 0;              // routed experts, global
  int64_t EL = 0;             // local experts per rank, E / ep
  int64_t rows_capacity = 0;  // rows that x_grouped / y_grouped / scratch hold (>= R)

  int64_t rows_sent = 0;      // N K: rows of xp, all sent (to self included)
  int64_t rows_recv = 0;      // R: rows of x_grouped, all received (from self included)

  // Per peer (ep), in rows:
  std::vector<int64_t> send_counts, send_displs;  // into xp
  std::vector<int64_t> recv_counts, recv_displs;  // into scratch (wire layout)
  // Per (sender p, local expert j), index p EL + j (ep EL):
  std::vector<int64_t> recv_expert_counts;  // rows p sends for local expert j
  std::vector<int64_t> block_wire_off;      // first row of block (p, j) in the wire layout
  std::vector<int64_t> block_grouped_off;   // first row of block (p, j) in the grouped layout
  // Per local expert (EL + 1): local expert j owns grouped rows [local_offsets[j],
  // local_offsets[j + 1]); local_offsets[EL] = R.
  std::vector<int64_t> local_offsets;

  // Every invariant between the fields above (CHECK on failure).
  void check_validity() const;
  std::string to_string() const;
};

// Worst case of R: every rank of the group sends all its N K rows here. N is the largest
// token count of any rank in the group.
inline int64_t ep_rows_worst_case(int ep, int64_t N, int64_t K) {
  return static_cast<int64_t>(ep) * N * K;
}

// Sizes every vector once (ep, EL); ep must divide E. rows_capacity: rows each grouped /
// scratch buffer the caller passes to ep_dispatch / ep_combine holds; ep_rows_worst_case
// is always enough.
EpPlan ep_plan_create(int ep, int64_t E, int64_t rows_capacity);

// Host-side planning, no communication:
//   local_counts (E): rows of xp per global expert (moe_plan's counts);
//   recv_expert_counts (ep EL): from every sender p, its local_counts[rank EL + j] at p EL + j
//   (what the all_to_all in ep_plan delivers). Fills every field of plan for this rank.
void ep_plan_fill(EpPlan& plan, int rank, const int64_t* local_counts,
                  const int64_t* recv_expert_counts);

// The plan of one micro-batch: exchanges per-expert counts (one all_to_all of EL int64 per
// peer, sent straight from local_counts, whose [peer][local expert] order is the all_to_all's
// block order) and fills plan. comm is the EP group: comm.size() == plan.ep.
//   local_counts (E): moe_plan's counts on this rank.
void ep_plan(EpPlan& plan, const int64_t* local_counts, Comm& comm);

// Data movement (one all_to_all_v each):
//   ep_dispatch: x_grouped (R, C) <- xp (N K, C), through scratch (R, C) in the wire layout.
//   ep_combine:  yp (N K, C) <- y_grouped (R, C), through scratch (R, C); the exact reverse,
//                so yp comes back in xp's row order.
// x_grouped / y_grouped and scratch hold plan.rows_capacity rows of C floats and must not
// overlap each other or xp / yp. These blocking forms allocate their byte counts (tests and
// tools); the trainer uses the split forms below.
void ep_dispatch(float* x_grouped, float* scratch, const float* xp, const EpPlan& plan,
                 int64_t C, Comm& comm);
void ep_combine(float* yp, float* scratch, const float* y_grouped, const EpPlan& plan, int64_t C,
                Comm& comm);

// Split forms, so computation can run while an exchange is in flight: *_start posts the
// non-blocking collective and returns its request; the caller waits it (Comm::wait), then
// calls *_finish where there is one. Between start and wait every buffer named, the plan
// and the wire stay untouched. All ranks of the group start in the same order.
//   ep_plan_start / ep_plan_finish: ep_plan (local_counts stays untouched until finish).
//   ep_dispatch_start / ep_dispatch_finish: ep_dispatch (the finish unpacks the wire layout).
//   ep_combine_start: ep_combine (nothing to finish).
// EpWire holds the per-peer byte counts MPI reads until the collective completes.
struct EpWire {
  std::vector<int> send_bytes, send_displs, recv_bytes, recv_displs;  // (ep)
};
EpWire ep_wire_create(int ep);
// The byte counts and displacements of the plan's all_to_all_v with `row` bytes a row, the
// sender's side in send_*, the receiver's in recv_* (a combine swaps them). Every per-peer
// message and offset must stay under 2 GiB (MPI's ints).
void ep_wire_fill(EpWire& w, const EpPlan& plan, int64_t row);
CommRequest ep_plan_start(EpPlan& plan, const int64_t* local_counts, Comm& comm);
void ep_plan_finish(EpPlan& plan, const int64_t* local_counts, Comm& comm);
CommRequest ep_dispatch_start(float* scratch, const float* xp, const EpPlan& plan, int64_t C,
                              EpWire& wire, Comm& comm);
void ep_dispatch_finish(float* x_grouped, const float* scratch, const EpPlan& plan, int64_t C);
CommRequest ep_combine_start(float* yp, float* scratch, const float* y_grouped,
                             const EpPlan& plan, int64_t C, EpWire& wire, Comm& comm);

// Bytes this rank sends to other ranks (itself excluded) in one ep_dispatch of C floats per
// row; ep_combine receives the same amount.
int64_t ep_bytes_sent(const EpPlan& plan, int64_t C);
// Rows one dispatch sends to other ranks (itself excluded), and rows one combine sends to
// other ranks (the rows they dispatched here). Times a format's row bytes: bytes on the wire.
int64_t ep_rows_sent_remote(const EpPlan& plan);
int64_t ep_rows_recv_remote(const EpPlan& plan);

// ---- Wire formats ----
// What a row becomes between the ranks (DeepSeek-V3 report, section 3.3.3: "quantize the
// activation before MoE up-projections into FP8 and then apply dispatch ... retain combine in
// BF16"). Forward and backward alike: every dispatch (xp, dyp) uses the dispatch encoding,
// every combine (y_grouped, dx_grouped) the combine encoding.
//  - kFloat: C floats as they are, 4 C bytes a row both ways (the functions above).
//  - kFp8Bf16: dispatch row = C E4M3 codes, then the row's ceil(C / 128) FP32 scales of
//    model/fp8_quant.h's 1x128 tiles (kTileAct), C + 4 ceil(C / 128) bytes, no padding: the
//    scales sit at any byte offset and are moved with memcpy. The sender quantizes, the
//    receiver decodes, so a received row is fp8_fake_quantize(row, 1, C, kTileAct) bit for
//    bit. Combine row = C BF16 (round to nearest even, model/fp8.h), 2 C bytes; received =
//    bf16_round(sent) bit for bit. Rows a rank sends itself take the same path, so results do
//    not depend on where the experts live.
enum class EpWireFormat { kFloat, kFp8Bf16 };
const char* ep_wire_format_name(EpWireFormat f);
int64_t ep_dispatch_row_bytes(EpWireFormat f, int64_t C);
int64_t ep_combine_row_bytes(EpWireFormat f, int64_t C);
// Bytes each of send_wire / recv_wire below needs for `rows` rows in either direction, and the
// floats of the scales scratch.
int64_t ep_wire_bytes(EpWireFormat f, int64_t rows, int64_t C);
int64_t ep_wire_scale_count(int64_t rows, int64_t C);

// Split forms of the kFp8Bf16 wire; contract as the float split forms, plus a finish for the
// combine. Buffers, none overlapping another:
//   send_wire, recv_wire: ep_wire_bytes(kFp8Bf16, plan.rows_capacity, C) bytes each;
//   scales: ep_wire_scale_count(plan.rows_capacity, C) floats of scratch.
// NOTE: both directions move rows_sent (N K) and rows_recv (R) rows through them, so
// plan.rows_capacity must bound N K as well as R (ep_rows_worst_case and moe_rows_max do).
//   ep_dispatch_fp8_start: quantizes xp (N K, C) straight into send_wire (xp's order) and
//     posts the all_to_all_v into recv_wire (wire layout); xp and scales may be reused once
//     it returns, send_wire and recv_wire only after the wait.
//   ep_dispatch_fp8_finish: decodes recv_wire straight into x_grouped (R, C), grouped layout.
//   ep_combine_bf16_start: rounds y_grouped (R, C) into send_wire in the wire layout, posts
//     the all_to_all_v into recv_wire (xp's order); y_grouped may be reused once it returns.
//   ep_combine_bf16_finish: widens recv_wire into yp (N K, C).
CommRequest ep_dispatch_fp8_start(uint8_t* recv_wire, uint8_t* send_wire, float* scales,
                                  const float* xp, const EpPlan& plan, int64_t C, EpWire& wire,
                                  Comm& comm);
void ep_dispatch_fp8_finish(float* x_grouped, float* scales, const uint8_t* recv_wire,
                            const EpPlan& plan, int64_t C);
CommRequest ep_combine_bf16_start(uint8_t* recv_wire, uint8_t* send_wire,
                                  const float* y_grouped, const EpPlan& plan, int64_t C,
                                  EpWire& wire, Comm& comm);
void ep_combine_bf16_finish(float* yp, const uint8_t* recv_wire, const EpPlan& plan, int64_t C);

}  // namespace moe
