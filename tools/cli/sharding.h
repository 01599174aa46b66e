// The sharding plugins' settings, as one schema shared by the three places that use them:
// `accelerate launch` (flags, precedence, the variables it writes), the config file (the keys of
// `fsdp_config:` and `deepspeed_config:`, how each is read and written) and `accelerate config`
// (the values its questions may produce). Names, defaults and written forms are Python
// Accelerate's (commands/launch.py, utils/launch.py); the variable names come from
// <accelerate/env_names.h>, the list the library reads.
//
// The launcher only checks that a value is one Accelerate accepts (a known strategy name, a
// stage from 0 to 3, ...). Whether the engine supports it (FULL_SHARD, stage 3, nvme offload) is
// the library's business: such values pass through and the library refuses them.
//
// Example:
//   const ShardingSetting* s = find_sharding_setting("zero_stage");
//   std::string why;
//   auto value = normalize_sharding_value(*s, "2", &why);  // "2"; nullopt and `why` when bad
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace accelerate::cli {

/// Which plugin a setting belongs to.
enum class ShardingPlugin { kFsdp, kDeepSpeed };

/// How a setting's value is checked, normalised and written to YAML.
enum class ShardingValueKind {
  /// true/false (Accelerate's spellings accepted, "true"/"false" written).
  kBool,
  /// One of `choices`, exactly as spelled.
  kChoice,
  /// One of `choices`, any case; written in lower case (Python lower-cases these).
  kLowerChoice,
  /// One of `choices` or its number, 1-based (PyTorch's enum values): "SHARD_GRAD_OP" or "2".
  kNamedNumber,
  /// A whole number of at least 0.
  kCount,
  /// A number of at least 0, written as Python's str(float) writes it ("1.0").
  kNumber,
  /// Any non-empty text.
  kText,
};

/// One setting of a sharding plugin.
struct ShardingSetting {
  ShardingPlugin plugin;
  /// The launch flag without its dashes, and the name --debug and error messages use.
  std::string flag;
  /// Its key inside the config file's fsdp_config / deepspeed_config mapping.
  std::string file_key;
  /// The variable the workers get; nullptr when the launcher writes none.
  const char* env = nullptr;
  ShardingValueKind kind = ShardingValueKind::kText;
  std::vector<std::string> choices;
  /// Python's argparse default, written to the workers when neither flag nor file gives one;
  /// unset: the variable is written only when a value is given.
  std::optional<std::string> default_value;
  /// For `accelerate launch -h`.
  std::string help;
};

/// Every setting, FSDP's first, in Python's order. DeepSpeed's gradient_accumulation_steps is not
/// here: it is the launcher's general --gradient_accumulation_steps (see config_file.h).
const std::vector<ShardingSetting>& sharding_settings();

/// The setting with this flag name, or nullptr.
const ShardingSetting* find_sharding_setting(const std::string& flag);

/// The setting a config-file key names, or nullptr. Python's older spellings are accepted: FSDP
/// keys without their "fsdp_" prefix (Python adds it) and fsdp_backward_prefetch_policy.
const ShardingSetting* find_sharding_file_key(ShardingPlugin plugin, const std::string& key);

/// The config-file mapping that holds a plugin's keys: "fsdp_config" or "deepspeed_config".
std::string sharding_section(ShardingPlugin plugin);

/// `text` in its canonical form (booleans "true"/"false", numbers in Python's spelling, devices
/// in lower case), or nullopt with `*expected` set to what it must be ("one of 0, 1, 2, 3").
std::optional<std::string> normalize_sharding_value(const ShardingSetting& setting,
                                                    const std::string& text, std::string* expected);

/// Python's repr() of a double: shortest round-trip digits, ".0" on whole numbers, exponent form
/// below 1e-4 and from 1e16 ("1.0", "0.5", "1e-05", "1e+16").
std::string python_float_repr(double value);

/// Accelerate's str_to_bool: y/yes/t/true/on/1 and n/no/f/false/off/0, any case.
std::optional<bool> parse_accelerate_bool(const std::string& text);

/// DeepSpeed's multi-node launchers, as Python lists them. Only "standard" (torchrun-style, one
/// launcher per machine) is how accelerate launch starts processes; the others need DeepSpeed's
/// own launcher.
const std::vector<std::string>& deepspeed_multinode_launchers();

/// Keys Python writes inside deepspeed_config that have no meaning here (the hostfile and
/// filters of DeepSpeed's own multi-node launchers, MoE layer names): kept, never used.
bool is_deepspeed_passthrough_key(const std::string& key);

}  // namespace accelerate::cli
