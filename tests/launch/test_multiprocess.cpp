// The library across real processes: collectives, state and process control through our own
// launcher, and process groups formed from MPI / SLURM variables without it.

#include <gtest/gtest.h>

#include "launch_util.h"

#include <future>
#include <string>
#include <thread>
#include <vector>

using accelerate::testing::ChildProcess;
using accelerate::testing::cli_path;
using accelerate::testing::contains;
using accelerate::testing::free_port;
using accelerate::testing::kLaunchVariables;
using accelerate::testing::run_command;
using accelerate::testing::RunResult;
using accelerate::testing::worker_path;

namespace {

constexpr auto kTimeout = std::chrono::seconds(120);

// Starts one process per entry of `envs` directly (no launcher) and waits for all of them.
std::vector<RunResult> run_processes(const std::vector<std::string>& argv,
                                     const std::vector<std::map<std::string, std::string>>& envs) {
  std::vector<ChildProcess> children;
  for (const auto& env : envs) {
    children.push_back(ChildProcess::start(argv, env, kLaunchVariables));
  }
  std::vector<RunResult> results;
  for (auto& child : children) results.push_back(child.wait(kTimeout));
  return results;
}

}  // namespace

class OpsThroughLauncher : public ::testing::TestWithParam<int> {};

TEST_P(OpsThroughLauncher, EveryOperationGivesTheExpectedValues) {
  const int n = GetParam();
  auto r = run_command(
      {cli_path(), "launch", "--num_processes", std::to_string(n), worker_path("ops_worker")},
      kTimeout, {}, kLaunchVariables);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (int rank = 0; rank < n; ++rank) {
    EXPECT_TRUE(contains(
        r.output, "ops_worker rank " + std::to_string(rank) + "/" + std::to_string(n) + ": OK"))
        << r.output;
  }
}

INSTANTIATE_TEST_SUITE_P(Launch, OpsThroughLauncher, ::testing::Values(2, 3, 4));

TEST(MultiProcess, DebugModeReportsMismatchedShapesOnEveryRank) {
  auto r = run_command(
      {cli_path(), "launch", "-n", "3", "--debug", worker_path("ops_worker"), "--debug-mismatch"},
      kTimeout, {}, kLaunchVariables);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  size_t reports = 0;
  for (size_t pos = 0; (pos = r.output.find("MISMATCH: ", pos)) != std::string::npos; ++pos) {
    ++reports;
  }
  EXPECT_EQ(reports, 3u) << r.output;
  EXPECT_TRUE(contains(r.output, "'gather'")) << r.output;
}

TEST(MultiProcess, LauncherProcessesFormOneGroup) {
  auto r = run_command({cli_path(), "launch", "-n", "3", worker_path("state_worker")}, kTimeout, {},
                       kLaunchVariables);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (int rank = 0; rank < 3; ++rank) {
    EXPECT_TRUE(contains(r.output, "state_worker rank " + std::to_string(rank) + "/3 local " +
                                       std::to_string(rank) + "/3 source torchrun sum 6"))
        << r.output;
  }
}

TEST(MultiProcess, TwoLaunchersOnOneMachineFormOneGroupOfFour) {
  const std::string port = std::to_string(free_port());
  auto start = [&](int machine_rank) {
    return ChildProcess::start(
        {cli_path(), "launch", "--num_machines", "2", "--machine_rank",
         std::to_string(machine_rank), "--main_process_ip", "127.0.0.1", "--main_process_port",
         port, "--num_processes", "2", worker_path("state_worker")},
        {}, kLaunchVariables);
  };
  auto first = start(0);
  auto second = start(1);
  auto r0 = first.wait(kTimeout);
  auto r1 = second.wait(kTimeout);
  ASSERT_EQ(r0.exit_code, 0) << r0.output;
  ASSERT_EQ(r1.exit_code, 0) << r1.output;
  // Machine 0 runs ranks 0 and 1, machine 1 runs ranks 2 and 3; all four add up 1+2+3+4.
  EXPECT_TRUE(contains(r0.output, "state_worker rank 0/4 local 0/2 source torchrun sum 10"))
      << r0.output;
  EXPECT_TRUE(contains(r0.output, "state_worker rank 1/4 local 1/2 source torchrun sum 10"))
      << r0.output;
  EXPECT_TRUE(contains(r1.output, "state_worker rank 2/4 local 0/2 source torchrun sum 10"))
      << r1.output;
  EXPECT_TRUE(contains(r1.output, "state_worker rank 3/4 local 1/2 source torchrun sum 10"))
      << r1.output;
}

TEST(MultiProcess, OpenMpiVariablesWithoutOurLauncher) {
  const std::string port = std::to_string(free_port());
  std::vector<std::map<std::string, std::string>> envs;
  for (int rank = 0; rank < 2; ++rank) {
    envs.push_back({{"OMPI_COMM_WORLD_RANK", std::to_string(rank)},
                    {"OMPI_COMM_WORLD_SIZE", "2"},
                    {"OMPI_COMM_WORLD_LOCAL_RANK", std::to_string(rank)},
                    {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"},
                    {"MASTER_ADDR", "127.0.0.1"},
                    {"MASTER_PORT", port}});
  }
  auto results = run_processes({worker_path("state_worker")}, envs);
  for (int rank = 0; rank < 2; ++rank) {
    const auto& r = results[static_cast<size_t>(rank)];
    EXPECT_EQ(r.exit_code, 0) << r.output;
    EXPECT_TRUE(contains(r.output, "state_worker rank " + std::to_string(rank) + "/2 local " +
                                       std::to_string(rank) + "/2 source openmpi sum 3"))
        << r.output;
  }
}

// Started without our launcher (as torchrun, SLURM or mpirun would), a worker still gets what
// the launcher would have set for speed: threads sharing the cores, the CPU caching allocator,
// direct Gloo; and the environment still overrides each.
TEST(MultiProcess, SpeedSettingsHoldWithoutOurLauncher) {
  const unsigned cores = std::max(1U, std::thread::hardware_concurrency());
  const std::string threads = std::to_string(std::max(1U, cores / 2));
  for (bool overridden : {false, true}) {
    const std::string port = std::to_string(free_port());
    std::vector<std::map<std::string, std::string>> envs;
    for (int rank = 0; rank < 2; ++rank) {
      envs.push_back({{"RANK", std::to_string(rank)},
                      {"WORLD_SIZE", "2"},
                      {"LOCAL_RANK", std::to_string(rank)},
                      {"LOCAL_WORLD_SIZE", "2"},
                      {"MASTER_ADDR", "127.0.0.1"},
                      {"MASTER_PORT", port}});
      if (overridden) {
        envs.back()["OMP_NUM_THREADS"] = "2";
        envs.back()["ACCELERATE_CPU_CACHE_MB"] = "0";
        envs.back()["ACCELERATE_DIRECT_GLOO"] = "0";
      }
    }
    auto results = run_processes({worker_path("state_worker"), "--runtime"}, envs);
    const std::string want = overridden
                                 ? "runtime threads 2 cpu_cache 0 direct_gloo 0"
                                 : "runtime threads " + threads + " cpu_cache 1 direct_gloo 1";
    for (const auto& r : results) {
      EXPECT_EQ(r.exit_code, 0) << r.output;
      EXPECT_TRUE(contains(r.output, want)) << "want: " << want << "\n" << r.output;
    }
  }
}

TEST(MultiProcess, SlurmVariablesWithoutOurLauncher) {
  const std::string port = std::to_string(free_port());
  std::vector<std::map<std::string, std::string>> envs;
  for (int rank = 0; rank < 3; ++rank) {
    envs.push_back({{"SLURM_PROCID", std::to_string(rank)},
                    {"SLURM_NTASKS", "3"},
                    {"SLURM_LOCALID", std::to_string(rank)},
                    {"SLURM_TASKS_PER_NODE", "3"},
                    {"SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"},
                    {"MASTER_PORT", port}});
  }
  auto results = run_processes({worker_path("state_worker")}, envs);
  for (int rank = 0; rank < 3; ++rank) {
    const auto& r = results[static_cast<size_t>(rank)];
    EXPECT_EQ(r.exit_code, 0) << r.output;
    EXPECT_TRUE(contains(r.output, "state_worker rank " + std::to_string(rank) + "/3 local " +
                                       std::to_string(rank) + "/3 source slurm sum 6"))
        << r.output;
  }
}

TEST(MultiProcess, MainProcessFirstFailureReleasesTheOthersWithAnError) {
  const std::string port = std::to_string(free_port());
  std::vector<std::map<std::string, std::string>> envs;
  for (int rank = 0; rank < 3; ++rank) {
    envs.push_back({{"RANK", std::to_string(rank)},
                    {"WORLD_SIZE", "3"},
                    {"MASTER_ADDR", "127.0.0.1"},
                    {"MASTER_PORT", port}});
  }
  auto results = run_processes({worker_path("state_worker"), "--fail-in-main-first"}, envs);
  EXPECT_EQ(results[0].exit_code, 3) << results[0].output;
  EXPECT_TRUE(contains(results[0].output, "rank 0 caught: main failed on purpose"))
      << results[0].output;
  for (size_t rank : {1u, 2u}) {
    EXPECT_EQ(results[rank].exit_code, 4) << results[rank].output;
    EXPECT_TRUE(contains(results[rank].output, "left the block by an exception"))
        << results[rank].output;
    EXPECT_FALSE(contains(results[rank].output, "ran the block")) << results[rank].output;
  }
}

#ifdef ACCELERATE_EXAMPLE_DIR
TEST(MultiProcess, HelloExampleAddsUpEveryProcess) {
  auto r = run_command(
      {cli_path(), "launch", "-n", "3", std::string(ACCELERATE_EXAMPLE_DIR) + "/hello_distributed"},
      kTimeout, {}, kLaunchVariables);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "sum over 3 processes = 6 (expected 6)")) << r.output;
  for (int rank = 0; rank < 3; ++rank) {
    EXPECT_TRUE(contains(r.output, "process " + std::to_string(rank) + " of 3")) << r.output;
  }
}

// The README's main job: two processes, bf16 and accumulation from the launcher, and the
// held-out set counted once (600 samples) with the accuracy the example promises.
TEST(MultiProcess, TrainingExampleLearnsTheSpirals) {
  auto r = run_command({cli_path(), "launch", "-n", "2", "--mixed_precision", "bf16",
                        "--gradient_accumulation_steps", "2",
                        std::string(ACCELERATE_EXAMPLE_DIR) + "/train_spirals", "--epochs", "10"},
                       kTimeout, {}, kLaunchVariables);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "mixed_precision = bf16 (environment)")) << r.output;
  EXPECT_TRUE(contains(r.output, "gradient_accumulation_steps = 2 (environment)")) << r.output;
  const auto at = r.output.find("evaluated 600 samples: loss ");
  ASSERT_NE(at, std::string::npos) << r.output;
  const double loss = std::stod(r.output.substr(at + 28));
  const auto acc_at = r.output.find("accuracy ", at);
  ASSERT_NE(acc_at, std::string::npos) << r.output;
  const double accuracy = std::stod(r.output.substr(acc_at + 9));
  EXPECT_LT(loss, 0.1) << r.output;
  EXPECT_GE(accuracy, 0.98) << r.output;
}
#endif
