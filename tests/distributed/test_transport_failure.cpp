// An exception that escapes one of Gloo's own threads (its transport event loop) must reach the
// collective that waits on Gloo as an error, instead of std::terminate killing the process or
// the wait lasting until the timeout. What install_error_record() catches is process-wide, so
// the case runs in a forked child.

#include <accelerate/detail/collectives.h>
#include <accelerate/detail/direct_gloo.h>
#include <accelerate/state.h>

#include "../../src/detail/error_record.h"
#include "thread_ranks.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <future>
#include <string>
#include <thread>

#if ACCELERATE_HAVE_GLOO_HEADERS
#include <gloo/common/error.h>
#endif

namespace {

using accelerate::PartialState;
using accelerate::detail::CallFingerprint;

TEST(TransportFailure, ReachesTheWaitingCollectiveAsAnError) {
#if !ACCELERATE_HAVE_GLOO_HEADERS
  GTEST_SKIP() << "Gloo's headers are not available: gloo::Exception cannot be told apart";
#else
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(fds[0]);
    std::string said;
    [&]() noexcept {
      try {
        std::promise<void> rank0_done;
        auto done = rank0_done.get_future().share();
        accelerate::StateOptions options;
        options.init_kwargs.timeout = std::chrono::seconds(30);
        auto errors = accelerate::testing::run_ranks_collect(
            2,
            [&](PartialState& state) {
              const at::Tensor t = at::ones({4});
              if (state.process_index() == 1) {
                // Agrees on the call, then never sends its part: only the transport failure
                // can end process 0's wait before the timeout.
                accelerate::detail::agree(
                    state, CallFingerprint::of("gather", CallFingerprint::kAllGather, t));
                done.wait_for(std::chrono::seconds(30));
                return;
              }
              std::thread([] {
                std::this_thread::sleep_for(std::chrono::milliseconds(300));
                throw gloo::IoException("[gloo/transport/tcp/pair.cc:598] simulated loop failure");
              }).detach();
              const auto start = std::chrono::steady_clock::now();
              try {
                accelerate::detail::all_gather(state, "gather", t);
              } catch (...) {
                const double waited =
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
                rank0_done.set_value();
                if (waited > 5) said += "waited " + std::to_string(waited) + " s\n";
                throw;
              }
              rank0_done.set_value();
            },
            {.state = options});
        said += accelerate::testing::message(errors[0]);
      } catch (const std::exception& e) {
        said += std::string("unexpected: ") + e.what();
      }
      [[maybe_unused]] const auto n = ::write(fds[1], said.data(), said.size());
      // The parked Gloo thread keeps its locks: leave without running destructors.
      ::_exit(0);
    }();
  }
  ::close(fds[1]);
  std::string said;
  char buf[4096];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof(buf))) > 0;)
    said.append(buf, static_cast<size_t>(n));
  ::close(fds[0]);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "status " << status << "\n" << said;
  // The error's first line (c10 appends a backtrace).
  EXPECT_EQ(said.substr(0, said.find('\n')),
            "accelerate: collective 'gather' failed on process 0 of 2 (timeout 30 s): accelerate: "
            "Gloo's transport thread failed: [gloo/transport/tcp/pair.cc:598] simulated loop "
            "failure");
#endif
}

}  // namespace
