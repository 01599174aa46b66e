#include "accelerate/state.h"

#include "accelerate/detail/collectives.h"
#include "accelerate/detail/cpu_allocator.h"
#include "accelerate/detail/direct_gloo.h"
#include "accelerate/detail/runtime_defaults.h"
#include "detail/error_record.h"

#include <torch/cuda.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <mutex>
#include <sstream>
#include <string>

namespace accelerate {
namespace {

// What one call's options come to once the environment is applied: an option left unset takes
// ACCELERATE_USE_CPU / ACCELERATE_DEBUG_MODE, then the default, and the source is kept so that a
// conflict can say where each side's value came from.
struct ResolvedOptions {
  bool cpu = false;
  std::string cpu_from;
  bool debug = false;
  std::string debug_from;
};

ResolvedOptions resolve_options(const StateOptions& options, const EnvMap& env) {
  ResolvedOptions r;
  auto pick = [&env](std::optional<bool> given, const char* variable, bool& value,
                     std::string& from) {
    if (given) {
      value = *given;
      from = "the argument";
    } else if (auto v = env_bool(env, variable)) {
      value = *v;
      from = variable;
    } else {
      value = false;
      from = "the default";
    }
  };
  pick(options.cpu, "ACCELERATE_USE_CPU", r.cpu, r.cpu_from);
  pick(options.debug, "ACCELERATE_DEBUG_MODE", r.debug, r.debug_from);
  return r;
}

std::mutex g_shared_mutex;
std::shared_ptr<PartialState> g_shared;
// How the shared state's options were resolved when it was created, for the error a later,
// conflicting call gets.
ResolvedOptions g_shared_resolved;

const char* bool_name(bool b) {
  return b ? "true" : "false";
}

// The reasons, "" when none, that a later shared() call with `options` cannot be given `state`.
// Only what the call sets is compared, and against what it resolves to on this machine: cpu=true
// from an Accelerator, ACCELERATE_USE_CPU=true from `accelerate launch --cpu`, and cpu=false on a
// machine without CUDA all mean the same CPU state. An unset option (and the default timeout,
// which cannot be told apart from an unset one) asks for nothing, so that code which only wants
// "the" state can call shared() after whoever created it.
std::string conflicts_with(const PartialState& state, const ResolvedOptions& created,
                           const StateOptions& options) {
  std::ostringstream out;
  auto add = [&out](const auto&... parts) {
    out << (out.tellp() > 0 ? "; " : "");
    (out << ... << parts);
  };
  if (options.cpu) {
    const bool wants_cpu = *options.cpu || !torch::cuda::is_available();
    if (wants_cpu != state.device().is_cpu()) {
      add("cpu is ", bool_name(created.cpu), " (from ", created.cpu_from, ", device ",
          state.device().str(), ") but this call asks for ", bool_name(*options.cpu),
          " (from the argument, device ", wants_cpu ? "cpu" : "cuda", ")");
    }
  }
  if (options.debug && *options.debug != state.debug()) {
    add("debug is ", bool_name(state.debug()), " (from ", created.debug_from,
        ") but this call asks for ", bool_name(*options.debug), " (from the argument)");
  }
  // A single process has no process group, so the backend it would use is moot.
  if (options.init_kwargs.backend && state.use_distributed() &&
      *options.init_kwargs.backend != state.backend()) {
    add("init_kwargs.backend is \"", state.backend(), "\" but this call asks for \"",
        *options.init_kwargs.backend, "\"");
  }
  if (options.init_kwargs.timeout != InitProcessGroupKwargs{}.timeout &&
      options.init_kwargs.timeout != state.timeout()) {
    add("init_kwargs.timeout is ", state.timeout().count(), " ms but this call asks for ",
        options.init_kwargs.timeout.count(), " ms");
  }
  return out.str();
}

bool is_loopback(const std::string& addr) {
  return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1";
}

}  // namespace

std::string to_string(DistributedType type) {
  switch (type) {
    case DistributedType::NO:
      return "NO";
    case DistributedType::MULTI_CPU:
      return "MULTI_CPU";
    case DistributedType::MULTI_GPU:
      return "MULTI_GPU";
    case DistributedType::FSDP:
      return "FSDP";
    case DistributedType::DEEPSPEED:
      return "DEEPSPEED";
  }
  TORCH_INTERNAL_ASSERT(false, "unknown DistributedType");
}

PartialState& PartialState::shared(const StateOptions& options) {
  std::lock_guard<std::mutex> lock(g_shared_mutex);
  if (!g_shared) {
    const EnvMap env = current_environment();
    g_shared = from_environment(options, env);
    g_shared_resolved = resolve_options(options, env);
  } else {
    const std::string conflicts = conflicts_with(*g_shared, g_shared_resolved, options);
    TORCH_CHECK(
        conflicts.empty(),
        "accelerate: the shared PartialState was already created with other options: ", conflicts,
        "; create it once (the first Accelerator or PartialState::shared call decides)");
  }
  return *g_shared;
}

std::shared_ptr<PartialState> PartialState::shared_if_created() {
  std::lock_guard<std::mutex> lock(g_shared_mutex);
  return g_shared;
}

std::shared_ptr<PartialState> PartialState::from_environment(const StateOptions& options,
                                                             const EnvMap& env) {
  std::shared_ptr<PartialState> state(new PartialState());
  const ProcessTopology topology = detect_topology(env);
  // What the launcher would have put in the environment, for programs started some other way.
  // The thread variables are the process's own (a test may pass a made-up `env`).
  detail::apply_thread_defaults(current_environment(), topology.local_world_size);
  state->init(topology, options, c10::intrusive_ptr<c10d::Store>(), env);
  return state;
}

std::shared_ptr<PartialState> PartialState::from_store(c10::intrusive_ptr<c10d::Store> store,
                                                       int rank, int world_size,
                                                       const StateOptions& options,
                                                       std::optional<int> local_rank,
                                                       std::optional<int> local_world_size) {
  TORCH_CHECK(store, "accelerate: PartialState::from_store needs a store");
  ProcessTopology topology;
  topology.source = "store";
  topology.rank = rank;
  topology.world_size = world_size;
  topology.local_rank = local_rank.value_or(rank);
  topology.local_world_size = local_world_size.value_or(world_size);
  TORCH_CHECK(world_size >= 1 && rank >= 0 && rank < world_size, "accelerate: rank ", rank,
              " is outside the world size ", world_size);
  TORCH_CHECK(topology.local_world_size >= 1 && topology.local_rank >= 0 &&
                  topology.local_rank < topology.local_world_size,
              "accelerate: local rank ", topology.local_rank, " is outside the local world size ",
              topology.local_world_size);
  std::shared_ptr<PartialState> state(new PartialState());
  state->init(topology, options, std::move(store), EnvMap{});
  return state;
}

void PartialState::init(const ProcessTopology& topology, const StateOptions& options,
                        c10::intrusive_ptr<c10d::Store> store, const EnvMap& env) {
  topology_ = topology;
  options_ = options;
  // Freed gradients and activations must not go back to the kernel between steps.
  const EnvMap process_env = current_environment();
  // Before the process group exists: a failure from here on leaves a timestamped record for the
  // launcher, and Gloo's threads cannot abort the process (detail/error_record.h).
  detail::install_error_record();
  detail::apply_allocator_defaults(process_env);
  detail::install_cpu_caching_allocator(process_env);
  const ResolvedOptions resolved = resolve_options(options, env);
  const bool cpu = resolved.cpu;
  debug_ = resolved.debug;
  timeout_ = options.init_kwargs.timeout;
  TORCH_CHECK(timeout_.count() > 0, "accelerate: InitProcessGroupKwargs.timeout must be positive");

  const bool cuda = !cpu && torch::cuda::is_available();
  if (cuda) {
    const auto count = static_cast<int>(torch::cuda::device_count());
    device_ = c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(topology_.local_rank % count));
  }
  if (topology_.world_size == 1) {
    distributed_type_ = DistributedType::NO;
    return;
  }
  distributed_type_ = cuda ? DistributedType::MULTI_GPU : DistributedType::MULTI_CPU;
  backend_ = options.init_kwargs.backend.value_or(cuda && compat::kHasNccl ? "nccl" : "gloo");
  TORCH_CHECK(backend_ == "gloo" || backend_ == "nccl", "accelerate: unknown backend '", backend_,
              "' (use \"gloo\" or \"nccl\")");
  TORCH_CHECK(backend_ != "nccl" || cuda, "accelerate: the nccl backend needs a CUDA device, and ",
              cpu ? "the CPU was requested" : "none is available");

  if (!store) {
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(topology_.master_port);
    opts.isServer = topology_.rank == 0;
    opts.numWorkers = topology_.world_size;
    opts.waitWorkers = false;
    opts.timeout = timeout_;
    try {
      store = c10::make_intrusive<c10d::TCPStore>(topology_.master_addr, opts);
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "accelerate: process ", topology_.rank, " could not ",
                  opts.isServer ? "start" : "reach", " the rendezvous store at ",
                  topology_.master_addr, ":", topology_.master_port,
                  " (MASTER_ADDR/MASTER_PORT): ", e.what());
    }
  }
  store_ = c10::make_intrusive<c10d::PrefixStore>("accelerate/", store);
  try {
    if (backend_ == "nccl") {
      process_group_ = compat::make_nccl(store_, topology_.rank, topology_.world_size, timeout_);
    } else {
      compat::GlooAddress address;
      address.interface = env_string(env, "GLOO_SOCKET_IFNAME").value_or("");
      // Gloo binds to the address the machine's hostname resolves to, which in containers is
      // often unreachable; a job whose rendezvous is on loopback is local, so loopback works.
      if (address.interface.empty() && is_loopback(topology_.master_addr)) {
        address.hostname = "127.0.0.1";
      }
      process_group_ =
          compat::make_gloo(store_, topology_.rank, topology_.world_size, timeout_, address);
      // Every process decides alike (the launcher gives all of them one environment); a mixed
      // choice fails the rendezvous below with a timeout naming the group.
      if (detail::direct_gloo_available() &&
          env_bool(env, "ACCELERATE_DIRECT_GLOO").value_or(true)) {
        direct_ = std::make_unique<detail::DirectGloo>(store_, topology_.rank, topology_.world_size,
                                                       timeout_, address);
      }
    }
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "accelerate: process ", topology_.rank, " of ", topology_.world_size,
                " could not join the ", backend_, " process group: ", e.what());
  }
  // Gloo connects pair by pair: a process that has all its connections may return while a peer
  // is still finishing its own, and if it then closes its sockets (exits, or destroys the
  // group) the peer fails with "Connection closed by peer". Nobody leaves until all are joined.
  try {
    detail::barrier(*this, "init_process_group");
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "accelerate: process ", topology_.rank, " of ", topology_.world_size,
                " joined the ", backend_,
                " process group, but the others did not all join: ", e.what());
  }
}

PartialState::~PartialState() {
  destroy_process_group();
}

void PartialState::destroy_process_group() {
  direct_.reset();
  process_group_.reset();
  store_.reset();
}

std::string PartialState::describe() const {
  std::ostringstream out;
  out << "Distributed environment: " << to_string(distributed_type_);
  if (!backend_.empty()) out << "  Backend: " << backend_;
  out << "\nNum processes: " << num_processes() << "\nProcess index: " << process_index()
      << "\nLocal process index: " << local_process_index() << "\nDevice: " << device_.str()
      << "\n";
  return out.str();
}

void PartialState::wait_for_everyone() const {
  detail::barrier(*this, "wait_for_everyone");
}

void PartialState::check_process_index(int index, int count, const char* what) {
  TORCH_CHECK(index >= 0 && index < count, "accelerate: ", what, "(", index,
              "): the index must be in [0, ", count, ")");
}

std::pair<int64_t, int64_t> PartialState::split_range(int64_t length) const {
  TORCH_CHECK(length >= 0, "split_between_processes: negative length ", length);
  const int64_t n = num_processes();
  const int64_t i = process_index();
  const int64_t per = length / n;
  const int64_t extras = length % n;
  const int64_t start = i * per + std::min(i, extras);
  return {start, start + per + (i < extras ? 1 : 0)};
}

bool PartialState::check_trigger() {
  auto flag = at::full({1}, trigger_.load() ? 1 : 0, at::kLong);
  auto total = detail::all_reduce(*this, "check_trigger", flag, c10d::ReduceOp::MAX);
  if (total.item<int64_t>() > 0) {
    trigger_.store(false);
    return true;
  }
  return false;
}

// ------------------------------------------------------------------ ProcessesFirst
//
// Each process takes part in exactly one collective: those that wait, on entry; those that go
// first, on exit. That collective is a MAX all-reduce of "did the block throw", so the waiting
// processes learn about a failure instead of running on a half-made result.

ProcessesFirst::ProcessesFirst(const PartialState* state, bool goes_first)
    : state_(state), goes_first_(goes_first), uncaught_at_entry_(std::uncaught_exceptions()) {
  if (goes_first_ || !state_->use_distributed()) return;
  auto failed = detail::all_reduce(*state_, "main_process_first", at::zeros({1}, at::kLong),
                                   c10d::ReduceOp::MAX);
  TORCH_CHECK(failed.item<int64_t>() == 0, "accelerate: main_process_first: the process that went ",
              "first left the block by an exception, so process ", state_->process_index(),
              " does not run it");
}

ProcessesFirst::ProcessesFirst(ProcessesFirst&& other) noexcept
    : state_(std::exchange(other.state_, nullptr)),
      goes_first_(other.goes_first_),
      uncaught_at_entry_(other.uncaught_at_entry_) {}

ProcessesFirst::~ProcessesFirst() {
  if (state_ == nullptr || !goes_first_ || !state_->use_distributed()) return;
  const bool failed = std::uncaught_exceptions() > uncaught_at_entry_;
  try {
    detail::all_reduce(*state_, "main_process_first", at::full({1}, failed ? 1 : 0, at::kLong),
                       c10d::ReduceOp::MAX);
  } catch (const std::exception& e) {
    // A destructor must not throw; the waiting processes time out with an error of their own.
    std::cerr << "accelerate: main_process_first could not release the other processes: "
              << e.what() << std::endl;
  }
}

}  // namespace accelerate
