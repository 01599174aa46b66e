#pragma once
/// \file
/// Process state: which process this is, the device it uses, and the c10d process group that
/// connects it to the others (Accelerate's `PartialState`), plus process control built on it.
///
/// Example:
/// \code
///   auto& state = accelerate::PartialState::shared();   // reads RANK, WORLD_SIZE, ... once
///   state.print("running on ", state.num_processes(), " processes");
///   {
///     auto first = state.main_process_first();   // rank 0 downloads, the others wait
///     prepare_dataset();
///   }
///   auto mine = state.split_between_processes(std::vector<std::string>{"a", "b", "c"});
///   state.wait_for_everyone();
/// \endcode

#include <accelerate/compat.h>
#include <accelerate/environment.h>

#include <ATen/ATen.h>
#include <c10/core/Device.h>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace accelerate {

namespace detail {
class DirectGloo;
}  // namespace detail

/// Accelerate's `DistributedType`, restricted to what a C++ program can be.
/// How the processes share the work. A PartialState is NO, MULTI_CPU or MULTI_GPU; an
/// Accelerator with a sharding plugin (plugins.h) over several processes reports FSDP or
/// DEEPSPEED, as Accelerate does.
enum class DistributedType { NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED };

/// "NO", "MULTI_CPU", "MULTI_GPU", "FSDP", "DEEPSPEED": the names Accelerate prints and writes to
/// config files.
std::string to_string(DistributedType type);

/// Options for creating the process group (Accelerate's `InitProcessGroupKwargs`).
struct InitProcessGroupKwargs {
  /// "gloo" or "nccl"; unset picks nccl for CUDA devices and gloo otherwise.
  std::optional<std::string> backend;
  /// How long a collective may wait for the other processes before it fails with an error
  /// naming the operation. Accelerate's default is 1800 s.
  std::chrono::milliseconds timeout = std::chrono::seconds(1800);
};

/// What the user may set when creating a state. Unset fields come from the environment
/// (`ACCELERATE_USE_CPU`, `ACCELERATE_DEBUG_MODE`), then from defaults.
struct StateOptions {
  /// Force the CPU even when a GPU is available.
  std::optional<bool> cpu;
  /// Compare shapes across processes before every collective (`ACCELERATE_DEBUG_MODE`).
  std::optional<bool> debug;
  InitProcessGroupKwargs init_kwargs;
};

/// Guard returned by PartialState::main_process_first(); see there.
class [[nodiscard]] ProcessesFirst {
 public:
  ProcessesFirst(const ProcessesFirst&) = delete;
  ProcessesFirst& operator=(const ProcessesFirst&) = delete;
  ProcessesFirst(ProcessesFirst&& other) noexcept;
  ProcessesFirst& operator=(ProcessesFirst&&) = delete;
  ~ProcessesFirst();

 private:
  friend class PartialState;
  ProcessesFirst(const class PartialState* state, bool goes_first);
  const PartialState* state_;
  bool goes_first_;
  int uncaught_at_entry_;
};

/// The state of this process in a (possibly single-process) job. Created once per process from
/// the launch environment by shared(), or explicitly (from_store) so that tests can run several
/// ranks as threads of one process. Not copyable: hold it by reference or shared_ptr.
class PartialState : public std::enable_shared_from_this<PartialState> {
 public:
  /// The process-wide state, created from the environment on first use with `options`.
  /// Later calls return the same object (Accelerate shares one state across all Accelerator
  /// instances). What a later call sets is compared with what the state resolved to, not with
  /// the first call's raw options: cpu=true matches a state put on the CPU by ACCELERATE_USE_CPU
  /// or by a machine without CUDA. Unset options (and the default timeout) ask for nothing. A
  /// real conflict is an error naming each option with both values and where they came from.
  static PartialState& shared(const StateOptions& options = {});
  /// The shared state, if it was created.
  static std::shared_ptr<PartialState> shared_if_created();
  /// Creates a state from `env` (the launch environment). With world size > 1 this joins the
  /// process group through a TCPStore at MASTER_ADDR:MASTER_PORT, served by rank 0.
  static std::shared_ptr<PartialState> from_environment(const StateOptions& options = {},
                                                        const EnvMap& env = current_environment());
  /// Creates a state that joins a process group through an existing store: used to run ranks as
  /// threads of one process over a HashStore or FileStore. `local_rank`/`local_world_size`
  /// default to `rank`/`world_size` (one machine).
  static std::shared_ptr<PartialState> from_store(
      c10::intrusive_ptr<c10d::Store> store, int rank, int world_size,
      const StateOptions& options = {}, std::optional<int> local_rank = std::nullopt,
      std::optional<int> local_world_size = std::nullopt);

  PartialState(const PartialState&) = delete;
  PartialState& operator=(const PartialState&) = delete;
  ~PartialState();

  // ------------------------------------------------------------------ who we are
  const c10::Device& device() const { return device_; }
  DistributedType distributed_type() const { return distributed_type_; }
  int num_processes() const { return topology_.world_size; }
  int process_index() const { return topology_.rank; }
  int local_process_index() const { return topology_.local_rank; }
  int num_processes_per_node() const { return topology_.local_world_size; }
  bool is_main_process() const { return topology_.rank == 0; }
  bool is_local_main_process() const { return topology_.local_rank == 0; }
  bool is_last_process() const { return topology_.rank == topology_.world_size - 1; }
  /// True when there is more than one process and collectives talk to the others.
  bool use_distributed() const { return topology_.world_size > 1; }
  /// "gloo", "nccl", or "" when not distributed.
  const std::string& backend() const { return backend_; }
  bool debug() const { return debug_; }
  std::chrono::milliseconds timeout() const { return timeout_; }
  const ProcessTopology& topology() const { return topology_; }
  /// The process group, or nullptr for a single process.
  compat::Backend* process_group() const { return process_group_.get(); }
  /// Gloo contexts of our own for small and out-of-place CPU collectives (see
  /// detail/direct_gloo.h), or nullptr: single process, NCCL, a build without them, or
  /// `ACCELERATE_DIRECT_GLOO=0`.
  detail::DirectGloo* direct() const { return direct_.get(); }
  /// Multi-line description, like printing Accelerate's state.
  std::string describe() const;

  // ------------------------------------------------------------------ process control
  /// Blocks until every process reaches this point.
  void wait_for_everyone() const;

  /// Prints the arguments (streamed, then a newline) on the main process only.
  template <class... Args>
  void print(const Args&... args) const {
    if (!is_main_process()) return;
    std::ostringstream out;
    (out << ... << args);
    out << '\n';
    std::cout << out.str() << std::flush;
  }

  /// Runs `fn` on the main process only. Returns its result there (wrapped in std::optional
  /// unless it returns void) and std::nullopt elsewhere.
  template <class F>
  auto on_main_process(F&& fn) const {
    return run_if(is_main_process(), std::forward<F>(fn));
  }
  /// Runs `fn` on the main process of each machine only.
  template <class F>
  auto on_local_main_process(F&& fn) const {
    return run_if(is_local_main_process(), std::forward<F>(fn));
  }
  /// Runs `fn` on the last process only.
  template <class F>
  auto on_last_process(F&& fn) const {
    return run_if(is_last_process(), std::forward<F>(fn));
  }
  /// Runs `fn` on the process with global index `process_index` only.
  template <class F>
  auto on_process(int process_index, F&& fn) const {
    check_process_index(process_index, num_processes(), "on_process");
    return run_if(this->process_index() == process_index, std::forward<F>(fn));
  }
  /// Runs `fn` on the process with index `local_process_index` on each machine.
  template <class F>
  auto on_local_process(int local_process_index, F&& fn) const {
    check_process_index(local_process_index, num_processes_per_node(), "on_local_process");
    return run_if(this->local_process_index() == local_process_index, std::forward<F>(fn));
  }

  /// The main process runs the guarded block first; the others start it once the main process
  /// has left it. If the main process leaves the block by an exception, the others are released
  /// too and their guard throws, naming the failure, instead of running on what was not made.
  ProcessesFirst main_process_first() const { return ProcessesFirst(this, is_main_process()); }
  /// As main_process_first, with the main process of each machine going first.
  ProcessesFirst local_main_process_first() const {
    return ProcessesFirst(this, is_local_main_process());
  }

  /// The [start, end) range of `length` items that this process takes in
  /// split_between_processes, Accelerate's rule: the first `length % n` processes get one extra.
  std::pair<int64_t, int64_t> split_range(int64_t length) const;

  /// This process's share of `inputs` (a vector, a tensor split along dim 0, or a map whose
  /// values are all of one length). A process whose share would be empty (fewer items than
  /// processes) gets the last item, as in Accelerate. With `apply_padding`, every process gets
  /// the same count: a shorter vector share repeats its own last element, a shorter tensor
  /// share the last row of `inputs` (Accelerate's `pad_index=inputs[-1]`).
  template <class T>
  T split_between_processes(const T& inputs, bool apply_padding = false) const;

  /// Marks that this process wants the others to know something (Accelerate's `set_trigger`).
  void set_trigger() { trigger_.store(true); }
  /// A collective: true on every process if any process called set_trigger() since the last
  /// check, and resets the trigger.
  bool check_trigger();

  /// Leaves the process group after a final barrier. Called by the destructor too; safe to call
  /// twice. Collectives after this are errors.
  void destroy_process_group();

 private:
  PartialState() = default;
  void init(const ProcessTopology& topology, const StateOptions& options,
            c10::intrusive_ptr<c10d::Store> store, const EnvMap& env);
  static void check_process_index(int index, int count, const char* what);

  template <class F>
  static auto run_if(bool cond, F&& fn) {
    using R = std::invoke_result_t<F>;
    if constexpr (std::is_void_v<R>) {
      if (cond) std::forward<F>(fn)();
    } else {
      return cond ? std::optional<R>(std::forward<F>(fn)()) : std::optional<R>();
    }
  }

  friend class ProcessesFirst;
  ProcessTopology topology_;
  c10::Device device_{c10::kCPU};
  DistributedType distributed_type_ = DistributedType::NO;
  std::string backend_;
  bool debug_ = false;
  std::chrono::milliseconds timeout_{std::chrono::seconds(1800)};
  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<compat::Backend> process_group_;
  std::unique_ptr<detail::DirectGloo> direct_;
  std::atomic<bool> trigger_{false};
  StateOptions options_;
};

// ---------------------------------------------------------------------- split implementation
namespace detail {
template <class T>
struct is_std_vector : std::false_type {};
template <class T, class A>
struct is_std_vector<std::vector<T, A>> : std::true_type {};
template <class T>
struct is_string_map : std::false_type {};
template <class V, class C, class A>
struct is_string_map<std::map<std::string, V, C, A>> : std::true_type {};

template <class T>
int64_t split_length(const T& inputs) {
  if constexpr (std::is_same_v<T, at::Tensor>) {
    TORCH_CHECK(inputs.dim() >= 1, "split_between_processes: a 0-dim tensor cannot be split");
    return inputs.size(0);
  } else if constexpr (is_std_vector<T>::value) {
    return static_cast<int64_t>(inputs.size());
  } else {
    static_assert(is_string_map<T>::value,
                  "split_between_processes takes a std::vector, an at::Tensor or a "
                  "std::map<std::string, V> of those");
    TORCH_CHECK(!inputs.empty(), "split_between_processes: the map is empty");
    const int64_t length = split_length(inputs.begin()->second);
    for (const auto& [key, value] : inputs) {
      TORCH_CHECK(split_length(value) == length,
                  "split_between_processes: all values in the map must have the same length, "
                  "but '",
                  inputs.begin()->first, "' has ", length, " and '", key, "' has ",
                  split_length(value));
    }
    return length;
  }
}

template <class T>
T split_values(const T& inputs, int64_t start, int64_t end, int64_t padded_to) {
  if constexpr (std::is_same_v<T, at::Tensor>) {
    // Like Accelerate, a process past the end of a short input gets its last element rather than
    // nothing, so every process has something to run on.
    at::Tensor out = start >= inputs.size(0) ? inputs.slice(0, -1) : inputs.slice(0, start, end);
    if (padded_to > out.size(0) && inputs.size(0) > 0) {
      auto last = inputs.slice(0, inputs.size(0) - 1, inputs.size(0));
      std::vector<int64_t> reps(static_cast<size_t>(inputs.dim()), 1);
      reps[0] = padded_to - out.size(0);
      out = at::cat({out, last.repeat(reps)}, 0);
    }
    return out;
  } else if constexpr (is_std_vector<T>::value) {
    if (inputs.empty()) return T{};
    T out = start >= static_cast<int64_t>(inputs.size())
                ? T{inputs.back()}
                : T(inputs.begin() + start, inputs.begin() + end);
    // Accelerate pads a list with its own last element (a tensor with the input's last row).
    while (static_cast<int64_t>(out.size()) < padded_to) out.push_back(out.back());
    return out;
  } else {
    T out;
    for (const auto& [key, value] : inputs)
      out.emplace(key, split_values(value, start, end, padded_to));
    return out;
  }
}
}  // namespace detail

template <class T>
T PartialState::split_between_processes(const T& inputs, bool apply_padding) const {
  if (num_processes() == 1) return inputs;
  const int64_t length = detail::split_length(inputs);
  auto [start, end] = split_range(length);
  const int64_t per = length / num_processes();
  const int64_t padded_to = apply_padding ? per + (length % num_processes() > 0 ? 1 : 0) : 0;
  return detail::split_values(inputs, start, end, padded_to);
}

}  // namespace accelerate
