// `accelerate launch --max_restarts` and `--log_dir`: a failed group is stopped and started again
// with ACCELERATE_RESTART_COUNT raised, a signal to the launcher never restarts anything, and each
// rank's output lands in its own log file. The worker is restart_probe
// (tests/launch/workers/restart_probe.cpp), which starts in milliseconds.

#include <gtest/gtest.h>

#include "launch_util.h"

#include <signal.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

using accelerate::testing::ChildProcess;
using accelerate::testing::cli_path;
using accelerate::testing::contains;
using accelerate::testing::count_of;
using accelerate::testing::free_port;
using accelerate::testing::key_value_lines;
using accelerate::testing::kLaunchVariables;
using accelerate::testing::read_text_file;
using accelerate::testing::run_command;
using accelerate::testing::RunResult;
using accelerate::testing::split_lines;
using accelerate::testing::TempDir;
using accelerate::testing::wait_until;
using accelerate::testing::worker_path;

constexpr auto kTimeout = std::chrono::seconds(30);

std::vector<std::string> launch(const std::vector<std::string>& options,
                                const std::vector<std::string>& probe_args) {
  std::vector<std::string> argv = {cli_path(), "launch"};
  argv.insert(argv.end(), options.begin(), options.end());
  argv.push_back(worker_path("restart_probe"));
  argv.insert(argv.end(), probe_args.begin(), probe_args.end());
  return argv;
}

// Runs the launch to its end. The probes meet at a barrier first, so that no rank is stopped by
// another's failure before it has reported.
RunResult run_launch(const std::vector<std::string>& options, std::vector<std::string> probe_args) {
  const TempDir barrier;
  probe_args.insert(probe_args.end(), {"--barrier", barrier.path().string()});
  return run_command(launch(options, probe_args), kTimeout, {}, kLaunchVariables);
}

ChildProcess start_launch(const std::vector<std::string>& options,
                          const std::vector<std::string>& probe_args) {
  return ChildProcess::start(launch(options, probe_args), {}, kLaunchVariables);
}

// The pid restart_probe wrote for (restart, rank), or 0 while there is none.
pid_t probe_pid(const std::filesystem::path& dir, int restart, int rank) {
  const std::string text =
      read_text_file(dir / (std::to_string(restart) + "_" + std::to_string(rank) + ".pid"));
  return text.empty() ? 0 : static_cast<pid_t>(std::stol(text));
}

std::size_t pid_file_count(const std::filesystem::path& dir) {
  std::size_t n = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    n += entry.path().extension() == ".pid" ? 1 : 0;
  }
  return n;
}

bool gone(pid_t pid) {
  errno = 0;
  return ::kill(pid, 0) == -1 && errno == ESRCH;
}

// ---------------------------------------------------------------- restarts

TEST(RestartOnFailure, GroupRecoversWithinMaxRestarts) {
  auto r = run_launch({"-n", "2", "--max_restarts", "3"},
                      {"--report", "--fail-rank", "1", "--fail-until", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(count_of(r.output, "restarting all 2 workers"), 2u) << r.output;
  EXPECT_EQ(count_of(r.output, "rank 1 (local rank 1, pid "), 2u) << r.output;
  EXPECT_TRUE(contains(r.output, "exited with code 3; restarting all 2 workers (restart 1 of 3)\n"))
      << r.output;
  EXPECT_TRUE(contains(r.output, "exited with code 3; restarting all 2 workers (restart 2 of 3)\n"))
      << r.output;
  // Every rank ran in every attempt and saw its restart count under both names.
  std::set<std::pair<std::string, std::string>> seen;  // (rank, restart count)
  std::map<std::string, std::set<std::string>> ports;  // restart count -> MASTER_PORTs
  for (const auto& report : key_value_lines(r.output, "restart ")) {
    EXPECT_EQ(report.at("TORCHELASTIC_RESTART_COUNT"), report.at("ACCELERATE_RESTART_COUNT"));
    EXPECT_EQ(report.at("TORCHELASTIC_MAX_RESTARTS"), "3");
    seen.emplace(report.at("RANK"), report.at("ACCELERATE_RESTART_COUNT"));
    ports[report.at("ACCELERATE_RESTART_COUNT")].insert(report.at("MASTER_PORT"));
  }
  const std::set<std::pair<std::string, std::string>> expected = {
      {"0", "0"}, {"1", "0"}, {"0", "1"}, {"1", "1"}, {"0", "2"}, {"1", "2"}};
  EXPECT_EQ(seen, expected) << r.output;
  // One port per attempt, shared by its ranks; a fresh one each time because the launcher chose
  // it (the previous attempt's store may still hold the old one).
  ASSERT_EQ(ports.size(), 3u) << r.output;
  std::set<std::string> distinct;
  for (const auto& [restart, in_attempt] : ports) {
    EXPECT_EQ(in_attempt.size(), 1u) << "attempt " << restart << "\n" << r.output;
    distinct.insert(*in_attempt.begin());
  }
  EXPECT_EQ(distinct.size(), 3u) << r.output;
}

TEST(RestartOnFailure, FailsOnceRestartsAreExhausted) {
  auto r = run_launch({"-n", "2", "--max_restarts", "1"},
                      {"--report", "--fail-rank", "1", "--fail-until", "2"});
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_EQ(count_of(r.output, "restarting all 2 workers"), 1u) << r.output;
  EXPECT_TRUE(contains(r.output, "(restart 1 of 1)")) << r.output;
  EXPECT_TRUE(contains(r.output, "no restarts left (--max_restarts 1)")) << r.output;
  EXPECT_EQ(count_of(r.output, "restart RANK=1 "), 2u) << r.output;
}

TEST(RestartOnFailure, NoRestartsByDefault) {
  auto r = run_launch({"-n", "2"}, {"--report", "--fail-rank", "0", "--fail-until", "1"});
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_FALSE(contains(r.output, "restarting")) << r.output;
  EXPECT_EQ(count_of(r.output, "ACCELERATE_RESTART_COUNT=0 "), 2u) << r.output;
  EXPECT_EQ(count_of(r.output, "TORCHELASTIC_MAX_RESTARTS=0 "), 2u) << r.output;
}

TEST(RestartOnFailure, UserGivenPortIsKeptAcrossRestarts) {
  const std::string port = std::to_string(free_port());
  auto r = run_launch({"-n", "2", "--max_restarts", "2", "--main_process_port", port},
                      {"--report", "--fail-rank", "0", "--fail-until", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto all = key_value_lines(r.output, "restart ");
  EXPECT_EQ(all.size(), 6u) << r.output;
  for (const auto& report : all) EXPECT_EQ(report.at("MASTER_PORT"), port) << r.output;
}

TEST(RestartOnFailure, WorkerKilledMidRunIsRestarted) {
  TempDir pids;
  // Attempt 0 sleeps until the test kills rank 1; attempt 1 finishes at once.
  auto launcher = start_launch(
      {"-n", "2", "--max_restarts", "2", "--grace_period", "30"},
      {"--report", "--pid-dir", pids.path().string(), "--sleep", "60", "--sleep-until", "1"});
  ASSERT_TRUE(wait_until([&] { return pid_file_count(pids.path()) == 2; }, kTimeout));
  const pid_t survivor = probe_pid(pids.path(), 0, 0);
  ASSERT_EQ(::kill(probe_pid(pids.path(), 0, 1), SIGKILL), 0);
  auto r = launcher.wait(kTimeout);
  EXPECT_FALSE(r.timed_out);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output,
                       "was killed by SIGKILL (Killed); restarting all 2 workers (restart 1 of 2)"))
      << r.output;
  EXPECT_EQ(count_of(r.output, "restarting all"), 1u) << r.output;
  EXPECT_EQ(count_of(r.output, "ACCELERATE_RESTART_COUNT=1 "), 2u) << r.output;
  // The other rank of the failed attempt went on SIGTERM, well before the 30 s grace period.
  EXPECT_LT(r.seconds, 10.0) << r.output;
  EXPECT_TRUE(gone(survivor)) << "rank 0 of attempt 0 is still there";
}

TEST(RestartOnFailure, SignalToLauncherStopsWithoutRestarting) {
  TempDir pids;
  auto launcher = start_launch({"-n", "2", "--max_restarts", "3"},
                               {"--pid-dir", pids.path().string(), "--sleep", "60"});
  ASSERT_TRUE(wait_until([&] { return pid_file_count(pids.path()) == 2; }, kTimeout));
  ASSERT_EQ(::kill(launcher.pid(), SIGTERM), 0);
  auto r = launcher.wait(std::chrono::seconds(10));
  EXPECT_FALSE(r.timed_out);
  EXPECT_EQ(r.exit_code, 128 + SIGTERM) << r.output;
  EXPECT_TRUE(contains(r.output, "received SIGTERM; stopping 2 workers")) << r.output;
  EXPECT_FALSE(contains(r.output, "restarting")) << r.output;
  EXPECT_EQ(pid_file_count(pids.path()), 2u) << "a second attempt started";
  for (int rank = 0; rank < 2; ++rank) {
    EXPECT_TRUE(gone(probe_pid(pids.path(), 0, rank))) << "rank " << rank << " is still there";
  }
}

// ---------------------------------------------------------------- log files

// What rank `rank` writes in attempt `restart`, in the order it writes it.
std::string attempt_output(int rank, int restart, int lines) {
  std::string text;
  for (int i = 0; i < lines; ++i) {
    const std::string tail = " rank " + std::to_string(rank) + " attempt " +
                             std::to_string(restart) + " line " + std::to_string(i) + "\n";
    text += "out" + tail + "err" + tail;
  }
  return text;
}

TEST(RestartLogs, EachRankWritesItsOwnFileWithAttemptHeaders) {
  TempDir dir;
  const auto logs = dir.path() / "logs";  // created by the launcher
  auto r = run_launch({"-n", "2", "--max_restarts", "1", "--log_dir", logs.string()},
                      {"--lines", "3", "--fail-rank", "1", "--fail-until", "1"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // The console has the launcher's own lines only.
  EXPECT_FALSE(contains(r.output, " attempt 0 line")) << r.output;
  EXPECT_TRUE(contains(r.output, "restarting all 2 workers (restart 1 of 1)")) << r.output;
  for (int rank = 0; rank < 2; ++rank) {
    // stdout and stderr share the file and keep the order the worker wrote them in.
    EXPECT_EQ(read_text_file(logs / ("rank_" + std::to_string(rank) + ".log")),
              "=== attempt 1 ===\n" + attempt_output(rank, 0, 3) + "=== attempt 2 ===\n" +
                  attempt_output(rank, 1, 3))
        << "rank " << rank;
  }
  // A second launch appends rather than overwriting.
  auto again = run_launch({"-n", "1", "--log_dir", logs.string()}, {"--lines", "1"});
  ASSERT_EQ(again.exit_code, 0) << again.output;
  EXPECT_EQ(read_text_file(logs / "rank_0.log"),
            "=== attempt 1 ===\n" + attempt_output(0, 0, 3) + "=== attempt 2 ===\n" +
                attempt_output(0, 1, 3) + "=== attempt 1 ===\n" + attempt_output(0, 0, 1));
}

TEST(RestartLogs, TeeAlsoWritesPrefixedLinesToTheConsole) {
  TempDir dir;
  constexpr int kLines = 5;
  auto r = run_launch({"-n", "2", "--max_restarts", "1", "--log_dir", dir.path().string(), "--tee"},
                      {"--lines", std::to_string(kLines), "--fail-rank", "0", "--fail-until", "1"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (int rank = 0; rank < 2; ++rank) {
    const std::string prefix = "[rank " + std::to_string(rank) + "] ";
    const auto file =
        split_lines(read_text_file(dir.path() / ("rank_" + std::to_string(rank) + ".log")));
    // Two pipes feed the file, so a stdout line and a stderr line may swap; each attempt's lines
    // are all there, after its header.
    const auto second = std::find(file.begin(), file.end(), "=== attempt 2 ===");
    ASSERT_FALSE(file.empty());
    EXPECT_EQ(file.front(), "=== attempt 1 ===");
    ASSERT_NE(second, file.end()) << rank;
    for (int restart = 0; restart < 2; ++restart) {
      std::multiset<std::string> got(restart == 0 ? file.begin() + 1 : second + 1,
                                     restart == 0 ? second : file.end());
      std::multiset<std::string> want;
      for (const auto& line : split_lines(attempt_output(rank, restart, kLines))) {
        want.insert(line);
        EXPECT_TRUE(contains(r.output, prefix + line + "\n")) << line << "\n" << r.output;
      }
      EXPECT_EQ(got, want) << "rank " << rank << " attempt " << restart;
    }
  }
  // Every worker line on the console carries its prefix.
  for (const auto& line : split_lines(r.output)) {
    if (contains(line, " line ")) {
      EXPECT_TRUE(line.rfind("[rank ", 0) == 0) << line;
    }
  }
  EXPECT_EQ(count_of(r.output, "[rank "), 2u * 2u * 2u * kLines) << r.output;
}

}  // namespace
