#include "accelerate/optimizer_state.h"

#include "accelerate/safetensors.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <c10/util/Type.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/lbfgs.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <sstream>
#include <string_view>
#include <type_traits>
#include <typeinfo>
#include <utility>

namespace accelerate {

namespace {

using torch::optim::Optimizer;
using torch::optim::OptimizerOptions;
using torch::optim::OptimizerParamState;
// Ordered, so that the param_groups JSON lists options in PyTorch's order.
using Json = nlohmann::ordered_json;

constexpr const char* kArchiveKind = "libtorch-archive";
constexpr const char* kArchiveTensor = "archive";

using StateMap = std::remove_cvref_t<decltype(std::declval<Optimizer&>().state())>;

// LibTorch keys an optimizer's state by the parameter's TensorImpl: its address as text in 1.13
// (what c10::guts::to_string prints), the pointer itself in later releases. Following the map's
// own key type keeps this file free of version checks.
template <class Key = StateMap::key_type>
Key state_key(const at::Tensor& param) {
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream out;
    out << static_cast<const void*>(param.unsafeGetTensorImpl());
    return out.str();
  } else {
    return static_cast<Key>(param.unsafeGetTensorImpl());
  }
}

// ------------------------------------------------------------------ param_groups JSON fields

// Reads one group's options with errors that point at the offending field.
class GroupReader {
 public:
  GroupReader(const Json& group, size_t index) : group_(group), index_(index) {}

  double number(const char* field) const {
    const Json& value = at(field);
    TORCH_CHECK(value.is_number(), "accelerate: param_groups[", index_, "].", field,
                " must be a number, got ", value.dump());
    return value.get<double>();
  }

  bool boolean(const char* field) const {
    const Json& value = at(field);
    TORCH_CHECK(value.is_boolean(), "accelerate: param_groups[", index_, "].", field,
                " must be true or false, got ", value.dump());
    return value.get<bool>();
  }

  std::tuple<double, double> number_pair(const char* field) const {
    const Json& value = at(field);
    TORCH_CHECK(
        value.is_array() && value.size() == 2 && value[0].is_number() && value[1].is_number(),
        "accelerate: param_groups[", index_, "].", field, " must be an array of two numbers, got ",
        value.dump());
    return {value[0].get<double>(), value[1].get<double>()};
  }

 private:
  const Json& at(const char* field) const {
    auto it = group_.find(field);
    TORCH_CHECK(it != group_.end(), "accelerate: param_groups[", index_, "] has no \"", field,
                "\"");
    return *it;
  }

  const Json& group_;
  size_t index_;
};

// LibTorch's optimizers static_cast their groups' options; we check, since a group added with
// another optimizer's options would otherwise be read as garbage.
template <class Options>
const Options& options_as(const OptimizerOptions& options) {
  const auto* typed = dynamic_cast<const Options*>(&options);
  TORCH_CHECK(typed != nullptr, "accelerate: a param group has options of type ",
              c10::demangle(typeid(options).name()), ", expected ", c10::demangle_type<Options>());
  return *typed;
}

template <class State>
const State& state_as(const OptimizerParamState& state) {
  const auto* typed = dynamic_cast<const State*>(&state);
  TORCH_INTERNAL_ASSERT(typed != nullptr, "optimizer state of type ",
                        c10::demangle(typeid(state).name()), ", expected ",
                        c10::demangle_type<State>());
  return *typed;
}

at::Tensor step_tensor(int64_t step) {
  return at::scalar_tensor(step, at::kLong);
}

// The state tensors of one parameter, by PyTorch key. "step" is a 0-dim int64 tensor.
using KeyedTensors = std::vector<std::pair<std::string, at::Tensor>>;
using TensorsByKey = std::map<std::string, at::Tensor>;

// Appends `tensor` under `key` when LibTorch holds one (undefined means "no such entry").
void add_defined(KeyedTensors& out, const char* key, const at::Tensor& tensor) {
  if (tensor.defined()) out.emplace_back(key, tensor);
}

at::Tensor entry(const TensorsByKey& tensors, const std::string& key) {
  auto it = tensors.find(key);
  return it == tensors.end() ? at::Tensor() : it->second;
}

// ------------------------------------------------------------------ one codec per optimizer

// How one LibTorch optimizer's options and per-parameter state map to PyTorch's names.
struct Codec {
  const char* name;
  const std::type_info* type;
  /// Option names in PyTorch's order ("params" excluded).
  std::vector<std::string> option_names;
  /// State keys in PyTorch's order.
  std::vector<std::string> state_keys;
  Json (*options_to_json)(const OptimizerOptions&);
  std::unique_ptr<OptimizerOptions> (*options_from_json)(const GroupReader&);
  /// Keys a parameter's state needs for the next step under these options.
  std::vector<std::string> (*required_keys)(const OptimizerOptions&);
  KeyedTensors (*state_to_tensors)(const OptimizerParamState&);
  /// From validated tensors already in the parameter's device and dtype.
  std::unique_ptr<OptimizerParamState> (*state_from_tensors)(const TensorsByKey&);
  /// The state the optimizer's constructor gives every parameter, for optimizers whose step()
  /// requires one (Adagrad); null for those that create it lazily.
  std::unique_ptr<OptimizerParamState> (*initial_state)(const OptimizerOptions&,
                                                        const at::Tensor& param) = nullptr;
};

// Adam and AdamW are separate LibTorch classes with the same fields.
template <class Options, class State>
Codec adam_codec(const char* name, const std::type_info& type) {
  return Codec{
      .name = name,
      .type = &type,
      .option_names = {"lr", "betas", "eps", "weight_decay", "amsgrad"},
      .state_keys = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
      .options_to_json =
          [](const OptimizerOptions& base) {
            const auto& o = options_as<Options>(base);
            Json j;
            j["lr"] = o.lr();
            j["betas"] = Json::array({std::get<0>(o.betas()), std::get<1>(o.betas())});
            j["eps"] = o.eps();
            j["weight_decay"] = o.weight_decay();
            j["amsgrad"] = o.amsgrad();
            return j;
          },
      .options_from_json = [](const GroupReader& g) -> std::unique_ptr<OptimizerOptions> {
        auto o = std::make_unique<Options>(g.number("lr"));
        o->betas(g.number_pair("betas"));
        o->eps(g.number("eps"));
        o->weight_decay(g.number("weight_decay"));
        o->amsgrad(g.boolean("amsgrad"));
        return o;
      },
      .required_keys =
          [](const OptimizerOptions& base) {
            std::vector<std::string> keys = {"step", "exp_avg", "exp_avg_sq"};
            if (options_as<Options>(base).amsgrad()) keys.emplace_back("max_exp_avg_sq");
            return keys;
          },
      .state_to_tensors =
          [](const OptimizerParamState& base) {
            const auto& s = state_as<State>(base);
            KeyedTensors out = {{"step", step_tensor(s.step())}};
            add_defined(out, "exp_avg", s.exp_avg());
            add_defined(out, "exp_avg_sq", s.exp_avg_sq());
            add_defined(out, "max_exp_avg_sq", s.max_exp_avg_sq());
            return out;
          },
      .state_from_tensors = [](const TensorsByKey& t) -> std::unique_ptr<OptimizerParamState> {
        auto s = std::make_unique<State>();
        s->step(t.at("step").item<int64_t>());
        s->exp_avg(t.at("exp_avg"));
        s->exp_avg_sq(t.at("exp_avg_sq"));
        s->max_exp_avg_sq(entry(t, "max_exp_avg_sq"));
        return s;
      },
  };
}

Codec sgd_codec() {
  namespace o = torch::optim;
  return Codec{
      .name = "SGD",
      .type = &typeid(o::SGD),
      .option_names = {"lr", "momentum", "dampening", "weight_decay", "nesterov"},
      .state_keys = {"momentum_buffer"},
      .options_to_json =
          [](const OptimizerOptions& base) {
            const auto& opt = options_as<o::SGDOptions>(base);
            Json j;
            j["lr"] = opt.lr();
            j["momentum"] = opt.momentum();
            j["dampening"] = opt.dampening();
            j["weight_decay"] = opt.weight_decay();
            j["nesterov"] = opt.nesterov();
            return j;
          },
      .options_from_json = [](const GroupReader& g) -> std::unique_ptr<OptimizerOptions> {
        auto opt = std::make_unique<o::SGDOptions>(g.number("lr"));
        opt->momentum(g.number("momentum"));
        opt->dampening(g.number("dampening"));
        opt->weight_decay(g.number("weight_decay"));
        opt->nesterov(g.boolean("nesterov"));
        return opt;
      },
      // SGD creates state only to hold the momentum buffer, and reads it whenever state exists.
      .required_keys =
          [](const OptimizerOptions&) { return std::vector<std::string>{"momentum_buffer"}; },
      .state_to_tensors =
          [](const OptimizerParamState& base) {
            KeyedTensors out;
            add_defined(out, "momentum_buffer", state_as<o::SGDParamState>(base).momentum_buffer());
            return out;
          },
      .state_from_tensors = [](const TensorsByKey& t) -> std::unique_ptr<OptimizerParamState> {
        auto s = std::make_unique<o::SGDParamState>();
        s->momentum_buffer(t.at("momentum_buffer"));
        return s;
      },
  };
}

Codec rmsprop_codec() {
  namespace o = torch::optim;
  return Codec{
      .name = "RMSprop",
      .type = &typeid(o::RMSprop),
      .option_names = {"lr", "alpha", "eps", "weight_decay", "momentum", "centered"},
      .state_keys = {"step", "square_avg", "momentum_buffer", "grad_avg"},
      .options_to_json =
          [](const OptimizerOptions& base) {
            const auto& opt = options_as<o::RMSpropOptions>(base);
            Json j;
            j["lr"] = opt.lr();
            j["alpha"] = opt.alpha();
            j["eps"] = opt.eps();
            j["weight_decay"] = opt.weight_decay();
            j["momentum"] = opt.momentum();
            j["centered"] = opt.centered();
            return j;
          },
      .options_from_json = [](const GroupReader& g) -> std::unique_ptr<OptimizerOptions> {
        auto opt = std::make_unique<o::RMSpropOptions>(g.number("lr"));
        opt->alpha(g.number("alpha"));
        opt->eps(g.number("eps"));
        opt->weight_decay(g.number("weight_decay"));
        opt->momentum(g.number("momentum"));
        opt->centered(g.boolean("centered"));
        return opt;
      },
      .required_keys =
          [](const OptimizerOptions& base) {
            const auto& opt = options_as<o::RMSpropOptions>(base);
            std::vector<std::string> keys = {"step", "square_avg"};
            if (opt.momentum() > 0) keys.emplace_back("momentum_buffer");
            if (opt.centered()) keys.emplace_back("grad_avg");
            return keys;
          },
      .state_to_tensors =
          [](const OptimizerParamState& base) {
            const auto& s = state_as<o::RMSpropParamState>(base);
            KeyedTensors out = {{"step", step_tensor(s.step())}};
            add_defined(out, "square_avg", s.square_avg());
            add_defined(out, "momentum_buffer", s.momentum_buffer());
            add_defined(out, "grad_avg", s.grad_avg());
            return out;
          },
      .state_from_tensors = [](const TensorsByKey& t) -> std::unique_ptr<OptimizerParamState> {
        auto s = std::make_unique<o::RMSpropParamState>();
        s->step(t.at("step").item<int64_t>());
        s->square_avg(t.at("square_avg"));
        s->momentum_buffer(entry(t, "momentum_buffer"));
        s->grad_avg(entry(t, "grad_avg"));
        return s;
      },
  };
}

Codec adagrad_codec() {
  namespace o = torch::optim;
  return Codec{
      .name = "Adagrad",
      .type = &typeid(o::Adagrad),
      .option_names = {"lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"},
      .state_keys = {"step", "sum"},
      .options_to_json =
          [](const OptimizerOptions& base) {
            const auto& opt = options_as<o::AdagradOptions>(base);
            Json j;
            j["lr"] = opt.lr();
            j["lr_decay"] = opt.lr_decay();
            j["weight_decay"] = opt.weight_decay();
            j["initial_accumulator_value"] = opt.initial_accumulator_value();
            j["eps"] = opt.eps();
            return j;
          },
      .options_from_json = [](const GroupReader& g) -> std::unique_ptr<OptimizerOptions> {
        auto opt = std::make_unique<o::AdagradOptions>(g.number("lr"));
        opt->lr_decay(g.number("lr_decay"));
        opt->weight_decay(g.number("weight_decay"));
        opt->initial_accumulator_value(g.number("initial_accumulator_value"));
        opt->eps(g.number("eps"));
        return opt;
      },
      .required_keys =
          [](const OptimizerOptions&) {
            return std::vector<std::string>{"step", "sum"};
          },
      .state_to_tensors =
          [](const OptimizerParamState& base) {
            const auto& s = state_as<o::AdagradParamState>(base);
            KeyedTensors out = {{"step", step_tensor(s.step())}};
            add_defined(out, "sum", s.sum());
            return out;
          },
      .state_from_tensors = [](const TensorsByKey& t) -> std::unique_ptr<OptimizerParamState> {
        auto s = std::make_unique<o::AdagradParamState>();
        s->step(t.at("step").item<int64_t>());
        s->sum(t.at("sum"));
        return s;
      },
      // LibTorch's Adagrad fills every parameter's state in its constructor and its step()
      // fails on a parameter without one, so a parameter the checkpoint has no state for starts
      // over as a fresh Adagrad would have it.
      .initial_state = [](const OptimizerOptions& base,
                          const at::Tensor& param) -> std::unique_ptr<OptimizerParamState> {
        auto s = std::make_unique<o::AdagradParamState>();
        s->step(0);
        s->sum(at::full_like(param, options_as<o::AdagradOptions>(base).initial_accumulator_value(),
                             at::MemoryFormat::Preserve));
        return s;
      },
  };
}

const std::vector<Codec>& codecs() {
  namespace o = torch::optim;
  static const std::vector<Codec> kCodecs = {
      adam_codec<o::AdamOptions, o::AdamParamState>("Adam", typeid(o::Adam)),
      adam_codec<o::AdamWOptions, o::AdamWParamState>("AdamW", typeid(o::AdamW)),
      sgd_codec(),
      rmsprop_codec(),
      adagrad_codec(),
  };
  return kCodecs;
}

// The codec of exactly this class: a subclass may keep state we do not know of, so it takes
// the archive fallback rather than its base's codec.
const Codec* codec_of(const Optimizer& optimizer) {
  for (const auto& codec : codecs()) {
    if (typeid(optimizer) == *codec.type) return &codec;
  }
  return nullptr;
}

const Codec* codec_named(const std::string& name) {
  for (const auto& codec : codecs()) {
    if (name == codec.name) return &codec;
  }
  return nullptr;
}

std::string class_name(const Optimizer& optimizer) {
  return c10::demangle(typeid(optimizer).name());
}

// What an error calls the optimizer: its codec's name, else its C++ class.
std::string kind_of(const Optimizer& optimizer) {
  const Codec* codec = codec_of(optimizer);
  return codec != nullptr ? codec->name : class_name(optimizer);
}

// nlohmann writes NaN and infinity as null, which would not load back.
void check_finite(const Json& value, size_t group, const std::string& field) {
  if (value.is_array()) {
    for (const auto& element : value) check_finite(element, group, field);
  } else if (value.is_number_float()) {
    TORCH_CHECK(std::isfinite(value.get<double>()), "accelerate: cannot save param group ", group,
                "'s ", field, " = ", value.get<double>(), ": only finite values are stored");
  }
}

// ------------------------------------------------------------------ saving

OptimizerStateDict native_state_dict(const Optimizer& optimizer, const Codec& codec) {
  OptimizerStateDict out;
  Json groups = Json::array();
  int64_t index = 0;
  for (size_t g = 0; g < optimizer.param_groups().size(); ++g) {
    const auto& group = optimizer.param_groups()[g];
    TORCH_CHECK(group.has_options(), "accelerate: param group ", g, " has no options");
    Json json = codec.options_to_json(group.options());
    for (const auto& [field, value] : json.items()) check_finite(value, g, field);
    Json params = Json::array();
    for (const auto& param : group.params()) {
      params.push_back(index);
      auto it = optimizer.state().find(state_key(param));
      if (it != optimizer.state().end() && it->second != nullptr) {
        for (auto& [key, tensor] : codec.state_to_tensors(*it->second)) {
          out.tensors.emplace_back("state." + std::to_string(index) + "." + key, tensor);
        }
      }
      ++index;
    }
    json["params"] = std::move(params);
    groups.push_back(std::move(json));
  }
  out.metadata = {{"format", kOptimizerStateFormat},
                  {"optimizer", codec.name},
                  {"param_groups", groups.dump()}};
  return out;
}

// LibTorch's LBFGS keeps `al`, scratch space of its two-loop recursion, as history_size tensors
// that stay undefined until that many updates were made, and its save() then fails ("Cannot
// access storage of UndefinedTensorImpl"). We save a stand-in LBFGS over the same parameters
// and options whose state shares the tensors but has no `al`: step() recreates it when absent
// and overwrites every entry before reading it, so nothing a later step computes changes.
void save_lbfgs(const torch::optim::LBFGS& optimizer, torch::serialize::OutputArchive& archive) {
  namespace o = torch::optim;
  o::LBFGS stand_in(optimizer.param_groups(), options_as<o::LBFGSOptions>(optimizer.defaults()));
  for (const auto& [key, value] : optimizer.state()) {
    if (value == nullptr) continue;
    auto state = std::make_unique<o::LBFGSParamState>(state_as<o::LBFGSParamState>(*value));
    state->al(c10::nullopt);
    stand_in.state()[key] = std::move(state);
  }
  stand_in.save(archive);
}

OptimizerStateDict archive_state_dict(const Optimizer& optimizer) {
  std::ostringstream bytes;
  try {
    torch::serialize::OutputArchive archive;
    if (typeid(optimizer) == typeid(torch::optim::LBFGS)) {
      save_lbfgs(static_cast<const torch::optim::LBFGS&>(optimizer), archive);
    } else {
      optimizer.save(archive);
    }
    archive.save_to(bytes);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "accelerate: cannot save the state of ", class_name(optimizer),
                ": it is none of Adam, AdamW, SGD, RMSprop, Adagrad, and LibTorch's "
                "Optimizer::save failed: ",
                e.what_without_backtrace());
  }
  const std::string data = bytes.str();
  at::Tensor tensor = at::empty({static_cast<int64_t>(data.size())}, at::kByte);
  std::memcpy(tensor.data_ptr<uint8_t>(), data.data(), data.size());
  OptimizerStateDict out;
  out.tensors.emplace_back(kArchiveTensor, std::move(tensor));
  out.metadata = {{"format", kOptimizerStateFormat},
                  {"optimizer", kArchiveKind},
                  {"class", class_name(optimizer)}};
  return out;
}

// ------------------------------------------------------------------ loading

struct StateName {
  int64_t index = 0;
  std::string key;
};

// "state.<index>.<key>", the index in canonical decimal (no sign, no leading zero).
StateName parse_state_name(const std::string& name) {
  constexpr std::string_view kPrefix = "state.";
  const auto malformed = [&] {
    TORCH_CHECK(false, "accelerate: malformed optimizer state tensor name \"", name,
                "\" (expected state.<parameter index>.<key>, e.g. state.0.exp_avg)");
  };
  if (name.compare(0, kPrefix.size(), kPrefix) != 0) malformed();
  const size_t begin = kPrefix.size();
  const size_t dot = name.find('.', begin);
  if (dot == std::string::npos || dot == begin || dot + 1 == name.size()) malformed();
  const std::string digits = name.substr(begin, dot - begin);
  // 18 digits cannot overflow int64.
  if (digits.size() > 18 || (digits.size() > 1 && digits[0] == '0')) malformed();
  for (char c : digits) {
    if (c < '0' || c > '9') malformed();
  }
  return {std::stoll(digits), name.substr(dot + 1)};
}

// The saved step as the exact integer LibTorch keeps.
at::Tensor load_step(const std::string& name, const at::Tensor& tensor) {
  TORCH_CHECK(tensor.dim() == 0, "accelerate: ", name, " must be a 0-dim tensor, got shape ",
              tensor.sizes());
  int64_t step = 0;
  if (at::isIntegralType(tensor.scalar_type(), /*includeBool=*/false)) {
    step = tensor.item<int64_t>();
  } else if (at::isFloatingType(tensor.scalar_type())) {
    // PyTorch keeps step as a float tensor; accept it when it holds a whole number.
    const double value = tensor.item<double>();
    TORCH_CHECK(std::isfinite(value) && value == std::floor(value) && std::abs(value) < 9.2e18,
                "accelerate: ", name, " must hold a whole number, got ", value);
    step = static_cast<int64_t>(value);
  } else {
    TORCH_CHECK(false, "accelerate: ", name, " must be an integer tensor, got ",
                tensor.scalar_type());
  }
  TORCH_CHECK(step >= 0, "accelerate: ", name, " must not be negative, got ", step);
  return step_tensor(step);
}

std::string metadata_entry(const OptimizerStateDict& state, const std::string& key) {
  auto it = state.metadata.find(key);
  TORCH_CHECK(it != state.metadata.end(), "accelerate: the optimizer state has no \"", key,
              "\" metadata entry");
  return it->second;
}

void load_native(Optimizer& optimizer, const Codec& codec, const OptimizerStateDict& state) {
  auto& groups = optimizer.param_groups();

  // 1. param_groups: hyper-parameters, and which saved index names which parameter.
  Json saved_groups;
  try {
    saved_groups = Json::parse(metadata_entry(state, "param_groups"));
  } catch (const Json::exception& e) {
    TORCH_CHECK(false, "accelerate: the param_groups metadata is not valid JSON: ", e.what());
  }
  TORCH_CHECK(saved_groups.is_array(),
              "accelerate: the param_groups metadata must be a JSON array, got ",
              saved_groups.dump());
  TORCH_CHECK(saved_groups.size() == groups.size(), "accelerate: the checkpoint holds ",
              saved_groups.size(), " param groups, the optimizer has ", groups.size());

  std::vector<std::unique_ptr<OptimizerOptions>> new_options;
  struct Target {
    at::Tensor param;
    size_t group;
  };
  std::map<int64_t, Target> targets;
  for (size_t g = 0; g < saved_groups.size(); ++g) {
    const Json& saved = saved_groups[g];
    TORCH_CHECK(saved.is_object(), "accelerate: param_groups[", g, "] must be a JSON object, got ",
                saved.dump());
    for (const auto& [field, value] : saved.items()) {
      const bool known = field == "params" ||
                         std::find(codec.option_names.begin(), codec.option_names.end(), field) !=
                             codec.option_names.end();
      TORCH_CHECK(known, "accelerate: param_groups[", g, "] has an unknown field \"", field,
                  "\" for ", codec.name);
    }
    new_options.push_back(codec.options_from_json(GroupReader(saved, g)));

    auto params = saved.find("params");
    TORCH_CHECK(params != saved.end(), "accelerate: param_groups[", g, "] has no \"params\"");
    TORCH_CHECK(params->is_array(), "accelerate: param_groups[", g,
                "].params must be an array of parameter indices, got ", params->dump());
    const auto& current = groups[g].params();
    TORCH_CHECK(params->size() == current.size(), "accelerate: param group ", g, " holds ",
                params->size(), " parameters in the checkpoint, ", current.size(),
                " in the optimizer");
    for (size_t i = 0; i < current.size(); ++i) {
      const Json& id = (*params)[i];
      TORCH_CHECK(id.is_number_integer() && id.get<int64_t>() >= 0, "accelerate: param_groups[", g,
                  "].params[", i, "] must be a non-negative integer, got ", id.dump());
      const bool fresh = targets.emplace(id.get<int64_t>(), Target{current[i], g}).second;
      TORCH_CHECK(fresh, "accelerate: parameter index ", id.get<int64_t>(),
                  " appears twice in param_groups");
    }
  }

  // 2. State tensors, grouped by parameter.
  std::map<int64_t, TensorsByKey> saved_state;
  for (const auto& [name, tensor] : state.tensors) {
    const StateName parsed = parse_state_name(name);
    auto target = targets.find(parsed.index);
    TORCH_CHECK(target != targets.end(), "accelerate: ", name, " is for parameter ", parsed.index,
                ", which param_groups does not list");
    TORCH_CHECK(std::find(codec.state_keys.begin(), codec.state_keys.end(), parsed.key) !=
                    codec.state_keys.end(),
                "accelerate: ", name, " has an unknown key \"", parsed.key, "\" for ", codec.name,
                " (expected one of ", c10::Join(", ", codec.state_keys), ")");
    TORCH_CHECK(tensor.defined(), "accelerate: ", name, " is an undefined tensor");
    const bool fresh = saved_state[parsed.index].emplace(parsed.key, tensor).second;
    TORCH_CHECK(fresh, "accelerate: the optimizer state holds ", name, " twice");
  }

  // 3. Every parameter's new state, in fresh memory of its device and dtype.
  StateMap new_state;
  for (const auto& [index, tensors] : saved_state) {
    const Target& target = targets.at(index);
    const std::string prefix = "state." + std::to_string(index) + ".";
    for (const auto& key : codec.required_keys(*new_options[target.group])) {
      TORCH_CHECK(tensors.count(key) != 0, "accelerate: the checkpoint holds ", codec.name,
                  " state for parameter ", index, " but no ", prefix, key,
                  ", which its param group's options need");
    }
    TensorsByKey converted;
    for (const auto& [key, tensor] : tensors) {
      if (key == "step") {
        converted.emplace(key, load_step(prefix + key, tensor));
        continue;
      }
      TORCH_CHECK(tensor.sizes() == target.param.sizes(), "accelerate: ", prefix, key,
                  " has shape ", tensor.sizes(), " but parameter ", index, " has shape ",
                  target.param.sizes());
      // detach: a caller's tensor that requires grad must not give the state a grad_fn.
      converted.emplace(
          key, at::empty_like(target.param, at::MemoryFormat::Preserve).copy_(tensor.detach()));
    }
    new_state[state_key(target.param)] = codec.state_from_tensors(converted);
  }
  if (codec.initial_state != nullptr) {
    for (const auto& [index, target] : targets) {
      auto& slot = new_state[state_key(target.param)];
      if (slot == nullptr) slot = codec.initial_state(*new_options[target.group], target.param);
    }
  }

  // 4. Commit: nothing below can fail on a well-formed optimizer.
  optimizer.state() = std::move(new_state);
  for (size_t g = 0; g < groups.size(); ++g) groups[g].set_options(std::move(new_options[g]));
}

void load_archive(Optimizer& optimizer, const OptimizerStateDict& state) {
  auto saved_class = state.metadata.find("class");
  if (saved_class != state.metadata.end()) {
    TORCH_CHECK(saved_class->second == class_name(optimizer),
                "accelerate: the checkpoint holds the LibTorch archive of a ", saved_class->second,
                ", the optimizer is a ", class_name(optimizer));
  }
  TORCH_CHECK(state.tensors.size() == 1 && state.tensors[0].first == kArchiveTensor,
              "accelerate: a libtorch-archive optimizer state must hold exactly one tensor, \"",
              kArchiveTensor, "\"");
  const at::Tensor bytes = state.tensors[0].second;
  TORCH_CHECK(bytes.defined() && bytes.scalar_type() == at::kByte && bytes.dim() == 1,
              "accelerate: the optimizer state's \"", kArchiveTensor,
              "\" must be a 1-dim uint8 tensor");
  const at::Tensor data = bytes.to(at::kCPU).contiguous();

  // Parse and read the group options before touching the optimizer: LibTorch's load() ignores
  // the options, and fails midway on a mismatch.
  auto& groups = optimizer.param_groups();
  torch::serialize::InputArchive archive;
  std::vector<std::unique_ptr<OptimizerOptions>> new_options(groups.size());
  int64_t saved_group_count = -1;
  std::vector<int64_t> saved_group_sizes;
  try {
    archive.load_from(reinterpret_cast<const char*>(data.data_ptr<uint8_t>()),
                      static_cast<size_t>(data.numel()));
    torch::serialize::InputArchive groups_archive;
    if (archive.try_read("param_groups", groups_archive)) {
      at::Tensor count;
      groups_archive.read("param_groups/size", count);
      saved_group_count = count.item<int64_t>();
      for (int64_t g = 0; g < saved_group_count; ++g) {
        torch::serialize::InputArchive group_archive;
        groups_archive.read("param_groups/" + std::to_string(g), group_archive);
        at::Tensor size;
        group_archive.read("params/size", size);
        saved_group_sizes.push_back(size.item<int64_t>());
        torch::serialize::InputArchive options_archive;
        if (static_cast<size_t>(g) < groups.size() && groups[g].has_options() &&
            group_archive.try_read("options", options_archive)) {
          new_options[g] = groups[g].options().clone();
          new_options[g]->serialize(options_archive);
        }
      }
    }
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "accelerate: cannot read the LibTorch archive of ", class_name(optimizer),
                " in the optimizer state: ", e.what_without_backtrace());
  }
  if (saved_group_count >= 0) {
    TORCH_CHECK(saved_group_count == static_cast<int64_t>(groups.size()),
                "accelerate: the checkpoint holds ", saved_group_count,
                " param groups, the optimizer has ", groups.size());
    for (size_t g = 0; g < groups.size(); ++g) {
      TORCH_CHECK(saved_group_sizes[g] == static_cast<int64_t>(groups[g].params().size()),
                  "accelerate: param group ", g, " holds ", saved_group_sizes[g],
                  " parameters in the checkpoint, ", groups[g].params().size(),
                  " in the optimizer");
    }
  }

  // LibTorch's load() merges into the existing state and may still throw: start from empty
  // state, and put everything back if it fails.
  StateMap previous;
  for (const auto& [key, value] : optimizer.state()) {
    previous.emplace(key, value == nullptr ? nullptr : value->clone());
  }
  try {
    optimizer.state().clear();
    optimizer.load(archive);
  } catch (const c10::Error& e) {
    optimizer.state() = std::move(previous);
    TORCH_CHECK(false, "accelerate: LibTorch could not load the state of ", class_name(optimizer),
                ": ", e.what_without_backtrace());
  } catch (...) {
    optimizer.state() = std::move(previous);
    throw;
  }
  for (size_t g = 0; g < groups.size(); ++g) {
    if (new_options[g] != nullptr) groups[g].set_options(std::move(new_options[g]));
  }
}

}  // namespace

OptimizerStateDict optimizer_state_dict(const Optimizer& optimizer) {
  const Codec* codec = codec_of(optimizer);
  return codec != nullptr ? native_state_dict(optimizer, *codec) : archive_state_dict(optimizer);
}

void load_optimizer_state_dict(Optimizer& optimizer, const OptimizerStateDict& state) {
  const std::string format = metadata_entry(state, "format");
  TORCH_CHECK(format == kOptimizerStateFormat, "accelerate: unknown optimizer state format \"",
              format, "\" (expected \"", kOptimizerStateFormat, "\")");
  const std::string kind = metadata_entry(state, "optimizer");
  const Codec* codec = codec_of(optimizer);
  if (kind == kArchiveKind) {
    TORCH_CHECK(codec == nullptr, "accelerate: the checkpoint holds a LibTorch archive (",
                state.metadata.count("class") != 0 ? state.metadata.at("class") : "unknown class",
                "), the optimizer is ", kind_of(optimizer));
    load_archive(optimizer, state);
    return;
  }
  const Codec* saved = codec_named(kind);
  TORCH_CHECK(saved != nullptr, "accelerate: the checkpoint holds state of an unknown optimizer \"",
              kind, "\" (expected Adam, AdamW, SGD, RMSprop, Adagrad or ", kArchiveKind, ")");
  TORCH_CHECK(saved == codec, "accelerate: the checkpoint holds ", kind,
              " state, the optimizer is ", kind_of(optimizer));
  load_native(optimizer, *codec, state);
}

void save_optimizer_state(const Optimizer& optimizer, const std::string& path) {
  const OptimizerStateDict state = optimizer_state_dict(optimizer);
  safetensors::save_file(state.tensors, path, state.metadata);
}

void load_optimizer_state(Optimizer& optimizer, const std::string& path) {
  // Tensors from load_file may alias the file's mapping; load_optimizer_state_dict copies every
  // one into fresh memory.
  const safetensors::SafetensorsFile file = safetensors::load_file(path);
  load_optimizer_state_dict(optimizer, {file.tensors, file.metadata});
}

}  // namespace accelerate
