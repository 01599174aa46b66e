#pragma once
/// \file
/// The default collate function: turns the items of one batch into the batch, like PyTorch's
/// `default_collate`. Tensors are stacked along a new first dimension, numbers become a 1-D
/// tensor, strings a vector of strings, and containers are collated element by element:
///
/// | item type                              | batch type                                 |
/// |----------------------------------------|--------------------------------------------|
/// | `at::Tensor` of shape S                | `at::Tensor` of shape [B, S...]            |
/// | integer / floating-point number / bool | `at::Tensor` [B] (int64, float64, bool)    |
/// | `std::string`                          | `std::vector<std::string>`                 |
/// | `torch::data::Example<D, T>`           | `torch::data::Example<batch(D), batch(T)>` |
/// | `std::vector<T>` (same length in all)  | `std::vector<batch(T)>`                    |
/// | `std::map<std::string, T>`             | `std::map<std::string, batch(T)>`          |
/// | `std::tuple<Ts...>`, `std::pair<A, B>` | `std::tuple<batch(Ts)...>`, `std::pair`    |
///
/// Example:
/// \code
///   std::vector<std::map<std::string, at::Tensor>> items = {{{"x", at::ones({3})}},
///                                                            {{"x", at::zeros({3})}}};
///   auto batch = accelerate::data::DefaultCollate{}(std::move(items));  // batch["x"]: [2, 3]
/// \endcode

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/api/include/torch/data/example.h>

#include <concepts>
#include <cstddef>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace accelerate::data {

namespace detail {
template <class T>
inline constexpr bool collate_dependent_false = false;

template <class T>
struct CollatedType {
  static_assert(collate_dependent_false<T>,
                "accelerate::data::DefaultCollate cannot batch this item type. Supported: "
                "at::Tensor, numbers, bool, std::string, torch::data::Example, and std::vector, "
                "std::map<std::string, V>, std::tuple, std::pair of those. Pass your own "
                "collate function for other types.");
};
template <>
struct CollatedType<at::Tensor> {
  using type = at::Tensor;
};
template <class T>
requires std::is_arithmetic_v<T>
struct CollatedType<T> {
  using type = at::Tensor;
};
template <>
struct CollatedType<std::string> {
  using type = std::vector<std::string>;
};
template <class D, class T>
struct CollatedType<torch::data::Example<D, T>> {
  using type = torch::data::Example<typename CollatedType<D>::type, typename CollatedType<T>::type>;
};
template <class D>
struct CollatedType<torch::data::Example<D, torch::data::example::NoTarget>> {
  using type = torch::data::Example<typename CollatedType<D>::type, torch::data::example::NoTarget>;
};
template <class T, class A>
struct CollatedType<std::vector<T, A>> {
  using type = std::vector<typename CollatedType<T>::type>;
};
template <class V, class C, class A>
struct CollatedType<std::map<std::string, V, C, A>> {
  using type = std::map<std::string, typename CollatedType<V>::type>;
};
template <class... Ts>
struct CollatedType<std::tuple<Ts...>> {
  using type = std::tuple<typename CollatedType<Ts>::type...>;
};
template <class A, class B>
struct CollatedType<std::pair<A, B>> {
  using type = std::pair<typename CollatedType<A>::type, typename CollatedType<B>::type>;
};

template <class T>
struct is_example_without_target : std::false_type {};
template <class D>
struct is_example_without_target<torch::data::Example<D, torch::data::example::NoTarget>>
    : std::true_type {};

template <class T>
typename CollatedType<T>::type collate(std::vector<T>& items);

template <class T, class Get>
auto collate_field(std::vector<T>& items, Get get) {
  using Field = std::decay_t<decltype(get(items.front()))>;
  std::vector<Field> fields;
  fields.reserve(items.size());
  for (auto& item : items) fields.push_back(std::move(get(item)));
  return collate(fields);
}

template <class Tuple, size_t... I>
auto collate_tuple(std::vector<Tuple>& items, std::index_sequence<I...>) {
  return typename CollatedType<Tuple>::type(collate_field(
      items, [](Tuple & t) -> auto& { return std::get<I>(t); })...);
}

template <class T>
typename CollatedType<T>::type collate(std::vector<T>& items) {
  TORCH_CHECK(!items.empty(), "accelerate: cannot collate an empty batch");
  if constexpr (std::is_same_v<T, at::Tensor>) {
    // at::stack checks the shapes itself; finding the culprit only on failure keeps the
    // common path as cheap as a bare at::stack.
    try {
      return at::stack(items);
    } catch (const c10::Error&) {
      for (size_t i = 1; i < items.size(); ++i) {
        TORCH_CHECK(items[i].sizes() == items[0].sizes(),
                    "accelerate: default collate stacks tensors of one shape, but item 0 has "
                    "shape ",
                    items[0].sizes(), " and item ", i, " has shape ", items[i].sizes(),
                    "; pad them or pass a collate function");
      }
      throw;
    }
  } else if constexpr (std::is_same_v<T, bool>) {
    std::vector<uint8_t> bytes(items.begin(), items.end());
    return at::tensor(bytes, at::kByte).to(at::kBool);
  } else if constexpr (std::is_integral_v<T>) {
    std::vector<int64_t> values(items.begin(), items.end());
    return at::tensor(values, at::kLong);
  } else if constexpr (std::is_floating_point_v<T>) {
    std::vector<double> values(items.begin(), items.end());
    return at::tensor(values, at::kDouble);
  } else if constexpr (std::is_same_v<T, std::string>) {
    return std::move(items);
  } else if constexpr (is_example_without_target<T>::value) {
    return typename CollatedType<T>::type(collate_field(
        items, [](T & e) -> auto& { return e.data; }));
  } else if constexpr (requires {
                         typename T::DataType;
                         typename T::TargetType;
                       }) {
    return typename CollatedType<T>::type(collate_field(
                                              items, [](T & e) -> auto& { return e.data; }),
                                          collate_field(
                                              items, [](T & e) -> auto& { return e.target; }));
  } else if constexpr (requires { typename T::key_type; }) {
    typename CollatedType<T>::type out;
    for (const auto& [key, value] : items.front()) {
      out.emplace(key, collate_field(
                           items, [&key = key, &items ](T & m) -> auto& {
                             auto it = m.find(key);
                             TORCH_CHECK(it != m.end(), "accelerate: default collate: key '", key,
                                         "' is in item 0 but not in every item of the batch");
                             (void)items;
                             return it->second;
                           }));
    }
    for (const auto& item : items) {
      TORCH_CHECK(item.size() == items.front().size(),
                  "accelerate: default collate: items of one batch have different keys");
    }
    return out;
  } else if constexpr (requires { typename T::value_type; }) {
    const size_t width = items.front().size();
    for (size_t i = 1; i < items.size(); ++i) {
      TORCH_CHECK(items[i].size() == width,
                  "accelerate: default collate needs vectors of one length in a batch, but item 0 "
                  "has ",
                  width, " elements and item ", i, " has ", items[i].size());
    }
    typename CollatedType<T>::type out;
    out.reserve(width);
    for (size_t j = 0; j < width; ++j) {
      if constexpr (std::is_same_v<typename T::value_type, bool>) {
        // std::vector<bool> hands out proxies, not references.
        out.push_back(collate_field(items, [j](T& v) -> bool { return v[j]; }));
      } else {
        out.push_back(collate_field(
            items, [j](T & v) -> auto& { return v[j]; }));
      }
    }
    return out;
  } else {
    return collate_tuple(items, std::make_index_sequence<std::tuple_size_v<T>>{});
  }
}
}  // namespace detail

/// The batch type DefaultCollate makes from items of type T.
template <class T>
using collated_t = typename detail::CollatedType<std::decay_t<T>>::type;

/// PyTorch's `default_collate` for C++ item types (see the file comment). Items are consumed.
struct DefaultCollate {
  template <class T>
  collated_t<T> operator()(std::vector<T> items) const {
    return detail::collate(items);
  }
};

}  // namespace accelerate::data
