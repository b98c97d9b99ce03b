#include "parallel/expert_dispatch_device.h"

#include "model/check.h"
#include "model/fp8_quant.h"

namespace moe {

namespace {

void check_device_call(const EpPlan& plan, int64_t C, const Comm& comm) {
  CHECK(comm.size() == plan.ep && comm.rank() == plan.rank,
        "plan for rank %d of %d used on rank %d of %d ('%s')", plan.rank, plan.ep, comm.rank(),
        comm.size(), comm.name().c_str());
  CHECK(C >= 1, "C=%lld", (long long)C);
  CHECK(plan.rows_recv <= plan.rows_capacity && plan.rows_sent <= plan.rows_capacity,
        "N K=%lld / R=%lld rows over capacity %lld", (long long)plan.rows_sent,
        (long long)plan.rows_recv, (long long)plan.rows_capacity);
}

// Calls f(rows, wire row, grouped row) for each block (sender p, local expert j) with rows.
template <typename F>
void for_each_block(const EpPlan& plan, F&& f) {
  for (int64_t b = 0; b < plan.ep * plan.EL; ++b) {
    const size_t i = static_cast<size_t>(b);
    const int64_t n = plan.recv_expert_counts[i];
    if (n > 0) f(n, plan.block_wire_off[i], plan.block_grouped_off[i]);
  }
}

CommRequest all_to_all_v(const void* send, void* recv, const EpWire& w, bool swapped, Comm& comm) {
  if (!swapped)
    return comm.all_to_all_v_start(send, w.send_bytes.data(), w.send_displs.data(), recv,
                                   w.recv_bytes.data(), w.recv_displs.data());
  return comm.all_to_all_v_start(send, w.recv_bytes.data(), w.recv_displs.data(), recv,
                                 w.send_bytes.data(), w.send_displs.data());
}

}  // namespace

void ep_device_buffers_carve(EpDeviceBuffers& b, Carver& c, EpWireFormat f, int64_t rows,
                             int64_t C) {
  CHECK(rows >= 0 && C >= 1, "rows=%lld C=%lld", (long long)rows, (long long)C);
  b = EpDeviceBuffers{};
  const size_t n = static_cast<size_t>(rows * C);
  if (f == EpWireFormat::kFloat) {
    b.scratch = c.take<float>(n);
    return;
  }
  b.send = c.take<uint8_t>(n * sizeof(uint16_t));
  b.recv = c.take<uint8_t>(n * sizeof(uint16_t));
  const size_t scales = static_cast<size_t>(ep_wire_scale_count(rows, C));
  b.scales_send = c.take<float>(scales);
  b.scales_recv = c.take<float>(scales);
}

EpDeviceWire ep_device_wire_create(int ep) { return {ep_wire_create(ep), ep_wire_create(ep)}; }

void ep_dispatch_device_start(CommRequest& req, CommRequest& req_scales, EpDeviceBuffers& b,
                              const float* xp, const EpPlan& plan, int64_t C, EpWireFormat f,
                              EpDeviceWire& w, Ops<float>& ops, Comm& comm) {
  check_device_call(plan, C, comm);
  req_scales = CommRequest{};
  if (f == EpWireFormat::kFloat) {
    ep_wire_fill(w.rows, plan, C * static_cast<int64_t>(sizeof(float)));
    req = all_to_all_v(xp, b.scratch, w.rows, false, comm);
    return;
  }
  // Codes (rows, C) and scales (rows, nt) in xp's order; sorted by destination already.
  if (plan.rows_sent > 0) ops.fp8_quantize(b.send, b.scales_send, xp, plan.rows_sent, C, kTileAct);
  ep_wire_fill(w.rows, plan, C);
  ep_wire_fill(w.scales, plan, ep_wire_scale_count(1, C) * static_cast<int64_t>(sizeof(float)));
  req = all_to_all_v(b.send, b.recv, w.rows, false, comm);
  req_scales = all_to_all_v(b.scales_send, b.scales_recv, w.scales, false, comm);
}

void ep_dispatch_device_finish(float* x_grouped, const EpDeviceBuffers& b, const EpPlan& plan,
                               int64_t C, EpWireFormat f, Ops<float>& ops) {
  if (f == EpWireFormat::kFloat) {
    for_each_block(plan, [&](int64_t n, int64_t wire, int64_t grouped) {
      ops.copy(x_grouped + grouped * C, b.scratch + wire * C,
               static_cast<size_t>(n * C) * sizeof(float));
    });
    return;
  }
  const int64_t nt = ep_wire_scale_count(1, C);
  for_each_block(plan, [&](int64_t n, int64_t wire, int64_t grouped) {
    ops.fp8_dequantize(x_grouped + grouped * C, b.recv + wire * C, b.scales_recv + wire * nt, n, C,
                       kTileAct);
  });
}

void ep_combine_device_start(CommRequest& req, CommRequest& req_scales, float* yp,
                             EpDeviceBuffers& b, const float* y_grouped, const EpPlan& plan,
                             int64_t C, EpWireFormat f, EpDeviceWire& w, Ops<float>& ops,
                             Comm& comm) {
  check_device_call(plan, C, comm);
  req_scales = CommRequest{};
  // Grouped layout -> wire layout (rounded to BF16 on the way), then the dispatch's
  // all_to_all_v with the sides swapped, back into xp's order.
  if (f == EpWireFormat::kFloat) {
    for_each_block(plan, [&](int64_t n, int64_t wire, int64_t grouped) {
      ops.copy(b.scratch + wire * C, y_grouped + grouped * C,
               static_cast<size_t>(n * C) * sizeof(float));
    });
    ep_wire_fill(w.rows, plan, C * static_cast<int64_t>(sizeof(float)));
    req = all_to_all_v(b.scratch, yp, w.rows, true, comm);
    return;
  }
  uint16_t* send = reinterpret_cast<uint16_t*>(b.send);
  for_each_block(plan, [&](int64_t n, int64_t wire, int64_t grouped) {
    ops.bf16_encode(send + wire * C, nullptr, y_grouped + grouped * C, n * C);
  });
  ep_wire_fill(w.rows, plan, C * static_cast<int64_t>(sizeof(uint16_t)));
  req = all_to_all_v(b.send, b.recv, w.rows, true, comm);
}

void ep_combine_device_finish(float* yp, const EpDeviceBuffers& b, const EpPlan& plan, int64_t C,
                              EpWireFormat f, Ops<float>& ops) {
  if (f == EpWireFormat::kFloat || plan.rows_sent == 0) return;
  ops.bf16_decode(yp, reinterpret_cast<const uint16_t*>(b.recv), plan.rows_sent * C);
}

}  // namespace moe
