#include "supervisor.h"

// Only the record's names: the command does not link the library.
#include <accelerate/env_names.h>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

namespace accelerate::cli {
namespace {

using Clock = std::chrono::steady_clock;

// A line longer than this is passed on in pieces, each with its prefix, so that a worker printing
// without newlines cannot grow the launcher's memory without bound.
constexpr std::size_t kMaxPendingLine = 1 << 20;
// After the last worker is reaped, how long we keep reading output that is still in flight. Only a
// process the worker left behind could still be writing; we do not wait for it.
constexpr auto kFinalDrain = std::chrono::milliseconds(500);
// A worker's message in the root-cause line: its first line, at most this long.
constexpr std::size_t kMaxMessageInLine = 300;

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

// How a worker ended, as the per-exit and root-cause lines say it.
std::string exit_text(int status) {
  return WIFEXITED(status) ? "exited with code " + std::to_string(WEXITSTATUS(status))
                           : "was killed by " + signal_name(WTERMSIG(status)) + " (" +
                                 std::string(::strsignal(WTERMSIG(status))) + ")";
}

// What a worker wrote about its own failure (src/detail/error_record.h).
struct FailureRecord {
  int64_t time_ns = 0;
  std::string message;
  bool caused_by_peer = false;
};

// The record at `path`, or nothing when there is none or it is not one (a worker that does not
// use the library, or that died while writing: records are renamed into place, so a torn one
// would be a bug, and is ignored rather than trusted).
std::optional<FailureRecord> read_failure_record(const std::string& path) {
  std::ifstream in(path);
  if (!in) return std::nullopt;
  std::ostringstream text;
  text << in.rdbuf();
  const auto json = nlohmann::json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  namespace field = accelerate::env::error_record_fields;
  if (!json.is_object() || !json.contains(field::kTimeNs) || !json.contains(field::kMessage) ||
      !json.contains(field::kCausedByPeer)) {
    return std::nullopt;
  }
  const auto& time_ns = json[field::kTimeNs];
  const auto& message = json[field::kMessage];
  const auto& caused_by_peer = json[field::kCausedByPeer];
  if (!time_ns.is_number_integer() || !message.is_string() || !caused_by_peer.is_boolean()) {
    return std::nullopt;
  }
  return FailureRecord{.time_ns = time_ns.get<int64_t>(),
                       .message = message.get<std::string>(),
                       .caused_by_peer = caused_by_peer.get<bool>()};
}

// A message fit for one line: its first non-empty line (C++ exceptions from LibTorch carry a
// backtrace after it), trimmed and shortened.
std::string one_line(const std::string& message) {
  std::istringstream lines(message);
  std::string line;
  while (std::getline(lines, line)) {
    const auto first = line.find_first_not_of(" \t\r");
    if (first == std::string::npos) continue;
    line = line.substr(first, line.find_last_not_of(" \t\r") - first + 1);
    if (line.size() > kMaxMessageInLine) line = line.substr(0, kMaxMessageInLine) + "...";
    return line;
  }
  return "";
}

int64_t realtime_now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// The private directory that holds one attempt's failure records; removed with them.
class RecordDir {
 public:
  RecordDir() = default;
  RecordDir(const RecordDir&) = delete;
  RecordDir& operator=(const RecordDir&) = delete;
  ~RecordDir() { remove(); }

  // Makes a fresh directory (mode 0700, mkdtemp's); false when it cannot.
  bool create() {
    remove();
    std::error_code error;
    const auto base = std::filesystem::temp_directory_path(error);
    std::string templ =
        ((error ? std::filesystem::path("/tmp") : base) / "accelerate-launch-errors-XXXXXX")
            .string();
    if (::mkdtemp(templ.data()) == nullptr) return false;
    path_ = templ;
    return true;
  }
  void remove() {
    if (path_.empty()) return;
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
    path_.clear();
  }
  bool active() const { return !path_.empty(); }
  std::string file(int rank) const { return path_ + "/rank_" + std::to_string(rank) + ".json"; }

 private:
  std::string path_;
};

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

// One worker stream (stdout or stderr) that we relay line by line: to the console with a prefix,
// to the worker's log file without one, or both.
struct Relay {
  int fd = -1;
  /// Console stream, or -1 when the lines go to the log file only.
  int target_fd = -1;
  /// The worker's log file, or -1.
  int file_fd = -1;
  std::string prefix;
  std::string pending;

  void emit(std::string_view line) {
    std::string out;
    out.reserve(prefix.size() + line.size() + 1);
    out.append(prefix).append(line).push_back('\n');
    // One write per line: lines of different workers never interleave within a line.
    if (target_fd >= 0) write_all(target_fd, out.data(), out.size());
    if (file_fd >= 0) write_all(file_fd, out.data() + prefix.size(), out.size() - prefix.size());
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

// How a worker ended, as we saw it.
struct WorkerExit {
  int status = 0;
  // When we reaped it: on the steady clock (the order we saw exits in) and on the wall clock,
  // which the workers' records use.
  std::chrono::steady_clock::time_point seen;
  int64_t seen_realtime_ns = 0;
  // A non-zero exit, or a signal that was not ours (SIGTERM or SIGKILL while we stopped the group).
  bool failed_on_its_own = false;
};

struct Worker {
  const WorkerSpec* spec = nullptr;
  pid_t pid = -1;
  bool running = false;
  std::optional<WorkerExit> exit;
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

// Where a worker's stdout and stderr go.
struct WorkerOutput {
  int out_fd = -1;  // in the child, becomes its stdout (-1: inherit ours)
  int err_fd = -1;  // in the child, becomes its stderr (-1: inherit ours)
};

class Supervisor {
 public:
  Supervisor(const WorkerFactory& make_workers, const SupervisorOptions& options)
      : make_workers_(make_workers), options_(options) {}
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
    for (const auto& [rank, fd] : log_fds_) ::close(fd);
    if (devnull_ >= 0) ::close(devnull_);
  }

  int run() {
    // Workers' stdin: when it is a terminal, they could not read it anyway (each runs in its own
    // process group, in the background as far as the terminal is concerned, and would be stopped
    // by SIGTTIN), so give them /dev/null instead of a hang.
    if (::isatty(STDIN_FILENO)) devnull_ = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    for (restart_count_ = 0;; ++restart_count_) {
      if (auto status = run_attempt()) return *status;
    }
  }

 private:
  // One group from start to the last exit. Returns the final status, or nothing when the group
  // failed and is to be started again.
  std::optional<int> run_attempt() {
    relays_.clear();
    workers_.clear();
    // workers_ points into specs_, which therefore stays put until the next attempt.
    specs_ = make_workers_(restart_count_);
    give_error_files();
    for (const auto& spec : specs_) workers_.push_back({.spec = &spec});
    stopping_ = false;
    killed_ = false;
    restart_pending_ = false;
    worker_failed_ = false;
    first_failed_ = nullptr;
    for (auto& w : workers_) {
      if (!start(w)) {
        final_status_ = kWorkerFailedExitCode;
        begin_stop();
        break;
      }
    }
    loop();
    if (restart_pending_) {
      // A stop request that came in while the last worker went still counts.
      while (auto sig = signals_.next()) on_signal(*sig);
    }
    if (worker_failed_) {
      // A final failure always gets its line; one that is about to be retried only when the
      // worker its exit line named was not the cause.
      const auto [root, line] = root_cause();
      if (!restart_pending_ || root != first_failed_) say(options_, line);
    }
    record_dir_.remove();
    if (final_status_) return final_status_;
    if (restart_pending_) return std::nullopt;
    return 0;
  }

  // Points every worker of this attempt at its own record file in a fresh directory.
  void give_error_files() {
    record_dir_.remove();
    if (options_.error_file_variable.empty()) return;
    if (!record_dir_.create()) {
      say(options_, "cannot create a directory for the workers' failure records: " +
                        std::string(std::strerror(errno)) +
                        "; a failure's root cause will be judged by exit times alone");
      return;
    }
    const std::string key = options_.error_file_variable + "=";
    for (auto& spec : specs_) {
      std::erase_if(spec.env, [&](const std::string& entry) {
        return entry.compare(0, key.size(), key) == 0;
      });
      spec.env.push_back(key + record_dir_.file(spec.rank));
    }
  }

  // "rank R (local rank L, pid P)", how our lines name a worker.
  static std::string describe(const Worker& w) {
    return "rank " + std::to_string(w.spec->rank) + " (local rank " +
           std::to_string(w.spec->local_rank) + ", pid " + std::to_string(w.pid) + ")";
  }

  // The worker whose failure the others followed, and the line that names it; see run_workers()
  // in the header.
  std::pair<const Worker*, std::string> root_cause() const {
    struct Failure {
      const Worker* worker;
      std::optional<FailureRecord> record;
      int64_t time_ns;
      bool on_its_own_account;  // no record, or one that does not blame a peer
    };
    std::vector<Failure> failures;
    for (const auto& w : workers_) {
      if (!w.exit) continue;
      auto record =
          record_dir_.active() ? read_failure_record(record_dir_.file(w.spec->rank)) : std::nullopt;
      // A worker that recorded a failure failed, even if our stopping it ended it afterwards.
      if (!w.exit->failed_on_its_own && !record) continue;
      const int64_t time_ns = record ? record->time_ns : w.exit->seen_realtime_ns;
      const bool own = !record || !record->caused_by_peer;
      failures.push_back({&w, std::move(record), time_ns, own});
    }
    // Earliest first; exits we saw earlier break ties.
    std::stable_sort(failures.begin(), failures.end(), [](const Failure& a, const Failure& b) {
      if (a.time_ns != b.time_ns) return a.time_ns < b.time_ns;
      return a.worker->exit->seen < b.worker->exit->seen;
    });
    if (failures.empty()) return {nullptr, "root cause: unknown (no worker failed on its own)"};
    auto root = std::find_if(failures.begin(), failures.end(),
                             [](const Failure& f) { return f.on_its_own_account; });
    if (root == failures.end()) root = failures.begin();
    std::string line =
        "root cause: " + describe(*root->worker) + " " + exit_text(root->worker->exit->status);
    if (root->record && !one_line(root->record->message).empty()) {
      line += ": " + one_line(root->record->message);
    }
    std::string after;
    for (auto it = failures.begin(); it != failures.end(); ++it) {
      if (it == root) continue;
      after += "; rank " + std::to_string(it->worker->spec->rank) + " failed after it";
      if (it->record && !one_line(it->record->message).empty()) {
        after += ": " + one_line(it->record->message);
      }
    }
    if (!after.empty()) line += " (first failure" + after + ")";
    return {root->worker, line};
  }

  // The worker's log file, opened on first use and kept for every attempt; -1 when it cannot be
  // opened (said once).
  int log_fd(int rank) {
    auto it = log_fds_.find(rank);
    if (it != log_fds_.end()) return it->second;
    const std::string path = options_.log_dir + "/rank_" + std::to_string(rank) + ".log";
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0)
      say(options_, "cannot open " + path + ": " + std::strerror(errno));
    else
      log_fds_.emplace(rank, fd);
    return fd;
  }

  bool start(Worker& w) {
    const int rank = w.spec->rank;
    int file_fd = -1;
    if (!options_.log_dir.empty()) {
      file_fd = log_fd(rank);
      if (file_fd < 0) return false;
      const std::string header = "=== attempt " + std::to_string(restart_count_ + 1) + " ===\n";
      write_all(file_fd, header.data(), header.size());
    }
    // Without a console copy, the log file itself becomes the worker's stdout and stderr: no pipe,
    // no relaying, and the worker's own interleaving of the two streams is kept.
    const bool relay = file_fd >= 0 ? options_.tee : options_.rank_prefix;
    int out_pipe[2] = {-1, -1};
    int err_pipe[2] = {-1, -1};
    if (relay) {
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
    const WorkerOutput output = relay          ? WorkerOutput{out_pipe[1], err_pipe[1]}
                                : file_fd >= 0 ? WorkerOutput{file_fd, file_fd}
                                               : WorkerOutput{};
    ExecArgs exec_args(*w.spec);
    const pid_t parent = ::getpid();
    const pid_t pid = ::fork();
    if (pid < 0) {
      say(options_,
          "cannot start rank " + std::to_string(rank) + ": fork: " + std::strerror(errno));
      for (int fd : {out_pipe[0], out_pipe[1], err_pipe[0], err_pipe[1]}) {
        if (fd >= 0) ::close(fd);
      }
      return false;
    }
    if (pid == 0) exec_worker(*w.spec, exec_args, parent, output);

    // Also from this side, so that signalling the group right away cannot race the child.
    ::setpgid(pid, pid);
    w.pid = pid;
    w.running = true;
    if (relay) {
      ::close(out_pipe[1]);
      ::close(err_pipe[1]);
      const bool to_console = file_fd < 0 || options_.tee;
      const std::string prefix = "[rank " + std::to_string(rank) + "] ";
      relays_.push_back({.fd = out_pipe[0],
                         .target_fd = to_console ? STDOUT_FILENO : -1,
                         .file_fd = file_fd,
                         .prefix = prefix});
      relays_.push_back({.fd = err_pipe[0],
                         .target_fd = to_console ? STDERR_FILENO : -1,
                         .file_fd = file_fd,
                         .prefix = prefix});
    }
    return true;
  }

  // In the child: only async-signal-safe calls from here on.
  [[noreturn]] void exec_worker(const WorkerSpec& spec, ExecArgs& exec_args, pid_t parent,
                                WorkerOutput output) {
    // Own process group: stopping the job reaches whatever the worker started too.
    ::setpgid(0, 0);
    // Dies with the launcher even when the launcher is SIGKILLed and cannot clean up.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    // The launcher may have died before prctl: then nobody would deliver that SIGKILL.
    if (::getppid() != parent) ::_exit(126);
    ::sigaction(SIGPIPE, &signals_.original_sigpipe(), nullptr);
    ::sigprocmask(SIG_SETMASK, &signals_.original_mask(), nullptr);
    if (devnull_ >= 0) ::dup2(devnull_, STDIN_FILENO);
    if (output.out_fd >= 0) ::dup2(output.out_fd, STDOUT_FILENO);
    if (output.err_fd >= 0) ::dup2(output.err_fd, STDERR_FILENO);
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

  static std::string workers_text(std::size_t n) {
    return std::to_string(n) + (n == 1 ? " worker" : " workers");
  }

  void begin_stop() {
    if (stopping_) return;
    stopping_ = true;
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
      say(options_, describe(w) + " " + why + "; sending SIGKILL");
      signal_worker(w, SIGKILL);
    }
    killed_ = true;
  }

  void on_worker_exit(Worker& w, int status) {
    w.running = false;
    const bool failed = !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    const bool stopped_by_us = stopping_ && WIFSIGNALED(status) &&
                               (WTERMSIG(status) == SIGTERM || WTERMSIG(status) == SIGKILL);
    w.exit = WorkerExit{.status = status,
                        .seen = Clock::now(),
                        .seen_realtime_ns = realtime_now_ns(),
                        .failed_on_its_own = failed && !stopped_by_us};
    // Once the group is stopping, workers dying of our SIGTERM are expected, not news.
    if (!failed || stopping_) return;
    worker_failed_ = true;
    first_failed_ = &w;
    const std::string what = exit_text(status);
    std::string next;
    if (restart_count_ < options_.max_restarts) {
      restart_pending_ = true;
      next = "restarting all " + workers_text(workers_.size()) + " (restart " +
             std::to_string(restart_count_ + 1) + " of " + std::to_string(options_.max_restarts) +
             ")";
    } else {
      final_status_ = kWorkerFailedExitCode;
      const std::size_t others = running_count();
      next = others == 0 ? "no other workers are running"
                         : "stopping the other " + workers_text(others);
      if (options_.max_restarts > 0) {
        next += "; no restarts left (--max_restarts " + std::to_string(options_.max_restarts) + ")";
      }
    }
    say(options_, describe(w) + " " + what + "; " + next);
    begin_stop();
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
    if (!final_status_) {
      final_status_ = 128 + sig;
      const std::size_t n = running_count();
      std::string what = "received " + signal_name(sig) + "; ";
      if (restart_pending_) {
        // A stop request outranks the restart a failure asked for.
        restart_pending_ = false;
        what += n == 0 ? "not restarting" : "stopping " + workers_text(n) + " without restarting";
      } else {
        what += "stopping " + workers_text(n);
      }
      say(options_, what);
      begin_stop();
    } else if (!killed_) {
      // Asked twice: the user does not want to wait out the grace period.
      kill_remaining("still running after a second " + signal_name(sig));
    }
  }

  void loop() {
    std::vector<pollfd> fds;
    const int interval_ms = static_cast<int>(
        std::max<std::chrono::milliseconds::rep>(1, options_.monitor_interval.count()));
    while (running_count() > 0) {
      int timeout_ms = interval_ms;
      if (stopping_ && !killed_) {
        const auto left =
            std::chrono::duration_cast<std::chrono::milliseconds>(kill_deadline_ - Clock::now());
        if (left.count() <= 0) {
          kill_remaining("still running " + std::to_string(options_.grace_period.count()) +
                         " ms after SIGTERM");
          continue;
        }
        // Round up so we do not spin on the last sub-millisecond.
        timeout_ms = std::min(timeout_ms, static_cast<int>(left.count()) + 1);
      }
      fds.clear();
      fds.push_back({signals_.fd(), POLLIN, 0});
      for (const auto& r : relays_) {
        if (r.fd >= 0) fds.push_back({r.fd, POLLIN, 0});
      }
      const int n = ::poll(fds.data(), fds.size(), timeout_ms);
      if (n < 0 && errno != EINTR)
        throw std::runtime_error(std::string("poll: ") + std::strerror(errno));
      if (n == 0) {
        // SIGCHLD reports every exit as it happens; this periodic look is torchrun's
        // --monitor_interval, kept as a backstop that costs one waitpid() per interval.
        reap();
        continue;
      }
      if (n < 0) continue;
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

  const WorkerFactory& make_workers_;
  const SupervisorOptions& options_;
  SignalChannel signals_;
  std::vector<WorkerSpec> specs_;
  std::vector<Worker> workers_;
  std::vector<Relay> relays_;
  // rank -> its log file, open across attempts.
  std::map<int, int> log_fds_;
  int devnull_ = -1;
  int restart_count_ = 0;
  // Set once the outcome is decided: a signal to us, or a failure with no restart left.
  std::optional<int> final_status_;
  // This attempt failed and another one is due.
  bool restart_pending_ = false;
  // A worker of this attempt failed (not merely died of our stopping the group).
  bool worker_failed_ = false;
  // The worker whose failure the exit lines reported (the first one we saw).
  const Worker* first_failed_ = nullptr;
  // Where this attempt's workers write their failure records.
  RecordDir record_dir_;
  bool stopping_ = false;
  Clock::time_point kill_deadline_{};
  bool killed_ = false;
};

}  // namespace

int run_workers(const WorkerFactory& make_workers, const SupervisorOptions& options) {
  Supervisor supervisor(make_workers, options);
  return supervisor.run();
}

int run_workers(const std::vector<WorkerSpec>& workers, const SupervisorOptions& options) {
  return run_workers([&](int) { return workers; }, options);
}

}  // namespace accelerate::cli
