#pragma once
/// \file
/// The `Accelerator`: the four-line change that makes a LibTorch training loop distributed,
/// mixed-precision and gradient-accumulating (Accelerate's `Accelerator`).
///
/// Example:
/// \code
///   accelerate::Accelerator accelerator({.gradient_accumulation_steps = 2});
///   auto [net, optimizer, loader] = accelerator.prepare(model, sgd, train_loader);
///   for (auto& batch : loader) {
///     auto sync = accelerator.accumulate(net);
///     auto loss = torch::mse_loss(net->forward(batch.data), batch.target);
///     accelerator.backward(loss);
///     optimizer.step();
///     optimizer.zero_grad();
///   }
/// \endcode
///
/// The Accelerator is a thin front: process state (state.h), data (data.h), gradient
/// synchronisation (ddp.h), mixed precision (amp.h) and schedulers (scheduler.h) do the work.

#include <accelerate/amp.h>
#include <accelerate/checkpoint_state.h>
#include <accelerate/checkpointing.h>
#include <accelerate/data.h>
#include <accelerate/ddp.h>
#include <accelerate/environment.h>
#include <accelerate/operations.h>
#include <accelerate/plugins.h>
#include <accelerate/random.h>
#include <accelerate/scheduler.h>
#include <accelerate/state.h>
#include <accelerate/tracking.h>
#include <accelerate/zero.h>

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/optim/optimizer.h>
#include <torch/ordered_dict.h>
#include <torch/serialize.h>

#include <concepts>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace accelerate {

/// The precision the forward pass runs in.
enum class MixedPrecision { NO, BF16, FP16 };
/// "no", "bf16", "fp16".
std::string to_string(MixedPrecision precision);
/// Parses "no", "bf16" or "fp16" (case-sensitive, as Accelerate); anything else is an error.
MixedPrecision mixed_precision_from_string(const std::string& name);

/// Accelerate's `GradientAccumulationPlugin`.
struct GradientAccumulationPlugin {
  /// Batches per optimizer step.
  int64_t num_steps = 1;
  /// Kept for parity with Accelerate, where it only silences PyTorch's scheduler-order
  /// warning; the learning rates do not depend on it.
  bool adjust_scheduler = true;
  /// The last batch of a data loader always synchronises and steps, even mid-cycle.
  bool sync_with_dataloader = true;

  bool operator==(const GradientAccumulationPlugin&) const = default;
};

/// Accelerate's `ProjectConfiguration`: where checkpoints and logs go.
///
/// Example:
/// \code
///   accelerate::Accelerator acc({.project_config = {.project_dir = "runs/a",
///                                                   .automatic_checkpoint_naming = true,
///                                                   .total_limit = 3}});
///   acc.save_state();  // runs/a/checkpoints/checkpoint_0, then checkpoint_1, ...
/// \endcode
struct ProjectConfiguration {
  std::string project_dir;
  /// Trackers' files (default: project_dir).
  std::string logging_dir;
  /// save_state() without a directory writes `<project_dir>/checkpoints/checkpoint_<iteration>`
  /// and load_state() without one reads the latest complete checkpoint there.
  bool automatic_checkpoint_naming = false;
  /// Keep at most this many automatically named checkpoints (the oldest go, after a save).
  std::optional<int64_t> total_limit;
  /// The number of the next automatically named checkpoint.
  int64_t iteration = 0;
  /// Every machine's local main process writes (for machines without a shared file system).
  bool save_on_each_node = false;
};

/// What the user sets. Unset fields come from the `ACCELERATE_*` environment that
/// `accelerate launch` writes, else from Accelerate's defaults: explicit > environment >
/// default, for every field.
///
/// Example:
/// \code
///   accelerate::Accelerator acc({.mixed_precision = "bf16", .gradient_accumulation_steps = 4});
/// \endcode
struct AcceleratorOptions {
  /// Move prepared models and batches to the device (default true).
  std::optional<bool> device_placement;
  /// Split every batch between the processes instead of giving each its own (default false).
  std::optional<bool> split_batches;
  /// "no", "bf16" or "fp16" (`ACCELERATE_MIXED_PRECISION`, default "no").
  std::optional<std::string> mixed_precision;
  /// Batches per optimizer step (`ACCELERATE_GRADIENT_ACCUMULATION_STEPS`, default 1).
  /// Excludes gradient_accumulation_plugin.
  std::optional<int64_t> gradient_accumulation_steps;
  std::optional<GradientAccumulationPlugin> gradient_accumulation_plugin;
  /// Stay on the CPU even when a GPU is there (`ACCELERATE_USE_CPU`).
  std::optional<bool> cpu;
  /// Generators synchronised across processes at the start of each data loader iteration
  /// (default {GENERATOR}).
  std::optional<std::vector<RNGType>> rng_types;
  /// Shorthand for project_config.project_dir.
  std::optional<std::string> project_dir;
  std::optional<ProjectConfiguration> project_config;
  /// Experiment trackers (Accelerate's `log_with`): "tensorboard", "jsonl", "csv", "all" (every
  /// built-in one), and tracker objects (GeneralTracker). The built-in ones write under
  /// project_config.logging_dir (default: project_dir), which they require. Default: none.
  std::vector<TrackerSpec> log_with;
  /// Process 0 reads and sends the batches (default: for iterable datasets only).
  std::optional<bool> dispatch_batches;
  /// Wrap around so that every process gets the same number of batches (default true).
  std::optional<bool> even_batches;
  /// Shuffle with a sampler seeded by seed + epoch (default false).
  std::optional<bool> use_seedable_sampler;
  /// The scheduler steps with the optimizer, num_processes times per step unless
  /// split_batches (default true).
  std::optional<bool> step_scheduler_with_optimizer;
  /// Kwargs handlers.
  std::optional<DistributedDataParallelKwargs> ddp_kwargs;
  std::optional<GradScalerKwargs> scaler_kwargs;
  std::optional<AutocastKwargs> autocast_kwargs;
  std::optional<InitProcessGroupKwargs> init_kwargs;
  /// Sharded data parallelism (plugins.h): FSDP's SHARD_GRAD_OP / NO_SHARD, or DeepSpeed's ZeRO
  /// stages 0-2. Give one of the two; unset, `accelerate launch --use_fsdp` / `--use_deepspeed`
  /// (ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED) turn them on.
  std::optional<FullyShardedDataParallelPlugin> fsdp_plugin;
  std::optional<DeepSpeedPlugin> deepspeed_plugin;
  /// The states to use (tests run ranks as threads); default: the process-wide ones.
  std::shared_ptr<PartialState> state;
  std::shared_ptr<data::GradientState> gradient_state;
};

/// The options after resolution: every value known, and where it came from.
struct AcceleratorConfig {
  bool device_placement = true;
  bool split_batches = false;
  MixedPrecision mixed_precision = MixedPrecision::NO;
  GradientAccumulationPlugin gradient_accumulation;
  std::optional<bool> cpu;
  std::vector<RNGType> rng_types = {RNGType::GENERATOR};
  ProjectConfiguration project_config;
  /// Checked, "all" expanded, repeated names dropped.
  std::vector<TrackerSpec> log_with;
  std::optional<bool> dispatch_batches;
  bool even_batches = true;
  bool use_seedable_sampler = false;
  bool step_scheduler_with_optimizer = true;
  DistributedDataParallelKwargs ddp_kwargs;
  GradScalerKwargs scaler_kwargs;
  AutocastKwargs autocast_kwargs;
  InitProcessGroupKwargs init_kwargs;
  /// The sharding engine's settings (engine "none" without a plugin).
  ShardingConfig sharding;
  /// Times `accelerate launch --max_restarts` restarted the job (`ACCELERATE_RESTART_COUNT`).
  /// With automatic_checkpoint_naming, a restarted run resumes from the latest checkpoint by
  /// itself (see Accelerator).
  int64_t restart_count = 0;
  /// Field name -> "argument", "environment" or "default".
  std::map<std::string, std::string> sources;

  /// One line per field: "mixed_precision = bf16 (environment)".
  std::string describe() const;
};

/// Applies the precedence rule and validates; errors name the field and the bad value.
AcceleratorConfig resolve_accelerator_options(const AcceleratorOptions& options, const EnvMap& env);

class Accelerator;

/// Tensors by name, in order.
using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;
/// Called by save_state before anything is written (Accelerate's save-state pre-hook):
/// `weights[i]` is what will be saved for `models[i]`; erase entries from both to save a model
/// yourself, or change the tensors. Every process calls it.
using SaveStatePreHook =
    std::function<void(std::vector<std::shared_ptr<torch::nn::Module>>& models,
                       std::vector<NamedTensors>& weights, const std::string& output_dir)>;
/// Called by load_state before anything is loaded: erase models to load them yourself.
using LoadStatePreHook = std::function<void(std::vector<std::shared_ptr<torch::nn::Module>>& models,
                                            const std::string& input_dir)>;

namespace detail {

template <class T>
struct is_data_loader : std::false_type {};
template <class Batch>
struct is_data_loader<data::DataLoader<Batch>> : std::true_type {};

/// What the Accelerator shares with the wrappers it hands out.
struct OptimizerSlot {
  torch::optim::Optimizer* optimizer = nullptr;
  std::shared_ptr<torch::optim::Optimizer> owner;  // set when prepared from a shared_ptr
  bool step_was_skipped = false;
  bool unscaled = false;  // this step's gradients are already unscaled
  // ZeRO: built once the models are prepared (prepare() prepares optimizers first).
  std::shared_ptr<ZeroOptimizer> zero;
  std::string pending_sharded_load;  // a sharded checkpoint to load once `zero` exists
};

/// A prepared data loader's position, with its batch type erased.
struct LoaderSlot {
  std::function<data::LoaderPosition()> position;
  std::function<void(const data::LoaderPosition&)> set_position;
};

/// What a restarted run restores as its objects are prepared (checkpoint_state.cpp).
struct AutoResume;

struct CheckpointHooks {
  int next_id = 0;
  std::map<int, SaveStatePreHook> save;
  std::map<int, LoadStatePreHook> load;
};

struct AcceleratorCore {
  AcceleratorConfig config;
  std::shared_ptr<PartialState> state;
  std::shared_ptr<data::GradientState> gradient_state;
  std::unique_ptr<GradScaler> scaler;  // fp16 only
  int64_t step = 0;                    // batches seen in the current accumulation cycle
  std::vector<std::shared_ptr<torch::nn::Module>> models;
  std::map<const torch::nn::Module*, std::shared_ptr<GradientSynchronizer>> synchronizers;
  std::vector<std::shared_ptr<OptimizerSlot>> optimizers;
  std::vector<std::shared_ptr<LRScheduler>> schedulers;
  std::vector<LoaderSlot> loaders;
  std::vector<std::shared_ptr<Checkpointable>> custom_objects;
  std::shared_ptr<CheckpointHooks> hooks = std::make_shared<CheckpointHooks>();
  std::shared_ptr<AutoResume> resume;                     // set while a restarted run restores
  bool trackers_initialized = false;                      // init_trackers ran (on every process)
  std::vector<std::shared_ptr<GeneralTracker>> trackers;  // main process only

  GradientSynchronizer* synchronizer(const torch::nn::Module* module) const;
  void unscale(OptimizerSlot& slot);
  /// Builds the ZeRO engine of `slot` when sharding is on and the models are prepared; returns
  /// it (null without sharding).
  ZeroOptimizer* zero(OptimizerSlot& slot);
};

}  // namespace detail

/// Accelerate's `AcceleratedOptimizer`: steps and zeroes only on steps that synchronise
/// gradients, and goes through the loss scaler under fp16. Copies share one optimizer.
///
/// Example:
/// \code
///   auto opt = accelerator.prepare(sgd);
///   opt.step();       // no-op while accumulating
///   opt.zero_grad();  // likewise
/// \endcode
class AcceleratedOptimizer {
 public:
  AcceleratedOptimizer(std::shared_ptr<detail::OptimizerSlot> slot,
                       std::shared_ptr<detail::AcceleratorCore> core);

  /// Steps when gradients were synchronised this step; under fp16, unscales first and skips
  /// the step when a gradient is inf/NaN (then step_was_skipped()).
  void step();
  /// Zeroes the gradients (sets them to undefined when set_to_none, as PyTorch 2 does by
  /// default) when gradients were synchronised this step.
  void zero_grad(bool set_to_none = true);
  /// Whether the last step() was skipped by the loss scaler.
  bool step_was_skipped() const { return slot_->step_was_skipped; }

  torch::optim::Optimizer& optimizer() const { return *slot_->optimizer; }
  torch::optim::Optimizer* operator->() const { return slot_->optimizer; }
  std::vector<torch::optim::OptimizerParamGroup>& param_groups() {
    return slot_->optimizer->param_groups();
  }
  operator torch::optim::Optimizer&() const { return *slot_->optimizer; }

 private:
  std::shared_ptr<detail::OptimizerSlot> slot_;
  std::shared_ptr<detail::AcceleratorCore> core_;
};

/// Accelerate's `AcceleratedScheduler`: steps only after a real optimizer step; with
/// step_scheduler_with_optimizer it steps num_processes times per call (each process saw
/// num_processes times fewer batches) unless split_batches.
class AcceleratedScheduler {
 public:
  AcceleratedScheduler(std::shared_ptr<LRScheduler> scheduler,
                       std::shared_ptr<detail::AcceleratorCore> core);

  void step();
  std::vector<double> get_last_lr() const { return scheduler_->get_last_lr(); }
  LRScheduler& scheduler() const { return *scheduler_; }
  LRScheduler* operator->() const { return scheduler_.get(); }
  SchedulerState state_dict() const { return scheduler_->state_dict(); }
  void load_state_dict(const SchedulerState& state) { scheduler_->load_state_dict(state); }

 private:
  std::shared_ptr<LRScheduler> scheduler_;
  std::shared_ptr<detail::AcceleratorCore> core_;
};

/// Scope guard restoring a synchroniser's require_sync flags (no_sync, accumulate,
/// trigger_sync_in_backward).
class [[nodiscard]] SyncGuard {
 public:
  SyncGuard() = default;
  SyncGuard(SyncGuard&& other) noexcept : saved_(std::move(other.saved_)) { other.saved_.clear(); }
  SyncGuard& operator=(SyncGuard&&) = delete;
  SyncGuard(const SyncGuard&) = delete;
  SyncGuard& operator=(const SyncGuard&) = delete;
  ~SyncGuard();

 private:
  friend class Accelerator;
  void set(GradientSynchronizer* sync, bool require);
  std::vector<std::pair<GradientSynchronizer*, bool>> saved_;
};

/// Autocast for the configured precision while it lives; does nothing under "no".
class [[nodiscard]] AutocastScope {
 public:
  AutocastScope() = default;
  AutocastScope(c10::DeviceType device, at::ScalarType dtype, const AutocastKwargs& kwargs)
      : guard_(std::in_place, device, dtype, kwargs) {}
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;
  bool active() const { return guard_.has_value(); }

 private:
  std::optional<AutocastGuard> guard_;
};

/// Options for Accelerator::backward.
struct BackwardOptions {
  bool retain_graph = false;
  bool create_graph = false;
};

/// Options for prepare_model.
struct PrepareModelOptions {
  /// Overrides the Accelerator's device_placement for this model.
  std::optional<bool> device_placement;
  /// Inference only: placed on the device, no gradient synchronisation.
  bool evaluation_mode = false;
};

/// See the file comment.
///
/// Restarts: when `accelerate launch --max_restarts` restarts a failed job
/// (ACCELERATE_RESTART_COUNT > 0) and project_config.automatic_checkpoint_naming is on, the
/// Accelerator resumes from the latest complete checkpoint by itself: each model, optimizer,
/// scheduler, data loader and registered object gets its saved state as it is prepared or
/// registered (in the same order as in the run that saved), and the generator states are
/// restored after each, so the program needs no resume code of its own. Write the training loop
/// over state that is restored (a prepared loader's iteration(), a registered step counter).
/// The first backward() ends the restoring; every saved object must have been prepared by then.
class Accelerator {
 public:
  explicit Accelerator(const AcceleratorOptions& options = {});

  // ------------------------------------------------------------------ prepare

  /// Prepares any mix of models (ModuleHolders or shared_ptrs to modules), optimizers,
  /// LR schedulers and data loaders, and returns them in the same order: models and loaders
  /// as the same types, optimizers as AcceleratedOptimizer, schedulers as
  /// AcceleratedScheduler. One object comes back bare, several as a tuple.
  template <class... Ts>
  auto prepare(Ts&&... objects) {
    static_assert(sizeof...(Ts) > 0, "accelerate: prepare() needs at least one object");
    // Optimizers first, as Accelerate does, so schedulers find theirs whatever the order.
    (prepare_optimizer_first(objects), ...);
    if constexpr (sizeof...(Ts) == 1) {
      auto result = prepare_one(std::forward<Ts>(objects)...);
      finish_prepare();
      return result;
    } else {
      std::tuple<decltype(prepare_one(std::forward<Ts>(objects)))...> result{
          prepare_one(std::forward<Ts>(objects))...};
      finish_prepare();
      return result;
    }
  }

  /// Places the model on the device and, with several processes, synchronises its gradients
  /// during backward. Replicas start from process 0's parameters and buffers.
  template <class Holder>
  requires std::derived_from<typename std::decay_t<Holder>::ContainedType, torch::nn::Module>
      std::decay_t<Holder> prepare_model(Holder&& model, const PrepareModelOptions& options = {}) {
    prepare_module(model.ptr(), options);
    return model;
  }
  template <class M>
  requires std::derived_from<M, torch::nn::Module> std::shared_ptr<M> prepare_model(
      std::shared_ptr<M> model, const PrepareModelOptions& options = {}) {
    prepare_module(model, options);
    return model;
  }
  AcceleratedOptimizer prepare_optimizer(torch::optim::Optimizer& optimizer);
  AcceleratedOptimizer prepare_optimizer(std::shared_ptr<torch::optim::Optimizer> optimizer);
  AcceleratedScheduler prepare_scheduler(std::shared_ptr<LRScheduler> scheduler);
  /// Shards the loader (data.h) and remembers it, so that save_state / load_state keep its
  /// position.
  template <class Batch>
  data::DataLoader<Batch> prepare_data_loader(const data::DataLoader<Batch>& loader) {
    auto prepared = data::prepare_data_loader(loader, data_loader_options());
    // Copies of a loader share its state, so these copies follow the one returned.
    core_->loaders.push_back(
        {[prepared] { return prepared.position(); },
         [prepared](const data::LoaderPosition& p) mutable { prepared.set_position(p); }});
    resume_next(ResumeKind::kDataLoader);
    return prepared;
  }
  template <class Batch>
  data::DataLoader<Batch> skip_first_batches(const data::DataLoader<Batch>& loader,
                                             int64_t num_batches) {
    return data::skip_first_batches(loader, num_batches);
  }

  // ------------------------------------------------------------------ training

  /// loss.backward(), scaled for gradient accumulation (divided by the number of steps) and
  /// for the fp16 loss scaler.
  void backward(const at::Tensor& loss, const BackwardOptions& options = {});

  /// Gradient accumulation: counts this batch and decides whether it synchronises and steps
  /// (every gradient_accumulation_steps batches, and at the end of the data loader when
  /// sync_with_dataloader); while it does not, the models' gradients stay local.
  template <class... Models>
  SyncGuard accumulate(const Models&... models) {
    do_sync();
    SyncGuard guard;
    if (!sync_gradients()) (guard.set(synchronizer_of(models), false), ...);
    return guard;
  }
  /// Gradients of these models stay local while the guard lives.
  template <class... Models>
  SyncGuard no_sync(const Models&... models) {
    SyncGuard guard;
    (guard.set(synchronizer_of(models), false), ...);
    return guard;
  }
  /// The data-parallel gradient synchronizer of a prepared model (what Python Accelerate's
  /// prepared DDP model is): for register_comm_hook() and stats(). nullptr with one process, or
  /// for a model that was not prepared.
  ///
  /// Example:
  /// \code
  ///   if (auto* sync = accelerator.synchronizer(net)) {
  ///     auto s = sync->stats();
  ///     accelerator.print("communication hidden: ", s.hidden_seconds / s.communication_seconds);
  ///   }
  /// \endcode
  template <class M>
  GradientSynchronizer* synchronizer(const M& model) const {
    return synchronizer_of(model);
  }

  /// The next backward synchronises these models' gradients even inside no_sync.
  template <class... Models>
  SyncGuard trigger_sync_in_backward(const Models&... models) {
    SyncGuard guard;
    (guard.set(synchronizer_of(models), true), ...);
    return guard;
  }

  /// Autocast to the configured precision (bf16 on CPU/CUDA, fp16 on CUDA) while the guard
  /// lives. C++ cannot wrap a module's forward as Accelerate does, so put the forward pass
  /// (and the loss) inside it.
  AutocastScope autocast() const { return autocast(config().autocast_kwargs); }
  AutocastScope autocast(const AutocastKwargs& kwargs) const;

  /// Unscales the prepared optimizers' gradients (fp16); a no-op otherwise and when already
  /// done this step.
  void unscale_gradients();
  /// Unscales, then clips the gradients' total norm; returns the norm before clipping.
  double clip_grad_norm_(const std::vector<at::Tensor>& parameters, double max_norm,
                         double norm_type = 2.0);
  /// Unscales, then clamps every gradient to [-clip_value, clip_value].
  void clip_grad_value_(const std::vector<at::Tensor>& parameters, double clip_value);

  /// Whether this step synchronises gradients (and the optimizer steps).
  bool sync_gradients() const { return core_->gradient_state->sync_gradients(); }
  /// Whether the last optimizer step was skipped by the loss scaler.
  bool optimizer_step_was_skipped() const;
  /// Batches counted by accumulate() (restarts at the end of a loader with sync_with_dataloader).
  int64_t step() const { return core_->step; }

  // ------------------------------------------------------------------ evaluation

  template <class T>
  T gather(const T& data) const {
    return accelerate::gather(*core_->state, data);
  }
  /// Gathers, dropping the samples the last batches repeated to even them out.
  template <class T>
  T gather_for_metrics(const T& data) const {
    return data::gather_for_metrics(*core_->state, *core_->gradient_state, data);
  }
  template <class T>
  std::vector<T> gather_object_for_metrics(const std::vector<T>& objects) const {
    return data::gather_object_for_metrics(*core_->state, *core_->gradient_state, objects);
  }
  template <class T>
  T reduce(const T& data, Reduction reduction = Reduction::kSum, double scale = 1.0) const {
    return accelerate::reduce(*core_->state, data, reduction, scale);
  }
  template <class T>
  T pad_across_processes(const T& data, const PadOptions& options = {}) const {
    return accelerate::pad_across_processes(*core_->state, data, options);
  }

  // ------------------------------------------------------------------ models

  /// The model itself: prepare() does not wrap models in C++.
  template <class M>
  M unwrap_model(const M& model) const {
    return model;
  }
  /// Parameters and buffers by name, detached copies on the CPU.
  torch::OrderedDict<std::string, at::Tensor> get_state_dict(const torch::nn::Module& model) const;
  /// Drops every reference to prepared objects (models, optimizers, schedulers, data loaders,
  /// and the models' gradient hooks) and resets the accumulation counter. Registered
  /// checkpointing objects and hooks stay.
  void free_memory();
  void clear() { free_memory(); }
  /// Accelerate's join_uneven_inputs wraps DDP's Join, which LibTorch lacks. With
  /// even_batches (the default) every process gets the same number of batches, so nothing is
  /// needed; this is a documented no-op returning an empty guard.
  SyncGuard join_uneven_inputs() const { return {}; }
  /// Whether `model` was dispatched across several devices (big_modeling.h's dispatch_model):
  /// such a model is not moved by prepare, and cannot be trained by several processes.
  bool verify_device_map(const torch::nn::Module& model) const;

  // ------------------------------------------------------------------ checkpointing

  /// Saves everything needed to resume (Accelerate's `save_state`): the prepared models,
  /// optimizers (full state), schedulers, the fp16 scaler, every process's generator states and
  /// data loader positions, the step counter, and the registered objects. See
  /// checkpoint_state.h for the layout and the crash safety. All processes must call it.
  ///
  /// With project_config.automatic_checkpoint_naming the directory is
  /// `<project_dir>/checkpoints/checkpoint_<save_iteration()>` (give no directory then), the
  /// iteration advances after each save, and once the new checkpoint is complete the oldest
  /// ones beyond total_limit are removed. Otherwise `output_dir` is required; an existing
  /// checkpoint there is replaced atomically. Returns the directory.
  ///
  /// Example:
  /// \code
  ///   accelerator.save_state("ckpt");
  ///   // ... a new process, after the same prepare():
  ///   accelerator.load_state("ckpt");
  /// \endcode
  std::string save_state(const std::string& output_dir = "");
  /// Restores what save_state saved into the prepared objects (Accelerate's `load_state`). With
  /// automatic_checkpoint_naming and no directory, picks the latest complete checkpoint and
  /// sets save_iteration() past it. Afterwards a prepared data loader's next iteration goes on
  /// mid-epoch exactly where the saved run was. The checkpoint must come from the same number
  /// of processes and hold as many models, optimizers, schedulers, loaders and registered
  /// objects as were prepared; otherwise an error says what differs, before anything is
  /// changed. Returns the directory.
  std::string load_state(const std::string& input_dir = "");

  /// Adds an object to what save_state / load_state handle (Accelerate's
  /// `register_for_checkpointing`), saved as `custom_checkpoint_<i>.safetensors` in
  /// registration order.
  void register_for_checkpointing(std::shared_ptr<Checkpointable> object);
  /// A module that was not prepared (an EMA copy, say), saved like a custom object.
  void register_for_checkpointing(std::shared_ptr<torch::nn::Module> module);
  template <class Holder>
  requires std::derived_from<typename Holder::ContainedType, torch::nn::Module>
  void register_for_checkpointing(const Holder& module) {
    register_for_checkpointing(std::static_pointer_cast<torch::nn::Module>(module.ptr()));
  }
  /// A scheduler that was not prepared.
  void register_for_checkpointing(std::shared_ptr<LRScheduler> scheduler);

  RemovableHandle register_save_state_pre_hook(SaveStatePreHook hook);
  RemovableHandle register_load_state_pre_hook(LoadStatePreHook hook);

  /// Saves tensors as a safetensors file (atomically), on the main process only, or on each
  /// machine's local main process with project_config.save_on_each_node (Accelerate's `save`).
  /// Returns whether this process wrote.
  bool save(const NamedTensors& tensors, const std::string& path,
            const std::map<std::string, std::string>& metadata = {}) const;
  /// Anything `torch::save` takes (modules, optimizers, tensors...), written atomically on the
  /// same processes.
  template <class T>
  bool save(const T& object, const std::string& path) const {
    if (!is_saving_process()) return false;
    write_atomically(path, [&](const std::string& tmp) { torch::save(object, tmp); });
    return true;
  }
  /// accelerate::save_model on the main process (Accelerate's `Accelerator.save_model`).
  /// Returns the files written (empty on the other processes).
  std::vector<std::string> save_model(const torch::nn::Module& model, const std::string& directory,
                                      const SaveModelOptions& options = {}) const;

  /// The number of the next automatically named checkpoint.
  int64_t save_iteration() const { return core_->config.project_config.iteration; }
  void set_save_iteration(int64_t iteration) { core_->config.project_config.iteration = iteration; }

  // ------------------------------------------------------------------ tracking

  /// Starts the trackers named in log_with for a run called `project_name` (Accelerate's
  /// `init_trackers`): the built-in ones write under `<logging_dir>/<project_name>/`,
  /// `init_kwargs[name]` holds the options of tracker `name`, and a non-empty `config` is stored
  /// as the run's hyperparameters. Only the main process creates and starts trackers; elsewhere
  /// this returns at once. Call it once.
  ///
  /// Example:
  /// \code
  ///   accelerate::Accelerator acc({.project_dir = "runs", .log_with = {"tensorboard"}});
  ///   acc.init_trackers("spirals", {{"lr", 1e-3}},
  ///                     {{"tensorboard", {{"filename_suffix", ".a"}}}});
  ///   acc.log({{"loss", 0.5}}, 1);
  ///   acc.end_training();
  /// \endcode
  void init_trackers(const std::string& project_name, const LogValues& config = {},
                     const TrackerInitKwargs& init_kwargs = {});
  /// Logs `values` at `step` to every tracker, on the main process; elsewhere it returns at once
  /// and costs nothing (no communication).
  void log(const LogValues& values, std::optional<int64_t> step = std::nullopt);
  /// The tracker called `name` (a built-in's name, or a custom tracker's name()). On the other
  /// processes, which keep no trackers, a tracker that does nothing. A name not in log_with is
  /// an error listing the available ones.
  std::shared_ptr<GeneralTracker> get_tracker(const std::string& name) const;
  /// The started trackers (empty on the other processes and before init_trackers).
  const std::vector<std::shared_ptr<GeneralTracker>>& trackers() const { return core_->trackers; }
  /// Finishes every tracker on the main process, then waits for every process (Accelerate's
  /// `end_training`; the process group stays, unlike Accelerate's). Every process calls it. If a
  /// tracker fails to finish, the main process still joins the others before it throws.
  void end_training();

  // ------------------------------------------------------------------ processes

  const c10::Device& device() const { return core_->state->device(); }
  /// The state's type, or FSDP / DEEPSPEED with a sharding plugin and several processes.
  DistributedType distributed_type() const;
  int num_processes() const { return core_->state->num_processes(); }
  int process_index() const { return core_->state->process_index(); }
  int local_process_index() const { return core_->state->local_process_index(); }
  bool is_main_process() const { return core_->state->is_main_process(); }
  bool is_local_main_process() const { return core_->state->is_local_main_process(); }
  bool is_last_process() const { return core_->state->is_last_process(); }
  bool use_distributed() const { return core_->state->use_distributed(); }
  std::string mixed_precision() const { return to_string(core_->config.mixed_precision); }
  int64_t gradient_accumulation_steps() const {
    return core_->config.gradient_accumulation.num_steps;
  }
  bool split_batches() const { return core_->config.split_batches; }
  const std::string& project_dir() const { return core_->config.project_config.project_dir; }
  const AcceleratorConfig& config() const { return core_->config; }
  PartialState& state() const { return *core_->state; }
  data::GradientState& gradient_state() const { return *core_->gradient_state; }
  /// The fp16 loss scaler, or nullptr.
  GradScaler* scaler() const { return core_->scaler.get(); }

  void wait_for_everyone() const { core_->state->wait_for_everyone(); }
  template <class... Args>
  void print(const Args&... args) const {
    core_->state->print(args...);
  }
  ProcessesFirst main_process_first() const { return core_->state->main_process_first(); }
  ProcessesFirst local_main_process_first() const {
    return core_->state->local_main_process_first();
  }
  template <class F>
  auto on_main_process(F&& fn) const {
    return core_->state->on_main_process(std::forward<F>(fn));
  }
  template <class F>
  auto on_local_main_process(F&& fn) const {
    return core_->state->on_local_main_process(std::forward<F>(fn));
  }
  template <class F>
  auto on_last_process(F&& fn) const {
    return core_->state->on_last_process(std::forward<F>(fn));
  }
  template <class F>
  auto on_process(int index, F&& fn) const {
    return core_->state->on_process(index, std::forward<F>(fn));
  }
  template <class F>
  auto on_local_process(int index, F&& fn) const {
    return core_->state->on_local_process(index, std::forward<F>(fn));
  }
  template <class T>
  auto split_between_processes(const T& inputs, bool apply_padding = false) const {
    return core_->state->split_between_processes(inputs, apply_padding);
  }
  void set_trigger() const { core_->state->set_trigger(); }
  bool check_trigger() const { return core_->state->check_trigger(); }

 private:
  template <class T>
  void prepare_optimizer_first(T& object) {
    using D = std::decay_t<T>;
    if constexpr (std::derived_from<D, torch::optim::Optimizer>) {
      remember_optimizer(&object, nullptr);
    } else if constexpr (requires { typename D::element_type; }) {
      if constexpr (std::derived_from<typename D::element_type, torch::optim::Optimizer>) {
        remember_optimizer(object.get(), object);
      }
    }
  }

  template <class T>
  auto prepare_one(T&& object) {
    using D = std::decay_t<T>;
    if constexpr (requires { typename D::ContainedType; }) {
      return prepare_model(std::forward<T>(object));
    } else if constexpr (std::derived_from<D, torch::optim::Optimizer>) {
      static_assert(std::is_lvalue_reference_v<T>,
                    "accelerate: prepare() keeps a reference to the optimizer: pass one that "
                    "outlives the Accelerator, not a temporary");
      return prepare_optimizer(object);
    } else if constexpr (requires { typename D::element_type; }) {
      using E = typename D::element_type;
      if constexpr (std::derived_from<E, torch::nn::Module>) {
        return prepare_model(std::shared_ptr<E>(object));
      } else if constexpr (std::derived_from<E, torch::optim::Optimizer>) {
        return prepare_optimizer(std::shared_ptr<torch::optim::Optimizer>(object));
      } else if constexpr (std::derived_from<E, LRScheduler>) {
        return prepare_scheduler(std::shared_ptr<LRScheduler>(object));
      } else {
        static_assert(sizeof(E) == 0,
                      "accelerate: prepare() takes models, optimizers, "
                      "schedulers and data loaders");
      }
    } else if constexpr (std::derived_from<D, LRScheduler>) {
      static_assert(sizeof(D) == 0,
                    "accelerate: pass schedulers to prepare() as std::shared_ptr<LRScheduler>");
    } else {
      static_assert(detail::is_data_loader<D>::value,
                    "accelerate: prepare() takes models, optimizers, schedulers and data loaders");
      return prepare_data_loader(object);
    }
  }

  enum class ResumeKind { kModel, kOptimizer, kScheduler, kDataLoader, kCustomObject };
  void begin_auto_resume();
  void resume_next(ResumeKind kind);
  void end_auto_resume();
  bool is_saving_process() const;
  static void write_atomically(const std::string& path,
                               const std::function<void(const std::string&)>& write);
  // Under ZeRO, builds the engines of optimizers whose models are now prepared.
  void finish_prepare();
  void prepare_module(const std::shared_ptr<torch::nn::Module>& module,
                      const PrepareModelOptions& options);
  void remember_optimizer(torch::optim::Optimizer* optimizer,
                          std::shared_ptr<torch::optim::Optimizer> owner);
  data::PrepareDataLoaderOptions data_loader_options() const;
  void do_sync();

  template <class M>
  GradientSynchronizer* synchronizer_of(const M& model) const {
    if constexpr (requires { model.ptr(); }) {
      return core_->synchronizer(model.ptr().get());
    } else if constexpr (requires { model.get(); }) {
      return core_->synchronizer(model.get());
    } else {
      return core_->synchronizer(&model);
    }
  }

  std::shared_ptr<detail::AcceleratorCore> core_;
};

}  // namespace accelerate
