// Started as several processes (by our launcher, or with MPI/SLURM variables set by a test):
// joins the process group, prints where it stands and checks one all-reduce.
//   state_worker            -> "state_worker rank R/W local L/LW source S sum X"; exit 0 iff X ok
//   state_worker --fail-in-main-first -> rank 0 throws inside main_process_first; the others must
//                              get an error and exit 4 instead of running the block.
//   state_worker --runtime   -> also "runtime threads T cpu_cache C direct_gloo D": what the state
//                              set up for speed, whoever started the process.

#include <accelerate/detail/cpu_allocator.h>
#include <accelerate/operations.h>
#include <accelerate/state.h>

#include <cstring>
#include <iostream>
#include <sstream>

int main(int argc, char** argv) {
  auto& state = accelerate::PartialState::shared();
  if (argc > 1 && std::strcmp(argv[1], "--fail-in-main-first") == 0) {
    try {
      auto first = state.main_process_first();
      if (state.is_main_process()) throw std::runtime_error("main failed on purpose");
      std::cout << "rank " << state.process_index() << " ran the block" << std::endl;
      return 0;
    } catch (const std::exception& e) {
      std::cout << "rank " << state.process_index() << " caught: " << e.what() << std::endl;
      return state.is_main_process() ? 3 : 4;
    }
  }
  const int64_t n = state.num_processes();
  auto sum = accelerate::reduce(state, at::full({1}, state.process_index() + 1, at::kLong), "sum")
                 .item<int64_t>();
  std::ostringstream out;
  out << "state_worker rank " << state.process_index() << "/" << n << " local "
      << state.local_process_index() << "/" << state.num_processes_per_node() << " source "
      << state.topology().source << " sum " << sum << "\n";
  if (argc > 1 && std::strcmp(argv[1], "--runtime") == 0) {
    out << "runtime threads " << at::get_num_threads() << " cpu_cache "
        << accelerate::detail::cpu_cache_stats().installed << " direct_gloo "
        << (state.direct() != nullptr) << "\n";
  }
  std::cout << out.str() << std::flush;
  state.wait_for_everyone();
  return sum == n * (n + 1) / 2 ? 0 : 1;
}
