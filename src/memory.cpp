#include "accelerate/memory.h"

#include "accelerate/detail/collectives.h"
#include "accelerate/detail/cpu_allocator.h"

#include <dlfcn.h>
#include <torch/cuda.h>

#include <algorithm>
#include <cstdio>
#include <new>
#include <set>
#include <sstream>
#include <string_view>

namespace accelerate {

// ---------------------------------------------------------------------- freeing memory

void clear_device_cache() {
  // The CPU's counterpart of CUDA's cache: blocks the caching allocator keeps for reuse.
  detail::empty_cpu_cache();
  if (!torch::cuda::is_available()) return;
  // The caching allocator lives in libc10_cuda, which a CPU build of LibTorch (the one we build
  // against) lacks, so linking to it would tie the library to CUDA builds. When CUDA is
  // available that library is loaded, and the function is found by its (stable) symbol.
  using EmptyCache = void (*)();
  static const auto empty_cache = reinterpret_cast<EmptyCache>(
      ::dlsym(RTLD_DEFAULT, "_ZN3c104cuda20CUDACachingAllocator10emptyCacheEv"));
  if (empty_cache != nullptr) empty_cache();
}

// ---------------------------------------------------------------------- batch size search

namespace {

// Accelerate's list, plus the CPU allocator's other wording ("not enough memory", used where
// the allocation itself reports no error code).
constexpr std::string_view kOutOfMemoryMessages[] = {
    " out of memory.",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED.",
    "DefaultCPUAllocator: can't allocate memory",
    "DefaultCPUAllocator: not enough memory",
};

std::string message_of(const std::exception& e) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) {
    return c10_error->what_without_backtrace();
  }
  return e.what();
}

}  // namespace

bool should_reduce_batch_size(const std::exception& error) {
  if (dynamic_cast<const c10::OutOfMemoryError*>(&error) != nullptr) return true;
  if (dynamic_cast<const std::bad_alloc*>(&error) != nullptr) return true;
  const std::string message = message_of(error);
  return std::any_of(std::begin(kOutOfMemoryMessages), std::end(kOutOfMemoryMessages),
                     [&](std::string_view m) { return message.find(m) != std::string::npos; });
}

bool should_reduce_batch_size(const std::exception_ptr& error) {
  if (!error) return false;
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    return should_reduce_batch_size(e);
  } catch (...) {
    return false;
  }
}

namespace detail {

void check_batch_size(int64_t batch_size) {
  TORCH_CHECK(batch_size != 0,
              "find_executable_batch_size: no executable batch size found, reached zero");
  TORCH_CHECK(batch_size > 0, "find_executable_batch_size: the batch size must be positive, got ",
              batch_size);
}

int64_t next_batch_size(const FindBatchSizeOptions& options, int64_t batch_size) {
  if (!options.reduce_batch_size_fn) {
    // Python's int(batch_size * 0.9): the same double arithmetic gives the same sizes.
    return static_cast<int64_t>(static_cast<double>(batch_size) * 0.9);
  }
  const int64_t next = options.reduce_batch_size_fn(batch_size);
  // A rule that does not shrink would retry the same failing size for ever.
  TORCH_CHECK(next >= 0 && next < batch_size,
              "find_executable_batch_size: reduce_batch_size_fn must return a smaller, "
              "non-negative batch size, but turned ",
              batch_size, " into ", next);
  return next;
}

bool agree_on_attempt(const PartialState& state, int64_t batch_size,
                      const std::exception_ptr& error) {
  enum Outcome : int64_t { kOk = 0, kOutOfMemory = 1, kOtherError = 2 };
  const int64_t mine = !error ? kOk : should_reduce_batch_size(error) ? kOutOfMemory : kOtherError;
  if (mine == kOtherError) {
    // Tell the others before leaving, so that they stop too instead of waiting for us.
    if (state.use_distributed()) {
      detail::all_gather(state, "find_executable_batch_size", at::full({1}, mine, at::kLong));
    }
    std::rethrow_exception(error);
  }
  if (!state.use_distributed()) {
    if (mine == kOk) return true;
    clear_device_cache();
    return false;
  }
  const auto outcomes =
      detail::all_gather(state, "find_executable_batch_size", at::full({1}, mine, at::kLong));
  std::vector<int> failed_otherwise;
  bool any_out_of_memory = false;
  for (size_t rank = 0; rank < outcomes.size(); ++rank) {
    const int64_t outcome = outcomes[rank].item<int64_t>();
    if (outcome == kOtherError) failed_otherwise.push_back(static_cast<int>(rank));
    any_out_of_memory = any_out_of_memory || outcome == kOutOfMemory;
  }
  if (!failed_otherwise.empty()) {
    std::ostringstream ranks;
    for (size_t i = 0; i < failed_otherwise.size(); ++i)
      ranks << (i ? ", " : "") << failed_otherwise[i];
    TORCH_CHECK(false, "find_executable_batch_size: process ", ranks.str(),
                " failed at batch size ", batch_size,
                " with an error that is not out-of-memory (see its output); stopping process ",
                state.process_index(), " too");
  }
  if (!any_out_of_memory) return true;
  clear_device_cache();
  return false;
}

}  // namespace detail

// ---------------------------------------------------------------------- model sizes

namespace {

bool keeps_its_size(at::ScalarType type) {
  // Loading a model in another dtype converts floating-point tensors only.
  return at::isIntegralType(type, /*includeBool=*/true);
}

// Accelerate counts a bool as 1/8 byte (dtype_byte_size); bits keep that exact per tensor.
int64_t element_bits(at::ScalarType type) {
  return type == at::kBool ? 1 : 8 * static_cast<int64_t>(c10::elementSize(type));
}

}  // namespace

std::map<std::string, int64_t> compute_module_sizes(const torch::nn::Module& module,
                                                    const ModuleSizeOptions& options) {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  std::set<const c10::TensorImpl*> seen;
  auto add = [&](const std::string& name, const at::Tensor& t) {
    // A tied weight appears under several names; like Python's named_parameters we count it once,
    // under the first.
    if (!t.defined() || !seen.insert(t.unsafeGetTensorImpl()).second) return;
    tensors.emplace_back(name, t);
  };
  if (!options.buffers_only) {
    for (const auto& p : module.named_parameters(/*recurse=*/true)) add(p.key(), p.value());
  }
  for (const auto& b : module.named_buffers(/*recurse=*/true)) add(b.key(), b.value());

  std::map<std::string, int64_t> sizes;
  for (const auto& [name, tensor] : tensors) {
    const at::ScalarType own = tensor.scalar_type();
    int64_t bits = element_bits(own);
    if (auto special = options.special_dtypes.find(name); special != options.special_dtypes.end()) {
      bits = element_bits(special->second);
    } else if (options.dtype && !keeps_its_size(own)) {
      bits = std::min(bits, element_bits(*options.dtype));
    }
    const int64_t size = (tensor.numel() * bits + 7) / 8;
    // Every prefix of the dotted name, from "" (the whole model) to the tensor itself.
    sizes[""] += size;
    for (size_t dot = name.find('.'); dot != std::string::npos; dot = name.find('.', dot + 1)) {
      sizes[name.substr(0, dot)] += size;
    }
    sizes[name] += size;
  }
  return sizes;
}

MaximumSizes calculate_maximum_sizes(const torch::nn::Module& module) {
  const auto sizes = compute_module_sizes(module);
  auto size_of = [&](const std::string& name) {
    auto it = sizes.find(name);
    return it == sizes.end() ? int64_t{0} : it->second;
  };
  MaximumSizes result;
  result.total_size = size_of("");

  // Accelerate's get_max_layer_size, depth first in the same order: the model's own parameters,
  // then its children, then its own buffers. A tensor is a layer, and so is a module without
  // children; a module with children is replaced by them.
  struct Item {
    std::string name;
    std::shared_ptr<torch::nn::Module> module;  // null for a tensor
  };
  std::vector<Item> stack;  // the next item to treat is at the back
  std::vector<Item> top;
  for (const auto& p : module.named_parameters(/*recurse=*/false))
    top.push_back({p.key(), nullptr});
  for (const auto& c : module.named_children()) top.push_back({c.key(), c.value()});
  for (const auto& b : module.named_buffers(/*recurse=*/false)) top.push_back({b.key(), nullptr});
  stack.assign(top.rbegin(), top.rend());
  while (!stack.empty()) {
    Item item = std::move(stack.back());
    stack.pop_back();
    const auto children =
        item.module ? item.module->named_children()
                    : torch::OrderedDict<std::string, std::shared_ptr<torch::nn::Module>>();
    if (children.is_empty()) {
      const int64_t size = size_of(item.name);
      if (size > result.largest_layer_size) {
        result.largest_layer_size = size;
        result.largest_layer_names = {item.name};
      } else if (size == result.largest_layer_size) {
        result.largest_layer_names.push_back(item.name);
      }
      continue;
    }
    for (auto it = children.items().rbegin(); it != children.items().rend(); ++it) {
      stack.push_back({item.name + "." + it->key(), it->value()});
    }
  }
  return result;
}

std::string convert_bytes(int64_t bytes) {
  // Python's `f"{round(size, 2)} {unit}"`: an int below 1024 prints as an int, a float as its
  // shortest form with at least one decimal ("1.0", "1.27").
  if (bytes < 1024) return std::to_string(bytes) + " bytes";
  static constexpr const char* kUnits[] = {"KB", "MB", "GB", "TB"};
  double size = static_cast<double>(bytes) / 1024.0;
  const char* unit = "PB";
  for (const char* u : kUnits) {
    if (size < 1024.0) {
      unit = u;
      break;
    }
    size /= 1024.0;
  }
  char buf[64];
  int length = std::snprintf(buf, sizeof(buf), "%.2f", size);
  // "%.2f" always leaves two decimals: drop a trailing zero from the second, and the first.
  for (int i = 0; i < 2 && buf[length - 1] == '0' && buf[length - 2] != '.'; ++i) --length;
  std::snprintf(buf + length, sizeof(buf) - static_cast<size_t>(length), " %s", unit);
  return buf;
}

}  // namespace accelerate
