// `accelerate env`, `accelerate test` and `accelerate estimate-memory`, run as the user runs
// them: the real executable, its output and its exit status.
#include <gtest/gtest.h>
#include <torch/version.h>

#include <chrono>
#include <cstdint>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "launch_util.h"

namespace {

using accelerate::testing::cli_path;
using accelerate::testing::contains;
using accelerate::testing::run_command;
using accelerate::testing::RunResult;
using accelerate::testing::split_lines;
using accelerate::testing::TempDir;

constexpr auto kQuick = std::chrono::seconds(30);
constexpr auto kTestRun = std::chrono::seconds(150);

void write_file(const std::filesystem::path& path, const std::string& contents) {
  std::ofstream out(path, std::ios::binary);
  out << contents;
  ASSERT_TRUE(out.good()) << path;
}

// Keeps the user's own default config (and launch variables a test runner may have set) away
// from the command under test.
struct IsolatedEnv {
  TempDir home;
  IsolatedEnv() { std::filesystem::create_directories(tmp()); }
  // The test script's checkpoint goes under TMPDIR: it must be gone afterwards.
  std::filesystem::path tmp() const { return home.path() / "tmp"; }
  bool tmp_is_empty() const { return std::filesystem::is_empty(tmp()); }
  std::map<std::string, std::string> env() const {
    return {{"HF_HOME", (home.path() / "hf").string()}, {"TMPDIR", tmp().string()}};
  }
  std::vector<std::string> unset() const {
    auto names = accelerate::testing::kLaunchVariables;
    for (const char* n : {"XDG_CACHE_HOME", "ACCELERATE_TEST_SCRIPT_FAIL", "OMP_NUM_THREADS",
                          "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU",
                          "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"}) {
      names.push_back(n);
    }
    return names;
  }
  RunResult run(const std::vector<std::string>& args, std::chrono::milliseconds timeout,
                std::map<std::string, std::string> extra = {}) const {
    std::vector<std::string> argv = {cli_path()};
    argv.insert(argv.end(), args.begin(), args.end());
    auto environment = env();
    environment.insert(extra.begin(), extra.end());
    return run_command(argv, timeout, environment, unset());
  }
};

// A config file as Python Accelerate's `accelerate config` writes it for 2 CPU processes.
constexpr const char* kTwoProcessConfig =
    "compute_environment: LOCAL_MACHINE\n"
    "debug: false\n"
    "distributed_type: MULTI_CPU\n"
    "downcast_bf16: 'no'\n"
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

// ------------------------------------------------------------------ accelerate env

TEST(CliToolsEnv, ReportsLibTorchCpusAndThePassedConfigFile) {
  IsolatedEnv iso;
  const auto config = iso.home.path() / "my_config.yaml";
  write_file(config, kTwoProcessConfig);
  const auto r = iso.run({"env", "--config_file", config.string()}, kQuick);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "Copy-and-paste the text below in your GitHub issue")) << r.output;
  EXPECT_TRUE(contains(r.output,
                       std::string("- LibTorch version (built against): ") + TORCH_VERSION + "\n"))
      << r.output;
  EXPECT_TRUE(contains(
      r.output, "- CPUs: " + std::to_string(std::thread::hardware_concurrency()) + " (hardware)"))
      << r.output;
  EXPECT_TRUE(contains(r.output, "- `Accelerate` config passed: " + config.string() + "\n"))
      << r.output;
  for (const auto& line : split_lines(kTwoProcessConfig)) {
    EXPECT_TRUE(contains(r.output, "\t" + line + "\n")) << line << "\n" << r.output;
  }
  EXPECT_TRUE(contains(r.output, "- OMP_NUM_THREADS: not set\n")) << r.output;
  EXPECT_TRUE(contains(r.output, "- `accelerate` location: ")) << r.output;
}

TEST(CliToolsEnv, ShowsTheDefaultConfigPathAndWhetherItExists) {
  IsolatedEnv iso;
  const auto default_path = iso.home.path() / "hf" / "accelerate" / "default_config.yaml";
  auto r = iso.run({"env"}, kQuick, {{"OMP_NUM_THREADS", "3"}});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(
      r.output, "- `Accelerate` default config: " + default_path.string() + " (not found)\n"))
      << r.output;
  EXPECT_TRUE(contains(r.output, "- OMP_NUM_THREADS: 3\n")) << r.output;

  std::filesystem::create_directories(default_path.parent_path());
  write_file(default_path, "num_processes: 3\n");
  r = iso.run({"env"}, kQuick);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "- `Accelerate` default config: " + default_path.string() +
                                     "\n\tnum_processes: 3\n"))
      << r.output;
}

TEST(CliToolsEnv, MissingConfigFileIsAUsageError) {
  IsolatedEnv iso;
  const auto r =
      iso.run({"env", "--config_file", (iso.home.path() / "nope.yaml").string()}, kQuick);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_TRUE(contains(r.output, "nope.yaml")) << r.output;
}

// ------------------------------------------------------------------ accelerate test

constexpr const char* kSuccess = "Test is a success! You are ready for your distributed training!";

TEST(CliToolsTest, PassesWithOneProcessByDefault) {
  IsolatedEnv iso;
  const auto r = iso.run({"test"}, kTestRun);
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "All 5 checks passed on 1 process.")) << r.output;
  EXPECT_TRUE(contains(r.output, kSuccess)) << r.output;
  EXPECT_TRUE(iso.tmp_is_empty());
}

TEST(CliToolsTest, PassesWithTwoProcessesFromAConfigFile) {
  IsolatedEnv iso;
  const auto config = iso.home.path() / "two.yaml";
  write_file(config, kTwoProcessConfig);
  const auto r = iso.run({"test", "--config_file", config.string()}, kTestRun);
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "Num processes: 2")) << r.output;
  EXPECT_TRUE(contains(r.output, "All 5 checks passed on 2 processes.")) << r.output;
  EXPECT_TRUE(contains(r.output, kSuccess)) << r.output;
  EXPECT_TRUE(iso.tmp_is_empty());
}

TEST(CliToolsTest, NumProcessesIsPassedToLaunch) {
  IsolatedEnv iso;
  const auto r = iso.run({"test", "--num_processes", "3"}, kTestRun);
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "All 5 checks passed on 3 processes.")) << r.output;
}

TEST(CliToolsTest, AFailingCheckIsNamedAndExitsOne) {
  IsolatedEnv iso;
  for (const std::string check : {"collectives", "checkpoint"}) {
    const auto r = iso.run({"test", "-n", "2"}, kTestRun, {{"ACCELERATE_TEST_SCRIPT_FAIL", check}});
    ASSERT_FALSE(r.timed_out) << r.output;
    EXPECT_EQ(r.exit_code, 1) << r.output;
    // The last process fails; the launcher then stops process 0.
    EXPECT_TRUE(contains(r.output, "CHECK FAILED [" + check + "] on process 1")) << r.output;
    EXPECT_TRUE(contains(r.output, "Test failed: these checks failed: " + check + " ("))
        << r.output;
    EXPECT_FALSE(contains(r.output, kSuccess)) << r.output;
    EXPECT_TRUE(iso.tmp_is_empty()) << check;
  }
}

TEST(CliToolsTest, MissingConfigFileIsAUsageError) {
  IsolatedEnv iso;
  const auto r =
      iso.run({"test", "--config_file", (iso.home.path() / "nope.yaml").string()}, kQuick);
  EXPECT_EQ(r.exit_code, 2) << r.output;
}

// ------------------------------------------------------------------ accelerate estimate-memory

struct FakeTensor {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  int64_t element_size;
};

// `header` preceded by its length as 8 little-endian bytes.
std::string length_prefixed(const std::string& header) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((header.size() >> (8 * i)) & 0xFF);
  return out + header;
}

// A safetensors file from the format's definition: an 8-byte little-endian header length, the
// JSON header, then the tensors' bytes back to back (zeros here).
void write_safetensors(const std::filesystem::path& path, const std::vector<FakeTensor>& tensors) {
  std::ostringstream header;
  header << "{\"__metadata__\":{\"format\":\"pt\"}";
  int64_t offset = 0;
  for (const auto& t : tensors) {
    int64_t bytes = t.element_size;
    header << ",\"" << t.name << "\":{\"dtype\":\"" << t.dtype << "\",\"shape\":[";
    for (size_t i = 0; i < t.shape.size(); ++i) {
      bytes *= t.shape[i];
      header << (i ? "," : "") << t.shape[i];
    }
    header << "],\"data_offsets\":[" << offset << "," << offset + bytes << "]}";
    offset += bytes;
  }
  header << "}";
  write_file(path, length_prefixed(header.str()) + std::string(static_cast<size_t>(offset), '\0'));
}

const FakeTensor kDenseWeight{"dense.weight", "F32", {1000, 1000}, 4};
const FakeTensor kDenseBias{"dense.bias", "F32", {1000}, 4};
const FakeTensor kEmbedding{"embed.weight", "BF16", {10, 100}, 2};

// The cells of the table row for `dtype`.
std::vector<std::string> row_cells(const std::string& output, const std::string& dtype) {
  for (const auto& line : split_lines(output)) {
    std::vector<std::string> cells;
    std::string rest = line;
    const std::string bar = "│";
    if (rest.rfind(bar, 0) != 0) continue;
    rest.erase(0, bar.size());
    for (size_t at; (at = rest.find(bar)) != std::string::npos; rest.erase(0, at + bar.size())) {
      std::string cell = rest.substr(0, at);
      cell.erase(0, cell.find_first_not_of(' '));
      cell.erase(cell.find_last_not_of(' ') + 1);
      cells.push_back(cell);
    }
    if (!cells.empty() && cells[0] == dtype) return cells;
  }
  return {};
}

// By hand: 1,000,000 + 1,000 + 1,000 parameters. Counted as float32 (as Python loads the model):
// S = 1,002,000 x 4 = 4,008,000 bytes; the largest layer `dense` = 1,001,000 x 4 = 4,004,000.
// float32: gradients S, Adam 2S, training 4S. float16: /2, gradients S + S/2, Adam 2S, training
// max = 2S. int8: /4, int4: /8, no training figures.
// `files` is what the first line says about the files, e.g. "(2 files, 3 tensors)".
void expect_hand_computed_figures(const RunResult& r, const std::string& files) {
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, files)) << r.output;
  EXPECT_TRUE(contains(r.output, "Parameters: 1002000\n")) << r.output;
  EXPECT_TRUE(contains(r.output, "Stored size: 4006000\n")) << r.output;
  EXPECT_TRUE(contains(r.output, "Largest layer: dense (1001000 parameters)\n")) << r.output;
  EXPECT_EQ(row_cells(r.output, "dtype"),
            (std::vector<std::string>{"dtype", "Largest Layer", "Total Size", "Gradients",
                                      "Adam States", "Training using Adam"}));
  EXPECT_EQ(
      row_cells(r.output, "float32"),
      (std::vector<std::string>{"float32", "4004000", "4008000", "4008000", "8016000", "16032000"}))
      << r.output;
  EXPECT_EQ(
      row_cells(r.output, "float16"),
      (std::vector<std::string>{"float16", "2002000", "2004000", "6012000", "8016000", "8016000"}))
      << r.output;
  EXPECT_EQ(row_cells(r.output, "int8"),
            (std::vector<std::string>{"int8", "1001000", "1002000", "N/A", "N/A", "N/A"}))
      << r.output;
  EXPECT_EQ(row_cells(r.output, "int4"),
            (std::vector<std::string>{"int4", "500500", "501000", "N/A", "N/A", "N/A"}))
      << r.output;
}

TEST(CliToolsEstimateMemory, ExactFiguresForAHandWrittenFile) {
  TempDir dir;
  const auto file = dir.path() / "weights.safetensors";
  write_safetensors(file, {kDenseWeight, kDenseBias, kEmbedding});
  expect_hand_computed_figures(
      run_command({cli_path(), "estimate-memory", file.string(), "--bytes"}, kQuick),
      "(1 file, 3 tensors)");

  // The same in Python's convert_bytes units.
  const auto r = run_command({cli_path(), "estimate-memory", file.string()}, kQuick);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "Memory Usage for loading `" + file.string() + "`")) << r.output;
  EXPECT_EQ(
      row_cells(r.output, "float32"),
      (std::vector<std::string>{"float32", "3.82 MB", "3.82 MB", "3.82 MB", "7.64 MB", "15.29 MB"}))
      << r.output;
  EXPECT_EQ(
      row_cells(r.output, "float16"),
      (std::vector<std::string>{"float16", "1.91 MB", "1.91 MB", "5.73 MB", "7.64 MB", "7.64 MB"}))
      << r.output;
  EXPECT_EQ(row_cells(r.output, "int4"),
            (std::vector<std::string>{"int4", "488.77 KB", "489.26 KB", "N/A", "N/A", "N/A"}))
      << r.output;
}

TEST(CliToolsEstimateMemory, DtypesSelectTheRows) {
  TempDir dir;
  const auto file = dir.path() / "weights.safetensors";
  write_safetensors(file, {kDenseWeight, kDenseBias, kEmbedding});
  const auto r = run_command(
      {cli_path(), "estimate-memory", file.string(), "--bytes", "--dtypes", "bfloat16"}, kQuick);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(
      row_cells(r.output, "bfloat16"),
      (std::vector<std::string>{"bfloat16", "2002000", "2004000", "6012000", "8016000", "8016000"}))
      << r.output;
  EXPECT_TRUE(row_cells(r.output, "float32").empty()) << r.output;
  const auto bad =
      run_command({cli_path(), "estimate-memory", file.string(), "--dtypes", "int2"}, kQuick);
  EXPECT_EQ(bad.exit_code, 2) << bad.output;
}

TEST(CliToolsEstimateMemory, DirectoryAndShardedIndex) {
  TempDir dir;
  write_safetensors(dir.path() / "model.safetensors", {kDenseWeight, kDenseBias, kEmbedding});
  expect_hand_computed_figures(
      run_command({cli_path(), "estimate-memory", dir.path().string(), "--bytes"}, kQuick),
      "(1 file, 3 tensors)");

  TempDir sharded;
  write_safetensors(sharded.path() / "model-00001-of-00002.safetensors",
                    {kDenseWeight, kDenseBias});
  write_safetensors(sharded.path() / "model-00002-of-00002.safetensors", {kEmbedding});
  const auto index = sharded.path() / "model.safetensors.index.json";
  write_file(index,
             "{\"metadata\": {\"total_size\": 4006000}, \"weight_map\": {"
             "\"dense.weight\": \"model-00001-of-00002.safetensors\", "
             "\"dense.bias\": \"model-00001-of-00002.safetensors\", "
             "\"embed.weight\": \"model-00002-of-00002.safetensors\"}}");
  expect_hand_computed_figures(
      run_command({cli_path(), "estimate-memory", index.string(), "--bytes"}, kQuick),
      "(2 files, 3 tensors)");
  expect_hand_computed_figures(
      run_command({cli_path(), "estimate-memory", sharded.path().string(), "--bytes"}, kQuick),
      "(2 files, 3 tensors)");
}

TEST(CliToolsEstimateMemory, MalformedInputIsAOneLineUsageError) {
  TempDir dir;
  const auto p = [&](const std::string& name) { return (dir.path() / name).string(); };
  auto with_header = [&](const std::string& name, const std::string& header, size_t data) {
    write_file(p(name), length_prefixed(header) + std::string(data, '\0'));
  };
  write_file(p("short.safetensors"), "abc");
  write_file(p("huge_length.safetensors"), std::string("\xff\xff\xff\xff\xff\xff\xff\x7f{}", 10));
  with_header("not_json.safetensors", "{\"a\": [1,", 0);
  with_header("array.safetensors", "[1, 2]", 0);
  with_header("bad_dtype.safetensors", R"({"t":{"dtype":"Q7","shape":[2],"data_offsets":[0,2]}})",
              2);
  with_header("wrong_size.safetensors",
              R"({"t":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})", 20);
  with_header("past_end.safetensors", R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
              4);
  with_header("negative_dim.safetensors",
              R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8);
  with_header("overflow.safetensors",
              R"({"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8);
  with_header("overlap.safetensors",
              R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
              R"("b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}})",
              6);
  write_file(p("model.safetensors.index.json"),
             R"({"weight_map": {"x": "missing-shard.safetensors"}})");
  write_file(p("broken.index.json"), "{\"weight_map\": 3}");
  std::filesystem::create_directories(dir.path() / "empty_dir");

  const std::vector<std::pair<std::string, std::string>> cases = {
      {p("short.safetensors"), "less than the 8-byte header length"},
      {p("huge_length.safetensors"), "header length field"},
      {p("not_json.safetensors"), "not valid JSON"},
      {p("array.safetensors"), "not a JSON object"},
      {p("bad_dtype.safetensors"), "unsupported dtype 'Q7'"},
      {p("wrong_size.safetensors"), "spans 20 bytes"},
      {p("past_end.safetensors"), "outside the 4-byte data section"},
      {p("negative_dim.safetensors"), "not a non-negative integer"},
      {p("overflow.safetensors"), "overflows"},
      {p("overlap.safetensors"), "overlap"},
      {p("model.safetensors.index.json"), "missing-shard.safetensors: no such file"},
      {p("broken.index.json"), "weight_map"},
      {p("empty_dir"), "neither model.safetensors nor"},
      {p("does_not_exist"), "no such file or directory"},
  };
  for (const auto& [path, reason] : cases) {
    const auto r = run_command({cli_path(), "estimate-memory", path}, kQuick);
    EXPECT_EQ(r.exit_code, 2) << path << "\n" << r.output;
    EXPECT_EQ(split_lines(r.output).size(), 1u) << path << "\n" << r.output;
    EXPECT_TRUE(contains(r.output, reason)) << path << ": expected '" << reason << "'\n"
                                            << r.output;
  }
}

}  // namespace
