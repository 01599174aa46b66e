#pragma once
/// \file
/// Accelerate's offload folder (`accelerate.utils.offload` in Python): weights moved out of
/// memory onto disk, one raw file per tensor, readable by Python Accelerate and written so that
/// Python Accelerate reads ours.
///
/// Layout of a folder:
///  - `<name>.dat` for each tensor: its elements, C-order, little-endian, nothing else (a numpy
///    memmap). A 0-dim tensor is stored as one element; bfloat16 as its raw 16-bit words.
///  - `index.json`: `{"<name>": {"dtype": "float32", "shape": [2, 3]}, ...}` with numpy's dtype
///    names ("bfloat16" for bfloat16) and the tensor's own shape (`[]` for 0-dim), written as
///    Python's `json.dump(index, f, indent=2)` writes it.
///
/// Example:
/// \code
///   accelerate::offload_state_dict("offload", {{"blocks.0.weight", at::randn({4, 4})}});
///   for (const auto& [name, info] : accelerate::read_offload_index("offload")) {
///     at::Tensor w = accelerate::load_offloaded_weight("offload/" + name + ".dat", info);
///   }
/// \endcode

#include <ATen/ATen.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace accelerate {

/// One index.json entry: how to read `<name>.dat` back.
///
/// Example:
/// \code
///   accelerate::OffloadedTensorInfo info{"float16", {2, 3}};  // 12 bytes in the .dat file
/// \endcode
struct OffloadedTensorInfo {
  /// numpy's name of the element type ("float32", "bfloat16", "bool", ...).
  std::string dtype;
  /// The tensor's shape; empty for a 0-dim tensor (whose file still holds one element).
  std::vector<int64_t> shape;
};

/// An offload folder's index.json, in file order.
///
/// Example:
/// \code
///   accelerate::OffloadIndex index;
///   accelerate::offload_weight(at::ones({2}), "bias", "offload", &index);
///   // index == {{"bias", {"float32", {2}}}}
/// \endcode
using OffloadIndex = std::vector<std::pair<std::string, OffloadedTensorInfo>>;

/// The name of the index file inside an offload folder.
///
/// Example:
/// \code
///   bool has_index = std::filesystem::exists(folder + "/" + accelerate::kOffloadIndexName);
/// \endcode
inline constexpr const char* kOffloadIndexName = "index.json";

/// numpy's name of `dtype` as Accelerate writes it: "float32", "float16", "bfloat16",
/// "float64", "int64", "int32", "int16", "int8", "uint8", "bool", "complex64", "complex128".
/// An error for dtypes numpy has no name for (quantized, complex32).
///
/// Example:
/// \code
///   assert(accelerate::offload_dtype_name(at::kBFloat16) == "bfloat16");
/// \endcode
std::string offload_dtype_name(at::ScalarType dtype);

/// The LibTorch dtype of a name offload_dtype_name gives; an error for any other name.
///
/// Example:
/// \code
///   assert(accelerate::offload_dtype_from_name("int64") == at::kLong);
/// \endcode
at::ScalarType offload_dtype_from_name(const std::string& name);

/// Writes `weight` to `<folder>/<name>.dat` and, when `index` is given, records it there (an
/// entry of the same name is updated in place, as a Python dict would). The tensor may live on
/// any device and have any strides: it is written as contiguous CPU data. The file is written
/// beside its final name and renamed into place, so tensors still mapped from an earlier file
/// of that name keep their values. `folder` must exist.
///
/// `name` becomes a file name: it may hold dots ("blocks.0.weight") but not '/' or NUL, and may
/// not be "" or "..". Errors name the tensor.
///
/// Example:
/// \code
///   accelerate::OffloadIndex index;
///   accelerate::offload_weight(model->weight, "linear.weight", "offload", &index);
///   accelerate::save_offload_index(index, "offload");
/// \endcode
void offload_weight(const at::Tensor& weight, const std::string& name, const std::string& folder,
                    OffloadIndex* index = nullptr);

/// The tensor stored in `file` as `info` describes it. With `mapped` the file is mapped
/// privately and the tensor views it without a copy (pages are read when touched; writes to the
/// tensor stay in memory and never reach the file); otherwise it is read into fresh memory.
/// Errors name the file: a size other than the shape's elements times the dtype's size, an
/// unknown dtype name, a bool byte other than 0 or 1.
///
/// Example:
/// \code
///   auto index = accelerate::read_offload_index("offload");
///   at::Tensor w = accelerate::load_offloaded_weight("offload/linear.weight.dat",
///   index[0].second);
/// \endcode
at::Tensor load_offloaded_weight(const std::string& file, const OffloadedTensorInfo& info,
                                 bool mapped = true);

/// Merges `index` into `<folder>/index.json` (entries already there keep their place and are
/// updated in place; new ones are appended) and writes the file atomically, formatted as
/// Python's `json.dump(index, f, indent=2)`. An empty `index` writes nothing, as in Python.
///
/// Example:
/// \code
///   accelerate::save_offload_index({{"bias", {"float32", {4}}}}, "offload");
/// \endcode
void save_offload_index(const OffloadIndex& index, const std::string& folder);

/// The entries of `<folder>/index.json`, in file order. Errors name the file and what is wrong
/// with it (missing, not JSON, an entry without "dtype" or "shape", a negative dimension, ...).
/// Dtype names are not checked here but by load_offloaded_weight, so that one tensor of an
/// unsupported dtype does not keep the others from loading.
///
/// Example:
/// \code
///   for (const auto& [name, info] : accelerate::read_offload_index("offload")) {
///     std::cout << name << ": " << info.dtype << "\n";
///   }
/// \endcode
OffloadIndex read_offload_index(const std::string& folder);

/// Accelerate's `offload_state_dict`: creates `save_dir` if needed, writes every tensor to
/// `<save_dir>/<name>.dat` and merges their entries into `<save_dir>/index.json`. Names must
/// be unique.
///
/// Example:
/// \code
///   std::vector<std::pair<std::string, at::Tensor>> state;
///   for (const auto& p : model->named_parameters()) state.emplace_back(p.key(), p.value());
///   accelerate::offload_state_dict("offload", state);
/// \endcode
void offload_state_dict(const std::string& save_dir,
                        const std::vector<std::pair<std::string, at::Tensor>>& state_dict);

}  // namespace accelerate
