// Started as 2 processes by `accelerate launch`: find_executable_batch_size where the processes
// run out of memory at different sizes. The function throws LibTorch's CPU allocation error when
// the batch is larger than this process's limit (rank 0: 100, rank 1: 30), starting from 128.
// Each process prints one line per search:
//   "memory_worker: rank R halve used B tried 128,64,..."     halving rule
//   "memory_worker: rank R default used B tried 128,115,..."  Accelerate's int(b * 0.9)
//   "memory_worker: rank R zero error <message>"              rank 1 never fits (limit 0)
// and exits 0: the test reads the outcomes from these lines.

#include <accelerate/memory.h>
#include <accelerate/state.h>

#include <chrono>
#include <cstdint>
#include <exception>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

std::string message_of(const std::exception& e) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) {
    return c10_error->what_without_backtrace();
  }
  return e.what();
}

void say(int rank, const std::string& text) {
  // One write per line, so that the two processes' lines never mix.
  std::cout << ("memory_worker: rank " + std::to_string(rank) + " " + text + "\n") << std::flush;
}

void search(const accelerate::PartialState& state, const std::string& name, int64_t limit,
            const accelerate::FindBatchSizeOptions& options) {
  std::vector<int64_t> tried;
  try {
    const int64_t used = accelerate::find_executable_batch_size(
        state,
        [&](int64_t batch_size) {
          tried.push_back(batch_size);
          if (batch_size > limit) {
            TORCH_CHECK(false, "DefaultCPUAllocator: can't allocate memory: you tried to allocate ",
                        batch_size * 4096, " bytes. Error code 12 (Cannot allocate memory)");
          }
          return batch_size;
        },
        options);
    std::ostringstream line;
    line << name << " used " << used << " tried ";
    for (size_t i = 0; i < tried.size(); ++i) line << (i ? "," : "") << tried[i];
    say(state.process_index(), line.str());
  } catch (const std::exception& e) {
    say(state.process_index(), name + " error " + message_of(e));
  }
}

}  // namespace

int main() {
  auto& state =
      accelerate::PartialState::shared({.init_kwargs = {.timeout = std::chrono::seconds(60)}});
  const int rank = state.process_index();
  const int64_t limit = rank == 0 ? 100 : 30;
  search(state, "halve", limit,
         {.starting_batch_size = 128, .reduce_batch_size_fn = [](int64_t b) { return b / 2; }});
  search(state, "default", limit, {.starting_batch_size = 128});
  search(state, "zero", rank == 0 ? 100 : 0, {.starting_batch_size = 128});
  state.wait_for_everyone();
  return 0;
}
