// `accelerate launch` with the sharding plugins: what each flag and each config-file key puts in
// the workers' environment, checked against every sharding variable a worker sees (so a missing
// and an extra variable both fail), and the one-line refusals of bad command lines and files.
//
// The worker is /usr/bin/env: it prints its whole environment, exactly as the launcher built it.
// The expected values are Python Accelerate's (utils/launch.py prepare_multi_gpu_env and
// prepare_deepspeed_cmd_env): FSDP's strategy, offload, min_num_params and booleans always
// written with argparse's defaults, DeepSpeed's settings only when given, str(float) for the
// clipping value.
#include "launch_util.h"

#include <accelerate/env_names.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

namespace {

using accelerate::testing::cli_path;
using accelerate::testing::contains;
using accelerate::testing::count_of;
using accelerate::testing::kLaunchVariables;
using accelerate::testing::kShardingVariables;
using accelerate::testing::run_command;
using accelerate::testing::RunResult;
using accelerate::testing::split_lines;
using accelerate::testing::TempDir;
namespace env = accelerate::env;
namespace fs = std::filesystem;
using KeyValues = std::map<std::string, std::string>;

constexpr std::chrono::seconds kTimeout(30);
constexpr const char* kEnvProgram = "/usr/bin/env";

std::vector<std::string> unset_for_launch() {
  std::vector<std::string> names = kLaunchVariables;
  names.insert(names.end(), kShardingVariables.begin(), kShardingVariables.end());
  return names;
}

// `accelerate launch ARGS... /usr/bin/env` (one process unless ARGS say otherwise), with every
// variable a runner may have set that the launcher could pass through removed first.
RunResult launch_env(const std::vector<std::string>& args) {
  std::vector<std::string> argv = {cli_path(), "launch"};
  argv.insert(argv.end(), args.begin(), args.end());
  argv.push_back(kEnvProgram);
  return run_command(argv, kTimeout, {}, unset_for_launch());
}

// The sharding variables in `output` (lines NAME=VALUE, after `prefix` when given).
KeyValues sharding_variables(const std::string& output, const std::string& prefix = "") {
  KeyValues seen;
  for (const auto& line : split_lines(output)) {
    if (line.rfind(prefix, 0) != 0) continue;
    const std::string entry = line.substr(prefix.size());
    const auto eq = entry.find('=');
    if (eq == std::string::npos) continue;
    const std::string name = entry.substr(0, eq);
    if (std::find(kShardingVariables.begin(), kShardingVariables.end(), name) !=
        kShardingVariables.end()) {
      EXPECT_EQ(seen.count(name), 0u) << name << " twice in\n" << output;
      seen[name] = entry.substr(eq + 1);
    }
  }
  return seen;
}

// What Python's prepare_multi_gpu_env writes for `--use_fsdp` alone.
KeyValues fsdp_defaults() {
  return {{env::kUseFsdp, "true"},
          {env::kFsdpShardingStrategy, "FULL_SHARD"},
          {env::kFsdpOffloadParams, "false"},
          {env::kFsdpMinNumParams, "100000000"},
          {env::kFsdpForwardPrefetch, "false"},
          {env::kFsdpUseOrigParams, "true"},
          {env::kFsdpCpuRamEfficientLoading, "true"},
          {env::kFsdpSyncModuleStates, "true"},
          {env::kFsdpActivationCheckpointing, "false"}};
}

fs::path write_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  return path;
}

// A refused launch: status 2, one line (nothing started, so nothing else printed), naming `parts`.
void expect_refused(const RunResult& r, const std::vector<std::string>& parts,
                    const std::string& context) {
  EXPECT_EQ(r.exit_code, 2) << context << "\n" << r.output;
  EXPECT_EQ(count_of(r.output, "\n"), 1u) << context << "\n" << r.output;
  EXPECT_TRUE(contains(r.output, "accelerate launch: error: ")) << context << "\n" << r.output;
  for (const auto& part : parts) {
    EXPECT_TRUE(contains(r.output, part)) << context << ": no '" << part << "' in\n" << r.output;
  }
  EXPECT_TRUE(sharding_variables(r.output).empty()) << context << "\n" << r.output;
}

// Files as Python Accelerate 0.27's `accelerate config` writes them (yaml.safe_dump: sorted keys,
// 'no' quoted, empty mappings and None values left out).
constexpr const char* kPythonFsdpYaml =
    "compute_environment: LOCAL_MACHINE\n"
    "debug: false\n"
    "distributed_type: FSDP\n"
    "downcast_bf16: 'no'\n"
    "fsdp_config:\n"
    "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
    "  fsdp_backward_prefetch: BACKWARD_PRE\n"
    "  fsdp_cpu_ram_efficient_loading: true\n"
    "  fsdp_forward_prefetch: false\n"
    "  fsdp_offload_params: false\n"
    "  fsdp_sharding_strategy: SHARD_GRAD_OP\n"
    "  fsdp_state_dict_type: SHARDED_STATE_DICT\n"
    "  fsdp_sync_module_states: true\n"
    "  fsdp_transformer_layer_cls_to_wrap: BertLayer,BertEmbeddings\n"
    "  fsdp_use_orig_params: true\n"
    "machine_rank: 0\n"
    "main_training_function: main\n"
    "mixed_precision: bf16\n"
    "num_machines: 1\n"
    "num_processes: 1\n"
    "rdzv_backend: static\n"
    "same_network: true\n"
    "tpu_env: []\n"
    "tpu_use_cluster: false\n"
    "tpu_use_sudo: false\n"
    "use_cpu: true\n";

constexpr const char* kPythonDeepSpeedYaml =
    "compute_environment: LOCAL_MACHINE\n"
    "debug: false\n"
    "deepspeed_config:\n"
    "  gradient_accumulation_steps: 4\n"
    "  gradient_clipping: 1.0\n"
    "  offload_optimizer_device: cpu\n"
    "  offload_param_device: none\n"
    "  zero3_init_flag: false\n"
    "  zero_stage: 1\n"
    "distributed_type: DEEPSPEED\n"
    "downcast_bf16: 'no'\n"
    "machine_rank: 0\n"
    "main_training_function: main\n"
    "mixed_precision: 'no'\n"
    "num_machines: 1\n"
    "num_processes: 1\n"
    "rdzv_backend: static\n"
    "same_network: true\n"
    "tpu_env: []\n"
    "tpu_use_cluster: false\n"
    "tpu_use_sudo: false\n"
    "use_cpu: true\n";

// ---------------------------------------------------------------- flags

TEST(ShardingLaunch, WithoutAPluginNoShardingVariableIsWritten) {
  const auto r = launch_env({"-n", "1"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(sharding_variables(r.output), KeyValues{}) << r.output;
}

TEST(ShardingLaunch, UseFsdpAloneWritesPythonsDefaults) {
  const auto r = launch_env({"--use_fsdp"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(sharding_variables(r.output), fsdp_defaults()) << r.output;
}

TEST(ShardingLaunch, EveryFsdpFlagReachesEveryWorker) {
  const auto r = launch_env({"-n",
                             "2",
                             "--rank_prefix",
                             "--use_fsdp",
                             "--fsdp_sharding_strategy",
                             "SHARD_GRAD_OP",
                             "--fsdp_offload_params",
                             "true",
                             "--fsdp_min_num_params",
                             "2000",
                             "--fsdp_auto_wrap_policy",
                             "SIZE_BASED_WRAP",
                             "--fsdp_transformer_layer_cls_to_wrap",
                             "Block,Embedding",
                             "--fsdp_backward_prefetch",
                             "BACKWARD_POST",
                             "--fsdp_state_dict_type",
                             "SHARDED_STATE_DICT",
                             "--fsdp_forward_prefetch",
                             "yes",
                             "--fsdp_use_orig_params",
                             "False",
                             "--fsdp_cpu_ram_efficient_loading",
                             "0",
                             "--fsdp_sync_module_states",
                             "off",
                             "--fsdp_activation_checkpointing",
                             "TRUE"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // Booleans in any of Accelerate's spellings arrive as true/false.
  const KeyValues expected = {{env::kUseFsdp, "true"},
                              {env::kFsdpShardingStrategy, "SHARD_GRAD_OP"},
                              {env::kFsdpOffloadParams, "true"},
                              {env::kFsdpMinNumParams, "2000"},
                              {env::kFsdpAutoWrapPolicy, "SIZE_BASED_WRAP"},
                              {env::kFsdpTransformerClsToWrap, "Block,Embedding"},
                              {env::kFsdpBackwardPrefetch, "BACKWARD_POST"},
                              {env::kFsdpStateDictType, "SHARDED_STATE_DICT"},
                              {env::kFsdpForwardPrefetch, "true"},
                              {env::kFsdpUseOrigParams, "false"},
                              {env::kFsdpCpuRamEfficientLoading, "false"},
                              {env::kFsdpSyncModuleStates, "false"},
                              {env::kFsdpActivationCheckpointing, "true"}};
  EXPECT_EQ(sharding_variables(r.output, "[rank 0] "), expected) << r.output;
  EXPECT_EQ(sharding_variables(r.output, "[rank 1] "), expected) << r.output;
}

TEST(ShardingLaunch, StrategyAndStateDictTypeMayBeNumbers) {
  for (const auto& [strategy, type] : std::vector<std::pair<std::string, std::string>>{
           {"1", "1"}, {"2", "3"}, {"5", "2"}, {"HYBRID_SHARD_ZERO2", "FULL_STATE_DICT"}}) {
    const auto r = launch_env(
        {"--use_fsdp", "--fsdp_sharding_strategy", strategy, "--fsdp_state_dict_type", type});
    ASSERT_EQ(r.exit_code, 0) << r.output;
    auto expected = fsdp_defaults();
    expected[env::kFsdpShardingStrategy] = strategy;
    expected[env::kFsdpStateDictType] = type;
    EXPECT_EQ(sharding_variables(r.output), expected) << r.output;
  }
}

TEST(ShardingLaunch, UseDeepSpeedAloneWritesOnlyTheSwitch) {
  // Python writes DeepSpeed's settings only when given; the library applies the defaults.
  const auto r = launch_env({"--use_deepspeed"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(sharding_variables(r.output), (KeyValues{{env::kUseDeepSpeed, "true"}})) << r.output;
}

TEST(ShardingLaunch, EveryDeepSpeedFlagReachesTheWorkers) {
  TempDir dir;
  fs::create_directories(dir.path() / "sub");
  write_file(dir.path() / "ds_config.json", "{\"zero_optimization\": {\"stage\": 1}}\n");
  // Relative to where accelerate launch runs, and handed on absolute and normalised.
  const std::string script = "cd \"$0\" && exec \"$@\"";
  std::vector<std::string> argv = {"/bin/sh",
                                   "-c",
                                   script,
                                   (dir.path() / "sub").string(),
                                   cli_path(),
                                   "launch",
                                   "--use_deepspeed",
                                   "--deepspeed_config_file",
                                   "../sub/../ds_config.json",
                                   "--zero_stage",
                                   "1",
                                   "--offload_optimizer_device",
                                   "CPU",
                                   "--offload_param_device",
                                   "none",
                                   "--offload_optimizer_nvme_path",
                                   "/nvme/optimizer",
                                   "--offload_param_nvme_path",
                                   "/nvme/param",
                                   "--gradient_clipping",
                                   "0.5",
                                   "--gradient_accumulation_steps",
                                   "4",
                                   "--zero3_init_flag",
                                   "yes",
                                   "--zero3_save_16bit_model",
                                   "false",
                                   "--deepspeed_multinode_launcher",
                                   "standard",
                                   kEnvProgram};
  const auto r = run_command(argv, kTimeout, {}, unset_for_launch());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const KeyValues expected = {{env::kUseDeepSpeed, "true"},
                              {env::kDeepSpeedConfigFile, (dir.path() / "ds_config.json").string()},
                              {env::kDeepSpeedZeroStage, "1"},
                              {env::kDeepSpeedOffloadOptimizerDevice, "cpu"},
                              {env::kDeepSpeedOffloadParamDevice, "none"},
                              {env::kDeepSpeedOffloadOptimizerNvmePath, "/nvme/optimizer"},
                              {env::kDeepSpeedOffloadParamNvmePath, "/nvme/param"},
                              {env::kGradientClipping, "0.5"},
                              {env::kGradientAccumulationSteps, "4"},
                              {env::kDeepSpeedZero3Init, "true"},
                              {env::kDeepSpeedZero3Save16BitModel, "false"}};
  EXPECT_EQ(sharding_variables(r.output), expected) << r.output;
}

// Python writes str(float(value)).lower(); the values below are what Python 3 prints.
TEST(ShardingLaunch, GradientClippingIsWrittenAsPythonWritesAFloat) {
  for (const auto& [given, written] :
       std::vector<std::pair<std::string, std::string>>{{"1", "1.0"},
                                                        {"0.5", "0.5"},
                                                        {"0", "0.0"},
                                                        {"1e-5", "1e-05"},
                                                        {"1.234e-5", "1.234e-05"},
                                                        {"2.5e-4", "0.00025"},
                                                        {"0.0001", "0.0001"},
                                                        {"100000", "100000.0"},
                                                        {"123456789.125", "123456789.125"},
                                                        {"1e16", "1e+16"},
                                                        {"0.1", "0.1"}}) {
    const auto r = launch_env({"--use_deepspeed", "--gradient_clipping", given});
    ASSERT_EQ(r.exit_code, 0) << given << "\n" << r.output;
    EXPECT_EQ(sharding_variables(r.output),
              (KeyValues{{env::kUseDeepSpeed, "true"}, {env::kGradientClipping, written}}))
        << given;
  }
}

// Valid for Accelerate but beyond the engine (LOCAL_STATE_DICT, nvme): the launcher passes them
// on and leaves the refusal to the library.
TEST(ShardingLaunch, ValuesTheEngineMayLackArePassedOn) {
  auto r = launch_env({"--use_fsdp", "--fsdp_sharding_strategy", "FULL_SHARD",
                       "--fsdp_state_dict_type", "LOCAL_STATE_DICT"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto fsdp = fsdp_defaults();
  fsdp[env::kFsdpStateDictType] = "LOCAL_STATE_DICT";
  EXPECT_EQ(sharding_variables(r.output), fsdp) << r.output;

  r = launch_env({"--use_deepspeed", "--zero_stage", "3", "--offload_param_device", "nvme"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(sharding_variables(r.output), (KeyValues{{env::kUseDeepSpeed, "true"},
                                                     {env::kDeepSpeedZeroStage, "3"},
                                                     {env::kDeepSpeedOffloadParamDevice, "nvme"}}))
      << r.output;
}

TEST(ShardingLaunch, DeepSpeedConfigFileNoneMeansNoFile) {
  const auto r = launch_env({"--use_deepspeed", "--deepspeed_config_file", "none"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(sharding_variables(r.output), (KeyValues{{env::kUseDeepSpeed, "true"}})) << r.output;
}

TEST(ShardingLaunch, OtherVariablesAreThoseOfAPlainLaunch) {
  const auto plain = launch_env({"-n", "1", "--cpu", "--mixed_precision", "bf16"});
  const auto fsdp = launch_env({"-n", "1", "--cpu", "--mixed_precision", "bf16", "--use_fsdp"});
  ASSERT_EQ(plain.exit_code, 0) << plain.output;
  ASSERT_EQ(fsdp.exit_code, 0) << fsdp.output;
  auto without = [](const std::string& output) {
    std::vector<std::string> lines;
    for (const auto& line : split_lines(output)) {
      const std::string name = line.substr(0, line.find('='));
      // The port and the failure records' directory are chosen afresh for every launch.
      if (name == "MASTER_PORT" || name == accelerate::env::kErrorFile) continue;
      if (std::find(kShardingVariables.begin(), kShardingVariables.end(), name) ==
          kShardingVariables.end()) {
        lines.push_back(line);
      }
    }
    return lines;
  };
  EXPECT_EQ(without(fsdp.output), without(plain.output));
  EXPECT_TRUE(contains(fsdp.output, "\nACCELERATE_USE_CPU=true\n")) << fsdp.output;
  EXPECT_TRUE(contains(fsdp.output, "\nACCELERATE_MIXED_PRECISION=bf16\n")) << fsdp.output;
}

// ---------------------------------------------------------------- config files

TEST(ShardingLaunch, PythonFsdpConfigFileReachesTheWorkers) {
  TempDir dir;
  const auto file = write_file(dir.path() / "fsdp.yaml", kPythonFsdpYaml);
  const auto r = launch_env({"--config_file", file.string()});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_FALSE(contains(r.output, "warning")) << r.output;
  const KeyValues expected = {{env::kUseFsdp, "true"},
                              {env::kFsdpShardingStrategy, "SHARD_GRAD_OP"},
                              {env::kFsdpOffloadParams, "false"},
                              {env::kFsdpMinNumParams, "100000000"},
                              {env::kFsdpAutoWrapPolicy, "TRANSFORMER_BASED_WRAP"},
                              {env::kFsdpTransformerClsToWrap, "BertLayer,BertEmbeddings"},
                              {env::kFsdpBackwardPrefetch, "BACKWARD_PRE"},
                              {env::kFsdpStateDictType, "SHARDED_STATE_DICT"},
                              {env::kFsdpForwardPrefetch, "false"},
                              {env::kFsdpUseOrigParams, "true"},
                              {env::kFsdpCpuRamEfficientLoading, "true"},
                              {env::kFsdpSyncModuleStates, "true"},
                              {env::kFsdpActivationCheckpointing, "false"}};
  EXPECT_EQ(sharding_variables(r.output), expected) << r.output;
  EXPECT_TRUE(contains(r.output, "\nACCELERATE_MIXED_PRECISION=bf16\n")) << r.output;
}

TEST(ShardingLaunch, PythonDeepSpeedConfigFileReachesTheWorkers) {
  TempDir dir;
  const auto file = write_file(dir.path() / "ds.yaml", kPythonDeepSpeedYaml);
  const auto r = launch_env({"--config_file", file.string()});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_FALSE(contains(r.output, "warning")) << r.output;
  // gradient_accumulation_steps comes from deepspeed_config, where Python keeps it.
  const KeyValues expected = {{env::kUseDeepSpeed, "true"},
                              {env::kDeepSpeedZeroStage, "1"},
                              {env::kGradientAccumulationSteps, "4"},
                              {env::kGradientClipping, "1.0"},
                              {env::kDeepSpeedOffloadOptimizerDevice, "cpu"},
                              {env::kDeepSpeedOffloadParamDevice, "none"},
                              {env::kDeepSpeedZero3Init, "false"}};
  EXPECT_EQ(sharding_variables(r.output), expected) << r.output;
}

TEST(ShardingLaunch, OlderPythonSpellingsAreRead) {
  // Before 0.27 Python wrote FSDP keys without their prefix, strategies as numbers and the
  // backward prefetch as fsdp_backward_prefetch_policy; its launcher reads them all still.
  TempDir dir;
  const auto file = write_file(dir.path() / "old.yaml",
                               "distributed_type: FSDP\n"
                               "fsdp_config:\n"
                               "  min_num_params: 2000\n"
                               "  offload_params: true\n"
                               "  sharding_strategy: 2\n"
                               "  fsdp_backward_prefetch_policy: BACKWARD_POST\n"
                               "deepspeed_config: {}\n"
                               "num_processes: 1\n"
                               "use_cpu: true\n");
  const auto r = launch_env({"--config_file", file.string()});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto expected = fsdp_defaults();
  expected[env::kFsdpMinNumParams] = "2000";
  expected[env::kFsdpOffloadParams] = "true";
  expected[env::kFsdpShardingStrategy] = "2";
  expected[env::kFsdpBackwardPrefetch] = "BACKWARD_POST";
  EXPECT_EQ(sharding_variables(r.output), expected) << r.output;
}

TEST(ShardingLaunch, FlagsOverrideTheConfigFileAndDebugSaysWhere) {
  TempDir dir;
  const auto fsdp_file = write_file(dir.path() / "fsdp.yaml", kPythonFsdpYaml);
  auto r = launch_env({"--config_file", fsdp_file.string(), "--debug", "--fsdp_sharding_strategy",
                       "NO_SHARD", "--fsdp_min_num_params", "7"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto seen = sharding_variables(r.output);
  EXPECT_EQ(seen[env::kFsdpShardingStrategy], "NO_SHARD") << r.output;
  EXPECT_EQ(seen[env::kFsdpMinNumParams], "7") << r.output;
  EXPECT_EQ(seen[env::kFsdpStateDictType], "SHARDED_STATE_DICT") << r.output;
  const std::string from_file = " (config file " + fsdp_file.string() + ")";
  for (const std::string& line :
       {"use_fsdp = true" + from_file, std::string("use_deepspeed = false (default)"),
        std::string("fsdp_sharding_strategy = NO_SHARD (flag)"),
        std::string("fsdp_min_num_params = 7 (flag)"),
        "fsdp_state_dict_type = SHARDED_STATE_DICT" + from_file,
        "fsdp_transformer_layer_cls_to_wrap = BertLayer,BertEmbeddings" + from_file,
        std::string("fsdp_activation_checkpointing = false (default)")}) {
    EXPECT_EQ(count_of(r.output, "accelerate launch: " + line + "\n"), 1u) << line << r.output;
  }

  const auto ds_file = write_file(dir.path() / "ds.yaml", kPythonDeepSpeedYaml);
  r = launch_env({"--config_file", ds_file.string(), "--debug", "--zero_stage", "2",
                  "--gradient_accumulation_steps", "8", "--gradient_clipping", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  seen = sharding_variables(r.output);
  EXPECT_EQ(seen[env::kDeepSpeedZeroStage], "2") << r.output;
  EXPECT_EQ(seen[env::kGradientAccumulationSteps], "8") << r.output;
  EXPECT_EQ(seen[env::kGradientClipping], "2.0") << r.output;
  EXPECT_EQ(seen[env::kDeepSpeedOffloadOptimizerDevice], "cpu") << r.output;
  const std::string ds_from_file = " (config file " + ds_file.string() + ")";
  for (const std::string& line :
       {"use_deepspeed = true" + ds_from_file, std::string("zero_stage = 2 (flag)"),
        std::string("gradient_accumulation_steps = 8 (flag)"),
        "offload_optimizer_device = cpu" + ds_from_file,
        std::string("deepspeed_config_file = (not set) (default)")}) {
    EXPECT_EQ(count_of(r.output, "accelerate launch: " + line + "\n"), 1u) << line << r.output;
  }
}

TEST(ShardingLaunch, AFlagTurnsThePluginOnOverAMultiCpuFile) {
  TempDir dir;
  const auto file = write_file(dir.path() / "cpu.yaml",
                               "distributed_type: MULTI_CPU\nnum_processes: 1\n"
                               "fsdp_config:\n  fsdp_sharding_strategy: NO_SHARD\n");
  // fsdp_config applies once FSDP is on, whichever way it was turned on.
  const auto r = launch_env({"--config_file", file.string(), "--use_fsdp"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto expected = fsdp_defaults();
  expected[env::kFsdpShardingStrategy] = "NO_SHARD";
  EXPECT_EQ(sharding_variables(r.output), expected) << r.output;
}

// ---------------------------------------------------------------- refusals

TEST(ShardingLaunch, BothPluginsAreRefused) {
  expect_refused(launch_env({"--use_fsdp", "--use_deepspeed"}),
                 {"--use_fsdp and --use_deepspeed cannot be used together"}, "flags");
  TempDir dir;
  const auto fsdp_file = write_file(dir.path() / "fsdp.yaml", kPythonFsdpYaml);
  expect_refused(
      launch_env({"--config_file", fsdp_file.string(), "--use_deepspeed"}),
      {"distributed_type: FSDP in config file " + fsdp_file.string() + " and --use_deepspeed"},
      "FSDP file");
  const auto ds_file = write_file(dir.path() / "ds.yaml", kPythonDeepSpeedYaml);
  expect_refused(launch_env({"--config_file", ds_file.string(), "--use_fsdp"}),
                 {"--use_fsdp and distributed_type: DEEPSPEED in config file " + ds_file.string()},
                 "DeepSpeed file");
}

TEST(ShardingLaunch, BadFlagValuesAreRefusedNamingFlagAndValue) {
  struct Case {
    std::vector<std::string> args;
    std::string message;
  };
  const std::string strategies =
      "one of FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, HYBRID_SHARD, HYBRID_SHARD_ZERO2 or a number "
      "from 1 to 5";
  const std::vector<Case> cases = {
      {{"--use_fsdp", "--fsdp_sharding_strategy", "ZERO2"},
       "--fsdp_sharding_strategy must be " + strategies + ", got 'ZERO2'"},
      {{"--use_fsdp", "--fsdp_sharding_strategy", "6"},
       "--fsdp_sharding_strategy must be " + strategies + ", got '6'"},
      {{"--use_fsdp", "--fsdp_sharding_strategy", "shard_grad_op"},
       "--fsdp_sharding_strategy must be " + strategies + ", got 'shard_grad_op'"},
      {{"--use_fsdp", "--fsdp_state_dict_type", "4"},
       "--fsdp_state_dict_type must be one of FULL_STATE_DICT, LOCAL_STATE_DICT, "
       "SHARDED_STATE_DICT or a number from 1 to 3, got '4'"},
      {{"--use_fsdp", "--fsdp_auto_wrap_policy", "LAYER_WRAP"},
       "--fsdp_auto_wrap_policy must be one of TRANSFORMER_BASED_WRAP, SIZE_BASED_WRAP, NO_WRAP, "
       "got 'LAYER_WRAP'"},
      {{"--use_fsdp", "--fsdp_backward_prefetch", "PRE"},
       "--fsdp_backward_prefetch must be one of BACKWARD_PRE, BACKWARD_POST, NO_PREFETCH, got "
       "'PRE'"},
      {{"--use_fsdp", "--fsdp_offload_params", "maybe"},
       "--fsdp_offload_params must be true or false, got 'maybe'"},
      {{"--use_fsdp", "--fsdp_activation_checkpointing", "2"},
       "--fsdp_activation_checkpointing must be true or false, got '2'"},
      {{"--use_fsdp", "--fsdp_min_num_params", "1e8"},
       "--fsdp_min_num_params must be a whole number of at least 0, got '1e8'"},
      {{"--use_fsdp", "--fsdp_min_num_params", "-1"},
       "--fsdp_min_num_params must be a whole number of at least 0, got '-1'"},
      {{"--use_fsdp", "--fsdp_transformer_layer_cls_to_wrap", ""},
       "--fsdp_transformer_layer_cls_to_wrap must be a non-empty value, got ''"},
      {{"--use_deepspeed", "--zero_stage", "4"}, "--zero_stage must be one of 0, 1, 2, 3, got '4'"},
      {{"--use_deepspeed", "--zero_stage", "two"},
       "--zero_stage must be one of 0, 1, 2, 3, got 'two'"},
      {{"--use_deepspeed", "--offload_optimizer_device", "disk"},
       "--offload_optimizer_device must be one of none, cpu, nvme, got 'disk'"},
      {{"--use_deepspeed", "--offload_param_device", "gpu"},
       "--offload_param_device must be one of none, cpu, nvme, got 'gpu'"},
      {{"--use_deepspeed", "--gradient_clipping", "-1"},
       "--gradient_clipping must be a number of at least 0, got '-1'"},
      {{"--use_deepspeed", "--gradient_clipping", "inf"},
       "--gradient_clipping must be a number of at least 0, got 'inf'"},
      {{"--use_deepspeed", "--zero3_init_flag", "sometimes"},
       "--zero3_init_flag must be true or false, got 'sometimes'"},
      {{"--use_deepspeed", "--deepspeed_multinode_launcher", "slurm"},
       "--deepspeed_multinode_launcher must be one of pdsh, standard, openmpi, mvapich, mpich, "
       "got 'slurm'"},
      {{"--use_deepspeed", "--deepspeed_multinode_launcher", "pdsh"},
       "--deepspeed_multinode_launcher 'pdsh' is not supported: accelerate launch starts the "
       "processes of every machine itself"},
      {{"--use_deepspeed", "--deepspeed_config_file", "/nonexistent/ds.json"},
       "--deepspeed_config_file '/nonexistent/ds.json' does not exist"},
      {{"--use_deepspeed", "--deepspeed_config_file", "/"},
       "--deepspeed_config_file '/' is not a file"},
      // CPU-RAM-efficient loading (on by default) needs the start-up broadcast, as in Python.
      {{"--use_fsdp", "--fsdp_sync_module_states", "false"},
       "--fsdp_sync_module_states 'false' needs --fsdp_cpu_ram_efficient_loading false (it is "
       "true by default)"},
  };
  for (const auto& c : cases) {
    std::string context;
    for (const auto& a : c.args) context += a + " ";
    expect_refused(launch_env(c.args), {c.message}, context);
  }
}

TEST(ShardingLaunch, APluginsFlagsNeedThePlugin) {
  for (const auto& [args, message] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"--fsdp_sharding_strategy", "SHARD_GRAD_OP"},
            "--fsdp_sharding_strategy needs --use_fsdp (or distributed_type: FSDP in the config "
            "file)"},
           {{"--use_deepspeed", "--fsdp_offload_params", "true"},
            "--fsdp_offload_params needs --use_fsdp"},
           {{"--zero_stage", "2"},
            "--zero_stage needs --use_deepspeed (or distributed_type: DEEPSPEED in the config "
            "file)"},
           {{"--use_fsdp", "--gradient_clipping", "1.0"},
            "--gradient_clipping needs --use_deepspeed"}}) {
    expect_refused(launch_env(args), {message}, message);
  }
}

TEST(ShardingLaunch, BadConfigFileValuesAreRefusedNamingKeyValueAndFile) {
  TempDir dir;
  for (const auto& [text, message] : std::vector<std::pair<std::string, std::string>>{
           {"distributed_type: FSDP\nfsdp_config:\n  fsdp_sharding_strategy: ZERO3\n",
            "fsdp_config.fsdp_sharding_strategy = 'ZERO3' is invalid: expected one of FULL_SHARD"},
           {"distributed_type: FSDP\nfsdp_config:\n  fsdp_offload_params: maybe\n",
            "fsdp_config.fsdp_offload_params = 'maybe' is invalid: expected true or false"},
           {"distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 4\n",
            "deepspeed_config.zero_stage = '4' is invalid: expected one of 0, 1, 2, 3"},
           {"distributed_type: DEEPSPEED\ndeepspeed_config:\n  offload_param_device: disk\n",
            "deepspeed_config.offload_param_device = 'disk' is invalid: expected one of none, cpu, "
            "nvme"},
           {"distributed_type: DEEPSPEED\ndeepspeed_config:\n  gradient_accumulation_steps: 0\n",
            "deepspeed_config.gradient_accumulation_steps = '0' is invalid: must be at least 1"},
           {"distributed_type: DEEPSPEED\ndeepspeed_config: [1, 2]\n",
            "deepspeed_config = '[1, 2]' is invalid: expected a mapping"}}) {
    const auto file = write_file(dir.path() / "bad.yaml", text);
    expect_refused(launch_env({"--config_file", file.string()}),
                   {"config file '" + file.string() + "': " + message}, text);
  }
  // Checks across keys name the key where the value was found.
  const auto sync = write_file(dir.path() / "sync.yaml",
                               "distributed_type: FSDP\nfsdp_config:\n"
                               "  fsdp_sync_module_states: false\n");
  expect_refused(launch_env({"--config_file", sync.string()}),
                 {"fsdp_config.fsdp_sync_module_states 'false' in config file " + sync.string() +
                  " needs --fsdp_cpu_ram_efficient_loading false"},
                 "sync");
  const auto launcher = write_file(dir.path() / "launcher.yaml",
                                   "distributed_type: DEEPSPEED\ndeepspeed_config:\n"
                                   "  deepspeed_multinode_launcher: pdsh\n");
  expect_refused(launch_env({"--config_file", launcher.string()}),
                 {"deepspeed_config.deepspeed_multinode_launcher 'pdsh' in config file " +
                  launcher.string() + " is not supported"},
                 "launcher");
  const auto missing = write_file(dir.path() / "missing.yaml",
                                  "distributed_type: DEEPSPEED\ndeepspeed_config:\n"
                                  "  deepspeed_config_file: no_such.json\n");
  expect_refused(launch_env({"--config_file", missing.string()}),
                 {"deepspeed_config.deepspeed_config_file 'no_such.json' in config file " +
                  missing.string() + " does not exist"},
                 "missing");
}

TEST(ShardingLaunch, UnknownKeysInsideAPluginMappingAreWarnedAboutByName) {
  TempDir dir;
  const auto file = write_file(dir.path() / "cfg.yaml",
                               "distributed_type: DEEPSPEED\nnum_processes: 1\n"
                               "deepspeed_config:\n  zero_stage: 1\n  zero_bucket_mb: 5\n"
                               "  deepspeed_hostfile: /etc/hosts\n");
  const auto r = launch_env({"--config_file", file.string()});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(count_of(r.output, "warning"), 1u) << r.output;
  EXPECT_EQ(count_of(r.output, "accelerate launch: warning: config file '" + file.string() +
                                   "': unknown key 'deepspeed_config.zero_bucket_mb' ignored\n"),
            1u)
      << r.output;
  EXPECT_EQ(sharding_variables(r.output),
            (KeyValues{{env::kUseDeepSpeed, "true"}, {env::kDeepSpeedZeroStage, "1"}}))
      << r.output;
}

TEST(ShardingLaunch, HelpDocumentsEveryShardingOptionWithItsDefault) {
  const auto r = run_command({cli_path(), "launch", "-h"}, kTimeout);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto lines = split_lines(r.output);
  for (const char* option : {"--use_fsdp",
                             "--fsdp_sharding_strategy",
                             "--fsdp_offload_params",
                             "--fsdp_min_num_params",
                             "--fsdp_auto_wrap_policy",
                             "--fsdp_transformer_layer_cls_to_wrap",
                             "--fsdp_backward_prefetch",
                             "--fsdp_state_dict_type",
                             "--fsdp_forward_prefetch",
                             "--fsdp_use_orig_params",
                             "--fsdp_cpu_ram_efficient_loading",
                             "--fsdp_sync_module_states",
                             "--fsdp_activation_checkpointing",
                             "--use_deepspeed",
                             "--deepspeed_config_file",
                             "--zero_stage",
                             "--offload_optimizer_device",
                             "--offload_param_device",
                             "--offload_optimizer_nvme_path",
                             "--offload_param_nvme_path",
                             "--gradient_clipping",
                             "--zero3_init_flag",
                             "--zero3_save_16bit_model",
                             "--deepspeed_multinode_launcher"}) {
    const std::string name = option;
    auto it = std::find_if(lines.begin(), lines.end(), [&](const std::string& line) {
      return line.rfind("  " + name + " ", 0) == 0;
    });
    ASSERT_NE(it, lines.end()) << option << "\n" << r.output;
    std::string entry = *it;
    if (std::next(it) != lines.end() && std::next(it)->rfind("   ", 0) == 0) {
      entry += *std::next(it);
    }
    EXPECT_TRUE(contains(entry, "(default")) << option << ": " << entry;
  }
}

}  // namespace
