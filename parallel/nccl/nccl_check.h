// NCCL_CHECK: every NCCL return code goes through it, ending in model/check.h's reporter,
// which prints the rank and brings the whole job down (no rank is left in a collective).
#pragma once

#include <nccl.h>

#include "model/check.h"

#define NCCL_CHECK(stmt)                                                              \
  do {                                                                                \
    ncclResult_t moe_nccl_rc_ = (stmt);                                               \
    if (moe_nccl_rc_ != ncclSuccess)                                                  \
      ::moe::check_failed(#stmt, __FILE__, __LINE__, ncclGetErrorString(moe_nccl_rc_)); \
  } while (0)
