#pragma once
// Replacing a tensor's data while keeping the tensor object, across devices (meta included).

#include <ATen/ATen.h>
#include <torch/csrc/autograd/variable.h>

#include <mutex>
#include <optional>
#include <string>

namespace accelerate::detail {

/// `t` (the same TensorImpl, so module members, the parameter dict and tied names all follow)
/// now holds `value`'s storage, shape, dtype and device. What `Tensor::set_data` does, without
/// its same-backend check (which refuses meta <-> CPU): a cached gradient accumulator and a
/// gradient of another device or dtype are dropped, as they describe the old data.
inline void replace_tensor_data(const at::Tensor& t, const at::Tensor& value) {
  TORCH_INTERNAL_ASSERT(t.defined() && value.defined());
  const bool same_kind = t.device() == value.device() && t.scalar_type() == value.scalar_type();
  if (auto* meta = torch::autograd::impl::get_autograd_meta(t)) {
    std::lock_guard<std::mutex> lock(meta->mutex_);
    if (!same_kind) meta->grad_accumulator_.reset();
  }
  if (!same_kind && t.grad().defined()) {
    t.mutable_grad() = at::Tensor();
  }
  t.unsafeGetTensorImpl()->shallow_copy_from(value.getIntrusivePtr());
}

/// set_module_tensor_to_device for a tensor already found (`tensor_name` names it in errors).
void set_tensor_to_device(const at::Tensor& old, const std::string& tensor_name, c10::Device device,
                          const std::optional<at::Tensor>& value,
                          std::optional<at::ScalarType> dtype);

}  // namespace accelerate::detail
