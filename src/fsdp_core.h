#pragma once
// The engine of full parameter sharding (fsdp.h): private to the library; GradientSynchronizer
// (ddp.cpp) owns one for a stage-3 model and forwards its ZeRO-facing methods here.

#include "accelerate/compat.h"
#include "accelerate/ddp.h"
#include "accelerate/fsdp.h"
#include "accelerate/state.h"
#include "unit_hooks.h"

#include <ATen/ATen.h>
#include <c10/core/StorageImpl.h>
#include <torch/csrc/autograd/function.h>
#include <torch/nn/modules/container/any.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace accelerate::detail {

struct FullShardCore : std::enable_shared_from_this<FullShardCore> {
  using Clock = std::chrono::steady_clock;

  struct Param {
    at::Tensor tensor;  // the module's own parameter: a view of its unit's full storage
    std::string name;
    size_t unit = 0;
    int64_t offset = 0;  // of its first element in the unit's flat parameter
    int64_t numel = 0;
    bool fired = false;    // its gradient was accumulated in the current backward
    bool counted = false;  // its unsharded gradient is in grad_bytes
  };

  struct Unit {
    std::string name;  // the module's path; "" for the root unit
    const torch::nn::Module* module = nullptr;
    std::vector<size_t> params;
    int64_t numel = 0;
    int64_t shard_numel = 0;
    at::ScalarType dtype = at::kFloat;  // of the shard (the parameters' own dtype)
    at::Tensor shard;                   // [shard_numel] this process's elements: the master copy
    at::Tensor grad_shard;              // [own length] averaged gradient, after a synchronization
    c10::intrusive_ptr<c10::StorageImpl> storage;  // the full parameters, in param_dtype
    at::Tensor full;  // [world * shard_numel] over `storage`, with its own version counter
    bool root = false;
    bool managed = false;   // entered through a holder: resharded between uses
    bool gathered = false;  // `storage` holds the current full parameters
    c10::intrusive_ptr<compat::Work> gather_work;
    at::Tensor gather_send;
    Clock::time_point gather_launch;
    std::shared_ptr<std::atomic<int64_t>> gather_done_ns;
    // Backward.
    size_t pending = 0;
    bool in_backward = false;
    bool grads_ready = false;
    bool rs_launched = false;
    c10::intrusive_ptr<compat::Work> rs_work;
    at::Tensor rs_send;
    at::Tensor rs_recv;
  };

  std::shared_ptr<torch::nn::Module> module;
  std::shared_ptr<PartialState> state;
  FullyShardedOptions options;
  int64_t id = 0;  // in the registry that PreBackward functions look cores up in
  int64_t world = 1;
  int64_t rank = 0;
  c10::Device device{c10::kCPU};        // of the full parameters
  c10::Device shard_device{c10::kCPU};  // of the shards (the CPU with cpu_offload on a GPU)
  std::vector<Param> params;
  std::vector<Unit> units;  // units[0] is the root unit (possibly empty)
  std::vector<size_t> forward_order;
  bool order_recorded = false;
  std::function<bool()> require_sync;
  // Sequential forward chains whose entries were replaced by holders: restored on destruction.
  std::vector<SequentialHolder> installed;
  std::vector<std::pair<std::shared_ptr<torch::autograd::Node>, uintptr_t>> hooks;

  mutable std::recursive_mutex mutex;
  bool callback_queued = false;
  std::optional<size_t> rs_in_flight;  // the unit whose reduce-scatter was launched last
  uint64_t iteration = 0;
  bool warned_unmanaged = false;

  // Accounting (bytes held now and at most since reset_stats).
  int64_t gathered_bytes = 0;
  int64_t peak_gathered_bytes = 0;
  int64_t grad_bytes = 0;
  int64_t peak_grad_bytes = 0;
  int64_t gathers = 0;
  double gather_seconds = 0;
  double gather_wait_seconds = 0;

  FullShardCore(std::shared_ptr<torch::nn::Module> module, std::shared_ptr<PartialState> state,
                const FullyShardedOptions& options, std::function<bool()> require_sync);
  ~FullShardCore();
  // Builds units, shards, hooks and holders (collective).
  void setup();

  std::pair<int64_t, int64_t> own_range(const Unit& u) const;
  // Gathering.
  void launch_gather(size_t u);
  void wait_gather(size_t u);
  void ensure_gathered(size_t u);
  void reshard(size_t u);
  void maybe_prefetch(size_t u);
  // Forward and backward events.
  void pre_forward(size_t u);
  void post_forward(size_t u, bool hooked);
  void pre_backward(size_t u);
  void on_gradient(size_t param);
  void unit_done(size_t u);
  void launch_reduce_scatters(bool all);
  void launch_reduce_scatter(size_t u);
  void finish_reduce_scatter(size_t u);
  void queue_finalize();
  void finalize();
  void abandon(uint64_t iteration) noexcept;
  void reset_iteration();
  // After the shards changed.
  void parameters_updated();
  at::Tensor gather_copy(size_t u);  // the unit's full flat in the shard dtype (collective)
  // Gathers every unit and keeps it whole from now on (before the engine is dropped, so that
  // the model stays usable). Collective.
  void gather_all_whole();
  int64_t unit_bytes(const Unit& u) const;
};

// The core a PreBackward function belongs to.
std::shared_ptr<FullShardCore> find_core(int64_t id);

}  // namespace accelerate::detail

namespace accelerate::detail {

/// The state dict of a fully sharded model as save_model orders it (parameters then buffers,
/// a tied tensor once under its first name): sharded parameters as meta tensors of their
/// shards' dtype (values come from FullStateReader), everything else as the tensor itself.
struct FullStateSpecs {
  std::vector<std::pair<std::string, at::Tensor>> specs;
  std::vector<std::optional<size_t>> param;  // the core's parameter index, for sharded ones
};
FullStateSpecs full_state_specs(const FullShardCore& core, const torch::nn::Module& model);

/// Hands out specs' values one at a time, gathering one unit at a time. Collective: every
/// process asks for the same entries in the same order.
class FullStateReader {
 public:
  FullStateReader(FullShardCore& core, const FullStateSpecs& specs) : core_(core), specs_(specs) {}
  at::Tensor operator()(size_t k);

 private:
  FullShardCore& core_;
  const FullStateSpecs& specs_;
  std::optional<size_t> unit_;
  at::Tensor flat_;
};

/// SHARDED_STATE_DICT of the model: `directory`/shard_<rank>.safetensors per process (its own
/// pieces; process 0 also the whole tensors) and fsdp_index.json. Collective.
inline constexpr const char* kFsdpIndexFile = "fsdp_index.json";
void save_sharded_model(FullShardCore& core, const torch::nn::Module& model,
                        const std::string& directory);
/// Loads `path` (a safetensors file, a save_model directory or a sharded directory) into a fully
/// sharded model: each process keeps its pieces. With `main_reads` only process 0 reads a full
/// checkpoint; the others receive their shards (scatter). Collective.
void load_full_shard_model(FullShardCore& core, torch::nn::Module& model, const std::string& path,
                           bool main_reads);
/// The whole state dict from a sharded directory (for a run without full sharding).
std::vector<std::pair<std::string, at::Tensor>> read_sharded_model_state(
    const std::string& directory);
/// The engine of `model` if it is the root of a fully sharded model.
std::shared_ptr<FullShardCore> full_shard_core_of(const torch::nn::Module& model);

}  // namespace accelerate::detail

namespace accelerate {
struct SaveModelOptions;
}

namespace accelerate::detail {
/// save_model (checkpointing.h) of a fully sharded model: the same files, the tensors streamed
/// one unit at a time; only `write` processes write. Collective.
std::vector<std::string> save_full_shard_model(FullShardCore& core, const torch::nn::Module& model,
                                               const std::string& directory,
                                               const SaveModelOptions& options, bool write);
}  // namespace accelerate::detail
