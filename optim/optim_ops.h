// The optimizer's kernels on the device that holds the training state: AdamW over the
// flat parameter, gradient and moment buffers, and the gradient norm's sum of squares.
// The trainer calls these and nothing else on that memory, so one step body runs on the
// CPU (optim_ops_cpu) and on a GPU (optim_ops_cuda, optim/optim_ops_cuda.h) alike.
#pragma once

#include <cstdint>
#include <memory>

#include "optim/adamw.h"

namespace moe {

class OptimOps {
 public:
  virtual ~OptimOps() = default;
  // As adamw_update / adamw_update_bf16 (optim/adamw.h), over the backend's memory.
  virtual void adamw(float* param, const float* grad, float* m, float* v, int64_t n,
                     const AdamWStep& s, bool decay) = 0;
  virtual void adamw_bf16(float* param, const float* grad, uint16_t* m, uint16_t* v, int64_t n,
                          const AdamWStep& s, bool decay) = 0;
  // Sum of squares of g (n <= the max_n given at creation) in double, in an order fixed by n
  // alone: the same bits on every run. Returned to the host (the step's one read-back).
  virtual double sum_squares(const float* g, int64_t n) = 0;
};

// Host memory; the scratch for sums over up to max_n elements is allocated here, once.
std::unique_ptr<OptimOps> optim_ops_cpu(int64_t max_n);

}  // namespace moe
