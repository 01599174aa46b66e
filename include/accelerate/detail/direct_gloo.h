#pragma once
/// \file
/// Collectives through Gloo's own API, next to the ProcessGroupGloo that c10d gives us.
///
/// ProcessGroupGloo runs every collective on a worker thread: the caller enqueues it, a worker
/// wakes, runs Gloo's algorithm (whose socket I/O runs on Gloo's event-loop thread), then wakes
/// the caller. On a loaded machine each of those hand-offs costs tens to hundreds of
/// microseconds, so a small all-reduce takes ~1 ms where the network round trip takes ~50 us.
/// This class opens two more Gloo contexts over the same store (Gloo's TCP transport, Gloo's
/// rendezvous; nothing home-made below the algorithm):
///
///  - an *exchange* context whose pairs are in Gloo's synchronous mode: the calling thread
///    writes and reads the sockets itself. A small all-reduce sends this process's buffer to
///    every other process and adds what arrives in rank order, so every process computes the
///    same bits. Each message starts with the call's fingerprint (sequence number, operation,
///    dtype, shape): calls that do not pair up are an error listing every side, never a wrong
///    sum. Every other collective first sends its fingerprint alone through this context
///    (`agree`), so that all collectives share one sequence and no payload of a mismatched call
///    ever reaches Gloo (whose I/O thread aborts the process on a size mismatch).
///  - a *ring* context in Gloo's usual mode (its event-loop thread does the socket I/O), for
///    medium tensors the same exchange (with few processes), and for large ones Gloo's ring
///    all-reduce (`gloo::allreduce`) reading from one buffer and writing another, so an
///    out-of-place reduction needs no prior copy (the copy is folded into the ring's first pass),
///    with larger segments than ProcessGroupGloo's and any reduction function (bfloat16
///    included). The ring runs on one worker thread of ours, in submission order, and returns a
///    handle to wait on.
///
/// Every process of the group must make the same calls in the same order, as with any
/// collective. Only CPU tensors; NCCL groups never create this.
///
/// Example:
/// \code
///   accelerate::detail::DirectGloo direct(store, rank, world, std::chrono::seconds(60), {});
///   at::Tensor loss = at::full({1}, 0.5);
///   direct.exchange_allreduce_(loss, c10d::ReduceOp::SUM);        // calling thread, ~50 us
///   at::Tensor big = at::ones({1 << 22}), sum = at::empty_like(big);
///   direct.ring_allreduce(big, sum, c10d::ReduceOp::SUM)->wait();  // ring, out of place
/// \endcode

#include <accelerate/compat.h>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace accelerate::detail {

/// True when this build can talk to Gloo directly (libgloo, or a LibTorch exporting Gloo's
/// symbols, was found at configure time). Without it PartialState::direct() is always null and
/// every collective goes through the process group.
bool direct_gloo_available();

/// A collective submitted to DirectGloo's worker thread.
///
/// Example:
/// \code
///   auto work = direct.ring_allreduce(in, out, c10d::ReduceOp::SUM);
///   work->wait();   // rethrows the collective's error, if any
/// \endcode
class DirectWork {
 public:
  /// Blocks until the collective finished; rethrows its error.
  void wait();
  /// Waits at most `timeout`; true when the collective finished (then wait() returns at once).
  bool wait_for(std::chrono::milliseconds timeout);
  /// True once the collective finished (successfully or not).
  bool completed() const;
  /// When it finished (the epoch of steady_clock before that).
  std::chrono::steady_clock::time_point completed_at() const;

  // Called by the worker thread.
  void finish(std::exception_ptr error);

 private:
  mutable std::mutex mutex_;
  std::condition_variable done_;
  bool completed_ = false;
  std::chrono::steady_clock::time_point completed_at_;
  std::exception_ptr error_;
};

/// What a collective is, as every process states it before any payload moves: the operation's
/// kind and user-facing name, the reduction or root, and the dtype and shape of the payload. The
/// channel adds its sequence number. Processes whose statements differ fail with an error that
/// lists every process's call, instead of pairing calls that do not belong together (a wrong sum,
/// Gloo aborting on a size mismatch, or a hang until the timeout). 128 bytes, sent as they are.
struct CallFingerprint {
  enum Kind : int32_t {
    kAllReduce = 1,
    kAllGather = 2,
    kBroadcast = 3,
    kBarrier = 4,
    kStructureCheck = 5,  // debug mode's comparison of whole structures, before the collective
  };
  static constexpr int kDims = 6;
  static constexpr int kNameBytes = 32;

  uint64_t sequence = 0;
  int32_t kind = 0;
  int32_t arg = 0;     // reduction code (all-reduce) or root process (broadcast)
  int32_t dtype = -1;  // c10::ScalarType; -1 without a payload
  int32_t ndim = -1;
  int64_t numel = 0;
  // Sizes; with more than kDims dimensions the last slot folds the remaining ones.
  int64_t dims[kDims] = {};
  char name[kNameBytes] = {};  // NUL-terminated, truncated
  int64_t reserved[2] = {};

  /// A fingerprint for `name` (the operation the user called) of kind `kind` over `payload`
  /// (undefined for a barrier).
  static CallFingerprint of(const char* name, Kind kind, const at::Tensor& payload,
                            int32_t arg = 0);
  /// "'reduce' (all-reduce, sum) of shape [2, 3] float" — what error messages print.
  std::string describe() const;
  /// Equal in everything but the sequence number.
  bool same_call(const CallFingerprint& other) const;
};
static_assert(sizeof(CallFingerprint) == 128, "the fingerprint is sent as raw bytes");

/// The error every process raises when the processes' fingerprints of one call differ: lists
/// each process's call. `mine` is this process's, `all` every process's in rank order.
[[noreturn]] void fail_mismatch(const CallFingerprint& mine,
                                const std::vector<CallFingerprint>& all);

class DirectGloo {
 public:
  /// The largest payload exchange_allreduce_ takes, in bytes. Below this, latency dominates and
  /// sending the whole buffer to every peer costs no more than a ring; it also stays well under
  /// the kernel's default socket buffer sizes, so two processes writing to each other at once
  /// never wait for the other to read.
  static constexpr int64_t kExchangeBytes = 64 * 1024;
  /// Up to this, messages still go out whole to every peer, through Gloo's event loop (no
  /// synchronous mode: these could fill the socket buffers), when there are at most
  /// kMediumExchangeMaxProcesses processes: one round trip instead of a ring's many, for
  /// (n - 1) times the bytes of a ring's 2 (n - 1) / n.
  static constexpr int64_t kMediumExchangeBytes = 1024 * 1024;
  static constexpr int kMediumExchangeMaxProcesses = 4;
  /// Segment size of the ring all-reduce: larger than Gloo's 1 MiB default, which on a busy
  /// machine spends more time in per-segment notifications than in copies.
  static constexpr size_t kRingSegmentBytes = 4 * 1024 * 1024;

  /// Connects to the other processes through `store` (a collective: every process constructs
  /// its DirectGloo together). `address` says where to listen, as for ProcessGroupGloo.
  DirectGloo(const c10::intrusive_ptr<c10d::Store>& store, int rank, int world_size,
             std::chrono::milliseconds timeout, const compat::GlooAddress& address);
  DirectGloo(const DirectGloo&) = delete;
  DirectGloo& operator=(const DirectGloo&) = delete;
  ~DirectGloo();

  int rank() const { return rank_; }
  int world_size() const { return world_size_; }

  /// True when exchange_allreduce_ accepts `t`: a contiguous CPU tensor of a dtype with a
  /// reduction here, at most kExchangeBytes (kMediumExchangeBytes with few processes).
  bool exchangeable(const at::Tensor& t) const;
  /// True when `t` takes the synchronous, calling-thread exchange (at most kExchangeBytes).
  static bool small(const at::Tensor& t) {
    return ringable(t) && t.numel() * static_cast<int64_t>(t.element_size()) <= kExchangeBytes;
  }
  /// True when ring_allreduce accepts `t` (a contiguous CPU tensor of a supported dtype).
  static bool ringable(const at::Tensor& t);

  /// Reduces `t` in place over all processes, the calling thread waiting (see the file comment).
  /// `op_name` is what errors call the operation. Throws, listing every process's call, when the
  /// processes' calls do not pair up (different dtype, shape, operation, or a call missing on
  /// one side). `fingerprint`, when given, is what the processes compare instead of `t`'s own
  /// (the caller's shape and dtype before a flattening or widening).
  void exchange_allreduce_(at::Tensor& t, c10d::ReduceOp op, const char* op_name = "all_reduce",
                           const CallFingerprint* fingerprint = nullptr);

  /// Every process states `fingerprint` for its next collective; returns when all stated the
  /// same, throws on every process (listing each process's call) when they did not. One small
  /// message to every peer on the calling thread, in the sequence all collectives share, so
  /// every later payload is known to pair up. Also a barrier: it returns only once every
  /// process has made the call. A timeout names the processes that did not arrive.
  void agree(CallFingerprint fingerprint);

  /// The reduction code a fingerprint carries for `op`.
  static int32_t reduction_code(c10d::ReduceOp op);

  /// Starts Gloo's ring all-reduce of `in` into `out` (same shape and dtype; may be the same
  /// tensor) on the worker thread. Both must stay alive and untouched until the work completes.
  std::shared_ptr<DirectWork> ring_allreduce(const at::Tensor& in, const at::Tensor& out,
                                             c10d::ReduceOp op);

 private:
  struct Impl;
  int rank_;
  int world_size_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace accelerate::detail
