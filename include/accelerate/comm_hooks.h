#pragma once
/// \file
/// Communication hooks for data-parallel training (PyTorch DDP's `register_comm_hook`, and
/// Accelerate's `DistributedDataParallelKwargs(comm_hook=..., comm_wrapper=...,
/// comm_state_option=...)`): what replaces the averaging all-reduce of each gradient bucket.
///
/// A hook is called for each bucket as soon as its gradients are complete during backward, in
/// the same order on every process. It starts whatever communication it needs and returns a
/// continuation; the synchronizer calls the continuations at the end of backward, in the same
/// order, and when one returns, `bucket.buffer()` must hold the gradients averaged over the
/// processes. Built in: `fp16_compress_hook`, `bf16_compress_hook` (cast, average, cast back),
/// `powerSGD_hook` and `batched_powerSGD_hook` (Vogels et al., 2019: low-rank compression with
/// error feedback), and the wrappers `fp16_compress_wrapper` / `bf16_compress_wrapper` that run
/// another hook on a 16-bit copy of the bucket.
///
/// Example (a user-defined hook that averages in float16, like fp16_compress_hook):
/// \code
///   accelerate::CommHook half = [](accelerate::GradBucket& bucket) -> accelerate::CommHookFinish {
///     auto compressed = bucket.buffer().to(at::kHalf).div_(bucket.num_processes());
///     auto pending = bucket.all_reduce(compressed);   // starts now, overlaps backward
///     return [&bucket, compressed, pending]() mutable {
///       pending.wait();
///       bucket.buffer().copy_(compressed);
///     };
///   };
///   accelerate::DistributedDataParallelKwargs kwargs{.comm_hook_fn = half};
/// \endcode

#include <accelerate/state.h>

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace accelerate {

namespace detail {
class DirectWork;
}  // namespace detail

/// Accelerate's `DDPCommunicationHookType`: the built-in hooks by name ("no", "fp16", "bf16",
/// "power_sgd", "batched_power_sgd").
enum class DDPCommunicationHookType { NO, FP16, BF16, POWER_SGD, BATCHED_POWER_SGD };

/// The name Accelerate uses ("no", "fp16", ...).
std::string to_string(DDPCommunicationHookType type);
/// Parses Accelerate's names; anything else is an error listing them.
DDPCommunicationHookType comm_hook_type_from_string(const std::string& name);

/// A collective a hook started; wait() before reading its tensor.
///
/// Example:
/// \code
///   auto pending = bucket.all_reduce(t);
///   pending.wait();   // t now holds the sum over processes
/// \endcode
class PendingCollective {
 public:
  PendingCollective() = default;
  /// Blocks until the collective finished; errors name the operation and this process.
  void wait();

 private:
  friend class GradBucket;
  std::shared_ptr<const PartialState> state_;
  c10::intrusive_ptr<compat::Work> work_;
  std::shared_ptr<detail::DirectWork> direct_;
  // Set when the tensor travelled in another dtype (bfloat16 over a Gloo that cannot reduce it).
  at::Tensor target_;
  at::Tensor carrier_;
};

/// One bucket of gradients, as a hook sees it (PyTorch's `GradBucket`).
///
/// Example:
/// \code
///   for (auto& g : bucket.gradients()) std::cout << g.sizes() << "\n";   // views of buffer()
/// \endcode
class GradBucket {
 public:
  GradBucket(std::shared_ptr<const PartialState> state, size_t index, bool is_last,
             at::Tensor buffer, std::vector<at::Tensor> parameters, std::vector<std::string> names,
             std::vector<int64_t> offsets);

  /// The position of this bucket in launch order (0 is launched first).
  size_t index() const { return index_; }
  /// True for the bucket launched last in each backward pass.
  bool is_last() const { return is_last_; }
  /// This process's gradients, flat, not yet averaged. The hook leaves the average here.
  at::Tensor& buffer() { return buffer_; }
  const at::Tensor& buffer() const { return buffer_; }
  /// Views of buffer() shaped like the parameters, in bucket order.
  std::vector<at::Tensor> gradients() const;
  /// The parameters whose gradients the bucket holds, in bucket order.
  const std::vector<at::Tensor>& parameters() const { return parameters_; }
  /// Their names, from named_parameters().
  const std::vector<std::string>& names() const { return names_; }
  int num_processes() const { return state_->num_processes(); }
  const PartialState& state() const { return *state_; }

  /// Starts an all-reduce (sum) of `t` in place over all processes and returns at once (tiny
  /// tensors complete before it returns). `t` must be contiguous, on the state's communication
  /// device, and stay alive until waited for. bfloat16 is summed as bfloat16 where the backend
  /// can (NCCL, or this library's own Gloo path) and in float32 otherwise.
  PendingCollective all_reduce(const at::Tensor& t) const;

  /// The same bucket with another buffer (same number of elements), for wrappers that run a
  /// hook on a converted copy.
  GradBucket with_buffer(at::Tensor buffer) const;

 private:
  std::shared_ptr<const PartialState> state_;
  size_t index_;
  bool is_last_;
  at::Tensor buffer_;
  std::vector<at::Tensor> parameters_;
  std::vector<std::string> names_;
  std::vector<int64_t> offsets_;
};

/// Completes a hook's communication: when it returns, the bucket's buffer holds the average.
using CommHookFinish = std::function<void()>;
/// A communication hook: starts averaging `bucket` and returns what completes it. The bucket
/// object lives until the finish function has run.
using CommHook = std::function<CommHookFinish(GradBucket& bucket)>;

/// The plain average: divide, all-reduce, done (what runs without a hook).
CommHook allreduce_hook();
/// Casts the bucket to float16, averages, casts back (PyTorch's `fp16_compress_hook`).
CommHook fp16_compress_hook();
/// Casts the bucket to bfloat16, averages, casts back (PyTorch's `bf16_compress_hook`).
CommHook bf16_compress_hook();
/// Runs `hook` on a float16 copy of the bucket and casts its result back.
CommHook fp16_compress_wrapper(CommHook hook);
/// Runs `hook` on a bfloat16 copy of the bucket and casts its result back.
CommHook bf16_compress_wrapper(CommHook hook);

/// PowerSGD's settings, with the names and defaults of PyTorch's `PowerSGDState` (Accelerate
/// passes its `comm_state_option` dict to it).
///
/// Example:
/// \code
///   accelerate::PowerSGDOptions opts{.matrix_approximation_rank = 2, .start_powerSGD_iter = 10};
/// \endcode
struct PowerSGDOptions {
  /// Rank r of the approximation: a n x m gradient travels as n x r and m x r matrices.
  int64_t matrix_approximation_rank = 1;
  /// Plain averaging for this many synchronized steps first (PowerSGD needs a warm model).
  int64_t start_powerSGD_iter = 1000;
  /// A matrix is compressed only when (n + m) r * min_compression_rate < n m.
  double min_compression_rate = 2;
  /// Add the previous step's compression error back before compressing (error feedback).
  bool use_error_feedback = true;
  /// Reuse the previous step's Q as the starting point (one power iteration per step).
  bool warm_start = true;
  /// Added to the norms when orthogonalizing, against division by zero (0: none).
  double orthogonalization_epsilon = 0;
  /// Seeds the random initial Q, the same on every process.
  uint64_t random_seed = 0;
  /// How often (in steps) the compression statistics are logged.
  int64_t compression_stats_logging_frequency = 10000;
  /// Compress matrices of the same shape together in one batched product.
  bool batch_tensors_with_same_shape = false;
};

/// What PowerSGD keeps between steps: error feedback, the P and Q matrices of each bucket, the
/// step counter and the compression statistics (PyTorch's `PowerSGDState`).
///
/// Example:
/// \code
///   auto state = std::make_shared<accelerate::PowerSGDState>(
///       accelerate::PowerSGDOptions{.start_powerSGD_iter = 10});
///   sync.register_comm_hook(accelerate::powerSGD_hook(state));
///   // ... after training:
///   std::cout << state->compression_rate() << "\n";
/// \endcode
class PowerSGDState {
 public:
  explicit PowerSGDState(PowerSGDOptions options = {});
  const PowerSGDOptions& options() const { return options_; }
  /// Synchronized steps seen so far (advanced after the last bucket of each step).
  int64_t iteration() const { return iter_; }
  /// Elements before / after compression over all compressed steps, and their ratio (0 before
  /// any compression).
  int64_t numel_before_compression() const { return numel_before_; }
  int64_t numel_after_compression() const { return numel_after_; }
  double compression_rate() const;

 private:
  friend struct PowerSGDAccess;
  PowerSGDOptions options_;
  std::mt19937_64 rng_;
  std::map<size_t, at::Tensor> error_;
  std::map<size_t, at::Tensor> p_memory_;
  std::map<size_t, at::Tensor> q_memory_;
  int64_t iter_ = 0;
  int64_t numel_before_ = 0;
  int64_t numel_after_ = 0;
  int64_t next_stats_report_ = 0;
};

/// PowerSGD over each matrix-shaped gradient of the bucket (vectors are averaged exactly).
CommHook powerSGD_hook(std::shared_ptr<PowerSGDState> state);
/// PowerSGD over the whole bucket viewed as one square matrix (cheaper, coarser).
CommHook batched_powerSGD_hook(std::shared_ptr<PowerSGDState> state);

/// The hook Accelerate's `DistributedDataParallelKwargs` describes: `hook` (NO gives an empty
/// CommHook, meaning the built-in averaging), optionally wrapped by `wrapper` (NO, FP16 or BF16),
/// with `options` for the PowerSGD hooks.
CommHook make_comm_hook(DDPCommunicationHookType hook, DDPCommunicationHookType wrapper,
                        const PowerSGDOptions& options);

}  // namespace accelerate
