// The registry of `accelerate` subcommands.
#include "command.h"
#include "launch.h"

namespace accelerate::cli {

std::vector<std::unique_ptr<Command>> make_commands() {
  std::vector<std::unique_ptr<Command>> commands;
  commands.push_back(make_launch_command());
  // config, env, test and estimate-memory register here, one line each.
  return commands;
}

}  // namespace accelerate::cli
