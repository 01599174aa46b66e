// Started as N processes by `accelerate launch`: logs through get_logger in each of the ways a
// call can ask for, so that the test can count the lines and check their order.
//   "once from rank R"        logger.info            -> main process only
//   "debug from rank R"       logger.debug           -> only with ACCELERATE_LOG_LEVEL=debug
//   "in order from rank R"    {.in_order = true}     -> every process, in rank order
//   "everyone from rank R"    {.main_process_only = false}
// Exits 1 with the error on stderr if anything throws (an invalid ACCELERATE_LOG_LEVEL does).

#include <accelerate/logging.h>
#include <accelerate/state.h>

#include <chrono>
#include <exception>
#include <iostream>
#include <thread>

int main() {
  try {
    // A process that dies must not leave the others waiting for 30 minutes.
    auto& state =
        accelerate::PartialState::shared({.init_kwargs = {.timeout = std::chrono::seconds(60)}});
    const auto logger = accelerate::get_logger("logging_worker");
    const int rank = state.process_index();
    logger.info("once from rank ", rank);
    logger.debug("debug from rank ", rank);
    state.wait_for_everyone();
    // The last rank reaches the next call first and rank 0 last: without in_order's barriers
    // the lines would come out in reverse.
    std::this_thread::sleep_for(
        std::chrono::milliseconds(150 * (state.num_processes() - 1 - rank)));
    logger.info({.in_order = true}, "in order from rank ", rank);
    logger.warning({.main_process_only = false}, "everyone from rank ", rank);
    state.wait_for_everyone();
  } catch (const std::exception& e) {
    const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
    std::cerr << "logging_worker: FAILED "
              << (c10_error != nullptr ? c10_error->what_without_backtrace() : e.what())
              << std::endl;
    return 1;
  }
  return 0;
}
