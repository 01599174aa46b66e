// The failure record a worker leaves for `accelerate launch` (src/detail/error_record.h). What it
// records is process-wide (the first record wins, the terminate handler stays installed), so
// every case runs in a child process of its own, forked here, and the test reads what it left.

#include "../../src/detail/error_record.h"

#include <files.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>

#if ACCELERATE_HAVE_GLOO_HEADERS
#include <gloo/common/error.h>
#endif

namespace {

using accelerate::detail::install_error_record;
using accelerate::detail::is_peer_failure;
using accelerate::detail::kErrorFileVariable;
using accelerate::detail::record_failure;
using accelerate::detail::transport_failure;
using accelerate::testing::TempDir;
using Json = nlohmann::json;

int64_t realtime_ns() {
  timespec now{};
  ::clock_gettime(CLOCK_REALTIME, &now);
  return static_cast<int64_t>(now.tv_sec) * 1'000'000'000 + now.tv_nsec;
}

// How a child ended, and what it wrote to the pipe it was given.
struct ChildResult {
  pid_t pid = -1;
  int status = 0;
  std::string said;
  int64_t started_ns = 0;
  int64_t ended_ns = 0;
};

// Runs `body` in a forked child whose environment has ACCELERATE_ERROR_FILE=`error_file` (unset
// when empty) and RANK=`rank` (unset when empty). The child exits with what `body` returns;
// `body` may write to the given fd, which the parent collects.
ChildResult run_child(const std::string& error_file, const std::string& rank,
                      const std::function<int(int)>& body) {
  int fds[2];
  if (::pipe(fds) != 0) throw std::runtime_error("pipe failed");
  ChildResult result;
  result.started_ns = realtime_ns();
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    ::close(fds[0]);
    if (error_file.empty()) {
      ::unsetenv(kErrorFileVariable);
    } else {
      ::setenv(kErrorFileVariable, error_file.c_str(), 1);
    }
    if (rank.empty()) {
      ::unsetenv("RANK");
    } else {
      ::setenv("RANK", rank.c_str(), 1);
    }
    // The default dispositions, whatever the runner set: the tests look for these signals.
    ::signal(SIGABRT, SIG_DFL);
    ::signal(SIGTERM, SIG_DFL);
    // An exception `body` lets out reaches std::terminate here, not gtest's handlers in this
    // copy of the test program: as if it had left main().
    [&]() noexcept { ::_exit(body(fds[1])); }();
  }
  ::close(fds[1]);
  char buf[4096];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof(buf))) != 0;) {
    if (n < 0) {
      if (errno == EINTR) continue;
      break;
    }
    result.said.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fds[0]);
  while (::waitpid(pid, &result.status, 0) < 0 && errno == EINTR) {
  }
  result.ended_ns = realtime_ns();
  result.pid = pid;
  return result;
}

void say(int fd, const std::string& text) {
  [[maybe_unused]] const auto ignored = ::write(fd, text.data(), text.size());
}

Json read_record(const std::string& path) {
  const std::string text = accelerate::testing::file_bytes(path);
  return Json::parse(text, nullptr, /*allow_exceptions=*/false);
}

bool exited_with(int status, int code) {
  return WIFEXITED(status) && WEXITSTATUS(status) == code;
}

TEST(ErrorRecord, RecordHasExactlyTheFiveFields) {
  TempDir dir;
  const std::string path = dir.file("rank_3.json");
  const auto child = run_child(path, "3", [](int) {
    record_failure("rank 3: out of data", false);
    return 0;
  });
  ASSERT_TRUE(exited_with(child.status, 0));
  const Json record = read_record(path);
  ASSERT_TRUE(record.is_object()) << accelerate::testing::file_bytes(path);
  EXPECT_EQ(record.size(), 5u) << record.dump();
  ASSERT_TRUE(record["rank"].is_number_integer()) << record.dump();
  EXPECT_EQ(record["rank"].get<int>(), 3);
  ASSERT_TRUE(record["pid"].is_number_integer()) << record.dump();
  EXPECT_EQ(record["pid"].get<int64_t>(), child.pid);
  ASSERT_TRUE(record["message"].is_string()) << record.dump();
  EXPECT_EQ(record["message"].get<std::string>(), "rank 3: out of data");
  ASSERT_TRUE(record["caused_by_peer"].is_boolean()) << record.dump();
  EXPECT_FALSE(record["caused_by_peer"].get<bool>());
  ASSERT_TRUE(record["time_ns"].is_number_integer()) << record.dump();
  const auto time_ns = record["time_ns"].get<int64_t>();
  EXPECT_GE(time_ns, child.started_ns);
  EXPECT_LE(time_ns, child.ended_ns);
  // Renamed into place: no temporary file is left beside it.
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"rank_3.json"});
}

TEST(ErrorRecord, RankIsMinusOneWithoutRankAndPeerCauseIsKept) {
  TempDir dir;
  const std::string path = dir.file("record.json");
  const auto child = run_child(path, "", [](int) {
    record_failure("Connection closed by peer", true);
    return 0;
  });
  ASSERT_TRUE(exited_with(child.status, 0));
  const Json record = read_record(path);
  ASSERT_TRUE(record.is_object());
  EXPECT_EQ(record["rank"], -1);
  EXPECT_EQ(record["caused_by_peer"], true);
  EXPECT_EQ(record["message"], "Connection closed by peer");
}

TEST(ErrorRecord, FirstRecordOfTheProcessWins) {
  TempDir dir;
  const std::string path = dir.file("rank_0.json");
  const auto child = run_child(path, "0", [](int) {
    record_failure("first", true);
    record_failure("second", false);
    std::thread([] { record_failure("third, from another thread", false); }).join();
    return 0;
  });
  ASSERT_TRUE(exited_with(child.status, 0));
  const Json record = read_record(path);
  ASSERT_TRUE(record.is_object());
  EXPECT_EQ(record["message"], "first");
  EXPECT_EQ(record["caused_by_peer"], true);
}

TEST(ErrorRecord, NothingIsWrittenWithoutTheVariable) {
  TempDir dir;
  const std::string path = dir.file("later.json");
  // Without the variable, the call neither writes nor uses up the process's one record.
  const auto child = run_child("", "1", [&](int) {
    record_failure("nowhere to go", false);
    ::setenv(kErrorFileVariable, path.c_str(), 1);
    record_failure("written", false);
    return 0;
  });
  ASSERT_TRUE(exited_with(child.status, 0));
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"later.json"});
  EXPECT_EQ(read_record(path)["message"], "written");
}

TEST(ErrorRecord, MessageThatIsNotUtf8IsStillRecorded) {
  TempDir dir;
  const std::string path = dir.file("rank_0.json");
  const auto child = run_child(path, "0", [](int) {
    record_failure("bad byte \xff here", false);
    return 0;
  });
  ASSERT_TRUE(exited_with(child.status, 0));
  EXPECT_EQ(read_record(path)["message"], "bad byte \xef\xbf\xbd here");
}

TEST(ErrorRecord, PeerFailuresAreTheMessagesOfAPeerThatWentAway) {
  for (const char* message : {
           "Connection closed by peer",
           "[/usr/src/gloo/gloo/transport/tcp/pair.cc:598] Connection closed by peer "
           "[127.0.0.1]:48732",
           "[gloo/transport/tcp/pair.cc:211] Connection reset by peer",
           "[gloo/transport/tcp/pair.cc:442] write: Broken pipe",
           "[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms for recv "
           "operation to complete",
           "accelerate: wait_for_everyone: processes 1 did not arrive within 30 s",
       }) {
    EXPECT_TRUE(is_peer_failure(message)) << message;
  }
  for (const char* message : {
           "",
           "out of memory",
           "accelerate: gather: the processes' calls differ: rank 0 float[2], rank 1 float[3]",
           "peer",
           "Connection closed",
       }) {
    EXPECT_FALSE(is_peer_failure(message)) << message;
  }
}

TEST(ErrorRecord, UncaughtExceptionIsRecordedBeforeTheAbort) {
  TempDir dir;
  const std::string path = dir.file("rank_1.json");
  const auto child = run_child(path, "1", [](int) -> int {
    install_error_record();
    install_error_record();  // a second call changes nothing
    throw std::runtime_error("rank 1: loss is NaN");
  });
  ASSERT_TRUE(WIFSIGNALED(child.status) && WTERMSIG(child.status) == SIGABRT) << child.status;
  const Json record = read_record(path);
  ASSERT_TRUE(record.is_object());
  EXPECT_EQ(record["message"], "rank 1: loss is NaN");
  EXPECT_EQ(record["caused_by_peer"], false);
  EXPECT_EQ(record["rank"], 1);
}

TEST(ErrorRecord, UncaughtPeerFailureIsMarkedAsCausedByThePeer) {
  TempDir dir;
  const std::string path = dir.file("rank_0.json");
  const auto child = run_child(path, "0", [](int) -> int {
    install_error_record();
    throw std::runtime_error("[pair.cc:598] Connection closed by peer [127.0.0.1]:1234");
  });
  ASSERT_TRUE(WIFSIGNALED(child.status) && WTERMSIG(child.status) == SIGABRT) << child.status;
  const Json record = read_record(path);
  ASSERT_TRUE(record.is_object());
  EXPECT_EQ(record["caused_by_peer"], true);
}

TEST(ErrorRecord, RecordWrittenBeforeTheAbortIsKept) {
  TempDir dir;
  const std::string path = dir.file("rank_0.json");
  const auto child = run_child(path, "0", [](int) -> int {
    install_error_record();
    record_failure("what the program said first", false);
    throw std::runtime_error("what escaped later");
  });
  ASSERT_TRUE(WIFSIGNALED(child.status) && WTERMSIG(child.status) == SIGABRT) << child.status;
  EXPECT_EQ(read_record(path)["message"], "what the program said first");
}

TEST(ErrorRecord, OtherExceptionsFromOtherThreadsStillTerminate) {
  TempDir dir;
  const std::string path = dir.file("rank_0.json");
  const auto child = run_child(path, "0", [](int) {
    install_error_record();
    std::thread([] { throw std::runtime_error("worker thread failed"); }).detach();
    std::this_thread::sleep_for(std::chrono::seconds(10));
    return 0;
  });
  ASSERT_TRUE(WIFSIGNALED(child.status) && WTERMSIG(child.status) == SIGABRT) << child.status;
  EXPECT_EQ(read_record(path)["message"], "worker thread failed");
}

// Stands for the teardown that follows exit(): a static object made before the handler was
// installed, whose destruction lets the peers fail and the launcher send its SIGTERM.
void sigterm_during_teardown() {
  ::kill(::getpid(), SIGTERM);
}

TEST(ErrorRecord, ExitWithAFailureIsNotCutShortBySigterm) {
  // Exit handlers run in reverse order of registration: the case needs a process in which the
  // library's hook is registered after the teardown that stands for the peers' failure. When an
  // earlier test of this binary already made a PartialState (which installs it), the forked child
  // inherits the earlier registration; ctest runs each test in a process of its own.
  if (std::get_terminate() != &__gnu_cxx::__verbose_terminate_handler) {
    GTEST_SKIP() << "install_error_record() already ran in this process; run this test alone "
                    "(as ctest does)";
  }
  TempDir dir;
  const auto failing = run_child(dir.file("rank_1.json"), "1", [](int) {
    std::atexit(sigterm_during_teardown);
    install_error_record();
    std::exit(3);
    return 0;
  });
  EXPECT_TRUE(exited_with(failing.status, 3)) << "status " << failing.status;
  // That is all it does: no record (the exit code says it), and a clean exit stays stoppable.
  EXPECT_TRUE(dir.entries().empty());
  const auto clean = run_child(dir.file("rank_0.json"), "0", [](int) {
    std::atexit(sigterm_during_teardown);
    install_error_record();
    std::exit(0);
    return 0;
  });
  EXPECT_TRUE(WIFSIGNALED(clean.status) && WTERMSIG(clean.status) == SIGTERM)
      << "status " << clean.status;
}

TEST(ErrorRecord, GlooThreadFailureParksTheThreadAndIsReported) {
#if !ACCELERATE_HAVE_GLOO_HEADERS
  GTEST_SKIP() << "Gloo's headers are not available: gloo::Exception cannot be told apart";
#else
  TempDir dir;
  const std::string path = dir.file("rank_0.json");
  const auto child = run_child(path, "0", [](int out) {
    install_error_record();
    if (transport_failure()) return 3;
    // What Gloo's event loop does when a peer goes: the exception leaves the thread function.
    std::thread([] {
      throw gloo::IoException("[gloo/transport/tcp/pair.cc:598] Connection closed by peer");
    }).detach();
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (!transport_failure()) {
      if (std::chrono::steady_clock::now() > deadline) return 2;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    say(out, *transport_failure());
    // Still alive a while later: the parked thread stays parked.
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    return 0;
  });
  ASSERT_TRUE(exited_with(child.status, 0)) << "status " << child.status;
  EXPECT_EQ(child.said,
            "accelerate: Gloo's transport thread failed: "
            "[gloo/transport/tcp/pair.cc:598] Connection closed by peer");
  // The process did not fail (its collectives will, and they record that): no record yet.
  EXPECT_TRUE(dir.entries().empty());
#endif
}

}  // namespace
