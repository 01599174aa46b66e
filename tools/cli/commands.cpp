// The registry of `accelerate` subcommands.
#include "command.h"
#include "launch.h"

namespace accelerate::cli {

std::vector<std::unique_ptr<Command>> make_commands() {
  std::vector<std::unique_ptr<Command>> commands;
  commands.push_back(make_launch_command());
  commands.push_back(make_config_command());
  commands.push_back(make_env_command());
  commands.push_back(make_test_command());
  commands.push_back(make_estimate_memory_command());
  return commands;
}

}  // namespace accelerate::cli
