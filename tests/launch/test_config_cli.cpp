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
  // environment, machine type, machines, debug, processes, mixed precision, accumulation
  const auto r = config_with_answers("0\n1\n1\nyes\n4\nbf16\n1\n", {"--config_file", file});
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
  auto r = config_with_answers("0\n1\n1\nno\n3\nbf16\n1\n", {"--config_file", file});
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
  const auto r =
      config_with_answers("This machine\nMULTI_CPU\n1\nno\n4\nno\n1\n", {"--config_file", file});
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
  // debug, 2 GPUs, ids, fp16, 4 accumulation steps.
  const auto r = config_with_answers("0\n2\n2\n1\n10.1.2.3\n\nno\nc10d\nno\n2\n0,1\nfp16\n4\n",
                                     {"--config_file", file});
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
  const auto r = config_with_answers("0\n1\n1\nno\n4\nno\n1\n", {"--config_file", file});
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
      {"0\n1\n1\nno\n0\n", "invalid answer '0' for num_processes"},
      {"0\n2\n1\nno\n1\n", "one GPU on one machine is not distributed"},
      {"0\n0\nno\n0,,1\n", "invalid answer '0,,1' for gpu_ids"},
      {"0\n1\n1\nno\n4\nfp8\n", "fp8 is not supported"},
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
      {"distributed_type: DEEPSPEED", "distributed_type", "DEEPSPEED", "not supported"},
      {"distributed_type: FSDP", "distributed_type", "FSDP", "not supported"},
      {"distributed_type: XLA", "distributed_type", "XLA", "not supported"},
      {"distributed_type: MEGATRON_LM", "distributed_type", "MEGATRON_LM", "not supported"},
      {"distributed_type: SOMETHING", "distributed_type", "SOMETHING", "NO, MULTI_CPU"},
      {"compute_environment: AMAZON_SAGEMAKER", "compute_environment", "AMAZON_SAGEMAKER",
       "SageMaker is not supported"},
      {"use_cpu: sometimes", "use_cpu", "sometimes", "true or false"},
      {"gpu_ids: first", "gpu_ids", "first", "comma-separated"},
      {"rdzv_backend: etcd", "rdzv_backend", "etcd", "static, c10d"},
      {"gradient_accumulation_steps: 0", "gradient_accumulation_steps", "0", "at least 1"}};
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
  const auto r = config_with_answers("0\n2\n2\n1\n10.1.2.3\n\nno\nc10d\nyes\n2\n0,1\nfp16\n4\n",
                                     {"--config_file", file});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto shown = accelerate_config({"show", "--config_file", file.string()});
  ASSERT_EQ(shown.exit_code, 0) << shown.output;
  EXPECT_EQ(shown.output, "# " + file.string() + "\n" + read_text_file(file));
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
