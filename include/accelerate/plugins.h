#pragma once
/// \file
/// Sharded data parallelism options: Accelerate's `FullyShardedDataParallelPlugin` and
/// `DeepSpeedPlugin`, with their Python names, and the one engine both drive (zero.h).
///
/// Stages, as ZeRO numbers them: 0 = today's data parallelism (every process holds everything);
/// 1 = each process keeps the optimizer state of its shard of the parameters only; 2 = the
/// averaged gradients too (FSDP's SHARD_GRAD_OP); 3 = the parameters too (FSDP's FULL_SHARD,
/// fsdp.h). FSDP's NO_SHARD is stage 0.
///
/// Fields left unset come from the environment `accelerate launch` writes (env_names.h), else
/// from Accelerate's defaults: explicit > environment (which carries the config file) > default.
///
/// Example:
/// \code
///   accelerate::Accelerator acc({.deepspeed_plugin = accelerate::DeepSpeedPlugin{
///                                    .zero_stage = 2, .gradient_clipping = 1.0}});
///   accelerate::Accelerator fsdp({.fsdp_plugin = accelerate::FullyShardedDataParallelPlugin{
///       .sharding_strategy = accelerate::ShardingStrategy::SHARD_GRAD_OP}});
/// \endcode

#include <accelerate/environment.h>
#include <accelerate/fsdp.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace accelerate {

/// PyTorch FSDP's sharding strategies, numbered as PyTorch numbers them (1-5).
enum class ShardingStrategy {
  FULL_SHARD = 1,
  SHARD_GRAD_OP = 2,
  NO_SHARD = 3,
  HYBRID_SHARD = 4,
  HYBRID_SHARD_ZERO2 = 5
};
std::string to_string(ShardingStrategy strategy);
/// A name ("SHARD_GRAD_OP") or PyTorch's number ("2"); anything else is an error listing the
/// choices.
ShardingStrategy sharding_strategy_from_string(const std::string& text);

/// How checkpoints store sharded state (PyTorch FSDP's StateDictType, numbered 1-3).
enum class StateDictType { FULL_STATE_DICT = 1, LOCAL_STATE_DICT = 2, SHARDED_STATE_DICT = 3 };
std::string to_string(StateDictType type);
StateDictType state_dict_type_from_string(const std::string& text);

/// Accelerate's `FullyShardedDataParallelPlugin`. Unset fields come from `FSDP_*` variables.
///
/// Example:
/// \code
///   accelerate::FullyShardedDataParallelPlugin plugin{
///       .sharding_strategy = accelerate::ShardingStrategy::SHARD_GRAD_OP,
///       .state_dict_type = accelerate::StateDictType::SHARDED_STATE_DICT};
/// \endcode
struct FullyShardedDataParallelPlugin {
  /// Default FULL_SHARD, as Accelerate (`FSDP_SHARDING_STRATEGY`).
  std::optional<ShardingStrategy> sharding_strategy;
  /// Offload parameters (and their gradients) to the CPU (`FSDP_OFFLOAD_PARAMS`, default false;
  /// FULL_SHARD only).
  std::optional<bool> cpu_offload;
  /// Default FULL_STATE_DICT (`FSDP_STATE_DICT_TYPE`). LOCAL_STATE_DICT is not supported.
  std::optional<StateDictType> state_dict_type;
  /// Start every process from process 0's parameters and buffers (`FSDP_SYNC_MODULE_STATES`,
  /// default true). Stages 0-2 always do this; FULL_SHARD skips the broadcast when false.
  std::optional<bool> sync_module_states;
  /// Wrapping and prefetch settings of FULL_SHARD (fsdp.h), with Accelerate's defaults:
  /// `auto_wrap_policy` TRANSFORMER_BASED_WRAP, SIZE_BASED_WRAP or NO_WRAP (default);
  /// `min_num_params` (default 1e8); `backward_prefetch` BACKWARD_PRE, BACKWARD_POST or
  /// NO_PREFETCH (default); `forward_prefetch` (default false). `use_orig_params` is accepted
  /// (parameters always stay the module's own tensors); `cpu_ram_efficient_loading` makes only
  /// process 0 read checkpoints of the model; `activation_checkpointing` is refused.
  std::optional<std::string> auto_wrap_policy;
  std::optional<int64_t> min_num_params;
  std::optional<std::vector<std::string>> transformer_layer_cls_to_wrap;
  std::optional<std::string> backward_prefetch;
  std::optional<bool> forward_prefetch;
  std::optional<bool> use_orig_params;
  std::optional<bool> cpu_ram_efficient_loading;
  std::optional<bool> activation_checkpointing;
};

/// Accelerate's `DeepSpeedPlugin`: the ZeRO settings of a DeepSpeed config, run by
/// accelerate-cpp's own engine (DeepSpeed itself is Python). Unset fields come from
/// `ACCELERATE_DEEPSPEED_*` variables, or from the JSON file `hf_ds_config`.
///
/// Example:
/// \code
///   accelerate::DeepSpeedPlugin plugin{.zero_stage = 1, .gradient_accumulation_steps = 4};
///   accelerate::DeepSpeedPlugin from_file{.hf_ds_config = "ds_config.json"};
/// \endcode
struct DeepSpeedPlugin {
  /// 0, 1, 2 or 3. Default 2, as Accelerate. Stage 3 units are chosen by size (submodules of at
  /// least 1e5 parameters, DeepSpeed's persistence threshold).
  std::optional<int> zero_stage;
  /// Becomes the Accelerator's gradient_accumulation_steps (they must agree if both are given).
  std::optional<int64_t> gradient_accumulation_steps;
  /// Clip the global gradient norm to this at every optimizer step, as DeepSpeed's engine does.
  std::optional<double> gradient_clipping;
  /// "none" or "cpu" ("nvme" is refused). "cpu" keeps shards and optimizer state in (pinned)
  /// CPU memory; on a CPU-only run there is nothing to move and it says so once.
  std::optional<std::string> offload_optimizer_device;
  /// "none" or "cpu" (stage 3 only).
  std::optional<std::string> offload_param_device;
  std::optional<std::string> offload_optimizer_nvme_path;
  std::optional<std::string> offload_param_nvme_path;
  std::optional<bool> zero3_init_flag;
  std::optional<bool> zero3_save_16bit_model;
  /// A DeepSpeed JSON config file (`deepspeed_config_file`). Read for the keys accelerate-cpp
  /// supports; any other key is an error naming it. Settings it holds must not also be given
  /// as fields or through `ACCELERATE_DEEPSPEED_*` variables.
  std::optional<std::string> hf_ds_config;
};

/// What the sharding engine runs with, after resolution.
struct ShardingConfig {
  /// "none" (plain data parallelism), "fsdp" or "deepspeed".
  std::string engine = "none";
  /// ZeRO stage: 0, 1, 2 or 3.
  int stage = 0;
  /// Stage 3's settings (wrap policy, prefetch, offload; the mixed-precision policy is filled
  /// by the Accelerator from its mixed_precision).
  FullyShardedOptions full_shard;
  /// FSDP cpu_ram_efficient_loading: only process 0 reads a model checkpoint.
  bool cpu_ram_efficient_loading = false;
  /// FSDP's strategy (FSDP only), for printing.
  std::optional<ShardingStrategy> sharding_strategy;
  /// How save_state writes the sharded optimizer state: SHARDED_STATE_DICT writes one file per
  /// process plus an index; FULL_STATE_DICT gathers it on the main process into the ordinary
  /// file. DeepSpeed always writes sharded state, as DeepSpeed does.
  StateDictType state_dict_type = StateDictType::FULL_STATE_DICT;
  bool offload_optimizer = false;
  std::optional<double> gradient_clipping;
  /// From DeepSpeedPlugin::gradient_accumulation_steps or its JSON file, if given.
  std::optional<int64_t> gradient_accumulation_steps;
  bool sync_module_states = true;
  bool zero3_save_16bit_model = false;
  /// Mixed precision from the DeepSpeed JSON ("bf16"/"fp16" enabled), if it says.
  std::optional<std::string> mixed_precision;
  /// Field -> "argument", "environment", "config file" (the DeepSpeed JSON) or "default".
  std::map<std::string, std::string> sources;

  bool sharded() const { return stage > 0; }
  /// One line per field, with its source: "zero_stage = 2 (environment)".
  std::string describe() const;
};

/// Resolves the plugins (given as AcceleratorOptions fields) with the environment. Errors are one
/// line naming the bad value and where it came from: both plugins, an unknown strategy, stage 4,
/// nvme offload, parameter offload below stage 3, HYBRID_SHARD, activation checkpointing, an
/// unknown key in the DeepSpeed JSON.
///
/// Example:
/// \code
///   auto cfg = accelerate::resolve_sharding(std::nullopt, accelerate::DeepSpeedPlugin{.zero_stage
///   = 1},
///                                           accelerate::current_environment());
///   assert(cfg.stage == 1);
/// \endcode
ShardingConfig resolve_sharding(const std::optional<FullyShardedDataParallelPlugin>& fsdp,
                                const std::optional<DeepSpeedPlugin>& deepspeed, const EnvMap& env);

/// Reads a DeepSpeed JSON config into a plugin (fields it sets; others stay unset) plus the
/// mixed precision it enables. Supported keys: `zero_optimization.{stage, offload_optimizer.
/// {device, pin_memory}, offload_param.device, overlap_comm, contiguous_gradients,
/// reduce_bucket_size, allgather_bucket_size, reduce_scatter, allgather_partitions,
/// stage3_gather_16bit_weights_on_model_save}`, `gradient_accumulation_steps`,
/// `gradient_clipping`, `train_batch_size`, `train_micro_batch_size_per_gpu`, `bf16.enabled`,
/// `fp16.enabled`, `steps_per_print`, `wall_clock_breakdown`, `zero_allow_untested_optimizer`.
/// Values may be "auto" where DeepSpeed allows it (filled by the Accelerator). Any other key is
/// an error naming it with its path ("optimizer", "scheduler.params", ...).
///
/// Example:
/// \code
///   auto [plugin, precision] = accelerate::read_deepspeed_config("ds_config.json");
/// \endcode
struct DeepSpeedJson {
  DeepSpeedPlugin plugin;
  std::optional<std::string> mixed_precision;
};
DeepSpeedJson read_deepspeed_config(const std::string& path);

}  // namespace accelerate
