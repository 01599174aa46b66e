#pragma once
/// \file
/// Data-parallel gradient averaging for a plain `torch::nn::Module`: what PyTorch's
/// `DistributedDataParallel` does, without wrapping the module's forward.
///
/// A GradientSynchronizer makes every replica start from process 0's parameters and buffers, then
/// hooks each trainable parameter's gradient accumulator. During `loss.backward()` each gradient
/// is divided by the number of processes into its bucket as autograd produces it (buckets follow
/// DDP's rule, in reverse registration order, the order gradients tend to become ready), and
/// becomes a view of that bucket; each bucket is all-reduced asynchronously as soon as it is
/// complete, so communication overlaps the rest of the backward pass. Buckets of at most 64 KiB
/// (and a last bucket of at most 1 MiB, with few processes) cost a round trip rather than
/// bandwidth: on Gloo they are summed when backward's computation ends, on the calling thread,
/// through Gloo's own API. When backward ends every `.grad` holds the average over processes.
/// A communication hook (comm_hooks.h) may replace the plain average.
///
/// Example:
/// \code
///   auto model = std::make_shared<Net>();
///   accelerate::GradientSynchronizer sync(model, state, {.bucket_cap_mb = 25});
///   for (auto& batch : loader) {
///     optimizer.zero_grad();
///     model->forward(batch.data).backward();   // grads are averaged when this returns
///     optimizer.step();
///   }
/// \endcode

#include <accelerate/comm_hooks.h>
#include <accelerate/state.h>

#include <torch/nn/module.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace accelerate {

/// Options of the data-parallel wrapper, with Accelerate's (and PyTorch DDP's) names and
/// defaults.
///
/// Example:
/// \code
///   accelerate::DistributedDataParallelKwargs kwargs{.bucket_cap_mb = 50,
///                                                     .find_unused_parameters = true};
/// \endcode
struct DistributedDataParallelKwargs {
  /// Bucket size, in MiB, by DDP's rule: a bucket is sent once the parameter that brings it to
  /// this size is in it (that parameter included). The first bucket of each dtype is capped at
  /// min(1 MiB, this) so that the first all-reduce starts early in backward.
  double bucket_cap_mb = 25;
  /// Allow parameters that get no gradient in a backward pass (on some or all processes). Such a
  /// parameter contributes its current `.grad` (what no_sync steps accumulated) or zeros, so the
  /// result is the sum over the processes that used it divided by the number of processes; if no
  /// process used it since the last synchronization, its `.grad` is left as it was (often
  /// undefined), as in PyTorch. Without this flag such a parameter is an error, raised on every
  /// process at the end of backward. Cost: a bucket holding an unused parameter, and every bucket
  /// after it, is sent at the end of backward instead of overlapping it.
  bool find_unused_parameters = false;
  /// Whether the Accelerator should call broadcast_buffers() before each forward pass. The
  /// synchronizer only provides broadcast_buffers(); it does not call it by itself.
  bool broadcast_buffers = true;
  /// In both settings each `.grad` becomes a view of its bucket as soon as autograd produced
  /// it: the fresh gradient is freed during backward, it is divided by the number of processes
  /// while it is copied in (one pass over the gradients per step), and nothing is copied back
  /// after the all-reduce. Parameters whose bucket has another dtype or device (16-bit ones on
  /// Gloo, whose buckets are float32) get copies as usual. This flag decides what happens to a
  /// gradient someone kept from an earlier step (a tensor that still refers to the bucket after
  /// zero_grad() or across steps), as in DDP: false (the default) leaves it unchanged (the
  /// bucket moves to new memory that step); true lets the next synchronization overwrite it, and
  /// a parameter no process used then still has its `.grad` averaged.
  bool gradient_as_bucket_view = false;
  /// Accepted for compatibility and ignored: it is an optimization hint in PyTorch and has no
  /// effect on results here.
  bool static_graph = false;
  /// Accelerate's `comm_hook`: a built-in communication hook in place of the plain average
  /// (comm_hooks.h): NO, FP16, BF16, POWER_SGD or BATCHED_POWER_SGD.
  DDPCommunicationHookType comm_hook = DDPCommunicationHookType::NO;
  /// Accelerate's `comm_wrapper`: NO, FP16 or BF16, running comm_hook on a 16-bit copy.
  DDPCommunicationHookType comm_wrapper = DDPCommunicationHookType::NO;
  /// Accelerate's `comm_state_option`: the PowerSGD hooks' settings.
  PowerSGDOptions comm_state_option;
  /// A hook of your own (PyTorch's `register_comm_hook`); give it or comm_hook, not both.
  CommHook comm_hook_fn;
};

/// Where the time of synchronized backward passes went, summed since construction (or the last
/// reset_stats()). Communication runs from each bucket's launch to its completion; the part of
/// it before backward's computation ended was hidden behind that computation.
///
/// Example:
/// \code
///   auto s = sync.stats();
///   std::cout << "hidden: " << s.hidden_seconds / s.communication_seconds << "\n";
/// \endcode
struct SyncStats {
  /// Synchronized backward passes.
  int64_t synchronized_steps = 0;
  /// Time some bucket was being communicated (the union of [launch, completion] per step).
  double communication_seconds = 0;
  /// The part of communication_seconds before the backward computation ended.
  double hidden_seconds = 0;
  /// From the end of the backward computation to the gradients being averaged: what the
  /// synchronization added to the step.
  double exposed_seconds = 0;
};

/// Where one bucket's gradients sit, for the ZeRO engine (zero.h). With gradient sharding,
/// process r owns elements [r * shard_numel, min(numel, (r + 1) * shard_numel)) of the bucket.
struct GradientBucketLayout {
  c10::ScalarType dtype = at::kFloat;
  int64_t numel = 0;
  int64_t shard_numel = 0;
  /// Indices into GradientSynchronizer::parameters(), and each one's first element in the bucket.
  std::vector<size_t> params;
  std::vector<int64_t> offsets;
};

struct FullyShardedOptions;  // fsdp.h

namespace detail {
struct SyncCore;
struct FullShardCore;
}  // namespace detail

class GradientSynchronizer;

/// Guard returned by GradientSynchronizer::no_sync(): gradients accumulate locally while it
/// lives; the previous setting comes back when it is destroyed, also by an exception. It is
/// harmless if the synchronizer is destroyed first.
///
/// Example:
/// \code
///   for (int micro = 0; micro < 3; ++micro) {
///     auto local = sync.no_sync();
///     model->forward(batches[micro]).sum().backward();   // accumulates locally
///   }
///   model->forward(batches[3]).sum().backward();         // averages all four
/// \endcode
class [[nodiscard]] NoSyncGuard {
 public:
  NoSyncGuard(const NoSyncGuard&) = delete;
  NoSyncGuard& operator=(const NoSyncGuard&) = delete;
  NoSyncGuard(NoSyncGuard&& other) noexcept;
  NoSyncGuard& operator=(NoSyncGuard&&) = delete;
  ~NoSyncGuard();

 private:
  friend class GradientSynchronizer;
  NoSyncGuard(std::weak_ptr<detail::SyncCore> core, bool previous);
  std::weak_ptr<detail::SyncCore> core_;
  bool previous_;
};

/// Averages the gradients of `module`'s trainable parameters over all processes during backward,
/// the way PyTorch's `DistributedDataParallel` does.
///
/// Contract, as with DDP: every process runs the same model, and every process runs a backward
/// pass that reaches at least one trainable parameter whenever one does (each all-reduce needs
/// all of them; a process whose backward reaches no parameter never joins and the others fail
/// after the state's timeout). `torch::autograd::grad()` does not accumulate `.grad` and is not
/// synchronized. Create the synchronizer after moving the model to its device and dtype.
///
///  - Construction broadcasts all parameters and buffers from process 0 (a few flat byte
///    buffers, not one message per tensor) after checking, with one small all_gather, that every
///    process has the same parameters and buffers; a mismatch is an error on every process
///    naming the first difference.
///  - Gradients are averaged when backward returns (an autograd-engine callback calls
///    finalize()). Errors of the all-reduce name the operation "backward (gradient all-reduce)".
///  - With find_unused_parameters=false, a parameter that got no gradient on some process makes
///    backward throw on every process, naming it; the gradients of that step are then not
///    averaged (with gradient_as_bucket_view they are unspecified). No process hangs: the end of
///    backward always sends every bucket, and per-parameter flags travelling inside the buckets
///    tell every process the same thing, at no extra collective.
///  - A backward pass that fails (an exception in some backward function) drops that step's
///    synchronization; the next backward starts clean.
///  - With one process, nothing is hooked and everything is a no-op.
///  - Destroying the synchronizer removes its hooks; later backward passes are purely local.
///    Do not destroy it while a backward pass is running.
///
/// Example:
/// \code
///   accelerate::GradientSynchronizer sync(model, state);
///   {
///     auto local = sync.no_sync();           // gradient accumulation: no communication
///     model->forward(x0).sum().backward();
///   }
///   model->forward(x1).sum().backward();     // averages the accumulated gradients
/// \endcode
class GradientSynchronizer {
 public:
  GradientSynchronizer(std::shared_ptr<torch::nn::Module> module,
                       std::shared_ptr<PartialState> state,
                       DistributedDataParallelKwargs kwargs = {});
  /// Full parameter sharding (FSDP FULL_SHARD, ZeRO stage 3; fsdp.h): `module`'s trainable
  /// parameters are split into units by `options`' wrap policy and sharded; every process keeps
  /// 1/N of each unit. Then gradient_sharding_stage() is 3, each "bucket" of bucket_layout() is
  /// a unit, gradient_shard() its averaged gradient shard and parameter_shard() its parameter
  /// shard. Collective; restores the module's Sequential forward chains when destroyed.
  GradientSynchronizer(std::shared_ptr<torch::nn::Module> module,
                       std::shared_ptr<PartialState> state, const FullyShardedOptions& options);
  GradientSynchronizer(const GradientSynchronizer&) = delete;
  GradientSynchronizer& operator=(const GradientSynchronizer&) = delete;
  GradientSynchronizer(GradientSynchronizer&&) noexcept = default;
  GradientSynchronizer& operator=(GradientSynchronizer&&) = delete;
  ~GradientSynchronizer();

  /// Completes a pending synchronization: launches the remaining buckets, waits for them and
  /// writes the averages to `.grad`. backward() already does this when it ends; calling it again
  /// is a no-op, as is calling it with nothing pending.
  void finalize();

  /// When false, backward passes only accumulate `.grad` locally (gradient accumulation); the
  /// next backward with sync enabled averages the accumulated gradients.
  void set_require_sync(bool require_sync);
  bool require_sync() const;
  /// Disables synchronization until the returned guard is destroyed (Accelerate's `no_sync`).
  NoSyncGuard no_sync();

  /// Copies process 0's buffers (e.g. BatchNorm running statistics) to every process.
  void broadcast_buffers();

  const DistributedDataParallelKwargs& kwargs() const { return kwargs_; }
  /// True when hooks are installed, i.e. there is more than one process.
  bool active() const;

  /// Replaces the plain average by `hook` (see comm_hooks.h), as PyTorch's DDP
  /// `register_comm_hook`: once, before the first synchronized backward pass.
  void register_comm_hook(CommHook hook);

  /// Timings of the synchronized backward passes so far.
  SyncStats stats() const;
  void reset_stats();

  // ------------------------------------------------------------------ ZeRO (zero.h)
  /// Gradient sharding for ZeRO stage 1 or 2 (0 turns it off), before the first synchronized
  /// backward pass. Each bucket is then reduce-scattered instead of all-reduced (NCCL's
  /// reduce_scatter; an alltoall and a local sum on Gloo), so each process receives the average
  /// of its shard of the bucket only (gradient_shard()). Stage 1 keeps the full buckets, whose
  /// other parts then hold this process's own (divided) gradients; stage 2 drops them, and
  /// `.grad` of every parameter is undefined after a synchronized backward. no_sync steps
  /// accumulate full gradients in `.grad` as usual. Not combinable with communication hooks.
  void shard_gradients(int stage);
  int gradient_sharding_stage() const;
  /// The synchronized parameters (each tied tensor once), in the order bucket_layout() indexes.
  std::vector<at::Tensor> parameters() const;
  std::vector<GradientBucketLayout> bucket_layout() const;
  /// This process's averaged shard of `bucket` after the last synchronized backward (undefined
  /// before the first one, or after release_gradient_shards()).
  at::Tensor gradient_shard(size_t bucket) const;
  void release_gradient_shards();
  /// Whether no process used parameter `index` in the last synchronization
  /// (find_unused_parameters only; always false otherwise).
  bool parameter_unused(size_t index) const;
  /// Stage 3: this process's shard of unit `bucket`'s parameters, shard_numel long (the tail
  /// past the unit's end is padding): what the optimizer steps. Undefined below stage 3.
  at::Tensor parameter_shard(size_t bucket) const;
  /// Stage 3: the shards changed (an optimizer step or a load); units that stay whole are
  /// gathered again. Collective. A no-op below stage 3.
  void parameters_updated();
  /// Stage 3's engine (fsdp.h), or null.
  const std::shared_ptr<detail::FullShardCore>& full_shard() const { return full_; }

  // ------------------------------------------------------------------ introspection
  /// The names (from named_parameters()) of the parameters in each bucket, in launch order.
  std::vector<std::vector<std::string>> bucket_parameter_names() const;
  size_t num_buckets() const;
  /// All-reduces launched since construction (one per bucket per synchronized backward).
  int64_t num_allreduces_launched() const;

 private:
  DistributedDataParallelKwargs kwargs_;
  std::shared_ptr<detail::SyncCore> core_;
  std::shared_ptr<detail::FullShardCore> full_;
};

}  // namespace accelerate
