// Launch planning of the CUDA attention core; see attention_plan.h.
#include "model/kernels/cuda/attention_plan.h"

#include "model/check.h"

namespace moe::cuda {

namespace {

constexpr int64_t kGridYZMax = 65535;
constexpr int64_t kGridXMax = 2147483647;

LaunchDims attention_dims(int64_t tiles, int64_t heads, int64_t B, int64_t smem_bytes) {
  LaunchDims d;
  d.grid_x = tiles;
  d.grid_y = heads;
  d.grid_z = B;
  d.block = kAttnThreads;
  d.smem_bytes = smem_bytes;
  return d;
}

void attention_dims_check(const LaunchDims& d, const char* kernel, const AttentionShape& s,
                          int64_t smem_limit_bytes) {
  CHECK(d.smem_bytes <= smem_limit_bytes,
        "attention %s kernel needs %lld bytes of shared memory per block for %s, over the "
        "device's %lld (head widths too large for this design)",
        kernel, static_cast<long long>(d.smem_bytes), s.describe().c_str(),
        static_cast<long long>(smem_limit_bytes));
  CHECK(d.grid_x <= kGridXMax && d.grid_y <= kGridYZMax && d.grid_z <= kGridYZMax,
        "attention %s kernel grid (%lld, %lld, %lld) over CUDA's limits for %s", kernel,
        static_cast<long long>(d.grid_x), static_cast<long long>(d.grid_y),
        static_cast<long long>(d.grid_z), s.describe().c_str());
}

}  // namespace

void AttentionShape::check_validity() const {
  CHECK(B >= 0 && T >= 0 && HD > 0 && HDv > 0 && NKV > 0 && NH >= NKV && NH % NKV == 0,
        "attention shape %s", describe().c_str());
}

std::string AttentionShape::describe() const {
  return strprintf("B=%lld T=%lld NH=%lld NKV=%lld HD=%lld HDv=%lld", static_cast<long long>(B),
                   static_cast<long long>(T), static_cast<long long>(NH),
                   static_cast<long long>(NKV), static_cast<long long>(HD),
                   static_cast<long long>(HDv));
}

std::string AttentionPlan::describe() const {
  auto one = [](const char* name, const LaunchDims& d) {
    return strprintf("%s grid (%lld, %lld, %lld) x %d threads, %lld B smem", name,
                     static_cast<long long>(d.grid_x), static_cast<long long>(d.grid_y),
                     static_cast<long long>(d.grid_z), d.block,
                     static_cast<long long>(d.smem_bytes));
  };
  return std::string(core == AttentionCore::kBf16 ? "bf16 tensor cores; " : "fp32; ") +
         one("forward", forward) + "; " + one("backward_rows", backward_rows) + "; " +
         one("backward_cols", backward_cols);
}

int64_t attention_scratch_floats(const AttentionShape& s) {
  s.check_validity();
  return s.B * s.NH * s.T;
}

AttentionPlan attention_plan(const AttentionShape& s, int64_t smem_limit_bytes,
                             AttentionCore core) {
  s.check_validity();
  const int64_t tiles = (s.T + kAttnTile - 1) / kAttnTile;
  AttentionPlan p;
  p.core = core == AttentionCore::kBf16 && attention_tc_fits(s.HD, s.HDv) ? core
                                                                          : AttentionCore::kFp32;
  const auto bytes = [&](AttentionKernel k) {
    return attention_smem(k, s.HD, s.HDv, p.core).bytes;
  };
  p.forward = attention_dims(tiles, s.NH, s.B, bytes(AttentionKernel::kForward));
  p.backward_rows = attention_dims(tiles, s.NH, s.B, bytes(AttentionKernel::kBackwardRows));
  p.backward_cols = attention_dims(tiles, s.NKV, s.B, bytes(AttentionKernel::kBackwardCols));
  attention_dims_check(p.forward, "forward", s, smem_limit_bytes);
  attention_dims_check(p.backward_rows, "backward_rows", s, smem_limit_bytes);
  attention_dims_check(p.backward_cols, "backward_cols", s, smem_limit_bytes);
  return p;
}

}  // namespace moe::cuda
