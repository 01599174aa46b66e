// `accelerate launch` and the sharding plugins: which one is on, each setting through the one
// precedence rule (flag > config file > Python's default), and the variables the workers get.
// The processes themselves are started exactly as without a plugin.
#include "command.h"
#include "launch.h"
#include "precedence.h"
#include "sharding.h"

#include <accelerate/env_names.h>

#include <filesystem>

namespace accelerate::cli {
namespace {

bool plugin_on(const LaunchConfig& config, ShardingPlugin plugin) {
  return plugin == ShardingPlugin::kFsdp ? config.use_fsdp : config.use_deepspeed;
}

// A plugin turned on by its flag, or by the config file's distributed_type.
bool resolve_switch(Precedence& precedence, const std::string& name, bool flag, bool in_file,
                    const std::string& file_type) {
  precedence.set_file_key(name, "distributed_type: " + file_type);
  precedence.set(name, flag      ? SettingSource::kFlag
                       : in_file ? SettingSource::kConfigFile
                                 : SettingSource::kDefault);
  return flag || in_file;
}

// Python passes the path on as given; the workers get it absolute, so that it still names the
// same file whatever directory the program moves to. "none" is Python's "no file".
void resolve_deepspeed_config_file(const Precedence& precedence, LaunchConfig& config) {
  const auto it = config.sharding.find("deepspeed_config_file");
  if (it == config.sharding.end()) return;
  if (it->second == "none") {
    config.sharding.erase(it);
    return;
  }
  namespace fs = std::filesystem;
  std::error_code error;
  const fs::path path(it->second);
  if (!fs::exists(path, error)) {
    throw UsageError(precedence.where_value("deepspeed_config_file", it->second) +
                     " does not exist");
  }
  if (!fs::is_regular_file(path, error)) {
    throw UsageError(precedence.where_value("deepspeed_config_file", it->second) +
                     " is not a file");
  }
  const fs::path absolute = fs::absolute(path, error);
  if (!error) it->second = absolute.lexically_normal().string();
}

}  // namespace

void resolve_sharding_plugins(const LaunchOptions& options, const ClusterConfig& from_file,
                              Precedence& precedence, LaunchConfig& config) {
  config.use_fsdp = resolve_switch(precedence, "use_fsdp", options.use_fsdp,
                                   from_file.distributed_type == "FSDP", "FSDP");
  config.use_deepspeed = resolve_switch(precedence, "use_deepspeed", options.use_deepspeed,
                                        from_file.distributed_type == "DEEPSPEED", "DEEPSPEED");
  if (config.use_fsdp && config.use_deepspeed) {
    throw UsageError(precedence.where("use_fsdp") + " and " + precedence.where("use_deepspeed") +
                     " cannot be used together: choose one sharding plugin");
  }

  for (const auto& setting : sharding_settings()) {
    const bool fsdp = setting.plugin == ShardingPlugin::kFsdp;
    const auto given = options.sharding_flags.find(setting.flag);
    if (!plugin_on(config, setting.plugin)) {
      // Python ignores them silently; a setting that cannot take effect is more likely a
      // forgotten --use_* than an intention.
      if (given != options.sharding_flags.end()) {
        throw UsageError("--" + setting.flag + " needs " +
                         (fsdp ? "--use_fsdp (or distributed_type: FSDP"
                               : "--use_deepspeed (or distributed_type: DEEPSPEED") +
                         " in the config file)");
      }
      continue;
    }
    std::optional<std::string> flag_value;
    if (given != options.sharding_flags.end()) {
      std::string expected;
      flag_value = normalize_sharding_value(setting, given->second, &expected);
      if (!flag_value) {
        throw UsageError("--" + setting.flag + " must be " + expected + ", got '" + given->second +
                         "'");
      }
    }
    std::optional<std::string> file_value;
    const auto& section = fsdp ? from_file.fsdp_config : from_file.deepspeed_config;
    if (section) {
      if (const auto it = section->values.find(setting.file_key); it != section->values.end()) {
        file_value = it->second;
      }
    }
    precedence.set_file_key(setting.flag,
                            sharding_section(setting.plugin) + "." + setting.file_key);
    const auto value = precedence.take(setting.flag, flag_value, file_value);
    if (value) {
      config.sharding[setting.flag] = *value;
    } else if (setting.default_value) {
      config.sharding[setting.flag] = *setting.default_value;
    }
  }

  if (config.use_fsdp) {
    // Python's prepare_multi_gpu_env refuses the same: with CPU-RAM-efficient loading only
    // process 0 reads the weights, and the others get them from the start-up broadcast.
    if (config.sharding.at("fsdp_cpu_ram_efficient_loading") == "true" &&
        config.sharding.at("fsdp_sync_module_states") == "false") {
      const bool by_default =
          config.sources.at("fsdp_cpu_ram_efficient_loading") == SettingSource::kDefault;
      throw UsageError(precedence.where_value("fsdp_sync_module_states", "false") + " needs " +
                       precedence.where("fsdp_cpu_ram_efficient_loading") + " false" +
                       (by_default ? " (it is true by default)" : " (it is true)") +
                       ": CPU-RAM-efficient loading relies on the start-up broadcast");
    }
  }
  if (config.use_deepspeed) {
    const auto launcher = config.sharding.find("deepspeed_multinode_launcher");
    if (launcher != config.sharding.end() && launcher->second != "standard") {
      throw UsageError(precedence.where_value("deepspeed_multinode_launcher", launcher->second) +
                       " is not supported: accelerate launch starts the processes of every "
                       "machine itself, as DeepSpeed's standard launcher does (use standard)");
    }
    resolve_deepspeed_config_file(precedence, config);
  }
}

std::vector<std::pair<std::string, std::string>> sharding_environment(const LaunchConfig& config) {
  std::vector<std::pair<std::string, std::string>> variables;
  if (config.use_fsdp) variables.emplace_back(env::kUseFsdp, "true");
  if (config.use_deepspeed) variables.emplace_back(env::kUseDeepSpeed, "true");
  for (const auto& setting : sharding_settings()) {
    if (setting.env == nullptr || !plugin_on(config, setting.plugin)) continue;
    if (const auto it = config.sharding.find(setting.flag); it != config.sharding.end()) {
      variables.emplace_back(setting.env, it->second);
    }
  }
  return variables;
}

}  // namespace accelerate::cli
