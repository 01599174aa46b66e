#pragma once
/// \file
/// Memory helpers (Accelerate's `utils.memory` and the sizing part of `utils.modeling`):
/// find_executable_batch_size retries a function with smaller batch sizes while it runs out of
/// memory, with every process agreeing on the size; release_memory and clear_device_cache give
/// memory back; compute_module_sizes and calculate_maximum_sizes say how large a model is.
///
/// Example:
/// \code
///   auto& state = accelerate::PartialState::shared();
///   double loss = accelerate::find_executable_batch_size(state, [&](int64_t batch_size) {
///     return train_one_epoch(model, batch_size);   // may throw out-of-memory errors
///   }, {.starting_batch_size = 256});
///
///   auto sizes = accelerate::calculate_maximum_sizes(*model);
///   std::cout << accelerate::convert_bytes(sizes.total_size) << "\n";   // "1.27 KB"
/// \endcode

#include <accelerate/state.h>

#include <ATen/ATen.h>
#include <c10/core/ScalarType.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace accelerate {

// ---------------------------------------------------------------------- freeing memory

/// Empties the CUDA caching allocator's cache when CUDA is in use (Accelerate's
/// `clear_device_cache`), and the blocks the CPU caching allocator keeps for reuse
/// (detail/cpu_allocator.h).
///
/// Example:
/// \code
///   accelerate::clear_device_cache();
/// \endcode
void clear_device_cache();

/// Drops the given tensors (each becomes undefined) and then clears the device cache: the C++ form
/// of Accelerate's `a, b = release_memory(a, b)`. Memory still held through other references to
/// the same storage is not freed.
///
/// Example:
/// \code
///   at::Tensor a = at::ones({1000, 1000}), b = at::ones({1000, 1000});
///   accelerate::release_memory(a, b);   // a and b are now undefined
/// \endcode
template <class... Tensors>
requires(std::is_same_v<Tensors, at::Tensor>&&...) void release_memory(Tensors&... tensors) {
  (tensors.reset(), ...);
  clear_device_cache();
}

// ---------------------------------------------------------------------- batch size search

/// Whether `error` means "out of memory", so that a smaller batch may fit (Accelerate's
/// `should_reduce_batch_size`): c10::OutOfMemoryError (CUDA), std::bad_alloc, and errors whose
/// message names a CUDA/HIP out-of-memory (" out of memory."), a failed LibTorch CPU allocation
/// ("DefaultCPUAllocator: can't allocate memory" / "DefaultCPUAllocator: not enough memory") or
/// cuDNN's CUDNN_STATUS_NOT_SUPPORTED.
///
/// Example:
/// \code
///   try { step(); } catch (const std::exception& e) {
///     if (!accelerate::should_reduce_batch_size(e)) throw;
///   }
/// \endcode
bool should_reduce_batch_size(const std::exception& error);
/// As above for a captured exception (false for null or for something not a std::exception).
bool should_reduce_batch_size(const std::exception_ptr& error);

/// How find_executable_batch_size searches.
///
/// Example:
/// \code
///   accelerate::FindBatchSizeOptions halve{.starting_batch_size = 512,
///                                          .reduce_batch_size_fn = [](int64_t b) { return b / 2;
///                                          }};
/// \endcode
struct FindBatchSizeOptions {
  /// The first size tried.
  int64_t starting_batch_size = 128;
  /// The size to try after `batch_size` failed; must be smaller and not negative. Unset:
  /// Accelerate's rule, `int(batch_size * 0.9)`.
  std::function<int64_t(int64_t)> reduce_batch_size_fn;
};

namespace detail {
/// One collective step of find_executable_batch_size: every process reports how its attempt at
/// `batch_size` ended (`error` null for success). Returns true when all succeeded, false when some
/// ran out of memory (and none failed otherwise). When any process failed with another error,
/// every process throws: that process its own error, the others an error naming it.
bool agree_on_attempt(const PartialState& state, int64_t batch_size,
                      const std::exception_ptr& error);
/// The next size after `batch_size` failed (options' rule, checked).
int64_t next_batch_size(const FindBatchSizeOptions& options, int64_t batch_size);
/// Throws the "reached zero" error when `batch_size` is 0, and rejects negative sizes.
void check_batch_size(int64_t batch_size);
}  // namespace detail

/// Calls `fn(batch_size)` starting from options.starting_batch_size, and while it fails with an
/// out-of-memory error (should_reduce_batch_size) clears the device cache and calls it again with
/// a smaller size (Accelerate's `find_executable_batch_size`, called at once rather than used as
/// a decorator). Returns what the successful call returned.
///
/// With several processes this is a collective: after each attempt the processes compare
/// outcomes, and if any ran out of memory they all retry at the same smaller size, so that all end
/// with the same batch size. A process whose attempt succeeded runs `fn` again in that case, so
/// `fn` must be safe to repeat. `fn` itself must not wait on the other processes after it may
/// have failed (a collective inside `fn` that one process never reaches waits until the state's
/// timeout). Reaching a size of zero is an error on every process ("no executable batch size
/// found, reached zero"); an error that is not out-of-memory stops every process.
///
/// Example:
/// \code
///   int64_t used = accelerate::find_executable_batch_size(state, [&](int64_t batch_size) {
///     auto loader = make_loader(batch_size);
///     train(loader);
///     return batch_size;
///   });
/// \endcode
template <class F>
auto find_executable_batch_size(const PartialState& state, F&& fn,
                                const FindBatchSizeOptions& options = {})
    -> std::invoke_result_t<F&, int64_t> {
  using R = std::invoke_result_t<F&, int64_t>;
  static_assert(!std::is_reference_v<R>,
                "find_executable_batch_size: fn must return by value (or nothing)");
  int64_t batch_size = options.starting_batch_size;
  clear_device_cache();
  for (;;) {
    detail::check_batch_size(batch_size);
    std::exception_ptr error;
    if constexpr (std::is_void_v<R>) {
      try {
        fn(batch_size);
      } catch (...) {
        error = std::current_exception();
      }
      if (detail::agree_on_attempt(state, batch_size, error)) return;
    } else {
      std::optional<R> result;
      try {
        result.emplace(fn(batch_size));
      } catch (...) {
        error = std::current_exception();
      }
      if (detail::agree_on_attempt(state, batch_size, error)) return std::move(*result);
    }
    batch_size = detail::next_batch_size(options, batch_size);
  }
}

/// find_executable_batch_size on the shared state.
template <class F>
auto find_executable_batch_size(F&& fn, const FindBatchSizeOptions& options = {})
    -> std::invoke_result_t<F&, int64_t> {
  return find_executable_batch_size(PartialState::shared(), std::forward<F>(fn), options);
}

// ---------------------------------------------------------------------- model sizes

/// How compute_module_sizes counts.
///
/// Example:
/// \code
///   auto sizes = accelerate::compute_module_sizes(*model, {.dtype = at::kHalf});
/// \endcode
struct ModuleSizeOptions {
  /// Count floating-point tensors as if stored in this type when it is smaller than theirs
  /// (integer and bool tensors keep their size), as loading the model in `dtype` would.
  std::optional<at::ScalarType> dtype;
  /// Per tensor name (e.g. "fc1.weight"), a type that overrides `dtype` for that tensor.
  std::map<std::string, at::ScalarType> special_dtypes;
  /// Count buffers only.
  bool buffers_only = false;
};

/// The size in bytes of every module and tensor of `module`, keyed by name prefix: "" is the
/// whole model, "fc1" a child, "fc1.weight" one tensor (Accelerate's `compute_module_sizes`).
/// Parameters and buffers are counted, each shared tensor once. A bool element counts as one bit,
/// as in Accelerate (rounded up to whole bytes per tensor). The device-map functions
/// (device_map.h) size models with it.
///
/// Example:
/// \code
///   torch::nn::Sequential net(torch::nn::Linear(10, 20), torch::nn::Linear(20, 5));
///   auto sizes = accelerate::compute_module_sizes(*net);
///   // sizes[""] == 1300, sizes["0"] == 880, sizes["0.weight"] == 800, sizes["1.bias"] == 20
/// \endcode
std::map<std::string, int64_t> compute_module_sizes(const torch::nn::Module& module,
                                                    const ModuleSizeOptions& options = {});

/// The whole model's size and its largest layer (calculate_maximum_sizes).
///
/// Example:
/// \code
///   auto s = accelerate::calculate_maximum_sizes(*model);
///   std::cout << accelerate::convert_bytes(s.largest_layer_size) << " in " <<
///   s.largest_layer_names[0];
/// \endcode
struct MaximumSizes {
  /// Bytes of every parameter and buffer.
  int64_t total_size = 0;
  /// Bytes of the largest layer (see calculate_maximum_sizes for what a layer is).
  int64_t largest_layer_size = 0;
  /// The names of the layers of that size, in module order.
  std::vector<std::string> largest_layer_names;
};

/// The total size of `module` and its largest layer (Accelerate's `calculate_maximum_sizes`):
/// layers are the module's own tensors and, going down through its children, every module with no
/// children of its own. (Tensors held directly by a module below the top that also has children
/// belong to no layer, as in Accelerate.)
///
/// Example:
/// \code
///   auto s = accelerate::calculate_maximum_sizes(*net);
///   // s.total_size == 1300, s.largest_layer_size == 880, s.largest_layer_names == {"0"}
/// \endcode
MaximumSizes calculate_maximum_sizes(const torch::nn::Module& module);

/// `bytes` in the largest unit that keeps the number under 1024, rounded to two decimals, as
/// Accelerate's `convert_bytes` prints it: "880 bytes", "1.27 KB", "1.0 MB".
///
/// Example:
/// \code
///   accelerate::convert_bytes(1300);   // "1.27 KB"
/// \endcode
std::string convert_bytes(int64_t bytes);

}  // namespace accelerate
