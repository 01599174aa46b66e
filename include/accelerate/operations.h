#pragma once
/// \file
/// Operations on tensors and nested containers of tensors across processes (Accelerate's
/// `accelerate.utils.operations`): gather, gather_object, broadcast, broadcast_object_list,
/// reduce, pad_across_processes, and the local helpers send_to_device, concatenate,
/// slice_tensors, convert_to_fp32 and find_batch_size.
///
/// Every operation takes a tensor or any structure tree.h walks (vectors, maps, tuples,
/// optionals, c10::IValue, LibTorch's Example, user structs declared with
/// ACCELERATE_TENSOR_FIELDS) and returns the same structure. Each collective has an overload
/// taking the PartialState first, and one that uses PartialState::shared(). Every process must
/// call a collective with the same structure, in the same order. Always (not only in debug mode)
/// each call first exchanges a small fingerprint (operation, name, dtype, shape, call number):
/// calls that do not pair up, such as different shapes or a call one process skipped, are an
/// error on every process listing each process's call, never a wrong result or a hang. Debug
/// mode (`ACCELERATE_DEBUG_MODE=1`) also compares whole structures (paths and leaf types). A
/// process that does not arrive within the timeout is named in the error.
///
/// Example:
/// \code
///   auto& state = accelerate::PartialState::shared();
///   std::map<std::string, at::Tensor> out{{"logits", logits}, {"labels", labels}};
///   auto padded = accelerate::pad_across_processes(out, {.dim = 1, .pad_index = -100});
///   auto all = accelerate::gather(padded);              // every process's rows, in rank order
///   auto loss = accelerate::reduce(local_loss, "mean");  // the mean over processes
///   auto names = accelerate::gather_object(std::vector<std::string>{file_name});
/// \endcode

#include <accelerate/detail/collectives.h>
#include <accelerate/state.h>
#include <accelerate/tree.h>

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <c10/core/Device.h>

#include <concepts>
#include <cstdint>
#include <iterator>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace accelerate {

// ---------------------------------------------------------------------- options

/// How reduce() combines the processes' tensors. reduce() also takes Accelerate's strings.
///
/// Example:
/// \code
///   auto total = accelerate::reduce(state, correct, accelerate::Reduction::kSum);
///   auto same = accelerate::reduce(state, correct, "sum");
/// \endcode
enum class Reduction {
  /// The sum divided by the number of processes (floating-point tensors only).
  kMean,
  /// The sum over processes.
  kSum,
  /// No communication: each process keeps its own tensor.
  kNone,
};

/// "mean", "sum" or "none" as a Reduction; anything else is an error naming it.
Reduction reduction_from_string(std::string_view name);
/// "mean", "sum" or "none".
std::string to_string(Reduction reduction);

/// What pad_across_processes pads, and with what.
///
/// Example:
/// \code
///   accelerate::pad_across_processes(tokens, {.dim = 1, .pad_index = pad_id, .pad_first = true});
/// \endcode
struct PadOptions {
  /// The dimension to pad; negative values count from the end, as in Python. Tensors with no
  /// such dimension are returned as they are.
  int64_t dim = 0;
  /// The value padding is filled with.
  at::Scalar pad_index = 0;
  /// Pad at the start of the dimension rather than at its end.
  bool pad_first = false;
};

/// How send_to_device copies.
///
/// Example:
/// \code
///   auto batch_gpu = accelerate::send_to_device(batch, at::kCUDA, {.non_blocking = true});
/// \endcode
struct SendOptions {
  /// Copy asynchronously where the devices allow it (pinned host memory to a GPU).
  bool non_blocking = false;
};

// ---------------------------------------------------------------------- object serialisation

/// How gather_object and broadcast_object_list turn a `T` into a c10::IValue (which is then
/// pickled with torch::pickle_save) and back. Specialised for bool, integers, floating-point
/// types, std::string, at::Tensor, c10::IValue, and std::vector, std::map / std::unordered_map
/// with string keys, std::tuple, std::pair and std::optional of those. Users may specialise it
/// for their own types with the same two static functions.
///
/// Example:
/// \code
///   struct Score { std::string name; double value; };
///   template <>
///   struct accelerate::ObjectCodec<Score> {
///     static c10::IValue to_ivalue(const Score& s) {
///       return c10::ivalue::Tuple::create(s.name, s.value);
///     }
///     static Score from_ivalue(const c10::IValue& v, const char* op) {
///       auto [name, value] = accelerate::ObjectCodec<std::tuple<std::string, double>>::
///           from_ivalue(v, op);
///       return {name, value};
///     }
///   };
/// \endcode
template <class T>
struct ObjectCodec {
  // No to_ivalue/from_ivalue: the marker lets code ask (object_codec_supported) before
  // instantiating, and encode/decode fail with the message below.
  using unsupported = void;
};

/// Whether ObjectCodec can send a T (nested containers are checked element by element).
template <class T>
inline constexpr bool object_codec_supported = !requires {
  typename ObjectCodec<T>::unsupported;
};
template <class T, class A>
inline constexpr bool object_codec_supported<std::vector<T, A>> = object_codec_supported<T>;
template <class V, class C, class A>
inline constexpr bool object_codec_supported<std::map<std::string, V, C, A>> =
    object_codec_supported<V>;
template <class V, class H, class E, class A>
inline constexpr bool object_codec_supported<std::unordered_map<std::string, V, H, E, A>> =
    object_codec_supported<V>;
template <class... Ts>
inline constexpr bool object_codec_supported<std::tuple<Ts...>> = (object_codec_supported<Ts> &&
                                                                   ...);
template <class A, class B>
inline constexpr bool object_codec_supported<std::pair<A, B>> =
    object_codec_supported<A>&& object_codec_supported<B>;
template <class T>
inline constexpr bool object_codec_supported<std::optional<T>> = object_codec_supported<T>;
template <class D, class T>
inline constexpr bool object_codec_supported<torch::data::Example<D, T>> =
    object_codec_supported<D>&& object_codec_supported<T>;
template <class D>
inline constexpr bool object_codec_supported<torch::data::Example<D, void>> =
    object_codec_supported<D>;

namespace detail {
template <class T>
void check_object_codec() {
  static_assert(object_codec_supported<T>,
                "accelerate::gather_object / broadcast_object_list cannot send this type. "
                "Supported: bool, integers, floating-point numbers, std::string, at::Tensor, "
                "c10::IValue, torch::data::Example, and std::vector, std::map<std::string, V>, "
                "std::unordered_map<std::string, V>, std::tuple, std::pair and std::optional of "
                "those. Specialise accelerate::ObjectCodec<T> for other types.");
}
}  // namespace detail

namespace detail {
[[noreturn]] void fail_decode(const char* op, const char* expected, const c10::IValue& got);
}  // namespace detail

template <>
struct ObjectCodec<c10::IValue> {
  static c10::IValue to_ivalue(const c10::IValue& v) { return v; }
  static c10::IValue from_ivalue(const c10::IValue& v, const char*) { return v; }
};

template <>
struct ObjectCodec<at::Tensor> {
  static c10::IValue to_ivalue(const at::Tensor& t) { return t; }
  static at::Tensor from_ivalue(const c10::IValue& v, const char* op) {
    if (!v.isTensor()) detail::fail_decode(op, "a tensor", v);
    return v.toTensor();
  }
};

template <>
struct ObjectCodec<bool> {
  static c10::IValue to_ivalue(bool b) { return b; }
  static bool from_ivalue(const c10::IValue& v, const char* op) {
    if (!v.isBool()) detail::fail_decode(op, "a bool", v);
    return v.toBool();
  }
};

template <>
struct ObjectCodec<std::string> {
  static c10::IValue to_ivalue(const std::string& s) { return s; }
  static std::string from_ivalue(const c10::IValue& v, const char* op) {
    if (!v.isString()) detail::fail_decode(op, "a string", v);
    return v.toStringRef();
  }
};

template <std::integral T>
requires(!std::same_as<T, bool>) struct ObjectCodec<T> {
  static c10::IValue to_ivalue(T x) {
    if constexpr (std::is_unsigned_v<T> && sizeof(T) >= sizeof(int64_t)) {
      TORCH_CHECK(x <= static_cast<T>(std::numeric_limits<int64_t>::max()), "accelerate: ", x,
                  " does not fit in the 64-bit signed integer objects are sent as");
    }
    return static_cast<int64_t>(x);
  }
  static T from_ivalue(const c10::IValue& v, const char* op) {
    if (!v.isInt()) detail::fail_decode(op, "an integer", v);
    const int64_t x = v.toInt();
    TORCH_CHECK(std::in_range<T>(x), "accelerate: '", op, "': received ", x,
                ", which does not fit in ", c10::demangle_type<T>());
    return static_cast<T>(x);
  }
};

template <std::floating_point T>
struct ObjectCodec<T> {
  static c10::IValue to_ivalue(T x) { return static_cast<double>(x); }
  static T from_ivalue(const c10::IValue& v, const char* op) {
    if (!v.isDouble()) detail::fail_decode(op, "a floating-point number", v);
    return static_cast<T>(v.toDouble());
  }
};

template <class T, class A>
struct ObjectCodec<std::vector<T, A>> {
  static c10::IValue to_ivalue(const std::vector<T, A>& xs) {
    c10::impl::GenericList list(c10::AnyType::get());
    list.reserve(xs.size());
    for (const auto& x : xs) list.push_back(ObjectCodec<T>::to_ivalue(x));
    return list;
  }
  static std::vector<T, A> from_ivalue(const c10::IValue& v, const char* op) {
    if (!v.isList()) detail::fail_decode(op, "a list", v);
    std::vector<T, A> out;
    for (const c10::IValue& x : v.toListRef()) out.push_back(ObjectCodec<T>::from_ivalue(x, op));
    return out;
  }
};

namespace detail {
template <class Map>
struct StringMapCodec {
  using V = typename Map::mapped_type;
  static c10::IValue to_ivalue(const Map& m) {
    c10::impl::GenericDict dict(c10::StringType::get(), c10::AnyType::get());
    for (const auto& [key, value] : m) dict.insert(key, ObjectCodec<V>::to_ivalue(value));
    return dict;
  }
  static Map from_ivalue(const c10::IValue& v, const char* op) {
    if (!v.isGenericDict()) fail_decode(op, "a dict", v);
    Map out;
    for (const auto& entry : v.toGenericDict()) {
      if (!entry.key().isString()) fail_decode(op, "a string key", entry.key());
      out.emplace(entry.key().toStringRef(), ObjectCodec<V>::from_ivalue(entry.value(), op));
    }
    return out;
  }
};

template <class Tuple, size_t... I>
Tuple decode_tuple(const c10::IValue& v, const char* op, std::index_sequence<I...>) {
  if (!v.isTuple() || v.toTupleRef().size() != sizeof...(I)) {
    fail_decode(op, "a tuple of the expected size", v);
  }
  const c10::ArrayRef<c10::IValue> elements = v.toTupleRef().elements().asArrayRef();
  return Tuple(ObjectCodec<std::tuple_element_t<I, Tuple>>::from_ivalue(elements[I], op)...);
}
}  // namespace detail

template <class V, class C, class A>
struct ObjectCodec<std::map<std::string, V, C, A>>
    : detail::StringMapCodec<std::map<std::string, V, C, A>> {};

template <class V, class H, class E, class A>
struct ObjectCodec<std::unordered_map<std::string, V, H, E, A>>
    : detail::StringMapCodec<std::unordered_map<std::string, V, H, E, A>> {};

template <class... Ts>
struct ObjectCodec<std::tuple<Ts...>> {
  static c10::IValue to_ivalue(const std::tuple<Ts...>& t) {
    return std::apply(
        [](const auto&... xs) {
          return c10::ivalue::Tuple::create(
              std::vector<c10::IValue>{ObjectCodec<std::decay_t<decltype(xs)>>::to_ivalue(xs)...});
        },
        t);
  }
  static std::tuple<Ts...> from_ivalue(const c10::IValue& v, const char* op) {
    return detail::decode_tuple<std::tuple<Ts...>>(v, op, std::index_sequence_for<Ts...>{});
  }
};

template <class A, class B>
struct ObjectCodec<std::pair<A, B>> {
  static c10::IValue to_ivalue(const std::pair<A, B>& p) {
    return c10::ivalue::Tuple::create(ObjectCodec<A>::to_ivalue(p.first),
                                      ObjectCodec<B>::to_ivalue(p.second));
  }
  static std::pair<A, B> from_ivalue(const c10::IValue& v, const char* op) {
    return detail::decode_tuple<std::pair<A, B>>(v, op, std::index_sequence<0, 1>{});
  }
};

template <class T>
struct ObjectCodec<std::optional<T>> {
  static c10::IValue to_ivalue(const std::optional<T>& x) {
    return x ? ObjectCodec<T>::to_ivalue(*x) : c10::IValue();
  }
  static std::optional<T> from_ivalue(const c10::IValue& v, const char* op) {
    if (v.isNone()) return std::nullopt;
    return ObjectCodec<T>::from_ivalue(v, op);
  }
};

template <class D, class T>
struct ObjectCodec<torch::data::Example<D, T>> {
  static c10::IValue to_ivalue(const torch::data::Example<D, T>& e) {
    return c10::ivalue::Tuple::create(ObjectCodec<D>::to_ivalue(e.data),
                                      ObjectCodec<T>::to_ivalue(e.target));
  }
  static torch::data::Example<D, T> from_ivalue(const c10::IValue& v, const char* op) {
    auto [data, target] = ObjectCodec<std::tuple<D, T>>::from_ivalue(v, op);
    return torch::data::Example<D, T>(std::move(data), std::move(target));
  }
};

template <class D>
struct ObjectCodec<torch::data::Example<D, torch::data::example::NoTarget>> {
  static c10::IValue to_ivalue(const torch::data::Example<D, torch::data::example::NoTarget>& e) {
    return ObjectCodec<D>::to_ivalue(e.data);
  }
  static torch::data::Example<D, torch::data::example::NoTarget> from_ivalue(const c10::IValue& v,
                                                                             const char* op) {
    return torch::data::Example<D, torch::data::example::NoTarget>(
        ObjectCodec<D>::from_ivalue(v, op));
  }
};

// ---------------------------------------------------------------------- internals

namespace detail {

/// torch::pickle_save / torch::pickle_load, as byte strings, with errors naming `op`.
std::string pickle_object(const c10::IValue& value, const char* op);
c10::IValue unpickle_object(const std::string& bytes, const char* op);

void check_from_process(const PartialState& state, int from_process, const char* op);
void check_reducible(const TreePath& path, const at::Tensor& t, Reduction reduction, double scale);

at::Tensor gather_tensor(const PartialState& state, const at::Tensor& t);
at::Tensor broadcast_tensor(const PartialState& state, const at::Tensor& t, int from_process);
at::Tensor reduce_tensor(const PartialState& state, const at::Tensor& t, Reduction reduction,
                         double scale);
at::Tensor pad_tensor(const PartialState& state, const at::Tensor& t, const PadOptions& options);
at::Tensor concatenate_tensors(const std::vector<at::Tensor>& tensors, int64_t dim,
                               const std::string& path);
at::Tensor slice_tensor(const at::Tensor& t, int64_t start, int64_t end, const TreePath& path);
at::Tensor convert_tensor_to_fp32(const at::Tensor& t);

/// One leaf of a debug-mode structure description: `key` is compared across processes (path,
/// dtype, number of dimensions), `display` is what the error shows (path, shape, dtype).
void describe_leaf(const TreePath& path, const at::Tensor& t, std::string& key,
                   std::string& display);
/// Debug mode: throws on every process when the processes' `key`s differ, listing `display`s.
void verify_same_structure(const PartialState& state, const char* op, const std::string& key,
                           const std::string& display);

/// What every collective on a structure does first: rejects non-tensor leaves (before any
/// communication, so that every process fails at the same point), and in debug mode checks that
/// every process passed the same structure.
template <class T>
void prepare_collective(const PartialState& state, const char* op, const T& data) {
  for_each_tensor([](const at::Tensor&) {}, data, {.error_on_other_type = true, .op = op});
  if (!state.debug() || !state.use_distributed()) return;
  std::string key, display;
  for_each_tensor(
      [&](const TreePath& path, const at::Tensor& t) { describe_leaf(path, t, key, display); },
      data);
  verify_same_structure(state, op, key, display);
}

template <class T>
std::string encode_object(const T& object, const char* op) {
  check_object_codec<T>();
  return pickle_object(ObjectCodec<T>::to_ivalue(object), op);
}

template <class T>
T decode_object(const std::string& bytes, const char* op) {
  check_object_codec<T>();
  return ObjectCodec<T>::from_ivalue(unpickle_object(bytes, op), op);
}

}  // namespace detail

// ---------------------------------------------------------------------- collectives

/// Gathers every tensor of `data` from all processes and concatenates the results along the
/// first dimension, in rank order; a 0-dim tensor becomes a tensor of shape [num_processes].
/// Tensors must have the same shape on every process (see pad_across_processes). With a single
/// process tensors are returned as they are, except that a 0-dim tensor becomes shape [1] (in
/// Accelerate it stays 0-dim there, so the result's shape depended on the number of processes).
///
/// Example:
/// \code
///   // On process i of 2, preds = {2 * i, 2 * i + 1}:
///   at::Tensor all = accelerate::gather(state, preds);  // {0, 1, 2, 3} on every process
/// \endcode
template <class T>
T gather(const PartialState& state, const T& data) {
  detail::prepare_collective(state, "gather", data);
  return recursively_apply([&](const at::Tensor& t) { return detail::gather_tensor(state, t); },
                           data, {.error_on_other_type = true, .op = "gather"});
}
template <class T>
T gather(const T& data) {
  return gather(PartialState::shared(), data);
}

/// Gathers a vector of objects from all processes: every process's elements, in rank order,
/// in one vector (Accelerate flattens one level). Objects are pickled (see ObjectCodec), so
/// their sizes may differ between processes. With a single process, `objects` is returned.
///
/// Example:
/// \code
///   // Process 0 passes {"a"}, process 1 passes {"b", "c"}:
///   auto all = accelerate::gather_object(state, names);  // {"a", "b", "c"} everywhere
/// \endcode
template <class T>
std::vector<T> gather_object(const PartialState& state, const std::vector<T>& objects) {
  if (!state.use_distributed()) return objects;
  const auto parts = detail::all_gather_bytes(state, "gather_object",
                                              detail::encode_object(objects, "gather_object"));
  std::vector<T> out;
  for (const auto& part : parts) {
    auto items = detail::decode_object<std::vector<T>>(part, "gather_object");
    out.insert(out.end(), std::make_move_iterator(items.begin()),
               std::make_move_iterator(items.end()));
  }
  return out;
}
/// Gathers one object from every process: a vector indexed by process.
///
/// Example:
/// \code
///   std::vector<double> losses = accelerate::gather_object(state, local_loss);
/// \endcode
template <class T>
std::vector<T> gather_object(const PartialState& state, const T& object) {
  std::vector<T> out;
  if (!state.use_distributed()) {
    out.push_back(object);
    return out;
  }
  const auto parts = detail::all_gather_bytes(state, "gather_object",
                                              detail::encode_object(object, "gather_object"));
  out.reserve(parts.size());
  for (const auto& part : parts) out.push_back(detail::decode_object<T>(part, "gather_object"));
  return out;
}
template <class T>
std::vector<T> gather_object(const std::vector<T>& objects) {
  return gather_object(PartialState::shared(), objects);
}
template <class T>
std::vector<T> gather_object(const T& object) {
  return gather_object(PartialState::shared(), object);
}

/// Every tensor of `data` as process `from_process` has it. The other processes' tensors give
/// the expected shapes and dtypes. With a single process `data` is returned as it is.
///
/// Example:
/// \code
///   auto weights = accelerate::broadcast(state, local_weights, /*from_process=*/0);
/// \endcode
template <class T>
T broadcast(const PartialState& state, const T& data, int from_process = 0) {
  detail::check_from_process(state, from_process, "broadcast");
  detail::prepare_collective(state, "broadcast", data);
  return recursively_apply(
      [&](const at::Tensor& t) { return detail::broadcast_tensor(state, t, from_process); }, data,
      {.error_on_other_type = true, .op = "broadcast"});
}
template <class T>
T broadcast(const T& data, int from_process = 0) {
  return broadcast(PartialState::shared(), data, from_process);
}

/// Replaces `objects` on every process by process `from_process`'s vector (which may have a
/// different length), and returns it. Objects are pickled (see ObjectCodec).
///
/// Example:
/// \code
///   std::vector<std::string> files;
///   if (state.is_main_process()) files = list_shards();
///   accelerate::broadcast_object_list(state, files);  // every process has process 0's list
/// \endcode
template <class T>
std::vector<T>& broadcast_object_list(const PartialState& state, std::vector<T>& objects,
                                      int from_process = 0) {
  constexpr const char* kOp = "broadcast_object_list";
  detail::check_from_process(state, from_process, kOp);
  if (!state.use_distributed()) return objects;
  const bool sender = state.process_index() == from_process;
  const auto bytes = detail::broadcast_bytes(
      state, kOp, sender ? detail::encode_object(objects, kOp) : std::string(), from_process);
  if (!sender) objects = detail::decode_object<std::vector<T>>(bytes, kOp);
  return objects;
}
template <class T>
std::vector<T>& broadcast_object_list(std::vector<T>& objects, int from_process = 0) {
  return broadcast_object_list(PartialState::shared(), objects, from_process);
}

/// Reduces every tensor of `data` over all processes: each tensor is multiplied by `scale` and
/// summed over processes; kMean then divides by the number of processes (floating-point
/// tensors only). kNone sums like kSum and skips only the division: that is what Accelerate's
/// "none" does (its all-reduce runs for every reduction). Always returns new tensors. float16 and
/// bfloat16 are summed and divided in float32 and rounded once.
///
/// Example:
/// \code
///   // On process i of 4, t = {i}:
///   accelerate::reduce(state, t, accelerate::Reduction::kSum);  // {6}
///   accelerate::reduce(state, t.to(at::kFloat), "mean");        // {1.5}
/// \endcode
template <class T>
T reduce(const PartialState& state, const T& data, Reduction reduction = Reduction::kMean,
         double scale = 1.0) {
  for_each_tensor([&](const TreePath& path,
                      const at::Tensor& t) { detail::check_reducible(path, t, reduction, scale); },
                  data, {.error_on_other_type = true, .op = "reduce"});
  detail::prepare_collective(state, "reduce", data);
  return recursively_apply(
      [&](const at::Tensor& t) { return detail::reduce_tensor(state, t, reduction, scale); }, data,
      {.error_on_other_type = true, .op = "reduce"});
}
/// As above, with the reduction named as in Accelerate: "mean", "sum" or "none".
template <class T>
T reduce(const PartialState& state, const T& data, std::string_view reduction, double scale = 1.0) {
  return reduce(state, data, reduction_from_string(reduction), scale);
}
template <class T>
T reduce(const T& data, Reduction reduction = Reduction::kMean, double scale = 1.0) {
  return reduce(PartialState::shared(), data, reduction, scale);
}
template <class T>
T reduce(const T& data, std::string_view reduction, double scale = 1.0) {
  return reduce(PartialState::shared(), data, reduction_from_string(reduction), scale);
}

/// Pads every tensor of `data` along `options.dim` to the largest size any process has there,
/// filling with `options.pad_index`, at the end (or at the start with `pad_first`), so that
/// the tensors can then be gathered. Tensors that already have the largest size, or that have
/// no dimension `dim`, are returned as they are. Other dimensions must agree between processes.
///
/// Example:
/// \code
///   // Process 0 has shape [2, 3], process 1 has shape [2, 5]:
///   auto padded = accelerate::pad_across_processes(state, logits, {.dim = 1, .pad_index = -1});
///   // shape [2, 5] on both; process 0's columns 3 and 4 are -1
/// \endcode
template <class T>
T pad_across_processes(const PartialState& state, const T& data, const PadOptions& options = {}) {
  detail::prepare_collective(state, "pad_across_processes", data);
  return recursively_apply(
      [&](const at::Tensor& t) { return detail::pad_tensor(state, t, options); }, data,
      {.error_on_other_type = true, .op = "pad_across_processes"});
}
template <class T>
T pad_across_processes(const T& data, const PadOptions& options = {}) {
  return pad_across_processes(PartialState::shared(), data, options);
}

// ---------------------------------------------------------------------- local operations

/// Copies every tensor of `data` to `device`; other leaves are passed through.
///
/// Example:
/// \code
///   auto batch = accelerate::send_to_device(cpu_batch, state.device());
/// \endcode
template <class T>
T send_to_device(const T& data, const c10::Device& device, const SendOptions& options = {}) {
  return recursively_apply([&](const at::Tensor& t) { return t.to(device, options.non_blocking); },
                           data, {.op = "send_to_device"});
}

/// Concatenates structures of the same shape leaf by leaf with at::cat along `dim`: the result
/// has the structure of `data[0]`. Every leaf must be a tensor.
///
/// Example:
/// \code
///   std::vector<std::map<std::string, at::Tensor>> steps = ...;  // one per evaluation step
///   auto all = accelerate::concatenate(steps);  // each key's tensors concatenated along dim 0
/// \endcode
template <class T>
T concatenate(const std::vector<T>& data, int64_t dim = 0) {
  constexpr const char* kOp = "concatenate";
  TORCH_CHECK(!data.empty(),
              "accelerate: 'concatenate' needs at least one structure, but the "
              "vector is empty");
  const TreeOptions options{.error_on_other_type = true, .op = kOp};
  std::vector<std::string> paths;
  std::vector<std::vector<at::Tensor>> columns;
  for_each_tensor(
      [&](const TreePath& path, const at::Tensor& t) {
        paths.push_back(path.str());
        columns.push_back({t});
      },
      data[0], options);
  for (size_t j = 1; j < data.size(); ++j) {
    size_t i = 0;
    for_each_tensor(
        [&](const TreePath& path, const at::Tensor& t) {
          TORCH_CHECK(i < paths.size(), "accelerate: 'concatenate': element ", j,
                      " has more tensors than element 0 (", paths.size(), "), starting at ",
                      path.str());
          TORCH_CHECK(path.str() == paths[i], "accelerate: 'concatenate': element ", j,
                      " has a tensor at ", path.str(), " where element 0 has one at ", paths[i]);
          columns[i++].push_back(t);
        },
        data[j], options);
    TORCH_CHECK(i == paths.size(), "accelerate: 'concatenate': element ", j, " has ", i,
                " tensors but element 0 has ", paths.size());
  }
  size_t i = 0;
  return recursively_apply(
      [&](const at::Tensor&) {
        const size_t leaf = i++;
        return detail::concatenate_tensors(columns[leaf], dim, paths[leaf]);
      },
      data[0], options);
}

/// Every tensor of `data` sliced to rows [start, end) of its first dimension, with Python's
/// rules for negative and out-of-range bounds; other leaves are passed through.
///
/// Example:
/// \code
///   auto first_half = accelerate::slice_tensors(batch, 0, batch_size / 2);
/// \endcode
template <class T>
T slice_tensors(const T& data, int64_t start, int64_t end) {
  TreePath path;
  auto leaf = [&](const TreePath& p, at::Tensor& t) { t = detail::slice_tensor(t, start, end, p); };
  T out = data;
  detail::walk(out, path, leaf, TreeOptions{.op = "slice_tensors"});
  return out;
}

/// Every float16 and bfloat16 tensor of `data` converted to float32; other tensors and leaves
/// are passed through.
///
/// Example:
/// \code
///   auto outputs32 = accelerate::convert_to_fp32(model_outputs);
/// \endcode
template <class T>
T convert_to_fp32(const T& data) {
  return recursively_apply(&detail::convert_tensor_to_fp32, data, {.op = "convert_to_fp32"});
}

/// The size of the first dimension of the first tensor of `data`, in traversal order
/// (Accelerate's `find_batch_size`). An error when `data` holds no tensor or that tensor is
/// 0-dim.
///
/// Example:
/// \code
///   int64_t n = accelerate::find_batch_size(batch);
/// \endcode
template <class T>
int64_t find_batch_size(const T& data) {
  std::optional<int64_t> size;
  std::string where;
  for_each_tensor(
      [&](const TreePath& path, const at::Tensor& t) {
        if (size.has_value() || !where.empty()) return;
        where = path.str();
        if (t.dim() > 0) size = t.size(0);
      },
      data);
  TORCH_CHECK(!where.empty(), "accelerate: 'find_batch_size': the data holds no tensor");
  TORCH_CHECK(size.has_value(), "accelerate: 'find_batch_size': the first tensor, ", where,
              ", is 0-dim and has no batch dimension");
  return *size;
}

}  // namespace accelerate
