#pragma once
/// \file
/// Big models: build a model without memory, place its weights on GPUs, the CPU or the disk
/// (Accelerate's `init_empty_weights`, `set_module_tensor_to_device`, `dispatch_model`,
/// `load_checkpoint_and_dispatch`, `load_offloaded_weights`, `retie_parameters`). Device maps are
/// computed by device_map.h; the offload-folder format is offload.h.
///
/// "disk" means the weights stay where they are on disk: parameters mapped to "disk" become
/// zero-copy views of the checkpoint's safetensors file (or of an offload folder's `.dat`
/// files), mapped privately: the operating system pages them in when a forward reads them and
/// drops them under memory pressure, so a model larger than RAM runs forward. Writing to such a
/// parameter copies the touched pages into private memory and never changes the file.
///
/// Execution is intercepted where full sharding intercepts it (fsdp.h): children of a
/// `torch::nn::Sequential` need nothing, other units are called with
/// `accelerate::call<BlockImpl>(module, x)` (the same function as fsdp::call). A dispatched unit
/// moves its tensor arguments to its execution device; a unit whose weights live on the CPU or the
/// disk while it executes on a GPU has them copied to the GPU for its forward and released after
/// it. On a CPU-only machine "disk" units run from the mapping and the next unit's pages are
/// prefetched (`madvise(MADV_WILLNEED)`) when a unit starts.
///
/// Example:
/// \code
///   auto model = accelerate::init_empty_weights([] { return Net(); });  // no memory used
///   // In Net's forward, blocks are entered with accelerate::call<BlockImpl>(blocks[i], x).
///   accelerate::load_checkpoint_and_dispatch(model.ptr(), "checkpoint_dir",
///                                            {.device_map = accelerate::DeviceMap{
///                                                 {"blocks.0", "cpu"}, {"blocks.1", "disk"},
///                                                 {"head", "cpu"}}});
///   at::Tensor y = model->forward(x);  // blocks.1 reads its weights from the file
/// \endcode

#include <accelerate/checkpointing.h>
#include <accelerate/device_map.h>
#include <accelerate/fsdp.h>
#include <accelerate/offload.h>

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

namespace accelerate {

/// Enters a unit of a fully sharded or dispatched model (fsdp::call); the plain call otherwise.
using fsdp::call;

namespace detail {
/// While it lives, on this thread: CPU allocations get untouched pages and tensor writes are
/// skipped (so constructors' initialisations cost nothing).
class EmptyInitScope {
 public:
  EmptyInitScope();
  EmptyInitScope(const EmptyInitScope&) = delete;
  EmptyInitScope& operator=(const EmptyInitScope&) = delete;
  ~EmptyInitScope();

 private:
  struct Saved;
  std::unique_ptr<Saved> saved_;
};
/// Turns every parameter and buffer of `module` allocated under an EmptyInitScope into a meta
/// tensor (same TensorImpl, so members such as `linear->weight` and ties follow).
void empty_weights_to_meta(torch::nn::Module& module);
}  // namespace detail

/// Builds a model without memory for its weights: returns `make()`, whose parameters and
/// buffers are on the meta device (shape and dtype only). Constructors run as usual except that
/// their tensor writes (initialisations) are skipped and their allocations never touch memory.
/// Fill the model with load_checkpoint_in_model / load_checkpoint_and_dispatch or
/// set_module_tensor_to_device.
///
/// Unlike Python's `init_empty_weights()` (whose default keeps buffers on the CPU), buffers are
/// empty too: their initial values are never computed, so they must come from the checkpoint
/// (save_model writes them). `make` returns a module holder (`Net`) or a
/// `std::shared_ptr<Module>`.
///
/// Example:
/// \code
///   auto model = accelerate::init_empty_weights([] { return Net(/*layers=*/48); });
///   assert(model->parameters()[0].is_meta());
/// \endcode
template <class F>
auto init_empty_weights(F&& make) {
  auto model = [&] {
    detail::EmptyInitScope scope;
    return std::forward<F>(make)();
  }();
  if constexpr (requires { model.ptr(); }) {
    detail::empty_weights_to_meta(*model.ptr());
  } else {
    detail::empty_weights_to_meta(*model);
  }
  return model;
}

/// Whether `t`'s data is a view of a mapped file (a "disk" weight), and that file ("" if not).
///
/// Example:
/// \code
///   for (const auto& p : model->named_parameters())
///     if (accelerate::is_file_mapped(p.value())) std::cout << p.key() << " is read from "
///                                                           << accelerate::mapped_file(p.value());
/// \endcode
bool is_file_mapped(const at::Tensor& t);
std::string mapped_file(const at::Tensor& t);

/// Whether any parameter or buffer of `module` is still on the meta device.
bool has_meta_tensors(const torch::nn::Module& module);

/// Sets the parameter or buffer `tensor_name` ("blocks.0.weight") of `module` to `value` (or
/// to its current value) on `device`, converted to `dtype` when given; otherwise a
/// floating-point value takes the current tensor's dtype, as in Accelerate. The tensor object
/// is kept (module members and tied names follow); its data is replaced. A meta tensor needs a
/// value; a value of another shape is an error naming both shapes.
///
/// Example:
/// \code
///   accelerate::set_module_tensor_to_device(*model, "fc.weight", at::kCPU, at::randn({4, 8}));
/// \endcode
void set_module_tensor_to_device(torch::nn::Module& module, const std::string& tensor_name,
                                 c10::Device device,
                                 const std::optional<at::Tensor>& value = std::nullopt,
                                 std::optional<at::ScalarType> dtype = std::nullopt);

/// Ties again the parameters of each group (names from find_tied_parameters): every name gets
/// the data of the first non-meta tensor of its group (Accelerate's `retie_parameters`). The
/// names keep their own tensor objects sharing that storage (LibTorch cannot rebind a registered
/// name); loading and dispatching never untie weights registered as one tensor, so this is only
/// needed after ties were broken by hand.
///
/// Example:
/// \code
///   auto tied = accelerate::find_tied_parameters(*model);
///   accelerate::retie_parameters(*model, tied);
/// \endcode
void retie_parameters(torch::nn::Module& model, const std::vector<std::vector<std::string>>& tied);

/// Loads the tensors an offload folder holds (offload.h) into `model` on the CPU, in memory
/// (Accelerate's `load_offloaded_weights`).
///
/// Example:
/// \code
///   accelerate::load_offloaded_weights(*model, accelerate::read_offload_index("offload"),
///                                      "offload");
/// \endcode
void load_offloaded_weights(torch::nn::Module& model, const OffloadIndex& index,
                            const std::string& offload_folder);

/// dispatch_model's settings.
///
/// Example:
/// \code
///   accelerate::DispatchOptions options{.main_device = "cuda:0", .offload_buffers = true};
/// \endcode
struct DispatchOptions {
  /// Where units whose weights are on "cpu" or "disk" execute: by default the first GPU of the
  /// map, or the CPU when the map has none.
  std::optional<std::string> main_device;
  /// An offload folder (offload.h) holding the weights of "disk" entries that are still on
  /// the meta device (for instance one written by Python Accelerate); they are mapped from it.
  std::string offload_dir;
  /// Stream the buffers of offloaded ("cpu" / "disk") units as well; otherwise they are moved
  /// to the main device once, as in Accelerate.
  bool offload_buffers = false;
  /// Install hooks even when the whole model is on one device.
  bool force_hooks = false;
};

/// What dispatch_model set up.
struct DispatchInfo {
  DeviceMap device_map;
  std::string main_device;
  /// Units that move their inputs and, where offloaded, stream their weights (module names).
  std::vector<std::string> units;
  /// Of those, the ones whose weights are streamed to the execution device for each forward.
  std::vector<std::string> streamed_units;
};

/// Places `model`'s weights as `device_map` says (every parameter and buffer must be covered,
/// see check_device_map) and installs the hooks that run it across devices (see the file
/// comment). Weights mapped to "disk" must already be mapped (load_checkpoint_in_model does
/// that) or be found in `options.offload_dir`. The hooks live as long as the model, until
/// remove_dispatch_hooks. A model still holding meta tensors that nothing fills is an error
/// naming them.
///
/// Example:
/// \code
///   auto info = accelerate::dispatch_model(model.ptr(), {{"", "cpu"}}, {.force_hooks = true});
/// \endcode
DispatchInfo dispatch_model(const std::shared_ptr<torch::nn::Module>& model,
                            const DeviceMap& device_map, const DispatchOptions& options = {});

/// What dispatch_model set up for `model`, if it has dispatch hooks.
///
/// Example:
/// \code
///   if (auto info = accelerate::dispatch_info(*model)) std::cout << info->main_device;
/// \endcode
std::optional<DispatchInfo> dispatch_info(const torch::nn::Module& model);

/// Removes dispatch_model's hooks (the weights stay where they are).
void remove_dispatch_hooks(const torch::nn::Module& model);

/// Whether `model` has dispatch hooks.
bool is_dispatched(const torch::nn::Module& model);

/// load_checkpoint_and_dispatch's settings.
///
/// Example:
/// \code
///   accelerate::LoadAndDispatchOptions options{
///       .device_map = "auto", .max_memory = accelerate::MaxMemory{{"cpu", "2GB"}},
///       .no_split_module_classes = {"Block"}, .offload_folder = "offload"};
/// \endcode
struct LoadAndDispatchOptions {
  /// A map, or "auto" / "balanced" / "balanced_low_0" / "sequential" (computed with
  /// infer_auto_device_map; all but "sequential" first balance the GPUs with
  /// get_balanced_memory). Unset: load onto the model's own device, no hooks.
  std::optional<std::variant<std::string, DeviceMap>> device_map;
  std::optional<MaxMemory> max_memory;
  std::vector<std::string> no_split_module_classes;
  std::string offload_folder;
  bool offload_buffers = false;
  std::optional<at::ScalarType> dtype;
  bool offload_state_dict = false;
  /// With dtype float16, weights of these modules stay float32 (LoadCheckpointOptions).
  std::vector<std::string> keep_in_fp32_modules;
  /// DispatchOptions::main_device.
  std::optional<std::string> main_device;
  bool force_hooks = false;
  bool strict = false;
};

/// Accelerate's `load_checkpoint_and_dispatch`: computes the map if asked, loads the checkpoint
/// with it (load_checkpoint_in_model) and dispatches the model. Returns what loading found.
///
/// Example:
/// \code
///   auto report = accelerate::load_checkpoint_and_dispatch(model.ptr(), "ckpt",
///                                                          {.device_map = "auto"});
/// \endcode
LoadReport load_checkpoint_and_dispatch(const std::shared_ptr<torch::nn::Module>& model,
                                        const std::string& checkpoint,
                                        const LoadAndDispatchOptions& options = {});

}  // namespace accelerate
