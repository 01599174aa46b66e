#include "accelerate/random.h"

#include "accelerate/detail/collectives.h"

#include <ATen/Context.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <torch/cuda.h>
#include <torch/utils.h>

#include <mutex>

namespace accelerate {

std::string to_string(RNGType type) {
  switch (type) {
    case RNGType::TORCH:
      return "torch";
    case RNGType::CUDA:
      return "cuda";
    case RNGType::GENERATOR:
      return "generator";
  }
  TORCH_INTERNAL_ASSERT(false, "unknown RNGType");
}

RNGType rng_type_from_string(const std::string& name) {
  if (name == "torch") return RNGType::TORCH;
  if (name == "cuda") return RNGType::CUDA;
  if (name == "generator") return RNGType::GENERATOR;
  TORCH_CHECK(false, "accelerate: unknown rng type '", name,
              "' (use \"torch\", \"cuda\" or \"generator\")");
}

void set_seed(uint64_t seed, const SetSeedOptions& options, const PartialState& state) {
  if (options.device_specific) seed += static_cast<uint64_t>(state.process_index());
  // torch::manual_seed seeds the CPU generator and, when CUDA is present, every GPU's.
  torch::manual_seed(seed);
  if (options.deterministic) at::globalContext().setDeterministicAlgorithms(true, false);
}

void set_seed(uint64_t seed, const SetSeedOptions& options) {
  if (options.device_specific) {
    set_seed(seed, options, PartialState::shared());
  } else {
    torch::manual_seed(seed);
    if (options.deterministic) at::globalContext().setDeterministicAlgorithms(true, false);
  }
}

void synchronize_rng_state(const PartialState& state, RNGType type,
                           std::optional<at::Generator> generator) {
  at::Generator gen;
  switch (type) {
    case RNGType::TORCH:
      TORCH_CHECK(!generator, "synchronize_rng_state: a generator is only taken with GENERATOR");
      gen = at::detail::getDefaultCPUGenerator();
      break;
    case RNGType::CUDA:
      TORCH_CHECK(!generator, "synchronize_rng_state: a generator is only taken with GENERATOR");
      if (!torch::cuda::is_available()) return;
      gen = at::detail::getCUDAHooks().getDefaultCUDAGenerator(
          state.device().is_cuda() ? state.device().index() : 0);
      break;
    case RNGType::GENERATOR:
      TORCH_CHECK(generator.has_value() && generator->defined(),
                  "synchronize_rng_state: RNGType::GENERATOR needs the generator to synchronise");
      gen = *generator;
      break;
  }
  if (!state.use_distributed()) return;
  at::Tensor mine;
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    mine = gen.get_state();
  }
  auto synced = detail::broadcast(state, "synchronize_rng_states", mine, 0);
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(synced);
}

void synchronize_rng_states(const PartialState& state, const std::vector<RNGType>& types,
                            std::optional<at::Generator> generator) {
  for (RNGType type : types) {
    synchronize_rng_state(state, type, type == RNGType::GENERATOR ? generator : std::nullopt);
  }
}

}  // namespace accelerate
