// Forward and backward of model chunks (a contiguous range of layers of one micro-batch's
// activation slot); the whole model on one process is the chunk [0, L) in slot 0.
#include "model/model.h"

#include <cstring>

#include "model/check.h"
#include "model/kernels/cpu/dense_ops.h"
#include "model/layers.h"

namespace moe {

namespace {

template <typename T>
void chunk_check(const Model<T>& m, int slot, int64_t l0, int64_t l1) {
  CHECK(slot >= 0 && slot < static_cast<int>(m.slots.size()), "slot %d of %zu", slot,
        m.slots.size());
  CHECK(0 <= l0 && l0 < l1 && l1 <= m.d.L, "chunk [%lld, %lld) of %lld layers", (long long)l0,
        (long long)l1, (long long)m.d.L);
  for (int64_t l = l0; l < l1; ++l) CHECK(m.part.holds_layer(l), "layer %lld not held", (long long)l);
  CHECK(l0 > 0 || m.part.embedding, "embedding not held");
  CHECK(l1 < m.d.L || m.part.head, "head not held");
}

// The exchange key of MoE layer moe_l for the micro-batch in `slot`: every micro-batch in
// flight keeps its own routing plan until its backward.
template <typename T>
int64_t exchange_key(const Model<T>& m, int slot, int64_t moe_l) {
  return static_cast<int64_t>(slot) * m.d.n_moe_layers() + moe_l;
}

}  // namespace

template <typename T>
T* model_chunk_residual(Model<T>& m, int slot, int64_t l, int64_t B, int64_t T_) {
  return m.slots[static_cast<size_t>(slot)].res + l * B * T_ * m.d.C;
}

template <typename T>
T* model_chunk_grad(Model<T>& m, int slot) {
  return m.slots[static_cast<size_t>(slot)].dres;
}

template <typename T>
ChunkLoss model_chunk_forward(Model<T>& m, int slot, int64_t l0, int64_t l1,
                              const int32_t* tokens, const int32_t* targets, int64_t B,
                              int64_t T_, bool training) {
  const ModelDims& d = m.d;
  chunk_check(m, slot, l0, l1);
  CHECK(B >= 1 && B <= m.B_max && T_ >= 1 && T_ <= d.T, "B %lld T %lld", (long long)B,
        (long long)T_);
  Activations<T>& a = m.slots[static_cast<size_t>(slot)];
  // A pending weight pass reads this chunk's saved activations (split backward).
  CHECK(!(l0 == 0 && a.embedding_weight_pending) && !(l1 == d.L && a.head_weight_pending),
        "slot %d: forward over a pending BackwardPart::kWeight", slot);
  for (int64_t l = l0; l < l1; ++l)
    CHECK(!a.layers[static_cast<size_t>(l)].weight_pending,
          "slot %d layer %lld: forward over a pending BackwardPart::kWeight", slot, (long long)l);
  const int64_t N = B * T_, C = d.C;
  a.B = B;
  a.Tcur = T_;
  ChunkLoss out;
  if (l0 == 0) {
    std::memcpy(a.tokens, tokens, sizeof(int32_t) * static_cast<size_t>(N));
    cpu::embedding_forward<T>(a.res, a.tokens, m.p.wte, N, C);
  }
  for (int64_t l = l0; l < l1; ++l) {
    LayerActs<T>& la = a.layers[static_cast<size_t>(l)];
    const LayerParams<T>& lp = m.p.layers[static_cast<size_t>(l)];
    T* res_in = a.res + l * N * C;
    T* res_out = a.res + (l + 1) * N * C;
    attention_block_forward<T>(la.res_mid, la, res_in, lp, a, d, B, T_);
    cpu::rmsnorm_forward<T>(la.ln2, la.rstd2, la.res_mid, lp.ffn_norm, N, C,
                            static_cast<T>(d.norm_eps));
    if (d.is_moe(l)) {
      const int64_t moe_l = l - d.dense_layers;
      out.aux_sum += moe_ffn_forward<T>(res_out, la, la.ln2, lp, m.router_bias + moe_l * d.E,
                                        training ? m.expert_load + moe_l * d.E : nullptr, a, d,
                                        B, T_, m.exchange, exchange_key(m, slot, moe_l));
    } else {
      dense_ffn_forward<T>(res_out, la, la.ln2, lp, d, N);
    }
    cpu::residual_forward<T>(res_out, res_out, la.res_mid, N * C);
  }
  if (l1 < d.L) return out;
  const T* res_last = a.res + d.L * N * C;
  cpu::rmsnorm_forward<T>(a.lnf, a.rstdf, res_last, m.p.final_norm, N, C,
                          static_cast<T>(d.norm_eps));
  cpu::matmul_forward<T>(a.logits, a.lnf, m.p.lm_head, N, C, d.V);
  if (!targets) return out;
  std::memcpy(a.targets, targets, sizeof(int32_t) * static_cast<size_t>(N));
  cpu::cross_entropy_forward<T>(a.losses, a.probs, a.logits, a.targets, N, d.V);
  double sum = 0;
  int64_t count = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (a.targets[i] < 0) continue;
    sum += static_cast<double>(a.losses[i]);
    ++count;
  }
  out.ce_mean = count > 0 ? sum / static_cast<double>(count) : 0.0;
  return out;
}

namespace {

// Head input pass: a.dres = dL/d res[L]; keeps a.dlogits and a.dlnf.
template <typename T>
void head_backward_input(Model<T>& m, Activations<T>& a, T dloss_ce, int64_t N) {
  const ModelDims& d = m.d;
  const int64_t C = d.C;
  const T* res_last = a.res + d.L * N * C;
  cpu::cross_entropy_backward<T>(a.dlogits, a.probs, a.targets, dloss_ce, N, d.V);
  cpu::matmul_backward_input<T>(a.dlnf, a.dlogits, m.p.lm_head, N, C, d.V);
  std::memset(a.dres, 0, sizeof(T) * static_cast<size_t>(N * C));
  cpu::rmsnorm_backward_input<T>(a.dres, a.dlnf, res_last, m.p.final_norm, a.rstdf, N, C);
}

template <typename T>
void head_backward_weight(Model<T>& m, const Activations<T>& a, int64_t N) {
  const ModelDims& d = m.d;
  const int64_t C = d.C;
  cpu::matmul_backward_weight<T>(m.g.lm_head, a.dlogits, a.lnf, N, C, d.V);
  cpu::rmsnorm_backward_weight<T>(m.g.final_norm, a.dlnf, a.res + d.L * N * C, a.rstdf, N, C);
}

// FFN half of layer l, input pass: a.dres from dL/d res_out to dL/d res_mid (the branch's
// input gradient is kept in kept.dln2).
template <typename T>
void ffn_half_backward_input(Model<T>& m, Activations<T>& a, int slot, int64_t l, T dloss_aux) {
  const ModelDims& d = m.d;
  const int64_t N = a.B * a.Tcur, C = d.C;
  LayerActs<T>& la = a.layers[static_cast<size_t>(l)];
  const LayerParams<T>& lp = m.p.layers[static_cast<size_t>(l)];
  if (d.is_moe(l)) {
    const int64_t moe_l = l - d.dense_layers;
    moe_ffn_backward_input<T>(la.kept.dln2, la, a.dres, lp, a, d, a.B, a.Tcur, dloss_aux,
                              m.exchange, exchange_key(m, slot, moe_l));
  } else {
    dense_ffn_backward_input<T>(la.kept.dln2, la, a.dres, lp, a, d, N);
  }
  cpu::rmsnorm_backward_input<T>(a.dres, la.kept.dln2, la.res_mid, lp.ffn_norm, la.rstd2, N, C);
}

template <typename T>
void ffn_half_backward_weight(Model<T>& m, const Activations<T>& a, int64_t l) {
  const ModelDims& d = m.d;
  const int64_t N = a.B * a.Tcur;
  const LayerActs<T>& la = a.layers[static_cast<size_t>(l)];
  LayerParams<T>& lg = m.g.layers[static_cast<size_t>(l)];
  if (d.is_moe(l)) {
    moe_ffn_backward_weight<T>(lg, la, la.ln2, d, N);
  } else {
    dense_ffn_backward_weight<T>(lg, la, la.ln2, d, N);
  }
  cpu::rmsnorm_backward_weight<T>(lg.ffn_norm, la.kept.dln2, la.res_mid, la.rstd2, N, d.C);
}

template <typename T>
void attention_half_backward_input(Model<T>& m, Activations<T>& a, int64_t l) {
  const int64_t N = a.B * a.Tcur;
  attention_block_backward_input<T>(a.dres, a.layers[static_cast<size_t>(l)],
                                    a.res + l * N * m.d.C, m.p.layers[static_cast<size_t>(l)], a,
                                    m.d, a.B, a.Tcur);
}

template <typename T>
void attention_half_backward_weight(Model<T>& m, const Activations<T>& a, int64_t l) {
  const int64_t N = a.B * a.Tcur;
  attention_block_backward_weight<T>(m.g.layers[static_cast<size_t>(l)],
                                     a.layers[static_cast<size_t>(l)], a.res + l * N * m.d.C,
                                     m.d, N);
}

template <typename T>
void grads_ready(Model<T>& m, int64_t stage) {
  if (m.grads_ready) m.grads_ready(stage);
}

}  // namespace

template <typename T>
void model_chunk_backward(Model<T>& m, int slot, int64_t l0, int64_t l1, T dloss_ce,
                          T dloss_aux, BackwardPart part) {
  const ModelDims& d = m.d;
  chunk_check(m, slot, l0, l1);
  Activations<T>& a = m.slots[static_cast<size_t>(slot)];
  const int64_t N = a.B * a.Tcur, C = d.C;
  const bool head = l1 == d.L, embedding = l0 == 0;
  CHECK(part == BackwardPart::kFull || a.split_backward,
        "BackwardPart::kInput / kWeight need a model built with split_backward = true");
  // A kInput and its kWeight pair up per layer: no pass may run over a pending weight pass
  // (its kept gradients would be overwritten) and no weight pass without its input pass.
  const bool want_pending = part == BackwardPart::kWeight;
  const char* why = want_pending ? "kWeight without its kInput" : "weight pass still pending";
  CHECK(!head || a.head_weight_pending == want_pending, "slot %d head: %s", slot, why);
  for (int64_t l = l0; l < l1; ++l)
    CHECK(a.layers[static_cast<size_t>(l)].weight_pending == want_pending,
          "slot %d layer %lld: %s", slot, (long long)l, why);
  CHECK(!embedding || a.embedding_weight_pending == want_pending, "slot %d embedding: %s", slot,
        why);

  // Stage numbers for grads_ready count from the loss side of the whole model.
  if (part == BackwardPart::kFull) {
    if (head) {
      head_backward_input(m, a, dloss_ce, N);
      head_backward_weight(m, a, N);
      grads_ready(m, 0);
    }
    for (int64_t l = l1 - 1; l >= l0; --l) {
      ffn_half_backward_input(m, a, slot, l, dloss_aux);
      ffn_half_backward_weight(m, a, l);
      // Mid-layer: nothing new is final, but in-flight reductions get a chance to progress.
      grads_ready(m, d.L - l - 1);
      attention_half_backward_input(m, a, l);
      attention_half_backward_weight(m, a, l);
      grads_ready(m, d.L - l);
    }
    if (embedding) {
      cpu::embedding_backward<T>(m.g.wte, a.dres, a.tokens, N, C);
      grads_ready(m, d.L + 1);
    }
  } else if (part == BackwardPart::kInput) {
    if (head) {
      head_backward_input(m, a, dloss_ce, N);
      a.head_weight_pending = true;
    }
    for (int64_t l = l1 - 1; l >= l0; --l) {
      ffn_half_backward_input(m, a, slot, l, dloss_aux);
      attention_half_backward_input(m, a, l);
      a.layers[static_cast<size_t>(l)].weight_pending = true;
    }
    if (embedding) {
      std::memcpy(a.dres0, a.dres, sizeof(T) * static_cast<size_t>(N * C));
      a.embedding_weight_pending = true;
    }
  } else {
    if (head) {
      head_backward_weight(m, a, N);
      a.head_weight_pending = false;
      grads_ready(m, 0);
    }
    for (int64_t l = l1 - 1; l >= l0; --l) {
      ffn_half_backward_weight(m, a, l);
      attention_half_backward_weight(m, a, l);
      a.layers[static_cast<size_t>(l)].weight_pending = false;
      grads_ready(m, d.L - l);
    }
    if (embedding) {
      cpu::embedding_backward<T>(m.g.wte, a.dres0, a.tokens, N, C);
      a.embedding_weight_pending = false;
      grads_ready(m, d.L + 1);
    }
  }
}

template <typename T>
double model_forward(Model<T>& m, const int32_t* tokens, const int32_t* targets, int64_t B,
                     int64_t T_, bool training) {
  const ChunkLoss r = model_chunk_forward<T>(m, 0, 0, m.d.L, tokens, targets, B, T_, training);
  m.aux_loss_sum = targets ? r.aux_sum : 0.0;
  return r.ce_mean;
}

template <typename T>
void model_backward(Model<T>& m, T dloss_ce, T dloss_aux) {
  model_chunk_backward<T>(m, 0, 0, m.d.L, dloss_ce, dloss_aux, BackwardPart::kFull);
}

#define MOE_INSTANTIATE(T)                                                                  \
  template double model_forward<T>(Model<T>&, const int32_t*, const int32_t*, int64_t,       \
                                   int64_t, bool);                                          \
  template void model_backward<T>(Model<T>&, T, T);                                         \
  template ChunkLoss model_chunk_forward<T>(Model<T>&, int, int64_t, int64_t, const int32_t*, \
                                            const int32_t*, int64_t, int64_t, bool);        \
  template void model_chunk_backward<T>(Model<T>&, int, int64_t, int64_t, T, T, BackwardPart); \
  template T* model_chunk_residual<T>(Model<T>&, int, int64_t, int64_t, int64_t);                             \
  template T* model_chunk_grad<T>(Model<T>&, int);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
