#pragma once
/// \file
/// The pieces of a training-run checkpoint (Accelerate's `save_state` / `load_state`): file
/// names, the custom-object interface, the completion marker, and finding the latest complete
/// checkpoint. The Accelerator's save_state() / load_state() (accelerator.h) use them.
///
/// A checkpoint is a directory:
///
///   model.safetensors, model_1.safetensors, ...        prepared models (main process)
///   optimizer.safetensors, optimizer_1.safetensors ... full optimizer state (optimizer_state.h)
///   scheduler.json, scheduler_1.json, ...              LR schedulers
///   scaler.json                                        fp16 loss scaler, when there is one
///   custom_checkpoint_0.safetensors, ...               register_for_checkpointing objects
///   random_states_<rank>.safetensors                   per process: generator states, the
///                                                      data loaders' positions, the step counter
///   accelerate_state.json                              the completion marker, written last
///
/// Integrity: the marker lists every other file with its size ("files") and its CRC32C
/// ("crc32c", 8 hex digits of the whole file). load_state checks both before changing anything
/// and refuses a checkpoint whose file differs, naming it; a restart (automatic resume) falls
/// back to the newest checkpoint that passes, with a warning. Markers without "crc32c" (older
/// saves) are checked by size only. Setting ACCELERATE_CHECKPOINT_CHECKSUMS=0 saves without
/// checksums. The saving process hashes the files it writes as it writes them and reads back
/// only the others' (cost: benchmarks/README.md, "Checkpoint checksums").
///
/// The base names are Accelerate's constants (MODEL_NAME, OPTIMIZER_NAME, SCHEDULER_NAME,
/// SCALER_NAME, RNG_STATE_NAME, "custom_checkpoint"); the extensions say the format, since
/// nothing is pickled: tensors go into safetensors files, a few numbers into JSON.
///
/// Crash safety: the directory is written under a temporary name beside its final one
/// (`.<name>.partial`), every file fsync'd, the marker written last, and the directory
/// published by rename. A killed save leaves at most a `.partial` directory, which loading never
/// considers and the next save removes.
///
/// Example:
/// \code
///   struct Counter : accelerate::Checkpointable {
///     int64_t value = 0;
///     accelerate::ObjectState state_dict() const override {
///       return {{{"value", at::tensor(value)}}, {}};
///     }
///     void load_state_dict(const accelerate::ObjectState& s) override {
///       value = s.get("value").item<int64_t>();
///     }
///   };
///   auto counter = std::make_shared<Counter>();
///   accelerator.register_for_checkpointing(counter);
///   accelerator.save_state("ckpt");   // ... later, in a new process:
///   accelerator.load_state("ckpt");   // counter->value is back
/// \endcode

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace accelerate {

/// Accelerate's base names.
inline constexpr const char* kModelName = "model";
inline constexpr const char* kOptimizerName = "optimizer";
inline constexpr const char* kSchedulerName = "scheduler";
inline constexpr const char* kScalerName = "scaler.json";
inline constexpr const char* kRngStateName = "random_states";
inline constexpr const char* kCustomCheckpointName = "custom_checkpoint";
/// Written last: a directory without it is not a checkpoint.
inline constexpr const char* kCheckpointMarkerName = "accelerate_state.json";
/// automatic_checkpoint_naming: `<project_dir>/checkpoints/checkpoint_<iteration>`.
inline constexpr const char* kCheckpointsFolder = "checkpoints";
inline constexpr const char* kCheckpointPrefix = "checkpoint_";
/// "0" turns off the checksums save_state records.
inline constexpr const char* kCheckpointChecksumsEnv = "ACCELERATE_CHECKPOINT_CHECKSUMS";
/// Bumped when the layout changes in a way older readers cannot load.
inline constexpr int kCheckpointFormatVersion = 1;

/// accelerate-cpp's version ("0.1.0"), recorded in every checkpoint.
std::string library_version();

/// Accelerate's numbering: `model.safetensors` for index 0, `model_1.safetensors` for 1, ...
std::string indexed_file_name(const std::string& base, size_t index, const std::string& extension);

/// A custom object's state: tensors plus string metadata, stored as one safetensors file.
struct ObjectState {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  std::map<std::string, std::string> metadata;

  /// The tensor called `name`; an error naming the object's tensors if there is none.
  at::Tensor get(const std::string& name) const;
  /// The metadata value `key`; an error if there is none.
  const std::string& meta(const std::string& key) const;
};

/// What register_for_checkpointing takes: anything that can give and take back its state
/// (Accelerate asks for `state_dict` and `load_state_dict`).
class Checkpointable {
 public:
  virtual ~Checkpointable() = default;
  virtual ObjectState state_dict() const = 0;
  virtual void load_state_dict(const ObjectState& state) = 0;
};

/// Undoes a registration (PyTorch's `RemovableHandle`). remove() is idempotent; dropping the
/// handle keeps the registration.
///
/// Example:
/// \code
///   auto handle = accelerator.register_save_state_pre_hook(hook);
///   handle.remove();  // the next save_state no longer calls it
/// \endcode
class RemovableHandle {
 public:
  RemovableHandle() = default;
  explicit RemovableHandle(std::function<void()> remover) : remover_(std::move(remover)) {}
  void remove() {
    if (remover_) std::exchange(remover_, nullptr)();
  }

 private:
  std::function<void()> remover_;
};

/// The completion marker's content: who saved the checkpoint and what it holds.
struct CheckpointInfo {
  int format_version = kCheckpointFormatVersion;
  std::string library_version;
  std::string torch_version;
  /// Processes that saved it; each left a random_states_<rank> file.
  int world_size = 1;
  /// The Accelerator's accumulation step counter.
  int64_t step = 0;
  std::string mixed_precision = "no";
  int64_t num_models = 0;
  int64_t num_optimizers = 0;
  int64_t num_schedulers = 0;
  int64_t num_data_loaders = 0;
  int64_t num_custom_objects = 0;
  bool has_scaler = false;
  /// Every other file of the checkpoint with its size in bytes, checked before loading.
  std::vector<std::pair<std::string, int64_t>> files;
  /// CRC32C of whole files in `files`; empty for checkpoints saved without checksums.
  std::map<std::string, uint32_t> crc32c;

  std::string to_json() const;
  /// Parses a marker; errors name `source` and the bad field.
  static CheckpointInfo from_json(const std::string& text, const std::string& source);
};

/// Reads `directory`'s marker and checks that every file it lists is there with its size and,
/// with `verify`, its recorded CRC32C (an error naming the corrupted file). A directory without
/// a marker gets an error saying it is not a complete checkpoint.
CheckpointInfo read_checkpoint_info(const std::string& directory, bool verify = true);

/// The complete `checkpoint_<n>` directory with the largest n under `checkpoints_dir`;
/// nullopt when there is none. Incomplete ones (no marker, or `.partial`) are skipped.
std::optional<std::string> latest_checkpoint(const std::string& checkpoints_dir);

/// The complete `checkpoint_<n>` directories under `checkpoints_dir`, oldest (smallest n)
/// first, with their n.
std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& checkpoints_dir);

}  // namespace accelerate
