#pragma once
/// \file
/// Seeding and synchronising random number generators (Accelerate's `utils.random`).
///
/// Example:
/// \code
///   accelerate::set_seed(42);                          // same seed everywhere
///   accelerate::set_seed(42, {.device_specific = true}); // 42 + process index
///   accelerate::synchronize_rng_states(state, {accelerate::RNGType::TORCH});
/// \endcode

#include <accelerate/state.h>

#include <ATen/core/Generator.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace accelerate {

/// Accelerate's `RNGType`, for the generators a C++ program has.
enum class RNGType { TORCH, CUDA, GENERATOR };

/// "torch", "cuda", "generator".
std::string to_string(RNGType type);
/// Parses "torch", "cuda" or "generator"; anything else is an error naming the value.
RNGType rng_type_from_string(const std::string& name);

/// Options for set_seed.
struct SetSeedOptions {
  /// Adds the process index to the seed, so every process draws different numbers.
  bool device_specific = false;
  /// Also asks LibTorch for deterministic algorithms.
  bool deterministic = false;
};

/// Seeds LibTorch's CPU generator and every CUDA generator with `seed` (plus the process index
/// of `state` when device_specific).
void set_seed(uint64_t seed, const SetSeedOptions& options, const PartialState& state);
/// set_seed on the shared state.
void set_seed(uint64_t seed, const SetSeedOptions& options = {});

/// Copies process 0's state of one generator to every process. For RNGType::GENERATOR,
/// `generator` names the generator (for example a data loader's); for the others it must be
/// empty.
void synchronize_rng_state(const PartialState& state, RNGType type,
                           std::optional<at::Generator> generator = std::nullopt);

/// synchronize_rng_state for each of `types`.
void synchronize_rng_states(const PartialState& state, const std::vector<RNGType>& types,
                            std::optional<at::Generator> generator = std::nullopt);

}  // namespace accelerate
