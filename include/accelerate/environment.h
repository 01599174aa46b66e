#pragma once
/// \file
/// Reading the launch environment: which process this is, how many there are, and the
/// `ACCELERATE_*` settings the launcher passes down. Everything here is a pure function of an
/// environment map, so it is tested without touching the real environment.
///
/// Example:
/// \code
///   auto topo = accelerate::detect_topology(accelerate::current_environment());
///   std::cout << "rank " << topo.rank << " of " << topo.world_size << " (" << topo.source <<
///   ")\n";
/// \endcode

#include <map>
#include <optional>
#include <string>
#include <vector>

namespace accelerate {

/// An environment as name -> value.
using EnvMap = std::map<std::string, std::string>;

/// A copy of this process's environment.
EnvMap current_environment();

/// Accelerate's `str_to_bool`: y/yes/t/true/on/1 and n/no/f/false/off/0 (any case).
/// Anything else is an error naming `name` (the variable) and the value.
bool parse_bool(const std::string& value, const std::string& name);

/// The value of `name` in `env`, or std::nullopt when unset or empty.
std::optional<std::string> env_string(const EnvMap& env, const std::string& name);
/// `name` parsed as a boolean (see parse_bool); std::nullopt when unset or empty.
std::optional<bool> env_bool(const EnvMap& env, const std::string& name);
/// `name` parsed as an integer; a non-integer value is an error naming the variable.
std::optional<long long> env_int(const EnvMap& env, const std::string& name);

/// Where this process sits among all processes of the job.
struct ProcessTopology {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  /// Which launcher's variables were found: "torchrun" (also ours), "openmpi", "pmi", "slurm"
  /// or "none" (a plain single process).
  std::string source = "none";
};

/// Finds the topology in `env`, trying in order: torchrun-style `RANK`/`WORLD_SIZE`/`LOCAL_RANK`/
/// `LOCAL_WORLD_SIZE` (what `accelerate launch` sets), OpenMPI's `OMPI_COMM_WORLD_*`, MPICH/Intel
/// MPI's `PMI_RANK`/`PMI_SIZE`, SLURM's `SLURM_PROCID`/`SLURM_NTASKS`/`SLURM_LOCALID`.
/// `MASTER_ADDR`/`MASTER_PORT` name the rendezvous for all of them (SLURM falls back to
/// `SLURM_LAUNCH_NODE_IPADDR`). Inconsistent values (rank outside world size, ...) are errors.
ProcessTopology detect_topology(const EnvMap& env);

/// Sets environment variables for the lifetime of the guard and restores the previous values
/// (or unsets them) when it ends: Accelerate's `patch_environment`. Names are upper-cased, as
/// Accelerate does. Not thread-safe, like the environment itself.
///
/// Example:
/// \code
///   {
///     auto env = accelerate::patch_environment({{"master_port", "29501"}});
///     // MASTER_PORT == "29501" here
///   }
/// \endcode
class [[nodiscard]] PatchEnvironment {
 public:
  explicit PatchEnvironment(const std::map<std::string, std::string>& values);
  PatchEnvironment(const PatchEnvironment&) = delete;
  PatchEnvironment& operator=(const PatchEnvironment&) = delete;
  ~PatchEnvironment();

 private:
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

/// See PatchEnvironment.
[[nodiscard]] inline PatchEnvironment patch_environment(
    const std::map<std::string, std::string>& values) {
  return PatchEnvironment(values);
}

/// Empties the environment for the lifetime of the guard and restores it afterwards:
/// Accelerate's `clear_environment`.
class [[nodiscard]] ClearEnvironment {
 public:
  ClearEnvironment();
  ClearEnvironment(const ClearEnvironment&) = delete;
  ClearEnvironment& operator=(const ClearEnvironment&) = delete;
  ~ClearEnvironment();

 private:
  EnvMap saved_;
};

/// See ClearEnvironment.
[[nodiscard]] inline ClearEnvironment clear_environment() {
  return ClearEnvironment();
}

}  // namespace accelerate
