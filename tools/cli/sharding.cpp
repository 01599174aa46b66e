#include "sharding.h"

#include <accelerate/env_names.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <limits>

namespace accelerate::cli {
namespace {

using Kind = ShardingValueKind;

std::string lower(std::string text) {
  std::transform(text.begin(), text.end(), text.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return text;
}

std::string join(const std::vector<std::string>& items, const std::string& separator) {
  std::string out;
  for (const auto& item : items) out += (out.empty() ? "" : separator) + item;
  return out;
}

// Python's FSDP_SHARDING_STRATEGY, FSDP_AUTO_WRAP_POLICY, ... (utils/constants.py), in order:
// the position + 1 is PyTorch's enum value, which Accelerate accepts as well as the name.
const std::vector<std::string> kShardingStrategies = {"FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD",
                                                      "HYBRID_SHARD", "HYBRID_SHARD_ZERO2"};
const std::vector<std::string> kAutoWrapPolicies = {"TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP",
                                                    "NO_WRAP"};
const std::vector<std::string> kBackwardPrefetch = {"BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH"};
const std::vector<std::string> kStateDictTypes = {"FULL_STATE_DICT", "LOCAL_STATE_DICT",
                                                  "SHARDED_STATE_DICT"};
const std::vector<std::string> kZeroStages = {"0", "1", "2", "3"};
const std::vector<std::string> kOffloadDevices = {"none", "cpu", "nvme"};
const std::vector<std::string> kMultinodeLaunchers = {"pdsh", "standard", "openmpi", "mvapich",
                                                      "mpich"};

std::vector<ShardingSetting> make_settings() {
  const auto fsdp = ShardingPlugin::kFsdp;
  const auto ds = ShardingPlugin::kDeepSpeed;
  // Defaults are those of Python's `accelerate launch` arguments, which prepare_multi_gpu_env
  // always writes: strategy, offload, min_num_params and the booleans. The others reach the
  // workers only when given. FSDP_MIN_NUM_PARAMS: Python's default is the float 1e8, written
  // "100000000.0", which its own plugin cannot int(); the whole number is written here.
  // FSDP_ACTIVATION_CHECKPOINTING is written as later Accelerate versions write it (0.27's
  // plugin reads it, its launcher has no flag for it yet).
  return {
      {fsdp, "fsdp_sharding_strategy", "fsdp_sharding_strategy", env::kFsdpShardingStrategy,
       Kind::kNamedNumber, kShardingStrategies, "FULL_SHARD",
       "FSDP's sharding strategy: FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, HYBRID_SHARD, "
       "HYBRID_SHARD_ZERO2 or their numbers 1-5"},
      {fsdp,
       "fsdp_offload_params",
       "fsdp_offload_params",
       env::kFsdpOffloadParams,
       Kind::kBool,
       {},
       "false",
       "Offload parameters and gradients to the CPU: true or false"},
      {fsdp,
       "fsdp_min_num_params",
       "fsdp_min_num_params",
       env::kFsdpMinNumParams,
       Kind::kCount,
       {},
       "100000000",
       "Minimum parameters per unit for SIZE_BASED_WRAP"},
      {fsdp, "fsdp_auto_wrap_policy", "fsdp_auto_wrap_policy", env::kFsdpAutoWrapPolicy,
       Kind::kChoice, kAutoWrapPolicies, std::nullopt,
       "TRANSFORMER_BASED_WRAP, SIZE_BASED_WRAP or NO_WRAP"},
      {fsdp,
       "fsdp_transformer_layer_cls_to_wrap",
       "fsdp_transformer_layer_cls_to_wrap",
       env::kFsdpTransformerClsToWrap,
       Kind::kText,
       {},
       std::nullopt,
       "Comma-separated module type names to wrap with TRANSFORMER_BASED_WRAP"},
      {fsdp, "fsdp_backward_prefetch", "fsdp_backward_prefetch", env::kFsdpBackwardPrefetch,
       Kind::kChoice, kBackwardPrefetch, std::nullopt,
       "BACKWARD_PRE, BACKWARD_POST or NO_PREFETCH"},
      {fsdp, "fsdp_state_dict_type", "fsdp_state_dict_type", env::kFsdpStateDictType,
       Kind::kNamedNumber, kStateDictTypes, std::nullopt,
       "FULL_STATE_DICT, LOCAL_STATE_DICT, SHARDED_STATE_DICT or their numbers 1-3"},
      {fsdp,
       "fsdp_forward_prefetch",
       "fsdp_forward_prefetch",
       env::kFsdpForwardPrefetch,
       Kind::kBool,
       {},
       "false",
       "Prefetch the next all-gather during forward: true or false"},
      {fsdp,
       "fsdp_use_orig_params",
       "fsdp_use_orig_params",
       env::kFsdpUseOrigParams,
       Kind::kBool,
       {},
       "true",
       "FSDP's use_orig_params: true or false"},
      {fsdp,
       "fsdp_cpu_ram_efficient_loading",
       "fsdp_cpu_ram_efficient_loading",
       env::kFsdpCpuRamEfficientLoading,
       Kind::kBool,
       {},
       "true",
       "Only the first process loads the checkpoint; needs --fsdp_sync_module_states true: true "
       "or false"},
      {fsdp,
       "fsdp_sync_module_states",
       "fsdp_sync_module_states",
       env::kFsdpSyncModuleStates,
       Kind::kBool,
       {},
       "true",
       "Broadcast process 0's parameters at the start: true or false"},
      {fsdp,
       "fsdp_activation_checkpointing",
       "fsdp_activation_checkpointing",
       env::kFsdpActivationCheckpointing,
       Kind::kBool,
       {},
       "false",
       "Activation checkpointing: true or false"},
      {ds,
       "deepspeed_config_file",
       "deepspeed_config_file",
       env::kDeepSpeedConfigFile,
       Kind::kText,
       {},
       std::nullopt,
       "DeepSpeed JSON config; passed to the workers as an absolute path ('none': no file)"},
      {ds, "zero_stage", "zero_stage", env::kDeepSpeedZeroStage, Kind::kChoice, kZeroStages,
       std::nullopt, "ZeRO stage: 0, 1, 2 or 3 (the library's default: 2)"},
      {ds, "offload_optimizer_device", "offload_optimizer_device",
       env::kDeepSpeedOffloadOptimizerDevice, Kind::kLowerChoice, kOffloadDevices, std::nullopt,
       "Where optimizer states live: none, cpu or nvme"},
      {ds, "offload_param_device", "offload_param_device", env::kDeepSpeedOffloadParamDevice,
       Kind::kLowerChoice, kOffloadDevices, std::nullopt,
       "Where parameters live: none, cpu or nvme"},
      {ds,
       "offload_optimizer_nvme_path",
       "offload_optimizer_nvme_path",
       env::kDeepSpeedOffloadOptimizerNvmePath,
       Kind::kText,
       {},
       std::nullopt,
       "NVMe path for optimizer states"},
      {ds,
       "offload_param_nvme_path",
       "offload_param_nvme_path",
       env::kDeepSpeedOffloadParamNvmePath,
       Kind::kText,
       {},
       std::nullopt,
       "NVMe path for parameters"},
      {ds,
       "gradient_clipping",
       "gradient_clipping",
       env::kGradientClipping,
       Kind::kNumber,
       {},
       std::nullopt,
       "Clip the global gradient norm to this value"},
      {ds,
       "zero3_init_flag",
       "zero3_init_flag",
       env::kDeepSpeedZero3Init,
       Kind::kBool,
       {},
       std::nullopt,
       "deepspeed.zero.Init for stage 3: true or false"},
      {ds,
       "zero3_save_16bit_model",
       "zero3_save_16bit_model",
       env::kDeepSpeedZero3Save16BitModel,
       Kind::kBool,
       {},
       std::nullopt,
       "Save 16-bit weights with stage 3: true or false"},
      {ds, "deepspeed_multinode_launcher", "deepspeed_multinode_launcher", nullptr, Kind::kChoice,
       kMultinodeLaunchers, std::nullopt,
       "DeepSpeed's multi-node launcher: only standard (one accelerate launch per machine, as "
       "torchrun) is accepted, the others need DeepSpeed's own launcher"},
  };
}

}  // namespace

const std::vector<ShardingSetting>& sharding_settings() {
  static const std::vector<ShardingSetting> settings = make_settings();
  return settings;
}

const ShardingSetting* find_sharding_setting(const std::string& flag) {
  for (const auto& setting : sharding_settings()) {
    if (setting.flag == flag) return &setting;
  }
  return nullptr;
}

const ShardingSetting* find_sharding_file_key(ShardingPlugin plugin, const std::string& key) {
  std::string name = key;
  if (plugin == ShardingPlugin::kFsdp) {
    // Python's launch: `if "fsdp" not in k: k = "fsdp_" + k`; and the spelling before 0.27.
    if (name.find("fsdp") == std::string::npos) name = "fsdp_" + name;
    if (name == "fsdp_backward_prefetch_policy") name = "fsdp_backward_prefetch";
  }
  for (const auto& setting : sharding_settings()) {
    if (setting.plugin == plugin && setting.file_key == name) return &setting;
  }
  return nullptr;
}

std::string sharding_section(ShardingPlugin plugin) {
  return plugin == ShardingPlugin::kFsdp ? "fsdp_config" : "deepspeed_config";
}

std::optional<bool> parse_accelerate_bool(const std::string& text) {
  const std::string word = lower(text);
  if (word == "y" || word == "yes" || word == "t" || word == "true" || word == "on" || word == "1")
    return true;
  if (word == "n" || word == "no" || word == "f" || word == "false" || word == "off" || word == "0")
    return false;
  return std::nullopt;
}

std::string python_float_repr(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value < 0 ? "-inf" : "inf";
  // The shortest digits that read back as `value`, in scientific form: "-1.2345e+05".
  char buffer[64];
  const auto result =
      std::to_chars(buffer, buffer + sizeof(buffer), value, std::chars_format::scientific);
  const std::string text(buffer, result.ptr);
  const auto e = text.find('e');
  std::string mantissa = text.substr(0, e);
  const int exponent = std::atoi(text.c_str() + e + 1);
  const bool negative = mantissa.front() == '-';
  if (negative) mantissa.erase(0, 1);
  std::string digits;
  for (char c : mantissa) {
    if (c != '.') digits += c;
  }
  std::string out;
  // Python's float_repr_style 'short': positional from 1e-4 up to (not including) 1e16.
  if (exponent >= -4 && exponent < 16) {
    if (exponent >= 0) {
      const auto whole = static_cast<std::size_t>(exponent) + 1;
      if (digits.size() <= whole) {
        out = digits + std::string(whole - digits.size(), '0') + ".0";
      } else {
        out = digits.substr(0, whole) + "." + digits.substr(whole);
      }
    } else {
      out = "0." + std::string(static_cast<std::size_t>(-exponent - 1), '0') + digits;
    }
  } else {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out.append(".").append(digits, 1);
    out.append(exponent < 0 ? "e-" : "e+");
    if (std::abs(exponent) < 10) out.append("0");
    out.append(std::to_string(std::abs(exponent)));
  }
  // append() and insert(), not literal + string: GCC 12 warns falsely (-Wrestrict) about those.
  if (negative) out.insert(out.begin(), '-');
  return out;
}

std::optional<std::string> normalize_sharding_value(const ShardingSetting& setting,
                                                    const std::string& text,
                                                    std::string* expected) {
  switch (setting.kind) {
    case Kind::kBool:
      if (auto value = parse_accelerate_bool(text)) return *value ? "true" : "false";
      *expected = "true or false";
      return std::nullopt;
    case Kind::kChoice:
      if (std::find(setting.choices.begin(), setting.choices.end(), text) != setting.choices.end())
        return text;
      *expected = "one of " + join(setting.choices, ", ");
      return std::nullopt;
    case Kind::kLowerChoice: {
      const std::string word = lower(text);
      if (std::find(setting.choices.begin(), setting.choices.end(), word) != setting.choices.end())
        return word;
      *expected = "one of " + join(setting.choices, ", ");
      return std::nullopt;
    }
    case Kind::kNamedNumber: {
      if (std::find(setting.choices.begin(), setting.choices.end(), text) != setting.choices.end())
        return text;
      int number = 0;
      const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), number);
      if (error == std::errc() && end == text.data() + text.size() && number >= 1 &&
          number <= static_cast<int>(setting.choices.size()) && text.front() != '0') {
        return text;
      }
      *expected = "one of " + join(setting.choices, ", ") + " or a number from 1 to " +
                  std::to_string(setting.choices.size());
      return std::nullopt;
    }
    case Kind::kCount: {
      long long number = 0;
      const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), number);
      if (error == std::errc() && end == text.data() + text.size() && number >= 0) {
        return std::to_string(number);
      }
      *expected = "a whole number of at least 0";
      return std::nullopt;
    }
    case Kind::kNumber: {
      double number = 0;
      const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), number);
      if (!text.empty() && error == std::errc() && end == text.data() + text.size() &&
          std::isfinite(number) && number >= 0) {
        return python_float_repr(number);
      }
      *expected = "a number of at least 0";
      return std::nullopt;
    }
    case Kind::kText:
      if (!text.empty()) return text;
      *expected = "a non-empty value";
      return std::nullopt;
  }
  *expected = "a valid value";
  return std::nullopt;
}

const std::vector<std::string>& deepspeed_multinode_launchers() {
  return kMultinodeLaunchers;
}

bool is_deepspeed_passthrough_key(const std::string& key) {
  return key == "deepspeed_hostfile" || key == "deepspeed_exclusion_filter" ||
         key == "deepspeed_inclusion_filter" || key == "deepspeed_moe_layer_cls_names";
}

}  // namespace accelerate::cli
