// mma.h under the simulator: nvcuda::wmma (16x16x16) is in cuda_sim.h.
#pragma once

#include "cuda_sim.h"
