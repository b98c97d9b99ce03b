// Expert dispatch and combine on a device's memory: the layouts, plans and wire formats of
// parallel/expert_dispatch.h, with every row touched through the backend (Ops: quantize,
// round, copy, on the backend's stream) and the all_to_all_v run by a device communicator
// (NCCL's twin of the EP group on a GPU). The host code here only plans: byte counts and
// block offsets from the EpPlan; it never reads a row. Results equal the host functions'
// bit for bit (tests/mpi/test_expert_dispatch.cpp runs both with the CPU backend).
//
// The device wire differs from the host's only in how FP8 rows are packed: the host sends a
// row's codes and its scales in one record; here codes and scales are two arrays, moved by
// two all_to_all_v in one posting (NCCL: one group each), so every buffer keeps its natural
// alignment for the kernels. The bytes on the wire are the same.
//
// Steps per exchange (one lane, all ranks of the group in the same order):
//   kFloat    dispatch: all_to_all_v xp -> scratch (wire layout); finish: a copy per block
//                       (sender p, local expert j) into the grouped layout.
//             combine:  a copy per block into scratch (wire layout); all_to_all_v -> yp.
//   kFp8Bf16  dispatch: fp8_quantize xp (1x128 tiles) -> codes + scales; two all_to_all_v;
//                       finish: fp8_dequantize per block into the grouped layout.
//             combine:  bf16_encode per block into the wire layout; all_to_all_v; finish:
//                       bf16_decode -> yp.
// A block copy or kernel per (p, j) with rows: at most ep EL small calls per exchange.
#pragma once

#include <cstdint>

#include "model/arena.h"
#include "model/ops.h"
#include "parallel/expert_dispatch.h"

namespace moe {

// One lane's device buffers, carved from an arena of the backend's device.
struct EpDeviceBuffers {
  float* scratch = nullptr;      // kFloat: (rows, C), the wire layout
  uint8_t* send = nullptr;       // kFp8Bf16: rows C codes, or rows C BF16 (2 rows C bytes)
  uint8_t* recv = nullptr;       // the same
  float* scales_send = nullptr;  // kFp8Bf16: (rows, ep_wire_scale_count(1, C))
  float* scales_recv = nullptr;
};
// Carves b for `rows` rows of up to C floats (rows must bound N K and R, as moe_rows_max does).
void ep_device_buffers_carve(EpDeviceBuffers& b, Carver& c, EpWireFormat f, int64_t rows,
                             int64_t C);

// The byte tables of a lane's collectives (read by MPI until completion): the rows' payload,
// and the FP8 scales.
struct EpDeviceWire {
  EpWire rows, scales;
};
EpDeviceWire ep_device_wire_create(int ep);

// Each start posts its collectives into req (and req_scales for FP8's scales; inactive
// otherwise). The caller waits both (Comm::wait), then calls the finish. Between start and
// finish the buffers, the plan and the wire stay untouched.
void ep_dispatch_device_start(CommRequest& req, CommRequest& req_scales, EpDeviceBuffers& b,
                              const float* xp, const EpPlan& plan, int64_t C, EpWireFormat f,
                              EpDeviceWire& w, Ops<float>& ops, Comm& comm);
void ep_dispatch_device_finish(float* x_grouped, const EpDeviceBuffers& b, const EpPlan& plan,
                               int64_t C, EpWireFormat f, Ops<float>& ops);
void ep_combine_device_start(CommRequest& req, CommRequest& req_scales, float* yp,
                             EpDeviceBuffers& b, const float* y_grouped, const EpPlan& plan,
                             int64_t C, EpWireFormat f, EpDeviceWire& w, Ops<float>& ops,
                             Comm& comm);
void ep_combine_device_finish(float* yp, const EpDeviceBuffers& b, const EpPlan& plan, int64_t C,
                              EpWireFormat f, Ops<float>& ops);

}  // namespace moe
