#include "launch.h"

#include "supervisor.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <sstream>
#include <thread>

extern char** environ;

namespace accelerate::cli {
namespace {

// With several machines every launcher must agree on the port without talking to each other
// first, so it is a fixed, well-known one (the same as torchrun's and Python Accelerate's).
constexpr int kMultiMachineDefaultPort = 29500;
constexpr double kDefaultGracePeriodSeconds = 5.0;
constexpr const char* kDefaultMainProcessIp = "127.0.0.1";
const std::vector<std::string> kMixedPrecisionChoices = {"no", "fp16", "bf16"};
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
                       "Port rank 0 listens on; sets MASTER_PORT (default: a free port when "
                       "--num_machines is 1, else 29500)");
    num_machines_ = app.add_option("--num_machines", num_machines_value_,
                                   "Machines taking part in the job (default: 1)");
    machine_rank_ = app.add_option("--machine_rank", machine_rank_value_,
                                   "Index of this machine, in [0, num_machines) (default: 0)");
    app.add_flag("--debug", debug_,
                 "Set ACCELERATE_DEBUG_MODE=1 in the workers and print the resolved launch "
                 "configuration (default: off)");
    app.add_flag("--rank_prefix", rank_prefix_,
                 "Prefix every line the workers print with \"[rank R] \" (default: off)");
    grace_period_ = app.add_option("--grace_period", grace_period_value_,
                                   "Seconds between SIGTERM and SIGKILL when the job is stopped "
                                   "(default: 5)");
    // Documentation only: split_arguments() takes PROGRAM and ARGS out before CLI11 parses.
    app.add_option("PROGRAM", help_program_,
                   "Executable to start (searched in PATH when it has no '/')");
    app.add_option("ARGS", help_args_, "Arguments for PROGRAM, passed unchanged");
    app.footer(
        "Starts --num_processes copies of PROGRAM on this machine. Each worker is told its place "
        "in the job through RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, "
        "MASTER_ADDR, MASTER_PORT and ACCELERATE_* variables. Everything after PROGRAM (or after "
        "'--') is passed to it unchanged.\n"
        "Exit status: 0 when every worker exits 0; 1 when a worker fails (the others are sent "
        "SIGTERM, then SIGKILL after --grace_period); 128+N when the launcher gets signal N "
        "(SIGINT, SIGTERM, SIGHUP); 2 for a bad command line.\n"
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
    options.program = program_;
    options.program_args = program_args_;

    const LaunchConfig config = resolve_launch_config(options);

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
      for (const auto& line : describe_launch_config(config, options)) {
        std::cerr << "accelerate launch: " << line << "\n";
      }
      std::cerr << std::flush;
    }

    std::vector<std::string> base_env;
    for (char** e = environ; *e != nullptr; ++e) base_env.emplace_back(*e);
    std::vector<WorkerSpec> workers;
    for (int local_rank = 0; local_rank < config.num_processes; ++local_rank) {
      workers.push_back({.rank = config.machine_rank * config.num_processes + local_rank,
                         .local_rank = local_rank,
                         .path = config.program_path,
                         .argv = config.program_argv,
                         .env = worker_environment(config, local_rank, base_env)});
    }
    return run_workers(workers, {.rank_prefix = config.rank_prefix,
                                 .grace_period = config.grace_period,
                                 .name = "accelerate launch"});
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

LaunchConfig resolve_launch_config(const LaunchOptions& options) {
  LaunchConfig config;
  config.num_processes = options.num_processes.value_or(1);
  if (config.num_processes < 1) {
    throw UsageError("--num_processes must be at least 1, got " +
                     std::to_string(config.num_processes));
  }
  config.num_machines = options.num_machines.value_or(1);
  if (config.num_machines < 1) {
    throw UsageError("--num_machines must be at least 1, got " +
                     std::to_string(config.num_machines));
  }
  config.machine_rank = options.machine_rank.value_or(0);
  if (config.machine_rank < 0 || config.machine_rank >= config.num_machines) {
    throw UsageError("--machine_rank must be in [0, " + std::to_string(config.num_machines) +
                     ") for --num_machines " + std::to_string(config.num_machines) + ", got " +
                     std::to_string(config.machine_rank));
  }
  if (static_cast<long long>(config.num_machines) * config.num_processes > 1'000'000) {
    throw UsageError("--num_machines x --num_processes is unreasonably large");
  }
  config.cpu = options.cpu;
  if (options.mixed_precision) {
    if (std::find(kMixedPrecisionChoices.begin(), kMixedPrecisionChoices.end(),
                  *options.mixed_precision) == kMixedPrecisionChoices.end()) {
      throw UsageError("--mixed_precision must be one of " + join(kMixedPrecisionChoices, ", ") +
                       ", got '" + *options.mixed_precision + "'");
    }
    config.mixed_precision = options.mixed_precision;
  }
  if (options.gradient_accumulation_steps) {
    if (*options.gradient_accumulation_steps < 1) {
      throw UsageError("--gradient_accumulation_steps must be at least 1, got " +
                       std::to_string(*options.gradient_accumulation_steps));
    }
    config.gradient_accumulation_steps = options.gradient_accumulation_steps;
  }
  config.main_process_ip = options.main_process_ip.value_or(kDefaultMainProcessIp);
  if (config.main_process_ip.empty()) throw UsageError("--main_process_ip must not be empty");
  if (options.main_process_port) {
    if (*options.main_process_port < 1 || *options.main_process_port > 65535) {
      throw UsageError("--main_process_port must be in 1..65535, got " +
                       std::to_string(*options.main_process_port));
    }
    config.main_process_port = *options.main_process_port;
  }
  config.debug = options.debug;
  config.rank_prefix = options.rank_prefix;
  const double grace = options.grace_period_seconds.value_or(kDefaultGracePeriodSeconds);
  // The upper bound only keeps the conversion to milliseconds from overflowing.
  if (!(grace >= 0.0 && grace <= 86400.0)) {
    throw UsageError("--grace_period must be between 0 and 86400 seconds, got " +
                     std::to_string(grace));
  }
  config.grace_period = std::chrono::milliseconds(static_cast<long long>(grace * 1000.0));

  config.program_path = resolve_program(options.program);
  config.program_argv.push_back(options.program);
  config.program_argv.insert(config.program_argv.end(), options.program_args.begin(),
                             options.program_args.end());

  // Only now that the command line is known good: choosing a port has side effects on nothing,
  // but a refused command line should not depend on the network.
  if (!options.main_process_port) {
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

std::vector<std::string> worker_environment(const LaunchConfig& config, int local_rank,
                                            const std::vector<std::string>& base) {
  std::vector<std::string> env = base;
  const int rank = config.machine_rank * config.num_processes + local_rank;
  set_env_entry(env, "RANK", std::to_string(rank));
  set_env_entry(env, "WORLD_SIZE", std::to_string(config.num_machines * config.num_processes));
  set_env_entry(env, "LOCAL_RANK", std::to_string(local_rank));
  set_env_entry(env, "LOCAL_WORLD_SIZE", std::to_string(config.num_processes));
  set_env_entry(env, "GROUP_RANK", std::to_string(config.machine_rank));
  set_env_entry(env, "MASTER_ADDR", config.main_process_ip);
  set_env_entry(env, "MASTER_PORT", std::to_string(config.main_process_port));
  if (config.cpu) set_env_entry(env, "ACCELERATE_USE_CPU", "true");
  if (config.mixed_precision)
    set_env_entry(env, "ACCELERATE_MIXED_PRECISION", *config.mixed_precision);
  if (config.gradient_accumulation_steps) {
    set_env_entry(env, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
                  std::to_string(*config.gradient_accumulation_steps));
  }
  if (config.debug) set_env_entry(env, "ACCELERATE_DEBUG_MODE", "1");
  for (const auto& [name, value] : config.thread_defaults) set_env_entry(env, name, value);
  for (const auto& [name, value] : config.memory_defaults) set_env_entry(env, name, value);
  return env;
}

std::vector<std::string> describe_launch_config(const LaunchConfig& config,
                                                const LaunchOptions& options) {
  auto source = [](bool given) { return given ? " (command line)" : " (default)"; };
  std::vector<std::string> lines;
  lines.push_back("num_processes = " + std::to_string(config.num_processes) +
                  source(options.num_processes.has_value()));
  lines.push_back("num_machines = " + std::to_string(config.num_machines) +
                  source(options.num_machines.has_value()));
  lines.push_back("machine_rank = " + std::to_string(config.machine_rank) +
                  source(options.machine_rank.has_value()));
  lines.push_back(std::string("cpu = ") + (config.cpu ? "true" : "false") + source(options.cpu));
  lines.push_back("mixed_precision = " + config.mixed_precision.value_or("(not set)") +
                  source(options.mixed_precision.has_value()));
  lines.push_back("gradient_accumulation_steps = " +
                  (config.gradient_accumulation_steps
                       ? std::to_string(*config.gradient_accumulation_steps)
                       : std::string("(not set)")) +
                  source(options.gradient_accumulation_steps.has_value()));
  lines.push_back("main_process_ip = " + config.main_process_ip +
                  source(options.main_process_ip.has_value()));
  lines.push_back("main_process_port = " + std::to_string(config.main_process_port) +
                  (options.main_process_port  ? " (command line)"
                   : config.num_machines == 1 ? " (default: free port)"
                                              : " (default)"));
  lines.push_back("grace_period = " + std::to_string(config.grace_period.count()) + " ms" +
                  source(options.grace_period_seconds.has_value()));
  lines.push_back("rank_prefix = " + std::string(config.rank_prefix ? "true" : "false") +
                  source(options.rank_prefix));
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
