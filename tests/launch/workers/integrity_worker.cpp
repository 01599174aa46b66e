// Started as 2 processes by `accelerate launch -n 2`: makes the processes' collectives disagree
// in one way, prints what each process got, then shows the group still works.
//   integrity_worker shapes     rank 0 reduces shape [2], rank 1 shape [3]
//   integrity_worker skip       rank 1 skips a reduce that rank 0 makes before a gather
//   integrity_worker gather     gather of [2] against [3]
//   integrity_worker broadcast  broadcast of [2] against [3]
//   integrity_worker roots      broadcast from process 0 against from process 1
//   integrity_worker absent     rank 1 never arrives at rank 0's reduce (timeout 2 s); rank 0's
//                               error is not caught, so the launcher reports it
// Each process prints "ERROR rank R: <message>" for the error it got ("NO ERROR rank R" and exit
// 1 when there was none), then makes three more collectives and prints "AFTER rank R: OK" when
// they gave exact results.

#include <accelerate/operations.h>
#include <accelerate/state.h>

#include <c10/util/Exception.h>

#include <chrono>
#include <iostream>
#include <string>
#include <thread>

namespace {

std::string message_of(const std::exception& e) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) {
    return c10_error->what_without_backtrace();
  }
  return e.what();
}

void disagree(const accelerate::PartialState& s, const std::string& mode) {
  const int rank = s.process_index();
  if (mode == "shapes") {
    accelerate::reduce(s, at::ones({rank == 0 ? 2 : 3}), "sum");
  } else if (mode == "skip") {
    if (rank == 0) accelerate::reduce(s, at::ones({2}), "sum");
    accelerate::gather(s, at::ones({2}));
  } else if (mode == "gather") {
    accelerate::gather(s, at::ones({rank == 0 ? 2 : 3}));
  } else if (mode == "broadcast") {
    accelerate::broadcast(s, at::ones({rank == 0 ? 2 : 3}), 0);
  } else if (mode == "roots") {
    accelerate::broadcast(s, at::ones({2}), rank);
  } else {
    throw std::runtime_error("unknown mode " + mode);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  accelerate::StateOptions options;
  options.init_kwargs.timeout = std::chrono::seconds(mode == "absent" ? 2 : 60);
  const accelerate::PartialState& state = accelerate::PartialState::shared(options);
  const int rank = state.process_index();
  if (mode == "absent") {
    if (rank == 1) {
      std::this_thread::sleep_for(std::chrono::seconds(20));
      return 0;
    }
    accelerate::reduce(state, at::ones({2}), "sum");  // throws, uncaught
    return 0;
  }
  try {
    disagree(state, mode);
    std::cout << "NO ERROR rank " << rank << std::endl;
    return 1;
  } catch (const std::exception& e) {
    std::cout << "ERROR rank " << rank << ": " << message_of(e) << std::endl;
  }
  const auto sum = accelerate::reduce(state, at::full({3}, rank + 1, at::kLong), "sum");
  const auto all = accelerate::gather(state, at::full({1}, rank, at::kLong));
  state.wait_for_everyone();
  const bool ok =
      at::equal(sum, at::full({3}, 3, at::kLong)) && at::equal(all, at::arange(2, at::kLong));
  std::cout << "AFTER rank " << rank << ": " << (ok ? "OK" : "WRONG") << std::endl;
  return ok ? 0 : 1;
}
