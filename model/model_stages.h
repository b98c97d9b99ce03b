// Where the model is cut into pipeline stages: the layer boundaries of S stages.
//
// A stage is a contiguous range of layers [bounds[s], bounds[s + 1]); stage 0 also owns the
// embedding, stage S - 1 the final norm, head and loss. Balanced by compute: a stage costs
// the forward + backward matmul FLOPs per token of what it holds, in the convention of
// model_flops_per_token (6 per multiply-add, attention core over the full T window), so the
// stage costs of any split sum to model_flops_per_token.
#pragma once

#include <cstdint>
#include <vector>

#include "model/model.h"

namespace moe {

// Training FLOPs per token of layer l: attention projections + the T-window attention core,
// plus the dense FFN or the MoE layer's router + K routed + shared experts.
int64_t model_layer_flops(const ModelDims& d, int64_t l);

// Training FLOPs per token of the head (V x C matmul; the embedding lookup counts 0).
int64_t model_head_flops(const ModelDims& d);

// Layer boundaries of S pipeline stages: S + 1 increasing indices, bounds[0] = 0,
// bounds[S] = L, every stage at least one layer. stage_layers (empty, or S entries, each
// >= 1, summing to L) gives them explicitly; empty balances by compute: the split with the
// smallest largest stage cost (exact), ties going to the earliest boundaries
// (lexicographically smallest bounds), which leaves the early stages, those that keep the
// most micro-batches in flight, the lighter ones. CHECK-fails on impossible input
// (S < 1, S > L, bad stage_layers); the config validator refuses those with a user message.
std::vector<int64_t> model_stage_bounds(const ModelDims& d, int S,
                                        const std::vector<int64_t>& stage_layers);

// Training FLOPs per token of each stage of `bounds` (S + 1 entries): its layers, plus the
// head for the last stage.
std::vector<int64_t> model_stage_flops(const ModelDims& d, const std::vector<int64_t>& bounds);

}  // namespace moe
