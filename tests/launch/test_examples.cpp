// The examples in examples/ run through `accelerate launch -n 2` and reach what their header
// comments promise, so that they cannot rot silently. Each run is kept to a few seconds with the
// examples' own flags (fewer epochs where the default takes longer).

#include <gtest/gtest.h>

#include "launch_util.h"

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#ifdef ACCELERATE_EXAMPLE_DIR

using accelerate::testing::cli_path;
using accelerate::testing::contains;
using accelerate::testing::count_of;
using accelerate::testing::kLaunchVariables;
using accelerate::testing::run_command;
using accelerate::testing::RunResult;
using accelerate::testing::TempDir;

namespace {

constexpr auto kTimeout = std::chrono::seconds(120);

// The number printed right after the last occurrence of `label` (for example "accuracy ").
std::optional<double> number_after(const std::string& text, const std::string& label) {
  const auto at = text.rfind(label);
  if (at == std::string::npos) return std::nullopt;
  try {
    return std::stod(text.substr(at + label.size()));
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

// `accelerate launch -n 2 [launch_args] build/examples/<name> [args]`, with no config file.
RunResult launch_example(const std::string& name, const std::vector<std::string>& args,
                         const std::vector<std::string>& launch_args = {}) {
  // A path join rather than string concatenation: GCC 12 at -O2 reports a false
  // -Warray-bounds for `std::string(literal) + "/" + name` here.
  const std::string program = (std::filesystem::path(ACCELERATE_EXAMPLE_DIR) / name).string();
  if (!std::filesystem::exists(program)) {
    RunResult missing;
    missing.output = program + " was not built (is the example in add_dependencies?)";
    return missing;
  }
  std::vector<std::string> argv = {cli_path(), "launch", "-n", "2"};
  argv.insert(argv.end(), launch_args.begin(), launch_args.end());
  argv.push_back(program);
  argv.insert(argv.end(), args.begin(), args.end());
  return run_command(argv, kTimeout, {}, kLaunchVariables);
}

}  // namespace

TEST(ExamplesThroughLauncher, TextClassification) {
  const auto r = launch_example("text_classification", {"--epochs", "5"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  ASSERT_TRUE(contains(r.output, "evaluated 600 reviews: loss ")) << r.output;
  const auto accuracy = number_after(r.output, "accuracy ");
  ASSERT_TRUE(accuracy) << r.output;
  EXPECT_GE(*accuracy, 0.95) << r.output;
}

TEST(ExamplesThroughLauncher, ImageClassification) {
  const auto r = launch_example("image_classification", {"--epochs", "4"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  ASSERT_TRUE(contains(r.output, "evaluated 800 images: loss ")) << r.output;
  const auto accuracy = number_after(r.output, "accuracy ");
  ASSERT_TRUE(accuracy) << r.output;
  EXPECT_GE(*accuracy, 0.95) << r.output;
}

TEST(ExamplesThroughLauncher, GradientAccumulation) {
  const auto r = launch_example("gradient_accumulation", {});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "= effective batch 64")) << r.output;
  EXPECT_TRUE(contains(r.output, "first step: 64 samples")) << r.output;
  EXPECT_TRUE(contains(r.output, "(matches)")) << r.output;
  // 4096 samples, batches of 8 on 2 processes: 256 batches per process and epoch, 64 steps.
  EXPECT_TRUE(contains(r.output, "each process: 1280 batches, 320 optimizer steps")) << r.output;
  const auto mse = number_after(r.output, "samples: mse ");
  ASSERT_TRUE(mse) << r.output;
  EXPECT_LT(*mse, 0.02) << r.output;
}

// Two runs over one project directory: the second resumes where the first stopped.
TEST(ExamplesThroughLauncher, CheckpointingResumesASecondRun) {
  TempDir tmp;
  const std::string project = (tmp.path() / "ring").string();
  const auto first = launch_example("checkpointing", {"--project_dir", project, "--epochs", "3"});
  ASSERT_EQ(first.exit_code, 0) << first.output;
  EXPECT_TRUE(contains(first.output, "starting from scratch")) << first.output;
  EXPECT_EQ(count_of(first.output, ": train loss "), 3u) << first.output;

  const auto second = launch_example("checkpointing", {"--project_dir", project, "--epochs", "6"});
  ASSERT_EQ(second.exit_code, 0) << second.output;
  EXPECT_TRUE(contains(second.output, "checkpoint_2: 3 epoch(s)")) << second.output;
  EXPECT_FALSE(contains(second.output, "epoch 3: train loss")) << second.output;
  EXPECT_TRUE(contains(second.output, "epoch 4: train loss")) << second.output;
  EXPECT_TRUE(contains(second.output, "epoch 6: train loss")) << second.output;
  // total_limit 2: only the last two of checkpoint_0 ... checkpoint_5 stay.
  EXPECT_TRUE(
      contains(second.output, "checkpoints kept (total_limit 2): checkpoint_4 checkpoint_5"))
      << second.output;
  EXPECT_FALSE(std::filesystem::exists(tmp.path() / "ring" / "checkpoints" / "checkpoint_3"));
  const auto accuracy = number_after(second.output, "accuracy ");
  ASSERT_TRUE(accuracy) << second.output;
  EXPECT_GE(*accuracy, 0.95) << second.output;
}

// A process killed mid-epoch; `--max_restarts 1` restarts the job, which goes on from the last
// checkpoint.
TEST(ExamplesThroughLauncher, CheckpointingSurvivesACrashWithMaxRestarts) {
  TempDir tmp;
  const std::string project = (tmp.path() / "ring").string();
  const auto r = launch_example(
      "checkpointing", {"--project_dir", project, "--epochs", "4", "--crash_at_epoch", "3"},
      {"--max_restarts", "1"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "simulating a crash in epoch 3")) << r.output;
  EXPECT_TRUE(contains(r.output, "checkpoint_1: 2 epoch(s)")) << r.output;
  EXPECT_TRUE(contains(r.output, "this is restart 1")) << r.output;
  EXPECT_TRUE(contains(r.output, "epoch 4: train loss")) << r.output;
  const auto accuracy = number_after(r.output, "accuracy ");
  ASSERT_TRUE(accuracy) << r.output;
  EXPECT_GE(*accuracy, 0.9) << r.output;
}

#endif  // ACCELERATE_EXAMPLE_DIR
