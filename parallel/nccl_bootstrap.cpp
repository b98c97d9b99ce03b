#include "parallel/nccl_bootstrap.h"

#include "model/check.h"

namespace moe {

NcclId nccl_bootstrap(Comm& group, const NcclBootstrapOps& ops) {
  CHECK(ops.make_id && ops.init, "NCCL bootstrap of group %s needs both operations",
        group.name().c_str());
  NcclId id;
  if (group.rank() == 0) id = ops.make_id();
  group.broadcast(id.bytes.data(), id.bytes.size(), 0);
  ops.init(id, group.size(), group.rank());
  return id;
}

}  // namespace moe
