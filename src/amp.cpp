#include <accelerate/amp.h>
#include <accelerate/compat.h>

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/TensorOptions.h>
#include <torch/serialize/archive.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

namespace accelerate {

// ---------------------------------------------------------------------- AutocastGuard

namespace {

void check_autocast_dtype(c10::DeviceType device, at::ScalarType dtype) {
  if (device == c10::kCPU) {
    const bool ok =
        dtype == at::kBFloat16 || (compat::kAutocastCpuSupportsHalf && dtype == at::kHalf);
    TORCH_CHECK(ok, "accelerate: CPU autocast supports ",
                compat::kAutocastCpuSupportsHalf ? "bfloat16 and float16" : "only bfloat16",
                " in LibTorch ", compat::torch_version(), ", not ", dtype);
  } else {
    TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16,
                "accelerate: CUDA autocast supports float16 and bfloat16, not ", dtype);
  }
}

}  // namespace

AutocastGuard::AutocastGuard(c10::DeviceType device, at::ScalarType dtype, AutocastKwargs kwargs)
    : device_(device), dtype_(dtype), enabled_(kwargs.enabled) {
  TORCH_CHECK(device == c10::kCPU || device == c10::kCUDA,
              "accelerate: autocast supports CPU and CUDA devices, not ", device);
  if (enabled_) check_autocast_dtype(device, dtype);

  prev_enabled_ = compat::is_autocast_enabled(device);
  prev_dtype_ = compat::get_autocast_dtype(device);
  prev_cache_enabled_ = at::autocast::is_autocast_cache_enabled();

  // A disabled region leaves the dtype alone: it is unused while autocast is off, and LibTorch
  // 1.13 rejects any CPU dtype but bfloat16 even then. Setting it first also keeps the one call
  // that can throw ahead of every other change, as no destructor runs after a failed constructor.
  if (enabled_) compat::set_autocast_dtype(device, dtype);
  compat::set_autocast_enabled(device, enabled_);
  at::autocast::increment_nesting();
  at::autocast::set_autocast_cache_enabled(kwargs.cache_enabled);
}

AutocastGuard::~AutocastGuard() noexcept {
  // The cache holds casts of weights that only stay valid while the outermost region lives:
  // after it, an optimizer step may change the weights.
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  compat::set_autocast_enabled(device_, prev_enabled_);
  if (enabled_) compat::set_autocast_dtype(device_, prev_dtype_);
  at::autocast::set_autocast_cache_enabled(prev_cache_enabled_);
}

// ---------------------------------------------------------------------- GradScaler

namespace {

void validate(const GradScalerKwargs& k, const char* what) {
  TORCH_CHECK(k.init_scale > 0 && std::isfinite(k.init_scale), "accelerate: ", what,
              ".init_scale must be a finite number > 0, got ", k.init_scale);
  TORCH_CHECK(k.growth_factor > 1 && std::isfinite(k.growth_factor), "accelerate: ", what,
              ".growth_factor must be a finite number > 1, got ", k.growth_factor);
  TORCH_CHECK(k.backoff_factor > 0 && k.backoff_factor < 1, "accelerate: ", what,
              ".backoff_factor must be in (0, 1), got ", k.backoff_factor);
  TORCH_CHECK(k.growth_interval >= 1, "accelerate: ", what,
              ".growth_interval must be at least 1, got ", k.growth_interval);
}

// Whether the build registered a kernel of `op` for dense tensors on `device`. Asking the
// dispatcher, rather than testing version numbers, also covers builds that add kernels (CPU
// ones arrived in LibTorch 2.3) and custom device backends.
bool has_kernel(const char* op, c10::Device device) {
  // Any dense dtype gives the device's backend key.
  const auto key = c10::computeDispatchKey(at::kFloat, c10::kStrided, device);
  return c10::Dispatcher::singleton().findSchemaOrThrow(op, "").hasKernelForDispatchKey(key);
}

constexpr const char* kUnscaleOp = "aten::_amp_foreach_non_finite_check_and_unscale_";
constexpr const char* kUpdateOp = "aten::_amp_update_scale_";

// Multiplies `grads` (one device, one dtype) by `inv_scale` and sets `found_inf` to 1 if any
// element is inf or NaN, without waiting for the device.
void unscale_group(std::vector<at::Tensor>& grads, at::Tensor& found_inf,
                   const at::Tensor& inv_scale) {
  if (has_kernel(kUnscaleOp, found_inf.device())) {
    at::_amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale);
    return;
  }
  // LibTorch < 2.3 has no CPU kernel for the fused op: the same result from ordinary ops.
  for (auto& g : grads) {
    found_inf.logical_or_(at::isfinite(g).all().logical_not());
    g.mul_(inv_scale);
  }
}

// Backs off or grows `scale` after a step, as LibTorch's _amp_update_scale_ does.
void update_scale(at::Tensor& scale, at::Tensor& growth_tracker, const at::Tensor& found_inf,
                  const GradScalerKwargs& k) {
  if (has_kernel(kUpdateOp, scale.device())) {
    at::_amp_update_scale_(scale, growth_tracker, found_inf, k.growth_factor, k.backoff_factor,
                           k.growth_interval);
    return;
  }
  // Tensor-valued where() keeps the decision on the device, as the fused kernel does.
  const auto found = found_inf > 0;
  const auto successful = growth_tracker + 1;
  const auto grown = scale * k.growth_factor;
  // A growth that overflows keeps the old scale but still restarts the count, like the kernel.
  const auto reached = successful >= k.growth_interval;
  const auto next_scale =
      at::where(found, scale * k.backoff_factor,
                at::where(reached.logical_and(at::isfinite(grown)), grown, scale));
  const auto next_tracker =
      at::where(found.logical_or(reached), at::zeros_like(growth_tracker), successful);
  scale.copy_(next_scale);
  growth_tracker.copy_(next_tracker);
}

// Keeps one copy of a tensor per device, made on first use.
class PerDevice {
 public:
  explicit PerDevice(at::Tensor master) : master_(std::move(master)) {}
  at::Tensor on(c10::Device device) {
    for (auto& [d, t] : copies_) {
      if (d == device) return t;
    }
    copies_.emplace_back(device, master_.to(device, /*non_blocking=*/true));
    return copies_.back().second;
  }

 private:
  at::Tensor master_;
  std::vector<std::pair<c10::Device, at::Tensor>> copies_;
};

}  // namespace

GradScaler::GradScaler(GradScalerKwargs kwargs) : options_(kwargs) {
  validate(options_, "GradScalerKwargs");
}

GradScaler::OptimizerState& GradScaler::state_of(const torch::optim::Optimizer& optimizer) {
  return per_optimizer_[&optimizer];
}

at::Tensor GradScaler::scale(const at::Tensor& loss) {
  if (!is_enabled()) return loss;
  TORCH_CHECK(loss.defined(), "accelerate: GradScaler::scale() got an undefined tensor");
  if (!scale_.defined()) {
    const auto options = at::TensorOptions().device(loss.device());
    scale_ = at::full({}, options_.init_scale, options.dtype(at::kFloat));
    growth_tracker_ = at::full({}, init_growth_tracker_, options.dtype(at::kInt));
  }
  return loss * scale_.to(loss.device(), /*non_blocking=*/true);
}

void GradScaler::unscale_(torch::optim::Optimizer& optimizer) {
  if (!is_enabled()) return;
  auto& state = state_of(optimizer);
  TORCH_CHECK(state.stage != Stage::kUnscaled,
              "accelerate: GradScaler::unscale_() was already called on this optimizer since the "
              "last update()");
  TORCH_CHECK(state.stage != Stage::kStepped,
              "accelerate: GradScaler::unscale_() was called after step(); call update() first");
  TORCH_CHECK(scale_.defined(),
              "accelerate: GradScaler::unscale_() before any scale(): the gradients were not "
              "scaled by this scaler (backward on scaler.scale(loss))");

  // In double, so that the reciprocal of a power of two is exact in float32 too.
  const auto inv_scale = scale_.to(at::kDouble).reciprocal().to(at::kFloat);
  PerDevice inv_scales(inv_scale);

  struct Group {
    c10::Device device;
    at::ScalarType dtype;
    std::vector<at::Tensor> grads;
  };
  std::vector<Group> groups;
  for (auto& param_group : optimizer.param_groups()) {
    for (auto& param : param_group.params()) {
      const auto& grad = param.grad();
      if (!grad.defined()) continue;
      TORCH_CHECK(grad.scalar_type() != at::kHalf,
                  "accelerate: GradScaler cannot unscale float16 gradients: keep the parameters "
                  "in float32 and let autocast run the forward pass in float16");
      // A sparse gradient's values are a view: unscaling them unscales the gradient.
      auto target = grad.is_sparse() ? grad._values() : grad;
      auto it = std::find_if(groups.begin(), groups.end(), [&](const Group& g) {
        return g.device == target.device() && g.dtype == target.scalar_type();
      });
      if (it == groups.end()) {
        groups.push_back({target.device(), target.scalar_type(), {}});
        it = std::prev(groups.end());
      }
      it->grads.push_back(std::move(target));
    }
  }

  at::NoGradGuard no_grad;
  std::vector<std::pair<c10::Device, at::Tensor>> found;
  for (auto& group : groups) {
    auto flag = std::find_if(found.begin(), found.end(),
                             [&](const auto& f) { return f.first == group.device; });
    if (flag == found.end()) {
      found.emplace_back(group.device,
                         at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(group.device)));
      flag = std::prev(found.end());
    }
    unscale_group(group.grads, flag->second, inv_scales.on(group.device));
  }
  state.found_inf_per_device = std::move(found);
  state.stage = Stage::kUnscaled;
}

bool GradScaler::step(torch::optim::Optimizer& optimizer) {
  if (!is_enabled()) {
    optimizer.step();
    return true;
  }
  auto& state = state_of(optimizer);
  TORCH_CHECK(state.stage != Stage::kStepped,
              "accelerate: GradScaler::step() was already called on this optimizer since the "
              "last update()");
  if (state.stage == Stage::kReady) unscale_(optimizer);
  TORCH_CHECK(!state.found_inf_per_device.empty(),
              "accelerate: GradScaler::step(): the optimizer has no gradients to check; run "
              "backward on scaler.scale(loss) first");

  const bool skip = found_inf(optimizer);
  if (!skip) optimizer.step();
  state.stage = Stage::kStepped;
  return !skip;
}

void GradScaler::update() {
  if (!is_enabled()) return;
  at::Tensor found_inf;
  for (const auto& [optimizer, state] : per_optimizer_) {
    for (const auto& [device, flag] : state.found_inf_per_device) {
      const auto here = flag.to(scale_.device(), /*non_blocking=*/true);
      found_inf = found_inf.defined() ? found_inf + here : here;
    }
  }
  TORCH_CHECK(found_inf.defined(),
              "accelerate: GradScaler::update() without unscale_() or step() on any optimizer "
              "since the last update()");
  at::NoGradGuard no_grad;
  update_scale(scale_, growth_tracker_, found_inf, options_);
  per_optimizer_.clear();
}

double GradScaler::get_scale() const {
  if (!is_enabled()) return 1.0;
  return scale_.defined() ? scale_.item<double>() : options_.init_scale;
}

int64_t GradScaler::growth_tracker() const {
  if (!is_enabled()) return 0;
  return growth_tracker_.defined() ? growth_tracker_.item<int64_t>() : init_growth_tracker_;
}

bool GradScaler::found_inf(const torch::optim::Optimizer& optimizer) const {
  if (!is_enabled()) return false;
  const auto it = per_optimizer_.find(&optimizer);
  TORCH_CHECK(it != per_optimizer_.end() && it->second.stage != Stage::kReady,
              "accelerate: GradScaler::found_inf(): this optimizer's gradients were not "
              "unscaled since the last update()");
  bool any = false;
  for (const auto& [device, flag] : it->second.found_inf_per_device) {
    any = any || flag.item<float>() != 0.0f;
  }
  return any;
}

GradScalerState GradScaler::state_dict() const {
  if (!is_enabled()) return GradScalerState{.enabled = false};
  return {.scale = get_scale(),
          .growth_tracker = growth_tracker(),
          .growth_factor = options_.growth_factor,
          .backoff_factor = options_.backoff_factor,
          .growth_interval = options_.growth_interval,
          .enabled = true};
}

void GradScaler::load_state_dict(const GradScalerState& state) {
  if (!is_enabled()) return;
  TORCH_CHECK(state.enabled,
              "accelerate: GradScaler::load_state_dict(): the state was saved from a disabled "
              "GradScaler and holds no scale");
  GradScalerKwargs next = options_;
  next.init_scale = state.scale;
  next.growth_factor = state.growth_factor;
  next.backoff_factor = state.backoff_factor;
  next.growth_interval = state.growth_interval;
  validate(next, "GradScalerState");
  TORCH_CHECK(state.growth_tracker >= 0,
              "accelerate: GradScalerState.growth_tracker must be >= 0, got ",
              state.growth_tracker);
  options_ = next;
  init_growth_tracker_ = state.growth_tracker;
  if (scale_.defined()) {
    scale_.fill_(state.scale);
    growth_tracker_.fill_(state.growth_tracker);
  }
}

namespace {

c10::IValue read_key(torch::serialize::InputArchive& archive, const char* key) {
  c10::IValue value;
  TORCH_CHECK(archive.try_read(key, value), "accelerate: GradScaler::load(): the archive has no '",
              key, "'");
  return value;
}

double read_double(torch::serialize::InputArchive& archive, const char* key) {
  const auto v = read_key(archive, key);
  TORCH_CHECK(v.isDouble() || v.isInt(), "accelerate: GradScaler::load(): '", key,
              "' should be a number, got ", v.tagKind());
  return v.isDouble() ? v.toDouble() : static_cast<double>(v.toInt());
}

int64_t read_int(torch::serialize::InputArchive& archive, const char* key) {
  const auto v = read_key(archive, key);
  TORCH_CHECK(v.isInt(), "accelerate: GradScaler::load(): '", key, "' should be an integer, got ",
              v.tagKind());
  return v.toInt();
}

}  // namespace

// Key names follow PyTorch's GradScaler.state_dict(), so that a reader of the archive finds
// familiar names; "enabled" stands in for PyTorch's empty dict of a disabled scaler.
void GradScaler::save(torch::serialize::OutputArchive& archive) const {
  const auto s = state_dict();
  archive.write("enabled", c10::IValue(s.enabled));
  archive.write("scale", c10::IValue(s.scale));
  archive.write("growth_factor", c10::IValue(s.growth_factor));
  archive.write("backoff_factor", c10::IValue(s.backoff_factor));
  archive.write("growth_interval", c10::IValue(s.growth_interval));
  archive.write("_growth_tracker", c10::IValue(s.growth_tracker));
}

void GradScaler::load(torch::serialize::InputArchive& archive) {
  const auto enabled = read_key(archive, "enabled");
  TORCH_CHECK(enabled.isBool(), "accelerate: GradScaler::load(): 'enabled' should be a bool, got ",
              enabled.tagKind());
  GradScalerState s{.enabled = enabled.toBool()};
  if (s.enabled) {
    s.scale = read_double(archive, "scale");
    s.growth_factor = read_double(archive, "growth_factor");
    s.backoff_factor = read_double(archive, "backoff_factor");
    s.growth_interval = read_int(archive, "growth_interval");
    s.growth_tracker = read_int(archive, "_growth_tracker");
  }
  load_state_dict(s);
}

torch::serialize::OutputArchive& operator<<(torch::serialize::OutputArchive& archive,
                                            const GradScaler& scaler) {
  scaler.save(archive);
  return archive;
}

torch::serialize::InputArchive& operator>>(torch::serialize::InputArchive& archive,
                                           GradScaler& scaler) {
  scaler.load(archive);
  return archive;
}

}  // namespace accelerate
