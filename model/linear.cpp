#include "model/linear.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "model/check.h"
#include "model/fp8.h"
#include "model/fp8_quant.h"
#include "model/kernels/cuda/gemm_plan.h"

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

// ---- Native FP8 ------------------------------------------------------------------------
// Operands as cuBLASLt's block-scaled FP8 GEMMs take them (model/kernels/cuda/gemm_plan.h):
// C = A B^T, both K-contiguous codes; A's scales 1x128 along K in (L, rows) layout, B's
// 128x128 blocks or 1x128 tiles. Token counts must be multiples of 16 there: the forward and
// input gradient run the rows in two GEMMs (the multiple of 16 in place, the last few rows
// padded with zero codes to 16), the weight gradient pads its K (the tokens) with zero codes.
// The operands live in the scratch's first float buffer `a`, read as bytes (the emulation's
// float copies are not made on this path); the weight gradient from a saved input restores
// it into `b` first, as the emulation does.

using cuda::Fp8Scaling;
constexpr int64_t kFp8Rows = cuda::kFp8RowAlign;

template <typename T>
bool native_fp8(Ops<T>& ops, PrecisionMode mode) {
  return mode == PrecisionMode::kFp8 && ops.gemm_fp8_native();
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
int64_t fp8_piece(int64_t bytes) { return round_up(bytes, static_cast<int64_t>(cuda::kGemmPtrAlign)); }

// Forward or input gradient of n rows, A (n, K) into out (n, Nout): A's codes and 1x128
// scales as fp8_quantize writes them (n, K) and (n, L); the first n16 = n - n % 16 rows'
// scales in the GEMM's (L, n16) layout; the last rows' codes, scales (both layouts) and output
// padded to 16 rows.
struct Fp8RowsPlan {
  int64_t codes = 0, qscales = 0, gscales = 0, tail_codes = 0, tail_q = 0, tail_g = 0,
          tail_out = 0, total = 0;
};
Fp8RowsPlan fp8_rows_plan(int64_t n, int64_t K, int64_t Nout) {
  const int64_t L = cuda::fp8_gemm_ktiles(K), n16 = n / kFp8Rows * kFp8Rows;
  Fp8RowsPlan p;
  p.qscales = fp8_piece(n * K);
  p.gscales = p.qscales + fp8_piece(4 * n * L);
  p.tail_codes = p.gscales + fp8_piece(4 * n16 * L);
  p.tail_q = p.tail_codes + fp8_piece(kFp8Rows * K);
  p.tail_g = p.tail_q + fp8_piece(4 * kFp8Rows * L);
  p.tail_out = p.tail_g + fp8_piece(4 * kFp8Rows * L);
  p.total = p.tail_out + fp8_piece(4 * kFp8Rows * Nout);
  return p;
}

// Weight gradient over np = n rounded up to 16 rows: one buffer that takes dY (np, OC), then
// X (np, IC), quantized 128x1; their transposes (the GEMM's K-contiguous operands) and their
// scales, already in the GEMM's (ceil(np / 128), OC or IC) layout.
struct Fp8WgradPlan {
  int64_t q = 0, dy_t = 0, dy_s = 0, x_t = 0, x_s = 0, total = 0;
};
Fp8WgradPlan fp8_wgrad_plan(int64_t n, int64_t IC, int64_t OC) {
  const int64_t np = round_up(n, kFp8Rows), tiles = (np + 127) / 128;
  Fp8WgradPlan p;
  p.dy_t = fp8_piece(np * std::max(IC, OC));
  p.dy_s = p.dy_t + fp8_piece(np * OC);
  p.x_t = p.dy_s + fp8_piece(4 * tiles * OC);
  p.x_s = p.x_t + fp8_piece(np * IC);
  p.total = p.x_s + fp8_piece(4 * tiles * IC);
  return p;
}

uint8_t* fp8_room(const LinearScratch<float>& s, int64_t need, int64_t IC, int64_t OC) {
  CHECK(IC % cuda::kFp8DimAlign == 0 && OC % cuda::kFp8DimAlign == 0,
        "native FP8 linear of %lld x %lld: both widths must be multiples of 16", (long long)OC,
        (long long)IC);
  CHECK(s.a && need <= s.capacity * static_cast<int64_t>(sizeof(float)),
        "native FP8 operands of %lld bytes in a linear scratch of %lld floats", (long long)need,
        (long long)s.capacity);
  CHECK(reinterpret_cast<uintptr_t>(s.a) % cuda::kGemmPtrAlign == 0,
        "linear scratch not 16-byte aligned");
  return reinterpret_cast<uint8_t*>(s.a);
}

template <typename E>
E* at(uint8_t* base, int64_t offset) {
  return reinterpret_cast<E*>(base + offset);
}
template <typename E>
const E* at(const float* wq, int64_t offset) {
  return reinterpret_cast<const E*>(reinterpret_cast<const uint8_t*>(wq) + offset);
}

// out (n, Nout) = A (n, K) . B^T (+ out when accumulate), A's codes (n, K) and 1x128 scales
// (n, L) as fp8_quantize wrote them, B (Nout, K) codes with 128x128 scales in the GEMM layout.
void fp8_rows_gemm(Ops<float>& ops, float* out, bool accumulate, const uint8_t* a_codes,
                   const float* a_q, int64_t n, int64_t K, int64_t Nout, const uint8_t* b_codes,
                   const float* b_scales, uint8_t* room) {
  const int64_t L = cuda::fp8_gemm_ktiles(K), n16 = n / kFp8Rows * kFp8Rows, r = n - n16;
  const Fp8RowsPlan p = fp8_rows_plan(n, K, Nout);
  const float beta = accumulate ? 1.0f : 0.0f;
  if (n16 > 0) {
    float* g = at<float>(room, p.gscales);
    ops.transpose(g, a_q, n16, L, sizeof(float));
    ops.gemm_fp8(n16, Nout, K, a_codes, g, Fp8Scaling::kTile1x128, b_codes, b_scales,
                 Fp8Scaling::kBlock128, beta, out, Nout);
  }
  if (r == 0) return;
  uint8_t* codes = at<uint8_t>(room, p.tail_codes);
  float* q = at<float>(room, p.tail_q);
  float* g = at<float>(room, p.tail_g);
  float* o = at<float>(room, p.tail_out);
  const int64_t pad = kFp8Rows - r;
  ops.copy(codes, a_codes + n16 * K, static_cast<size_t>(r * K));
  ops.zero(codes + r * K, static_cast<size_t>(pad * K));
  ops.copy(q, a_q + n16 * L, sizeof(float) * static_cast<size_t>(r * L));
  ops.zero(q + r * L, sizeof(float) * static_cast<size_t>(pad * L));
  ops.transpose(g, q, kFp8Rows, L, sizeof(float));
  const size_t real = sizeof(float) * static_cast<size_t>(r * Nout);
  if (accumulate) ops.copy(o, out + n16 * Nout, real);
  ops.zero(o + r * Nout, sizeof(float) * static_cast<size_t>(pad * Nout));
  ops.gemm_fp8(kFp8Rows, Nout, K, codes, g, Fp8Scaling::kTile1x128, b_codes, b_scales,
               Fp8Scaling::kBlock128, beta, o, Nout);
  ops.copy(out + n16 * Nout, o, real);
}

// dw (OC, IC) += dout^T . x over the tokens, x as floats (N, IC); each block of rows is its
// own GEMM (K = its rows padded to 16), its 128x1 tiles starting afresh as in the emulation.
void fp8_native_backward_weight(Ops<float>& ops, float* dw, const float* dout, const float* x,
                                int64_t N, int64_t IC, int64_t OC, const LinearScratch<float>& s,
                                const int64_t* blocks, int64_t n_blocks) {
  for_each_block(blocks, n_blocks, N, [&](int64_t r0, int64_t n) {
    const int64_t np = round_up(n, kFp8Rows);
    const Fp8WgradPlan p = fp8_wgrad_plan(n, IC, OC);
    uint8_t* room = fp8_room(s, p.total, IC, OC);
    const auto operand = [&](const float* src, int64_t W, int64_t codes_t, int64_t scales) {
      uint8_t* q = at<uint8_t>(room, p.q);
      ops.fp8_quantize(q, at<float>(room, scales), src + r0 * W, n, W, kTileActT);
      if (np != n) ops.zero(q + n * W, static_cast<size_t>((np - n) * W));
      ops.transpose(at<uint8_t>(room, codes_t), q, np, W, 1);
    };
    operand(dout, OC, p.dy_t, p.dy_s);
    operand(x, IC, p.x_t, p.x_s);
    ops.gemm_fp8(OC, IC, np, at<uint8_t>(room, p.dy_t), at<float>(room, p.dy_s),
                 Fp8Scaling::kTile1x128, at<uint8_t>(room, p.x_t), at<float>(room, p.x_s),
                 Fp8Scaling::kTile1x128, 1.0f, dw, IC);
  });
}

// out (N, OC) = x . W^T from x's codes and 1x128 scales (N, IC).
void fp8_native_forward(Ops<float>& ops, float* out, const uint8_t* codes, const float* qscales,
                        const float* wq, int64_t N, int64_t IC, int64_t OC,
                        const LinearScratch<float>& s) {
  uint8_t* room = fp8_room(s, fp8_rows_plan(N, IC, OC).total, IC, OC);
  fp8_rows_gemm(ops, out, false, codes, qscales, N, IC, OC, at<uint8_t>(wq, 0),
                at<float>(wq, linear_fp8_weight_layout(OC, IC).scales), room);
}

// The same from x's floats, quantized 1x128 into `save` or, without one, the plan's buffers.
void fp8_native_forward_from(Ops<float>& ops, float* out, const float* x, const LinearSaved* save,
                             const float* wq, int64_t N, int64_t IC, int64_t OC,
                             const LinearScratch<float>& s) {
  const Fp8RowsPlan p = fp8_rows_plan(N, IC, OC);
  uint8_t* room = fp8_room(s, p.total, IC, OC);
  uint8_t* codes = save ? save->codes : room;
  float* scales = save ? save->scales : at<float>(room, p.qscales);
  CHECK(codes && scales, "no buffer for the saved FP8 input");
  ops.fp8_quantize(codes, scales, x, N, IC, kTileAct);
  fp8_rows_gemm(ops, out, false, codes, scales, N, IC, OC, at<uint8_t>(wq, 0),
                at<float>(wq, linear_fp8_weight_layout(OC, IC).scales), room);
}

// dx (N, IC) (+)= dout (N, OC) . W, through W^T's codes.
void fp8_native_backward_input(Ops<float>& ops, float* dx, const float* dout, const float* wq,
                               int64_t N, int64_t IC, int64_t OC, const LinearScratch<float>& s,
                               bool accumulate) {
  const Fp8RowsPlan p = fp8_rows_plan(N, OC, IC);
  uint8_t* room = fp8_room(s, p.total, IC, OC);
  const LinearFp8Weight w = linear_fp8_weight_layout(OC, IC);
  ops.fp8_quantize(room, at<float>(room, p.qscales), dout, N, OC, kTileAct);
  fp8_rows_gemm(ops, dx, accumulate, room, at<float>(room, p.qscales), N, OC, IC,
                at<uint8_t>(wq, w.codes_t), at<float>(wq, w.scales_t), room);
}

// wq's memory <- W's codes, W^T's codes and both scale tables (linear_fp8_weight_layout).
void fp8_native_quantize_weight(Ops<float>& ops, float* wq, const float* w, int64_t OC,
                                int64_t IC) {
  const LinearFp8Weight l = linear_fp8_weight_layout(OC, IC);
  CHECK(reinterpret_cast<uintptr_t>(wq) % cuda::kGemmPtrAlign == 0,
        "native FP8 weight copy not 16-byte aligned");
  uint8_t* base = reinterpret_cast<uint8_t*>(wq);
  const int64_t BO = (OC + 127) / 128, BI = (IC + 127) / 128;
  float* tmp = at<float>(base, l.tmp);
  float* tmp_t = at<float>(base, l.tmp_t);
  float* scales = at<float>(base, l.scales);
  float* scales_t = at<float>(base, l.scales_t);
  ops.fp8_quantize(base, tmp, w, OC, IC, kTileWeight);
  ops.transpose(base + l.codes_t, base, OC, IC, 1);
  ops.transpose(tmp_t, tmp, BO, BI, sizeof(float));
  // kBlock128: block rows padded to a multiple of 4 scales, the padding zero.
  ops.zero(scales, sizeof(float) * static_cast<size_t>(cuda::fp8_gemm_scale_count(OC, IC, Fp8Scaling::kBlock128)));
  ops.zero(scales_t, sizeof(float) * static_cast<size_t>(cuda::fp8_gemm_scale_count(IC, OC, Fp8Scaling::kBlock128)));
  ops.copy_rows(scales, cuda::fp8_gemm_block_scale_ld(IC), tmp, BI, BO, BI);
  ops.copy_rows(scales_t, cuda::fp8_gemm_block_scale_ld(OC), tmp_t, BO, BI, BO);
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
    if (native_fp8(ops, mode)) {
      CHECK(wq != w && ld == IC, "a native FP8 weight is packed into its own compact copy");
      CHECK(linear_fp8_weight_layout(OC, IC).total <= OC * IC * static_cast<int64_t>(sizeof(float)),
            "native FP8 weight of %lld x %lld does not fit its copy", (long long)OC,
            (long long)IC);
      return fp8_native_quantize_weight(ops, wq, w, OC, IC);
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

LinearFp8Weight linear_fp8_weight_layout(int64_t OC, int64_t IC) {
  using cuda::fp8_gemm_scale_count;
  LinearFp8Weight l;
  const int64_t BO = (OC + 127) / 128, BI = (IC + 127) / 128;
  l.codes_t = OC * IC;
  l.scales = 2 * OC * IC;
  l.scales_t = l.scales + 4 * fp8_gemm_scale_count(OC, IC, Fp8Scaling::kBlock128);
  l.tmp = l.scales_t + 4 * fp8_gemm_scale_count(IC, OC, Fp8Scaling::kBlock128);
  l.tmp_t = l.tmp + round_up(4 * BO * BI, 16);
  l.total = l.tmp_t + 4 * BI * BO;
  return l;
}

int64_t linear_fp8_scratch_bytes(int64_t rows, int64_t IC, int64_t OC) {
  return std::max({fp8_rows_plan(rows, IC, OC).total, fp8_rows_plan(rows, OC, IC).total,
                   fp8_wgrad_plan(rows, IC, OC).total});
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
    if (native_fp8(ops, mode)) return fp8_native_forward_from(ops, out, x, save, wq, N, IC, OC, s);
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
      if (native_fp8(ops, mode))
        return fp8_native_backward_input(ops, dx, dout, wq, N, IC, OC, s, accumulate);
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
    if (native_fp8(ops, mode))
      return fp8_native_backward_weight(ops, dw, dout, x, N, IC, OC, s, blocks, n_blocks);
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
  if (native_fp8(ops, mode))
    return fp8_native_backward_weight(ops, dw, dout, s.b, N, IC, OC, s, blocks, n_blocks);
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
    if (native_fp8(ops, mode)) {
      CHECK(x.codes && x.scales, "no saved FP8 input");
      return fp8_native_forward(ops, out, x.codes, x.scales, wq, N, IC, OC, s);
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
