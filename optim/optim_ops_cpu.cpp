#include <vector>

#include "model/check.h"
#include "optim/optim_ops.h"

namespace moe {

namespace {

class CpuOptimOps final : public OptimOps {
 public:
  explicit CpuOptimOps(int64_t max_n) : partials_(static_cast<size_t>(grad_norm_blocks(max_n))) {}
  void adamw(float* param, const float* grad, float* m, float* v, int64_t n, const AdamWStep& s,
             bool decay) override {
    adamw_update(param, grad, m, v, n, s, decay);
  }
  void adamw_bf16(float* param, const float* grad, uint16_t* m, uint16_t* v, int64_t n,
                  const AdamWStep& s, bool decay) override {
    adamw_update_bf16(param, grad, m, v, n, s, decay);
  }
  double sum_squares(const float* g, int64_t n) override {
    CHECK(grad_norm_blocks(n) <= static_cast<int64_t>(partials_.size()),
          "sum of squares over %lld elements, planned for fewer", static_cast<long long>(n));
    return grad_sum_squares(g, n, partials_.data());
  }

 private:
  std::vector<double> partials_;
};

}  // namespace

std::unique_ptr<OptimOps> optim_ops_cpu(int64_t max_n) {
  return std::make_unique<CpuOptimOps>(max_n);
}

}  // namespace moe
