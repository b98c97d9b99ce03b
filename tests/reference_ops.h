// Naive double-precision reference implementations of the dense kernels (dense_ops.h),
// written as the plainest loops that follow the math, for tests to compare against.
// Same shapes, argument order and accumulation contract as the moe::cpu kernels, except
// where noted (rmsnorm recomputes rstd; rope takes theta instead of tables; backward
// references fuse dX and dW). Header-only so any test can include it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace moe::ref {

// C(M,N) = alpha op(A) op(B) + beta C, row-major with leading dimensions.
inline void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha,
                 const double* A, int64_t lda, const double* B, int64_t ldb, double beta, double* C,
                 int64_t ldc) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        const double a = trans_a ? A[k * lda + i] : A[i * lda + k];
        const double b = trans_b ? B[j * ldb + k] : B[k * ldb + j];
        s += a * b;
      }
      C[i * ldc + j] = alpha * s + (beta == 0.0 ? 0.0 : beta * C[i * ldc + j]);
    }
}

// out(N, OC) = inp(N, IC) weight(OC, IC)^T
inline void matmul_forward(double* out, const double* inp, const double* weight, int64_t N,
                           int64_t IC, int64_t OC) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < OC; ++o) {
      double s = 0.0;
      for (int64_t i = 0; i < IC; ++i) s += inp[n * IC + i] * weight[o * IC + i];
      out[n * OC + o] = s;
    }
}

// dinp = dout weight (assigned); dweight += dout^T inp.
inline void matmul_backward(double* dinp, double* dweight, const double* dout, const double* inp,
                            const double* weight, int64_t N, int64_t IC, int64_t OC) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < IC; ++i) {
      double s = 0.0;
      for (int64_t o = 0; o < OC; ++o) s += dout[n * OC + o] * weight[o * IC + i];
      dinp[n * IC + i] = s;
    }
  for (int64_t o = 0; o < OC; ++o)
    for (int64_t i = 0; i < IC; ++i) {
      double s = 0.0;
      for (int64_t n = 0; n < N; ++n) s += dout[n * OC + o] * inp[n * IC + i];
      dweight[o * IC + i] += s;
    }
}

inline void embedding_forward(double* out, const int32_t* tokens, const double* wte, int64_t N,
                              int64_t C) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) out[n * C + c] = wte[tokens[n] * C + c];
}

inline void embedding_backward(double* dwte, const double* dout, const int32_t* tokens, int64_t N,
                               int64_t C) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) dwte[tokens[n] * C + c] += dout[n * C + c];
}

inline void rmsnorm_forward(double* out, double* rstd, const double* inp, const double* weight,
                            int64_t N, int64_t C, double eps) {
  for (int64_t n = 0; n < N; ++n) {
    double ss = 0.0;
    for (int64_t c = 0; c < C; ++c) ss += inp[n * C + c] * inp[n * C + c];
    const double r = 1.0 / std::sqrt(ss / C + eps);
    rstd[n] = r;
    for (int64_t c = 0; c < C; ++c) out[n * C + c] = inp[n * C + c] * r * weight[c];
  }
}

// dinp += J^T dout (full Jacobian of y_c = x_c r w_c), dweight += sum_n dout x r.
inline void rmsnorm_backward(double* dinp, double* dweight, const double* dout, const double* inp,
                             const double* weight, int64_t N, int64_t C, double eps) {
  for (int64_t n = 0; n < N; ++n) {
    const double* x = inp + n * C;
    double ss = 0.0;
    for (int64_t c = 0; c < C; ++c) ss += x[c] * x[c];
    const double r = 1.0 / std::sqrt(ss / C + eps);
    for (int64_t k = 0; k < C; ++k) {
      double s = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        // dy_c/dx_k = w_c (r [c == k] - x_c x_k r^3 / C)
        const double j = weight[c] * ((c == k ? r : 0.0) - x[c] * x[k] * r * r * r / C);
        s += dout[n * C + c] * j;
      }
      dinp[n * C + k] += s;
    }
    for (int64_t c = 0; c < C; ++c) dweight[c] += dout[n * C + c] * x[c] * r;
  }
}

// In place on (B, T, H, HD) with token stride `stride`; sign = +1 forward, -1 backward.
inline void rope_apply(double* x, int64_t B, int64_t T, int64_t H, int64_t HD, int64_t stride,
                       double theta, double sign) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < HD / 2; ++i) {
          const double a = sign * t * std::pow(theta, -2.0 * i / HD);
          double* v = x + (b * T + t) * stride + h * HD + 2 * i;
          const double x0 = v[0], x1 = v[1];
          v[0] = x0 * std::cos(a) - x1 * std::sin(a);
          v[1] = x0 * std::sin(a) + x1 * std::cos(a);
        }
}

// Causal attention over fused qkv (B, T, (NH + 2 NKV) HD); out (B, T, NH HD); probs (B, NH, T, T).
inline void attention_forward(double* out, double* probs, const double* qkv, int64_t B, int64_t T,
                              int64_t NH, int64_t NKV, int64_t HD) {
  const int64_t W = (NH + 2 * NKV) * HD;
  const double scale = 1.0 / std::sqrt(static_cast<double>(HD));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h) {
      const int64_t g = h / (NH / NKV);
      double* p = probs + (b * NH + h) * T * T;
      for (int64_t i = 0; i < T; ++i) {
        const double* q = qkv + (b * T + i) * W + h * HD;
        double m = -INFINITY;
        for (int64_t j = 0; j <= i; ++j) {
          const double* k = qkv + (b * T + j) * W + (NH + g) * HD;
          double s = 0.0;
          for (int64_t d = 0; d < HD; ++d) s += q[d] * k[d];
          p[i * T + j] = s * scale;
          m = std::max(m, s * scale);
        }
        double sum = 0.0;
        for (int64_t j = 0; j <= i; ++j) sum += std::exp(p[i * T + j] - m);
        for (int64_t j = 0; j < T; ++j)
          p[i * T + j] = j <= i ? std::exp(p[i * T + j] - m) / sum : 0.0;
        for (int64_t d = 0; d < HD; ++d) {
          double o = 0.0;
          for (int64_t j = 0; j <= i; ++j)
            o += p[i * T + j] * qkv[(b * T + j) * W + (NH + NKV + g) * HD + d];
          out[(b * T + i) * NH * HD + h * HD + d] = o;
        }
      }
    }
}

// lse (B, NH, T): log sum_{j <= i} exp(scale q_i . k_j) per query row, in double throughout.
inline void attention_lse(double* lse, const double* qkv, int64_t B, int64_t T, int64_t NH,
                          int64_t NKV, int64_t HD) {
  const int64_t W = (NH + 2 * NKV) * HD;
  const double scale = 1.0 / std::sqrt(static_cast<double>(HD));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h) {
      const int64_t g = h / (NH / NKV);
      for (int64_t i = 0; i < T; ++i) {
        const double* q = qkv + (b * T + i) * W + h * HD;
        double sum = 0.0;
        for (int64_t j = 0; j <= i; ++j) {
          const double* k = qkv + (b * T + j) * W + (NH + g) * HD;
          double s = 0.0;
          for (int64_t d = 0; d < HD; ++d) s += q[d] * k[d];
          sum += std::exp(s * scale);
        }
        lse[(b * NH + h) * T + i] = std::log(sum);
      }
    }
}

// dqkv assigned. Recomputes the probabilities from qkv.
inline void attention_backward(double* dqkv, const double* dout, const double* qkv, int64_t B,
                               int64_t T, int64_t NH, int64_t NKV, int64_t HD) {
  const int64_t W = (NH + 2 * NKV) * HD;
  const double scale = 1.0 / std::sqrt(static_cast<double>(HD));
  std::vector<double> out(B * T * NH * HD), probs(B * NH * T * T), dp(T);
  attention_forward(out.data(), probs.data(), qkv, B, T, NH, NKV, HD);
  for (int64_t i = 0; i < B * T * W; ++i) dqkv[i] = 0.0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h) {
      const int64_t g = h / (NH / NKV);
      const double* p = probs.data() + (b * NH + h) * T * T;
      auto q = [&](int64_t t) { return qkv + (b * T + t) * W + h * HD; };
      auto k = [&](int64_t t) { return qkv + (b * T + t) * W + (NH + g) * HD; };
      auto v = [&](int64_t t) { return qkv + (b * T + t) * W + (NH + NKV + g) * HD; };
      auto dq = [&](int64_t t) { return dqkv + (b * T + t) * W + h * HD; };
      auto dk = [&](int64_t t) { return dqkv + (b * T + t) * W + (NH + g) * HD; };
      auto dv = [&](int64_t t) { return dqkv + (b * T + t) * W + (NH + NKV + g) * HD; };
      for (int64_t i = 0; i < T; ++i) {
        const double* dO = dout + (b * T + i) * NH * HD + h * HD;
        double dot = 0.0;
        for (int64_t j = 0; j <= i; ++j) {
          double s = 0.0;
          for (int64_t d = 0; d < HD; ++d) s += dO[d] * v(j)[d];
          dp[j] = s;
          dot += s * p[i * T + j];
          for (int64_t d = 0; d < HD; ++d) dv(j)[d] += p[i * T + j] * dO[d];
        }
        for (int64_t j = 0; j <= i; ++j) {
          const double ds = p[i * T + j] * (dp[j] - dot) * scale;
          for (int64_t d = 0; d < HD; ++d) {
            dq(i)[d] += ds * k(j)[d];
            dk(j)[d] += ds * q(i)[d];
          }
        }
      }
    }
}

// gu (N, 2F) rows [gate | up]; out (N, F) = silu(gate) up.
inline void swiglu_forward(double* out, const double* gu, int64_t N, int64_t F) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t f = 0; f < F; ++f) {
      const double g = gu[n * 2 * F + f], u = gu[n * 2 * F + F + f];
      out[n * F + f] = g / (1.0 + std::exp(-g)) * u;
    }
}

inline void swiglu_backward(double* dgu, const double* dout, const double* gu, int64_t N,
                            int64_t F) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t f = 0; f < F; ++f) {
      const double g = gu[n * 2 * F + f], u = gu[n * 2 * F + F + f];
      const double s = 1.0 / (1.0 + std::exp(-g));
      dgu[n * 2 * F + f] = dout[n * F + f] * u * (s + g * s * (1.0 - s));
      dgu[n * 2 * F + F + f] = dout[n * F + f] * g * s;
    }
}

inline void cross_entropy_forward(double* losses, double* probs, const double* logits,
                                  const int32_t* targets, int64_t N, int64_t V) {
  for (int64_t n = 0; n < N; ++n) {
    const double* x = logits + n * V;
    double m = x[0];
    for (int64_t v = 1; v < V; ++v) m = std::max(m, x[v]);
    double sum = 0.0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp(x[v] - m);
    for (int64_t v = 0; v < V; ++v) probs[n * V + v] = std::exp(x[v] - m) / sum;
    losses[n] = targets[n] < 0 ? 0.0 : std::log(sum) + m - x[targets[n]];
  }
}

inline void cross_entropy_backward(double* dlogits, const double* probs, const int32_t* targets,
                                   double dloss, int64_t N, int64_t V) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t v = 0; v < V; ++v)
      dlogits[n * V + v] =
          targets[n] < 0 ? 0.0 : (probs[n * V + v] - (v == targets[n] ? 1.0 : 0.0)) * dloss;
}

inline void residual_forward(double* out, const double* a, const double* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

}  // namespace moe::ref
