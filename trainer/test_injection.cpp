#include "trainer/test_injection.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "model/check.h"

namespace moe {

namespace {

int64_t throw_step(int world_rank) {
  const char* v = std::getenv("MOETRAIN_TEST_THROW_AT");
  int rank = -1;
  long long step = 0;
  if (!v || std::sscanf(v, "%d:%lld", &rank, &step) != 2 || rank != world_rank) return 0;
  return step;
}

std::vector<TestInjections::At> valued(const char* var, int world_rank) {
  std::vector<TestInjections::At> out;
  for (const char* v = std::getenv(var); v && *v;) {
    int rank = -1, used = 0;
    long long step = 0;
    double value = 0;
    if (std::sscanf(v, "%d:%lld:%lf%n", &rank, &step, &value, &used) != 3) break;
    if (rank == world_rank) out.push_back({step, value});
    v += used;
    if (*v == ',') ++v;
  }
  return out;
}

}  // namespace

TestInjections test_injections_read(int world_rank) {
  TestInjections in;
  in.throw_at = throw_step(world_rank);
  in.sleeps = valued("MOETRAIN_TEST_SLEEP_AT", world_rank);
  in.poisons = valued("MOETRAIN_TEST_POISON_AT", world_rank);
  return in;
}

void test_injections_apply(TestInjections& in, TrainState& s, int64_t step) {
  if (step == in.throw_at)
    user_error("injected fault at step %lld (MOETRAIN_TEST_THROW_AT)", static_cast<long long>(step));
  for (const TestInjections::At& z : in.sleeps)
    if (step == z.step) std::this_thread::sleep_for(std::chrono::duration<double>(z.value));
  for (TestInjections::At& z : in.poisons) {
    if (step != z.step || !s.model.part.head) continue;
    const float v = static_cast<float>(z.value);
    for (const ParamInfo& p : s.model.table)
      if (p.name == "final_norm")
        s.model.ops->upload(s.model.params + p.offset + p.count / 2, &v, sizeof(float));
    z.step = 0;  // once: a rollback replays this step unpoisoned
  }
}

}  // namespace moe
