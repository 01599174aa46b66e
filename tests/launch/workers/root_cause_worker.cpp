// Started as 2 processes by `accelerate launch -n 2`: one job failing the way real jobs fail, for
// the launcher to name the root cause (tests/launch/test_root_cause.cpp).
//
//   root_cause_worker          rank 1 exits with code 3 after ~0.3 s, before its collective;
//                              rank 0 waits for it in wait_for_everyone() and fails there when
//                              the connection closes (its failure record says caused_by_peer).
//                              Rank 0 ignores SIGTERM, so that it fails of its own accord
//                              rather than of the launcher's stopping it: the case where the
//                              launcher used to blame it.
//   root_cause_worker --both   two failures on their own account, recorded in one order and seen
//                              by the launcher in the other: rank 1 records "rank 1: input file is
//                              corrupt" first and waits, exiting with code 3 when stopped; rank 0
//                              records "rank 0: checkpoint is missing" once rank 1's record
//                              exists, and exits with code 4 at once.

#include <accelerate/state.h>

#include "../../../src/detail/error_record.h"

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <string>
#include <thread>

namespace {

void on_sigterm(int) {
  ::_exit(3);
}

int both_fail() {
  const char* rank_text = std::getenv("RANK");
  const char* error_file = std::getenv(accelerate::detail::kErrorFileVariable);
  if (rank_text == nullptr || error_file == nullptr) {
    std::cerr << "root_cause_worker: RANK and ACCELERATE_ERROR_FILE must be set\n";
    return 2;
  }
  const int rank = std::atoi(rank_text);
  if (rank == 1) {
    ::signal(SIGTERM, on_sigterm);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    accelerate::detail::record_failure("rank 1: input file is corrupt", false);
    std::this_thread::sleep_for(std::chrono::seconds(30));
    return 3;
  }
  const auto peer_record = std::filesystem::path(error_file).parent_path() / "rank_1.json";
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!std::filesystem::exists(peer_record)) {
    if (std::chrono::steady_clock::now() > deadline) return 2;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  // Clearly later than rank 1's record, whatever the clock's resolution.
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  accelerate::detail::record_failure("rank 0: checkpoint is missing", false);
  std::exit(4);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--both") return both_fail();

  auto& state = accelerate::PartialState::shared();
  if (state.process_index() == 1) {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    std::exit(3);
  }
  ::signal(SIGTERM, SIG_IGN);
  state.wait_for_everyone();  // throws once rank 1 is gone: uncaught, it ends in std::terminate
  std::cerr << "root_cause_worker: rank 0 passed a barrier its peer never reached\n";
  return 1;
}
