// find_executable_batch_size across two real processes started by `accelerate launch` (see
// workers/memory_worker.cpp): rank 0 fits batches up to 100, rank 1 up to 30, both start at 128.

#include <gtest/gtest.h>

#include "launch_util.h"

#include <string>

using accelerate::testing::cli_path;
using accelerate::testing::kLaunchVariables;
using accelerate::testing::run_command;
using accelerate::testing::worker_path;

TEST(MemoryThroughLauncher, ProcessesSettleOnOneBatchSizeAndFailTogetherAtZero) {
  auto r = run_command({cli_path(), "launch", "--num_processes", "2", worker_path("memory_worker")},
                       std::chrono::seconds(120), {}, kLaunchVariables);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const std::string rank : {"0", "1"}) {
    const std::string prefix = "memory_worker: rank " + rank + " ";
    // Halving: 128 fails on both, 64 and 32 on rank 1 (32 > 30), 16 fits both.
    EXPECT_NE(r.output.find(prefix + "halve used 16 tried 128,64,32,16\n"), std::string::npos)
        << r.output;
    // Accelerate's int(b * 0.9): 28 is the first size at most 30.
    EXPECT_NE(r.output.find(prefix +
                            "default used 28 tried 128,115,103,92,82,73,65,58,52,46,41,36,32,28\n"),
              std::string::npos)
        << r.output;
    // Rank 1 never fits, so rank 0 (which would) fails with it.
    EXPECT_NE(r.output.find(prefix + "zero error find_executable_batch_size: no executable batch "
                                     "size found, reached zero"),
              std::string::npos)
        << r.output;
  }
}
