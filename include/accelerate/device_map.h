#pragma once
/// \file
/// Device maps for big models (Accelerate's `infer_auto_device_map` and its helpers from
/// `utils.modeling`): which GPU, the CPU or the disk each part of a model goes to, given how much
/// memory every device may use.
///
/// A device map lists module, parameter or buffer names with a device, in allocation order. An
/// entry covers its name and everything under "name." ("" covers the whole model). Devices are
/// written "cuda:N", "cpu" or "disk"; budgets also accept "N" and "cuda" (= cuda:0).
///
/// All computation looks at tensor sizes and dtypes only, so the model may be on any device
/// (including meta). Tied weights (the same tensor registered under several names) count once,
/// under the first name, and the modules holding them are kept on one device.
///
/// Example:
/// \code
///   auto map = accelerate::infer_auto_device_map(
///       *model, {.max_memory = accelerate::MaxMemory{{"cuda:0", "10GiB"}, {"cpu", "30GiB"}},
///                .no_split_module_classes = {"DecoderLayer"}});
///   accelerate::check_device_map(*model, map);
///   for (const auto& [name, device] : map) std::cout << name << " -> " << device << "\n";
/// \endcode

#include <accelerate/memory.h>

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace accelerate {

/// A byte count written as an integer or as a size string ("10GB", "512MiB"; powers of 1000 for
/// KB/MB/GB/TB, of 1024 for KiB/MiB/GiB/TiB), parsed with accelerate::parse_file_size. Negative
/// counts and unreadable strings are errors naming the value; a zero budget is written as the
/// integer 0.
///
/// Example:
/// \code
///   accelerate::ByteSize a = "2GB";   // a.bytes == 2000000000
///   accelerate::ByteSize b = 4096;    // b.bytes == 4096
/// \endcode
struct ByteSize {
  /// The count in bytes.
  int64_t bytes = 0;
  /// Zero bytes (so that std::map<std::string, ByteSize>::operator[] works).
  ByteSize() = default;
  // Implicit, so that budgets read as Python's dicts do: {{"cpu", "10GB"}, {"0", 1000}}.
  ByteSize(int64_t b);
  ByteSize(int b);
  ByteSize(const char* text);
  ByteSize(const std::string& text);
};

/// Budgets per device, as the user writes them: keys "cuda:N" (also accepted: "N", "cuda" =
/// cuda:0), "cpu", "disk".
///
/// Example:
/// \code
///   accelerate::MaxMemory budgets{{"0", "10GiB"}, {"cuda:1", 8000000000}, {"cpu", "30GB"}};
/// \endcode
using MaxMemory = std::map<std::string, ByteSize>;

/// Resolved budgets in bytes, in allocation order: GPUs by index, then "cpu", then "disk".
///
/// Example:
/// \code
///   accelerate::DeviceBudgets budgets = accelerate::get_max_memory(
///       accelerate::MaxMemory{{"cpu", "1GB"}, {"1", 100}, {"0", 200}});
///   // {{"cuda:0", 200}, {"cuda:1", 100}, {"cpu", 1000000000}}
/// \endcode
using DeviceBudgets = std::vector<std::pair<std::string, int64_t>>;

/// Module / parameter / buffer name -> device ("cuda:N", "cpu", "disk"), in order. "" names the
/// whole model.
///
/// Example:
/// \code
///   accelerate::DeviceMap map{{"embed", "cuda:0"}, {"layers.0", "cuda:0"}, {"layers.1", "cpu"}};
/// \endcode
using DeviceMap = std::vector<std::pair<std::string, std::string>>;

/// The canonical name of a device: "0" and "cuda" become "cuda:0", "3" becomes "cuda:3";
/// "cuda:N", "cpu" and "disk" stay. Anything else is an error naming it and listing the accepted
/// forms.
///
/// Example:
/// \code
///   accelerate::normalize_device_name("1");      // "cuda:1"
///   accelerate::normalize_device_name("cuda");   // "cuda:0"
///   accelerate::normalize_device_name("disk");   // "disk"
/// \endcode
std::string normalize_device_name(const std::string& device);

/// The size of the largest layer among `modules` and the names of all the layers of that size, in
/// order (Accelerate's `get_max_layer_size`). A layer is a module without children or one whose
/// type is in `no_split_module_classes` (see detail::module_type_matches); any other module is
/// replaced by its children (depth first). Sizes come from `module_sizes` (compute_module_sizes;
/// a missing name counts 0).
///
/// Example:
/// \code
///   auto sizes = accelerate::compute_module_sizes(*net);
///   std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>> top;
///   for (const auto& c : net->named_children()) top.emplace_back(c.key(), c.value());
///   auto [size, names] = accelerate::get_max_layer_size(top, sizes, {"Block"});
/// \endcode
std::pair<int64_t, std::vector<std::string>> get_max_layer_size(
    const std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>>& modules,
    const std::map<std::string, int64_t>& module_sizes,
    const std::vector<std::string>& no_split_module_classes);

/// The groups of parameter names that hold the same tensor (Accelerate's
/// `find_tied_parameters`): every name of each shared tensor, each group sorted, the groups
/// sorted. Empty when nothing is tied. A tie in LibTorch is one at::Tensor registered under
/// several names.
///
/// Example:
/// \code
///   auto groups = accelerate::find_tied_parameters(*model);
///   // {{"embed.weight", "head.weight"}}
/// \endcode
std::vector<std::vector<std::string>> find_tied_parameters(const torch::nn::Module& model);

/// Resolves budgets (Accelerate's `get_max_memory`). Given: strings are parsed, keys normalised
/// (normalize_device_name; two keys naming one device are an error) and ordered GPUs by index,
/// "cpu", "disk"; a GPU index at or past the number of CUDA devices gets a warning on stderr, as
/// in Accelerate. Not given: the free memory of every CUDA device (when CUDA is available) and
/// "cpu" = MemAvailable from /proc/meminfo. When CUDA is available but its free memory cannot be
/// queried (the CUDA runtime is not loaded), this is an error asking for explicit budgets.
///
/// Example:
/// \code
///   auto all = accelerate::get_max_memory();   // {{"cpu", <available RAM>}} on a CPU machine
///   auto some = accelerate::get_max_memory(accelerate::MaxMemory{{"cuda", "1GiB"}});
///   // {{"cuda:0", 1073741824}}
/// \endcode
DeviceBudgets get_max_memory(const std::optional<MaxMemory>& max_memory = std::nullopt);

/// Options of get_balanced_memory.
///
/// Example:
/// \code
///   accelerate::BalancedMemoryOptions options{
///       .max_memory = accelerate::MaxMemory{{"0", "10GB"}, {"1", "10GB"}}, .low_zero = true};
/// \endcode
struct BalancedMemoryOptions {
  /// Budgets; unset: get_max_memory() (and 90% of the GPU when there is only one).
  std::optional<MaxMemory> max_memory;
  /// Module types never split across devices (detail::module_type_matches).
  std::vector<std::string> no_split_module_classes;
  /// Type the floating-point weights will be loaded in (see compute_module_sizes).
  std::optional<at::ScalarType> dtype;
  /// Types of single tensors by full name (see compute_module_sizes).
  std::map<std::string, at::ScalarType> special_dtypes;
  /// Keep as little as possible on the first GPU (which generation code uses for other things).
  bool low_zero = false;
};

/// Budgets that spread the model evenly over the GPUs (Accelerate's `get_balanced_memory`), for
/// infer_auto_device_map. Each GPU but the last gets at most model size / number of GPUs plus a
/// margin of 1.25 x the larger of the largest no-split block and the mean size of the lowest
/// modules; the last keeps its whole budget. GPUs with a zero budget are ignored. With low_zero
/// the first GPU keeps only what the others cannot hold. Without GPUs in the budgets they are
/// returned as get_max_memory resolves them.
///
/// Example:
/// \code
///   auto budgets = accelerate::get_balanced_memory(
///       *model, {.max_memory = accelerate::MaxMemory{{"0", 300}, {"1", 300}}});
///   // for a 236-byte model: {{"cuda:0", 215}, {"cuda:1", 300}}
/// \endcode
DeviceBudgets get_balanced_memory(const torch::nn::Module& model,
                                  const BalancedMemoryOptions& options = {});

/// Options of infer_auto_device_map.
///
/// Example:
/// \code
///   accelerate::InferDeviceMapOptions options{
///       .max_memory = accelerate::MaxMemory{{"0", "20GB"}, {"cpu", "60GB"}},
///       .no_split_module_classes = {"Block"}, .dtype = at::kHalf};
/// \endcode
struct InferDeviceMapOptions {
  /// Budgets (see get_max_memory); unset: what the devices have free.
  std::optional<MaxMemory> max_memory;
  /// Module types never split across devices (detail::module_type_matches), e.g. blocks with a
  /// residual connection.
  std::vector<std::string> no_split_module_classes;
  /// Type the floating-point weights will be loaded in (see compute_module_sizes).
  std::optional<at::ScalarType> dtype;
  /// Types of single tensors by full name, overriding `dtype`.
  std::map<std::string, at::ScalarType> special_dtypes;
  /// Print every decision on stdout.
  bool verbose = false;
  /// Group entries that go to one device into their parent module (clean_device_map).
  bool clean_result = true;
  /// Whether offloaded layers will offload their buffers too; when false and the buffers of the
  /// layers put on the CPU or the disk fit no GPU next to what it holds, a warning says so.
  bool offload_buffers = false;
  /// When nothing can be put on a device, look (breadth first) for a later module that fits there
  /// before moving on.
  bool fallback_allocation = false;
};

/// A device map filling the GPUs in order, then the CPU, then the disk (Accelerate's
/// `infer_auto_device_map`), such that no device exceeds its budget and, when anything is
/// offloaded, the first GPU (or the CPU when there is none) keeps room for the largest layer.
/// Modules that do not fit are split into their own parameters, their children and their own
/// buffers, unless their type is in no_split_module_classes; modules holding tied weights go to
/// the same device. "disk" has no limit.
///
/// Example:
/// \code
///   // linear1 64 bytes, batchnorm 72, linear2 100
///   auto map = accelerate::infer_auto_device_map(
///       *model, {.max_memory = accelerate::MaxMemory{{"0", 200}, {"1", 200}}});
///   // {{"linear1", "cuda:0"}, {"batchnorm", "cuda:1"}, {"linear2", "cuda:1"}}
/// \endcode
DeviceMap infer_auto_device_map(const torch::nn::Module& model,
                                const InferDeviceMapOptions& options = {});

/// Groups the entries of every module whose entries all name one device into a single entry for
/// the module, from the whole model ("") down (Accelerate's `clean_device_map`). The grouped entry
/// takes the place of the first entry it replaces.
///
/// Example:
/// \code
///   accelerate::clean_device_map({{"a.x", "cuda:0"}, {"a.y", "cuda:0"}, {"b", "cpu"}});
///   // {{"a", "cuda:0"}, {"b", "cpu"}}
/// \endcode
DeviceMap clean_device_map(DeviceMap device_map);

/// Every parameter and buffer is covered by an entry (an entry covers its name and everything
/// under "name."); error naming the uncovered tensors otherwise; also errors on entries naming
/// nothing in the model and on bad device names. Tied tensors must be covered under every name.
///
/// Example:
/// \code
///   accelerate::check_device_map(*model, {{"linear1", "0"}, {"batchnorm", "cpu"},
///                                         {"linear2", "disk"}});
/// \endcode
void check_device_map(const torch::nn::Module& model, const DeviceMap& device_map);

/// The device of tensor `name`: the entry with the longest name that is `name` or a prefix of it
/// at a dot boundary ("" covers all), normalised (normalize_device_name). Error naming the tensor
/// if none.
///
/// Example:
/// \code
///   accelerate::device_for({{"", "cpu"}, {"layers.1", "cuda:1"}}, "layers.1.weight");  // "cuda:1"
///   accelerate::device_for({{"", "cpu"}, {"layers.1", "cuda:1"}}, "layers.10.weight"); // "cpu"
/// \endcode
std::string device_for(const DeviceMap& device_map, const std::string& name);

namespace detail {
/// Whether LibTorch type name `type` (Module::name(), e.g. "ns::BlockImpl") is `wanted`: exact, or
/// without namespace, or either without a trailing "Impl" ("Block" matches "BlockImpl" and
/// "ns::BlockImpl").
///
/// Example:
/// \code
///   accelerate::detail::module_type_matches("torch::nn::LinearImpl", "Linear");   // true
///   accelerate::detail::module_type_matches("ns::BlockImpl", "other::Block");     // false
/// \endcode
bool module_type_matches(const std::string& type, const std::string& wanted);
}  // namespace detail

}  // namespace accelerate
