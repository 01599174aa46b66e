// `accelerate estimate-memory PATH [--dtypes ...]`: how much memory a model needs to load and to
// train with Adam, read from its safetensors checkpoint. Python Accelerate builds an empty model
// from the Hub for this; a C++ user has a checkpoint on disk, and its headers hold every tensor's
// dtype and shape, so nothing but the headers is read and LibTorch is not needed.
//
// The figures follow Python's estimate.py: sizes are counted as if every floating-point tensor
// were float32 (Python instantiates the model in float32), integer and bool tensors at their own
// size; the other dtypes divide that; "Training using Adam" is the largest of Python's per-phase
// estimates for a batch size of one.
#include "command.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <vector>

namespace accelerate::cli {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

// The names Hugging Face and Accelerate's save_model give a checkpoint.
constexpr const char* kSingleFileName = "model.safetensors";
constexpr const char* kIndexFileName = "model.safetensors.index.json";
// The safetensors reference implementation refuses larger headers; so do we, rather than
// allocating whatever a corrupt length field says.
constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;
constexpr const char* kMetadataKey = "__metadata__";

struct DtypeInfo {
  const char* name;
  std::uint64_t bytes;
  bool floating;
};

// Sub-byte types (F4, F6_*) are left out: their byte counts are not numel * size.
constexpr std::array<DtypeInfo, 16> kDtypes = {{
    {"BOOL", 1, false},
    {"U8", 1, false},
    {"I8", 1, false},
    {"F8_E5M2", 1, true},
    {"F8_E4M3", 1, true},
    {"F8_E8M0", 1, true},
    {"I16", 2, false},
    {"U16", 2, false},
    {"F16", 2, true},
    {"BF16", 2, true},
    {"I32", 4, false},
    {"U32", 4, false},
    {"F32", 4, true},
    {"F64", 8, true},
    {"I64", 8, false},
    {"U64", 8, false},
}};

const DtypeInfo* find_dtype(const std::string& name) {
  for (const auto& d : kDtypes) {
    if (name == d.name) return &d;
  }
  return nullptr;
}

struct TensorInfo {
  std::string name;
  const DtypeInfo* dtype = nullptr;
  std::uint64_t numel = 1;
};

// Overflow-checked arithmetic: a header may claim any shape.
std::optional<std::uint64_t> checked_mul(std::uint64_t a, std::uint64_t b) {
  std::uint64_t out = 0;
  if (__builtin_mul_overflow(a, b, &out)) return std::nullopt;
  return out;
}

std::optional<std::uint64_t> as_u64(const Json& v) {
  if (v.is_number_unsigned()) return v.get<std::uint64_t>();
  if (v.is_number_integer() && v.get<std::int64_t>() >= 0) {
    return static_cast<std::uint64_t>(v.get<std::int64_t>());
  }
  return std::nullopt;
}

[[noreturn]] void bad_file(const fs::path& path, const std::string& why) {
  throw UsageError(path.string() + ": not a valid safetensors file: " + why);
}

// Reads and validates one safetensors header: every tensor's dtype, shape and byte range must
// agree with each other and with the file's size.
std::vector<TensorInfo> read_safetensors_header(const fs::path& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) throw UsageError(path.string() + ": no such file");
  const std::uint64_t file_size = fs::file_size(path, ec);
  if (ec) throw UsageError(path.string() + ": cannot read: " + ec.message());
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UsageError(path.string() + ": cannot open for reading");
  if (file_size < 8) {
    bad_file(path,
             "only " + std::to_string(file_size) + " bytes, less than the 8-byte header length");
  }
  unsigned char length_bytes[8];
  in.read(reinterpret_cast<char*>(length_bytes), 8);
  std::uint64_t header_length = 0;
  for (int i = 7; i >= 0; --i) header_length = (header_length << 8) | length_bytes[i];
  if (header_length == 0 || header_length > file_size - 8) {
    bad_file(path, "the header length field says " + std::to_string(header_length) +
                       " bytes, but the file has " + std::to_string(file_size - 8) +
                       " bytes after it");
  }
  if (header_length > kMaxHeaderBytes) {
    bad_file(path, "a header of " + std::to_string(header_length) + " bytes (the limit is " +
                       std::to_string(kMaxHeaderBytes) + ")");
  }
  std::string text(header_length, '\0');
  in.read(text.data(), static_cast<std::streamsize>(header_length));
  if (!in) throw UsageError(path.string() + ": cannot read the header");
  const Json header = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded()) bad_file(path, "the header is not valid JSON");
  if (!header.is_object()) bad_file(path, "the header is not a JSON object");

  const std::uint64_t data_size = file_size - 8 - header_length;
  std::vector<TensorInfo> tensors;
  std::vector<std::tuple<std::uint64_t, std::uint64_t, std::string>> ranges;
  for (const auto& [name, entry] : header.items()) {
    if (name == kMetadataKey) {
      if (!entry.is_object()) bad_file(path, std::string(kMetadataKey) + " is not an object");
      continue;
    }
    const std::string where = "tensor '" + name + "'";
    if (!entry.is_object()) bad_file(path, where + " is not an object");
    const auto dtype_it = entry.find("dtype");
    const auto shape_it = entry.find("shape");
    const auto offsets_it = entry.find("data_offsets");
    if (dtype_it == entry.end() || !dtype_it->is_string()) {
      bad_file(path, where + " has no string 'dtype'");
    }
    TensorInfo tensor{name, find_dtype(dtype_it->get<std::string>()), 1};
    if (tensor.dtype == nullptr) {
      bad_file(path, where + " has an unsupported dtype '" + dtype_it->get<std::string>() + "'");
    }
    if (shape_it == entry.end() || !shape_it->is_array()) {
      bad_file(path, where + " has no 'shape' array");
    }
    for (const auto& dim : *shape_it) {
      const auto size = as_u64(dim);
      if (!size) bad_file(path, where + " has a shape entry that is not a non-negative integer");
      const auto product = checked_mul(tensor.numel, *size);
      if (!product) bad_file(path, where + " has a shape whose element count overflows");
      tensor.numel = *product;
    }
    if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2) {
      bad_file(path, where + " has no 'data_offsets' pair");
    }
    const auto begin = as_u64((*offsets_it)[0]);
    const auto end = as_u64((*offsets_it)[1]);
    if (!begin || !end || *begin > *end || *end > data_size) {
      bad_file(path, where + " has data_offsets outside the " + std::to_string(data_size) +
                         "-byte data section");
    }
    const auto bytes = checked_mul(tensor.numel, tensor.dtype->bytes);
    if (!bytes || *bytes != *end - *begin) {
      bad_file(path, where + " spans " + std::to_string(*end - *begin) + " bytes but its dtype " +
                         tensor.dtype->name + " and shape need " +
                         (bytes ? std::to_string(*bytes) : std::string("more than 2^64")));
    }
    ranges.emplace_back(*begin, *end, name);
    tensors.push_back(std::move(tensor));
  }
  // The format stores tensors back to back; overlapping ranges mean a corrupt (or hostile)
  // header whose sizes would count the same bytes twice.
  std::sort(ranges.begin(), ranges.end());
  for (std::size_t i = 1; i < ranges.size(); ++i) {
    if (std::get<0>(ranges[i]) < std::get<1>(ranges[i - 1])) {
      bad_file(path, "the data of tensors '" + std::get<2>(ranges[i - 1]) + "' and '" +
                         std::get<2>(ranges[i]) + "' overlap");
    }
  }
  return tensors;
}

struct Checkpoint {
  std::size_t files = 0;
  std::vector<TensorInfo> tensors;
};

// A sharded checkpoint: the index maps every tensor to the shard holding it.
Checkpoint read_sharded(const fs::path& index_path) {
  std::ifstream in(index_path);
  if (!in) throw UsageError(index_path.string() + ": cannot open for reading");
  const Json index = Json::parse(in, nullptr, /*allow_exceptions=*/false);
  const std::string bad = index_path.string() + ": not a valid safetensors index: ";
  if (index.is_discarded() || !index.is_object()) throw UsageError(bad + "not a JSON object");
  const auto map_it = index.find("weight_map");
  if (map_it == index.end() || !map_it->is_object() || map_it->empty()) {
    throw UsageError(bad + "no non-empty 'weight_map' object");
  }
  std::map<std::string, std::vector<std::string>> names_by_shard;
  for (const auto& [name, shard] : map_it->items()) {
    if (!shard.is_string()) throw UsageError(bad + "the shard of '" + name + "' is not a string");
    names_by_shard[shard.get<std::string>()].push_back(name);
  }
  Checkpoint checkpoint;
  std::set<std::string> seen;
  for (const auto& [shard, names] : names_by_shard) {
    const fs::path shard_path = index_path.parent_path() / shard;
    auto tensors = read_safetensors_header(shard_path);
    std::set<std::string> held;
    for (auto& t : tensors) {
      held.insert(t.name);
      if (!seen.insert(t.name).second) {
        throw UsageError(bad + "tensor '" + t.name + "' is in more than one shard");
      }
      checkpoint.tensors.push_back(std::move(t));
    }
    for (const auto& name : names) {
      if (held.count(name) == 0) {
        throw UsageError(bad + "it puts '" + name + "' in " + shard + ", which has no such tensor");
      }
    }
    ++checkpoint.files;
  }
  return checkpoint;
}

Checkpoint read_checkpoint(const fs::path& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw UsageError(path.string() + ": no such file or directory");
  if (fs::is_directory(path, ec)) {
    if (fs::is_regular_file(path / kSingleFileName, ec))
      return read_checkpoint(path / kSingleFileName);
    if (fs::is_regular_file(path / kIndexFileName, ec))
      return read_checkpoint(path / kIndexFileName);
    throw UsageError(path.string() + ": a directory with neither " + kSingleFileName + " nor " +
                     kIndexFileName);
  }
  if (path.extension() == ".json") return read_sharded(path);
  return Checkpoint{1, read_safetensors_header(path)};
}

// ------------------------------------------------------------------ the estimate

// Bytes of `t` when the model is loaded in float32, as Python's estimate counts it.
std::uint64_t float32_bytes(const TensorInfo& t) {
  return t.numel * (t.dtype->floating ? 4 : t.dtype->bytes);
}

struct Layer {
  std::string name;
  std::uint64_t numel = 0;
  std::uint64_t bytes = 0;
};

// Python's largest "layer" is a module without children. A checkpoint has no module tree, but a
// tensor's name is its module's path plus its own name, so tensors sharing everything before the
// last '.' are one module's parameters and buffers; a name without '.' is a layer of its own.
Layer largest_layer(const std::vector<TensorInfo>& tensors) {
  std::map<std::string, Layer> layers;
  for (const auto& t : tensors) {
    const auto dot = t.name.rfind('.');
    const std::string module = dot == std::string::npos ? t.name : t.name.substr(0, dot);
    Layer& layer = layers[module];
    layer.name = module;
    layer.numel += t.numel;
    layer.bytes += float32_bytes(t);
  }
  Layer best;
  for (const auto& [name, layer] : layers) {
    if (layer.bytes > best.bytes || best.name.empty()) best = layer;
  }
  return best;
}

// The row for one dtype: Python's gather_data and estimate_training_usage. Sizes are doubles
// because Python divides (an int4 model of 12 bytes takes 1.5).
struct Row {
  std::string dtype;
  double largest_layer = 0;
  double total = 0;
  std::optional<double> gradients;
  std::optional<double> adam_states;
  std::optional<double> training;
};

Row estimate_row(const std::string& dtype, std::uint64_t fp32_total, std::uint64_t fp32_layer) {
  Row row{dtype, static_cast<double>(fp32_layer), static_cast<double>(fp32_total), {}, {}, {}};
  const double fp32 = static_cast<double>(fp32_total);
  // Python's fp16_size is bytes // 2.
  const double fp16 = static_cast<double>(fp32_total / 2);
  if (dtype == "float32") {
    row.gradients = fp32;
    row.adam_states = 2 * fp32;
    // The optimizer step holds weights, gradients and both moments at once.
    row.training = 4 * fp32;
  } else if (dtype == "float16" || dtype == "bfloat16") {
    // Mixed precision keeps fp32 master weights; the half-precision weight gradient and the
    // GEMMs add half again to the gradients; the fp32 Adam moments are the largest part, and
    // Python reports the largest part.
    row.gradients = fp32 + fp16;
    row.adam_states = 2 * fp32;
    row.training = std::max({fp32, *row.gradients, *row.adam_states});
  }
  double divisor = 1;
  if (dtype == "float16" || dtype == "bfloat16") divisor = 2;
  if (dtype == "int8") divisor = 4;
  if (dtype == "int4") divisor = 8;
  row.largest_layer /= divisor;
  row.total /= divisor;
  return row;
}

// Python's round(x, 2) printed by repr: at least one decimal, at most two.
std::string two_decimals(double x) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.2f", x);
  std::string s = buf;
  while (s.size() > 1 && s.back() == '0' && s[s.size() - 2] != '.') s.pop_back();
  return s;
}

// Python's convert_bytes.
std::string human_bytes(double size) {
  static const char* const kUnits[] = {"bytes", "KB", "MB", "GB", "TB"};
  for (const char* unit : kUnits) {
    if (size < 1024.0) {
      if (std::string(unit) == "bytes" && size == std::floor(size)) {
        return std::to_string(static_cast<std::uint64_t>(size)) + " bytes";
      }
      return two_decimals(size) + " " + unit;
    }
    size /= 1024.0;
  }
  return two_decimals(size) + " PB";
}

// The exact figure: integral byte counts as integers, fractions (int4 of odd sizes) as the
// shortest decimal that reads back the same.
std::string exact_bytes(double size) {
  char buf[64];
  const auto result = std::to_chars(buf, buf + sizeof(buf), size);
  return std::string(buf, result.ptr);
}

// Terminal columns of a UTF-8 string, counting each code point as one (the table is ASCII
// except for a path in the title).
std::size_t display_width(const std::string& s) {
  return static_cast<std::size_t>(std::count_if(
      s.begin(), s.end(), [](char c) { return (static_cast<unsigned char>(c) & 0xC0) != 0x80; }));
}

std::string repeat(const std::string& piece, std::size_t n) {
  std::string out;
  for (std::size_t i = 0; i < n; ++i) out += piece;
  return out;
}

std::string center(const std::string& text, std::size_t width) {
  const std::size_t w = display_width(text);
  if (w >= width) return text;
  const std::size_t left = (width - w) / 2;
  return std::string(left, ' ') + text + std::string(width - w - left, ' ');
}

// A box-drawn table with a title row, in the look of Python's create_ascii_table.
std::string render_table(const std::string& title, const std::vector<std::string>& headers,
                         const std::vector<std::vector<std::string>>& rows) {
  constexpr std::size_t kPadding = 2;
  std::vector<std::size_t> widths;
  for (std::size_t c = 0; c < headers.size(); ++c) {
    std::size_t w = display_width(headers[c]);
    for (const auto& row : rows) w = std::max(w, display_width(row[c]));
    widths.push_back(w + kPadding);
  }
  // Inner width of the title row: the columns plus the separators between them.
  std::size_t inner = widths.size() - 1;
  for (std::size_t w : widths) inner += w;
  if (display_width(title) + kPadding > inner) {
    widths.back() += display_width(title) + kPadding - inner;
    inner = display_width(title) + kPadding;
  }
  auto rule = [&](const char* left, const char* middle, const char* right) {
    std::string line = left;
    for (std::size_t c = 0; c < widths.size(); ++c) {
      line += repeat("─", widths[c]) + (c + 1 < widths.size() ? middle : right);
    }
    return line + "\n";
  };
  auto cells = [&](const std::vector<std::string>& values) {
    std::string line = "│";
    for (std::size_t c = 0; c < widths.size(); ++c) line += center(values[c], widths[c]) + "│";
    return line + "\n";
  };
  std::string out = "┌" + repeat("─", inner) + "┐\n";
  out += "│" + center(title, inner) + "│\n";
  out += rule("├", "┬", "┤");
  out += cells(headers);
  out += rule("├", "┼", "┤");
  for (const auto& row : rows) out += cells(row);
  out += rule("└", "┴", "┘");
  return out;
}

const std::vector<std::string> kDtypeChoices = {"float32", "float16", "bfloat16", "int8", "int4"};

class EstimateMemoryCommand final : public Command {
 public:
  std::string_view name() const override { return "estimate-memory"; }
  std::string_view summary() const override {
    return "Estimate the memory a safetensors checkpoint needs to load and to train with Adam";
  }

  void add_options(CLI::App& app) override {
    app.add_option("PATH", path_,
                   "A .safetensors file, a model.safetensors.index.json (sharded checkpoint), or "
                   "a directory holding either")
        ->required();
    app.add_option("--dtypes", dtypes_,
                   "Precisions to estimate, any of float32, float16, bfloat16, int8, int4 "
                   "(default: float32 float16 int8 int4); put PATH before this option")
        ->check(CLI::IsMember(kDtypeChoices));
    app.add_flag("--bytes", exact_,
                 "Print exact byte counts instead of human-readable sizes (default: off)");
    app.footer(
        "Reads only the checkpoint's headers. Sizes follow Python Accelerate's estimate-memory: "
        "every floating-point tensor counted as float32 (integer and bool tensors at their own "
        "size), float16/bfloat16 halve it, int8 quarter it, int4 divide it by 8. Largest Layer: "
        "the tensors sharing a name up to the last '.' (one module). Gradients, Adam States and "
        "Training using Adam are for training at that precision (mixed precision for "
        "float16/bfloat16) with batch size 1, activations not included: float32 has gradients "
        "1x, Adam moments 2x and a step peak of 4x the float32 size; float16/bfloat16 has "
        "gradients 1.5x and Adam moments 2x, and Training is the largest of these (2x). "
        "Exit status 2 for a path that is not a readable safetensors checkpoint.");
  }

  int run() override {
    const Checkpoint checkpoint = read_checkpoint(path_);
    std::uint64_t numel = 0;
    std::uint64_t stored = 0;
    std::uint64_t fp32_total = 0;
    for (const auto& t : checkpoint.tensors) {
      numel += t.numel;
      stored += t.numel * t.dtype->bytes;
      fp32_total += float32_bytes(t);
    }
    const Layer layer = largest_layer(checkpoint.tensors);
    auto size = [&](double bytes) { return exact_ ? exact_bytes(bytes) : human_bytes(bytes); };

    std::cout << "Checkpoint: " << path_ << " (" << checkpoint.files
              << (checkpoint.files == 1 ? " file, " : " files, ") << checkpoint.tensors.size()
              << " tensors)\n";
    std::cout << "Parameters: " << numel << "\n";
    std::cout << "Stored size: " << size(static_cast<double>(stored)) << "\n";
    if (!layer.name.empty()) {
      std::cout << "Largest layer: " << layer.name << " (" << layer.numel << " parameters)\n";
    }

    std::vector<std::vector<std::string>> rows;
    for (const auto& dtype : dtypes_) {
      const Row row = estimate_row(dtype, fp32_total, layer.bytes);
      auto maybe = [&](const std::optional<double>& v) { return v ? size(*v) : "N/A"; };
      rows.push_back({row.dtype, size(row.largest_layer), size(row.total), maybe(row.gradients),
                      maybe(row.adam_states), maybe(row.training)});
    }
    std::cout << render_table(
        "Memory Usage for loading `" + path_ + "`",
        {"dtype", "Largest Layer", "Total Size", "Gradients", "Adam States", "Training using Adam"},
        rows);
    return 0;
  }

 private:
  std::string path_;
  std::vector<std::string> dtypes_ = {"float32", "float16", "int8", "int4"};
  bool exact_ = false;
};

}  // namespace

std::unique_ptr<Command> make_estimate_memory_command() {
  return std::make_unique<EstimateMemoryCommand>();
}

}  // namespace accelerate::cli
