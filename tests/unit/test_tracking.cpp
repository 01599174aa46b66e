// Experiment tracking in one process: the TFRecord framing and CRC, the exact files the JSON-lines
// and CSV trackers write, TensorBoard files read back by an independent Python reader, and the
// Accelerator's tracking methods and their errors.

#include <accelerate/accelerator.h>
#include <accelerate/tracking.h>

#include <gtest/gtest.h>

#include "expect_error.h"
#include "launch_util.h"

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using accelerate::Accelerator;
using accelerate::AcceleratorOptions;
using accelerate::EnvMap;
using accelerate::LogValue;
using accelerate::LogValues;
using accelerate::testing::TempDir;

AcceleratorOptions single(AcceleratorOptions o = {}) {
  o.state = accelerate::PartialState::from_environment({}, EnvMap{});
  o.gradient_state = std::make_shared<accelerate::data::GradientState>();
  return o;
}

std::string slurp(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

// Remembers every call, for the custom-tracker tests.
struct RecordingTracker : accelerate::GeneralTracker {
  std::string name() const override { return "recording"; }
  void start() override { calls.push_back("start"); }
  void store_init_configuration(const LogValues& config) override {
    calls.push_back("config " + std::to_string(config.size()));
  }
  void log(const LogValues& values, std::optional<int64_t> step) override {
    calls.push_back("log " + values.begin()->first + " " + std::to_string(step.value_or(-1)));
  }
  void finish() override { calls.push_back("finish"); }
  std::vector<std::string> calls;
};

// ------------------------------------------------------------------ framing

TEST(TrackingFormat, Crc32cMatchesTheStandardCheckValue) {
  EXPECT_EQ(accelerate::detail::crc32c("123456789"), 0xE3069283U);
  EXPECT_EQ(accelerate::detail::crc32c(""), 0U);
}

TEST(TrackingFormat, MaskedCrcRotatesAndAddsTheTfRecordConstant) {
  // ((0xE3069283 >> 15) | (0xE3069283 << 17)) + 0xa282ead8, modulo 2^32.
  EXPECT_EQ(accelerate::detail::masked_crc32c("123456789"), 0xC78AB0E5U);
}

TEST(TrackingFormat, TfRecordFrameHasLengthCrcDataCrc) {
  // Computed independently (bitwise CRC-32C in Python) for the payload "ab".
  const std::vector<unsigned char> expected = {0x02, 0x00, 0x00, 0x00, 0x00, 0x00,
                                               0x00, 0x00, 0x78, 0x27, 0x0b, 0x34,
                                               0x61, 0x62, 0x1c, 0xb0, 0xf0, 0xf4};
  const auto frame = accelerate::detail::tfrecord_frame("ab");
  EXPECT_EQ(std::vector<unsigned char>(frame.begin(), frame.end()), expected);
}

TEST(TrackingFormat, ValuesFormatShortestAndExact) {
  EXPECT_EQ(LogValue(0.1).to_string(), "0.1");
  EXPECT_EQ(LogValue(32).to_string(), "32");
  EXPECT_EQ(LogValue(1e-5).to_string(), "1e-05");
  EXPECT_EQ(LogValue(true).to_string(), "true");
  EXPECT_EQ(LogValue("warm up").to_string(), "warm up");
  EXPECT_EQ(LogValue(at::full({1}, 0.5)).to_double(), 0.5);
  EXPECT_TRUE(LogValue(3).is_number());
  EXPECT_FALSE(LogValue("x").is_number());
  EXPECT_EQ(accelerate::detail::json_value(std::numeric_limits<double>::quiet_NaN()), "NaN");
  EXPECT_EQ(accelerate::detail::json_value(-std::numeric_limits<double>::infinity()), "-Infinity");
  EXPECT_EQ(accelerate::detail::json_value("a\"b\\c\n\x01"), "\"a\\\"b\\\\c\\n\\u0001\"");
  EXPECT_EQ(accelerate::detail::csv_cell("plain"), "plain");
  EXPECT_EQ(accelerate::detail::csv_cell("a,\"b\""), "\"a,\"\"b\"\"\"");
  EXPECT_ERROR_CONTAINS(LogValue("x").to_double(), "is text, not a number");
  EXPECT_ERROR_CONTAINS(LogValue(at::ones({2})), "must hold one value");
}

// ------------------------------------------------------------------ JSON lines, CSV

TEST(TrackingFiles, JsonlWritesOneObjectPerLogAndTheConfig) {
  TempDir dir;
  accelerate::JsonlTracker jsonl("run", dir.path().string());
  jsonl.start();
  jsonl.store_init_configuration({{"lr", 0.001}, {"batch_size", 32}, {"name", "mlp"}});
  jsonl.log({{"loss", 0.5}, {"acc", 0.25}}, 1);
  jsonl.log({{"phase", "eval \"1\""}, {"ok", true}}, std::nullopt);
  jsonl.finish();
  EXPECT_EQ(slurp(dir.path() / "run" / "metrics.jsonl"),
            "{\"step\": 1, \"acc\": 0.25, \"loss\": 0.5}\n"
            "{\"step\": null, \"ok\": true, \"phase\": \"eval \\\"1\\\"\"}\n");
  EXPECT_EQ(slurp(dir.path() / "run" / "config.json"),
            "{\"batch_size\": 32, \"lr\": 0.001, \"name\": \"mlp\"}\n");
}

TEST(TrackingFiles, JsonlAppendsWhenARunResumes) {
  TempDir dir;
  for (int64_t step : {1, 2}) {
    accelerate::JsonlTracker jsonl("run", dir.path().string());
    jsonl.start();
    jsonl.log({{"loss", 1.0 / static_cast<double>(step)}}, step);
    jsonl.finish();
  }
  EXPECT_EQ(slurp(dir.path() / "run" / "metrics.jsonl"),
            "{\"step\": 1, \"loss\": 1}\n{\"step\": 2, \"loss\": 0.5}\n");
}

TEST(TrackingFiles, CsvHeaderComesFromTheFirstCallAndWidensForNewNames) {
  TempDir dir;
  accelerate::CsvTracker csv("run", dir.path().string());
  csv.start();
  csv.store_init_configuration({{"lr", 0.001}, {"note", "a,b"}});
  csv.log({{"loss", 0.5}, {"lr", 0.1}}, 1);
  csv.log({{"loss", 0.25}}, 2);
  csv.log({{"acc", 0.75}, {"text", "two\nlines, \"quoted\""}}, 3);
  csv.log({{"loss", 0.125}}, std::nullopt);
  csv.finish();
  EXPECT_EQ(slurp(dir.path() / "run" / "metrics.csv"),
            "step,loss,lr,acc,text\n"
            "1,0.5,0.1,,\n"
            "2,0.25,,,\n"
            "3,,,0.75,\"two\nlines, \"\"quoted\"\"\"\n"
            ",0.125,,,\n");
  EXPECT_EQ(slurp(dir.path() / "run" / "config.csv"), "name,value\nlr,0.001\nnote,\"a,b\"\n");
}

TEST(TrackingFiles, CsvResumedRunKeepsTheColumns) {
  TempDir dir;
  {
    accelerate::CsvTracker csv("run", dir.path().string());
    csv.start();
    csv.log({{"loss", 0.5}, {"a,b", 1}}, 1);
  }
  accelerate::CsvTracker csv("run", dir.path().string());
  csv.start();
  csv.log({{"loss", 0.25}}, 2);
  csv.log({{"new", 7}}, 3);
  EXPECT_EQ(slurp(dir.path() / "run" / "metrics.csv"),
            "step,\"a,b\",loss,new\n1,1,0.5,\n2,,0.25,\n3,,,7\n");
}

TEST(TrackingFiles, TrackerErrorsNameTheProblem) {
  TempDir dir;
  const auto logs = dir.path().string();
  EXPECT_ERROR_CONTAINS(accelerate::JsonlTracker("run", ""), "needs a logging directory");
  EXPECT_ERROR_CONTAINS(accelerate::CsvTracker("", logs), "needs a project name");
  EXPECT_ERROR_CONTAINS(accelerate::CsvTracker("run", logs, {{"flush", 1}}),
                        "csv tracker takes no init_kwargs, got \"flush\"");
  EXPECT_ERROR_CONTAINS(accelerate::TensorBoardTracker("run", logs, {{"flush_secs", 60}}),
                        "unknown tensorboard init_kwargs \"flush_secs\"; known: filename_suffix");
  EXPECT_ERROR_CONTAINS(accelerate::make_builtin_tracker("wandb", "run", logs),
                        "unknown tracker \"wandb\"; known: tensorboard, jsonl, csv, all");

  accelerate::JsonlTracker jsonl("run", logs);
  EXPECT_ERROR_CONTAINS(jsonl.log({{"loss", 1}}, 1), "was not started");
  jsonl.start();
  EXPECT_ERROR_CONTAINS(jsonl.log({{"step", 1}}, 1), "rename the value called \"step\"");
  jsonl.finish();
  EXPECT_ERROR_CONTAINS(jsonl.log({{"loss", 1}}, 1), "jsonl tracker is finished");
  jsonl.finish();  // twice is fine

  accelerate::CsvTracker csv("run", logs);
  csv.start();
  EXPECT_ERROR_CONTAINS(csv.log({{"step", 1}}, 1), "rename the value called \"step\"");
}

// ------------------------------------------------------------------ TensorBoard

#if defined(ACCELERATE_READ_TFEVENTS) && defined(ACCELERATE_TRACKING_PYTHONPATH)

// Runs the independent reader on an event file; its stdout, or the failure.
std::string read_back(const std::string& event_file, int* status) {
  const std::string command = std::string("PYTHONPATH='") + ACCELERATE_TRACKING_PYTHONPATH + "' " +
                              ACCELERATE_PYTHON3 + " '" + ACCELERATE_READ_TFEVENTS + "' '" +
                              event_file + "' 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) return "popen failed";
  std::string out;
  char buf[4096];
  size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof buf, pipe)) > 0) out.append(buf, n);
  *status = ::pclose(pipe);
  return out;
}

TEST(TrackingTensorBoard, AnIndependentReaderSeesTheScalarsTextAndConfig) {
  TempDir dir;
  AcceleratorOptions options{.project_dir = dir.path().string(), .log_with = {"tensorboard"}};
  Accelerator acc(single(options));
  acc.init_trackers("spirals", {{"lr", 0.001}, {"batch_size", 32}, {"model", "mlp"}});
  acc.log({{"loss", 0.75}, {"lr", 0.001}}, 1);
  acc.log({{"loss", 0.5}, {"note", "warm-up done"}}, 2);
  acc.log({{"loss", 0.125}}, 10);
  acc.end_training();

  auto tb =
      std::dynamic_pointer_cast<accelerate::TensorBoardTracker>(acc.get_tracker("tensorboard"));
  ASSERT_TRUE(tb);
  const fs::path file = tb->event_file();
  EXPECT_EQ(file.parent_path(), dir.path() / "spirals");
  EXPECT_EQ(file.filename().string().rfind("events.out.tfevents.", 0), 0U) << file;

  int status = -1;
  const std::string out = read_back(file.string(), &status);
  ASSERT_EQ(status, 0) << out;
  // simple_value is a float: the reader prints what a float holds.
  EXPECT_EQ(out,
            "version brain.Event:2\n"
            "text config 0 \"| name | value |\\n| --- | --- |\\n| batch_size | 32 |\\n"
            "| lr | 0.001 |\\n| model | mlp |\\n\"\n"
            "scalar loss 1 0.75\n"
            "scalar lr 1 0.0010000000474974513\n"
            "scalar loss 2 0.5\n"
            "text note 2 \"warm-up done\"\n"
            "scalar loss 10 0.125\n");
}

TEST(TrackingTensorBoard, TheReaderRejectsACorruptedRecord) {
  TempDir dir;
  accelerate::TensorBoardTracker tb("run", dir.path().string(), {{"filename_suffix", ".x"}});
  tb.start();
  tb.log({{"loss", 0.5}}, 3);
  tb.finish();
  EXPECT_EQ(tb.event_file().substr(tb.event_file().size() - 2), ".x");
  std::string bytes = slurp(tb.event_file());
  bytes[bytes.size() - 6] ^= 0x01;  // inside the last record's data
  {
    std::ofstream out(tb.event_file(), std::ios::binary | std::ios::trunc);
    out << bytes;
  }
  int status = -1;
  const std::string out = read_back(tb.event_file(), &status);
  EXPECT_NE(status, 0) << out;
  EXPECT_NE(out.find("bad data CRC"), std::string::npos) << out;
}

#else

TEST(TrackingTensorBoard, AnIndependentReaderSeesTheScalarsTextAndConfig) {
  FAIL() << "the reader is not configured: add include(tracking.cmake) to tests/CMakeLists.txt";
}

#endif

// ------------------------------------------------------------------ Accelerator

TEST(TrackingAccelerator, LogWithResolvesNamesAllAndRepeats) {
  auto custom = std::make_shared<RecordingTracker>();
  const auto c = accelerate::resolve_accelerator_options(
      {.project_dir = "runs", .log_with = {"csv", custom, "all", "csv"}}, EnvMap{});
  std::vector<std::string> names;
  for (const auto& spec : c.log_with) names.push_back(spec.name());
  EXPECT_EQ(names, (std::vector<std::string>{"csv", "recording", "tensorboard", "jsonl"}));
  EXPECT_EQ(c.log_with[1].tracker(), custom);
  EXPECT_NE(c.describe().find("log_with = csv, recording, tensorboard, jsonl (argument)"),
            std::string::npos)
      << c.describe();

  EXPECT_ERROR_CONTAINS(
      accelerate::resolve_accelerator_options({.project_dir = "runs", .log_with = {"wandb"}},
                                              EnvMap{}),
      "log_with has unknown tracker \"wandb\"; known: tensorboard, jsonl, csv, all");
  EXPECT_ERROR_CONTAINS(accelerate::resolve_accelerator_options({.log_with = {"jsonl"}}, EnvMap{}),
                        "log_with \"jsonl\" writes files and needs a logging directory");
  // A custom tracker chooses its own place: no directory needed.
  EXPECT_NO_THROW(accelerate::resolve_accelerator_options({.log_with = {custom}}, EnvMap{}));
  // logging_dir alone is enough.
  EXPECT_NO_THROW(accelerate::resolve_accelerator_options(
      {.project_config = accelerate::ProjectConfiguration{.logging_dir = "logs"},
       .log_with = {"all"}},
      EnvMap{}));
}

TEST(TrackingAccelerator, InitLogGetAndEndDriveEveryTracker) {
  TempDir dir;
  auto custom = std::make_shared<RecordingTracker>();
  AcceleratorOptions options{
      .project_config = accelerate::ProjectConfiguration{.project_dir = "unused",
                                                         .logging_dir = dir.path().string()},
      .log_with = {"jsonl", custom}};
  Accelerator acc(single(options));
  EXPECT_ERROR_CONTAINS(acc.log({{"loss", 1}}, 0), "call init_trackers before log");
  EXPECT_ERROR_CONTAINS(acc.get_tracker("jsonl"), "call init_trackers before get_tracker");
  EXPECT_ERROR_CONTAINS(acc.init_trackers("p", {}, {{"csv", {}}}),
                        "init_kwargs for \"csv\", which is not in log_with (jsonl, recording)");

  Accelerator fresh(single(options));
  fresh.init_trackers("p", {{"lr", 0.5}});
  fresh.log({{"loss", 2}}, 4);
  EXPECT_EQ(fresh.trackers().size(), 2U);
  EXPECT_EQ(fresh.get_tracker("recording"), custom);
  EXPECT_EQ(fresh.get_tracker("jsonl")->name(), "jsonl");
  EXPECT_ERROR_CONTAINS(fresh.get_tracker("tensorboard"),
                        "no tracker named \"tensorboard\"; available: jsonl, recording");
  EXPECT_ERROR_CONTAINS(fresh.init_trackers("p"), "init_trackers was already called");
  fresh.end_training();
  EXPECT_EQ(custom->calls, (std::vector<std::string>{"start", "config 1", "log loss 4", "finish"}));
  EXPECT_EQ(slurp(dir.path() / "p" / "metrics.jsonl"), "{\"step\": 4, \"loss\": 2}\n");
  EXPECT_EQ(slurp(dir.path() / "p" / "config.json"), "{\"lr\": 0.5}\n");
}

TEST(TrackingAccelerator, WithoutTrackersLogIsANoOp) {
  Accelerator acc(single());
  acc.log({{"loss", 1}}, 0);
  acc.init_trackers("p");
  EXPECT_TRUE(acc.trackers().empty());
  EXPECT_ERROR_CONTAINS(acc.get_tracker("jsonl"), "available: none (log_with is empty)");
  acc.end_training();
}

}  // namespace
