// The data loader across real processes started by `accelerate launch`: an evaluation loop over
// a prepared loader whose dataset does not divide between the processes, with the predictions
// gathered by gather_for_metrics (see workers/data_worker.cpp).

#include <gtest/gtest.h>

#include "launch_util.h"

#include <string>
#include <tuple>
#include <vector>

using accelerate::testing::cli_path;
using accelerate::testing::count_of;
using accelerate::testing::kLaunchVariables;
using accelerate::testing::run_command;
using accelerate::testing::worker_path;

namespace {

constexpr auto kTimeout = std::chrono::seconds(120);

}  // namespace

// (number of processes, worker flag: "" sequential, "--shuffle", "--dispatch")
class DataThroughLauncher : public ::testing::TestWithParam<std::tuple<int, std::string>> {};

TEST_P(DataThroughLauncher, GatherForMetricsCountsEverySampleOnce) {
  const auto& [n, flag] = GetParam();
  std::vector<std::string> argv{cli_path(), "launch", "-n", std::to_string(n),
                                worker_path("data_worker")};
  if (!flag.empty()) argv.push_back(flag);
  auto r = run_command(argv, kTimeout, {}, kLaunchVariables);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(count_of(r.output, "data_worker: OK 23\n"), 1u) << r.output;
  EXPECT_EQ(count_of(r.output, "FAILED"), 0u) << r.output;
}

INSTANTIATE_TEST_SUITE_P(Launch, DataThroughLauncher,
                         ::testing::Combine(::testing::Values(2, 3, 4),
                                            ::testing::Values(std::string(),
                                                              std::string("--shuffle"))),
                         [](const auto& info) {
                           const auto& flag = std::get<1>(info.param);
                           return std::to_string(std::get<0>(info.param)) + "Processes" +
                                  (flag.empty() ? "Sequential" : "Shuffled");
                         });

INSTANTIATE_TEST_SUITE_P(LaunchDispatch, DataThroughLauncher,
                         ::testing::Values(std::make_tuple(3, std::string("--dispatch"))),
                         [](const auto& info) {
                           return std::to_string(std::get<0>(info.param)) + "ProcessesDispatched";
                         });
