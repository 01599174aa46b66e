#pragma once
/// \file
/// Full parameter sharding: FSDP's FULL_SHARD and DeepSpeed's ZeRO stage 3.
///
/// Each process keeps 1/N of every *unit*'s parameters (its shard, in the parameters' own dtype:
/// the master weights the optimizer steps) and materialises a unit's full parameters only while
/// the unit runs forward or backward. A unit is a submodule chosen by the wrap policy (or marked
/// with fsdp::wrap); parameters outside every unit, and parameters shared between units (tied
/// weights), form the *root unit*, which stays whole (its gradients and optimizer state are still
/// sharded).
///
/// LibTorch cannot hook a module's forward, so a unit is entered through its holder:
///  - children of a `torch::nn::Sequential` need nothing: preparing the model installs holders in
///    the Sequential's forward chain (its registered children, names and state dict are
///    unchanged);
///  - any other unit (children of a `ModuleList` / `ModuleDict`, members) is called with
///    `accelerate::fsdp::call<Block>(module, args...)` instead of `module->as<Block>()->forward(
///    args...)`. Without sharding fsdp::call is the plain call, so the model code is the same.
///
/// A unit that was never called through its holder stays whole (safe, no memory saved), and a
/// warning names it after the first optimizer step. A unit called through its holder holds no
/// memory for its parameters between calls: reading them then (outside fsdp::call, without
/// summon_full_params) reads freed memory, as with PyTorch's FSDP.
///
/// Example:
/// \code
///   struct NetImpl : torch::nn::Module {
///     NetImpl() {
///       for (int i = 0; i < 4; ++i) blocks->push_back(torch::nn::Linear(64, 64));
///       register_module("blocks", blocks);
///     }
///     at::Tensor forward(at::Tensor x) {
///       for (const auto& block : *blocks) x = accelerate::fsdp::call<torch::nn::LinearImpl>(block,
///       x); return x;
///     }
///     torch::nn::ModuleList blocks;
///   };
/// \endcode

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace accelerate {

/// When the next unit's parameters are gathered during backward (PyTorch FSDP's names).
enum class BackwardPrefetch { BACKWARD_PRE, BACKWARD_POST, NO_PREFETCH };
std::string to_string(BackwardPrefetch prefetch);
/// "BACKWARD_PRE", "BACKWARD_POST" or "NO_PREFETCH"; anything else is an error listing them.
BackwardPrefetch backward_prefetch_from_string(const std::string& text);

/// FSDP's MixedPrecision: unset fields keep the parameters' own dtype.
///
/// Example:
/// \code
///   accelerate::MixedPrecisionPolicy bf16{at::kBFloat16, at::kBFloat16, at::kBFloat16};
/// \endcode
struct MixedPrecisionPolicy {
  /// Dtype of the gathered (full) parameters, hence of the forward and backward computation and
  /// of the all-gathers. Floating-point inputs of a unit are cast to it.
  std::optional<at::ScalarType> param_dtype;
  /// Dtype in which gradients are reduce-scattered (summed in float32 on Gloo).
  std::optional<at::ScalarType> reduce_dtype;
  /// Dtype the module's floating-point buffers are cast to.
  std::optional<at::ScalarType> buffer_dtype;
};

/// Settings of full parameter sharding (from FullyShardedDataParallelPlugin / DeepSpeedPlugin).
///
/// Example:
/// \code
///   accelerate::FullyShardedOptions options{.auto_wrap_policy = "TRANSFORMER_BASED_WRAP",
///                                           .transformer_layer_cls_to_wrap = {"Block"}};
/// \endcode
struct FullyShardedOptions {
  /// "SIZE_BASED_WRAP": a submodule becomes a unit when the parameters in its subtree that are
  /// not already in a unit number at least min_num_params (children first, as FSDP's
  /// size_based_auto_wrap_policy); "TRANSFORMER_BASED_WRAP": submodules whose type name is in
  /// transformer_layer_cls_to_wrap; "NO_WRAP": only modules marked with fsdp::wrap.
  std::string auto_wrap_policy = "SIZE_BASED_WRAP";
  int64_t min_num_params = 100000000;
  /// Type names as Module::name() gives them; "Block" matches "BlockImpl" and "ns::BlockImpl".
  std::vector<std::string> transformer_layer_cls_to_wrap;
  BackwardPrefetch backward_prefetch = BackwardPrefetch::BACKWARD_PRE;
  /// Gather the next unit (in the order of the first forward) when a unit starts its forward.
  bool forward_prefetch = false;
  /// At most one prefetched unit at a time (FSDP's rate limiter); false: no limit.
  bool limit_all_gathers = true;
  /// FULL_SHARD frees a unit's full parameters after its forward (true); false keeps them until
  /// its backward ends.
  bool reshard_after_forward = true;
  MixedPrecisionPolicy mixed_precision;
  /// Keep the shards (and the optimizer's state) in pinned CPU memory when the model is on a
  /// GPU; on a CPU-only run there is nothing to move.
  bool cpu_offload = false;
  /// Start from process 0's parameters and buffers (broadcast before sharding).
  bool sync_module_states = true;
};

class GradientSynchronizer;

namespace detail {
struct FullShardCore;
struct DispatchHooks;

/// What fsdp::call does around the forward of a unit of a fully sharded model (gather, hook
/// for backward, reshard) or of a dispatched model (big_modeling.h: inputs to the unit's
/// execution device, offloaded weights streamed in and out); inactive for any other module.
class UnitScope {
 public:
  explicit UnitScope(const torch::nn::Module* module);
  UnitScope(const UnitScope&) = delete;
  UnitScope& operator=(const UnitScope&) = delete;
  ~UnitScope();
  bool active() const { return core_ != nullptr || dispatch_ != nullptr; }
  /// A floating-point input, cast to the unit's parameter dtype.
  at::Tensor input(const at::Tensor& t) const;
  /// Outputs, routed through the unit's pre-backward function.
  std::vector<at::Tensor> outputs(const std::vector<at::Tensor>& ts);
  /// The forward ended: `hooked` says whether backward will pass through outputs().
  void finish(bool hooked);

 private:
  std::shared_ptr<FullShardCore> core_;
  std::shared_ptr<DispatchHooks> dispatch_;
  size_t unit_ = 0;
  bool finished_ = false;
};

template <class T>
decltype(auto) unit_input(const UnitScope& scope, T&& value) {
  if constexpr (std::is_same_v<std::decay_t<T>, at::Tensor>) {
    return scope.input(value);
  } else {
    return std::forward<T>(value);
  }
}

template <class R>
R unit_output(UnitScope& scope, R&& result) {
  using D = std::decay_t<R>;
  if constexpr (std::is_same_v<D, at::Tensor>) {
    auto out = scope.outputs({result});
    scope.finish(true);
    return out[0];
  } else if constexpr (std::is_same_v<D, std::vector<at::Tensor>>) {
    auto out = scope.outputs(result);
    scope.finish(true);
    return out;
  } else {
    // Backward cannot be intercepted through other types: the unit stays gathered until its
    // backward ends (or is freed now when there will be no backward).
    scope.finish(false);
    return std::forward<R>(result);
  }
}
}  // namespace detail

namespace fsdp {

/// Marks `module` (a submodule of a model not yet prepared) as a unit, whatever the wrap
/// policy. Call it through fsdp::call unless it is a child of a Sequential.
void wrap(const std::shared_ptr<torch::nn::Module>& module);

/// Whether `module` is a unit of a prepared, fully sharded model.
bool is_unit(const torch::nn::Module& module);

/// Calls `module->as<M>()->forward(args...)`; for a unit, with its full parameters gathered
/// around the call and re-gathered for its backward. Floating-point tensor arguments are cast
/// to the unit's parameter dtype under a mixed-precision policy. Unit outputs that are a tensor
/// or a vector of tensors are hooked for backward; other return types keep the unit gathered
/// until its backward ends.
///
/// Example:
/// \code
///   x = accelerate::fsdp::call<BlockImpl>(blocks[i], x);
/// \endcode
template <class M, class... Args>
auto call(const std::shared_ptr<torch::nn::Module>& module, Args&&... args) {
  M* typed = module ? module->as<M>() : nullptr;
  TORCH_CHECK(typed != nullptr, "accelerate: fsdp::call: the module is ",
              module ? module->name() : std::string("null"), ", not the type asked for");
  detail::UnitScope scope(module.get());
  if (!scope.active()) return typed->forward(std::forward<Args>(args)...);
  return detail::unit_output(
      scope, typed->forward(detail::unit_input(scope, std::forward<Args>(args))...));
}

/// The same for a ModuleHolder member (`Block block;` -> `fsdp::call(block, x)`).
template <class Holder, class... Args>
requires requires(Holder h) {
  h.ptr();
}
auto call(Holder& holder, Args&&... args) {
  using M = typename Holder::ContainedType;
  return call<M>(std::static_pointer_cast<torch::nn::Module>(holder.ptr()),
                 std::forward<Args>(args)...);
}

/// While it lives, every unit of `sync`'s model holds its full parameters (in the gathered
/// dtype: bfloat16 under the bf16 policy), so that they can be read or written; with
/// `writeback`, writes go back to the shards when it ends (only where the gathered dtype is the
/// shards' own). Collective: every process creates and destroys it at the same point.
///
/// Example:
/// \code
///   {
///     auto full = accelerate::fsdp::summon_full_params(*accelerator.synchronizer(model));
///     std::cout << model->parameters()[0].sum() << "\n";
///   }
/// \endcode
class [[nodiscard]] FullParameters {
 public:
  explicit FullParameters(GradientSynchronizer& sync, bool writeback = true);
  FullParameters(const FullParameters&) = delete;
  FullParameters& operator=(const FullParameters&) = delete;
  ~FullParameters();

 private:
  std::shared_ptr<detail::FullShardCore> core_;
  bool writeback_;
};
inline FullParameters summon_full_params(GradientSynchronizer& sync, bool writeback = true) {
  return FullParameters(sync, writeback);
}

/// What full sharding holds and did, for benchmarks and tuning (bytes per process).
struct Stats {
  /// Units, the root unit included when it has parameters.
  int64_t units = 0;
  /// The unit names ("" is the root unit) and each one's full size in the gathered dtype.
  std::vector<std::string> unit_names;
  std::vector<int64_t> unit_bytes;
  /// Parameter shards held (the master copy).
  int64_t shard_bytes = 0;
  /// Full parameters held now and at most (gathered units, root unit included).
  int64_t gathered_bytes = 0;
  int64_t peak_gathered_bytes = 0;
  /// Unsharded gradients held at most (between their computation and their reduce-scatter).
  int64_t peak_unsharded_grad_bytes = 0;
  /// All-gathers of parameters, their total time from launch to completion, and the part of it
  /// the computation waited for (the rest was hidden by prefetching).
  int64_t gathers = 0;
  double gather_seconds = 0;
  double gather_wait_seconds = 0;
};
Stats stats(const GradientSynchronizer& sync);
/// Restarts the peaks and the timings.
void reset_stats(const GradientSynchronizer& sync);

}  // namespace fsdp
}  // namespace accelerate
