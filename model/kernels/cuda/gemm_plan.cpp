// Host-side planning of the CUDA GEMM layer: sizes, FP8 scale layouts, shape checks.
#include "model/kernels/cuda/gemm_plan.h"

#include "model/check.h"

namespace moe::cuda {

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
size_t round_up_size(size_t a, size_t b) { return (a + b - 1) / b * b; }

}  // namespace

const char* gemm_precision_name(GemmPrecision p) {
  switch (p) {
    case GemmPrecision::kFp32: return "fp32";
    case GemmPrecision::kTf32: return "tf32";
    case GemmPrecision::kBf16: return "bf16";
    case GemmPrecision::kFp8: return "fp8";
  }
  return "?";
}

size_t gemm_workspace_bytes(int sm_major) {
  const size_t mib = size_t{1} << 20;
  return sm_major >= 9 ? 32 * mib : 4 * mib;
}

size_t gemm_input_bytes(GemmPrecision p) {
  switch (p) {
    case GemmPrecision::kFp32:
    case GemmPrecision::kTf32: return sizeof(float);
    case GemmPrecision::kBf16: return sizeof(uint16_t);
    case GemmPrecision::kFp8: return sizeof(uint8_t);
  }
  return 0;
}

PeakScratchLayout gemm_peak_scratch_layout(GemmPrecision p, int64_t n) {
  CHECK(n >= kFp8DimAlign && n % kFp8DimAlign == 0, "peak GEMM edge %lld", (long long)n);
  const size_t nn = static_cast<size_t>(n) * static_cast<size_t>(n);
  PeakScratchLayout l;
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t off = at;
    at = round_up_size(at + bytes, kGemmWorkspaceAlign);
    return off;
  };
  l.a = take(nn * gemm_input_bytes(p));
  l.b = take(nn * gemm_input_bytes(p));
  l.c = take(nn * sizeof(float));
  if (p == GemmPrecision::kFp8) {
    l.a_scales = take(static_cast<size_t>(fp8_gemm_scale_count(n, n, Fp8Scaling::kTile1x128)) *
                      sizeof(float));
    l.b_scales = take(static_cast<size_t>(fp8_gemm_scale_count(n, n, Fp8Scaling::kBlock128)) *
                      sizeof(float));
  }
  l.total = at;
  return l;
}

size_t gemm_peak_scratch_bytes(GemmPrecision p, int64_t n) {
  return gemm_peak_scratch_layout(p, n).total;
}

int64_t fp8_gemm_ktiles(int64_t K) { return ceil_div(K, kFp8ScaleBlock); }

int64_t fp8_gemm_block_scale_ld(int64_t K) {
  return round_up(fp8_gemm_ktiles(K), kFp8OuterAlign);
}

int64_t fp8_gemm_scale_count(int64_t R, int64_t K, Fp8Scaling s) {
  if (s == Fp8Scaling::kTile1x128) return fp8_gemm_ktiles(K) * R;
  return ceil_div(R, kFp8ScaleBlock) * fp8_gemm_block_scale_ld(K);
}

int64_t fp8_gemm_scale_index(int64_t r, int64_t k, int64_t R, int64_t K, Fp8Scaling s) {
  if (s == Fp8Scaling::kTile1x128) return (k / kFp8ScaleBlock) * R + r;
  return (r / kFp8ScaleBlock) * fp8_gemm_block_scale_ld(K) + k / kFp8ScaleBlock;
}

void fp8_gemm_scales_from_quant(float* dst, const float* src, int64_t R, int64_t K,
                                Fp8Scaling s) {
  const int64_t L = fp8_gemm_ktiles(K);
  const int64_t n = fp8_gemm_scale_count(R, K, s);
  for (int64_t i = 0; i < n; ++i) dst[i] = 0.0f;
  if (s == Fp8Scaling::kTile1x128) {
    for (int64_t r = 0; r < R; ++r)
      for (int64_t b = 0; b < L; ++b) dst[b * R + r] = src[r * L + b];
  } else {
    const int64_t ld = fp8_gemm_block_scale_ld(K);
    for (int64_t p = 0; p < ceil_div(R, kFp8ScaleBlock); ++p)
      for (int64_t b = 0; b < L; ++b) dst[p * ld + b] = src[p * L + b];
  }
}

int64_t fp8_expert_t_scale_offset(const int64_t* row_offsets, int64_t e, int64_t R) {
  int64_t off = 0;
  for (int64_t i = 0; i < e; ++i) off += fp8_gemm_ktiles(row_offsets[i + 1] - row_offsets[i]) * R;
  return off;
}

int64_t fp8_expert_t_scale_count(const int64_t* row_offsets, int64_t E, int64_t R) {
  return fp8_expert_t_scale_offset(row_offsets, E, R);
}

std::vector<GemmLinearShape> gemm_linear_shapes(const GemmModelShape& m) {
  std::vector<GemmLinearShape> v;
  auto add = [&](const char* name, int64_t out, int64_t in,
                 LinearPrecision p = LinearPrecision::kRun, bool routed = false) {
    v.push_back(GemmLinearShape{name, out, in, p, routed});
  };
  const int64_t C = m.d_model;
  if (m.attn == AttentionKind::kMha) {
    add("attn/wqkv", (m.n_heads + 2 * m.n_kv_heads) * m.head_dim, C);
    add("attn/wo", C, m.n_heads * m.head_dim);
  } else {
    const int64_t qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
    if (m.q_lora_rank > 0) {
      add("attn/wq_a", m.q_lora_rank, C);
      add("attn/wq_b", m.n_heads * qk, m.q_lora_rank);
    } else {
      add("attn/wq", m.n_heads * qk, C);
    }
    add("attn/wkv_a", m.kv_lora_rank + m.qk_rope_head_dim, C);
    add("attn/wkv_b", m.n_heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank);
    add("attn/wo", C, m.n_heads * m.v_head_dim);
  }
  if (m.d_ff > 0) {
    add("mlp/w13", 2 * m.d_ff, C);
    add("mlp/w2", C, m.d_ff);
  }
  if (m.num_experts > 0) {
    add("moe/router", m.num_experts, C, LinearPrecision::kHigh);
    add("moe/experts/w13", 2 * m.d_expert, C, LinearPrecision::kRun, true);
    add("moe/experts/w2", C, m.d_expert, LinearPrecision::kRun, true);
    if (m.d_shared > 0) {
      add("moe/shared/w13", 2 * m.d_shared, C);
      add("moe/shared/w2", C, m.d_shared);
    }
  }
  if (m.mtp_depth > 0) add("mtp/eh_proj", C, 2 * C, LinearPrecision::kHigh);
  add("lm_head", m.vocab_size, C, LinearPrecision::kHigh);
  return v;
}

std::string gemm_fp8_shape_error(const std::vector<GemmLinearShape>& shapes) {
  for (const GemmLinearShape& s : shapes) {
    if (s.precision != LinearPrecision::kRun) continue;
    const struct {
      const char* what;
      int64_t v;
    } dims[2] = {{"in_features", s.in_features}, {"out_features", s.out_features}};
    for (const auto& d : dims) {
      if (d.v > 0 && d.v % kFp8DimAlign == 0) continue;
      return strprintf(
          "FP8 GEMM: layer %s has %s = %lld, not a positive multiple of %lld (cuBLASLt FP8 "
          "needs K and leading dimensions in multiples of 16 elements, 16-byte aligned rows; "
          "use widths that are multiples of 16, precision.native_gemm = false (the FP32 "
          "emulation) or precision.mode = \"bf16\")",
          s.name.c_str(), d.what, static_cast<long long>(d.v),
          static_cast<long long>(kFp8DimAlign));
    }
  }
  return std::string();
}

void gemm_fp8_shapes_check(const std::vector<GemmLinearShape>& shapes) {
  const std::string e = gemm_fp8_shape_error(shapes);
  if (!e.empty()) user_error("%s", e.c_str());
}

}  // namespace moe::cuda
