// `accelerate config`, `config default` and `config show`, run as a user runs them: answers piped
// into the real executable, files compared key by key with what Python Accelerate writes for the
// same answers (commands/config/cluster.py and default.py, safe_dump's sorted keys).
#include "launch_util.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <tuple>
#include <vector>

namespace {

using accelerate::testing::cli_path;
using accelerate::testing::read_text_file;
using accelerate::testing::run_command;
using accelerate::testing::RunResult;
using accelerate::testing::split_lines;
using accelerate::testing::TempDir;
using accelerate::testing::worker_path;

namespace fs = std::filesystem;
using KeyValues = std::map<std::string, std::string>;

constexpr std::chrono::seconds kTimeout(30);

// `accelerate config ARGS...` with `answers` on its stdin through a pipe (run_command gives the
// command /dev/null). CUDA_VISIBLE_DEVICES is emptied so the GPU count, and with it every default,
// is the same on a machine with GPUs.
RunResult config_with_answers(const std::string& answers, const std::vector<std::string>& args,
                              const std::map<std::string, std::string>& env = {}) {
  std::vector<std::string> argv = {
      "/bin/sh",  "-c",    "answers=$1; shift; printf '%s' \"$answers\" | \"$@\"", "sh", answers,
      cli_path(), "config"};
  argv.insert(argv.end(), args.begin(), args.end());
  auto full_env = env;
  full_env.emplace("CUDA_VISIBLE_DEVICES", "");
  return run_command(argv, kTimeout, full_env);
}

RunResult accelerate_config(const std::vector<std::string>& args,
                            const std::map<std::string, std::string>& env = {}) {
  std::vector<std::string> argv = {cli_path(), "config"};
  argv.insert(argv.end(), args.begin(), args.end());
  auto full_env = env;
  full_env.emplace("CUDA_VISIBLE_DEVICES", "");
  return run_command(argv, kTimeout, full_env);
}

// The top-level `key: value` lines of a flat YAML file, values exactly as written (quotes kept),
// so a test sees both which keys there are and how each value is spelled.
KeyValues top_level_keys(const std::string& yaml) {
  KeyValues out;
  for (const auto& line : split_lines(yaml)) {
    if (line.empty() || line[0] == ' ' || line[0] == '-' || line[0] == '#') continue;
    const auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string value = line.substr(colon + 1);
    if (!value.empty() && value[0] == ' ') value.erase(0, 1);
    out[line.substr(0, colon)] = value;
  }
  return out;
}

void write_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
}

int count_lines_containing(const std::string& text, const std::string& needle) {
  const auto lines = split_lines(text);
  return static_cast<int>(std::count_if(lines.begin(), lines.end(), [&](const std::string& l) {
    return l.find(needle) != std::string::npos;
  }));
}

// What Python's questionnaire writes for "This machine, multi-CPU, 1 machine, 4 processes",
// before the answers that vary between tests.
KeyValues python_multi_cpu_file() {
  return {{"compute_environment", "LOCAL_MACHINE"},
          {"debug", "false"},
          {"distributed_type", "MULTI_CPU"},
          {"downcast_bf16", "false"},
          {"enable_cpu_affinity", "false"},
          {"machine_rank", "0"},
          {"main_training_function", "main"},
          {"mixed_precision", "'no'"},
          {"num_machines", "1"},
          {"num_processes", "4"},
          {"rdzv_backend", "static"},
          {"same_network", "true"},
          {"tpu_env", "[]"},
          {"tpu_use_cluster", "false"},
          {"tpu_use_sudo", "false"},
          {"use_cpu", "true"}};
}

// A file as Python Accelerate's `accelerate config` writes it for a 4-process multi-CPU job
// (downcast_bf16 is the string 'no' there).
constexpr const char* kPythonMultiCpuYaml =
    "compute_environment: LOCAL_MACHINE\n"
    "debug: false\n"
    "distributed_type: MULTI_CPU\n"
    "downcast_bf16: 'no'\n"
    "enable_cpu_affinity: false\n"
    "machine_rank: 0\n"
    "main_training_function: main\n"
    "mixed_precision: 'no'\n"
    "num_machines: 1\n"
    "num_processes: 4\n"
    "rdzv_backend: static\n"
    "same_network: true\n"
    "tpu_env: []\n"
    "tpu_use_cluster: false\n"
    "tpu_use_sudo: false\n"
    "use_cpu: true\n";

TEST(ConfigCli, PipedMultiCpuSessionWritesPythonKeys) {
  TempDir dir;
  const auto file = dir.path() / "cfg.yaml";
  // environment, machine type, machines, debug, DeepSpeed, FSDP, processes, mixed precision,
  // accumulation
  const auto r = config_with_answers("0\n1\n1\nyes\nno\nno\n4\nbf16\n1\n", {"--config_file", file});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("accelerate configuration saved at " + file.string()), std::string::npos)
      << r.output;
  auto expected = python_multi_cpu_file();
  expected["debug"] = "true";
  expected["mixed_precision"] = "bf16";
  EXPECT_EQ(top_level_keys(read_text_file(file)), expected) << read_text_file(file);
}

// The workflow the spec describes: `accelerate config` once (here from a pipe), then
// `accelerate launch` uses what it wrote.
TEST(ConfigCli, APipedSessionConfiguresLaunch) {
  TempDir dir;
  const auto file = dir.path() / "cfg.yaml";
  auto r = config_with_answers("0\n1\n1\nno\nno\nno\n3\nbf16\n1\n", {"--config_file", file});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_command({cli_path(), "launch", "--config_file", file.string(),
                   worker_path("launch_probe"), "--print-env"},
                  kTimeout);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(count_lines_containing(r.output, "WORLD_SIZE=3"), 3) << r.output;
  EXPECT_EQ(count_lines_containing(r.output, "ACCELERATE_MIXED_PRECISION=bf16"), 3) << r.output;
}

TEST(ConfigCli, AnswersByNameAreAccepted) {
  TempDir dir;
  const auto file = dir.path() / "cfg.yaml";
  const auto r = config_with_answers("This machine\nMULTI_CPU\n1\nno\nno\nno\n4\nno\n1\n",
                                     {"--config_file", file});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(top_level_keys(read_text_file(file)), python_multi_cpu_file());
}

TEST(ConfigCli, EmptyLinesTakeTheDefaults) {
  TempDir dir;
  const auto file = dir.path() / "cfg.yaml";
  // environment, machine type, CPU only, GPU ids, mixed precision, accumulation: all defaults.
  const auto r = config_with_answers("\n\n\n\n\n\n", {"--config_file", file});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const KeyValues expected = {{"compute_environment", "LOCAL_MACHINE"},
                              {"debug", "false"},
                              {"distributed_type", "'NO'"},
                              {"downcast_bf16", "false"},
                              {"enable_cpu_affinity", "false"},
                              {"gpu_ids", "all"},
                              {"machine_rank", "0"},
                              {"main_training_function", "main"},
                              {"mixed_precision", "'no'"},
                              {"num_machines", "1"},
                              {"num_processes", "1"},
                              {"rdzv_backend", "static"},
                              {"same_network", "true"},
                              {"tpu_env", "[]"},
                              {"tpu_use_cluster", "false"},
                              {"tpu_use_sudo", "false"},
                              {"use_cpu", "false"}};
  EXPECT_EQ(top_level_keys(read_text_file(file)), expected) << read_text_file(file);
}

TEST(ConfigCli, MultiMachineGpuSessionWritesNetworkKeysAndAccumulation) {
  TempDir dir;
  const auto file = dir.path() / "cfg.yaml";
  // environment, multi-GPU, 2 machines, rank 1, IP, port (default), same network no, c10d,
  // debug, DeepSpeed, FSDP, 2 GPUs, ids, fp16, 4 accumulation steps.
  const auto r = config_with_answers(
      "0\n2\n2\n1\n10.1.2.3\n\nno\nc10d\nno\nno\nno\n2\n0,1\nfp16\n4\n", {"--config_file", file});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const KeyValues expected = {{"compute_environment", "LOCAL_MACHINE"},
                              {"debug", "false"},
                              {"distributed_type", "MULTI_GPU"},
                              {"downcast_bf16", "false"},
                              {"enable_cpu_affinity", "false"},
                              {"gpu_ids", "'0,1'"},
                              {"gradient_accumulation_steps", "4"},
                              {"machine_rank", "1"},
                              {"main_process_ip", "'10.1.2.3'"},
                              {"main_process_port", "29500"},
                              {"main_training_function", "main"},
                              {"mixed_precision", "fp16"},
                              {"num_machines", "2"},
                              {"num_processes", "2"},
                              {"rdzv_backend", "c10d"},
                              {"same_network", "false"},
                              {"tpu_env", "[]"},
                              {"tpu_use_cluster", "false"},
                              {"tpu_use_sudo", "false"},
                              {"use_cpu", "false"}};
  EXPECT_EQ(top_level_keys(read_text_file(file)), expected) << read_text_file(file);
}

TEST(ConfigCli, JsonPathIsWrittenAsJson) {
  TempDir dir;
  const auto file = dir.path() / "cfg.json";
  const auto r = config_with_answers("0\n1\n1\nno\nno\nno\n4\nno\n1\n", {"--config_file", file});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string text = read_text_file(file);
  EXPECT_EQ(text.rfind("{\n  \"compute_environment\": \"LOCAL_MACHINE\",\n", 0), 0u) << text;
  EXPECT_NE(text.find("\n  \"num_processes\": 4,\n"), std::string::npos) << text;
  EXPECT_NE(text.find("\n  \"mixed_precision\": \"no\",\n"), std::string::npos) << text;
  EXPECT_NE(text.find("\n  \"tpu_env\": [],\n"), std::string::npos) << text;
  EXPECT_EQ(text.substr(text.size() - 3), "\n}\n") << text;
  // ... and read back as the same config.
  const auto shown = accelerate_config({"show", "--config_file", file.string()});
  ASSERT_EQ(shown.exit_code, 0) << shown.output;
  EXPECT_EQ(top_level_keys(shown.output), python_multi_cpu_file()) << shown.output;
}

TEST(ConfigCli, InvalidPipedAnswerExitsTwoWithOneLineReason) {
  struct Case {
    std::string answers;
    std::string reason;
  };
  const std::vector<Case> cases = {
      {"0\n1\nlots\n", "invalid answer 'lots' for num_machines"},
      {"1\n", "Amazon SageMaker is not supported"},
      {"0\n7\n", "invalid answer '7' for distributed_type"},
      {"0\n1\n1\nmaybe\n", "invalid answer 'maybe' for debug: please enter yes or no"},
      {"0\n1\n1\nno\nno\nno\n0\n", "invalid answer '0' for num_processes"},
      {"0\n2\n1\nno\nno\nno\n1\n", "one GPU on one machine is not distributed"},
      {"0\n0\nno\n0,,1\n", "invalid answer '0,,1' for gpu_ids"},
      {"0\n1\n1\nno\nno\nno\n4\nfp8\n", "fp8 is not supported"},
      {"0\n1\n3\n3\n", "invalid answer '3' for machine_rank"},
      {"0\n1\n2\n0\n\n", "invalid answer '' for main_process_ip: an answer is required"},
      {"0\n1\n2\n0\nhost\n99999\n", "invalid answer '99999' for main_process_port"},
      {"0\n1\n2\n0\nhost\n\nno\netcd\n", "invalid answer 'etcd' for rdzv_backend"}};
  for (const auto& c : cases) {
    TempDir dir;
    const auto file = dir.path() / "cfg.yaml";
    const auto r = config_with_answers(c.answers, {"--config_file", file});
    EXPECT_EQ(r.exit_code, 2) << c.answers << r.output;
    EXPECT_EQ(count_lines_containing(r.output, "error:"), 1) << r.output;
    EXPECT_EQ(count_lines_containing(r.output, c.reason), 1) << c.reason << "\n" << r.output;
    EXPECT_FALSE(fs::exists(file)) << c.answers;
    EXPECT_FALSE(r.timed_out);
  }
}

TEST(ConfigCli, InputEndingEarlyExitsTwo) {
  for (const std::string answers : {"", "0\n", "0\n1\n1\nno\n"}) {
    TempDir dir;
    const auto file = dir.path() / "cfg.yaml";
    const auto r = config_with_answers(answers, {"--config_file", file});
    EXPECT_EQ(r.exit_code, 2) << r.output;
    EXPECT_EQ(count_lines_containing(r.output, "error: input ended before the question"), 1)
        << r.output;
    EXPECT_FALSE(fs::exists(file));
  }
}

TEST(ConfigCli, DefaultWritesPythonsBasicConfigAndRefusesToOverwrite) {
  TempDir dir;
  const auto file = dir.path() / "sub" / "basic.yaml";
  const auto r = accelerate_config({"default", "--config_file", file.string()});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("accelerate configuration saved at " + file.string()), std::string::npos);
  // write_basic_config on a machine without GPUs: ClusterConfig's defaults fill the rest.
  const KeyValues expected = {{"compute_environment", "LOCAL_MACHINE"},
                              {"debug", "false"},
                              {"distributed_type", "'NO'"},
                              {"downcast_bf16", "false"},
                              {"enable_cpu_affinity", "false"},
                              {"machine_rank", "0"},
                              {"main_training_function", "main"},
                              {"mixed_precision", "'no'"},
                              {"num_machines", "1"},
                              {"num_processes", "1"},
                              {"rdzv_backend", "static"},
                              {"same_network", "false"},
                              {"tpu_use_cluster", "false"},
                              {"tpu_use_sudo", "false"},
                              {"use_cpu", "true"}};
  const std::string written = read_text_file(file);
  EXPECT_EQ(top_level_keys(written), expected) << written;

  const auto again =
      accelerate_config({"default", "--config_file", file.string(), "--mixed_precision", "bf16"});
  EXPECT_EQ(again.exit_code, 2) << again.output;
  EXPECT_EQ(
      count_lines_containing(again.output, "configuration already exists at " + file.string()), 1)
      << again.output;
  EXPECT_EQ(read_text_file(file), written);
}

TEST(ConfigCli, DefaultTakesMixedPrecisionAndRejectsFp8) {
  TempDir dir;
  const auto file = dir.path() / "basic.yaml";
  const auto r =
      accelerate_config({"default", "--config_file", file.string(), "--mixed_precision", "bf16"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(top_level_keys(read_text_file(file))["mixed_precision"], "bf16");

  const auto other = dir.path() / "other.yaml";
  const auto fp8 =
      accelerate_config({"default", "--config_file", other.string(), "--mixed_precision", "fp8"});
  EXPECT_EQ(fp8.exit_code, 2) << fp8.output;
  EXPECT_EQ(count_lines_containing(fp8.output, "'fp8' is not supported"), 1) << fp8.output;
  EXPECT_FALSE(fs::exists(other));
}

// launch_util points HF_HOME at a directory that does not exist unless a test sets it, so the
// variables are removed by env(1), in the command itself (XDG_CACHE_HOME only when `env` does not
// set it).
RunResult config_without_hf_variables(const std::vector<std::string>& args,
                                      const std::map<std::string, std::string>& env) {
  std::vector<std::string> argv = {"/usr/bin/env", "-u", "HF_HOME"};
  if (env.count("XDG_CACHE_HOME") == 0) argv.insert(argv.end(), {"-u", "XDG_CACHE_HOME"});
  argv.insert(argv.end(), {cli_path(), "config"});
  argv.insert(argv.end(), args.begin(), args.end());
  auto full_env = env;
  full_env.emplace("CUDA_VISIBLE_DEVICES", "");
  return run_command(argv, kTimeout, full_env);
}

TEST(ConfigCli, DefaultLocationFollowsHfHomeThenXdgCacheThenHome) {
  TempDir dir;
  const std::string root = dir.path().string();

  auto r = accelerate_config({"default"}, {{"HF_HOME", root + "/hf"}, {"HOME", root}});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(fs::exists(root + "/hf/accelerate/default_config.yaml")) << r.output;

  r = config_without_hf_variables({"default"}, {{"XDG_CACHE_HOME", root + "/xdg"}, {"HOME", root}});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(fs::exists(root + "/xdg/huggingface/accelerate/default_config.yaml")) << r.output;

  r = config_without_hf_variables({"default"}, {{"HOME", root + "/home"}});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string home_file = root + "/home/.cache/huggingface/accelerate/default_config.yaml";
  EXPECT_TRUE(fs::exists(home_file)) << r.output;

  // `show` uses the same rule.
  const auto shown = config_without_hf_variables({"show"}, {{"HOME", root + "/home"}});
  EXPECT_EQ(shown.exit_code, 0) << shown.output;
  EXPECT_EQ(split_lines(shown.output).at(0), "# " + home_file);
}

TEST(ConfigCli, ShowLoadsPythonWrittenFilesWithoutWarnings) {
  TempDir dir;
  const auto yaml = dir.path() / "python.yaml";
  write_file(yaml, kPythonMultiCpuYaml);
  auto r = accelerate_config({"show", "--config_file", yaml.string()});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output.find("warning"), std::string::npos) << r.output;
  EXPECT_EQ(top_level_keys(r.output), python_multi_cpu_file()) << r.output;

  // Python's `accelerate config default` writes JSON, even into default_config.yaml.
  const auto json = dir.path() / "default_config.yaml";
  write_file(json,
             "{\n  \"compute_environment\": \"LOCAL_MACHINE\",\n  \"debug\": false,\n"
             "  \"distributed_type\": \"MULTI_GPU\",\n  \"downcast_bf16\": false,\n"
             "  \"enable_cpu_affinity\": false,\n  \"machine_rank\": 0,\n"
             "  \"main_training_function\": \"main\",\n  \"mixed_precision\": \"fp16\",\n"
             "  \"num_machines\": 1,\n  \"num_processes\": 8,\n  \"rdzv_backend\": \"static\",\n"
             "  \"same_network\": false,\n  \"tpu_use_cluster\": false,\n"
             "  \"tpu_use_sudo\": false,\n  \"use_cpu\": false\n}\n");
  r = accelerate_config({"show", "--config_file", json.string()});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output.find("warning"), std::string::npos) << r.output;
  const auto keys = top_level_keys(r.output);
  EXPECT_EQ(keys.at("distributed_type"), "MULTI_GPU");
  EXPECT_EQ(keys.at("num_processes"), "8");
  EXPECT_EQ(keys.at("mixed_precision"), "fp16");
  EXPECT_EQ(keys.size(), 15u) << r.output;
}

TEST(ConfigCli, ShowKeepsPythonOnlySettingsVerbatim) {
  TempDir dir;
  const auto file = dir.path() / "python.yaml";
  write_file(file, std::string(kPythonMultiCpuYaml) +
                       "dynamo_config:\n  dynamo_backend: INDUCTOR\n  dynamo_mode: default\n"
                       "mpirun_config:\n  mpirun_hostfile: /home/me/hostfile\n"
                       "tpu_vm:\n- 'no'\n- vm-2\n"
                       "fsdp_config: {}\n");
  const auto r = accelerate_config({"show", "--config_file", file.string()});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output.find("warning"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("\ndynamo_config:\n  dynamo_backend: INDUCTOR\n  dynamo_mode: default\n"
                          "enable_cpu_affinity: false\nfsdp_config: {}\n"),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("\nmpirun_config:\n  mpirun_hostfile: /home/me/hostfile\n"),
            std::string::npos)
      << r.output;
  // The quoted 'no' stays a string: unquoted it would read back as false.
  EXPECT_NE(r.output.find("\ntpu_vm:\n- 'no'\n- vm-2\n"), std::string::npos) << r.output;
}

TEST(ConfigCli, ShowWarnsAboutUnknownKeysByName) {
  TempDir dir;
  const auto file = dir.path() / "cfg.yaml";
  write_file(file, std::string(kPythonMultiCpuYaml) + "learning_rate: 0.1\n");
  const auto r = accelerate_config({"show", "--config_file", file.string()});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(count_lines_containing(r.output, "warning:"), 1) << r.output;
  EXPECT_EQ(count_lines_containing(r.output, "unknown key 'learning_rate'"), 1) << r.output;
  EXPECT_EQ(top_level_keys(r.output).count("learning_rate"), 0u) << r.output;
}

TEST(ConfigCli, ShowRejectsBadValuesNamingKeyAndValue) {
  struct Case {
    std::string line;
    std::string key;
    std::string value;
    std::string reason;
  };
  const std::vector<Case> cases = {
      {"num_processes: 0", "num_processes", "0", "at least 1"},
      {"num_processes: four", "num_processes", "four", "whole number"},
      {"num_processes: [1, 2]", "num_processes", "[1, 2]", "single value"},
      {"num_machines: 0", "num_machines", "0", "at least 1"},
      {"machine_rank: -1", "machine_rank", "-1", "at least 0"},
      {"num_machines: 2\nmachine_rank: 2", "machine_rank", "2", "less than num_machines"},
      {"main_process_port: 65536", "main_process_port", "65536", "at most 65535"},
      {"main_process_port: 0", "main_process_port", "0", "at least 1"},
      {"mixed_precision: fp8", "mixed_precision", "fp8", "fp8 is not supported"},
      {"mixed_precision: fp32", "mixed_precision", "fp32", "no, fp16, bf16"},
      {"distributed_type: XLA", "distributed_type", "XLA", "not supported"},
      {"distributed_type: MEGATRON_LM", "distributed_type", "MEGATRON_LM", "not supported"},
      {"distributed_type: SOMETHING", "distributed_type", "SOMETHING", "NO, MULTI_CPU"},
      {"compute_environment: AMAZON_SAGEMAKER", "compute_environment", "AMAZON_SAGEMAKER",
       "SageMaker is not supported"},
      {"use_cpu: sometimes", "use_cpu", "sometimes", "true or false"},
      {"gpu_ids: first", "gpu_ids", "first", "comma-separated"},
      {"rdzv_backend: etcd", "rdzv_backend", "etcd", "static, c10d"},
      {"gradient_accumulation_steps: 0", "gradient_accumulation_steps", "0", "at least 1"},
      {"fsdp_config: {fsdp_sharding_strategy: ZERO3}", "fsdp_config.fsdp_sharding_strategy",
       "ZERO3",
       "FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, HYBRID_SHARD, HYBRID_SHARD_ZERO2 or a number"},
      {"fsdp_config: {fsdp_state_dict_type: 0}", "fsdp_config.fsdp_state_dict_type", "0",
       "or a number from 1 to 3"},
      {"fsdp_config: {fsdp_use_orig_params: sometimes}", "fsdp_config.fsdp_use_orig_params",
       "sometimes", "true or false"},
      {"deepspeed_config: {zero_stage: 4}", "deepspeed_config.zero_stage", "4", "0, 1, 2, 3"},
      {"deepspeed_config: {gradient_clipping: lots}", "deepspeed_config.gradient_clipping", "lots",
       "a number of at least 0"},
      {"deepspeed_config: {deepspeed_multinode_launcher: ssh}",
       "deepspeed_config.deepspeed_multinode_launcher", "ssh", "pdsh, standard, openmpi"}};
  for (const auto& c : cases) {
    TempDir dir;
    const auto file = dir.path() / "bad.yaml";
    // The bad line last: a later valid line of the same key would otherwise hide it.
    std::string text;
    for (const auto& line : split_lines(kPythonMultiCpuYaml)) {
      const std::string key = line.substr(0, line.find(':'));
      if (c.line.find(key + ":") == std::string::npos) text += line + "\n";
    }
    write_file(file, text + c.line + "\n");
    const auto r = accelerate_config({"show", "--config_file", file.string()});
    EXPECT_EQ(r.exit_code, 2) << c.line << "\n" << r.output;
    const std::string expected =
        "config file '" + file.string() + "': " + c.key + " = '" + c.value + "' is invalid";
    EXPECT_EQ(count_lines_containing(r.output, expected), 1) << expected << "\n" << r.output;
    EXPECT_EQ(count_lines_containing(r.output, c.reason), 1) << c.reason << "\n" << r.output;
  }
}

TEST(ConfigCli, ShowRejectsMalformedYamlNamingLineAndColumn) {
  TempDir dir;
  const auto file = dir.path() / "bad.yaml";
  write_file(file, "num_processes: 2\nuse_cpu: true: false\n");
  const auto r = accelerate_config({"show", "--config_file", file.string()});
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(count_lines_containing(r.output, "config file '" + file.string() +
                                                 "' is not valid YAML: line 2, column 14: "),
            1)
      << r.output;

  write_file(file, "- just\n- a list\n");
  const auto list = accelerate_config({"show", "--config_file", file.string()});
  EXPECT_EQ(list.exit_code, 2) << list.output;
  EXPECT_EQ(count_lines_containing(list.output, "must hold a mapping"), 1) << list.output;
}

TEST(ConfigCli, ShowNamesAMissingFile) {
  TempDir dir;
  const auto file = dir.path() / "absent.yaml";
  const auto r = accelerate_config({"show", "--config_file", file.string()});
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(count_lines_containing(r.output, "config file '" + file.string() + "' does not exist"),
            1)
      << r.output;
}

TEST(ConfigCli, WrittenFileReadsBackUnchanged) {
  TempDir dir;
  const auto file = dir.path() / "cfg.yaml";
  const auto r = config_with_answers(
      "0\n2\n2\n1\n10.1.2.3\n\nno\nc10d\nyes\nno\nno\n2\n0,1\nfp16\n4\n", {"--config_file", file});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto shown = accelerate_config({"show", "--config_file", file.string()});
  ASSERT_EQ(shown.exit_code, 0) << shown.output;
  EXPECT_EQ(shown.output, "# " + file.string() + "\n" + read_text_file(file));
}

// ---------------------------------------------------------------- sharding plugins

// Python's FSDP questions after "multi-GPU, one machine, no debug, no DeepSpeed": strategy
// SHARD_GRAD_OP, no offload, transformer-based wrapping of two classes, then the defaults, with
// activation checkpointing; then 2 GPUs (no GPU ids question once a plugin is chosen), bf16 and
// our accumulation steps.
constexpr const char* kFsdpAnswers =
    "0\n2\n1\nno\nno\nyes\n1\nno\n0\nBlock,Embedding\n\n\n\n\n\nyes\n\nbf16\n2\n";
constexpr const char* kFsdpYaml =
    "compute_environment: LOCAL_MACHINE\n"
    "debug: false\n"
    "distributed_type: FSDP\n"
    "downcast_bf16: false\n"
    "enable_cpu_affinity: false\n"
    "fsdp_config:\n"
    "  fsdp_activation_checkpointing: true\n"
    "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
    "  fsdp_backward_prefetch: BACKWARD_PRE\n"
    "  fsdp_cpu_ram_efficient_loading: true\n"
    "  fsdp_forward_prefetch: false\n"
    "  fsdp_offload_params: false\n"
    "  fsdp_sharding_strategy: SHARD_GRAD_OP\n"
    "  fsdp_state_dict_type: SHARDED_STATE_DICT\n"
    "  fsdp_sync_module_states: true\n"
    "  fsdp_transformer_layer_cls_to_wrap: Block,Embedding\n"
    "  fsdp_use_orig_params: true\n"
    "gradient_accumulation_steps: 2\n"
    "machine_rank: 0\n"
    "main_training_function: main\n"
    "mixed_precision: bf16\n"
    "num_machines: 1\n"
    "num_processes: 2\n"
    "rdzv_backend: static\n"
    "same_network: true\n"
    "tpu_env: []\n"
    "tpu_use_cluster: false\n"
    "tpu_use_sudo: false\n"
    "use_cpu: false\n";

// Multi-CPU, DeepSpeed without a JSON file: stage 3, optimizer states to nvme (path: the
// default), parameters to the CPU, 2 accumulation steps (asked by DeepSpeed, so not again at
// the end), clipping at 0.5, 16-bit weights saved, no zero.Init; 2 processes, no mixed precision.
constexpr const char* kDeepSpeedAnswers =
    "0\n1\n1\nno\nyes\nno\n3\nnvme\ncpu\n\n2\nyes\n0.5\nyes\nno\n2\nno\n";
constexpr const char* kDeepSpeedYaml =
    "compute_environment: LOCAL_MACHINE\n"
    "debug: false\n"
    "deepspeed_config:\n"
    "  gradient_accumulation_steps: 2\n"
    "  gradient_clipping: 0.5\n"
    "  offload_optimizer_device: nvme\n"
    "  offload_optimizer_nvme_path: /nvme\n"
    "  offload_param_device: cpu\n"
    "  zero3_init_flag: false\n"
    "  zero3_save_16bit_model: true\n"
    "  zero_stage: 3\n"
    "distributed_type: DEEPSPEED\n"
    "downcast_bf16: false\n"
    "enable_cpu_affinity: false\n"
    "machine_rank: 0\n"
    "main_training_function: main\n"
    "mixed_precision: 'no'\n"
    "num_machines: 1\n"
    "num_processes: 2\n"
    "rdzv_backend: static\n"
    "same_network: true\n"
    "tpu_env: []\n"
    "tpu_use_cluster: false\n"
    "tpu_use_sudo: false\n"
    "use_cpu: true\n";

TEST(ConfigCli, FsdpSessionWritesPythonsFsdpConfig) {
  TempDir dir;
  const auto file = dir.path() / "fsdp.yaml";
  const auto r = config_with_answers(kFsdpAnswers, {"--config_file", file});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(read_text_file(file), kFsdpYaml);
  // The questions, in Python's order.
  std::size_t at = 0;
  for (const char* question :
       {"Do you want to use DeepSpeed? [yes/NO]: ",
        "Do you want to use FullyShardedDataParallel? [yes/NO]: ",
        "What should be your sharding strategy?\n  0) FULL_SHARD\n  1) SHARD_GRAD_OP\n"
        "  2) NO_SHARD\n  3) HYBRID_SHARD\n  4) HYBRID_SHARD_ZERO2\n",
        "Do you want to offload parameters and gradients to CPU? [yes/NO]: ",
        "What should be your auto wrap policy?\n  0) TRANSFORMER_BASED_WRAP\n",
        "Specify the comma-separated list of transformer layer class names",
        "What should be your FSDP's backward prefetch policy?\n  0) BACKWARD_PRE\n",
        "What should be your FSDP's state dict type?\n  0) FULL_STATE_DICT\n",
        "Enter a number or a name [2]: ",
        "Do you want to enable FSDP's forward prefetch policy? [yes/NO]: ",
        "Do you want to enable FSDP's `use_orig_params` feature? [YES/no]: ",
        "Do you want to enable CPU RAM efficient model loading?",
        "Do you want to enable FSDP activation checkpointing? [yes/NO]: ",
        "How many GPU(s) should be used for distributed training? [2]: ",
        "Do you wish to use mixed precision?"}) {
    const auto found = r.output.find(question, at);
    ASSERT_NE(found, std::string::npos) << question << "\n" << r.output;
    at = found;
  }
  // Loading with CPU RAM efficiency forces the broadcast: that question is not asked.
  EXPECT_EQ(r.output.find("broadcast module parameters"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("What GPU(s) (by id)"), std::string::npos) << r.output;
}

TEST(ConfigCli, FsdpSessionWithSizeBasedWrappingAsksMinimumAndBroadcast) {
  TempDir dir;
  const auto file = dir.path() / "fsdp.yaml";
  // Multi-CPU; NO_SHARD by name, offload, SIZE_BASED_WRAP with the default minimum, NO_PREFETCH,
  // FULL_STATE_DICT, forward prefetch, no original parameters, no RAM-efficient loading, no
  // broadcast, no checkpointing; 3 processes, fp16, 1 accumulation step.
  const auto r = config_with_answers(
      "0\n1\n1\nno\nno\nyes\nNO_SHARD\nyes\n1\n\n2\n0\nyes\nno\nno\nno\n\n3\nfp16\n1\n",
      {"--config_file", file});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string text = read_text_file(file);
  EXPECT_NE(text.find("fsdp_config:\n"
                      "  fsdp_activation_checkpointing: false\n"
                      "  fsdp_auto_wrap_policy: SIZE_BASED_WRAP\n"
                      "  fsdp_backward_prefetch: NO_PREFETCH\n"
                      "  fsdp_cpu_ram_efficient_loading: false\n"
                      "  fsdp_forward_prefetch: true\n"
                      "  fsdp_min_num_params: 100000000\n"
                      "  fsdp_offload_params: true\n"
                      "  fsdp_sharding_strategy: NO_SHARD\n"
                      "  fsdp_state_dict_type: FULL_STATE_DICT\n"
                      "  fsdp_sync_module_states: false\n"
                      "  fsdp_use_orig_params: false\n"
                      "machine_rank: 0\n"),
            std::string::npos)
      << text;
  const auto keys = top_level_keys(text);
  EXPECT_EQ(keys.at("distributed_type"), "FSDP");
  EXPECT_EQ(keys.at("use_cpu"), "true");
  EXPECT_EQ(keys.at("num_processes"), "3");
  EXPECT_EQ(keys.count("gradient_accumulation_steps"), 0u) << text;
  EXPECT_NE(r.output.find("broadcast module parameters from rank 0 at the start? [YES/no]: "),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("Default Auto Wrapping Policy? [100000000]: "), std::string::npos)
      << r.output;
}

TEST(ConfigCli, DeepSpeedSessionWritesPythonsDeepSpeedConfig) {
  TempDir dir;
  const auto file = dir.path() / "ds.yaml";
  const auto r = config_with_answers(kDeepSpeedAnswers, {"--config_file", file});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(read_text_file(file), kDeepSpeedYaml);
  std::size_t at = 0;
  for (const char* question :
       {"Do you want to use DeepSpeed? [yes/NO]: ",
        "Do you want to specify a json file to a DeepSpeed config? [yes/NO]: ",
        "What should be your DeepSpeed's ZeRO optimization stage?\n  0) 0\n  1) 1\n  2) 2\n"
        "  3) 3\nEnter a number or a name [2]: ",
        "Where to offload optimizer states?\n  0) none\n  1) cpu\n  2) nvme\n",
        "Where to offload parameters?", "Nvme Path to offload optimizer states? [/nvme]: ",
        "How many gradient accumulation steps you're passing in your script? [1]: ",
        "Do you want to use gradient clipping? [yes/NO]: ",
        "What is the gradient clipping value? [1.0]: ",
        "Do you want to save 16-bit model weights when using ZeRO Stage-3? [yes/NO]: ",
        "Do you want to enable `deepspeed.zero.Init` when using ZeRO Stage-3",
        "How many processes should be used for distributed training? [1]: ",
        "Do you wish to use mixed precision?"}) {
    const auto found = r.output.find(question, at);
    ASSERT_NE(found, std::string::npos) << question << "\n" << r.output;
    at = found;
  }
  // FSDP is not offered once DeepSpeed is chosen; accumulation is not asked twice.
  EXPECT_EQ(r.output.find("FullyShardedDataParallel"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("should `accelerate launch` pass"), std::string::npos) << r.output;
}

TEST(ConfigCli, DeepSpeedWithAJsonFileAsksNeitherStageNorMixedPrecision) {
  TempDir dir;
  const auto file = dir.path() / "ds.yaml";
  // Multi-GPU on 2 machines (rank 0, IP, default port, same network), DeepSpeed with a JSON
  // file, no zero.Init, the default multi-node launcher (standard), 4 GPUs.
  const auto r = config_with_answers(
      "0\n2\n2\n0\n10.0.0.1\n\n\nno\nyes\nyes\n/cfg/ds.json\n\n\n4\n", {"--config_file", file});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(read_text_file(file),
            "compute_environment: LOCAL_MACHINE\n"
            "debug: false\n"
            "deepspeed_config:\n"
            "  deepspeed_config_file: /cfg/ds.json\n"
            "  deepspeed_multinode_launcher: standard\n"
            "  zero3_init_flag: false\n"
            "distributed_type: DEEPSPEED\n"
            "downcast_bf16: false\n"
            "enable_cpu_affinity: false\n"
            "machine_rank: 0\n"
            "main_process_ip: '10.0.0.1'\n"
            "main_process_port: 29500\n"
            "main_training_function: main\n"
            "num_machines: 2\n"
            "num_processes: 4\n"
            "rdzv_backend: static\n"
            "same_network: true\n"
            "tpu_env: []\n"
            "tpu_use_cluster: false\n"
            "tpu_use_sudo: false\n"
            "use_cpu: false\n");
  EXPECT_NE(r.output.find("Which Type of launcher do you want to use?\n  0) pdsh\n  1) standard\n"
                          "  2) openmpi\n  3) mvapich\n  4) mpich\nEnter a number or a name [1]: "),
            std::string::npos)
      << r.output;
  EXPECT_EQ(r.output.find("ZeRO optimization stage"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("mixed precision"), std::string::npos) << r.output;
}

TEST(ConfigCli, NoDistributedTrainingAsksNoShardingQuestion) {
  TempDir dir;
  const auto file = dir.path() / "cfg.yaml";
  const auto r = config_with_answers("\n\n\n\n\n\n", {"--config_file", file});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output.find("DeepSpeed"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("FullyShardedDataParallel"), std::string::npos) << r.output;
  EXPECT_EQ(read_text_file(file).find("_config:"), std::string::npos);
}

TEST(ConfigCli, InvalidShardingAnswersExitTwoWithOneLineReason) {
  const std::string fsdp = "0\n1\n1\nno\nno\nyes\n";
  const std::string deepspeed = "0\n1\n1\nno\nyes\nno\n";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {fsdp + "5\n", "invalid answer '5' for fsdp_sharding_strategy"},
      {fsdp + "0\nmaybe\n",
       "invalid answer 'maybe' for fsdp_offload_params: please enter yes or no"},
      {fsdp + "0\nno\n0\n\n",
       "invalid answer '' for fsdp_transformer_layer_cls_to_wrap: an answer is required"},
      {fsdp + "0\nno\nSIZE_BASED_WRAP\n-5\n", "invalid answer '-5' for fsdp_min_num_params"},
      {fsdp + "0\nno\n2\nBACKWARD_LATE\n",
       "invalid answer 'BACKWARD_LATE' for fsdp_backward_prefetch"},
      {deepspeed + "4\n", "invalid answer '4' for zero_stage"},
      {deepspeed + "2\ndisk\n", "invalid answer 'disk' for offload_optimizer_device"},
      {deepspeed + "1\n1\nyes\n-1\n",
       "invalid answer '-1' for gradient_clipping: please enter a number of at least 0"},
      {deepspeed + "1\n0\n", "invalid answer '0' for gradient_accumulation_steps"},
      // Only DeepSpeed's standard launcher is how accelerate launch starts processes.
      {"0\n1\n2\n0\nhost\n\n\nno\nyes\nno\n1\n1\nno\nno\npdsh\n",
       "invalid answer 'pdsh' for deepspeed_multinode_launcher: accelerate launch starts the "
       "processes of every machine itself: choose standard"}};
  for (const auto& [answers, reason] : cases) {
    TempDir dir;
    const auto file = dir.path() / "cfg.yaml";
    const auto r = config_with_answers(answers, {"--config_file", file});
    EXPECT_EQ(r.exit_code, 2) << answers << r.output;
    EXPECT_EQ(count_lines_containing(r.output, "error:"), 1) << r.output;
    EXPECT_EQ(count_lines_containing(r.output, reason), 1) << reason << "\n" << r.output;
    EXPECT_FALSE(fs::exists(file)) << answers;
  }
}

// Write with the questions, read back with `config show` and with `launch`: the same file, and
// the variables the answers stand for.
TEST(ConfigCli, ShardingFilesRoundTripThroughShowAndLaunch) {
  auto launch_unset = accelerate::testing::kLaunchVariables;
  launch_unset.insert(launch_unset.end(), accelerate::testing::kShardingVariables.begin(),
                      accelerate::testing::kShardingVariables.end());
  for (const auto& [answers, yaml, variables] :
       std::vector<std::tuple<std::string, std::string, std::vector<std::string>>>{
           {kFsdpAnswers,
            kFsdpYaml,
            {"ACCELERATE_USE_FSDP=true", "FSDP_SHARDING_STRATEGY=SHARD_GRAD_OP",
             "FSDP_OFFLOAD_PARAMS=false", "FSDP_MIN_NUM_PARAMS=100000000",
             "FSDP_AUTO_WRAP_POLICY=TRANSFORMER_BASED_WRAP",
             "FSDP_TRANSFORMER_CLS_TO_WRAP=Block,Embedding", "FSDP_BACKWARD_PREFETCH=BACKWARD_PRE",
             "FSDP_STATE_DICT_TYPE=SHARDED_STATE_DICT", "FSDP_FORWARD_PREFETCH=false",
             "FSDP_USE_ORIG_PARAMS=true", "FSDP_CPU_RAM_EFFICIENT_LOADING=true",
             "FSDP_SYNC_MODULE_STATES=true", "FSDP_ACTIVATION_CHECKPOINTING=true",
             "ACCELERATE_GRADIENT_ACCUMULATION_STEPS=2", "ACCELERATE_MIXED_PRECISION=bf16"}},
           {kDeepSpeedAnswers,
            kDeepSpeedYaml,
            {"ACCELERATE_USE_DEEPSPEED=true", "ACCELERATE_DEEPSPEED_ZERO_STAGE=3",
             "ACCELERATE_GRADIENT_ACCUMULATION_STEPS=2", "ACCELERATE_GRADIENT_CLIPPING=0.5",
             "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE=nvme",
             "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_NVME_PATH=/nvme",
             "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE=cpu",
             "ACCELERATE_DEEPSPEED_ZERO3_INIT=false",
             "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL=true", "ACCELERATE_USE_CPU=true",
             "ACCELERATE_MIXED_PRECISION=no"}}}) {
    TempDir dir;
    for (const std::string name : {"cfg.yaml", "cfg.json"}) {
      const auto file = dir.path() / name;
      auto r = config_with_answers(answers, {"--config_file", file});
      ASSERT_EQ(r.exit_code, 0) << r.output;
      const auto shown = accelerate_config({"show", "--config_file", file.string()});
      ASSERT_EQ(shown.exit_code, 0) << shown.output;
      EXPECT_EQ(shown.output, "# " + file.string() + "\n" + yaml) << name;
      r = run_command(
          {cli_path(), "launch", "--config_file", file.string(), "-n", "1", "/usr/bin/env"},
          kTimeout, {}, launch_unset);
      ASSERT_EQ(r.exit_code, 0) << r.output;
      for (const auto& variable : variables) {
        EXPECT_EQ(count_lines_containing(r.output, variable), 1) << variable << "\n" << r.output;
      }
    }
  }
}

TEST(ConfigCli, DeepSpeedJsonFileIsNestedAsPythonWritesIt) {
  TempDir dir;
  const auto file = dir.path() / "ds.json";
  const auto r = config_with_answers(kDeepSpeedAnswers, {"--config_file", file});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string text = read_text_file(file);
  EXPECT_NE(text.find("\n  \"deepspeed_config\": {\n"
                      "    \"gradient_accumulation_steps\": 2,\n"
                      "    \"gradient_clipping\": 0.5,\n"
                      "    \"offload_optimizer_device\": \"nvme\",\n"
                      "    \"offload_optimizer_nvme_path\": \"/nvme\",\n"
                      "    \"offload_param_device\": \"cpu\",\n"
                      "    \"zero3_init_flag\": false,\n"
                      "    \"zero3_save_16bit_model\": true,\n"
                      "    \"zero_stage\": 3\n"
                      "  },\n"
                      "  \"distributed_type\": \"DEEPSPEED\",\n"),
            std::string::npos)
      << text;
}

// Files written by Python Accelerate 0.27 (safe_dump: sorted, 'no' quoted) load without a
// warning and come back in the same form, nested keys included; only downcast_bf16, the string
// 'no' in Python's files, is written as the boolean Python also reads.
TEST(ConfigCli, ShowKeepsPythonsShardingFilesAsPythonWroteThem) {
  const std::string common_tail =
      "machine_rank: 0\n"
      "main_training_function: main\n"
      "mixed_precision: bf16\n"
      "num_machines: 1\n"
      "num_processes: 8\n"
      "rdzv_backend: static\n"
      "same_network: true\n"
      "tpu_env: []\n"
      "tpu_use_cluster: false\n"
      "tpu_use_sudo: false\n"
      "use_cpu: false\n";
  const std::string fsdp_body =
      "distributed_type: FSDP\n"
      "downcast_bf16: DOWNCAST\n"
      "fsdp_config:\n"
      "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
      "  fsdp_backward_prefetch: BACKWARD_PRE\n"
      "  fsdp_cpu_ram_efficient_loading: true\n"
      "  fsdp_forward_prefetch: false\n"
      "  fsdp_offload_params: false\n"
      "  fsdp_sharding_strategy: FULL_SHARD\n"
      "  fsdp_state_dict_type: SHARDED_STATE_DICT\n"
      "  fsdp_sync_module_states: true\n"
      "  fsdp_transformer_layer_cls_to_wrap: BertLayer\n"
      "  fsdp_use_orig_params: true\n";
  const std::string deepspeed_body =
      "deepspeed_config:\n"
      "  deepspeed_hostfile: /home/me/hostfile\n"
      "  deepspeed_multinode_launcher: standard\n"
      "  gradient_accumulation_steps: 1\n"
      "  gradient_clipping: 1.0e-05\n"
      "  offload_optimizer_device: none\n"
      "  offload_param_device: none\n"
      "  zero3_init_flag: false\n"
      "  zero_stage: 2\n"
      "distributed_type: DEEPSPEED\n"
      "downcast_bf16: DOWNCAST\n";
  for (const auto& body : {fsdp_body, deepspeed_body}) {
    auto with = [&](const std::string& downcast) {
      std::string text = "compute_environment: LOCAL_MACHINE\ndebug: false\n" + body + common_tail;
      text.replace(text.find("DOWNCAST"), 8, downcast);
      return text;
    };
    TempDir dir;
    const auto file = dir.path() / "python.yaml";
    write_file(file, with("'no'"));
    const auto r = accelerate_config({"show", "--config_file", file.string()});
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_EQ(r.output, "# " + file.string() + "\n" + with("false"));
  }
}

}  // namespace

TEST(ConfigCli, HelpOfANestedSubcommandIsThatSubcommands) {
  auto def = accelerate_config({"default", "-h"});
  ASSERT_EQ(def.exit_code, 0) << def.output;
  EXPECT_NE(def.output.find("Usage: accelerate config default"), std::string::npos) << def.output;
  EXPECT_NE(def.output.find("--mixed_precision"), std::string::npos) << def.output;
  // The parent's footer (the interactive session) is not default's help.
  EXPECT_EQ(def.output.find("Without a subcommand"), std::string::npos) << def.output;

  auto config = accelerate_config({"-h"});
  ASSERT_EQ(config.exit_code, 0) << config.output;
  EXPECT_NE(config.output.find("Usage: accelerate config"), std::string::npos) << config.output;
  EXPECT_NE(config.output.find("Without a subcommand"), std::string::npos) << config.output;
}
