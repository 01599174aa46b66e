// `accelerate launch [options] PROGRAM [ARGS...]`: resolves the launch options and starts
// --num_processes copies of PROGRAM on this machine, each told its place in the job through the
// environment variables the library reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...).
#pragma once

#include "command.h"

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace accelerate::cli {

/// What the user asked for. Unset fields take their defaults in resolve_launch_config(), which is
/// where a config file will slot in (explicit > config file > default).
struct LaunchOptions {
  std::optional<int> num_processes;
  bool cpu = false;
  std::optional<std::string> mixed_precision;
  std::optional<int> gradient_accumulation_steps;
  std::optional<std::string> main_process_ip;
  std::optional<int> main_process_port;
  std::optional<int> num_machines;
  std::optional<int> machine_rank;
  bool debug = false;
  bool rank_prefix = false;
  std::optional<double> grace_period_seconds;
  /// PROGRAM as typed; empty when missing.
  std::string program;
  /// Everything after PROGRAM, verbatim.
  std::vector<std::string> program_args;
};

/// LaunchOptions with defaults applied and everything validated. Immutable once built.
struct LaunchConfig {
  int num_processes = 1;
  int num_machines = 1;
  int machine_rank = 0;
  bool cpu = false;
  std::optional<std::string> mixed_precision;
  std::optional<int> gradient_accumulation_steps;
  std::string main_process_ip;
  int main_process_port = 0;
  bool debug = false;
  bool rank_prefix = false;
  std::chrono::milliseconds grace_period{0};
  /// Where PROGRAM was found (PATH searched when it has no '/').
  std::string program_path;
  /// argv for every worker: PROGRAM as typed, then its arguments.
  std::vector<std::string> program_argv;
  /// Thread-count variables the launcher sets because the user did not (NAME, VALUE).
  std::vector<std::pair<std::string, std::string>> thread_defaults;
  /// Allocator settings the launcher sets because the user set none (NAME, VALUE).
  std::vector<std::pair<std::string, std::string>> memory_defaults;
};

/// Applies defaults and validates; throws UsageError with a one-line reason.
LaunchConfig resolve_launch_config(const LaunchOptions& options);

/// The executable `program` names: itself when it contains '/', else the first match in $PATH.
/// Throws UsageError when there is none or it is not an executable file.
std::string resolve_program(const std::string& program);

/// The environment of the worker with `local_rank`: `base` (NAME=VALUE entries) with the
/// distributed variables added or replaced.
std::vector<std::string> worker_environment(const LaunchConfig& config, int local_rank,
                                            const std::vector<std::string>& base);

/// One line per resolved value and where it came from, for --debug.
std::vector<std::string> describe_launch_config(const LaunchConfig& config,
                                                const LaunchOptions& options);

std::unique_ptr<Command> make_launch_command();

}  // namespace accelerate::cli
