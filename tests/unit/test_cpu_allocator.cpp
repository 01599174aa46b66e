// The CPU caching allocator (detail/cpu_allocator.h) and the process-wide defaults applied when
// a PartialState is created (detail/runtime_defaults.h).

#include <accelerate/detail/cpu_allocator.h>
#include <accelerate/detail/runtime_defaults.h>
#include <accelerate/state.h>

#include <c10/core/CPUAllocator.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "expect_error.h"

#include <thread>

namespace {

using accelerate::EnvMap;
namespace detail = accelerate::detail;

void install() {
  // What every PartialState does; a single-process state in this process installs it too.
  detail::install_cpu_caching_allocator(EnvMap{});
  ASSERT_TRUE(detail::cpu_cache_stats().installed);
}

TEST(CpuCachingAllocator, ALargeBlockFreedIsHandedOutAgainForTheSameSize) {
  install();
  detail::empty_cpu_cache();
  const auto before = detail::cpu_cache_stats();
  for (int i = 0; i < 10; ++i) {
    auto t = at::empty({1 << 20});  // 4 MiB
    t.fill_(i);
  }
  const auto after = detail::cpu_cache_stats();
  EXPECT_EQ(after.misses - before.misses, 1);
  EXPECT_EQ(after.hits - before.hits, 9);
  EXPECT_EQ(after.live_bytes, before.live_bytes);
  EXPECT_EQ(after.cached_bytes - before.cached_bytes, 4 << 20);
  // Sizes are rounded to pages: a few bytes more or less is the same block.
  {
    auto a = at::empty({(1 << 20) - 3});
    EXPECT_EQ(detail::cpu_cache_stats().hits - after.hits, 1);
  }
  detail::empty_cpu_cache();
  EXPECT_EQ(detail::cpu_cache_stats().cached_bytes, 0);
}

TEST(CpuCachingAllocator, SmallBlocksGoToLibTorchsAllocatorAndRawAllocationsWork) {
  install();
  const auto before = detail::cpu_cache_stats();
  for (int i = 0; i < 5; ++i) auto t = at::ones({1000});
  const auto mid = detail::cpu_cache_stats();
  EXPECT_EQ(mid.hits + mid.misses, before.hits + before.misses);
  // raw_allocate / raw_deallocate (used by some LibTorch code paths) for both kinds of block.
  c10::Allocator* allocator = c10::GetCPUAllocator();
  for (size_t n : {size_t{100}, size_t{8} << 20}) {
    void* p = allocator->raw_allocate(n);
    ASSERT_NE(p, nullptr);
    std::memset(p, 7, n);
    allocator->raw_deallocate(p);
  }
  EXPECT_EQ(detail::cpu_cache_stats().live_bytes, before.live_bytes);
}

TEST(CpuCachingAllocator, TheBudgetBoundsWhatIsKeptAndTensorsFreedOnOtherThreadsComeBack) {
  install();
  detail::empty_cpu_cache();
  const auto budget = detail::cpu_cache_stats().budget_bytes;
  ASSERT_EQ(budget, detail::kDefaultCpuCacheBytes);
  const auto before = detail::cpu_cache_stats();
  {
    // Never touched, so this costs address space, not memory.
    std::vector<at::Tensor> blocks;
    for (int i = 0; i < 5; ++i) blocks.push_back(at::empty({budget / 4 / 4}));
    std::thread([&] { blocks.clear(); }).join();
  }
  const auto after = detail::cpu_cache_stats();
  EXPECT_LE(after.cached_bytes, budget);
  EXPECT_EQ(after.cached_bytes, 4 * (budget / 4));
  EXPECT_EQ(after.evictions - before.evictions, 1);
  detail::empty_cpu_cache();
}

TEST(CpuCachingAllocator, TheBudgetComesFromTheEnvironment) {
  EXPECT_EQ(detail::cpu_cache_budget({}), detail::kDefaultCpuCacheBytes);
  EXPECT_EQ(detail::cpu_cache_budget({{"ACCELERATE_CPU_CACHE_MB", "0"}}), 0);
  EXPECT_EQ(detail::cpu_cache_budget({{"ACCELERATE_CPU_CACHE_MB", "64"}}), 64 << 20);
  EXPECT_ERROR_CONTAINS(detail::cpu_cache_budget({{"ACCELERATE_CPU_CACHE_MB", "-1"}}),
                        "ACCELERATE_CPU_CACHE_MB must be a number of MiB in [0, 1048576], got -1");
  EXPECT_ERROR_CONTAINS(detail::cpu_cache_budget({{"ACCELERATE_CPU_CACHE_MB", "lots"}}),
                        "ACCELERATE_CPU_CACHE_MB");
}

TEST(RuntimeDefaults, TheEnvironmentsOwnChoicesWin) {
  EXPECT_EQ(detail::apply_allocator_defaults({{"GLIBC_TUNABLES", ""}}),
            "left to the environment (GLIBC_TUNABLES is set)");
  EXPECT_EQ(detail::apply_allocator_defaults({{"MALLOC_TRIM_THRESHOLD_", "0"}}),
            "left to the environment (MALLOC_TRIM_THRESHOLD_ is set)");
  EXPECT_EQ(detail::apply_thread_defaults({{"OPENBLAS_NUM_THREADS", "3"}}, 2),
            "left to the environment (OPENBLAS_NUM_THREADS is set)");
  EXPECT_EQ(detail::apply_thread_defaults({}, 1),
            "one process on this machine: threads left alone");
}

TEST(RuntimeDefaults, SeveralProcessesOnAMachineShareItsCores) {
  const int previous = at::get_num_threads();
  const unsigned cores = std::max(1U, std::thread::hardware_concurrency());
  const int processes = static_cast<int>(cores) * 2;  // more processes than cores: one thread
  EXPECT_EQ(detail::apply_thread_defaults({}, processes), "1 thread(s) per pool");
  EXPECT_EQ(at::get_num_threads(), 1);
  at::set_num_threads(previous);
}

TEST(RuntimeDefaults, GlibcKeepsFreedMemoryUnlessTheEnvironmentChose) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "AddressSanitizer's allocator replaces glibc's and refuses mallopt";
#elif defined(__GLIBC__)
  const auto first = detail::apply_allocator_defaults({});
  EXPECT_TRUE(first == "glibc keeps freed blocks up to 1 GiB" || first == "already applied")
      << first;
  EXPECT_EQ(detail::apply_allocator_defaults({}), "already applied");
#else
  GTEST_SKIP() << "not glibc";
#endif
}

}  // namespace
