#pragma once
/// \file
/// Saving and loading model weights with Hugging Face's file names and layout (Accelerate's
/// `save_model`, `shard_checkpoint`, `load_checkpoint_in_model`), on top of safetensors.h.
///
/// One file (`model.safetensors`) when the weights fit in `max_shard_size`, otherwise shards
/// `model-00001-of-0000N.safetensors` and an index `model.safetensors.index.json`
/// (`{"metadata": {"total_size": bytes}, "weight_map": {name: shard}}`). Names are LibTorch's
/// `named_parameters()` / `named_buffers()` names, which are PyTorch's state_dict names for the
/// same architecture, so the files load in Python's transformers/accelerate and back.
///
/// Integrity: save_model records CRC32C checksums where Hugging Face's readers ignore them. A
/// single file gets `"accelerate_crc32c"` in its `__metadata__`: the checksum of its data buffer
/// (the bytes after the header; a header cannot hold a checksum of itself). A sharded save gets
/// `"accelerate_crc32c": {shard: checksum}` in the index's "metadata", each of a whole shard
/// file. Checksums are 8 lower-case hex digits. load_checkpoint_in_model verifies those present
/// (LoadCheckpointOptions::verify) and refuses a file that differs, naming it; files without
/// them (other writers, fully sharded saves to one file, whose data is produced once) load as
/// before. Pickle checkpoints (`pytorch_model.bin`, `pytorch_model.bin.index.json`) are refused
/// with a message saying to convert them to safetensors.
///
/// Example:
/// \code
///   accelerate::save_model(*model, "out", {.max_shard_size = "200MB"});
///   auto report = accelerate::load_checkpoint_in_model(*model, "out");
///   for (const auto& name : report.missing_keys) std::cout << "not in the checkpoint: " << name;
/// \endcode

#include <accelerate/device_map.h>

#include <torch/nn/module.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace accelerate {

/// Hugging Face's file names.
inline constexpr const char* kSafeWeightsName = "model.safetensors";
inline constexpr const char* kSafeWeightsIndexName = "model.safetensors.index.json";
/// Hugging Face's pickle names, recognised only to be refused with a clear message.
inline constexpr const char* kPickleWeightsName = "pytorch_model.bin";
inline constexpr const char* kPickleWeightsIndexName = "pytorch_model.bin.index.json";
/// The `__metadata__` key of a single file's data-buffer checksum, and the index "metadata" key
/// of the shards' checksums.
inline constexpr const char* kDataChecksumKey = "accelerate_crc32c";
inline constexpr const char* kShardChecksumsKey = "accelerate_crc32c";

/// Parses a shard size: a byte count ("1000"), or a number with KB/MB/GB/TB (powers of 1000) or
/// KiB/MiB/GiB/TiB (powers of 1024), as Hugging Face's `convert_file_size_to_int`. Errors name
/// the text.
int64_t parse_file_size(const std::string& text);

/// Options for save_model.
struct SaveModelOptions {
  /// Largest shard ("10GB" by default, as in Accelerate).
  std::string max_shard_size = "10GB";
  /// Only safetensors is written: LibTorch cannot write Python pickles, so false is an error.
  bool safe_serialization = true;
};

/// A planned split of named tensors into shards (Hugging Face's `shard_checkpoint`): tensors in
/// order, a new shard whenever the next tensor would push the current one past max bytes (a
/// tensor larger than the limit gets a shard of its own).
struct ShardPlan {
  /// File name of each shard and the names of the tensors it holds.
  std::vector<std::pair<std::string, std::vector<std::string>>> shards;
  int64_t total_size = 0;
};
ShardPlan shard_checkpoint(const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                           int64_t max_shard_size);

/// The model's parameters and buffers by name, with tensors that share storage (tied weights)
/// kept once under their first name. For a fully sharded model (fsdp.h) it is collective and
/// returns whole copies, gathered one unit at a time.
std::vector<std::pair<std::string, at::Tensor>> model_state(const torch::nn::Module& model);

/// Writes the model's weights into `directory` (created if needed); returns the files written.
/// Stale shards of an earlier save with another shard count are removed after the new files
/// are in place. Every file is written atomically. For a fully sharded model (fsdp.h) every
/// process must call it (each gathers one unit at a time), and every caller writes: use
/// Accelerator::save_model, which writes on the main process only.
std::vector<std::string> save_model(const torch::nn::Module& model, const std::string& directory,
                                    const SaveModelOptions& options = {});

namespace detail {
/// save_model for tensors produced one at a time: `tensors` gives names, shapes and dtypes,
/// `fetch(i)` the values of tensors[i] when they are written; processes with `write` false only
/// call `fetch` in the same order (they take part in producing the tensors). `fetch_twice`
/// says fetching is cheap enough to do twice per tensor, which a single file's data checksum
/// needs (it goes in the header, written before the data); shards are checksummed regardless.
std::vector<std::string> save_model_streaming(
    const std::vector<std::pair<std::string, at::Tensor>>& tensors, const std::string& directory,
    const SaveModelOptions& options, const std::function<at::Tensor(size_t)>& fetch, bool write,
    bool fetch_twice = false);
}  // namespace detail

/// Options for load_checkpoint_in_model (Accelerate's keyword arguments).
///
/// Example:
/// \code
///   accelerate::LoadCheckpointOptions options{
///       .dtype = at::kHalf,
///       .device_map = {{"embed", "cpu"}, {"blocks", "disk"}, {"head", "cpu"}},
///       .keep_in_fp32_modules = {"head"}};
/// \endcode
struct LoadCheckpointOptions {
  /// Convert floating-point weights to this dtype (default: the parameter's own).
  std::optional<at::ScalarType> dtype;
  /// Missing or unexpected keys are errors instead of being reported.
  bool strict = false;
  /// Where each weight goes (device_map.h): "cpu", "cuda:N", or "disk". Empty: onto the
  /// model's own device (meta tensors onto the CPU). A "disk" weight becomes a zero-copy view
  /// of the checkpoint's mapped file when its dtype and alignment allow, otherwise it is written
  /// to `offload_folder` (Accelerate's layout, offload.h) and mapped from there.
  DeviceMap device_map;
  /// Needed when a "disk" weight cannot be served from the checkpoint itself.
  std::string offload_folder;
  /// Stage "cpu" weights in a temporary offload folder while the checkpoint is read, and load
  /// them at the end (bounds what one shard holds in memory, as in Accelerate).
  bool offload_state_dict = false;
  /// Put the buffers of "disk" modules on the disk too (otherwise they are loaded in memory).
  bool offload_buffers = false;
  /// With dtype float16, weights of these modules ("head", or a full tensor name) stay float32.
  std::vector<std::string> keep_in_fp32_modules;
  /// Check the checksums save_model recorded (when there are any) and refuse a file that
  /// differs. false loads it anyway (reading every byte once more costs about 0.2 s per GiB).
  bool verify = true;
};

/// What loading found.
struct LoadReport {
  /// In the model, not in the checkpoint (tied copies of a loaded tensor do not count).
  std::vector<std::string> missing_keys;
  /// In the checkpoint, not in the model.
  std::vector<std::string> unexpected_keys;
};

/// Loads weights into `model` in place from a safetensors file, a directory holding
/// model.safetensors, or a sharded index (file or directory). A shape mismatch is an error
/// naming the tensor and both shapes. Meta tensors (big_modeling.h's init_empty_weights) are
/// materialised; with a device map each weight goes to its device (see LoadCheckpointOptions).
LoadReport load_checkpoint_in_model(torch::nn::Module& model, const std::string& path,
                                    const LoadCheckpointOptions& options = {});

}  // namespace accelerate
