#include "supervisor.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>

namespace accelerate::cli {
namespace {

using Clock = std::chrono::steady_clock;

// A line longer than this is passed on in pieces, each with its prefix, so that a worker printing
// without newlines cannot grow the launcher's memory without bound.
constexpr std::size_t kMaxPendingLine = 1 << 20;
// After the last worker is reaped, how long we keep reading output that is still in flight. Only a
// process the worker left behind could still be writing; we do not wait for it.
constexpr auto kFinalDrain = std::chrono::milliseconds(500);

std::string signal_name(int sig) {
  const char* abbrev = ::sigabbrev_np(sig);
  return abbrev != nullptr ? std::string("SIG") + abbrev : "signal " + std::to_string(sig);
}

// Writes all of `data` to `fd`. Errors are dropped: a closed stdout must not stop supervision.
void write_all(int fd, const char* data, std::size_t size) {
  while (size > 0) {
    const ssize_t n = ::write(fd, data, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;
    }
    data += n;
    size -= static_cast<std::size_t>(n);
  }
}

void say(const SupervisorOptions& options, const std::string& message) {
  const std::string line = options.name + ": " + message + "\n";
  write_all(STDERR_FILENO, line.data(), line.size());
}

// Blocks the signals the supervisor handles and delivers them through a signalfd, so that the main
// loop handles SIGCHLD, worker output and shutdown requests in one poll() with no async handlers.
// Restores the signal mask and SIGPIPE disposition on destruction; workers get the originals back
// before exec.
class SignalChannel {
 public:
  SignalChannel() {
    sigset_t handled;
    sigemptyset(&handled);
    sigaddset(&handled, SIGCHLD);
    sigaddset(&handled, SIGINT);
    sigaddset(&handled, SIGTERM);
    // Under nohup SIGHUP is ignored on purpose; watching it would undo that.
    struct sigaction hup {};
    ::sigaction(SIGHUP, nullptr, &hup);
    if (hup.sa_handler != SIG_IGN) sigaddset(&handled, SIGHUP);
    if (::sigprocmask(SIG_BLOCK, &handled, &original_mask_) != 0) {
      throw std::runtime_error(std::string("sigprocmask: ") + std::strerror(errno));
    }
    fd_ = ::signalfd(-1, &handled, SFD_CLOEXEC | SFD_NONBLOCK);
    if (fd_ < 0) {
      const int err = errno;
      ::sigprocmask(SIG_SETMASK, &original_mask_, nullptr);
      throw std::runtime_error(std::string("signalfd: ") + std::strerror(err));
    }
    // Relaying worker output into a closed pipe must not kill the launcher (and with it, through
    // PR_SET_PDEATHSIG, the whole job).
    struct sigaction ignore {};
    ignore.sa_handler = SIG_IGN;
    sigemptyset(&ignore.sa_mask);
    ::sigaction(SIGPIPE, &ignore, &original_sigpipe_);
  }
  SignalChannel(const SignalChannel&) = delete;
  SignalChannel& operator=(const SignalChannel&) = delete;
  ~SignalChannel() {
    ::sigaction(SIGPIPE, &original_sigpipe_, nullptr);
    ::close(fd_);
    ::sigprocmask(SIG_SETMASK, &original_mask_, nullptr);
  }

  int fd() const { return fd_; }
  const sigset_t& original_mask() const { return original_mask_; }
  const struct sigaction& original_sigpipe() const { return original_sigpipe_; }

  /// Next pending signal, if any.
  std::optional<int> next() {
    signalfd_siginfo info{};
    const ssize_t n = ::read(fd_, &info, sizeof(info));
    if (n != static_cast<ssize_t>(sizeof(info))) return std::nullopt;
    return static_cast<int>(info.ssi_signo);
  }

 private:
  int fd_ = -1;
  sigset_t original_mask_{};
  struct sigaction original_sigpipe_ {};
};

// One worker stream (stdout or stderr) that we relay line by line with a prefix.
struct Relay {
  int fd = -1;
  int target_fd = -1;
  std::string prefix;
  std::string pending;

  void emit(std::string_view line) {
    std::string out;
    out.reserve(prefix.size() + line.size() + 1);
    out.append(prefix).append(line).push_back('\n');
    // One write per line: lines of different workers never interleave within a line.
    write_all(target_fd, out.data(), out.size());
  }

  // Reads once; returns false at EOF or error (the relay is then closed).
  bool read_once() {
    char buf[65536];
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return true;
    if (n <= 0) {
      close();
      return false;
    }
    pending.append(buf, static_cast<std::size_t>(n));
    std::size_t start = 0;
    for (std::size_t nl; (nl = pending.find('\n', start)) != std::string::npos; start = nl + 1) {
      emit(std::string_view(pending).substr(start, nl - start));
    }
    pending.erase(0, start);
    if (pending.size() >= kMaxPendingLine) {
      emit(pending);
      pending.clear();
    }
    return true;
  }

  void close() {
    if (fd < 0) return;
    ::close(fd);
    fd = -1;
    // A last line without its newline still gets out.
    if (!pending.empty()) emit(pending);
    pending.clear();
  }
};

struct Worker {
  const WorkerSpec* spec = nullptr;
  pid_t pid = -1;
  bool running = false;
};

// Argument and environment arrays for execve, built before fork: after fork only
// async-signal-safe calls are allowed.
struct ExecArgs {
  std::vector<std::string> storage_argv;
  std::vector<std::string> storage_env;
  std::vector<char*> argv;
  std::vector<char*> envp;

  explicit ExecArgs(const WorkerSpec& spec) : storage_argv(spec.argv), storage_env(spec.env) {
    for (auto& a : storage_argv) argv.push_back(a.data());
    argv.push_back(nullptr);
    for (auto& e : storage_env) envp.push_back(e.data());
    envp.push_back(nullptr);
  }
};

class Supervisor {
 public:
  Supervisor(const std::vector<WorkerSpec>& specs, const SupervisorOptions& options)
      : options_(options) {
    for (const auto& spec : specs) workers_.push_back({.spec = &spec});
  }
  Supervisor(const Supervisor&) = delete;
  Supervisor& operator=(const Supervisor&) = delete;
  ~Supervisor() {
    // Only reached with workers still running if something threw: never leave them behind.
    for (auto& w : workers_) {
      if (!w.running) continue;
      signal_worker(w, SIGKILL);
      while (::waitpid(w.pid, nullptr, 0) < 0 && errno == EINTR) {
      }
    }
    for (auto& r : relays_) r.close();
  }

  int run() {
    // Workers' stdin: when it is a terminal, they could not read it anyway (each runs in its own
    // process group, in the background as far as the terminal is concerned, and would be stopped
    // by SIGTTIN), so give them /dev/null instead of a hang.
    if (::isatty(STDIN_FILENO)) devnull_ = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    for (auto& w : workers_) {
      if (!start(w)) {
        begin_shutdown(kWorkerFailedExitCode);
        break;
      }
    }
    loop();
    if (devnull_ >= 0) ::close(devnull_);
    return exit_code_.value_or(0);
  }

 private:
  bool start(Worker& w) {
    int out_pipe[2] = {-1, -1};
    int err_pipe[2] = {-1, -1};
    if (options_.rank_prefix) {
      if (::pipe2(out_pipe, O_CLOEXEC) != 0) {
        say(options_, "cannot create a pipe: " + std::string(std::strerror(errno)));
        return false;
      }
      if (::pipe2(err_pipe, O_CLOEXEC) != 0) {
        say(options_, "cannot create a pipe: " + std::string(std::strerror(errno)));
        ::close(out_pipe[0]);
        ::close(out_pipe[1]);
        return false;
      }
    }
    ExecArgs exec_args(*w.spec);
    const pid_t parent = ::getpid();
    const pid_t pid = ::fork();
    if (pid < 0) {
      say(options_,
          "cannot start rank " + std::to_string(w.spec->rank) + ": fork: " + std::strerror(errno));
      for (int fd : {out_pipe[0], out_pipe[1], err_pipe[0], err_pipe[1]}) {
        if (fd >= 0) ::close(fd);
      }
      return false;
    }
    if (pid == 0) exec_worker(*w.spec, exec_args, parent, out_pipe[1], err_pipe[1]);

    // Also from this side, so that signalling the group right away cannot race the child.
    ::setpgid(pid, pid);
    w.pid = pid;
    w.running = true;
    if (options_.rank_prefix) {
      ::close(out_pipe[1]);
      ::close(err_pipe[1]);
      const std::string prefix = "[rank " + std::to_string(w.spec->rank) + "] ";
      relays_.push_back({.fd = out_pipe[0], .target_fd = STDOUT_FILENO, .prefix = prefix});
      relays_.push_back({.fd = err_pipe[0], .target_fd = STDERR_FILENO, .prefix = prefix});
    }
    return true;
  }

  // In the child: only async-signal-safe calls from here on.
  [[noreturn]] void exec_worker(const WorkerSpec& spec, ExecArgs& exec_args, pid_t parent,
                                int out_fd, int err_fd) {
    // Own process group: stopping the job reaches whatever the worker started too.
    ::setpgid(0, 0);
    // Dies with the launcher even when the launcher is SIGKILLed and cannot clean up.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    // The launcher may have died before prctl: then nobody would deliver that SIGKILL.
    if (::getppid() != parent) ::_exit(126);
    ::sigaction(SIGPIPE, &signals_.original_sigpipe(), nullptr);
    ::sigprocmask(SIG_SETMASK, &signals_.original_mask(), nullptr);
    if (devnull_ >= 0) ::dup2(devnull_, STDIN_FILENO);
    if (out_fd >= 0) ::dup2(out_fd, STDOUT_FILENO);
    if (err_fd >= 0) ::dup2(err_fd, STDERR_FILENO);
    ::execve(spec.path.c_str(), exec_args.argv.data(), exec_args.envp.data());
    const char* reason = std::strerror(errno);
    const char head[] = "accelerate launch: cannot execute ";
    write_all(STDERR_FILENO, head, sizeof(head) - 1);
    write_all(STDERR_FILENO, spec.path.data(), spec.path.size());
    write_all(STDERR_FILENO, ": ", 2);
    write_all(STDERR_FILENO, reason, std::strlen(reason));
    write_all(STDERR_FILENO, "\n", 1);
    ::_exit(127);
  }

  // The worker's group, or the worker alone if it moved out of its group.
  static void signal_worker(const Worker& w, int sig) {
    if (::kill(-w.pid, sig) != 0) ::kill(w.pid, sig);
  }

  std::size_t running_count() const {
    return static_cast<std::size_t>(
        std::count_if(workers_.begin(), workers_.end(), [](const Worker& w) { return w.running; }));
  }

  void begin_shutdown(int exit_code) {
    if (exit_code_) return;
    exit_code_ = exit_code;
    kill_deadline_ = Clock::now() + options_.grace_period;
    for (auto& w : workers_) {
      if (!w.running) continue;
      signal_worker(w, SIGTERM);
      // A stopped worker would otherwise hold SIGTERM pending until SIGKILL.
      signal_worker(w, SIGCONT);
    }
  }

  void kill_remaining(const std::string& why) {
    for (auto& w : workers_) {
      if (!w.running || w.pid <= 0) continue;
      say(options_, "rank " + std::to_string(w.spec->rank) + " (local rank " +
                        std::to_string(w.spec->local_rank) + ", pid " + std::to_string(w.pid) +
                        ") " + why + "; sending SIGKILL");
      signal_worker(w, SIGKILL);
    }
    killed_ = true;
  }

  void on_worker_exit(Worker& w, int status) {
    w.running = false;
    const bool failed = !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    // Once the job is stopping, workers dying of our SIGTERM are expected, not news.
    if (!failed || exit_code_) return;
    const std::string what = WIFEXITED(status)
                                 ? "exited with code " + std::to_string(WEXITSTATUS(status))
                                 : "was killed by " + signal_name(WTERMSIG(status)) + " (" +
                                       std::string(::strsignal(WTERMSIG(status))) + ")";
    const std::size_t others = running_count();
    const std::string next = others == 0 ? "no other workers are running"
                                         : "stopping the other " + std::to_string(others) +
                                               (others == 1 ? " worker" : " workers");
    say(options_, "rank " + std::to_string(w.spec->rank) + " (local rank " +
                      std::to_string(w.spec->local_rank) + ", pid " + std::to_string(w.pid) + ") " +
                      what + "; " + next);
    begin_shutdown(kWorkerFailedExitCode);
  }

  void reap() {
    for (;;) {
      int status = 0;
      const pid_t pid = ::waitpid(-1, &status, WNOHANG);
      if (pid == 0) return;
      if (pid < 0) {
        if (errno == EINTR) continue;
        return;  // ECHILD: nothing left
      }
      for (auto& w : workers_) {
        if (w.running && w.pid == pid) {
          on_worker_exit(w, status);
          break;
        }
      }
    }
  }

  void on_signal(int sig) {
    if (sig == SIGCHLD) {
      reap();
      return;
    }
    if (!exit_code_) {
      const std::size_t n = running_count();
      say(options_, "received " + signal_name(sig) + "; stopping " + std::to_string(n) +
                        (n == 1 ? " worker" : " workers"));
      begin_shutdown(128 + sig);
    } else if (!killed_) {
      // Asked twice: the user does not want to wait out the grace period.
      kill_remaining("still running after a second " + signal_name(sig));
    }
  }

  void loop() {
    std::vector<pollfd> fds;
    while (running_count() > 0) {
      int timeout_ms = -1;
      if (exit_code_ && !killed_) {
        const auto left =
            std::chrono::duration_cast<std::chrono::milliseconds>(kill_deadline_ - Clock::now());
        if (left.count() <= 0) {
          kill_remaining("still running " + std::to_string(options_.grace_period.count()) +
                         " ms after SIGTERM");
          continue;
        }
        // Round up so we do not spin on the last sub-millisecond.
        timeout_ms = static_cast<int>(left.count()) + 1;
      }
      fds.clear();
      fds.push_back({signals_.fd(), POLLIN, 0});
      for (const auto& r : relays_) {
        if (r.fd >= 0) fds.push_back({r.fd, POLLIN, 0});
      }
      const int n = ::poll(fds.data(), fds.size(), timeout_ms);
      if (n < 0 && errno != EINTR)
        throw std::runtime_error(std::string("poll: ") + std::strerror(errno));
      if (n <= 0) continue;
      service_relays(fds);
      if (fds[0].revents != 0) {
        while (auto sig = signals_.next()) on_signal(*sig);
      }
    }
    // Every worker is gone; pass on what they wrote last, without waiting on anything they left
    // behind holding the pipe.
    const auto drain_until = Clock::now() + kFinalDrain;
    while (Clock::now() < drain_until) {
      fds.clear();
      for (const auto& r : relays_) {
        if (r.fd >= 0) fds.push_back({r.fd, POLLIN, 0});
      }
      if (fds.empty() || ::poll(fds.data(), fds.size(), 0) <= 0) break;
      service_relays(fds);
    }
    for (auto& r : relays_) r.close();
  }

  void service_relays(const std::vector<pollfd>& fds) {
    for (const auto& p : fds) {
      if (p.revents == 0 || p.fd == signals_.fd()) continue;
      for (auto& r : relays_) {
        if (r.fd == p.fd) {
          r.read_once();
          break;
        }
      }
    }
  }

  const SupervisorOptions& options_;
  SignalChannel signals_;
  std::vector<Worker> workers_;
  std::vector<Relay> relays_;
  int devnull_ = -1;
  std::optional<int> exit_code_;
  Clock::time_point kill_deadline_{};
  bool killed_ = false;
};

}  // namespace

int run_workers(const std::vector<WorkerSpec>& workers, const SupervisorOptions& options) {
  Supervisor supervisor(workers, options);
  return supervisor.run();
}

}  // namespace accelerate::cli
