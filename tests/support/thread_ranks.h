#pragma once
// Runs N ranks as threads of one process over a shared HashStore: fast multi-rank tests without
// a launcher, the way c10d's own tests do it.

#include <accelerate/state.h>

#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>

#include <atomic>
#include <exception>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace accelerate::testing {

struct RankOptions {
  StateOptions state;
  /// Processes per simulated machine; 0 means all on one machine.
  int per_node = 0;
};

/// Calls fn(state) on `world` threads, rank i with its own PartialState. Returns each rank's
/// exception (nullptr where it returned normally), indexed by rank.
inline std::vector<std::exception_ptr> run_ranks_collect(
    int world, const std::function<void(PartialState&)>& fn, const RankOptions& options = {}) {
  static std::atomic<int> next_job{0};
  auto base = c10::make_intrusive<c10d::HashStore>();
  auto store =
      c10::make_intrusive<c10d::PrefixStore>("job" + std::to_string(next_job.fetch_add(1)), base);
  std::vector<std::exception_ptr> errors(static_cast<size_t>(world));
  std::vector<std::thread> threads;
  for (int rank = 0; rank < world; ++rank) {
    threads.emplace_back([&, rank] {
      try {
        const int per_node = options.per_node > 0 ? options.per_node : world;
        auto state =
            PartialState::from_store(store, rank, world, options.state, rank % per_node, per_node);
        fn(*state);
      } catch (...) {
        errors[static_cast<size_t>(rank)] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

/// As run_ranks_collect, but rethrows the first rank's exception, prefixed with its rank.
inline void run_ranks(int world, const std::function<void(PartialState&)>& fn,
                      const RankOptions& options = {}) {
  auto errors = run_ranks_collect(world, fn, options);
  for (size_t rank = 0; rank < errors.size(); ++rank) {
    if (!errors[rank]) continue;
    try {
      std::rethrow_exception(errors[rank]);
    } catch (const std::exception& e) {
      throw std::runtime_error("rank " + std::to_string(rank) + ": " + e.what());
    }
  }
}

/// The message of an exception_ptr ("" when null).
inline std::string message(const std::exception_ptr& error) {
  if (!error) return "";
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "unknown exception";
  }
}

}  // namespace accelerate::testing
