#include "accelerate/detail/runtime_defaults.h"

#include <ATen/Parallel.h>

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <thread>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace accelerate::detail {

std::string apply_allocator_defaults(const EnvMap& env) {
  for (const char* name : {"GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"}) {
    if (env.count(name) > 0) return std::string("left to the environment (") + name + " is set)";
  }
#if defined(__GLIBC__)
  static std::atomic<bool> applied{false};
  if (applied.exchange(true)) return "already applied";
  constexpr int kKeep = 1 << 30;
  // Both or neither: a high mmap threshold alone still trims the heap's free top every free().
  const bool ok = mallopt(M_MMAP_THRESHOLD, kKeep) == 1 && mallopt(M_TRIM_THRESHOLD, kKeep) == 1;
  return ok ? "glibc keeps freed blocks up to 1 GiB" : "glibc refused the malloc settings";
#else
  return "not glibc: allocator left alone";
#endif
}

std::string apply_thread_defaults(const EnvMap& env, int processes_on_this_machine) {
  if (processes_on_this_machine <= 1) return "one process on this machine: threads left alone";
  for (const char* name : {"OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"}) {
    if (env.count(name) > 0) return std::string("left to the environment (") + name + " is set)";
  }
  const unsigned cores = std::max(1U, std::thread::hardware_concurrency());
  const int threads = std::max(1, static_cast<int>(cores) / std::max(1, processes_on_this_machine));
  at::set_num_threads(threads);
  // OpenBLAS's pthread build keeps its own pool, sized from the environment when it loaded; the
  // symbol is only there when LibTorch's BLAS is OpenBLAS.
  using SetThreads = void (*)(int);
  if (auto* set = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))) {
    set(threads);
  }
  return std::to_string(threads) + " thread(s) per pool";
}

}  // namespace accelerate::detail
