#include "parallel/expert_exchange.h"

#include <algorithm>

#include "model/check.h"
#include "model/wall_clock.h"

namespace moe {

int64_t ep_exchange_buffer_bytes(EpWireFormat format, int64_t rows_capacity, int64_t C,
                                 int lanes, bool device) {
  CHECK(rows_capacity >= 0 && C >= 1 && lanes >= 1);
  if (device) {
    Carver c;
    EpDeviceBuffers b;
    for (int l = 0; l < lanes; ++l) ep_device_buffers_carve(b, c, format, rows_capacity, C);
    return static_cast<int64_t>(c.used());
  }
  const int64_t lane =
      format == EpWireFormat::kFloat
          ? rows_capacity * C * static_cast<int64_t>(sizeof(float))
          : 2 * ep_wire_bytes(format, rows_capacity, C) +
                ep_wire_scale_count(rows_capacity, C) * static_cast<int64_t>(sizeof(float));
  return lanes * lane;
}

int64_t EpExchange::buffer_bytes() const {
  if (ops_) return static_cast<int64_t>(device_arena_.bytes());
  int64_t n = 0;
  for (const Lane& ln : lanes_)
    n += static_cast<int64_t>(ln.scratch.size() * sizeof(float) + ln.send_wire.size() +
                              ln.recv_wire.size() + ln.scales.size() * sizeof(float));
  return n;
}

EpExchange::EpExchange(Comm& comm, int64_t E, int64_t n_keys, int64_t rows_capacity, int64_t C,
                       int n_lanes, EpWireFormat format)
    : comm_(comm), rows_capacity_(rows_capacity), C_max_(C), format_(format) {
  CHECK(n_keys >= 0 && C >= 1 && n_lanes >= 1);
  for (int64_t k = 0; k < n_keys; ++k)
    plans_.push_back(ep_plan_create(comm.size(), E, rows_capacity));
  lanes_.resize(static_cast<size_t>(n_lanes));
  for (Lane& ln : lanes_) {
    ln.wire = ep_wire_create(comm.size());
    if (format == EpWireFormat::kFloat) {
      ln.scratch.assign(static_cast<size_t>(rows_capacity * C), 0.0f);
    } else {
      const size_t bytes = static_cast<size_t>(ep_wire_bytes(format, rows_capacity, C));
      ln.send_wire.assign(bytes, 0);
      ln.recv_wire.assign(bytes, 0);
      ln.scales.assign(static_cast<size_t>(ep_wire_scale_count(rows_capacity, C)), 0.0f);
    }
  }
}

void EpExchange::set_device(Ops<float>& ops, Comm& device_comm, Device arena_device) {
  CHECK(device_comm.size() == comm_.size() && device_comm.rank() == comm_.rank(),
        "device communicator '%s' is not a twin of '%s'", device_comm.name().c_str(),
        comm_.name().c_str());
  ops_ = &ops;
  device_comm_ = &device_comm;
  device_arena_ = arena_build("expert exchange", [&](Carver& c) {
    for (Lane& ln : lanes_) ep_device_buffers_carve(ln.dev, c, format_, rows_capacity_, C_max_);
  }, arena_device);
  for (Lane& ln : lanes_) {
    // The host path's buffers are not used any more.
    ln.scratch = std::vector<float>();
    ln.send_wire = ln.recv_wire = std::vector<uint8_t>();
    ln.scales = std::vector<float>();
    ln.dev_wire = ep_device_wire_create(comm_.size());
    ln.ids_host.assign(static_cast<size_t>(rows_capacity_), 0);
  }
}

EpExchange::Lane& EpExchange::lane_at(int lane) {
  CHECK(lane >= 0 && lane < lanes(), "lane %d of %d", lane, lanes());
  return lanes_[static_cast<size_t>(lane)];
}

EpExchange::Lane& EpExchange::lane_idle(int lane, int64_t key) {
  CHECK(key >= 0 && key < static_cast<int64_t>(plans_.size()), "key %lld of %zu",
        (long long)key, plans_.size());
  Lane& ln = lane_at(lane);
  CHECK(ln.op == Op::kNone, "lane %d already has an exchange in flight", lane);
  ln.key = key;
  int busy = 1;
  for (const Lane& other : lanes_) busy += other.op != Op::kNone;
  max_in_flight_ = std::max(max_in_flight_, busy);
  return ln;
}

void EpExchange::plan_start(int lane, int64_t key, const int64_t* counts,
                            const int32_t* expert_ids, int64_t N, int64_t K) {
  Lane& ln = lane_idle(lane, key);
  ln.op = Op::kPlan;
  ln.counts = counts;
  ln.expert_ids = count_least_ ? expert_ids : nullptr;
  ln.N = N;
  ln.K = K;
  if (ops_ && count_least_) {  // the routing is the backend's memory: read it back to count
    CHECK(static_cast<size_t>(N * K) <= ln.ids_host.size());
    ops_->download(ln.ids_host.data(), expert_ids, static_cast<size_t>(N * K) * sizeof(int32_t));
    ln.expert_ids = ln.ids_host.data();
  }
  ln.req = ep_plan_start(plans_[static_cast<size_t>(key)], counts, comm_);
}

int64_t EpExchange::plan_finish(int lane, int64_t* local_offsets, int64_t* block_offsets) {
  Lane& ln = lane_at(lane);
  CHECK(ln.op == Op::kPlan, "lane %d: plan_finish without plan_start", lane);
  const double t = now_s();
  comm_.wait(ln.req);
  blocked_s_ += now_s() - t;
  ln.op = Op::kNone;
  EpPlan& p = plans_[static_cast<size_t>(ln.key)];
  ep_plan_finish(p, ln.counts, comm_);
  std::copy(p.local_offsets.begin(), p.local_offsets.end(), local_offsets);
  for (int64_t j = 0; j < p.EL; ++j)
    for (int q = 0; q < p.ep; ++q)
      block_offsets[j * p.ep + q] = p.block_grouped_off[static_cast<size_t>(q * p.EL + j)];
  block_offsets[p.EL * p.ep] = p.rows_recv;
  count_traffic(p, ln);
  return p.rows_recv;
}

// Rows to other ranks, and the distinct other ranks each token must reach.
void EpExchange::count_traffic(const EpPlan& p, const Lane& ln) {
  traffic_.tokens += ln.N;
  for (int q = 0; q < p.ep; ++q)
    if (q != p.rank) traffic_.rows_remote += p.send_counts[static_cast<size_t>(q)];
  if (!count_least_) return;
  for (int64_t i = 0; i < ln.N; ++i) {
    const int32_t* ids = ln.expert_ids + i * ln.K;
    for (int64_t k = 0; k < ln.K; ++k) {
      const int64_t owner = ids[k] / p.EL;
      bool first = owner != p.rank;
      for (int64_t j = 0; j < k && first; ++j) first = ids[j] / p.EL != owner;
      traffic_.rows_remote_min += first ? 1 : 0;
    }
  }
}

void EpExchange::dispatch_start(int lane, int64_t key, float* x_grouped, const float* xp,
                                int64_t C) {
  CHECK(C <= C_max_);
  Lane& ln = lane_idle(lane, key);
  ln.op = Op::kDispatch;
  ln.C = C;
  const EpPlan& p = plans_[static_cast<size_t>(key)];
  ln.out = x_grouped;
  if (ops_)
    ep_dispatch_device_start(ln.req, ln.req_scales, ln.dev, xp, p, C, format_, ln.dev_wire, *ops_,
                             *device_comm_);
  else if (format_ == EpWireFormat::kFloat)
    ln.req = ep_dispatch_start(ln.scratch.data(), xp, p, C, ln.wire, comm_);
  else
    ln.req = ep_dispatch_fp8_start(ln.recv_wire.data(), ln.send_wire.data(), ln.scales.data(), xp,
                                   p, C, ln.wire, comm_);
  traffic_.bytes_dispatch += ep_rows_sent_remote(p) * ep_dispatch_row_bytes(format_, C);
}

void EpExchange::combine_start(int lane, int64_t key, float* yp, const float* y_grouped,
                               int64_t C) {
  CHECK(C <= C_max_);
  Lane& ln = lane_idle(lane, key);
  ln.op = Op::kCombine;
  ln.C = C;
  const EpPlan& p = plans_[static_cast<size_t>(key)];
  ln.out = yp;
  if (ops_)
    ep_combine_device_start(ln.req, ln.req_scales, yp, ln.dev, y_grouped, p, C, format_,
                            ln.dev_wire, *ops_, *device_comm_);
  else if (format_ == EpWireFormat::kFloat)
    ln.req = ep_combine_start(yp, ln.scratch.data(), y_grouped, p, C, ln.wire, comm_);
  else
    ln.req = ep_combine_bf16_start(ln.recv_wire.data(), ln.send_wire.data(), y_grouped, p, C,
                                   ln.wire, comm_);
  traffic_.bytes_combine += ep_rows_recv_remote(p) * ep_combine_row_bytes(format_, C);
}

void EpExchange::finish(int lane) {
  Lane& ln = lane_at(lane);
  CHECK(ln.op == Op::kDispatch || ln.op == Op::kCombine, "lane %d: finish without a start",
        lane);
  const double t = now_s();
  Comm& c = ops_ ? *device_comm_ : comm_;
  c.wait(ln.req);
  c.wait(ln.req_scales);
  blocked_s_ += now_s() - t;
  const EpPlan& p = plans_[static_cast<size_t>(ln.key)];
  if (ops_) {
    if (ln.op == Op::kDispatch)
      ep_dispatch_device_finish(ln.out, ln.dev, p, ln.C, format_, *ops_);
    else
      ep_combine_device_finish(ln.out, ln.dev, p, ln.C, format_, *ops_);
  } else if (format_ == EpWireFormat::kFloat) {
    if (ln.op == Op::kDispatch) ep_dispatch_finish(ln.out, ln.scratch.data(), p, ln.C);
  } else if (ln.op == Op::kDispatch) {
    ep_dispatch_fp8_finish(ln.out, ln.scales.data(), ln.recv_wire.data(), p, ln.C);
  } else {
    ep_combine_bf16_finish(ln.out, ln.recv_wire.data(), p, ln.C);
  }
  ln.op = Op::kNone;
}

void EpExchange::progress() {
  for (Lane& ln : lanes_) {
    // A plan's request is the host communicator's; a device path's exchange its twin's.
    Comm& c = ops_ && ln.op != Op::kPlan ? *device_comm_ : comm_;
    if (ln.req.active) c.test(ln.req);
    if (ln.req_scales.active) c.test(ln.req_scales);
  }
}

}  // namespace moe
