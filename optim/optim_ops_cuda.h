// The optimizer's kernels on a GPU (optim/optim_ops.h), queued on the model's stream so they
// follow the step's backward and precede the next forward without a host wait.
#pragma once

#include <memory>

#include "model/kernels/cuda/cuda_backend.h"
#include "optim/optim_ops.h"

namespace moe {

// On the current device. Device scratch for sums over up to max_n elements and a pinned host
// word for the result are allocated here, once.
std::unique_ptr<OptimOps> optim_ops_cuda(cuda::Stream stream, int64_t max_n);

}  // namespace moe
