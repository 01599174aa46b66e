// The shared PartialState asked for twice, by PartialState::shared() and by an Accelerator, in
// processes started by `accelerate launch`: the launcher's CPU setting reaches the first caller
// through ACCELERATE_USE_CPU and the Accelerator as cpu=true, which must count as the same state,
// while a real disagreement is still refused naming the option.

#include <gtest/gtest.h>

#include "launch_util.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

using accelerate::testing::cli_path;
using accelerate::testing::contains;
using accelerate::testing::count_of;
using accelerate::testing::kLaunchVariables;
using accelerate::testing::run_command;
using accelerate::testing::RunResult;
using accelerate::testing::TempDir;
using accelerate::testing::worker_path;

namespace {

constexpr auto kTimeout = std::chrono::seconds(120);

RunResult launch(std::vector<std::string> args,
                 const std::map<std::string, std::string>& env = {}) {
  args.insert(args.begin(), {cli_path(), "launch"});
  return run_command(args, kTimeout, env, kLaunchVariables);
}

// Both ranks got one object from both calls, on the CPU.
void expect_one_cpu_state(const RunResult& r, const std::string& what) {
  ASSERT_EQ(r.exit_code, 0) << what << "\n" << r.output;
  EXPECT_FALSE(contains(r.output, "already created")) << what << "\n" << r.output;
  for (int rank = 0; rank < 2; ++rank) {
    EXPECT_TRUE(contains(
        r.output, "state_order rank " + std::to_string(rank) + "/2 same 1 device cpu debug 0\n"))
        << what << "\n"
        << r.output;
  }
}

}  // namespace

TEST(StateOrder, SharedThenAcceleratorUnderLaunchCpu) {
  expect_one_cpu_state(
      launch({"--cpu", "-n", "2", worker_path("state_order_worker"), "shared-first"}),
      "shared-first");
}

TEST(StateOrder, AcceleratorThenSharedUnderLaunchCpu) {
  expect_one_cpu_state(
      launch({"--cpu", "-n", "2", worker_path("state_order_worker"), "accelerator-first"}),
      "accelerator-first");
}

TEST(StateOrder, MultiCpuConfigWithUseCpuInBothOrders) {
  TempDir hf_home;
  const auto dir = hf_home.path() / "accelerate";
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "default_config.yaml") << "compute_environment: LOCAL_MACHINE\n"
                                                "distributed_type: MULTI_CPU\n"
                                                "mixed_precision: 'no'\n"
                                                "num_machines: 1\n"
                                                "num_processes: 2\n"
                                                "use_cpu: true\n";
  const std::map<std::string, std::string> env = {{"HF_HOME", hf_home.path().string()}};
  for (const std::string mode : {"shared-first", "accelerator-first"}) {
    expect_one_cpu_state(launch({worker_path("state_order_worker"), mode}, env),
                         "default config, " + mode);
    expect_one_cpu_state(launch({"--config_file", (dir / "default_config.yaml").string(),
                                 worker_path("state_order_worker"), mode}),
                         "--config_file, " + mode);
  }
}

TEST(StateOrder, RealConflictIsRefusedNamingTheOptionAndBothValues) {
  auto r =
      launch({"--cpu", "--debug", "-n", "2", worker_path("state_order_worker"), "debug-conflict"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(count_of(r.output,
                     " refused: accelerate: the shared PartialState was already created with "
                     "other options: debug is true (from ACCELERATE_DEBUG_MODE) but this call "
                     "asks for false (from the argument); create it once"),
            2u)
      << r.output;

  r = launch({"--cpu", "-n", "2", worker_path("state_order_worker"), "timeout-conflict"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(count_of(r.output,
                     " refused: accelerate: the shared PartialState was already created with "
                     "other options: init_kwargs.timeout is 1800000 ms but this call asks for "
                     "60000 ms; create it once"),
            2u)
      << r.output;
}
