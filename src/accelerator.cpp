#include "accelerate/accelerator.h"

#include "accelerate/big_modeling.h"

#include "fsdp_core.h"

#include "accelerate/detail/precedence.h"

#include <torch/cuda.h>
#include <torch/nn/utils/clip_grad.h>

#include <algorithm>
#include <iostream>
#include <mutex>
#include <set>
#include <sstream>
#include <unordered_set>

namespace accelerate {

std::string to_string(MixedPrecision precision) {
  switch (precision) {
    case MixedPrecision::NO:
      return "no";
    case MixedPrecision::BF16:
      return "bf16";
    case MixedPrecision::FP16:
      return "fp16";
  }
  return "?";
}

MixedPrecision mixed_precision_from_string(const std::string& name) {
  if (name == "no") return MixedPrecision::NO;
  if (name == "bf16") return MixedPrecision::BF16;
  if (name == "fp16") return MixedPrecision::FP16;
  TORCH_CHECK(false, "accelerate: mixed_precision must be \"no\", \"bf16\" or \"fp16\", got \"",
              name, "\"");
}

namespace {

// The single precedence rule (detail/precedence.h): explicit argument, then the environment,
// then the default.
template <class T>
T pick(const std::optional<T>& explicit_value, const std::optional<T>& from_env, T fallback,
       const char* field, std::map<std::string, std::string>& sources) {
  return detail::pick<T>({{explicit_value, "argument"}, {from_env, "environment"}}, fallback, field,
                         sources);
}

std::string join_rng(const std::vector<RNGType>& types) {
  std::string out;
  for (const auto& t : types) {
    if (!out.empty()) out += ',';
    out += to_string(t);
  }
  return out.empty() ? "none" : out;
}

// log_with: every name known, "all" expanded in place, each built-in once, and a logging
// directory for the trackers that write files.
void resolve_trackers(const std::vector<TrackerSpec>& log_with, AcceleratorConfig& c) {
  const auto& builtin = builtin_tracker_names();
  for (const auto& spec : log_with) {
    if (spec.tracker()) {
      c.log_with.push_back(spec);
      continue;
    }
    const std::string name = spec.name();
    const bool known =
        name == "all" || std::find(builtin.begin(), builtin.end(), name) != builtin.end();
    TORCH_CHECK(known, "accelerate: log_with has unknown tracker \"", name,
                "\"; known: tensorboard, jsonl, csv, all, or a GeneralTracker object");
    for (const auto& n : name == "all" ? builtin : std::vector<std::string>{name}) {
      const bool seen = std::any_of(c.log_with.begin(), c.log_with.end(),
                                    [&](const auto& s) { return !s.tracker() && s.name() == n; });
      if (seen) continue;
      TORCH_CHECK(
          !builtin_tracker_requires_logging_directory(n) || !c.project_config.logging_dir.empty(),
          "accelerate: log_with \"", n,
          "\" writes files and needs a logging directory: set project_dir or "
          "project_config.logging_dir");
      c.log_with.emplace_back(n);
    }
  }
  c.sources["log_with"] = log_with.empty() ? "default" : "argument";
}

}  // namespace

AcceleratorConfig resolve_accelerator_options(const AcceleratorOptions& options,
                                              const EnvMap& env) {
  AcceleratorConfig c;
  auto& src = c.sources;
  c.device_placement =
      pick<bool>(options.device_placement, std::nullopt, true, "device_placement", src);
  c.split_batches = pick<bool>(options.split_batches, std::nullopt, false, "split_batches", src);

  const auto precision =
      pick<std::string>(options.mixed_precision, env_string(env, "ACCELERATE_MIXED_PRECISION"),
                        "no", "mixed_precision", src);
  try {
    c.mixed_precision = mixed_precision_from_string(precision);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, e.what_without_backtrace(), " (from the ", src["mixed_precision"],
                src["mixed_precision"] == "environment" ? ", ACCELERATE_MIXED_PRECISION" : "", ")");
  }

  TORCH_CHECK(!(options.gradient_accumulation_steps && options.gradient_accumulation_plugin),
              "accelerate: give gradient_accumulation_steps or gradient_accumulation_plugin, "
              "not both");
  if (options.gradient_accumulation_plugin) {
    c.gradient_accumulation = *options.gradient_accumulation_plugin;
    src["gradient_accumulation_steps"] = "argument";
  } else {
    std::optional<int64_t> env_steps;
    if (auto v = env_int(env, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS")) env_steps = *v;
    c.gradient_accumulation.num_steps = pick<int64_t>(
        options.gradient_accumulation_steps, env_steps, 1, "gradient_accumulation_steps", src);
  }
  TORCH_CHECK(c.gradient_accumulation.num_steps >= 1,
              "accelerate: gradient_accumulation_steps must be >= 1, got ",
              c.gradient_accumulation.num_steps, " (from the ", src["gradient_accumulation_steps"],
              ")");

  if (options.cpu) {
    c.cpu = options.cpu;
    src["cpu"] = "argument";
  } else if (auto v = env_bool(env, "ACCELERATE_USE_CPU")) {
    c.cpu = v;
    src["cpu"] = "environment";
  } else {
    src["cpu"] = "default";
  }
  c.rng_types = pick<std::vector<RNGType>>(options.rng_types, std::nullopt, {RNGType::GENERATOR},
                                           "rng_types", src);
  TORCH_CHECK(!(options.project_dir && options.project_config),
              "accelerate: give project_dir or project_config, not both");
  if (options.project_config) c.project_config = *options.project_config;
  if (options.project_dir) c.project_config.project_dir = *options.project_dir;
  src["project_dir"] = options.project_dir || options.project_config ? "argument" : "default";
  if (c.project_config.logging_dir.empty())
    c.project_config.logging_dir = c.project_config.project_dir;
  resolve_trackers(options.log_with, c);
  TORCH_CHECK(!c.project_config.total_limit || *c.project_config.total_limit >= 1,
              "accelerate: project_config.total_limit must be >= 1, got ",
              c.project_config.total_limit.value_or(0));

  c.dispatch_batches = options.dispatch_batches;
  src["dispatch_batches"] = options.dispatch_batches ? "argument" : "default";
  c.even_batches = pick<bool>(options.even_batches, std::nullopt, true, "even_batches", src);
  c.use_seedable_sampler =
      pick<bool>(options.use_seedable_sampler, std::nullopt, false, "use_seedable_sampler", src);
  c.step_scheduler_with_optimizer = pick<bool>(options.step_scheduler_with_optimizer, std::nullopt,
                                               true, "step_scheduler_with_optimizer", src);
  c.ddp_kwargs =
      pick<DistributedDataParallelKwargs>(options.ddp_kwargs, std::nullopt, {}, "ddp_kwargs", src);
  TORCH_CHECK(c.ddp_kwargs.bucket_cap_mb > 0,
              "accelerate: ddp_kwargs.bucket_cap_mb must be positive, got ",
              c.ddp_kwargs.bucket_cap_mb);
  // The communication hook settings are checked here, once, even for a single process.
  TORCH_CHECK(
      !(c.ddp_kwargs.comm_hook_fn && c.ddp_kwargs.comm_hook != DDPCommunicationHookType::NO),
      "accelerate: ddp_kwargs: give comm_hook or comm_hook_fn, not both");
  (void)make_comm_hook(c.ddp_kwargs.comm_hook, c.ddp_kwargs.comm_wrapper,
                       c.ddp_kwargs.comm_state_option);
  c.scaler_kwargs =
      pick<GradScalerKwargs>(options.scaler_kwargs, std::nullopt, {}, "scaler_kwargs", src);
  c.autocast_kwargs =
      pick<AutocastKwargs>(options.autocast_kwargs, std::nullopt, {}, "autocast_kwargs", src);
  c.init_kwargs =
      pick<InitProcessGroupKwargs>(options.init_kwargs, std::nullopt, {}, "init_kwargs", src);
  TORCH_CHECK(!(options.scaler_kwargs && c.mixed_precision != MixedPrecision::FP16),
              "accelerate: scaler_kwargs only apply to mixed_precision=\"fp16\", but it is \"",
              to_string(c.mixed_precision), "\"");
  c.sharding = resolve_sharding(options.fsdp_plugin, options.deepspeed_plugin, env);
  if (c.sharding.gradient_accumulation_steps) {
    // DeepSpeed's own setting; Accelerate takes it from the plugin.
    const int64_t steps = *c.sharding.gradient_accumulation_steps;
    TORCH_CHECK(src["gradient_accumulation_steps"] != "argument" ||
                    c.gradient_accumulation.num_steps == steps,
                "accelerate: gradient_accumulation_steps is ", c.gradient_accumulation.num_steps,
                " but the DeepSpeed plugin says ", steps, "; give it in one place");
    c.gradient_accumulation.num_steps = steps;
    src["gradient_accumulation_steps"] =
        c.sharding.sources["deepspeed_gradient_accumulation_steps"];
  }
  if (c.sharding.mixed_precision) {
    const auto wanted = mixed_precision_from_string(*c.sharding.mixed_precision);
    TORCH_CHECK(src["mixed_precision"] == "default" || c.mixed_precision == wanted,
                "accelerate: mixed_precision is \"", to_string(c.mixed_precision), "\" (from the ",
                src["mixed_precision"], ") but the DeepSpeed config file enables ",
                *c.sharding.mixed_precision);
    c.mixed_precision = wanted;
    src["mixed_precision"] = "config file";
  }
  if (c.sharding.sharded()) {
    TORCH_CHECK(
        c.ddp_kwargs.comm_hook == DDPCommunicationHookType::NO && !c.ddp_kwargs.comm_hook_fn,
        "accelerate: communication hooks (ddp_kwargs.comm_hook) cannot be combined with "
        "ZeRO stage ",
        c.sharding.stage, " (", c.sharding.engine, ")");
    TORCH_CHECK(c.mixed_precision != MixedPrecision::FP16,
                "accelerate: mixed_precision=\"fp16\" with ZeRO sharding is not supported yet "
                "(the loss scaler would have to agree on inf/NaN across shards); use \"bf16\"");
  }
  if (auto v = env_int(env, "ACCELERATE_RESTART_COUNT")) {
    TORCH_CHECK(*v >= 0, "accelerate: ACCELERATE_RESTART_COUNT must be >= 0, got ", *v);
    c.restart_count = *v;
    src["restart_count"] = "environment";
  } else {
    src["restart_count"] = "default";
  }
  return c;
}

std::string AcceleratorConfig::describe() const {
  std::ostringstream out;
  auto line = [&](const std::string& name, const auto& value) {
    detail::describe_line(out, name, value, sources);
  };
  line("device_placement", device_placement ? "true" : "false");
  line("split_batches", split_batches ? "true" : "false");
  line("mixed_precision", to_string(mixed_precision));
  line("gradient_accumulation_steps", gradient_accumulation.num_steps);
  line("cpu", cpu ? (*cpu ? "true" : "false") : "auto");
  line("rng_types", join_rng(rng_types));
  line("project_dir", project_config.project_dir.empty() ? "(none)" : project_config.project_dir);
  std::string trackers;
  for (const auto& spec : log_with) trackers += (trackers.empty() ? "" : ", ") + spec.name();
  line("log_with", trackers.empty() ? "(none)" : trackers);
  line("dispatch_batches",
       dispatch_batches ? (*dispatch_batches ? "true" : "false") : "auto (iterable datasets)");
  line("even_batches", even_batches ? "true" : "false");
  line("use_seedable_sampler", use_seedable_sampler ? "true" : "false");
  line("step_scheduler_with_optimizer", step_scheduler_with_optimizer ? "true" : "false");
  line("restart_count", restart_count);
  out << sharding.describe();
  return out.str();
}

// ---------------------------------------------------------------------- core

namespace detail {

GradientSynchronizer* AcceleratorCore::synchronizer(const torch::nn::Module* module) const {
  auto it = synchronizers.find(module);
  return it == synchronizers.end() ? nullptr : it->second.get();
}

ZeroOptimizer* AcceleratorCore::zero(OptimizerSlot& slot) {
  if (slot.zero) return slot.zero.get();
  if (!config.sharding.sharded() || !state->use_distributed()) return nullptr;
  std::vector<GradientSynchronizer*> syncs;
  for (auto& [module, sync] : synchronizers) syncs.push_back(sync.get());
  slot.zero = std::make_shared<ZeroOptimizer>(
      *slot.optimizer, syncs, state,
      ZeroOptions{.stage = config.sharding.stage,
                  .gradient_clipping = config.sharding.gradient_clipping,
                  .offload_optimizer = config.sharding.offload_optimizer});
  if (!slot.pending_sharded_load.empty()) {
    slot.zero->load_sharded(slot.pending_sharded_load);
    slot.pending_sharded_load.clear();
  }
  return slot.zero.get();
}

void AcceleratorCore::unscale(OptimizerSlot& slot) {
  if (!scaler || slot.unscaled) return;
  scaler->unscale_(*slot.optimizer);
  slot.unscaled = true;
}

}  // namespace detail

// ---------------------------------------------------------------------- wrappers

AcceleratedOptimizer::AcceleratedOptimizer(std::shared_ptr<detail::OptimizerSlot> slot,
                                           std::shared_ptr<detail::AcceleratorCore> core)
    : slot_(std::move(slot)), core_(std::move(core)) {}

void AcceleratedOptimizer::step() {
  if (!core_->gradient_state->sync_gradients()) return;
  // Gradient hooks finish their all-reduce at the end of backward; make sure, in case backward
  // ran without them (e.g. retain_graph and a second call).
  for (auto& [module, sync] : core_->synchronizers) sync->finalize();
  if (auto* zero = core_->zero(*slot_)) {
    zero->step();
    slot_->step_was_skipped = false;
  } else if (core_->scaler) {
    core_->unscale(*slot_);
    const bool stepped = core_->scaler->step(*slot_->optimizer);
    core_->scaler->update();
    slot_->step_was_skipped = !stepped;
  } else {
    slot_->optimizer->step();
    slot_->step_was_skipped = false;
  }
  slot_->unscaled = false;
  // DDP broadcasts buffers (e.g. batch-norm statistics) from process 0 before each forward;
  // without a forward wrapper the step is the point where every process agrees again.
  for (auto& [module, sync] : core_->synchronizers) {
    if (core_->config.ddp_kwargs.broadcast_buffers) sync->broadcast_buffers();
  }
}

void AcceleratedOptimizer::zero_grad(bool set_to_none) {
  if (!core_->gradient_state->sync_gradients()) return;
  if (auto* zero = core_->zero(*slot_)) {
    // The optimizer holds the pieces; the model's parameters' own gradients go too.
    zero->zero_grad();
    for (auto& [module, sync] : core_->synchronizers) {
      for (auto& p : sync->parameters()) {
        if (!p.mutable_grad().defined()) continue;
        if (set_to_none) {
          p.mutable_grad().reset();
        } else {
          p.mutable_grad().detach_();
          p.mutable_grad().zero_();
        }
      }
    }
  }
  for (auto& group : slot_->optimizer->param_groups()) {
    for (auto& p : group.params()) {
      if (!p.mutable_grad().defined()) continue;
      if (set_to_none) {
        p.mutable_grad().reset();
      } else {
        p.mutable_grad().detach_();
        p.mutable_grad().zero_();
      }
    }
  }
}

AcceleratedScheduler::AcceleratedScheduler(std::shared_ptr<LRScheduler> scheduler,
                                           std::shared_ptr<detail::AcceleratorCore> core)
    : scheduler_(std::move(scheduler)), core_(std::move(core)) {
  TORCH_CHECK(scheduler_, "accelerate: prepare_scheduler was given a null scheduler");
}

void AcceleratedScheduler::step() {
  const auto& config = core_->config;
  if (!config.step_scheduler_with_optimizer) {
    scheduler_->step();
    return;
  }
  // Accumulating: the optimizer did not step, so neither does the schedule.
  if (!core_->gradient_state->sync_gradients()) return;
  for (const auto& slot : core_->optimizers) {
    if (slot->optimizer == &scheduler_->optimizer() && slot->step_was_skipped) return;
  }
  // Each process saw 1/num_processes of the samples the schedule was written for.
  const int times = config.split_batches ? 1 : core_->state->num_processes();
  for (int i = 0; i < times; ++i) scheduler_->step();
}

SyncGuard::~SyncGuard() {
  for (auto it = saved_.rbegin(); it != saved_.rend(); ++it)
    it->first->set_require_sync(it->second);
}

void SyncGuard::set(GradientSynchronizer* sync, bool require) {
  if (!sync) return;
  saved_.emplace_back(sync, sync->require_sync());
  sync->set_require_sync(require);
}

// ---------------------------------------------------------------------- Accelerator

Accelerator::Accelerator(const AcceleratorOptions& options)
    : core_(std::make_shared<detail::AcceleratorCore>()) {
  auto& core = *core_;
  core.config = resolve_accelerator_options(options, current_environment());
  const auto& c = core.config;
  if (options.state) {
    core.state = options.state;
  } else {
    PartialState::shared({.cpu = c.cpu, .init_kwargs = c.init_kwargs});
    core.state = PartialState::shared_if_created();
  }
  core.gradient_state =
      options.gradient_state ? options.gradient_state : data::GradientState::shared_ptr();
  core.gradient_state->set_sync_with_dataloader(c.gradient_accumulation.sync_with_dataloader);
  core.gradient_state->set_sync_gradients(true);

  const auto& device = core.state->device();
  if (c.mixed_precision == MixedPrecision::FP16) {
    TORCH_CHECK(device.is_cuda(),
                "accelerate: mixed_precision=\"fp16\" needs a CUDA device, but this process runs "
                "on ",
                device.str(), "; use \"bf16\" on the CPU");
    core.scaler = std::make_unique<GradScaler>(c.scaler_kwargs);
  }
  if (c.project_config.automatic_checkpoint_naming && c.restart_count > 0) begin_auto_resume();
}

DistributedType Accelerator::distributed_type() const {
  const auto type = core_->state->distributed_type();
  if (type == DistributedType::NO) return type;
  if (core_->config.sharding.engine == "fsdp") return DistributedType::FSDP;
  if (core_->config.sharding.engine == "deepspeed") return DistributedType::DEEPSPEED;
  return type;
}

void Accelerator::finish_prepare() {
  auto& core = *core_;
  if (!core.config.sharding.sharded() || !core.state->use_distributed()) return;
  std::unordered_set<const c10::TensorImpl*> synchronized;
  for (auto& [module, sync] : core.synchronizers) {
    for (const auto& p : sync->parameters()) synchronized.insert(p.unsafeGetTensorImpl());
  }
  for (auto& slot : core.optimizers) {
    if (slot->zero) continue;
    bool ready = true;
    for (const auto& group : slot->optimizer->param_groups()) {
      for (const auto& p : group.params())
        ready = ready && synchronized.count(p.unsafeGetTensorImpl());
    }
    // Otherwise its model comes later; the first step builds it, or names what is missing.
    if (ready) core.zero(*slot);
  }
}

bool Accelerator::verify_device_map(const torch::nn::Module& model) const {
  const auto info = dispatch_info(model);
  if (!info) return false;
  std::set<std::string> devices;
  for (const auto& entry : info->device_map) devices.insert(entry.second);
  return devices.size() > 1;
}

void Accelerator::prepare_module(const std::shared_ptr<torch::nn::Module>& module,
                                 const PrepareModelOptions& options) {
  TORCH_CHECK(module, "accelerate: prepare_model was given an empty model");
  auto& core = *core_;
  const bool dispatched = verify_device_map(*module);
  TORCH_CHECK(!dispatched || !core.state->use_distributed() ||
                  env_bool(current_environment(), "ACCELERATE_BYPASS_DEVICE_MAP").value_or(false),
              "accelerate: a model dispatched across devices (dispatch_model / "
              "load_checkpoint_and_dispatch) cannot be trained in a distributed mode; run it "
              "with one process (--num_processes 1)");
  if (options.device_placement.value_or(core.config.device_placement) && !dispatched) {
    module->to(core.state->device());
  }
  for (const auto& m : core.models) {
    if (m.get() == module.get()) return;  // prepared before
  }
  core.models.push_back(module);
  resume_next(ResumeKind::kModel);
  if (options.evaluation_mode || !core.state->use_distributed()) return;
  bool trainable = false;
  for (const auto& p : module->parameters()) trainable = trainable || p.requires_grad();
  if (!trainable) return;
  std::shared_ptr<GradientSynchronizer> sync;
  if (core.config.sharding.stage == 3) {
    FullyShardedOptions full = core.config.sharding.full_shard;
    // Accelerate's FSDP policy for mixed_precision="bf16": parameters, reductions and buffers
    // in bfloat16, master weights (the shards) in float32.
    if (core.config.mixed_precision == MixedPrecision::BF16 && !full.mixed_precision.param_dtype) {
      full.mixed_precision = {at::kBFloat16, at::kBFloat16, at::kBFloat16};
    }
    sync = std::make_shared<GradientSynchronizer>(module, core.state, full);
    static std::once_flag param_offload_note;
    if (full.cpu_offload && !core.state->device().is_cuda()) {
      std::call_once(param_offload_note, [&] {
        if (core.state->is_main_process()) {
          std::cerr << "accelerate: cpu_offload / offload_param_device=cpu: this run is on the "
                       "CPU, where the parameter shards already live; nothing to offload\n";
        }
      });
    }
  } else {
    sync = std::make_shared<GradientSynchronizer>(module, core.state, core.config.ddp_kwargs);
    if (core.config.sharding.sharded()) sync->shard_gradients(core.config.sharding.stage);
  }
  core.synchronizers[module.get()] = std::move(sync);
  static std::once_flag offload_note;
  if (core.config.sharding.offload_optimizer && !core.state->device().is_cuda()) {
    std::call_once(offload_note, [&] {
      if (core.state->is_main_process()) {
        std::cerr << "accelerate: offload_optimizer_device=cpu: this run is on the CPU, where the "
                     "optimizer state already lives; nothing to offload\n";
      }
    });
  }
  finish_prepare();
}

void Accelerator::remember_optimizer(torch::optim::Optimizer* optimizer,
                                     std::shared_ptr<torch::optim::Optimizer> owner) {
  for (const auto& slot : core_->optimizers) {
    if (slot->optimizer == optimizer) return;
  }
  auto slot = std::make_shared<detail::OptimizerSlot>();
  slot->optimizer = optimizer;
  slot->owner = std::move(owner);
  core_->optimizers.push_back(std::move(slot));
  resume_next(ResumeKind::kOptimizer);
}

AcceleratedOptimizer Accelerator::prepare_optimizer(torch::optim::Optimizer& optimizer) {
  remember_optimizer(&optimizer, nullptr);
  finish_prepare();
  for (const auto& slot : core_->optimizers) {
    if (slot->optimizer == &optimizer) return AcceleratedOptimizer(slot, core_);
  }
  TORCH_INTERNAL_ASSERT(false, "optimizer slot missing");
}

AcceleratedOptimizer Accelerator::prepare_optimizer(
    std::shared_ptr<torch::optim::Optimizer> optimizer) {
  TORCH_CHECK(optimizer, "accelerate: prepare_optimizer was given a null optimizer");
  auto* raw = optimizer.get();
  remember_optimizer(raw, std::move(optimizer));
  return prepare_optimizer(*raw);
}

AcceleratedScheduler Accelerator::prepare_scheduler(std::shared_ptr<LRScheduler> scheduler) {
  TORCH_CHECK(scheduler, "accelerate: prepare_scheduler was given a null scheduler");
  if (std::find(core_->schedulers.begin(), core_->schedulers.end(), scheduler) ==
      core_->schedulers.end()) {
    core_->schedulers.push_back(scheduler);
    resume_next(ResumeKind::kScheduler);
  }
  return AcceleratedScheduler(std::move(scheduler), core_);
}

data::PrepareDataLoaderOptions Accelerator::data_loader_options() const {
  const auto& c = core_->config;
  data::PrepareDataLoaderOptions o;
  o.device = core_->state->device();
  o.device_placement = c.device_placement;
  o.split_batches = c.split_batches;
  o.dispatch_batches = c.dispatch_batches;
  o.even_batches = c.even_batches;
  o.rng_types = c.rng_types;
  o.use_seedable_sampler = c.use_seedable_sampler;
  o.state = core_->state;
  o.gradient_state = core_->gradient_state;
  return o;
}

void Accelerator::do_sync() {
  auto& core = *core_;
  auto& gs = *core.gradient_state;
  if (gs.sync_with_dataloader() && gs.end_of_dataloader()) {
    core.step = 0;
    gs.set_sync_gradients(true);
  } else {
    core.step += 1;
    gs.set_sync_gradients(core.step % core.config.gradient_accumulation.num_steps == 0);
  }
}

void Accelerator::backward(const at::Tensor& loss, const BackwardOptions& options) {
  if (core_->resume) end_auto_resume();
  at::Tensor scaled = loss;
  const auto steps = core_->config.gradient_accumulation.num_steps;
  if (steps > 1) scaled = scaled / static_cast<double>(steps);
  if (core_->scaler) scaled = core_->scaler->scale(scaled);
  scaled.backward({}, options.retain_graph, options.create_graph);
  for (auto& [module, sync] : core_->synchronizers) sync->finalize();
}

AutocastScope Accelerator::autocast(const AutocastKwargs& kwargs) const {
  const auto precision = core_->config.mixed_precision;
  if (precision == MixedPrecision::NO) return {};
  const auto& device = core_->state->device();
  const auto dtype = precision == MixedPrecision::BF16 ? at::kBFloat16 : at::kHalf;
  return AutocastScope(device.type(), dtype, kwargs);
}

void Accelerator::unscale_gradients() {
  for (auto& slot : core_->optimizers) core_->unscale(*slot);
}

namespace {

// Under ZeRO the gradients live in the optimizers' shards. One engine holds the norm's parts on
// every process; several optimizers would each hold a part of it.
ZeroOptimizer* sharded_gradients(detail::AcceleratorCore& core, const char* what) {
  std::vector<ZeroOptimizer*> engines;
  for (auto& slot : core.optimizers) {
    if (auto* z = core.zero(*slot)) engines.push_back(z);
  }
  if (engines.empty()) return nullptr;
  TORCH_CHECK(engines.size() == 1, "accelerate: ", what,
              " under ZeRO sharding supports one "
              "prepared optimizer, this Accelerator has ",
              engines.size());
  return engines[0];
}

}  // namespace

double Accelerator::clip_grad_norm_(const std::vector<at::Tensor>& parameters, double max_norm,
                                    double norm_type) {
  unscale_gradients();
  if (auto* zero = sharded_gradients(*core_, "clip_grad_norm_")) {
    return zero->clip_grad_norm(parameters, max_norm, norm_type);
  }
  return torch::nn::utils::clip_grad_norm_(parameters, max_norm, norm_type);
}

void Accelerator::clip_grad_value_(const std::vector<at::Tensor>& parameters, double clip_value) {
  unscale_gradients();
  if (auto* zero = sharded_gradients(*core_, "clip_grad_value_")) {
    zero->clip_grad_value(parameters, clip_value);
    return;
  }
  torch::nn::utils::clip_grad_value_(parameters, clip_value);
}

bool Accelerator::optimizer_step_was_skipped() const {
  for (const auto& slot : core_->optimizers) {
    if (slot->step_was_skipped) return true;
  }
  return false;
}

torch::OrderedDict<std::string, at::Tensor> Accelerator::get_state_dict(
    const torch::nn::Module& model) const {
  torch::OrderedDict<std::string, at::Tensor> out;
  if (auto full = detail::full_shard_core_of(model)) {
    // Collective under full sharding: gathered one unit at a time, in the shards' dtype.
    const auto specs = detail::full_state_specs(*full, model);
    detail::FullStateReader reader(*full, specs);
    for (size_t k = 0; k < specs.specs.size(); ++k) {
      out.insert(specs.specs[k].first, reader(k).to(at::kCPU, false, /*copy=*/true));
    }
    // Tied names, as named_parameters lists them.
    for (const auto& item : model.named_parameters()) {
      if (out.contains(item.key())) continue;
      for (size_t k = 0; k < specs.specs.size(); ++k) {
        const auto& p = specs.param[k];
        if (p && full->params[*p].tensor.is_same(item.value())) {
          out.insert(item.key(), out[specs.specs[k].first]);
        }
      }
    }
    return out;
  }
  for (const auto& item : model.named_parameters()) {
    out.insert(item.key(), item.value().detach().to(at::kCPU, /*non_blocking=*/false,
                                                    /*copy=*/true));
  }
  for (const auto& item : model.named_buffers()) {
    out.insert(item.key(), item.value().detach().to(at::kCPU, false, true));
  }
  return out;
}

void Accelerator::free_memory() {
  // Fully sharded models get their whole parameters back first (collective), so that they stay
  // usable once the sharding engine is gone.
  for (auto& [module, sync] : core_->synchronizers) {
    if (sync->full_shard()) sync->full_shard()->gather_all_whole();
  }
  core_->synchronizers.clear();
  core_->models.clear();
  core_->optimizers.clear();
  core_->schedulers.clear();
  core_->loaders.clear();
  core_->step = 0;
  core_->gradient_state->set_sync_gradients(true);
}

}  // namespace accelerate
