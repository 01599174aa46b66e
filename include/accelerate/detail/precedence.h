#pragma once
/// \file
/// The one precedence rule of option resolution (explicit > file > environment > default), with
/// the source of each value recorded, shared by the Accelerator's and the plugins' resolvers.
///
/// Example:
/// \code
///   std::map<std::string, std::string> sources;
///   int stage = accelerate::detail::pick<int>({{explicit_stage, "argument"},
///                                              {env_stage, "environment"}},
///                                             2, "zero_stage", sources);
/// \endcode

#include <initializer_list>
#include <map>
#include <optional>
#include <ostream>
#include <string>

namespace accelerate::detail {

/// A place a value may come from, and that place's name in `sources`.
template <class T>
struct Candidate {
  const std::optional<T>& value;
  const char* source;
};

/// The first candidate that holds a value, else `fallback`; `sources[field]` says which.
template <class T>
T pick(std::initializer_list<Candidate<T>> candidates, T fallback, const std::string& field,
       std::map<std::string, std::string>& sources) {
  for (const auto& candidate : candidates) {
    if (candidate.value) {
      sources[field] = candidate.source;
      return *candidate.value;
    }
  }
  sources[field] = "default";
  return fallback;
}

/// One line of a resolved config's describe(): "name = value (source)".
template <class V>
void describe_line(std::ostream& out, const std::string& name, const V& value,
                   const std::map<std::string, std::string>& sources) {
  out << name << " = " << value;
  auto it = sources.find(name);
  if (it != sources.end()) out << " (" << it->second << ")";
  out << "\n";
}

}  // namespace accelerate::detail
