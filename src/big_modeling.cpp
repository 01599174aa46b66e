#include "accelerate/big_modeling.h"

#include "accelerate/detail/cpu_allocator.h"
#include "detail/file_mapping.h"
#include "fsdp_core.h"
#include "tensor_data.h"
#include "unit_hooks.h"

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <algorithm>
#include <filesystem>
#include <iostream>
#include <map>
#include <mutex>
#include <set>
#include <unordered_map>
#include <unordered_set>

namespace accelerate {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------- empty init

namespace detail {

struct EmptyInitScope::Saved {
  c10::impl::LocalDispatchKeySet keys;
  UntouchedPagesScope pages;
};

EmptyInitScope::EmptyInitScope() : saved_(new Saved{c10::impl::tls_local_dispatch_key_set(), {}}) {
  // Tensor operations on a CPU tensor dispatch to the meta kernels while Meta is included: they
  // check shapes and write nothing, so initialisations never touch the untouched pages.
  // Factory functions are not affected (they dispatch on their options), which is what makes
  // the allocations go through UntouchedPagesScope.
  c10::impl::tls_set_dispatch_key_included(c10::DispatchKey::Meta, true);
}

EmptyInitScope::~EmptyInitScope() {
  // Exactly the saved set: removing Meta alone would leave its backend bit behind, and every
  // later operation of this thread would dispatch to the meta kernels.
  c10::impl::_force_tls_local_dispatch_key_set(saved_->keys);
}

void empty_weights_to_meta(torch::nn::Module& module) {
  std::unordered_set<const c10::TensorImpl*> done;
  auto convert = [&](const at::Tensor& t) {
    if (!t.defined() || !done.insert(t.unsafeGetTensorImpl()).second) return;
    if (!is_untouched_allocation(t)) return;
    replace_tensor_data(t,
                        at::empty_strided(t.sizes(), t.strides(), t.options().device(c10::kMeta)));
  };
  for (const auto& p : module.parameters()) convert(p);
  for (const auto& b : module.buffers()) convert(b);
}

}  // namespace detail

bool is_file_mapped(const at::Tensor& t) {
  return detail::is_file_mapped(t);
}

std::string mapped_file(const at::Tensor& t) {
  return detail::mapped_path(t);
}

bool has_meta_tensors(const torch::nn::Module& module) {
  for (const auto& p : module.parameters()) {
    if (p.is_meta()) return true;
  }
  for (const auto& b : module.buffers()) {
    if (b.is_meta()) return true;
  }
  return false;
}

// ---------------------------------------------------------------------- tensors by name

namespace {

struct NamedTensor {
  at::Tensor tensor;
  bool is_buffer = false;
};

std::map<std::string, NamedTensor> tensors_by_name(const torch::nn::Module& model) {
  std::map<std::string, NamedTensor> out;
  for (const auto& item : model.named_parameters()) out[item.key()] = {item.value(), false};
  for (const auto& item : model.named_buffers()) out[item.key()] = {item.value(), true};
  return out;
}

std::string join(const std::vector<std::string>& names, size_t limit = 10) {
  std::string out;
  for (size_t i = 0; i < names.size() && i < limit; ++i) {
    if (!out.empty()) out += ", ";
    out += names[i];
  }
  if (names.size() > limit) out += ", ... (" + std::to_string(names.size()) + " in all)";
  return out;
}

// "cpu", "cuda:1", "meta" as a Device; "disk" is not one.
c10::Device to_device(const std::string& name) {
  TORCH_CHECK(name != "disk", "accelerate: \"disk\" is not a device a tensor can be put on");
  return c10::Device(name);
}

}  // namespace

namespace detail {

void set_tensor_to_device(const at::Tensor& old, const std::string& tensor_name, c10::Device device,
                          const std::optional<at::Tensor>& value,
                          std::optional<at::ScalarType> dtype) {
  TORCH_CHECK(!old.is_meta() || value.has_value() || device.is_meta(),
              "accelerate: set_module_tensor_to_device: '", tensor_name,
              "' is on the meta device; a value is needed to put it on ", device);
  at::Tensor v = value ? value->detach() : old.detach();
  TORCH_CHECK(v.sizes() == old.sizes(),
              "accelerate: set_module_tensor_to_device: a tensor of shape ", v.sizes(),
              " cannot be set in '", tensor_name, "', which has shape ", old.sizes());
  // Accelerate: the value takes the current tensor's dtype, or `dtype` when given (integer and
  // bool tensors are never converted to it).
  at::ScalarType target = old.scalar_type();
  if (dtype && !at::isIntegralType(v.scalar_type(), /*includeBool=*/true)) target = *dtype;
  torch::NoGradGuard no_grad;
  if (value && !old.is_meta() && old.device() == device && old.scalar_type() == target &&
      !is_file_mapped(old)) {
    // In place: whoever holds the storage (an optimizer, a view) sees the new values.
    old.copy_(v);
    return;
  }
  if (!value && old.device() == device && old.scalar_type() == target) return;
  replace_tensor_data(old, v.to(device, target, /*non_blocking=*/false, /*copy=*/true));
}

}  // namespace detail

void set_module_tensor_to_device(torch::nn::Module& module, const std::string& tensor_name,
                                 c10::Device device, const std::optional<at::Tensor>& value,
                                 std::optional<at::ScalarType> dtype) {
  const auto tensors = tensors_by_name(module);
  auto it = tensors.find(tensor_name);
  TORCH_CHECK(it != tensors.end(), "accelerate: set_module_tensor_to_device: ", module.name(),
              " has no parameter or buffer named '", tensor_name, "'");
  detail::set_tensor_to_device(it->second.tensor, tensor_name, device, value, dtype);
}

void retie_parameters(torch::nn::Module& model, const std::vector<std::vector<std::string>>& tied) {
  const auto tensors = tensors_by_name(model);
  for (const auto& group : tied) {
    std::optional<at::Tensor> source;
    for (const auto& name : group) {
      auto it = tensors.find(name);
      TORCH_CHECK(it != tensors.end(), "accelerate: retie_parameters: no parameter '", name, "'");
      if (!source && !it->second.tensor.is_meta()) source = it->second.tensor;
    }
    if (!source) continue;
    for (const auto& name : group) {
      const auto& t = tensors.at(name).tensor;
      if (t.unsafeGetTensorImpl() == source->unsafeGetTensorImpl()) continue;
      detail::replace_tensor_data(t, source->detach());
    }
  }
}

void load_offloaded_weights(torch::nn::Module& model, const OffloadIndex& index,
                            const std::string& offload_folder) {
  const auto tensors = tensors_by_name(model);
  for (const auto& [name, info] : index) {
    const auto file = (fs::path(offload_folder) / (name + ".dat")).string();
    at::Tensor weight = load_offloaded_weight(file, info, /*mapped=*/false);
    auto it = tensors.find(name);
    TORCH_CHECK(it != tensors.end(), "accelerate: load_offloaded_weights: ", offload_folder,
                " holds '", name, "', which the model does not have");
    detail::set_tensor_to_device(it->second.tensor, name, c10::kCPU, weight, std::nullopt);
  }
}

// ---------------------------------------------------------------------- dispatch hooks

namespace detail {

struct DispatchHooks {
  // Weak: the hooks live in a registry that may outlive the model, and must not keep its
  // weights (or their file mappings) alive.
  using WeakTensor = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Unit {
    std::string name;
    const torch::nn::Module* module = nullptr;
    c10::Device execution{c10::kCPU};
    // Tensors of the unit's subtree resting elsewhere than its execution device.
    std::vector<WeakTensor> streamed;
    // Tensors of the subtree read from a mapped file (prefetched before the unit runs).
    std::vector<WeakTensor> mapped;
    bool prefetched = false;
  };
  struct Resting {
    at::Tensor home;  // the resting data while the tensor is on the execution device
    int loaded = 0;   // units holding it there now
  };

  std::weak_ptr<torch::nn::Module> model;
  const torch::nn::Module* root = nullptr;
  DispatchInfo info;
  std::vector<Unit> units;
  std::unordered_map<const c10::TensorImpl*, Resting> resting;
  std::vector<size_t> order;  // units in the order of their first forward
  std::vector<bool> seen;
  std::vector<SequentialHolder> installed;
  std::mutex mutex;

  static std::optional<at::Tensor> lock(const WeakTensor& weak) {
    auto strong = weak.lock();
    if (!strong) return std::nullopt;
    return at::Tensor(std::move(strong));
  }
  void load(const WeakTensor& weak, c10::Device device) {
    auto t = lock(weak);
    if (!t) return;
    auto& r = resting[t->unsafeGetTensorImpl()];
    if (r.loaded++ > 0) return;
    r.home = t->detach();
    replace_tensor_data(*t, r.home.to(device, /*non_blocking=*/true));
  }
  void unload(const WeakTensor& weak) {
    auto t = lock(weak);
    if (!t) return;
    auto it = resting.find(t->unsafeGetTensorImpl());
    if (it == resting.end() || it->second.loaded == 0 || --it->second.loaded > 0) return;
    replace_tensor_data(*t, it->second.home);
    it->second.home = at::Tensor();
  }
  void advise(const WeakTensor& weak) {
    if (auto t = lock(weak)) advise_will_need(*t);
  }
};

namespace {

struct DispatchRegistry {
  std::mutex mutex;
  std::unordered_map<const torch::nn::Module*, std::shared_ptr<DispatchHooks>> roots;
  std::unordered_map<const torch::nn::Module*, std::pair<std::weak_ptr<DispatchHooks>, size_t>>
      units;

  // Hooks whose model died: the module addresses may be reused by another model.
  void purge() {
    for (auto it = roots.begin(); it != roots.end();) {
      if (it->second->model.expired()) {
        const auto* dead = it->second.get();
        for (auto u = units.begin(); u != units.end();) {
          auto owner = u->second.first.lock();
          u = (!owner || owner.get() == dead) ? units.erase(u) : std::next(u);
        }
        it = roots.erase(it);
      } else {
        ++it;
      }
    }
  }
};

DispatchRegistry& dispatch_registry() {
  static auto* r = new DispatchRegistry();  // never destroyed: used from static destructors
  return *r;
}

}  // namespace

std::shared_ptr<DispatchHooks> find_dispatch_unit(const torch::nn::Module* module, size_t* unit) {
  auto& r = dispatch_registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto it = r.units.find(module);
  if (it == r.units.end()) return nullptr;
  auto hooks = it->second.first.lock();
  if (!hooks || hooks->model.expired()) return nullptr;
  *unit = it->second.second;
  return hooks;
}

void dispatch_pre_forward(DispatchHooks& hooks, size_t unit) {
  std::lock_guard<std::mutex> lock(hooks.mutex);
  if (!hooks.seen[unit]) {
    hooks.seen[unit] = true;
    hooks.order.push_back(unit);
  }
  auto& u = hooks.units[unit];
  if (u.prefetched) {
    u.prefetched = false;
  } else {
    for (const auto& t : u.mapped) hooks.advise(t);
    for (const auto& t : u.streamed) hooks.load(t, u.execution);
  }
  // The next unit of the first forward's order: its pages are read ahead (and, on a GPU, its
  // weights copied) while this one computes.
  auto pos = std::find(hooks.order.begin(), hooks.order.end(), unit);
  if (pos == hooks.order.end() || std::next(pos) == hooks.order.end()) return;
  auto& next = hooks.units[*std::next(pos)];
  if (next.prefetched) return;
  for (const auto& t : next.mapped) hooks.advise(t);
  if (next.streamed.empty()) return;
  for (const auto& t : next.streamed) hooks.load(t, next.execution);
  next.prefetched = true;
}

at::Tensor dispatch_input(const DispatchHooks& hooks, size_t unit, const at::Tensor& t) {
  const auto& device = hooks.units[unit].execution;
  if (!t.defined() || t.device() == device) return t;
  return t.to(device);
}

void dispatch_post_forward(DispatchHooks& hooks, size_t unit) noexcept {
  try {
    std::lock_guard<std::mutex> lock(hooks.mutex);
    for (const auto& t : hooks.units[unit].streamed) hooks.unload(t);
  } catch (...) {
    // Releasing is best effort: the weights stay on the execution device until the next call.
  }
}

}  // namespace detail

namespace {

bool covered_by(const std::string& name, const std::string& entry) {
  return entry.empty() || name == entry ||
         (name.size() > entry.size() && name.compare(0, entry.size(), entry) == 0 &&
          name[entry.size()] == '.');
}

}  // namespace

DispatchInfo dispatch_model(const std::shared_ptr<torch::nn::Module>& model,
                            const DeviceMap& device_map, const DispatchOptions& options) {
  TORCH_CHECK(model != nullptr, "accelerate: dispatch_model: the model is null");
  TORCH_CHECK(detail::full_shard_core_of(*model) == nullptr,
              "accelerate: dispatch_model: the model is fully sharded (FSDP); a sharded model "
              "cannot be dispatched across devices");
  TORCH_CHECK(!device_map.empty(), "accelerate: dispatch_model: the device map is empty");
  DeviceMap map;
  for (const auto& [name, device] : device_map)
    map.emplace_back(name, normalize_device_name(device));
  check_device_map(*model, map);
  remove_dispatch_hooks(*model);

  DispatchInfo info;
  info.device_map = map;
  if (options.main_device) {
    info.main_device = normalize_device_name(*options.main_device);
    TORCH_CHECK(info.main_device != "disk",
                "accelerate: dispatch_model: the main device cannot be \"disk\"");
  } else {
    info.main_device = "cpu";
    for (const auto& [name, device] : map) {
      if (device.rfind("cuda", 0) == 0) {
        info.main_device = device;
        break;
      }
    }
  }
  const c10::Device main(info.main_device);

  // 1. Every tensor where the map says it rests.
  const auto tensors = tensors_by_name(*model);
  std::optional<OffloadIndex> offload_index;
  std::vector<std::string> unfilled;
  torch::NoGradGuard no_grad;
  for (const auto& [name, named] : tensors) {
    const at::Tensor& t = named.tensor;
    const std::string device = device_for(map, name);
    if ((device == "disk" || device == "cpu") && named.is_buffer && !options.offload_buffers) {
      // Buffers of offloaded units stay on the execution device, as in Accelerate.
      if (t.is_meta()) {
        unfilled.push_back(name);
      } else if (t.device() != main) {
        detail::replace_tensor_data(t, t.to(main));
      }
      continue;
    }
    if (device == "disk") {
      if (detail::is_file_mapped(t)) continue;
      TORCH_CHECK(!options.offload_dir.empty() || t.is_meta(), "accelerate: dispatch_model: '",
                  name,
                  "' is mapped to \"disk\" but is held in memory; pass an offload_dir to write "
                  "it there, or load the model with this device map (load_checkpoint_in_model "
                  "maps disk weights from the checkpoint)");
      if (options.offload_dir.empty()) {
        unfilled.push_back(name);
        continue;
      }
      if (!t.is_meta()) {
        fs::create_directories(options.offload_dir);
        OffloadIndex written;
        offload_weight(t, name, options.offload_dir, &written);
        save_offload_index(written, options.offload_dir);
        offload_index.reset();
      }
      if (!offload_index) {
        const bool has_index = fs::exists(fs::path(options.offload_dir) / kOffloadIndexName);
        offload_index = has_index ? read_offload_index(options.offload_dir) : OffloadIndex{};
      }
      auto found = std::find_if(offload_index->begin(), offload_index->end(),
                                [&](const auto& e) { return e.first == name; });
      if (found == offload_index->end()) {
        unfilled.push_back(name);
        continue;
      }
      const auto file = (fs::path(options.offload_dir) / (name + ".dat")).string();
      at::Tensor mapped = load_offloaded_weight(file, found->second, /*mapped=*/true);
      TORCH_CHECK(mapped.sizes() == t.sizes(), "accelerate: dispatch_model: '", name,
                  "' has shape ", mapped.sizes(), " in ", file, " but ", t.sizes(),
                  " in the model");
      if (!t.is_meta() && mapped.scalar_type() != t.scalar_type()) {
        mapped = mapped.to(t.scalar_type());
      }
      detail::replace_tensor_data(t, mapped);
      continue;
    }
    if (t.is_meta()) {
      unfilled.push_back(name);
      continue;
    }
    const c10::Device target = to_device(device);
    if (t.device() != target || detail::is_file_mapped(t)) {
      // "cpu" means in memory: a weight still served from a file is read in.
      detail::replace_tensor_data(t, t.to(target, t.scalar_type(), false, /*copy=*/true));
    }
  }
  TORCH_CHECK(unfilled.empty(),
              "accelerate: dispatch_model: these weights were never loaded "
              "(they are still on the meta device): ",
              join(unfilled),
              "; load them with load_checkpoint_in_model or give the offload_dir holding them");

  // 2. Units: every module an entry covers.
  auto hooks = std::make_shared<detail::DispatchHooks>();
  hooks->model = model;
  hooks->root = model.get();
  bool multi_device = false;
  for (const auto& [name, device] : map) multi_device = multi_device || device != map[0].second;
  for (const auto& item : model->named_modules("", /*include_self=*/true)) {
    const std::string& name = item.key();
    std::string entry_device;
    size_t best = 0;
    bool found = false;
    for (const auto& [entry, device] : map) {
      if (covered_by(name, entry) && (!found || entry.size() >= best)) {
        entry_device = device;
        best = entry.size();
        found = true;
      }
    }
    if (!found || name.empty()) continue;
    detail::DispatchHooks::Unit unit;
    unit.name = name;
    unit.module = item.value().get();
    unit.execution = entry_device.rfind("cuda", 0) == 0 ? c10::Device(entry_device) : main;
    for (const auto& p : item.value()->named_parameters()) {
      const std::string full = name + "." + p.key();
      const bool param_offloaded =
          device_for(map, full) == "disk" || device_for(map, full) == "cpu";
      if (detail::is_file_mapped(p.value())) unit.mapped.emplace_back(p.value().getIntrusivePtr());
      if (param_offloaded && p.value().device() != unit.execution) {
        unit.streamed.emplace_back(p.value().getIntrusivePtr());
      }
    }
    if (options.offload_buffers) {
      for (const auto& b : item.value()->named_buffers()) {
        if (b.value().device() != unit.execution) {
          unit.streamed.emplace_back(b.value().getIntrusivePtr());
        }
      }
    }
    if (!unit.streamed.empty()) info.streamed_units.push_back(name);
    info.units.push_back(name);
    hooks->units.push_back(std::move(unit));
  }
  const bool any_mapped = std::any_of(hooks->units.begin(), hooks->units.end(),
                                      [](const auto& u) { return !u.mapped.empty(); });
  if (!options.force_hooks && !multi_device && info.streamed_units.empty() && !any_mapped) {
    // One device, nothing streamed or read ahead: the plain model runs as it is.
    info.units.clear();
    return info;
  }
  hooks->seen.assign(hooks->units.size(), false);
  std::unordered_set<const torch::nn::Module*> unit_modules;
  for (const auto& u : hooks->units) unit_modules.insert(u.module);
  hooks->installed = detail::install_sequential_holders(
      *model, [&](const torch::nn::Module* m) { return unit_modules.count(m) > 0; });

  hooks->info = info;
  auto& r = detail::dispatch_registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.purge();
  r.roots[model.get()] = hooks;
  for (size_t i = 0; i < hooks->units.size(); ++i) r.units[hooks->units[i].module] = {hooks, i};
  return info;
}

void remove_dispatch_hooks(const torch::nn::Module& model) {
  std::shared_ptr<detail::DispatchHooks> hooks;
  {
    auto& r = detail::dispatch_registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    r.purge();
    auto it = r.roots.find(&model);
    if (it == r.roots.end()) return;
    hooks = it->second;
    r.roots.erase(it);
    for (auto u = r.units.begin(); u != r.units.end();) {
      auto owner = u->second.first.lock();
      u = (!owner || owner == hooks) ? r.units.erase(u) : std::next(u);
    }
  }
  std::lock_guard<std::mutex> lock(hooks->mutex);
  for (auto& unit : hooks->units) {
    for (const auto& weak : unit.streamed) {
      auto t = detail::DispatchHooks::lock(weak);
      if (!t) continue;
      auto it = hooks->resting.find(t->unsafeGetTensorImpl());
      if (it == hooks->resting.end() || it->second.loaded == 0) continue;
      detail::replace_tensor_data(*t, it->second.home);
      hooks->resting.erase(it);
    }
  }
  detail::restore_sequential_holders(hooks->installed);
}

std::optional<DispatchInfo> dispatch_info(const torch::nn::Module& model) {
  auto& r = detail::dispatch_registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto it = r.roots.find(&model);
  if (it == r.roots.end() || it->second->model.expired()) return std::nullopt;
  return it->second->info;
}

bool is_dispatched(const torch::nn::Module& model) {
  auto& r = detail::dispatch_registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto it = r.roots.find(&model);
  return it != r.roots.end() && !it->second->model.expired();
}

// ---------------------------------------------------------------------- load and dispatch

LoadReport load_checkpoint_and_dispatch(const std::shared_ptr<torch::nn::Module>& model,
                                        const std::string& checkpoint,
                                        const LoadAndDispatchOptions& options) {
  TORCH_CHECK(model != nullptr, "accelerate: load_checkpoint_and_dispatch: the model is null");
  DeviceMap map;
  if (options.device_map) {
    if (const auto* text = std::get_if<std::string>(&*options.device_map)) {
      static const std::set<std::string> kModes = {"auto", "balanced", "balanced_low_0",
                                                   "sequential"};
      TORCH_CHECK(kModes.count(*text), "accelerate: load_checkpoint_and_dispatch: device_map \"",
                  *text,
                  "\" is not a map nor one of \"auto\", \"balanced\", \"balanced_low_0\", "
                  "\"sequential\"");
      std::optional<MaxMemory> max_memory = options.max_memory;
      if (*text != "sequential") {
        const DeviceBudgets balanced =
            get_balanced_memory(*model, {.max_memory = max_memory,
                                         .no_split_module_classes = options.no_split_module_classes,
                                         .dtype = options.dtype,
                                         .low_zero = *text == "balanced_low_0"});
        MaxMemory resolved;
        for (const auto& [device, bytes] : balanced) resolved.emplace(device, ByteSize(bytes));
        max_memory = resolved;
      }
      map =
          infer_auto_device_map(*model, {.max_memory = max_memory,
                                         .no_split_module_classes = options.no_split_module_classes,
                                         .dtype = options.dtype,
                                         .offload_buffers = options.offload_buffers});
    } else {
      map = std::get<DeviceMap>(*options.device_map);
    }
  }
  LoadCheckpointOptions load;
  load.dtype = options.dtype;
  load.strict = options.strict;
  load.device_map = map;
  load.offload_folder = options.offload_folder;
  load.offload_state_dict = options.offload_state_dict;
  load.offload_buffers = options.offload_buffers;
  load.keep_in_fp32_modules = options.keep_in_fp32_modules;
  LoadReport report = load_checkpoint_in_model(*model, checkpoint, load);
  if (map.empty()) return report;
  dispatch_model(model, map,
                 {.main_device = options.main_device,
                  .offload_dir = options.offload_folder,
                  .offload_buffers = options.offload_buffers,
                  .force_hooks = options.force_hooks});
  return report;
}

}  // namespace accelerate
