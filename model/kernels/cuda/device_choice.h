// Which GPU a rank drives: one per rank, chosen from the launcher's local rank. Plain C++
// (no CUDA), so the rule is tested on every machine (tests/test_device_choice.cpp).
#pragma once

namespace moe::cuda {

// This process's rank among the ranks on its node, from the first of
// OMPI_COMM_WORLD_LOCAL_RANK (mpirun), SLURM_LOCALID (srun), LOCAL_RANK (torchrun-style
// launchers) that is set; 0 when none is. A set but malformed value is a user error naming
// the variable.
int launcher_local_rank();

// The device for local rank `local_rank` with `n_devices` visible: local_rank modulo
// n_devices (more ranks than GPUs share them round robin); -1 when there is none.
int device_for(int local_rank, int n_devices);

}  // namespace moe::cuda
