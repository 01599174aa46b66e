// The smallest multi-process program: every process says who it is, then all of them add up
// their numbers with one collective.
//
//   build/bin/accelerate launch --num_processes 2 build/examples/hello_distributed
//
// Prints, for 2 processes (line order between processes may vary):
//   process 0 of 2 (local 0) on cpu: my value is 1
//   process 1 of 2 (local 0) on cpu: my value is 2
//   sum over 2 processes = 3 (expected 3)

#include <accelerate/operations.h>
#include <accelerate/state.h>

#include <iostream>

int main() {
  auto& state = accelerate::PartialState::shared();
  const int value = state.process_index() + 1;
  std::cout << "process " << state.process_index() << " of " << state.num_processes() << " (local "
            << state.local_process_index() << ") on " << state.device() << ": my value is " << value
            << std::endl;

  auto sum = accelerate::reduce(state, at::full({1}, value, at::kLong), "sum").item<int64_t>();
  const int64_t n = state.num_processes();
  state.print("sum over ", n, " processes = ", sum, " (expected ", n * (n + 1) / 2, ")");
  return sum == n * (n + 1) / 2 ? 0 : 1;
}
