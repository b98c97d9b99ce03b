// Every CUDA launch plan for every shipped config, read through the real config loader (so a
// config edited or added later is covered without touching this file): the dense, MoE,
// quantization and attention kernels' launch dimensions stay within CUDA's limits for the
// config's micro-batch, attention fits sm_80's and sm_90's shared memory, and the FP8 GEMMs'
// shapes meet cuBLASLt's alignment. Plain C++: runs on every machine.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

#include "io/config.h"
#include "io/config_model.h"
#include "model/fp8_quant.h"
#include "model/kernels/cuda/attention_plan.h"
#include "model/kernels/cuda/dense_plan.h"
#include "model/kernels/cuda/gemm_plan.h"
#include "model/kernels/cuda/moe_plan.h"
#include "model/kernels/cuda/quant_plan.h"
#include "model/model.h"
#include "tests/cuda_launch_limits.h"

namespace {

namespace fs = std::filesystem;
using moe::cuda::LaunchDims;
using moe_test::within_cuda_limits;

std::vector<fs::path> shipped_configs() {
  std::vector<fs::path> out;
  for (const auto& e : fs::directory_iterator(fs::path(MOETRAIN_SOURCE_DIR) / "configs"))
    if (e.path().extension() == ".toml") out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

TEST(CudaPlanConfigs, EveryShippedConfigPlansWithinLimits) {
  const std::vector<fs::path> configs = shipped_configs();
  ASSERT_GE(configs.size(), 6u);
  for (const fs::path& path : configs) {
    SCOPED_TRACE(path.filename().string());
    const moe::Config cfg = moe::config_load(path.string(), {});
    const moe::ModelDims d = moe::config_model_dims(cfg);
    const int64_t B = cfg.training.micro_batch, N = B * d.T, C = d.C;
    // Dense kernels.
    for (const LaunchDims& p :
         {moe::cuda::plan_embedding_forward(N, C), moe::cuda::plan_embedding_backward(d.V, C),
          moe::cuda::plan_rmsnorm_forward(N, C), moe::cuda::plan_rmsnorm_backward_input(N, C),
          moe::cuda::plan_rmsnorm_backward_weight_partial(N, C),
          moe::cuda::plan_rmsnorm_backward_weight_final(C),
          moe::cuda::plan_rope(N, d.NH, d.rope_dim()), moe::cuda::plan_rope_tables(d.T, d.rope_dim()),
          moe::cuda::plan_swiglu(N, d.F), moe::cuda::plan_swiglu(N * d.K, d.FE),
          moe::cuda::plan_residual(N * C), moe::cuda::plan_cross_entropy_forward(N, d.V),
          moe::cuda::plan_cross_entropy_backward(N, d.V)})
      EXPECT_TRUE(within_cuda_limits(p, false));
    // Routing and dispatch (rows up to every token's K slots arriving from every EP rank).
    const int64_t rows = N * d.K * cfg.parallel.ep;
    for (const LaunchDims& p :
         {moe::cuda::moe_router_forward_dims(N, d.E, d.G), moe::cuda::moe_router_backward_dims(N, d.E),
          moe::cuda::moe_aux_count_dims(N, d.K), moe::cuda::moe_aux_token_dims(N),
          moe::cuda::moe_dispatch_tile_dims(N, d.E, d.K), moe::cuda::moe_dispatch_scan_dims(d.E),
          moe::cuda::moe_rows_dims(rows, C, 4), moe::cuda::moe_combine_backward_dims(N, d.K, C, 4)}) {
      EXPECT_TRUE(within_cuda_limits(p, false));
      EXPECT_TRUE(moe::cuda::moe_dims_fit(p));
    }
    EXPECT_GT(moe::cuda::moe_dispatch_scratch_bytes(N, d.E, d.K), 0);
    // Quantization of every GEMM input and weight: activations both ways, the widest
    // weights, and the optimizer over the whole model.
    const int64_t widths[] = {C, d.F, 2 * d.F, d.FE, 2 * d.FE, d.V};
    for (const int64_t w : widths) {
      for (const moe::Fp8Tile t : {moe::kTileAct, moe::kTileActT, moe::kTileWeight}) {
        const moe::cuda::Fp8QuantPlan q = moe::cuda::fp8_quant_plan(rows, w, t);
        EXPECT_TRUE(within_cuda_limits(q.dims, false)) << w;
      }
    }
    EXPECT_TRUE(within_cuda_limits(moe::cuda::adamw_plan(moe::model_counts(d).total), false));
    // Attention on both architectures we build for.
    moe::cuda::AttentionShape a;
    a.B = B;
    a.T = d.T;
    a.NH = d.NH;
    a.NKV = d.mla() ? d.NH : d.NKV;
    a.HD = d.qk_hd();
    a.HDv = d.v_dim();
    for (const int64_t limit : {163 * 1024, 227 * 1024}) {
      const moe::cuda::AttentionPlan p = moe::cuda::attention_plan(a, limit);
      for (const LaunchDims& l : {p.forward, p.backward_rows, p.backward_cols})
        EXPECT_TRUE(within_cuda_limits(l, false, limit)) << limit;
    }
    // FP8 GEMM alignment of every linear layer.
    moe::cuda::GemmModelShape g;
    g.attn = d.attn;
    g.d_model = C;
    g.n_heads = d.NH;
    g.n_kv_heads = d.NKV;
    g.head_dim = d.HD;
    g.d_ff = d.F;
    g.d_expert = d.FE;
    g.num_experts = d.E;
    g.num_shared_experts = d.S / d.FE;
    g.q_lora_rank = d.q_lora;
    g.kv_lora_rank = d.kv_lora;
    g.qk_nope_head_dim = d.qk_nope;
    g.qk_rope_head_dim = d.qk_rope;
    g.v_head_dim = d.v_hd;
    g.vocab_size = d.V;
    g.mtp_depth = d.mtp;
    EXPECT_EQ(moe::cuda::gemm_fp8_shape_error(moe::cuda::gemm_linear_shapes(g)), "");
  }
}

}  // namespace
