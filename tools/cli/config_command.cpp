// `accelerate config`: Python Accelerate's questionnaire (commands/config/cluster.py), cut down to
// what accelerate-cpp can do, writing a config file Python Accelerate can read too.
//
// Answers are read line by line from stdin, so a script can pipe them in. On a terminal a bad
// answer is asked again with the reason; from a pipe nobody could correct it, so a bad answer or
// an early end of input stops with status 2 instead of looping forever.
#include "command.h"
#include "config_file.h"
#include "sharding.h"

#include <unistd.h>

#include <cctype>
#include <charconv>
#include <filesystem>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace accelerate::cli {
namespace {

// Python's launcher uses the same port when several machines must agree on one in advance.
constexpr int kDefaultMainProcessPort = 29500;

std::string trimmed(const std::string& text) {
  const auto first = text.find_first_not_of(" \t\r");
  if (first == std::string::npos) return "";
  return text.substr(first, text.find_last_not_of(" \t\r") - first + 1);
}

std::string lower(std::string text) {
  for (char& c : text) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return text;
}

/// Thrown by an answer converter: the reason the answer cannot be used.
class InvalidAnswer : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// One entry of a multiple-choice question: what is shown, and the value it stands for.
struct Choice {
  std::string label;
  std::string value;
  /// Non-empty: listed (as Python lists it) but refused with this reason.
  std::string refusal;
};

/// Asks questions on `out` and reads the answers from `in`, one line each.
class Prompter {
 public:
  Prompter(std::istream& in, std::ostream& out, bool interactive)
      : in_(in), out_(out), interactive_(interactive) {}

  /// Asks until `convert` accepts an answer. `hint` is shown in brackets (Python's "[yes/NO]");
  /// an empty line means `default_answer` when there is one. `key` names the question in errors.
  template <class T>
  T ask(const std::string& key, const std::string& question, const std::string& hint,
        const std::optional<std::string>& default_answer,
        const std::function<T(const std::string&)>& convert) {
    for (;;) {
      out_ << question << (hint.empty() ? "" : " [" + hint + "]") << ": " << std::flush;
      std::string line;
      if (!std::getline(in_, line)) {
        out_ << "\n";
        throw UsageError("input ended before the question for " + key +
                         " was answered (answers are read one per line from stdin)");
      }
      // Piped answers are not echoed by a terminal: show them so the transcript reads like a
      // session.
      if (!interactive_) out_ << line << "\n";
      std::string answer = trimmed(line);
      try {
        if (answer.empty()) {
          if (!default_answer) throw InvalidAnswer("an answer is required");
          answer = *default_answer;
        }
        return convert(answer);
      } catch (const InvalidAnswer& e) {
        if (!interactive_) {
          throw UsageError("invalid answer '" + answer + "' for " + key + ": " + e.what());
        }
        out_ << "  " << e.what() << "; please try again." << std::endl;
      }
    }
  }

  /// A multiple-choice question answered by number or by name; returns the chosen value.
  std::string choose(const std::string& key, const std::string& question,
                     const std::vector<Choice>& choices, std::size_t default_index = 0) {
    std::string menu = question;
    for (std::size_t i = 0; i < choices.size(); ++i) {
      menu += "\n  " + std::to_string(i) + ") " + choices[i].label;
    }
    menu += "\nEnter a number or a name";
    return ask<std::string>(
        key, menu, std::to_string(default_index), std::to_string(default_index),
        [&](const std::string& answer) {
          const Choice* picked = nullptr;
          std::size_t index = 0;
          const auto [end, error] =
              std::from_chars(answer.data(), answer.data() + answer.size(), index);
          if (error == std::errc() && end == answer.data() + answer.size()) {
            if (index < choices.size()) picked = &choices[index];
          } else {
            for (const auto& c : choices) {
              if (lower(answer) == lower(c.label) || lower(answer) == lower(c.value)) picked = &c;
            }
          }
          if (picked == nullptr) {
            throw InvalidAnswer("expected a number from 0 to " +
                                std::to_string(choices.size() - 1) + " or one of the names");
          }
          if (!picked->refusal.empty()) throw InvalidAnswer(picked->refusal);
          return picked->value;
        });
  }

  bool yes_no(const std::string& key, const std::string& question, bool default_answer) {
    return ask<bool>(key, question, default_answer ? "YES/no" : "yes/NO",
                     default_answer ? "yes" : "no", [](const std::string& answer) {
                       const std::string word = lower(answer);
                       if (word == "yes" || word == "y") return true;
                       if (word == "no" || word == "n") return false;
                       throw InvalidAnswer("please enter yes or no");
                     });
  }

  int integer(const std::string& key, const std::string& question, std::optional<int> default_value,
              int minimum, int maximum, const std::string& range_reason = "") {
    const std::optional<std::string> default_answer =
        default_value ? std::optional<std::string>(std::to_string(*default_value)) : std::nullopt;
    return ask<int>(
        key, question, default_answer.value_or(""), default_answer, [&](const std::string& answer) {
          int value = 0;
          const auto [end, error] =
              std::from_chars(answer.data(), answer.data() + answer.size(), value);
          if (error != std::errc() || end != answer.data() + answer.size()) {
            throw InvalidAnswer("please enter a whole number");
          }
          if (value < minimum || value > maximum) {
            throw InvalidAnswer(!range_reason.empty() ? range_reason
                                : maximum == std::numeric_limits<int>::max()
                                    ? "please enter a number of at least " + std::to_string(minimum)
                                    : "please enter a number from " + std::to_string(minimum) +
                                          " to " + std::to_string(maximum));
          }
          return value;
        });
  }

  std::string text(
      const std::string& key, const std::string& question,
      const std::optional<std::string>& default_answer,
      const std::function<std::string(const std::string&)>& check = [](const std::string& answer) {
        return answer;
      }) {
    return ask<std::string>(key, question, default_answer.value_or(""), default_answer, check);
  }

 private:
  std::istream& in_;
  std::ostream& out_;
  bool interactive_;
};

std::string yes_no_text(bool value) {
  return value ? "true" : "false";
}

// A multiple-choice question whose values are the names in `names`, labelled by themselves.
std::string choose_name(Prompter& ask, const std::string& key, const std::string& question,
                        const std::vector<std::string>& names, std::size_t default_index = 0) {
  std::vector<Choice> choices;
  for (const auto& name : names) choices.push_back({name, name, ""});
  return ask.choose(key, question, choices, default_index);
}

// The choices the schema (sharding.h) gives a config-file key.
const std::vector<std::string>& choices_of(ShardingPlugin plugin, const std::string& key) {
  return find_sharding_file_key(plugin, key)->choices;
}

// Python's DeepSpeed questions (cluster.py), in its order and with its defaults.
PluginConfig ask_deepspeed(Prompter& ask, int num_machines, bool* uses_json_file) {
  constexpr auto kDs = ShardingPlugin::kDeepSpeed;
  PluginConfig deepspeed;
  auto& values = deepspeed.values;
  *uses_json_file = ask.yes_no("deepspeed_config_file",
                               "Do you want to specify a json file to a DeepSpeed config?", false);
  if (*uses_json_file) {
    values["deepspeed_config_file"] =
        ask.text("deepspeed_config_file", "Please enter the path to the json DeepSpeed config file",
                 std::string("none"));
  } else {
    const std::string stage =
        choose_name(ask, "zero_stage", "What should be your DeepSpeed's ZeRO optimization stage?",
                    choices_of(kDs, "zero_stage"), 2);
    values["zero_stage"] = stage;
    if (std::stoi(stage) >= 2) {
      const auto& devices = choices_of(kDs, "offload_optimizer_device");
      const std::string optimizer = choose_name(ask, "offload_optimizer_device",
                                                "Where to offload optimizer states?", devices);
      const std::string param =
          choose_name(ask, "offload_param_device", "Where to offload parameters?", devices);
      values["offload_optimizer_device"] = optimizer;
      values["offload_param_device"] = param;
      if (param == "nvme") {
        values["offload_param_nvme_path"] = ask.text(
            "offload_param_nvme_path", "Nvme Path to offload parameters?", std::string("/nvme"));
      }
      if (optimizer == "nvme") {
        values["offload_optimizer_nvme_path"] =
            ask.text("offload_optimizer_nvme_path", "Nvme Path to offload optimizer states?",
                     std::string("/nvme"));
      }
    }
    values["gradient_accumulation_steps"] = std::to_string(
        ask.integer("gradient_accumulation_steps",
                    "How many gradient accumulation steps you're passing in your script?", 1, 1,
                    std::numeric_limits<int>::max()));
    if (ask.yes_no("gradient_clipping", "Do you want to use gradient clipping?", false)) {
      const ShardingSetting& clipping = *find_sharding_file_key(kDs, "gradient_clipping");
      values["gradient_clipping"] =
          ask.text("gradient_clipping", "What is the gradient clipping value?", std::string("1.0"),
                   [&](const std::string& answer) {
                     std::string expected;
                     const auto value = normalize_sharding_value(clipping, answer, &expected);
                     if (!value) throw InvalidAnswer("please enter " + expected);
                     return *value;
                   });
    }
    if (stage == "3") {
      values["zero3_save_16bit_model"] = yes_no_text(
          ask.yes_no("zero3_save_16bit_model",
                     "Do you want to save 16-bit model weights when using ZeRO Stage-3?", false));
    }
  }
  values["zero3_init_flag"] = yes_no_text(
      ask.yes_no("zero3_init_flag",
                 "Do you want to enable `deepspeed.zero.Init` when using ZeRO Stage-3 for "
                 "constructing massive models?",
                 false));
  if (num_machines > 1) {
    // Listed as Python lists them, but only "standard" is how accelerate launch starts
    // processes, so it is the default here (Python's is pdsh). The hostfile and filter questions
    // that follow the other launchers in Python are never reached.
    std::vector<Choice> launchers;
    for (const auto& name : deepspeed_multinode_launchers()) {
      launchers.push_back({name, name,
                           name == "standard" ? ""
                                              : "accelerate launch starts the processes of "
                                                "every machine itself: choose standard"});
    }
    values["deepspeed_multinode_launcher"] = ask.choose(
        "deepspeed_multinode_launcher", "Which Type of launcher do you want to use?", launchers, 1);
  }
  return deepspeed;
}

// Python's FSDP questions (cluster.py), in its order and with its defaults.
PluginConfig ask_fsdp(Prompter& ask) {
  constexpr auto kFsdp = ShardingPlugin::kFsdp;
  PluginConfig fsdp;
  auto& values = fsdp.values;
  values["fsdp_sharding_strategy"] =
      choose_name(ask, "fsdp_sharding_strategy", "What should be your sharding strategy?",
                  choices_of(kFsdp, "fsdp_sharding_strategy"));
  values["fsdp_offload_params"] = yes_no_text(ask.yes_no(
      "fsdp_offload_params", "Do you want to offload parameters and gradients to CPU?", false));
  const std::string policy =
      choose_name(ask, "fsdp_auto_wrap_policy", "What should be your auto wrap policy?",
                  choices_of(kFsdp, "fsdp_auto_wrap_policy"));
  values["fsdp_auto_wrap_policy"] = policy;
  if (policy == "TRANSFORMER_BASED_WRAP") {
    // Python first asks whether to use the model's `_no_split_modules` (a 🤗 Transformers
    // attribute). C++ modules have none, so the class names are always asked for.
    values["fsdp_transformer_layer_cls_to_wrap"] =
        ask.text("fsdp_transformer_layer_cls_to_wrap",
                 "Specify the comma-separated list of transformer layer class names "
                 "(case-sensitive) to wrap, e.g. `BertLayer`, `GPTJBlock`, `T5Block`, "
                 "`BertLayer,BertEmbeddings,BertSelfOutput` ...?",
                 std::nullopt);
  } else if (policy == "SIZE_BASED_WRAP") {
    values["fsdp_min_num_params"] = std::to_string(ask.integer(
        "fsdp_min_num_params",
        "What should be your FSDP's minimum number of parameters for Default Auto Wrapping "
        "Policy?",
        100000000, 0, std::numeric_limits<int>::max()));
  }
  values["fsdp_backward_prefetch"] = choose_name(
      ask, "fsdp_backward_prefetch", "What should be your FSDP's backward prefetch policy?",
      choices_of(kFsdp, "fsdp_backward_prefetch"));
  values["fsdp_state_dict_type"] =
      choose_name(ask, "fsdp_state_dict_type", "What should be your FSDP's state dict type?",
                  choices_of(kFsdp, "fsdp_state_dict_type"), 2);
  values["fsdp_forward_prefetch"] = yes_no_text(ask.yes_no(
      "fsdp_forward_prefetch", "Do you want to enable FSDP's forward prefetch policy?", false));
  values["fsdp_use_orig_params"] = yes_no_text(ask.yes_no(
      "fsdp_use_orig_params", "Do you want to enable FSDP's `use_orig_params` feature?", true));
  const bool ram_efficient =
      ask.yes_no("fsdp_cpu_ram_efficient_loading",
                 "Do you want to enable CPU RAM efficient model loading? Only applicable for 🤗 "
                 "Transformers models.",
                 true);
  values["fsdp_cpu_ram_efficient_loading"] = yes_no_text(ram_efficient);
  values["fsdp_sync_module_states"] = yes_no_text(
      ram_efficient || ask.yes_no("fsdp_sync_module_states",
                                  "Do you want each individually wrapped FSDP unit to broadcast "
                                  "module parameters from rank 0 at the start?",
                                  true));
  values["fsdp_activation_checkpointing"] =
      yes_no_text(ask.yes_no("fsdp_activation_checkpointing",
                             "Do you want to enable FSDP activation checkpointing?", false));
  return fsdp;
}

// Python's get_user_input() + get_cluster_input(), for the compute environment and machine
// types accelerate-cpp supports. The answers Python would ask about features we lack (dynamo,
// Megatron-LM, TPU, NUMA affinity, IPEX) are written with Python's "not used" values, so the file
// has the keys Python's own file would have.
ClusterConfig ask_cluster_config(Prompter& ask, int gpus_present) {
  ClusterConfig config;
  config.compute_environment =
      ask.choose("compute_environment", "In which compute environment are you running?",
                 {{"This machine", "LOCAL_MACHINE", ""},
                  {"AWS (Amazon SageMaker)", "AMAZON_SAGEMAKER",
                   "Amazon SageMaker is not supported by accelerate-cpp (choose This machine)"}});

  const std::string type = ask.choose("distributed_type", "Which type of machine are you using?",
                                      {{"No distributed training", "NO", ""},
                                       {"multi-CPU", "MULTI_CPU", ""},
                                       {"multi-GPU", "MULTI_GPU", ""}});
  config.distributed_type = type;
  const bool distributed = type != "NO";

  int num_machines = 1;
  int machine_rank = 0;
  bool same_network = true;
  std::string rdzv_backend = "static";
  bool debug = false;
  if (distributed) {
    num_machines = ask.integer(
        "num_machines",
        "How many different machines will you use (use more than 1 for multi-node training)?", 1, 1,
        std::numeric_limits<int>::max());
    if (num_machines > 1) {
      machine_rank =
          ask.integer("machine_rank", "What is the rank of this machine?", 0, 0, num_machines - 1);
      config.main_process_ip = ask.text(
          "main_process_ip",
          "What is the IP address of the machine that will host the main process?", std::nullopt);
      config.main_process_port =
          ask.integer("main_process_port",
                      "What is the port you will use to communicate with the main process?",
                      kDefaultMainProcessPort, 1, 65535);
      same_network = ask.yes_no("same_network",
                                "Are all the machines on the same local network? Answer `no` if "
                                "nodes are on the cloud and/or on different network hosts",
                                true);
      if (!same_network) {
        rdzv_backend =
            ask.text("rdzv_backend", "What rendezvous backend will you use? (static or c10d)",
                     std::string("static"), [](const std::string& answer) {
                       if (answer != "static" && answer != "c10d") {
                         throw InvalidAnswer("please enter static or c10d");
                       }
                       return answer;
                     });
      }
    }
    debug = ask.yes_no("debug",
                       "Should distributed operations be checked while running for errors? This "
                       "can avoid timeout issues but will be slower.",
                       false);
  }

  bool use_cpu = type == "MULTI_CPU";
  if (type == "NO") {
    use_cpu = ask.yes_no(
        "use_cpu", "Do you want to run your training on CPU only (even if a GPU is available)?",
        false);
  }

  // The sharding plugins, where Python asks about them: after the machine questions, before the
  // number of processes; DeepSpeed first, FSDP only when DeepSpeed was not chosen. Python asks
  // DeepSpeed for NO and multi-GPU and FSDP for multi-GPU only; here both are asked for multi-CPU
  // and multi-GPU, where the engine runs, and neither for NO (one process has nothing to shard).
  bool deepspeed_json = false;
  if (distributed) {
    if (ask.yes_no("use_deepspeed", "Do you want to use DeepSpeed?", false)) {
      config.deepspeed_config = ask_deepspeed(ask, num_machines, &deepspeed_json);
      config.distributed_type = "DEEPSPEED";
    } else if (ask.yes_no("use_fsdp", "Do you want to use FullyShardedDataParallel?", false)) {
      config.fsdp_config = ask_fsdp(ask);
      config.distributed_type = "FSDP";
    }
  }
  const bool sharded = config.fsdp_config || config.deepspeed_config;

  int num_processes = 1;
  if (type == "MULTI_CPU") {
    num_processes =
        ask.integer("num_processes", "How many processes should be used for distributed training?",
                    1, 1, std::numeric_limits<int>::max());
  } else if (type == "MULTI_GPU") {
    // Python's default of 1 is the one answer it then refuses on a single machine.
    const int minimum = num_machines == 1 ? 2 : 1;
    num_processes = ask.integer(
        "num_processes", "How many GPU(s) should be used for distributed training?",
        std::max(gpus_present, minimum), minimum, std::numeric_limits<int>::max(),
        "one GPU on one machine is not distributed: enter at least 2, or choose No distributed "
        "training");
  }

  // Python does not ask for GPU ids once a plugin is chosen (every GPU is used).
  if (!use_cpu && !sharded) {
    config.gpu_ids = ask.text(
        "gpu_ids",
        "What GPU(s) (by id) should be used for training on this machine as a comma-separated "
        "list?",
        std::string("all"), [](const std::string& answer) {
          if (!is_valid_gpu_ids(answer)) {
            throw InvalidAnswer("please enter all or GPU ids separated by commas, such as 0,1");
          }
          return answer;
        });
  }

  // With a DeepSpeed JSON file Python leaves mixed precision to the file, and asks nothing.
  if (!deepspeed_json) {
    config.mixed_precision = ask.choose("mixed_precision", "Do you wish to use mixed precision?",
                                        {{"no", "no", ""},
                                         {"fp16", "fp16", ""},
                                         {"bf16", "bf16", ""},
                                         {"fp8", "fp8", "fp8 is not supported by accelerate-cpp"}});
  }
  // DeepSpeed asked it already (deepspeed_config.gradient_accumulation_steps), or its JSON holds
  // it.
  if (!config.deepspeed_config) {
    config.gradient_accumulation_steps = ask.integer(
        "gradient_accumulation_steps",
        "How many gradient accumulation steps should `accelerate launch` pass to your program? "
        "(accelerate-cpp only: a file with a value other than 1 no longer loads in Python "
        "Accelerate)",
        1, 1, std::numeric_limits<int>::max());
  }

  config.num_processes = num_processes;
  config.num_machines = num_machines;
  config.machine_rank = machine_rank;
  config.use_cpu = use_cpu;
  config.rdzv_backend = rdzv_backend;
  config.same_network = same_network;
  config.debug = debug;
  config.downcast_bf16 = false;
  config.passthrough = {{"enable_cpu_affinity", "false"},
                        {"main_training_function", "main"},
                        {"tpu_env", "[]"},
                        {"tpu_use_cluster", "false"},
                        {"tpu_use_sudo", "false"}};
  return config;
}

constexpr const char* kConfigFileHelp =
    "Config file to use (default: $HF_HOME/accelerate/default_config.yaml, else "
    "$XDG_CACHE_HOME/huggingface/accelerate/default_config.yaml, else "
    "~/.cache/huggingface/accelerate/default_config.yaml); written as JSON when it ends in .json";

class ConfigCommand final : public Command {
 public:
  std::string_view name() const override { return "config"; }
  std::string_view summary() const override {
    return "Answer a few questions and save them as the default config for `accelerate launch`";
  }

  void add_options(CLI::App& app) override {
    app.add_option("--config_file", config_file_, kConfigFileHelp);
    app.require_subcommand(0, 1);
    default_ = app.add_subcommand(
        "default", "Write a basic config for this machine without asking (refuses to overwrite)");
    default_->add_option("--config_file", config_file_, kConfigFileHelp);
    default_->add_option("--mixed_precision", mixed_precision_,
                         "Mixed precision: no, fp16 or bf16 (default: no)");
    show_ = app.add_subcommand(
        "show", "Check a config file and print it as accelerate-cpp reads it (status 2 if bad)");
    show_->add_option("--config_file", config_file_, kConfigFileHelp);
    app.footer(
        "Without a subcommand, asks questions (answers are read one per line from stdin, so they "
        "may be piped in; an empty line takes the default shown in brackets) and writes the "
        "answers to --config_file in Python Accelerate's format.\n"
        "'config default [--mixed_precision no|fp16|bf16] [--config_file PATH]' writes Python's "
        "basic config (MULTI_GPU over every GPU when there are several, else one process).\n"
        "'config show [--config_file PATH]' prints the config as read, with warnings for keys "
        "it does not know.");
  }

  int run() override {
    const auto environment = current_environment();
    const std::string path = config_file_.empty() ? default_config_path(environment) : config_file_;
    if (default_->parsed()) return write_default(path, environment);
    if (show_->parsed()) return show(path);
    const bool interactive = ::isatty(STDIN_FILENO) == 1;
    Prompter prompter(std::cin, std::cout, interactive);
    const ClusterConfig config = ask_cluster_config(prompter, count_gpus(environment));
    save_config_file(config, path);
    std::cout << "accelerate configuration saved at " << path << std::endl;
    return 0;
  }

 private:
  int write_default(const std::string& path, const std::map<std::string, std::string>& env) {
    // Python's write_basic_config: never replaces a config someone may have tuned by hand.
    std::error_code ec;
    if (std::filesystem::exists(path, ec)) {
      throw UsageError("configuration already exists at " + path +
                       ", will not override; run `accelerate config` or pass a different "
                       "--config_file");
    }
    const ClusterConfig config = basic_config(mixed_precision_, count_gpus(env));
    save_config_file(config, path);
    std::cout << "accelerate configuration saved at " << path << std::endl;
    return 0;
  }

  static int show(const std::string& path) {
    std::vector<std::string> warnings;
    const ClusterConfig config = load_config_file(path, &warnings);
    for (const auto& w : warnings) std::cerr << "accelerate config show: warning: " << w << "\n";
    std::cout << "# " << path << "\n" << config_to_yaml(config) << std::flush;
    return 0;
  }

  std::string config_file_;
  std::string mixed_precision_ = "no";
  CLI::App* default_ = nullptr;
  CLI::App* show_ = nullptr;
};

}  // namespace

std::unique_ptr<Command> make_config_command() {
  return std::make_unique<ConfigCommand>();
}

}  // namespace accelerate::cli
