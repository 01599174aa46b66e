// save_state / load_state: the checkpoint layout of checkpoint_state.h and the Accelerator's
// checkpointing methods.
#include "accelerate/checkpoint_state.h"

#include "accelerate/accelerator.h"
#include "accelerate/checkpointing.h"
#include "accelerate/compat.h"
#include "accelerate/detail/collectives.h"
#include "accelerate/optimizer_state.h"
#include "accelerate/safetensors.h"
#include "detail/checksum.h"
#include "fsdp_core.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/cuda.h>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <regex>
#include <set>
#include <sstream>

#ifndef ACCELERATE_VERSION_STRING
#define ACCELERATE_VERSION_STRING "unknown"
#endif

namespace accelerate {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

std::string library_version() {
  return ACCELERATE_VERSION_STRING;
}

std::string indexed_file_name(const std::string& base, size_t index, const std::string& extension) {
  return index == 0 ? base + extension : base + "_" + std::to_string(index) + extension;
}

at::Tensor ObjectState::get(const std::string& name) const {
  std::string names;
  for (const auto& [key, tensor] : tensors) {
    if (key == name) return tensor;
    names += (names.empty() ? "" : ", ") + key;
  }
  TORCH_CHECK(false, "accelerate: the saved object state has no tensor \"", name,
              "\" (it has: ", names.empty() ? "none" : names, ")");
}

const std::string& ObjectState::meta(const std::string& key) const {
  auto it = metadata.find(key);
  TORCH_CHECK(it != metadata.end(), "accelerate: the saved object state has no metadata \"", key,
              "\"");
  return it->second;
}

// ---------------------------------------------------------------------- the marker

std::string CheckpointInfo::to_json() const {
  Json j;
  j["format"] = "accelerate-cpp checkpoint";
  j["format_version"] = format_version;
  j["library_version"] = library_version;
  j["torch_version"] = torch_version;
  j["world_size"] = world_size;
  j["step"] = step;
  j["mixed_precision"] = mixed_precision;
  j["num_models"] = num_models;
  j["num_optimizers"] = num_optimizers;
  j["num_schedulers"] = num_schedulers;
  j["num_data_loaders"] = num_data_loaders;
  j["num_custom_objects"] = num_custom_objects;
  j["scaler"] = has_scaler;
  Json list = Json::object();
  for (const auto& [name, size] : files) list[name] = size;
  j["files"] = std::move(list);
  // Beside "files" rather than inside it, so that readers of format version 1 that predate
  // checksums still read the sizes.
  if (!crc32c.empty()) {
    Json sums = Json::object();
    for (const auto& [name, crc] : crc32c) sums[name] = detail::crc32c_hex(crc);
    j["crc32c"] = std::move(sums);
  }
  return j.dump(2) + "\n";
}

CheckpointInfo CheckpointInfo::from_json(const std::string& text, const std::string& source) {
  Json j;
  try {
    j = Json::parse(text);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "accelerate: ", source, " is not valid JSON: ", e.what());
  }
  TORCH_CHECK(j.is_object() && j.value("format", "") == "accelerate-cpp checkpoint",
              "accelerate: ", source, " is not an accelerate-cpp checkpoint marker");
  CheckpointInfo info;
  auto field = [&](const char* key, auto& out) {
    TORCH_CHECK(j.contains(key), "accelerate: ", source, " lacks \"", key, "\"");
    try {
      j.at(key).get_to(out);
    } catch (const std::exception&) {
      TORCH_CHECK(false, "accelerate: ", source, ": \"", key, "\" has the wrong type");
    }
  };
  field("format_version", info.format_version);
  TORCH_CHECK(info.format_version >= 1 && info.format_version <= kCheckpointFormatVersion,
              "accelerate: ", source, " has checkpoint format version ", info.format_version,
              "; this build (", accelerate::library_version(), ") reads versions 1 to ",
              kCheckpointFormatVersion);
  field("library_version", info.library_version);
  field("torch_version", info.torch_version);
  field("world_size", info.world_size);
  TORCH_CHECK(info.world_size >= 1, "accelerate: ", source, ": world_size must be >= 1");
  field("step", info.step);
  field("mixed_precision", info.mixed_precision);
  field("num_models", info.num_models);
  field("num_optimizers", info.num_optimizers);
  field("num_schedulers", info.num_schedulers);
  field("num_data_loaders", info.num_data_loaders);
  field("num_custom_objects", info.num_custom_objects);
  field("scaler", info.has_scaler);
  TORCH_CHECK(j.contains("files") && j["files"].is_object(), "accelerate: ", source,
              " lacks the \"files\" object");
  for (const auto& [name, size] : j["files"].items()) {
    TORCH_CHECK(size.is_number_integer() && size.get<int64_t>() >= 0, "accelerate: ", source,
                ": the size of \"", name, "\" is not a byte count");
    // A path inside the checkpoint (sharded optimizer state has a folder): relative, without
    // "." or ".." parts, so that a doctored marker cannot point outside.
    bool inside = !name.empty() && name.front() != '/' && name.back() != '/';
    for (size_t from = 0; inside && from <= name.size();) {
      const size_t slash = std::min(name.find('/', from), name.size());
      const std::string part = name.substr(from, slash - from);
      inside = !part.empty() && part != "." && part != "..";
      from = slash + 1;
    }
    TORCH_CHECK(inside, "accelerate: ", source, ": \"", name,
                "\" is not a file name inside the checkpoint");
    info.files.emplace_back(name, size.get<int64_t>());
  }
  if (j.contains("crc32c")) {
    TORCH_CHECK(j["crc32c"].is_object(), "accelerate: ", source, ": \"crc32c\" is not an object");
    for (const auto& [name, text] : j["crc32c"].items()) {
      const bool listed = std::any_of(info.files.begin(), info.files.end(),
                                      [&](const auto& f) { return f.first == name; });
      TORCH_CHECK(listed, "accelerate: ", source, " has a checksum of \"", name,
                  "\", which \"files\" does not list");
      uint32_t crc = 0;
      TORCH_CHECK(text.is_string() && detail::parse_crc32c_hex(text.get<std::string>(), &crc),
                  "accelerate: ", source, ": the checksum of \"", name,
                  "\" is not 8 lower-case hex digits");
      info.crc32c.emplace(name, crc);
    }
  }
  return info;
}

namespace {

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, "accelerate: cannot open ", path, ": ", std::strerror(errno));
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

void write_text(const fs::path& path, const std::string& text) {
  safetensors::detail::write_file_atomically(path.string(), {{text.data(), text.size()}});
}

// Without this a rename or a removal may not survive a power loss.
void fsync_directory(const fs::path& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  TORCH_CHECK(fd >= 0, "accelerate: cannot open directory ", dir, ": ", std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  TORCH_CHECK(rc == 0, "accelerate: cannot fsync directory ", dir, ": ", std::strerror(err));
}

// The n of "checkpoint_<n>", or -1.
int64_t checkpoint_number(const std::string& name) {
  static const std::regex pattern(std::string(kCheckpointPrefix) + "([0-9]{1,18})");
  std::smatch m;
  if (!std::regex_match(name, m, pattern)) return -1;
  return std::stoll(m[1].str());
}

}  // namespace

CheckpointInfo read_checkpoint_info(const std::string& directory, bool verify) {
  const fs::path dir(directory);
  TORCH_CHECK(fs::is_directory(dir), "accelerate: load_state: ", dir, " is not a directory");
  const fs::path marker = dir / kCheckpointMarkerName;
  TORCH_CHECK(fs::exists(marker), "accelerate: load_state: ", dir,
              " is not a complete checkpoint (no ", kCheckpointMarkerName,
              "; save_state writes it last, so the save that made this directory did not finish)");
  auto info = CheckpointInfo::from_json(read_text(marker), marker.string());
  for (const auto& [name, size] : info.files) {
    const fs::path file = dir / name;
    std::error_code ec;
    const auto actual = fs::file_size(file, ec);
    TORCH_CHECK(!ec, "accelerate: load_state: the checkpoint ", dir, " lists ", name,
                ", which is missing");
    TORCH_CHECK(static_cast<int64_t>(actual) == size, "accelerate: load_state: ", file, " has ",
                actual, " bytes, the checkpoint recorded ", size, " (the file was changed)");
  }
  if (!verify) return info;
  // Sizes first: they catch truncation without reading anything, checksums the rest.
  for (const auto& [name, recorded] : info.crc32c) {
    const fs::path file = dir / name;
    const uint32_t actual = detail::crc32c_of_file(file.string());
    TORCH_CHECK(actual == recorded, "accelerate: load_state: ", file,
                " is corrupted: its CRC32C is ", detail::crc32c_hex(actual),
                ", the checkpoint recorded ", detail::crc32c_hex(recorded));
  }
  return info;
}

std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& checkpoints_dir) {
  std::vector<std::pair<int64_t, std::string>> out;
  std::error_code ec;
  if (!fs::is_directory(checkpoints_dir, ec)) return out;
  for (const auto& entry : fs::directory_iterator(checkpoints_dir, ec)) {
    const int64_t n = checkpoint_number(entry.path().filename().string());
    if (n < 0 || !entry.is_directory(ec)) continue;
    if (!fs::exists(entry.path() / kCheckpointMarkerName, ec)) continue;
    out.emplace_back(n, entry.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::optional<std::string> latest_checkpoint(const std::string& checkpoints_dir) {
  auto all = list_checkpoints(checkpoints_dir);
  if (all.empty()) return std::nullopt;
  return all.back().second;
}

// ---------------------------------------------------------------------- adapters

namespace {

std::string scheduler_json(const SchedulerState& s) {
  Json j;
  j["last_epoch"] = s.last_epoch;
  j["base_lrs"] = s.base_lrs;
  j["last_lrs"] = s.last_lrs;
  return j.dump(2) + "\n";
}

SchedulerState scheduler_from_json(const std::string& text, const std::string& source) {
  SchedulerState s;
  try {
    auto j = Json::parse(text);
    j.at("last_epoch").get_to(s.last_epoch);
    j.at("base_lrs").get_to(s.base_lrs);
    j.at("last_lrs").get_to(s.last_lrs);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "accelerate: ", source, " is not a scheduler state: ", e.what());
  }
  return s;
}

std::string scaler_json(const GradScalerState& s) {
  Json j;
  j["scale"] = s.scale;
  j["growth_tracker"] = s.growth_tracker;
  j["growth_factor"] = s.growth_factor;
  j["backoff_factor"] = s.backoff_factor;
  j["growth_interval"] = s.growth_interval;
  j["enabled"] = s.enabled;
  return j.dump(2) + "\n";
}

GradScalerState scaler_from_json(const std::string& text, const std::string& source) {
  GradScalerState s;
  try {
    auto j = Json::parse(text);
    j.at("scale").get_to(s.scale);
    j.at("growth_tracker").get_to(s.growth_tracker);
    j.at("growth_factor").get_to(s.growth_factor);
    j.at("backoff_factor").get_to(s.backoff_factor);
    j.at("growth_interval").get_to(s.growth_interval);
    j.at("enabled").get_to(s.enabled);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "accelerate: ", source, " is not a loss scaler state: ", e.what());
  }
  return s;
}

// Copies `tensors` into the module's parameters and buffers by name; every name must match both
// ways and every shape agree, checked before anything is copied.
void copy_into_module(torch::nn::Module& module, const NamedTensors& tensors,
                      const std::string& source) {
  std::map<std::string, at::Tensor> by_name(tensors.begin(), tensors.end());
  auto targets = model_state(module);
  std::set<std::string> used;
  for (const auto& [name, target] : targets) {
    auto it = by_name.find(name);
    TORCH_CHECK(it != by_name.end(), "accelerate: ", source, " has no tensor \"", name, "\"");
    TORCH_CHECK(it->second.sizes() == target.sizes(), "accelerate: ", source, ": \"", name,
                "\" has shape ", it->second.sizes(), ", the module's has ", target.sizes());
    used.insert(name);
  }
  for (const auto& [name, tensor] : by_name) {
    TORCH_CHECK(used.count(name), "accelerate: ", source, " has \"", name,
                "\", which the module does not");
  }
  torch::NoGradGuard no_grad;
  for (auto& [name, target] : targets) target.copy_(by_name.at(name));
}

class ModuleObject : public Checkpointable {
 public:
  explicit ModuleObject(std::shared_ptr<torch::nn::Module> module) : module_(std::move(module)) {}
  ObjectState state_dict() const override { return {model_state(*module_), {{"kind", "module"}}}; }
  void load_state_dict(const ObjectState& state) override {
    copy_into_module(*module_, state.tensors, "the registered module's checkpoint");
  }

 private:
  std::shared_ptr<torch::nn::Module> module_;
};

class SchedulerObject : public Checkpointable {
 public:
  explicit SchedulerObject(std::shared_ptr<LRScheduler> scheduler)
      : scheduler_(std::move(scheduler)) {}
  ObjectState state_dict() const override {
    return {{}, {{"kind", "scheduler"}, {"state", scheduler_json(scheduler_->state_dict())}}};
  }
  void load_state_dict(const ObjectState& state) override {
    scheduler_->load_state_dict(
        scheduler_from_json(state.meta("state"), "the registered scheduler's checkpoint"));
  }

 private:
  std::shared_ptr<LRScheduler> scheduler_;
};

// Runs `body` on every process and makes them agree on the outcome: if it threw anywhere, it
// throws everywhere, naming the processes and their errors. Without this a process that fails
// alone would leave the others waiting in the next collective forever.
void on_all_processes(const PartialState& state, const char* op,
                      const std::function<void()>& body) {
  std::string error;
  try {
    body();
  } catch (const c10::Error& e) {
    error = e.what_without_backtrace();
  } catch (const std::exception& e) {
    error = e.what();
  }
  if (!state.use_distributed()) {
    TORCH_CHECK(error.empty(), error);
    return;
  }
  auto all = detail::all_gather_bytes(state, op, error);
  std::string message;
  for (size_t rank = 0; rank < all.size(); ++rank) {
    if (all[rank].empty()) continue;
    message += (message.empty() ? "" : "\n") + std::string("process ") + std::to_string(rank) +
               ": " + all[rank];
  }
  TORCH_CHECK(message.empty(), "accelerate: ", op, " failed\n", message);
}

// The generator states of this process.
NamedTensors generator_states() {
  NamedTensors out;
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    out.emplace_back("torch_manual_seed", gen.get_state());
  }
  if (torch::cuda::is_available()) {
    for (size_t i = 0; i < torch::cuda::device_count(); ++i) {
      auto gen = at::detail::getCUDAHooks().getDefaultCUDAGenerator(static_cast<int>(i));
      std::lock_guard<std::mutex> lock(gen.mutex());
      out.emplace_back("torch_cuda_manual_seed." + std::to_string(i), gen.get_state());
    }
  }
  return out;
}

void set_generator_state(at::Generator gen, const at::Tensor& state) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state.contiguous());
}

// Gives loader `index` its saved position. The loader's own error cannot say which of the
// prepared loaders it is, nor which file of which checkpoint the position came from: `file`
// is the random_states file it was read from.
void restore_loader_position(const detail::LoaderSlot& loader, size_t index,
                             const data::LoaderPosition& position, const char* op,
                             const fs::path& file) {
  try {
    loader.set_position(position);
  } catch (const c10::Error& e) {
    std::string reason = e.what_without_backtrace();
    if (reason.rfind("accelerate: ", 0) == 0) reason.erase(0, std::string("accelerate: ").size());
    TORCH_CHECK(false, "accelerate: ", op, ": ", file, ": data loader ", index, ": ", reason);
  }
}

// Every loader's position, or none: a position one loader refuses (outside its dataset) leaves
// the others where they were.
//
// A LoaderSlot can only set a position, checking it first (data_loader_impl.h), so the check
// cannot run apart from the change: the loaders are set in order and, when one refuses, those
// already set are put back at the positions they reported before (position() reads the same
// again). Put back without their sampler generator states, which the next iteration would
// otherwise impose over the states it synchronises from process 0; set_position does not touch
// the generators. What this cannot restore: a loader put back holds a pending position (one
// set earlier and not used yet is replaced by what position() reported), so a set_epoch()
// before its next iteration is overridden, and one put back in the middle of an iteration
// would start its next iteration at that batch again. A check-only entry point on LoaderSlot
// (beside set_position) would remove all three.
void restore_loader_positions(const std::vector<detail::LoaderSlot>& loaders,
                              const std::vector<data::LoaderPosition>& positions, const char* op,
                              const fs::path& file) {
  TORCH_INTERNAL_ASSERT(loaders.size() == positions.size());
  std::vector<data::LoaderPosition> before;
  before.reserve(loaders.size());
  for (const auto& loader : loaders) before.push_back(loader.position());
  for (size_t i = 0; i < loaders.size(); ++i) {
    try {
      restore_loader_position(loaders[i], i, positions[i], op, file);
    } catch (...) {
      for (size_t j = 0; j < i; ++j) {
        try {
          loaders[j].set_position({.epoch = before[j].epoch,
                                   .batches_yielded = before[j].batches_yielded,
                                   .sampler_state = {}});
        } catch (const c10::Error&) {
          // A position the loader itself reported: refusing it would be a loader bug, and the
          // refusal of positions[i] is the error to report.
        }
      }
      throw;
    }
  }
}

// Puts back the generator states of a random_states file.
void restore_generators(const safetensors::SafetensorsFile& mine) {
  set_generator_state(at::detail::getDefaultCPUGenerator(), mine.get("torch_manual_seed"));
  if (!torch::cuda::is_available()) return;
  for (size_t i = 0; i < torch::cuda::device_count(); ++i) {
    const std::string key = "torch_cuda_manual_seed." + std::to_string(i);
    if (mine.contains(key)) {
      set_generator_state(at::detail::getCUDAHooks().getDefaultCUDAGenerator(static_cast<int>(i)),
                          mine.get(key));
    }
  }
}

std::vector<uint8_t> bytes_of(const at::Tensor& t) {
  auto c = t.contiguous();
  const auto* p = c.data_ptr<uint8_t>();
  return std::vector<uint8_t>(p, p + c.numel());
}

at::Tensor tensor_of(const std::vector<uint8_t>& bytes) {
  auto t = at::empty({static_cast<int64_t>(bytes.size())}, at::kByte);
  if (!bytes.empty()) std::memcpy(t.data_ptr<uint8_t>(), bytes.data(), bytes.size());
  return t;
}

int64_t parse_int(const std::string& text, const std::string& what) {
  try {
    size_t used = 0;
    int64_t v = std::stoll(text, &used);
    if (used == text.size()) return v;
  } catch (const std::exception&) {
  }
  TORCH_CHECK(false, "accelerate: load_state: ", what, " is \"", text, "\", not an integer");
}

fs::path rank_state_file(const fs::path& dir, int64_t rank) {
  return dir / (std::string(kRngStateName) + "_" + std::to_string(rank) + ".safetensors");
}

fs::path custom_object_file(const fs::path& dir, size_t index) {
  return dir / (std::string(kCustomCheckpointName) + "_" + std::to_string(index) + ".safetensors");
}

// SHARDED_STATE_DICT optimizer state: a directory per optimizer, named as Accelerate's FSDP
// names it.
// Accelerate's name for FSDP's SHARDED_STATE_DICT of model `index`.
fs::path sharded_model_dir(const fs::path& dir, size_t index) {
  return dir / ("pytorch_model_fsdp_" + std::to_string(index));
}

fs::path sharded_optimizer_dir(const fs::path& dir, size_t index) {
  return dir / (std::string(kOptimizerName) + "_" + std::to_string(index));
}

// One process's share of a checkpoint, read and checked before anything is changed.
struct RankState {
  fs::path path;
  safetensors::SafetensorsFile file;  // generator states and sampler states
  std::vector<data::LoaderPosition> positions;
  int64_t step = 0;
};

RankState read_rank_state(const fs::path& dir, int64_t rank, const char* op) {
  const fs::path path = rank_state_file(dir, rank);
  TORCH_CHECK(fs::exists(path), "accelerate: ", op, ": ", path, " is missing");
  RankState out;
  out.path = path;
  out.file = safetensors::load_file(path.string());
  const auto& meta = out.file.metadata;
  auto meta_int = [&](const std::string& key) {
    auto it = meta.find(key);
    TORCH_CHECK(it != meta.end(), "accelerate: ", op, ": ", path, " lacks \"", key, "\"");
    return parse_int(it->second, path.string() + " \"" + key + "\"");
  };
  TORCH_CHECK(meta_int("process_index") == rank, "accelerate: ", op, ": ", path,
              " belongs to another process");
  const int64_t loaders = meta_int("num_data_loaders");
  for (int64_t i = 0; i < loaders; ++i) {
    const std::string key = "dataloader_" + std::to_string(i);
    data::LoaderPosition pos;
    pos.epoch = meta_int(key + ".epoch");
    pos.batches_yielded = meta_int(key + ".batches_yielded");
    pos.sampler_state = bytes_of(out.file.get(key + ".sampler_state"));
    out.positions.push_back(std::move(pos));
  }
  out.step = meta_int("step");
  return out;
}

// Publishes `partial` as `target`: atomically when `target` does not exist, or by swapping the
// two directories (renameat2 RENAME_EXCHANGE) when it does, so that a crash at any moment leaves
// a complete checkpoint at `target`.
void publish(const fs::path& partial, const fs::path& target) {
  std::error_code ec;
  if (!fs::exists(target, ec)) {
    TORCH_CHECK(::rename(partial.c_str(), target.c_str()) == 0, "accelerate: save_state: cannot ",
                "rename ", partial, " to ", target, ": ", std::strerror(errno));
    return;
  }
  if (::renameat2(AT_FDCWD, partial.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) == 0) {
    fsync_directory(target.parent_path());
    fs::remove_all(partial);  // now the old checkpoint
    return;
  }
  // Filesystems without RENAME_EXCHANGE: a short window in which `target` is missing, but
  // nothing is ever half-written and the old checkpoint stays whole under `.old` until then.
  const fs::path old = partial.string() + ".old";
  fs::remove_all(old);
  TORCH_CHECK(::rename(target.c_str(), old.c_str()) == 0, "accelerate: save_state: cannot move ",
              target, " aside: ", std::strerror(errno));
  TORCH_CHECK(::rename(partial.c_str(), target.c_str()) == 0, "accelerate: save_state: cannot ",
              "rename ", partial, " to ", target, ": ", std::strerror(errno));
  fsync_directory(target.parent_path());
  fs::remove_all(old);
}

fs::path normalized(const std::string& dir) {
  fs::path p = fs::absolute(fs::path(dir)).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();
  return p;
}

// The objects whose state has a file of its own in a checkpoint.
enum class SavedObject { kModel, kOptimizer, kScheduler, kCustomObject };

// Loads object `index` of `kind` from checkpoint `dir` into what the Accelerator has prepared.
void load_object(detail::AcceleratorCore& core, SavedObject kind, size_t index,
                 const fs::path& dir) {
  switch (kind) {
    case SavedObject::kModel: {
      auto& model = *core.models[index];
      const fs::path sharded = sharded_model_dir(dir, index);
      const fs::path file = dir / indexed_file_name(kModelName, index, ".safetensors");
      if (auto full = detail::full_shard_core_of(model)) {
        detail::load_full_shard_model(*full, model, (fs::exists(sharded) ? sharded : file).string(),
                                      core.config.sharding.cpu_ram_efficient_loading);
      } else if (fs::exists(sharded / detail::kFsdpIndexFile)) {
        // Saved fully sharded, loaded without: the pieces are put together.
        copy_into_module(model, detail::read_sharded_model_state(sharded.string()),
                         sharded.string());
      } else {
        load_checkpoint_in_model(model, file.string(), {.strict = true});
      }
      break;
    }
    case SavedObject::kOptimizer: {
      auto& slot = *core.optimizers[index];
      const fs::path sharded = sharded_optimizer_dir(dir, index);
      const fs::path file = dir / indexed_file_name(kOptimizerName, index, ".safetensors");
      const bool zero_on = core.config.sharding.sharded() && core.state->use_distributed();
      if (fs::exists(sharded / kZeroIndexFile)) {
        if (!zero_on) {
          // One process, or no sharding now: the shards are put together.
          load_optimizer_state_dict(*slot.optimizer,
                                    read_sharded_optimizer_state(sharded.string()));
        } else if (slot.zero) {
          slot.zero->load_sharded(sharded.string());
        } else {
          slot.pending_sharded_load = sharded.string();  // once its model is prepared
        }
      } else if (slot.zero) {
        const auto full = safetensors::load_file(file.string());
        slot.zero->load_full_state_dict({full.tensors, full.metadata});
      } else {
        load_optimizer_state(*slot.optimizer, file.string());
      }
      break;
    }
    case SavedObject::kScheduler: {
      const auto file = dir / indexed_file_name(kSchedulerName, index, ".json");
      core.schedulers[index]->load_state_dict(scheduler_from_json(read_text(file), file.string()));
      break;
    }
    case SavedObject::kCustomObject: {
      auto file = safetensors::load_file(custom_object_file(dir, index).string());
      ObjectState object;
      for (auto& [name, tensor] : file.tensors) object.tensors.emplace_back(name, tensor.clone());
      object.metadata = std::move(file.metadata);
      core.custom_objects[index]->load_state_dict(object);
      break;
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------- Accelerator

bool Accelerator::is_saving_process() const {
  return core_->config.project_config.save_on_each_node ? is_local_main_process()
                                                        : is_main_process();
}

void Accelerator::write_atomically(const std::string& path,
                                   const std::function<void(const std::string&)>& write) {
  const fs::path target(path);
  if (target.has_parent_path()) fs::create_directories(target.parent_path());
  const std::string temp = path + ".tmp." + std::to_string(::getpid());
  try {
    write(temp);
    int fd = ::open(temp.c_str(), O_RDONLY | O_CLOEXEC);
    TORCH_CHECK(fd >= 0, "accelerate: cannot open ", temp, ": ", std::strerror(errno));
    const int rc = ::fsync(fd);
    ::close(fd);
    TORCH_CHECK(rc == 0, "accelerate: cannot fsync ", temp);
    TORCH_CHECK(::rename(temp.c_str(), path.c_str()) == 0, "accelerate: cannot rename ", temp,
                " to ", path, ": ", std::strerror(errno));
  } catch (...) {
    std::error_code ec;
    fs::remove(temp, ec);
    throw;
  }
  fsync_directory(fs::absolute(target).parent_path());
}

bool Accelerator::save(const NamedTensors& tensors, const std::string& path,
                       const std::map<std::string, std::string>& metadata) const {
  if (!is_saving_process()) return false;
  const fs::path target(path);
  if (target.has_parent_path()) fs::create_directories(target.parent_path());
  safetensors::save_file(tensors, path, metadata);
  return true;
}

std::vector<std::string> Accelerator::save_model(const torch::nn::Module& model,
                                                 const std::string& directory,
                                                 const SaveModelOptions& options) const {
  if (auto full = detail::full_shard_core_of(model)) {
    // Every process takes part in gathering the units; the saving process writes.
    auto written =
        detail::save_full_shard_model(*full, model, directory, options, is_saving_process());
    return is_saving_process() ? written : std::vector<std::string>{};
  }
  if (!is_saving_process()) return {};
  return accelerate::save_model(model, directory, options);
}

void Accelerator::register_for_checkpointing(std::shared_ptr<Checkpointable> object) {
  TORCH_CHECK(object, "accelerate: register_for_checkpointing was given a null object");
  core_->custom_objects.push_back(std::move(object));
  resume_next(ResumeKind::kCustomObject);
}

void Accelerator::register_for_checkpointing(std::shared_ptr<torch::nn::Module> module) {
  TORCH_CHECK(module, "accelerate: register_for_checkpointing was given a null module");
  core_->custom_objects.push_back(std::make_shared<ModuleObject>(std::move(module)));
  resume_next(ResumeKind::kCustomObject);
}

void Accelerator::register_for_checkpointing(std::shared_ptr<LRScheduler> scheduler) {
  TORCH_CHECK(scheduler, "accelerate: register_for_checkpointing was given a null scheduler");
  core_->custom_objects.push_back(std::make_shared<SchedulerObject>(std::move(scheduler)));
  resume_next(ResumeKind::kCustomObject);
}

RemovableHandle Accelerator::register_save_state_pre_hook(SaveStatePreHook hook) {
  TORCH_CHECK(hook, "accelerate: register_save_state_pre_hook was given an empty function");
  auto hooks = core_->hooks;
  const int id = hooks->next_id++;
  hooks->save[id] = std::move(hook);
  std::weak_ptr<detail::CheckpointHooks> weak = hooks;
  return RemovableHandle([weak, id] {
    if (auto h = weak.lock()) h->save.erase(id);
  });
}

RemovableHandle Accelerator::register_load_state_pre_hook(LoadStatePreHook hook) {
  TORCH_CHECK(hook, "accelerate: register_load_state_pre_hook was given an empty function");
  auto hooks = core_->hooks;
  const int id = hooks->next_id++;
  hooks->load[id] = std::move(hook);
  std::weak_ptr<detail::CheckpointHooks> weak = hooks;
  return RemovableHandle([weak, id] {
    if (auto h = weak.lock()) h->load.erase(id);
  });
}

std::string Accelerator::save_state(const std::string& output_dir) {
  if (core_->resume) end_auto_resume();
  auto& core = *core_;
  auto& project = core.config.project_config;
  const auto& state = *core.state;
  fs::path target;
  if (project.automatic_checkpoint_naming) {
    TORCH_CHECK(output_dir.empty(), "accelerate: save_state: with automatic_checkpoint_naming the ",
                "directory is <project_dir>/checkpoints/checkpoint_<n>; call save_state() "
                "without one (got \"",
                output_dir, "\")");
    TORCH_CHECK(!project.project_dir.empty(), "accelerate: save_state: ",
                "automatic_checkpoint_naming needs project_config.project_dir");
    target = normalized((fs::path(project.project_dir) / kCheckpointsFolder /
                         (kCheckpointPrefix + std::to_string(project.iteration)))
                            .string());
  } else {
    TORCH_CHECK(!output_dir.empty(),
                "accelerate: save_state needs a directory, or "
                "project_config.automatic_checkpoint_naming with a project_dir");
    target = normalized(output_dir);
  }
  const fs::path partial = target.parent_path() / ("." + target.filename().string() + ".partial");
  const bool publisher = is_saving_process();
  const int rank = process_index();

  // 1. A fresh temporary directory (a crashed save may have left one).
  on_all_processes(state, "save_state", [&] {
    if (!publisher) return;
    std::error_code ec;
    if (fs::exists(target, ec)) {
      TORCH_CHECK(!project.automatic_checkpoint_naming, "accelerate: save_state: ", target,
                  " already exists; set_save_iteration() to the number to continue from");
      TORCH_CHECK(fs::is_directory(target), "accelerate: save_state: ", target,
                  " exists and is not a directory");
      TORCH_CHECK(fs::exists(target / kCheckpointMarkerName) || fs::is_empty(target),
                  "accelerate: save_state: ", target,
                  " exists and is not a checkpoint; refusing to replace its files");
    }
    fs::create_directories(target.parent_path());
    fs::remove_all(partial);
    if (project.automatic_checkpoint_naming) {
      // What crashed saves and removals left behind; the folder belongs to this run.
      static const std::regex leftover("\\.checkpoint_[0-9]+\\.(partial|removing)");
      for (const auto& entry : fs::directory_iterator(target.parent_path())) {
        if (std::regex_match(entry.path().filename().string(), leftover)) {
          fs::remove_all(entry.path());
        }
      }
    }
    fs::create_directory(partial);
  });

  // Checksums of the files this process writes, taken as they are written; restored however
  // save_state ends. Not taken at all without checksums.
  const char* checksums_env = std::getenv(kCheckpointChecksumsEnv);
  const bool checksums = checksums_env == nullptr || std::string(checksums_env) != "0";
  std::map<std::string, uint32_t> written_sums;
  struct SinkGuard {
    std::map<std::string, uint32_t>* previous;
    ~SinkGuard() { detail::checksum_sink() = previous; }
  } sink_guard{detail::checksum_sink()};
  detail::checksum_sink() = checksums ? &written_sums : nullptr;

  // 2. The files. Hooks run everywhere, as in Accelerate; shared objects are written by the
  // publishing process, per-process state by each.
  CheckpointInfo info;
  // ZeRO with FULL_STATE_DICT: every process takes part in gathering the whole optimizer state.
  const bool sharded_files =
      core.config.sharding.state_dict_type == StateDictType::SHARDED_STATE_DICT;
  std::vector<std::optional<OptimizerStateDict>> gathered(core.optimizers.size());
  on_all_processes(state, "save_state", [&] {
    for (size_t i = 0; i < core.optimizers.size(); ++i) {
      auto* zero = core.zero(*core.optimizers[i]);
      if (zero && !sharded_files) gathered[i] = zero->full_state_dict();
    }
  });
  on_all_processes(state, "save_state", [&] {
    for (size_t i = 0; i < core.optimizers.size(); ++i) {
      auto& slot = *core.optimizers[i];
      if (slot.zero && sharded_files) {
        slot.zero->save_sharded(sharded_optimizer_dir(partial, i).string());
      }
    }
  });
  // Fully sharded models: the weights the hooks see are meta tensors (shapes and dtypes); the
  // values are streamed from the shards one unit at a time, every process taking part.
  std::vector<std::shared_ptr<torch::nn::Module>> models = core.models;
  std::vector<NamedTensors> weights;
  std::map<const torch::nn::Module*, detail::FullStateSpecs> full_specs;
  on_all_processes(state, "save_state", [&] {
    for (const auto& m : models) {
      if (auto full = detail::full_shard_core_of(*m)) {
        auto specs = detail::full_state_specs(*full, *m);
        weights.push_back(specs.specs);
        full_specs.emplace(m.get(), std::move(specs));
      } else {
        weights.push_back(model_state(*m));
      }
    }
    for (auto& [id, hook] : core.hooks->save) hook(models, weights, partial.string());
  });
  on_all_processes(state, "save_state", [&] {
    for (size_t i = 0; i < models.size(); ++i) {
      auto it = full_specs.find(models[i].get());
      if (it == full_specs.end()) continue;
      auto full = detail::full_shard_core_of(*models[i]);
      if (sharded_files) {
        detail::save_sharded_model(*full, *models[i], sharded_model_dir(partial, i).string());
        continue;
      }
      // What a hook left of the entries (it may have dropped some).
      std::vector<std::pair<std::string, at::Tensor>> kept;
      std::vector<size_t> source;
      for (const auto& [name, t] : weights[i]) {
        for (size_t k = 0; k < it->second.specs.size(); ++k) {
          if (it->second.specs[k].first == name) {
            kept.emplace_back(name, t);
            source.push_back(k);
          }
        }
      }
      detail::FullStateReader reader(*full, it->second);
      safetensors::detail::save_file_streaming(
          kept, (partial / indexed_file_name(kModelName, i, ".safetensors")).string(),
          {{"format", "pt"}}, [&](size_t k) { return reader(source[k]); }, publisher);
    }
  });
  on_all_processes(state, "save_state", [&] {
    info.num_models = static_cast<int64_t>(weights.size());
    info.num_optimizers = static_cast<int64_t>(core.optimizers.size());
    info.num_schedulers = static_cast<int64_t>(core.schedulers.size());
    info.num_data_loaders = static_cast<int64_t>(core.loaders.size());
    info.num_custom_objects = static_cast<int64_t>(core.custom_objects.size());
    info.has_scaler = core.scaler != nullptr;
    if (publisher) {
      for (size_t i = 0; i < weights.size(); ++i) {
        if (i < models.size() && full_specs.count(models[i].get())) continue;
        safetensors::save_file(
            weights[i], (partial / indexed_file_name(kModelName, i, ".safetensors")).string(),
            {{"format", "pt"}});
      }
      for (size_t i = 0; i < core.optimizers.size(); ++i) {
        const auto file = (partial / indexed_file_name(kOptimizerName, i, ".safetensors")).string();
        if (gathered[i]) {
          safetensors::save_file(gathered[i]->tensors, file, gathered[i]->metadata);
        } else if (!core.optimizers[i]->zero) {
          save_optimizer_state(*core.optimizers[i]->optimizer, file);
        }
      }
      for (size_t i = 0; i < core.schedulers.size(); ++i) {
        write_text(partial / indexed_file_name(kSchedulerName, i, ".json"),
                   scheduler_json(core.schedulers[i]->state_dict()));
      }
      if (core.scaler) write_text(partial / kScalerName, scaler_json(core.scaler->state_dict()));
      for (size_t i = 0; i < core.custom_objects.size(); ++i) {
        auto object = core.custom_objects[i]->state_dict();
        safetensors::save_file(object.tensors, custom_object_file(partial, i).string(),
                               object.metadata);
      }
    }
    NamedTensors mine = generator_states();
    std::map<std::string, std::string> meta = {
        {"step", std::to_string(core.step)},
        {"process_index", std::to_string(rank)},
        {"num_data_loaders", std::to_string(core.loaders.size())}};
    for (size_t i = 0; i < core.loaders.size(); ++i) {
      const auto pos = core.loaders[i].position();
      const std::string key = "dataloader_" + std::to_string(i);
      meta[key + ".epoch"] = std::to_string(pos.epoch);
      meta[key + ".batches_yielded"] = std::to_string(pos.batches_yielded);
      mine.emplace_back(key + ".sampler_state", tensor_of(pos.sampler_state));
    }
    safetensors::save_file(mine, rank_state_file(partial, rank).string(), meta);
  });

  // 3. The marker, last, then publication; old checkpoints go only once the new one is in place.
  on_all_processes(state, "save_state", [&] {
    if (!publisher) return;
    info.library_version = library_version();
    info.torch_version = compat::torch_version();
    info.world_size = num_processes();
    info.step = core.step;
    info.mixed_precision = mixed_precision();
    std::map<std::string, uint32_t> by_path;
    for (const auto& [path, crc] : written_sums) {
      by_path[fs::path(path).lexically_normal().string()] = crc;
    }
    std::vector<std::pair<std::string, int64_t>> files;
    // Recursive: sharded optimizer state lives in a folder of its own.
    for (const auto& entry : fs::recursive_directory_iterator(partial)) {
      if (!entry.is_regular_file()) continue;
      const auto name = fs::relative(entry.path(), partial).generic_string();
      files.emplace_back(name, static_cast<int64_t>(entry.file_size()));
      // Files this process wrote were hashed as they were written; others' (their
      // random_states, optimizer shards, what hooks wrote) are read back.
      if (!checksums) continue;
      const auto sum = by_path.find(entry.path().lexically_normal().string());
      info.crc32c.emplace(
          name, sum != by_path.end() ? sum->second : detail::crc32c_of_file(entry.path().string()));
    }
    std::sort(files.begin(), files.end());
    info.files = std::move(files);
    write_text(partial / kCheckpointMarkerName, info.to_json());
    fsync_directory(partial);
    publish(partial, target);
    fsync_directory(target.parent_path());
    if (project.automatic_checkpoint_naming && project.total_limit) {
      auto all = list_checkpoints(target.parent_path().string());
      int64_t excess = static_cast<int64_t>(all.size()) - *project.total_limit;
      for (const auto& [n, path] : all) {
        if (excess <= 0) break;
        if (fs::path(path) == target) continue;
        // Unpublish first (a rename is atomic) so that a crash mid-removal never leaves a
        // half-deleted directory that still looks like a checkpoint.
        const fs::path doomed =
            target.parent_path() / ("." + fs::path(path).filename().string() + ".removing");
        fs::remove_all(doomed);
        fs::rename(path, doomed);
        fs::remove_all(doomed);
        --excess;
      }
      fsync_directory(target.parent_path());
    }
  });
  if (project.automatic_checkpoint_naming) ++project.iteration;
  return target.string();
}

std::string Accelerator::load_state(const std::string& input_dir) {
  core_->resume.reset();  // an explicit load replaces whatever a restart restored
  auto& core = *core_;
  auto& project = core.config.project_config;
  const auto& state = *core.state;
  fs::path dir;
  std::optional<int64_t> picked;
  if (!input_dir.empty()) {
    dir = normalized(input_dir);
  } else {
    TORCH_CHECK(project.automatic_checkpoint_naming,
                "accelerate: load_state needs a directory, or "
                "project_config.automatic_checkpoint_naming to pick the latest checkpoint");
    const fs::path root = normalized((fs::path(project.project_dir) / kCheckpointsFolder).string());
    // Process 0 picks, so that every process loads the same checkpoint even if one is being
    // written meanwhile.
    std::string name;
    on_all_processes(state, "load_state", [&] {
      if (process_index() != 0) return;
      auto latest = latest_checkpoint(root.string());
      TORCH_CHECK(latest, "accelerate: load_state: no complete checkpoint under ", root);
      name = fs::path(*latest).filename().string();
    });
    if (state.use_distributed()) name = detail::broadcast_bytes(state, "load_state", name, 0);
    dir = root / name;
    picked = std::stoll(name.substr(std::string(kCheckpointPrefix).size()));
  }
  on_all_processes(state, "load_state", [&] {
    // Everything that can be checked before changing anything.
    const auto info = read_checkpoint_info(dir.string());
    for (auto& slot : core.optimizers) (void)core.zero(*slot);
    auto check_count = [&](const char* what, int64_t saved, size_t have) {
      TORCH_CHECK(saved == static_cast<int64_t>(have), "accelerate: load_state: ", dir, " holds ",
                  saved, " ", what, ", this Accelerator has ", have,
                  " prepared; prepare the same objects as the run that saved it");
    };
    check_count("optimizer(s)", info.num_optimizers, core.optimizers.size());
    check_count("scheduler(s)", info.num_schedulers, core.schedulers.size());
    check_count("data loader(s)", info.num_data_loaders, core.loaders.size());
    check_count("registered object(s)", info.num_custom_objects, core.custom_objects.size());
    TORCH_CHECK(!core.scaler || info.has_scaler, "accelerate: load_state: ", dir,
                " has no loss scaler state (saved with mixed_precision=", info.mixed_precision,
                "), this run uses fp16");
    // Another number of processes: a process the saving run did not have starts from process
    // 0's generator states; data positions are converted to the same sample.
    const int64_t saved_world = info.world_size;
    auto mine =
        read_rank_state(dir, process_index() < saved_world ? process_index() : 0, "load_state");
    if (saved_world != num_processes()) {
      for (auto& pos : mine.positions) {
        if (core.config.split_batches) continue;  // batches are global: the same position
        const int64_t consumed = pos.batches_yielded * saved_world;
        TORCH_CHECK(consumed % num_processes() == 0, "accelerate: load_state: ", dir,
                    " was saved by ", saved_world, " processes after ", pos.batches_yielded,
                    " batches each (", consumed, " in all), which ", num_processes(),
                    " processes cannot continue from exactly; resume at a step where the batches "
                    "seen divide among them, or use split_batches");
        pos.batches_yielded = consumed / num_processes();
      }
    }
    check_count("data loader position(s)", static_cast<int64_t>(mine.positions.size()),
                core.loaders.size());
    // Before anything else is loaded, so that a position a loader refuses leaves the models,
    // the optimizers and the other loaders as they were.
    restore_loader_positions(core.loaders, mine.positions, "load_state", mine.path);

    // Now load.
    std::vector<std::shared_ptr<torch::nn::Module>> models = core.models;
    for (auto& [id, hook] : core.hooks->load) hook(models, dir.string());
    check_count("model(s)", info.num_models, models.size());
    for (size_t i = 0; i < models.size(); ++i) load_object(core, SavedObject::kModel, i, dir);
    for (size_t i = 0; i < core.optimizers.size(); ++i) {
      load_object(core, SavedObject::kOptimizer, i, dir);
    }
    for (size_t i = 0; i < core.schedulers.size(); ++i) {
      load_object(core, SavedObject::kScheduler, i, dir);
    }
    if (core.scaler) {
      const auto file = dir / kScalerName;
      core.scaler->load_state_dict(scaler_from_json(read_text(file), file.string()));
    }
    for (size_t i = 0; i < core.custom_objects.size(); ++i) {
      load_object(core, SavedObject::kCustomObject, i, dir);
    }
    restore_generators(mine.file);
    core.step = mine.step;
  });
  if (picked) project.iteration = *picked + 1;
  return dir.string();
}

// ---------------------------------------------------------------------- restarts

namespace detail {

struct AutoResume {
  fs::path dir;
  CheckpointInfo info;
  RankState mine;
  std::map<int, int64_t> restored;  // ResumeKind -> objects restored so far
};

}  // namespace detail

void Accelerator::begin_auto_resume() {
  auto& core = *core_;
  const auto& state = *core.state;
  const fs::path root =
      normalized((fs::path(core.config.project_config.project_dir) / kCheckpointsFolder).string());
  // "<next iteration> <checkpoint name>\n<warnings>", picked by process 0 so that every process
  // resumes from the same one even if another is being written meanwhile.
  std::string picked;
  on_all_processes(state, "restart", [&] {
    if (process_index() != 0) return;
    auto all = list_checkpoints(root.string());
    if (all.empty()) return;
    // Numbering goes on after the newest checkpoint even when it is skipped below, so that
    // saves never collide with (or silently replace) a corrupted one left for inspection.
    picked = std::to_string(all.back().first + 1) + " ";
    // A corrupted checkpoint must not end the run while an older one can continue it: every
    // restart would fail the same way.
    std::ostringstream warnings;
    for (auto it = all.rbegin(); it != all.rend(); ++it) {
      try {
        (void)read_checkpoint_info(it->second);
        picked += fs::path(it->second).filename().string();
        break;
      } catch (const c10::Error& e) {
        warnings << "accelerate: warning: restart " << core.config.restart_count << ": "
                 << e.what_without_backtrace()
                 << (std::next(it) == all.rend()
                         ? "; no earlier complete checkpoint"
                         : "; falling back to the previous complete checkpoint")
                 << "\n";
      }
    }
    picked += "\n" + warnings.str();
  });
  if (state.use_distributed()) picked = detail::broadcast_bytes(state, "restart", picked, 0);
  // Every process says why it skipped a checkpoint: each one's log tells the whole story.
  const auto newline = picked.find('\n');
  if (newline != std::string::npos && newline + 1 < picked.size()) {
    std::cerr << picked.substr(newline + 1) << std::flush;
  }
  const std::string head = picked.substr(0, newline);
  const auto space = head.find(' ');
  const std::string name = space == std::string::npos ? "" : head.substr(space + 1);
  if (space != std::string::npos) {
    core.config.project_config.iteration = std::stoll(head.substr(0, space));
  }
  if (name.empty()) {
    if (is_main_process()) {
      std::cerr << "accelerate: restart " << core.config.restart_count
                << ": no complete checkpoint under " << root << " yet; starting from the beginning"
                << std::endl;
    }
    return;
  }
  auto resume = std::make_shared<detail::AutoResume>();
  resume->dir = root / name;
  on_all_processes(state, "restart", [&] {
    // Process 0 verified the checksums while picking; the others see the same files.
    resume->info = read_checkpoint_info(resume->dir.string(), process_index() != 0);
    TORCH_CHECK(resume->info.world_size == num_processes(), "accelerate: restart: ", resume->dir,
                " was saved by ", resume->info.world_size, " process(es) and this run has ",
                num_processes());
    resume->mine = read_rank_state(resume->dir, process_index(), "restart");
    core.step = resume->mine.step;
    if (core.scaler && resume->info.has_scaler) {
      const auto file = resume->dir / kScalerName;
      core.scaler->load_state_dict(scaler_from_json(read_text(file), file.string()));
    }
  });
  core.resume = std::move(resume);
  if (is_main_process()) {
    std::cerr << "accelerate: restart " << core.config.restart_count << ": resuming from "
              << core.resume->dir << std::endl;
  }
}

void Accelerator::resume_next(ResumeKind kind) {
  auto& core = *core_;
  if (!core.resume) return;
  auto& resume = *core.resume;
  const int64_t index = resume.restored[static_cast<int>(kind)]++;
  const auto& info = resume.info;
  const auto& dir = resume.dir;
  auto check = [&](const char* what, int64_t saved) {
    TORCH_CHECK(index < saved, "accelerate: restart: ", dir, " holds ", saved, " ", what,
                ", and this run prepares more; prepare the same objects as the run that saved it");
  };
  const auto i = static_cast<size_t>(index);
  auto restore = [&](SavedObject saved, const char* what, int64_t count) {
    check(what, count);
    load_object(core, saved, i, dir);
  };
  switch (kind) {
    case ResumeKind::kModel:
      restore(SavedObject::kModel, "model(s)", info.num_models);
      break;
    case ResumeKind::kOptimizer:
      restore(SavedObject::kOptimizer, "optimizer(s)", info.num_optimizers);
      break;
    case ResumeKind::kScheduler:
      restore(SavedObject::kScheduler, "scheduler(s)", info.num_schedulers);
      break;
    case ResumeKind::kCustomObject:
      restore(SavedObject::kCustomObject, "registered object(s)", info.num_custom_objects);
      break;
    case ResumeKind::kDataLoader:
      check("data loader(s)", static_cast<int64_t>(resume.mine.positions.size()));
      restore_loader_position(core.loaders[i], i, resume.mine.positions[i], "restart",
                              resume.mine.path);
      break;
  }
  // Building the next objects may draw random numbers; the state after the last restore is the
  // saved one, as training expects.
  restore_generators(resume.mine.file);
}

void Accelerator::end_auto_resume() {
  auto resume = std::move(core_->resume);
  core_->resume.reset();
  if (!resume) return;
  const auto& info = resume->info;
  auto check = [&](ResumeKind kind, const char* what, int64_t saved) {
    const int64_t got = resume->restored[static_cast<int>(kind)];
    TORCH_CHECK(got == saved, "accelerate: restart: ", resume->dir, " holds ", saved, " ", what,
                " but ", got,
                " were prepared before training went on; prepare (and register) everything "
                "before the first backward()");
  };
  check(ResumeKind::kModel, "model(s)", info.num_models);
  check(ResumeKind::kOptimizer, "optimizer(s)", info.num_optimizers);
  check(ResumeKind::kScheduler, "scheduler(s)", info.num_schedulers);
  check(ResumeKind::kDataLoader, "data loader(s)",
        static_cast<int64_t>(resume->mine.positions.size()));
  check(ResumeKind::kCustomObject, "registered object(s)", info.num_custom_objects);
}

}  // namespace accelerate
