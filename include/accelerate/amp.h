#pragma once
/// \file
/// Mixed-precision building blocks: an autocast scope guard (Python's `torch.autocast`, with
/// Accelerate's `AutocastKwargs`) and a dynamic loss scaler (`torch.cuda.amp.GradScaler`, with
/// Accelerate's `GradScalerKwargs`) that works on CPU and CUDA tensors.
///
/// The Accelerator builds both from its mixed-precision setting; they are usable on their own.
///
/// Example:
/// \code
///   accelerate::GradScaler scaler({.init_scale = 1024.0});
///   for (auto& batch : loader) {
///     at::Tensor loss;
///     {
///       accelerate::AutocastGuard autocast(c10::kCUDA, at::kHalf);
///       loss = torch::mse_loss(model->forward(batch.data), batch.target);
///     }
///     scaler.scale(loss).backward();
///     scaler.step(optimizer);  // skipped when a gradient overflowed
///     scaler.update();         // backs the scale off, or grows it
///     optimizer.zero_grad();
///   }
/// \endcode

#include <ATen/ATen.h>
#include <c10/core/Device.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <cstdint>
#include <map>
#include <utility>
#include <vector>

namespace accelerate {

// ---------------------------------------------------------------------- autocast

/// Accelerate's `AutocastKwargs`: how AutocastGuard (and Accelerator::autocast) autocasts.
///
/// Example:
/// \code
///   accelerate::Accelerator acc({.mixed_precision = "bf16",
///                                .autocast_kwargs = accelerate::AutocastKwargs{
///                                    .cache_enabled = false}});
/// \endcode
struct AutocastKwargs {
  /// false turns autocast *off* inside the guard, also under an enclosing enabled guard.
  bool enabled = true;
  /// Reuse the lower-precision copies of weights within the outermost autocast region.
  bool cache_enabled = true;
};

/// Autocasts eligible ops on `device` tensors to `dtype` while it lives, like
/// `with torch.autocast(device_type, dtype, enabled, cache_enabled):`.
///
/// CPU takes bfloat16 (and float16 from LibTorch 2.2), CUDA float16 or bfloat16; with
/// `enabled = false` the guard only switches autocast off and ignores `dtype`. The guard
/// counts towards autocast's nesting depth; when the outermost guard ends, the cache of cast
/// weights is cleared. The destructor restores the enabled flag and dtype of `device` and the
/// cache setting that were in force before, also when an exception unwinds through it.
///
/// Autocast state is per thread: create and destroy a guard on the same thread, and let guards
/// end in the reverse order of their creation (as scopes do).
///
/// Example:
/// \code
///   {
///     accelerate::AutocastGuard autocast(c10::kCPU, at::kBFloat16);
///     auto y = linear(x);  // bfloat16
///     {
///       accelerate::AutocastGuard off(c10::kCPU, at::kBFloat16, {.enabled = false});
///       auto z = linear(x);  // float32
///     }
///   }
/// \endcode
class [[nodiscard]] AutocastGuard {
 public:
  AutocastGuard(c10::DeviceType device, at::ScalarType dtype, AutocastKwargs kwargs = {});
  ~AutocastGuard() noexcept;

  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;
  AutocastGuard(AutocastGuard&&) = delete;
  AutocastGuard& operator=(AutocastGuard&&) = delete;

  c10::DeviceType device_type() const { return device_; }
  at::ScalarType dtype() const { return dtype_; }
  bool enabled() const { return enabled_; }

 private:
  c10::DeviceType device_;
  at::ScalarType dtype_;
  bool enabled_;
  bool prev_enabled_;
  at::ScalarType prev_dtype_;
  bool prev_cache_enabled_;
};

// ---------------------------------------------------------------------- gradient scaling

/// Accelerate's `GradScalerKwargs`: the settings of a GradScaler.
///
/// The constructor of GradScaler checks them: init_scale > 0, growth_factor > 1,
/// 0 < backoff_factor < 1, growth_interval >= 1.
///
/// Example:
/// \code
///   accelerate::GradScaler scaler({.init_scale = 1024.0, .growth_interval = 100});
/// \endcode
struct GradScalerKwargs {
  double init_scale = 65536.0;
  /// The scale is multiplied by this after growth_interval steps in a row without inf/NaN.
  double growth_factor = 2.0;
  /// The scale is multiplied by this after a step whose gradients held inf/NaN.
  double backoff_factor = 0.5;
  int64_t growth_interval = 2000;
  /// false: scale() and unscale_() do nothing and step() always steps.
  bool enabled = true;
};

/// What a GradScaler checkpoints (PyTorch's `GradScaler.state_dict()`).
///
/// Example:
/// \code
///   accelerate::GradScalerState saved = scaler.state_dict();
///   other.load_state_dict(saved);
/// \endcode
struct GradScalerState {
  double scale = 65536.0;
  int64_t growth_tracker = 0;
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  int64_t growth_interval = 2000;
  /// false when saved from a disabled scaler (PyTorch's empty state dict): the other fields
  /// mean nothing, and an enabled scaler refuses to load it.
  bool enabled = true;
};

/// Dynamic loss scaling with the semantics of PyTorch's `torch.cuda.amp.GradScaler`, for
/// float32 parameters trained under float16 autocast, on CPU and CUDA tensors.
///
/// The scale lives in a float32 tensor on the device of the first loss passed to scale(), and
/// the inf/NaN checks stay on the gradients' devices, so that scale(), unscale_() and update()
/// never wait for the device; step() reads one flag per device to decide whether to step.
/// LibTorch's fused kernels (`_amp_foreach_non_finite_check_and_unscale_`,
/// `_amp_update_scale_`) are used where the build has them for the device (CUDA; CPU from
/// LibTorch 2.3), equivalent ordinary tensor ops elsewhere.
///
/// Per step, for each optimizer: unscale_() at most once (optional, for gradient clipping),
/// then step(); then update() once for all of them.
///
/// Distributed training: every process must skip the same steps, so found_inf must agree
/// across processes. It does when the gradients are all-reduced before unscaling, which the
/// Accelerator does before its optimizers step.
///
/// Example:
/// \code
///   accelerate::GradScaler scaler({.init_scale = 8.0});
///   scaler.scale(loss).backward();
///   scaler.unscale_(optimizer);  // gradients are now the true ones
///   torch::nn::utils::clip_grad_norm_(model->parameters(), 1.0);
///   bool stepped = scaler.step(optimizer);
///   scaler.update();
///   torch::save(scaler, "scaler.pt");
/// \endcode
class GradScaler {
 public:
  explicit GradScaler(GradScalerKwargs kwargs = {});

  GradScaler(const GradScaler&) = delete;
  GradScaler& operator=(const GradScaler&) = delete;
  GradScaler(GradScaler&&) = default;
  GradScaler& operator=(GradScaler&&) = default;

  /// `loss` times the current scale, in loss's dtype; `loss` itself when disabled.
  at::Tensor scale(const at::Tensor& loss);

  /// Divides every gradient of `optimizer`'s parameters by the scale, in place, and records
  /// whether any of them held inf or NaN. At most once per optimizer between update()s, and
  /// not after step(). Float16 gradients are refused (keep parameters in float32).
  void unscale_(torch::optim::Optimizer& optimizer);

  /// Unscales (unless unscale_() already did) and calls `optimizer.step()` unless a gradient
  /// held inf/NaN. Returns whether the optimizer stepped. Disabled: always steps.
  bool step(torch::optim::Optimizer& optimizer);

  /// Ends the step: multiplies the scale by backoff_factor if any optimizer found inf/NaN since
  /// the last update(), else counts a good step and multiplies by growth_factor after
  /// growth_interval good steps in a row. Forgets what unscale_() recorded.
  void update();

  /// The current scale (1 when disabled). Waits for the device.
  double get_scale() const;
  /// Good steps in a row since the scale last changed. Waits for the device.
  int64_t growth_tracker() const;
  bool is_enabled() const { return options_.enabled; }
  /// The settings, including any loaded by load_state_dict().
  const GradScalerKwargs& options() const { return options_; }

  /// Whether the gradients that unscale_() (or step()) last checked for `optimizer` held inf or
  /// NaN; an error if it checked none since the last update(). false when disabled.
  bool found_inf(const torch::optim::Optimizer& optimizer) const;

  GradScalerState state_dict() const;
  /// Takes the scale, growth tracker and settings of `state`. Does nothing when disabled.
  void load_state_dict(const GradScalerState& state);

  /// Writes state_dict() to `archive` under PyTorch's key names.
  void save(torch::serialize::OutputArchive& archive) const;
  /// Reads what save() wrote, then load_state_dict().
  void load(torch::serialize::InputArchive& archive);

 private:
  enum class Stage { kReady, kUnscaled, kStepped };
  struct OptimizerState {
    Stage stage = Stage::kReady;
    /// One 0-dim float32 flag (nonzero: inf/NaN) per device that held gradients.
    std::vector<std::pair<c10::Device, at::Tensor>> found_inf_per_device;
  };

  OptimizerState& state_of(const torch::optim::Optimizer& optimizer);

  GradScalerKwargs options_;
  /// Created by the first scale(), on the loss's device; until then the next two hold the
  /// values it will start from.
  at::Tensor scale_;
  at::Tensor growth_tracker_;
  int64_t init_growth_tracker_ = 0;
  std::map<const torch::optim::Optimizer*, OptimizerState> per_optimizer_;
};

/// Lets `torch::save(scaler, path)` write a GradScaler.
torch::serialize::OutputArchive& operator<<(torch::serialize::OutputArchive& archive,
                                            const GradScaler& scaler);
/// Lets `torch::load(scaler, path)` read a GradScaler.
torch::serialize::InputArchive& operator>>(torch::serialize::InputArchive& archive,
                                           GradScaler& scaler);

}  // namespace accelerate
