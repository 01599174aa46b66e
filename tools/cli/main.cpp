// `accelerate <command> [options]`: finds the command in the registry, lets CLI11 parse its
// options, runs it. Every refusal is one line on stderr and exit status 2.
#include "command.h"

#include <CLI/CLI.hpp>

#include <algorithm>
#include <iostream>
#include <string>
#include <vector>

namespace {

using accelerate::cli::Command;
using accelerate::cli::kUsageExitCode;
using accelerate::cli::UsageError;

// CLI11 messages are meant to be single lines, but validators may embed newlines; scripts and
// tests rely on exactly one line.
std::string one_line(std::string text) {
  std::replace(text.begin(), text.end(), '\n', ' ');
  while (!text.empty() && text.back() == ' ') text.pop_back();
  return text;
}

int usage_error(const std::string& who, const std::string& what, const std::string& help_hint) {
  std::cerr << who << ": error: " << one_line(what) << " (see " << help_hint << " -h)" << std::endl;
  return kUsageExitCode;
}

int run_main(int argc, char** argv) {
  CLI::App app{"accelerate: launch and configure distributed LibTorch programs", "accelerate"};
  app.footer("Run 'accelerate <command> -h' for the options of one command.");
  app.require_subcommand(0, 1);

  auto commands = accelerate::cli::make_commands();
  for (auto& command : commands) {
    CLI::App* sub =
        app.add_subcommand(std::string(command->name()), std::string(command->summary()));
    command->add_options(*sub);
  }

  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) return usage_error("accelerate", "missing command", "accelerate");

  Command* selected = nullptr;
  std::string who = "accelerate";
  if (args.front().empty() || args.front().front() != '-') {
    auto it = std::find_if(commands.begin(), commands.end(),
                           [&](const auto& c) { return c->name() == args.front(); });
    if (it == commands.end()) {
      return usage_error("accelerate", "unknown command '" + args.front() + "'", "accelerate");
    }
    selected = it->get();
    who = "accelerate " + args.front();
    std::vector<std::string> rest(args.begin() + 1, args.end());
    rest = selected->split_arguments(*app.get_subcommand(args.front()), std::move(rest));
    rest.insert(rest.begin(), args.front());
    args = std::move(rest);
  }

  // CLI11's vector overload consumes arguments from the back.
  std::reverse(args.begin(), args.end());
  try {
    app.parse(args);
  } catch (const CLI::CallForHelp&) {
    // Help for the innermost subcommand given ("accelerate config default -h"), not the whole tree.
    const CLI::App* target = &app;
    std::string prefix;
    while (!target->get_subcommands().empty()) {
      prefix += (prefix.empty() ? "" : " ") + target->get_name();
      target = target->get_subcommands().back();
    }
    std::cout << target->help(prefix);
    return 0;
  } catch (const CLI::ParseError& e) {
    return usage_error(who, e.what(), who);
  }
  if (selected == nullptr) return usage_error("accelerate", "missing command", "accelerate");

  try {
    return selected->run();
  } catch (const UsageError& e) {
    return usage_error(who, e.what(), who);
  }
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run_main(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "accelerate: internal error: " << one_line(e.what()) << std::endl;
    return 1;
  }
}
