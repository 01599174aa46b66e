// Started through `accelerate launch`: asks for the shared state twice, from PartialState::shared()
// and from an Accelerator, in the order the argument names, and reports what it got.
//   state_order_worker shared-first       -> PartialState::shared(), then Accelerator()
//   state_order_worker accelerator-first  -> Accelerator(), then PartialState::shared()
//   state_order_worker debug-conflict     -> PartialState::shared(), then
//                                            PartialState::shared({.debug = !state.debug()})
//   state_order_worker timeout-conflict   -> PartialState::shared(), then an Accelerator with
//                                            init_kwargs.timeout = 60 s
// Prints "state_order rank R/W same S device D debug G" when both calls succeed (S is 1 when
// both got one object), or "state_order rank R refused: <error>" when the second call throws;
// exit 0 either way, 2 on a bad argument.

#include <accelerate/accelerator.h>
#include <accelerate/state.h>

#include <iostream>
#include <sstream>
#include <string>

namespace {

void report(const accelerate::PartialState& first, const accelerate::PartialState& second) {
  std::ostringstream out;
  out << "state_order rank " << first.process_index() << "/" << first.num_processes() << " same "
      << (&first == &second) << " device " << second.device().str() << " debug " << second.debug()
      << "\n";
  std::cout << out.str() << std::flush;
}

}  // namespace

int main(int argc, char** argv) {
  using accelerate::Accelerator;
  using accelerate::PartialState;
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "accelerator-first") {
    Accelerator accelerator;
    auto& state = PartialState::shared();
    report(accelerator.state(), state);
    state.wait_for_everyone();
    return 0;
  }
  if (mode != "shared-first" && mode != "debug-conflict" && mode != "timeout-conflict") {
    std::cerr << "state_order_worker: unknown mode '" << mode << "'\n";
    return 2;
  }
  auto& state = PartialState::shared();
  try {
    if (mode == "shared-first") {
      Accelerator accelerator;
      report(state, accelerator.state());
    } else if (mode == "debug-conflict") {
      report(state, PartialState::shared({.debug = !state.debug()}));
    } else {
      Accelerator accelerator(
          {.init_kwargs = accelerate::InitProcessGroupKwargs{.timeout = std::chrono::seconds(60)}});
      report(state, accelerator.state());
    }
  } catch (const c10::Error& e) {
    std::ostringstream out;
    out << "state_order rank " << state.process_index()
        << " refused: " << e.what_without_backtrace() << "\n";
    std::cout << out.str() << std::flush;
  }
  state.wait_for_everyone();
  return 0;
}
