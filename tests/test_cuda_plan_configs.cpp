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
    EXPECT_EQ(moe::cuda::gemm_fp8_shape_error(moe::model_linear_shapes(d)), "");
  }
}

// model_linear_shapes against the parameters the model actually allocates: every linear it
// lists is a tensor of the table with those (out, in) widths, and every matrix the model
// multiplies by (all but the embedding and the norms) is listed.
TEST(CudaPlanConfigs, LinearShapesAreTheModelsMatrices) {
  for (const fs::path& path : shipped_configs()) {
    SCOPED_TRACE(path.filename().string());
    const moe::ModelDims d = moe::config_model_dims(moe::config_load(path.string(), {}));
    const std::vector<moe::cuda::GemmLinearShape> shapes = moe::model_linear_shapes(d);
    const std::vector<moe::ParamInfo> table = moe::model_param_table(d);
    // A parameter's linear: its name past "layers/<l>/" or "mtp/<k>/" ("mtp/" kept for the
    // module's own eh_proj).
    const auto linear_of = [](const std::string& name) {
      for (const char* pre : {"layers/", "mtp/"}) {
        if (name.rfind(pre, 0) != 0) continue;
        const std::string rest = name.substr(name.find('/', std::string(pre).size()) + 1);
        return rest == "eh_proj" ? "mtp/eh_proj" : rest;
      }
      return name;
    };
    std::vector<int> used(shapes.size(), 0);
    for (const moe::ParamInfo& p : table) {
      if (p.shape.size() < 2 || p.name == "embed/wte") continue;
      const std::string lin = linear_of(p.name);
      const int64_t out = p.shape[p.shape.size() - 2], in = p.shape.back();
      bool found = false;
      for (size_t i = 0; i < shapes.size(); ++i) {
        if (shapes[i].name != lin) continue;
        found = true;
        ++used[i];
        EXPECT_EQ(shapes[i].out_features, out) << p.name;
        EXPECT_EQ(shapes[i].in_features, in) << p.name;
        EXPECT_EQ(shapes[i].routed, p.routed_experts) << p.name;
      }
      EXPECT_TRUE(found) << p.name << " is not among the model's linear shapes";
    }
    for (size_t i = 0; i < shapes.size(); ++i)
      EXPECT_GT(used[i], 0) << shapes[i].name << " has no parameter";
  }
}

// A width cuBLASLt's FP8 GEMMs cannot take is found in the model's own shapes, named.
TEST(CudaPlanConfigs, MisalignedModelNamesItsLayer) {
  moe::ModelDims d = moe::config_model_dims(
      moe::config_load((fs::path(MOETRAIN_SOURCE_DIR) / "configs" / "deepseek-v3-tiny.toml").string(), {}));
  EXPECT_EQ(moe::cuda::gemm_fp8_shape_error(moe::model_linear_shapes(d)), "");
  d.FE = 120;  // routed experts' w13 out 240 = 15 x 16 fine; w2 in 120 is not
  const std::string e = moe::cuda::gemm_fp8_shape_error(moe::model_linear_shapes(d));
  EXPECT_NE(e.find("moe/experts/w2 has in_features = 120"), std::string::npos) << e;
  EXPECT_NE(e.find("precision.native_gemm = false"), std::string::npos) << e;
}

}  // namespace
