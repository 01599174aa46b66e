// Starts a set of worker processes and stays with them until they are all gone: forwards
// termination signals, stops the whole group when one worker fails (and starts it again, when
// restarts are allowed), and never leaves a zombie or an orphan behind. Knows nothing about ranks
// beyond the numbers it prints and the log files it names.
#pragma once

#include <chrono>
#include <functional>
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
  /// Time between SIGTERM and SIGKILL when the group is stopped.
  std::chrono::milliseconds grace_period{5000};
  /// Who speaks in our own messages, e.g. "accelerate launch".
  std::string name = "accelerate launch";
  /// How many times a failed group is stopped and started again before the failure is final.
  int max_restarts = 0;
  /// How often worker states are checked besides the SIGCHLD that reports each exit at once.
  std::chrono::milliseconds monitor_interval{100};
  /// When not empty, each worker's stdout and stderr are appended to `<log_dir>/rank_<R>.log`
  /// (the directory must exist), every attempt opening with a line "=== attempt N ===".
  std::string log_dir;
  /// With log_dir: also copy every line to our stdout/stderr, prefixed with "[rank R] ".
  bool tee = false;
  /// When not empty, the variable through which each worker learns where to write its failure
  /// record (src/detail/error_record.h): `<dir>/rank_<R>.json`, `<dir>` being a private
  /// temporary directory made for each attempt and removed after it. It replaces whatever value
  /// the worker's environment had (torchrun does the same with TORCHELASTIC_ERROR_FILE): the
  /// supervisor must know where every record is. See run_workers() for what the records decide.
  std::string error_file_variable;
};

/// Exit status of the supervisor when a worker failed.
inline constexpr int kWorkerFailedExitCode = 1;

/// The workers of one attempt; `restart_count` is 0 for the first attempt, 1 after one restart.
using WorkerFactory = std::function<std::vector<WorkerSpec>(int restart_count)>;

/// Starts the workers `make_workers` returns and waits for all of them. When one exits non-zero
/// or dies by a signal, the others are stopped (SIGTERM, SIGKILL after the grace period) and, up
/// to options.max_restarts times, the factory is asked for a fresh group that is started in its
/// place. Returns 0 when every worker of an attempt exits 0; kWorkerFailedExitCode when a failure
/// is final; 128 + N when signal N (SIGINT, SIGTERM or SIGHUP) asked us to stop, which never
/// restarts anything.
///
/// Once a failed attempt's workers are all gone, one line names its root cause: among the workers
/// that failed on their own (a non-zero exit, a signal other than the SIGTERM or SIGKILL with
/// which we stopped the group, or a failure record, however the worker ended), those whose record
/// does not say caused_by_peer (or who left no record) come first, and of those the earliest, by
/// the time in its record or else by when we saw it exit; when every failure was caused by a peer,
/// the earliest record. The failures of the others follow in the same line:
///   accelerate launch: root cause: rank 1 (local rank 1, pid 123) exited with code 3
///   (first failure; rank 0 failed after it: Connection closed by peer)
/// (one line), the root worker's own message after a colon when its record has one. An attempt
/// that is restarted gets that line only when its root cause is not the worker its exit line
/// named.
///
/// Example:
///   int status = run_workers(
///       [](int restart) {
///         return std::vector<WorkerSpec>{{.path = "/bin/sh",
///                                         .argv = {"sh", "-c", restart < 2 ? "exit 1" : "true"}}};
///       },
///       {.max_restarts = 3});  // 0, after two restarts
int run_workers(const WorkerFactory& make_workers, const SupervisorOptions& options);

/// The same workers for every attempt.
///
/// Example:
///   int status = run_workers({{.rank = 0, .path = "/bin/echo", .argv = {"echo", "hi"}}},
///                            {.grace_period = std::chrono::seconds(1)});
int run_workers(const std::vector<WorkerSpec>& workers, const SupervisorOptions& options);

}  // namespace accelerate::cli
