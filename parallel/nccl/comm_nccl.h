// The Comm interface over NCCL, for DEVICE buffers: one communicator per process group,
// bootstrapped over that group's MPI communicator (parallel/nccl_bootstrap.h). Operations
// are enqueued on the stream given at creation (the communication stream: computation
// streams order against it with events). The blocking calls return when the operation has
// completed; the *_start calls return a CommRequest holding a CUDA event recorded after the
// operation, which test() queries and wait() waits for.
//
// A group keeps its MPI Comm beside this one: host buffers (token counts for the plan, loss
// values) go over MPI; tensors on the device go here.
//
// Hangs and errors: wait() polls the event and ncclCommGetAsyncError; an asynchronous NCCL
// error, or an operation not complete within timeout_s, aborts the communicator and stops
// the job with one line naming the rank, the group and the operation.
#pragma once

#include <memory>
#include <string>

#include "model/kernels/cuda/cuda_backend.h"
#include "parallel/comm.h"

namespace moe {

// Collective over `bootstrap` (every member calls it). The new communicator has the same
// ranks, order and name. With a `producer` stream (the computation's), every operation is
// ordered after the work queued there when it is called (an event, no host wait).
std::unique_ptr<Comm> comm_nccl_create(Comm& bootstrap, cuda::Stream stream, double timeout_s,
                                       cuda::Stream producer = nullptr);

}  // namespace moe
