// Logging (logging.h) and the progress bar (progress.h): both decide which process writes and
// how a line reaches a stream shared with other processes.
#include "accelerate/logging.h"

#include "accelerate/environment.h"
#include "accelerate/progress.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iomanip>
#include <iostream>
#include <map>
#include <mutex>
#include <set>

namespace accelerate {

// ====================================================================== logging

std::string to_string(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return "DEBUG";
    case LogLevel::kInfo:
      return "INFO";
    case LogLevel::kWarning:
      return "WARNING";
    case LogLevel::kError:
      return "ERROR";
    case LogLevel::kCritical:
      return "CRITICAL";
  }
  TORCH_INTERNAL_ASSERT(false, "unknown LogLevel ", static_cast<int>(level));
}

LogLevel log_level_from_string(std::string_view name, std::string_view source) {
  std::string lower(name);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (lower == "debug") return LogLevel::kDebug;
  if (lower == "info") return LogLevel::kInfo;
  // Python's logging accepts these two aliases, so scripts that set them keep working.
  if (lower == "warning" || lower == "warn") return LogLevel::kWarning;
  if (lower == "error") return LogLevel::kError;
  if (lower == "critical" || lower == "fatal") return LogLevel::kCritical;
  TORCH_CHECK(false, "accelerate: ", source, " '", name,
              "' is not a log level (use debug, info, warning, error or critical, in any case)");
}

namespace detail {
// What loggers of one name share, like Python's logging.getLogger(name).
struct LoggerCore {
  std::string name;
  std::atomic<LogLevel> level{LogLevel::kInfo};
  std::atomic<std::ostream*> stream{&std::cerr};
  std::mutex once_mutex;
  std::set<std::string> warned_once;
};
}  // namespace detail

namespace {

std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}

std::map<std::string, std::shared_ptr<detail::LoggerCore>>& registry() {
  static std::map<std::string, std::shared_ptr<detail::LoggerCore>> loggers;
  return loggers;
}

// Ranks run as threads in tests (and user threads) write to the same streams: one record at a
// time keeps each line whole.
std::mutex& write_mutex() {
  static std::mutex m;
  return m;
}

std::shared_ptr<detail::LoggerCore> core_for(const std::string& name,
                                             const LoggerOptions& options) {
  std::optional<LogLevel> level = options.level;
  if (!level) {
    if (auto env = env_string(current_environment(), "ACCELERATE_LOG_LEVEL")) {
      level = log_level_from_string(*env, "ACCELERATE_LOG_LEVEL");
    }
  }
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto& core = registry()[name];
  if (!core) {
    core = std::make_shared<detail::LoggerCore>();
    core->name = name;
  }
  if (level) core->level.store(*level);
  if (options.stream != nullptr) core->stream.store(options.stream);
  return core;
}

void write_record(std::ostream& stream, LogLevel level, const std::string& name, int rank,
                  const std::string& message) {
  // The whole record is built first and written with one call: with stderr unbuffered that is a
  // single write(), which other processes writing to the same pipe cannot split.
  std::string record = to_string(level);
  record.append(":").append(name).append(":[RANK ").append(std::to_string(rank)).append("] ");
  record.append(message).push_back('\n');
  std::lock_guard<std::mutex> lock(write_mutex());
  stream << record;
  stream.flush();
}

}  // namespace

const std::string& Logger::name() const {
  return core_->name;
}

LogLevel Logger::level() const {
  return core_->level.load();
}

void Logger::set_level(LogLevel level) const {
  core_->level.store(level);
}

const PartialState& Logger::resolve_state() const {
  if (state_) return *state_;
  auto shared = PartialState::shared_if_created();
  TORCH_CHECK(shared, "accelerate: logger '", core_->name,
              "' has no process state to log for: create an Accelerator or call "
              "PartialState::shared() before logging, or pass a state to get_logger");
  return *shared;
}

void Logger::write(LogLevel level, const LogOptions& options, const std::string& message) const {
  if (!is_enabled_for(level)) return;
  const PartialState& state = resolve_state();
  std::ostream& stream = *core_->stream.load();
  if (options.in_order) {
    // Each rank writes (and flushes) before the barrier that releases the next one, so the
    // records reach a shared pipe or file in rank order. A launcher that relays each process
    // through its own pipe (`--rank_prefix`) can still reorder them.
    for (int rank = 0; rank < state.num_processes(); ++rank) {
      if (rank == state.process_index()) {
        write_record(stream, level, core_->name, rank, message);
      }
      state.wait_for_everyone();
    }
    return;
  }
  if (options.main_process_only && !state.is_main_process()) return;
  write_record(stream, level, core_->name, state.process_index(), message);
}

void Logger::write_once(const std::string& message) const {
  const PartialState& state = resolve_state();
  if (!state.is_main_process()) return;
  {
    std::lock_guard<std::mutex> lock(core_->once_mutex);
    if (!core_->warned_once.insert(message).second) return;
  }
  write_record(*core_->stream.load(), LogLevel::kWarning, core_->name, state.process_index(),
               message);
}

Logger get_logger(const std::string& name, const LoggerOptions& options) {
  return Logger(core_for(name, options), nullptr);
}

Logger get_logger(const PartialState& state, const std::string& name,
                  const LoggerOptions& options) {
  return Logger(core_for(name, options), state.shared_from_this());
}

// ====================================================================== progress bar

namespace detail {

std::string format_interval(double seconds) {
  const auto total = static_cast<int64_t>(std::max(0.0, seconds));
  const int64_t hours = total / 3600;
  const int64_t minutes = (total / 60) % 60;
  const int64_t secs = total % 60;
  char buf[64];
  if (hours > 0) {
    std::snprintf(buf, sizeof(buf), "%lld:%02lld:%02lld", static_cast<long long>(hours),
                  static_cast<long long>(minutes), static_cast<long long>(secs));
  } else {
    std::snprintf(buf, sizeof(buf), "%02lld:%02lld", static_cast<long long>(minutes),
                  static_cast<long long>(secs));
  }
  return buf;
}

}  // namespace detail

namespace {

bool is_terminal(const std::ostream* stream) {
  // Only the standard streams have a file descriptor we can ask; any other stream is taken
  // for a file.
  if (stream == &std::cout) return ::isatty(STDOUT_FILENO) == 1;
  if (stream == &std::cerr || stream == &std::clog) return ::isatty(STDERR_FILENO) == 1;
  return false;
}

double steady_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string fixed2(double value) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.2f", value);
  return buf;
}

bool local_main_without_state() {
  if (auto shared = PartialState::shared_if_created()) return shared->is_local_main_process();
  return detect_topology(current_environment()).local_rank == 0;
}

}  // namespace

ProgressBar::ProgressBar(ProgressBarOptions options) : options_(std::move(options)) {
  start(local_main_without_state());
}

ProgressBar::ProgressBar(const PartialState& state, ProgressBarOptions options)
    : options_(std::move(options)) {
  start(state.is_local_main_process());
}

void ProgressBar::start(bool local_main) {
  stream_ = options_.stream != nullptr ? options_.stream : &std::cerr;
  enabled_ = !options_.disable && (options_.all_processes || local_main) &&
             (options_.force || is_terminal(stream_));
  start_ = last_draw_ = now();
  if (enabled_) draw(false);
}

ProgressBar::~ProgressBar() {
  try {
    close();
  } catch (...) {
    // A failed last redraw (a throwing clock or stream) must not terminate the program.
  }
}

double ProgressBar::now() const {
  return options_.clock ? options_.clock() : steady_seconds();
}

void ProgressBar::update(int64_t n) {
  n_ += n;
  if (!enabled_ || closed_) return;
  if (now() - last_draw_ >= options_.min_interval) draw(false);
}

void ProgressBar::set_postfix_text(const std::string& key, std::string text) {
  for (auto& [k, v] : postfix_) {
    if (k == key) {
      v = std::move(text);
      return;
    }
  }
  postfix_.emplace_back(key, std::move(text));
}

void ProgressBar::clear_postfix() {
  postfix_.clear();
}

void ProgressBar::set_description(std::string description) {
  options_.description = std::move(description);
}

void ProgressBar::refresh() {
  if (enabled_ && !closed_) draw(false);
}

void ProgressBar::close() {
  if (closed_) return;
  closed_ = true;
  if (enabled_) draw(true);
}

std::string ProgressBar::render() const {
  const double elapsed = std::max(0.0, now() - start_);
  const double rate = elapsed > 0 ? static_cast<double>(n_) / elapsed : 0.0;
  std::string rate_text;
  if (rate <= 0) {
    rate_text = "?it/s";
  } else if (rate < 1) {
    rate_text = fixed2(1 / rate) + "s/it";
  } else {
    rate_text = fixed2(rate) + "it/s";
  }
  std::string postfix;
  for (const auto& [key, value] : postfix_)
    postfix.append(", ").append(key).append("=").append(value);

  std::string line;
  if (!options_.description.empty()) line.append(options_.description).append(": ");
  if (options_.total && *options_.total > 0) {
    const int64_t total = *options_.total;
    const double fraction =
        std::clamp(static_cast<double>(n_) / static_cast<double>(total), 0.0, 1.0);
    char percent[16];
    std::snprintf(percent, sizeof(percent), "%3.0f%%", fraction * 100);
    const int width = std::max(1, options_.bar_width);
    const auto filled = static_cast<int>(fraction * width);
    const std::string remaining =
        rate > 0
            ? detail::format_interval(static_cast<double>(std::max<int64_t>(0, total - n_)) / rate)
            : "?";
    line.append(percent)
        .append("|")
        .append(static_cast<size_t>(filled), '#')
        .append(static_cast<size_t>(width - filled), ' ')
        .append("| ")
        .append(std::to_string(n_))
        .append("/")
        .append(std::to_string(total))
        .append(" [")
        .append(detail::format_interval(elapsed))
        .append("<")
        .append(remaining)
        .append(", ");
  } else {
    line.append(std::to_string(n_))
        .append("it [")
        .append(detail::format_interval(elapsed))
        .append(", ");
  }
  line.append(rate_text).append(postfix).append("]");
  return line;
}

void ProgressBar::draw(bool final_line) {
  std::string line = render();
  const size_t length = line.size();
  // A shorter line than the last one leaves the old tail on screen unless blanked out.
  if (length < last_length_) line.append(last_length_ - length, ' ');
  last_length_ = length;
  last_draw_ = now();
  std::string out = "\r" + line;
  if (final_line) out.push_back('\n');
  *stream_ << out;
  stream_->flush();
}

}  // namespace accelerate
