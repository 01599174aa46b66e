// The `accelerate` config file: a YAML file with Python Accelerate's keys, so that a file written
// by either tool is read by the other. `accelerate config` writes it, `accelerate launch` reads
// it (command-line flag > config file > default). A file whose name ends in ".json" is written
// as JSON, as Python does; JSON files are read like YAML ones (YAML is a superset of JSON).
//
// Example:
//   std::vector<std::string> warnings;
//   auto path = accelerate::cli::default_config_path(environment);  // may not exist
//   if (std::filesystem::exists(path)) {
//     auto config = accelerate::cli::load_config_file(path, &warnings);  // UsageError if bad
//     int n = config.num_processes.value_or(1);
//   }
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

namespace accelerate::cli {

/// The contents of `fsdp_config:` or `deepspeed_config:`.
///
/// Example:
///   PluginConfig fsdp{.values = {{"fsdp_sharding_strategy", "SHARD_GRAD_OP"}}};
struct PluginConfig {
  /// Key (as the schema in sharding.h names it, e.g. "fsdp_sharding_strategy", "zero_stage") ->
  /// the value in canonical form (normalize_sharding_value: "true", "2", "1.0", "cpu"). Python's
  /// older spellings are stored under the current key. deepspeed_config may also hold
  /// "gradient_accumulation_steps" (a whole number of at least 1).
  std::map<std::string, std::string> values;
  /// Keys Python writes that mean nothing here (DeepSpeed's hostfile and filters): key -> the
  /// value as YAML text, like ClusterConfig::passthrough.
  std::map<std::string, std::string> passthrough;
};

/// The keys of Python Accelerate's `ClusterConfig` that mean something for accelerate-cpp. Every
/// field is optional: absent in the file, absent here.
struct ClusterConfig {
  /// "LOCAL_MACHINE" (the only one we support; "AMAZON_SAGEMAKER" is an error naming it).
  std::optional<std::string> compute_environment;
  /// "NO", "MULTI_CPU", "MULTI_GPU", "FSDP" or "DEEPSPEED" (others, e.g. "XLA", "MEGATRON_LM": an
  /// error naming it). FSDP and DEEPSPEED turn the plugin on, over several processes on CPUs
  /// (with use_cpu) or GPUs. Python requires it; a file without it loads here with a warning.
  std::optional<std::string> distributed_type;
  /// "no", "fp16", "bf16" ("fp8": an error).
  std::optional<std::string> mixed_precision;
  std::optional<int> num_processes;
  std::optional<int> num_machines;
  std::optional<int> machine_rank;
  std::optional<std::string> main_process_ip;
  std::optional<int> main_process_port;
  std::optional<bool> use_cpu;
  /// "all" or a comma-separated list such as "0,1".
  std::optional<std::string> gpu_ids;
  /// "static" or "c10d".
  std::optional<std::string> rdzv_backend;
  std::optional<bool> same_network;
  std::optional<bool> debug;
  /// Python's questionnaire writes the string 'no' here, read as false; we write a boolean, which
  /// Python reads too.
  std::optional<bool> downcast_bf16;
  /// Our extension (Python keeps it in deepspeed_config): written only when not 1, because
  /// Python Accelerate refuses files with keys it does not know.
  std::optional<int> gradient_accumulation_steps;
  /// The `fsdp_config:` and `deepspeed_config:` mappings; absent when the file has no such key
  /// (an empty mapping `{}` is kept, as older Python versions wrote it).
  std::optional<PluginConfig> fsdp_config;
  std::optional<PluginConfig> deepspeed_config;
  /// Keys Python Accelerate writes that have no meaning here (tpu_*, dynamo_config,
  /// enable_cpu_affinity, main_training_function, ...): key -> the value as YAML text (e.g.
  /// "false", "[]", "dynamo_backend: INDUCTOR\n"), so a rewrite loses nothing. Values are
  /// re-emitted (nested keys sorted, strings quoted where needed), not copied byte for byte.
  std::map<std::string, std::string> passthrough;
};

/// This process's environment as NAME -> VALUE: what default_config_path() and count_gpus() take
/// (they take it as an argument so that tests can give them any).
std::map<std::string, std::string> current_environment();

/// `$HF_HOME/accelerate/default_config.yaml`, else
/// `$XDG_CACHE_HOME/huggingface/accelerate/default_config.yaml`, else
/// `~/.cache/huggingface/accelerate/default_config.yaml` (Python Accelerate's rule), from the given
/// environment (NAME -> VALUE). A leading `~` is its HOME (else the password database's home);
/// an empty variable counts as unset (Python would take it as a relative path).
std::string default_config_path(const std::map<std::string, std::string>& environment);

/// Reads and validates a config file. Unknown keys, top-level or inside fsdp_config and
/// deepspeed_config, are appended to `warnings` (one line each, naming the key) and dropped; keys
/// Python writes that mean nothing here go to `passthrough` silently; a null value counts as
/// absent. A bad value (wrong type, out of range, a feature accelerate-cpp lacks such as XLA or
/// fp8, machine_rank >= num_machines, a sharding value Accelerate does not accept) is a
/// UsageError naming the file, the key (`fsdp_config.fsdp_sharding_strategy` for nested ones) and
/// the value; malformed YAML is one naming the line and column; a missing or unreadable file is
/// one naming the path. `warnings` may be null.
ClusterConfig load_config_file(const std::string& path, std::vector<std::string>* warnings);

/// The YAML text of `config`, keys in Python Accelerate's order (PyYAML's: sorted). Strings a
/// YAML 1.1 reader could take for something else are quoted (`mixed_precision: 'no'`).
std::string config_to_yaml(const ClusterConfig& config);

/// The JSON text of `config`, as Python's `json.dumps(indent=2, sort_keys=True)` writes it.
std::string config_to_json(const ClusterConfig& config);

/// Writes config_to_yaml(config) to `path`, or config_to_json(config) when `path` ends in ".json"
/// (parent directories created; written to a temporary file renamed over `path`, so a reader
/// never sees half a file). Failure is a UsageError naming the path.
void save_config_file(const ClusterConfig& config, const std::string& path);

/// Python's `write_basic_config`: a one-machine config (MULTI_GPU when there is more than one
/// GPU, else NO; use_cpu when there is none) with `mixed_precision` ("no", "fp16" or "bf16",
/// any case; anything else is a UsageError) and the keys Python writes with it.
ClusterConfig basic_config(const std::string& mixed_precision, int num_gpus);

/// NVIDIA GPUs this process could use: the entries of /proc/driver/nvidia/gpus (0 without the
/// driver), narrowed by CUDA_VISIBLE_DEVICES from `environment` as CUDA narrows them. The CLI
/// does not link CUDA, so this is what stands in for torch.cuda.device_count().
int count_gpus(const std::map<std::string, std::string>& environment);

/// True for "all" or a comma-separated list of GPU ids such as "0,1" (what `gpu_ids` may hold).
bool is_valid_gpu_ids(const std::string& gpu_ids);

}  // namespace accelerate::cli
