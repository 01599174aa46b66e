#pragma once
// What fsdp.cpp (UnitScope, the Sequential holders) and big_modeling.cpp (dispatch hooks) share:
// both intercept the forward of the same kind of units, entered through fsdp::call or through
// a holder installed in a Sequential's forward chain.

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>

#include <functional>
#include <memory>
#include <vector>

namespace accelerate::detail {

struct DispatchHooks;

/// The dispatch hooks `module` is a unit of (and its index there), or null.
std::shared_ptr<DispatchHooks> find_dispatch_unit(const torch::nn::Module* module, size_t* unit);
/// Before the unit's forward: its weights on its execution device, the next unit prefetched.
void dispatch_pre_forward(DispatchHooks& hooks, size_t unit);
/// A tensor argument of the unit, moved to its execution device.
at::Tensor dispatch_input(const DispatchHooks& hooks, size_t unit, const at::Tensor& t);
/// After the forward (or when it failed): streamed weights released. Never throws.
void dispatch_post_forward(DispatchHooks& hooks, size_t unit) noexcept;

/// A Sequential forward-chain entry replaced by a holder that enters the unit through UnitScope
/// (the registered child, its name and the state dict are unchanged). Only the holder, which
/// lives in the chain, refers to the unit: a record never keeps a model's modules alive.
struct SequentialHolder {
  std::weak_ptr<torch::nn::Module> sequential;
  size_t index = 0;
};
/// Installs holders for the Sequential entries (anywhere under `root`) for which `is_unit` is
/// true.
std::vector<SequentialHolder> install_sequential_holders(
    const torch::nn::Module& root, const std::function<bool(const torch::nn::Module*)>& is_unit);
/// Puts the original entries back (those whose Sequential still exists).
void restore_sequential_holders(std::vector<SequentialHolder>& installed) noexcept;

}  // namespace accelerate::detail
