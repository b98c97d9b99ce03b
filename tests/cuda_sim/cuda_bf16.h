// cuda_bf16.h under the simulator: __nv_bfloat16 and its conversions are in cuda_sim.h.
#pragma once

#include "cuda_sim.h"
