#include "model/kernels/cuda/device_choice.h"

#include <cerrno>
#include <cstdlib>

#include "model/check.h"

namespace moe::cuda {

int launcher_local_rank() {
  for (const char* var : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK"}) {
    const char* v = std::getenv(var);
    if (!v) continue;
    char* end = nullptr;
    errno = 0;
    const long r = std::strtol(v, &end, 10);
    if (end == v || *end != '\0' || errno != 0 || r < 0 || r > 1 << 20)
      user_error("%s=\"%s\": expected the launcher's local rank, a non-negative integer", var, v);
    return static_cast<int>(r);
  }
  return 0;
}

int device_for(int local_rank, int n_devices) {
  CHECK(local_rank >= 0, "local rank %d", local_rank);
  if (n_devices <= 0) return -1;
  return local_rank % n_devices;
}

}  // namespace moe::cuda
