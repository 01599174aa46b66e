#pragma once
/// \file
/// A text progress bar in the style of tqdm, drawn by one process only (Accelerate's
/// `accelerate.utils.tqdm`, which shows the bar on the local main process).
///
/// Example:
/// \code
///   accelerate::ProgressBar bar({.total = num_steps, .description = "train"});
///   for (int64_t step = 0; step < num_steps; ++step) {
///     ...
///     bar.set_postfix("loss", loss.item<double>());
///     bar.update();
///   }
///   bar.close();   // train: 100%|####################| 500/500 [00:25<00:00, 20.00it/s,
///   loss=0.25]
/// \endcode

#include <accelerate/state.h>

#include <cstdint>
#include <functional>
#include <iosfwd>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace accelerate {

/// What the user may set on a ProgressBar.
///
/// Example:
/// \code
///   std::ostringstream out;
///   double now = 0;
///   accelerate::ProgressBar bar({.total = 10, .stream = &out, .force = true,
///                                .clock = [&] { return now; }});
/// \endcode
struct ProgressBarOptions {
  /// The count at which the work is done. Unset: the bar shows the count and rate only.
  std::optional<int64_t> total;
  /// Shown before the bar, followed by ": ".
  std::string description;
  /// Where the bar is drawn; std::cerr when null, as tqdm does.
  std::ostream* stream = nullptr;
  /// Draw even when the stream is not a terminal (a log file, a pipe, a test's ostringstream).
  /// Without it a bar on anything but a terminal would fill the output with redraws.
  bool force = false;
  /// Draw on every process instead of the local main process only.
  bool all_processes = false;
  /// Never draw.
  bool disable = false;
  /// The least time between two redraws by update(), in seconds.
  double min_interval = 0.1;
  /// Width of the bar itself, in characters.
  int bar_width = 20;
  /// Monotonic time in seconds; a steady clock when unset. Tests inject their own.
  std::function<double()> clock;
};

/// A tqdm-style progress line: `desc:  40%|########            | 40/100 [00:02<00:03,
/// 20.00it/s, loss=0.25]`, or without a total `desc: 40it [00:02, 20.00it/s]`. Drawn (with '\r'
/// redraws, at most every min_interval seconds) only on the local main process and only when the
/// stream is a terminal, unless options say otherwise; elsewhere every call is cheap and silent.
/// close() (or the destructor) draws the final line and ends it with a newline.
///
/// Example:
/// \code
///   accelerate::ProgressBar bar(state, {.total = static_cast<int64_t>(loader.size())});
///   for (auto& batch : loader) {
///     bar.update();
///   }
/// \endcode
class ProgressBar {
 public:
  /// A bar for the shared state's process when it exists; before it does, for the process the
  /// launch environment (`LOCAL_RANK`) names.
  explicit ProgressBar(ProgressBarOptions options = {});
  /// A bar drawn by `state`'s local main process.
  ProgressBar(const PartialState& state, ProgressBarOptions options);
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;
  /// Calls close(); never throws.
  ~ProgressBar();

  /// Adds `n` to the count and redraws if min_interval has passed since the last drawing.
  void update(int64_t n = 1);
  /// Sets (or replaces) a value shown after the rate, as `key=value`. Floating-point values are
  /// shown with 3 significant digits, like tqdm's set_postfix.
  template <class T>
  void set_postfix(const std::string& key, const T& value) {
    std::ostringstream text;
    if constexpr (std::is_floating_point_v<T>) text.precision(3);
    text << value;
    set_postfix_text(key, text.str());
  }
  /// Removes every postfix value.
  void clear_postfix();
  /// Changes the description.
  void set_description(std::string description);
  /// Draws now, whatever the time since the last drawing.
  void refresh();
  /// Draws the final line followed by a newline (once; later calls do nothing).
  void close();

  /// The count so far.
  int64_t n() const { return n_; }
  /// The total, if one was given.
  const std::optional<int64_t>& total() const { return options_.total; }
  /// Whether this process draws the bar.
  bool enabled() const { return enabled_; }
  /// The line as it would be drawn now (without the '\r').
  std::string render() const;

 private:
  void start(bool local_main);
  void set_postfix_text(const std::string& key, std::string text);
  void draw(bool final_line);
  double now() const;

  ProgressBarOptions options_;
  std::ostream* stream_ = nullptr;
  bool enabled_ = false;
  bool closed_ = false;
  int64_t n_ = 0;
  double start_ = 0;
  double last_draw_ = 0;
  size_t last_length_ = 0;
  std::vector<std::pair<std::string, std::string>> postfix_;
};

namespace detail {
/// tqdm's time format: "MM:SS", or "H:MM:SS" from an hour on (whole seconds, rounded down).
std::string format_interval(double seconds);
}  // namespace detail

}  // namespace accelerate
