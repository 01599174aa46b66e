#include "accelerate/zero.h"

#include "accelerate/checkpointing.h"
#include "accelerate/detail/collectives.h"
#include "accelerate/safetensors.h"

#include <c10/util/accumulate.h>
#include <c10/util/irange.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <unordered_map>

// Why pieces and not one flat parameter: LibTorch's optimizers key their state by tensor, and
// their updates are element-wise, so a flat view of the owned part of each parameter steps
// exactly like the parameter would, updates the parameter's own storage in place (nothing to
// copy back before the all-gather), and needs no change to the user's module.

namespace accelerate {

namespace {

using Json = nlohmann::ordered_json;

constexpr const char* kStepOp = "ZeRO (all-gather of updated parameters)";
constexpr const char* kNormOp = "ZeRO (gradient norm)";
constexpr const char* kStateOp = "ZeRO (optimizer state)";
constexpr const char* kSupported[] = {"SGD", "Adam", "AdamW", "RMSprop", "Adagrad"};

compat::Backend& group(const PartialState& state, const char* op) {
  compat::Backend* pg = state.process_group();
  TORCH_CHECK(pg != nullptr, "accelerate: '", op, "' on process ", state.process_index(),
              ": the process group was destroyed");
  return *pg;
}

// "state.<index>.<key>" -> (index, key).
std::optional<std::pair<size_t, std::string>> parse_state_name(const std::string& name) {
  if (name.rfind("state.", 0) != 0) return std::nullopt;
  const size_t dot = name.find('.', 6);
  if (dot == std::string::npos) return std::nullopt;
  try {
    return std::make_pair(static_cast<size_t>(std::stoull(name.substr(6, dot - 6))),
                          name.substr(dot + 1));
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

std::string state_name(size_t index, const std::string& key) {
  return "state." + std::to_string(index) + "." + key;
}

}  // namespace

std::string zero_shard_file_name(int rank) {
  return "zero_shard_" + std::to_string(rank) + ".safetensors";
}

struct ZeroOptimizer::Impl {
  struct Piece {
    size_t group = 0;
    size_t full = 0;  // index among the optimizer's parameters, PyTorch's numbering
    int64_t start = 0;
    int64_t length = 0;
    size_t sync = 0;
    size_t bucket = 0;
    size_t sync_param = 0;
    int64_t shard_offset = 0;  // of its first element in the bucket's shard
    at::Tensor view;           // what the optimizer steps
    at::Tensor on_device;      // with offload: the parameter's own part, which `view` copies
  };
  // A bucket holding at least one of the optimizer's parameters: gathered after each step.
  struct Gather {
    size_t sync = 0;
    size_t bucket = 0;
    GradientBucketLayout layout;
    std::vector<at::Tensor> params;           // the synchronizer's, by position in layout.params
    std::vector<std::optional<size_t>> full;  // the optimizer's index of each, if it has one
  };

  torch::optim::Optimizer& optimizer;
  std::vector<GradientSynchronizer*> syncs;
  std::shared_ptr<PartialState> state;
  ZeroOptions options;
  std::string kind;
  std::vector<at::Tensor> full_params;
  std::vector<size_t> full_group;
  std::vector<std::optional<size_t>> piece_of_full;
  std::vector<Piece> pieces;
  std::vector<Gather> gathers;

  Impl(torch::optim::Optimizer& o, std::vector<GradientSynchronizer*> s,
       std::shared_ptr<PartialState> st, ZeroOptions opts)
      : optimizer(o), syncs(std::move(s)), state(std::move(st)), options(opts) {}

  int64_t world() const { return state->num_processes(); }
  int64_t rank() const { return state->process_index(); }
  std::pair<int64_t, int64_t> own_range(const GradientBucketLayout& l) const {
    const int64_t lo = std::min(l.numel, rank() * l.shard_numel);
    return {lo, std::min(l.numel, lo + l.shard_numel)};
  }

  // Param groups in `metadata` rewritten so that group g lists `indices(g)`.
  Json regroup(const std::string& param_groups_json,
               const std::function<std::vector<size_t>(size_t)>& indices) const {
    Json groups = Json::parse(param_groups_json);
    TORCH_CHECK(groups.is_array() && groups.size() == optimizer.param_groups().size(),
                "accelerate: ZeRO: the optimizer state has ", groups.is_array() ? groups.size() : 0,
                " param groups, the optimizer ", optimizer.param_groups().size());
    for (size_t g = 0; g < groups.size(); ++g) groups[g]["params"] = indices(g);
    return groups;
  }

  std::vector<size_t> pieces_of_group(size_t g) const {
    std::vector<size_t> out;
    for (size_t j = 0; j < pieces.size(); ++j) {
      if (pieces[j].group == g) out.push_back(j);
    }
    return out;
  }
  std::vector<size_t> full_of_group(size_t g) const {
    std::vector<size_t> out;
    for (size_t f = 0; f < full_params.size(); ++f) {
      if (full_group[f] == g) out.push_back(f);
    }
    return out;
  }

  // All-gathers one bucket-shaped tensor per Gather: `pack` fills this process's shard.
  std::vector<at::Tensor> all_gather_buckets(
      const char* op, const std::function<at::ScalarType(const Gather&)>& dtype,
      const std::function<void(const Gather&, at::Tensor& shard)>& pack) const {
    auto& backend = group(*state, op);
    const auto device = state->backend() == "nccl" ? state->device() : c10::Device(c10::kCPU);
    std::vector<at::Tensor> outs;
    std::vector<c10::intrusive_ptr<compat::Work>> works;
    for (const auto& gather : gathers) {
      const int64_t s = gather.layout.shard_numel;
      const auto options = at::TensorOptions().dtype(dtype(gather)).device(device);
      at::Tensor shard = at::zeros({s}, options);
      pack(gather, shard);
      at::Tensor out = at::empty({s * world()}, options);
      if (state->backend() == "nccl") {
        works.push_back(backend._allgather_base(out, shard));
      } else {
        // Gloo in LibTorch 1.13 has no _allgather_base; its allgather writes into the views.
        std::vector<std::vector<at::Tensor>> outputs(1);
        for (int64_t r = 0; r < world(); ++r) outputs[0].push_back(out.narrow(0, r * s, s));
        std::vector<at::Tensor> inputs{shard};
        works.push_back(backend.allgather(outputs, inputs));
      }
      outs.push_back(out);
    }
    for (auto& work : works) detail::wait(*state, op, work);
    return outs;
  }

  void gather_parameters() {
    torch::NoGradGuard no_grad;
    auto outs = all_gather_buckets(
        kStepOp, [](const Gather& g) { return g.layout.dtype; },
        [&](const Gather& g, at::Tensor& shard) {
          const auto [lo, hi] = own_range(g.layout);
          for (size_t k = 0; k < g.params.size(); ++k) {
            const int64_t o = g.layout.offsets[k];
            const int64_t n = g.params[k].numel();
            const int64_t a = std::max(o, lo);
            const int64_t b = std::min(o + n, hi);
            if (a >= b) continue;
            shard.narrow(0, a - lo, b - a)
                .copy_(g.params[k].detach().reshape(-1).narrow(0, a - o, b - a));
          }
        });
    for (size_t i = 0; i < gathers.size(); ++i) {
      const Gather& g = gathers[i];
      for (size_t k = 0; k < g.params.size(); ++k) {
        if (!g.full[k]) continue;
        at::Tensor p = g.params[k].detach();
        const int64_t o = g.layout.offsets[k];
        p.view(-1).copy_(outs[i].narrow(0, o, p.numel()));
      }
    }
  }

  // Builds this process's state from per-full-index state (a full state dict or old shards).
  void load_pieces(const std::map<size_t, std::map<std::string, at::Tensor>>& by_full,
                   const std::string& param_groups_json) {
    OptimizerStateDict sd;
    sd.metadata["format"] = kOptimizerStateFormat;
    sd.metadata["optimizer"] = kind;
    sd.metadata["param_groups"] =
        regroup(param_groups_json, [&](size_t g) { return pieces_of_group(g); }).dump();
    for (size_t j = 0; j < pieces.size(); ++j) {
      const Piece& p = pieces[j];
      auto it = by_full.find(p.full);
      if (it == by_full.end()) continue;
      for (const auto& [key, t] : it->second) sd.tensors.emplace_back(state_name(j, key), t);
    }
    load_optimizer_state_dict(optimizer, sd);
  }
};

ZeroOptimizer::ZeroOptimizer(torch::optim::Optimizer& optimizer,
                             std::vector<GradientSynchronizer*> synchronizers,
                             std::shared_ptr<PartialState> state, ZeroOptions options)
    : impl_(
          std::make_unique<Impl>(optimizer, std::move(synchronizers), std::move(state), options)) {
  auto& m = *impl_;
  TORCH_CHECK(m.state != nullptr, "accelerate: ZeroOptimizer: the state is null");
  TORCH_CHECK(options.stage >= 1 && options.stage <= 3,
              "accelerate: ZeroOptimizer: stage must be 1, 2 or 3, got ", options.stage);
  const OptimizerStateDict before = optimizer_state_dict(optimizer);
  m.kind = before.metadata.at("optimizer");
  TORCH_CHECK(
      std::find(std::begin(kSupported), std::end(kSupported), m.kind) != std::end(kSupported),
      "accelerate: ZeRO sharding needs an optimizer with an element-wise update (SGD, Adam, "
      "AdamW, RMSprop or Adagrad); this one is ",
      before.metadata.count("class") ? before.metadata.at("class") : m.kind);

  // Where each synchronized parameter lives.
  struct Place {
    size_t sync, index, bucket;
    int64_t offset;
  };
  std::unordered_map<const c10::TensorImpl*, Place> places;
  std::vector<std::vector<GradientBucketLayout>> layouts;
  for (size_t s = 0; s < m.syncs.size(); ++s) {
    auto* sync = m.syncs[s];
    TORCH_CHECK(sync->gradient_sharding_stage() == options.stage,
                "accelerate: ZeroOptimizer: the model's GradientSynchronizer shards gradients at "
                "stage ",
                sync->gradient_sharding_stage(), ", the optimizer asks for stage ", options.stage);
    const auto params = sync->parameters();
    layouts.push_back(sync->bucket_layout());
    for (size_t b = 0; b < layouts[s].size(); ++b) {
      const auto& l = layouts[s][b];
      for (size_t k = 0; k < l.params.size(); ++k) {
        places[params[l.params[k]].unsafeGetTensorImpl()] = {s, l.params[k], b, l.offsets[k]};
      }
    }
  }

  std::set<std::pair<size_t, size_t>> used_buckets;
  for (size_t g = 0; g < optimizer.param_groups().size(); ++g) {
    for (const auto& p : optimizer.param_groups()[g].params()) {
      const size_t f = m.full_params.size();
      m.full_params.push_back(p);
      m.full_group.push_back(g);
      m.piece_of_full.emplace_back();
      for (size_t e = 0; e < f; ++e) {
        // LibTorch's parameters() lists a tied weight under each of its names; an optimizer
        // given it twice steps it twice with one state. Sharded, the two would get two states:
        // refuse rather than train differently.
        TORCH_CHECK(!m.full_params[e].is_same(p),
                    "accelerate: ZeRO: the optimizer lists one "
                    "tensor twice (parameters ",
                    e, " and ", f, ", shape ", p.sizes(),
                    "; a tied weight?); give the optimizer each parameter once");
      }
      auto it = places.find(p.unsafeGetTensorImpl());
      TORCH_CHECK(it != places.end(), "accelerate: ZeRO: the optimizer's parameter ", f,
                  " (param group ", g, ", shape ", p.sizes(),
                  ") is not a trainable parameter of a prepared model; prepare the model before "
                  "the optimizer, and give the optimizer only its trainable parameters");
      TORCH_CHECK(p.is_contiguous(), "accelerate: ZeRO: the optimizer's parameter ", f,
                  " is not contiguous");
      const Place& place = it->second;
      used_buckets.emplace(place.sync, place.bucket);
      const auto& l = layouts[place.sync][place.bucket];
      const auto [lo, hi] = m.own_range(l);
      const int64_t a = std::max(place.offset, lo);
      const int64_t b = std::min(place.offset + p.numel(), hi);
      if (a >= b) continue;
      Impl::Piece piece;
      piece.group = g;
      piece.full = f;
      piece.start = a - place.offset;
      piece.length = b - a;
      piece.sync = place.sync;
      piece.bucket = place.bucket;
      piece.sync_param = place.index;
      piece.shard_offset = a - lo;
      if (options.stage == 3) {
        // The parameter itself is gathered only around its unit's use: the optimizer steps
        // the unit's shard, the master copy, in its own dtype and place (the CPU with offload).
        piece.view = m.syncs[place.sync]->parameter_shard(place.bucket).narrow(0, a - lo, b - a);
      } else {
        piece.view = p.detach().view(-1).narrow(0, piece.start, piece.length);
      }
      if (options.offload_optimizer && piece.view.is_cuda()) {
        piece.on_device = piece.view;
        piece.view = at::empty({piece.length}, p.options().device(at::kCPU).pinned_memory(true));
        piece.view.copy_(piece.on_device);
      }
      m.piece_of_full[f] = m.pieces.size();
      m.pieces.push_back(std::move(piece));
    }
  }
  for (const auto& [s, b] : used_buckets) {
    Impl::Gather gather;
    gather.sync = s;
    gather.bucket = b;
    gather.layout = layouts[s][b];
    const auto params = m.syncs[s]->parameters();
    for (size_t k = 0; k < gather.layout.params.size(); ++k) {
      const at::Tensor& p = params[gather.layout.params[k]];
      gather.params.push_back(p);
      std::optional<size_t> full;
      for (size_t f = 0; f < m.full_params.size(); ++f) {
        if (m.full_params[f].is_same(p)) full = f;
      }
      gather.full.push_back(full);
    }
    m.gathers.push_back(std::move(gather));
  }

  // The optimizer now steps the pieces; what state it had is sliced onto them.
  for (size_t g = 0; g < optimizer.param_groups().size(); ++g) {
    std::vector<at::Tensor> params;
    for (size_t j : m.pieces_of_group(g)) params.push_back(m.pieces[j].view);
    optimizer.param_groups()[g].params() = params;
  }
  optimizer.state().clear();
  load_full_state_dict(before);
}

ZeroOptimizer::~ZeroOptimizer() = default;

int ZeroOptimizer::stage() const {
  return impl_->options.stage;
}

size_t ZeroOptimizer::num_pieces() const {
  return impl_->pieces.size();
}

void ZeroOptimizer::bind_gradients() {
  auto& m = *impl_;
  for (auto& p : m.pieces) {
    auto* sync = m.syncs[p.sync];
    at::Tensor shard = sync->gradient_shard(p.bucket);
    at::Tensor& grad = p.view.mutable_grad();
    if (!shard.defined() || sync->parameter_unused(p.sync_param)) {
      grad.reset();
      continue;
    }
    at::Tensor g = shard.narrow(0, p.shard_offset, p.length);
    if (g.scalar_type() != p.view.scalar_type() || g.device() != p.view.device()) {
      g = g.to(p.view.device(), p.view.scalar_type());
    }
    grad = g;
  }
}

void ZeroOptimizer::step(const std::function<bool()>& inner) {
  auto& m = *impl_;
  {
    // With offload the parameters on the device stay the truth (load_state writes them): the
    // CPU copies start each step from them.
    torch::NoGradGuard no_grad;
    for (auto& p : m.pieces) {
      if (p.on_device.defined()) p.view.copy_(p.on_device);
    }
  }
  bind_gradients();
  if (m.options.gradient_clipping) clip_grad_norm({}, *m.options.gradient_clipping);
  bool stepped = true;
  if (inner) {
    stepped = inner();
  } else {
    m.optimizer.step();
  }
  if (stepped) {
    torch::NoGradGuard no_grad;
    for (auto& p : m.pieces) {
      if (p.on_device.defined()) p.on_device.copy_(p.view, /*non_blocking=*/true);
    }
  }
  // Every process takes the same decision (a loss scaler agrees on inf/NaN before it steps).
  if (stepped && m.options.stage == 3) {
    for (auto* sync : m.syncs) sync->parameters_updated();
  } else if (stepped) {
    m.gather_parameters();
  }
}

void ZeroOptimizer::zero_grad() {
  auto& m = *impl_;
  for (auto& p : m.pieces) p.view.mutable_grad().reset();
  if (m.options.stage >= 2) {
    for (auto* sync : m.syncs) sync->release_gradient_shards();
  }
}

double ZeroOptimizer::clip_grad_norm(const std::vector<at::Tensor>& parameters, double max_norm,
                                     double norm_type) {
  auto& m = *impl_;
  torch::NoGradGuard no_grad;
  bind_gradients();
  std::set<const c10::TensorImpl*> wanted;
  for (const auto& p : parameters) wanted.insert(p.unsafeGetTensorImpl());
  std::vector<at::Tensor> grads;
  for (auto& p : m.pieces) {
    if (!wanted.empty() && wanted.count(m.full_params[p.full].unsafeGetTensorImpl()) == 0) continue;
    if (p.view.grad().defined()) grads.push_back(p.view.grad());
  }
  const bool inf = std::isinf(norm_type);
  double local = 0;
  for (const auto& g : grads) {
    const double n = g.norm(norm_type).item<double>();
    local = inf ? std::max(local, n) : local + std::pow(n, norm_type);
  }
  const double sum = detail::all_reduce(*m.state, kNormOp, at::full({1}, local, at::kDouble),
                                        inf ? c10d::ReduceOp::MAX : c10d::ReduceOp::SUM)
                         .item<double>();
  const double norm = inf ? sum : std::pow(sum, 1.0 / norm_type);
  const double coefficient = max_norm / (norm + 1e-6);
  if (coefficient < 1) {
    for (auto& g : grads) g.mul_(coefficient);
  }
  return norm;
}

void ZeroOptimizer::clip_grad_value(const std::vector<at::Tensor>& parameters, double clip_value) {
  auto& m = *impl_;
  torch::NoGradGuard no_grad;
  bind_gradients();
  std::set<const c10::TensorImpl*> wanted;
  for (const auto& p : parameters) wanted.insert(p.unsafeGetTensorImpl());
  for (auto& p : m.pieces) {
    if (!wanted.empty() && wanted.count(m.full_params[p.full].unsafeGetTensorImpl()) == 0) continue;
    if (p.view.grad().defined()) p.view.mutable_grad().clamp_(-clip_value, clip_value);
  }
}

OptimizerStateDict ZeroOptimizer::full_state_dict() const {
  auto& m = *impl_;
  const OptimizerStateDict local = optimizer_state_dict(m.optimizer);
  const size_t F = m.full_params.size();
  // Per piece: its state tensors by key.
  std::map<size_t, std::map<std::string, at::Tensor>> by_piece;
  std::vector<std::string> keys;  // per-element keys, in first-seen order
  for (const auto& [name, t] : local.tensors) {
    auto parsed = parse_state_name(name);
    if (!parsed) continue;
    by_piece[parsed->first][parsed->second] = t;
    if (t.dim() > 0 && std::find(keys.begin(), keys.end(), parsed->second) == keys.end()) {
      keys.push_back(parsed->second);
    }
  }
  // Every process must walk the same keys, including one that holds no state yet.
  std::string mine;
  for (const auto& k : keys) mine += k + "\n";
  std::vector<std::string> all_keys;
  for (const auto& text : detail::all_gather_bytes(*m.state, kStateOp, mine)) {
    size_t from = 0;
    for (size_t nl = text.find('\n'); nl != std::string::npos; nl = text.find('\n', from)) {
      std::string k = text.substr(from, nl - from);
      if (std::find(all_keys.begin(), all_keys.end(), k) == all_keys.end()) all_keys.push_back(k);
      from = nl + 1;
    }
  }
  // Which parameters have state, and their step counts (the only scalar state of the five).
  at::Tensor has = at::zeros({static_cast<int64_t>(F)}, at::kLong);
  at::Tensor steps = at::zeros({static_cast<int64_t>(F)}, at::kLong);
  bool any_step = false;
  for (const auto& [j, entries] : by_piece) {
    const size_t f = m.pieces[j].full;
    has[static_cast<int64_t>(f)] = 1;
    for (const auto& [key, t] : entries) {
      if (t.dim() != 0) continue;
      TORCH_CHECK(key == "step", "accelerate: ZeRO: unexpected scalar optimizer state '", key, "'");
      steps[static_cast<int64_t>(f)] = t.item<int64_t>();
      any_step = true;
    }
  }
  at::Tensor flags = detail::all_reduce(*m.state, kStateOp, at::stack({has, steps}).reshape(-1),
                                        c10d::ReduceOp::MAX)
                         .cpu()
                         .view({2, static_cast<int64_t>(F)});
  const at::Tensor any =
      detail::all_reduce(*m.state, kStateOp, at::full({1}, any_step ? 1 : 0, at::kLong),
                         c10d::ReduceOp::MAX)
          .cpu();

  std::map<size_t, std::map<std::string, at::Tensor>> full;
  for (const auto& key : all_keys) {
    auto outs = m.all_gather_buckets(
        kStateOp, [](const Impl::Gather& g) { return g.layout.dtype; },
        [&](const Impl::Gather& g, at::Tensor& shard) {
          for (const auto& [j, entries] : by_piece) {
            const auto& p = m.pieces[j];
            if (p.sync != g.sync || p.bucket != g.bucket) continue;
            auto it = entries.find(key);
            if (it != entries.end()) shard.narrow(0, p.shard_offset, p.length).copy_(it->second);
          }
        });
    for (size_t i = 0; i < m.gathers.size(); ++i) {
      const auto& g = m.gathers[i];
      for (size_t k = 0; k < g.params.size(); ++k) {
        if (!g.full[k] || flags[0][static_cast<int64_t>(*g.full[k])].item<int64_t>() == 0) continue;
        const at::Tensor& p = m.full_params[*g.full[k]];
        full[*g.full[k]][key] = outs[i]
                                    .narrow(0, g.layout.offsets[k], p.numel())
                                    .view(p.sizes())
                                    .to(p.scalar_type())
                                    .clone();
      }
    }
  }
  OptimizerStateDict out;
  out.metadata = local.metadata;
  out.metadata["param_groups"] = m.regroup(local.metadata.at("param_groups"), [&](size_t g) {
                                    return m.full_of_group(g);
                                  }).dump();
  for (size_t f = 0; f < F; ++f) {
    if (flags[0][static_cast<int64_t>(f)].item<int64_t>() == 0) continue;
    if (any.item<int64_t>() != 0) {
      out.tensors.emplace_back(
          state_name(f, "step"),
          at::scalar_tensor(flags[1][static_cast<int64_t>(f)].item<int64_t>(), at::kLong));
    }
    for (const auto& key : all_keys) {
      auto it = full[f].find(key);
      if (it != full[f].end()) out.tensors.emplace_back(state_name(f, key), it->second);
    }
  }
  return out;
}

void ZeroOptimizer::load_full_state_dict(const OptimizerStateDict& full) {
  auto& m = *impl_;
  auto kind = full.metadata.find("optimizer");
  TORCH_CHECK(kind != full.metadata.end() && kind->second == m.kind,
              "accelerate: ZeRO: the optimizer state is for ",
              kind == full.metadata.end() ? "an unknown optimizer" : kind->second,
              ", the optimizer is ", m.kind);
  const Json groups = Json::parse(full.metadata.at("param_groups"));
  TORCH_CHECK(groups.is_array() && groups.size() == m.optimizer.param_groups().size(),
              "accelerate: ZeRO: the optimizer state has ", groups.is_array() ? groups.size() : 0,
              " param groups, the optimizer ", m.optimizer.param_groups().size());
  for (size_t g = 0; g < groups.size(); ++g) {
    const auto expected = m.full_of_group(g);
    TORCH_CHECK(groups[g].contains("params") && groups[g]["params"].size() == expected.size(),
                "accelerate: ZeRO: param group ", g, " of the optimizer state has ",
                groups[g].contains("params") ? groups[g]["params"].size() : 0,
                " parameters, the optimizer's has ", expected.size());
  }
  std::map<size_t, std::map<std::string, at::Tensor>> by_full;
  for (const auto& [name, t] : full.tensors) {
    auto parsed = parse_state_name(name);
    TORCH_CHECK(parsed && parsed->first < m.full_params.size(),
                "accelerate: ZeRO: unexpected optimizer state entry '", name, "'");
    auto j = m.piece_of_full[parsed->first];
    if (!j) continue;
    const auto& p = m.pieces[*j];
    const at::Tensor& param = m.full_params[p.full];
    if (t.dim() == 0) {
      by_full[p.full][parsed->second] = t.clone();
      continue;
    }
    TORCH_CHECK(t.numel() == param.numel(), "accelerate: ZeRO: optimizer state '", name, "' has ",
                t.numel(), " elements, its parameter ", param.numel());
    by_full[p.full][parsed->second] = t.reshape(-1).narrow(0, p.start, p.length).clone();
  }
  m.load_pieces(by_full, full.metadata.at("param_groups"));
}

void ZeroOptimizer::save_sharded(const std::string& directory) const {
  auto& m = *impl_;
  OptimizerStateDict local = optimizer_state_dict(m.optimizer);
  Json pieces = Json::array();
  for (const auto& p : m.pieces) pieces.push_back({p.full, p.start, p.length});
  Json numels = Json::array();
  Json shapes = Json::array();
  for (const auto& p : m.full_params) {
    numels.push_back(p.numel());
    shapes.push_back(p.sizes().vec());
  }
  local.metadata["zero_pieces"] = pieces.dump();
  local.metadata["zero_param_numels"] = numels.dump();
  local.metadata["zero_world_size"] = std::to_string(m.world());
  local.metadata["zero_rank"] = std::to_string(m.rank());
  local.metadata["zero_stage"] = std::to_string(m.options.stage);
  std::filesystem::create_directories(directory);
  safetensors::save_file(
      local.tensors, (std::filesystem::path(directory) / zero_shard_file_name(m.rank())).string(),
      local.metadata);
  if (m.rank() == 0) {
    Json index;
    index["format"] = "accelerate-cpp zero 1";
    index["optimizer"] = m.kind;
    index["world_size"] = m.world();
    index["param_numels"] = numels;
    index["param_shapes"] = shapes;
    Json files = Json::array();
    for (int r = 0; r < m.world(); ++r) files.push_back(zero_shard_file_name(r));
    index["shards"] = files;
    const std::string text = index.dump(2) + "\n";
    safetensors::detail::write_file_atomically(
        (std::filesystem::path(directory) / kZeroIndexFile).string(), {{text.data(), text.size()}});
  }
}

void ZeroOptimizer::load_sharded(const std::string& directory) {
  auto& m = *impl_;
  const auto index_path = std::filesystem::path(directory) / kZeroIndexFile;
  std::ifstream in(index_path);
  TORCH_CHECK(in.good(), "accelerate: ZeRO: no sharded optimizer index at ", index_path.string());
  Json index;
  try {
    index = Json::parse(in);
  } catch (const Json::exception& e) {
    TORCH_CHECK(false, "accelerate: ZeRO: ", index_path.string(), " is not valid JSON: ", e.what());
  }
  TORCH_CHECK(index.value("optimizer", "") == m.kind, "accelerate: ZeRO: ", index_path.string(),
              " holds ", index.value("optimizer", "?"), " state, the optimizer is ", m.kind);
  const auto numels = index.at("param_numels").get<std::vector<int64_t>>();
  TORCH_CHECK(numels.size() == m.full_params.size(), "accelerate: ZeRO: ", index_path.string(),
              " is for ", numels.size(), " parameters, the optimizer has ", m.full_params.size());
  for (size_t f = 0; f < numels.size(); ++f) {
    TORCH_CHECK(numels[f] == m.full_params[f].numel(), "accelerate: ZeRO: parameter ", f, " has ",
                m.full_params[f].numel(), " elements, the checkpoint's ", numels[f]);
  }
  // Each old shard's pieces are copied into the overlapping parts of this process's pieces.
  std::map<size_t, std::map<std::string, at::Tensor>> by_full;
  std::map<std::pair<size_t, std::string>, int64_t> covered;
  std::string param_groups;
  for (const auto& file : index.at("shards")) {
    const auto path = std::filesystem::path(directory) / file.get<std::string>();
    TORCH_CHECK(std::filesystem::exists(path), "accelerate: ZeRO: missing optimizer shard ",
                path.string());
    const auto shard = safetensors::load_file(path.string());
    if (param_groups.empty()) param_groups = shard.metadata.at("param_groups");
    const Json pieces = Json::parse(shard.metadata.at("zero_pieces"));
    for (const auto& [name, t] : shard.tensors) {
      auto parsed = parse_state_name(name);
      TORCH_CHECK(parsed && parsed->first < pieces.size(), "accelerate: ZeRO: unexpected entry '",
                  name, "' in ", path.string());
      const auto& old = pieces[parsed->first];
      const size_t f = old[0].get<size_t>();
      const int64_t start = old[1].get<int64_t>();
      const int64_t length = old[2].get<int64_t>();
      auto j = f < m.piece_of_full.size() ? m.piece_of_full[f] : std::nullopt;
      if (!j) continue;
      const auto& p = m.pieces[*j];
      const std::string& key = parsed->second;
      if (t.dim() == 0) {
        by_full[f][key] = t.clone();
        continue;
      }
      const int64_t a = std::max(start, p.start);
      const int64_t b = std::min(start + length, p.start + p.length);
      if (a >= b) continue;
      auto& dest = by_full[f][key];
      if (!dest.defined()) dest = at::zeros({p.length}, t.options());
      dest.narrow(0, a - p.start, b - a).copy_(t.narrow(0, a - start, b - a));
      covered[{*j, key}] += b - a;
    }
  }
  for (const auto& [piece_key, count] : covered) {
    TORCH_CHECK(count == m.pieces[piece_key.first].length, "accelerate: ZeRO: the shards in ",
                directory, " cover ", count, " of ", m.pieces[piece_key.first].length,
                " elements of '", piece_key.second, "' for parameter ",
                m.pieces[piece_key.first].full);
  }
  TORCH_CHECK(!param_groups.empty(), "accelerate: ZeRO: ", directory, " lists no shards");
  m.load_pieces(by_full, param_groups);
}

OptimizerStateDict read_sharded_optimizer_state(const std::string& directory) {
  const auto index_path = std::filesystem::path(directory) / kZeroIndexFile;
  std::ifstream in(index_path);
  TORCH_CHECK(in.good(), "accelerate: no sharded optimizer index at ", index_path.string());
  Json index;
  try {
    index = Json::parse(in);
  } catch (const Json::exception& e) {
    TORCH_CHECK(false, "accelerate: ", index_path.string(), " is not valid JSON: ", e.what());
  }
  TORCH_CHECK(index.contains("param_shapes") && index.contains("shards"),
              "accelerate: ", index_path.string(), " lacks param_shapes or shards");
  const auto shapes = index.at("param_shapes").get<std::vector<std::vector<int64_t>>>();
  std::map<size_t, std::map<std::string, at::Tensor>> full;
  std::map<size_t, std::set<size_t>> groups;  // group -> parameters
  std::map<std::pair<size_t, std::string>, int64_t> covered;
  OptimizerStateDict out;
  Json param_groups;
  for (const auto& file : index.at("shards")) {
    const auto path = std::filesystem::path(directory) / file.get<std::string>();
    TORCH_CHECK(std::filesystem::exists(path), "accelerate: missing optimizer shard ",
                path.string());
    const auto shard = safetensors::load_file(path.string());
    const Json pieces = Json::parse(shard.metadata.at("zero_pieces"));
    const Json shard_groups = Json::parse(shard.metadata.at("param_groups"));
    if (param_groups.is_null()) {
      param_groups = shard_groups;
      out.metadata = shard.metadata;
    }
    for (size_t g = 0; g < shard_groups.size(); ++g) {
      for (const auto& j : shard_groups[g]["params"]) {
        groups[g].insert(pieces.at(j.get<size_t>())[0].get<size_t>());
      }
    }
    for (const auto& [name, t] : shard.tensors) {
      auto parsed = parse_state_name(name);
      TORCH_CHECK(parsed && parsed->first < pieces.size(), "accelerate: unexpected entry '", name,
                  "' in ", path.string());
      const auto& piece = pieces[parsed->first];
      const size_t f = piece[0].get<size_t>();
      TORCH_CHECK(f < shapes.size(), "accelerate: ", path.string(), " names parameter ", f, " of ",
                  shapes.size());
      if (t.dim() == 0) {
        full[f][parsed->second] = t.clone();
        continue;
      }
      const int64_t numel = c10::multiply_integers(shapes[f]);
      auto& dest = full[f][parsed->second];
      if (!dest.defined()) dest = at::zeros({numel}, t.options());
      dest.narrow(0, piece[1].get<int64_t>(), piece[2].get<int64_t>()).copy_(t);
      covered[{f, parsed->second}] += piece[2].get<int64_t>();
    }
  }
  TORCH_CHECK(!param_groups.is_null(), "accelerate: ", directory, " lists no shards");
  for (const auto& [key, count] : covered) {
    TORCH_CHECK(count == c10::multiply_integers(shapes[key.first]), "accelerate: the shards in ",
                directory, " cover ", count, " elements of '", key.second, "' for parameter ",
                key.first);
  }
  for (size_t g = 0; g < param_groups.size(); ++g) {
    param_groups[g]["params"] = std::vector<size_t>(groups[g].begin(), groups[g].end());
  }
  for (const char* key :
       {"zero_pieces", "zero_param_numels", "zero_world_size", "zero_rank", "zero_stage"}) {
    out.metadata.erase(key);
  }
  out.metadata["param_groups"] = param_groups.dump();
  for (auto& [f, entries] : full) {
    for (auto& [key, t] : entries) {
      out.tensors.emplace_back(state_name(f, key), t.dim() == 0 ? t : t.view(shapes[f]));
    }
  }
  return out;
}

int64_t ZeroOptimizer::optimizer_state_bytes() const {
  int64_t bytes = 0;
  for (const auto& [name, t] : optimizer_state_dict(impl_->optimizer).tensors) {
    if (name.rfind("state.", 0) == 0) bytes += static_cast<int64_t>(t.nbytes());
  }
  return bytes;
}

int64_t ZeroOptimizer::gradient_bytes() const {
  auto& m = *impl_;
  int64_t bytes = 0;
  for (const auto& g : m.gathers) {
    if (m.options.stage == 1) {
      bytes += g.layout.numel * static_cast<int64_t>(c10::elementSize(g.layout.dtype));
    } else if (auto shard = m.syncs[g.sync]->gradient_shard(g.bucket); shard.defined()) {
      bytes += static_cast<int64_t>(shard.nbytes());
    }
  }
  return bytes;
}

}  // namespace accelerate
