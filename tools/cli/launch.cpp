#include "launch.h"

#include "precedence.h"
#include "sharding.h"
#include "supervisor.h"

#include <accelerate/env_names.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <map>
#include <sstream>
#include <thread>
#include <type_traits>

extern char** environ;

namespace accelerate::cli {
namespace {

// With several machines every launcher must agree on the port without talking to each other
// first, so it is a fixed, well-known one (the same as torchrun's and Python Accelerate's).
constexpr int kMultiMachineDefaultPort = 29500;
constexpr double kDefaultGracePeriodSeconds = 5.0;
constexpr double kDefaultMonitorIntervalSeconds = 0.1;
// torchrun's default: a failed worker fails the job unless the user asks for restarts.
constexpr int kDefaultMaxRestarts = 0;
constexpr const char* kDefaultMainProcessIp = "127.0.0.1";
const std::vector<std::string> kMixedPrecisionChoices = {"no", "fp16", "bf16"};
// Both end up as the same static TCPStore on the main process: "c10d" is accepted so that config
// files and command lines written for Python Accelerate work unchanged.
const std::vector<std::string> kRdzvBackendChoices = {"static", "c10d"};
const std::vector<std::string> kDistributedTypeChoices = {"NO", "MULTI_CPU", "MULTI_GPU", "FSDP",
                                                          "DEEPSPEED"};
// Libraries that start one thread per core each; N workers would otherwise run N x cores threads.
const std::vector<std::string> kThreadCountVariables = {"OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                        "MKL_NUM_THREADS"};
// glibc returns every freed block over 32 MiB to the kernel, so a training step that allocates
// a large tensor faults all its pages in again, every step. Page faults are expensive (measured
// on our 2-core CI VM: a 64 MiB clone 270 ms with glibc's defaults, 4 ms with these), and
// LibTorch's CPU allocator does not cache. Keeping blocks up to 1 GiB in the heap is what
// PyTorch's CPU tuning guides get from jemalloc/tcmalloc.
constexpr const char* kMallocTunables =
    "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824";
// Any of these set by the user means they chose their allocator behaviour.
const std::vector<std::string> kMallocVariables = {"GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_",
                                                   "MALLOC_TRIM_THRESHOLD_"};

// A port nobody listens on right now. The kernel picks it (bind to port 0) from the ephemeral
// range, which it walks through rather than reusing, so two launchers started together get
// different ports, where any fixed default would make the second job fail to rendezvous.
int pick_free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::runtime_error(std::string("socket: ") + std::strerror(errno));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
  const int err = errno;
  ::close(fd);
  if (!ok) throw std::runtime_error(std::string("choosing a free port: ") + std::strerror(err));
  return ntohs(addr.sin_port);
}

// What `accelerate launch -h` shows after a sharding flag.
const char* sharding_type_name(ShardingValueKind kind) {
  switch (kind) {
    case ShardingValueKind::kBool:
      return "BOOL";
    case ShardingValueKind::kCount:
      return "INT";
    case ShardingValueKind::kNumber:
      return "FLOAT";
    case ShardingValueKind::kText:
      return "TEXT";
    case ShardingValueKind::kChoice:
    case ShardingValueKind::kLowerChoice:
    case ShardingValueKind::kNamedNumber:
      break;
  }
  return "CHOICE";
}

bool is_executable_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(path.c_str(), X_OK) == 0;
}

void set_env_entry(std::vector<std::string>& env, const std::string& name,
                   const std::string& value) {
  const std::string key = name + "=";
  auto it = std::find_if(env.begin(), env.end(),
                         [&](const std::string& e) { return e.compare(0, key.size(), key) == 0; });
  if (it != env.end()) {
    *it = key + value;
  } else {
    env.push_back(key + value);
  }
}

std::string join(const std::vector<std::string>& items, const std::string& separator) {
  std::string out;
  for (const auto& item : items) out += (out.empty() ? "" : separator) + item;
  return out;
}

class LaunchCommand final : public Command {
 public:
  std::string_view name() const override { return "launch"; }
  std::string_view summary() const override {
    return "Start PROGRAM as several worker processes with the distributed environment set";
  }

  void add_options(CLI::App& app) override {
    num_processes_ = app.add_option("-n,--num_processes", num_processes_value_,
                                    "Worker processes to start on this machine (default: 1)");
    app.add_flag("--cpu", cpu_,
                 "Run on CPU even if an accelerator is available: sets ACCELERATE_USE_CPU=true "
                 "(default: off)");
    mixed_precision_ = app.add_option("--mixed_precision", mixed_precision_value_,
                                      "Mixed precision for the workers: no, fp16 or bf16; sets "
                                      "ACCELERATE_MIXED_PRECISION (default: not set, the program "
                                      "decides)");
    gradient_accumulation_steps_ =
        app.add_option("--gradient_accumulation_steps", gradient_accumulation_steps_value_,
                       "Steps to accumulate gradients over; sets "
                       "ACCELERATE_GRADIENT_ACCUMULATION_STEPS (default: not set, the program "
                       "decides)");
    main_process_ip_ = app.add_option("--main_process_ip", main_process_ip_value_,
                                      "Address of the machine with rank 0; sets MASTER_ADDR "
                                      "(default: 127.0.0.1)");
    main_process_port_ =
        app.add_option("--main_process_port", main_process_port_value_,
                       "Port rank 0 listens on; sets MASTER_PORT (default: a free port, a new one "
                       "for each restart, when --num_machines is 1, else 29500)");
    num_machines_ = app.add_option("--num_machines", num_machines_value_,
                                   "Machines taking part in the job (default: 1)");
    machine_rank_ = app.add_option("--machine_rank", machine_rank_value_,
                                   "Index of this machine, in [0, num_machines) (default: 0)");
    app.add_flag("-v,--debug", debug_,
                 "Set ACCELERATE_DEBUG_MODE=1 in the workers and print every resolved launch "
                 "setting with where it came from: flag, config file or default (default: off)");
    app.add_flag("--rank_prefix", rank_prefix_,
                 "Prefix every line the workers print with \"[rank R] \" (default: off)");
    grace_period_ = app.add_option("--grace_period", grace_period_value_,
                                   "Seconds between SIGTERM and SIGKILL when the workers are "
                                   "stopped (default: 5)");
    config_file_ = app.add_option("--config_file", config_file_value_,
                                  "YAML file written by `accelerate config` or Python Accelerate; "
                                  "it supplies every setting no flag gives (default: "
                                  "$HF_HOME/accelerate/default_config.yaml, else "
                                  "$XDG_CACHE_HOME/huggingface/accelerate/default_config.yaml, "
                                  "else ~/.cache/huggingface/accelerate/default_config.yaml, "
                                  "read when it exists)")
                       ->type_name("PATH");
    gpu_ids_ = app.add_option("--gpu_ids", gpu_ids_value_,
                              "GPUs the workers may use, e.g. 0,1; sets CUDA_VISIBLE_DEVICES "
                              "(default: all, the variable is left as it is)")
                   ->type_name("IDS");
    rdzv_backend_ = app.add_option("--rdzv_backend", rdzv_backend_value_,
                                   "How the workers meet: static (a TCPStore on the main process) "
                                   "or c10d, accepted for Python Accelerate's sake and the same "
                                   "here (default: static)");
    max_restarts_ = app.add_option("--max_restarts", max_restarts_value_,
                                   "When a worker fails, stop all workers and start them again, "
                                   "up to this many times; each sees ACCELERATE_RESTART_COUNT "
                                   "(default: 0)");
    monitor_interval_ =
        app.add_option("--monitor_interval", monitor_interval_value_,
                       "Seconds between checks on the workers; an exit is also noticed at once "
                       "through SIGCHLD (default: 0.1)")
            ->type_name("SECONDS");
    log_dir_ = app.add_option("--log_dir", log_dir_value_,
                              "Append each worker's stdout and stderr to DIR/rank_<R>.log, every "
                              "attempt headed by '=== attempt N ==='; DIR is created if missing "
                              "(default: not set, the workers write to the console)")
                   ->type_name("DIR");
    app.add_flag("--tee", tee_,
                 "With --log_dir, also copy the workers' lines to the console, prefixed with "
                 "\"[rank R] \" (default: off)");
    app.add_flag("--use_fsdp", use_fsdp_,
                 "Shard with Accelerate's FullyShardedDataParallelPlugin: sets "
                 "ACCELERATE_USE_FSDP=true and the FSDP_* variables (default: off, or "
                 "distributed_type: FSDP in the config file)")
        ->group("FSDP");
    app.add_flag("--use_deepspeed", use_deepspeed_,
                 "Shard with Accelerate's DeepSpeedPlugin (ZeRO), run by accelerate-cpp's own "
                 "engine: sets ACCELERATE_USE_DEEPSPEED=true and the ACCELERATE_DEEPSPEED_* "
                 "variables (default: off, or distributed_type: DEEPSPEED in the config file)")
        ->group("DeepSpeed");
    for (const auto& setting : sharding_settings()) {
      const bool fsdp = setting.plugin == ShardingPlugin::kFsdp;
      std::string help = setting.help + "; ";
      help += setting.env != nullptr ? std::string("sets ") + setting.env : "sets no variable";
      help += " (default: " +
              (setting.default_value ? *setting.default_value : std::string("not set")) + ")";
      sharding_options_[setting.flag] =
          app.add_option("--" + setting.flag, sharding_values_[setting.flag], help)
              ->group(fsdp ? "FSDP" : "DeepSpeed")
              ->type_name(sharding_type_name(setting.kind));
    }
    // Documentation only: split_arguments() takes PROGRAM and ARGS out before CLI11 parses.
    app.add_option("PROGRAM", help_program_,
                   "Executable to start (searched in PATH when it has no '/')");
    app.add_option("ARGS", help_args_, "Arguments for PROGRAM, passed unchanged");
    app.footer(
        "Starts --num_processes copies of PROGRAM on this machine. Each worker is told its place "
        "in the job through RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, "
        "MASTER_ADDR, MASTER_PORT and ACCELERATE_* variables. Everything after PROGRAM (or after "
        "'--') is passed to it unchanged.\n"
        "Every setting is taken from its flag, else from the config file, else from its default. "
        "Config file keys: num_processes, num_machines, machine_rank, main_process_ip, "
        "main_process_port, mixed_precision, use_cpu, gradient_accumulation_steps, debug, "
        "gpu_ids, rdzv_backend, distributed_type (NO: one process by default; MULTI_CPU: "
        "--cpu; FSDP: --use_fsdp; DEEPSPEED: --use_deepspeed), fsdp_config (the --fsdp_* flags' "
        "names), deepspeed_config (the DeepSpeed flags' names, and gradient_accumulation_steps); "
        "same_network is shown by --debug only.\n"
        "Sharding: --use_fsdp and --use_deepspeed exclude each other, and a plugin's flags need "
        "the plugin. Values are checked against the choices Accelerate accepts; whether the "
        "engine supports one (FULL_SHARD, stage 3, nvme) the program decides. The processes are "
        "started as without a plugin; only their environment differs.\n"
        "Workers meet through a TCPStore that rank 0 serves at MASTER_ADDR:MASTER_PORT, whatever "
        "--rdzv_backend says. With --max_restarts, the launcher stops every worker when one fails "
        "and starts them all again, setting ACCELERATE_RESTART_COUNT (and torchrun's "
        "TORCHELASTIC_RESTART_COUNT) to the number of restarts so far and choosing a new port "
        "unless --main_process_port was given; it prints one line per restart. Restarts need "
        "--num_machines 1: restarting across machines needs an elastic rendezvous, which "
        "accelerate launch does not provide. A signal to the launcher never restarts anything.\n"
        "Exit status: 0 when every worker of an attempt exits 0; 1 when a worker fails and no "
        "restart is left (the others are sent SIGTERM, then SIGKILL after --grace_period); "
        "128+N when the launcher gets signal N (SIGINT, SIGTERM, SIGHUP); 2 for a bad command "
        "line or config file.\n"
        "When --num_processes > 1, OMP_NUM_THREADS, OPENBLAS_NUM_THREADS and MKL_NUM_THREADS "
        "default to max(1, cores / num_processes) unless already set. GLIBC_TUNABLES defaults "
        "to keeping freed blocks up to 1 GiB for reuse, unless GLIBC_TUNABLES, "
        "MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ is set (set GLIBC_TUNABLES= to keep "
        "glibc's own defaults).");
  }

  std::vector<std::string> split_arguments(const CLI::App& app,
                                           std::vector<std::string> args) override {
    // PROGRAM is the first argument that is neither an option nor an option's value; CLI11 sees
    // only what comes before it. An unknown option is left for CLI11 to reject.
    std::size_t i = 0;
    std::size_t program_at = args.size();
    bool saw_separator = false;
    while (i < args.size()) {
      const std::string& arg = args[i];
      if (arg == "--") {
        saw_separator = true;
        program_at = i + 1;
        break;
      }
      if (arg.size() < 2 || arg[0] != '-') {
        program_at = i;
        break;
      }
      const bool is_long = arg[1] == '-';
      const std::size_t eq = arg.find('=');
      const std::string option_name = is_long ? arg.substr(0, eq) : arg.substr(0, 2);
      const bool value_attached = is_long ? eq != std::string::npos : arg.size() > 2;
      const CLI::Option* option = app.get_option_no_throw(option_name);
      const bool takes_value = option != nullptr && option->get_items_expected_min() > 0;
      i += (takes_value && !value_attached) ? 2 : 1;
    }
    std::vector<std::string> own(
        args.begin(), args.begin() + static_cast<std::ptrdiff_t>(std::min(program_at, args.size()) -
                                                                 (saw_separator ? 1 : 0)));
    if (program_at < args.size()) {
      program_ = args[program_at];
      program_args_.assign(args.begin() + static_cast<std::ptrdiff_t>(program_at) + 1, args.end());
    }
    return own;
  }

  int run() override {
    LaunchOptions options;
    if (num_processes_->count() > 0) options.num_processes = num_processes_value_;
    options.cpu = cpu_;
    if (mixed_precision_->count() > 0) options.mixed_precision = mixed_precision_value_;
    if (gradient_accumulation_steps_->count() > 0) {
      options.gradient_accumulation_steps = gradient_accumulation_steps_value_;
    }
    if (main_process_ip_->count() > 0) options.main_process_ip = main_process_ip_value_;
    if (main_process_port_->count() > 0) options.main_process_port = main_process_port_value_;
    if (num_machines_->count() > 0) options.num_machines = num_machines_value_;
    if (machine_rank_->count() > 0) options.machine_rank = machine_rank_value_;
    options.debug = debug_;
    options.rank_prefix = rank_prefix_;
    if (grace_period_->count() > 0) options.grace_period_seconds = grace_period_value_;
    if (config_file_->count() > 0) options.config_file = config_file_value_;
    if (gpu_ids_->count() > 0) options.gpu_ids = gpu_ids_value_;
    if (rdzv_backend_->count() > 0) options.rdzv_backend = rdzv_backend_value_;
    if (max_restarts_->count() > 0) options.max_restarts = max_restarts_value_;
    if (monitor_interval_->count() > 0) options.monitor_interval_seconds = monitor_interval_value_;
    if (log_dir_->count() > 0) options.log_dir = log_dir_value_;
    options.tee = tee_;
    options.use_fsdp = use_fsdp_;
    options.use_deepspeed = use_deepspeed_;
    for (const auto& [flag, option] : sharding_options_) {
      if (option->count() > 0) options.sharding_flags[flag] = sharding_values_[flag];
    }
    options.program = program_;
    options.program_args = program_args_;

    std::vector<std::string> base_env;
    std::map<std::string, std::string> environment;
    for (char** e = environ; *e != nullptr; ++e) {
      base_env.emplace_back(*e);
      const auto eq = base_env.back().find('=');
      if (eq != std::string::npos) {
        environment.emplace(base_env.back().substr(0, eq), base_env.back().substr(eq + 1));
      }
    }
    std::vector<std::string> warnings;
    const auto file = read_launch_config_file(options, environment, &warnings);
    for (const auto& warning : warnings) {
      std::cerr << "accelerate launch: warning: " << warning << "\n";
    }
    const LaunchConfig config = resolve_launch_config(options, file);
    if (config.log_dir) {
      std::error_code error;
      std::filesystem::create_directories(*config.log_dir, error);
      if (error || !std::filesystem::is_directory(*config.log_dir)) {
        throw UsageError("cannot create --log_dir '" + *config.log_dir +
                         "': " + (error ? error.message() : "not a directory"));
      }
    }

    if (!config.thread_defaults.empty()) {
      std::vector<std::string> settings;
      for (const auto& [name, value] : config.thread_defaults)
        settings.push_back(name + "=" + value);
      std::cerr << "accelerate launch: setting " << join(settings, ", ") << " for each of the "
                << config.num_processes << " workers so that they do not oversubscribe the "
                << std::max(1u, std::thread::hardware_concurrency())
                << " cores; set them yourself to override" << std::endl;
    }
    if (config.debug) {
      for (const auto& line : describe_launch_config(config)) {
        std::cerr << "accelerate launch: " << line << "\n";
      }
    }
    std::cerr << std::flush;

    auto make_workers = [&](int restart_count) {
      const LaunchAttempt attempt{
          .restart_count = restart_count,
          .main_process_port = restart_count > 0 && config.port_chosen_automatically
                                   ? pick_free_port()
                                   : config.main_process_port};
      std::vector<WorkerSpec> workers;
      for (int local_rank = 0; local_rank < config.num_processes; ++local_rank) {
        workers.push_back({.rank = config.machine_rank * config.num_processes + local_rank,
                           .local_rank = local_rank,
                           .path = config.program_path,
                           .argv = config.program_argv,
                           .env = worker_environment(config, attempt, local_rank, base_env)});
      }
      return workers;
    };
    return run_workers(make_workers, {.rank_prefix = config.rank_prefix,
                                      .grace_period = config.grace_period,
                                      .name = "accelerate launch",
                                      .max_restarts = config.max_restarts,
                                      .monitor_interval = config.monitor_interval,
                                      .log_dir = config.log_dir.value_or(""),
                                      .tee = config.tee,
                                      // Set per attempt by the supervisor, over any value of the
                                      // user's: see worker_environment().
                                      .error_file_variable = accelerate::env::kErrorFile});
  }

 private:
  // CLI11 binds to plain values; the Option pointers tell us whether the user set each one.
  CLI::Option* num_processes_ = nullptr;
  int num_processes_value_ = 1;
  bool cpu_ = false;
  CLI::Option* mixed_precision_ = nullptr;
  std::string mixed_precision_value_;
  CLI::Option* gradient_accumulation_steps_ = nullptr;
  int gradient_accumulation_steps_value_ = 1;
  CLI::Option* main_process_ip_ = nullptr;
  std::string main_process_ip_value_;
  CLI::Option* main_process_port_ = nullptr;
  int main_process_port_value_ = 0;
  CLI::Option* num_machines_ = nullptr;
  int num_machines_value_ = 1;
  CLI::Option* machine_rank_ = nullptr;
  int machine_rank_value_ = 0;
  bool debug_ = false;
  bool rank_prefix_ = false;
  CLI::Option* grace_period_ = nullptr;
  double grace_period_value_ = kDefaultGracePeriodSeconds;
  CLI::Option* config_file_ = nullptr;
  std::string config_file_value_;
  CLI::Option* gpu_ids_ = nullptr;
  std::string gpu_ids_value_;
  CLI::Option* rdzv_backend_ = nullptr;
  std::string rdzv_backend_value_;
  CLI::Option* max_restarts_ = nullptr;
  int max_restarts_value_ = kDefaultMaxRestarts;
  CLI::Option* monitor_interval_ = nullptr;
  double monitor_interval_value_ = kDefaultMonitorIntervalSeconds;
  CLI::Option* log_dir_ = nullptr;
  std::string log_dir_value_;
  bool tee_ = false;
  bool use_fsdp_ = false;
  bool use_deepspeed_ = false;
  // By flag name; std::map keeps each value where CLI11 was told to write it.
  std::map<std::string, std::string> sharding_values_;
  std::map<std::string, CLI::Option*> sharding_options_;
  std::string help_program_;
  std::vector<std::string> help_args_;
  std::string program_;
  std::vector<std::string> program_args_;
};

}  // namespace

std::string resolve_program(const std::string& program) {
  if (program.empty()) throw UsageError("missing PROGRAM to launch");
  if (program.find('/') != std::string::npos) {
    if (!is_executable_file(program)) {
      throw UsageError("PROGRAM '" + program + "' does not exist or is not an executable file");
    }
    return program;
  }
  const char* path_env = std::getenv("PATH");
  // POSIX leaves an unset PATH to the implementation; these are what glibc's execvp uses.
  std::string path = path_env != nullptr ? path_env : "/bin:/usr/bin";
  std::stringstream dirs(path);
  for (std::string dir; std::getline(dirs, dir, ':');) {
    // An empty PATH entry means the current directory.
    const std::string candidate = (dir.empty() ? "." : dir) + "/" + program;
    if (is_executable_file(candidate)) return candidate;
  }
  throw UsageError("PROGRAM '" + program + "' was not found in PATH or is not executable");
}

std::optional<LaunchConfigFile> read_launch_config_file(
    const LaunchOptions& options, const std::map<std::string, std::string>& environment,
    std::vector<std::string>* warnings) {
  std::error_code error;
  std::string path;
  if (options.config_file) {
    path = *options.config_file;
    if (path.empty()) throw UsageError("--config_file must not be empty");
    // Never ignored: a typo in the path would otherwise launch with silently different settings.
    if (!std::filesystem::exists(path, error)) {
      throw UsageError("--config_file '" + path + "' does not exist");
    }
    if (std::filesystem::is_directory(path, error)) {
      throw UsageError("--config_file '" + path + "' is a directory");
    }
  } else {
    path = default_config_path(environment);
    if (!std::filesystem::is_regular_file(path, error)) return std::nullopt;
  }
  // Absolute, so that --debug output and error messages still name the file once copied into a
  // log away from the directory the launch ran in.
  const std::filesystem::path absolute = std::filesystem::absolute(path, error);
  return LaunchConfigFile{.path = error ? path : absolute.lexically_normal().string(),
                          .values = load_config_file(path, warnings)};
}

LaunchConfig resolve_launch_config(const LaunchOptions& options,
                                   const std::optional<LaunchConfigFile>& file) {
  LaunchConfig config;
  const ClusterConfig from_file = file ? file->values : ClusterConfig{};
  if (file) config.config_file = file->path;
  Precedence precedence(config, file);
  precedence.set("config_file",
                 options.config_file ? SettingSource::kFlag : SettingSource::kDefault);

  config.distributed_type = from_file.distributed_type;
  if (config.distributed_type) {
    precedence.set("distributed_type", SettingSource::kConfigFile);
    check_choice(precedence, "distributed_type", *config.distributed_type, kDistributedTypeChoices);
  }
  resolve_sharding_plugins(options, from_file, precedence, config);

  // Python Accelerate writes -1 for "give --num_processes on the command line".
  const auto num_processes =
      precedence.take("num_processes", options.num_processes, from_file.num_processes);
  if (num_processes && *num_processes == -1 && !options.num_processes) {
    throw UsageError("config file " + file->path +
                     " leaves num_processes to the command line (-1): pass --num_processes");
  }
  config.num_processes = num_processes.value_or(1);
  if (config.num_processes < 1) {
    throw UsageError(precedence.where("num_processes") + " must be at least 1, got " +
                     std::to_string(config.num_processes));
  }
  config.num_machines =
      precedence.take("num_machines", options.num_machines, from_file.num_machines).value_or(1);
  if (config.num_machines < 1) {
    throw UsageError(precedence.where("num_machines") + " must be at least 1, got " +
                     std::to_string(config.num_machines));
  }
  config.machine_rank =
      precedence.take("machine_rank", options.machine_rank, from_file.machine_rank).value_or(0);
  if (config.machine_rank < 0 || config.machine_rank >= config.num_machines) {
    throw UsageError(precedence.where("machine_rank") + " must be in [0, " +
                     std::to_string(config.num_machines) + ") for num_machines " +
                     std::to_string(config.num_machines) + ", got " +
                     std::to_string(config.machine_rank));
  }
  if (static_cast<long long>(config.num_machines) * config.num_processes > 1'000'000) {
    throw UsageError("num_machines x num_processes is unreasonably large");
  }

  // Flags can only switch these on, so "given" means on; the file may say either.
  if (options.cpu) {
    config.cpu = true;
    precedence.set("cpu", SettingSource::kFlag);
  } else if (from_file.use_cpu || from_file.distributed_type == "MULTI_CPU") {
    config.cpu = from_file.use_cpu.value_or(false) || from_file.distributed_type == "MULTI_CPU";
    precedence.set("cpu", SettingSource::kConfigFile);
  } else {
    precedence.set("cpu", SettingSource::kDefault);
  }
  if (options.debug) {
    config.debug = true;
    precedence.set("debug", SettingSource::kFlag);
  } else {
    config.debug = from_file.debug.value_or(false);
    precedence.set("debug", from_file.debug ? SettingSource::kConfigFile : SettingSource::kDefault);
  }

  config.mixed_precision =
      precedence.take("mixed_precision", options.mixed_precision, from_file.mixed_precision);
  if (config.mixed_precision) {
    check_choice(precedence, "mixed_precision", *config.mixed_precision, kMixedPrecisionChoices);
  }
  // Python keeps it in deepspeed_config; ours sits at the top (load_config_file makes both agree).
  std::optional<int> file_accumulation = from_file.gradient_accumulation_steps;
  if (!file_accumulation && config.use_deepspeed && from_file.deepspeed_config) {
    const auto& values = from_file.deepspeed_config->values;
    if (const auto it = values.find("gradient_accumulation_steps"); it != values.end()) {
      file_accumulation = std::stoi(it->second);
      precedence.set_file_key("gradient_accumulation_steps",
                              "deepspeed_config.gradient_accumulation_steps");
    }
  }
  config.gradient_accumulation_steps = precedence.take(
      "gradient_accumulation_steps", options.gradient_accumulation_steps, file_accumulation);
  if (config.gradient_accumulation_steps && *config.gradient_accumulation_steps < 1) {
    throw UsageError(precedence.where("gradient_accumulation_steps") + " must be at least 1, got " +
                     std::to_string(*config.gradient_accumulation_steps));
  }
  config.main_process_ip =
      precedence.take("main_process_ip", options.main_process_ip, from_file.main_process_ip)
          .value_or(kDefaultMainProcessIp);
  if (config.main_process_ip.empty()) {
    throw UsageError(precedence.where("main_process_ip") + " must not be empty");
  }
  const auto port =
      precedence.take("main_process_port", options.main_process_port, from_file.main_process_port);
  if (port && (*port < 1 || *port > 65535)) {
    throw UsageError(precedence.where("main_process_port") + " must be in 1..65535, got " +
                     std::to_string(*port));
  }
  config.gpu_ids = precedence.take("gpu_ids", options.gpu_ids, from_file.gpu_ids);
  if (config.gpu_ids &&
      (config.gpu_ids->empty() || config.gpu_ids->find_first_of(" \t\n") != std::string::npos)) {
    throw UsageError(precedence.where("gpu_ids") +
                     " must be 'all' or a comma-separated list of GPU ids, got '" +
                     *config.gpu_ids + "'");
  }
  config.rdzv_backend =
      precedence.take("rdzv_backend", options.rdzv_backend, from_file.rdzv_backend)
          .value_or("static");
  check_choice(precedence, "rdzv_backend", config.rdzv_backend, kRdzvBackendChoices);
  config.same_network = from_file.same_network;
  if (config.same_network) precedence.set("same_network", SettingSource::kConfigFile);

  config.rank_prefix = options.rank_prefix;
  precedence.set("rank_prefix",
                 options.rank_prefix ? SettingSource::kFlag : SettingSource::kDefault);
  const double grace = precedence.flag("grace_period", options.grace_period_seconds)
                           .value_or(kDefaultGracePeriodSeconds);
  // The upper bound only keeps the conversion to milliseconds from overflowing.
  if (!(grace >= 0.0 && grace <= 86400.0)) {
    throw UsageError("--grace_period must be between 0 and 86400 seconds, got " +
                     std::to_string(grace));
  }
  config.grace_period = std::chrono::milliseconds(static_cast<long long>(grace * 1000.0));

  config.max_restarts =
      precedence.flag("max_restarts", options.max_restarts).value_or(kDefaultMaxRestarts);
  if (config.max_restarts < 0) {
    throw UsageError("--max_restarts must be at least 0, got " +
                     std::to_string(config.max_restarts));
  }
  if (config.max_restarts > 0 && config.num_machines > 1) {
    throw UsageError(
        "--max_restarts needs num_machines 1: restarting workers on several machines together "
        "needs an elastic rendezvous, which accelerate launch does not provide");
  }
  const double interval = precedence.flag("monitor_interval", options.monitor_interval_seconds)
                              .value_or(kDefaultMonitorIntervalSeconds);
  if (!(interval > 0.0 && interval <= 86400.0)) {
    throw UsageError("--monitor_interval must be greater than 0 and at most 86400 seconds, got " +
                     std::to_string(interval));
  }
  // Below a millisecond poll() would spin; a millisecond is already far finer than useful.
  config.monitor_interval =
      std::max(std::chrono::milliseconds(1),
               std::chrono::milliseconds(static_cast<long long>(interval * 1000.0)));
  config.log_dir = precedence.flag("log_dir", options.log_dir);
  if (config.log_dir && config.log_dir->empty()) throw UsageError("--log_dir must not be empty");
  config.tee = options.tee;
  precedence.set("tee", options.tee ? SettingSource::kFlag : SettingSource::kDefault);
  if (config.tee && !config.log_dir) {
    throw UsageError("--tee copies the --log_dir files to the console; give --log_dir too");
  }

  config.program_path = resolve_program(options.program);
  config.program_argv.push_back(options.program);
  config.program_argv.insert(config.program_argv.end(), options.program_args.begin(),
                             options.program_args.end());

  // Only now that the command line is known good: choosing a port has side effects on nothing,
  // but a refused command line should not depend on the network.
  if (port) {
    config.main_process_port = *port;
  } else {
    config.port_chosen_automatically = config.num_machines == 1;
    config.main_process_port =
        config.num_machines == 1 ? pick_free_port() : kMultiMachineDefaultPort;
  }

  if (config.num_processes > 1) {
    const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    const unsigned threads = std::max(1u, cores / static_cast<unsigned>(config.num_processes));
    for (const auto& name : kThreadCountVariables) {
      if (std::getenv(name.c_str()) == nullptr) {
        config.thread_defaults.emplace_back(name, std::to_string(threads));
      }
    }
  }
  const bool user_chose_malloc =
      std::any_of(kMallocVariables.begin(), kMallocVariables.end(),
                  [](const std::string& name) { return std::getenv(name.c_str()) != nullptr; });
  if (!user_chose_malloc) config.memory_defaults.emplace_back("GLIBC_TUNABLES", kMallocTunables);
  return config;
}

std::vector<std::string> worker_environment(const LaunchConfig& config,
                                            const LaunchAttempt& attempt, int local_rank,
                                            const std::vector<std::string>& base) {
  std::vector<std::string> env = base;
  const int rank = config.machine_rank * config.num_processes + local_rank;
  set_env_entry(env, "RANK", std::to_string(rank));
  set_env_entry(env, "WORLD_SIZE", std::to_string(config.num_machines * config.num_processes));
  set_env_entry(env, "LOCAL_RANK", std::to_string(local_rank));
  set_env_entry(env, "LOCAL_WORLD_SIZE", std::to_string(config.num_processes));
  set_env_entry(env, "GROUP_RANK", std::to_string(config.machine_rank));
  set_env_entry(env, "MASTER_ADDR", config.main_process_ip);
  set_env_entry(env, "MASTER_PORT", std::to_string(attempt.main_process_port));
  // Ours, and torchrun's names for the same, so programs written for either can resume.
  set_env_entry(env, "ACCELERATE_RESTART_COUNT", std::to_string(attempt.restart_count));
  set_env_entry(env, "TORCHELASTIC_RESTART_COUNT", std::to_string(attempt.restart_count));
  set_env_entry(env, "TORCHELASTIC_MAX_RESTARTS", std::to_string(config.max_restarts));
  if (config.cpu) set_env_entry(env, "ACCELERATE_USE_CPU", "true");
  if (config.mixed_precision)
    set_env_entry(env, "ACCELERATE_MIXED_PRECISION", *config.mixed_precision);
  if (config.gradient_accumulation_steps) {
    set_env_entry(env, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
                  std::to_string(*config.gradient_accumulation_steps));
  }
  if (config.gpu_ids && *config.gpu_ids != "all") {
    set_env_entry(env, "CUDA_VISIBLE_DEVICES", *config.gpu_ids);
  }
  if (config.debug) set_env_entry(env, "ACCELERATE_DEBUG_MODE", "1");
  for (const auto& [name, value] : sharding_environment(config)) set_env_entry(env, name, value);
  for (const auto& [name, value] : config.thread_defaults) set_env_entry(env, name, value);
  for (const auto& [name, value] : config.memory_defaults) set_env_entry(env, name, value);
  // ACCELERATE_ERROR_FILE is not set here but by run_workers(), which makes a private directory
  // for each attempt's failure records and names the root cause of a failure from them. Like
  // torchrun's TORCHELASTIC_ERROR_FILE, it replaces a value the user set: the launcher has to know
  // where every worker's record is.
  return env;
}

std::vector<std::string> describe_launch_config(const LaunchConfig& config) {
  auto source = [&](const std::string& name) -> std::string {
    const auto it = config.sources.find(name);
    const SettingSource from = it == config.sources.end() ? SettingSource::kDefault : it->second;
    switch (from) {
      case SettingSource::kFlag:
        return " (flag)";
      case SettingSource::kConfigFile:
        return " (config file " + config.config_file + ")";
      case SettingSource::kDefault:
        break;
    }
    return " (default)";
  };
  auto text = [](bool value) { return std::string(value ? "true" : "false"); };
  auto or_unset = [](const auto& value) -> std::string {
    if (!value) return "(not set)";
    if constexpr (std::is_same_v<std::decay_t<decltype(*value)>, std::string>) {
      return *value;
    } else if constexpr (std::is_same_v<std::decay_t<decltype(*value)>, bool>) {
      return *value ? "true" : "false";
    } else {
      return std::to_string(*value);
    }
  };
  auto line = [&](const std::string& name, const std::string& value) {
    return name + " = " + value + source(name);
  };
  std::vector<std::string> lines;
  lines.push_back(
      "config_file = " + (config.config_file.empty() ? std::string("(none)") : config.config_file) +
      source("config_file"));
  if (config.distributed_type) {
    lines.push_back(line("distributed_type", *config.distributed_type));
  }
  lines.push_back(line("num_processes", std::to_string(config.num_processes)));
  lines.push_back(line("num_machines", std::to_string(config.num_machines)));
  lines.push_back(line("machine_rank", std::to_string(config.machine_rank)));
  lines.push_back(line("cpu", text(config.cpu)));
  lines.push_back(line("mixed_precision", or_unset(config.mixed_precision)));
  lines.push_back(
      line("gradient_accumulation_steps", or_unset(config.gradient_accumulation_steps)));
  lines.push_back(line("use_fsdp", text(config.use_fsdp)));
  lines.push_back(line("use_deepspeed", text(config.use_deepspeed)));
  for (const auto& setting : sharding_settings()) {
    const bool on =
        setting.plugin == ShardingPlugin::kFsdp ? config.use_fsdp : config.use_deepspeed;
    if (!on) continue;
    const auto value = config.sharding.find(setting.flag);
    lines.push_back(
        line(setting.flag, value == config.sharding.end() ? "(not set)" : value->second));
  }
  lines.push_back(line("debug", text(config.debug)));
  lines.push_back(line("gpu_ids", config.gpu_ids.value_or("all")));
  lines.push_back(line("main_process_ip", config.main_process_ip));
  lines.push_back("main_process_port = " + std::to_string(config.main_process_port) +
                  (config.port_chosen_automatically ? " (default: a free port, new on each restart)"
                                                    : source("main_process_port")));
  lines.push_back(line("rdzv_backend", config.rdzv_backend));
  if (config.same_network) {
    lines.push_back("same_network = " + text(*config.same_network) + source("same_network") +
                    ", informational only");
  }
  lines.push_back(line("max_restarts", std::to_string(config.max_restarts)));
  lines.push_back(
      line("monitor_interval", std::to_string(config.monitor_interval.count()) + " ms"));
  lines.push_back(line("grace_period", std::to_string(config.grace_period.count()) + " ms"));
  lines.push_back(line("log_dir", or_unset(config.log_dir)));
  lines.push_back(line("tee", text(config.tee)));
  lines.push_back(line("rank_prefix", text(config.rank_prefix)));
  lines.push_back("program = " + config.program_path);
  for (const auto& [name, value] : config.thread_defaults) {
    lines.push_back(name + " = " + value + " (default: cores / num_processes)");
  }
  for (const auto& [name, value] : config.memory_defaults) {
    lines.push_back(name + " = " + value + " (default: reuse freed memory)");
  }
  return lines;
}

std::unique_ptr<Command> make_launch_command() {
  return std::make_unique<LaunchCommand>();
}

}  // namespace accelerate::cli
