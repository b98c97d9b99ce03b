// The MoE layer's expert exchange over an EP group (model/expert_exchange.h's interface):
// one EpPlan per key (micro-batch slot x MoE layer), wire buffers per lane in the wire format
// chosen at creation (EpWireFormat, parallel/expert_dispatch.h), and traffic and waiting
// counters for the benchmark. Everything is sized at creation for the worst case; a step
// allocates nothing.
#pragma once

#include <cstdint>
#include <vector>

#include "model/expert_exchange.h"
#include "model/ops.h"
#include "model/arena.h"
#include "parallel/expert_dispatch.h"
#include "parallel/expert_dispatch_device.h"

namespace moe {

// What the dispatches since the last reset sent to other ranks, against the least the routing
// needed: a token whose K experts live on r other ranks must reach each of them once, while
// a row-per-slot dispatch sends it once per slot.
struct EpTraffic {
  int64_t tokens = 0;           // tokens routed (summed over MoE layers)
  int64_t rows_remote = 0;      // rows dispatched to other ranks
  int64_t rows_remote_min = 0;  // distinct (token, other rank) pairs
  // Bytes on the wire to other ranks in the exchange's format, every dispatch (forward and
  // backward) and every combine counted.
  int64_t bytes_dispatch = 0;
  int64_t bytes_combine = 0;
};

// The bytes an EpExchange holds for its lanes' wire buffers: host vectors (device false) or its
// device arena (set_device). What `moetrain train --dry-run` reports for the exchange.
int64_t ep_exchange_buffer_bytes(EpWireFormat format, int64_t rows_capacity, int64_t C,
                                 int lanes, bool device);

class EpExchange final : public ExpertExchange {
 public:
  // comm: the EP group (kept by reference; must outlive this); E routed experts; n_keys plans;
  // rows_capacity: the most rows a layer may receive (moe_rows_max), which must also bound the
  // rows it sends (N K; moe_rows_max does); C: the widest row; n_lanes exchanges in flight at
  // once; format: what rows become on the wire (kFloat: exact copies).
  EpExchange(Comm& comm, int64_t E, int64_t n_keys, int64_t rows_capacity, int64_t C,
             int n_lanes = 1, EpWireFormat format = EpWireFormat::kFloat);

  // The model's rows are memory of `ops` (a GPU's) rather than the host's: every exchange then
  // runs parallel/expert_dispatch_device.h over `device_comm` (the EP group's NCCL twin; same
  // ranks and order as `comm`), with its lanes' wire buffers in one arena of `arena_device`
  // allocated here. The plans' token counts stay on `comm` (host values). Before any plan.
  void set_device(Ops<float>& ops, Comm& device_comm, Device arena_device);
  const Arena& device_arena() const { return device_arena_; }

  int lanes() const { return static_cast<int>(lanes_.size()); }
  EpWireFormat format() const { return format_; }
  void plan_start(int lane, int64_t key, const int64_t* counts, const int32_t* expert_ids,
                  int64_t N, int64_t K) override;
  int64_t plan_finish(int lane, int64_t* local_offsets, int64_t* block_offsets) override;
  void dispatch_start(int lane, int64_t key, float* x_grouped, const float* xp,
                      int64_t C) override;
  void combine_start(int lane, int64_t key, float* yp, const float* y_grouped,
                     int64_t C) override;
  void finish(int lane) override;
  void progress() override;
  double blocked_s() const override { return blocked_s_; }

  const EpTraffic& traffic() const { return traffic_; }
  // What the lanes' wire buffers hold now, in bytes (host vectors or the device arena).
  int64_t buffer_bytes() const;
  // The most exchanges that were in flight at once since construction (2 when overlapped F&B
  // pairs really overlapped their chunks' communication).
  int max_in_flight() const { return max_in_flight_; }
  void reset_traffic() { traffic_ = EpTraffic{}; }
  // Whether traffic().rows_remote_min is counted (off by default). It needs each token's
  // routing, which on a device means reading N K expert ids back to the host per MoE layer
  // and micro-batch: `moetrain bench` turns it on, a training run leaves it off.
  void count_least_traffic(bool on) { count_least_ = on; }

 private:
  enum class Op { kNone, kPlan, kDispatch, kCombine };
  struct Lane {
    Op op = Op::kNone;
    int64_t key = 0, C = 0;
    CommRequest req, req_scales;  // req_scales: the device path's FP8 scales
    EpWire wire;
    // kFloat: scratch (rows_capacity, C) floats, the wire layout.
    // kFp8Bf16: send_wire / recv_wire, ep_wire_bytes(format, rows_capacity, C) bytes each;
    // scales (rows_capacity, ceil(C / 128)), the FP8 scales between wire and quantizer.
    std::vector<float> scratch;
    std::vector<uint8_t> send_wire, recv_wire;
    std::vector<float> scales;
    float* out = nullptr;  // where finish unpacks: x_grouped (dispatch), yp (combine, compact)
    // The device path: its wire buffers and byte tables, and a host copy of the routing
    // (rows_capacity) for the traffic count.
    EpDeviceBuffers dev;
    EpDeviceWire dev_wire;
    std::vector<int32_t> ids_host;
    const int64_t* counts = nullptr;
    const int32_t* expert_ids = nullptr;
    int64_t N = 0, K = 0;
  };
  Lane& lane_at(int lane);
  Lane& lane_idle(int lane, int64_t key);
  void count_traffic(const EpPlan& p, const Lane& ln);

  Comm& comm_;
  Ops<float>* ops_ = nullptr;      // the device path: the backend and its communicator
  Comm* device_comm_ = nullptr;
  Arena device_arena_;
  int64_t rows_capacity_;
  int64_t C_max_;
  EpWireFormat format_;
  std::vector<EpPlan> plans_;  // per key
  std::vector<Lane> lanes_;
  EpTraffic traffic_;
  bool count_least_ = false;
  double blocked_s_ = 0;
  int max_in_flight_ = 0;
};

}  // namespace moe
