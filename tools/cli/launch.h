// `accelerate launch [options] PROGRAM [ARGS...]`: resolves the launch options and starts
// --num_processes copies of PROGRAM on this machine, each told its place in the job through the
// environment variables the library reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...). With
// --max_restarts it starts the whole group again when a worker fails.
#pragma once

#include "command.h"
#include "config_file.h"

#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace accelerate::cli {

/// Where a resolved launch setting came from: one precedence rule for every setting,
/// flag > config file > default.
enum class SettingSource { kDefault, kFlag, kConfigFile };

/// A config file that was read, and its path (for messages and --debug).
struct LaunchConfigFile {
  std::string path;
  ClusterConfig values;
};

/// What the user asked for on the command line. Unset fields are filled from the config file,
/// then from defaults, in resolve_launch_config().
struct LaunchOptions {
  std::optional<int> num_processes;
  /// A flag can only turn it on; off means "not given".
  bool cpu = false;
  std::optional<std::string> mixed_precision;
  std::optional<int> gradient_accumulation_steps;
  std::optional<std::string> main_process_ip;
  std::optional<int> main_process_port;
  std::optional<int> num_machines;
  std::optional<int> machine_rank;
  /// A flag can only turn it on; off means "not given".
  bool debug = false;
  bool rank_prefix = false;
  std::optional<double> grace_period_seconds;
  std::optional<std::string> config_file;
  std::optional<std::string> gpu_ids;
  std::optional<std::string> rdzv_backend;
  std::optional<int> max_restarts;
  std::optional<double> monitor_interval_seconds;
  std::optional<std::string> log_dir;
  bool tee = false;
  /// Flags can only turn them on; off means "not given".
  bool use_fsdp = false;
  bool use_deepspeed = false;
  /// The sharding plugins' flags that were given, by name without dashes
  /// ("fsdp_sharding_strategy", "zero_stage"; see sharding.h), as typed.
  std::map<std::string, std::string> sharding_flags;
  /// PROGRAM as typed; empty when missing.
  std::string program;
  /// Everything after PROGRAM, verbatim.
  std::vector<std::string> program_args;
};

/// LaunchOptions with the config file and defaults applied and everything validated. Immutable
/// once built.
struct LaunchConfig {
  int num_processes = 1;
  int num_machines = 1;
  int machine_rank = 0;
  bool cpu = false;
  std::optional<std::string> mixed_precision;
  std::optional<int> gradient_accumulation_steps;
  std::string main_process_ip;
  int main_process_port = 0;
  /// True when the launcher picked main_process_port; every restart then picks a fresh one,
  /// because the previous attempt's TCPStore port may still be in TIME_WAIT.
  bool port_chosen_automatically = false;
  bool debug = false;
  bool rank_prefix = false;
  std::chrono::milliseconds grace_period{0};
  /// CUDA_VISIBLE_DEVICES for the workers; unset means "all" (the variable is left alone).
  std::optional<std::string> gpu_ids;
  /// "static" or "c10d"; both mean the same here (see the -h footer).
  std::string rdzv_backend = "static";
  /// From the config file, informational only.
  std::optional<bool> same_network;
  /// From the config file ("NO", "MULTI_CPU", "MULTI_GPU", "FSDP", "DEEPSPEED"); FSDP and
  /// DEEPSPEED turn the plugin on, the others are informational only.
  std::optional<std::string> distributed_type;
  /// The sharding plugin (at most one): --use_fsdp / --use_deepspeed, or distributed_type.
  bool use_fsdp = false;
  bool use_deepspeed = false;
  /// The plugin's settings that have a value (flag, config file, or Python's default), by flag
  /// name, in canonical form (sharding.h); deepspeed_config_file is absolute here.
  std::map<std::string, std::string> sharding;
  int max_restarts = 0;
  std::chrono::milliseconds monitor_interval{100};
  /// Directory of the per-rank log files; unset means workers write to our stdout and stderr.
  std::optional<std::string> log_dir;
  bool tee = false;
  /// The config file that was read; empty when none.
  std::string config_file;
  /// Where each setting came from, by its option name without dashes ("num_processes").
  std::map<std::string, SettingSource> sources;
  /// Where PROGRAM was found (PATH searched when it has no '/').
  std::string program_path;
  /// argv for every worker: PROGRAM as typed, then its arguments.
  std::vector<std::string> program_argv;
  /// Thread-count variables the launcher sets because the user did not (NAME, VALUE).
  std::vector<std::pair<std::string, std::string>> thread_defaults;
  /// Allocator settings the launcher sets because the user set none (NAME, VALUE).
  std::vector<std::pair<std::string, std::string>> memory_defaults;
};

/// What differs from one attempt of the same launch to the next.
struct LaunchAttempt {
  /// 0 for the first attempt, 1 after the first restart, ...
  int restart_count = 0;
  int main_process_port = 0;
};

/// The config file to read: --config_file when given (a missing file is a UsageError), else
/// default_config_path(environment) when that file exists, else none. load_config_file's
/// warnings are appended to `warnings`.
std::optional<LaunchConfigFile> read_launch_config_file(
    const LaunchOptions& options, const std::map<std::string, std::string>& environment,
    std::vector<std::string>* warnings);

/// Applies the config file, then defaults, and validates; throws UsageError with a one-line
/// reason that names the flag, or the key and the file.
///
/// Example:
///   LaunchConfig config = resolve_launch_config({.num_processes = 2, .program = "true"});
LaunchConfig resolve_launch_config(const LaunchOptions& options,
                                   const std::optional<LaunchConfigFile>& file = std::nullopt);

/// The executable `program` names: itself when it contains '/', else the first match in $PATH.
/// Throws UsageError when there is none or it is not an executable file.
std::string resolve_program(const std::string& program);

/// The environment of the worker with `local_rank` in `attempt`: `base` (NAME=VALUE entries) with
/// the distributed variables added or replaced.
std::vector<std::string> worker_environment(const LaunchConfig& config,
                                            const LaunchAttempt& attempt, int local_rank,
                                            const std::vector<std::string>& base);

/// The variables the sharding plugin gives every worker (NAME, VALUE), in sharding.h's order:
/// ACCELERATE_USE_FSDP=true and FSDP_*, or ACCELERATE_USE_DEEPSPEED=true and
/// ACCELERATE_DEEPSPEED_* / ACCELERATE_GRADIENT_CLIPPING; none without a plugin.
std::vector<std::pair<std::string, std::string>> sharding_environment(const LaunchConfig& config);

/// One line per resolved value and where it came from ("num_processes = 2 (flag)"), for --debug.
std::vector<std::string> describe_launch_config(const LaunchConfig& config);

std::unique_ptr<Command> make_launch_command();

}  // namespace accelerate::cli
