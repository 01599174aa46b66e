#include "accelerate/checkpointing.h"

#include "accelerate/big_modeling.h"
#include "accelerate/offload.h"
#include "accelerate/safetensors.h"
#include "detail/checksum.h"
#include "detail/file_mapping.h"
#include "fsdp_core.h"
#include "tensor_data.h"

#include <c10/util/Exception.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <nlohmann/json.hpp>

#include <stdlib.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <set>
#include <sstream>

namespace accelerate {

namespace fs = std::filesystem;

int64_t parse_file_size(const std::string& text) {
  size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) {
    ++i;
  }
  TORCH_CHECK(i > 0, "accelerate: cannot read the file size \"", text,
              "\" (expected a number with an optional unit: KB, MB, GB, TB, KiB, MiB, GiB, TiB)");
  double number = 0;
  try {
    number = std::stod(text.substr(0, i));
  } catch (const std::exception&) {
    TORCH_CHECK(false, "accelerate: cannot read the file size \"", text, "\"");
  }
  std::string unit = text.substr(i);
  unit.erase(std::remove(unit.begin(), unit.end(), ' '), unit.end());
  static const std::map<std::string, double> kUnits = {{"", 1.0},
                                                       {"B", 1.0},
                                                       {"KB", 1e3},
                                                       {"MB", 1e6},
                                                       {"GB", 1e9},
                                                       {"TB", 1e12},
                                                       {"KIB", 1024.0},
                                                       {"MIB", 1048576.0},
                                                       {"GIB", 1073741824.0},
                                                       {"TIB", 1099511627776.0}};
  std::string upper = unit;
  for (auto& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  auto it = kUnits.find(upper);
  TORCH_CHECK(it != kUnits.end(), "accelerate: unknown unit \"", unit, "\" in the file size \"",
              text, "\" (use KB, MB, GB, TB, KiB, MiB, GiB or TiB)");
  const double bytes = number * it->second;
  TORCH_CHECK(bytes >= 1 && bytes < 9.2e18, "accelerate: the file size \"", text,
              "\" must be at least 1 byte");
  return static_cast<int64_t>(bytes);
}

ShardPlan shard_checkpoint(const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                           int64_t max_shard_size) {
  TORCH_CHECK(max_shard_size > 0, "accelerate: max_shard_size must be positive, got ",
              max_shard_size);
  std::vector<std::vector<std::string>> groups;
  int64_t current = 0;
  ShardPlan plan;
  for (const auto& [name, t] : tensors) {
    const int64_t bytes = static_cast<int64_t>(t.numel()) * static_cast<int64_t>(t.element_size());
    if (groups.empty() || (current + bytes > max_shard_size && current > 0)) {
      groups.emplace_back();
      current = 0;
    }
    groups.back().push_back(name);
    current += bytes;
    plan.total_size += bytes;
  }
  if (groups.size() <= 1) {
    plan.shards.emplace_back(kSafeWeightsName,
                             groups.empty() ? std::vector<std::string>{} : groups.front());
    return plan;
  }
  const size_t n = groups.size();
  for (size_t k = 0; k < n; ++k) {
    char name[64];
    std::snprintf(name, sizeof(name), "model-%05zu-of-%05zu.safetensors", k + 1, n);
    plan.shards.emplace_back(name, std::move(groups[k]));
  }
  return plan;
}

std::vector<std::pair<std::string, at::Tensor>> model_state(const torch::nn::Module& model) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  if (auto core = detail::full_shard_core_of(model)) {
    // Collective: gathered one unit at a time, in the shards' dtype.
    const auto specs = detail::full_state_specs(*core, model);
    detail::FullStateReader reader(*core, specs);
    for (size_t k = 0; k < specs.specs.size(); ++k) {
      out.emplace_back(specs.specs[k].first, reader(k).clone());
    }
    return out;
  }
  // Tied weights share storage: keep the first name, as Hugging Face's savers do; loading
  // fills the tie through the model, which shares the tensor already.
  std::set<std::tuple<const void*, std::vector<int64_t>, std::vector<int64_t>, int>> seen;
  auto add = [&](const std::string& name, const at::Tensor& t) {
    if (!t.defined()) return;
    auto key = std::make_tuple(static_cast<const void*>(t.data_ptr()), t.sizes().vec(),
                               t.strides().vec(), static_cast<int>(t.scalar_type()));
    if (t.numel() > 0 && !seen.insert(key).second) return;
    out.emplace_back(name, t.detach());
  };
  for (const auto& item : model.named_parameters()) add(item.key(), item.value());
  for (const auto& item : model.named_buffers()) add(item.key(), item.value());
  return out;
}

namespace {

bool is_our_weight_file(const std::string& name) {
  return name == kSafeWeightsName || name == kSafeWeightsIndexName ||
         (name.rfind("model-", 0) == 0 && name.size() > 12 &&
          name.substr(name.size() - 12) == ".safetensors" &&
          name.find("-of-") != std::string::npos);
}

}  // namespace

std::vector<std::string> save_model(const torch::nn::Module& model, const std::string& directory,
                                    const SaveModelOptions& options) {
  if (auto core = detail::full_shard_core_of(model)) {
    // Collective: every process streams its shards, the caller's process writes.
    return detail::save_full_shard_model(*core, model, directory, options, true);
  }
  const auto tensors = model_state(model);
  return detail::save_model_streaming(
      tensors, directory, options, [&](size_t i) { return tensors[i].second; }, true,
      /*fetch_twice=*/true);
}

std::vector<std::string> detail::save_model_streaming(
    const std::vector<std::pair<std::string, at::Tensor>>& tensors, const std::string& directory,
    const SaveModelOptions& options, const std::function<at::Tensor(size_t)>& fetch, bool write,
    bool fetch_twice) {
  TORCH_CHECK(options.safe_serialization,
              "accelerate: save_model writes safetensors only (safe_serialization=false would "
              "need Python's pickle format, which LibTorch cannot write)");
  const int64_t limit = parse_file_size(options.max_shard_size);
  if (write) fs::create_directories(directory);
  const auto plan = shard_checkpoint(tensors, limit);
  std::map<std::string, size_t> by_name;
  for (size_t i = 0; i < tensors.size(); ++i) by_name.emplace(tensors[i].first, i);
  const std::map<std::string, std::string> metadata{{"format", "pt"}};

  std::vector<std::string> written;
  nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
  nlohmann::ordered_json shard_sums = nlohmann::ordered_json::object();
  // Shards are hashed as they are written (their sums go in the index); a single file's data
  // checksum goes in its own header instead (below).
  std::map<std::string, uint32_t> written_sums;
  struct SinkGuard {
    std::map<std::string, uint32_t>* previous;
    ~SinkGuard() { detail::checksum_sink() = previous; }
  } sink_guard{detail::checksum_sink()};
  detail::checksum_sink() = plan.shards.size() > 1 ? &written_sums : nullptr;
  for (const auto& [file, names] : plan.shards) {
    std::vector<std::pair<std::string, at::Tensor>> part;
    std::vector<size_t> index;
    for (const auto& name : names) {
      index.push_back(by_name.at(name));
      part.emplace_back(name, tensors[index.back()].second);
      weight_map[name] = file;
    }
    const auto path = (fs::path(directory) / file).string();
    auto file_metadata = metadata;
    // The header cannot hold a checksum of the file it is part of: it gets the data buffer's,
    // which save_file_streaming takes as it writes the data and puts in the header before the
    // fsync (checksum.h). Each tensor is fetched once; fetch_twice still gates it only because
    // the streamed saves (FSDP) did not record it before.
    struct KeyGuard {
      const char* previous;
      ~KeyGuard() { detail::data_checksum_key() = previous; }
    } key_guard{detail::data_checksum_key()};
    detail::data_checksum_key() =
        write && fetch_twice && plan.shards.size() == 1 ? kDataChecksumKey : nullptr;
    safetensors::detail::save_file_streaming(
        part, path, file_metadata, [&](size_t k) { return fetch(index[k]); }, write);
    if (write && plan.shards.size() > 1) {
      // Hashed as written (write_file_atomically_with records it); read back only if not.
      const auto sum = written_sums.find(path);
      shard_sums[file] = detail::crc32c_hex(
          sum != written_sums.end() ? sum->second : detail::crc32c_of_file(path));
    }
    written.push_back(path);
  }
  if (!write) return {};
  if (plan.shards.size() > 1) {
    nlohmann::ordered_json index;
    index["metadata"] = {{"total_size", plan.total_size}, {kShardChecksumsKey, shard_sums}};
    index["weight_map"] = weight_map;
    const auto path = fs::path(directory) / kSafeWeightsIndexName;
    const std::string text = index.dump(2) + "\n";
    safetensors::detail::write_file_atomically(path.string(), {{text.data(), text.size()}});
    written.push_back(path.string());
  }
  // Files of an earlier save that this one does not use would confuse a loader.
  std::set<std::string> keep;
  for (const auto& p : written) keep.insert(fs::path(p).filename().string());
  for (const auto& entry : fs::directory_iterator(directory)) {
    const auto name = entry.path().filename().string();
    if (entry.is_regular_file() && is_our_weight_file(name) && !keep.count(name)) {
      fs::remove(entry.path());
    }
  }
  return written;
}

LoadReport load_checkpoint_in_model(torch::nn::Module& model, const std::string& path,
                                    const LoadCheckpointOptions& options) {
  if (auto core = detail::full_shard_core_of(model)) {
    // Collective: each process keeps its pieces. Loading is strict for a sharded model.
    detail::load_full_shard_model(*core, model, path, false);
    return {};
  }
  // Which files: one safetensors file, or the shards an index names.
  std::vector<fs::path> files;
  fs::path index_path;
  const fs::path p(path);
  TORCH_CHECK(fs::exists(p), "accelerate: no checkpoint at ", path);
  auto refuse_pickle = [](const fs::path& what) {
    // Without this, the pickle's first bytes read as an absurd safetensors header length.
    TORCH_CHECK(false, "accelerate: ", what.string(),
                ": pickle checkpoints are not supported; convert to safetensors");
  };
  const auto ends_with = [](const std::string& text, const std::string& tail) {
    return text.size() >= tail.size() &&
           text.compare(text.size() - tail.size(), tail.size(), tail) == 0;
  };
  if (fs::is_directory(p)) {
    if (!fs::exists(p / kSafeWeightsIndexName) && !fs::exists(p / kSafeWeightsName)) {
      if (fs::exists(p / kPickleWeightsIndexName)) refuse_pickle(p / kPickleWeightsIndexName);
      if (fs::exists(p / kPickleWeightsName)) refuse_pickle(p / kPickleWeightsName);
    }
    if (fs::exists(p / kSafeWeightsIndexName)) {
      index_path = p / kSafeWeightsIndexName;
    } else {
      TORCH_CHECK(fs::exists(p / kSafeWeightsName), "accelerate: ", path, " holds neither ",
                  kSafeWeightsName, " nor ", kSafeWeightsIndexName);
      files.push_back(p / kSafeWeightsName);
    }
  } else if (ends_with(p.filename().string(), ".bin") ||
             ends_with(p.filename().string(), ".bin.index.json")) {
    refuse_pickle(p);
  } else if (p.extension() == ".json") {
    index_path = p;
  } else {
    files.push_back(p);
  }
  if (!index_path.empty()) {
    std::ifstream in(index_path);
    TORCH_CHECK(in, "accelerate: cannot read ", index_path.string());
    nlohmann::json index;
    try {
      in >> index;
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "accelerate: ", index_path.string(), " is not valid JSON: ", e.what());
    }
    TORCH_CHECK(
        index.is_object() && index.contains("weight_map") && index["weight_map"].is_object(),
        "accelerate: ", index_path.string(), " has no \"weight_map\" object");
    std::set<std::string> shard_names;
    for (const auto& [name, file] : index["weight_map"].items()) {
      TORCH_CHECK(file.is_string(), "accelerate: ", index_path.string(), ": the shard of '", name,
                  "' is not a string");
      const auto f = file.get<std::string>();
      TORCH_CHECK(f.find('/') == std::string::npos && f != ".." && !f.empty(),
                  "accelerate: ", index_path.string(), " names a shard outside its directory: ", f);
      if (shard_names.insert(f).second) files.push_back(index_path.parent_path() / f);
    }
    const auto meta = index.find("metadata");
    if (options.verify && meta != index.end() && meta->is_object() &&
        meta->contains(kShardChecksumsKey)) {
      const auto& sums = (*meta)[kShardChecksumsKey];
      TORCH_CHECK(sums.is_object(), "accelerate: ", index_path.string(), ": \"", kShardChecksumsKey,
                  "\" is not an object");
      for (const auto& file : files) {
        const auto it = sums.find(file.filename().string());
        if (it == sums.end()) continue;
        uint32_t recorded = 0;
        TORCH_CHECK(it->is_string() && detail::parse_crc32c_hex(it->get<std::string>(), &recorded),
                    "accelerate: ", index_path.string(), ": the checksum of ",
                    file.filename().string(), " is not 8 lower-case hex digits");
        TORCH_CHECK(fs::exists(file), "accelerate: ", index_path.string(), " names ", file.string(),
                    ", which is missing");
        const uint32_t actual = detail::crc32c_of_file(file.string());
        TORCH_CHECK(actual == recorded, "accelerate: ", file.string(),
                    " is corrupted: its CRC32C is ", detail::crc32c_hex(actual), ", ",
                    index_path.filename().string(), " recorded ", detail::crc32c_hex(recorded),
                    " (verify=false loads it anyway)");
      }
    }
  }

  std::map<std::string, at::Tensor> targets;
  std::set<std::string> buffers;
  for (const auto& item : model.named_parameters()) targets.emplace(item.key(), item.value());
  for (const auto& item : model.named_buffers()) {
    targets.emplace(item.key(), item.value());
    buffers.insert(item.key());
  }

  DeviceMap device_map;
  for (const auto& [name, device] : options.device_map) {
    device_map.emplace_back(name, normalize_device_name(device));
  }
  const bool has_disk = std::any_of(device_map.begin(), device_map.end(),
                                    [](const auto& e) { return e.second == "disk"; });
  if (!options.offload_folder.empty() && has_disk) fs::create_directories(options.offload_folder);
  OffloadIndex offload_index;
  // offload_state_dict: "cpu" weights wait in a temporary folder until every shard was read.
  std::optional<fs::path> staging;
  OffloadIndex staged;
  struct StagingCleanup {
    std::optional<fs::path>* dir;
    ~StagingCleanup() {
      std::error_code ec;
      if (*dir) fs::remove_all(**dir, ec);
    }
  } cleanup{&staging};
  if (options.offload_state_dict && !device_map.empty()) {
    std::string pattern = (fs::temp_directory_path() / "accelerate-offload-XXXXXX").string();
    TORCH_CHECK(::mkdtemp(pattern.data()) != nullptr,
                "accelerate: cannot create a temporary folder for offload_state_dict in ",
                fs::temp_directory_path().string());
    staging = fs::path(pattern);
  }

  // The dtype a checkpoint tensor is converted to (Accelerate: `dtype` for floating-point
  // weights, float32 for keep_in_fp32_modules when dtype is float16).
  auto wanted_dtype = [&](const std::string& name,
                          const at::Tensor& value) -> std::optional<at::ScalarType> {
    if (!options.dtype || !at::isFloatingType(value.scalar_type())) return std::nullopt;
    if (*options.dtype == at::kHalf) {
      for (const auto& key : options.keep_in_fp32_modules) {
        // Accelerate's rule, substring match included ("head" keeps "lm_head.weight").
        if (name == key || name.find(key + ".") != std::string::npos) {
          return at::kFloat;
        }
      }
    }
    return options.dtype;
  };

  LoadReport report;
  std::set<std::string> loaded;
  torch::NoGradGuard no_grad;
  for (const auto& file : files) {
    const auto shard = safetensors::load_file(file.string());
    const auto sum = shard.metadata.find(kDataChecksumKey);
    if (options.verify && sum != shard.metadata.end()) {
      uint32_t recorded = 0;
      TORCH_CHECK(detail::parse_crc32c_hex(sum->second, &recorded), "accelerate: ", file.string(),
                  ": the header's \"", kDataChecksumKey, "\" is not 8 lower-case hex digits");
      const uint32_t actual =
          detail::crc32c_of_file(file.string(), safetensors::read_header(file.string()).data_start);
      TORCH_CHECK(actual == recorded, "accelerate: ", file.string(),
                  " is corrupted: the CRC32C of its data is ", detail::crc32c_hex(actual),
                  ", its header recorded ", detail::crc32c_hex(recorded),
                  " (verify=false loads it anyway)");
    }
    for (const auto& [name, value] : shard.tensors) {
      auto it = targets.find(name);
      if (it == targets.end()) {
        report.unexpected_keys.push_back(name);
        continue;
      }
      const at::Tensor& target = it->second;
      TORCH_CHECK(target.sizes() == value.sizes(), "accelerate: '", name, "' has shape ",
                  value.sizes(), " in ", file.string(), " but ", target.sizes(), " in the model");
      const std::string device = device_map.empty() ? "" : device_for(device_map, name);
      const auto dtype = wanted_dtype(name, value);
      loaded.insert(name);
      if (device == "disk" && (options.offload_buffers || !buffers.count(name))) {
        // Zero-copy when the file holds the tensor as it is wanted: the parameter becomes a view
        // of the mapped checkpoint. Otherwise the converted tensor is written to the offload
        // folder (Accelerate's layout) and mapped from there.
        const at::ScalarType want = dtype.value_or(value.scalar_type());
        if (detail::is_file_mapped(value) && value.scalar_type() == want) {
          detail::replace_tensor_data(target, value);
          continue;
        }
        TORCH_CHECK(!options.offload_folder.empty(), "accelerate: '", name,
                    "' is mapped to \"disk\" but cannot be served from ", file.string(),
                    detail::is_file_mapped(value) ? " (it is converted to another dtype)"
                                                  : " (its offset is not aligned for its dtype)",
                    "; pass an offload_folder");
        offload_weight(value.to(want), name, options.offload_folder, &offload_index);
        const auto& info = offload_index.back().second;
        detail::replace_tensor_data(
            target,
            load_offloaded_weight((fs::path(options.offload_folder) / (name + ".dat")).string(),
                                  info, /*mapped=*/true));
        continue;
      }
      if (device == "cpu" && staging) {
        offload_weight(value, name, staging->string(), &staged);
        continue;
      }
      if (device.empty() || device == "disk") {
        // No map (or a buffer of a disk module): the tensor's own device, the CPU for meta ones.
        const c10::Device own = target.is_meta() ? c10::Device(c10::kCPU) : target.device();
        detail::set_tensor_to_device(target, name, own, value, dtype);
      } else {
        detail::set_tensor_to_device(target, name, c10::Device(device), value, dtype);
      }
    }
  }
  if (!offload_index.empty()) save_offload_index(offload_index, options.offload_folder);
  if (staging) {
    for (const auto& [name, info] : staged) {
      at::Tensor weight = load_offloaded_weight((*staging / (name + ".dat")).string(), info,
                                                /*mapped=*/false);
      const at::Tensor& target = targets.at(name);
      detail::set_tensor_to_device(target, name, c10::kCPU, weight, wanted_dtype(name, weight));
    }
  }
  // A tied tensor absent from the file is filled through the tensor it is the same object as.
  std::set<const c10::TensorImpl*> filled;
  for (const auto& name : loaded) filled.insert(targets.at(name).unsafeGetTensorImpl());
  for (const auto& [name, t] : targets) {
    if (loaded.count(name)) continue;
    if (filled.count(t.unsafeGetTensorImpl()) && !t.is_meta()) continue;
    report.missing_keys.push_back(name);
  }
  if (options.strict) {
    auto join = [](const std::vector<std::string>& v) {
      std::string out;
      for (const auto& s : v) {
        if (!out.empty()) out += ", ";
        out += s;
      }
      return out;
    };
    TORCH_CHECK(report.missing_keys.empty() && report.unexpected_keys.empty(),
                "accelerate: the checkpoint at ", path, " does not match the model; missing: [",
                join(report.missing_keys), "], unexpected: [", join(report.unexpected_keys), "]");
  }
  return report;
}

}  // namespace accelerate
