// `accelerate launch` as a user sees it: real processes, real signals. The workers are
// launch_probe (tests/launch/workers/launch_probe.cpp), which reports its environment and
// arguments and fails on request; each one costs ~0.6 s of CPU to start because it links LibTorch,
// so the tests keep the number of workers small. Every launch here gets an empty HF_HOME, so that a
// default config file on the machine running the tests cannot change what the workers see.

#include <gtest/gtest.h>

#include "launch_util.h"

#include <signal.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <ostream>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

using accelerate::testing::ChildProcess;
using accelerate::testing::cli_path;
using accelerate::testing::contains;
using accelerate::testing::count_of;
using accelerate::testing::free_port;
using accelerate::testing::key_value_lines;
using accelerate::testing::kLaunchVariables;
using accelerate::testing::process_exists;
using accelerate::testing::read_text_file;
using accelerate::testing::run_command;
using accelerate::testing::RunResult;
using accelerate::testing::split_lines;
using accelerate::testing::TempDir;
using accelerate::testing::wait_until;
using accelerate::testing::worker_path;

constexpr auto kTimeout = std::chrono::seconds(30);

std::string probe() {
  return worker_path("launch_probe");
}

std::vector<std::string> launch(std::vector<std::string> args) {
  args.insert(args.begin(), {cli_path(), "launch"});
  return args;
}

RunResult run_launch(std::vector<std::string> args,
                     const std::map<std::string, std::string>& env = {}) {
  return run_command(launch(std::move(args)), kTimeout, env, kLaunchVariables);
}

std::map<int, std::map<std::string, std::string>> reports_by_rank(const std::string& output) {
  std::map<int, std::map<std::string, std::string>> by_rank;
  for (auto& report : key_value_lines(output, "probe ")) {
    by_rank[std::stoi(report.at("RANK"))] = report;
  }
  return by_rank;
}

std::string expected_threads(int num_processes) {
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  return std::to_string(std::max(1u, cores / static_cast<unsigned>(num_processes)));
}

// Pids the probes wrote into `dir` (one "<rank>.pid" file each).
std::vector<pid_t> worker_pids(const std::filesystem::path& dir) {
  std::vector<pid_t> pids;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.path().extension() != ".pid") continue;
    pids.push_back(static_cast<pid_t>(std::stol(read_text_file(entry.path()))));
  }
  return pids;
}

std::size_t pid_file_count(const std::filesystem::path& dir) {
  return worker_pids(dir).size();
}

void expect_all_gone(const std::vector<pid_t>& pids) {
  for (pid_t pid : pids) {
    errno = 0;
    EXPECT_EQ(::kill(pid, 0), -1) << "worker " << pid << " is still there";
    EXPECT_EQ(errno, ESRCH) << "worker " << pid;
  }
}

// Dead, or a zombie waiting for an init that reaps lazily: either way no longer running.
bool process_running(pid_t pid) {
  const std::string stat = read_text_file("/proc/" + std::to_string(pid) + "/stat");
  if (stat.empty()) return false;
  const auto paren = stat.rfind(')');
  return paren == std::string::npos || paren + 2 >= stat.size() || stat[paren + 2] != 'Z';
}

// ---------------------------------------------------------------- environment

TEST(LaunchEnvironment, TwoProcessesWithEveryAccelerateOption) {
  auto r =
      run_launch({"-n", "2", "--cpu", "--mixed_precision", "bf16", "--gradient_accumulation_steps",
                  "4", "--debug", "--main_process_ip", "127.0.0.2", probe(), "--print-env"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto ranks = reports_by_rank(r.output);
  ASSERT_EQ(ranks.size(), 2u) << r.output;
  const std::string port = ranks.at(0).at("MASTER_PORT");
  EXPECT_GT(std::stoi(port), 0);
  for (int rank = 0; rank < 2; ++rank) {
    const auto& env = ranks.at(rank);
    EXPECT_EQ(env.at("WORLD_SIZE"), "2");
    EXPECT_EQ(env.at("LOCAL_RANK"), std::to_string(rank));
    EXPECT_EQ(env.at("LOCAL_WORLD_SIZE"), "2");
    EXPECT_EQ(env.at("GROUP_RANK"), "0");
    EXPECT_EQ(env.at("MASTER_ADDR"), "127.0.0.2");
    EXPECT_EQ(env.at("MASTER_PORT"), port);
    EXPECT_EQ(env.at("ACCELERATE_USE_CPU"), "true");
    EXPECT_EQ(env.at("ACCELERATE_MIXED_PRECISION"), "bf16");
    EXPECT_EQ(env.at("ACCELERATE_GRADIENT_ACCUMULATION_STEPS"), "4");
    EXPECT_EQ(env.at("ACCELERATE_DEBUG_MODE"), "1");
    EXPECT_EQ(env.at("OMP_NUM_THREADS"), expected_threads(2));
    EXPECT_EQ(env.at("OPENBLAS_NUM_THREADS"), expected_threads(2));
    EXPECT_EQ(env.at("MKL_NUM_THREADS"), expected_threads(2));
  }
  // The thread notice comes from the launcher, once, not from every worker.
  EXPECT_EQ(count_of(r.output, "OMP_NUM_THREADS=" + expected_threads(2) + ","), 1u) << r.output;
}

TEST(LaunchEnvironment, ThreeProcessesWithDefaults) {
  auto r = run_launch({"-n", "3", probe(), "--print-env"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto ranks = reports_by_rank(r.output);
  ASSERT_EQ(ranks.size(), 3u) << r.output;
  for (int rank = 0; rank < 3; ++rank) {
    const auto& env = ranks.at(rank);
    EXPECT_EQ(env.at("WORLD_SIZE"), "3");
    EXPECT_EQ(env.at("LOCAL_RANK"), std::to_string(rank));
    EXPECT_EQ(env.at("LOCAL_WORLD_SIZE"), "3");
    EXPECT_EQ(env.at("MASTER_ADDR"), "127.0.0.1");
    EXPECT_EQ(env.at("MASTER_PORT"), ranks.at(0).at("MASTER_PORT"));
    EXPECT_EQ(env.at("ACCELERATE_USE_CPU"), "<unset>");
    EXPECT_EQ(env.at("ACCELERATE_MIXED_PRECISION"), "<unset>");
    EXPECT_EQ(env.at("ACCELERATE_GRADIENT_ACCUMULATION_STEPS"), "<unset>");
    EXPECT_EQ(env.at("ACCELERATE_DEBUG_MODE"), "<unset>");
    EXPECT_EQ(env.at("OMP_NUM_THREADS"), expected_threads(3));
  }
}

TEST(LaunchEnvironment, UserThreadSettingIsKept) {
  auto r = run_launch({"-n", "2", probe(), "--print-env"}, {{"OMP_NUM_THREADS", "7"}});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto ranks = reports_by_rank(r.output);
  ASSERT_EQ(ranks.size(), 2u) << r.output;
  for (const auto& [rank, env] : ranks) {
    EXPECT_EQ(env.at("OMP_NUM_THREADS"), "7") << "rank " << rank;
    EXPECT_EQ(env.at("MKL_NUM_THREADS"), expected_threads(2)) << "rank " << rank;
  }
  EXPECT_FALSE(contains(r.output, "OMP_NUM_THREADS=" + expected_threads(2))) << r.output;
}

TEST(LaunchEnvironment, SingleProcessGetsNoThreadDefaults) {
  auto r = run_launch({probe(), "--print-env"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto ranks = reports_by_rank(r.output);
  ASSERT_EQ(ranks.size(), 1u) << r.output;
  EXPECT_EQ(ranks.at(0).at("WORLD_SIZE"), "1");
  EXPECT_EQ(ranks.at(0).at("OMP_NUM_THREADS"), "<unset>");
  EXPECT_FALSE(contains(r.output, "accelerate launch:")) << r.output;
}

TEST(LaunchEnvironment, WorkersReuseFreedMemoryUnlessTheUserChose) {
  const std::string tunables =
      "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824";
  auto defaults = run_launch({"-n", "2", probe(), "--print-env"});
  ASSERT_EQ(defaults.exit_code, 0) << defaults.output;
  for (const auto& [rank, env] : reports_by_rank(defaults.output)) {
    EXPECT_EQ(env.at("GLIBC_TUNABLES"), tunables) << "rank " << rank;
  }
  auto single = run_launch({probe(), "--print-env"});
  EXPECT_EQ(reports_by_rank(single.output).at(0).at("GLIBC_TUNABLES"), tunables) << single.output;
  // Any allocator variable of the user's wins, even an empty one or the older MALLOC_* form.
  for (const auto& [name, value] : std::vector<std::pair<std::string, std::string>>{
           {"GLIBC_TUNABLES", "glibc.malloc.arena_max=2"},
           {"GLIBC_TUNABLES", ""},
           {"MALLOC_TRIM_THRESHOLD_", "0"}}) {
    auto r = run_launch({"-n", "2", probe(), "--print-env"}, {{name, value}});
    ASSERT_EQ(r.exit_code, 0) << r.output;
    const std::string expected =
        name == "GLIBC_TUNABLES" ? (value.empty() ? std::string("") : value) : "<unset>";
    for (const auto& [rank, env] : reports_by_rank(r.output)) {
      EXPECT_EQ(env.at("GLIBC_TUNABLES"), expected) << name << "=" << value << " rank " << rank;
    }
  }
}

TEST(LaunchEnvironment, TwoMachinesOnOneHostNumberRanksAcrossMachines) {
  const std::string port = std::to_string(free_port());
  std::vector<ChildProcess> launchers;
  for (const char* machine_rank : {"0", "1"}) {
    launchers.push_back(ChildProcess::start(
        launch({"-n", "2", "--num_machines", "2", "--machine_rank", machine_rank,
                "--main_process_port", port, probe(), "--print-env"}),
        {}, kLaunchVariables));
  }
  std::map<int, std::map<std::string, std::string>> ranks;
  for (auto& launcher : launchers) {
    auto r = launcher.wait(kTimeout);
    ASSERT_EQ(r.exit_code, 0) << r.output;
    ranks.merge(reports_by_rank(r.output));
  }
  ASSERT_EQ(ranks.size(), 4u);
  for (int rank = 0; rank < 4; ++rank) {
    const auto& env = ranks.at(rank);
    EXPECT_EQ(env.at("WORLD_SIZE"), "4");
    EXPECT_EQ(env.at("LOCAL_RANK"), std::to_string(rank % 2));
    EXPECT_EQ(env.at("LOCAL_WORLD_SIZE"), "2");
    EXPECT_EQ(env.at("GROUP_RANK"), std::to_string(rank / 2));
    EXPECT_EQ(env.at("MASTER_PORT"), port);
  }
}

TEST(LaunchEnvironment, ConcurrentLaunchesGetDifferentPorts) {
  std::vector<ChildProcess> launchers;
  for (int i = 0; i < 2; ++i) {
    // The workers linger so that the two jobs overlap, as two users' jobs would.
    launchers.push_back(ChildProcess::start(
        launch({"-n", "2", probe(), "--print-env", "--sleep", "0.5"}), {}, kLaunchVariables));
  }
  std::vector<std::string> ports;
  for (auto& launcher : launchers) {
    auto r = launcher.wait(kTimeout);
    ASSERT_EQ(r.exit_code, 0) << r.output;
    auto ranks = reports_by_rank(r.output);
    ASSERT_EQ(ranks.size(), 2u) << r.output;
    EXPECT_EQ(ranks.at(0).at("MASTER_PORT"), ranks.at(1).at("MASTER_PORT"));
    ports.push_back(ranks.at(0).at("MASTER_PORT"));
  }
  EXPECT_NE(ports[0], ports[1]);
}

// ---------------------------------------------------------------- arguments and output

TEST(LaunchArguments, EverythingAfterProgramIsPassedVerbatim) {
  const std::vector<std::string> args = {
      "--foo", "-n", "3", "", "[1,2]", "a b", "--", "-h", "--num_processes=5", "--cpu", "x=y", ""};
  std::string expected = "argc=" + std::to_string(args.size()) + "\n";
  for (std::size_t i = 0; i < args.size(); ++i) {
    expected += "argv[" + std::to_string(i) + "]=" + args[i] + "|\n";
  }
  for (bool with_separator : {false, true}) {
    std::vector<std::string> command = {"--cpu"};
    if (with_separator) command.push_back("--");
    command.push_back(probe());
    command.push_back("args");
    command.insert(command.end(), args.begin(), args.end());
    auto r = run_launch(command);
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_EQ(r.output, expected) << "with '--': " << with_separator;
  }
}

TEST(LaunchArguments, ProgramIsSearchedInPath) {
  auto ok = run_launch({"-n", "2", "true"});
  EXPECT_EQ(ok.exit_code, 0) << ok.output;
  auto fail = run_launch({"-n", "2", "false"});
  EXPECT_EQ(fail.exit_code, 1) << fail.output;
  EXPECT_TRUE(contains(fail.output, "exited with code 1")) << fail.output;
}

TEST(LaunchOutput, RankPrefixKeepsLinesWhole) {
  constexpr int kLines = 20;
  auto r = run_launch({"-n", "3", "--rank_prefix", probe(), "--lines", std::to_string(kLines)});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::regex line_re(R"(\[rank (\d)\] line (\d+) of rank (\d) on std(out|err))");
  std::map<std::string, int> count;  // "rank/stream" -> lines
  for (const auto& line : split_lines(r.output)) {
    if (line.rfind("accelerate launch: ", 0) == 0) continue;
    std::smatch m;
    ASSERT_TRUE(std::regex_match(line, m, line_re)) << "mangled line: '" << line << "'";
    EXPECT_EQ(m[1], m[3]) << line;
    ++count[m[1].str() + "/" + m[4].str()];
  }
  EXPECT_EQ(count.size(), 6u);
  for (const auto& [who, n] : count) EXPECT_EQ(n, kLines) << who;
}

// ---------------------------------------------------------------- failures and signals

TEST(LaunchFailure, FailingWorkerStopsTheOthers) {
  TempDir pids;
  // A long grace period: the workers must go on SIGTERM, not wait for the SIGKILL.
  auto r = run_launch({"-n", "3", "--grace_period", "30", probe(), "--pid-dir", pids.path(),
                       "--wait-for-pids", "3", "--fail-rank", "1", "--exit-code", "3",
                       "--fail-after", "0.5", "--sleep", "60"});
  EXPECT_FALSE(r.timed_out);
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_LT(r.seconds, 10.0) << r.output;
  EXPECT_TRUE(contains(r.output, "rank 1 (local rank 1, pid ")) << r.output;
  EXPECT_TRUE(contains(r.output, "exited with code 3; stopping the other 2 workers")) << r.output;
  const auto workers = worker_pids(pids.path());
  EXPECT_EQ(workers.size(), 3u);
  expect_all_gone(workers);
}

TEST(LaunchFailure, WorkerKilledBySignalIsNamed) {
  TempDir pids;
  auto r = run_launch({"-n", "2", "--grace_period", "30", probe(), "--pid-dir", pids.path(),
                       "--wait-for-pids", "2", "--fail-rank", "0", "--signal", "SEGV",
                       "--fail-after", "0", "--sleep", "60"});
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_LT(r.seconds, 10.0) << r.output;
  EXPECT_TRUE(contains(r.output, "rank 0 (local rank 0, pid ")) << r.output;
  EXPECT_TRUE(contains(r.output, "killed by SIGSEGV")) << r.output;
  expect_all_gone(worker_pids(pids.path()));
}

TEST(LaunchFailure, WorkerIgnoringSigtermIsKilledAfterGracePeriod) {
  TempDir pids;
  auto r = run_launch({"-n", "3", "--grace_period", "1", probe(), "--pid-dir", pids.path(),
                       "--wait-for-pids", "3", "--ignore-sigterm", "--fail-rank", "2",
                       "--exit-code", "5", "--fail-after", "0", "--sleep", "60"});
  EXPECT_FALSE(r.timed_out);
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "exited with code 5")) << r.output;
  EXPECT_EQ(count_of(r.output, "sending SIGKILL"), 2u) << r.output;
  EXPECT_LT(r.seconds, 10.0) << r.output;
  const auto workers = worker_pids(pids.path());
  EXPECT_EQ(workers.size(), 3u);
  expect_all_gone(workers);
}

class LaunchSignal : public ::testing::TestWithParam<int> {};

TEST_P(LaunchSignal, SignalToLauncherStopsEveryWorker) {
  const int sig = GetParam();
  TempDir pids;
  auto launcher =
      ChildProcess::start(launch({"-n", "2", probe(), "--pid-dir", pids.path(), "--sleep", "60"}),
                          {}, kLaunchVariables);
  ASSERT_TRUE(wait_until([&] { return pid_file_count(pids.path()) == 2; }, kTimeout));
  const auto signalled = std::chrono::steady_clock::now();
  ASSERT_EQ(::kill(launcher.pid(), sig), 0);
  auto r = launcher.wait(std::chrono::seconds(10));
  EXPECT_FALSE(r.timed_out);
  EXPECT_EQ(r.exit_code, 128 + sig) << r.output;
  // The workers die of the forwarded SIGTERM, well before the 5 s grace period would end in
  // SIGKILL.
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - signalled).count(),
            3.0);
  EXPECT_TRUE(contains(r.output, std::string("received SIG") + ::sigabbrev_np(sig))) << r.output;
  expect_all_gone(worker_pids(pids.path()));
}

INSTANTIATE_TEST_SUITE_P(Signals, LaunchSignal, ::testing::Values(SIGTERM, SIGINT, SIGHUP),
                         [](const auto& info) { return std::string(::sigabbrev_np(info.param)); });

TEST(LaunchFailure, KilledLauncherTakesItsWorkersAlong) {
  TempDir pids;
  auto launcher =
      ChildProcess::start(launch({"-n", "2", probe(), "--pid-dir", pids.path(), "--sleep", "60"}),
                          {}, kLaunchVariables);
  ASSERT_TRUE(wait_until([&] { return pid_file_count(pids.path()) == 2; }, kTimeout));
  ASSERT_EQ(::kill(launcher.pid(), SIGKILL), 0);
  auto r = launcher.wait(std::chrono::seconds(10));
  EXPECT_EQ(r.term_signal, SIGKILL);
  for (pid_t pid : worker_pids(pids.path())) {
    EXPECT_TRUE(wait_until([&] { return !process_running(pid); }, std::chrono::seconds(5)))
        << "worker " << pid << " outlived its launcher";
  }
}

// ---------------------------------------------------------------- config file

// What Python Accelerate's `accelerate config` writes for a 3-process CPU job, keys it alone
// understands included: they must be accepted without a word.
std::string python_config(int port) {
  return "compute_environment: LOCAL_MACHINE\n"
         "debug: false\n"
         "distributed_type: MULTI_CPU\n"
         "downcast_bf16: 'no'\n"
         "enable_cpu_affinity: false\n"
         "machine_rank: 0\n"
         "main_process_ip: 127.0.0.1\n"
         "main_process_port: " +
         std::to_string(port) +
         "\n"
         "main_training_function: main\n"
         "mixed_precision: bf16\n"
         "num_machines: 1\n"
         "num_processes: 3\n"
         "rdzv_backend: static\n"
         "same_network: true\n"
         "tpu_env: []\n"
         "tpu_use_cluster: false\n"
         "tpu_use_sudo: false\n"
         "use_cpu: false\n";
}

std::filesystem::path write_file(const std::filesystem::path& path, const std::string& text) {
  std::filesystem::create_directories(path.parent_path());
  std::ofstream(path) << text;
  return path;
}

TEST(LaunchConfigFile, SuppliesEverySettingNoFlagGives) {
  TempDir dir;
  const int port = free_port();
  const auto config = write_file(dir.path() / "cpu.yaml", python_config(port));
  auto r = run_launch({"--config_file", config.string(), probe(), "--print-env"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_FALSE(contains(r.output, "warning")) << r.output;
  auto ranks = reports_by_rank(r.output);
  ASSERT_EQ(ranks.size(), 3u) << r.output;
  for (const auto& [rank, env] : ranks) {
    EXPECT_EQ(env.at("WORLD_SIZE"), "3") << "rank " << rank;
    EXPECT_EQ(env.at("ACCELERATE_MIXED_PRECISION"), "bf16") << "rank " << rank;
    // distributed_type MULTI_CPU means --cpu even though use_cpu says false.
    EXPECT_EQ(env.at("ACCELERATE_USE_CPU"), "true") << "rank " << rank;
    EXPECT_EQ(env.at("MASTER_PORT"), std::to_string(port)) << "rank " << rank;
    EXPECT_EQ(env.at("ACCELERATE_DEBUG_MODE"), "<unset>") << "rank " << rank;
  }
}

TEST(LaunchConfigFile, FlagsOverrideIt) {
  TempDir dir;
  const auto config = write_file(dir.path() / "cpu.yaml", python_config(free_port()));
  const std::string port = std::to_string(free_port());
  auto r = run_launch({"--config_file", config.string(), "-n", "2", "--mixed_precision", "fp16",
                       "--main_process_port", port, probe(), "--print-env"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto ranks = reports_by_rank(r.output);
  ASSERT_EQ(ranks.size(), 2u) << r.output;
  for (const auto& [rank, env] : ranks) {
    EXPECT_EQ(env.at("WORLD_SIZE"), "2") << "rank " << rank;
    EXPECT_EQ(env.at("ACCELERATE_MIXED_PRECISION"), "fp16") << "rank " << rank;
    EXPECT_EQ(env.at("MASTER_PORT"), port) << "rank " << rank;
    EXPECT_EQ(env.at("ACCELERATE_USE_CPU"), "true") << "rank " << rank;
  }
}

TEST(LaunchConfigFile, DebugShowsWhereEachSettingCameFrom) {
  TempDir dir;
  const auto config = write_file(dir.path() / "cpu.yaml", python_config(free_port()));
  for (const char* flag : {"--debug", "-v"}) {
    auto r = run_launch({"--config_file", config.string(), flag, "-n", "2", probe()});
    ASSERT_EQ(r.exit_code, 0) << r.output;
    const std::string from_file = " (config file " + config.string() + ")";
    for (const std::string& line :
         {"config_file = " + config.string() + " (flag)", std::string("num_processes = 2 (flag)"),
          "mixed_precision = bf16" + from_file, "cpu = true" + from_file,
          "distributed_type = MULTI_CPU" + from_file, std::string("debug = true (flag)"),
          std::string("gradient_accumulation_steps = (not set) (default)"),
          std::string("max_restarts = 0 (default)"),
          std::string("monitor_interval = 100 ms (default)")}) {
      EXPECT_TRUE(contains(r.output, "accelerate launch: " + line + "\n"))
          << flag << ": " << line << "\n"
          << r.output;
    }
  }
}

TEST(LaunchConfigFile, DefaultFileUnderHfHomeIsReadWithoutTheFlag) {
  TempDir hf_home;
  const auto default_config = write_file(hf_home.path() / "accelerate" / "default_config.yaml",
                                         "compute_environment: LOCAL_MACHINE\n"
                                         "distributed_type: MULTI_CPU\n"
                                         "mixed_precision: fp16\n"
                                         "num_processes: 2\n"
                                         "gpu_ids: 0,1\n");
  const std::map<std::string, std::string> env = {{"HF_HOME", hf_home.path().string()}};
  auto r = run_launch({"--debug", worker_path("restart_probe"), "--report"}, env);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "config_file = " + default_config.string() + " (default)"))
      << r.output;
  EXPECT_EQ(count_of(r.output, "restart RANK="), 2u) << r.output;
  EXPECT_EQ(count_of(r.output, " WORLD_SIZE=2 "), 2u) << r.output;
  EXPECT_EQ(count_of(r.output, " CUDA_VISIBLE_DEVICES=0,1 "), 2u) << r.output;
  EXPECT_EQ(count_of(r.output, " ACCELERATE_MIXED_PRECISION=fp16\n"), 2u) << r.output;

  // --config_file replaces the default file rather than adding to it.
  TempDir dir;
  const auto other = write_file(dir.path() / "one.yaml", "num_processes: 1\ngpu_ids: all\n");
  auto replaced =
      run_launch({"--config_file", other.string(), worker_path("restart_probe"), "--report"}, env);
  ASSERT_EQ(replaced.exit_code, 0) << replaced.output;
  EXPECT_EQ(count_of(replaced.output, "restart RANK="), 1u) << replaced.output;
  EXPECT_TRUE(contains(replaced.output, " CUDA_VISIBLE_DEVICES=<unset> ")) << replaced.output;
  EXPECT_TRUE(contains(replaced.output, " ACCELERATE_MIXED_PRECISION=<unset>\n"))
      << replaced.output;
}

TEST(LaunchConfigFile, BadValueIsRefusedWithOneLineAndStatus2) {
  TempDir dir;
  TempDir pids;
  for (const auto& [text, reason] : std::vector<std::pair<std::string, std::string>>{
           {"distributed_type: MULTI_CPU\nmixed_precision: fp8\n", "fp8"},
           {"distributed_type: MULTI_CPU\nnum_processes: 0\n", "num_processes"},
           {"distributed_type: XLA\n", "XLA"},
           // A multi-machine file refuses --max_restarts as the same flags would.
           {"distributed_type: MULTI_CPU\nnum_machines: 2\nmain_process_port: 29500\n",
            "elastic rendezvous"}}) {
    const auto config = write_file(dir.path() / "bad.yaml", text);
    auto r = run_launch({"--config_file", config.string(), "--max_restarts",
                         contains(text, "num_machines") ? "1" : "0", probe(), "--pid-dir",
                         pids.path().string()});
    EXPECT_EQ(r.exit_code, 2) << text << r.output;
    EXPECT_EQ(count_of(r.output, "\n"), 1u) << text << r.output;
    EXPECT_TRUE(contains(r.output, reason)) << text << r.output;
  }
  EXPECT_EQ(pid_file_count(pids.path()), 0u) << "a worker started";
}

// ---------------------------------------------------------------- command line

struct BadCommandLine {
  std::string name;
  std::vector<std::string> args;  // after `accelerate`
  std::string reason;             // part of the one-line message
};

// Keeps test listings readable: gtest would otherwise print the struct's bytes.
void PrintTo(const BadCommandLine& c, std::ostream* os) {
  *os << c.name;
}

class LaunchCommandLine : public ::testing::TestWithParam<BadCommandLine> {};

TEST_P(LaunchCommandLine, IsRefusedWithOneLineAndStatus2) {
  const auto& param = GetParam();
  TempDir pids;
  std::vector<std::string> argv = {cli_path()};
  for (const auto& a : param.args) {
    if (a == "PROBE") {
      // Had the launcher gone ahead, the probe would leave its pid behind.
      argv.insert(argv.end(), {probe(), "--pid-dir", pids.path()});
    } else {
      argv.push_back(a);
    }
  }
  auto r = run_command(argv, kTimeout, {}, kLaunchVariables);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  ASSERT_FALSE(r.output.empty());
  EXPECT_EQ(r.output.back(), '\n') << r.output;
  EXPECT_EQ(count_of(r.output, "\n"), 1u) << r.output;
  EXPECT_TRUE(contains(r.output, param.reason)) << r.output;
  EXPECT_EQ(pid_file_count(pids.path()), 0u) << "a worker started";
}

INSTANTIATE_TEST_SUITE_P(
    Refused, LaunchCommandLine,
    ::testing::Values(
        BadCommandLine{"UnknownFlag", {"launch", "--bogus", "PROBE"}, "--bogus"},
        BadCommandLine{
            "ZeroProcesses", {"launch", "--num_processes", "0", "PROBE"}, "--num_processes"},
        BadCommandLine{"NotANumber", {"launch", "-n", "two", "PROBE"}, "--num_processes"},
        BadCommandLine{
            "ZeroMachines", {"launch", "--num_machines", "0", "PROBE"}, "--num_machines"},
        BadCommandLine{"MachineRankOutOfRange",
                       {"launch", "--num_machines", "2", "--machine_rank", "2", "PROBE"},
                       "--machine_rank"},
        BadCommandLine{"BadMixedPrecision", {"launch", "--mixed_precision", "fp8", "PROBE"}, "fp8"},
        BadCommandLine{"ZeroAccumulationSteps",
                       {"launch", "--gradient_accumulation_steps", "0", "PROBE"},
                       "--gradient_accumulation_steps"},
        BadCommandLine{"PortOutOfRange",
                       {"launch", "--main_process_port", "65536", "PROBE"},
                       "--main_process_port"},
        BadCommandLine{"MissingProgram", {"launch", "-n", "2"}, "missing PROGRAM"},
        BadCommandLine{"NoSuchFile", {"launch", "/nonexistent/launch_probe"}, "/nonexistent"},
        BadCommandLine{
            "NotInPath", {"launch", "accelerate_no_such_program"}, "accelerate_no_such_program"},
        BadCommandLine{"UnknownCommand", {"lunch", "PROBE"}, "lunch"},
        BadCommandLine{"MissingConfigFile",
                       {"launch", "--config_file", "/nonexistent/accelerate.yaml", "PROBE"},
                       "/nonexistent/accelerate.yaml"},
        BadCommandLine{
            "NegativeMaxRestarts", {"launch", "--max_restarts", "-1", "PROBE"}, "--max_restarts"},
        BadCommandLine{"ZeroMonitorInterval",
                       {"launch", "--monitor_interval", "0", "PROBE"},
                       "--monitor_interval"},
        BadCommandLine{"NegativeMonitorInterval",
                       {"launch", "--monitor_interval", "-0.5", "PROBE"},
                       "--monitor_interval"},
        BadCommandLine{"RestartsAcrossMachines",
                       {"launch", "--num_machines", "2", "--max_restarts", "1", "PROBE"},
                       "elastic rendezvous"},
        BadCommandLine{"TeeWithoutLogDir", {"launch", "--tee", "PROBE"}, "--log_dir"},
        BadCommandLine{"UnknownRendezvous", {"launch", "--rdzv_backend", "etcd", "PROBE"}, "etcd"}),
    [](const auto& info) { return info.param.name; });

TEST(LaunchHelp, DocumentsEveryOptionWithItsDefault) {
  auto r = run_command({cli_path(), "launch", "-h"}, kTimeout);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  for (const char* option :
       {"--num_processes", "--cpu", "--mixed_precision", "--gradient_accumulation_steps",
        "--main_process_ip", "--main_process_port", "--num_machines", "--machine_rank", "--debug",
        "--rank_prefix", "--grace_period", "--config_file", "--gpu_ids", "--rdzv_backend",
        "--max_restarts", "--monitor_interval", "--log_dir", "--tee"}) {
    // An option's entry: its own line ("  -n,--num_processes INT  text" or "  --cpu  text"), and
    // the continuation line CLI11 adds when the name is long.
    const auto lines = split_lines(r.output);
    auto is_entry = [&](const std::string& line, const std::string& name) {
      return line.rfind("  " + name + " ", 0) == 0 ||
             (line.rfind("  -", 0) == 0 && contains(line, "," + name + " "));
    };
    auto it = std::find_if(lines.begin(), lines.end(),
                           [&](const std::string& line) { return is_entry(line, option); });
    ASSERT_NE(it, lines.end()) << option << "\n" << r.output;
    std::string entry = *it;
    if (std::next(it) != lines.end() && std::next(it)->rfind("   ", 0) == 0)
      entry += *std::next(it);
    EXPECT_TRUE(contains(entry, "(default")) << option << ": " << entry;
  }
  auto top = run_command({cli_path(), "-h"}, kTimeout);
  EXPECT_EQ(top.exit_code, 0) << top.output;
  EXPECT_TRUE(contains(top.output, "launch")) << top.output;
}

}  // namespace
