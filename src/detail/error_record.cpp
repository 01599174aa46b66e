#include "error_record.h"

#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <array>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <mutex>

#if ACCELERATE_HAVE_GLOO_HEADERS
#include <gloo/common/error.h>
#endif

namespace accelerate::detail {
namespace {

// What a peer that vanished (or never came) looks like from this side. Gloo's own words, the
// system's for the same (strerror of ECONNRESET and EPIPE), and our collectives' timeouts.
constexpr std::array<std::string_view, 5> kPeerFailureMarkers = {
    "Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out",
    "did not arrive"};

// Set by the first record_failure that gets as far as writing.
std::atomic<bool> recorded{false};
// The terminate handler that was there before ours.
std::atomic<std::terminate_handler> previous_handler{nullptr};

// Never destroyed: a terminate handler may run while static objects are being torn down.
std::mutex& transport_mutex() {
  static auto* mutex = new std::mutex;
  return *mutex;
}
std::optional<std::string>& transport_slot() {
  static auto* slot = new std::optional<std::string>;
  return *slot;
}

int rank_from_environment() {
  const char* text = std::getenv("RANK");
  if (text == nullptr || *text == '\0') return -1;
  char* end = nullptr;
  errno = 0;
  const long value = std::strtol(text, &end, 10);
  if (errno != 0 || *end != '\0' || value < 0 || value > INT32_MAX) return -1;
  return static_cast<int>(value);
}

int64_t realtime_ns() {
  timespec now{};
  ::clock_gettime(CLOCK_REALTIME, &now);
  return static_cast<int64_t>(now.tv_sec) * 1'000'000'000 + now.tv_nsec;
}

bool write_all(int fd, const std::string& text) {
  std::size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    done += static_cast<std::size_t>(n);
  }
  return true;
}

// Whole or not at all: the launcher may read the file while this process is still writing it.
// No fsync: the reader is on this machine and the record only has to outlive the process, not
// the machine. (Accelerator::write_atomically is the durable writer; it throws, which a
// terminate handler must not.)
void write_file_atomically(const std::string& path, const std::string& text) {
  const std::string temp = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return;
  const bool written = write_all(fd, text);
  const bool closed = ::close(fd) == 0;
  if (!written || !closed || ::rename(temp.c_str(), path.c_str()) != 0) ::unlink(temp.c_str());
}

bool is_main_thread() {
  return ::gettid() == ::getpid();
}

// The rest of this thread's life: see install_error_record() in the header. pause() returns after
// each signal this thread handles; it goes back to sleep.
[[noreturn]] void park_this_thread() {
  for (;;) ::pause();
}

[[noreturn]] void on_terminate() {
  if (const std::exception_ptr active = std::current_exception()) {
    std::string message = "unknown exception";
    [[maybe_unused]] bool from_gloo = false;
    try {
      std::rethrow_exception(active);
#if ACCELERATE_HAVE_GLOO_HEADERS
    } catch (const gloo::Exception& e) {
      message = e.what();
      from_gloo = true;
#endif
    } catch (const std::exception& e) {
      message = e.what();
    } catch (...) {
    }
#if ACCELERATE_HAVE_GLOO_HEADERS
    if (from_gloo && !is_main_thread()) {
      {
        std::lock_guard<std::mutex> lock(transport_mutex());
        // The first failure is the cause; later ones (other pairs closing) follow from it.
        if (!transport_slot()) {
          transport_slot() = "accelerate: Gloo's transport thread failed: " + message;
        }
      }
      park_this_thread();
    }
#endif
    record_failure(message, is_peer_failure(message));
  }
  if (const std::terminate_handler previous = previous_handler.load()) previous();
  std::abort();
}

// Runs when the process calls exit() (or returns from main), before the static objects made
// earlier (the process group among them) are destroyed. A process exiting with a failure is
// already on its way out, but its teardown closes its connections first: the peers fail at once,
// the launcher stops the group with SIGTERM, and that SIGTERM would end this process mid-exit,
// its own exit code, the real cause, lost. So it finishes exiting; SIGKILL still comes after the
// launcher's grace period should the teardown hang.
void on_process_exit(int status, void*) {
  if (status != 0) ::signal(SIGTERM, SIG_IGN);
}

}  // namespace

void install_error_record() {
  static const bool installed = [] {
    previous_handler.store(std::set_terminate(&on_terminate));
    ::on_exit(&on_process_exit, nullptr);
    return true;
  }();
  static_cast<void>(installed);
}

void record_failure(std::string_view message, bool caused_by_peer) noexcept {
  const char* path = std::getenv(kErrorFileVariable);
  if (path == nullptr || *path == '\0') return;
  if (recorded.exchange(true)) return;
  try {
    namespace field = error_record_fields;
    const nlohmann::json record = {{field::kRank, rank_from_environment()},
                                   {field::kTimeNs, realtime_ns()},
                                   {field::kPid, static_cast<int64_t>(::getpid())},
                                   {field::kMessage, std::string(message)},
                                   {field::kCausedByPeer, caused_by_peer}};
    // A message that is not UTF-8 (bytes from a system error) is kept, with U+FFFD for what is not.
    write_file_atomically(path,
                          record.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
  } catch (...) {
    // Out of memory while failing: the launcher falls back on when it saw the exit.
  }
}

bool is_peer_failure(std::string_view message) {
  for (const auto marker : kPeerFailureMarkers) {
    if (message.find(marker) != std::string_view::npos) return true;
  }
  return false;
}

std::optional<std::string> transport_failure() {
  std::lock_guard<std::mutex> lock(transport_mutex());
  return transport_slot();
}

}  // namespace accelerate::detail
