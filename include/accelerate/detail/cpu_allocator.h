#pragma once
/// \file
/// A CPU allocator that keeps large freed blocks for reuse.
///
/// LibTorch's CPU allocator hands every tensor straight to malloc and back. A training step
/// allocates and frees the same large tensors (gradients, activations) every step, and malloc
/// returns large blocks to the kernel: always when they exceed the mmap threshold, and, in any
/// thread that glibc moved off its main arena, whenever a block does not fit one 64 MiB heap,
/// whatever the tunables say. The next step then page-faults every page back in (measured here:
/// a 64 MiB buffer allocated per call costs ~13,000 faults and 100+ ms, against 0 faults and
/// <1 ms reused). This allocator keeps freed blocks of at least kMinCachedBytes, by size, up to
/// a budget, and hands them out again for allocations of the same (page-rounded) size; smaller
/// ones go to LibTorch's default CPU allocator unchanged.
///
/// PartialState installs it when created (unless `ACCELERATE_CPU_CACHE_MB=0`), so it holds
/// however the program was started. `ACCELERATE_CPU_CACHE_MB` sets the budget (default 1024).
///
/// Example:
/// \code
///   accelerate::detail::install_cpu_caching_allocator(accelerate::current_environment());
///   auto before = accelerate::detail::cpu_cache_stats();
///   for (int i = 0; i < 10; ++i) at::empty({16 << 20});   // one fresh block, nine reuses
///   auto after = accelerate::detail::cpu_cache_stats();   // after.hits - before.hits == 9
/// \endcode

#include <accelerate/environment.h>

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace accelerate::detail {

/// Allocations below this go to LibTorch's default CPU allocator (glibc's heaps serve them well).
inline constexpr int64_t kMinCachedBytes = 256 * 1024;
/// The budget of cached bytes when ACCELERATE_CPU_CACHE_MB is unset.
inline constexpr int64_t kDefaultCpuCacheBytes = int64_t{1} << 30;

/// What the caching allocator did since it was installed.
struct CpuCacheStats {
  bool installed = false;
  int64_t budget_bytes = 0;
  /// Large allocations served from the cache, and those that had to allocate.
  int64_t hits = 0;
  int64_t misses = 0;
  /// Freed blocks given back to the system because the budget was full.
  int64_t evictions = 0;
  /// Bytes held for reuse now, and bytes of large blocks in use now.
  int64_t cached_bytes = 0;
  int64_t live_bytes = 0;
};

/// The budget ACCELERATE_CPU_CACHE_MB asks for, in bytes (kDefaultCpuCacheBytes when unset;
/// 0 means no caching allocator). A value that is not an integer in [0, 2^20] (MiB) is an
/// error naming the variable.
int64_t cpu_cache_budget(const EnvMap& env);

/// Makes the caching allocator LibTorch's CPU allocator, once per process (later calls return
/// what the first one did). Reads ACCELERATE_CPU_CACHE_MB from `env`: 0 leaves LibTorch's
/// allocator in place; a value that is not a non-negative integer is an error naming it.
/// Returns a description for logs.
std::string install_cpu_caching_allocator(const EnvMap& env);

CpuCacheStats cpu_cache_stats();

/// Gives every cached block back to the system (blocks in use stay). Accelerator::free_memory()
/// calls it, as Accelerate's calls `torch.cuda.empty_cache()`.
void empty_cpu_cache();

/// While one lives, CPU allocations made by this thread are fresh anonymous mappings reserved
/// without commit (MAP_NORESERVE): memory nobody writes costs no RAM, and freeing unmaps it.
/// init_empty_weights (big_modeling.h) builds models under it. Nests.
///
/// Example:
/// \code
///   {
///     accelerate::detail::UntouchedPagesScope scope;
///     at::Tensor t = at::empty({1 << 28});  // 1 GiB reserved, nothing resident
///     assert(accelerate::detail::is_untouched_allocation(t));
///   }
/// \endcode
class UntouchedPagesScope {
 public:
  UntouchedPagesScope();
  UntouchedPagesScope(const UntouchedPagesScope&) = delete;
  UntouchedPagesScope& operator=(const UntouchedPagesScope&) = delete;
  ~UntouchedPagesScope();
};

/// Whether `t`'s storage was allocated under an UntouchedPagesScope.
bool is_untouched_allocation(const at::Tensor& t);

}  // namespace accelerate::detail
