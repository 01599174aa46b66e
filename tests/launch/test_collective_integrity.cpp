// Collectives that do not pair up, tried as a hostile user would, 2 processes on Gloo through
// `accelerate launch`: every process ends with an error naming the operation (and both shapes),
// never a wrong result, a crash or a hang, and the group keeps working afterwards.

#include "launch_util.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace {

using accelerate::testing::cli_path;
using accelerate::testing::contains;
using accelerate::testing::kLaunchVariables;
using accelerate::testing::run_command;
using accelerate::testing::RunResult;
using accelerate::testing::worker_path;

constexpr auto kTimeout = std::chrono::seconds(60);

RunResult launch(const std::string& mode, bool debug = false) {
  std::vector<std::string> argv{cli_path(), "launch", "-n", "2"};
  if (debug) argv.emplace_back("--debug");
  argv.push_back(worker_path("integrity_worker"));
  argv.push_back(mode);
  return run_command(argv, kTimeout, {}, kLaunchVariables);
}

// The error both processes must print, line by line, and the proof that the group still works.
void expect_on_both(const RunResult& r, const std::string& first_op,
                    const std::vector<std::string>& calls) {
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.term_signal, 0) << r.output;
  for (int rank = 0; rank < 2; ++rank) {
    const std::string op =
        rank == 0                                                                    ? first_op
        : calls.size() > 1 && first_op == "reduce" && contains(calls[1], "'gather'") ? "gather"
                                                                                     : first_op;
    EXPECT_TRUE(contains(r.output, "ERROR rank " + std::to_string(rank) +
                                       ": accelerate: collective '" + op +
                                       "' (call #1 of this process group) does not match across "
                                       "processes:\n"))
        << r.output;
    EXPECT_TRUE(contains(r.output, "AFTER rank " + std::to_string(rank) + ": OK")) << r.output;
  }
  for (size_t i = 0; i < calls.size(); ++i) {
    const std::string line = "  process " + std::to_string(i) + ": call #1 " + calls[i] + "\n";
    // Once in each process's message.
    const auto first = r.output.find(line);
    ASSERT_NE(first, std::string::npos) << line << r.output;
    EXPECT_NE(r.output.find(line, first + 1), std::string::npos) << line << r.output;
  }
}

TEST(CollectiveIntegrity, AllReduceOfDifferentShapesFailsOnBothNamingBothShapes) {
  expect_on_both(launch("shapes"), "reduce",
                 {"'reduce' (all-reduce, sum) of shape [2] Float",
                  "'reduce' (all-reduce, sum) of shape [3] Float"});
}

TEST(CollectiveIntegrity, SkippedCallIsReportedAtTheCallThatLostItsPartner) {
  for (bool debug : {false, true}) {
    SCOPED_TRACE(debug ? "debug mode" : "no debug mode");
    // Debug mode compares whole structures before each operation on containers: the skipped
    // call shows there, as each side's structure check.
    expect_on_both(launch("skip", debug), "reduce",
                   debug ? std::vector<std::string>{"'reduce' (debug-mode structure check)",
                                                    "'gather' (debug-mode structure check)"}
                         : std::vector<std::string>{"'reduce' (all-reduce, sum) of shape [2] Float",
                                                    "'gather' (all-gather) of shape [2] Float"});
  }
}

TEST(CollectiveIntegrity, MismatchedGatherAndBroadcastAreErrorsNotAborts) {
  expect_on_both(
      launch("gather"), "gather",
      {"'gather' (all-gather) of shape [2] Float", "'gather' (all-gather) of shape [3] Float"});
  expect_on_both(launch("broadcast"), "broadcast",
                 {"'broadcast' (broadcast from process 0) of shape [2] Float",
                  "'broadcast' (broadcast from process 0) of shape [3] Float"});
  expect_on_both(launch("roots"), "broadcast",
                 {"'broadcast' (broadcast from process 0) of shape [2] Float",
                  "'broadcast' (broadcast from process 1) of shape [2] Float"});
}

TEST(CollectiveIntegrity, ARankThatNeverArrivesIsNamedByTheTimeoutAndTheLauncher) {
  const auto r = launch("absent");
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_NE(r.exit_code, 0) << r.output;
  const std::string error =
      "accelerate: collective 'reduce' (call #1) failed on process 0 of 2: timed out after 2 s: "
      "process 1 did not arrive (no sign of it: exited, stuck outside collectives, or slower than "
      "the timeout)";
  // Rank 0's own error, and the launcher's root-cause line repeating it.
  const auto first = r.output.find(error);
  ASSERT_NE(first, std::string::npos) << r.output;
  EXPECT_TRUE(contains(r.output, "root cause: rank 0")) << r.output;
  EXPECT_NE(r.output.find(error, first + 1), std::string::npos) << r.output;
  // Well before rank 1's 20 s sleep ends.
  EXPECT_LT(r.seconds, 15.0) << r.output;
}

}  // namespace
