#pragma once
/// \file
/// A `torch::optim::Optimizer`'s full state (per-parameter state and every param group's
/// hyper-parameters) as the content of one safetensors file: no pickle, no TorchScript archive
/// for the optimizers LibTorch ships, and a layout a Python user recognises as PyTorch's
/// `optimizer.state_dict()`.
///
/// Layout for Adam, AdamW, SGD, RMSprop and Adagrad:
///  - Parameters are numbered across param groups in order, as PyTorch does: group 0's
///    parameters are 0..n0-1, group 1's follow, and so on.
///  - Each per-parameter state tensor is called `state.<index>.<key>` with PyTorch's key names:
///    Adam/AdamW `step`, `exp_avg`, `exp_avg_sq`, `max_exp_avg_sq` (amsgrad); SGD
///    `momentum_buffer`; RMSprop `step`, `square_avg`, `momentum_buffer`, `grad_avg`; Adagrad
///    `step`, `sum`. Only defined entries are written; a parameter the optimizer holds no state
///    for (never stepped) has none. `step` is a 0-dim int64 tensor, exact.
///  - Metadata: `format` = "accelerate-cpp optimizer 1", `optimizer` = "Adam" | "AdamW" | "SGD" |
///    "RMSprop" | "Adagrad", and `param_groups`, a JSON array like PyTorch's:
///    `[{"lr":0.001,"betas":[0.9,0.999],"eps":1e-08,"weight_decay":0.0,"amsgrad":false,
///    "params":[0,1]}, ...]` with each optimizer's option names as PyTorch spells them. Doubles
///    round-trip exactly.
///
/// Any other optimizer (LBFGS, user subclasses, including subclasses of the five above, whose
/// extra state we cannot know) falls back to LibTorch's own `Optimizer::save`: the archive's
/// bytes are stored as one uint8 tensor `archive`, with metadata `optimizer` =
/// "libtorch-archive" and `class` = the optimizer's C++ class name. Loading it goes through
/// `Optimizer::load`, and additionally restores each group's options from the archive (LibTorch's
/// own load ignores them). Such an optimizer must implement `save`/`load`, as LibTorch's do.
///
/// Loading follows PyTorch's `load_state_dict`: the loaded state replaces the optimizer's (state
/// for parameters absent from the checkpoint is dropped; Adagrad, whose LibTorch step() needs
/// state for every parameter, gives them the fresh state its constructor would) and every group's
/// hyper-parameters, lr included, are restored. Everything is validated before the optimizer is
/// touched, so a failed load leaves it unchanged. Loaded tensors are copied to each parameter's
/// device and dtype.
///
/// Example:
/// \code
///   torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(1e-3));
///   // ... train ...
///   accelerate::save_optimizer_state(optimizer, "out/optimizer.safetensors");
///   // later, with a model and an optimizer built the same way:
///   accelerate::load_optimizer_state(optimizer, "out/optimizer.safetensors");
/// \endcode

#include <ATen/Tensor.h>
#include <torch/optim/optimizer.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

namespace accelerate {

/// Value of the `format` metadata entry of the files written here.
inline constexpr const char* kOptimizerStateFormat = "accelerate-cpp optimizer 1";

/// An optimizer's state as the content of one safetensors file: `tensors` and `metadata` are
/// exactly what `safetensors::save_file` writes (see the file comment for the layout).
///
/// Example:
/// \code
///   accelerate::OptimizerStateDict state = accelerate::optimizer_state_dict(optimizer);
///   for (const auto& [name, tensor] : state.tensors) std::cout << name << "\n";  // state.0.step
///   std::cout << state.metadata.at("param_groups") << "\n";
/// \endcode
struct OptimizerStateDict {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  std::map<std::string, std::string> metadata;
};

/// The optimizer's state and param groups. Like PyTorch's `state_dict()`, the state tensors
/// share memory with the optimizer's (clone them to keep a snapshot across later steps); `step`
/// and the fallback archive are fresh tensors.
///
/// Example:
/// \code
///   torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
///   auto state = accelerate::optimizer_state_dict(optimizer);
///   assert(state.metadata.at("optimizer") == "SGD");
/// \endcode
OptimizerStateDict optimizer_state_dict(const torch::optim::Optimizer& optimizer);

/// Restores `state` (from `optimizer_state_dict` or a file) into `optimizer`: per-parameter
/// state and every group's hyper-parameters. The optimizer must be of the same kind with the
/// same number of param groups and parameters per group, each parameter of the saved shape.
/// Any mismatch or malformed entry is an error naming it, and leaves `optimizer` unchanged.
/// Tensors are copied; `state` is not referenced afterwards.
///
/// Example:
/// \code
///   auto saved = accelerate::optimizer_state_dict(optimizer);
///   accelerate::load_optimizer_state_dict(other_optimizer, saved);
/// \endcode
void load_optimizer_state_dict(torch::optim::Optimizer& optimizer, const OptimizerStateDict& state);

/// Writes `optimizer_state_dict(optimizer)` to the safetensors file `path`, atomically: a crash
/// leaves either the old file or the new one.
///
/// Example:
/// \code
///   accelerate::save_optimizer_state(optimizer, "checkpoint/optimizer.safetensors");
/// \endcode
void save_optimizer_state(const torch::optim::Optimizer& optimizer, const std::string& path);

/// Reads the safetensors file `path` and `load_optimizer_state_dict`s it into `optimizer`.
///
/// Example:
/// \code
///   accelerate::load_optimizer_state(optimizer, "checkpoint/optimizer.safetensors");
/// \endcode
void load_optimizer_state(torch::optim::Optimizer& optimizer, const std::string& path);

}  // namespace accelerate
