// A worker for the launcher's restart and log tests: reports which attempt it belongs to and
// fails on request in early attempts only, so that a test can watch a job recover. Like
// launch_probe it needs nothing from the library, so it starts in milliseconds.
//
//   restart_probe [flags], in any order:
//     --report          one line "restart RANK=0 ACCELERATE_RESTART_COUNT=1 ..." (<unset> when
//     unset)
//     --pid-dir DIR     writes its pid to DIR/<restart count>_<RANK>.pid before anything else
//     --lines N         N lines "out rank R attempt C line I" to stdout, each followed by the
//                       same line with "err" to stderr
//     --barrier DIR     then waits until every rank of this attempt got here (files in DIR), so
//                       that a failure cannot stop a rank before it has written its lines
//     --fail-rank R     the rank that exits with --exit-code (default 3) ...
//     --fail-until N      ... while ACCELERATE_RESTART_COUNT < N (default: in every attempt)
//     --sleep S         then sleeps S seconds (default 0) and exits 0 ...
//     --sleep-until N     ... only while ACCELERATE_RESTART_COUNT < N (default: in every attempt)

#include "probe_util.h"

#include <unistd.h>

#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <thread>

namespace {

using probe::env_or;
using probe::write_all;

}  // namespace

int main(int argc, char** argv) {
  bool report = false;
  std::string pid_dir;
  std::string barrier_dir;
  int lines = 0;
  std::optional<int> fail_rank;
  int fail_until = INT_MAX;
  int exit_code = 3;
  double sleep_for = 0.0;
  int sleep_until = INT_MAX;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        write_all(STDERR_FILENO, "restart_probe: " + arg + " needs a value\n");
        std::exit(64);
      }
      return argv[++i];
    };
    if (arg == "--report") {
      report = true;
    } else if (arg == "--pid-dir") {
      pid_dir = value();
    } else if (arg == "--barrier") {
      barrier_dir = value();
    } else if (arg == "--lines") {
      lines = std::stoi(value());
    } else if (arg == "--fail-rank") {
      fail_rank = std::stoi(value());
    } else if (arg == "--fail-until") {
      fail_until = std::stoi(value());
    } else if (arg == "--exit-code") {
      exit_code = std::stoi(value());
    } else if (arg == "--sleep") {
      sleep_for = std::stod(value());
    } else if (arg == "--sleep-until") {
      sleep_until = std::stoi(value());
    } else {
      write_all(STDERR_FILENO, "restart_probe: unknown argument " + arg + "\n");
      return 64;
    }
  }

  const std::string rank_text = env_or("RANK", "-1");
  const std::string restart_text = env_or("ACCELERATE_RESTART_COUNT", "-1");
  const int rank = std::atoi(rank_text.c_str());
  const int restart = std::atoi(restart_text.c_str());
  if (!pid_dir.empty()) {
    probe::write_pid_file(pid_dir + "/" + restart_text + "_" + rank_text + ".pid");
  }
  if (report) {
    std::string line = "restart";
    for (const char* name : {"RANK", "WORLD_SIZE", "ACCELERATE_RESTART_COUNT",
                             "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                             "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "ACCELERATE_MIXED_PRECISION"}) {
      line += std::string(" ") + name + "=" + env_or(name, "<unset>");
    }
    write_all(STDOUT_FILENO, line + "\n");
  }
  for (int i = 0; i < lines; ++i) {
    const std::string tail =
        " rank " + rank_text + " attempt " + restart_text + " line " + std::to_string(i) + "\n";
    write_all(STDOUT_FILENO, "out" + tail);
    write_all(STDERR_FILENO, "err" + tail);
  }
  if (!barrier_dir.empty()) {
    const std::filesystem::path dir(barrier_dir);
    std::ofstream(dir / (restart_text + "_" + rank_text + ".arrived")) << "\n";
    const int world_size = std::atoi(env_or("WORLD_SIZE", "1").c_str());
    auto arrived = [&] {
      int n = 0;
      for (const auto& entry : std::filesystem::directory_iterator(dir)) {
        const std::string name = entry.path().filename().string();
        n += name.rfind(restart_text + "_", 0) == 0 && entry.path().extension() == ".arrived";
      }
      return n;
    };
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (arrived() < world_size && std::chrono::steady_clock::now() < give_up) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  }
  if (fail_rank && rank == *fail_rank && restart < fail_until) return exit_code;
  if (restart < sleep_until) {
    std::this_thread::sleep_for(std::chrono::duration<double>(sleep_for));
  }
  return 0;
}
