#include "model/linear.h"

#include <type_traits>

#include "model/check.h"
#include "model/fp8.h"
#include "model/fp8_quant.h"

namespace moe {

namespace {

// dst (R, C) <- src in the mode's GEMM input format, tiles per `tile` (fp8).
void quantize_input(Ops<float>& ops, float* dst, const float* src, int64_t R, int64_t C, PrecisionMode mode,
                    Fp8Tile tile) {
  if (mode == PrecisionMode::kFp8) {
    ops.fp8_fake_quantize(dst, src, R, C, tile);
  } else {
    ops.bf16_fake_quantize(dst, src, R * C);
  }
}

// fn(r0, n) for every non-empty block of rows (blocks: n_blocks + 1 offsets from 0 to N;
// null: one block of N rows).
template <typename Fn>
void for_each_block(const int64_t* blocks, int64_t n_blocks, int64_t N, const Fn& fn) {
  const int64_t whole[2] = {0, N};
  if (!blocks) {
    blocks = whole;
    n_blocks = 1;
  }
  CHECK(n_blocks >= 1 && blocks[0] == 0 && blocks[n_blocks] == N, "blocks of %lld rows",
        (long long)N);
  for (int64_t b = 0; b < n_blocks; ++b) {
    CHECK(blocks[b + 1] >= blocks[b], "block %lld ends before it starts", (long long)b);
    if (blocks[b + 1] > blocks[b]) fn(blocks[b], blocks[b + 1] - blocks[b]);
  }
}

// dst (R, C) <- x restored from its saved form (fp8: 1x128 tiles dequantized).
void restore_saved(Ops<float>& ops, float* dst, const LinearSaved& x, int64_t R, int64_t C, PrecisionMode mode) {
  if (mode == PrecisionMode::kFp8) {
    CHECK(x.codes && x.scales, "no saved FP8 input");
    ops.fp8_dequantize(dst, x.codes, x.scales, R, C, kTileAct);
  } else {
    CHECK(x.bf16, "no saved BF16 input");
    ops.bf16_decode(dst, x.bf16, R * C);
  }
}

// bf16 on a backend whose GEMMs take BF16 operands (Ops::gemm_bf16_native): the weight is
// kept as bits (linear_quantize_weight) and each activation operand is encoded into the
// float scratch as bits, half its room; nothing is rounded twice.
template <typename T>
bool native_bf16(Ops<T>& ops, PrecisionMode mode) {
  return mode == PrecisionMode::kBf16 && ops.gemm_bf16_native();
}
uint16_t* as_bits(float* p) { return reinterpret_cast<uint16_t*>(p); }
const uint16_t* as_bits(const float* p) { return reinterpret_cast<const uint16_t*>(p); }

template <typename T>
bool exact(PrecisionMode mode) {
  if constexpr (!std::is_same_v<T, float>)
    CHECK(mode == PrecisionMode::kFp32, "BF16 / FP8 GEMMs need float tensors");
  return mode == PrecisionMode::kFp32;
}

template <typename T>
void check_room(const LinearScratch<T>& s, int64_t n) {
  CHECK(s.a && s.b && n <= s.capacity, "linear scratch of %lld elements, %lld needed",
        (long long)s.capacity, (long long)n);
}

// out (N, OC) = x . wq^T, row-invariant when the scratch says so (LinearScratch).
template <typename T>
void rows_forward(Ops<T>& ops, T* out, const T* x, const T* wq, int64_t N, int64_t IC, int64_t OC,
                  const LinearScratch<T>& s) {
  if (!s.row_pad) return ops.matmul_forward(out, x, wq, N, IC, OC);
  ops.gemm_rows_invariant(true, N, OC, IC, x, IC, wq, IC, T(0), out, OC, s.row_pad,
                          s.row_pad_count);
}

// dw (OC, IC) += dout^T . x with x already BF16 bits (N, IC).
void native_bf16_backward_weight(Ops<float>& ops, float* dw, const float* dout,
                                 const uint16_t* x_bits, int64_t N, int64_t IC, int64_t OC,
                                 const LinearScratch<float>& s) {
  ops.bf16_encode(as_bits(s.a), nullptr, dout, N * OC);
  ops.gemm_bf16(true, false, OC, IC, N, as_bits(s.a), OC, x_bits, IC, 1.0f, dw, IC);
}

}  // namespace

template <typename T>
void linear_quantize_weight(Ops<T>& ops, T* wq, const T* w, int64_t OC, int64_t IC, int64_t ld,
                            PrecisionMode mode) {
  if (exact<T>(mode)) {
    if (wq != w) ops.copy_rows(wq, ld, w, ld, OC, IC);
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (native_bf16(ops, mode)) {
      // Bits in wq's first half, rows ld apart: encoding in place would overwrite floats
      // not yet read.
      CHECK(wq != w, "a native BF16 weight cannot be encoded in place");
      if (ld == IC) return ops.bf16_encode(as_bits(wq), nullptr, w, OC * IC);
      for (int64_t r = 0; r < OC; ++r) ops.bf16_encode(as_bits(wq) + r * ld, nullptr, w + r * ld, IC);
      return;
    }
    if (mode == PrecisionMode::kFp8) {
      ops.fp8_fake_quantize_ld(wq, ld, w, ld, OC, IC, kTileWeight);
    } else if (ld == IC) {
      ops.bf16_fake_quantize(wq, w, OC * IC);
    } else {
      for (int64_t r = 0; r < OC; ++r) ops.bf16_fake_quantize(wq + r * ld, w + r * ld, IC);
    }
  }
}

int64_t linear_saved_bytes(int64_t N, int64_t IC, PrecisionMode mode) {
  switch (mode) {
    case PrecisionMode::kFp32: return 0;
    case PrecisionMode::kBf16: return N * IC * static_cast<int64_t>(sizeof(uint16_t));
    case PrecisionMode::kFp8:
      return N * IC + fp8_scale_count(N, IC, kTileAct) * static_cast<int64_t>(sizeof(float));
  }
  return 0;
}

LinearSaved linear_saved_carve(Carver& c, int64_t N, int64_t IC, PrecisionMode mode) {
  LinearSaved sv;
  if (mode == PrecisionMode::kBf16) sv.bf16 = c.take<uint16_t>(static_cast<size_t>(N * IC));
  if (mode == PrecisionMode::kFp8) {
    sv.codes = c.take<uint8_t>(static_cast<size_t>(N * IC));
    sv.scales = c.take<float>(static_cast<size_t>(fp8_scale_count(N, IC, kTileAct)));
  }
  return sv;
}

LinearSaved linear_saved_rows(const LinearSaved& x, int64_t r0, int64_t IC) {
  LinearSaved r;
  if (x.bf16) r.bf16 = x.bf16 + r0 * IC;
  if (x.codes) r.codes = x.codes + r0 * IC;
  if (x.scales) r.scales = x.scales + fp8_scale_count(r0, IC, kTileAct);
  return r;
}

template <typename T>
void linear_forward(Ops<T>& ops, T* out, const T* x, const T* wq, int64_t N, int64_t IC,
                    int64_t OC, PrecisionMode mode, const LinearScratch<T>& s,
                    const LinearSaved* save) {
  if (exact<T>(mode)) return rows_forward<T>(ops, out, x, wq, N, IC, OC, s);
  if constexpr (std::is_same_v<T, float>) {
    check_room(s, N * IC);
    if (native_bf16(ops, mode)) {
      uint16_t* a = save ? save->bf16 : as_bits(s.a);
      CHECK(a, "no buffer for the saved BF16 input");
      ops.bf16_encode(a, nullptr, x, N * IC);
      return ops.gemm_bf16(false, true, N, OC, IC, a, IC, as_bits(wq), IC, 0.0f, out, OC);
    }
    if (!save) {
      quantize_input(ops, s.a, x, N, IC, mode, kTileAct);
    } else if (mode == PrecisionMode::kFp8) {
      // The saved codes are the GEMM's operand: the forward multiplies what backward reads.
      ops.fp8_quantize(save->codes, save->scales, x, N, IC, kTileAct);
      ops.fp8_dequantize(s.a, save->codes, save->scales, N, IC, kTileAct);
    } else {
      ops.bf16_encode(save->bf16, s.a, x, N * IC);
    }
    rows_forward<float>(ops, out, s.a, wq, N, IC, OC, s);
  }
}

template <typename T>
void linear_backward_input(Ops<T>& ops, T* dx, const T* dout, const T* wq, int64_t N, int64_t IC,
                           int64_t OC, PrecisionMode mode, const LinearScratch<T>& s,
                           bool accumulate) {
  const T* a = dout;
  const T beta = accumulate ? T(1) : T(0);
  if (!exact<T>(mode)) {
    if constexpr (std::is_same_v<T, float>) {
      check_room(s, N * OC);
      if (native_bf16(ops, mode)) {
        ops.bf16_encode(as_bits(s.a), nullptr, dout, N * OC);
        return ops.gemm_bf16(false, false, N, IC, OC, as_bits(s.a), OC, as_bits(wq), IC, beta,
                             dx, IC);
      }
      quantize_input(ops, s.a, dout, N, OC, mode, kTileAct);
      a = s.a;
    }
  }
  if (s.row_pad)
    return ops.gemm_rows_invariant(false, N, IC, OC, a, OC, wq, IC, beta, dx, IC, s.row_pad,
                                   s.row_pad_count);
  ops.gemm(false, false, N, IC, OC, T(1), a, OC, wq, IC, beta, dx, IC);
}

template <typename T>
void linear_backward_weight(Ops<T>& ops, T* dw, const T* dout, const T* x, int64_t N, int64_t IC,
                            int64_t OC, PrecisionMode mode, const LinearScratch<T>& s,
                            const int64_t* blocks, int64_t n_blocks) {
  if (exact<T>(mode)) return ops.matmul_backward_weight(dw, dout, x, N, IC, OC);
  if constexpr (std::is_same_v<T, float>) {
    check_room(s, N * (IC > OC ? IC : OC));
    if (native_bf16(ops, mode)) {  // BF16 has no tiles: the blocks change nothing
      ops.bf16_encode(as_bits(s.b), nullptr, x, N * IC);
      return native_bf16_backward_weight(ops, dw, dout, as_bits(s.b), N, IC, OC, s);
    }
    for_each_block(blocks, n_blocks, N, [&](int64_t r0, int64_t n) {
      quantize_input(ops, s.a + r0 * OC, dout + r0 * OC, n, OC, mode, kTileActT);
      quantize_input(ops, s.b + r0 * IC, x + r0 * IC, n, IC, mode, kTileActT);
    });
    ops.matmul_backward_weight(dw, s.a, s.b, N, IC, OC);
  }
}

namespace {

void saved_backward_weight(Ops<float>& ops, float* dw, const float* dout, const LinearSaved& x, int64_t N,
                           int64_t IC, int64_t OC, PrecisionMode mode,
                           const LinearScratch<float>& s, const int64_t* blocks,
                           int64_t n_blocks) {
  check_room(s, N * (IC > OC ? IC : OC));
  if (native_bf16(ops, mode)) {
    CHECK(x.bf16, "no saved BF16 input");
    return native_bf16_backward_weight(ops, dw, dout, x.bf16, N, IC, OC, s);
  }
  restore_saved(ops, s.b, x, N, IC, mode);
  for_each_block(blocks, n_blocks, N, [&](int64_t r0, int64_t n) {
    quantize_input(ops, s.a + r0 * OC, dout + r0 * OC, n, OC, mode, kTileActT);
    // BF16 values round to themselves; FP8 ones move from 1x128 to 128x1 tiles.
    if (mode == PrecisionMode::kFp8)
      ops.fp8_fake_quantize(s.b + r0 * IC, s.b + r0 * IC, n, IC, kTileActT);
  });
  ops.matmul_backward_weight(dw, s.a, s.b, N, IC, OC);
}

}  // namespace

template <typename T>
void linear_backward_weight_saved(Ops<T>& ops, T* dw, const T* dout, const T* x_fp32,
                                  const LinearSaved& x,
                                  int64_t N, int64_t IC, int64_t OC, PrecisionMode mode,
                                  const LinearScratch<T>& s, const int64_t* blocks,
                                  int64_t n_blocks) {
  if (exact<T>(mode)) return ops.matmul_backward_weight(dw, dout, x_fp32, N, IC, OC);
  if constexpr (std::is_same_v<T, float>) saved_backward_weight(ops, dw, dout, x, N, IC, OC, mode, s,
                                                                blocks, n_blocks);
}

template <typename T>
void linear_forward_saved(Ops<T>& ops, T* out, const T* x_fp32, const LinearSaved& x,
                          const T* wq, int64_t N, int64_t IC, int64_t OC, PrecisionMode mode,
                          const LinearScratch<T>& s) {
  if (exact<T>(mode)) return rows_forward<T>(ops, out, x_fp32, wq, N, IC, OC, s);
  if constexpr (std::is_same_v<T, float>) {
    if (native_bf16(ops, mode)) {
      CHECK(x.bf16, "no saved BF16 input");
      return ops.gemm_bf16(false, true, N, OC, IC, x.bf16, IC, as_bits(wq), IC, 0.0f, out, OC);
    }
    check_room(s, N * IC);
    // fp8: the same 1x128 tiles as the forward that saved x, so dequantize(quantize(x)) is
    // what linear_forward would multiply; bf16: the rounded values themselves.
    restore_saved(ops, s.a, x, N, IC, mode);
    rows_forward<float>(ops, out, s.a, wq, N, IC, OC, s);
  }
}

#define MOE_INSTANTIATE(T)                                                                     \
  template void linear_quantize_weight<T>(Ops<T>&, T*, const T*, int64_t, int64_t, int64_t,            \
                                          PrecisionMode);                                     \
  template void linear_forward<T>(Ops<T>&, T*, const T*, const T*, int64_t, int64_t, int64_t,          \
                                  PrecisionMode, const LinearScratch<T>&, const LinearSaved*); \
  template void linear_forward_saved<T>(Ops<T>&, T*, const T*, const LinearSaved&, const T*,   \
                                        int64_t, int64_t, int64_t, PrecisionMode,             \
                                        const LinearScratch<T>&);                             \
  template void linear_backward_input<T>(Ops<T>&, T*, const T*, const T*, int64_t, int64_t, int64_t,   \
                                         PrecisionMode, const LinearScratch<T>&, bool);       \
  template void linear_backward_weight<T>(Ops<T>&, T*, const T*, const T*, int64_t, int64_t, int64_t,  \
                                          PrecisionMode, const LinearScratch<T>&, const int64_t*, \
                                          int64_t);                                           \
  template void linear_backward_weight_saved<T>(Ops<T>&, T*, const T*, const T*, const LinearSaved&,   \
                                                int64_t, int64_t, int64_t, PrecisionMode,     \
                                                const LinearScratch<T>&, const int64_t*, int64_t);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
