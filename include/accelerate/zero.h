#pragma once
/// \file
/// ZeRO stages 1 and 2 (DeepSpeed) / FSDP's SHARD_GRAD_OP for any LibTorch optimizer whose update
/// is element-wise: SGD, Adam, AdamW, RMSprop, Adagrad.
///
/// The gradient buckets of the model's GradientSynchronizer (ddp.h) are the unit of sharding:
/// process r owns elements [r * S, (r + 1) * S) of every bucket (S = ceil(bucket size / world)).
/// Backward reduce-scatters each bucket, so that each process receives the average of its own
/// elements only. The optimizer's parameters are replaced by "pieces": flat views of the parts of
/// each parameter this process owns. The optimizer therefore keeps state (momentum, Adam's
/// moments) for 1/world of the parameters and updates them in place; after its step every
/// bucket's updated parameters are all-gathered, so every process holds the whole model again.
/// Element-wise updates make this exactly the unsharded update, up to the order in which the
/// gradients' average was summed.
///
/// Memory per process with Adam and Ψ float32 parameters: DDP 16Ψ bytes; stage 1 8Ψ + 8Ψ/N
/// (gradients whole); stage 2 4Ψ + 12Ψ/N (gradients sharded after each synchronization).
///
/// The Accelerator builds this for a prepared optimizer when a sharding plugin asks for stage 1
/// or 2 (plugins.h); users of the Accelerator do not use it directly.
///
/// Example:
/// \code
///   accelerate::GradientSynchronizer sync(model, state);
///   sync.shard_gradients(2);
///   torch::optim::AdamW adamw(model->parameters(), torch::optim::AdamWOptions(1e-3));
///   accelerate::ZeroOptimizer zero(adamw, {&sync}, state, {.stage = 2});
///   model->forward(x).sum().backward();
///   zero.step();        // adamw.step() on this process's shard, then all-gather
///   zero.zero_grad();
/// \endcode

#include <accelerate/ddp.h>
#include <accelerate/optimizer_state.h>
#include <accelerate/state.h>

#include <torch/optim/optimizer.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace accelerate {

/// Options of the ZeRO engine.
///
/// Example:
/// \code
///   accelerate::ZeroOptions options{.stage = 1, .gradient_clipping = 1.0};
/// \endcode
struct ZeroOptions {
  /// 1 or 2.
  int stage = 2;
  /// Clip the global gradient norm to this before every step (DeepSpeed's gradient_clipping).
  std::optional<double> gradient_clipping;
  /// DeepSpeed's offload_optimizer_device "cpu": for parameters on a GPU, the optimizer steps
  /// copies of this process's parts in pinned CPU memory, where its state then lives too, and
  /// the updated parts are copied back before the all-gather. Parameters already on the CPU are
  /// stepped in place as without it.
  bool offload_optimizer = false;
};

/// The file layout of a sharded optimizer checkpoint directory.
inline constexpr const char* kZeroIndexFile = "zero_index.json";
/// Each process's shard: `zero_shard_<rank>.safetensors`.
std::string zero_shard_file_name(int rank);

/// The whole optimizer state (ordinary layout, optimizer_state.h) assembled from a directory
/// written by ZeroOptimizer::save_sharded: what a run without sharding (one process, or stage 0)
/// loads. Every element must be covered by the shards, or the error names what is missing.
///
/// Example:
/// \code
///   auto state = accelerate::read_sharded_optimizer_state("ckpt/optimizer_0");
///   accelerate::load_optimizer_state_dict(optimizer, state);
/// \endcode
OptimizerStateDict read_sharded_optimizer_state(const std::string& directory);

/// What one process holds: optimizer state and gradients of its shard (see the file comment).
/// Every method except the accessors is collective: all processes call it in the same order.
class ZeroOptimizer {
 public:
  /// Shards `optimizer`, whose parameters must all belong to `synchronizers` (each of which must
  /// already shard gradients at `options.stage`). State the optimizer already holds is sliced,
  /// not lost. An optimizer of another kind (LBFGS, a subclass) is an error.
  ZeroOptimizer(torch::optim::Optimizer& optimizer,
                std::vector<GradientSynchronizer*> synchronizers,
                std::shared_ptr<PartialState> state, ZeroOptions options);
  ZeroOptimizer(const ZeroOptimizer&) = delete;
  ZeroOptimizer& operator=(const ZeroOptimizer&) = delete;
  ~ZeroOptimizer();

  /// Gives each piece its averaged gradient, clips if asked, runs `inner` (default:
  /// `optimizer.step()`), then all-gathers the updated parameters. `inner` returns false to
  /// skip the update (a loss scaler that found inf/NaN): then nothing is gathered.
  void step(const std::function<bool()>& inner = {});
  /// Drops the pieces' gradients and (stage 2) the gradient shards.
  void zero_grad();
  /// The global gradient norm over every process's shard (one scalar all-reduce), restricted to
  /// `parameters` (model parameters; empty = all), and scales the shards so that it is at most
  /// `max_norm`. Returns the norm before clipping, as torch's clip_grad_norm_.
  double clip_grad_norm(const std::vector<at::Tensor>& parameters, double max_norm,
                        double norm_type = 2.0);
  /// Clamps the shards' gradients (element-wise, so the same as clamping whole gradients).
  void clip_grad_value(const std::vector<at::Tensor>& parameters, double clip_value);
  /// Binds the shards' averaged gradients to the pieces (step() does it; the loss scaler's
  /// unscale_ needs it earlier).
  void bind_gradients();

  /// The whole optimizer state in the ordinary layout (optimizer_state.h), as if unsharded: the
  /// same on every process.
  OptimizerStateDict full_state_dict() const;
  /// Loads an ordinary (unsharded) optimizer state: each process keeps its pieces.
  void load_full_state_dict(const OptimizerStateDict& full);
  /// Writes this process's shard (and, on process 0, the index) into `directory`.
  void save_sharded(const std::string& directory) const;
  /// Reads a directory written by save_sharded with any number of processes.
  void load_sharded(const std::string& directory);

  int stage() const;
  /// Bytes of optimizer state and of gradient shards this process holds.
  int64_t optimizer_state_bytes() const;
  int64_t gradient_bytes() const;
  /// Number of pieces (parameter parts owned here).
  size_t num_pieces() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace accelerate
