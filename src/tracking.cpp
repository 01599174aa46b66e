#include "accelerate/tracking.h"

#include "accelerate/safetensors.h"

#include "proto/tensorboard_event.pb.h"

#include <c10/util/Exception.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <system_error>

namespace accelerate {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------- LogValue

LogValue::LogValue(const at::Tensor& scalar) : value_(0.0) {
  TORCH_CHECK(scalar.defined(), "accelerate: cannot log an undefined tensor");
  TORCH_CHECK(scalar.numel() == 1, "accelerate: a logged tensor must hold one value, got shape ",
              scalar.sizes());
  value_ = scalar.item<double>();
}

double LogValue::to_double() const {
  if (const auto* b = std::get_if<bool>(&value_)) return *b ? 1.0 : 0.0;
  if (const auto* i = std::get_if<int64_t>(&value_)) return static_cast<double>(*i);
  if (const auto* d = std::get_if<double>(&value_)) return *d;
  TORCH_CHECK(false, "accelerate: the log value \"", std::get<std::string>(value_),
              "\" is text, not a number");
}

const std::string& LogValue::text() const {
  const auto* s = std::get_if<std::string>(&value_);
  TORCH_CHECK(s != nullptr, "accelerate: the log value ", to_string(), " is a number, not text");
  return *s;
}

namespace {

// Shortest text that reads back to the same double; the spelling of non-finite values differs
// between JSON (Python's) and CSV, so the caller picks it.
std::string format_double(double d, const char* nan, const char* inf) {
  if (std::isnan(d)) return nan;
  if (std::isinf(d)) return d > 0 ? inf : std::string("-") + inf;
  std::array<char, 32> buf{};
  auto [end, ec] = std::to_chars(buf.data(), buf.data() + buf.size(), d);
  TORCH_INTERNAL_ASSERT(ec == std::errc());
  return std::string(buf.data(), end);
}

std::string format_value(const LogValue& value, const char* nan, const char* inf) {
  return std::visit(
      [&](const auto& v) -> std::string {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, bool>) {
          return v ? "true" : "false";
        } else if constexpr (std::is_same_v<T, int64_t>) {
          return std::to_string(v);
        } else if constexpr (std::is_same_v<T, double>) {
          return format_double(v, nan, inf);
        } else {
          return v;
        }
      },
      value.variant());
}

}  // namespace

std::string LogValue::to_string() const {
  return format_value(*this, "nan", "inf");
}

std::string TrackerSpec::name() const {
  return tracker_ ? tracker_->name() : name_;
}

// ---------------------------------------------------------------------- formats

namespace detail {

namespace {

constexpr std::array<uint32_t, 256> make_crc32c_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t crc = i;
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ ((crc & 1U) ? 0x82F63B78U : 0U);
    table[i] = crc;
  }
  return table;
}

constexpr auto kCrc32cTable = make_crc32c_table();

void append_le(std::string& out, uint64_t value, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((value >> (8 * i)) & 0xFFU));
}

}  // namespace

uint32_t crc32c(std::string_view data) {
  uint32_t crc = 0xFFFFFFFFU;
  for (unsigned char byte : data) crc = kCrc32cTable[(crc ^ byte) & 0xFFU] ^ (crc >> 8);
  return crc ^ 0xFFFFFFFFU;
}

uint32_t masked_crc32c(std::string_view data) {
  const uint32_t crc = crc32c(data);
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8U;
}

std::string tfrecord_frame(std::string_view data) {
  std::string out;
  out.reserve(data.size() + 16);
  append_le(out, data.size(), 8);
  append_le(out, masked_crc32c(out), 4);
  out.append(data);
  append_le(out, masked_crc32c(data), 4);
  return out;
}

std::string json_quote(std::string_view text) {
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
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20) {
          std::array<char, 8> buf{};
          std::snprintf(buf.data(), buf.size(), "\\u%04x", c);
          out += buf.data();
        } else {
          out.push_back(static_cast<char>(c));  // UTF-8 passes through
        }
    }
  }
  out += '"';
  return out;
}

std::string json_value(const LogValue& value) {
  if (std::holds_alternative<std::string>(value.variant())) return json_quote(value.text());
  return format_value(value, "NaN", "Infinity");
}

std::string csv_cell(std::string_view text) {
  if (text.find_first_of(",\"\r\n") == std::string_view::npos) return std::string(text);
  std::string out = "\"";
  for (char c : text) {
    if (c == '"') out += '"';
    out.push_back(c);
  }
  out += '"';
  return out;
}

}  // namespace detail

namespace {

std::string run_directory(const std::string& tracker, const std::string& run_name,
                          const std::string& logging_dir) {
  TORCH_CHECK(!logging_dir.empty(), "accelerate: the ", tracker,
              " tracker needs a logging directory: set project_dir or "
              "project_config.logging_dir");
  TORCH_CHECK(!run_name.empty(), "accelerate: the ", tracker,
              " tracker needs a project name (init_trackers' first argument)");
  return (fs::path(logging_dir) / run_name).string();
}

void make_directories(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  TORCH_CHECK(!ec, "accelerate: cannot create the logging directory ", dir, ": ", ec.message());
}

void check_no_init_kwargs(const std::string& tracker, const LogValues& init_kwargs) {
  TORCH_CHECK(init_kwargs.empty(), "accelerate: the ", tracker,
              " tracker takes no init_kwargs, got \"", init_kwargs.begin()->first, "\"");
}

// log() and store_init_configuration() between start() and finish() only.
void check_tracker_open(const char* tracker, bool started, bool finished, const char* what) {
  TORCH_CHECK(started, "accelerate: the ", tracker,
              " tracker was not started: call start() (or Accelerator::init_trackers) before ",
              what);
  TORCH_CHECK(!finished, "accelerate: the ", tracker, " tracker is finished; cannot ", what);
}

void check_no_step_value(const std::string& tracker, const LogValues& values) {
  TORCH_CHECK(values.count("step") == 0, "accelerate: the ", tracker,
              " tracker writes the step itself: rename the value called \"step\"");
}

// A reader (TensorBoard, a spreadsheet, a tail -f) never sees half a rewritten file.
void write_file_atomically(const std::string& path, const std::string& contents) {
  safetensors::detail::write_file_atomically(path, {{contents.data(), contents.size()}});
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in.good(), "accelerate: cannot read ", path);
  std::ostringstream contents;
  contents << in.rdbuf();
  return contents.str();
}

std::ofstream open_for_writing(const std::string& path, std::ios::openmode mode) {
  std::ofstream out(path, std::ios::binary | mode);
  TORCH_CHECK(out.is_open(), "accelerate: cannot open ", path, " for writing");
  return out;
}

// One record of a CSV file starting at `pos` (RFC 4180 quoting); moves `pos` past it.
std::vector<std::string> parse_csv_record(const std::string& text, size_t& pos) {
  std::vector<std::string> cells(1);
  bool quoted = false;
  for (; pos < text.size(); ++pos) {
    const char c = text[pos];
    if (quoted) {
      if (c != '"') {
        cells.back().push_back(c);
      } else if (pos + 1 < text.size() && text[pos + 1] == '"') {
        cells.back().push_back('"');
        ++pos;
      } else {
        quoted = false;
      }
    } else if (c == '"') {
      quoted = true;
    } else if (c == ',') {
      cells.emplace_back();
    } else if (c == '\n') {
      ++pos;
      break;
    } else {
      cells.back().push_back(c);
    }
  }
  return cells;
}

std::string hostname() {
  std::array<char, 256> buf{};
  if (gethostname(buf.data(), buf.size() - 1) != 0 || buf[0] == '\0') return "localhost";
  return buf.data();
}

double unix_time() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

// ---------------------------------------------------------------------- TensorBoard

struct TensorBoardTracker::Impl {
  std::string run_dir;
  std::string filename_suffix;
  std::string path;
  std::ofstream out;
  bool started = false;
  bool finished = false;

  void check_open(const char* what) const {
    check_tracker_open("tensorboard", started, finished, what);
  }

  void write(const tensorboard::Event& event) {
    std::string bytes;
    const bool serialized = event.SerializeToString(&bytes);
    TORCH_INTERNAL_ASSERT(serialized);
    const auto record = detail::tfrecord_frame(bytes);
    out.write(record.data(), static_cast<std::streamsize>(record.size()));
  }

  void flush() {
    out.flush();
    TORCH_CHECK(out.good(), "accelerate: cannot write the TensorBoard event file ", path);
  }

  static void set_text(tensorboard::Summary::Value& value, const std::string& tag,
                       const std::string& text) {
    value.set_tag(tag);
    // TensorBoard's text plugin picks up string tensors whose metadata names it.
    value.mutable_metadata()->mutable_plugin_data()->set_plugin_name("text");
    auto* tensor = value.mutable_tensor();
    tensor->set_dtype(tensorboard::DT_STRING);
    tensor->mutable_tensor_shape()->add_dim()->set_size(1);
    tensor->add_string_val(text);
  }
};

TensorBoardTracker::TensorBoardTracker(std::string run_name, std::string logging_dir,
                                       const LogValues& init_kwargs)
    : impl_(std::make_unique<Impl>()) {
  impl_->run_dir = run_directory("tensorboard", run_name, logging_dir);
  for (const auto& [key, value] : init_kwargs) {
    TORCH_CHECK(key == "filename_suffix", "accelerate: unknown tensorboard init_kwargs \"", key,
                "\"; known: filename_suffix");
    TORCH_CHECK(!value.is_number(),
                "accelerate: tensorboard init_kwargs filename_suffix must be text, got ",
                value.to_string());
    impl_->filename_suffix = value.text();
  }
}

TensorBoardTracker::~TensorBoardTracker() = default;

std::string TensorBoardTracker::run_dir() const {
  return impl_->run_dir;
}
std::string TensorBoardTracker::event_file() const {
  return impl_->path;
}

void TensorBoardTracker::start() {
  if (impl_->started) return;
  make_directories(impl_->run_dir);
  // TensorBoard's own writer names files this way; the pid and the per-process counter keep two
  // writers started in the same second apart.
  static std::atomic<int> writers{0};
  std::array<char, 16> seconds{};
  std::snprintf(seconds.data(), seconds.size(), "%010lld", static_cast<long long>(unix_time()));
  impl_->path =
      (fs::path(impl_->run_dir) / ("events.out.tfevents." + std::string(seconds.data()) + "." +
                                   hostname() + "." + std::to_string(getpid()) + "." +
                                   std::to_string(writers.fetch_add(1)) + impl_->filename_suffix))
          .string();
  impl_->out = open_for_writing(impl_->path, std::ios::trunc);
  impl_->started = true;
  tensorboard::Event version;
  version.set_wall_time(unix_time());
  version.set_file_version("brain.Event:2");
  impl_->write(version);
  impl_->flush();
}

void TensorBoardTracker::store_init_configuration(const LogValues& config) {
  impl_->check_open("store the configuration");
  // A Markdown table: the Text tab renders it as one.
  std::string table = "| name | value |\n| --- | --- |\n";
  for (const auto& [key, value] : config) {
    auto escape = [](std::string s) {
      std::string out;
      for (char c : s) {
        if (c == '|') out += '\\';
        out.push_back(c == '\n' ? ' ' : c);
      }
      return out;
    };
    table += "| " + escape(key) + " | " + escape(value.to_string()) + " |\n";
  }
  tensorboard::Event event;
  event.set_wall_time(unix_time());
  event.set_step(0);
  Impl::set_text(*event.mutable_summary()->add_value(), "config", table);
  impl_->write(event);
  impl_->flush();
}

void TensorBoardTracker::log(const LogValues& values, std::optional<int64_t> step) {
  impl_->check_open("log");
  tensorboard::Event event;
  event.set_wall_time(unix_time());
  event.set_step(step.value_or(0));
  auto* summary = event.mutable_summary();
  for (const auto& [key, value] : values) {
    auto* v = summary->add_value();
    if (value.is_number()) {
      v->set_tag(key);
      v->set_simple_value(static_cast<float>(value.to_double()));
    } else {
      Impl::set_text(*v, key, value.text());
    }
  }
  impl_->write(event);
  impl_->flush();
}

void TensorBoardTracker::finish() {
  if (!impl_->started || impl_->finished) return;
  impl_->finished = true;
  impl_->out.close();
  TORCH_CHECK(!impl_->out.fail(), "accelerate: cannot close ", impl_->path);
}

// ---------------------------------------------------------------------- JSON lines

struct JsonlTracker::Impl {
  std::string run_dir;
  std::ofstream out;
  bool started = false;
  bool finished = false;

  void check_open(const char* what) const { check_tracker_open("jsonl", started, finished, what); }
};

JsonlTracker::JsonlTracker(std::string run_name, std::string logging_dir,
                           const LogValues& init_kwargs)
    : impl_(std::make_unique<Impl>()) {
  impl_->run_dir = run_directory("jsonl", run_name, logging_dir);
  check_no_init_kwargs("jsonl", init_kwargs);
}

JsonlTracker::~JsonlTracker() = default;

std::string JsonlTracker::run_dir() const {
  return impl_->run_dir;
}

void JsonlTracker::start() {
  if (impl_->started) return;
  make_directories(impl_->run_dir);
  impl_->out =
      open_for_writing((fs::path(impl_->run_dir) / "metrics.jsonl").string(), std::ios::app);
  impl_->started = true;
}

void JsonlTracker::store_init_configuration(const LogValues& config) {
  impl_->check_open("store the configuration");
  std::string json = "{";
  for (const auto& [key, value] : config) {
    if (json.size() > 1) json += ", ";
    json += detail::json_quote(key) + ": " + detail::json_value(value);
  }
  json += "}\n";
  write_file_atomically((fs::path(impl_->run_dir) / "config.json").string(), json);
}

void JsonlTracker::log(const LogValues& values, std::optional<int64_t> step) {
  impl_->check_open("log");
  check_no_step_value("jsonl", values);
  std::string line = "{\"step\": " + (step ? std::to_string(*step) : std::string("null"));
  for (const auto& [key, value] : values) {
    line += ", " + detail::json_quote(key) + ": " + detail::json_value(value);
  }
  line += "}\n";
  impl_->out << line;
  impl_->out.flush();
  TORCH_CHECK(impl_->out.good(), "accelerate: cannot write ", impl_->run_dir, "/metrics.jsonl");
}

void JsonlTracker::finish() {
  if (!impl_->started || impl_->finished) return;
  impl_->finished = true;
  impl_->out.close();
}

// ---------------------------------------------------------------------- CSV

struct CsvTracker::Impl {
  std::string run_dir;
  std::string path;
  std::vector<std::string> columns;  // after "step"
  std::set<std::string> known;
  bool started = false;
  bool finished = false;
  bool header_written = false;

  void check_open(const char* what) const { check_tracker_open("csv", started, finished, what); }

  std::string header() const {
    // Appended piece by piece: GCC 12 misreads `"," + std::string` as an overflow.
    std::string line = "step";
    for (const auto& c : columns) {
      line += ',';
      line += detail::csv_cell(c);
    }
    line += '\n';
    return line;
  }

  // Rewrites the file with the current (wider) header, padding every earlier row with
  // `added` empty cells. Rows are split on line breaks outside quotes, since quoted cells may
  // hold line breaks of their own.
  void widen(size_t added) {
    const std::string old = read_file(path);
    std::string rewritten = header();
    bool quoted = false;
    bool in_header = true;
    std::string row;
    for (char c : old) {
      if (c == '"') quoted = !quoted;
      if (c == '\n' && !quoted) {
        if (!in_header) rewritten += row + std::string(added, ',') + "\n";
        in_header = false;
        row.clear();
      } else {
        row.push_back(c);
      }
    }
    TORCH_INTERNAL_ASSERT(row.empty(), "accelerate: ", path, " does not end with a line break");
    write_file_atomically(path, rewritten);
  }
};

CsvTracker::CsvTracker(std::string run_name, std::string logging_dir, const LogValues& init_kwargs)
    : impl_(std::make_unique<Impl>()) {
  impl_->run_dir = run_directory("csv", run_name, logging_dir);
  impl_->path = (fs::path(impl_->run_dir) / "metrics.csv").string();
  check_no_init_kwargs("csv", init_kwargs);
}

CsvTracker::~CsvTracker() = default;

std::string CsvTracker::run_dir() const {
  return impl_->run_dir;
}

void CsvTracker::start() {
  if (impl_->started) return;
  make_directories(impl_->run_dir);
  // A resumed run goes on in the same file, with the columns it already has.
  std::error_code ec;
  if (fs::file_size(impl_->path, ec) > 0 && !ec) {
    const std::string old = read_file(impl_->path);
    size_t pos = 0;
    auto header = parse_csv_record(old, pos);
    TORCH_CHECK(!header.empty() && header[0] == "step", "accelerate: ", impl_->path,
                " exists but is not a metrics file (its first column is not \"step\")");
    impl_->columns.assign(header.begin() + 1, header.end());
    impl_->known.insert(impl_->columns.begin(), impl_->columns.end());
    impl_->header_written = true;
  }
  impl_->started = true;
}

void CsvTracker::store_init_configuration(const LogValues& config) {
  impl_->check_open("store the configuration");
  std::string csv = "name,value\n";
  for (const auto& [key, value] : config) {
    csv += detail::csv_cell(key) + "," + detail::csv_cell(value.to_string()) + "\n";
  }
  write_file_atomically((fs::path(impl_->run_dir) / "config.csv").string(), csv);
}

void CsvTracker::log(const LogValues& values, std::optional<int64_t> step) {
  impl_->check_open("log");
  check_no_step_value("csv", values);
  size_t added = 0;
  for (const auto& [key, value] : values) {
    if (impl_->known.insert(key).second) {
      impl_->columns.push_back(key);
      ++added;
    }
  }
  if (!impl_->header_written) {
    write_file_atomically(impl_->path, impl_->header());
    impl_->header_written = true;
  } else if (added > 0) {
    impl_->widen(added);
  }
  std::string row = step ? std::to_string(*step) : "";
  for (const auto& column : impl_->columns) {
    row += ",";
    auto it = values.find(column);
    if (it != values.end()) row += detail::csv_cell(it->second.to_string());
  }
  row += "\n";
  auto out = open_for_writing(impl_->path, std::ios::app);
  out << row;
  out.flush();
  TORCH_CHECK(out.good(), "accelerate: cannot write ", impl_->path);
}

void CsvTracker::finish() {
  impl_->finished = impl_->started;
}

// ---------------------------------------------------------------------- registry

const std::vector<std::string>& builtin_tracker_names() {
  static const std::vector<std::string> names{"tensorboard", "jsonl", "csv"};
  return names;
}

bool builtin_tracker_requires_logging_directory(const std::string& name) {
  const auto& names = builtin_tracker_names();
  TORCH_CHECK(std::find(names.begin(), names.end(), name) != names.end(),
              "accelerate: unknown tracker \"", name, "\"");
  return true;
}

std::shared_ptr<GeneralTracker> make_builtin_tracker(const std::string& name,
                                                     const std::string& run_name,
                                                     const std::string& logging_dir,
                                                     const LogValues& init_kwargs) {
  if (name == "tensorboard")
    return std::make_shared<TensorBoardTracker>(run_name, logging_dir, init_kwargs);
  if (name == "jsonl") return std::make_shared<JsonlTracker>(run_name, logging_dir, init_kwargs);
  if (name == "csv") return std::make_shared<CsvTracker>(run_name, logging_dir, init_kwargs);
  TORCH_CHECK(false, "accelerate: unknown tracker \"", name,
              "\"; known: tensorboard, jsonl, csv, all");
}

}  // namespace accelerate
