#include "accelerate/plugins.h"

#include "accelerate/detail/precedence.h"
#include "accelerate/env_names.h"

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <fstream>
#include <sstream>

namespace accelerate {

namespace {

constexpr const char* kStrategyNames[] = {"FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD",
                                          "HYBRID_SHARD_ZERO2"};
constexpr const char* kStateDictNames[] = {"FULL_STATE_DICT", "LOCAL_STATE_DICT",
                                           "SHARDED_STATE_DICT"};

// Python Accelerate takes a name or PyTorch's 1-based number.
template <size_t N>
int choice_index(const std::string& text, const char* const (&names)[N], const char* what) {
  for (size_t i = 0; i < N; ++i) {
    if (text == names[i]) return static_cast<int>(i);
  }
  if (text.size() == 1 && text[0] >= '1' && text[0] < static_cast<char>('1' + N)) {
    return text[0] - '1';
  }
  std::string choices;
  for (size_t i = 0; i < N; ++i) choices += (i ? ", " : "") + std::string(names[i]);
  TORCH_CHECK(false, "accelerate: unknown ", what, " \"", text, "\"; choose one of ", choices,
              " (or 1-", N, ")");
}

std::string source_note(const std::string& source, const char* variable) {
  if (source == "environment") return std::string(" (from ") + variable + ")";
  if (source == "config file") return " (from the DeepSpeed config file)";
  return "";
}

// One field's precedence (detail/precedence.h): explicit > JSON file > environment > default.
template <class T>
T pick(const std::optional<T>& explicit_value, const std::optional<T>& from_json,
       const std::optional<T>& from_env, T fallback, const std::string& field,
       std::map<std::string, std::string>& sources) {
  return detail::pick<T>(
      {{explicit_value, "argument"}, {from_json, "config file"}, {from_env, "environment"}},
      fallback, field, sources);
}

std::optional<double> env_double(const EnvMap& env, const char* name) {
  auto v = env_string(env, name);
  if (!v) return std::nullopt;
  // Python Accelerate writes "none" for an unset clipping value.
  std::string lower = *v;
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  if (lower == "none") return std::nullopt;
  try {
    size_t used = 0;
    double d = std::stod(*v, &used);
    if (used == v->size()) return d;
  } catch (const std::exception&) {
  }
  TORCH_CHECK(false, "accelerate: ", name, " must be a number, got \"", *v, "\"");
}

void check_fsdp_choices(const FullyShardedDataParallelPlugin& p) {
  auto check = [](const std::optional<std::string>& value, std::vector<std::string> choices,
                  const char* field) {
    if (!value) return;
    if (std::find(choices.begin(), choices.end(), *value) != choices.end()) return;
    std::string all;
    for (const auto& c : choices) all += (all.empty() ? "" : ", ") + c;
    TORCH_CHECK(false, "accelerate: FullyShardedDataParallelPlugin.", field, " \"", *value,
                "\" is not one of ", all);
  };
  check(p.auto_wrap_policy, {"TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"},
        "auto_wrap_policy");
  check(p.backward_prefetch, {"BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH"}, "backward_prefetch");
  TORCH_CHECK(!p.min_num_params || *p.min_num_params >= 0,
              "accelerate: FullyShardedDataParallelPlugin.min_num_params must be >= 0, got ",
              p.min_num_params.value_or(0));
}

FullyShardedDataParallelPlugin fsdp_from_env(const EnvMap& env) {
  FullyShardedDataParallelPlugin p;
  if (auto v = env_string(env, env::kFsdpShardingStrategy)) {
    try {
      p.sharding_strategy = sharding_strategy_from_string(*v);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, e.what_without_backtrace(), " (from ", env::kFsdpShardingStrategy, ")");
    }
  }
  if (auto v = env_string(env, env::kFsdpStateDictType)) {
    try {
      p.state_dict_type = state_dict_type_from_string(*v);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, e.what_without_backtrace(), " (from ", env::kFsdpStateDictType, ")");
    }
  }
  p.cpu_offload = env_bool(env, env::kFsdpOffloadParams);
  p.sync_module_states = env_bool(env, env::kFsdpSyncModuleStates);
  p.auto_wrap_policy = env_string(env, env::kFsdpAutoWrapPolicy);
  if (auto v = env_int(env, env::kFsdpMinNumParams)) p.min_num_params = *v;
  if (auto v = env_string(env, env::kFsdpTransformerClsToWrap)) {
    std::vector<std::string> names;
    std::stringstream in(*v);
    for (std::string item; std::getline(in, item, ',');) {
      if (!item.empty()) names.push_back(item);
    }
    p.transformer_layer_cls_to_wrap = names;
  }
  p.backward_prefetch = env_string(env, env::kFsdpBackwardPrefetch);
  p.forward_prefetch = env_bool(env, env::kFsdpForwardPrefetch);
  p.use_orig_params = env_bool(env, env::kFsdpUseOrigParams);
  p.cpu_ram_efficient_loading = env_bool(env, env::kFsdpCpuRamEfficientLoading);
  p.activation_checkpointing = env_bool(env, env::kFsdpActivationCheckpointing);
  return p;
}

void resolve_fsdp(const FullyShardedDataParallelPlugin& given, const EnvMap& env,
                  ShardingConfig& c) {
  const FullyShardedDataParallelPlugin from_env = fsdp_from_env(env);
  auto& src = c.sources;
  const auto strategy =
      pick<ShardingStrategy>(given.sharding_strategy, std::nullopt, from_env.sharding_strategy,
                             ShardingStrategy::FULL_SHARD, "sharding_strategy", src);
  c.sharding_strategy = strategy;
  const std::string where = source_note(src["sharding_strategy"], env::kFsdpShardingStrategy);
  switch (strategy) {
    case ShardingStrategy::NO_SHARD:
      c.stage = 0;
      break;
    case ShardingStrategy::SHARD_GRAD_OP:
      c.stage = 2;
      break;
    case ShardingStrategy::FULL_SHARD:
      c.stage = 3;
      break;
    case ShardingStrategy::HYBRID_SHARD:
    case ShardingStrategy::HYBRID_SHARD_ZERO2:
      TORCH_CHECK(false, "accelerate: FSDP sharding_strategy ", to_string(strategy), where,
                  " (sharding within a machine, replication across machines) is not available "
                  "yet; use SHARD_GRAD_OP or NO_SHARD");
  }
  const bool offload =
      pick<bool>(given.cpu_offload, std::nullopt, from_env.cpu_offload, false, "cpu_offload", src);
  TORCH_CHECK(!offload || c.stage == 3, "accelerate: FSDP cpu_offload (parameter offload)",
              source_note(src["cpu_offload"], env::kFsdpOffloadParams),
              " needs sharding_strategy FULL_SHARD (parameters are whole with ",
              to_string(strategy), ")");
  c.full_shard.cpu_offload = offload;
  c.state_dict_type =
      pick<StateDictType>(given.state_dict_type, std::nullopt, from_env.state_dict_type,
                          StateDictType::FULL_STATE_DICT, "state_dict_type", src);
  TORCH_CHECK(c.state_dict_type != StateDictType::LOCAL_STATE_DICT,
              "accelerate: FSDP state_dict_type LOCAL_STATE_DICT",
              source_note(src["state_dict_type"], env::kFsdpStateDictType),
              " is not supported; use FULL_STATE_DICT or SHARDED_STATE_DICT");
  c.sync_module_states = pick<bool>(given.sync_module_states, std::nullopt,
                                    from_env.sync_module_states, true, "sync_module_states", src);
  c.full_shard.sync_module_states = c.sync_module_states;
  // Validated even below stage 3, so that a typo fails at start.
  FullyShardedDataParallelPlugin merged = from_env;
  if (given.auto_wrap_policy) merged.auto_wrap_policy = given.auto_wrap_policy;
  if (given.backward_prefetch) merged.backward_prefetch = given.backward_prefetch;
  if (given.min_num_params) merged.min_num_params = given.min_num_params;
  check_fsdp_choices(merged);
  // Accelerate's defaults: no auto wrap, no backward prefetch, min_num_params 1e8.
  auto& o = c.full_shard;
  o.auto_wrap_policy =
      pick<std::string>(given.auto_wrap_policy, std::nullopt, from_env.auto_wrap_policy, "NO_WRAP",
                        "auto_wrap_policy", src);
  const int64_t min_params = pick<int64_t>(given.min_num_params, std::nullopt,
                                           from_env.min_num_params, 0, "min_num_params", src);
  o.min_num_params = min_params > 0 ? min_params : 100000000;
  o.transformer_layer_cls_to_wrap = pick<std::vector<std::string>>(
      given.transformer_layer_cls_to_wrap, std::nullopt, from_env.transformer_layer_cls_to_wrap, {},
      "transformer_layer_cls_to_wrap", src);
  TORCH_CHECK(
      o.auto_wrap_policy != "TRANSFORMER_BASED_WRAP" || !o.transformer_layer_cls_to_wrap.empty(),
      "accelerate: FSDP auto_wrap_policy TRANSFORMER_BASED_WRAP needs "
      "transformer_layer_cls_to_wrap (",
      env::kFsdpTransformerClsToWrap, "): the type names of the layers to wrap");
  o.backward_prefetch = backward_prefetch_from_string(
      pick<std::string>(given.backward_prefetch, std::nullopt, from_env.backward_prefetch,
                        "NO_PREFETCH", "backward_prefetch", src));
  o.forward_prefetch = pick<bool>(given.forward_prefetch, std::nullopt, from_env.forward_prefetch,
                                  false, "forward_prefetch", src);
  c.cpu_ram_efficient_loading =
      pick<bool>(given.cpu_ram_efficient_loading, std::nullopt, from_env.cpu_ram_efficient_loading,
                 false, "cpu_ram_efficient_loading", src);
  TORCH_CHECK(!c.cpu_ram_efficient_loading || c.sync_module_states,
              "accelerate: FSDP cpu_ram_efficient_loading needs sync_module_states (as in "
              "Accelerate): the other processes receive their shards from process 0");
  const bool checkpointing =
      pick<bool>(given.activation_checkpointing, std::nullopt, from_env.activation_checkpointing,
                 false, "activation_checkpointing", src);
  TORCH_CHECK(!checkpointing, "accelerate: FSDP activation_checkpointing",
              source_note(src["activation_checkpointing"], env::kFsdpActivationCheckpointing),
              " is not supported (LibTorch has no checkpoint wrapper)");
}

void resolve_deepspeed(const DeepSpeedPlugin& given, const EnvMap& env, ShardingConfig& c) {
  auto& src = c.sources;
  // The JSON file: named by the plugin or by the launcher.
  std::optional<std::string> file = given.hf_ds_config;
  if (!file) file = env_string(env, env::kDeepSpeedConfigFile);
  DeepSpeedJson json;
  if (file) {
    json = read_deepspeed_config(*file);
    c.mixed_precision = json.mixed_precision;
    // As Accelerate: with a config file, the settings it holds are not taken from anywhere else.
    const std::pair<const char*, bool> env_set[] = {
        {env::kDeepSpeedZeroStage, json.plugin.zero_stage.has_value()},
        {env::kGradientClipping, json.plugin.gradient_clipping.has_value()},
        {env::kDeepSpeedOffloadOptimizerDevice, json.plugin.offload_optimizer_device.has_value()},
        {env::kDeepSpeedOffloadParamDevice, json.plugin.offload_param_device.has_value()},
        {env::kDeepSpeedZero3Save16BitModel, json.plugin.zero3_save_16bit_model.has_value()},
    };
    for (const auto& [name, in_json] : env_set) {
      TORCH_CHECK(!in_json || !env_string(env, name), "accelerate: ", name,
                  " is set but the DeepSpeed config file ", *file,
                  " sets the same thing; set it in the file only");
    }
    const std::pair<const char*, bool> both[] = {
        {"zero_stage", given.zero_stage && json.plugin.zero_stage},
        {"gradient_accumulation_steps",
         given.gradient_accumulation_steps && json.plugin.gradient_accumulation_steps},
        {"gradient_clipping", given.gradient_clipping && json.plugin.gradient_clipping},
        {"offload_optimizer_device",
         given.offload_optimizer_device && json.plugin.offload_optimizer_device},
        {"offload_param_device", given.offload_param_device && json.plugin.offload_param_device},
    };
    for (const auto& [field, clash] : both) {
      TORCH_CHECK(!clash, "accelerate: DeepSpeedPlugin.", field,
                  " is given and the DeepSpeed config file ", *file,
                  " sets it too; set it in one place");
    }
  }
  const auto& j = json.plugin;
  std::optional<int> env_stage;
  if (auto v = env_int(env, env::kDeepSpeedZeroStage)) env_stage = static_cast<int>(*v);
  c.stage = pick<int>(given.zero_stage, j.zero_stage, env_stage, 2, "zero_stage", src);
  const std::string where = source_note(src["zero_stage"], env::kDeepSpeedZeroStage);
  TORCH_CHECK(c.stage >= 0 && c.stage <= 3,
              "accelerate: DeepSpeed zero_stage must be 0, 1, 2 or 3, got ", c.stage, where);
  if (c.stage == 3) {
    // DeepSpeed gathers each submodule's parameters and keeps small ones whole
    // (stage3_param_persistence_threshold, default 1e5): the closest unit rule is by size.
    c.full_shard.auto_wrap_policy = "SIZE_BASED_WRAP";
    c.full_shard.min_num_params = 100000;
    c.full_shard.backward_prefetch = BackwardPrefetch::BACKWARD_PRE;
  }

  std::optional<int64_t> env_accumulation;
  if (auto v = env_int(env, env::kGradientAccumulationSteps)) env_accumulation = *v;
  if (given.gradient_accumulation_steps || j.gradient_accumulation_steps) {
    c.gradient_accumulation_steps =
        pick<int64_t>(given.gradient_accumulation_steps, j.gradient_accumulation_steps,
                      std::nullopt, 1, "deepspeed_gradient_accumulation_steps", src);
    TORCH_CHECK(*c.gradient_accumulation_steps >= 1,
                "accelerate: DeepSpeed gradient_accumulation_steps must be >= 1, got ",
                *c.gradient_accumulation_steps);
  }
  (void)env_accumulation;  // the Accelerator reads ACCELERATE_GRADIENT_ACCUMULATION_STEPS itself

  std::optional<double> clip = given.gradient_clipping;
  if (clip) {
    src["gradient_clipping"] = "argument";
  } else if (j.gradient_clipping) {
    clip = j.gradient_clipping;
    src["gradient_clipping"] = "config file";
  } else if ((clip = env_double(env, env::kGradientClipping))) {
    src["gradient_clipping"] = "environment";
  } else {
    src["gradient_clipping"] = "default";
  }
  TORCH_CHECK(!clip || *clip > 0, "accelerate: DeepSpeed gradient_clipping must be positive, got ",
              clip.value_or(0));
  c.gradient_clipping = clip;

  auto device = [&](const std::optional<std::string>& explicit_value,
                    const std::optional<std::string>& in_json, const char* variable,
                    const char* field) {
    std::string d =
        pick<std::string>(explicit_value, in_json, env_string(env, variable), "none", field, src);
    const std::string note = source_note(src[field], variable);
    TORCH_CHECK(d == "none" || d == "cpu" || d == "nvme", "accelerate: DeepSpeed ", field,
                " must be none, cpu or nvme, got \"", d, "\"", note);
    TORCH_CHECK(d != "nvme", "accelerate: DeepSpeed ", field, " nvme", note,
                " is not supported (no NVMe offload engine); use cpu or none");
    return d;
  };
  c.offload_optimizer =
      device(given.offload_optimizer_device, j.offload_optimizer_device,
             env::kDeepSpeedOffloadOptimizerDevice, "offload_optimizer_device") == "cpu";
  const std::string param = device(given.offload_param_device, j.offload_param_device,
                                   env::kDeepSpeedOffloadParamDevice, "offload_param_device");
  TORCH_CHECK(param == "none" || c.stage == 3, "accelerate: DeepSpeed offload_param_device ", param,
              source_note(src["offload_param_device"], env::kDeepSpeedOffloadParamDevice),
              " needs zero_stage 3 (parameters are whole at stage ", c.stage, ")");
  c.full_shard.cpu_offload = param == "cpu";
  c.zero3_save_16bit_model = pick<bool>(given.zero3_save_16bit_model, j.zero3_save_16bit_model,
                                        env_bool(env, env::kDeepSpeedZero3Save16BitModel), false,
                                        "zero3_save_16bit_model", src);
  // DeepSpeed always writes each process's optimizer partition.
  c.state_dict_type = StateDictType::SHARDED_STATE_DICT;
  src["state_dict_type"] = "default";
}

std::string join_path(const std::string& parent, const std::string& key) {
  return parent.empty() ? key : parent + "." + key;
}

}  // namespace

std::string to_string(ShardingStrategy strategy) {
  const int i = static_cast<int>(strategy) - 1;
  TORCH_INTERNAL_ASSERT(i >= 0 && i < 5, "unknown ShardingStrategy");
  return kStrategyNames[i];
}

ShardingStrategy sharding_strategy_from_string(const std::string& text) {
  return static_cast<ShardingStrategy>(
      choice_index(text, kStrategyNames, "FSDP sharding_strategy") + 1);
}

std::string to_string(StateDictType type) {
  const int i = static_cast<int>(type) - 1;
  TORCH_INTERNAL_ASSERT(i >= 0 && i < 3, "unknown StateDictType");
  return kStateDictNames[i];
}

StateDictType state_dict_type_from_string(const std::string& text) {
  return static_cast<StateDictType>(choice_index(text, kStateDictNames, "FSDP state_dict_type") +
                                    1);
}

std::string ShardingConfig::describe() const {
  std::ostringstream out;
  auto line = [&](const std::string& name, const auto& value) {
    detail::describe_line(out, name, value, sources);
  };
  line("sharding_engine", engine);
  if (sharding_strategy) line("sharding_strategy", to_string(*sharding_strategy));
  line("zero_stage", stage);
  line("state_dict_type", to_string(state_dict_type));
  if (engine == "deepspeed") {
    line("offload_optimizer_device", offload_optimizer ? "cpu" : "none");
    line("gradient_clipping", gradient_clipping ? std::to_string(*gradient_clipping) : "none");
  }
  if (stage == 3) {
    line("auto_wrap_policy", full_shard.auto_wrap_policy);
    if (full_shard.auto_wrap_policy == "SIZE_BASED_WRAP") {
      line("min_num_params", full_shard.min_num_params);
    }
    line("backward_prefetch", to_string(full_shard.backward_prefetch));
    line("forward_prefetch", full_shard.forward_prefetch ? "true" : "false");
    line("cpu_offload", full_shard.cpu_offload ? "true" : "false");
  }
  return out.str();
}

ShardingConfig resolve_sharding(const std::optional<FullyShardedDataParallelPlugin>& fsdp,
                                const std::optional<DeepSpeedPlugin>& deepspeed,
                                const EnvMap& env) {
  ShardingConfig c;
  const bool env_fsdp = env_bool(env, env::kUseFsdp).value_or(false);
  const bool env_deepspeed = env_bool(env, env::kUseDeepSpeed).value_or(false);
  const bool use_fsdp = fsdp.has_value() || (!deepspeed && env_fsdp);
  const bool use_deepspeed = deepspeed.has_value() || (!fsdp && env_deepspeed);
  TORCH_CHECK(!(fsdp && deepspeed), "accelerate: give fsdp_plugin or deepspeed_plugin, not both");
  TORCH_CHECK(!(use_fsdp && use_deepspeed), "accelerate: both FSDP and DeepSpeed are requested (",
              env::kUseFsdp, "=", env_fsdp ? "true" : "false", ", ", env::kUseDeepSpeed, "=",
              env_deepspeed ? "true" : "false", fsdp ? ", fsdp_plugin given" : "",
              deepspeed ? ", deepspeed_plugin given" : "", "); choose one");
  if (use_fsdp) {
    c.engine = "fsdp";
    c.sources["sharding_engine"] = fsdp ? "argument" : "environment";
    resolve_fsdp(fsdp.value_or(FullyShardedDataParallelPlugin{}), env, c);
  } else if (use_deepspeed) {
    c.engine = "deepspeed";
    c.sources["sharding_engine"] = deepspeed ? "argument" : "environment";
    resolve_deepspeed(deepspeed.value_or(DeepSpeedPlugin{}), env, c);
  } else {
    c.sources["sharding_engine"] = "default";
  }
  return c;
}

DeepSpeedJson read_deepspeed_config(const std::string& path) {
  std::ifstream in(path);
  TORCH_CHECK(in.good(), "accelerate: cannot open the DeepSpeed config file ", path);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, "accelerate: the DeepSpeed config file ", path,
                " is not valid JSON: ", e.what());
  }
  TORCH_CHECK(j.is_object(), "accelerate: the DeepSpeed config file ", path,
              " must hold a JSON object");
  DeepSpeedJson out;
  auto fail = [&](const std::string& key, const std::string& why) {
    TORCH_CHECK(false, "accelerate: DeepSpeed config file ", path, ": \"", key, "\" ", why);
  };
  auto is_auto = [](const nlohmann::json& v) {
    return v.is_string() && v.get<std::string>() == "auto";
  };
  auto integer = [&](const nlohmann::json& v, const std::string& key) -> std::optional<int64_t> {
    if (is_auto(v)) return std::nullopt;
    if (!v.is_number_integer()) fail(key, "must be an integer or \"auto\"");
    return v.get<int64_t>();
  };
  auto number = [&](const nlohmann::json& v, const std::string& key) -> std::optional<double> {
    if (is_auto(v)) return std::nullopt;
    if (!v.is_number()) fail(key, "must be a number or \"auto\"");
    return v.get<double>();
  };
  auto boolean = [&](const nlohmann::json& v, const std::string& key) -> bool {
    if (!v.is_boolean()) fail(key, "must be true or false");
    return v.get<bool>();
  };
  auto object = [&](const nlohmann::json& v, const std::string& key) {
    if (!v.is_object()) fail(key, "must be a JSON object");
  };
  auto device = [&](const nlohmann::json& v, const std::string& key) -> std::string {
    if (!v.is_string()) fail(key, "must be \"none\", \"cpu\" or \"nvme\"");
    return v.get<std::string>();
  };
  auto unknown = [&](const std::string& key) {
    fail(key,
         "is not supported by accelerate-cpp (its ZeRO engine reads only the keys listed in "
         "plugins.h); remove it");
  };
  // Keys DeepSpeed tunes its own engine with; they do not change results, and ours needs none.
  const std::vector<std::string> tuning = {
      "overlap_comm",   "contiguous_gradients", "reduce_bucket_size",   "allgather_bucket_size",
      "reduce_scatter", "allgather_partitions", "round_robin_gradients"};
  for (const auto& [key, value] : j.items()) {
    if (key == "gradient_accumulation_steps") {
      if (auto v = integer(value, key)) out.plugin.gradient_accumulation_steps = *v;
    } else if (key == "gradient_clipping") {
      if (auto v = number(value, key)) out.plugin.gradient_clipping = *v;
    } else if (key == "train_batch_size" || key == "train_micro_batch_size_per_gpu") {
      (void)integer(value, key);  // the data loader decides the batch size
    } else if (key == "steps_per_print") {
      (void)integer(value, key);
    } else if (key == "wall_clock_breakdown" || key == "zero_allow_untested_optimizer") {
      (void)boolean(value, key);
    } else if (key == "bf16" || key == "fp16") {
      object(value, key);
      for (const auto& [sub, v] : value.items()) {
        const std::string name = join_path(key, sub);
        if (sub == "enabled") {
          if (is_auto(v)) continue;
          if (boolean(v, name)) {
            TORCH_CHECK(!out.mixed_precision, "accelerate: DeepSpeed config file ", path,
                        " enables both bf16 and fp16");
            out.mixed_precision = key;
          }
        } else if (key == "fp16" &&
                   (sub == "loss_scale" || sub == "initial_scale_power" ||
                    sub == "loss_scale_window" || sub == "hysteresis" || sub == "min_loss_scale")) {
          // Dynamic loss scaling is the GradScaler's; these are DeepSpeed's defaults-or-auto.
          (void)number(v, name);
        } else {
          unknown(name);
        }
      }
    } else if (key == "zero_optimization") {
      object(value, key);
      for (const auto& [sub, v] : value.items()) {
        const std::string name = join_path(key, sub);
        if (sub == "stage") {
          if (auto s = integer(v, name)) out.plugin.zero_stage = static_cast<int>(*s);
        } else if (sub == "offload_optimizer" || sub == "offload_param") {
          object(v, name);
          for (const auto& [leaf, lv] : v.items()) {
            const std::string leaf_name = join_path(name, leaf);
            if (leaf == "device") {
              (sub == "offload_optimizer" ? out.plugin.offload_optimizer_device
                                          : out.plugin.offload_param_device) =
                  device(lv, leaf_name);
            } else if (leaf == "pin_memory") {
              (void)boolean(lv, leaf_name);
            } else if (leaf == "nvme_path") {
              if (!lv.is_string()) fail(leaf_name, "must be a string");
            } else {
              unknown(leaf_name);
            }
          }
        } else if (sub == "stage3_gather_16bit_weights_on_model_save") {
          if (!is_auto(v)) out.plugin.zero3_save_16bit_model = boolean(v, name);
        } else if (std::find(tuning.begin(), tuning.end(), sub) != tuning.end()) {
          if (!is_auto(v) && !v.is_boolean() && !v.is_number())
            fail(name, "must be a number or boolean");
        } else {
          unknown(name);
        }
      }
    } else {
      unknown(key);
    }
  }
  return out;
}

}  // namespace accelerate
