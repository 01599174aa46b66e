#include "accelerate/detail/direct_gloo.h"

#include "error_record.h"

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#if ACCELERATE_HAVE_DIRECT_GLOO
#include <gloo/allreduce.h>
#include <gloo/rendezvous/context.h>
#include <gloo/transport/buffer.h>
#include <gloo/transport/pair.h>
#endif

#include <algorithm>
#include <cstring>
#include <deque>
#include <sstream>
#include <thread>
#include <type_traits>
#include <vector>

namespace accelerate::detail {

// ---------------------------------------------------------------------- DirectWork

void DirectWork::wait() {
  std::unique_lock<std::mutex> lock(mutex_);
  done_.wait(lock, [&] { return completed_; });
  if (error_) std::rethrow_exception(error_);
}

bool DirectWork::wait_for(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mutex_);
  return done_.wait_for(lock, timeout, [&] { return completed_; });
}

bool DirectWork::completed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return completed_;
}

std::chrono::steady_clock::time_point DirectWork::completed_at() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return completed_at_;
}

void DirectWork::finish(std::exception_ptr error) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    completed_ = true;
    completed_at_ = std::chrono::steady_clock::now();
    error_ = std::move(error);
  }
  done_.notify_all();
}

// ---------------------------------------------------------------------- fingerprints

namespace {

std::string reduction_name(int32_t code) {
  switch (code) {
    case 1:
      return "sum";
    case 2:
      return "product";
    case 3:
      return "min";
    case 4:
      return "max";
    default:
      return "reduction " + std::to_string(code);
  }
}

}  // namespace

int32_t DirectGloo::reduction_code(c10d::ReduceOp op) {
  if (op == c10d::ReduceOp::SUM) return 1;
  if (op == c10d::ReduceOp::PRODUCT) return 2;
  if (op == c10d::ReduceOp::MIN) return 3;
  if (op == c10d::ReduceOp::MAX) return 4;
  return 0;
}

CallFingerprint CallFingerprint::of(const char* name, Kind kind, const at::Tensor& payload,
                                    int32_t arg) {
  CallFingerprint f;
  f.kind = kind;
  f.arg = arg;
  std::strncpy(f.name, name, kNameBytes - 1);
  if (payload.defined()) {
    f.dtype = static_cast<int32_t>(payload.scalar_type());
    f.ndim = static_cast<int32_t>(payload.dim());
    f.numel = payload.numel();
    int64_t fold = 0;
    for (int64_t i = 0; i < payload.dim(); ++i) {
      if (i < kDims - 1 || payload.dim() == kDims) {
        f.dims[i] = payload.size(i);
      } else {
        fold = fold * 1000003 + payload.size(i) + 1;
        f.dims[kDims - 1] = fold;
      }
    }
  }
  return f;
}

bool CallFingerprint::same_call(const CallFingerprint& other) const {
  CallFingerprint a = *this, b = other;
  a.sequence = b.sequence = 0;
  return std::memcmp(&a, &b, sizeof a) == 0;
}

std::string CallFingerprint::describe() const {
  std::ostringstream out;
  out << "'" << std::string(name, strnlen(name, kNameBytes)) << "' (";
  switch (kind) {
    case kAllReduce:
      out << "all-reduce, " << reduction_name(arg);
      break;
    case kAllGather:
      out << "all-gather";
      break;
    case kBroadcast:
      out << "broadcast from process " << arg;
      break;
    case kBarrier:
      out << "barrier";
      break;
    case kStructureCheck:
      out << "debug-mode structure check";
      break;
    default:
      out << "operation " << kind;
  }
  out << ")";
  if (ndim < 0) return out.str();
  out << " of shape [";
  for (int32_t i = 0; i < ndim; ++i) {
    if (i == kDims - 1 && ndim > kDims) {
      out << (i > 0 ? ", " : "") << "...";
      break;
    }
    out << (i > 0 ? ", " : "") << dims[i];
  }
  out << "] " << c10::toString(static_cast<c10::ScalarType>(dtype));
  return out.str();
}

void fail_mismatch(const CallFingerprint& mine, const std::vector<CallFingerprint>& all) {
  std::ostringstream msg;
  msg << "accelerate: collective '" << std::string(mine.name, strnlen(mine.name, mine.kNameBytes))
      << "' (call #" << mine.sequence << " of this process group) does not match across processes:";
  for (size_t r = 0; r < all.size(); ++r) {
    msg << "\n  process " << r << ": call #" << all[r].sequence << " " << all[r].describe();
  }
  msg << "\nEvery process must call the same collectives, in the same order, with tensors of the "
         "same shape and dtype (pad_across_processes evens out sizes). A call missing on one "
         "process shows as its next call paired with the missing one.";
  TORCH_CHECK(false, msg.str());
}

#if ACCELERATE_HAVE_DIRECT_GLOO

namespace {

// ---------------------------------------------------------------------- reductions
// Gloo's reduction signature: c = a (op) b over n elements; c may alias a or b.
using ReduceFn = void (*)(void*, const void*, const void*, size_t);

struct Sum {
  template <class T>
  static T apply(T a, T b) {
    return a + b;
  }
};
struct Product {
  template <class T>
  static T apply(T a, T b) {
    return a * b;
  }
};
struct Min {
  template <class T>
  static T apply(T a, T b) {
    return b < a ? b : a;
  }
};
struct Max {
  template <class T>
  static T apply(T a, T b) {
    return a < b ? b : a;
  }
};

// 16-bit floats are combined in float and rounded once per pair, as NCCL does.
template <class T>
struct Compute {
  using type = T;
};
template <>
struct Compute<c10::Half> {
  using type = float;
};
template <>
struct Compute<c10::BFloat16> {
  using type = float;
};

template <class T, class Op>
void reduce_elements(void* c_, const void* a_, const void* b_, size_t n) {
  using C = typename Compute<T>::type;
  auto* c = static_cast<T*>(c_);
  const auto* a = static_cast<const T*>(a_);
  const auto* b = static_cast<const T*>(b_);
  for (size_t i = 0; i < n; ++i) {
    c[i] = static_cast<T>(Op::apply(static_cast<C>(a[i]), static_cast<C>(b[i])));
  }
}

// Sums of 16-bit floats through ATen's vectorized kernels (the same float32 add and
// round-to-nearest-even per pair as reduce_elements, several times faster than converting one
// element at a time).
template <c10::ScalarType kType>
void aten_sum(void* c, const void* a, const void* b, size_t n) {
  const auto options = at::TensorOptions().dtype(kType);
  const std::vector<int64_t> shape{static_cast<int64_t>(n)};
  at::Tensor out = at::from_blob(c, shape, options);
  at::add_out(out, at::from_blob(const_cast<void*>(a), shape, options),
              at::from_blob(const_cast<void*>(b), shape, options));
}

template <class T>
ReduceFn pick_op(c10d::ReduceOp op) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (op == c10d::ReduceOp::SUM) return &aten_sum<at::kHalf>;
  }
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (op == c10d::ReduceOp::SUM) return &aten_sum<at::kBFloat16>;
  }
  if (op == c10d::ReduceOp::SUM) return &reduce_elements<T, Sum>;
  if (op == c10d::ReduceOp::PRODUCT) return &reduce_elements<T, Product>;
  if (op == c10d::ReduceOp::MIN) return &reduce_elements<T, Min>;
  if (op == c10d::ReduceOp::MAX) return &reduce_elements<T, Max>;
  return nullptr;
}

ReduceFn reduce_function(c10::ScalarType dtype, c10d::ReduceOp op) {
  switch (dtype) {
    case at::kFloat:
      return pick_op<float>(op);
    case at::kDouble:
      return pick_op<double>(op);
    case at::kHalf:
      return pick_op<c10::Half>(op);
    case at::kBFloat16:
      return pick_op<c10::BFloat16>(op);
    case at::kChar:
      return pick_op<int8_t>(op);
    case at::kByte:
      return pick_op<uint8_t>(op);
    case at::kInt:
      return pick_op<int32_t>(op);
    case at::kLong:
      return pick_op<int64_t>(op);
    default:
      return nullptr;
  }
}

bool supported_dtype(c10::ScalarType dtype) {
  return reduce_function(dtype, c10d::ReduceOp::SUM) != nullptr;
}

std::string op_name_of(c10d::ReduceOp op) {
  if (op == c10d::ReduceOp::SUM) return "sum";
  if (op == c10d::ReduceOp::PRODUCT) return "product";
  if (op == c10d::ReduceOp::MIN) return "min";
  if (op == c10d::ReduceOp::MAX) return "max";
  return "other";
}

// Every exchanged message starts with the call's fingerprint, then the payload.
constexpr int64_t kHeaderBytes = sizeof(CallFingerprint);
static_assert(kHeaderBytes % 16 == 0, "payloads after the header stay 16-byte aligned");

bool mentions_timeout(const std::string& what) {
  return what.find("imeout") != std::string::npos || what.find("imed out") != std::string::npos;
}

}  // namespace

bool direct_gloo_available() {
  return true;
}

// One way of exchanging whole buffers with every peer: a context, one send buffer, and per peer
// two receive slots used alternately (a process sends call k+2 only after receiving every peer's
// call k+1, which each peer sends only after it finished reading call k: so a slot is never
// overwritten while it is read).
struct Channel {
  std::shared_ptr<::gloo::rendezvous::Context> context;
  int64_t capacity = 0;  // payload bytes per message
  std::mutex mutex;
  uint64_t sequence = 0;
  at::Tensor send_memory;
  at::Tensor recv_memory[2];
  at::Tensor accumulator;
  std::vector<std::unique_ptr<::gloo::transport::Buffer>> sends[2];
  std::vector<std::unique_ptr<::gloo::transport::Buffer>> recvs[2];

  int64_t slot_bytes() const { return kHeaderBytes + capacity; }
};

struct DirectGloo::Impl {
  int rank = 0;
  int world = 0;
  // Where processes that timed out say which call they were waiting in (see fail_transport).
  c10::intrusive_ptr<c10d::Store> diagnosis;
  std::shared_ptr<::gloo::transport::Device> device;
  std::shared_ptr<::gloo::rendezvous::Context> ring;
  std::chrono::milliseconds timeout{0};
  // Small messages: pairs in Gloo's synchronous mode, read and written by the calling thread.
  Channel small;
  // Medium messages: pairs in Gloo's usual mode (its event-loop thread reads them): messages
  // this large could fill the kernel's socket buffers, and two processes writing to each other
  // at once must not wait for each other to read.
  Channel medium;
  bool has_medium = false;

  // Ring: one worker thread runs the submitted collectives in order.
  std::mutex queue_mutex;
  std::condition_variable queue_ready;
  std::deque<std::function<void()>> queue;
  bool stopping = false;
  uint32_t next_tag = 0;
  std::thread worker;

  // Sends `mine` (sequence filled in here) and `bytes` of payload to every peer and receives
  // theirs; throws on every process when the calls differ. The caller holds channel.mutex.
  // Returns the receive slot index the peers' payloads are in.
  int exchange(Channel& channel, CallFingerprint& mine, const void* payload, int64_t bytes);

  // A send or receive failed: a peer closed its connection, or it did not arrive in time. Names
  // the peer; for a timeout, asks the store which processes are waiting where.
  [[noreturn]] void fail_transport(const CallFingerprint& mine, const std::vector<bool>& arrived,
                                   int peer, const std::string& what);

  void run_worker() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(queue_mutex);
        queue_ready.wait(lock, [&] { return stopping || !queue.empty(); });
        if (queue.empty()) return;
        task = std::move(queue.front());
        queue.pop_front();
      }
      task();
    }
  }
};

namespace {

std::shared_ptr<::gloo::transport::Device> make_device(const compat::GlooAddress& address) {
  if (!address.interface.empty()) {
    return c10d::ProcessGroupGloo::createDeviceForInterface(address.interface);
  }
  if (!address.hostname.empty()) {
    return c10d::ProcessGroupGloo::createDeviceForHostname(address.hostname);
  }
  return c10d::ProcessGroupGloo::createDefaultDevice();
}

std::shared_ptr<::gloo::rendezvous::Context> connect(
    const c10::intrusive_ptr<c10d::Store>& store, const std::string& prefix, int rank, int world,
    std::chrono::milliseconds timeout, std::shared_ptr<::gloo::transport::Device>& device) {
  std::shared_ptr<::gloo::rendezvous::Store> gloo_store =
      std::make_shared<c10d::ProcessGroupGloo::GlooStore>(
          c10::make_intrusive<c10d::PrefixStore>(prefix, store));
  auto context = std::make_shared<::gloo::rendezvous::Context>(rank, world);
  context->setTimeout(timeout);
  compat::connect_full_mesh(*context, gloo_store, device);
  return context;
}

void open_channel(Channel& channel, std::shared_ptr<::gloo::rendezvous::Context> context, int rank,
                  int world, int64_t capacity, bool sync) {
  channel.context = std::move(context);
  channel.capacity = capacity;
  const int64_t slot_bytes = channel.slot_bytes();
  channel.send_memory = at::empty({slot_bytes}, at::kByte);
  channel.accumulator = at::empty({capacity}, at::kByte);
  for (int k = 0; k < 2; ++k) {
    channel.recv_memory[k] = at::empty({slot_bytes * world}, at::kByte);
    channel.sends[k].resize(static_cast<size_t>(world));
    channel.recvs[k].resize(static_cast<size_t>(world));
  }
  for (int peer = 0; peer < world; ++peer) {
    if (peer == rank) continue;
    auto& pair = channel.context->getPair(peer);
    // The calling thread reads and writes this pair's socket itself (no event-loop hand-off).
    if (sync) pair->setSync(/*sync=*/true, /*busyPoll=*/false);
    for (int k = 0; k < 2; ++k) {
      auto* recv_at = channel.recv_memory[k].data_ptr<uint8_t>() + slot_bytes * peer;
      channel.recvs[k][static_cast<size_t>(peer)] =
          pair->createRecvBuffer(k, recv_at, static_cast<size_t>(slot_bytes));
      channel.sends[k][static_cast<size_t>(peer)] = pair->createSendBuffer(
          k, channel.send_memory.data_ptr(), static_cast<size_t>(slot_bytes));
    }
  }
}

}  // namespace

DirectGloo::DirectGloo(const c10::intrusive_ptr<c10d::Store>& store, int rank, int world_size,
                       std::chrono::milliseconds timeout, const compat::GlooAddress& address)
    : rank_(rank), world_size_(world_size), impl_(std::make_unique<Impl>()) {
  TORCH_CHECK(world_size >= 2 && rank >= 0 && rank < world_size,
              "accelerate: DirectGloo needs 0 <= rank < world_size and world_size >= 2, got rank ",
              rank, " of ", world_size);
  auto& impl = *impl_;
  impl.rank = rank;
  impl.world = world_size;
  impl.timeout = timeout;
  impl.diagnosis = c10::make_intrusive<c10d::PrefixStore>("direct/waiting/", store);
  impl.device = make_device(address);
  // Two contexts: the synchronous one for small exchanges, and one in Gloo's usual mode that the
  // ring (unbound buffers, on the worker) and the medium exchange (bound buffers, on the calling
  // thread) share: Gloo keeps the two kinds of message apart, and serialises writes per pair.
  impl.ring = connect(store, "direct/ring/", rank, world_size, timeout, impl.device);
  open_channel(impl.small, connect(store, "direct/small/", rank, world_size, timeout, impl.device),
               rank, world_size, kExchangeBytes, /*sync=*/true);
  impl.has_medium = world_size <= kMediumExchangeMaxProcesses;
  if (impl.has_medium) {
    open_channel(impl.medium, impl.ring, rank, world_size, kMediumExchangeBytes, /*sync=*/false);
  }
  impl.worker = std::thread([&impl] { impl.run_worker(); });
}

DirectGloo::~DirectGloo() {
  {
    std::lock_guard<std::mutex> lock(impl_->queue_mutex);
    impl_->stopping = true;
  }
  impl_->queue_ready.notify_all();
  if (impl_->worker.joinable()) impl_->worker.join();
}

bool DirectGloo::exchangeable(const at::Tensor& t) const {
  if (!ringable(t)) return false;
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  return bytes <= (impl_->has_medium ? kMediumExchangeBytes : kExchangeBytes);
}

bool DirectGloo::ringable(const at::Tensor& t) {
  return t.defined() && t.device().is_cpu() && t.is_contiguous() && !t.is_sparse() &&
         supported_dtype(t.scalar_type());
}

int DirectGloo::Impl::exchange(Channel& channel, CallFingerprint& mine, const void* payload,
                               int64_t bytes) {
  const int64_t slot_bytes = channel.slot_bytes();
  const int k = static_cast<int>(channel.sequence & 1U);
  mine.sequence = channel.sequence;
  auto* send = channel.send_memory.data_ptr<uint8_t>();
  std::memcpy(send, &mine, sizeof mine);
  if (bytes > 0) std::memcpy(send + kHeaderBytes, payload, static_cast<size_t>(bytes));
  // Receive slots hold a whole message of the channel's capacity, so a peer's message of another
  // length is received, and its header refused, rather than tripping Gloo's size check.
  const auto message = static_cast<size_t>(kHeaderBytes + bytes);
  ++channel.sequence;
  std::vector<bool> arrived(static_cast<size_t>(world), false);
  arrived[static_cast<size_t>(rank)] = true;
  int peer = -1;
  try {
    for (peer = 0; peer < world; ++peer) {
      if (peer != rank) channel.sends[k][static_cast<size_t>(peer)]->send(0, message);
    }
    for (peer = 0; peer < world; ++peer) {
      if (peer == rank) continue;
      channel.recvs[k][static_cast<size_t>(peer)]->waitRecv();
      arrived[static_cast<size_t>(peer)] = true;
    }
    for (peer = 0; peer < world; ++peer) {
      if (peer != rank) channel.sends[k][static_cast<size_t>(peer)]->waitSend();
    }
  } catch (const std::exception& e) {
    fail_transport(mine, arrived, peer, e.what());
  }
  const uint8_t* recv = channel.recv_memory[k].data_ptr<uint8_t>();
  std::vector<CallFingerprint> all(static_cast<size_t>(world));
  bool same = true;
  for (int r = 0; r < world; ++r) {
    auto& theirs = all[static_cast<size_t>(r)];
    if (r == rank) {
      theirs = mine;
    } else {
      std::memcpy(&theirs, recv + slot_bytes * r, sizeof theirs);
    }
    same = same && theirs.same_call(mine) && theirs.sequence == mine.sequence;
  }
  if (!same) fail_mismatch(mine, all);
  return k;
}

void DirectGloo::Impl::fail_transport(const CallFingerprint& mine, const std::vector<bool>& arrived,
                                      int peer, const std::string& what) {
  std::ostringstream msg;
  const double seconds = std::chrono::duration<double>(timeout).count();
  msg << "accelerate: collective '" << mine.name << "' (call #" << mine.sequence
      << ") failed on process " << rank << " of " << world << ": ";
  if (!mentions_timeout(what) && peer >= 0 && peer < world) {
    msg << "process " << peer << " closed its connection or failed (" << what
        << "); the error that stopped it is in its own output";
    record_failure(msg.str(), /*caused_by_peer=*/true);
    TORCH_CHECK(false, msg.str());
  }
  // Timed out. Every process that reaches this point says where it waits; whoever neither sent
  // its message nor says so within the grace period did not arrive.
  const std::string here = std::to_string(mine.sequence) + "\t" + mine.name;
  std::vector<std::string> waiting(static_cast<size_t>(world));
  try {
    diagnosis->set(std::to_string(rank), std::vector<uint8_t>(here.begin(), here.end()));
    const auto grace = std::clamp<std::chrono::milliseconds>(
        timeout / 10, std::chrono::milliseconds(200), std::chrono::seconds(10));
    const auto deadline = std::chrono::steady_clock::now() + grace;
    for (;;) {
      bool all_seen = true;
      for (int r = 0; r < world; ++r) {
        auto& w = waiting[static_cast<size_t>(r)];
        if (r == rank || arrived[static_cast<size_t>(r)] || !w.empty()) continue;
        if (diagnosis->check({std::to_string(r)})) {
          const auto v = diagnosis->get(std::to_string(r));
          w.assign(v.begin(), v.end());
        } else {
          all_seen = false;
        }
      }
      if (all_seen || std::chrono::steady_clock::now() >= deadline) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  } catch (const std::exception&) {
    // The store is gone too (its server process exited): report what the sockets told us.
  }
  std::vector<std::string> missing;
  std::ostringstream elsewhere;
  for (int r = 0; r < world; ++r) {
    if (r == rank || arrived[static_cast<size_t>(r)]) continue;
    const auto& w = waiting[static_cast<size_t>(r)];
    if (w == here) continue;  // at this very call: held up by the same absentee
    missing.push_back(std::to_string(r));
    if (!w.empty()) {
      const auto tab = w.find('\t');
      elsewhere << "; process " << r << " is waiting in call #" << w.substr(0, tab) << " '"
                << (tab == std::string::npos ? std::string() : w.substr(tab + 1)) << "'";
    }
  }
  msg << "timed out after " << seconds << " s: ";
  if (missing.empty()) {
    msg << "every process arrived, but the exchange did not complete (" << what << ")";
  } else {
    msg << (missing.size() == 1 ? "process " : "processes ");
    for (size_t i = 0; i < missing.size(); ++i) {
      msg << (i == 0 ? "" : i + 1 == missing.size() ? " and " : ", ") << missing[i];
    }
    msg << " did not arrive" << elsewhere.str();
    if (elsewhere.str().empty()) {
      msg << " (no sign of " << (missing.size() == 1 ? "it" : "them")
          << ": exited, stuck outside collectives, or slower than the timeout)";
    }
  }
  record_failure(msg.str(), /*caused_by_peer=*/true);
  TORCH_CHECK(false, msg.str());
}

void DirectGloo::agree(CallFingerprint fingerprint) {
  Channel& channel = impl_->small;
  std::lock_guard<std::mutex> lock(channel.mutex);
  impl_->exchange(channel, fingerprint, nullptr, 0);
}

void DirectGloo::exchange_allreduce_(at::Tensor& t, c10d::ReduceOp op, const char* op_name,
                                     const CallFingerprint* fingerprint) {
  TORCH_CHECK(exchangeable(t), "accelerate: '", op_name,
              "': internal error: the exchange all-reduce takes contiguous CPU tensors of at most ",
              impl_->has_medium ? kMediumExchangeBytes : kExchangeBytes, " bytes, got ",
              t.scalar_type(), " ", t.sizes(), " on ", t.device());
  const ReduceFn fn = reduce_function(t.scalar_type(), op);
  TORCH_CHECK(fn != nullptr, "accelerate: '", op_name, "': reduction '", op_name_of(op),
              "' is not supported for ", t.scalar_type());
  CallFingerprint mine =
      fingerprint != nullptr
          ? *fingerprint
          : CallFingerprint::of(op_name, CallFingerprint::kAllReduce, t, reduction_code(op));
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  const bool small = bytes <= kExchangeBytes;
  // A medium message travels on another channel: the processes first agree on the call in the
  // shared sequence, so that one process's medium call never waits for another's small one.
  if (!small) agree(mine);
  Channel& channel = small ? impl_->small : impl_->medium;
  std::lock_guard<std::mutex> lock(channel.mutex);
  const int64_t slot_bytes = channel.slot_bytes();
  const int k = impl_->exchange(channel, mine, t.data_ptr(), bytes);
  if (bytes == 0) return;
  const uint8_t* recv = channel.recv_memory[k].data_ptr<uint8_t>();
  // Rank order on every process: the same operands in the same order give the same bits.
  auto* acc = channel.accumulator.data_ptr<uint8_t>();
  auto operand = [&](int r) -> const void* {
    return r == rank_ ? t.data_ptr()
                      : static_cast<const void*>(recv + slot_bytes * r + kHeaderBytes);
  };
  const auto n = static_cast<size_t>(t.numel());
  std::memcpy(acc, operand(0), static_cast<size_t>(bytes));
  for (int r = 1; r < world_size_; ++r) fn(acc, acc, operand(r), n);
  std::memcpy(t.data_ptr(), acc, static_cast<size_t>(bytes));
}

std::shared_ptr<DirectWork> DirectGloo::ring_allreduce(const at::Tensor& in, const at::Tensor& out,
                                                       c10d::ReduceOp op) {
  TORCH_CHECK(ringable(in) && ringable(out) && in.scalar_type() == out.scalar_type() &&
                  in.numel() == out.numel(),
              "accelerate: internal error: ring_allreduce needs two contiguous CPU tensors of one "
              "supported dtype and size, got ",
              in.scalar_type(), " ", in.sizes(), " and ", out.scalar_type(), " ", out.sizes());
  const ReduceFn fn = reduce_function(in.scalar_type(), op);
  TORCH_CHECK(fn != nullptr, "accelerate: reduction '", op_name_of(op), "' is not supported for ",
              in.scalar_type());
  auto work = std::make_shared<DirectWork>();
  auto& impl = *impl_;
  std::unique_lock<std::mutex> lock(impl.queue_mutex);
  // Tags are taken in submission order, which every process shares.
  const uint32_t tag = impl.next_tag++;
  auto context = impl.ring;
  impl.queue.emplace_back(
      [work, in = at::Tensor(in), out = at::Tensor(out), fn, tag, context]() mutable {
        try {
          ::gloo::AllreduceOptions opts(context);
          const size_t bytes = static_cast<size_t>(in.numel()) * in.element_size();
          // Gloo only needs the element size; the reduction function knows the type.
          switch (in.element_size()) {
            case 1:
              if (in.data_ptr() != out.data_ptr())
                opts.setInput(static_cast<uint8_t*>(in.data_ptr()), bytes);
              opts.setOutput(static_cast<uint8_t*>(out.data_ptr()), bytes);
              break;
            case 2:
              if (in.data_ptr() != out.data_ptr())
                opts.setInput(static_cast<uint16_t*>(in.data_ptr()), bytes / 2);
              opts.setOutput(static_cast<uint16_t*>(out.data_ptr()), bytes / 2);
              break;
            case 4:
              if (in.data_ptr() != out.data_ptr())
                opts.setInput(static_cast<uint32_t*>(in.data_ptr()), bytes / 4);
              opts.setOutput(static_cast<uint32_t*>(out.data_ptr()), bytes / 4);
              break;
            default:
              if (in.data_ptr() != out.data_ptr())
                opts.setInput(static_cast<uint64_t*>(in.data_ptr()), bytes / 8);
              opts.setOutput(static_cast<uint64_t*>(out.data_ptr()), bytes / 8);
              break;
          }
          opts.setReduceFunction(fn);
          opts.setTag(tag);
          opts.setMaxSegmentSize(kRingSegmentBytes);
          ::gloo::allreduce(opts);
        } catch (...) {
          in = at::Tensor();
          out = at::Tensor();
          work->finish(std::current_exception());
          return;
        }
        // Dropped before the waiter wakes, so that a caller freeing its tensors frees them for
        // real (and the caching allocator can hand them out again at once).
        in = at::Tensor();
        out = at::Tensor();
        work->finish(nullptr);
      });
  lock.unlock();
  impl.queue_ready.notify_one();
  return work;
}

#else  // !ACCELERATE_HAVE_DIRECT_GLOO

bool direct_gloo_available() {
  return false;
}

struct DirectGloo::Impl {};

DirectGloo::DirectGloo(const c10::intrusive_ptr<c10d::Store>& /*store*/, int rank, int world_size,
                       std::chrono::milliseconds /*timeout*/,
                       const compat::GlooAddress& /*address*/)
    : rank_(rank), world_size_(world_size) {
  TORCH_CHECK(false, "accelerate: this build has no direct Gloo support (libgloo was not found)");
}

DirectGloo::~DirectGloo() = default;

bool DirectGloo::exchangeable(const at::Tensor& /*t*/) const {
  return false;
}

bool DirectGloo::ringable(const at::Tensor& /*t*/) {
  return false;
}

void DirectGloo::exchange_allreduce_(at::Tensor& /*t*/, c10d::ReduceOp /*op*/,
                                     const char* /*op_name*/,
                                     const CallFingerprint* /*fingerprint*/) {
  TORCH_CHECK(false, "accelerate: this build has no direct Gloo support");
}

void DirectGloo::agree(CallFingerprint /*fingerprint*/) {
  TORCH_CHECK(false, "accelerate: this build has no direct Gloo support");
}

std::shared_ptr<DirectWork> DirectGloo::ring_allreduce(const at::Tensor& /*in*/,
                                                       const at::Tensor& /*out*/,
                                                       c10d::ReduceOp /*op*/) {
  TORCH_CHECK(false, "accelerate: this build has no direct Gloo support");
}

#endif

}  // namespace accelerate::detail
