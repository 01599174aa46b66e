#include "fsdp_core.h"

#include "accelerate/detail/collectives.h"

#include <c10/core/CPUAllocator.h>
#include <c10/util/irange.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/nn/modules/container/sequential.h>

#include <algorithm>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

// How a unit's parameters come and go: every parameter of a unit is, once and for all, a view
// of one storage per unit (set_data at setup keeps the tensor, its autograd identity and the
// module's references). Resharding frees that storage's memory and gathering allocates it again
// and all-gathers into it, so every view -- the parameters and whatever autograd saved from
// them (weight.t() for a linear layer) -- sees the full values again in backward without being
// recreated. Parameters are never written through their own version counters, so autograd's
// saved-tensor checks stay valid.

namespace accelerate {

std::string to_string(BackwardPrefetch prefetch) {
  switch (prefetch) {
    case BackwardPrefetch::BACKWARD_PRE:
      return "BACKWARD_PRE";
    case BackwardPrefetch::BACKWARD_POST:
      return "BACKWARD_POST";
    case BackwardPrefetch::NO_PREFETCH:
      return "NO_PREFETCH";
  }
  return "?";
}

BackwardPrefetch backward_prefetch_from_string(const std::string& text) {
  if (text == "BACKWARD_PRE") return BackwardPrefetch::BACKWARD_PRE;
  if (text == "BACKWARD_POST") return BackwardPrefetch::BACKWARD_POST;
  if (text == "NO_PREFETCH") return BackwardPrefetch::NO_PREFETCH;
  TORCH_CHECK(false, "accelerate: backward_prefetch \"", text,
              "\" is not one of BACKWARD_PRE, BACKWARD_POST, NO_PREFETCH");
}

namespace detail {
namespace {

constexpr const char* kGatherOp = "FSDP (all-gather of a unit's parameters)";
constexpr const char* kReduceOp = "FSDP (reduce-scatter of a unit's gradients)";
constexpr const char* kSetupOp = "FSDP (sharding the model)";

struct Registry {
  std::mutex mutex;
  std::unordered_map<const torch::nn::Module*, std::pair<std::weak_ptr<FullShardCore>, size_t>>
      units;
  std::map<int64_t, std::weak_ptr<FullShardCore>> cores;
  std::unordered_map<const torch::nn::Module*, std::weak_ptr<FullShardCore>> roots;
  std::vector<std::weak_ptr<torch::nn::Module>> marked;
  int64_t next_id = 1;
};

Registry& registry() {
  static Registry* r = new Registry();  // never destroyed: used from static destructors too
  return *r;
}

bool is_marked(const torch::nn::Module* m) {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  for (const auto& w : r.marked) {
    if (auto p = w.lock(); p && p.get() == m) return true;
  }
  return false;
}

// "ns::BlockImpl" matches "BlockImpl", "Block" and "ns::BlockImpl".
bool type_matches(const std::string& type, const std::string& wanted) {
  if (type == wanted) return true;
  std::string bare = type;
  if (auto pos = bare.rfind("::"); pos != std::string::npos) bare = bare.substr(pos + 2);
  if (bare == wanted) return true;
  auto strip = [](std::string s) {
    if (s.size() > 4 && s.compare(s.size() - 4, 4, "Impl") == 0) s.resize(s.size() - 4);
    return s;
  };
  return strip(bare) == strip(wanted);
}

// Gloo moves bytes of the dtypes it knows; bfloat16 travels as half (same size, never summed).
at::Tensor wire(const at::Tensor& t, const PartialState& state) {
  if (state.backend() != "nccl" && t.scalar_type() == at::kBFloat16) return t.view(at::kHalf);
  return t;
}

compat::Backend& group(const PartialState& state, const char* op) {
  compat::Backend* pg = state.process_group();
  TORCH_CHECK(pg != nullptr, "accelerate: '", op, "' on process ", state.process_index(),
              ": the process group was destroyed");
  return *pg;
}

void free_storage(c10::StorageImpl& storage, c10::Device device) {
  storage.set_data_ptr_noswap(at::DataPtr(nullptr, device));
  storage.set_nbytes(0);
}

// Runs the finalize callback once per backward; a backward that fails drops the callback
// unrun, and the token's destruction then abandons that iteration (as in ddp.cpp).
struct CallbackToken {
  CallbackToken(std::weak_ptr<FullShardCore> core, uint64_t iteration)
      : core(std::move(core)), iteration(iteration) {}
  CallbackToken(const CallbackToken&) = delete;
  CallbackToken& operator=(const CallbackToken&) = delete;
  ~CallbackToken() {
    if (ran) return;
    if (auto c = core.lock()) c->abandon(iteration);
  }
  std::weak_ptr<FullShardCore> core;
  uint64_t iteration;
  bool ran = false;
};

class GradientHook final : public torch::autograd::FunctionPostHook {
 public:
  GradientHook(std::weak_ptr<FullShardCore> core, size_t index)
      : core_(std::move(core)), index_(index) {}
  torch::autograd::variable_list operator()(
      const torch::autograd::variable_list& outputs,
      const torch::autograd::variable_list& /*inputs*/) override {
    if (auto core = core_.lock()) core->on_gradient(index_);
    return outputs;
  }

 private:
  std::weak_ptr<FullShardCore> core_;
  size_t index_;
};

// Identity in forward; in backward it gathers its unit before the unit's own backward
// functions run (they need the full parameters they saved views of).
struct PreBackward : public torch::autograd::Function<PreBackward> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                at::TensorList inputs, int64_t core, int64_t unit) {
    ctx->saved_data["core"] = core;
    ctx->saved_data["unit"] = unit;
    return inputs.vec();
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (auto core = find_core(ctx->saved_data["core"].toInt())) {
      core->pre_backward(static_cast<size_t>(ctx->saved_data["unit"].toInt()));
    }
    grads.emplace_back();
    grads.emplace_back();
    return grads;
  }
};

// Stands in a Sequential's forward chain for a unit (the registered child stays the unit).
struct SequentialUnitImpl : torch::nn::Module {
  explicit SequentialUnitImpl(torch::nn::AnyModule inner) : inner(std::move(inner)) {}
  at::Tensor forward(at::Tensor x) {
    UnitScope scope(inner.ptr().get());
    if (!scope.active()) return inner.forward(std::move(x));
    at::Tensor out;
    try {
      out = inner.forward(scope.input(x));
    } catch (const c10::Error& e) {
      TORCH_CHECK(std::string(e.what()).find("Expected argument") == std::string::npos,
                  "accelerate: unit ", inner.ptr()->name(),
                  " in a Sequential must take and return one tensor; wrap it in a module of "
                  "your own and call it with accelerate::call (",
                  e.what_without_backtrace(), ")");
      throw;
    }
    auto outs = scope.outputs({out});
    scope.finish(true);
    return outs[0];
  }
  torch::nn::AnyModule inner;
};

double seconds(FullShardCore::Clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

}  // namespace

std::vector<SequentialHolder> install_sequential_holders(
    const torch::nn::Module& root, const std::function<bool(const torch::nn::Module*)>& is_unit) {
  std::vector<SequentialHolder> installed;
  for (const auto& item : root.named_modules("", /*include_self=*/true)) {
    auto* seq = item.value()->as<torch::nn::SequentialImpl>();
    if (seq == nullptr) continue;
    size_t index = 0;
    for (auto it = seq->begin(); it != seq->end(); ++it, ++index) {
      if (!is_unit(it->ptr().get())) continue;
      *it = torch::nn::AnyModule(std::make_shared<SequentialUnitImpl>(*it));
      installed.push_back({item.value(), index});
    }
  }
  return installed;
}

void restore_sequential_holders(std::vector<SequentialHolder>& installed) noexcept {
  for (auto& i : installed) {
    auto seq_module = i.sequential.lock();
    auto* seq = seq_module ? seq_module->as<torch::nn::SequentialImpl>() : nullptr;
    if (seq == nullptr || i.index >= seq->size()) continue;
    auto& entry = *(seq->begin() + static_cast<std::ptrdiff_t>(i.index));
    if (auto* holder = entry.ptr()->as<SequentialUnitImpl>()) entry = holder->inner;
  }
  installed.clear();
}

std::shared_ptr<FullShardCore> full_shard_core_of(const torch::nn::Module& model) {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto it = r.roots.find(&model);
  return it == r.roots.end() ? nullptr : it->second.lock();
}

std::shared_ptr<FullShardCore> find_core(int64_t id) {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto it = r.cores.find(id);
  return it == r.cores.end() ? nullptr : it->second.lock();
}

FullShardCore::FullShardCore(std::shared_ptr<torch::nn::Module> m, std::shared_ptr<PartialState> s,
                             const FullyShardedOptions& o, std::function<bool()> sync)
    : module(std::move(m)), state(std::move(s)), options(o), require_sync(std::move(sync)) {
  world = state->use_distributed() ? state->num_processes() : 1;
  rank = state->use_distributed() ? state->process_index() : 0;
}

FullShardCore::~FullShardCore() {
  for (auto& [node, key] : hooks) node->del_post_hook(key);
  restore_sequential_holders(installed);
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.cores.erase(id);
  if (auto it = r.roots.find(module.get()); it != r.roots.end()) {
    auto owner = it->second.lock();
    if (!owner || owner.get() == this) r.roots.erase(it);
  }
  for (auto it = r.units.begin(); it != r.units.end();) {
    auto owner = it->second.first.lock();
    if (!owner || owner.get() == this) {
      it = r.units.erase(it);
    } else {
      ++it;
    }
  }
  // The full parameters of managed units stay freed; a parameter of a destroyed engine is then
  // an error to use rather than stale data. Whole units keep theirs.
}

std::pair<int64_t, int64_t> FullShardCore::own_range(const Unit& u) const {
  const int64_t lo = std::min(u.numel, rank * u.shard_numel);
  return {lo, std::min(u.numel, lo + u.shard_numel)};
}

int64_t FullShardCore::unit_bytes(const Unit& u) const {
  return u.full.defined() ? world * u.shard_numel * static_cast<int64_t>(u.full.element_size()) : 0;
}

void FullShardCore::setup() {
  TORCH_CHECK(options.auto_wrap_policy == "SIZE_BASED_WRAP" ||
                  options.auto_wrap_policy == "TRANSFORMER_BASED_WRAP" ||
                  options.auto_wrap_policy == "NO_WRAP",
              "accelerate: FSDP auto_wrap_policy \"", options.auto_wrap_policy,
              "\" is not one of TRANSFORMER_BASED_WRAP, SIZE_BASED_WRAP, NO_WRAP");

  // 1. The trainable parameters, each tensor under every name it has.
  std::vector<std::pair<std::string, at::Tensor>> occurrences;
  for (const auto& item : module->named_parameters(/*recurse=*/true)) {
    if (item.value().requires_grad()) occurrences.emplace_back(item.key(), item.value());
  }
  TORCH_CHECK(!occurrences.empty(), "accelerate: FSDP: the model has no trainable parameters");
  device = occurrences.front().second.device();
  for (const auto& [name, t] : occurrences) {
    TORCH_CHECK(t.device() == device, "accelerate: FSDP: parameter '", name, "' is on ", t.device(),
                ", the others on ", device, "; move the model to one device");
    TORCH_CHECK(t.is_floating_point(), "accelerate: FSDP: parameter '", name, "' has dtype ",
                t.scalar_type(), "; only floating-point parameters can be sharded");
  }
  shard_device = options.cpu_offload && device.is_cuda() ? c10::Device(c10::kCPU) : device;

  // 2. Units: by the policy (children first, as FSDP's size-based policy counts), plus marked
  // modules; numbered in registration (pre-)order, the root unit first.
  std::unordered_set<const torch::nn::Module*> chosen;
  std::unordered_set<const c10::TensorImpl*> counted;
  std::function<int64_t(torch::nn::Module&, bool)> walk = [&](torch::nn::Module& m,
                                                              bool is_root) -> int64_t {
    int64_t count = 0;
    for (const auto& p : m.named_parameters(/*recurse=*/false)) {
      if (p.value().requires_grad() && counted.insert(p.value().unsafeGetTensorImpl()).second) {
        count += p.value().numel();
      }
    }
    for (const auto& child : m.named_children()) count += walk(*child.value(), false);
    if (is_root || count == 0) return count;
    bool wrap = is_marked(&m);
    if (options.auto_wrap_policy == "SIZE_BASED_WRAP") {
      wrap = wrap || count >= options.min_num_params;
    } else if (options.auto_wrap_policy == "TRANSFORMER_BASED_WRAP") {
      for (const auto& name : options.transformer_layer_cls_to_wrap) {
        wrap = wrap || type_matches(m.name(), name);
      }
    }
    if (!wrap) return count;
    chosen.insert(&m);
    return 0;
  };
  walk(*module, true);
  units.emplace_back();
  units[0].root = true;
  std::vector<std::pair<std::string, const torch::nn::Module*>> unit_paths;
  for (const auto& item : module->named_modules("", /*include_self=*/false)) {
    if (chosen.count(item.value().get()) == 0) continue;
    // A module reachable under two names is one unit, under its first name.
    bool seen = false;
    for (const auto& [path, m] : unit_paths) seen = seen || m == item.value().get();
    if (seen) continue;
    unit_paths.emplace_back(item.key(), item.value().get());
    Unit u;
    u.name = item.key();
    u.module = item.value().get();
    units.push_back(std::move(u));
  }

  // 3. Each parameter goes to the innermost unit around it; one that several units (or a unit
  // and the rest of the model) share goes to the root unit, so that ties stay ties.
  std::unordered_map<const c10::TensorImpl*, std::set<size_t>> owners;
  std::vector<std::pair<std::string, at::Tensor>> firsts;
  for (const auto& [name, t] : occurrences) {
    const std::string module_path =
        name.find('.') == std::string::npos ? std::string() : name.substr(0, name.rfind('.'));
    size_t best = 0;
    size_t best_len = 0;
    for (size_t k = 0; k < unit_paths.size(); ++k) {
      const auto& path = unit_paths[k].first;
      const bool inside = module_path == path || module_path.rfind(path + ".", 0) == 0;
      if (inside && path.size() + 1 > best_len) {
        best = k + 1;
        best_len = path.size() + 1;
      }
    }
    auto [it, fresh] = owners.try_emplace(t.unsafeGetTensorImpl());
    it->second.insert(best);
    if (fresh) firsts.emplace_back(name, t);
  }
  for (const auto& [name, t] : firsts) {
    const auto& set = owners.at(t.unsafeGetTensorImpl());
    const size_t u = set.size() == 1 ? *set.begin() : 0;
    Param p;
    p.tensor = t;
    p.name = name;
    p.unit = u;
    p.numel = t.numel();
    units[u].params.push_back(params.size());
    params.push_back(std::move(p));
  }

  // 4. Every process must shard the same model the same way.
  if (world > 1) {
    std::ostringstream text;
    for (size_t u = 0; u < units.size(); ++u) {
      text << "unit " << (units[u].root ? std::string("(root)") : units[u].name) << ":";
      for (size_t i : units[u].params) {
        text << " " << params[i].name << params[i].tensor.sizes() << params[i].tensor.dtype();
      }
      text << "\n";
    }
    const auto all = all_gather_bytes(*state, kSetupOp, text.str());
    for (size_t r = 0; r < all.size(); ++r) {
      if (all[r] == all[0]) continue;
      std::string a = all[0];
      std::string b = all[r];
      size_t at = 0;
      while (at < a.size() && at < b.size() && a[at] == b[at]) ++at;
      auto line = [&](const std::string& s) {
        const size_t begin = s.rfind('\n', at == 0 ? 0 : at - 1);
        const size_t from = begin == std::string::npos ? 0 : begin + 1;
        return s.substr(from, std::min<size_t>(s.find('\n', at) - from, 200));
      };
      TORCH_CHECK(false, "accelerate: FSDP: process ", r,
                  " shards another model than process 0: ", "process 0 has \"", line(a),
                  "\", process ", r, " has \"", line(b), "\"");
    }
  }

  // 5. Flatten, broadcast (sync_module_states), keep this process's shard, and make the
  // parameters views of the unit's full storage. A unit that will sit behind a holder (a child
  // of a Sequential) is always entered through it: it is freed at once, so that the whole model
  // never has to fit again after preparation.
  std::unordered_set<const torch::nn::Module*> behind_holder;
  for (const auto& item : module->named_modules("", /*include_self=*/true)) {
    if (auto* seq = item.value()->as<torch::nn::SequentialImpl>()) {
      for (auto it = seq->begin(); it != seq->end(); ++it) behind_holder.insert(it->ptr().get());
    }
  }
  torch::NoGradGuard no_grad;
  const auto& mp = options.mixed_precision;
  for (size_t ui = 0; ui < units.size(); ++ui) {
    Unit& u = units[ui];
    if (u.params.empty()) continue;
    u.dtype = params[u.params.front()].tensor.scalar_type();
    for (size_t i : u.params) {
      TORCH_CHECK(params[i].tensor.scalar_type() == u.dtype, "accelerate: FSDP: unit '",
                  u.root ? std::string("(root)") : u.name, "' mixes dtypes (", u.dtype, " and ",
                  params[i].tensor.scalar_type(), " for '", params[i].name,
                  "'); one unit must have one dtype");
      params[i].offset = u.numel;
      u.numel += params[i].numel;
    }
    u.shard_numel = (u.numel + world - 1) / world;
    at::Tensor flat = at::zeros({world * u.shard_numel},
                                params[u.params.front()].tensor.options().requires_grad(false));
    for (size_t i : u.params) {
      flat.narrow(0, params[i].offset, params[i].numel)
          .copy_(params[i].tensor.detach().reshape(-1));
    }
    if (world > 1 && options.sync_module_states) {
      flat = detail::broadcast(*state, kSetupOp, flat, 0);
    }
    u.shard = flat.narrow(0, rank * u.shard_numel, u.shard_numel)
                  .to(shard_device, u.dtype, false, /*copy=*/true);
    if (shard_device.is_cpu() && device.is_cuda()) u.shard = u.shard.pin_memory();
    const auto gdtype = mp.param_dtype.value_or(u.dtype);
    u.full = gdtype == flat.scalar_type() ? flat : flat.to(gdtype);
    flat = at::Tensor();
    u.storage =
        c10::intrusive_ptr<c10::StorageImpl>::reclaim_copy(u.full.storage().unsafeGetStorageImpl());
    for (size_t i : u.params) {
      at::Tensor& t = params[i].tensor;
      t.set_data(u.full.narrow(0, params[i].offset, params[i].numel).view(t.sizes()));
    }
    u.gathered = true;
    gathered_bytes += unit_bytes(u);
    if (!u.root && behind_holder.count(u.module)) {
      u.managed = true;
      reshard(ui);
    }
  }
  peak_gathered_bytes = std::max(peak_gathered_bytes, gathered_bytes);

  // Buffers stay whole: cast (buffer_dtype) and start from process 0's.
  std::unordered_set<const c10::TensorImpl*> buffers_seen;
  for (const auto& item : module->named_buffers(/*recurse=*/true)) {
    at::Tensor b = item.value();
    if (!buffers_seen.insert(b.unsafeGetTensorImpl()).second) continue;
    if (mp.buffer_dtype && b.is_floating_point() && b.scalar_type() != *mp.buffer_dtype) {
      b.set_data(b.to(*mp.buffer_dtype));
    }
    if (world > 1 && options.sync_module_states) {
      b.copy_(detail::broadcast(*state, kSetupOp, b.detach(), 0));
    }
  }

  // 6. Hooks, the registry and the Sequential holders.
  auto& r = registry();
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    id = r.next_id++;
    r.cores[id] = weak_from_this();
    r.roots[module.get()] = weak_from_this();
    for (size_t ui = 1; ui < units.size(); ++ui) {
      if (!units[ui].params.empty()) r.units[units[ui].module] = {weak_from_this(), ui};
    }
  }
  for (size_t i = 0; i < params.size(); ++i) {
    auto accumulator = torch::autograd::impl::grad_accumulator(params[i].tensor);
    TORCH_CHECK(accumulator != nullptr, "accelerate: FSDP: parameter '", params[i].name,
                "' is not a leaf tensor that requires grad");
    const uintptr_t key =
        accumulator->add_post_hook(std::make_unique<GradientHook>(weak_from_this(), i));
    hooks.emplace_back(std::move(accumulator), key);
  }
  installed = install_sequential_holders(*module, [&](const torch::nn::Module* child) {
    for (size_t ui = 1; ui < units.size(); ++ui) {
      if (units[ui].module == child && !units[ui].params.empty()) return true;
    }
    return false;
  });
}

// ---------------------------------------------------------------------- gathering

void FullShardCore::launch_gather(size_t ui) {
  Unit& u = units[ui];
  if (u.gathered || u.gather_work || u.numel == 0) return;
  const int64_t nbytes = unit_bytes(u);
  if (u.storage->nbytes() == 0) {
    u.storage->set_data_ptr_noswap(c10::GetAllocator(device.type())->allocate(nbytes));
    u.storage->set_nbytes(nbytes);
    gathered_bytes += nbytes;
    peak_gathered_bytes = std::max(peak_gathered_bytes, gathered_bytes);
  }
  ++gathers;
  at::Tensor send = u.shard.to(device, u.full.scalar_type(), /*non_blocking=*/false);
  if (world == 1) {
    u.full.copy_(send);
    u.gathered = true;
    return;
  }
  auto& backend = group(*state, kGatherOp);
  u.gather_launch = Clock::now();
  if (state->backend() == "nccl") {
    u.gather_work = backend._allgather_base(u.full, send);
  } else {
    // Gloo in LibTorch 1.13 has no _allgather_base; its allgather writes into the views.
    std::vector<std::vector<at::Tensor>> outputs(1);
    at::Tensor out = wire(u.full, *state);
    for (int64_t r = 0; r < world; ++r) {
      outputs[0].push_back(out.narrow(0, r * u.shard_numel, u.shard_numel));
    }
    std::vector<at::Tensor> inputs{wire(send, *state)};
    u.gather_work = backend.allgather(outputs, inputs);
  }
  u.gather_send = send;
  auto done = std::make_shared<std::atomic<int64_t>>(0);
  u.gather_done_ns = done;
  if (auto future = u.gather_work->getFuture()) {
    future->addCallback([done](c10::ivalue::Future&) {
      done->store(
          std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
              .count());
    });
  }
}

void FullShardCore::wait_gather(size_t ui) {
  Unit& u = units[ui];
  if (!u.gather_work) return;
  const auto start = Clock::now();
  auto work = std::move(u.gather_work);
  u.gather_work.reset();
  detail::wait(*state, kGatherOp, work);
  const auto end = Clock::now();
  gather_wait_seconds += seconds(end - start);
  const int64_t done = u.gather_done_ns ? u.gather_done_ns->load() : 0;
  const auto finished = done > 0 ? Clock::time_point(std::chrono::nanoseconds(done)) : end;
  gather_seconds += seconds(std::min(finished, end) - u.gather_launch);
  u.gather_send = at::Tensor();
  u.gathered = true;
}

void FullShardCore::ensure_gathered(size_t ui) {
  launch_gather(ui);
  wait_gather(ui);
}

void FullShardCore::reshard(size_t ui) {
  Unit& u = units[ui];
  if (u.root || !u.managed || u.numel == 0) return;
  wait_gather(ui);
  if (!u.gathered && u.storage->nbytes() == 0) return;
  gathered_bytes -= static_cast<int64_t>(u.storage->nbytes());
  free_storage(*u.storage, device);
  u.gathered = false;
}

void FullShardCore::maybe_prefetch(size_t ui) {
  Unit& u = units[ui];
  if (u.gathered || u.gather_work || u.numel == 0) return;
  if (options.limit_all_gathers) {
    for (const auto& other : units) {
      if (other.gather_work) return;
    }
  }
  launch_gather(ui);
}

// ---------------------------------------------------------------------- forward and backward

void FullShardCore::pre_forward(size_t ui) {
  std::lock_guard<std::recursive_mutex> lock(mutex);
  if (!order_recorded &&
      std::find(forward_order.begin(), forward_order.end(), ui) == forward_order.end()) {
    forward_order.push_back(ui);
  }
  ensure_gathered(ui);
  units[ui].managed = true;
  if (options.forward_prefetch && order_recorded) {
    auto it = std::find(forward_order.begin(), forward_order.end(), ui);
    if (it != forward_order.end() && it + 1 != forward_order.end()) maybe_prefetch(*(it + 1));
  }
}

void FullShardCore::post_forward(size_t ui, bool hooked) {
  std::lock_guard<std::recursive_mutex> lock(mutex);
  // Without a hook on the outputs, backward could not gather the unit again: it stays
  // gathered until its gradients are done.
  const bool backward_possible = torch::autograd::GradMode::is_enabled();
  // The last unit of the forward is the first of the backward: freeing it would only gather it
  // again at once (PyTorch's FSDP keeps its root unit for the same reason). It is freed when its
  // gradients are done.
  const bool next_in_backward =
      backward_possible && order_recorded && !forward_order.empty() && forward_order.back() == ui;
  if (options.reshard_after_forward && (hooked || !backward_possible) && !next_in_backward) {
    reshard(ui);
  }
}

void FullShardCore::queue_finalize() {
  if (callback_queued) return;
  callback_queued = true;
  auto token = std::make_shared<CallbackToken>(weak_from_this(), iteration);
  torch::autograd::Engine::get_default_engine().queue_callback([token] {
    token->ran = true;
    if (auto core = token->core.lock()) core->finalize();
  });
}

void FullShardCore::pre_backward(size_t ui) {
  std::lock_guard<std::recursive_mutex> lock(mutex);
  order_recorded = true;
  queue_finalize();
  ensure_gathered(ui);
  Unit& u = units[ui];
  if (!u.in_backward) {
    u.in_backward = true;
    u.pending = u.params.size();
  }
  if (options.backward_prefetch == BackwardPrefetch::BACKWARD_PRE) {
    auto it = std::find(forward_order.begin(), forward_order.end(), ui);
    if (it != forward_order.end() && it != forward_order.begin()) maybe_prefetch(*(it - 1));
  }
}

void FullShardCore::on_gradient(size_t index) {
  std::lock_guard<std::recursive_mutex> lock(mutex);
  queue_finalize();
  Param& p = params[index];
  if (p.fired) return;
  p.fired = true;
  Unit& u = units[p.unit];
  if (!u.in_backward) {
    u.in_backward = true;
    u.pending = u.params.size();
  }
  if (p.tensor.grad().defined() && !p.counted) {
    p.counted = true;
    grad_bytes += p.numel * static_cast<int64_t>(p.tensor.element_size());
    peak_grad_bytes = std::max(peak_grad_bytes, grad_bytes);
  }
  if (u.pending > 0 && --u.pending == 0) unit_done(p.unit);
}

void FullShardCore::unit_done(size_t ui) {
  Unit& u = units[ui];
  u.grads_ready = true;
  reshard(ui);
  if (options.backward_prefetch == BackwardPrefetch::BACKWARD_POST) {
    auto it = std::find(forward_order.begin(), forward_order.end(), ui);
    if (it != forward_order.end() && it != forward_order.begin()) maybe_prefetch(*(it - 1));
  }
  if (require_sync()) launch_reduce_scatters(false);
}

// Units are reduce-scattered in one fixed order (last unit first, the root unit last) whatever
// order their gradients complete in: every process must issue the same collectives in the same
// order, and a unit missing gradients on one process completes only at the end of backward.
void FullShardCore::launch_reduce_scatters(bool all) {
  for (size_t k = units.size(); k-- > 0;) {
    Unit& u = units[k];
    if (u.rs_launched) continue;
    if (!all && !u.grads_ready && !u.params.empty()) return;
    launch_reduce_scatter(k);
  }
}

void FullShardCore::launch_reduce_scatter(size_t ui) {
  Unit& u = units[ui];
  u.rs_launched = true;
  if (u.numel == 0) return;
  // At most two in flight: the previous one has had this unit's backward to complete, and its
  // send and receive buffers (a unit each) go back before more are taken.
  if (rs_in_flight) finish_reduce_scatter(*rs_in_flight);
  rs_in_flight = ui;
  const auto& mp = options.mixed_precision;
  const auto rdtype = mp.reduce_dtype.value_or(mp.param_dtype.value_or(u.dtype));
  const auto comm = state->backend() == "nccl" ? device : c10::Device(c10::kCPU);
  torch::NoGradGuard no_grad;
  at::Tensor send =
      at::empty({world * u.shard_numel}, at::TensorOptions().dtype(rdtype).device(comm));
  // A wrapped number keeps the gradients' dtype, as DDP's divisor does.
  at::Tensor divisor = at::scalar_tensor(static_cast<double>(world), at::kDouble);
  divisor.unsafeGetTensorImpl()->set_wrapped_number(true);
  for (size_t i : u.params) {
    Param& p = params[i];
    at::Tensor slice = send.narrow(0, p.offset, p.numel);
    const at::Tensor& g = p.tensor.grad();
    if (g.defined()) {
      // One pass: divided while copied (as DDP's buckets are filled).
      at::div_out(slice, g.reshape(-1), divisor);
      if (p.counted) grad_bytes -= p.numel * static_cast<int64_t>(p.tensor.element_size());
      p.counted = false;
      p.tensor.mutable_grad().reset();
    } else {
      slice.zero_();
    }
  }
  send.narrow(0, u.numel, world * u.shard_numel - u.numel).zero_();
  if (world == 1) {
    u.rs_recv = send;
    return;
  }
  auto& backend = group(*state, kReduceOp);
  if (state->backend() == "nccl") {
    u.rs_recv = at::empty({u.shard_numel}, send.options());
    u.rs_work = backend._reduce_scatter_base(u.rs_recv, send);
  } else {
    // Gloo has no reduce_scatter: an alltoall sends part j to process j, which sums what it
    // receives (as ZeRO's gradient buckets do, ddp.cpp).
    u.rs_recv = at::empty({world * u.shard_numel}, send.options());
    at::Tensor out = wire(u.rs_recv, *state);
    at::Tensor in = wire(send, *state);
    std::vector<int64_t> splits;
    u.rs_work = backend.alltoall_base(out, in, splits, splits);
  }
  u.rs_send = send;
}

void FullShardCore::finish_reduce_scatter(size_t ui) {
  Unit& u = units[ui];
  if (u.numel == 0 || !u.rs_recv.defined()) return;
  if (u.rs_work) {
    auto work = std::move(u.rs_work);
    u.rs_work.reset();
    detail::wait(*state, kReduceOp, work);
  }
  torch::NoGradGuard no_grad;
  at::Tensor summed;
  if (world == 1) {
    summed = u.rs_recv.narrow(0, 0, u.shard_numel);
  } else if (u.rs_recv.numel() == u.shard_numel) {
    summed = u.rs_recv;
  } else {
    at::Tensor parts = u.rs_recv.view({world, u.shard_numel});
    // 16-bit gradients are summed in float32: the sum of N halves loses less that way.
    if (parts.element_size() < 4) parts = parts.to(at::kFloat);
    summed = parts.sum(0);
  }
  const auto [lo, hi] = own_range(u);
  at::Tensor mine = summed.narrow(0, 0, hi - lo).to(shard_device, u.dtype);
  if (u.grad_shard.defined()) {
    u.grad_shard.add_(mine);
  } else {
    u.grad_shard = mine;
  }
  u.rs_send = at::Tensor();
  u.rs_recv = at::Tensor();
}

void FullShardCore::finalize() {
  std::lock_guard<std::recursive_mutex> lock(mutex);
  if (!callback_queued) return;
  struct Reset {
    FullShardCore* core;
    ~Reset() { core->reset_iteration(); }
  } reset{this};
  for (size_t ui = 0; ui < units.size(); ++ui) {
    Unit& u = units[ui];
    if (u.in_backward && !u.grads_ready) {
      u.grads_ready = true;
      reshard(ui);
    }
  }
  // Prefetched for a backward that did not come.
  for (size_t ui = 0; ui < units.size(); ++ui) {
    wait_gather(ui);
    reshard(ui);
  }
  if (require_sync()) {
    launch_reduce_scatters(true);
    for (size_t k = units.size(); k-- > 0;) finish_reduce_scatter(k);
  }
}

void FullShardCore::reset_iteration() {
  callback_queued = false;
  rs_in_flight.reset();
  ++iteration;
  for (auto& u : units) {
    u.in_backward = false;
    u.grads_ready = false;
    u.rs_launched = false;
    u.pending = 0;
  }
  for (auto& p : params) p.fired = false;
}

void FullShardCore::abandon(uint64_t it) noexcept {
  try {
    std::lock_guard<std::recursive_mutex> lock(mutex);
    if (it != iteration) return;
    for (size_t ui = 0; ui < units.size(); ++ui) {
      Unit& u = units[ui];
      try {
        if (u.rs_work) detail::wait(*state, kReduceOp, u.rs_work);
      } catch (...) {
      }
      u.rs_work.reset();
      u.rs_send = at::Tensor();
      u.rs_recv = at::Tensor();
      try {
        wait_gather(ui);
      } catch (...) {
        u.gather_work.reset();
      }
      reshard(ui);
    }
    reset_iteration();
  } catch (...) {
    // Nothing better to do while a backward error is already being reported.
  }
}

// ---------------------------------------------------------------------- after the step

void FullShardCore::parameters_updated() {
  std::lock_guard<std::recursive_mutex> lock(mutex);
  std::vector<size_t> refresh;
  for (size_t ui = 0; ui < units.size(); ++ui) {
    wait_gather(ui);
    if (units[ui].gathered && units[ui].numel > 0) refresh.push_back(ui);
  }
  for (size_t ui : refresh) {
    units[ui].gathered = false;
    launch_gather(ui);
  }
  for (size_t ui : refresh) wait_gather(ui);
  if (!warned_unmanaged && order_recorded) {
    warned_unmanaged = true;
    std::string names;
    for (const auto& u : units) {
      if (!u.root && !u.managed && u.numel > 0) names += (names.empty() ? "" : ", ") + u.name;
    }
    if (!names.empty() && state->is_main_process()) {
      std::cerr << "accelerate: FSDP: unit(s) " << names
                << " were not called through accelerate::fsdp::call, so their parameters stay "
                   "whole (not sharded between uses); call them with fsdp::call or put them in "
                   "a torch::nn::Sequential\n";
    }
  }
}

void FullShardCore::gather_all_whole() {
  std::lock_guard<std::recursive_mutex> lock(mutex);
  for (size_t ui = 0; ui < units.size(); ++ui) launch_gather(ui);
  for (size_t ui = 0; ui < units.size(); ++ui) {
    wait_gather(ui);
    units[ui].managed = false;
  }
}

at::Tensor FullShardCore::gather_copy(size_t ui) {
  Unit& u = units[ui];
  const auto comm = state->backend() == "nccl" ? device : c10::Device(c10::kCPU);
  at::Tensor send = u.shard.to(comm);
  if (world == 1) return send.narrow(0, 0, u.numel);
  at::Tensor out = at::empty({world * u.shard_numel}, send.options());
  auto& backend = group(*state, kGatherOp);
  c10::intrusive_ptr<compat::Work> work;
  if (state->backend() == "nccl") {
    work = backend._allgather_base(out, send);
  } else {
    std::vector<std::vector<at::Tensor>> outputs(1);
    at::Tensor o = wire(out, *state);
    for (int64_t r = 0; r < world; ++r) {
      outputs[0].push_back(o.narrow(0, r * u.shard_numel, u.shard_numel));
    }
    std::vector<at::Tensor> inputs{wire(send, *state)};
    work = backend.allgather(outputs, inputs);
  }
  detail::wait(*state, kGatherOp, work);
  return out.narrow(0, 0, u.numel);
}

// ---------------------------------------------------------------------- UnitScope

UnitScope::UnitScope(const torch::nn::Module* module) {
  auto& r = registry();
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    auto it = r.units.find(module);
    if (it != r.units.end()) {
      core_ = it->second.first.lock();
      unit_ = it->second.second;
    }
  }
  if (core_) {
    core_->pre_forward(unit_);
    return;
  }
  dispatch_ = find_dispatch_unit(module, &unit_);
  if (dispatch_) dispatch_pre_forward(*dispatch_, unit_);
}

UnitScope::~UnitScope() {
  if (finished_) return;
  if (dispatch_) dispatch_post_forward(*dispatch_, unit_);
  if (!core_) return;
  try {
    // The forward failed: free what it gathered.
    std::lock_guard<std::recursive_mutex> lock(core_->mutex);
    core_->reshard(unit_);
  } catch (...) {
  }
}

at::Tensor UnitScope::input(const at::Tensor& t) const {
  if (dispatch_) return dispatch_input(*dispatch_, unit_, t);
  const auto& dtype = core_->options.mixed_precision.param_dtype;
  if (!dtype || !t.defined() || !t.is_floating_point() || t.scalar_type() == *dtype) return t;
  return t.to(*dtype);
}

std::vector<at::Tensor> UnitScope::outputs(const std::vector<at::Tensor>& ts) {
  if (!core_ || !torch::autograd::GradMode::is_enabled()) return ts;
  bool any = false;
  for (const auto& t : ts) any = any || (t.defined() && t.requires_grad());
  if (!any) return ts;
  // As a TensorList: custom functions treat a std::vector argument as a non-tensor input.
  return PreBackward::apply(at::TensorList(ts), core_->id, static_cast<int64_t>(unit_));
}

void UnitScope::finish(bool hooked) {
  finished_ = true;
  if (dispatch_) dispatch_post_forward(*dispatch_, unit_);
  if (core_) core_->post_forward(unit_, hooked);
}

}  // namespace detail

// ---------------------------------------------------------------------- fsdp::

namespace fsdp {

void wrap(const std::shared_ptr<torch::nn::Module>& module) {
  TORCH_CHECK(module != nullptr, "accelerate: fsdp::wrap: the module is null");
  auto& r = detail::registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.marked.erase(
      std::remove_if(r.marked.begin(), r.marked.end(), [](const auto& w) { return w.expired(); }),
      r.marked.end());
  r.marked.push_back(module);
}

bool is_unit(const torch::nn::Module& module) {
  auto& r = detail::registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto it = r.units.find(&module);
  return it != r.units.end() && !it->second.first.expired();
}

namespace {
const std::shared_ptr<detail::FullShardCore>& core_of(const GradientSynchronizer& sync,
                                                      const char* what) {
  TORCH_CHECK(sync.full_shard() != nullptr, "accelerate: ", what,
              ": the model is not fully sharded (FULL_SHARD / ZeRO stage 3)");
  return sync.full_shard();
}
}  // namespace

FullParameters::FullParameters(GradientSynchronizer& sync, bool writeback)
    : core_(core_of(sync, "summon_full_params")), writeback_(writeback) {
  std::lock_guard<std::recursive_mutex> lock(core_->mutex);
  for (size_t u = 0; u < core_->units.size(); ++u) core_->launch_gather(u);
  for (size_t u = 0; u < core_->units.size(); ++u) core_->wait_gather(u);
}

FullParameters::~FullParameters() {
  try {
    std::lock_guard<std::recursive_mutex> lock(core_->mutex);
    torch::NoGradGuard no_grad;
    for (size_t ui = 0; ui < core_->units.size(); ++ui) {
      auto& u = core_->units[ui];
      if (u.numel == 0) continue;
      if (writeback_ && u.full.scalar_type() == u.dtype) {
        const auto [lo, hi] = core_->own_range(u);
        u.shard.narrow(0, 0, hi - lo).copy_(u.full.narrow(0, lo, hi - lo));
      }
      core_->reshard(ui);
    }
  } catch (...) {
  }
}

Stats stats(const GradientSynchronizer& sync) {
  const auto& core = core_of(sync, "fsdp::stats");
  std::lock_guard<std::recursive_mutex> lock(core->mutex);
  Stats s;
  for (const auto& u : core->units) {
    if (u.numel == 0) continue;
    ++s.units;
    s.unit_names.push_back(u.name);
    s.unit_bytes.push_back(core->unit_bytes(u));
    s.shard_bytes += u.shard.numel() * static_cast<int64_t>(u.shard.element_size());
  }
  s.gathered_bytes = core->gathered_bytes;
  s.peak_gathered_bytes = core->peak_gathered_bytes;
  s.peak_unsharded_grad_bytes = core->peak_grad_bytes;
  s.gathers = core->gathers;
  s.gather_seconds = core->gather_seconds;
  s.gather_wait_seconds = core->gather_wait_seconds;
  return s;
}

void reset_stats(const GradientSynchronizer& sync) {
  const auto& core = core_of(sync, "fsdp::reset_stats");
  std::lock_guard<std::recursive_mutex> lock(core->mutex);
  core->peak_gathered_bytes = core->gathered_bytes;
  core->peak_grad_bytes = core->grad_bytes;
  core->gathers = 0;
  core->gather_seconds = 0;
  core->gather_wait_seconds = 0;
}

}  // namespace fsdp
}  // namespace accelerate
