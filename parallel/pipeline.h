// The pipeline executor: runs one rank's op list (parallel/schedule) over the model chunks it
// holds, with non-blocking point-to-point messages.
//
// Host-side planning (pipeline_plan) is pure: which stages and layers this rank holds, and
// which activation slot each micro-batch uses. A micro-batch takes a slot one compute op
// before its first op on this rank (so its receives can be posted then, ahead of need) and
// gives it back after its last; the number of slots is the most held at once.
//
// Messages. Activations are received straight into the slot's residual stream at the
// chunk's first layer and sent from it at the chunk's last (model_chunk_residual), so
// neither is copied. Gradients are received into a buffer per (slot, chunk) and copied into
// the slot's residual gradient when the backward starts, because one slot's residual
// gradient serves both of its chunks (DualPipeV) and may still be on its way out. Tags
// name (activation or gradient, the receiving stage, the micro-batch), so any order of
// arrival is matched correctly.
//
// NCCL (pipeline_set_p2p): no tags, stream order, rendezvous sends. Messages then go in the
// ticks of parallel/pipeline_ticks.h over a group of this replica's pipeline ranks: each tick
// is one p2p_group_start before the compute op it precedes, completed before that op runs.
// Activations still go straight between residual streams; gradients land in a device buffer
// per (slot, chunk) (grad_dev). F&B pairs then take their messages from the ticks too.
//
// F&B pairs (DualPipe, DualPipeV). The forward of one micro-batch and the full backward of
// another take turns (model_chunk_step), each turn running one chunk up to the start of its
// next expert exchange, so each all-to-all is in flight while the other chunk computes. The
// pair runs its own messages: it waits the forward's activation before its first turn and
// the backward's gradient before the backward's first turn, and sends each chunk's output as
// soon as that chunk is done, while the other may still be computing. The turns depend only
// on the op list and the layers, never on timing, so every rank of an EP group starts its
// collectives in the same order.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "model/model.h"
#include "parallel/comm.h"
#include "parallel/pipeline_ticks.h"
#include "parallel/schedule.h"

namespace moe {

class Watchdog;

struct PipelinePlan {
  PipeSchedule kind = PipeSchedule::k1F1B;
  int pp = 1, rank = 0, M = 1, S = 1;
  std::vector<PipeOp> ops;      // schedule_rank_ops
  int chunks = 1;               // chunks this rank holds
  int stage[2] = {0, 0};        // stage of each chunk
  int64_t l0[2] = {0, 0}, l1[2] = {0, 0};  // layers [l0, l1) of each chunk
  ModelPart part;               // the union of the chunks
  std::vector<int> slot_of;     // (M) activation slot of each micro-batch, -1: never here
  std::vector<std::vector<int>> acquire_at;  // (ops) micro-batches taking their slot before op i
  int n_slots = 1;
  bool split_backward = false;  // the list has Bx / W ops
  int last_backward_op = -1;    // index of the op that makes the gradients final
  bool has_fb = false;          // the list has F&B pairs (two expert-exchange lanes)
  // F&B pairs run their own messages, so each can start or wait them between its pieces:
  // fb_msgs[i] for an F&B op i holds the indices of the receives right before it and the
  // sends right after it that belong to its chunks (-1 where none), and fb_of[j] is the F&B
  // op that runs message op j (-1: the op runs in list order).
  struct FbMessages {
    int recv_act = -1, recv_grad = -1, send_act = -1, send_grad = -1;
  };
  std::vector<FbMessages> fb_msgs;  // (ops)
  std::vector<int> fb_of;           // (ops)
};

// bounds: S + 1 layer boundaries of the stages (model_stage_bounds).
PipelinePlan pipeline_plan(PipeSchedule kind, int pp, int M, int rank,
                           const std::vector<int64_t>& bounds, const ModelDims& d);

// Where time went in one pipeline_run (seconds).
struct PipelineTimes {
  double wall = 0;      // the whole op list
  double compute = 0;   // inside forward / backward compute
  double recv_wait = 0; // blocked waiting for a message
  // Inside F&B pairs: their whole time, and the part blocked on communication (their
  // pipeline messages and expert exchanges) that computation did not hide.
  double fb_wall = 0;
  double fb_comm_wait = 0;
  int fb_pairs = 0;
};

struct Pipeline {
  PipelinePlan plan;
  Comm* comm = nullptr;        // the world: peers are world ranks
  std::vector<int> peer_rank;  // (pp) world rank of each pipeline rank (same dp rank)
  int64_t B = 1, T = 1, C = 1;
  std::vector<float> grad_in;                   // (slots, chunks, B T C)
  std::vector<CommRequest> recv_act, recv_grad; // (slots, chunks)
  std::vector<uint8_t> grad_received;           // (slots, chunks)
  std::vector<CommRequest> send_act;            // (slots, chunks)
  std::vector<CommRequest> send_grad;           // (slots)
  std::vector<int32_t> tokens, targets;         // (B T) scratch for one micro-batch
  // When the model's memory is a device's (its backend's device() is not kCpu), messages
  // go through host copies: received activations land in act_in and are uploaded, sent
  // activations and gradients are downloaded into act_out / grad_out first (each kept until
  // its send completes). Sized by pipeline_init.
  std::vector<float> act_in, act_out;           // (slots, chunks, B T C)
  std::vector<float> grad_out;                  // (slots, B T C)
  PipelineTimes times;
  // F&B pairs interleave their chunks piece by piece (DualPipe); false runs the forward, then
  // the backward, over the same pieces and messages (the benchmark's baseline).
  bool overlap_fb = true;
  // Told which op and micro-batch run, for its timeout message; null: none.
  Watchdog* watchdog = nullptr;
  // NCCL's way (pipeline_set_p2p); null p2p: MPI's tagged messages over `comm`.
  Comm* p2p = nullptr;                 // the replica's pipeline ranks: peers are pipeline ranks
  std::vector<PipeTick> ticks;         // this rank's, in order
  std::vector<int> tick_before;        // (ops + 1) the tick run before op i; -1: none
  Arena grad_arena;                    // on the model's device
  float* grad_dev = nullptr;           // (slots, chunks, B T C) gradients received
  std::vector<P2pTransfer> group;      // (Comm::kP2pGroupMax) one tick's transfers
};

// The bytes of the message buffers a rank of `plan` holds with micro-batches of B x T x C
// floats: host buffers for the tagged path (pipeline_init: received activations and
// gradients, staged copies of sent ones), or, ticked (pipeline_set_p2p), only the received
// gradients, on the model's device.
int64_t pipeline_buffer_bytes(const PipelinePlan& plan, int64_t B, int64_t T, int64_t C,
                              bool ticked);

// Everything is allocated here; pipeline_run allocates nothing.
void pipeline_init(Pipeline& p, PipelinePlan plan, Comm* comm, std::vector<int> peer_rank,
                   int64_t B, int64_t T, int64_t C);

// Sends the pipeline's messages in ticks over `p2p` (the pipeline ranks of this replica, in
// order; NCCL on a GPU), with received gradients on `device`. Fails with one line when the
// schedule has no tick plan (parallel/pipeline_ticks.h proves every built-in one has).
void pipeline_set_p2p(Pipeline& p, Comm* p2p, Device device);

// Fills tokens (B, T) and targets (B, T) of micro-batch mb (0 <= mb < M of this step).
using PipelineBatch = std::function<void(int mb, int32_t* tokens, int32_t* targets)>;

struct PipelineLoss {
  double ce_sum = 0;   // summed over the micro-batches whose loss is computed here
  double aux_sum = 0;  // balance loss of this rank's MoE layers, summed over micro-batches
  double mtp_sum = 0;  // the MTP modules' mean cross-entropy (ChunkLoss::mtp_ce_mean), summed
                       // over the micro-batches whose loss is computed here
};

// One optimizer step's forwards and backwards (gradients accumulate into m.grads).
// on_final_backward(true) is called before the op that makes this rank's gradients final and
// (false) after it, so the caller can start reducing them while it runs.
PipelineLoss pipeline_run(Pipeline& p, Model<float>& m, const PipelineBatch& batch,
                          float dloss_ce, float dloss_aux,
                          const std::function<void(bool)>& on_final_backward);

// Forward only (evaluation) of one micro-batch, tokens and targets (B, T), through the stages
// in order in activation slot 0, with blocking messages. Returns the mean cross-entropy on the
// rank that computes the loss and 0 on the others. Every pipeline rank of the replica calls it.
double pipeline_forward_only(Pipeline& p, Model<float>& m, const int32_t* tokens,
                             const int32_t* targets);

}  // namespace moe
