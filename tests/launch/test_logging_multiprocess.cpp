// get_logger across real processes started by `accelerate launch` (see workers/logging_worker.cpp):
// every process shares one output pipe, so the order of the lines is what the processes wrote.

#include <gtest/gtest.h>

#include "launch_util.h"

#include <algorithm>
#include <string>
#include <vector>

using accelerate::testing::cli_path;
using accelerate::testing::kLaunchVariables;
using accelerate::testing::run_command;
using accelerate::testing::split_lines;
using accelerate::testing::worker_path;

namespace {

constexpr auto kTimeout = std::chrono::seconds(120);

// The lines of `output` that contain `part`, in order.
std::vector<std::string> lines_with(const std::string& output, const std::string& part) {
  std::vector<std::string> found;
  for (const auto& line : split_lines(output)) {
    if (line.find(part) != std::string::npos) found.push_back(line);
  }
  return found;
}

std::vector<std::string> launch_args(int processes) {
  return {cli_path(), "launch", "--num_processes", std::to_string(processes),
          worker_path("logging_worker")};
}

}  // namespace

TEST(LoggingThroughLauncher, MainProcessOnlyByDefaultAndEveryRankInOrderWhenAsked) {
  // Unset rather than inherited: a developer's ACCELERATE_LOG_LEVEL must not change the counts.
  auto unset = kLaunchVariables;
  unset.push_back("ACCELERATE_LOG_LEVEL");
  auto r = run_command(launch_args(3), kTimeout, {}, unset);
  ASSERT_EQ(r.exit_code, 0) << r.output;

  EXPECT_EQ(lines_with(r.output, "once from rank"),
            (std::vector<std::string>{"INFO:logging_worker:[RANK 0] once from rank 0"}))
      << r.output;
  EXPECT_TRUE(lines_with(r.output, "debug from rank").empty()) << r.output;
  // Rank 2 reached this call first and rank 0 last; the lines must still be in rank order.
  EXPECT_EQ(lines_with(r.output, "in order from rank"),
            (std::vector<std::string>{"INFO:logging_worker:[RANK 0] in order from rank 0",
                                      "INFO:logging_worker:[RANK 1] in order from rank 1",
                                      "INFO:logging_worker:[RANK 2] in order from rank 2"}))
      << r.output;
  auto everyone = lines_with(r.output, "everyone from rank");
  std::sort(everyone.begin(), everyone.end());
  EXPECT_EQ(everyone,
            (std::vector<std::string>{"WARNING:logging_worker:[RANK 0] everyone from rank 0",
                                      "WARNING:logging_worker:[RANK 1] everyone from rank 1",
                                      "WARNING:logging_worker:[RANK 2] everyone from rank 2"}))
      << r.output;
}

TEST(LoggingThroughLauncher, LevelFromTheEnvironmentReachesEveryProcess) {
  auto r =
      run_command(launch_args(2), kTimeout, {{"ACCELERATE_LOG_LEVEL", "Debug"}}, kLaunchVariables);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(lines_with(r.output, "debug from rank"),
            (std::vector<std::string>{"DEBUG:logging_worker:[RANK 0] debug from rank 0"}))
      << r.output;
}

TEST(LoggingThroughLauncher, InvalidLevelIsAnErrorNamingIt) {
  auto r =
      run_command(launch_args(1), kTimeout, {{"ACCELERATE_LOG_LEVEL", "chatty"}}, kLaunchVariables);
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("ACCELERATE_LOG_LEVEL 'chatty' is not a log level"), std::string::npos)
      << r.output;
}
