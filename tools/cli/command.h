// The `accelerate` executable is a registry of subcommands. Each one implements Command; adding
// `accelerate config` or `accelerate env` means writing that class and adding one line to
// make_commands() in commands.cpp.
#pragma once

#include <CLI/CLI.hpp>

#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace accelerate::cli {

/// A command line we refuse to act on. main() prints it as one line and exits with status 2, the
/// same status CLI11's own parse errors get, so scripts can tell "you called me wrong" from "the
/// job failed" (status 1).
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Exit status for a command line we refuse (see UsageError).
inline constexpr int kUsageExitCode = 2;

/// One `accelerate <name> ...` subcommand.
///
/// Example:
///   class EnvCommand final : public Command {
///    public:
///     std::string_view name() const override { return "env"; }
///     std::string_view summary() const override { return "Print the environment"; }
///     void add_options(CLI::App& app) override { app.add_flag("--json", json_, "Print JSON"); }
///     int run() override { ...; return 0; }
///    private:
///     bool json_ = false;
///   };
class Command {
 public:
  virtual ~Command() = default;

  /// The word after `accelerate` that selects this command.
  virtual std::string_view name() const = 0;
  /// One line for `accelerate -h`.
  virtual std::string_view summary() const = 0;

  /// Declares the command's options on its CLI11 subcommand. Called once, before any parsing; the
  /// command binds them to its own members.
  virtual void add_options(CLI::App& app) = 0;

  /// Given every argument after the command's name, returns the ones CLI11 should parse and keeps
  /// the rest for itself. CLI11 rewrites what it parses (splits "[1,2]", drops a trailing ""), so a
  /// command that hands arguments on verbatim, like `launch PROGRAM ARGS...`, must take them out
  /// first. The default keeps nothing back.
  virtual std::vector<std::string> split_arguments(const CLI::App& app,
                                                   std::vector<std::string> args) {
    return args;
  }

  /// Does the work after a successful parse; returns the process exit status. Throws UsageError
  /// for input CLI11 could not reject by itself.
  virtual int run() = 0;
};

/// Every subcommand, in the order `accelerate -h` lists them.
std::vector<std::unique_ptr<Command>> make_commands();

// One factory per subcommand, each in its own file.
std::unique_ptr<Command> make_config_command();           // config_command.cpp
std::unique_ptr<Command> make_env_command();              // env_command.cpp
std::unique_ptr<Command> make_test_command();             // test_command.cpp
std::unique_ptr<Command> make_estimate_memory_command();  // estimate_memory.cpp

}  // namespace accelerate::cli
