// A CPU stand-in for device memory: a backend that forwards to the CPU one but keeps the
// arenas that would be cudaMalloc'd on a GPU unreadable (mprotect PROT_NONE) except while one
// of its calls runs. A host read or write of that memory anywhere else faults, which is what
// it would do to a device pointer on a GPU run (there: a crash or garbage; here: a test
// failure on every CI run). Shared by the model's and the trainer's discipline tests.
#pragma once

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "model/model.h"
#include "optim/optim_ops.h"

namespace moe {

// The whole pages inside an arena (its partial first and last pages are shared with the
// allocator's bookkeeping and stay open).
struct Pages {
  char* lo = nullptr;
  size_t bytes = 0;
};
inline Pages interior_pages(const Arena& a) {
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(a.data());
  const uintptr_t lo = (begin + page - 1) / page * page, hi = (begin + a.bytes()) / page * page;
  if (!a.data() || hi <= lo) return {};
  return {reinterpret_cast<char*>(lo), static_cast<size_t>(hi - lo)};
}

// The pages of the arenas that stand for device memory: locked while host code runs (armed),
// opened for the duration of each backend call.
class PageGuard {
 public:
  ~PageGuard() { set(true); }
  void guard(const Arena& a) {
    const Pages p = interior_pages(a);
    if (p.bytes) pages_.push_back(p);
  }
  size_t guarded_bytes() const {
    size_t n = 0;
    for (const Pages& p : pages_) n += p.bytes;
    return n;
  }
  // Locks the arenas between calls (the state while the model's host code runs).
  void arm() { set(false); }
  void disarm() { set(true); }
  template <typename F>
  void run(const F& f) {
    const bool was_armed = armed_;
    if (was_armed) set(true);
    f();
    if (was_armed) set(false);
  }

 private:
  void set(bool open) {
    for (const Pages& p : pages_)
      ASSERT_EQ(mprotect(p.lo, p.bytes, open ? PROT_READ | PROT_WRITE : PROT_NONE), 0);
    armed_ = !open;
  }
  std::vector<Pages> pages_;
  bool armed_ = false;
};

// A backend that forwards to `inner` with the guard's pages open during each call.
template <typename T>
class GuardedOps final : public Ops<T> {
 public:
  GuardedOps(std::unique_ptr<Ops<T>> inner, PageGuard& pages) : in_(std::move(inner)), g_(pages) {}

  // The calls that make a device's host wait (model/ops.h: "Waits"): download and
  // synchronize, and moe_plan's routing counts, counted apart.
  int64_t host_waits = 0;
  int64_t moe_plans = 0;

  // Its memory is to be treated as a device's (model_init stages and uploads, as on a GPU).
  Device device() const override { return Device::kCuda; }
  void copy(void* d, const void* s, size_t b) override { run([&] { in_->copy(d, s, b); }); }
  void zero(void* d, size_t b) override { run([&] { in_->zero(d, b); }); }
  void copy_rows(T* d, int64_t ldd, const T* s, int64_t lds, int64_t r, int64_t c) override {
    run([&] { in_->copy_rows(d, ldd, s, lds, r, c); });
  }
  void add_rows(T* d, int64_t ldd, const T* s, int64_t lds, int64_t r, int64_t c) override {
    run([&] { in_->add_rows(d, ldd, s, lds, r, c); });
  }
  void upload(void* d, const void* s, size_t b) override { run([&] { in_->upload(d, s, b); }); }
  void download(void* d, const void* s, size_t b) override {
    ++host_waits;
    run([&] { in_->download(d, s, b); });
  }
  void synchronize() override {
    ++host_waits;
    in_->synchronize();
  }
  void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
            const T* B, int64_t ldb, T beta, T* C, int64_t ldc) override {
    run([&] { in_->gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); });
  }
  void gemm_rows_invariant(bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
                           const T* B, int64_t ldb, T beta, T* C, int64_t ldc, T* pad,
                           int64_t pad_count) override {
    run([&] { in_->gemm_rows_invariant(tb, M, N, K, A, lda, B, ldb, beta, C, ldc, pad, pad_count); });
  }
  void transpose(void* d, const void* s, int64_t R, int64_t C, size_t e) override {
    run([&] { in_->transpose(d, s, R, C, e); });
  }
  bool gemm_fp8_native() const override { return in_->gemm_fp8_native(); }
  void gemm_fp8(int64_t M, int64_t N, int64_t K, const uint8_t* A, const float* as,
                cuda::Fp8Scaling am, const uint8_t* B, const float* bs, cuda::Fp8Scaling bm,
                float beta, float* C, int64_t ldc) override {
    run([&] { in_->gemm_fp8(M, N, K, A, as, am, B, bs, bm, beta, C, ldc); });
  }
  bool gemm_bf16_native() const override { return in_->gemm_bf16_native(); }
  void gemm_bf16(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const uint16_t* A,
                 int64_t lda, const uint16_t* B, int64_t ldb, float beta, float* C,
                 int64_t ldc) override {
    run([&] { in_->gemm_bf16(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc); });
  }
  void embedding_forward(T* o, const int32_t* t, const T* w, int64_t N, int64_t C,
                         int64_t V) override {
    run([&] { in_->embedding_forward(o, t, w, N, C, V); });
  }
  void embedding_backward(T* dw, const T* d, const int32_t* t, int64_t N, int64_t C,
                          int64_t V) override {
    run([&] { in_->embedding_backward(dw, d, t, N, C, V); });
  }
  void rmsnorm_forward(T* o, T* r, const T* x, const T* w, int64_t N, int64_t C, T eps) override {
    run([&] { in_->rmsnorm_forward(o, r, x, w, N, C, eps); });
  }
  void rmsnorm_backward_input(T* dx, const T* d, const T* x, const T* w, const T* r, int64_t N,
                              int64_t C) override {
    run([&] { in_->rmsnorm_backward_input(dx, d, x, w, r, N, C); });
  }
  void rmsnorm_backward_weight(T* dw, const T* d, const T* x, const T* r, int64_t N,
                               int64_t C) override {
    run([&] { in_->rmsnorm_backward_weight(dw, d, x, r, N, C); });
  }
  void rope_tables(T* c, T* s, int64_t T_, int64_t HD, double theta) override {
    run([&] { in_->rope_tables(c, s, T_, HD, theta); });
  }
  void rope_forward(T* x, const T* c, const T* s, int64_t B, int64_t T_, int64_t H, int64_t HD,
                    int64_t st) override {
    run([&] { in_->rope_forward(x, c, s, B, T_, H, HD, st); });
  }
  void rope_backward(T* x, const T* c, const T* s, int64_t B, int64_t T_, int64_t H, int64_t HD,
                     int64_t st) override {
    run([&] { in_->rope_backward(x, c, s, B, T_, H, HD, st); });
  }
  void attention_forward(T* o, T* lse, const T* qkv, int64_t B, int64_t T_, int64_t NH,
                         int64_t NKV, int64_t HD, int64_t HDv, T* sc) override {
    run([&] { in_->attention_forward(o, lse, qkv, B, T_, NH, NKV, HD, HDv, sc); });
  }
  void attention_backward(T* dq, const T* d, const T* qkv, const T* lse, int64_t B, int64_t T_,
                          int64_t NH, int64_t NKV, int64_t HD, int64_t HDv, T* sc) override {
    run([&] { in_->attention_backward(dq, d, qkv, lse, B, T_, NH, NKV, HD, HDv, sc); });
  }
  void swiglu_forward(T* o, const T* gu, int64_t N, int64_t F) override {
    run([&] { in_->swiglu_forward(o, gu, N, F); });
  }
  void swiglu_backward(T* dgu, const T* d, const T* gu, int64_t N, int64_t F) override {
    run([&] { in_->swiglu_backward(dgu, d, gu, N, F); });
  }
  void cross_entropy_forward(T* l, T* p, const T* lg, const int32_t* t, int64_t N,
                             int64_t V) override {
    run([&] { in_->cross_entropy_forward(l, p, lg, t, N, V); });
  }
  void cross_entropy_backward(T* dl, const T* p, const int32_t* t, T dloss, int64_t N,
                              int64_t V) override {
    run([&] { in_->cross_entropy_backward(dl, p, t, dloss, N, V); });
  }
  void residual_forward(T* o, const T* a, const T* b, int64_t n) override {
    run([&] { in_->residual_forward(o, a, b, n); });
  }
  void scored_loss_accumulate(double* acc, const T* l, const int32_t* t, int64_t N,
                              double divisor) override {
    run([&] { in_->scored_loss_accumulate(acc, l, t, N, divisor); });
  }
  void mtp_shift(int32_t* tk, int32_t* tg, const int32_t* y, int64_t B, int64_t T_,
                 int64_t k) override {
    run([&] { in_->mtp_shift(tk, tg, y, B, T_, k); });
  }
  void router_forward(T* s, int32_t* ids, T* w, const T* lg, const float* bias, int64_t N,
                      int64_t E, int64_t K, ScoreFn f, double rs, int64_t G,
                      int64_t KG) override {
    run([&] { in_->router_forward(s, ids, w, lg, bias, N, E, K, f, rs, G, KG); });
  }
  void router_backward(T* dl, const T* dw, const T* dse, const T* s, const int32_t* ids,
                       int64_t N, int64_t E, int64_t K, ScoreFn f, double rs) override {
    run([&] { in_->router_backward(dl, dw, dse, s, ids, N, E, K, f, rs); });
  }
  void aux_loss_forward(double* acc, const T* s, const int32_t* ids, int64_t B, int64_t T_,
                        int64_t E, int64_t K, double alpha) override {
    run([&] { in_->aux_loss_forward(acc, s, ids, B, T_, E, K, alpha); });
  }
  void aux_loss_backward(T* ds, const T* s, const int32_t* ids, int64_t B, int64_t T_, int64_t E,
                         int64_t K, double alpha, T dloss) override {
    run([&] { in_->aux_loss_backward(ds, s, ids, B, T_, E, K, alpha, dloss); });
  }
  void moe_plan(int64_t* c, int64_t* o, int32_t* ro, int32_t* to, const int32_t* ids, int64_t N,
                int64_t E, int64_t K) override {
    ++moe_plans;
    run([&] { in_->moe_plan(c, o, ro, to, ids, N, E, K); });
  }
  void moe_permute_forward(T* xp, const T* x, const int32_t* to, int64_t rows,
                           int64_t C) override {
    run([&] { in_->moe_permute_forward(xp, x, to, rows, C); });
  }
  void moe_permute_backward(T* dx, const T* dxp, const int32_t* ro, int64_t N, int64_t K,
                            int64_t C) override {
    run([&] { in_->moe_permute_backward(dx, dxp, ro, N, K, C); });
  }
  void moe_combine_forward(T* o, const T* yp, const T* w, const int32_t* ro, int64_t N,
                           int64_t K, int64_t C) override {
    run([&] { in_->moe_combine_forward(o, yp, w, ro, N, K, C); });
  }
  void moe_combine_backward(T* dyp, T* dw, const T* d, const T* yp, const T* w,
                            const int32_t* ro, int64_t N, int64_t K, int64_t C) override {
    run([&] { in_->moe_combine_backward(dyp, dw, d, yp, w, ro, N, K, C); });
  }
  void fp8_quantize(uint8_t* q, float* s, const float* x, int64_t R, int64_t C,
                    Fp8Tile t) override {
    run([&] { in_->fp8_quantize(q, s, x, R, C, t); });
  }
  void fp8_dequantize(float* x, const uint8_t* q, const float* s, int64_t R, int64_t C,
                      Fp8Tile t) override {
    run([&] { in_->fp8_dequantize(x, q, s, R, C, t); });
  }
  void fp8_fake_quantize_ld(float* o, int64_t ldo, const float* x, int64_t ldx, int64_t R,
                            int64_t C, Fp8Tile t) override {
    run([&] { in_->fp8_fake_quantize_ld(o, ldo, x, ldx, R, C, t); });
  }
  void bf16_fake_quantize(float* o, const float* x, int64_t n) override {
    run([&] { in_->bf16_fake_quantize(o, x, n); });
  }
  void bf16_encode(uint16_t* b, float* r, const float* x, int64_t n) override {
    run([&] { in_->bf16_encode(b, r, x, n); });
  }
  void bf16_decode(float* x, const uint16_t* b, int64_t n) override {
    run([&] { in_->bf16_decode(x, b, n); });
  }

 private:
  template <typename F>
  void run(const F& f) {
    g_.run(f);
  }
  std::unique_ptr<Ops<T>> in_;
  PageGuard& g_;
};

// Swaps a built model's backend for a guarded one over its device arenas. Declared after
// the model it guards, so it disarms (opens the pages) before the model frees them.
struct Guard {
  explicit Guard(Model<float>& m) {
    for (const Arena* a : {&m.param_arena, &m.grad_arena, &m.act_arena, &m.work_arena,
                           &m.gemm_arena})
      pages.guard(*a);
    m.ops = std::make_unique<GuardedOps<float>>(std::move(m.ops), pages);
  }
  ~Guard() { pages.disarm(); }
  PageGuard pages;
};

// The optimizer's backend under the same guard.
class GuardedOptimOps final : public OptimOps {
 public:
  GuardedOptimOps(std::unique_ptr<OptimOps> inner, PageGuard& pages)
      : in_(std::move(inner)), g_(pages) {}
  void adamw(float* p, const float* g, float* m, float* v, int64_t n, const AdamWStep& s,
             bool decay) override {
    g_.run([&] { in_->adamw(p, g, m, v, n, s, decay); });
  }
  void adamw_bf16(float* p, const float* g, uint16_t* m, uint16_t* v, int64_t n,
                  const AdamWStep& s, bool decay) override {
    g_.run([&] { in_->adamw_bf16(p, g, m, v, n, s, decay); });
  }
  double sum_squares(const float* g, int64_t n) override {
    double r = 0;
    g_.run([&] { r = in_->sum_squares(g, n); });
    return r;
  }

 private:
  std::unique_ptr<OptimOps> in_;
  PageGuard& g_;
};

}  // namespace moe
