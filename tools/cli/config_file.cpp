// The config file shared with Python Accelerate: where it lives, reading it, writing it.
//
// Writing goes through our own small emitter rather than YAML::Emitter: yaml-cpp writes the
// string "no" as a plain `no`, which PyYAML (YAML 1.1) reads back as the boolean false, so
// `mixed_precision: no` would not survive a round trip through Python. Every string we write is
// quoted whenever a YAML 1.1 reader could take it for something else.
#include "config_file.h"

#include "command.h"
#include "sharding.h"

#include <fcntl.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <set>
#include <sstream>

extern char** environ;

namespace accelerate::cli {
namespace {

namespace fs = std::filesystem;

// Tag yaml-cpp gives quoted and block scalars, and that we give the strings we create: "this is
// a string whatever it looks like". Plain scalars read from a file carry "?" instead.
constexpr const char* kStringTag = "!";

std::string env_value(const std::map<std::string, std::string>& environment,
                      const std::string& name) {
  auto it = environment.find(name);
  return it == environment.end() ? std::string() : it->second;
}

// Python's os.path.expanduser for the "~" and "~/..." forms, the only ones its defaults produce.
// HOME wins over the password database, as in Python, so tests and containers can redirect it.
std::string expand_user(const std::string& path,
                        const std::map<std::string, std::string>& environment) {
  if (path.empty() || path[0] != '~' || (path.size() > 1 && path[1] != '/')) return path;
  std::string home = env_value(environment, "HOME");
  if (home.empty()) {
    if (const passwd* pw = ::getpwuid(::getuid()); pw != nullptr && pw->pw_dir != nullptr) {
      home = pw->pw_dir;
    }
  }
  if (home.empty()) return path;
  return home + path.substr(1);
}

std::string lower(std::string text) {
  std::transform(text.begin(), text.end(), text.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return text;
}

// ------------------------------------------------------------------ emitting YAML and JSON

// Words a YAML 1.1 reader (PyYAML) or yaml-cpp turns into booleans or null when unquoted.
bool is_special_word(const std::string& text) {
  static const std::set<std::string> words = {"y",     "n",  "yes", "no",   "true",
                                              "false", "on", "off", "null", "~"};
  return words.count(lower(text)) != 0;
}

std::string double_quoted(const std::string& text) {
  std::string out = "\"";
  for (unsigned char c : text) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\r':
        out += "\\r";
        break;
      default:
        if (c < 0x20 || c == 0x7f) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

// `text` as a YAML scalar that every reader takes for this exact string. Errs towards quoting:
// a needless quote costs nothing, a missing one changes the value's type.
std::string yaml_string(const std::string& text) {
  const bool has_control =
      std::any_of(text.begin(), text.end(), [](unsigned char c) { return c < 0x20 || c == 0x7f; });
  if (has_control) return double_quoted(text);
  const bool needs_quotes =
      text.empty() || is_special_word(text) ||
      std::string_view("-?:,[]{}#&*!|>'\"%@` +.0123456789").find(text.front()) !=
          std::string_view::npos ||
      text.back() == ' ' || text.back() == ':' || text.find(": ") != std::string::npos ||
      text.find(" #") != std::string::npos;
  if (!needs_quotes) return text;
  std::string out = "'";
  for (char c : text) out += c == '\'' ? std::string("''") : std::string(1, c);
  return out + "'";
}

bool is_string_node(const YAML::Node& node) {
  return node.Tag() == kStringTag;
}

std::string yaml_scalar(const YAML::Node& node) {
  if (node.IsNull()) return "null";
  // A plain scalar read from a file is written back plain: it then means what it meant there.
  return is_string_node(node) ? yaml_string(node.Scalar()) : node.Scalar();
}

// Keys in PyYAML's safe_dump order (sorted), which is also the order of Python's files.
std::vector<std::pair<std::string, YAML::Node>> sorted_entries(const YAML::Node& map) {
  std::vector<std::pair<std::string, YAML::Node>> entries;
  for (const auto& entry : map) {
    entries.emplace_back(entry.first.IsScalar() ? entry.first.Scalar() : YAML::Dump(entry.first),
                         entry.second);
  }
  std::sort(entries.begin(), entries.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  return entries;
}

bool is_nonempty_collection(const YAML::Node& node) {
  return (node.IsMap() || node.IsSequence()) && node.size() > 0;
}

std::string empty_or_scalar(const YAML::Node& node) {
  if (node.IsMap()) return "{}";
  if (node.IsSequence()) return "[]";
  return yaml_scalar(node);
}

void emit_yaml_map(std::string& out, const YAML::Node& map, int indent);

// Sequence items sit at their key's indentation, as PyYAML writes them.
void emit_yaml_sequence(std::string& out, const YAML::Node& sequence, int indent) {
  for (const auto& item : sequence) {
    out += std::string(static_cast<size_t>(indent), ' ') + "-";
    if (!is_nonempty_collection(item)) {
      out += " " + empty_or_scalar(item) + "\n";
    } else if (item.IsMap()) {
      out += "\n";
      emit_yaml_map(out, item, indent + 2);
    } else {
      out += "\n";
      emit_yaml_sequence(out, item, indent + 2);
    }
  }
}

void emit_yaml_entry(std::string& out, const std::string& key, const YAML::Node& value,
                     int indent) {
  out += std::string(static_cast<size_t>(indent), ' ') + yaml_string(key) + ":";
  if (!is_nonempty_collection(value)) {
    out += " " + empty_or_scalar(value) + "\n";
  } else if (value.IsMap()) {
    out += "\n";
    emit_yaml_map(out, value, indent + 2);
  } else {
    out += "\n";
    emit_yaml_sequence(out, value, indent);
  }
}

void emit_yaml_map(std::string& out, const YAML::Node& map, int indent) {
  for (const auto& [key, value] : sorted_entries(map)) emit_yaml_entry(out, key, value, indent);
}

// The text of one value on its own, for ClusterConfig::passthrough.
std::string yaml_value_text(const YAML::Node& node) {
  if (!is_nonempty_collection(node)) return empty_or_scalar(node);
  std::string out;
  if (node.IsMap()) {
    emit_yaml_map(out, node, 0);
  } else {
    emit_yaml_sequence(out, node, 0);
  }
  return out;
}

bool is_json_number(const std::string& text) {
  std::size_t i = 0;
  const std::size_t n = text.size();
  auto digits = [&] {
    const std::size_t start = i;
    while (i < n && std::isdigit(static_cast<unsigned char>(text[i]))) ++i;
    return i > start;
  };
  if (i < n && text[i] == '-') ++i;
  if (i < n && text[i] == '0') {
    ++i;
  } else if (!digits()) {
    return false;
  }
  if (i < n && text[i] == '.') {
    ++i;
    if (!digits()) return false;
  }
  if (i < n && (text[i] == 'e' || text[i] == 'E')) {
    ++i;
    if (i < n && (text[i] == '+' || text[i] == '-')) ++i;
    if (!digits()) return false;
  }
  return i == n;
}

// A plain YAML scalar as the JSON value a YAML 1.1 reader would have made of it.
std::string json_scalar(const YAML::Node& node) {
  if (node.IsNull()) return "null";
  const std::string& text = node.Scalar();
  if (is_string_node(node)) return double_quoted(text);
  const std::string word = lower(text);
  if (word == "true" || word == "yes" || word == "on") return "true";
  if (word == "false" || word == "no" || word == "off") return "false";
  if (word == "null" || word == "~") return "null";
  if (is_json_number(text)) return text;
  return double_quoted(text);
}

// Python's json.dumps(indent=2, sort_keys=True).
void emit_json(std::string& out, const YAML::Node& node, int indent) {
  const std::string pad(static_cast<size_t>(indent + 2), ' ');
  if (node.IsMap()) {
    if (node.size() == 0) {
      out += "{}";
      return;
    }
    out += "{\n";
    bool first = true;
    for (const auto& [key, value] : sorted_entries(node)) {
      out += (first ? "" : ",\n") + pad + double_quoted(key) + ": ";
      emit_json(out, value, indent + 2);
      first = false;
    }
    out += "\n" + std::string(static_cast<size_t>(indent), ' ') + "}";
  } else if (node.IsSequence()) {
    if (node.size() == 0) {
      out += "[]";
      return;
    }
    out += "[\n";
    bool first = true;
    for (const auto& item : node) {
      out += (first ? "" : ",\n") + pad;
      emit_json(out, item, indent + 2);
      first = false;
    }
    out += "\n" + std::string(static_cast<size_t>(indent), ' ') + "]";
  } else {
    out += json_scalar(node);
  }
}

YAML::Node string_node(const std::string& text) {
  YAML::Node node(text);
  node.SetTag(kStringTag);
  return node;
}

using Entries = std::map<std::string, YAML::Node>;

bool is_digits(const std::string& text) {
  return !text.empty() && std::all_of(text.begin(), text.end(),
                                      [](unsigned char c) { return std::isdigit(c) != 0; });
}

// One value of fsdp_config / deepspeed_config as PyYAML's safe_dump writes what Python's
// questionnaire stores there: booleans and numbers plain (floats always with a '.', as PyYAML
// writes 1e-05 as 1.0e-05), enum names and paths as strings, quoted where YAML 1.1 needs it.
std::string plugin_value_yaml(ShardingPlugin plugin, const std::string& key,
                              const std::string& value) {
  const ShardingSetting* setting = find_sharding_file_key(plugin, key);
  if (setting == nullptr) return value;  // gradient_accumulation_steps: a whole number
  switch (setting->kind) {
    case ShardingValueKind::kBool:
    case ShardingValueKind::kCount:
      return value;
    case ShardingValueKind::kNumber:
      if (value.find('.') == std::string::npos && value.find('e') != std::string::npos) {
        return std::string(value).insert(value.find('e'), ".0");
      }
      return value;
    case ShardingValueKind::kChoice:
    case ShardingValueKind::kNamedNumber:
      // zero_stage: 2 and an older file's fsdp_sharding_strategy: 1 are numbers in Python.
      return is_digits(value) ? value : yaml_string(value);
    case ShardingValueKind::kLowerChoice:
    case ShardingValueKind::kText:
      break;
  }
  return yaml_string(value);
}

// The mapping as a node, through its YAML text: parsed scalars carry the tags the emitters go by
// (quoted: a string; plain: what it looks like), so both the YAML and the JSON writer get every
// value's type right.
YAML::Node plugin_node(ShardingPlugin plugin, const PluginConfig& section) {
  std::map<std::string, std::string> lines;
  for (const auto& [key, value] : section.values) {
    lines[key] = yaml_string(key) + ": " + plugin_value_yaml(plugin, key, value) + "\n";
  }
  for (const auto& [key, text] : section.passthrough) {
    const YAML::Node value = YAML::Load(text);
    std::string entry;
    emit_yaml_entry(entry, key, value, 0);
    lines[key] = entry;
  }
  std::string text;
  for (const auto& [key, line] : lines) text += line;
  return YAML::Load(text.empty() ? "{}" : text);
}

// Every key the file will hold, typed fields and passthrough alike, sorted. Kept in a std::map
// rather than a YAML::Node map: assigning into a yaml-cpp map node aliases nodes, which
// scrambled values when we tried it.
Entries config_entries(const ClusterConfig& config) {
  Entries entries;
  for (const auto& [key, text] : config.passthrough) entries[key] = YAML::Load(text);
  auto put_string = [&](const char* key, const std::optional<std::string>& value) {
    if (value) entries[key] = string_node(*value);
  };
  auto put = [&](const char* key, const auto& value) {
    if (value) entries[key] = YAML::Node(*value);
  };
  put_string("compute_environment", config.compute_environment);
  put_string("distributed_type", config.distributed_type);
  put_string("mixed_precision", config.mixed_precision);
  put("num_processes", config.num_processes);
  put("num_machines", config.num_machines);
  put("machine_rank", config.machine_rank);
  put_string("main_process_ip", config.main_process_ip);
  put("main_process_port", config.main_process_port);
  put("use_cpu", config.use_cpu);
  put_string("gpu_ids", config.gpu_ids);
  put_string("rdzv_backend", config.rdzv_backend);
  put("same_network", config.same_network);
  put("debug", config.debug);
  put("downcast_bf16", config.downcast_bf16);
  // Python Accelerate rejects files with keys it does not know: the default stays unwritten so
  // that most of our files still load there.
  if (config.gradient_accumulation_steps && *config.gradient_accumulation_steps != 1) {
    entries["gradient_accumulation_steps"] = YAML::Node(*config.gradient_accumulation_steps);
  }
  if (config.fsdp_config) {
    entries["fsdp_config"] = plugin_node(ShardingPlugin::kFsdp, *config.fsdp_config);
  }
  if (config.deepspeed_config) {
    entries["deepspeed_config"] = plugin_node(ShardingPlugin::kDeepSpeed, *config.deepspeed_config);
  }
  return entries;
}

// ------------------------------------------------------------------ reading

// Keys of Python's ClusterConfig (config_args.py) that accelerate-cpp has no use for. They are
// kept, so that a file Python wrote loads here without complaint and is written back whole.
const std::set<std::string> kPassthroughKeys = {"main_training_function",
                                                "enable_cpu_affinity",
                                                "fp8_config",
                                                "parallelism_config",
                                                "megatron_lm_config",
                                                "mpirun_config",
                                                "tpu_name",
                                                "tpu_zone",
                                                "tpu_use_cluster",
                                                "tpu_use_sudo",
                                                "command_file",
                                                "commands",
                                                "tpu_vm",
                                                "tpu_env",
                                                "dynamo_config",
                                                "dynamo_backend"};

// Python Accelerate's distributed types that need something accelerate-cpp does not have.
const std::set<std::string> kUnsupportedDistributedTypes = {
    "XLA",       "TPU",        "MEGATRON_LM", "MULTI_XPU", "MULTI_NPU",
    "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA",  "MULTI_HPU", "MULTI_NEURON"};
const std::vector<std::string> kDistributedTypes = {"NO", "MULTI_CPU", "MULTI_GPU", "FSDP",
                                                    "DEEPSPEED"};

// A value as it appeared, for error messages.
std::string shown(const YAML::Node& node) {
  if (node.IsScalar()) return node.Scalar();
  YAML::Emitter emitter;
  emitter << YAML::Flow << node;
  return emitter.c_str();
}

class FileReader {
 public:
  explicit FileReader(std::string path) : path_(std::move(path)) {}

  [[noreturn]] void fail(const std::string& key, const YAML::Node& value,
                         const std::string& why) const {
    throw UsageError("config file '" + path_ + "': " + key + " = '" + shown(value) +
                     "' is invalid: " + why);
  }

  std::string as_string(const std::string& key, const YAML::Node& value) const {
    if (!value.IsScalar()) fail(key, value, "expected a single value");
    return value.Scalar();
  }

  int as_int(const std::string& key, const YAML::Node& value, int minimum,
             int maximum = std::numeric_limits<int>::max()) const {
    const std::string text = as_string(key, value);
    int result = 0;
    const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), result);
    if (error != std::errc() || end != text.data() + text.size()) {
      fail(key, value, "expected a whole number");
    }
    if (result < minimum) fail(key, value, "must be at least " + std::to_string(minimum));
    if (result > maximum) fail(key, value, "must be at most " + std::to_string(maximum));
    return result;
  }

  // PyYAML's booleans. Python's own questionnaire writes `downcast_bf16: 'no'` (a string that
  // means false), so quoted words are read the same way.
  bool as_bool(const std::string& key, const YAML::Node& value) const {
    const std::string word = lower(as_string(key, value));
    if (word == "true" || word == "yes" || word == "on") return true;
    if (word == "false" || word == "no" || word == "off") return false;
    fail(key, value, "expected true or false");
  }

  std::string one_of(const std::string& key, const YAML::Node& value,
                     const std::vector<std::string>& choices) const {
    std::string text = as_string(key, value);
    if (std::find(choices.begin(), choices.end(), text) == choices.end()) {
      std::string list;
      for (const auto& c : choices) list += (list.empty() ? "" : ", ") + c;
      fail(key, value, "expected one of " + list);
    }
    return text;
  }

  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// fsdp_config / deepspeed_config: every key checked against the schema in sharding.h, with the
// same rules as the top level (unknown: a warning; Python-only: kept; null: absent).
PluginConfig read_plugin_config(const FileReader& file, ShardingPlugin plugin,
                                const std::string& section, const YAML::Node& map,
                                const std::function<void(const std::string&)>& warn) {
  if (!map.IsMap()) file.fail(section, map, "expected a mapping of keys to values");
  PluginConfig config;
  for (const auto& entry : map) {
    if (!entry.first.IsScalar()) file.fail(section, map, "a key is not a plain name");
    const std::string key = entry.first.Scalar();
    const std::string name = section + "." + key;
    const YAML::Node& value = entry.second;
    if (value.IsNull()) continue;
    if (const ShardingSetting* setting = find_sharding_file_key(plugin, key)) {
      std::string expected;
      const auto canonical =
          normalize_sharding_value(*setting, file.as_string(name, value), &expected);
      if (!canonical) file.fail(name, value, "expected " + expected);
      config.values[setting->file_key] = *canonical;
    } else if (plugin == ShardingPlugin::kDeepSpeed && key == "gradient_accumulation_steps") {
      config.values[key] = std::to_string(file.as_int(name, value, 1));
    } else if (plugin == ShardingPlugin::kDeepSpeed && is_deepspeed_passthrough_key(key)) {
      config.passthrough[key] = yaml_value_text(value);
    } else {
      warn("config file '" + file.path() + "': unknown key '" + name + "' ignored");
    }
  }
  return config;
}

std::string read_config_text(const std::string& path) {
  std::error_code ec;
  const auto status = fs::status(path, ec);
  if (!fs::exists(status)) {
    throw UsageError("config file '" + path +
                     "' does not exist (create one with `accelerate config`, or pass another "
                     "--config_file)");
  }
  if (fs::is_directory(status)) {
    throw UsageError("config file '" + path + "' is a directory, not a file");
  }
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  if (!in && !in.eof()) {
    throw UsageError("cannot read config file '" + path + "': " + std::strerror(errno));
  }
  return text.str();
}

}  // namespace

std::string default_config_path(const std::map<std::string, std::string>& environment) {
  // Python reads an empty variable as a (relative) path; we treat empty as unset, as shells do
  // when a variable was only cleared.
  std::string hf_home = env_value(environment, "HF_HOME");
  if (hf_home.empty()) {
    std::string cache = env_value(environment, "XDG_CACHE_HOME");
    if (cache.empty()) cache = "~/.cache";
    hf_home = cache + "/huggingface";
  }
  return expand_user(hf_home, environment) + "/accelerate/default_config.yaml";
}

bool is_valid_gpu_ids(const std::string& text) {
  if (text == "all") return true;
  std::istringstream items(text);
  int count = 0;
  for (std::string item; std::getline(items, item, ',');) {
    item.erase(0, item.find_first_not_of(' '));
    item.erase(item.find_last_not_of(' ') + 1);
    if (item.empty() || !std::all_of(item.begin(), item.end(),
                                     [](unsigned char c) { return std::isdigit(c) != 0; })) {
      return false;
    }
    ++count;
  }
  return count > 0 && text.back() != ',';
}

ClusterConfig load_config_file(const std::string& path, std::vector<std::string>* warnings) {
  const std::string text = read_config_text(path);
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::ParserException& e) {
    throw UsageError("config file '" + path + "' is not valid YAML: line " +
                     std::to_string(e.mark.line + 1) + ", column " +
                     std::to_string(e.mark.column + 1) + ": " + e.msg);
  }
  if (root.IsNull()) {
    throw UsageError("config file '" + path +
                     "' is empty: expected keys such as distributed_type and num_processes");
  }
  if (!root.IsMap()) {
    throw UsageError("config file '" + path +
                     "' must hold a mapping of keys to values (such as `num_processes: 2`)");
  }

  const FileReader file(path);
  ClusterConfig config;
  std::optional<bool> legacy_fp16;
  auto warn = [&](const std::string& line) {
    if (warnings != nullptr) warnings->push_back(line);
  };

  using Handler = std::function<void(const std::string&, const YAML::Node&)>;
  const std::map<std::string, Handler> handlers = {
      {"compute_environment",
       [&](const std::string& key, const YAML::Node& value) {
         const std::string env = file.as_string(key, value);
         if (env == "AMAZON_SAGEMAKER") {
           file.fail(key, value, "Amazon SageMaker is not supported by accelerate-cpp");
         }
         config.compute_environment = file.one_of(key, value, {"LOCAL_MACHINE"});
       }},
      {"distributed_type",
       [&](const std::string& key, const YAML::Node& value) {
         const std::string type = file.as_string(key, value);
         if (kUnsupportedDistributedTypes.count(type) != 0) {
           file.fail(key, value,
                     "not supported by accelerate-cpp (use NO, MULTI_CPU, MULTI_GPU, FSDP or "
                     "DEEPSPEED)");
         }
         config.distributed_type = file.one_of(key, value, kDistributedTypes);
       }},
      {"fsdp_config",
       [&](const std::string& key, const YAML::Node& value) {
         config.fsdp_config = read_plugin_config(file, ShardingPlugin::kFsdp, key, value, warn);
       }},
      {"deepspeed_config",
       [&](const std::string& key, const YAML::Node& value) {
         config.deepspeed_config =
             read_plugin_config(file, ShardingPlugin::kDeepSpeed, key, value, warn);
       }},
      {"mixed_precision",
       [&](const std::string& key, const YAML::Node& value) {
         if (file.as_string(key, value) == "fp8") {
           file.fail(key, value, "fp8 is not supported by accelerate-cpp (use no, fp16 or bf16)");
         }
         config.mixed_precision = file.one_of(key, value, {"no", "fp16", "bf16"});
       }},
      {"num_processes",
       [&](const std::string& key, const YAML::Node& value) {
         config.num_processes = file.as_int(key, value, 1);
       }},
      {"num_machines",
       [&](const std::string& key, const YAML::Node& value) {
         config.num_machines = file.as_int(key, value, 1);
       }},
      {"machine_rank",
       [&](const std::string& key, const YAML::Node& value) {
         config.machine_rank = file.as_int(key, value, 0);
       }},
      {"main_process_ip",
       [&](const std::string& key, const YAML::Node& value) {
         config.main_process_ip = file.as_string(key, value);
         if (config.main_process_ip->empty()) file.fail(key, value, "must not be empty");
       }},
      {"main_process_port",
       [&](const std::string& key, const YAML::Node& value) {
         config.main_process_port = file.as_int(key, value, 1, 65535);
       }},
      {"use_cpu", [&](const std::string& key,
                      const YAML::Node& value) { config.use_cpu = file.as_bool(key, value); }},
      {"gpu_ids",
       [&](const std::string& key, const YAML::Node& value) {
         config.gpu_ids = file.as_string(key, value);
         if (!is_valid_gpu_ids(*config.gpu_ids)) {
           file.fail(key, value, "expected 'all' or a comma-separated list of GPU ids (0,1)");
         }
       }},
      {"rdzv_backend",
       [&](const std::string& key, const YAML::Node& value) {
         config.rdzv_backend = file.one_of(key, value, {"static", "c10d"});
       }},
      {"same_network",
       [&](const std::string& key, const YAML::Node& value) {
         config.same_network = file.as_bool(key, value);
       }},
      {"debug", [&](const std::string& key,
                    const YAML::Node& value) { config.debug = file.as_bool(key, value); }},
      {"downcast_bf16",
       [&](const std::string& key, const YAML::Node& value) {
         config.downcast_bf16 = file.as_bool(key, value);
       }},
      {"gradient_accumulation_steps",
       [&](const std::string& key, const YAML::Node& value) {
         config.gradient_accumulation_steps = file.as_int(key, value, 1);
       }},
      // Python Accelerate's old spelling of mixed_precision: fp16, converted the way its
      // process_config() does.
      {"fp16", [&](const std::string& key, const YAML::Node& value) {
         legacy_fp16 = file.as_bool(key, value);
       }}};

  for (const auto& entry : root) {
    if (!entry.first.IsScalar()) {
      throw UsageError("config file '" + path + "': key '" + shown(entry.first) +
                       "' is not a plain name");
    }
    const std::string key = entry.first.Scalar();
    const YAML::Node& value = entry.second;
    if (auto handler = handlers.find(key); handler != handlers.end()) {
      // Python drops null values when it writes a file; a hand-written null means "not set".
      if (!value.IsNull()) handler->second(key, value);
    } else if (kPassthroughKeys.count(key) != 0) {
      if (value.IsNull()) continue;
      config.passthrough[key] = yaml_value_text(value);
    } else {
      warn("config file '" + path + "': unknown key '" + key +
           "' ignored (Python Accelerate would refuse this file)");
    }
  }

  if (!config.mixed_precision && legacy_fp16.value_or(false)) config.mixed_precision = "fp16";
  const int num_machines = config.num_machines.value_or(1);
  if (config.machine_rank && *config.machine_rank >= num_machines) {
    throw UsageError(
        "config file '" + path + "': machine_rank = '" + std::to_string(*config.machine_rank) +
        "' is invalid: must be less than num_machines (" + std::to_string(num_machines) + ")");
  }
  if (!config.distributed_type) {
    warn("config file '" + path +
         "' has no distributed_type (Python Accelerate requires one: NO, MULTI_CPU, MULTI_GPU, "
         "FSDP or DEEPSPEED)");
  }
  // Two places for one setting (ours at the top, Python's in deepspeed_config) must agree.
  if (config.deepspeed_config && config.gradient_accumulation_steps) {
    const auto& values = config.deepspeed_config->values;
    const auto nested = values.find("gradient_accumulation_steps");
    if (nested != values.end() &&
        nested->second != std::to_string(*config.gradient_accumulation_steps)) {
      throw UsageError("config file '" + path +
                       "': deepspeed_config.gradient_accumulation_steps = '" + nested->second +
                       "' is invalid: gradient_accumulation_steps says " +
                       std::to_string(*config.gradient_accumulation_steps) + "; give it once");
    }
  }
  return config;
}

std::string config_to_yaml(const ClusterConfig& config) {
  std::string out;
  for (const auto& [key, value] : config_entries(config)) emit_yaml_entry(out, key, value, 0);
  return out;
}

std::string config_to_json(const ClusterConfig& config) {
  const Entries entries = config_entries(config);
  std::string out = "{";
  bool first = true;
  for (const auto& [key, value] : entries) {
    out += (first ? "\n  " : ",\n  ") + double_quoted(key) + ": ";
    emit_json(out, value, 2);
    first = false;
  }
  return out + (first ? "}\n" : "\n}\n");
}

void save_config_file(const ClusterConfig& config, const std::string& path) {
  const fs::path target(path);
  const std::string text =
      target.extension() == ".json" ? config_to_json(config) : config_to_yaml(config);
  std::error_code ec;
  if (target.has_parent_path()) {
    fs::create_directories(target.parent_path(), ec);
    if (ec) {
      throw UsageError("cannot create directory '" + target.parent_path().string() +
                       "' for the config file: " + ec.message());
    }
  }
  // Written beside the target and renamed over it, so a reader (a launcher starting meanwhile)
  // sees the old file or the new one, never half of one.
  std::string temp = path + ".tmp.XXXXXX";
  const int fd = ::mkstemp(temp.data());
  if (fd < 0) {
    throw UsageError("cannot write config file '" + path + "': " + std::strerror(errno));
  }
  // mkstemp creates 0600; a config file is as readable as any file the user creates.
  const mode_t mask = ::umask(0);
  ::umask(mask);
  ::fchmod(fd, 0666 & ~mask);
  std::size_t written = 0;
  while (written < text.size()) {
    const ssize_t n = ::write(fd, text.data() + written, text.size() - written);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    written += static_cast<std::size_t>(n);
  }
  const int write_errno = errno;
  const bool ok = written == text.size() && ::fsync(fd) == 0;
  ::close(fd);
  if (!ok || ::rename(temp.c_str(), path.c_str()) != 0) {
    const int err = ok ? errno : write_errno;
    ::unlink(temp.c_str());
    throw UsageError("cannot write config file '" + path + "': " + std::strerror(err));
  }
}

ClusterConfig basic_config(const std::string& mixed_precision, int num_gpus) {
  const std::string precision = lower(mixed_precision);
  if (precision == "fp8") {
    throw UsageError(
        "mixed precision 'fp8' is not supported by accelerate-cpp (use no, fp16 "
        "or bf16)");
  }
  if (precision != "no" && precision != "fp16" && precision != "bf16") {
    throw UsageError("mixed precision '" + mixed_precision + "' is invalid: use no, fp16 or bf16");
  }
  // The keys and values of Python's write_basic_config, which fills the rest from ClusterConfig's
  // defaults (hence same_network: false here but true from the questionnaire).
  ClusterConfig config;
  config.compute_environment = "LOCAL_MACHINE";
  config.mixed_precision = precision;
  config.use_cpu = num_gpus == 0;
  config.num_processes = std::max(num_gpus, 1);
  config.distributed_type = num_gpus > 1 ? "MULTI_GPU" : "NO";
  config.debug = false;
  config.machine_rank = 0;
  config.num_machines = 1;
  config.rdzv_backend = "static";
  config.same_network = false;
  config.downcast_bf16 = false;
  config.passthrough = {{"enable_cpu_affinity", "false"},
                        {"main_training_function", "main"},
                        {"tpu_use_cluster", "false"},
                        {"tpu_use_sudo", "false"}};
  return config;
}

int count_gpus(const std::map<std::string, std::string>& environment) {
  std::error_code ec;
  int present = 0;
  for (fs::directory_iterator it("/proc/driver/nvidia/gpus", ec), end; !ec && it != end;
       it.increment(ec)) {
    ++present;
  }
  // CUDA_VISIBLE_DEVICES narrows what torch.cuda.device_count() reports: Python counts the same.
  auto visible = environment.find("CUDA_VISIBLE_DEVICES");
  if (visible == environment.end()) return present;
  int listed = 0;
  std::istringstream items(visible->second);
  for (std::string item; std::getline(items, item, ',');) {
    // CUDA stops at the first id that does not name a device.
    if (item.empty() || item.front() == '-') break;
    ++listed;
  }
  return std::min(present, listed);
}

std::map<std::string, std::string> current_environment() {
  std::map<std::string, std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string entry(*e);
    const auto eq = entry.find('=');
    if (eq != std::string::npos) env.emplace(entry.substr(0, eq), entry.substr(eq + 1));
  }
  return env;
}

}  // namespace accelerate::cli
