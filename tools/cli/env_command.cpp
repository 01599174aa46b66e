// `accelerate env`: what a bug report needs about this installation, as a list to paste into an
// issue (Python Accelerate's env.py). The executable does not link LibTorch, so what LibTorch
// provides is what it was built against, recorded by CMake (ACCELERATE_BUILD_* definitions).
#include "command.h"
#include "config_file.h"

#include <sched.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#ifndef ACCELERATE_BUILD_VERSION
#define ACCELERATE_BUILD_VERSION "unknown"
#endif
#ifndef ACCELERATE_BUILD_TORCH_VERSION
#define ACCELERATE_BUILD_TORCH_VERSION "unknown"
#endif
#ifndef ACCELERATE_BUILD_COMPILER
#define ACCELERATE_BUILD_COMPILER "unknown"
#endif
#ifndef ACCELERATE_BUILD_TYPE
#define ACCELERATE_BUILD_TYPE "unknown"
#endif
#ifndef ACCELERATE_BUILD_TORCH_CUDA
#define ACCELERATE_BUILD_TORCH_CUDA 0
#endif
#ifndef ACCELERATE_BUILD_TORCH_NCCL
#define ACCELERATE_BUILD_TORCH_NCCL 0
#endif

namespace accelerate::cli {
namespace {

namespace fs = std::filesystem;

// Variables that change how many threads a worker runs, and so its speed.
const std::vector<std::string> kThreadVariables = {"OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                   "OPENBLAS_NUM_THREADS"};

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string platform() {
  utsname u{};
  if (::uname(&u) != 0) return "unknown";
  std::string out = std::string(u.sysname) + " " + u.release + " " + u.machine;
  // PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
  std::istringstream os_release(read_file("/etc/os-release"));
  for (std::string line; std::getline(os_release, line);) {
    if (line.rfind("PRETTY_NAME=", 0) != 0) continue;
    std::string name = line.substr(12);
    name.erase(std::remove(name.begin(), name.end(), '"'), name.end());
    out += " (" + name + ")";
  }
  return out;
}

std::string self_path() {
  std::error_code ec;
  const fs::path p = fs::read_symlink("/proc/self/exe", ec);
  return ec ? "unknown" : p.string();
}

// The NVIDIA driver lists one directory per GPU it manages; no CUDA runtime needed to count them.
int visible_nvidia_gpus() {
  std::error_code ec;
  int n = 0;
  for (fs::directory_iterator it("/proc/driver/nvidia/gpus", ec), end; !ec && it != end;
       it.increment(ec)) {
    ++n;
  }
  return n;
}

int usable_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof(set), &set) != 0) return -1;
  return CPU_COUNT(&set);
}

std::string system_ram() {
  std::istringstream meminfo(read_file("/proc/meminfo"));
  for (std::string line; std::getline(meminfo, line);) {
    if (line.rfind("MemTotal:", 0) != 0) continue;
    const double kib = std::stod(line.substr(9));
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.2f GB", kib / (1024.0 * 1024.0));
    return buf;
  }
  return "unknown";
}

class EnvCommand final : public Command {
 public:
  std::string_view name() const override { return "env"; }
  std::string_view summary() const override {
    return "Print the versions, build and machine details to paste into a bug report";
  }

  void add_options(CLI::App& app) override {
    config_file_ = app.add_option("--config_file", config_file_value_,
                                  "Config file to show (default: the one `accelerate launch` "
                                  "would use, $HF_HOME/accelerate/default_config.yaml or the "
                                  "~/.cache/huggingface one)");
  }

  int run() override {
    const auto env = current_environment();
    const bool explicit_config = config_file_->count() > 0;
    const std::string config_path = explicit_config ? config_file_value_ : default_config_path(env);
    std::error_code ec;
    const bool config_found = fs::is_regular_file(config_path, ec);
    if (explicit_config && !config_found) {
      throw UsageError("--config_file: no such file: " + config_path);
    }

    const int hardware = static_cast<int>(std::thread::hardware_concurrency());
    const int usable = usable_cpus();
    const fs::path test_script = fs::path(self_path()).parent_path() / "accelerate-test-script";

    std::vector<std::pair<std::string, std::string>> info = {
        {"`Accelerate` version", std::string(ACCELERATE_BUILD_VERSION) + " (accelerate-cpp)"},
        {"Platform", platform()},
        {"`accelerate` location", self_path()},
        {"`accelerate-test-script`",
         fs::is_regular_file(test_script, ec) ? test_script.string() : "not found"},
        {"LibTorch version (built against)", ACCELERATE_BUILD_TORCH_VERSION},
        {"Compiler", ACCELERATE_BUILD_COMPILER},
        {"Build type", ACCELERATE_BUILD_TYPE},
        {"CUDA support in LibTorch", ACCELERATE_BUILD_TORCH_CUDA ? "yes" : "no"},
        {"NCCL support in LibTorch", ACCELERATE_BUILD_TORCH_NCCL ? "yes" : "no"},
        {"NVIDIA GPUs visible", std::to_string(visible_nvidia_gpus())},
        {"CPUs", std::to_string(hardware) + " (hardware), " +
                     (usable < 0 ? std::string("unknown") : std::to_string(usable)) +
                     " usable by this process"},
        {"System RAM", system_ram()},
    };
    std::vector<std::string> variables = kThreadVariables;
    variables.push_back("CUDA_VISIBLE_DEVICES");
    // Set by hand, ACCELERATE_* variables override the launcher and the config file.
    for (const auto& [name, value] : env) {
      if (name.rfind("ACCELERATE_", 0) == 0) variables.push_back(name);
    }
    for (const auto& name : variables) {
      const auto it = env.find(name);
      info.emplace_back(name, it == env.end() ? "not set" : it->second);
    }

    std::cout << "\nCopy-and-paste the text below in your GitHub issue\n\n";
    for (const auto& [key, value] : info) std::cout << "- " << key << ": " << value << "\n";
    std::cout << (explicit_config ? "- `Accelerate` config passed: "
                                  : "- `Accelerate` default config: ")
              << config_path << (config_found ? "" : " (not found)") << "\n";
    if (config_found) {
      std::istringstream contents(read_file(config_path));
      for (std::string line; std::getline(contents, line);) std::cout << "\t" << line << "\n";
    }
    std::cout << std::flush;
    return 0;
  }

 private:
  CLI::Option* config_file_ = nullptr;
  std::string config_file_value_;
};

}  // namespace

std::unique_ptr<Command> make_env_command() {
  return std::make_unique<EnvCommand>();
}

}  // namespace accelerate::cli
