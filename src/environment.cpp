#include "accelerate/environment.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstdlib>

extern char** environ;

namespace accelerate {
namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

std::string upper(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::toupper(c); });
  return s;
}

long long parse_int(const std::string& value, const std::string& name) {
  long long out = 0;
  const char* first = value.data();
  const char* last = value.data() + value.size();
  auto [ptr, ec] = std::from_chars(first, last, out);
  TORCH_CHECK(ec == std::errc() && ptr == last, "accelerate: environment variable ", name, "='",
              value, "' is not an integer");
  return out;
}

// SLURM writes tasks per node as "2(x3),1": the first group's count is this job's per-node
// count on homogeneous allocations, which is what a LOCAL_WORLD_SIZE can express.
std::optional<int> slurm_tasks_per_node(const EnvMap& env) {
  if (auto v = env_string(env, "SLURM_NTASKS_PER_NODE")) {
    return static_cast<int>(parse_int(*v, "SLURM_NTASKS_PER_NODE"));
  }
  if (auto v = env_string(env, "SLURM_TASKS_PER_NODE")) {
    auto end = v->find_first_not_of("0123456789");
    return static_cast<int>(parse_int(v->substr(0, end), "SLURM_TASKS_PER_NODE"));
  }
  return std::nullopt;
}

}  // namespace

EnvMap current_environment() {
  EnvMap env;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    std::string entry(*e);
    auto eq = entry.find('=');
    if (eq == std::string::npos) continue;
    env.emplace(entry.substr(0, eq), entry.substr(eq + 1));
  }
  return env;
}

bool parse_bool(const std::string& value, const std::string& name) {
  const std::string v = lower(value);
  if (v == "y" || v == "yes" || v == "t" || v == "true" || v == "on" || v == "1") return true;
  if (v == "n" || v == "no" || v == "f" || v == "false" || v == "off" || v == "0") return false;
  TORCH_CHECK(false, "accelerate: ", name, "='", value,
              "' is not a boolean (use one of 1/0, true/false, yes/no, on/off)");
}

std::optional<std::string> env_string(const EnvMap& env, const std::string& name) {
  auto it = env.find(name);
  if (it == env.end() || it->second.empty()) return std::nullopt;
  return it->second;
}

std::optional<bool> env_bool(const EnvMap& env, const std::string& name) {
  auto v = env_string(env, name);
  if (!v) return std::nullopt;
  return parse_bool(*v, name);
}

std::optional<long long> env_int(const EnvMap& env, const std::string& name) {
  auto v = env_string(env, name);
  if (!v) return std::nullopt;
  return parse_int(*v, name);
}

ProcessTopology detect_topology(const EnvMap& env) {
  ProcessTopology t;
  struct Names {
    const char* source;
    const char* rank;
    const char* size;
    const char* local_rank;
    const char* local_size;
  };
  static const Names kLaunchers[] = {
      {"torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"},
      {"openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
       "OMPI_COMM_WORLD_LOCAL_SIZE"},
      {"pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"},
      {"slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", nullptr},
  };
  const Names* found = nullptr;
  for (const auto& names : kLaunchers) {
    if (env_string(env, names.size)) {
      found = &names;
      break;
    }
  }
  if (found != nullptr) {
    t.source = found->source;
    t.world_size = static_cast<int>(*env_int(env, found->size));
    TORCH_CHECK(t.world_size >= 1, "accelerate: world size must be at least 1, got ", found->size,
                "=", t.world_size);
    t.rank = static_cast<int>(env_int(env, found->rank).value_or(0));
    TORCH_CHECK(env_string(env, found->rank) || t.world_size == 1, "accelerate: ", found->size, "=",
                t.world_size, " is set but ", found->rank, " is not");
    t.local_rank = static_cast<int>(env_int(env, found->local_rank).value_or(t.rank));
    std::optional<int> local_size;
    if (found->local_size != nullptr) {
      if (auto v = env_int(env, found->local_size)) local_size = static_cast<int>(*v);
    } else {
      local_size = slurm_tasks_per_node(env);
    }
    t.local_world_size = local_size.value_or(t.world_size);
  }
  TORCH_CHECK(t.world_size >= 1, "accelerate: world size must be at least 1, got ", t.world_size,
              " (from ", t.source, " variables)");
  TORCH_CHECK(t.rank >= 0 && t.rank < t.world_size, "accelerate: rank ", t.rank,
              " is outside the world size ", t.world_size, " (from ", t.source, " variables)");
  TORCH_CHECK(t.local_world_size >= 1 && t.local_world_size <= t.world_size,
              "accelerate: local world size ", t.local_world_size, " must be in [1, ", t.world_size,
              "]");
  TORCH_CHECK(t.local_rank >= 0 && t.local_rank < t.local_world_size, "accelerate: local rank ",
              t.local_rank, " is outside the local world size ", t.local_world_size);

  if (auto addr = env_string(env, "MASTER_ADDR")) {
    t.master_addr = *addr;
  } else if (auto slurm_addr = env_string(env, "SLURM_LAUNCH_NODE_IPADDR");
             slurm_addr && t.source == "slurm") {
    t.master_addr = *slurm_addr;
  }
  if (auto port = env_int(env, "MASTER_PORT")) {
    TORCH_CHECK(*port > 0 && *port < 65536, "accelerate: MASTER_PORT=", *port,
                " is not a TCP port");
    t.master_port = static_cast<int>(*port);
  }
  return t;
}

PatchEnvironment::PatchEnvironment(const std::map<std::string, std::string>& values) {
  for (const auto& [key, value] : values) {
    std::string name = upper(key);
    const char* old = std::getenv(name.c_str());
    saved_.emplace_back(name, old ? std::optional<std::string>(old) : std::nullopt);
    ::setenv(name.c_str(), value.c_str(), 1);
  }
}

PatchEnvironment::~PatchEnvironment() {
  // Restore in reverse so a name patched twice ends with its original value.
  for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) {
    if (it->second) {
      ::setenv(it->first.c_str(), it->second->c_str(), 1);
    } else {
      ::unsetenv(it->first.c_str());
    }
  }
}

ClearEnvironment::ClearEnvironment() : saved_(current_environment()) {
  ::clearenv();
}

ClearEnvironment::~ClearEnvironment() {
  ::clearenv();
  for (const auto& [name, value] : saved_) ::setenv(name.c_str(), value.c_str(), 1);
}

}  // namespace accelerate
