// Helpers shared by the tests that start real processes through `accelerate launch`.
//
// Header-only so that every launch test file can include it without a support library. Everything
// here is POSIX (fork/exec, pipes, process groups) because the point of these tests is to watch
// real processes start, talk and die.
//
// Example:
//   auto r = accelerate::testing::run_command(
//       {accelerate::testing::cli_path(), "launch", "-n", "2",
//        accelerate::testing::worker_path("launch_probe")},
//       std::chrono::seconds(30));
//   EXPECT_EQ(r.exit_code, 0) << r.output;
//
//   // A process the test wants to signal while it runs:
//   auto child = accelerate::testing::ChildProcess::start({accelerate::testing::cli_path(), ...});
//   ::kill(child.pid(), SIGTERM);
//   auto r = child.wait(std::chrono::seconds(10));
#pragma once

#include <accelerate/env_names.h>

#include "files.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

extern char** environ;

namespace accelerate::testing {

/// How a command ended, and everything it wrote.
struct RunResult {
  /// Exit status when the process exited normally, -1 when a signal ended it.
  int exit_code = -1;
  /// The signal that ended the process, 0 when it exited normally.
  int term_signal = 0;
  /// stdout and stderr together, in the order the process wrote them.
  std::string output;
  /// Wall time from start to exit.
  double seconds = 0.0;
  /// True when the command outlived its timeout and we killed it.
  bool timed_out = false;
};

/// Variables a test runner may have set that would change what a launched worker sees: how it
/// finds its peers, its precision and threads, and the launcher's restart bookkeeping.
inline const std::vector<std::string> kLaunchVariables = {"RANK",
                                                          "WORLD_SIZE",
                                                          "LOCAL_RANK",
                                                          "LOCAL_WORLD_SIZE",
                                                          "GROUP_RANK",
                                                          "MASTER_ADDR",
                                                          "MASTER_PORT",
                                                          "OMPI_COMM_WORLD_RANK",
                                                          "OMPI_COMM_WORLD_SIZE",
                                                          "PMI_RANK",
                                                          "PMI_SIZE",
                                                          "SLURM_PROCID",
                                                          "SLURM_NTASKS",
                                                          "ACCELERATE_USE_CPU",
                                                          "ACCELERATE_MIXED_PRECISION",
                                                          "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
                                                          "ACCELERATE_DEBUG_MODE",
                                                          "ACCELERATE_RESTART_COUNT",
                                                          "TORCHELASTIC_RESTART_COUNT",
                                                          "TORCHELASTIC_MAX_RESTARTS",
                                                          "OMP_NUM_THREADS",
                                                          "OPENBLAS_NUM_THREADS",
                                                          "MKL_NUM_THREADS",
                                                          "GLIBC_TUNABLES",
                                                          "MALLOC_MMAP_THRESHOLD_",
                                                          "MALLOC_TRIM_THRESHOLD_",
                                                          "CUDA_VISIBLE_DEVICES",
                                                          "XDG_CACHE_HOME"};

/// The variables through which `accelerate launch` passes the sharding plugins' settings
/// (<accelerate/env_names.h>), every one of them: what a test unsets so that a runner's own values
/// cannot reach the workers, and the names it looks for in what a worker saw.
inline const std::vector<std::string> kShardingVariables = {
    accelerate::env::kUseFsdp,
    accelerate::env::kFsdpShardingStrategy,
    accelerate::env::kFsdpOffloadParams,
    accelerate::env::kFsdpStateDictType,
    accelerate::env::kFsdpSyncModuleStates,
    accelerate::env::kFsdpMinNumParams,
    accelerate::env::kFsdpAutoWrapPolicy,
    accelerate::env::kFsdpTransformerClsToWrap,
    accelerate::env::kFsdpBackwardPrefetch,
    accelerate::env::kFsdpForwardPrefetch,
    accelerate::env::kFsdpUseOrigParams,
    accelerate::env::kFsdpCpuRamEfficientLoading,
    accelerate::env::kFsdpActivationCheckpointing,
    accelerate::env::kUseDeepSpeed,
    accelerate::env::kDeepSpeedZeroStage,
    accelerate::env::kGradientAccumulationSteps,
    accelerate::env::kGradientClipping,
    accelerate::env::kDeepSpeedOffloadOptimizerDevice,
    accelerate::env::kDeepSpeedOffloadParamDevice,
    accelerate::env::kDeepSpeedOffloadOptimizerNvmePath,
    accelerate::env::kDeepSpeedOffloadParamNvmePath,
    accelerate::env::kDeepSpeedZero3Init,
    accelerate::env::kDeepSpeedZero3Save16BitModel,
    accelerate::env::kDeepSpeedConfigFile};

/// Path of the `accelerate` executable under test (set by CMake).
inline std::string cli_path() {
#ifdef ACCELERATE_CLI_PATH
  return ACCELERATE_CLI_PATH;
#else
  const char* p = std::getenv("ACCELERATE_CLI_PATH");
  return p ? p : "accelerate";
#endif
}

/// Path of a worker program built from tests/launch/workers/<name>.cpp (set by CMake).
inline std::string worker_path(const std::string& name) {
#ifdef ACCELERATE_WORKER_DIR
  const char* dir = ACCELERATE_WORKER_DIR;
#else
  const char* dir = std::getenv("ACCELERATE_WORKER_DIR");
  if (dir == nullptr) dir = ".";
#endif
  // A path join, not string concatenation: GCC 12 warns falsely (-Warray-bounds) about
  // std::string(literal) + "/" + name once it is inlined.
  return (std::filesystem::path(dir) / name).string();
}

/// A TCP port that was free a moment ago: the kernel picks it when we bind port 0. Another process
/// may take it before the caller binds it, but the kernel hands out ephemeral ports in rotation, so
/// a collision needs a busy machine and bad luck.
inline int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::runtime_error(std::string("socket: ") + std::strerror(errno));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    const int err = errno;
    ::close(fd);
    throw std::runtime_error(std::string("bind/getsockname: ") + std::strerror(err));
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

/// True while `pid` names a process (a zombie counts: it still holds its pid).
inline bool process_exists(pid_t pid) {
  return ::kill(pid, 0) == 0 || errno != ESRCH;
}

/// Polls `done` every 10 ms until it returns true or `timeout` passes; returns its last answer.
inline bool wait_until(const std::function<bool()>& done, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!done()) {
    if (std::chrono::steady_clock::now() >= deadline) return done();
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

/// An empty directory, removed when the test program exits: the HF_HOME that commands started
/// by the tests see unless a test sets its own, so a developer's `accelerate config` file cannot
/// change the results (and a command that writes the default config writes it here).
inline std::string isolated_hf_home() {
  static TempDir dir;
  return dir.path().string();
}

/// Whole contents of a file, or "" when it cannot be read.
inline std::string read_text_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

/// A running command whose stdout+stderr go to one pipe we read. The child leads its own process
/// group, so a timeout can kill it together with anything it started in that group. Destroying a
/// ChildProcess that was not waited for kills and reaps it: a failing ASSERT never leaks processes.
class ChildProcess {
 public:
  /// Starts `argv` (argv[0] is looked up in PATH when it has no '/'). `extra_env` is added to (or
  /// overrides) this process's environment; names in `unset_env` are removed from it.
  static ChildProcess start(const std::vector<std::string>& argv,
                            const std::map<std::string, std::string>& extra_env = {},
                            const std::vector<std::string>& unset_env = {}) {
    if (argv.empty()) throw std::invalid_argument("ChildProcess::start: empty argv");
    // Everything the child needs is built before fork: between fork and exec only
    // async-signal-safe calls are allowed, and gtest processes may have threads.
    std::vector<std::string> env_strings;
    for (char** e = environ; *e != nullptr; ++e) {
      const std::string entry(*e);
      const std::string name = entry.substr(0, entry.find('='));
      if (extra_env.count(name) != 0) continue;
      bool drop = false;
      for (const auto& u : unset_env) drop = drop || u == name;
      if (!drop) env_strings.push_back(entry);
    }
    for (const auto& [name, value] : extra_env) env_strings.push_back(name + "=" + value);
    // A developer's own `accelerate config` file must not change what the tests see: unless the
    // test chooses one, HF_HOME points where no config file is.
    if (extra_env.count("HF_HOME") == 0) {
      std::erase_if(env_strings, [](const std::string& e) { return e.rfind("HF_HOME=", 0) == 0; });
      env_strings.push_back("HF_HOME=" + isolated_hf_home());
    }
    std::vector<char*> envp;
    for (auto& s : env_strings) envp.push_back(s.data());
    envp.push_back(nullptr);
    std::vector<std::string> args(argv);
    std::vector<char*> cargv;
    for (auto& a : args) cargv.push_back(a.data());
    cargv.push_back(nullptr);

    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) {
      throw std::runtime_error(std::string("pipe2: ") + std::strerror(errno));
    }
    const auto started = std::chrono::steady_clock::now();
    const pid_t pid = ::fork();
    if (pid < 0) {
      const int err = errno;
      ::close(fds[0]);
      ::close(fds[1]);
      throw std::runtime_error(std::string("fork: ") + std::strerror(err));
    }
    if (pid == 0) {
      ::setpgid(0, 0);
      // The test process may block or ignore signals (gtest death tests, ctest); the command must
      // start with the defaults so that signal tests mean what they say.
      sigset_t none;
      sigemptyset(&none);
      ::sigprocmask(SIG_SETMASK, &none, nullptr);
      for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGPIPE, SIGCHLD}) ::signal(sig, SIG_DFL);
      const int devnull = ::open("/dev/null", O_RDONLY);
      if (devnull >= 0) ::dup2(devnull, STDIN_FILENO);
      ::dup2(fds[1], STDOUT_FILENO);
      ::dup2(fds[1], STDERR_FILENO);
      ::execvpe(cargv[0], cargv.data(), envp.data());
      const char msg[] = "launch_util: exec failed\n";
      [[maybe_unused]] auto ignored = ::write(STDERR_FILENO, msg, sizeof(msg) - 1);
      ::_exit(127);
    }
    // Set the group from both sides so that a kill(-pid) right after start cannot miss it.
    ::setpgid(pid, pid);
    ::close(fds[1]);
    return ChildProcess(pid, fds[0], started);
  }

  ChildProcess(ChildProcess&& other) noexcept
      : pid_(std::exchange(other.pid_, -1)),
        out_fd_(std::exchange(other.out_fd_, -1)),
        started_(other.started_),
        output_(std::move(other.output_)) {}
  ChildProcess& operator=(ChildProcess&&) = delete;
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  ~ChildProcess() {
    if (pid_ > 0) {
      ::kill(-pid_, SIGKILL);
      ::kill(pid_, SIGKILL);
      int status = 0;
      while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
      }
    }
    if (out_fd_ >= 0) ::close(out_fd_);
  }

  pid_t pid() const { return pid_; }

  /// Output read so far (only grows while someone calls wait() or poll_output()).
  const std::string& output() const { return output_; }

  /// Reads whatever output is ready, waiting at most `timeout`. Lets a test watch a running
  /// command (e.g. wait for a line before signalling it) without blocking the pipe.
  void poll_output(std::chrono::milliseconds timeout) { read_some(timeout); }

  /// Waits for the command to exit, reading its output meanwhile. Past `timeout` the process group
  /// is SIGKILLed and the result says timed_out. Returns once: later calls return an empty result.
  RunResult wait(std::chrono::milliseconds timeout) {
    RunResult result;
    if (pid_ <= 0) return result;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    int status = 0;
    for (;;) {
      const pid_t r = ::waitpid(pid_, &status, WNOHANG);
      if (r == pid_) break;
      if (r < 0 && errno != EINTR) break;
      const auto now = std::chrono::steady_clock::now();
      if (now >= deadline) {
        result.timed_out = true;
        ::kill(-pid_, SIGKILL);
        ::kill(pid_, SIGKILL);
        while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
        }
        break;
      }
      read_some(std::min<std::chrono::milliseconds>(
          std::chrono::milliseconds(20),
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now)));
    }
    result.seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
    pid_ = -1;
    // The pipe reaches EOF once every writer is gone. A process the command leaked would keep it
    // open forever, so drain for a bounded time only: the test then sees the leak some other way.
    const auto drain_deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while (out_fd_ >= 0 && std::chrono::steady_clock::now() < drain_deadline) {
      read_some(std::chrono::milliseconds(50));
    }
    if (WIFEXITED(status)) {
      result.exit_code = WEXITSTATUS(status);
    } else if (WIFSIGNALED(status)) {
      result.term_signal = WTERMSIG(status);
    }
    result.output = std::move(output_);
    output_.clear();
    return result;
  }

 private:
  ChildProcess(pid_t pid, int out_fd, std::chrono::steady_clock::time_point started)
      : pid_(pid), out_fd_(out_fd), started_(started) {}

  void read_some(std::chrono::milliseconds timeout) {
    if (out_fd_ < 0) {
      std::this_thread::sleep_for(timeout);
      return;
    }
    pollfd p{out_fd_, POLLIN, 0};
    const int n = ::poll(&p, 1, static_cast<int>(timeout.count()));
    if (n <= 0) return;
    char buf[65536];
    const ssize_t got = ::read(out_fd_, buf, sizeof(buf));
    if (got > 0) {
      output_.append(buf, static_cast<size_t>(got));
    } else if (got == 0 || (errno != EINTR && errno != EAGAIN)) {
      ::close(out_fd_);
      out_fd_ = -1;
    }
  }

  pid_t pid_ = -1;
  int out_fd_ = -1;
  std::chrono::steady_clock::time_point started_;
  std::string output_;
};

/// Runs `argv` to completion (see ChildProcess::start for `extra_env`/`unset_env`); kills its
/// process group if it runs past `timeout`.
inline RunResult run_command(const std::vector<std::string>& argv,
                             std::chrono::milliseconds timeout,
                             const std::map<std::string, std::string>& extra_env = {},
                             const std::vector<std::string>& unset_env = {}) {
  return ChildProcess::start(argv, extra_env, unset_env).wait(timeout);
}

/// Lines of `text`, without their '\n'.
inline std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

inline bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

/// How often `part` occurs in `text`, overlaps included.
inline std::size_t count_of(const std::string& text, const std::string& part) {
  std::size_t n = 0;
  for (auto at = text.find(part); at != std::string::npos; at = text.find(part, at + 1)) ++n;
  return n;
}

/// The lines of `output` that start with `prefix` (e.g. "probe "), each as a map of its
/// NAME=VALUE words; the workers of the launch tests report what they saw this way.
inline std::vector<std::map<std::string, std::string>> key_value_lines(const std::string& output,
                                                                       const std::string& prefix) {
  std::vector<std::map<std::string, std::string>> all;
  for (const auto& line : split_lines(output)) {
    if (line.rfind(prefix, 0) != 0) continue;
    std::map<std::string, std::string> report;
    std::istringstream words(line.substr(prefix.size()));
    for (std::string word; words >> word;) {
      const auto eq = word.find('=');
      if (eq != std::string::npos) report[word.substr(0, eq)] = word.substr(eq + 1);
    }
    all.push_back(std::move(report));
  }
  return all;
}

}  // namespace accelerate::testing
