// The one precedence rule of `accelerate launch`, flag > config file > default, shared by every
// setting (launch.cpp) and the sharding plugins' settings (launch_sharding.cpp).
#pragma once

#include "launch.h"

#include <algorithm>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace accelerate::cli {

/// Records where each value came from and names the setting the way its source spells it, so that
/// an error about a value from the config file points at the file, not at a flag the user never
/// typed.
///
/// Example:
///   Precedence precedence(config, file);
///   config.num_machines = precedence.take("num_machines", flag, from_file).value_or(1);
///   throw UsageError(precedence.where("num_machines") + " must be at least 1");
class Precedence {
 public:
  Precedence(LaunchConfig& config, const std::optional<LaunchConfigFile>& file)
      : config_(config), file_(file) {}

  /// The flag's value, else the file's, else nothing (the caller's default applies).
  template <typename T>
  std::optional<T> take(const std::string& name, const std::optional<T>& flag,
                        const std::optional<T>& from_file) {
    if (flag) return record(name, SettingSource::kFlag, flag);
    if (from_file) return record(name, SettingSource::kConfigFile, from_file);
    return record(name, SettingSource::kDefault, std::optional<T>());
  }

  /// For settings that only have a flag.
  template <typename T>
  std::optional<T> flag(const std::string& name, const std::optional<T>& value) {
    return record(name, value ? SettingSource::kFlag : SettingSource::kDefault, value);
  }

  void set(const std::string& name, SettingSource source) { config_.sources[name] = source; }

  /// How the config file spells a setting whose key differs from the flag's name
  /// ("fsdp_config.fsdp_sharding_strategy", "distributed_type: FSDP").
  void set_file_key(const std::string& name, const std::string& key) { file_keys_[name] = key; }

  /// How a message names the setting: "--num_processes", or "num_processes in config file X".
  std::string where(const std::string& name) const {
    const auto it = config_.sources.find(name);
    if (it != config_.sources.end() && it->second == SettingSource::kConfigFile) {
      const auto key = file_keys_.find(name);
      return (key == file_keys_.end() ? name : key->second) + " in config file " + file_->path;
    }
    return "--" + name;
  }

  /// The setting with its value: "--zero_stage '4'", or
  /// "deepspeed_config.zero_stage '4' in config file X".
  std::string where_value(const std::string& name, const std::string& value) const {
    const std::string place = where(name);
    const auto in_file = place.find(" in config file ");
    const std::string quoted = " '" + value + "'";
    if (in_file == std::string::npos) return place + quoted;
    return place.substr(0, in_file) + quoted + place.substr(in_file);
  }

 private:
  template <typename T>
  std::optional<T> record(const std::string& name, SettingSource source,
                          const std::optional<T>& value) {
    config_.sources[name] = source;
    return value;
  }

  LaunchConfig& config_;
  const std::optional<LaunchConfigFile>& file_;
  std::map<std::string, std::string> file_keys_;
};

/// Throws UsageError "<where> must be one of A, B, got 'V'" unless `value` is one of `choices`.
inline void check_choice(const Precedence& precedence, const std::string& name,
                         const std::string& value, const std::vector<std::string>& choices) {
  if (std::find(choices.begin(), choices.end(), value) == choices.end()) {
    std::string list;
    for (const auto& choice : choices) list += (list.empty() ? "" : ", ") + choice;
    throw UsageError(precedence.where(name) + " must be one of " + list + ", got '" + value + "'");
  }
}

/// Resolves --use_fsdp / --use_deepspeed and their settings (sharding.h) into
/// config.use_fsdp, config.use_deepspeed and config.sharding, with their sources; throws
/// UsageError naming the flag or key and the value (launch_sharding.cpp).
void resolve_sharding_plugins(const LaunchOptions& options, const ClusterConfig& from_file,
                              Precedence& precedence, LaunchConfig& config);

}  // namespace accelerate::cli
