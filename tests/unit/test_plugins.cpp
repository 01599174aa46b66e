// The sharding plugins' resolution: explicit > environment (Python Accelerate's variable names) >
// default, the stage each FSDP strategy maps to, the DeepSpeed JSON file, and one-line errors for
// every value that cannot run.

#include <accelerate/accelerator.h>
#include <accelerate/env_names.h>
#include <accelerate/plugins.h>

#include <gtest/gtest.h>

#include "expect_error.h"

#include <filesystem>
#include <fstream>
#include <string>

namespace {

using accelerate::DeepSpeedPlugin;
using accelerate::EnvMap;
using accelerate::FullyShardedDataParallelPlugin;
using accelerate::resolve_sharding;
using accelerate::ShardingStrategy;
using accelerate::StateDictType;
namespace fs = std::filesystem;

std::string write_json(const std::string& name, const std::string& text) {
  const fs::path path =
      fs::temp_directory_path() / (name + "_" + std::to_string(::getpid()) + ".json");
  std::ofstream(path) << text;
  return path.string();
}

TEST(Plugins, NoPluginIsPlainDataParallelism) {
  const auto c = resolve_sharding(std::nullopt, std::nullopt, EnvMap{});
  EXPECT_EQ(c.engine, "none");
  EXPECT_EQ(c.stage, 0);
  EXPECT_FALSE(c.sharded());
}

TEST(Plugins, FsdpStrategiesMapToStages) {
  auto stage = [](ShardingStrategy s) {
    return resolve_sharding(FullyShardedDataParallelPlugin{.sharding_strategy = s}, std::nullopt,
                            EnvMap{})
        .stage;
  };
  EXPECT_EQ(stage(ShardingStrategy::FULL_SHARD), 3);
  EXPECT_EQ(stage(ShardingStrategy::SHARD_GRAD_OP), 2);
  EXPECT_EQ(stage(ShardingStrategy::NO_SHARD), 0);
  // By name or PyTorch's number, from the environment accelerate launch writes.
  const auto c = resolve_sharding(std::nullopt, std::nullopt,
                                  EnvMap{{"ACCELERATE_USE_FSDP", "true"},
                                         {"FSDP_SHARDING_STRATEGY", "2"},
                                         {"FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT"}});
  EXPECT_EQ(c.engine, "fsdp");
  EXPECT_EQ(c.stage, 2);
  EXPECT_EQ(c.state_dict_type, StateDictType::SHARDED_STATE_DICT);
  EXPECT_EQ(c.sources.at("sharding_strategy"), "environment");
  EXPECT_EQ(c.sources.at("state_dict_type"), "environment");
  // Explicit beats the environment.
  const auto e = resolve_sharding(
      FullyShardedDataParallelPlugin{.sharding_strategy = ShardingStrategy::NO_SHARD}, std::nullopt,
      EnvMap{{"FSDP_SHARDING_STRATEGY", "SHARD_GRAD_OP"}});
  EXPECT_EQ(e.stage, 0);
  EXPECT_EQ(e.sources.at("sharding_strategy"), "argument");
  EXPECT_EQ(e.describe().find("sharding_engine = fsdp (argument)\nsharding_strategy = NO_SHARD "
                              "(argument)\nzero_stage = 0\nstate_dict_type = FULL_STATE_DICT "
                              "(default)\n"),
            0u)
      << e.describe();
}

TEST(Plugins, FullShardIsStageThreeWithAccelerateDefaults) {
  // Accelerate's default strategy is FULL_SHARD: no auto wrap, no backward prefetch.
  auto c = resolve_sharding(std::nullopt, std::nullopt, EnvMap{{"ACCELERATE_USE_FSDP", "true"}});
  EXPECT_EQ(c.stage, 3);
  EXPECT_EQ(c.full_shard.auto_wrap_policy, "NO_WRAP");
  EXPECT_EQ(c.full_shard.min_num_params, 100000000);
  EXPECT_EQ(c.full_shard.backward_prefetch, accelerate::BackwardPrefetch::NO_PREFETCH);
  EXPECT_FALSE(c.full_shard.forward_prefetch);
  EXPECT_FALSE(c.full_shard.cpu_offload);
  EXPECT_TRUE(c.full_shard.sync_module_states);
  // What `accelerate launch --use_fsdp ...` writes.
  c = resolve_sharding(std::nullopt, std::nullopt,
                       EnvMap{{"ACCELERATE_USE_FSDP", "true"},
                              {"FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP"},
                              {"FSDP_TRANSFORMER_CLS_TO_WRAP", "Block,Other"},
                              {"FSDP_BACKWARD_PREFETCH", "BACKWARD_POST"},
                              {"FSDP_FORWARD_PREFETCH", "true"},
                              {"FSDP_OFFLOAD_PARAMS", "true"},
                              {"FSDP_CPU_RAM_EFFICIENT_LOADING", "true"}});
  EXPECT_EQ(c.full_shard.auto_wrap_policy, "TRANSFORMER_BASED_WRAP");
  EXPECT_EQ(c.full_shard.transformer_layer_cls_to_wrap,
            (std::vector<std::string>{"Block", "Other"}));
  EXPECT_EQ(c.full_shard.backward_prefetch, accelerate::BackwardPrefetch::BACKWARD_POST);
  EXPECT_TRUE(c.full_shard.forward_prefetch);
  EXPECT_TRUE(c.full_shard.cpu_offload);
  EXPECT_TRUE(c.cpu_ram_efficient_loading);
  c = resolve_sharding(std::nullopt,
                       DeepSpeedPlugin{.zero_stage = 3, .offload_param_device = "cpu"}, EnvMap{});
  EXPECT_EQ(c.stage, 3);
  EXPECT_EQ(c.full_shard.auto_wrap_policy, "SIZE_BASED_WRAP");
  EXPECT_EQ(c.full_shard.min_num_params, 100000);
  EXPECT_TRUE(c.full_shard.cpu_offload);
}

TEST(Plugins, FsdpValuesThatCannotRunAreOneLineErrors) {
  EXPECT_ERROR_CONTAINS(
      resolve_sharding(
          FullyShardedDataParallelPlugin{.sharding_strategy = ShardingStrategy::SHARD_GRAD_OP,
                                         .cpu_offload = true},
          std::nullopt, EnvMap{}),
      "FSDP cpu_offload (parameter offload) needs sharding_strategy FULL_SHARD");
  EXPECT_ERROR_CONTAINS(
      resolve_sharding(FullyShardedDataParallelPlugin{.auto_wrap_policy = "TRANSFORMER_BASED_WRAP"},
                       std::nullopt, EnvMap{}),
      "TRANSFORMER_BASED_WRAP needs transformer_layer_cls_to_wrap");
  EXPECT_ERROR_CONTAINS(
      resolve_sharding(FullyShardedDataParallelPlugin{.sync_module_states = false,
                                                      .cpu_ram_efficient_loading = true},
                       std::nullopt, EnvMap{}),
      "cpu_ram_efficient_loading needs sync_module_states");
  EXPECT_ERROR_CONTAINS(
      resolve_sharding(FullyShardedDataParallelPlugin{.activation_checkpointing = true},
                       std::nullopt, EnvMap{}),
      "FSDP activation_checkpointing is not supported");
  EXPECT_ERROR_CONTAINS(resolve_sharding(std::nullopt, std::nullopt,
                                         EnvMap{{"ACCELERATE_USE_FSDP", "true"},
                                                {"FSDP_SHARDING_STRATEGY", "ZERO_SHARD"}}),
                        "unknown FSDP sharding_strategy \"ZERO_SHARD\"; choose one of FULL_SHARD, "
                        "SHARD_GRAD_OP, NO_SHARD, HYBRID_SHARD, HYBRID_SHARD_ZERO2 (or 1-5) (from "
                        "FSDP_SHARDING_STRATEGY)");
  EXPECT_ERROR_CONTAINS(resolve_sharding(std::nullopt, std::nullopt,
                                         EnvMap{{"ACCELERATE_USE_FSDP", "true"},
                                                {"FSDP_SHARDING_STRATEGY", "SHARD_GRAD_OP"},
                                                {"FSDP_OFFLOAD_PARAMS", "true"}}),
                        "FSDP cpu_offload (parameter offload) (from FSDP_OFFLOAD_PARAMS) needs "
                        "sharding_strategy FULL_SHARD");
  EXPECT_ERROR_CONTAINS(
      resolve_sharding(
          FullyShardedDataParallelPlugin{.sharding_strategy = ShardingStrategy::HYBRID_SHARD_ZERO2},
          std::nullopt, EnvMap{}),
      "HYBRID_SHARD_ZERO2 (sharding within a machine, replication across machines) is not "
      "available yet");
  EXPECT_ERROR_CONTAINS(
      resolve_sharding(
          FullyShardedDataParallelPlugin{.sharding_strategy = ShardingStrategy::SHARD_GRAD_OP,
                                         .auto_wrap_policy = "LAYER_WRAP"},
          std::nullopt, EnvMap{}),
      "FullyShardedDataParallelPlugin.auto_wrap_policy \"LAYER_WRAP\" is not one of "
      "TRANSFORMER_BASED_WRAP, SIZE_BASED_WRAP, NO_WRAP");
}

TEST(Plugins, DeepSpeedStagesAndSources) {
  // Accelerate's default stage is 2.
  auto c =
      resolve_sharding(std::nullopt, std::nullopt, EnvMap{{"ACCELERATE_USE_DEEPSPEED", "true"}});
  EXPECT_EQ(c.engine, "deepspeed");
  EXPECT_EQ(c.stage, 2);
  EXPECT_EQ(c.sources.at("zero_stage"), "default");
  EXPECT_EQ(c.state_dict_type, StateDictType::SHARDED_STATE_DICT);
  c = resolve_sharding(std::nullopt, std::nullopt,
                       EnvMap{{"ACCELERATE_USE_DEEPSPEED", "true"},
                              {"ACCELERATE_DEEPSPEED_ZERO_STAGE", "1"},
                              {"ACCELERATE_GRADIENT_CLIPPING", "0.5"},
                              {"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu"}});
  EXPECT_EQ(c.stage, 1);
  EXPECT_EQ(c.gradient_clipping, 0.5);
  EXPECT_TRUE(c.offload_optimizer);
  EXPECT_EQ(c.sources.at("gradient_clipping"), "environment");
  // Python Accelerate writes "none" for no clipping.
  c = resolve_sharding(
      std::nullopt, std::nullopt,
      EnvMap{{"ACCELERATE_USE_DEEPSPEED", "true"}, {"ACCELERATE_GRADIENT_CLIPPING", "none"}});
  EXPECT_FALSE(c.gradient_clipping.has_value());
  c = resolve_sharding(std::nullopt, DeepSpeedPlugin{.zero_stage = 0},
                       EnvMap{{"ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"}});
  EXPECT_EQ(c.stage, 0);
  EXPECT_EQ(c.sources.at("zero_stage"), "argument");
}

TEST(Plugins, DeepSpeedValuesThatCannotRunAreOneLineErrors) {
  EXPECT_ERROR_CONTAINS(resolve_sharding(std::nullopt, DeepSpeedPlugin{.zero_stage = 4}, EnvMap{}),
                        "DeepSpeed zero_stage must be 0, 1, 2 or 3, got 4");

  EXPECT_ERROR_CONTAINS(
      resolve_sharding(std::nullopt, DeepSpeedPlugin{.offload_optimizer_device = "nvme"}, EnvMap{}),
      "DeepSpeed offload_optimizer_device nvme is not supported (no NVMe offload engine)");
  EXPECT_ERROR_CONTAINS(
      resolve_sharding(std::nullopt, DeepSpeedPlugin{.offload_param_device = "cpu"}, EnvMap{}),
      "DeepSpeed offload_param_device cpu needs zero_stage 3 (parameters are whole at stage 2)");
  EXPECT_ERROR_CONTAINS(
      resolve_sharding(std::nullopt, DeepSpeedPlugin{.offload_optimizer_device = "disk"}, EnvMap{}),
      "offload_optimizer_device must be none, cpu or nvme, got \"disk\"");
  EXPECT_ERROR_CONTAINS(
      resolve_sharding(FullyShardedDataParallelPlugin{}, DeepSpeedPlugin{}, EnvMap{}),
      "give fsdp_plugin or deepspeed_plugin, not both");
  EXPECT_ERROR_CONTAINS(resolve_sharding(std::nullopt, std::nullopt,
                                         EnvMap{{"ACCELERATE_USE_FSDP", "true"},
                                                {"ACCELERATE_USE_DEEPSPEED", "true"}}),
                        "both FSDP and DeepSpeed are requested (ACCELERATE_USE_FSDP=true, "
                        "ACCELERATE_USE_DEEPSPEED=true); choose one");
  EXPECT_ERROR_CONTAINS(resolve_sharding(std::nullopt, std::nullopt,
                                         EnvMap{{"ACCELERATE_USE_DEEPSPEED", "true"},
                                                {"ACCELERATE_GRADIENT_CLIPPING", "lots"}}),
                        "ACCELERATE_GRADIENT_CLIPPING must be a number, got \"lots\"");
}

TEST(Plugins, DeepSpeedJsonIsReadForTheKeysWeSupport) {
  const auto path = write_json("ds_ok", R"({
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": 4,
    "gradient_clipping": 1.5,
    "bf16": {"enabled": true},
    "zero_optimization": {"stage": 1, "overlap_comm": true, "reduce_bucket_size": "auto",
                          "offload_optimizer": {"device": "cpu", "pin_memory": true}}
  })");
  const auto c = resolve_sharding(std::nullopt, DeepSpeedPlugin{.hf_ds_config = path}, EnvMap{});
  EXPECT_EQ(c.stage, 1);
  EXPECT_EQ(c.gradient_clipping, 1.5);
  EXPECT_EQ(c.gradient_accumulation_steps, 4);
  EXPECT_EQ(c.mixed_precision, "bf16");
  EXPECT_TRUE(c.offload_optimizer);
  EXPECT_EQ(c.sources.at("zero_stage"), "config file");
  // The Accelerator takes its accumulation and precision from the file.
  const auto options = accelerate::resolve_accelerator_options(
      {.deepspeed_plugin = DeepSpeedPlugin{.hf_ds_config = path}}, EnvMap{});
  EXPECT_EQ(options.gradient_accumulation.num_steps, 4);
  EXPECT_EQ(options.mixed_precision, accelerate::MixedPrecision::BF16);
  EXPECT_ERROR_CONTAINS(accelerate::resolve_accelerator_options(
                            {.gradient_accumulation_steps = 2,
                             .deepspeed_plugin = DeepSpeedPlugin{.hf_ds_config = path}},
                            EnvMap{}),
                        "gradient_accumulation_steps is 2 but the DeepSpeed plugin says 4");
  // A setting the file holds may not come from elsewhere too.
  EXPECT_ERROR_CONTAINS(
      resolve_sharding(std::nullopt, DeepSpeedPlugin{.zero_stage = 2, .hf_ds_config = path},
                       EnvMap{}),
      "DeepSpeedPlugin.zero_stage is given and the DeepSpeed config file " + path + " sets it too");
  EXPECT_ERROR_CONTAINS(
      resolve_sharding(std::nullopt, std::nullopt,
                       EnvMap{{"ACCELERATE_USE_DEEPSPEED", "true"},
                              {"ACCELERATE_DEEPSPEED_CONFIG_FILE", path},
                              {"ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"}}),
      "ACCELERATE_DEEPSPEED_ZERO_STAGE is set but the DeepSpeed config file " + path);
  fs::remove(path);
}

TEST(Plugins, DeepSpeedJsonRefusesWhatItCannotDoByName) {
  auto error = [](const std::string& text) {
    const auto path = write_json("ds_bad", text);
    auto message = accelerate::testing::error_of([&] { accelerate::read_deepspeed_config(path); });
    fs::remove(path);
    return message;
  };
  EXPECT_NE(error(R"({"optimizer": {"type": "AdamW"}})").find("\"optimizer\" is not supported"),
            std::string::npos);
  EXPECT_NE(error(R"({"zero_optimization": {"stage": 2, "sub_group_size": 1000}})")
                .find("\"zero_optimization.sub_group_size\" is not supported"),
            std::string::npos);
  EXPECT_NE(
      error(R"({"zero_optimization": {"offload_param": {"device": "cpu", "buffer_count": 4}}})")
          .find("\"zero_optimization.offload_param.buffer_count\" is not supported"),
      std::string::npos);
  EXPECT_NE(error(R"({"gradient_clipping": "high"})")
                .find("\"gradient_clipping\" must be a number or \"auto\""),
            std::string::npos);
  EXPECT_NE(error("{not json").find("is not valid JSON"), std::string::npos);
  EXPECT_NE(error(R"({"bf16": {"enabled": true}, "fp16": {"enabled": true}})")
                .find("enables both bf16 and fp16"),
            std::string::npos);
  EXPECT_NE(accelerate::testing::error_of([] {
              accelerate::read_deepspeed_config("/nonexistent/ds.json");
            }).find("cannot open the DeepSpeed config file /nonexistent/ds.json"),
            std::string::npos);
}

TEST(Plugins, AcceleratorRefusesHooksAndFp16WithSharding) {
  EXPECT_ERROR_CONTAINS(accelerate::resolve_accelerator_options(
                            {.ddp_kwargs =
                                 accelerate::DistributedDataParallelKwargs{
                                     .comm_hook = accelerate::DDPCommunicationHookType::BF16},
                             .deepspeed_plugin = DeepSpeedPlugin{.zero_stage = 1}},
                            EnvMap{}),
                        "communication hooks (ddp_kwargs.comm_hook) cannot be combined with ZeRO "
                        "stage 1 (deepspeed)");
  EXPECT_ERROR_CONTAINS(
      accelerate::resolve_accelerator_options(
          {.mixed_precision = "fp16", .deepspeed_plugin = DeepSpeedPlugin{.zero_stage = 2}},
          EnvMap{}),
      "mixed_precision=\"fp16\" with ZeRO sharding is not supported yet");
  // Stage 0 is plain data parallelism: hooks are fine.
  EXPECT_NO_THROW(accelerate::resolve_accelerator_options(
      {.ddp_kwargs =
           accelerate::DistributedDataParallelKwargs{
               .comm_hook = accelerate::DDPCommunicationHookType::BF16},
       .deepspeed_plugin = DeepSpeedPlugin{.zero_stage = 0}},
      EnvMap{}));
}

}  // namespace
