// `accelerate test [--config_file F] [--num_processes N]`: runs the end-to-end test script
// (tools/test_script) through `accelerate launch`, as Python Accelerate's `accelerate test` does,
// and says in one line whether this machine is ready for distributed training.
#include "command.h"

#include <poll.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

extern char** environ;

namespace accelerate::cli {
namespace {

namespace fs = std::filesystem;

// Installed next to `accelerate` (tools/test_script/CMakeLists.txt).
constexpr const char* kTestScriptName = "accelerate-test-script";
// What the test script prints for each failed check: "... CHECK FAILED [<check>] ...".
constexpr std::string_view kFailureMarker = "CHECK FAILED [";
constexpr const char* kSuccessMessage =
    "Test is a success! You are ready for your distributed training!";

std::string self_path() {
  std::error_code ec;
  const fs::path p = fs::read_symlink("/proc/self/exe", ec);
  if (ec) throw std::runtime_error("cannot find the accelerate executable: " + ec.message());
  return p.string();
}

// Copies a child's output stream to ours as it comes, and remembers the checks its lines report
// as failed, so that the verdict can name them.
class OutputScanner {
 public:
  explicit OutputScanner(std::ostream& out) : out_(out) {}

  void feed(const char* data, std::size_t size) {
    out_.write(data, static_cast<std::streamsize>(size));
    out_.flush();
    pending_.append(data, size);
    for (std::size_t nl; (nl = pending_.find('\n')) != std::string::npos;) {
      scan(pending_.substr(0, nl));
      pending_.erase(0, nl + 1);
    }
  }
  void finish() {
    if (!pending_.empty()) scan(pending_);
    pending_.clear();
  }

  void add_failed_checks(std::vector<std::string>& checks) const {
    for (const auto& c : failed_) {
      if (std::find(checks.begin(), checks.end(), c) == checks.end()) checks.push_back(c);
    }
  }

 private:
  void scan(const std::string& line) {
    const auto at = line.find(kFailureMarker);
    if (at == std::string::npos) return;
    const auto start = at + kFailureMarker.size();
    const auto end = line.find(']', start);
    if (end != std::string::npos) failed_.push_back(line.substr(start, end - start));
  }

  std::ostream& out_;
  std::string pending_;
  std::vector<std::string> failed_;
};

struct ChildResult {
  int exit_code = 1;
  std::string description;
  std::vector<std::string> failed_checks;
};

// Runs argv with its stdout and stderr passed through to ours.
ChildResult run_and_scan(const std::vector<std::string>& argv) {
  int out_pipe[2];
  int err_pipe[2];
  if (::pipe(out_pipe) != 0) throw std::runtime_error(std::string("pipe: ") + std::strerror(errno));
  if (::pipe(err_pipe) != 0) {
    ::close(out_pipe[0]);
    ::close(out_pipe[1]);
    throw std::runtime_error(std::string("pipe: ") + std::strerror(errno));
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, out_pipe[1], STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&actions, err_pipe[1], STDERR_FILENO);
  for (int fd : {out_pipe[0], out_pipe[1], err_pipe[0], err_pipe[1]}) {
    posix_spawn_file_actions_addclose(&actions, fd);
  }
  std::vector<std::string> args = argv;
  std::vector<char*> cargv;
  for (auto& a : args) cargv.push_back(a.data());
  cargv.push_back(nullptr);
  pid_t pid = -1;
  const int rc = ::posix_spawn(&pid, cargv[0], &actions, nullptr, cargv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  if (rc != 0) {
    ::close(out_pipe[0]);
    ::close(err_pipe[0]);
    throw std::runtime_error("cannot start " + argv[0] + ": " + std::strerror(rc));
  }

  OutputScanner out(std::cout);
  OutputScanner err(std::cerr);
  pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  OutputScanner* scanners[2] = {&out, &err};
  int open_streams = 2;
  while (open_streams > 0) {
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0) continue;
      char buf[8192];
      const ssize_t got = ::read(fds[i].fd, buf, sizeof(buf));
      if (got > 0) {
        scanners[i]->feed(buf, static_cast<std::size_t>(got));
      } else if (got == 0 || errno != EINTR) {
        ::close(fds[i].fd);
        fds[i].fd = -1;
        --open_streams;
      }
    }
  }
  for (int i = 0; i < 2; ++i) {
    if (fds[i].fd >= 0) ::close(fds[i].fd);
  }
  out.finish();
  err.finish();

  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  // exit_code stays 1 for a launcher killed by a signal.
  ChildResult result;
  if (WIFEXITED(status)) {
    result.exit_code = WEXITSTATUS(status);
    result.description = "exited with status " + std::to_string(result.exit_code);
  } else if (WIFSIGNALED(status)) {
    result.description = std::string("was killed by signal ") + strsignal(WTERMSIG(status));
  }
  out.add_failed_checks(result.failed_checks);
  err.add_failed_checks(result.failed_checks);
  return result;
}

class TestCommand final : public Command {
 public:
  std::string_view name() const override { return "test"; }
  std::string_view summary() const override {
    return "Check that distributed training works here: runs a test script through launch";
  }

  void add_options(CLI::App& app) override {
    config_file_ = app.add_option("--config_file", config_file_value_,
                                  "Config file for `accelerate launch` (default: the one launch "
                                  "uses by itself)")
                       ->check(CLI::ExistingFile);
    num_processes_ = app.add_option("-n,--num_processes", num_processes_value_,
                                    "Processes to test with, passed to `accelerate launch` "
                                    "(default: the config file's, else 1)")
                         ->check(CLI::PositiveNumber);
    app.footer(
        "Runs `accelerate launch [--config_file F] [-n N] accelerate-test-script`, the test "
        "program installed next to `accelerate`. Every process checks its process state, the "
        "collectives (gather, reduce, broadcast, gather_object, broadcast_object_list, "
        "pad_across_processes), a prepared data loader with gather_for_metrics, a short "
        "data-parallel training with AdamW and a save_state/load_state round trip.\n"
        "Exit status: 0 when every check passed on every process, 1 otherwise (the failed "
        "checks are named), 2 for a bad command line.");
  }

  int run() override {
    const std::string self = self_path();
    const fs::path script = fs::path(self).parent_path() / kTestScriptName;
    if (::access(script.c_str(), X_OK) != 0) {
      std::cerr << "accelerate test: the test program " << script.string()
                << " is missing; install it next to accelerate (it is built as the "
                   "accelerate_test_script target)"
                << std::endl;
      return 1;
    }
    std::vector<std::string> argv = {self, "launch"};
    if (config_file_->count() > 0) {
      argv.push_back("--config_file");
      argv.push_back(config_file_value_);
    }
    if (num_processes_->count() > 0) {
      argv.push_back("--num_processes");
      argv.push_back(std::to_string(num_processes_value_));
    }
    argv.push_back(script.string());
    std::cout << "Running: ";
    for (const auto& a : argv) std::cout << (&a == &argv.front() ? "accelerate" : " " + a);
    std::cout << std::endl;

    const ChildResult result = run_and_scan(argv);
    if (result.exit_code == 0) {
      std::cout << kSuccessMessage << std::endl;
      return 0;
    }
    std::string verdict = "Test failed: ";
    if (!result.failed_checks.empty()) {
      verdict += "these checks failed: ";
      for (std::size_t i = 0; i < result.failed_checks.size(); ++i) {
        verdict += (i > 0 ? ", " : "") + result.failed_checks[i];
      }
      verdict += " (accelerate launch " + result.description + "; the output above says why)";
    } else {
      verdict += "accelerate launch " + result.description + " (the output above says why)";
    }
    std::cerr << verdict << std::endl;
    return 1;
  }

 private:
  CLI::Option* config_file_ = nullptr;
  std::string config_file_value_;
  CLI::Option* num_processes_ = nullptr;
  int num_processes_value_ = 1;
};

}  // namespace

std::unique_ptr<Command> make_test_command() {
  return std::make_unique<TestCommand>();
}

}  // namespace accelerate::cli
