#include "accelerate/device_map.h"

#include "accelerate/checkpointing.h"

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>
#include <torch/cuda.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstddef>
#include <deque>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>
#include <string_view>

namespace accelerate {

// ---------------------------------------------------------------------- byte sizes, device names

ByteSize::ByteSize(int64_t b) : bytes(b) {
  TORCH_CHECK(b >= 0, "accelerate: ByteSize: a byte count cannot be negative, got ", b);
}

ByteSize::ByteSize(int b) : ByteSize(static_cast<int64_t>(b)) {}

ByteSize::ByteSize(const char* text) {
  TORCH_CHECK(text != nullptr, "accelerate: ByteSize: null size string");
  bytes = parse_file_size(text);
}

ByteSize::ByteSize(const std::string& text) : bytes(parse_file_size(text)) {}

namespace {

constexpr const char* kAcceptedDevices =
    "\"cuda:N\" (or \"N\"; \"cuda\" is cuda:0), \"cpu\" or \"disk\"";

bool starts_with(std::string_view text, std::string_view prefix) {
  return text.substr(0, prefix.size()) == prefix;
}

// `name` is `module` itself or lies under it. Accelerate tests `module + "." in name + "."`, a
// substring test that also matches unrelated paths ("0." in "10.weight."); the dot-bounded prefix
// is what that test means.
bool inside(const std::string& name, const std::string& module) {
  return name == module ||
         (name.size() > module.size() && starts_with(name, module) && name[module.size()] == '.');
}

std::string normalized(const std::string& device, const char* where) {
  if (device == "cpu" || device == "disk") return device;
  if (device == "cuda") return "cuda:0";
  const std::string index = starts_with(device, "cuda:") ? device.substr(5) : device;
  // At most 9 digits, so that the index fits an int.
  const bool is_index =
      !index.empty() && index.size() <= 9 &&
      std::all_of(index.begin(), index.end(), [](char c) { return std::isdigit(c) != 0; });
  TORCH_CHECK(is_index, "accelerate: ", where, ": unknown device \"", device, "\"; use ",
              kAcceptedDevices);
  return "cuda:" + std::to_string(std::stoi(index));
}

bool is_gpu(const std::string& device) {
  return starts_with(device, "cuda:");
}

int gpu_index(const std::string& device) {
  return std::stoi(device.substr(5));
}

template <class Range>
std::string python_list(const Range& items) {
  std::ostringstream out;
  out << "[";
  bool first = true;
  for (const auto& item : items) {
    out << (first ? "" : ", ") << "'" << item << "'";
    first = false;
  }
  out << "]";
  return out.str();
}

// ---------------------------------------------------------------------- tensors and sizes

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// Python's named_parameters() / named_buffers() list a tensor registered under several names
// once, under its first name; LibTorch's list every name.
NamedTensors unique_tensors(const torch::OrderedDict<std::string, at::Tensor>& items) {
  NamedTensors out;
  std::set<const c10::TensorImpl*> seen;
  for (const auto& item : items) {
    if (item.value().defined() && seen.insert(item.value().unsafeGetTensorImpl()).second) {
      out.emplace_back(item.key(), item.value());
    }
  }
  return out;
}

// Accelerate's named_module_tensors: parameters, then buffers (each list deduplicated on its own,
// as PyTorch does).
NamedTensors module_tensors(const torch::nn::Module& module, bool recurse) {
  NamedTensors out = unique_tensors(module.named_parameters(recurse));
  NamedTensors buffers = unique_tensors(module.named_buffers(recurse));
  out.insert(out.end(), buffers.begin(), buffers.end());
  return out;
}

// Bits rather than bytes, because Accelerate counts a bool as 1/8 byte.
int64_t bits_per_element(at::ScalarType type) {
  return type == at::kBool ? 1 : static_cast<int64_t>(c10::elementSize(type)) * 8;
}

int64_t tensor_bytes(const std::string& full_name, const at::Tensor& tensor,
                     const std::optional<at::ScalarType>& dtype,
                     const std::map<std::string, at::ScalarType>& special_dtypes) {
  const at::ScalarType own = tensor.scalar_type();
  int64_t bits = bits_per_element(own);
  if (auto it = special_dtypes.find(full_name); it != special_dtypes.end()) {
    bits = bits_per_element(it->second);
  } else if (dtype && !at::isIntegralType(own, /*includeBool=*/true)) {
    // Loading in `dtype` converts floating-point tensors only, and never widens them.
    bits = std::min(bits, bits_per_element(*dtype));
  }
  return (tensor.numel() * bits + 7) / 8;
}

struct ModuleSizes {
  std::map<std::string, int64_t> bytes;
  // Names in order of first appearance, the order Python's dict keeps (get_balanced_memory picks
  // the first module of each no-split type in that order).
  std::vector<std::string> order;

  int64_t operator[](const std::string& name) const {
    auto it = bytes.find(name);
    return it == bytes.end() ? 0 : it->second;
  }
};

ModuleSizes sizes_of(const torch::nn::Module& model, const std::optional<at::ScalarType>& dtype,
                     const std::map<std::string, at::ScalarType>& special_dtypes) {
  ModuleSizes sizes;
  sizes.bytes = compute_module_sizes(model, {.dtype = dtype, .special_dtypes = special_dtypes});
  std::set<std::string> listed;
  auto list = [&](const std::string& name) {
    if (listed.insert(name).second) sizes.order.push_back(name);
  };
  for (const auto& [name, tensor] : module_tensors(model, /*recurse=*/true)) {
    list("");
    for (size_t dot = name.find('.'); dot != std::string::npos; dot = name.find('.', dot + 1)) {
      list(name.substr(0, dot));
    }
    list(name);
  }
  return sizes;
}

int64_t size_in(const std::map<std::string, int64_t>& sizes, const std::string& name) {
  auto it = sizes.find(name);
  return it == sizes.end() ? 0 : it->second;
}

// Accelerate's compute_module_total_buffer_size. `prefix` is the module's name in the model, so
// that special_dtypes (keyed by full names) apply.
int64_t buffer_bytes(const torch::nn::Module& module, const std::string& prefix,
                     const std::optional<at::ScalarType>& dtype,
                     const std::map<std::string, at::ScalarType>& special_dtypes) {
  int64_t total = 0;
  for (const auto& [name, tensor] : unique_tensors(module.named_buffers(/*recurse=*/true))) {
    total +=
        tensor_bytes(prefix.empty() ? name : prefix + "." + name, tensor, dtype, special_dtypes);
  }
  return total;
}

// ---------------------------------------------------------------------- the work list

// One entry of the list infer_auto_device_map works through: a module, or a single tensor.
struct Item {
  std::string name;
  std::shared_ptr<torch::nn::Module> module;  // null for a tensor
};

using Children = torch::OrderedDict<std::string, std::shared_ptr<torch::nn::Module>>;

Children children_of(const Item& item) {
  return item.module ? item.module->named_children() : Children();
}

bool is_no_split(const Item& item, const std::vector<std::string>& no_split_module_classes) {
  if (!item.module) return false;
  const std::string type = item.module->name();
  return std::any_of(
      no_split_module_classes.begin(), no_split_module_classes.end(),
      [&](const std::string& wanted) { return detail::module_type_matches(type, wanted); });
}

std::string join(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : prefix + "." + name;
}

// What a module is split into: its own parameters, its children, then its own buffers (the order
// Accelerate lists the model's top level in). Accelerate leaves the buffers out when it splits a
// module below the top, so that they end up in no entry of the map; they are kept here, so that
// the map always covers them.
std::vector<Item> parts_of(const torch::nn::Module& module, const std::string& prefix) {
  std::vector<Item> parts;
  for (const auto& [name, tensor] : unique_tensors(module.named_parameters(/*recurse=*/false))) {
    parts.push_back({join(prefix, name), nullptr});
  }
  for (const auto& child : module.named_children()) {
    parts.push_back({join(prefix, child.key()), child.value()});
  }
  for (const auto& [name, tensor] : unique_tensors(module.named_buffers(/*recurse=*/false))) {
    parts.push_back({join(prefix, name), nullptr});
  }
  return parts;
}

std::vector<Item> modules_only(const std::vector<Item>& items) {
  std::vector<Item> out;
  std::copy_if(items.begin(), items.end(), std::back_inserter(out),
               [](const Item& item) { return item.module != nullptr; });
  return out;
}

ptrdiff_t index_of(const std::vector<Item>& items, const std::string& name) {
  auto it =
      std::find_if(items.begin(), items.end(), [&](const Item& item) { return item.name == name; });
  return it == items.end() ? -1 : it - items.begin();
}

std::pair<int64_t, std::vector<std::string>> max_layer(
    const std::vector<Item>& items, const std::map<std::string, int64_t>& sizes,
    const std::vector<std::string>& no_split_module_classes) {
  int64_t max_size = 0;
  std::vector<std::string> names;
  std::vector<Item> stack(items.rbegin(), items.rend());  // the next item is at the back
  while (!stack.empty()) {
    Item item = std::move(stack.back());
    stack.pop_back();
    const Children children = children_of(item);
    if (children.is_empty() || is_no_split(item, no_split_module_classes)) {
      const int64_t size = size_in(sizes, item.name);
      if (size > max_size) {
        max_size = size;
        names = {item.name};
      } else if (size == max_size) {
        names.push_back(item.name);
      }
      continue;
    }
    for (auto it = children.items().rbegin(); it != children.items().rend(); ++it) {
      stack.push_back({item.name + "." + it->key(), it->value()});
    }
  }
  return {max_size, names};
}

// The tied parameters outside `name` that share a tensor with a parameter inside it.
std::vector<std::string> outside_ties(const std::string& name,
                                      const std::vector<std::vector<std::string>>& tied) {
  std::vector<std::string> out;
  for (const auto& group : tied) {
    const bool any_in = std::any_of(group.begin(), group.end(),
                                    [&](const std::string& p) { return inside(p, name); });
    const bool all_in = std::all_of(group.begin(), group.end(),
                                    [&](const std::string& p) { return inside(p, name); });
    if (!any_in || all_in) continue;
    for (const auto& p : group) {
      if (!inside(p, name)) out.push_back(p);
    }
  }
  return out;
}

struct Ties {
  int64_t size = 0;  // the module's size plus that of the modules holding its ties
  std::vector<std::string> names;
  std::vector<std::shared_ptr<torch::nn::Module>> modules;
  bool all_found = true;  // every tied parameter lies in one of `items`
};

// Accelerate's get_module_size_with_ties. A tied parameter in no item of the list was placed
// already (in the main loop) and adds nothing. An item that is itself the tied tensor counts too
// (Accelerate only looks for items above it, and fails when a split left the tensor on its own).
template <class Items>
Ties size_with_ties(const std::vector<std::string>& tied_params, int64_t module_size,
                    const ModuleSizes& sizes, const Items& items) {
  Ties ties;
  ties.size = module_size;
  for (const auto& param : tied_params) {
    auto it = std::find_if(items.begin(), items.end(),
                           [&](const Item& item) { return inside(param, item.name); });
    if (it == items.end()) {
      ties.all_found = false;
      continue;
    }
    ties.names.push_back(it->name);
    ties.modules.push_back(it->module);
    // As Accelerate: the holder's size less the tied tensor's, once per tied tensor.
    ties.size += sizes[it->name] - sizes[param];
  }
  return ties;
}

struct Fallback {
  Item found;
  std::vector<Item> rest;
};

// Accelerate's fallback_allocate: the first module (depth first through `items`, splitting what
// is too large) that fits in `size_limit` with its ties, and `items` without it (its ancestors in
// the list replaced by their parts).
std::optional<Fallback> fallback_allocate(const std::vector<Item>& items, const ModuleSizes& sizes,
                                          int64_t size_limit,
                                          const std::vector<std::string>& no_split_module_classes,
                                          const std::vector<std::vector<std::string>>& tied) {
  if (size_limit < 0) return std::nullopt;
  std::deque<Item> search(items.begin(), items.end());
  std::optional<Item> found;
  while (!search.empty()) {
    Item item = std::move(search.front());
    search.pop_front();
    const Ties ties =
        size_with_ties(outside_ties(item.name, tied), sizes[item.name], sizes, search);
    // A tie to something already passed in this search cannot be counted (Accelerate fails on
    // it); taking the module anyway could swap two tied modules back and forth for ever.
    if (ties.all_found && ties.size <= size_limit) {
      found = std::move(item);
      break;
    }
    if (children_of(item).is_empty() || is_no_split(item, no_split_module_classes)) continue;
    const std::vector<Item> parts = parts_of(*item.module, item.name);
    search.insert(search.begin(), parts.begin(), parts.end());
  }
  if (!found) return std::nullopt;

  std::vector<Item> rest = items;
  const std::string& name = found->name;
  for (size_t dot = name.find('.'); dot != std::string::npos; dot = name.find('.', dot + 1)) {
    const ptrdiff_t parent = index_of(rest, name.substr(0, dot));
    if (parent < 0) continue;
    const Item holder = rest[static_cast<size_t>(parent)];
    const std::vector<Item> parts = parts_of(*holder.module, holder.name);
    rest.erase(rest.begin() + parent);
    rest.insert(rest.begin() + parent, parts.begin(), parts.end());
  }
  const ptrdiff_t target = index_of(rest, name);
  TORCH_INTERNAL_ASSERT(target >= 0, "fallback_allocate lost ", name);
  Fallback result{rest[static_cast<size_t>(target)], {}};
  rest.erase(rest.begin() + target);
  result.rest = std::move(rest);
  return result;
}

void assign(DeviceMap& map, const std::string& name, const std::string& device) {
  auto it = std::find_if(map.begin(), map.end(), [&](const auto& e) { return e.first == name; });
  if (it != map.end()) {
    it->second = device;
  } else {
    map.emplace_back(name, device);
  }
}

// ---------------------------------------------------------------------- available memory

int64_t available_ram() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  int64_t value = 0;
  std::string unit;
  while (meminfo >> key >> value) {
    std::getline(meminfo, unit);
    if (key == "MemAvailable:") return value * 1024;  // reported in kB
  }
  // Kernels before 3.14 have no MemAvailable.
  const long pages = ::sysconf(_SC_AVPHYS_PAGES);
  const long page_size = ::sysconf(_SC_PAGESIZE);
  TORCH_CHECK(pages > 0 && page_size > 0,
              "accelerate: get_max_memory: cannot read the available RAM; pass max_memory");
  return static_cast<int64_t>(pages) * page_size;
}

// The CUDA runtime, found by its C symbols when a CUDA build of LibTorch has loaded it: the CPU
// build we compile against has no CUDA library to link, and linking one would tie the library to
// CUDA builds (memory.cpp finds the caching allocator the same way).
struct CudaRuntime {
  int (*get_device)(int*) = nullptr;
  int (*set_device)(int) = nullptr;
  int (*mem_get_info)(size_t*, size_t*) = nullptr;
  bool complete() const { return get_device && set_device && mem_get_info; }
};

const CudaRuntime& cuda_runtime() {
  static const CudaRuntime runtime = [] {
    auto lookup = [](void* handle) {
      CudaRuntime r;
      r.get_device = reinterpret_cast<int (*)(int*)>(::dlsym(handle, "cudaGetDevice"));
      r.set_device = reinterpret_cast<int (*)(int)>(::dlsym(handle, "cudaSetDevice"));
      r.mem_get_info =
          reinterpret_cast<int (*)(size_t*, size_t*)>(::dlsym(handle, "cudaMemGetInfo"));
      return r;
    };
    CudaRuntime r = lookup(RTLD_DEFAULT);
    for (const char* soname : {"libcudart.so", "libcudart.so.12", "libcudart.so.11.0"}) {
      if (r.complete()) break;
      if (void* handle = ::dlopen(soname, RTLD_LAZY | RTLD_LOCAL)) r = lookup(handle);
    }
    return r;
  }();
  return runtime;
}

DeviceBudgets available_memory() {
  DeviceBudgets budgets;
  if (torch::cuda::is_available()) {
    const CudaRuntime& cuda = cuda_runtime();
    TORCH_CHECK(cuda.complete(),
                "accelerate: get_max_memory: CUDA is available but its free memory cannot be "
                "queried (cudaMemGetInfo not found); pass max_memory, e.g. "
                "{{\"cuda:0\", \"20GB\"}, {\"cpu\", \"60GB\"}}");
    int current = 0;
    const bool restore = cuda.get_device(&current) == 0;
    const int count = static_cast<int>(torch::cuda::device_count());
    for (int i = 0; i < count; ++i) {
      size_t free = 0;
      size_t total = 0;
      // As Accelerate, a device that cannot be queried is left out.
      if (cuda.set_device(i) != 0 || cuda.mem_get_info(&free, &total) != 0) continue;
      budgets.emplace_back("cuda:" + std::to_string(i), static_cast<int64_t>(free));
    }
    if (restore) cuda.set_device(current);
  }
  budgets.emplace_back("cpu", available_ram());
  return budgets;
}

}  // namespace

std::string normalize_device_name(const std::string& device) {
  return normalized(device, "normalize_device_name");
}

namespace detail {

namespace {

std::string without_namespace(const std::string& type) {
  // The last "::" outside template arguments ("ns::Block<ns::X>" -> "Block<ns::X>").
  int depth = 0;
  size_t cut = std::string::npos;
  for (size_t i = 0; i + 1 < type.size(); ++i) {
    if (type[i] == '<') ++depth;
    if (type[i] == '>') --depth;
    if (depth == 0 && type[i] == ':' && type[i + 1] == ':') cut = i + 2;
  }
  return cut == std::string::npos ? type : type.substr(cut);
}

std::string without_impl(const std::string& type) {
  constexpr std::string_view kImpl = "Impl";
  if (type.size() > kImpl.size() &&
      type.compare(type.size() - kImpl.size(), kImpl.size(), kImpl) == 0) {
    return type.substr(0, type.size() - kImpl.size());
  }
  return type;
}

}  // namespace

bool module_type_matches(const std::string& type, const std::string& wanted) {
  if (wanted.empty()) return false;
  const std::string bare = without_namespace(type);
  const std::string types[] = {type, bare, without_impl(type), without_impl(bare)};
  const std::string wanteds[] = {wanted, without_impl(wanted)};
  for (const auto& t : types) {
    for (const auto& w : wanteds) {
      if (t == w) return true;
    }
  }
  return false;
}

}  // namespace detail

// ---------------------------------------------------------------------- sizes and ties

std::pair<int64_t, std::vector<std::string>> get_max_layer_size(
    const std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>>& modules,
    const std::map<std::string, int64_t>& module_sizes,
    const std::vector<std::string>& no_split_module_classes) {
  std::vector<Item> items;
  items.reserve(modules.size());
  for (const auto& [name, module] : modules) items.push_back({name, module});
  return max_layer(items, module_sizes, no_split_module_classes);
}

std::vector<std::vector<std::string>> find_tied_parameters(const torch::nn::Module& model) {
  std::map<const c10::TensorImpl*, std::vector<std::string>> names_of;
  for (const auto& p : model.named_parameters(/*recurse=*/true)) {
    if (p.value().defined()) names_of[p.value().unsafeGetTensorImpl()].push_back(p.key());
  }
  std::vector<std::vector<std::string>> groups;
  for (auto& [impl, names] : names_of) {
    if (names.size() < 2) continue;
    std::sort(names.begin(), names.end());
    names.erase(std::unique(names.begin(), names.end()), names.end());
    if (names.size() > 1) groups.push_back(std::move(names));
  }
  std::sort(groups.begin(), groups.end());
  return groups;
}

// ---------------------------------------------------------------------- budgets

DeviceBudgets get_max_memory(const std::optional<MaxMemory>& max_memory) {
  if (!max_memory) return available_memory();

  std::map<int, int64_t> gpus;
  std::optional<int64_t> cpu;
  std::optional<int64_t> disk;
  std::map<std::string, std::string> written_as;
  for (const auto& [key, size] : *max_memory) {
    const std::string device = normalized(key, "get_max_memory");
    auto [it, fresh] = written_as.emplace(device, key);
    TORCH_CHECK(fresh, "accelerate: get_max_memory: \"", it->second, "\" and \"", key,
                "\" both give the budget of ", device);
    if (device == "cpu") {
      cpu = size.bytes;
    } else if (device == "disk") {
      disk = size.bytes;
    } else {
      gpus[gpu_index(device)] = size.bytes;
    }
  }

  const int count = static_cast<int>(torch::cuda::device_count());
  for (const auto& [index, bytes] : gpus) {
    if (index < count) continue;
    std::ostringstream available;
    for (int i = 0; i < count; ++i) available << (i ? ", " : "") << i;
    std::cerr << "accelerate: get_max_memory: Device cuda:" << index
              << " is not available, available devices are [" << available.str() << "]\n";
  }

  DeviceBudgets budgets;
  for (const auto& [index, bytes] : gpus)
    budgets.emplace_back("cuda:" + std::to_string(index), bytes);
  if (cpu) budgets.emplace_back("cpu", *cpu);
  if (disk) budgets.emplace_back("disk", *disk);
  return budgets;
}

namespace {

// Accelerate's get_module_leaves: names (other than "") that no other name lies directly under.
std::vector<std::string> module_leaves(const std::vector<std::string>& names) {
  std::map<std::string, int> children;
  for (const auto& name : names) {
    const size_t dot = name.rfind('.');
    if (name.empty() || dot == std::string::npos) continue;
    ++children[name.substr(0, dot)];
  }
  std::vector<std::string> leaves;
  for (const auto& name : names) {
    if (!name.empty() && children.count(name) == 0) leaves.push_back(name);
  }
  return leaves;
}

}  // namespace

DeviceBudgets get_balanced_memory(const torch::nn::Module& model,
                                  const BalancedMemoryOptions& options) {
  const bool user_set_max_memory = options.max_memory.has_value();
  DeviceBudgets budgets = get_max_memory(options.max_memory);

  std::vector<size_t> gpus;  // positions in `budgets` of the GPUs with a budget, by index
  for (size_t i = 0; i < budgets.size(); ++i) {
    if (is_gpu(budgets[i].first) && budgets[i].second > 0) gpus.push_back(i);
  }
  const int64_t num_devices = static_cast<int64_t>(gpus.size());
  if (num_devices == 0) return budgets;

  bool low_zero = options.low_zero;
  if (num_devices == 1) {
    // low_zero needs a second GPU; the margin is still kept.
    low_zero = false;
    if (!user_set_max_memory) {
      // Leave 10% of a lone GPU for activations. Python scales the first GPU listed, budget or
      // not; truncating keeps its float comparisons (an integer n <= 0.9 x iff n <= floor(0.9 x)).
      for (auto& [device, bytes] : budgets) {
        if (!is_gpu(device)) continue;
        bytes = static_cast<int64_t>(static_cast<double>(bytes) * 0.9);
        break;
      }
    }
  }

  const ModuleSizes sizes = sizes_of(model, options.dtype, options.special_dtypes);
  const int64_t total = sizes[""];
  int64_t per_gpu = total / (low_zero ? num_devices - 1 : num_devices);

  // A share of exactly model / GPUs leaves each GPU slightly short of whole layers, pushing the
  // last ones off the GPUs; the margin is the largest no-split block or the mean size of the
  // lowest modules, whichever is larger, times 1.25.
  int64_t buffer = 0;
  const auto& no_split = options.no_split_module_classes;
  if (!no_split.empty()) {
    std::map<std::string, std::shared_ptr<torch::nn::Module>> modules;
    for (const auto& m : model.named_modules(std::string(), /*include_self=*/false)) {
      modules.emplace(m.key(), m.value());
    }
    std::map<std::string, int64_t> block_of_type;  // the first block of each type, in model order
    std::set<size_t> wanted_seen;
    for (const auto& name : sizes.order) {
      if (name.empty()) continue;
      auto it = modules.find(name);
      if (it == modules.end()) continue;  // a tensor
      const std::string type = it->second->name();
      bool wanted = false;
      for (size_t w = 0; w < no_split.size(); ++w) {
        if (detail::module_type_matches(type, no_split[w])) {
          wanted = true;
          wanted_seen.insert(w);
        }
      }
      if (wanted) block_of_type.try_emplace(type, sizes[name]);
      if (wanted_seen.size() == no_split.size()) break;
    }
    for (const auto& [type, size] : block_of_type) buffer = std::max(buffer, size);
  }
  // The tensors are the first leaves; once they are removed, the leaves are the lowest modules.
  const std::vector<std::string> tensors = module_leaves(sizes.order);
  const std::set<std::string> tensor_set(tensors.begin(), tensors.end());
  std::vector<std::string> modules;
  std::copy_if(sizes.order.begin(), sizes.order.end(), std::back_inserter(modules),
               [&](const std::string& n) { return tensor_set.count(n) == 0; });
  const std::vector<std::string> lowest = module_leaves(modules);
  int64_t lowest_total = 0;
  for (const auto& name : lowest) lowest_total += sizes[name];
  const int64_t mean_lowest =
      lowest_total / std::max<int64_t>(static_cast<int64_t>(lowest.size()), 1);
  buffer = std::max(buffer, mean_lowest);
  buffer += buffer / 4;  // int(1.25 * buffer), exactly, for buffer >= 0
  per_gpu += buffer;

  // The last GPU keeps its whole budget, in case the margin is not enough. Accelerate's low_zero
  // names GPU 0; here it is the first GPU with a budget (the same when GPU 0 has one).
  for (size_t k = 0; k + 1 < gpus.size(); ++k) {
    int64_t& bytes = budgets[gpus[k]].second;
    if (!(low_zero && k == 0)) bytes = std::min(per_gpu, bytes);
  }
  if (low_zero) {
    int64_t others = 0;
    for (size_t k = 1; k < gpus.size(); ++k) others += budgets[gpus[k]].second;
    int64_t& first = budgets[gpus[0]].second;
    first = std::min(std::max<int64_t>(0, total - others), first);
  }
  return budgets;
}

// ---------------------------------------------------------------------- device maps

DeviceMap infer_auto_device_map(const torch::nn::Module& model,
                                const InferDeviceMapOptions& options) {
  const DeviceBudgets budgets = get_max_memory(options.max_memory);
  const auto& no_split = options.no_split_module_classes;
  const bool verbose = options.verbose;

  std::vector<std::string> devices;
  std::map<std::string, int64_t> limit;
  for (const auto& [device, bytes] : budgets) {
    devices.push_back(device);
    limit[device] = bytes;
  }
  if (std::find(devices.begin(), devices.end(), "disk") == devices.end()) devices.push_back("disk");
  std::vector<std::string> gpus;
  std::copy_if(devices.begin(), devices.end(), std::back_inserter(gpus), is_gpu);
  // The devices an offloaded layer is brought back to, so they keep room for the largest one.
  const std::vector<std::string> main_devices =
      gpus.empty() ? std::vector<std::string>{"cpu"} : std::vector<std::string>{gpus[0], "cpu"};

  const ModuleSizes sizes = sizes_of(model, options.dtype, options.special_dtypes);
  const auto tied = find_tied_parameters(model);
  std::vector<Item> todo = parts_of(model, "");

  DeviceMap device_map;
  size_t current = 0;
  std::map<std::string, int64_t> used;
  std::map<std::string, int64_t> buffer_sizes;
  std::vector<std::pair<std::string, int64_t>> minimum_needed;

  auto [max_layer_size, max_layer_names] = max_layer(todo, sizes.bytes, no_split);

  while (!todo.empty()) {
    Item item = todo.front();
    todo.erase(todo.begin());
    const std::string name = item.name;
    if (verbose) std::cout << "\nTreating module " << name << ".\n";
    // The largest layer may have been this one: then find the largest among the rest.
    std::erase_if(max_layer_names, [&](const std::string& n) { return inside(n, name); });
    if (max_layer_names.empty()) {
      std::tie(max_layer_size, max_layer_names) =
          max_layer(modules_only(todo), sizes.bytes, no_split);
    }
    const int64_t module_size = sizes[name];
    const std::vector<std::string> tied_params = outside_ties(name, tied);
    if (verbose && !tied_params.empty()) {
      std::cout << "  So those parameters need to be taken into account "
                << python_list(tied_params) << "\n";
    }

    const std::string device = devices[current];
    const bool on_disk = device == "disk";  // no limit
    int64_t current_max = on_disk ? 0 : limit.at(device);
    int64_t reserved = 0;
    if (std::find(main_devices.begin(), main_devices.end(), device) != main_devices.end()) {
      current_max -= max_layer_size;
      reserved = max_layer_size;
    }
    int64_t& device_used = used[device];
    const Ties ties = size_with_ties(tied_params, module_size, sizes, todo);

    if (on_disk || device_used + ties.size <= current_max) {
      if (verbose) {
        std::cout << "Putting " << name;
        if (!ties.names.empty()) {
          std::cout << " and " << python_list(ties.names);
        } else {
          std::cout << " (size=" << module_size << ")";
        }
        if (!on_disk) std::cout << " (available=" << current_max - device_used << ")";
        std::cout << " on " << device << ".\n";
      }
      device_used += ties.size;
      assign(device_map, name, device);
      for (const auto& tied_name : ties.names) {
        const ptrdiff_t at = index_of(todo, tied_name);
        if (at >= 0) todo.erase(todo.begin() + at);
        assign(device_map, tied_name, device);
      }
      // Buffers of offloaded layers are loaded to the GPU all at once unless offload_buffers.
      if (!options.offload_buffers && item.module) {
        buffer_sizes[device] +=
            buffer_bytes(*item.module, name, options.dtype, options.special_dtypes);
      }
      continue;
    }

    // The module fits without its ties: try to split a module holding them.
    if (!tied_params.empty() && device_used + module_size <= current_max) {
      if (verbose) {
        std::cout << "Not enough space on " << device << " to put " << name << " and "
                  << python_list(ties.names) << " (space available " << current_max - device_used
                  << ", needed size " << ties.size << ").\n";
      }
      bool split = false;
      for (size_t k = 0; k < ties.names.size(); ++k) {
        const Item holder{ties.names[k], ties.modules[k]};
        if (children_of(holder).is_empty() || is_no_split(holder, no_split)) continue;
        if (verbose) std::cout << "Splitting " << holder.name << ".\n";
        const std::vector<Item> parts = parts_of(*holder.module, holder.name);
        const ptrdiff_t at = index_of(todo, holder.name);
        todo.erase(todo.begin() + at);
        todo.insert(todo.begin() + at, parts.begin(), parts.end());
        todo.insert(todo.begin(), item);
        std::tie(max_layer_size, max_layer_names) =
            max_layer(modules_only(todo), sizes.bytes, no_split);
        split = true;
        break;
      }
      if (split) continue;
      if (verbose) std::cout << "None of the tied module can be split, going to the next device.\n";
    }

    if (device_used + module_size >= current_max) {
      if (verbose) {
        std::cout << "Not enough space on " << device << " to put " << name << " (space available "
                  << current_max - device_used << ", module size " << module_size << ").\n";
      }
      if (children_of(item).is_empty() || is_no_split(item, no_split)) {
        if (verbose) std::cout << "This module cannot be split, going to the next device.\n";
      } else {
        if (verbose) std::cout << "Splitting " << name << ".\n";
        const std::vector<Item> parts = parts_of(*item.module, name);
        todo.insert(todo.begin(), parts.begin(), parts.end());
        std::tie(max_layer_size, max_layer_names) =
            max_layer(modules_only(todo), sizes.bytes, no_split);
        continue;
      }
    }

    // Nothing went to this device yet: a later module may still fit in what is left once the
    // larger of the largest layer and this module is set aside.
    if (device_used == 0 && options.fallback_allocation && !on_disk) {
      const int64_t room = limit.at(device) - std::max(max_layer_size, ties.size);
      if (auto fallback = fallback_allocate(todo, sizes, room - device_used, no_split, tied)) {
        if (verbose)
          std::cout << "Trying " << fallback->found.name << " on " << device << " instead.\n";
        todo = std::move(fallback->rest);
        todo.insert(todo.begin(), item);
        todo.insert(todo.begin(), fallback->found);
        continue;
      }
    }

    if (device_used == 0) minimum_needed.emplace_back(device, ties.size + reserved);
    device_used += reserved;
    ++current;
    todo.insert(todo.begin(), item);
  }

  if (options.clean_result) device_map = clean_device_map(std::move(device_map));

  const int64_t offloaded_buffers = buffer_sizes["cpu"] + buffer_sizes["disk"];
  if (offloaded_buffers > 0 && !options.offload_buffers && !gpus.empty()) {
    const bool fits_a_gpu = std::any_of(budgets.begin(), budgets.end(), [&](const auto& budget) {
      return is_gpu(budget.first) && budget.second >= offloaded_buffers + used[budget.first];
    });
    if (!fits_a_gpu) {
      std::cerr << "accelerate: infer_auto_device_map: the layers offloaded to the CPU or the disk "
                   "hold "
                << offloaded_buffers
                << " bytes of buffers, which seem to fit no GPU next to what it holds; if you run "
                   "out of memory later, consider offload_buffers=true\n";
    }
  }
  if (verbose && !minimum_needed.empty()) {
    std::cout << "No module could be assigned to the following devices for lack of memory:\n";
    for (const auto& [device, bytes] : minimum_needed) {
      std::cout << "  - " << device << ": " << bytes << " bytes required\n";
    }
  }
  return device_map;
}

namespace {

void clean_under(DeviceMap& map, const std::string& module_name) {
  const std::string prefix = module_name.empty() ? "" : module_name + ".";
  std::vector<size_t> members;
  std::set<std::string> values;
  for (size_t i = 0; i < map.size(); ++i) {
    if (starts_with(map[i].first, prefix)) {
      members.push_back(i);
      values.insert(map[i].second);
    }
  }
  if (values.size() == 1 && members.size() > 1) {
    const std::string device = *values.begin();
    const size_t first = members.front();
    for (auto it = members.rbegin(); it != members.rend(); ++it) map.erase(map.begin() + *it);
    auto existing =
        std::find_if(map.begin(), map.end(), [&](const auto& e) { return e.first == module_name; });
    if (existing != map.end()) {
      existing->second = device;
    } else {
      map.insert(map.begin() + first, {module_name, device});
    }
  }

  const size_t depth =
      module_name.empty()
          ? 1
          : static_cast<size_t>(std::count(module_name.begin(), module_name.end(), '.')) + 2;
  std::vector<std::string> children;
  for (const auto& [key, device] : map) {
    if (!starts_with(key, prefix) || key.size() <= module_name.size()) continue;
    size_t end = 0;
    for (size_t d = 0; d < depth && end != std::string::npos; ++d) {
      end = key.find('.', d == 0 ? 0 : end + 1);
    }
    std::string child = key.substr(0, end);
    if (std::find(children.begin(), children.end(), child) == children.end()) {
      children.push_back(std::move(child));
    }
  }
  for (const auto& child : children) clean_under(map, child);
}

// Every parameter and buffer name, tied ones under each name, module by module as a state dict
// lists them.
void collect_tensor_names(const torch::nn::Module& module, const std::string& prefix,
                          std::vector<std::string>& out) {
  for (const auto& p : module.named_parameters(/*recurse=*/false)) {
    if (p.value().defined()) out.push_back(join(prefix, p.key()));
  }
  for (const auto& b : module.named_buffers(/*recurse=*/false)) {
    if (b.value().defined()) out.push_back(join(prefix, b.key()));
  }
  for (const auto& child : module.named_children()) {
    collect_tensor_names(*child.value(), join(prefix, child.key()), out);
  }
}

}  // namespace

DeviceMap clean_device_map(DeviceMap device_map) {
  clean_under(device_map, "");
  return device_map;
}

void check_device_map(const torch::nn::Module& model, const DeviceMap& device_map) {
  for (const auto& [name, device] : device_map) {
    (void)normalized(device, ("check_device_map: entry \"" + name + "\"").c_str());
  }

  std::vector<std::string> tensors;
  collect_tensor_names(model, "", tensors);
  std::set<std::string> known(tensors.begin(), tensors.end());
  for (const auto& m : model.named_modules(std::string(), /*include_self=*/false)) {
    known.insert(m.key());
  }
  std::vector<std::string> unknown;
  for (const auto& [name, device] : device_map) {
    if (!name.empty() && known.count(name) == 0) unknown.push_back(name);
  }
  TORCH_CHECK(unknown.empty(), "accelerate: check_device_map: the device map names what is no ",
              "module, parameter or buffer of the model: ", python_list(unknown));

  std::vector<std::string> uncovered;
  for (const auto& tensor : tensors) {
    const bool covered = std::any_of(device_map.begin(), device_map.end(), [&](const auto& e) {
      return e.first.empty() || inside(tensor, e.first);
    });
    if (!covered) uncovered.push_back(tensor);
  }
  TORCH_CHECK(uncovered.empty(),
              "accelerate: check_device_map: the device map gives no device for ",
              python_list(uncovered));
}

std::string device_for(const DeviceMap& device_map, const std::string& name) {
  const std::pair<std::string, std::string>* best = nullptr;
  for (const auto& entry : device_map) {
    if (!entry.first.empty() && !inside(name, entry.first)) continue;
    if (best == nullptr || entry.first.size() > best->first.size()) best = &entry;
  }
  TORCH_CHECK(best != nullptr, "accelerate: device_for: no entry of the device map covers \"", name,
              "\"");
  return normalized(best->second, "device_for");
}

}  // namespace accelerate
