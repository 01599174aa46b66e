#pragma once
/// \file
/// The one traversal mechanism for nested containers of tensors (Accelerate's
/// `recursively_apply`). Every operation in operations.h that takes "a tensor or a nested
/// container of tensors" is written once on top of this header.
///
/// What is a container is decided by one customization point, `accelerate::TensorTree<T>`:
/// a type is a container when `TensorTree<T>` has a static `for_each_child(self, f)` that calls
/// `f(key, child)` for each child, in an order that is the same on every process. This header
/// specialises it for `std::vector`, `std::array`, `std::map`, `std::unordered_map` (visited in
/// sorted key order, so that every process issues its collectives in the same order),
/// `std::tuple`, `std::pair`, `std::optional`, `torch::OrderedDict` and
/// `torch::data::Example`. `c10::IValue` is walked too (tensor, list, tuple and generic dict,
/// the latter in insertion order). User batch types opt in with ACCELERATE_TENSOR_FIELDS or by
/// specialising `TensorTree` themselves. Anything else is a non-tensor leaf: passed through
/// unchanged, or an error with `TreeOptions::error_on_other_type`.
///
/// Example:
/// \code
///   struct Batch {
///     at::Tensor input_ids;
///     std::map<std::string, at::Tensor> extras;
///     int64_t step = 0;  // not a tensor: passed through
///   };
///   ACCELERATE_TENSOR_FIELDS(Batch, input_ids, extras, step);  // at global namespace
///
///   Batch on_gpu = accelerate::recursively_apply(
///       [](const at::Tensor& t) { return t.to(at::kCUDA); }, batch);
///   accelerate::for_each_tensor(
///       [](const accelerate::TreePath& path, const at::Tensor& t) {
///         std::cout << path.str() << ": " << t.sizes() << "\n";  // data.input_ids: [8, 128]
///       },
///       batch);
/// \endcode

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <c10/util/Exception.h>
#include <c10/util/Type.h>
#include <torch/csrc/api/include/torch/data/example.h>
#include <torch/csrc/api/include/torch/ordered_dict.h>

#include <algorithm>
#include <array>
#include <concepts>
#include <cstddef>
#include <cstdint>
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

/// One step from a container to one of its children, kept only to name a leaf in error
/// messages. Map keys and field names are held by reference: a key is valid while its
/// container is.
///
/// Example:
/// \code
///   accelerate::TreeKey::index(2);       // "[2]"
///   accelerate::TreeKey::key("labels");  // "['labels']"
///   accelerate::TreeKey("input_ids");    // ".input_ids" (a struct field)
/// \endcode
class TreeKey {
 public:
  enum class Kind { kSelf, kIndex, kKey, kField };

  /// The container's only content (an optional's value): adds nothing to the path.
  TreeKey() = default;
  /// A struct field, so that TensorTree specialisations can write `f("name", self.name)`.
  /* implicit */ TreeKey(const char* field) : kind_(Kind::kField), name_(field) {}

  static TreeKey index(int64_t i) {
    TreeKey k;
    k.kind_ = Kind::kIndex;
    k.index_ = i;
    return k;
  }
  static TreeKey key(std::string_view name) {
    TreeKey k;
    k.kind_ = Kind::kKey;
    k.name_ = name;
    return k;
  }
  static TreeKey field(std::string_view name) {
    TreeKey k;
    k.kind_ = Kind::kField;
    k.name_ = name;
    return k;
  }

  Kind kind() const { return kind_; }
  int64_t index() const { return index_; }
  std::string_view name() const { return name_; }

  /// Appends this step as Python would write it: `[2]`, `['labels']`, `.input_ids`.
  void append_to(std::string& out) const {
    switch (kind_) {
      case Kind::kSelf:
        break;
      case Kind::kIndex:
        out += '[';
        out += std::to_string(index_);
        out += ']';
        break;
      case Kind::kKey:
        out += "['";
        out += name_;
        out += "']";
        break;
      case Kind::kField:
        out += '.';
        out += name_;
        break;
    }
  }

 private:
  Kind kind_ = Kind::kSelf;
  int64_t index_ = 0;
  std::string_view name_;
};

/// Where a leaf sits in the structure being walked, from the root down.
///
/// Example:
/// \code
///   // For batch["inputs"][1] of a std::map<std::string, std::vector<at::Tensor>>:
///   path.str();         // "data['inputs'][1]"
///   path.str("batch");  // "batch['inputs'][1]"
/// \endcode
class TreePath {
 public:
  void push(TreeKey key) { keys_.push_back(key); }
  void pop() { keys_.pop_back(); }
  const std::vector<TreeKey>& keys() const { return keys_; }
  size_t depth() const { return keys_.size(); }

  /// The path as an expression on a root named `root`.
  std::string str(std::string_view root = "data") const {
    std::string out(root);
    for (const auto& key : keys_) key.append_to(out);
    return out;
  }

 private:
  std::vector<TreeKey> keys_;
};

/// How a traversal treats what it finds (Accelerate's `recursively_apply` keyword arguments).
///
/// Example:
/// \code
///   accelerate::for_each_tensor(check, batch, {.error_on_other_type = true, .op = "gather"});
/// \endcode
struct TreeOptions {
  /// Make a leaf that is not a tensor an error instead of passing it through.
  bool error_on_other_type = false;
  /// The operation named in errors.
  const char* op = "recursively_apply";
};

/// The customization point that makes `T` a container of tensors. The primary template makes
/// `T` a leaf; a specialisation provides
///
///   template <class Self, class F> static void for_each_child(Self& self, F&& f);
///
/// where `Self` is `T` or `const T`, calling `f(TreeKey, child)` once per child that may hold
/// tensors, in an order that does not depend on the process. The children are references into
/// `self`: operations that rebuild a structure copy it and then assign each tensor leaf.
///
/// Example:
/// \code
///   template <class T>
///   struct Twins { T first, second; };
///   template <class T>
///   struct accelerate::TensorTree<Twins<T>> {
///     template <class Self, class F>
///     static void for_each_child(Self& self, F&& f) {
///       f("first", self.first);
///       f("second", self.second);
///     }
///   };
/// \endcode
template <class T>
struct TensorTree {};

namespace detail {

template <class T>
inline constexpr bool dependent_false = false;

/// A callable accepting any child, used to detect TensorTree specialisations.
struct AnyChild {
  template <class C>
  void operator()(TreeKey, C&) const {}
};

template <class T>
concept TreeContainer = requires(T& t, AnyChild f) {
  TensorTree<T>::for_each_child(t, f);
};

template <class K>
concept TreeMapKey = std::same_as<K, std::string> || std::integral<K>;

template <class K>
TreeKey map_key(const K& key) {
  if constexpr (std::same_as<K, std::string>) {
    return TreeKey::key(key);
  } else {
    return TreeKey::index(static_cast<int64_t>(key));
  }
}

template <class Self, class F>
void for_each_sequence_child(Self& self, F& f) {
  int64_t i = 0;
  for (auto& child : self) f(TreeKey::index(i++), child);
}

}  // namespace detail

// ---------------------------------------------------------------------- standard containers

/// std::vector (except std::vector<bool>, whose elements are not addressable).
template <class T, class A>
requires(!std::same_as<T, bool>) struct TensorTree<std::vector<T, A>> {
  template <class Self, class F>
  static void for_each_child(Self& self, F&& f) {
    detail::for_each_sequence_child(self, f);
  }
};

template <class T, size_t N>
struct TensorTree<std::array<T, N>> {
  template <class Self, class F>
  static void for_each_child(Self& self, F&& f) {
    detail::for_each_sequence_child(self, f);
  }
};

/// std::map with string or integer keys, in key order.
template <detail::TreeMapKey K, class V, class C, class A>
struct TensorTree<std::map<K, V, C, A>> {
  template <class Self, class F>
  static void for_each_child(Self& self, F&& f) {
    for (auto& [key, value] : self) f(detail::map_key(key), value);
  }
};

/// std::unordered_map with string or integer keys, in sorted key order: the hash order may
/// differ between processes, and collectives must be issued in the same order everywhere.
template <detail::TreeMapKey K, class V, class H, class E, class A>
struct TensorTree<std::unordered_map<K, V, H, E, A>> {
  template <class Self, class F>
  static void for_each_child(Self& self, F&& f) {
    std::vector<decltype(&*self.begin())> entries;
    entries.reserve(self.size());
    for (auto& entry : self) entries.push_back(&entry);
    std::sort(entries.begin(), entries.end(),
              [](const auto* a, const auto* b) { return a->first < b->first; });
    for (auto* entry : entries) f(detail::map_key(entry->first), entry->second);
  }
};

template <class... Ts>
struct TensorTree<std::tuple<Ts...>> {
  template <class Self, class F>
  static void for_each_child(Self& self, F&& f) {
    std::apply(
        [&](auto&... children) {
          int64_t i = 0;
          (f(TreeKey::index(i++), children), ...);
        },
        self);
  }
};

template <class A, class B>
struct TensorTree<std::pair<A, B>> {
  template <class Self, class F>
  static void for_each_child(Self& self, F&& f) {
    f(TreeKey::index(0), self.first);
    f(TreeKey::index(1), self.second);
  }
};

/// An empty optional has no children; a full one has its value.
template <class T>
struct TensorTree<std::optional<T>> {
  template <class Self, class F>
  static void for_each_child(Self& self, F&& f) {
    if (self.has_value()) f(TreeKey(), *self);
  }
};

/// torch::OrderedDict (what `named_parameters()` returns), in insertion order.
template <class V>
struct TensorTree<torch::OrderedDict<std::string, V>> {
  template <class Self, class F>
  static void for_each_child(Self& self, F&& f) {
    for (auto& item : self) f(TreeKey::key(item.key()), item.value());
  }
};

/// What LibTorch's data loaders yield: `.data`, and `.target` unless it is NoTarget.
template <class Data, class Target>
struct TensorTree<torch::data::Example<Data, Target>> {
  template <class Self, class F>
  static void for_each_child(Self& self, F&& f) {
    f("data", self.data);
    if constexpr (!std::is_void_v<Target>) f("target", self.target);
  }
};

// ---------------------------------------------------------------------- the walk

namespace detail {

/// A readable name for `T` in error messages.
template <class T>
std::string type_name() {
  if constexpr (std::same_as<T, std::string>) {
    return "std::string";
  } else {
    return c10::demangle_type<T>();
  }
}

[[noreturn]] inline void fail_other_type(const TreeOptions& options, const TreePath& path,
                                         const std::string& type) {
  TORCH_CHECK(false, "accelerate: '", options.op,
              "' takes tensors (possibly in nested containers), but ", path.str(), " is of type ",
              type);
}

template <bool kWrite, class Leaf>
void walk_ivalue(std::conditional_t<kWrite, c10::IValue, const c10::IValue>& v, TreePath& path,
                 Leaf& leaf, const TreeOptions& options);

/// Visits every tensor leaf of `data` (a `T` or a `const T`) in a fixed order, calling
/// `leaf(path, tensor)`, where `tensor` is assignable when `data` is not const. This is the
/// traversal every other function is built on.
template <class Data, class Leaf>
void walk(Data& data, TreePath& path, Leaf& leaf, const TreeOptions& options) {
  using T = std::remove_const_t<Data>;
  if constexpr (std::same_as<T, at::Tensor>) {
    leaf(static_cast<const TreePath&>(path), data);
  } else if constexpr (std::same_as<T, c10::IValue>) {
    walk_ivalue<!std::is_const_v<Data>>(data, path, leaf, options);
  } else if constexpr (TreeContainer<T>) {
    TensorTree<T>::for_each_child(data, [&](TreeKey key, auto& child) {
      path.push(key);
      walk(child, path, leaf, options);
      path.pop();
    });
  } else {
    if (options.error_on_other_type) fail_other_type(options, path, type_name<T>());
  }
}

// A reading walk visits an IValue's containers; a writing walk rebuilds them, because IValue
// lists, tuples and dicts are shared by reference and the caller's must stay as they were.
template <bool kWrite, class Leaf>
void walk_ivalue(std::conditional_t<kWrite, c10::IValue, const c10::IValue>& v, TreePath& path,
                 Leaf& leaf, const TreeOptions& options) {
  using Child = std::conditional_t<kWrite, c10::IValue, const c10::IValue>;
  if (v.isTensor()) {
    leaf(static_cast<const TreePath&>(path), v.toTensor());
  } else if (v.isList()) {
    c10::List<c10::IValue> list = kWrite ? v.toList().copy() : v.toList();
    for (size_t i = 0; i < list.size(); ++i) {
      c10::IValue element = list.get(i);
      path.push(TreeKey::index(static_cast<int64_t>(i)));
      walk_ivalue<kWrite>(static_cast<Child&>(element), path, leaf, options);
      path.pop();
      if constexpr (kWrite) list.set(i, std::move(element));
    }
    if constexpr (kWrite) v = c10::IValue(std::move(list));
  } else if (v.isTuple()) {
    const auto& tuple = v.toTupleRef();
    std::vector<c10::IValue> elements(tuple.elements().begin(), tuple.elements().end());
    for (size_t i = 0; i < elements.size(); ++i) {
      path.push(TreeKey::index(static_cast<int64_t>(i)));
      walk_ivalue<kWrite>(static_cast<Child&>(elements[i]), path, leaf, options);
      path.pop();
    }
    if constexpr (kWrite) {
      // A named tuple keeps its type; an unnamed one gets its type from its new elements.
      auto type = tuple.type();
      v = c10::IValue(type->schema() ? c10::ivalue::Tuple::createNamed(std::move(elements), type)
                                     : c10::ivalue::Tuple::create(std::move(elements)));
    }
  } else if (v.isGenericDict()) {
    c10::Dict<c10::IValue, c10::IValue> dict =
        kWrite ? v.toGenericDict().copy() : v.toGenericDict();
    for (auto it = dict.begin(); it != dict.end(); ++it) {
      const c10::IValue& key = it->key();
      c10::IValue value = it->value();
      if (key.isString()) {
        path.push(TreeKey::key(key.toStringRef()));
      } else if (key.isInt()) {
        path.push(TreeKey::index(key.toInt()));
      } else {
        path.push(TreeKey::key("?"));
      }
      walk_ivalue<kWrite>(static_cast<Child&>(value), path, leaf, options);
      path.pop();
      if constexpr (kWrite) it->setValue(std::move(value));
    }
    if constexpr (kWrite) v = c10::IValue(std::move(dict));
  } else if (options.error_on_other_type) {
    fail_other_type(options, path, "IValue " + v.tagKind());
  }
}

}  // namespace detail

// ---------------------------------------------------------------------- public entry points

/// Returns a copy of `data` in which every tensor leaf `t` is replaced by `fn(t)` (or by
/// `fn(path, t)` when `fn` takes the leaf's TreePath first). Non-tensor leaves are copied
/// unchanged, or are an error with `options.error_on_other_type`. Accelerate's
/// `recursively_apply`.
///
/// Example:
/// \code
///   std::map<std::string, std::vector<at::Tensor>> batch = ...;
///   auto halves = accelerate::recursively_apply(
///       [](const at::Tensor& t) { return t.to(at::kHalf); }, batch);
/// \endcode
template <class F, class T>
T recursively_apply(F&& fn, const T& data, const TreeOptions& options = {}) {
  T out = data;
  TreePath path;
  auto leaf = [&fn](const TreePath& p, at::Tensor& t) {
    if constexpr (std::is_invocable_v<F&, const TreePath&, const at::Tensor&>) {
      t = fn(p, std::as_const(t));
    } else {
      static_assert(std::is_invocable_r_v<at::Tensor, F&, const at::Tensor&>,
                    "recursively_apply: fn must take (const at::Tensor&) or "
                    "(const accelerate::TreePath&, const at::Tensor&) and return a tensor");
      t = fn(std::as_const(t));
    }
  };
  detail::walk(out, path, leaf, options);
  return out;
}

/// Calls `fn(tensor)` or `fn(path, tensor)` for every tensor leaf of `data`, in the order every
/// operation visits them. Non-tensor leaves are skipped, or are an error with
/// `options.error_on_other_type`.
///
/// Example:
/// \code
///   int64_t elements = 0;
///   accelerate::for_each_tensor([&](const at::Tensor& t) { elements += t.numel(); }, batch);
/// \endcode
template <class F, class T>
void for_each_tensor(F&& fn, const T& data, const TreeOptions& options = {}) {
  TreePath path;
  auto leaf = [&fn](const TreePath& p, const at::Tensor& t) {
    if constexpr (std::is_invocable_v<F&, const TreePath&, const at::Tensor&>) {
      fn(p, t);
    } else {
      static_assert(std::is_invocable_v<F&, const at::Tensor&>,
                    "for_each_tensor: fn must take (const at::Tensor&) or "
                    "(const accelerate::TreePath&, const at::Tensor&)");
      fn(t);
    }
  };
  detail::walk(data, path, leaf, options);
}

/// The number of tensor leaves in `data`.
///
/// Example:
/// \code
///   accelerate::count_tensors(std::make_tuple(at::ones({2}), 3, at::zeros({1})));  // 2
/// \endcode
template <class T>
size_t count_tensors(const T& data) {
  size_t n = 0;
  for_each_tensor([&n](const at::Tensor&) { ++n; }, data);
  return n;
}

}  // namespace accelerate

// ---------------------------------------------------------------------- user types

#define ACCELERATE_DETAIL_PARENS ()
#define ACCELERATE_DETAIL_EXPAND(...) \
  ACCELERATE_DETAIL_EXPAND4(ACCELERATE_DETAIL_EXPAND4(ACCELERATE_DETAIL_EXPAND4(__VA_ARGS__)))
#define ACCELERATE_DETAIL_EXPAND4(...) \
  ACCELERATE_DETAIL_EXPAND3(ACCELERATE_DETAIL_EXPAND3(ACCELERATE_DETAIL_EXPAND3(__VA_ARGS__)))
#define ACCELERATE_DETAIL_EXPAND3(...) \
  ACCELERATE_DETAIL_EXPAND2(ACCELERATE_DETAIL_EXPAND2(ACCELERATE_DETAIL_EXPAND2(__VA_ARGS__)))
#define ACCELERATE_DETAIL_EXPAND2(...) \
  ACCELERATE_DETAIL_EXPAND1(ACCELERATE_DETAIL_EXPAND1(ACCELERATE_DETAIL_EXPAND1(__VA_ARGS__)))
#define ACCELERATE_DETAIL_EXPAND1(...) __VA_ARGS__
#define ACCELERATE_DETAIL_FOR_EACH(macro, ...) \
  __VA_OPT__(ACCELERATE_DETAIL_EXPAND(ACCELERATE_DETAIL_FOR_EACH_STEP(macro, __VA_ARGS__)))
#define ACCELERATE_DETAIL_FOR_EACH_STEP(macro, first, ...) \
  macro(first)                                             \
      __VA_OPT__(ACCELERATE_DETAIL_FOR_EACH_AGAIN ACCELERATE_DETAIL_PARENS(macro, __VA_ARGS__))
#define ACCELERATE_DETAIL_FOR_EACH_AGAIN() ACCELERATE_DETAIL_FOR_EACH_STEP
#define ACCELERATE_DETAIL_TREE_FIELD(field) f(#field, self.field);

/// Makes a user struct a container of tensors for every operation: lists the fields that are
/// walked, in order (tensors, containers, or values passed through). Use it at global namespace
/// scope, after the struct is complete, and end it with a semicolon. Up to 100 fields.
///
/// Example:
/// \code
///   namespace my { struct Batch { at::Tensor x, y; std::string id; }; }
///   ACCELERATE_TENSOR_FIELDS(my::Batch, x, y, id);
///   auto moved = accelerate::send_to_device(batch, at::kCUDA);
/// \endcode
#define ACCELERATE_TENSOR_FIELDS(Type, ...)                                 \
  template <>                                                               \
  struct accelerate::TensorTree<Type> {                                     \
    template <class Self, class F>                                          \
    static void for_each_child(Self& self, F&& f) {                         \
      ACCELERATE_DETAIL_FOR_EACH(ACCELERATE_DETAIL_TREE_FIELD, __VA_ARGS__) \
    }                                                                       \
  }
