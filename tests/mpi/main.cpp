// GoogleTest main for the tests run under mpirun: every rank runs every test (the tests call
// collectives together), rank 0 prints the usual report, other ranks print only their
// failures (prefixed with the rank), and every rank exits non-zero when any rank failed.
#include <gtest/gtest.h>

#include <cstdio>
#include <string>

#include "parallel/comm.h"

namespace {

class RankFailurePrinter : public testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  // NOTE: the test's name is taken here, not in OnTestPartResult, where gtest holds the
  // mutex that UnitTest::current_test_info() takes (calling it there deadlocks).
  void OnTestStart(const testing::TestInfo& t) override {
    test_ = std::string(t.test_suite_name()) + "." + t.name();
  }
  void OnTestPartResult(const testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] %s: %s:%d: failure\n%s\n", rank_, test_.c_str(),
                 r.file_name() ? r.file_name() : "?", r.line_number(), r.message());
    std::fflush(stderr);
  }

 private:
  int rank_;
  std::string test_;
};

}  // namespace

int main(int argc, char** argv) {
  moe::mpi_start(&argc, &argv);
  testing::InitGoogleTest(&argc, argv);
  const int rank = moe::mpi_world_rank();
  if (rank != 0) {
    testing::TestEventListeners& listeners = testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(rank));
  }
  const int rc = RUN_ALL_TESTS();
  // One verdict for the job: failed anywhere means failed everywhere.
  double failed = rc != 0 ? 1.0 : 0.0;
  moe::comm_mpi_world()->all_reduce_max(&failed, 1);
  if (rank == 0 && rc == 0 && failed != 0)
    std::fprintf(stderr, "[  FAILED  ] on another rank; see its [rank N] messages\n");
  moe::mpi_finish();
  return failed != 0 ? 1 : 0;
}
