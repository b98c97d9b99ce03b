// The CUDA GEMM layer's host planning (model/kernels/cuda/gemm_plan.h), no GPU needed: the
// FP8 alignment check over every shipped config's linear shapes, misaligned shapes refused
// with a message naming the tensor and the dimension, the FP8 scale layouts cuBLASLt reads,
// the per-expert scale offsets, and the workspace / scratch sizes.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "model/check.h"
#include "model/fp8_quant.h"
#include "model/kernels/cuda/gemm_plan.h"
#include "model/rng.h"

namespace {

using moe::AttentionKind;
using namespace moe::cuda;

struct NamedShape {
  const char* config;
  GemmModelShape shape;
};

// The resolved widths of configs/*.toml (d_ff = (top_k + shared) * d_expert where unset;
// head_dim = d_model / n_heads for MHA).
std::vector<NamedShape> config_shapes() {
  std::vector<NamedShape> v;
  GemmModelShape tiny;  // configs/tiny.toml
  tiny.attn = AttentionKind::kMha;
  tiny.d_model = 128, tiny.n_heads = 4, tiny.n_kv_heads = 4, tiny.head_dim = 32;
  tiny.d_ff = 3 * 128, tiny.d_expert = 128, tiny.num_experts = 8, tiny.d_shared = 128;
  tiny.vocab_size = 256;
  v.push_back({"tiny", tiny});

  GemmModelShape bench = tiny;  // configs/bench-cpu.toml
  bench.d_model = 512, bench.n_heads = 8, bench.n_kv_heads = 8, bench.head_dim = 64;
  bench.d_ff = 3 * 512, bench.d_expert = 512, bench.d_shared = 512;
  v.push_back({"bench-cpu", bench});

  GemmModelShape ds_tiny;  // configs/deepseek-v3-tiny.toml
  ds_tiny.attn = AttentionKind::kMla;
  ds_tiny.d_model = 128, ds_tiny.n_heads = 4, ds_tiny.n_kv_heads = 4;
  ds_tiny.q_lora_rank = 64, ds_tiny.kv_lora_rank = 32;
  ds_tiny.qk_nope_head_dim = 32, ds_tiny.qk_rope_head_dim = 16, ds_tiny.v_head_dim = 32;
  ds_tiny.d_ff = 3 * 128, ds_tiny.d_expert = 128, ds_tiny.num_experts = 8;
  ds_tiny.d_shared = 128, ds_tiny.vocab_size = 256, ds_tiny.mtp_depth = 1;
  v.push_back({"deepseek-v3-tiny", ds_tiny});

  GemmModelShape b1 = ds_tiny;  // configs/deepseek-v3-1b.toml
  b1.d_model = 1024, b1.n_heads = 8, b1.n_kv_heads = 8;
  b1.q_lora_rank = 384, b1.kv_lora_rank = 256;
  b1.qk_nope_head_dim = 64, b1.qk_rope_head_dim = 32, b1.v_head_dim = 64;
  b1.d_ff = 2816, b1.d_expert = 704, b1.num_experts = 32, b1.d_shared = 704;
  b1.vocab_size = 129280;
  v.push_back({"deepseek-v3-1b", b1});

  GemmModelShape b16 = b1;  // configs/deepseek-v3-16b.toml
  b16.d_model = 2048, b16.n_heads = 16, b16.n_kv_heads = 16;
  b16.q_lora_rank = 0, b16.kv_lora_rank = 512;
  b16.qk_nope_head_dim = 128, b16.qk_rope_head_dim = 64, b16.v_head_dim = 128;
  b16.d_ff = 11264, b16.d_expert = 1408, b16.num_experts = 64, b16.d_shared = 2 * 1408;
  v.push_back({"deepseek-v3-16b", b16});

  GemmModelShape b671 = b16;  // configs/deepseek-v3-671b.toml
  b671.d_model = 7168, b671.n_heads = 128, b671.n_kv_heads = 128;
  b671.q_lora_rank = 1536, b671.kv_lora_rank = 512;
  b671.d_ff = 18432, b671.d_expert = 2048, b671.num_experts = 256, b671.d_shared = 2048;
  v.push_back({"deepseek-v3-671b", b671});
  return v;
}

const GemmLinearShape* find(const std::vector<GemmLinearShape>& v, const std::string& name) {
  for (const GemmLinearShape& s : v)
    if (s.name == name) return &s;
  return nullptr;
}

TEST(CudaPlanGemm, EveryConfigIsFp8Aligned) {
  for (const NamedShape& c : config_shapes()) {
    const std::vector<GemmLinearShape> shapes = gemm_linear_shapes(c.shape);
    EXPECT_EQ(gemm_fp8_shape_error(shapes), "") << c.config;
    EXPECT_NO_THROW(gemm_fp8_shapes_check(shapes)) << c.config;
    for (const GemmLinearShape& s : shapes) {
      EXPECT_GT(s.out_features, 0) << c.config << " " << s.name;
      EXPECT_GT(s.in_features, 0) << c.config << " " << s.name;
    }
  }
}

TEST(CudaPlanGemm, Shapes671b) {
  const std::vector<GemmLinearShape> v = gemm_linear_shapes(config_shapes().back().shape);
  struct Want {
    const char* name;
    int64_t out, in;
    LinearPrecision p;
  };
  const Want want[] = {
      {"attn/wq_a", 1536, 7168, LinearPrecision::kRun},
      {"attn/wq_b", 128 * 192, 1536, LinearPrecision::kRun},
      {"attn/wkv_a", 512 + 64, 7168, LinearPrecision::kRun},
      {"attn/wkv_b", 128 * 256, 512, LinearPrecision::kRun},
      {"attn/wo", 7168, 128 * 128, LinearPrecision::kRun},
      {"mlp/w13", 2 * 18432, 7168, LinearPrecision::kRun},
      {"mlp/w2", 7168, 18432, LinearPrecision::kRun},
      {"moe/router", 256, 7168, LinearPrecision::kHigh},
      {"moe/experts/w13", 2 * 2048, 7168, LinearPrecision::kRun},
      {"moe/experts/w2", 7168, 2048, LinearPrecision::kRun},
      {"moe/shared/w13", 2 * 2048, 7168, LinearPrecision::kRun},
      {"moe/shared/w2", 7168, 2048, LinearPrecision::kRun},
      {"mtp/eh_proj", 7168, 2 * 7168, LinearPrecision::kHigh},
      {"lm_head", 129280, 7168, LinearPrecision::kHigh},
  };
  EXPECT_EQ(v.size(), sizeof(want) / sizeof(want[0]));
  for (const Want& w : want) {
    const GemmLinearShape* s = find(v, w.name);
    ASSERT_NE(s, nullptr) << w.name;
    EXPECT_EQ(s->out_features, w.out) << w.name;
    EXPECT_EQ(s->in_features, w.in) << w.name;
    EXPECT_EQ(s->precision, w.p) << w.name;
    EXPECT_EQ(s->routed, std::string(w.name).rfind("moe/experts/", 0) == 0) << w.name;
  }
  EXPECT_EQ(find(v, "attn/wq"), nullptr);  // q_lora_rank > 0
}

TEST(CudaPlanGemm, MhaAndNoLoraShapes) {
  const std::vector<NamedShape> c = config_shapes();
  const std::vector<GemmLinearShape> tiny = gemm_linear_shapes(c[0].shape);
  ASSERT_NE(find(tiny, "attn/wqkv"), nullptr);
  EXPECT_EQ(find(tiny, "attn/wqkv")->out_features, 3 * 128);
  EXPECT_EQ(find(tiny, "mlp/w2")->in_features, 384);
  EXPECT_EQ(find(tiny, "mtp/eh_proj"), nullptr);
  const std::vector<GemmLinearShape> b16 = gemm_linear_shapes(c[4].shape);
  ASSERT_NE(find(b16, "attn/wq"), nullptr);
  EXPECT_EQ(find(b16, "attn/wq")->out_features, 16 * 192);
  EXPECT_EQ(find(b16, "attn/wq_a"), nullptr);
  EXPECT_EQ(find(b16, "moe/shared/w2")->in_features, 2 * 1408);
}

TEST(CudaPlanGemm, MisalignedShapesRefused) {
  GemmModelShape m = config_shapes()[3].shape;  // deepseek-v3-1b
  m.kv_lora_rank = 500;                         // wkv_a out 532: the first misaligned
  const std::string e = gemm_fp8_shape_error(gemm_linear_shapes(m));
  EXPECT_NE(e.find("attn/wkv_a"), std::string::npos) << e;
  EXPECT_NE(e.find("out_features = 532"), std::string::npos) << e;
  EXPECT_NE(e.find("multiple of 16"), std::string::npos) << e;
  EXPECT_THROW(gemm_fp8_shapes_check(gemm_linear_shapes(m)), moe::UserError);

  GemmModelShape x = config_shapes()[3].shape;
  x.d_expert = 700;  // moe/experts/w13 out 1400 = 87.5 x 16
  const std::string e2 = gemm_fp8_shape_error(gemm_linear_shapes(x));
  EXPECT_NE(e2.find("moe/experts/w13"), std::string::npos) << e2;
  EXPECT_NE(e2.find("out_features = 1400"), std::string::npos) << e2;

  GemmModelShape y = config_shapes()[3].shape;
  y.d_ff = 2824;  // mlp/w13 out 5648 = 353 x 16 is aligned; mlp/w2 in 2824 is not
  const std::string e3 = gemm_fp8_shape_error(gemm_linear_shapes(y));
  EXPECT_NE(e3.find("mlp/w2"), std::string::npos) << e3;
  EXPECT_NE(e3.find("in_features = 2824"), std::string::npos) << e3;
}

TEST(CudaPlanGemm, HighPrecisionLayersNotChecked) {
  GemmModelShape m = config_shapes()[3].shape;
  m.vocab_size = 129281;  // lm_head stays BF16 / FP32: no FP8 alignment needed
  m.num_experts = 31;     // the router too
  EXPECT_EQ(gemm_fp8_shape_error(gemm_linear_shapes(m)), "");
  std::vector<GemmLinearShape> bad = {{"x/w", 24, 40, LinearPrecision::kRun}};
  EXPECT_NE(gemm_fp8_shape_error(bad).find("x/w has in_features = 40"), std::string::npos);
  bad[0].precision = LinearPrecision::kHigh;
  EXPECT_EQ(gemm_fp8_shape_error(bad), "");
}

TEST(CudaPlanGemm, ScaleLayoutIndices) {
  // 1x128: (L, R) compact, R-major.
  EXPECT_EQ(fp8_gemm_ktiles(320), 3);
  EXPECT_EQ(fp8_gemm_scale_count(8, 320, Fp8Scaling::kTile1x128), 24);
  EXPECT_EQ(fp8_gemm_scale_index(5, 0, 8, 320, Fp8Scaling::kTile1x128), 5);
  EXPECT_EQ(fp8_gemm_scale_index(5, 300, 8, 320, Fp8Scaling::kTile1x128), 2 * 8 + 5);
  // 128x128: (ceil(R / 128), L4), L4 = L rounded up to 4.
  EXPECT_EQ(fp8_gemm_block_scale_ld(640), 8);
  EXPECT_EQ(fp8_gemm_block_scale_ld(512), 4);
  EXPECT_EQ(fp8_gemm_scale_count(300, 640, Fp8Scaling::kBlock128), 3 * 8);
  EXPECT_EQ(fp8_gemm_scale_index(299, 639, 300, 640, Fp8Scaling::kBlock128), 2 * 8 + 4);
}

TEST(CudaPlanGemm, ScalesFromQuantLayout) {
  struct Case {
    int64_t R, K;
    Fp8Scaling s;
    moe::Fp8Tile t;
  };
  const Case cases[] = {{12, 320, Fp8Scaling::kTile1x128, moe::kTileAct},
                        {300, 640, Fp8Scaling::kBlock128, moe::kTileWeight},
                        {71, 229, Fp8Scaling::kBlock128, moe::kTileWeight}};
  for (const Case& c : cases) {
    std::vector<float> x(static_cast<size_t>(c.R * c.K));
    for (size_t i = 0; i < x.size(); ++i)
      x[i] = static_cast<float>(moe::rng_normal(3, 1, i)) * std::ldexp(1.0f, int(i % 7));
    std::vector<uint8_t> q(x.size());
    std::vector<float> src(static_cast<size_t>(moe::fp8_scale_count(c.R, c.K, c.t)));
    moe::fp8_quantize(q.data(), src.data(), x.data(), c.R, c.K, c.t);
    std::vector<float> dst(static_cast<size_t>(fp8_gemm_scale_count(c.R, c.K, c.s)), -1.0f);
    fp8_gemm_scales_from_quant(dst.data(), src.data(), c.R, c.K, c.s);
    const int64_t L = (c.K + 127) / 128;
    std::vector<bool> used(dst.size(), false);
    for (int64_t r = 0; r < c.R; ++r)
      for (int64_t k = 0; k < c.K; ++k) {
        const int64_t g = fp8_gemm_scale_index(r, k, c.R, c.K, c.s);
        const int64_t q_idx = (r / c.t.rows) * L + k / 128;
        ASSERT_EQ(dst[static_cast<size_t>(g)], src[static_cast<size_t>(q_idx)]) << r << " " << k;
        used[static_cast<size_t>(g)] = true;
      }
    for (size_t i = 0; i < dst.size(); ++i)
      if (!used[i]) {
        EXPECT_EQ(dst[i], 0.0f) << "padding " << i;
      }
  }
}

TEST(CudaPlanGemm, ExpertTransposedScaleOffsets) {
  const int64_t off[] = {0, 0, 130, 130, 146};  // experts 0 and 2 empty
  EXPECT_EQ(fp8_expert_t_scale_offset(off, 0, 64), 0);
  EXPECT_EQ(fp8_expert_t_scale_offset(off, 1, 64), 0);
  EXPECT_EQ(fp8_expert_t_scale_offset(off, 2, 64), 2 * 64);
  EXPECT_EQ(fp8_expert_t_scale_offset(off, 3, 64), 2 * 64);
  EXPECT_EQ(fp8_expert_t_scale_count(off, 4, 64), 3 * 64);
}

TEST(CudaPlanGemm, WorkspaceAndScratchSizes) {
  EXPECT_EQ(gemm_workspace_bytes(9), size_t{32} << 20);
  EXPECT_EQ(gemm_workspace_bytes(10), size_t{32} << 20);
  EXPECT_EQ(gemm_workspace_bytes(8), size_t{4} << 20);
  const size_t nn = size_t{8192} * 8192;
  EXPECT_GE(gemm_peak_scratch_bytes(GemmPrecision::kBf16), nn * (2 + 2 + 4));
  const PeakScratchLayout l = gemm_peak_scratch_layout(GemmPrecision::kFp8, 1024);
  EXPECT_EQ(l.a % kGemmWorkspaceAlign, 0u);
  EXPECT_EQ(l.b_scales % kGemmWorkspaceAlign, 0u);
  EXPECT_GE(l.b, size_t{1024} * 1024);
  EXPECT_GE(l.total, l.b_scales + sizeof(float) * 8 * 8);
  EXPECT_STREQ(gemm_precision_name(GemmPrecision::kTf32), "tf32");
}

}  // namespace
