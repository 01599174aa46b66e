// `accelerate launch` naming the root cause of a failed job: the worker that failed first, not the
// one the launcher happened to reap first. The workers are root_cause_worker
// (tests/launch/workers/root_cause_worker.cpp), whose ranks fail in a known order, and
// launch_probe. The machine is kept busy during the runs that matter, since that is when the
// order of reaping stops following the order of failing.

#include <gtest/gtest.h>

#include "launch_util.h"

#include <filesystem>
#include <map>
#include <regex>
#include <string>
#include <vector>

namespace {

using accelerate::testing::ChildProcess;
using accelerate::testing::cli_path;
using accelerate::testing::contains;
using accelerate::testing::kLaunchVariables;
using accelerate::testing::run_command;
using accelerate::testing::RunResult;
using accelerate::testing::split_lines;
using accelerate::testing::worker_path;

constexpr auto kTimeout = std::chrono::seconds(60);
constexpr const char* kRootCausePrefix = "accelerate launch: root cause: ";

RunResult run_launch(std::vector<std::string> args,
                     const std::map<std::string, std::string>& env = {}) {
  args.insert(args.begin(), {cli_path(), "launch"});
  return run_command(args, kTimeout, env, kLaunchVariables);
}

// The root-cause lines of a launcher's output (one per failed attempt).
std::vector<std::string> root_cause_lines(const std::string& output) {
  std::vector<std::string> lines;
  for (const auto& line : split_lines(output)) {
    if (line.rfind(kRootCausePrefix, 0) == 0) lines.push_back(line);
  }
  return lines;
}

// Processes that keep every core busy while they live: on a loaded machine the launcher may see
// the exits of a job's workers in any order.
class BusyMachine {
 public:
  explicit BusyMachine(int processes) {
    for (int i = 0; i < processes; ++i) {
      spinners_.push_back(ChildProcess::start({"/bin/sh", "-c", "while :; do :; done"}));
    }
  }
  // ChildProcess kills and reaps each spinner when it goes.

 private:
  std::vector<ChildProcess> spinners_;
};

// Rank 1 exits with code 3 while rank 0 waits for it in wait_for_everyone(); rank 0 then fails
// too ("Connection closed by peer"), and on a busy machine the launcher used to reap it first and
// name it. Three runs, each of which must name rank 1.
TEST(LaunchRootCause, PeerThatExitedFirstIsNamedOnABusyMachine) {
  const std::regex expected(
      R"(accelerate launch: root cause: rank 1 \(local rank 1, pid \d+\) exited with code 3 )"
      R"(\(first failure; rank 0 failed after it: accelerate: collective 'wait_for_everyone' )"
      R"(\(call #\d+\) failed on process 0 of 2: process 1 closed its connection or failed .*\))");
  BusyMachine busy(2);
  for (int run = 1; run <= 3; ++run) {
    auto r = run_launch({"-n", "2", worker_path("root_cause_worker")});
    ASSERT_FALSE(r.timed_out) << "run " << run << "\n" << r.output;
    EXPECT_EQ(r.exit_code, 1) << "run " << run << "\n" << r.output;
    const auto lines = root_cause_lines(r.output);
    ASSERT_EQ(lines.size(), 1u) << "run " << run << "\n" << r.output;
    EXPECT_TRUE(std::regex_match(lines[0], expected)) << "run " << run << ": " << lines[0];
  }
}

// With restarts, each attempt's failure is judged on its own; an attempt that is started again
// gets a root-cause line when its exit line named the wrong worker, the last one always.
TEST(LaunchRootCause, EveryAttemptIsJudgedOnItsOwn) {
  auto r = run_launch({"-n", "2", "--max_restarts", "1", worker_path("root_cause_worker")});
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "(restart 1 of 1)")) << r.output;
  const auto lines = root_cause_lines(r.output);
  ASSERT_GE(lines.size(), 1u) << r.output;
  ASSERT_LE(lines.size(), 2u) << r.output;
  for (const auto& line : lines) {
    EXPECT_TRUE(contains(line, "root cause: rank 1 (local rank 1, pid ")) << line;
    EXPECT_TRUE(contains(line, ") exited with code 3 (first failure; rank 0 failed after it: "))
        << line;
  }
}

// Both ranks fail on their own account: rank 1 records its failure first, rank 0 records its
// own later but exits first, so the launcher sees rank 0 go first. The records decide.
TEST(LaunchRootCause, EarliestOfTwoFailuresOnTheirOwnWins) {
  BusyMachine busy(2);
  auto r = run_launch({"-n", "2", worker_path("root_cause_worker"), "--both"});
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(std::regex_search(
      r.output, std::regex(R"(rank 0 \(local rank 0, pid \d+\) exited with code 4; stopping)")))
      << r.output;
  const auto lines = root_cause_lines(r.output);
  ASSERT_EQ(lines.size(), 1u) << r.output;
  EXPECT_TRUE(std::regex_match(
      lines[0],
      std::regex(R"(accelerate launch: root cause: rank 1 \(local rank 1, pid \d+\) exited with )"
                 R"(code 3: rank 1: input file is corrupt \(first failure; rank 0 failed after )"
                 R"(it: rank 0: checkpoint is missing\))")))
      << lines[0];
}

// Without records (launch_probe writes none), the failure the launcher saw is the root cause; the
// workers that died of its SIGTERM are not failures.
TEST(LaunchRootCause, WithoutRecordsTheWorkerThatFailedIsNamed) {
  auto r = run_launch({"-n", "3", worker_path("launch_probe"), "--fail-rank", "2", "--exit-code",
                       "5", "--fail-after", "0.2", "--sleep", "60"});
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 1) << r.output;
  const auto lines = root_cause_lines(r.output);
  ASSERT_EQ(lines.size(), 1u) << r.output;
  EXPECT_TRUE(std::regex_match(
      lines[0], std::regex(R"(accelerate launch: root cause: rank 2 \(local rank 2, pid \d+\) )"
                           R"(exited with code 5)")))
      << lines[0];
}

TEST(LaunchRootCause, NoLineWhenEveryWorkerSucceeds) {
  auto r = run_launch({"-n", "2", "true"});
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(root_cause_lines(r.output).empty()) << r.output;
}

// Every worker gets its own record file, in a private directory made for each attempt and gone
// afterwards; a value the user set is replaced, as torchrun replaces TORCHELASTIC_ERROR_FILE.
TEST(LaunchRootCause, EachAttemptGetsAPrivateDirectoryOfErrorFiles) {
  // Each worker reports its file and leaves a mark beside it; all fail once both are there, so
  // that neither is stopped before it reported.
  const std::string script =
      "d=$(dirname \"$ACCELERATE_ERROR_FILE\"); "
      "echo \"errorfile $ACCELERATE_RESTART_COUNT $RANK $ACCELERATE_ERROR_FILE $(stat -c %a "
      "\"$d\")\"; "
      "touch \"$d/seen_$RANK\"; "
      "while [ \"$(ls \"$d\" | wc -l)\" -lt 2 ]; do sleep 0.01; done; exit 1";
  auto r = run_launch({"-n", "2", "--max_restarts", "1", "/bin/sh", "-c", script},
                      {{"ACCELERATE_ERROR_FILE", "/nonexistent/mine.json"}});
  EXPECT_EQ(r.exit_code, 1) << r.output;
  // attempt -> rank -> (file, mode of its directory)
  std::map<std::string, std::map<std::string, std::pair<std::string, std::string>>> seen;
  const std::regex line_re(R"(errorfile (\d) (\d) (\S+) (\d+))");
  for (const auto& line : split_lines(r.output)) {
    std::smatch m;
    if (std::regex_match(line, m, line_re)) seen[m[1]][m[2]] = {m[3], m[4]};
  }
  ASSERT_EQ(seen.size(), 2u) << r.output;
  std::vector<std::filesystem::path> dirs;
  for (const auto& [attempt, ranks] : seen) {
    ASSERT_EQ(ranks.size(), 2u) << r.output;
    const std::filesystem::path file0(ranks.at("0").first);
    const std::filesystem::path file1(ranks.at("1").first);
    EXPECT_EQ(file0.filename(), "rank_0.json");
    EXPECT_EQ(file1.filename(), "rank_1.json");
    EXPECT_EQ(file0.parent_path(), file1.parent_path());
    EXPECT_EQ(ranks.at("0").second, "700") << "the directory must be private";
    dirs.push_back(file0.parent_path());
  }
  EXPECT_NE(dirs[0], dirs[1]) << "each attempt gets a fresh directory";
  for (const auto& dir : dirs) {
    EXPECT_FALSE(std::filesystem::exists(dir)) << dir << " outlived the launch";
  }
  // The final failure gets its root-cause line; the retried one does not, since its exit line
  // already named the worker that failed first.
  EXPECT_EQ(root_cause_lines(r.output).size(), 1u) << r.output;
  EXPECT_TRUE(contains(r.output, "restarting all 2 workers (restart 1 of 1)")) << r.output;
}

}  // namespace
