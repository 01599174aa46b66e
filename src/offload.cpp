#include <accelerate/offload.h>
#include <accelerate/safetensors.h>

#include "detail/file_mapping.h"

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <set>
#include <system_error>

namespace accelerate {
namespace {

// numpy memmaps in Python Accelerate's files hold native-order bytes, little-endian on every
// machine it runs on; byte-swapping is not implemented, so refuse to build rather than write
// files nobody else can read.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "offload folders assume a little-endian host");

using detail::FileDescriptor;
using detail::in_quotes;
using detail::open_read_only;
using detail::read_exact;
using detail::regular_file_size;
using Json = nlohmann::ordered_json;

struct DtypeName {
  const char* name;
  at::ScalarType dtype;
};
// str(numpy_array.dtype) for each LibTorch dtype Python Accelerate can offload; bfloat16 is
// Accelerate's own name, numpy having none.
constexpr DtypeName kDtypes[] = {
    {"float32", at::kFloat},
    {"float16", at::kHalf},
    {"bfloat16", at::kBFloat16},
    {"float64", at::kDouble},
    {"int64", at::kLong},
    {"int32", at::kInt},
    {"int16", at::kShort},
    {"int8", at::kChar},
    {"uint8", at::kByte},
    {"bool", at::kBool},
    {"complex64", at::kComplexFloat},
    {"complex128", at::kComplexDouble},
};
// What newer PyTorch versions offload and LibTorch 1.13 cannot hold: a clearer error than
// "unknown".
constexpr const char* kUnsupportedNames[] = {"uint16", "uint32", "uint64"};

std::string known_names() {
  std::string names;
  for (const auto& entry : kDtypes) names += std::string(names.empty() ? "" : " ") + entry.name;
  return names;
}

// The name becomes a file name in the folder; anything that would put the file elsewhere, or
// truncate its path, is refused.
void check_name(const std::string& name) {
  // A NUL would also end the error message early.
  std::string shown = name;
  for (size_t pos = shown.find('\0'); pos != std::string::npos; pos = shown.find('\0', pos + 2)) {
    shown.replace(pos, 1, "\\0");
  }
  TORCH_CHECK(!name.empty() && name != ".." && name.find('/') == std::string::npos &&
                  shown.size() == name.size(),
              "tensor name ", in_quotes(shown),
              " cannot name a file in an offload folder: it must not be empty or \"..\" and must "
              "not contain '/' or NUL");
}

std::string join(const std::string& folder, const std::string& file) {
  return (std::filesystem::path(folder) / file).string();
}

std::string dat_path(const std::string& folder, const std::string& name) {
  return join(folder, name + ".dat");
}

// The tensor's dtype name, with the tensor named in the error.
std::string dtype_name_of(const at::Tensor& weight, const std::string& name) {
  TORCH_CHECK(weight.defined(), "tensor ", in_quotes(name), " is undefined");
  TORCH_CHECK(weight.layout() == at::kStrided && !weight.is_quantized(), "tensor ", in_quotes(name),
              " must be a dense tensor to be offloaded, got layout ", weight.layout(),
              weight.is_quantized() ? " (quantized)" : "");
  try {
    return offload_dtype_name(weight.scalar_type());
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "tensor ", in_quotes(name), ": ", e.what_without_backtrace());
  }
}

std::string read_text(const std::string& path) {
  const FileDescriptor fd = open_read_only(path);
  const uint64_t size = regular_file_size(fd.get(), path);
  std::string text(size, '\0');
  read_exact(fd.get(), text.data(), size, 0, path);
  return text;
}

Json parse_index(const std::string& path) {
  const std::string text = read_text(path);
  Json json;
  try {
    json = Json::parse(text);
  } catch (const Json::exception& e) {
    TORCH_CHECK(false, "offload index ", in_quotes(path), " is not valid JSON: ", e.what());
  }
  TORCH_CHECK(json.is_object(), "offload index ", in_quotes(path),
              " must hold a JSON object (tensor name -> {dtype, shape}), got ", json.type_name());
  return json;
}

// A bool byte other than 0 or 1 is undefined behaviour for LibTorch's kernels.
void check_bools(const at::Tensor& tensor, const std::string& path) {
  if (tensor.scalar_type() != at::kBool) return;
  const auto* bytes = static_cast<const unsigned char*>(tensor.data_ptr());
  const auto n = static_cast<uint64_t>(tensor.numel());
  for (uint64_t i = 0; i < n; ++i) {
    TORCH_CHECK(bytes[i] <= 1, in_quotes(path), " holds the byte ", static_cast<int>(bytes[i]),
                " for bool element ", i, "; only 0 and 1 are valid");
  }
}

}  // namespace

std::string offload_dtype_name(at::ScalarType dtype) {
  for (const auto& entry : kDtypes) {
    if (entry.dtype == dtype) return entry.name;
  }
  TORCH_CHECK(false, "numpy has no dtype for ", dtype,
              ", so it cannot be offloaded; supported: ", known_names());
}

at::ScalarType offload_dtype_from_name(const std::string& name) {
  for (const auto& entry : kDtypes) {
    if (entry.name == name) return entry.dtype;
  }
  for (const char* unsupported : kUnsupportedNames) {
    TORCH_CHECK(name != unsupported, "unsupported offload dtype \"", name,
                "\": LibTorch 1.13 has no such dtype");
  }
  TORCH_CHECK(false, "unknown offload dtype \"", name, "\"; known: ", known_names());
}

void offload_weight(const at::Tensor& weight, const std::string& name, const std::string& folder,
                    OffloadIndex* index) {
  check_name(name);
  const std::string dtype = dtype_name_of(weight, name);
  // Conjugate and negative views carry a flag instead of their values; the file needs values.
  const at::Tensor data = weight.detach().to(at::kCPU).resolve_conj().resolve_neg().contiguous();
  // Written beside its final name and renamed: tensors still mapped from an older file of this
  // name keep seeing its pages instead of the new values (a private mapping shares the file's
  // pages until they are written).
  safetensors::detail::write_file_atomically(
      dat_path(folder, name),
      {{static_cast<const char*>(data.data_ptr()), static_cast<size_t>(data.nbytes())}});
  if (index == nullptr) return;
  OffloadedTensorInfo info{dtype, data.sizes().vec()};
  const auto existing = std::find_if(index->begin(), index->end(),
                                     [&](const auto& entry) { return entry.first == name; });
  if (existing != index->end()) {
    existing->second = std::move(info);
  } else {
    index->emplace_back(name, std::move(info));
  }
}

at::Tensor load_offloaded_weight(const std::string& file, const OffloadedTensorInfo& info,
                                 bool mapped) {
  at::ScalarType dtype{};
  try {
    dtype = offload_dtype_from_name(info.dtype);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, in_quotes(file), ": ", e.what_without_backtrace());
  }
  uint64_t nbytes = c10::elementSize(dtype);
  for (const int64_t dim : info.shape) {
    TORCH_CHECK(dim >= 0, in_quotes(file), ": shape ", at::IntArrayRef(info.shape),
                " has a negative dimension");
    TORCH_CHECK(!__builtin_mul_overflow(nbytes, static_cast<uint64_t>(dim), &nbytes) &&
                    nbytes <= static_cast<uint64_t>(INT64_MAX),
                in_quotes(file), ": shape ", at::IntArrayRef(info.shape), " holds too many bytes");
  }
  auto check_size = [&](uint64_t size) {
    TORCH_CHECK(size == nbytes, in_quotes(file), " holds ", size, " bytes, but shape ",
                at::IntArrayRef(info.shape), " of ", info.dtype, " needs ", nbytes);
  };

  at::Tensor tensor;
  if (mapped) {
    const auto mapping = detail::map_file(file);
    check_size(mapping->size());
    tensor = detail::mapped_tensor(mapping, 0, info.shape, dtype);
  } else {
    const FileDescriptor fd = open_read_only(file);
    check_size(regular_file_size(fd.get(), file));
    tensor = at::empty(info.shape, at::TensorOptions().dtype(dtype));
    read_exact(fd.get(), static_cast<char*>(tensor.data_ptr()), nbytes, 0, file);
  }
  check_bools(tensor, file);
  return tensor;
}

void save_offload_index(const OffloadIndex& index, const std::string& folder) {
  if (index.empty()) return;
  const std::string path = join(folder, kOffloadIndexName);
  std::error_code ignored;
  // Entries already there are kept as they are (whatever fields they hold), as Python's
  // dict.update keeps them.
  Json merged =
      std::filesystem::is_regular_file(path, ignored) ? parse_index(path) : Json::object();
  for (const auto& [name, info] : index) {
    // operator[] keeps an existing key where it is, as a Python dict does.
    merged[name] = Json{{"dtype", info.dtype}, {"shape", info.shape}};
  }
  std::string text;
  try {
    // json.dump(indent=2) with its default ensure_ascii: every non-ASCII character as \uXXXX.
    text = merged.dump(2, ' ', true);
  } catch (const Json::exception& e) {
    TORCH_CHECK(false, "cannot write ", in_quotes(path),
                ": tensor names and dtypes must be valid UTF-8: ", e.what());
  }
  safetensors::detail::write_file_atomically(path, {{text.data(), text.size()}});
}

OffloadIndex read_offload_index(const std::string& folder) {
  const std::string path = join(folder, kOffloadIndexName);
  const Json json = parse_index(path);
  OffloadIndex index;
  index.reserve(json.size());
  for (const auto& [name, entry] : json.items()) {
    const std::string where = "offload index " + in_quotes(path) + ": entry " + in_quotes(name);
    TORCH_CHECK(entry.is_object(), where, " must be an object, got ", entry.dump());
    // Other fields are ignored, so that indexes from future writers still load.
    for (const char* field : {"dtype", "shape"}) {
      TORCH_CHECK(entry.contains(field), where, " lacks \"", field, "\"");
    }
    const Json& dtype = entry.at("dtype");
    TORCH_CHECK(dtype.is_string(), where, ": \"dtype\" must be a string, got ", dtype.dump());
    const Json& shape = entry.at("shape");
    TORCH_CHECK(shape.is_array(), where, ": \"shape\" must be an array, got ", shape.dump());
    OffloadedTensorInfo info;
    info.dtype = dtype.get<std::string>();
    for (const Json& dim : shape) {
      TORCH_CHECK(dim.is_number_integer() && (dim.is_number_unsigned() || dim.get<int64_t>() >= 0),
                  where, ": \"shape\" must hold non-negative integers, got ", shape.dump());
      TORCH_CHECK(
          !dim.is_number_unsigned() || dim.get<uint64_t>() <= static_cast<uint64_t>(INT64_MAX),
          where, ": dimension ", dim.dump(), " is too large");
      info.shape.push_back(dim.get<int64_t>());
    }
    index.emplace_back(name, std::move(info));
  }
  return index;
}

void offload_state_dict(const std::string& save_dir,
                        const std::vector<std::pair<std::string, at::Tensor>>& state_dict) {
  TORCH_CHECK(!save_dir.empty(), "offload_state_dict needs a non-empty save_dir");
  // Every name and dtype is checked before anything is written, so that a bad entry does not
  // leave a half-written folder behind.
  std::set<std::string> seen;
  for (const auto& [name, weight] : state_dict) {
    check_name(name);
    TORCH_CHECK(seen.insert(name).second, "duplicate tensor name ", in_quotes(name),
                " in the state dict to offload");
    (void)dtype_name_of(weight, name);
  }
  std::error_code error;
  std::filesystem::create_directories(save_dir, error);
  TORCH_CHECK(!error, "cannot create the offload folder ", in_quotes(save_dir), ": ",
              error.message());
  OffloadIndex index;
  index.reserve(state_dict.size());
  for (const auto& [name, weight] : state_dict) offload_weight(weight, name, save_dir, &index);
  save_offload_index(index, save_dir);
}

}  // namespace accelerate
