#pragma once
// Private: a worker's own account of why it failed, for `accelerate launch` to name the root
// cause of a failed job (torchrun's TORCHELASTIC_ERROR_FILE, in our words).
//
// When one process of a job dies, the others fail soon after in whatever collective they were
// waiting in ("Connection closed by peer"), and on a busy machine the launcher may reap one of
// them first. Each process therefore writes, once, a small JSON file saying when it failed and
// whether the failure was only the consequence of a peer's; the launcher compares the files.
//
// Also keeps an exception that escapes one of Gloo's own threads from killing the process: see
// install_error_record(). Needs no LibTorch. The variable's and the fields' names are in
// <accelerate/env_names.h>, which the launcher shares.

#include <accelerate/env_names.h>

#include <optional>
#include <string>
#include <string_view>

// Whether Gloo's headers are there, so that its exceptions can be told apart. The build's
// ACCELERATE_HAVE_DIRECT_GLOO is defined on src/detail/direct_gloo.cpp alone (a library-wide
// definition would differ from the shared precompiled header's) and says more than this needs:
// gloo::Exception is defined entirely in its header, so catching it needs no Gloo symbols.
#if defined(ACCELERATE_HAVE_DIRECT_GLOO) && ACCELERATE_HAVE_DIRECT_GLOO
#define ACCELERATE_HAVE_GLOO_HEADERS 1
#elif __has_include(<gloo/common/error.h>)
#define ACCELERATE_HAVE_GLOO_HEADERS 1
#else
#define ACCELERATE_HAVE_GLOO_HEADERS 0
#endif

namespace accelerate::detail {

/// The variable naming the file a process writes its failure record to, and the record's
/// fields (one JSON object, e.g. {"rank": 1, "time_ns": 1733400000123456789, "pid": 4242,
/// "message": "...", "caused_by_peer": false}): shared with the launcher through env_names.h.
inline constexpr const char* kErrorFileVariable = env::kErrorFile;
namespace error_record_fields = env::error_record_fields;

/// Installs a std::terminate handler that records the failure before the process dies, then
/// hands over to the handler that was installed before (which prints and aborts, by default).
/// Idempotent and thread-safe: the first call installs, later calls do nothing.
///
/// In the handler, with an exception active: the record gets its what(), and caused_by_peer
/// from is_peer_failure(), unless this process already wrote a record.
///
/// One exception is not let through: a gloo::Exception escaping a thread other than the main
/// one. That is Gloo's transport thread (its event loop) failing on a connection a peer closed;
/// the waiting collectives learn about it from Gloo anyway, so it need not kill the process with
/// SIGABRT and a message that hides the real cause. Its message is kept for transport_failure()
/// and that thread is parked, sleeping, until the process exits. Parking is the only choice: a
/// terminate handler must not return (the runtime aborts if it does), nothing can be rethrown
/// or unwound from it, and ending the thread alone (pthread_exit) would unwind through the
/// noexcept frames that called std::terminate. The thread may also hold Gloo's locks, and with it
/// parked Gloo handles no more events: a collective waiting on Gloo would wait until its timeout,
/// which is why waiting collectives should check transport_failure() and fail at once.
///
/// It also makes a process that calls exit() with a non-zero status ignore SIGTERM from then on:
/// its teardown closes its connections, its peers fail at once, and the SIGTERM with which the
/// launcher then stops the group would otherwise end it mid-exit, the exit code that names the
/// real cause lost. Install it before the process group exists, so that this comes first.
///
/// Example:
///   accelerate::detail::install_error_record();  // early in main, or from PartialState
///   throw std::runtime_error("out of data");     // uncaught: the record says so, then abort
void install_error_record();

/// Writes this process's failure record to the file named by ACCELERATE_ERROR_FILE, when set
/// (else does nothing). The first record of a process wins: later calls, from any thread, do
/// nothing. The file is written whole or not at all (a temporary file renamed over it). Never
/// throws: a record that cannot be written is dropped.
///
/// Example:
///   } catch (const std::exception& e) {
///     accelerate::detail::record_failure(e.what(), accelerate::detail::is_peer_failure(e.what()));
///     return 1;
///   }
void record_failure(std::string_view message, bool caused_by_peer) noexcept;

/// True when `message` says a peer vanished or never came, so that this process failed only
/// because another one did: Gloo's "Connection closed by peer", "Connection reset by peer",
/// "Broken pipe" and "Timed out", and our own collectives' timeouts, which say who "did not
/// arrive".
///
/// Example:
///   is_peer_failure("[enforce fail at pair.cc:589] Connection closed by peer");  // true
///   is_peer_failure("tensor sizes differ");                                      // false
bool is_peer_failure(std::string_view message);

/// The failure of Gloo's transport thread that install_error_record()'s handler caught, as
/// "accelerate: Gloo's transport thread failed: <what()>", or nothing. Collectives that wait
/// can turn it into an error instead of waiting for a peer that will never answer.
///
/// Example:
///   if (auto failure = accelerate::detail::transport_failure()) throw
///   std::runtime_error(*failure);
std::optional<std::string> transport_failure();

}  // namespace accelerate::detail
