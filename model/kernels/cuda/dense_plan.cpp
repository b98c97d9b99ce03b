// Launch planning for the dense CUDA kernels; see dense_plan.h.
#include "model/kernels/cuda/dense_plan.h"

#include "model/check.h"

namespace moe::cuda {

namespace {

constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1;
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kMaxSmem = 48 * 1024;
// Threads of an elementwise grid-stride loop, and how many blocks it gets at most
// (enough to fill any current GPU several times over).
constexpr int kElementwiseBlock = 256;
constexpr int64_t kElementwiseMaxBlocks = 8192;
// rmsnorm_backward_weight: rows per partial-sum chunk at least this many.
constexpr int64_t kRmsnormDwMinChunkRows = 128;
constexpr int kColumnBlock = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads for `work` units: a multiple of 32 in [32, max_block].
int round_block(int64_t work, int max_block) {
  const int64_t b = ceil_div(work > 0 ? work : 1, 32) * 32;
  return static_cast<int>(b < max_block ? b : max_block);
}

LaunchDims checked(const LaunchDims& d, const char* what) {
  CHECK(launch_dims_valid(d), "%s: grid (%lld, %lld, %lld) block %d smem %lld out of limits", what,
        static_cast<long long>(d.grid_x), static_cast<long long>(d.grid_y),
        static_cast<long long>(d.grid_z), d.block, static_cast<long long>(d.smem_bytes));
  return d;
}

}  // namespace

bool launch_dims_valid(const LaunchDims& d) {
  return d.grid_x >= 0 && d.grid_x <= kMaxGridX && d.grid_y >= 1 && d.grid_y <= kMaxGridYZ &&
         d.grid_z >= 1 && d.grid_z <= kMaxGridYZ && d.block >= 32 && d.block <= 1024 &&
         d.block % 32 == 0 && d.smem_bytes >= 0 && d.smem_bytes <= kMaxSmem;
}

LaunchDims plan_rows(int64_t N, int64_t cols, int64_t items_per_thread, int max_block) {
  CHECK(N >= 0 && cols >= 0 && items_per_thread >= 1 && max_block >= 32 && max_block <= 1024,
        "N=%lld cols=%lld", static_cast<long long>(N), static_cast<long long>(cols));
  LaunchDims d;
  d.grid_x = N;
  d.block = round_block(ceil_div(cols, items_per_thread), max_block);
  return checked(d, "plan_rows");
}

LaunchDims plan_elementwise(int64_t n) {
  CHECK(n >= 0, "n=%lld", static_cast<long long>(n));
  LaunchDims d;
  const int64_t blocks = ceil_div(n, kElementwiseBlock);
  d.grid_x = blocks < kElementwiseMaxBlocks ? blocks : kElementwiseMaxBlocks;
  d.block = kElementwiseBlock;
  return checked(d, "plan_elementwise");
}

LaunchDims plan_embedding_forward(int64_t N, int64_t C) { return plan_rows(N, C, 1, 256); }

LaunchDims plan_transpose(int64_t R, int64_t C) {
  CHECK(R >= 0 && C >= 0 && R <= kTransposeMaxRows, "transpose of %lld x %lld",
        static_cast<long long>(R), static_cast<long long>(C));
  LaunchDims d;
  d.grid_x = R == 0 ? 0 : ceil_div(C, kTransposeTile);
  d.grid_y = R == 0 ? 1 : ceil_div(R, kTransposeTile);
  d.block = kTransposeBlock;
  return checked(d, "plan_transpose");
}

LaunchDims plan_embedding_backward(int64_t V, int64_t C) {
  CHECK(V >= 0 && C >= 0, "V=%lld C=%lld", static_cast<long long>(V), static_cast<long long>(C));
  LaunchDims d;
  d.block = round_block(ceil_div(C, kEmbeddingBackwardColsPerThread), 256);
  d.grid_x = C == 0 ? 0 : ceil_div(V, kEmbeddingBackwardRows);
  const int64_t tiles = ceil_div(C, int64_t(d.block) * kEmbeddingBackwardColsPerThread);
  d.grid_y = tiles > 0 ? tiles : 1;
  d.smem_bytes = (2 * int64_t(d.block) + 32) * int64_t(sizeof(int32_t));
  return checked(d, "plan_embedding_backward");
}

LaunchDims plan_rmsnorm_forward(int64_t N, int64_t C) { return plan_rows(N, C, 8, 512); }

LaunchDims plan_rmsnorm_backward_input(int64_t N, int64_t C) { return plan_rows(N, C, 8, 512); }

int64_t rmsnorm_backward_weight_chunk_rows(int64_t N) {
  CHECK(N >= 0, "N=%lld", static_cast<long long>(N));
  const int64_t need = ceil_div(N, kMaxGridYZ);  // keeps the chunk count a valid grid_y
  return need > kRmsnormDwMinChunkRows ? need : kRmsnormDwMinChunkRows;
}

int64_t rmsnorm_backward_weight_chunks(int64_t N) {
  return ceil_div(N, rmsnorm_backward_weight_chunk_rows(N));
}

int64_t rmsnorm_backward_weight_scratch_count(int64_t N, int64_t C) {
  CHECK(C >= 0, "C=%lld", static_cast<long long>(C));
  return rmsnorm_backward_weight_chunks(N) * C;
}

LaunchDims plan_rmsnorm_backward_weight_partial(int64_t N, int64_t C) {
  CHECK(N >= 0 && C >= 0, "N=%lld C=%lld", static_cast<long long>(N), static_cast<long long>(C));
  LaunchDims d;
  d.block = round_block(C, kColumnBlock);
  const int64_t chunks = rmsnorm_backward_weight_chunks(N);
  d.grid_x = chunks == 0 ? 0 : ceil_div(C, d.block);
  d.grid_y = chunks > 0 ? chunks : 1;
  return checked(d, "plan_rmsnorm_backward_weight_partial");
}

LaunchDims plan_rmsnorm_backward_weight_final(int64_t C) {
  CHECK(C >= 0, "C=%lld", static_cast<long long>(C));
  LaunchDims d;
  d.block = round_block(C, kColumnBlock);
  d.grid_x = ceil_div(C, d.block);
  return checked(d, "plan_rmsnorm_backward_weight_final");
}

LaunchDims plan_rope(int64_t BT, int64_t H, int64_t HD) {
  CHECK(HD > 0 && HD % 2 == 0 && H >= 0, "H=%lld HD=%lld", static_cast<long long>(H),
        static_cast<long long>(HD));
  return plan_rows(H == 0 ? 0 : BT, H * (HD / 2), 1, 256);
}

LaunchDims plan_rope_tables(int64_t T_, int64_t HD) {
  CHECK(T_ >= 0 && HD > 0 && HD % 2 == 0, "T=%lld HD=%lld", static_cast<long long>(T_),
        static_cast<long long>(HD));
  return plan_elementwise(T_ * (HD / 2));
}

LaunchDims plan_swiglu(int64_t N, int64_t F) { return plan_rows(F == 0 ? 0 : N, F, 1, 256); }

LaunchDims plan_residual(int64_t n) { return plan_elementwise(n); }

LaunchDims plan_cross_entropy_forward(int64_t N, int64_t V) { return plan_rows(N, V, 8, 1024); }

int64_t cross_entropy_backward_col_tiles(int64_t V, int block) {
  CHECK(V >= 0 && block >= 32, "V=%lld block=%d", static_cast<long long>(V), block);
  return ceil_div(V, int64_t(block) * kCrossEntropyBackwardColsPerThread);
}

LaunchDims plan_cross_entropy_backward(int64_t N, int64_t V) {
  CHECK(N >= 0 && V >= 0, "N=%lld V=%lld", static_cast<long long>(N), static_cast<long long>(V));
  LaunchDims d;
  d.block = round_block(ceil_div(V, kCrossEntropyBackwardColsPerThread), 256);
  d.grid_x = N * cross_entropy_backward_col_tiles(V, d.block);
  return checked(d, "plan_cross_entropy_backward");
}

}  // namespace moe::cuda
