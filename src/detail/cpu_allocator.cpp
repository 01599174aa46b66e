#include "accelerate/detail/cpu_allocator.h"

#include "accelerate/compat.h"

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <list>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace accelerate::detail {
namespace {

constexpr size_t kPage = 4096;

size_t round_to_page(size_t n) {
  return (n + kPage - 1) / kPage * kPage;
}

class CachingCpuAllocator final : public compat::CpuAllocatorBase {
 public:
  CachingCpuAllocator(c10::Allocator* fallback, int64_t budget)
      : fallback_(fallback), budget_(budget) {}

  c10::DataPtr allocate_impl(size_t n) const override {
    if (static_cast<int64_t>(n) < kMinCachedBytes) return fallback_->allocate(n);
    const size_t size = round_to_page(n);
    void* ptr = take(size);
    if (ptr == nullptr) {
      try {
        ptr = c10::alloc_cpu(size);
      } catch (const c10::Error&) {
        // Memory held for reuse must never cause an out-of-memory error: give it back, retry.
        const_cast<CachingCpuAllocator*>(this)->empty();
        ptr = c10::alloc_cpu(size);
      }
      std::lock_guard<std::mutex> lock(mutex_);
      live_[ptr] = size;
      live_bytes_ += static_cast<int64_t>(size);
    }
    return {ptr, ptr, &release, c10::Device(c10::kCPU)};
  }

  // Blocks from both sources: ours are in live_, the rest belong to the fallback.
  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  static void release(void* ptr);

  void give_back(void* ptr) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = live_.find(ptr);
      if (it == live_.end()) {
        // Not ours: allocated by the fallback and freed through raw_deleter().
        c10::DeleterFnPtr fallback_deleter = fallback_->raw_deleter();
        TORCH_INTERNAL_ASSERT(fallback_deleter != nullptr,
                              "accelerate: CPU allocator: freeing a block it does not know");
        fallback_deleter(ptr);
        return;
      }
      const size_t size = it->second;
      live_.erase(it);
      live_bytes_ -= static_cast<int64_t>(size);
      if (static_cast<int64_t>(size) > budget_) {
        evicted.push_back(ptr);
        ++evictions_;
      } else {
        lru_.push_back({ptr, size});
        free_[size].push_back(std::prev(lru_.end()));
        cached_bytes_ += static_cast<int64_t>(size);
        while (cached_bytes_ > budget_) evicted.push_back(evict_oldest());
      }
    }
    for (void* p : evicted) c10::free_cpu(p);
  }

  CpuCacheStats stats() const {
    std::lock_guard<std::mutex> lock(mutex_);
    CpuCacheStats s;
    s.installed = true;
    s.budget_bytes = budget_;
    s.hits = hits_;
    s.misses = misses_;
    s.evictions = evictions_;
    s.cached_bytes = cached_bytes_;
    s.live_bytes = live_bytes_;
    return s;
  }

  void empty() {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (!lru_.empty()) evicted.push_back(evict_oldest());
    }
    for (void* p : evicted) c10::free_cpu(p);
  }

 private:
  struct Block {
    void* ptr;
    size_t size;
  };

  // A cached block of exactly `size` bytes, or nullptr.
  void* take(size_t size) const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = free_.find(size);
    if (found == free_.end() || found->second.empty()) {
      ++misses_;
      return nullptr;
    }
    // The most recently freed block of this size: its pages are the likeliest to be in cache.
    auto block = found->second.back();
    found->second.pop_back();
    void* ptr = block->ptr;
    lru_.erase(block);
    cached_bytes_ -= static_cast<int64_t>(size);
    live_[ptr] = size;
    live_bytes_ += static_cast<int64_t>(size);
    ++hits_;
    return ptr;
  }

  // Caller holds mutex_; returns the block to free outside the lock.
  void* evict_oldest() const {
    Block oldest = lru_.front();
    auto& same = free_[oldest.size];
    same.erase(std::find(same.begin(), same.end(), lru_.begin()));
    lru_.pop_front();
    cached_bytes_ -= static_cast<int64_t>(oldest.size);
    ++evictions_;
    return oldest.ptr;
  }

  c10::Allocator* fallback_;
  const int64_t budget_;
  mutable std::mutex mutex_;
  mutable std::unordered_map<void*, size_t> live_;
  mutable std::list<Block> lru_;  // cached blocks, oldest first
  mutable std::unordered_map<size_t, std::vector<std::list<Block>::iterator>> free_;
  mutable int64_t cached_bytes_ = 0;
  mutable int64_t live_bytes_ = 0;
  mutable int64_t hits_ = 0;
  mutable int64_t misses_ = 0;
  mutable int64_t evictions_ = 0;
};

std::mutex g_install_mutex;
// Never destroyed: tensors allocated by it may outlive every static destructor.
CachingCpuAllocator* g_allocator = nullptr;
std::string g_installed_as;

thread_local int g_untouched_depth = 0;

// The CPU allocator once UntouchedPagesScope was first used: it serves scoped threads with
// untouched mappings and hands everything else to the allocator it stands in front of (LibTorch's,
// or the caching one, which then installs itself behind it rather than over it).
class FrontCpuAllocator final : public compat::CpuAllocatorBase {
 public:
  explicit FrontCpuAllocator(c10::Allocator* backend) : backend_(backend) {}

  c10::DataPtr allocate_impl(size_t n) const override {
    if (g_untouched_depth == 0 || n == 0) return backend_.load()->allocate(n);
    const size_t size = round_to_page(n);
    void* ptr = ::mmap(nullptr, size, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(ptr != MAP_FAILED, "accelerate: cannot reserve ", size,
                " bytes of address space for an empty weight");
    {
      std::lock_guard<std::mutex> lock(mutex_);
      mapped_[ptr] = size;
    }
    return {ptr, ptr, &release, c10::Device(c10::kCPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  static void release(void* ptr);

  void give_back(void* ptr) {
    size_t size = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = mapped_.find(ptr);
      if (it != mapped_.end()) {
        size = it->second;
        mapped_.erase(it);
      }
    }
    if (size > 0) {
      ::munmap(ptr, size);
      return;
    }
    c10::DeleterFnPtr deleter = backend_.load()->raw_deleter();
    TORCH_INTERNAL_ASSERT(deleter != nullptr,
                          "accelerate: CPU allocator: freeing a block it does not know");
    deleter(ptr);
  }

  bool owns(const void* ptr) const {
    std::lock_guard<std::mutex> lock(mutex_);
    return mapped_.count(const_cast<void*>(ptr)) > 0;
  }

  void set_backend(c10::Allocator* backend) { backend_.store(backend); }

 private:
  std::atomic<c10::Allocator*> backend_;
  mutable std::mutex mutex_;
  mutable std::unordered_map<void*, size_t> mapped_;
};

FrontCpuAllocator* g_front = nullptr;  // never destroyed, as g_allocator

void FrontCpuAllocator::release(void* ptr) {
  if (ptr != nullptr) g_front->give_back(ptr);
}

void CachingCpuAllocator::release(void* ptr) {
  if (ptr != nullptr) g_allocator->give_back(ptr);
}

}  // namespace

int64_t cpu_cache_budget(const EnvMap& env) {
  const auto mb = env_int(env, "ACCELERATE_CPU_CACHE_MB");
  if (!mb) return kDefaultCpuCacheBytes;
  TORCH_CHECK(*mb >= 0 && *mb <= (int64_t{1} << 20),
              "accelerate: ACCELERATE_CPU_CACHE_MB must be a number of MiB in [0, 1048576], got ",
              *mb);
  return static_cast<int64_t>(*mb) * 1024 * 1024;
}

std::string install_cpu_caching_allocator(const EnvMap& env) {
  std::lock_guard<std::mutex> lock(g_install_mutex);
  if (!g_installed_as.empty()) return g_installed_as;
  const int64_t budget = cpu_cache_budget(env);
  if (budget == 0) {
    g_installed_as = "off (ACCELERATE_CPU_CACHE_MB=0)";
    return g_installed_as;
  }
  g_allocator = new CachingCpuAllocator(c10::GetDefaultCPUAllocator(), budget);
  if (g_front != nullptr) {
    g_front->set_backend(g_allocator);
  } else {
    // Above the default registrations (priority 0), so that it wins; a user's own allocator
    // registered with a higher priority still wins over it.
    c10::SetCPUAllocator(g_allocator, /*priority=*/1);
  }
  g_installed_as = "keeps freed blocks of " + std::to_string(kMinCachedBytes / 1024) +
                   " KiB and more, up to " + std::to_string(budget >> 20) + " MiB";
  return g_installed_as;
}

CpuCacheStats cpu_cache_stats() {
  std::lock_guard<std::mutex> lock(g_install_mutex);
  if (g_allocator == nullptr) return {};
  return g_allocator->stats();
}

void empty_cpu_cache() {
  std::lock_guard<std::mutex> lock(g_install_mutex);
  if (g_allocator != nullptr) g_allocator->empty();
}

UntouchedPagesScope::UntouchedPagesScope() {
  {
    std::lock_guard<std::mutex> lock(g_install_mutex);
    if (g_front == nullptr) {
      g_front = new FrontCpuAllocator(c10::GetCPUAllocator());
      c10::SetCPUAllocator(g_front, /*priority=*/1);
    }
    TORCH_CHECK(c10::GetCPUAllocator() == g_front,
                "accelerate: init_empty_weights: a CPU allocator registered with a higher "
                "priority replaces accelerate's, so weights cannot be created without memory");
  }
  ++g_untouched_depth;
}

UntouchedPagesScope::~UntouchedPagesScope() {
  --g_untouched_depth;
}

bool is_untouched_allocation(const at::Tensor& t) {
  if (!t.defined() || !t.has_storage() || g_front == nullptr) return false;
  const auto& data = t.storage().data_ptr();
  return data.get_deleter() == &FrontCpuAllocator::release && g_front->owns(data.get());
}

}  // namespace accelerate::detail
