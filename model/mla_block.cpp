// Pre-norm attention block with DeepSeek-V3's Multi-head Latent Attention (report section
// 2.1.1; the MLA class of its inference code, "naive" attention): RMSNorm -> low-rank query
// and key / value projections -> RoPE on each query head's last qk_rope dims and on one key
// part shared by all heads -> causal softmax attention -> output projection -> residual add.
//
// Dimension letters: NH heads, Dn = qk_nope, Dr = qk_rope, Dq = Dn + Dr (query / key head),
// Dv = v_hd, QL = q_lora, KVL = kv_lora; QD = NH Dq, KVA = KVL + Dr, KVB = NH (Dn + Dv),
// W = 2 QD + NH Dv (the packed attention input). Per token, x = ln1:
//   q = wq_b RMSNorm_{q_norm}(wq_a x)   (QL > 0; else q = wq x)       NH heads [q_nope | q_rope]
//   [c | k_rope] = wkv_a x                                             c (KVL), k_rope (Dr)
//   [k_nope_h | v_h] = (wkv_b RMSNorm_{kv_norm}(c))_h                  per head
//   k_h = [k_nope_h | RoPE(k_rope)], q_h's q_rope turned by RoPE too
//   o_h = softmax_causal(q_h k_h^T / sqrt(Dq)) v_h;  out = wo [o_1 .. o_NH]
// The attention core is cpu::attention_forward over [q | k | v] with NKV = NH, HD = Dq and
// HDv = Dv. The projections go through model/linear.h in d.precision; the latent norms, RoPE
// and the attention core stay in T.
//
// Accumulation contract (model/layers.h): weight gradients += (the weight pass only; the
// latent norms' weights like attn_norm's), la.kept assigned, dres updated in place. The
// gradient of the shared k_rope sums its heads' gradients in head order (deterministic).
#include <cstring>
#include <type_traits>

#include "model/check.h"
#include "model/fp8.h"
#include "model/fp8_quant.h"
#include "model/kernels/cpu/dense_ops.h"
#include "model/layers.h"
#include "model/linear.h"

namespace moe {

namespace {

constexpr int64_t kParallelMin = 1 << 14;

struct MlaDims {
  int64_t NH, Dn, Dr, Dq, Dv, QL, KVL, QD, KVA, KVB, W, HA;
};

MlaDims mla_dims(const ModelDims& d) {
  CHECK(d.mla(), "MLA block on a model with standard attention");
  MlaDims m;
  m.NH = d.NH;
  m.Dn = d.qk_nope;
  m.Dr = d.qk_rope;
  m.Dq = d.qk_hd();
  m.Dv = d.v_hd;
  m.QL = d.q_lora;
  m.KVL = d.kv_lora;
  m.QD = m.NH * m.Dq;
  m.KVA = m.KVL + m.Dr;
  m.KVB = m.NH * (m.Dn + m.Dv);
  m.HA = m.NH * m.Dv;
  m.W = 2 * m.QD + m.HA;
  return m;
}

// dst (N, w) with row stride ld_dst <- src (N, w) with row stride ld_src.
template <typename T>
void copy_rows(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t N, int64_t w) {
  if (w == 0) return;
#pragma omp parallel for schedule(static) if (N * w >= kParallelMin)
  for (int64_t n = 0; n < N; ++n)
    std::memcpy(dst + n * ld_dst, src + n * ld_src, sizeof(T) * static_cast<size_t>(w));
}

// RoPE (forward or backward) on the last Dr dims of each of the NH heads (Dq apart) of rows
// `stride` apart: one rope call per head, as the heads' RoPE parts are not adjacent.
template <typename T>
void rope_heads(bool forward, T* x, const T* cos_t, const T* sin_t, const MlaDims& m, int64_t B,
                int64_t T_, int64_t stride) {
  for (int64_t h = 0; h < m.NH; ++h) {
    T* xh = x + h * m.Dq + m.Dn;
    if (forward) {
      cpu::rope_forward<T>(xh, cos_t, sin_t, B, T_, 1, m.Dr, stride);
    } else {
      cpu::rope_backward<T>(xh, cos_t, sin_t, B, T_, 1, m.Dr, stride);
    }
  }
}

// out (N, OC) = ln1 . wq^T for the second GEMM that reads ln1 (the first saved it): in
// bf16 / fp8 its operand is rebuilt from the saved copy (fp8: the same 1x128 tiles, and
// dequantize(quantize(x)) is what linear_forward would multiply) instead of quantizing ln1
// again; the same bits either way.
template <typename T>
void ln1_linear_forward(T* out, const LayerActs<T>& la, const T* wq, int64_t N, int64_t C,
                        int64_t OC, PrecisionMode pm) {
  if (pm == PrecisionMode::kFp32) return linear_forward<T>(out, la.ln1, wq, N, C, OC, pm, la.lin);
  if constexpr (std::is_same_v<T, float>) {
    CHECK(la.lin.a && N * C <= la.lin.capacity, "linear scratch of %lld elements, %lld needed",
          (long long)la.lin.capacity, (long long)(N * C));
    if (pm == PrecisionMode::kFp8) {
      fp8_dequantize(la.lin.a, la.saved_ln1.codes, la.saved_ln1.scales, N, C, kTileAct);
    } else {
#pragma omp parallel for simd schedule(static) if (N * C >= kParallelMin)
      for (int64_t i = 0; i < N * C; ++i) la.lin.a[i] = bf16_to_float(la.saved_ln1.bf16[i]);
    }
    cpu::matmul_forward<float>(out, la.lin.a, wq, N, C, OC);
  } else {
    CHECK(false, "BF16 / FP8 GEMMs need float tensors");
  }
}

// Packs wkv_b's output kv (N, KVB) into the key heads' k_nope and the value heads of qkv.
template <typename T>
void pack_kv(T* qkv, const T* kv, const MlaDims& m, int64_t N) {
#pragma omp parallel for schedule(static) if (N * m.KVB >= kParallelMin)
  for (int64_t n = 0; n < N; ++n) {
    T* row = qkv + n * m.W;
    const T* src = kv + n * m.KVB;
    for (int64_t h = 0; h < m.NH; ++h) {
      const T* kvh = src + h * (m.Dn + m.Dv);
      std::memcpy(row + m.QD + h * m.Dq, kvh, sizeof(T) * static_cast<size_t>(m.Dn));
      std::memcpy(row + 2 * m.QD + h * m.Dv, kvh + m.Dn, sizeof(T) * static_cast<size_t>(m.Dv));
    }
  }
}

// The shared k_rope (N, Dr; rows ld apart) into every key head's last Dr dims.
template <typename T>
void broadcast_k_rope(T* qkv, const T* k_rope, int64_t ld, const MlaDims& m, int64_t N) {
  for (int64_t h = 0; h < m.NH; ++h)
    copy_rows(qkv + m.QD + h * m.Dq + m.Dn, m.W, k_rope, ld, N, m.Dr);
}

// The attention core's input gradient dqkv (N, W) into dkv (N, KVB: each head's [d k_nope |
// d v]) and d k_rope (N, Dr; rows ld apart) = the key heads' last Dr dims summed in head order.
template <typename T>
void unpack_dkv(T* dkv, T* dk_rope, int64_t ld, const T* dqkv, const MlaDims& m, int64_t N) {
#pragma omp parallel for schedule(static) if (N * m.W >= kParallelMin)
  for (int64_t n = 0; n < N; ++n) {
    const T* row = dqkv + n * m.W;
    T* dst = dkv + n * m.KVB;
    for (int64_t h = 0; h < m.NH; ++h) {
      T* dkvh = dst + h * (m.Dn + m.Dv);
      std::memcpy(dkvh, row + m.QD + h * m.Dq, sizeof(T) * static_cast<size_t>(m.Dn));
      std::memcpy(dkvh + m.Dn, row + 2 * m.QD + h * m.Dv, sizeof(T) * static_cast<size_t>(m.Dv));
    }
    T* dr = dk_rope + n * ld;
    for (int64_t i = 0; i < m.Dr; ++i) dr[i] = row[m.QD + m.Dn + i];
    for (int64_t h = 1; h < m.NH; ++h) {
      const T* dkh = row + m.QD + h * m.Dq + m.Dn;
      for (int64_t i = 0; i < m.Dr; ++i) dr[i] += dkh[i];
    }
  }
}

}  // namespace

template <typename T>
void mla_block_forward(T* res_out, LayerActs<T>& la, const T* res_in, const LayerParams<T>& lp,
                       const Activations<T>& a, const ModelDims& d, int64_t B, int64_t T_) {
  const MlaDims m = mla_dims(d);
  const int64_t N = B * T_, C = d.C;
  const PrecisionMode pm = d.precision;
  const T eps = static_cast<T>(d.norm_eps);
  T* qkv = la.qkv_mla;
  T* proj = a.mla_proj;
  cpu::rmsnorm_forward<T>(la.ln1, la.rstd1, res_in, lp.attn_norm, N, C, eps);
  // [c | k_rope] = wkv_a ln1: the latent kept, k_rope turned and given to every key head.
  linear_forward<T>(proj, la.ln1, lp.wkv_a, N, C, m.KVA, pm, la.lin, &la.saved_ln1);
  copy_rows(la.kv_c, m.KVL, proj, m.KVA, N, m.KVL);
  cpu::rope_forward<T>(proj + m.KVL, a.rope_cos, a.rope_sin, B, T_, 1, m.Dr, m.KVA);
  broadcast_k_rope(qkv, proj + m.KVL, m.KVA, m, N);
  // Queries, their RoPE parts turned in place.
  if (m.QL > 0) {
    ln1_linear_forward<T>(la.q_a, la, lp.wq_a, N, C, m.QL, pm);
    cpu::rmsnorm_forward<T>(la.q_an, la.q_rstd, la.q_a, lp.q_norm, N, m.QL, eps);
    linear_forward<T>(proj, la.q_an, lp.wq_b, N, m.QL, m.QD, pm, la.lin, &la.saved_q_an);
  } else {
    ln1_linear_forward<T>(proj, la, lp.wq, N, C, m.QD, pm);
  }
  copy_rows(qkv, m.W, proj, m.QD, N, m.QD);
  rope_heads(true, qkv, a.rope_cos, a.rope_sin, m, B, T_, m.W);
  // k_nope and v of every head from the normalized latent.
  cpu::rmsnorm_forward<T>(la.kv_an, la.kv_rstd, la.kv_c, lp.kv_norm, N, m.KVL, eps);
  linear_forward<T>(proj, la.kv_an, lp.wkv_b, N, m.KVL, m.KVB, pm, la.lin, &la.saved_kv_an);
  pack_kv(qkv, proj, m, N);
  cpu::attention_forward<T>(la.attn_out, la.probs, qkv, B, T_, m.NH, m.NH, m.Dq, m.Dv);
  linear_forward<T>(a.tmp, la.attn_out, lp.wo, N, m.HA, C, pm, la.lin, &la.saved_attn_out);
  cpu::residual_forward<T>(res_out, res_in, a.tmp, N * C);
}

template <typename T>
void mla_block_backward_input(T* dres, LayerActs<T>& la, const T* res_in,
                              const LayerParams<T>& lp, Activations<T>& a, const ModelDims& d,
                              int64_t B, int64_t T_) {
  const MlaDims m = mla_dims(d);
  const int64_t N = B * T_, C = d.C;
  const PrecisionMode pm = d.precision;
  const LayerKept<T>& k = la.kept;
  // dres flows unchanged through the residual add; the branch gets a copy of it.
  std::memcpy(k.dres_mid, dres, sizeof(T) * static_cast<size_t>(N * C));
  linear_backward_input<T>(a.dattn, dres, lp.wo, N, m.HA, C, pm, la.lin);
  cpu::attention_backward<T>(a.dqkv_mla, a.dattn, la.qkv_mla, la.probs, B, T_, m.NH, m.NH, m.Dq,
                             m.Dv, a.attn_scratch);
  // Split the packed gradient: queries, per head [d k_nope | d v], the shared d k_rope.
  copy_rows(k.dq, m.QD, a.dqkv_mla, m.W, N, m.QD);
  rope_heads(false, k.dq, a.rope_cos, a.rope_sin, m, B, T_, m.QD);
  unpack_dkv(k.dkv, k.dkv_a + m.KVL, m.KVA, a.dqkv_mla, m, N);
  cpu::rope_backward<T>(k.dkv_a + m.KVL, a.rope_cos, a.rope_sin, B, T_, 1, m.Dr, m.KVA);
  // Through wkv_b and kv_norm to the latent, next to d k_rope in wkv_a's output gradient.
  linear_backward_input<T>(k.dkv_an, k.dkv, lp.wkv_b, N, m.KVL, m.KVB, pm, la.lin);
  std::memset(a.dkv_c, 0, sizeof(T) * static_cast<size_t>(N * m.KVL));
  cpu::rmsnorm_backward_input<T>(a.dkv_c, k.dkv_an, la.kv_c, lp.kv_norm, la.kv_rstd, N, m.KVL);
  copy_rows(k.dkv_a, m.KVA, a.dkv_c, m.KVL, N, m.KVL);
  // ln1 feeds wkv_a and the query path: its gradient is the sum of both.
  linear_backward_input<T>(k.dln1, k.dkv_a, lp.wkv_a, N, C, m.KVA, pm, la.lin);
  if (m.QL > 0) {
    linear_backward_input<T>(k.dq_an, k.dq, lp.wq_b, N, m.QL, m.QD, pm, la.lin);
    std::memset(k.dq_a, 0, sizeof(T) * static_cast<size_t>(N * m.QL));
    cpu::rmsnorm_backward_input<T>(k.dq_a, k.dq_an, la.q_a, lp.q_norm, la.q_rstd, N, m.QL);
    linear_backward_input<T>(k.dln1, k.dq_a, lp.wq_a, N, C, m.QL, pm, la.lin, true);
  } else {
    linear_backward_input<T>(k.dln1, k.dq, lp.wq, N, C, m.QD, pm, la.lin, true);
  }
  cpu::rmsnorm_backward_input<T>(dres, k.dln1, res_in, lp.attn_norm, la.rstd1, N, C);
}

template <typename T>
void mla_block_backward_weight(LayerParams<T>& lg, const LayerActs<T>& la, const T* res_in,
                               const ModelDims& d, int64_t N) {
  const MlaDims m = mla_dims(d);
  const int64_t C = d.C;
  const LayerKept<T>& k = la.kept;
  const PrecisionMode pm = d.precision;
  linear_backward_weight_saved<T>(lg.wo, k.dres_mid, la.attn_out, la.saved_attn_out, N, m.HA, C,
                                  pm, la.lin);
  linear_backward_weight_saved<T>(lg.wkv_b, k.dkv, la.kv_an, la.saved_kv_an, N, m.KVL, m.KVB, pm,
                                  la.lin);
  cpu::rmsnorm_backward_weight<T>(lg.kv_norm, k.dkv_an, la.kv_c, la.kv_rstd, N, m.KVL);
  linear_backward_weight_saved<T>(lg.wkv_a, k.dkv_a, la.ln1, la.saved_ln1, N, C, m.KVA, pm,
                                  la.lin);
  if (m.QL > 0) {
    linear_backward_weight_saved<T>(lg.wq_b, k.dq, la.q_an, la.saved_q_an, N, m.QL, m.QD, pm,
                                    la.lin);
    cpu::rmsnorm_backward_weight<T>(lg.q_norm, k.dq_an, la.q_a, la.q_rstd, N, m.QL);
    linear_backward_weight_saved<T>(lg.wq_a, k.dq_a, la.ln1, la.saved_ln1, N, C, m.QL, pm,
                                    la.lin);
  } else {
    linear_backward_weight_saved<T>(lg.wq, k.dq, la.ln1, la.saved_ln1, N, C, m.QD, pm, la.lin);
  }
  cpu::rmsnorm_backward_weight<T>(lg.attn_norm, k.dln1, res_in, la.rstd1, N, C);
}

#define MOE_INSTANTIATE(T)                                                                    \
  template void mla_block_forward<T>(T*, LayerActs<T>&, const T*, const LayerParams<T>&,     \
                                     const Activations<T>&, const ModelDims&, int64_t,        \
                                     int64_t);                                                \
  template void mla_block_backward_input<T>(T*, LayerActs<T>&, const T*, const LayerParams<T>&, \
                                            Activations<T>&, const ModelDims&, int64_t,       \
                                            int64_t);                                         \
  template void mla_block_backward_weight<T>(LayerParams<T>&, const LayerActs<T>&, const T*,  \
                                             const ModelDims&, int64_t);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
