// Starts a set of worker processes and stays with them until they are all gone: forwards
// termination signals, stops the whole job when one worker fails, and never leaves a zombie or an
// orphan behind. Knows nothing about ranks beyond the numbers it prints.
#pragma once

#include <chrono>
#include <string>
#include <vector>

namespace accelerate::cli {

/// One process to start.
struct WorkerSpec {
  int rank = 0;
  int local_rank = 0;
  /// Executable to exec (already resolved; no PATH search happens here).
  std::string path;
  /// argv, argv[0] included.
  std::vector<std::string> argv;
  /// Complete environment, NAME=VALUE entries.
  std::vector<std::string> env;
};

struct SupervisorOptions {
  /// Prefix every line a worker writes with "[rank R] ". Workers then write into pipes the
  /// supervisor reads; otherwise they inherit its stdout and stderr untouched.
  bool rank_prefix = false;
  /// Time between SIGTERM and SIGKILL when the job is stopped.
  std::chrono::milliseconds grace_period{5000};
  /// Who speaks in our own messages, e.g. "accelerate launch".
  std::string name = "accelerate launch";
};

/// Exit status of the supervisor when a worker failed.
inline constexpr int kWorkerFailedExitCode = 1;

/// Starts every worker and waits for all of them. Returns 0 when all exit 0;
/// kWorkerFailedExitCode when one exits non-zero or dies by a signal (the others are then stopped);
/// 128 + N when signal N (SIGINT, SIGTERM or SIGHUP) asked us to stop.
///
/// Example:
///   int status = run_workers({{.rank = 0, .path = "/bin/echo", .argv = {"echo", "hi"}}},
///                            {.grace_period = std::chrono::seconds(1)});
int run_workers(const std::vector<WorkerSpec>& workers, const SupervisorOptions& options);

}  // namespace accelerate::cli
