#pragma once
/// \file
/// Logging that knows about processes (Accelerate's `accelerate.logging.get_logger`): a record is
/// written by the main process only unless asked otherwise, by every process, or by every
/// process one after the other in rank order.
///
/// Records look like Python's `logging.basicConfig()` output with Accelerate's rank prefix:
/// `INFO:train:[RANK 0] loss 0.25`. They go to stderr (like Python's logging), one write per
/// record, flushed at once, so that records of several processes sharing a pipe never mix within
/// a line.
///
/// Example:
/// \code
///   auto& state = accelerate::PartialState::shared();
///   auto logger = accelerate::get_logger("train");
///   logger.info("loss ", loss);                                     // main process only
///   logger.warning({.main_process_only = false}, "rank-local note"); // every process
///   logger.info({.in_order = true}, "shard ", state.process_index()); // every process, in order
/// \endcode

#include <accelerate/state.h>

#include <iosfwd>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>

namespace accelerate {

/// How important a record is. The values are Python's logging levels.
///
/// Example:
/// \code
///   logger.set_level(accelerate::LogLevel::kDebug);
/// \endcode
enum class LogLevel { kDebug = 10, kInfo = 20, kWarning = 30, kError = 40, kCritical = 50 };

/// "DEBUG", "INFO", "WARNING", "ERROR" or "CRITICAL".
std::string to_string(LogLevel level);

/// Parses a level name in any case: debug, info, warning (or warn), error, critical (or fatal).
/// Anything else is an error naming the value and where it came from (`source`, for example
/// "ACCELERATE_LOG_LEVEL").
///
/// Example:
/// \code
///   auto level = accelerate::log_level_from_string("Warning");   // LogLevel::kWarning
/// \endcode
LogLevel log_level_from_string(std::string_view name, std::string_view source = "log level");

/// Where one record is written. Accelerate's `main_process_only` / `in_order` keywords.
///
/// Example:
/// \code
///   logger.info({.main_process_only = false}, "every process says this");
/// \endcode
struct LogOptions {
  /// Write on the main process only. When false, every process writes.
  bool main_process_only = true;
  /// Every process writes, one after the other in rank order, with a barrier after each rank's
  /// turn (so every process must make the same call). Overrides main_process_only.
  bool in_order = false;
};

/// What get_logger may set on the named logger.
///
/// Example:
/// \code
///   auto logger = accelerate::get_logger("eval", {.level = accelerate::LogLevel::kDebug});
/// \endcode
struct LoggerOptions {
  /// The threshold. Unset: `ACCELERATE_LOG_LEVEL` when set, else the logger keeps its level
  /// (kInfo for a new one).
  std::optional<LogLevel> level;
  /// Where records go, instead of std::cerr. Must outlive every use of the logger's name; pass
  /// &std::cerr to go back.
  std::ostream* stream = nullptr;
};

namespace detail {
struct LoggerCore;
}  // namespace detail

/// A named logger that writes on the processes a call asks for (see LogOptions). Cheap to copy:
/// loggers of one name share their level and stream, as Python's `logging.getLogger(name)` does.
/// The level must be the same on every process for in_order calls, which wait for each other.
///
/// Example:
/// \code
///   auto logger = accelerate::get_logger(state, "train");
///   logger.debug("batch ", step, " took ", ms, " ms");   // dropped unless the level is kDebug
///   logger.error({.main_process_only = false}, "could not read ", path);
/// \endcode
class Logger {
 public:
  /// The logger's name, as given to get_logger.
  const std::string& name() const;
  /// The threshold below which records are dropped.
  LogLevel level() const;
  /// Changes the threshold of every logger with this name.
  void set_level(LogLevel level) const;
  /// Whether a record of `level` would be written (on the processes it is meant for).
  bool is_enabled_for(LogLevel level) const { return level >= this->level(); }

  /// Writes the streamed `args` as one record of `level` on the processes `options` names.
  template <class... Args>
  void log(LogLevel level, const LogOptions& options, const Args&... args) const {
    if (!is_enabled_for(level)) return;
    std::ostringstream message;
    (message << ... << args);
    write(level, options, message.str());
  }

  template <class... Args>
  void debug(const Args&... args) const {
    log(LogLevel::kDebug, LogOptions{}, args...);
  }
  template <class... Args>
  void debug(const LogOptions& options, const Args&... args) const {
    log(LogLevel::kDebug, options, args...);
  }
  template <class... Args>
  void info(const Args&... args) const {
    log(LogLevel::kInfo, LogOptions{}, args...);
  }
  template <class... Args>
  void info(const LogOptions& options, const Args&... args) const {
    log(LogLevel::kInfo, options, args...);
  }
  template <class... Args>
  void warning(const Args&... args) const {
    log(LogLevel::kWarning, LogOptions{}, args...);
  }
  template <class... Args>
  void warning(const LogOptions& options, const Args&... args) const {
    log(LogLevel::kWarning, options, args...);
  }
  template <class... Args>
  void error(const Args&... args) const {
    log(LogLevel::kError, LogOptions{}, args...);
  }
  template <class... Args>
  void error(const LogOptions& options, const Args&... args) const {
    log(LogLevel::kError, options, args...);
  }
  template <class... Args>
  void critical(const Args&... args) const {
    log(LogLevel::kCritical, LogOptions{}, args...);
  }
  template <class... Args>
  void critical(const LogOptions& options, const Args&... args) const {
    log(LogLevel::kCritical, options, args...);
  }

  /// A warning on the main process, written the first time this message is seen by any logger
  /// of this name and never again (Accelerate's `warning_once`).
  template <class... Args>
  void warning_once(const Args&... args) const {
    if (!is_enabled_for(LogLevel::kWarning)) return;
    std::ostringstream message;
    (message << ... << args);
    write_once(message.str());
  }

  /// Writes an already formatted message; what the templates above end in.
  void write(LogLevel level, const LogOptions& options, const std::string& message) const;

 private:
  friend Logger get_logger(const std::string& name, const LoggerOptions& options);
  friend Logger get_logger(const PartialState& state, const std::string& name,
                           const LoggerOptions& options);
  Logger(std::shared_ptr<detail::LoggerCore> core, std::shared_ptr<const PartialState> state)
      : core_(std::move(core)), state_(std::move(state)) {}
  const PartialState& resolve_state() const;
  void write_once(const std::string& message) const;

  std::shared_ptr<detail::LoggerCore> core_;
  // Null for loggers made without a state: they use the shared state, looked up at each call so
  // that a logger may be made (e.g. at namespace scope) before the state exists.
  std::shared_ptr<const PartialState> state_;
};

/// The logger called `name`, writing for the shared state (PartialState::shared()), which must
/// have been created before the first record, as in Accelerate. The level: options.level, else
/// `ACCELERATE_LOG_LEVEL` (any case; an unknown name is an error naming it), else the level the
/// name already has (kInfo for a new name).
///
/// Example:
/// \code
///   static const auto logger = accelerate::get_logger("my_script");
///   logger.info("starting");
/// \endcode
Logger get_logger(const std::string& name, const LoggerOptions& options = {});

/// As get_logger(name, options), writing for `state` (which the logger keeps alive).
Logger get_logger(const PartialState& state, const std::string& name,
                  const LoggerOptions& options = {});

}  // namespace accelerate
