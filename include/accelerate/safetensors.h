#pragma once
/// \file
/// The safetensors file format (https://github.com/huggingface/safetensors): read and write
/// files that Python's `safetensors.torch.save_file` / `load_file` exchange with us.
///
/// Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON (padded with spaces),
/// then the data buffer. The JSON maps each tensor name to
/// `{"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}` (offsets relative to the
/// data buffer) and may hold `"__metadata__": {string: string}`.
///
/// Everything lives in `accelerate::safetensors`, mirroring the Python package's module.
///
/// Example:
/// \code
///   namespace st = accelerate::safetensors;
///   st::save_file({{"weight", at::randn({4, 4})}, {"bias", at::zeros({4})}}, "model.safetensors",
///                 {{"format", "pt"}});
///   st::SafetensorsFile file = st::load_file("model.safetensors");
///   at::Tensor weight = file.get("weight");
///   st::Header header = st::read_header("model.safetensors");  // no tensor data is read
/// \endcode

#include <ATen/ATen.h>
#include <c10/core/ScalarType.h>
#include <torch/ordered_dict.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace accelerate::safetensors {

/// Largest header accepted, as the reference implementation: a bound on what a hostile file can
/// make us allocate before any validation.
inline constexpr uint64_t kMaxHeaderSize = 100'000'000;

/// The safetensors name of a dtype ("F32", "BF16", "BOOL", ...); an error for LibTorch dtypes
/// the format cannot store (complex, quantized, ...).
///
/// Example:
/// \code
///   assert(accelerate::safetensors::dtype_name(at::kBFloat16) == "BF16");
/// \endcode
std::string dtype_name(at::ScalarType dtype);

/// The LibTorch dtype of a safetensors name. Unknown names, and names the format defines but
/// LibTorch 1.13 has no dtype for (U16, U32, U64, F8_*, ...), are errors.
///
/// Example:
/// \code
///   assert(accelerate::safetensors::dtype_from_name("F16") == at::kHalf);
/// \endcode
at::ScalarType dtype_from_name(const std::string& name);

/// One header entry: where a tensor lives, without its data.
///
/// Example:
/// \code
///   for (const auto& info : accelerate::safetensors::read_header(path).tensors) {
///     std::cout << info.name << " " << info.dtype << " " << info.nbytes() << "\n";
///   }
/// \endcode
struct TensorInfo {
  std::string name;
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> shape;
  /// [begin, end) relative to the start of the data buffer.
  uint64_t begin = 0;
  uint64_t end = 0;

  uint64_t nbytes() const { return end - begin; }
};

/// A validated header: every entry checked against the data buffer's size.
///
/// Example:
/// \code
///   auto header = accelerate::safetensors::read_header("model-00001-of-00002.safetensors");
///   for (const auto& info : header.tensors) index[info.name] = "model-00001-of-00002.safetensors";
/// \endcode
struct Header {
  /// In the order the JSON lists them.
  std::vector<TensorInfo> tensors;
  std::map<std::string, std::string> metadata;
  /// Offset of the data buffer from the start of the file (8 + header length).
  uint64_t data_start = 0;
  /// Bytes in the data buffer.
  uint64_t data_size = 0;
};

/// Loaded tensors, in header order, and the file's metadata.
///
/// Tensors from `load_file` whose offset is aligned for their dtype share a private
/// copy-on-write mapping of the file (no copy is made); writing to them never reaches the file.
/// The mapping stays alive as long as any such tensor does. Others are copies.
///
/// Mapped tensors read the file itself for as long as they live, so it must not change under
/// them. Replacing it by rename, as `save_file` does, is safe: the tensors keep the old file.
/// Changing it in place is not: every page a tensor has not written to shows the new bytes, and
/// once another process truncates the file, touching a page past its new end raises SIGBUS,
/// which kills the process. Load files that others may rewrite in place (a writer that opens
/// with truncation, such as Python's `safetensors.torch.save_file`) with
/// `LoadOptions{.copy = true}`: those tensors own their memory.
///
/// Example:
/// \code
///   auto file = accelerate::safetensors::load_file("model.safetensors");
///   model->weight.copy_(file.get("weight"));
///   std::string format = file.metadata.at("format");
/// \endcode
struct SafetensorsFile {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  std::map<std::string, std::string> metadata;

  /// The tensor called `name`; an error naming the available tensors if there is none.
  at::Tensor get(const std::string& name) const;
  bool contains(const std::string& name) const;
  std::vector<std::string> names() const;
};

/// The bytes of a safetensors file holding `tensors` and `metadata`.
///
/// Names must be non-empty, unique, valid UTF-8 and not "__metadata__". Tensors may live on any
/// device and have any strides: they are written as contiguous little-endian CPU data. Tensors
/// that share storage are written as separate entries (deduplicating tied weights belongs to
/// the checkpointing layer).
///
/// Output is deterministic: the header lists the tensors in the caller's order (so a round trip
/// preserves it); the data buffer stores them by decreasing element size, stable in the caller's
/// order, so that every tensor is aligned for its dtype and loads without a copy.
///
/// Example:
/// \code
///   std::string bytes = accelerate::safetensors::serialize({{"x", at::ones({2})}});
/// \endcode
std::string serialize(const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

/// Writes `serialize(tensors, metadata)` to `path` atomically: into a unique temporary file
/// beside `path`, fsync'd, renamed over `path`, then the directory fsync'd. A crash leaves
/// either the old file or the new one, never a torn one.
///
/// Example:
/// \code
///   accelerate::safetensors::save_file({{"step", at::tensor(int64_t{10})}}, "state.safetensors");
/// \endcode
void save_file(const std::vector<std::pair<std::string, at::Tensor>>& tensors,
               const std::string& path, const std::map<std::string, std::string>& metadata = {});

namespace detail {
std::vector<std::pair<std::string, at::Tensor>> items_of(
    const torch::OrderedDict<std::string, at::Tensor>& dict);

/// Writes the concatenated `pieces` to `path` atomically: a unique temporary file beside it,
/// fsync, rename, and an fsync of the directory so that the rename survives a power loss.
/// Shared by every file the checkpointing code writes.
void write_file_atomically(const std::string& path,
                           const std::vector<std::pair<const char*, size_t>>& pieces);
/// The same with the bytes handed to `write` by `produce`, piece by piece.
void write_file_atomically_with(
    const std::string& path,
    const std::function<void(const std::function<void(const char*, size_t)>&)>& produce);
/// save_file for tensors produced one at a time: `specs` gives names, shapes and dtypes (their
/// data is not read), `fetch(i)` the data of specs[i] when it is written. The bytes are those
/// save_file writes for the same tensors; at most one fetched tensor is alive at a time. With
/// `write` false nothing is written but `fetch` is called in the same order (for processes
/// that take part in producing the tensors).
void save_file_streaming(const std::vector<std::pair<std::string, at::Tensor>>& specs,
                         const std::string& path,
                         const std::map<std::string, std::string>& metadata,
                         const std::function<at::Tensor(size_t)>& fetch, bool write = true);
}  // namespace detail

// The OrderedDict overloads are templates only so that a braced list such as
// `save_file({{"w", w}}, path)` stays unambiguous: OrderedDict also has an initializer-list
// constructor, and a template parameter cannot be deduced from a braced list. enable_if rather
// than a requires-clause keeps this header C++17-clean, which the clang fuzzer build needs
// (clang 14 rejects LibTorch 1.13's headers in C++20 mode).
using OrderedTensors = torch::OrderedDict<std::string, at::Tensor>;

/// `serialize` of a module's `named_parameters()` / `named_buffers()`, in their order.
///
/// Example:
/// \code
///   std::string bytes = accelerate::safetensors::serialize(model->named_parameters());
/// \endcode
template <class Dict, std::enable_if_t<std::is_same_v<Dict, OrderedTensors>, int> = 0>
std::string serialize(const Dict& tensors,
                      const std::map<std::string, std::string>& metadata = {}) {
  return serialize(detail::items_of(tensors), metadata);
}

/// `save_file` of a module's `named_parameters()` / `named_buffers()`, in their order.
///
/// Example:
/// \code
///   accelerate::safetensors::save_file(model->named_parameters(), "model.safetensors");
/// \endcode
template <class Dict, std::enable_if_t<std::is_same_v<Dict, OrderedTensors>, int> = 0>
void save_file(const Dict& tensors, const std::string& path,
               const std::map<std::string, std::string>& metadata = {}) {
  save_file(detail::items_of(tensors), path, metadata);
}

/// Parses and validates the bytes of a whole file; every tensor is a fresh copy.
///
/// Example:
/// \code
///   auto file = accelerate::safetensors::deserialize(bytes);
/// \endcode
SafetensorsFile deserialize(std::string_view bytes);

/// How `load_file` reads a file.
struct LoadOptions {
  /// Read every tensor into memory of its own (with pread) instead of mapping the file: costs a
  /// copy and the memory up front, but later changes to the file, truncation included, cannot
  /// reach the tensors. For files another process may rewrite in place while they are in use.
  bool copy = false;
};

/// Maps `path` and loads every tensor (see SafetensorsFile for sharing and copying, and for why
/// a mapped file must not be truncated while its tensors live); with `options.copy`, reads them
/// into memory of their own instead. Every error about the file's contents names `path`.
///
/// Example:
/// \code
///   auto file = accelerate::safetensors::load_file("model.safetensors");
///   // A file that another process may rewrite in place while its tensors are in use:
///   auto copied = accelerate::safetensors::load_file("shared.safetensors", {.copy = true});
/// \endcode
SafetensorsFile load_file(const std::string& path, const LoadOptions& options = {});

/// The validated header of a whole file's bytes. After the JSON object, only spaces (the
/// format's padding) may fill the declared header length: any other byte, NUL included, is an
/// error.
///
/// Example:
/// \code
///   auto header = accelerate::safetensors::parse_header(bytes);
/// \endcode
Header parse_header(std::string_view bytes);

/// The validated header of the file at `path`, reading only the header bytes; its errors name
/// `path`.
///
/// Example:
/// \code
///   auto header = accelerate::safetensors::read_header("model.safetensors");
/// \endcode
Header read_header(const std::string& path);

}  // namespace accelerate::safetensors
