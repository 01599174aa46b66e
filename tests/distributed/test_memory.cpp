// find_executable_batch_size with ranks as threads: processes that run out of memory at different
// sizes must still settle on one size, and fail together.

#include <accelerate/memory.h>

#include <gtest/gtest.h>

#include "expect_error.h"
#include "thread_ranks.h"

#include <cstdint>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

using accelerate::find_executable_batch_size;
using accelerate::FindBatchSizeOptions;
using accelerate::PartialState;
using accelerate::testing::message;
using accelerate::testing::run_ranks;
using accelerate::testing::run_ranks_collect;

namespace {

// Rank 0 fits batches up to 100, rank 1 up to 30.
constexpr int64_t kLimits[] = {100, 30};

// The error LibTorch's CPU allocator raises when the system refuses memory.
[[noreturn]] void fail_like_the_cpu_allocator(int64_t bytes) {
  TORCH_CHECK(false, "DefaultCPUAllocator: can't allocate memory: you tried to allocate ", bytes,
              " bytes. Error code 12 (Cannot allocate memory)");
}

const FindBatchSizeOptions kHalve{.starting_batch_size = 128,
                                  .reduce_batch_size_fn = [](int64_t b) { return b / 2; }};

}  // namespace

TEST(FindExecutableBatchSizeRanks, RanksWithDifferentLimitsSettleOnOneSizeWhenHalving) {
  std::vector<int64_t> tried[2];
  int64_t used[2] = {0, 0};
  run_ranks(2, [&](PartialState& state) {
    const int rank = state.process_index();
    used[rank] = find_executable_batch_size(
        state,
        [&](int64_t batch_size) {
          tried[rank].push_back(batch_size);
          if (batch_size > kLimits[rank]) fail_like_the_cpu_allocator(batch_size * 1024);
          return batch_size;
        },
        kHalve);
  });
  // 128 fails on both, 64 and 32 on rank 1 (32 > 30): both retry each time, and both use 16.
  const std::vector<int64_t> want{128, 64, 32, 16};
  EXPECT_EQ(tried[0], want);
  EXPECT_EQ(tried[1], want);
  EXPECT_EQ(used[0], 16);
  EXPECT_EQ(used[1], 16);
}

TEST(FindExecutableBatchSizeRanks, RanksSettleOnOneSizeWithAccelerateDefaultRule) {
  std::vector<int64_t> tried[2];
  run_ranks(2, [&](PartialState& state) {
    const int rank = state.process_index();
    find_executable_batch_size(state, [&](int64_t batch_size) {
      tried[rank].push_back(batch_size);
      // Different kinds of out-of-memory on the two ranks count the same.
      if (batch_size > kLimits[rank]) {
        if (rank == 0) throw std::bad_alloc();
        fail_like_the_cpu_allocator(batch_size * 1024);
      }
    });
  });
  const std::vector<int64_t> want{128, 115, 103, 92, 82, 73, 65, 58, 52, 46, 41, 36, 32, 28};
  EXPECT_EQ(tried[0], want);
  EXPECT_EQ(tried[1], want);
}

TEST(FindExecutableBatchSizeRanks, ReachingZeroFailsOnEveryRank) {
  auto errors = run_ranks_collect(2, [&](PartialState& state) {
    const int64_t limit = state.process_index() == 0 ? 100 : 0;  // rank 1 never fits
    find_executable_batch_size(
        state,
        [&](int64_t batch_size) {
          if (batch_size > limit) fail_like_the_cpu_allocator(batch_size);
        },
        kHalve);
  });
  for (int rank = 0; rank < 2; ++rank) {
    EXPECT_NE(message(errors[rank])
                  .find("find_executable_batch_size: no executable batch size found, reached zero"),
              std::string::npos)
        << "rank " << rank << ": " << message(errors[rank]);
  }
}

TEST(FindExecutableBatchSizeRanks, AnotherErrorOnOneRankStopsEveryRank) {
  std::vector<int64_t> tried[2];
  auto errors = run_ranks_collect(2, [&](PartialState& state) {
    const int rank = state.process_index();
    find_executable_batch_size(
        state,
        [&](int64_t batch_size) {
          tried[rank].push_back(batch_size);
          if (rank == 1 && batch_size == 64) throw std::runtime_error("corrupt batch");
          if (batch_size > kLimits[rank]) fail_like_the_cpu_allocator(batch_size);
        },
        kHalve);
  });
  EXPECT_EQ(message(errors[1]), "corrupt batch");
  EXPECT_NE(message(errors[0]).find("find_executable_batch_size: process 1 failed at batch size 64 "
                                    "with an error that is not out-of-memory"),
            std::string::npos)
      << message(errors[0]);
  EXPECT_EQ(tried[0], (std::vector<int64_t>{128, 64}));
  EXPECT_EQ(tried[1], (std::vector<int64_t>{128, 64}));
}
