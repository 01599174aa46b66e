#include <accelerate/safetensors.h>

#include "detail/checksum.h"
#include "detail/file_mapping.h"

#include <c10/util/Exception.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <optional>
#include <set>
#include <sstream>

namespace accelerate::safetensors {
namespace {

// The format is little-endian; byte-swapping is not implemented, so refuse to build rather than
// silently write files nobody else can read. (The compiler macro, not std::endian, keeps this
// file C++17-clean for the clang fuzzer build.)
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors support assumes a little-endian host");

using accelerate::detail::errno_text;
using accelerate::detail::FileDescriptor;
using accelerate::detail::in_quotes;
using accelerate::detail::open_read_only;
using accelerate::detail::read_exact;
using accelerate::detail::regular_file_size;
using Json = nlohmann::ordered_json;

constexpr const char* kMetadataKey = "__metadata__";
// Nesting deeper than a valid header needs (object -> entry -> array) is refused while parsing,
// so a hostile header cannot build a deeply nested document.
constexpr int kMaxJsonDepth = 4;

struct DtypeName {
  const char* name;
  at::ScalarType dtype;
};
constexpr DtypeName kDtypes[] = {
    {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf},  {"BF16", at::kBFloat16},
    {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
    {"U8", at::kByte},    {"BOOL", at::kBool},
};
// Names the format defines for which LibTorch 1.13 has no dtype: a clearer error than "unknown".
constexpr const char* kUnsupportedNames[] = {"U16",     "U32",     "U64",     "F8_E4M3", "F8_E5M2",
                                             "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4",      "C64"};

uint64_t read_le_u64(const char* p) {
  uint64_t value = 0;
  std::memcpy(&value, p, sizeof(value));
  return value;
}

// Rejects duplicate keys (the JSON library would keep the last silently, so two entries could
// alias one name) and excess nesting, both while the document is being built.
Json parse_json(std::string_view text) {
  std::vector<std::set<std::string>> keys;
  auto callback = [&](int depth, Json::parse_event_t event, Json& parsed) {
    TORCH_CHECK(depth <= kMaxJsonDepth, "safetensors header nests deeper than ", kMaxJsonDepth,
                " levels");
    if (event == Json::parse_event_t::object_start) {
      keys.emplace_back();
    } else if (event == Json::parse_event_t::object_end) {
      keys.pop_back();
    } else if (event == Json::parse_event_t::key && !keys.empty()) {
      const auto& key = parsed.get_ref<const std::string&>();
      TORCH_CHECK(keys.back().insert(key).second, "safetensors header has the duplicate key ",
                  in_quotes(key));
    }
    return true;
  };
  try {
    return Json::parse(text.begin(), text.end(), callback);
  } catch (const Json::exception& e) {
    TORCH_CHECK(false, "safetensors header is not valid JSON: ", e.what());
  }
}

uint64_t as_unsigned(const Json& value, const std::string& what) {
  TORCH_CHECK(value.is_number_integer(), what, " must be an integer, got ", value.dump());
  TORCH_CHECK(value.is_number_unsigned(), what, " must not be negative, got ", value.dump());
  return value.get<uint64_t>();
}

TensorInfo parse_entry(const std::string& name, const Json& entry, uint64_t data_size) {
  const std::string where = "tensor " + in_quotes(name);
  TORCH_CHECK(entry.is_object(), where, ": header entry must be an object, got ", entry.dump());
  // Unknown fields are ignored, as the reference implementation does, so that files from future
  // writers still load.
  for (const char* field : {"dtype", "shape", "data_offsets"}) {
    TORCH_CHECK(entry.contains(field), where, ": header entry lacks \"", field, "\"");
  }
  TensorInfo info;
  info.name = name;

  const Json& dtype = entry.at("dtype");
  TORCH_CHECK(dtype.is_string(), where, ": \"dtype\" must be a string, got ", dtype.dump());
  try {
    info.dtype = dtype_from_name(dtype.get<std::string>());
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, where, ": ", e.what_without_backtrace());
  }
  const uint64_t item_size = c10::elementSize(info.dtype);

  const Json& shape = entry.at("shape");
  TORCH_CHECK(shape.is_array(), where, ": \"shape\" must be an array, got ", shape.dump());
  uint64_t numel = 1;
  for (const Json& dim : shape) {
    const uint64_t size = as_unsigned(dim, where + ": shape entry");
    TORCH_CHECK(size <= static_cast<uint64_t>(INT64_MAX), where, ": shape entry ", size,
                " is too large");
    info.shape.push_back(static_cast<int64_t>(size));
    TORCH_CHECK(
        !__builtin_mul_overflow(numel, size, &numel) && numel <= static_cast<uint64_t>(INT64_MAX),
        where, ": shape ", shape.dump(), " has more elements than fit in 64 bits");
  }
  uint64_t nbytes = 0;
  TORCH_CHECK(!__builtin_mul_overflow(numel, item_size, &nbytes), where, ": shape ", shape.dump(),
              " holds more bytes than fit in 64 bits");

  const Json& offsets = entry.at("data_offsets");
  TORCH_CHECK(offsets.is_array() && offsets.size() == 2, where,
              ": \"data_offsets\" must be an array [begin, end], got ", offsets.dump());
  info.begin = as_unsigned(offsets[0], where + ": data_offsets begin");
  info.end = as_unsigned(offsets[1], where + ": data_offsets end");
  TORCH_CHECK(info.begin <= info.end, where, ": data_offsets begin ", info.begin, " is after end ",
              info.end);
  TORCH_CHECK(info.end <= data_size, where, ": data_offsets end ", info.end,
              " is past the end of the data buffer (", data_size, " bytes)");
  TORCH_CHECK(info.end - info.begin == nbytes, where, ": data_offsets span ", info.end - info.begin,
              " bytes but shape ", shape.dump(), " of ", dtype.dump(), " needs ", nbytes);
  return info;
}

// The reference implementation requires the tensors to tile the data buffer exactly: no byte
// shared by two tensors, none owned by no tensor.
void check_coverage(const std::vector<TensorInfo>& tensors, uint64_t data_size) {
  std::vector<const TensorInfo*> sorted;
  sorted.reserve(tensors.size());
  for (const auto& info : tensors) sorted.push_back(&info);
  std::stable_sort(sorted.begin(), sorted.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return std::pair(a->begin, a->end) < std::pair(b->begin, b->end);
  });
  uint64_t expected = 0;
  for (const TensorInfo* info : sorted) {
    TORCH_CHECK(info->begin <= expected, "tensor ", in_quotes(info->name), " starts at ",
                info->begin, " leaving a hole in the data buffer after byte ", expected);
    TORCH_CHECK(info->begin == expected, "tensor ", in_quotes(info->name), " at [", info->begin,
                ", ", info->end, ") overlaps the tensor before it, which ends at ", expected);
    expected = info->end;
  }
  TORCH_CHECK(expected == data_size, "the data buffer has ", data_size - expected,
              " bytes after the last tensor (ends at ", expected, ") that no tensor covers");
}

// One past the '}' that closes the object `text` starts with, or npos when it never closes.
// nlohmann's parser cannot say where a value ended, and it takes a NUL byte for the end of its
// input, so "{...}\0anything" would pass as a clean header: the end is found here instead and
// what follows it is checked by hand. Brackets need not match in kind; the JSON parser refuses
// the text up to here if they do not.
size_t json_object_end(std::string_view text) {
  int64_t depth = 0;
  bool in_string = false;
  bool escaped = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      ++depth;
    } else if ((c == '}' || c == ']') && --depth == 0) {
      return i + 1;
    }
  }
  return std::string_view::npos;
}

std::string byte_text(char c) {
  char buffer[8];
  std::snprintf(buffer, sizeof(buffer), "0x%02x",
                static_cast<unsigned>(static_cast<unsigned char>(c)));
  return buffer;
}

// Validates the header text given the size of the data buffer that follows it.
Header parse_header_text(std::string_view text, uint64_t data_start, uint64_t data_size) {
  // As the reference implementation: a header that does not start with '{' is refused before
  // any JSON parsing, which also rejects leading whitespace tricks.
  TORCH_CHECK(!text.empty() && text.front() == '{',
              "safetensors header must start with '{' (is this a safetensors file?)");
  // Offsets in errors count from the start of the file, where a hex dump would show them.
  const size_t end = json_object_end(text);
  const std::string_view json_text = text.substr(0, end);
  const size_t nul = json_text.find('\0');
  TORCH_CHECK(nul == std::string_view::npos, "safetensors header has a NUL byte at file offset ",
              8 + nul, " inside its JSON text");
  const Json json = parse_json(json_text);
  // The format pads the header with spaces so that the data buffer starts aligned; anything
  // else after the JSON is a damaged or crafted file.
  for (size_t i = json_text.size(); i < text.size(); ++i) {
    TORCH_CHECK(text[i] == ' ', "safetensors header has the byte ", byte_text(text[i]),
                " at file offset ", 8 + i, " after its JSON text, which ends at offset ",
                8 + json_text.size(), "; only spaces (0x20) may pad it");
  }
  TORCH_CHECK(json.is_object(), "safetensors header must be a JSON object, got ", json.type_name());
  Header header;
  header.data_start = data_start;
  header.data_size = data_size;
  for (const auto& [key, value] : json.items()) {
    if (key == kMetadataKey) {
      TORCH_CHECK(value.is_object(), "\"__metadata__\" must be an object, got ", value.dump());
      for (const auto& [meta_key, meta_value] : value.items()) {
        TORCH_CHECK(meta_value.is_string(), "\"__metadata__\" value of ", in_quotes(meta_key),
                    " must be a string, got ", meta_value.dump());
        header.metadata.emplace(meta_key, meta_value.get<std::string>());
      }
      continue;
    }
    header.tensors.push_back(parse_entry(key, value, data_size));
  }
  check_coverage(header.tensors, data_size);
  return header;
}

// Reads the length prefix and checks it against the file size.
uint64_t header_length(std::string_view prefix, uint64_t file_size) {
  TORCH_CHECK(file_size >= 8, "safetensors file is ", file_size,
              " bytes, shorter than the 8-byte header length");
  const uint64_t n = read_le_u64(prefix.data());
  TORCH_CHECK(n <= kMaxHeaderSize, "safetensors header length ", n, " exceeds the limit of ",
              kMaxHeaderSize, " bytes");
  TORCH_CHECK(n <= file_size - 8, "safetensors header length ", n, " is larger than the ",
              file_size - 8, " bytes after the length prefix");
  return n;
}

// A bool byte other than 0 or 1 is undefined behaviour for LibTorch's kernels.
void check_bools(const TensorInfo& info, const char* data) {
  if (info.dtype != at::kBool) return;
  for (uint64_t i = 0; i < info.nbytes(); ++i) {
    const auto byte = static_cast<unsigned char>(data[i]);
    TORCH_CHECK(byte <= 1, "tensor ", in_quotes(info.name), " of dtype BOOL holds the byte ",
                static_cast<int>(byte), " at element ", i, "; only 0 and 1 are valid");
  }
}

at::Tensor copy_tensor(const TensorInfo& info, const char* data) {
  check_bools(info, data);
  at::Tensor tensor = at::empty(info.shape, at::TensorOptions().dtype(info.dtype));
  if (info.nbytes() > 0) std::memcpy(tensor.data_ptr(), data, info.nbytes());
  return tensor;
}

struct Plan {
  std::string header;            // length prefix, JSON and padding
  std::vector<at::Tensor> data;  // contiguous CPU tensors in data-buffer order
  std::vector<size_t> order;     // the index (in the caller's list) of each data entry
};

Plan plan(const std::vector<std::pair<std::string, at::Tensor>>& tensors,
          const std::map<std::string, std::string>& metadata) {
  std::set<std::string> seen;
  std::vector<at::Tensor> contiguous;
  contiguous.reserve(tensors.size());
  for (const auto& [name, tensor] : tensors) {
    TORCH_CHECK(!name.empty(), "safetensors tensor names must not be empty");
    TORCH_CHECK(name != kMetadataKey, "\"__metadata__\" is reserved and cannot name a tensor");
    TORCH_CHECK(seen.insert(name).second, "duplicate tensor name ", in_quotes(name));
    TORCH_CHECK(tensor.defined(), "tensor ", in_quotes(name), " is undefined");
    TORCH_CHECK(tensor.layout() == at::kStrided && !tensor.is_quantized(), "tensor ",
                in_quotes(name), " must be a dense tensor to be saved, got layout ",
                tensor.layout());
    try {
      dtype_name(tensor.scalar_type());
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "tensor ", in_quotes(name), ": ", e.what_without_backtrace());
    }
    // A meta tensor stands for one whose data comes later (save_file_streaming).
    contiguous.push_back(tensor.is_meta() ? tensor : tensor.detach().to(at::kCPU).contiguous());
  }

  // Larger elements first keeps every tensor aligned for its dtype (sizes are powers of two and
  // the buffer starts 8-aligned), which is what lets load_file avoid copies.
  std::vector<size_t> order(tensors.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return contiguous[a].element_size() > contiguous[b].element_size();
  });
  std::vector<std::pair<uint64_t, uint64_t>> offsets(tensors.size());
  Plan result;
  uint64_t position = 0;
  for (size_t i : order) {
    const auto nbytes = static_cast<uint64_t>(contiguous[i].nbytes());
    offsets[i] = {position, position + nbytes};
    position += nbytes;
    result.data.push_back(contiguous[i]);
    result.order.push_back(i);
  }

  Json json = Json::object();
  if (!metadata.empty()) json[kMetadataKey] = metadata;
  for (size_t i = 0; i < tensors.size(); ++i) {
    json[tensors[i].first] = {{"dtype", dtype_name(contiguous[i].scalar_type())},
                              {"shape", contiguous[i].sizes().vec()},
                              {"data_offsets", {offsets[i].first, offsets[i].second}}};
  }
  std::string text;
  try {
    text = json.dump();
  } catch (const Json::exception& e) {
    TORCH_CHECK(false, "safetensors tensor names and metadata must be valid UTF-8: ", e.what());
  }
  // Spaces are what the reference writer pads with; JSON parsers skip them.
  text.append((8 - (8 + text.size()) % 8) % 8, ' ');
  const uint64_t length = text.size();
  result.header.resize(8);
  std::memcpy(result.header.data(), &length, 8);
  result.header += text;
  return result;
}

void write_all(int fd, const char* data, size_t size, const std::string& path) {
  while (size > 0) {
    const ssize_t written = ::write(fd, data, size);
    if (written < 0 && errno == EINTR) continue;
    TORCH_CHECK(written > 0, "cannot write ", in_quotes(path), ": ", errno_text());
    data += written;
    size -= static_cast<size_t>(written);
  }
}

void pwrite_all(int fd, const char* data, size_t size, uint64_t offset, const std::string& path) {
  while (size > 0) {
    const ssize_t written = ::pwrite(fd, data, size, static_cast<off_t>(offset));
    if (written < 0 && errno == EINTR) continue;
    TORCH_CHECK(written > 0, "cannot write ", in_quotes(path), ": ", errno_text());
    data += written;
    size -= static_cast<size_t>(written);
    offset += static_cast<uint64_t>(written);
  }
}

// write_file_atomically_with, calling `finish` (unless empty) after the last byte and before the
// fsync: save_file_streaming rewrites its header there once the data is hashed.
void write_atomically(
    const std::string& path,
    const std::function<void(const std::function<void(const char*, size_t)>&)>& produce,
    const std::function<void(int fd, const std::string& temp)>& finish);

// The file about to be replaced is dead weight in the page cache: drop its clean pages so that
// the new file's pages can reuse them instead of growing the cache by a second copy. With a
// checkpoint of a few GiB that copy means reclaim under memory pressure, and on VMs that hand
// freed memory back to the host (virtio free page reporting) a host fault per fresh page: 2-3x
// slower replaces of a 1 GiB file (benchmarks/bench_checkpoint). Advisory only: the old contents
// stay on disk until the rename, pages mapped by live tensors are kept, and any failure is
// ignored. O_NONBLOCK so that a FIFO at `path` cannot hang us.
void drop_cached_pages(const std::string& path) {
  FileDescriptor fd(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC));
  struct stat info {};
  if (fd.get() < 0 || ::fstat(fd.get(), &info) != 0 || !S_ISREG(info.st_mode)) return;
  (void)::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_DONTNEED);
}

// Callers of read_header and load_file go through many files (shards, checkpoint parts); an
// error that does not say which one is broken leaves them guessing. Only for errors that do not
// name the file already (open, stat and read errors do).
template <class Body>
auto naming_file(const std::string& path, Body&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, in_quotes(path), ": ", e.what_without_backtrace());
  }
}

// The header of the open regular file `fd` of `size` bytes, reading only the header bytes.
Header read_header_of(int fd, uint64_t size, const std::string& path) {
  char prefix[8] = {};
  if (size >= 8) read_exact(fd, prefix, 8, 0, path);
  const uint64_t n =
      naming_file(path, [&] { return header_length(std::string_view(prefix, 8), size); });
  std::string text(n, '\0');
  read_exact(fd, text.data(), n, 8, path);
  return naming_file(path, [&] { return parse_header_text(text, 8 + n, size - 8 - n); });
}

// load_file without a mapping: every tensor owns memory filled by pread, so nothing the file
// goes through afterwards can reach it.
SafetensorsFile load_copy(const std::string& path) {
  const FileDescriptor fd = open_read_only(path);
  Header header = read_header_of(fd.get(), regular_file_size(fd.get(), path), path);
  SafetensorsFile file;
  file.metadata = std::move(header.metadata);
  for (const auto& info : header.tensors) {
    at::Tensor tensor = at::empty(info.shape, at::TensorOptions().dtype(info.dtype));
    auto* data = static_cast<char*>(tensor.data_ptr());
    // A file cut short since its size was taken fails here, naming it, rather than leaving part
    // of the tensor uninitialised.
    if (info.nbytes() > 0)
      read_exact(fd.get(), data, info.nbytes(), header.data_start + info.begin, path);
    naming_file(path, [&] { check_bools(info, data); });
    file.tensors.emplace_back(info.name, std::move(tensor));
  }
  return file;
}

}  // namespace

namespace detail {
std::vector<std::pair<std::string, at::Tensor>> items_of(
    const torch::OrderedDict<std::string, at::Tensor>& dict) {
  std::vector<std::pair<std::string, at::Tensor>> items;
  items.reserve(dict.size());
  for (const auto& item : dict) items.emplace_back(item.key(), item.value());
  return items;
}
}  // namespace detail

std::string dtype_name(at::ScalarType dtype) {
  for (const auto& entry : kDtypes) {
    if (entry.dtype == dtype) return entry.name;
  }
  TORCH_CHECK(false, "unsupported dtype ", dtype, " for safetensors; supported: F64 F32 F16 BF16 ",
              "I64 I32 I16 I8 U8 BOOL");
}

at::ScalarType dtype_from_name(const std::string& name) {
  for (const auto& entry : kDtypes) {
    if (entry.name == name) return entry.dtype;
  }
  for (const char* unsupported : kUnsupportedNames) {
    TORCH_CHECK(name != unsupported, "unsupported dtype \"", name,
                "\": LibTorch 1.13 has no such dtype");
  }
  TORCH_CHECK(false, "unknown dtype \"", name, "\"");
}

at::Tensor SafetensorsFile::get(const std::string& name) const {
  for (const auto& [key, tensor] : tensors) {
    if (key == name) return tensor;
  }
  std::ostringstream available;
  for (size_t i = 0; i < tensors.size() && i < 20; ++i) {
    available << (i == 0 ? "" : ", ") << tensors[i].first;
  }
  if (tensors.size() > 20) available << ", ... (" << tensors.size() << " in all)";
  TORCH_CHECK(false, "no tensor named ", in_quotes(name),
              " in the safetensors file; it holds: ", available.str());
}

bool SafetensorsFile::contains(const std::string& name) const {
  return std::any_of(tensors.begin(), tensors.end(),
                     [&](const auto& item) { return item.first == name; });
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> result;
  result.reserve(tensors.size());
  for (const auto& item : tensors) result.push_back(item.first);
  return result;
}

std::string serialize(const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  const Plan p = plan(tensors, metadata);
  std::string bytes = p.header;
  for (const auto& tensor : p.data) {
    bytes.append(static_cast<const char*>(tensor.data_ptr()), tensor.nbytes());
  }
  return bytes;
}

void save_file(const std::vector<std::pair<std::string, at::Tensor>>& tensors,
               const std::string& path, const std::map<std::string, std::string>& metadata) {
  TORCH_CHECK(!path.empty(), "save_file needs a non-empty path");
  const Plan p = plan(tensors, metadata);
  std::vector<std::pair<const char*, size_t>> pieces{{p.header.data(), p.header.size()}};
  for (const auto& tensor : p.data) {
    pieces.emplace_back(static_cast<const char*>(tensor.data_ptr()), tensor.nbytes());
  }
  detail::write_file_atomically(path, pieces);
}

void detail::save_file_streaming(const std::vector<std::pair<std::string, at::Tensor>>& specs,
                                 const std::string& path,
                                 const std::map<std::string, std::string>& metadata,
                                 const std::function<at::Tensor(size_t)>& fetch, bool write) {
  TORCH_CHECK(!path.empty(), "save_file needs a non-empty path");
  std::vector<std::pair<std::string, at::Tensor>> shapes;
  shapes.reserve(specs.size());
  for (const auto& [name, t] : specs) {
    TORCH_CHECK(t.defined(), "tensor ", in_quotes(name), " is undefined");
    shapes.emplace_back(name, at::empty(t.sizes(), t.options().device(at::kMeta)));
  }
  // The data checksum save_model asks for (checksum.h): zeros first, the same width as the sum.
  const char* const data_key = write ? accelerate::detail::data_checksum_key() : nullptr;
  std::map<std::string, std::string> meta = metadata;
  if (data_key) meta[data_key] = accelerate::detail::crc32c_hex(0);
  const Plan p = plan(shapes, meta);
  if (!write) {
    for (size_t i : p.order) (void)fetch(i);
    return;
  }
  std::optional<accelerate::detail::OverlappedCrc32c> data_crc;
  if (data_key) data_crc.emplace();
  auto produce = [&](const std::function<void(const char*, size_t)>& write) {
    write(p.header.data(), p.header.size());
    for (size_t k = 0; k < p.order.size(); ++k) {
      const size_t i = p.order[k];
      const at::Tensor t = fetch(i).detach().to(at::kCPU).contiguous();
      TORCH_CHECK(t.sizes() == p.data[k].sizes() && t.scalar_type() == p.data[k].scalar_type(),
                  "tensor ", in_quotes(specs[i].first), " has shape ", t.sizes(), " and dtype ",
                  t.scalar_type(), ", announced as ", p.data[k].sizes(), " ",
                  p.data[k].scalar_type());
      const auto* data = static_cast<const char*>(t.data_ptr());
      if (data_crc) {
        data_crc->update_during(data, t.nbytes(), [&] { write(data, t.nbytes()); });
      } else {
        write(data, t.nbytes());
      }
    }
  };
  if (!data_key) {
    write_file_atomically_with(path, produce);
    return;
  }
  write_atomically(path, produce, [&](int fd, const std::string& temp) {
    meta[data_key] = accelerate::detail::crc32c_hex(data_crc->value());
    const Plan final_plan = plan(shapes, meta);
    TORCH_INTERNAL_ASSERT(final_plan.header.size() == p.header.size());
    pwrite_all(fd, final_plan.header.data(), final_plan.header.size(), 0, temp);
  });
}

void detail::write_file_atomically(const std::string& path,
                                   const std::vector<std::pair<const char*, size_t>>& pieces) {
  write_file_atomically_with(path, [&](const std::function<void(const char*, size_t)>& write) {
    for (const auto& [data, size] : pieces) write(data, size);
  });
}

void detail::write_file_atomically_with(
    const std::string& path,
    const std::function<void(const std::function<void(const char*, size_t)>&)>& produce) {
  write_atomically(path, produce, {});
}

namespace {

void write_atomically(
    const std::string& path,
    const std::function<void(const std::function<void(const char*, size_t)>&)>& produce,
    const std::function<void(int fd, const std::string& temp)>& finish) {
  TORCH_CHECK(!path.empty(), "write_file_atomically needs a non-empty path");
  // A name unique to this process and call, so that concurrent writers of the same path never
  // share a temporary file.
  static std::atomic<uint64_t> counter{0};
  drop_cached_pages(path);
  const std::string temp =
      path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++);
  FileDescriptor fd(::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666));
  TORCH_CHECK(fd.get() >= 0, "cannot create ", in_quotes(temp), ": ", errno_text());
  try {
    // Hashed as the bytes are written, on a second thread while write() copies them: reading
    // the file back, or hashing before or after each write(), costs more (benchmarks/README.md).
    // Not when `finish` may change bytes already written: the sink's users read such a file back.
    auto* const sums = finish ? nullptr : accelerate::detail::checksum_sink();
    std::optional<accelerate::detail::OverlappedCrc32c> crc;
    if (sums) crc.emplace();
    produce([&](const char* data, size_t size) {
      if (crc) {
        crc->update_during(data, size, [&] { write_all(fd.get(), data, size, temp); });
      } else {
        write_all(fd.get(), data, size, temp);
      }
    });
    if (sums) (*sums)[path] = crc->value();
    if (finish) finish(fd.get(), temp);
    TORCH_CHECK(::fsync(fd.get()) == 0, "cannot fsync ", in_quotes(temp), ": ", errno_text());
    TORCH_CHECK(::close(fd.release()) == 0, "cannot close ", in_quotes(temp), ": ", errno_text());
    TORCH_CHECK(::rename(temp.c_str(), path.c_str()) == 0, "cannot rename ", in_quotes(temp),
                " to ", in_quotes(path), ": ", errno_text());
  } catch (...) {
    ::unlink(temp.c_str());
    throw;
  }
  // Without this the rename itself may not survive a power loss.
  const auto slash = path.find_last_of('/');
  const std::string dir =
      slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  FileDescriptor dir_fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  TORCH_CHECK(dir_fd.get() >= 0, "cannot open directory ", in_quotes(dir), ": ", errno_text());
  TORCH_CHECK(::fsync(dir_fd.get()) == 0, "cannot fsync directory ", in_quotes(dir), ": ",
              errno_text());
}

}  // namespace

Header parse_header(std::string_view bytes) {
  const uint64_t n = header_length(bytes, bytes.size());
  return parse_header_text(bytes.substr(8, n), 8 + n, bytes.size() - 8 - n);
}

Header read_header(const std::string& path) {
  const FileDescriptor fd = open_read_only(path);
  return read_header_of(fd.get(), regular_file_size(fd.get(), path), path);
}

SafetensorsFile deserialize(std::string_view bytes) {
  const Header header = parse_header(bytes);
  SafetensorsFile file;
  file.metadata = header.metadata;
  const char* data = bytes.data() + header.data_start;
  for (const auto& info : header.tensors) {
    file.tensors.emplace_back(info.name, copy_tensor(info, data + info.begin));
  }
  return file;
}

SafetensorsFile load_file(const std::string& path, const LoadOptions& options) {
  if (options.copy) return load_copy(path);
  // Private and copy-on-write: tensors updated in place (optimizer steps) never change the file.
  const std::shared_ptr<accelerate::detail::FileMapping> mapping =
      accelerate::detail::map_file(path);
  return naming_file(path, [&] {
    const char* base = mapping->data();
    Header header = parse_header(std::string_view(base, mapping->size()));
    SafetensorsFile file;
    file.metadata = std::move(header.metadata);
    for (const auto& info : header.tensors) {
      const uint64_t offset = header.data_start + info.begin;
      const char* data = base + offset;
      at::Tensor tensor;
      // Other writers need not align tensors for their dtype; those are copied, not refused.
      if (reinterpret_cast<uintptr_t>(data) % c10::elementSize(info.dtype) == 0 &&
          info.nbytes() > 0) {
        check_bools(info, data);
        tensor = accelerate::detail::mapped_tensor(mapping, offset, info.shape, info.dtype);
      } else {
        tensor = copy_tensor(info, data);
      }
      file.tensors.emplace_back(info.name, std::move(tensor));
    }
    return file;
  });
}

}  // namespace accelerate::safetensors
