// A worker for the launcher's own tests: reports what the launcher gave it and misbehaves on
// request. It needs nothing from the library; it only reads its environment.
//
//   launch_probe args A B ...    prints "argc=N" and one "argv[i]=<A>|" line per argument
//   launch_probe [flags]         flags, in any order:
//     --print-env                one line "probe RANK=0 WORLD_SIZE=2 ... " (<unset> when unset)
//     --pid-dir DIR              writes its pid to DIR/<RANK>.pid before anything else
//     --lines N                  N lines to stdout and N to stderr, each written in pieces
//     --fail-rank R              the rank that fails, after --fail-after seconds (default 0.5):
//     --wait-for-pids N            counted from when N pid files exist in --pid-dir, so that a
//                                  test knows every worker it must see stopped
//     --exit-code C                by exiting with C (default 3)
//     --signal NAME              or by raising SEGV, KILL, ABRT or TERM
//     --sleep S                  every other rank sleeps S seconds (default 0), then exits 0
//     --ignore-sigterm           ignore SIGTERM (the launcher must fall back to SIGKILL)

#include "probe_util.h"

#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace {

using probe::env_or;
using probe::write_all;

void sleep_seconds(double s) {
  std::this_thread::sleep_for(std::chrono::duration<double>(s));
}

int signal_number(const std::string& name) {
  static const std::map<std::string, int> known = {
      {"SEGV", SIGSEGV}, {"KILL", SIGKILL}, {"ABRT", SIGABRT}, {"TERM", SIGTERM}};
  auto it = known.find(name);
  return it == known.end() ? 0 : it->second;
}

int count_pid_files(const std::string& dir) {
  if (dir.empty()) return 0;
  int n = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    n += entry.path().extension() == ".pid" ? 1 : 0;
  }
  return n;
}

int print_args(int argc, char** argv) {
  // One write for the whole report, so that nothing else lands inside it.
  std::string out = "argc=" + std::to_string(argc - 2) + "\n";
  for (int i = 2; i < argc; ++i) {
    out += "argv[" + std::to_string(i - 2) + "]=" + argv[i] + "|\n";
  }
  write_all(STDOUT_FILENO, out);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "args") == 0) return print_args(argc, argv);

  bool print_env = false;
  bool ignore_sigterm = false;
  std::string pid_dir;
  int lines = 0;
  std::optional<int> fail_rank;
  int exit_code = 3;
  double fail_after = 0.5;
  double sleep_for = 0.0;
  int wait_for_pids = 0;
  std::string signal_name;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        write_all(STDERR_FILENO, "launch_probe: " + arg + " needs a value\n");
        std::exit(64);
      }
      return argv[++i];
    };
    if (arg == "--print-env") {
      print_env = true;
    } else if (arg == "--ignore-sigterm") {
      ignore_sigterm = true;
    } else if (arg == "--pid-dir") {
      pid_dir = value();
    } else if (arg == "--lines") {
      lines = std::stoi(value());
    } else if (arg == "--fail-rank") {
      fail_rank = std::stoi(value());
    } else if (arg == "--exit-code") {
      exit_code = std::stoi(value());
    } else if (arg == "--fail-after") {
      fail_after = std::stod(value());
    } else if (arg == "--sleep") {
      sleep_for = std::stod(value());
    } else if (arg == "--wait-for-pids") {
      wait_for_pids = std::stoi(value());
    } else if (arg == "--signal") {
      signal_name = value();
    } else {
      write_all(STDERR_FILENO, "launch_probe: unknown argument " + arg + "\n");
      return 64;
    }
  }

  const std::string rank_text = env_or("RANK", "-1");
  const int rank = std::atoi(rank_text.c_str());
  if (ignore_sigterm) ::signal(SIGTERM, SIG_IGN);
  if (!pid_dir.empty()) {
    probe::write_pid_file(pid_dir + "/" + rank_text + ".pid");
  }

  if (print_env) {
    static const char* const kNames[] = {"RANK",
                                         "WORLD_SIZE",
                                         "LOCAL_RANK",
                                         "LOCAL_WORLD_SIZE",
                                         "GROUP_RANK",
                                         "MASTER_ADDR",
                                         "MASTER_PORT",
                                         "ACCELERATE_USE_CPU",
                                         "ACCELERATE_MIXED_PRECISION",
                                         "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
                                         "ACCELERATE_DEBUG_MODE",
                                         "OMP_NUM_THREADS",
                                         "OPENBLAS_NUM_THREADS",
                                         "MKL_NUM_THREADS",
                                         "GLIBC_TUNABLES"};
    std::string line = "probe";
    for (const char* name : kNames) line += std::string(" ") + name + "=" + env_or(name, "<unset>");
    write_all(STDOUT_FILENO, line + "\n");
  }

  for (int i = 0; i < lines; ++i) {
    // Each line goes out in three writes with pauses between them: the launcher must still
    // deliver it whole, never mixed with another rank's line.
    for (int fd : {STDOUT_FILENO, STDERR_FILENO}) {
      const std::string stream = fd == STDOUT_FILENO ? "out" : "err";
      write_all(fd, "line " + std::to_string(i));
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
      write_all(fd, " of rank " + rank_text);
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
      write_all(fd, " on std" + stream + "\n");
    }
  }

  if (fail_rank && rank == *fail_rank) {
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (count_pid_files(pid_dir) < wait_for_pids && std::chrono::steady_clock::now() < give_up) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    sleep_seconds(fail_after);
    if (!signal_name.empty()) {
      const int sig = signal_number(signal_name);
      if (sig == 0) {
        write_all(STDERR_FILENO, "launch_probe: unknown signal " + signal_name + "\n");
        return 64;
      }
      // A crash on purpose should not leave a core file behind.
      rlimit no_core{0, 0};
      ::setrlimit(RLIMIT_CORE, &no_core);
      ::signal(sig, SIG_DFL);
      ::raise(sig);
    }
    return exit_code;
  }
  sleep_seconds(sleep_for);
  return 0;
}
