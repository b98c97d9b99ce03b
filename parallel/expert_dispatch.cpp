// Expert-parallel dispatch and combine. Layouts and contracts in expert_dispatch.h.
//
// Dimension letters: ep ranks, E experts, EL = E / ep local experts, C row width, R rows
// received. Every offset is in rows, every byte count widened to int64_t before multiplying.
#include "parallel/expert_dispatch.h"

#include <algorithm>
#include <climits>
#include <cstring>

#include "model/check.h"
#include "model/fp8.h"
#include "model/fp8_quant.h"

namespace moe {

namespace {

// Copies the ep EL blocks of n_rows[b] rows from src + src_off[b] rows to dst + dst_off[b]
// rows. Each destination row has exactly one writer, so the blocks run in parallel.
void copy_blocks(float* dst, const int64_t* dst_off, const float* src, const int64_t* src_off,
                 const int64_t* n_rows, int64_t blocks, int64_t C) {
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n = n_rows[b] * C;
    if (n == 0) continue;  // buffers may be null when nothing moves
    const float* s = src + src_off[b] * C;
    std::copy(s, s + n, dst + dst_off[b] * C);
  }
}

void check_call(const EpPlan& plan, int64_t C, const Comm& comm) {
  CHECK(comm.size() == plan.ep && comm.rank() == plan.rank,
        "plan for rank %d of %d used on rank %d of %d ('%s')", plan.rank, plan.ep, comm.rank(),
        comm.size(), comm.name().c_str());
  CHECK(C >= 0, "C=%lld", (long long)C);
  CHECK(plan.rows_recv <= plan.rows_capacity, "R=%lld rows over capacity %lld",
        (long long)plan.rows_recv, (long long)plan.rows_capacity);
}

}  // namespace

EpPlan ep_plan_create(int ep, int64_t E, int64_t rows_capacity) {
  CHECK(ep >= 1 && E >= 1 && E % ep == 0, "ep=%d must divide E=%lld", ep, (long long)E);
  CHECK(rows_capacity >= 0, "rows_capacity=%lld", (long long)rows_capacity);
  EpPlan p;
  p.ep = ep;
  p.E = E;
  p.EL = E / ep;
  p.rows_capacity = rows_capacity;
  const size_t peers = static_cast<size_t>(ep);
  const size_t blocks = static_cast<size_t>(E);  // ep EL
  p.send_counts.assign(peers, 0);
  p.send_displs.assign(peers, 0);
  p.recv_counts.assign(peers, 0);
  p.recv_displs.assign(peers, 0);
  p.recv_expert_counts.assign(blocks, 0);
  p.block_wire_off.assign(blocks, 0);
  p.block_grouped_off.assign(blocks, 0);
  p.local_offsets.assign(static_cast<size_t>(p.EL + 1), 0);
  return p;
}

void ep_plan_fill(EpPlan& plan, int rank, const int64_t* local_counts,
                  const int64_t* recv_expert_counts) {
  const int ep = plan.ep;
  const int64_t EL = plan.EL;
  CHECK(rank >= 0 && rank < ep, "rank=%d ep=%d", rank, ep);
  CHECK(static_cast<int64_t>(plan.recv_expert_counts.size()) == ep * EL &&
            static_cast<int64_t>(plan.local_offsets.size()) == EL + 1,
        "plan not made by ep_plan_create");
  plan.rank = rank;

  // Send side: xp's rows for peer q are its experts' ranges, contiguous because moe_plan
  // sorted them by global expert.
  int64_t sent = 0;
  for (int q = 0; q < ep; ++q) {
    int64_t n = 0;
    for (int64_t j = 0; j < EL; ++j) {
      const int64_t c = local_counts[q * EL + j];
      CHECK(c >= 0, "local_counts[%lld]=%lld", (long long)(q * EL + j), (long long)c);
      n += c;
    }
    plan.send_displs[static_cast<size_t>(q)] = sent;
    plan.send_counts[static_cast<size_t>(q)] = n;
    sent += n;
  }
  plan.rows_sent = sent;

  // Receive side, wire layout: [sender p][local expert j].
  int64_t recv = 0;
  for (int p = 0; p < ep; ++p) {
    plan.recv_displs[static_cast<size_t>(p)] = recv;
    for (int64_t j = 0; j < EL; ++j) {
      const size_t b = static_cast<size_t>(p * EL + j);
      const int64_t c = recv_expert_counts[b];
      CHECK(c >= 0, "recv_expert_counts[%zu]=%lld from rank %d", b, (long long)c, p);
      plan.recv_expert_counts[b] = c;
      plan.block_wire_off[b] = recv;
      recv += c;
    }
    plan.recv_counts[static_cast<size_t>(p)] = recv - plan.recv_displs[static_cast<size_t>(p)];
  }
  plan.rows_recv = recv;

  // Grouped layout: [local expert j][sender p].
  int64_t row = 0;
  for (int64_t j = 0; j < EL; ++j) {
    plan.local_offsets[static_cast<size_t>(j)] = row;
    for (int p = 0; p < ep; ++p) {
      const size_t b = static_cast<size_t>(p * EL + j);
      plan.block_grouped_off[b] = row;
      row += plan.recv_expert_counts[b];
    }
  }
  plan.local_offsets[static_cast<size_t>(EL)] = row;

  CHECK(recv <= plan.rows_capacity,
        "rank %d receives %lld rows, over the buffers' capacity of %lld", rank, (long long)recv,
        (long long)plan.rows_capacity);
}

void ep_plan(EpPlan& plan, const int64_t* local_counts, Comm& comm) {
  CommRequest r = ep_plan_start(plan, local_counts, comm);
  comm.wait(r);
  ep_plan_finish(plan, local_counts, comm);
}

CommRequest ep_plan_start(EpPlan& plan, const int64_t* local_counts, Comm& comm) {
  CHECK(comm.size() == plan.ep, "plan for ep=%d used on '%s' of %d ranks", plan.ep,
        comm.name().c_str(), comm.size());
  // local_counts is [peer q][q's local expert j], the all_to_all's block order already.
  return comm.all_to_all_start(local_counts, plan.recv_expert_counts.data(), plan.EL);
}

void ep_plan_finish(EpPlan& plan, const int64_t* local_counts, Comm& comm) {
  ep_plan_fill(plan, comm.rank(), local_counts, plan.recv_expert_counts.data());
}

EpWire ep_wire_create(int ep) {
  CHECK(ep >= 1);
  const size_t n = static_cast<size_t>(ep);
  return EpWire{std::vector<int>(n), std::vector<int>(n), std::vector<int>(n), std::vector<int>(n)};
}

void ep_wire_fill(EpWire& w, const EpPlan& plan, int64_t row) {
  CHECK(static_cast<int>(w.send_bytes.size()) == plan.ep, "wire for ep=%zu used with ep=%d",
        w.send_bytes.size(), plan.ep);
  auto bytes = [&](int64_t rows) {
    const int64_t b = rows * row;
    CHECK(b <= INT_MAX, "expert exchange message of %lld bytes is over 2 GiB", (long long)b);
    return static_cast<int>(b);
  };
  for (size_t q = 0; q < static_cast<size_t>(plan.ep); ++q) {
    w.send_bytes[q] = bytes(plan.send_counts[q]);
    w.send_displs[q] = bytes(plan.send_displs[q]);
    w.recv_bytes[q] = bytes(plan.recv_counts[q]);
    w.recv_displs[q] = bytes(plan.recv_displs[q]);
  }
}

CommRequest ep_dispatch_start(float* scratch, const float* xp, const EpPlan& plan, int64_t C,
                              EpWire& wire, Comm& comm) {
  check_call(plan, C, comm);
  ep_wire_fill(wire, plan, ep_dispatch_row_bytes(EpWireFormat::kFloat, C));
  return comm.all_to_all_v_start(xp, wire.send_bytes.data(), wire.send_displs.data(), scratch,
                                 wire.recv_bytes.data(), wire.recv_displs.data());
}

void ep_dispatch_finish(float* x_grouped, const float* scratch, const EpPlan& plan, int64_t C) {
  copy_blocks(x_grouped, plan.block_grouped_off.data(), scratch, plan.block_wire_off.data(),
              plan.recv_expert_counts.data(), plan.ep * plan.EL, C);
}

CommRequest ep_combine_start(float* yp, float* scratch, const float* y_grouped,
                             const EpPlan& plan, int64_t C, EpWire& wire, Comm& comm) {
  check_call(plan, C, comm);
  copy_blocks(scratch, plan.block_wire_off.data(), y_grouped, plan.block_grouped_off.data(),
              plan.recv_expert_counts.data(), plan.ep * plan.EL, C);
  ep_wire_fill(wire, plan, ep_combine_row_bytes(EpWireFormat::kFloat, C));
  // The dispatch's all_to_all_v with the sides swapped.
  return comm.all_to_all_v_start(scratch, wire.recv_bytes.data(), wire.recv_displs.data(), yp,
                                 wire.send_bytes.data(), wire.send_displs.data());
}

void ep_dispatch(float* x_grouped, float* scratch, const float* xp, const EpPlan& plan,
                 int64_t C, Comm& comm) {
  EpWire wire = ep_wire_create(plan.ep);
  CommRequest r = ep_dispatch_start(scratch, xp, plan, C, wire, comm);
  comm.wait(r);
  ep_dispatch_finish(x_grouped, scratch, plan, C);
}

void ep_combine(float* yp, float* scratch, const float* y_grouped, const EpPlan& plan, int64_t C,
                Comm& comm) {
  EpWire wire = ep_wire_create(plan.ep);
  CommRequest r = ep_combine_start(yp, scratch, y_grouped, plan, C, wire, comm);
  comm.wait(r);
}

int64_t ep_rows_sent_remote(const EpPlan& plan) {
  return plan.rows_sent - plan.send_counts[static_cast<size_t>(plan.rank)];
}

int64_t ep_rows_recv_remote(const EpPlan& plan) {
  return plan.rows_recv - plan.recv_counts[static_cast<size_t>(plan.rank)];
}

int64_t ep_bytes_sent(const EpPlan& plan, int64_t C) {
  return ep_rows_sent_remote(plan) * ep_dispatch_row_bytes(EpWireFormat::kFloat, C);
}

// ---- Wire formats ----

namespace {

int64_t tiles_per_row(int64_t C) { return (C + kTileAct.cols - 1) / kTileAct.cols; }

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelMin = 1 << 14;
// BF16 elements converted per step through a local array, then memcpy'd: the wire is bytes
// at any offset, so it is never read or written as uint16_t.
constexpr int64_t kBf16Chunk = 512;

// The per-row FP32 scales, between the compact (rows, nt) array fp8_quantize_ld writes /
// fp8_dequantize_ld reads and the tails of the wire rows (byte offset C of each row).
void scales_to_wire(uint8_t* wire, const float* scales, int64_t rows, int64_t C) {
  const int64_t nt = tiles_per_row(C), rb = ep_dispatch_row_bytes(EpWireFormat::kFp8Bf16, C);
  const size_t bytes = static_cast<size_t>(nt) * sizeof(float);
#pragma omp parallel for schedule(static) if (rows * nt >= kParallelMin)
  for (int64_t r = 0; r < rows; ++r) std::memcpy(wire + r * rb + C, scales + r * nt, bytes);
}

void scales_from_wire(float* scales, const uint8_t* wire, int64_t rows, int64_t C) {
  const int64_t nt = tiles_per_row(C), rb = ep_dispatch_row_bytes(EpWireFormat::kFp8Bf16, C);
  const size_t bytes = static_cast<size_t>(nt) * sizeof(float);
#pragma omp parallel for schedule(static) if (rows * nt >= kParallelMin)
  for (int64_t r = 0; r < rows; ++r) std::memcpy(scales + r * nt, wire + r * rb + C, bytes);
}

// n contiguous floats <-> n BF16 at dst / src (2 n bytes, any alignment).
void bf16_encode(uint8_t* dst, const float* x, int64_t n) {
  uint16_t h[kBf16Chunk];
  for (int64_t i0 = 0; i0 < n; i0 += kBf16Chunk) {
    const int64_t m = std::min(kBf16Chunk, n - i0);
    for (int64_t i = 0; i < m; ++i) h[i] = bf16_from_float(x[i0 + i]);
    std::memcpy(dst + 2 * i0, h, static_cast<size_t>(m) * sizeof(uint16_t));
  }
}

void bf16_decode(float* x, const uint8_t* src, int64_t n) {
  uint16_t h[kBf16Chunk];
  for (int64_t i0 = 0; i0 < n; i0 += kBf16Chunk) {
    const int64_t m = std::min(kBf16Chunk, n - i0);
    std::memcpy(h, src + 2 * i0, static_cast<size_t>(m) * sizeof(uint16_t));
    for (int64_t i = 0; i < m; ++i) x[i0 + i] = bf16_to_float(h[i]);
  }
}

// The compact starts' checks: the float ones, and N K rows must fit the buffers too.
void check_compact_call(const EpPlan& plan, int64_t C, const Comm& comm) {
  check_call(plan, C, comm);
  CHECK(plan.rows_sent <= plan.rows_capacity, "N K=%lld rows over capacity %lld",
        (long long)plan.rows_sent, (long long)plan.rows_capacity);
}

}  // namespace

const char* ep_wire_format_name(EpWireFormat f) {
  switch (f) {
    case EpWireFormat::kFloat: return "float";
    case EpWireFormat::kFp8Bf16: return "fp8-dispatch/bf16-combine";
  }
  return "?";
}

int64_t ep_dispatch_row_bytes(EpWireFormat f, int64_t C) {
  CHECK(C >= 0, "C=%lld", (long long)C);
  if (f == EpWireFormat::kFloat) return C * static_cast<int64_t>(sizeof(float));
  return C + tiles_per_row(C) * static_cast<int64_t>(sizeof(float));
}

int64_t ep_combine_row_bytes(EpWireFormat f, int64_t C) {
  CHECK(C >= 0, "C=%lld", (long long)C);
  if (f == EpWireFormat::kFloat) return C * static_cast<int64_t>(sizeof(float));
  return C * static_cast<int64_t>(sizeof(uint16_t));
}

int64_t ep_wire_bytes(EpWireFormat f, int64_t rows, int64_t C) {
  CHECK(rows >= 0, "rows=%lld", (long long)rows);
  return rows * std::max(ep_dispatch_row_bytes(f, C), ep_combine_row_bytes(f, C));
}

int64_t ep_wire_scale_count(int64_t rows, int64_t C) {
  CHECK(rows >= 0 && C >= 0, "rows=%lld C=%lld", (long long)rows, (long long)C);
  return rows * tiles_per_row(C);
}

CommRequest ep_dispatch_fp8_start(uint8_t* recv_wire, uint8_t* send_wire, float* scales,
                                  const float* xp, const EpPlan& plan, int64_t C, EpWire& wire,
                                  Comm& comm) {
  check_compact_call(plan, C, comm);
  const int64_t rb = ep_dispatch_row_bytes(EpWireFormat::kFp8Bf16, C);
  if (plan.rows_sent > 0) {
    // Codes straight from xp into the rows' heads; the scales through `scales` to the tails.
    fp8_quantize_ld(send_wire, rb, scales, xp, C, plan.rows_sent, C, kTileAct);
    scales_to_wire(send_wire, scales, plan.rows_sent, C);
  }
  ep_wire_fill(wire, plan, rb);
  return comm.all_to_all_v_start(send_wire, wire.send_bytes.data(), wire.send_displs.data(),
                                 recv_wire, wire.recv_bytes.data(), wire.recv_displs.data());
}

void ep_dispatch_fp8_finish(float* x_grouped, float* scales, const uint8_t* recv_wire,
                            const EpPlan& plan, int64_t C) {
  const int64_t rb = ep_dispatch_row_bytes(EpWireFormat::kFp8Bf16, C), nt = tiles_per_row(C);
  if (plan.rows_recv == 0) return;
  scales_from_wire(scales, recv_wire, plan.rows_recv, C);
  // Block by block from the wire layout into the grouped one; each call splits its rows over
  // the threads itself.
  for (int64_t b = 0; b < plan.ep * plan.EL; ++b) {
    const size_t i = static_cast<size_t>(b);
    const int64_t n = plan.recv_expert_counts[i], w = plan.block_wire_off[i];
    if (n == 0) continue;
    fp8_dequantize_ld(x_grouped + plan.block_grouped_off[i] * C, C, recv_wire + w * rb, rb,
                      scales + w * nt, n, C, kTileAct);
  }
}

CommRequest ep_combine_bf16_start(uint8_t* recv_wire, uint8_t* send_wire,
                                  const float* y_grouped, const EpPlan& plan, int64_t C,
                                  EpWire& wire, Comm& comm) {
  check_compact_call(plan, C, comm);
  const int64_t rb = ep_combine_row_bytes(EpWireFormat::kFp8Bf16, C);
  // Grouped layout -> wire layout, rounded on the way; a block's rows are contiguous on both
  // sides and each block has one writer.
  const int64_t blocks = plan.ep * plan.EL;
#pragma omp parallel for schedule(dynamic) if (plan.rows_recv * C >= kParallelMin)
  for (int64_t b = 0; b < blocks; ++b) {
    const size_t i = static_cast<size_t>(b);
    const int64_t n = plan.recv_expert_counts[i];
    if (n == 0) continue;
    bf16_encode(send_wire + plan.block_wire_off[i] * rb, y_grouped + plan.block_grouped_off[i] * C,
                n * C);
  }
  ep_wire_fill(wire, plan, rb);
  // The dispatch's all_to_all_v with the sides swapped.
  return comm.all_to_all_v_start(send_wire, wire.recv_bytes.data(), wire.recv_displs.data(),
                                 recv_wire, wire.send_bytes.data(), wire.send_displs.data());
}

void ep_combine_bf16_finish(float* yp, const uint8_t* recv_wire, const EpPlan& plan, int64_t C) {
  const int64_t rb = ep_combine_row_bytes(EpWireFormat::kFp8Bf16, C);
  const int64_t rows = plan.rows_sent;
#pragma omp parallel for schedule(static) if (rows * C >= kParallelMin)
  for (int64_t r = 0; r < rows; ++r) bf16_decode(yp + r * C, recv_wire + r * rb, C);
}

void EpPlan::check_validity() const {
  CHECK(ep >= 1 && E >= 1 && EL * ep == E, "ep=%d E=%lld EL=%lld", ep, (long long)E,
        (long long)EL);
  CHECK(rank >= 0 && rank < ep, "rank=%d ep=%d", rank, ep);
  const size_t peers = static_cast<size_t>(ep), blocks = static_cast<size_t>(E);
  CHECK(send_counts.size() == peers && send_displs.size() == peers &&
        recv_counts.size() == peers && recv_displs.size() == peers);
  CHECK(recv_expert_counts.size() == blocks && block_wire_off.size() == blocks &&
        block_grouped_off.size() == blocks && local_offsets.size() == static_cast<size_t>(EL + 1));
  int64_t s = 0, r = 0;
  for (size_t q = 0; q < peers; ++q) {
    CHECK(send_counts[q] >= 0 && send_displs[q] == s, "peer %zu send", q);
    CHECK(recv_counts[q] >= 0 && recv_displs[q] == r, "peer %zu recv", q);
    s += send_counts[q];
    r += recv_counts[q];
  }
  CHECK(s == rows_sent && r == rows_recv, "sent %lld/%lld recv %lld/%lld", (long long)s,
        (long long)rows_sent, (long long)r, (long long)rows_recv);
  CHECK(rows_recv <= rows_capacity);
  CHECK(local_offsets[0] == 0 && local_offsets[static_cast<size_t>(EL)] == rows_recv);
  for (int64_t j = 0; j < EL; ++j) {
    int64_t row = local_offsets[static_cast<size_t>(j)];
    for (int p = 0; p < ep; ++p) {
      const size_t b = static_cast<size_t>(p * EL + j);
      CHECK(block_grouped_off[b] == row, "block (%d, %lld) grouped", p, (long long)j);
      row += recv_expert_counts[b];
    }
    CHECK(local_offsets[static_cast<size_t>(j + 1)] == row, "local expert %lld", (long long)j);
  }
  for (int p = 0; p < ep; ++p) {
    int64_t row = recv_displs[static_cast<size_t>(p)];
    for (int64_t j = 0; j < EL; ++j) {
      const size_t b = static_cast<size_t>(p * EL + j);
      CHECK(block_wire_off[b] == row, "block (%d, %lld) wire", p, (long long)j);
      row += recv_expert_counts[b];
    }
    CHECK(row == recv_displs[static_cast<size_t>(p)] + recv_counts[static_cast<size_t>(p)]);
  }
}

std::string EpPlan::to_string() const {
  std::string s = strprintf("EpPlan{rank %d of ep %d, E=%lld EL=%lld, sent %lld rows, recv %lld "
                            "of %lld rows; send",
                            rank, ep, (long long)E, (long long)EL, (long long)rows_sent,
                            (long long)rows_recv, (long long)rows_capacity);
  for (int64_t c : send_counts) s += strprintf(" %lld", (long long)c);
  s += "; recv";
  for (int64_t c : recv_counts) s += strprintf(" %lld", (long long)c);
  s += "; local experts";
  for (int64_t j = 0; j < EL; ++j)
    s += strprintf(" %lld", (long long)(local_offsets[static_cast<size_t>(j + 1)] -
                                        local_offsets[static_cast<size_t>(j)]));
  return s + "}";
}

}  // namespace moe
