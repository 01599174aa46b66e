#pragma once
/// \file
/// Experiment tracking (Accelerate's `tracking.py`): a small tracker interface and three
/// built-in trackers that write files, TensorBoard event files, JSON lines and CSV.
///
/// Most programs never touch a tracker directly: they name them in
/// `AcceleratorOptions::log_with` and call `Accelerator::init_trackers`, `log` and
/// `end_training`, which act on the main process only.
///
/// Example:
/// \code
///   accelerate::Accelerator acc({.project_dir = "runs", .log_with = {"tensorboard", "jsonl"}});
///   acc.init_trackers("spirals", {{"lr", 1e-3}, {"batch_size", 32}});
///   acc.log({{"loss", 0.25}, {"phase", "warmup"}}, /*step=*/10);
///   acc.end_training();
/// \endcode

#include <ATen/core/Tensor.h>

#include <concepts>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace accelerate {

/// One logged or configured value: a number (floating point or integer), a flag or a text.
/// Converts implicitly from each, and from a one-element tensor (its value, as a double).
///
/// Example:
/// \code
///   accelerate::LogValues values{{"loss", 0.5}, {"epoch", 3}, {"phase", "eval"}};
/// \endcode
class LogValue {
 public:
  using Variant = std::variant<bool, int64_t, double, std::string>;

  // A template, so that a `const char*` does not pick the bool constructor.
  template <class T>
  requires std::same_as<T, bool> LogValue(T flag) : value_(flag) {}
  template <std::integral T>
  requires(!std::same_as<T, bool>) LogValue(T number) : value_(static_cast<int64_t>(number)) {}
  template <std::floating_point T>
  LogValue(T number) : value_(static_cast<double>(number)) {}
  LogValue(std::string text) : value_(std::move(text)) {}
  LogValue(const char* text) : value_(std::string(text)) {}
  LogValue(std::string_view text) : value_(std::string(text)) {}
  /// A tensor's single value (loss.item()); more than one element is an error.
  LogValue(const at::Tensor& scalar);

  /// A number or a flag (TensorBoard shows it as a scalar); false for text.
  bool is_number() const { return !std::holds_alternative<std::string>(value_); }
  /// The value as a double (flags are 0 or 1); text is an error.
  double to_double() const;
  /// The text; a number is an error.
  const std::string& text() const;
  const Variant& variant() const { return value_; }
  /// Shortest text that reads back to the same value: "0.1", "32", "true", or the text itself.
  std::string to_string() const;

  bool operator==(const LogValue&) const = default;

 private:
  Variant value_;
};

/// Values by name. Sorted by name, which is the order the file-based trackers write them in.
using LogValues = std::map<std::string, LogValue>;
/// Accelerate's `init_kwargs`: a tracker's name -> the options for its constructor.
using TrackerInitKwargs = std::map<std::string, LogValues>;

/// Accelerate's `GeneralTracker`: implement it to send logs anywhere, and pass the tracker in
/// `AcceleratorOptions::log_with`. The Accelerator calls it on the main process only: start()
/// once in init_trackers, then store_init_configuration(config) if a config was given, log()
/// for each Accelerator::log, finish() in end_training.
///
/// Example:
/// \code
///   struct PrintTracker : accelerate::GeneralTracker {
///     std::string name() const override { return "print"; }
///     void log(const accelerate::LogValues& values, std::optional<int64_t> step) override {
///       for (const auto& [k, v] : values) std::cout << k << " = " << v.to_string() << "\n";
///     }
///   };
///   accelerate::Accelerator acc({.log_with = {std::make_shared<PrintTracker>()}});
/// \endcode
class GeneralTracker {
 public:
  virtual ~GeneralTracker() = default;

  /// What Accelerator::get_tracker finds it by.
  virtual std::string name() const = 0;
  /// Whether it writes under project_config.logging_dir (built-in trackers constructed from a
  /// name need one; a custom tracker chooses its own place).
  virtual bool requires_logging_directory() const { return false; }
  /// Opens whatever the tracker writes to; called once, by init_trackers.
  virtual void start() {}
  /// The run's hyperparameters.
  virtual void store_init_configuration(const LogValues& config) {}
  /// Values at a step (none: the tracker decides).
  virtual void log(const LogValues& values, std::optional<int64_t> step) = 0;
  /// Flushes and closes. Called by end_training; calling it twice does nothing more.
  virtual void finish() {}
};

/// Writes TensorBoard event files: `<logging_dir>/<run_name>/events.out.tfevents.<seconds>.
/// <hostname>.<pid>.<n><filename_suffix>` (TensorBoard's own naming; n counts the writers this
/// process opened). Numbers become scalars, texts text summaries, and the configuration one text
/// summary tagged "config" at step 0 (a Markdown table, shown by TensorBoard's Text tab).
/// Each log() is flushed to the file before it returns.
///
/// init_kwargs: "filename_suffix" (text appended to the file name).
///
/// Example:
/// \code
///   accelerate::TensorBoardTracker tb("run1", "logs");
///   tb.start();
///   tb.log({{"loss", 0.5}}, 1);
///   tb.finish();  // logs/run1/events.out.tfevents....
/// \endcode
class TensorBoardTracker final : public GeneralTracker {
 public:
  TensorBoardTracker(std::string run_name, std::string logging_dir,
                     const LogValues& init_kwargs = {});
  ~TensorBoardTracker() override;

  std::string name() const override { return "tensorboard"; }
  bool requires_logging_directory() const override { return true; }
  void start() override;
  void store_init_configuration(const LogValues& config) override;
  void log(const LogValues& values, std::optional<int64_t> step) override;
  void finish() override;

  /// `<logging_dir>/<run_name>`: the directory to point TensorBoard at.
  std::string run_dir() const;
  /// The event file (empty before start()).
  std::string event_file() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Writes `<logging_dir>/<run_name>/metrics.jsonl`, one JSON object per log() call:
/// `{"step": 3, "loss": 0.5, "phase": "eval"}` ("step" first, null without a step, then the
/// values by name). The configuration goes to `config.json`, one object. Numbers are written
/// in their shortest exact form; NaN and infinities as `NaN`, `Infinity`, `-Infinity`, as
/// Python's json module writes and reads them. A value named "step" is an error. Appends to
/// an existing metrics.jsonl, so a resumed run continues the same file.
///
/// Example:
/// \code
///   accelerate::JsonlTracker jsonl("run1", "logs");
///   jsonl.start();
///   jsonl.log({{"loss", 0.5}}, 1);  // logs/run1/metrics.jsonl: {"step": 1, "loss": 0.5}
/// \endcode
class JsonlTracker final : public GeneralTracker {
 public:
  JsonlTracker(std::string run_name, std::string logging_dir, const LogValues& init_kwargs = {});
  ~JsonlTracker() override;

  std::string name() const override { return "jsonl"; }
  bool requires_logging_directory() const override { return true; }
  void start() override;
  void store_init_configuration(const LogValues& config) override;
  void log(const LogValues& values, std::optional<int64_t> step) override;
  void finish() override;

  std::string run_dir() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Writes `<logging_dir>/<run_name>/metrics.csv`: a header, then one row per log() call.
///
/// Columns: "step" (empty without a step), then the value names in the order they first
/// appeared (the first call's names sorted, later newcomers appended, sorted among themselves).
/// A row leaves the cells of names it does not log empty. A name that is new after rows were
/// written widens the table: the file is rewritten (atomically) with the longer header and the
/// earlier rows padded with empty cells, so the file stays a rectangle every CSV reader takes.
/// That costs one rewrite per new name, usually a handful per run. Cells are quoted as RFC 4180
/// says (when they hold a comma, a quote or a line break); numbers are written in their
/// shortest exact form, NaN and infinities as nan, inf, -inf. A value named "step" is an error.
/// The configuration goes to `config.csv` (columns name, value). start() on an existing
/// metrics.csv (a resumed run) goes on appending, with the columns of its header.
///
/// Example:
/// \code
///   accelerate::CsvTracker csv("run1", "logs");
///   csv.start();
///   csv.log({{"loss", 0.5}}, 1);   // step,loss / 1,0.5
///   csv.log({{"acc", 0.9}}, 2);    // step,loss,acc / 1,0.5, / 2,,0.9
/// \endcode
class CsvTracker final : public GeneralTracker {
 public:
  CsvTracker(std::string run_name, std::string logging_dir, const LogValues& init_kwargs = {});
  ~CsvTracker() override;

  std::string name() const override { return "csv"; }
  bool requires_logging_directory() const override { return true; }
  void start() override;
  void store_init_configuration(const LogValues& config) override;
  void log(const LogValues& values, std::optional<int64_t> step) override;
  void finish() override;

  std::string run_dir() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// "tensorboard", "jsonl", "csv": what `log_with = {"all"}` stands for.
const std::vector<std::string>& builtin_tracker_names();
/// Whether the built-in tracker `name` writes under a logging directory (all of them do).
bool builtin_tracker_requires_logging_directory(const std::string& name);
/// Constructs a built-in tracker (not started). An unknown name or option is an error listing
/// the known ones.
std::shared_ptr<GeneralTracker> make_builtin_tracker(const std::string& name,
                                                     const std::string& run_name,
                                                     const std::string& logging_dir,
                                                     const LogValues& init_kwargs = {});

/// One entry of `AcceleratorOptions::log_with`: a built-in tracker's name ("tensorboard",
/// "jsonl", "csv", or "all" for every one of them) or a tracker object.
///
/// Example:
/// \code
///   std::vector<accelerate::TrackerSpec> log_with{"tensorboard", std::make_shared<MyTracker>()};
/// \endcode
class TrackerSpec {
 public:
  TrackerSpec(std::string name) : name_(std::move(name)) {}
  TrackerSpec(const char* name) : name_(name) {}
  template <std::derived_from<GeneralTracker> T>
  TrackerSpec(std::shared_ptr<T> tracker) : tracker_(std::move(tracker)) {}

  /// The tracker object, or nullptr for a name.
  const std::shared_ptr<GeneralTracker>& tracker() const { return tracker_; }
  /// The name given, or the tracker's name().
  std::string name() const;

 private:
  std::string name_;
  std::shared_ptr<GeneralTracker> tracker_;
};

namespace detail {

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord files use it.
uint32_t crc32c(std::string_view data);
/// TFRecord's masked CRC: rotate right by 15, add 0xa282ead8.
uint32_t masked_crc32c(std::string_view data);
/// One TFRecord: length (uint64 LE), masked CRC of the length bytes (uint32 LE), the data, the
/// masked CRC of the data (uint32 LE).
std::string tfrecord_frame(std::string_view data);
/// A JSON string literal, quotes included.
std::string json_quote(std::string_view text);
/// The value as JSON (numbers shortest exact, NaN/Infinity as Python writes them).
std::string json_value(const LogValue& value);
/// A CSV cell, quoted when RFC 4180 requires it.
std::string csv_cell(std::string_view text);

}  // namespace detail

}  // namespace accelerate
