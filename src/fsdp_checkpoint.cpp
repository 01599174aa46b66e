// Checkpoints of fully sharded models: the full state dict streamed one unit at a time, and the
// sharded layout (each process's pieces) that loads on any number of processes.

#include "fsdp_core.h"

#include "accelerate/checkpointing.h"
#include "accelerate/detail/collectives.h"
#include "accelerate/safetensors.h"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

namespace fs = std::filesystem;

namespace accelerate::detail {
namespace {

using Json = nlohmann::ordered_json;

constexpr const char* kLoadOp = "FSDP (loading the model)";
constexpr const char* kFormat = "accelerate-cpp fsdp 1";

std::string shard_file(int64_t rank) {
  return "shard_" + std::to_string(rank) + ".safetensors";
}

// Names of the model's parameters that are the same tensor as a sharded one (ties): loading
// one name fills all of them.
std::unordered_map<std::string, size_t> sharded_names(const FullShardCore& core,
                                                      const torch::nn::Module& model) {
  std::unordered_map<const c10::TensorImpl*, size_t> by_impl;
  for (size_t i = 0; i < core.params.size(); ++i) {
    by_impl.emplace(core.params[i].tensor.unsafeGetTensorImpl(), i);
  }
  std::unordered_map<std::string, size_t> out;
  for (const auto& item : model.named_parameters(/*recurse=*/true)) {
    auto it = by_impl.find(item.value().unsafeGetTensorImpl());
    if (it != by_impl.end()) out.emplace(item.key(), it->second);
  }
  return out;
}

// Copies the part of `value` (the whole parameter `i`, or its elements [start, start + n))
// that this process owns into its shard; returns the number of owned elements written.
int64_t copy_owned(FullShardCore& core, size_t i, const at::Tensor& value, int64_t start) {
  const auto& p = core.params[i];
  auto& u = core.units[p.unit];
  const auto [lo, hi] = core.own_range(u);
  const int64_t first = p.offset + start;
  const int64_t a = std::max(first, lo);
  const int64_t b = std::min(first + value.numel(), hi);
  if (a >= b) return 0;
  u.shard.narrow(0, a - lo, b - a).copy_(value.reshape(-1).narrow(0, a - first, b - a));
  return b - a;
}

int64_t owned_elements(const FullShardCore& core, size_t i) {
  const auto& p = core.params[i];
  const auto& u = core.units[p.unit];
  const auto [lo, hi] = core.own_range(u);
  return std::max<int64_t>(0, std::min(p.offset + p.numel, hi) - std::max(p.offset, lo));
}

void check_complete(const FullShardCore& core, const std::vector<int64_t>& covered,
                    const std::string& source) {
  std::vector<std::string> missing;
  for (size_t i = 0; i < core.params.size(); ++i) {
    if (covered[i] < owned_elements(core, i)) missing.push_back(core.params[i].name);
  }
  if (missing.empty()) return;
  std::string names;
  for (size_t k = 0; k < missing.size() && k < 5; ++k) names += (k ? ", " : "") + missing[k];
  TORCH_CHECK(false, "accelerate: FSDP: ", source, " lacks ", missing.size(),
              " parameter(s) of the model (", names, missing.size() > 5 ? ", ..." : "", ")");
}

// Which files make up a full checkpoint at `path`.
std::vector<fs::path> full_checkpoint_files(const fs::path& path) {
  if (!fs::is_directory(path)) return {path};
  const fs::path index = path / kSafeWeightsIndexName;
  if (!fs::exists(index)) return {path / kSafeWeightsName};
  std::ifstream in(index);
  Json j;
  try {
    j = Json::parse(in);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "accelerate: ", index.string(), " is not valid JSON: ", e.what());
  }
  TORCH_CHECK(j.contains("weight_map") && j["weight_map"].is_object(),
              "accelerate: ", index.string(), " has no \"weight_map\" object");
  std::vector<fs::path> files;
  std::set<std::string> seen;
  for (const auto& [name, file] : j["weight_map"].items()) {
    TORCH_CHECK(file.is_string(), "accelerate: ", index.string(), ": the shard of '", name,
                "' is not a string");
    const auto f = file.get<std::string>();
    TORCH_CHECK(f.find('/') == std::string::npos && f != ".." && !f.empty(),
                "accelerate: ", index.string(), " names a shard outside its directory: ", f);
    if (seen.insert(f).second) files.push_back(path / f);
  }
  return files;
}

}  // namespace

FullStateSpecs full_state_specs(const FullShardCore& core, const torch::nn::Module& model) {
  std::unordered_map<const c10::TensorImpl*, size_t> sharded;
  for (size_t i = 0; i < core.params.size(); ++i) {
    sharded.emplace(core.params[i].tensor.unsafeGetTensorImpl(), i);
  }
  FullStateSpecs out;
  std::unordered_set<const c10::TensorImpl*> seen;
  auto add = [&](const std::string& name, const at::Tensor& t) {
    if (!t.defined() || !seen.insert(t.unsafeGetTensorImpl()).second) return;
    auto it = sharded.find(t.unsafeGetTensorImpl());
    if (it == sharded.end()) {
      out.specs.emplace_back(name, t.detach());
      out.param.emplace_back();
    } else {
      const auto& u = core.units[core.params[it->second].unit];
      out.specs.emplace_back(
          name, at::empty(t.sizes(), at::TensorOptions().dtype(u.dtype).device(at::kMeta)));
      out.param.emplace_back(it->second);
    }
  };
  for (const auto& item : model.named_parameters(/*recurse=*/true)) add(item.key(), item.value());
  for (const auto& item : model.named_buffers(/*recurse=*/true)) add(item.key(), item.value());
  return out;
}

at::Tensor FullStateReader::operator()(size_t k) {
  const auto& i = specs_.param.at(k);
  if (!i) return specs_.specs[k].second;
  const auto& p = core_.params[*i];
  if (unit_ != p.unit) {
    flat_ = at::Tensor();
    std::lock_guard<std::recursive_mutex> lock(core_.mutex);
    flat_ = core_.gather_copy(p.unit);
    unit_ = p.unit;
  }
  return flat_.narrow(0, p.offset, p.numel).view(p.tensor.sizes());
}

void save_sharded_model(FullShardCore& core, const torch::nn::Module& model,
                        const std::string& directory) {
  std::lock_guard<std::recursive_mutex> lock(core.mutex);
  const auto specs = full_state_specs(core, model);
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  Json pieces = Json::object();
  Json shapes = Json::object();
  Json dtypes = Json::object();
  Json whole = Json::array();
  for (size_t k = 0; k < specs.specs.size(); ++k) {
    const auto& [name, t] = specs.specs[k];
    shapes[name] = t.sizes().vec();
    dtypes[name] = safetensors::dtype_name(t.scalar_type());
    if (!specs.param[k]) {
      whole.push_back(name);
      if (core.rank == 0) tensors.emplace_back(name, t);
      continue;
    }
    const auto& p = core.params[*specs.param[k]];
    const auto& u = core.units[p.unit];
    const auto [lo, hi] = core.own_range(u);
    const int64_t a = std::max(p.offset, lo);
    const int64_t b = std::min(p.offset + p.numel, hi);
    if (a >= b) continue;
    tensors.emplace_back(name, u.shard.narrow(0, a - lo, b - a));
    pieces[name] = {a - p.offset, b - a};
  }
  fs::create_directories(directory);
  safetensors::save_file(tensors, (fs::path(directory) / shard_file(core.rank)).string(),
                         {{"format", "pt"}, {"fsdp_pieces", pieces.dump()}});
  if (core.rank == 0) {
    Json index;
    index["format"] = kFormat;
    index["world_size"] = core.world;
    index["shapes"] = shapes;
    index["dtypes"] = dtypes;
    index["whole"] = whole;
    Json files = Json::array();
    for (int64_t r = 0; r < core.world; ++r) files.push_back(shard_file(r));
    index["shards"] = files;
    const std::string text = index.dump(2) + "\n";
    safetensors::detail::write_file_atomically((fs::path(directory) / kFsdpIndexFile).string(),
                                               {{text.data(), text.size()}});
  }
}

namespace {

Json read_index(const fs::path& directory) {
  const fs::path path = directory / kFsdpIndexFile;
  std::ifstream in(path);
  TORCH_CHECK(in.good(), "accelerate: cannot read ", path.string());
  Json index;
  try {
    index = Json::parse(in);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "accelerate: ", path.string(), " is not valid JSON: ", e.what());
  }
  TORCH_CHECK(index.value("format", "") == kFormat && index.contains("shards") &&
                  index["shards"].is_array() && index.contains("shapes") &&
                  index["shapes"].is_object(),
              "accelerate: ", path.string(), " is not an accelerate-cpp FSDP index");
  for (const auto& f : index["shards"]) {
    TORCH_CHECK(f.is_string() && f.get<std::string>().find('/') == std::string::npos,
                "accelerate: ", path.string(), " names a shard outside its directory");
  }
  return index;
}

// Every (name, start, piece) a sharded directory holds, file by file.
void for_each_piece(
    const fs::path& directory, const Json& index,
    const std::function<void(const std::string&, int64_t, const at::Tensor&)>& use) {
  for (const auto& f : index["shards"]) {
    const auto path = directory / f.get<std::string>();
    const auto file = safetensors::load_file(path.string());
    Json pieces = Json::object();
    if (auto it = file.metadata.find("fsdp_pieces"); it != file.metadata.end()) {
      try {
        pieces = Json::parse(it->second);
      } catch (const std::exception& e) {
        TORCH_CHECK(false, "accelerate: ", path.string(), ": bad fsdp_pieces metadata: ", e.what());
      }
    }
    for (const auto& [name, t] : file.tensors) {
      int64_t start = -1;
      if (pieces.contains(name)) {
        const auto& entry = pieces[name];
        TORCH_CHECK(entry.is_array() && entry.size() == 2 && entry[1].get<int64_t>() == t.numel(),
                    "accelerate: ", path.string(), ": bad piece entry for '", name, "'");
        start = entry[0].get<int64_t>();
      }
      use(name, start, t);
    }
  }
}

}  // namespace

std::vector<std::pair<std::string, at::Tensor>> read_sharded_model_state(
    const std::string& directory) {
  const fs::path dir(directory);
  const Json index = read_index(dir);
  std::map<std::string, at::Tensor> full;
  std::map<std::string, int64_t> covered;
  for (const auto& [name, shape] : index["shapes"].items()) {
    const std::vector<int64_t> sizes = shape.get<std::vector<int64_t>>();
    const auto dtype = safetensors::dtype_from_name(index["dtypes"].at(name).get<std::string>());
    full[name] = at::empty(sizes, at::TensorOptions().dtype(dtype));
    covered[name] = 0;
  }
  for_each_piece(dir, index, [&](const std::string& name, int64_t start, const at::Tensor& t) {
    auto it = full.find(name);
    TORCH_CHECK(it != full.end(), "accelerate: ", directory, " holds '", name,
                "', which its index does not list");
    if (start < 0) {
      TORCH_CHECK(t.sizes() == it->second.sizes(), "accelerate: ", directory, ": '", name,
                  "' has shape ", t.sizes(), ", the index says ", it->second.sizes());
      it->second.copy_(t);
      covered[name] = t.numel();
    } else {
      TORCH_CHECK(start + t.numel() <= it->second.numel(), "accelerate: ", directory,
                  ": a piece of '", name, "' lies outside it");
      it->second.view(-1).narrow(0, start, t.numel()).copy_(t);
      covered[name] += t.numel();
    }
  });
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& [name, shape] : index["shapes"].items()) {
    TORCH_CHECK(covered[name] == full[name].numel(), "accelerate: ", directory,
                ": the shards do not cover '", name, "' (", covered[name], " of ",
                full[name].numel(), " elements)");
    out.emplace_back(name, full[name]);
  }
  return out;
}

void load_full_shard_model(FullShardCore& core, torch::nn::Module& model, const std::string& path,
                           bool main_reads) {
  std::lock_guard<std::recursive_mutex> lock(core.mutex);
  torch::NoGradGuard no_grad;
  const auto by_name = sharded_names(core, model);
  std::map<std::string, at::Tensor> others;  // buffers and parameters that are not sharded
  for (const auto& item : model.named_parameters(/*recurse=*/true)) {
    if (!by_name.count(item.key())) others.emplace(item.key(), item.value());
  }
  for (const auto& item : model.named_buffers(/*recurse=*/true)) {
    others.emplace(item.key(), item.value());
  }
  std::vector<int64_t> covered(core.params.size(), 0);
  std::set<std::string> others_loaded;
  auto load_other = [&](const std::string& name, const at::Tensor& t, const std::string& source) {
    auto it = others.find(name);
    TORCH_CHECK(it != others.end(), "accelerate: ", source, " has '", name,
                "', which the model does not");
    TORCH_CHECK(it->second.sizes() == t.sizes(), "accelerate: '", name, "' has shape ", t.sizes(),
                " in ", source, " but ", it->second.sizes(), " in the model");
    it->second.copy_(t);
    others_loaded.insert(name);
  };
  auto check_others = [&](const std::string& source) {
    // A tied buffer or parameter is filled through the tensor it shares.
    std::unordered_set<const c10::TensorImpl*> filled;
    for (const auto& name : others_loaded) filled.insert(others.at(name).unsafeGetTensorImpl());
    for (const auto& [name, t] : others) {
      TORCH_CHECK(others_loaded.count(name) || filled.count(t.unsafeGetTensorImpl()),
                  "accelerate: ", source, " has no tensor '", name, "'");
    }
  };

  const fs::path p(path);
  if (fs::is_directory(p) && fs::exists(p / kFsdpIndexFile)) {
    const Json index = read_index(p);
    for_each_piece(p, index, [&](const std::string& name, int64_t start, const at::Tensor& t) {
      auto it = by_name.find(name);
      if (it == by_name.end()) {
        TORCH_CHECK(start < 0, "accelerate: ", path, " has a piece of '", name,
                    "', which is not a sharded parameter of the model");
        load_other(name, t, path);
        return;
      }
      const auto& param = core.params[it->second];
      TORCH_CHECK(start >= 0 || t.sizes() == param.tensor.sizes(), "accelerate: '", name,
                  "' has shape ", t.sizes(), " in ", path, " but ", param.tensor.sizes(),
                  " in the model");
      TORCH_CHECK(start < 0 || start + t.numel() <= param.numel, "accelerate: ", path,
                  ": a piece of '", name, "' lies outside the parameter");
      covered[it->second] += copy_owned(core, it->second, t, std::max<int64_t>(start, 0));
    });
    check_complete(core, covered, path);
    check_others(path);
    core.parameters_updated();
    return;
  }

  const bool reads = !main_reads || core.rank == 0 || core.world == 1;
  std::map<std::string, at::Tensor> values;
  std::vector<safetensors::SafetensorsFile> files;
  if (reads) {
    for (const auto& f : full_checkpoint_files(p)) {
      TORCH_CHECK(fs::exists(f), "accelerate: no checkpoint at ", f.string());
      files.push_back(safetensors::load_file(f.string()));
      for (const auto& [name, t] : files.back().tensors) values.emplace(name, t);
    }
    for (const auto& [name, i] : by_name) {
      auto it = values.find(name);
      if (it == values.end()) continue;
      TORCH_CHECK(it->second.sizes() == core.params[i].tensor.sizes(), "accelerate: '", name,
                  "' has shape ", it->second.sizes(), " in ", path, " but ",
                  core.params[i].tensor.sizes(), " in the model");
    }
  }
  if (main_reads && core.world > 1) {
    // Process 0 scatters each unit's flat parameter; the others receive their shard only.
    auto& backend = *core.state->process_group();
    for (auto& u : core.units) {
      if (u.numel == 0) continue;
      at::Tensor mine = at::empty({u.shard_numel}, at::TensorOptions().dtype(u.dtype));
      std::vector<at::Tensor> outputs{mine};
      std::vector<std::vector<at::Tensor>> inputs;
      at::Tensor flat;
      if (core.rank == 0) {
        flat = at::zeros({core.world * u.shard_numel}, at::TensorOptions().dtype(u.dtype));
        for (size_t i : u.params) {
          const auto& param = core.params[i];
          at::Tensor value;
          for (const auto& [name, index] : by_name) {
            if (index == i && values.count(name)) value = values.at(name);
          }
          TORCH_CHECK(value.defined(), "accelerate: ", path, " has no tensor '", param.name, "'");
          flat.narrow(0, param.offset, param.numel).copy_(value.reshape(-1));
        }
        inputs.emplace_back();
        for (int64_t r = 0; r < core.world; ++r) {
          inputs[0].push_back(flat.narrow(0, r * u.shard_numel, u.shard_numel));
        }
      }
      c10d::ScatterOptions options;
      options.rootRank = 0;
      auto work = backend.scatter(outputs, inputs, options);
      detail::wait(*core.state, kLoadOp, work);
      u.shard.copy_(mine);
    }
    for (auto& [name, t] : others) {
      at::Tensor value = t.detach();
      if (core.rank == 0) {
        auto it = values.find(name);
        TORCH_CHECK(it != values.end(), "accelerate: ", path, " has no tensor '", name, "'");
        TORCH_CHECK(it->second.sizes() == t.sizes(), "accelerate: '", name, "' has shape ",
                    it->second.sizes(), " in ", path, " but ", t.sizes(), " in the model");
        value = it->second.to(t.scalar_type());
      }
      t.copy_(detail::broadcast(*core.state, kLoadOp, value.contiguous(), 0));
    }
    core.parameters_updated();
    return;
  }
  std::set<std::string> used;
  for (const auto& [name, i] : by_name) {
    auto it = values.find(name);
    if (it == values.end()) continue;
    covered[i] = std::max(covered[i], copy_owned(core, i, it->second, 0));
    used.insert(name);
  }
  for (const auto& [name, t] : values) {
    if (used.count(name)) continue;
    load_other(name, t, path);
  }
  check_complete(core, covered, path);
  check_others(path);
  core.parameters_updated();
}

}  // namespace accelerate::detail

namespace accelerate::detail {

std::vector<std::string> save_full_shard_model(FullShardCore& core, const torch::nn::Module& model,
                                               const std::string& directory,
                                               const SaveModelOptions& options, bool write) {
  const auto specs = full_state_specs(core, model);
  FullStateReader reader(core, specs);
  return save_model_streaming(
      specs.specs, directory, options, [&](size_t k) { return reader(k); }, write);
}

}  // namespace accelerate::detail
