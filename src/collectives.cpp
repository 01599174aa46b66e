#include "accelerate/detail/collectives.h"

#include "accelerate/detail/direct_gloo.h"
#include "detail/error_record.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstring>
#include <mutex>
#include <sstream>
#include <unordered_map>

namespace accelerate::detail {
namespace {

compat::Backend& group(const PartialState& state, const char* op) {
  compat::Backend* pg = state.process_group();
  TORCH_CHECK(pg != nullptr, "accelerate: '", op, "' on process ", state.process_index(),
              ": the process group was destroyed");
  return *pg;
}

// Tensors travel on the device the backend works on: the CPU for Gloo, the GPU for NCCL.
at::Tensor to_comm(const PartialState& state, const at::Tensor& t) {
  const c10::Device device = state.backend() == "nccl" ? state.device() : c10::Device(c10::kCPU);
  return t.to(device).contiguous();
}

std::vector<at::Tensor> raw_all_gather(const PartialState& state, const char* op,
                                       const at::Tensor& t) {
  std::vector<at::Tensor> input{to_comm(state, t)};
  std::vector<std::vector<at::Tensor>> output(1);
  for (int i = 0; i < state.num_processes(); ++i) output[0].push_back(at::empty_like(input[0]));
  wait(state, op, group(state, op).allgather(output, input));
  return output[0];
}

// Gloo moves neither bfloat16, int16 nor bool: they travel as a type of the same width and are
// viewed back, which is exact.
at::Tensor to_wire(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16:
    case at::kShort:
      return t.contiguous().view(at::kHalf);
    case at::kBool:
      return t.contiguous().view(at::kByte);
    default:
      return t;
  }
}

// Gloo reduces neither bfloat16 nor bool, and reducing float16 in float32 loses nothing.
c10::ScalarType reduce_dtype(c10::ScalarType t) {
  switch (t) {
    case at::kBFloat16:
    case at::kHalf:
      return at::kFloat;
    case at::kBool:
      return at::kLong;
    default:
      return t;
  }
}

}  // namespace

namespace {

// How often a wait looks whether Gloo's transport thread died (see transport_failure): a
// collective waiting for it would otherwise sit out the whole timeout.
constexpr std::chrono::milliseconds kTransportPoll{200};

bool finished_within(const c10::intrusive_ptr<compat::Work>& work,
                     std::chrono::milliseconds timeout) {
  try {
    return work->wait(timeout);
  } catch (const std::exception&) {
    // Work::wait(timeout) throws both for its own failure and for "not yet": tell them apart.
    if (work->isCompleted()) throw;
    return false;
  }
}

bool finished_within(const std::shared_ptr<DirectWork>& work, std::chrono::milliseconds timeout) {
  if (!work->wait_for(timeout)) return false;
  work->wait();  // rethrows the collective's error
  return true;
}

// Gloo's own timeout ends a stuck collective; this names what the user called, and where.
template <class Work>
void wait_naming(const PartialState& state, const char* op, const Work& work) {
  try {
    if (state.backend() == "gloo") {
      while (!finished_within(work, kTransportPoll)) {
        if (auto failure = transport_failure()) throw std::runtime_error(*failure);
      }
    } else {
      work->wait();
    }
  } catch (const std::exception& e) {
    std::ostringstream msg;
    msg << "accelerate: collective '" << op << "' failed on process " << state.process_index()
        << " of " << state.num_processes() << " (timeout "
        << std::chrono::duration<double>(state.timeout()).count() << " s): " << e.what();
    if (is_peer_failure(e.what())) record_failure(msg.str(), /*caused_by_peer=*/true);
    TORCH_CHECK(false, msg.str());
  }
}

}  // namespace

void wait(const PartialState& state, const char* op, const c10::intrusive_ptr<compat::Work>& work) {
  wait_naming(state, op, work);
}

void wait(const PartialState& state, const char* op, const std::shared_ptr<DirectWork>& work) {
  wait_naming(state, op, work);
}

void agree(const PartialState& state, const CallFingerprint& fingerprint) {
  if (DirectGloo* direct = state.direct()) {
    direct->agree(fingerprint);
    return;
  }
  // Without our own Gloo channel (NCCL, or ACCELERATE_DIRECT_GLOO=0): the fixed-size
  // fingerprints travel through the process group's all-gather, which never mismatches in size.
  CallFingerprint mine = fingerprint;
  {
    static std::mutex mutex;
    static std::unordered_map<const void*, uint64_t> sequences;
    std::lock_guard<std::mutex> lock(mutex);
    mine.sequence = sequences[state.process_group()]++;
  }
  auto bytes = at::empty({static_cast<int64_t>(sizeof mine)}, at::kByte);
  std::memcpy(bytes.data_ptr(), &mine, sizeof mine);
  const auto gathered = raw_all_gather(state, mine.name, bytes);
  std::vector<CallFingerprint> all(gathered.size());
  bool same = true;
  for (size_t r = 0; r < gathered.size(); ++r) {
    std::memcpy(&all[r], gathered[r].cpu().data_ptr(), sizeof mine);
    same = same && all[r].same_call(mine) && all[r].sequence == mine.sequence;
  }
  if (!same) fail_mismatch(mine, all);
}

bool reducible_in_place(const PartialState& state, const at::Tensor& t) {
  const c10::Device comm = state.backend() == "nccl" ? state.device() : c10::Device(c10::kCPU);
  return t.device() == comm && t.is_contiguous() &&
         reduce_dtype(t.scalar_type()) == t.scalar_type();
}

void all_reduce_(const PartialState& state, const char* op, at::Tensor& buf,
                 c10d::ReduceOp reduce_op) {
  if (!state.use_distributed()) return;
  TORCH_CHECK(reducible_in_place(state, buf), "accelerate: '", op,
              "': internal error: all_reduce_ needs a contiguous tensor of a reducible dtype on "
              "the communication device, got ",
              buf.scalar_type(), " on ", buf.device());
  const auto fingerprint = CallFingerprint::of(op, CallFingerprint::kAllReduce, buf,
                                               DirectGloo::reduction_code(reduce_op));
  if (DirectGloo* direct = state.direct()) {
    // Small: one exchange on this thread, the fingerprint riding with the payload. Large:
    // Gloo's ring without ProcessGroupGloo's queue, once the processes agreed on the call.
    if (direct->exchangeable(buf)) {
      direct->exchange_allreduce_(buf, reduce_op, op, &fingerprint);
      return;
    }
    if (DirectGloo::ringable(buf)) {
      direct->agree(fingerprint);
      wait(state, op, direct->ring_allreduce(buf, buf, reduce_op));
      return;
    }
  }
  agree(state, fingerprint);
  std::vector<at::Tensor> bufs{buf};
  c10d::AllreduceOptions opts;
  opts.reduceOp = reduce_op;
  wait(state, op, group(state, op).allreduce(bufs, opts));
}

at::Tensor all_reduce(const PartialState& state, const char* op, const at::Tensor& t,
                      c10d::ReduceOp reduce_op) {
  if (!state.use_distributed()) return t.clone();
  // What the caller passed (dtype included), not what travels after widening.
  const auto fingerprint = CallFingerprint::of(op, CallFingerprint::kAllReduce, t,
                                               DirectGloo::reduction_code(reduce_op));
  const auto dtype = reduce_dtype(t.scalar_type());
  if (DirectGloo* direct = state.direct(); direct != nullptr && t.device().is_cpu()) {
    // The ring reads `t` and writes a fresh tensor: the copy a reduction must make is folded
    // into the ring's first pass instead of made before it.
    const at::Tensor in = t.to(dtype).contiguous();
    at::Tensor out;
    if (direct->exchangeable(in)) {
      out = in.is_same(t) ? t.clone() : in;
      direct->exchange_allreduce_(out, reduce_op, op, &fingerprint);
    } else if (DirectGloo::ringable(in)) {
      direct->agree(fingerprint);
      out = at::empty_like(in);
      wait(state, op, direct->ring_allreduce(in, out, reduce_op));
    }
    if (out.defined()) {
      if (t.scalar_type() == at::kBool) out = out.ne(0);
      return out.to(t.scalar_type());
    }
  }
  agree(state, fingerprint);
  std::vector<at::Tensor> buf{to_comm(state, t.to(dtype, /*non_blocking=*/false, /*copy=*/true))};
  c10d::AllreduceOptions opts;
  opts.reduceOp = reduce_op;
  wait(state, op, group(state, op).allreduce(buf, opts));
  at::Tensor out = buf[0];
  if (t.scalar_type() == at::kBool) out = out.ne(0);
  return out.to(t.device(), t.scalar_type());
}

std::vector<at::Tensor> all_gather(const PartialState& state, const char* op, const at::Tensor& t) {
  if (!state.use_distributed()) return {t.clone()};
  agree(state, CallFingerprint::of(op, CallFingerprint::kAllGather, t));
  auto out = raw_all_gather(state, op, to_wire(t));
  for (auto& x : out) x = x.view(t.scalar_type()).to(t.device());
  return out;
}

at::Tensor broadcast(const PartialState& state, const char* op, const at::Tensor& t, int src) {
  TORCH_CHECK(src >= 0 && src < state.num_processes(), "accelerate: '", op, "': from_process ", src,
              " is outside [0, ", state.num_processes(), ")");
  if (!state.use_distributed()) return t.clone();
  agree(state, CallFingerprint::of(op, CallFingerprint::kBroadcast, t, src));
  std::vector<at::Tensor> buf{to_comm(state, to_wire(t)).clone()};
  c10d::BroadcastOptions opts;
  opts.rootRank = src;
  wait(state, op, group(state, op).broadcast(buf, opts));
  return buf[0].view(t.scalar_type()).to(t.device());
}

std::vector<std::string> all_gather_bytes(const PartialState& state, const char* op,
                                          const std::string& bytes) {
  if (!state.use_distributed()) return {bytes};
  // The lengths differ, and so are not part of the fingerprint; the second all-gather's size
  // follows from them alike on every process.
  agree(state, CallFingerprint::of(op, CallFingerprint::kAllGather, at::Tensor()));
  auto lengths =
      raw_all_gather(state, op, at::full({1}, static_cast<int64_t>(bytes.size()), at::kLong));
  int64_t longest = 0;
  for (const auto& l : lengths) longest = std::max(longest, l.item<int64_t>());
  auto buf = at::zeros({std::max<int64_t>(longest, 1)}, at::kByte);
  std::memcpy(buf.data_ptr(), bytes.data(), bytes.size());
  auto all = raw_all_gather(state, op, buf);
  std::vector<std::string> out;
  out.reserve(all.size());
  for (size_t i = 0; i < all.size(); ++i) {
    auto cpu = all[i].cpu();
    out.emplace_back(static_cast<const char*>(cpu.data_ptr()),
                     static_cast<size_t>(lengths[i].item<int64_t>()));
  }
  return out;
}

std::string broadcast_bytes(const PartialState& state, const char* op, const std::string& bytes,
                            int src) {
  TORCH_CHECK(src >= 0 && src < state.num_processes(), "accelerate: '", op, "': from_process ", src,
              " is outside [0, ", state.num_processes(), ")");
  if (!state.use_distributed()) return bytes;
  agree(state, CallFingerprint::of(op, CallFingerprint::kBroadcast, at::Tensor(), src));
  auto run = [&](at::Tensor t) {
    std::vector<at::Tensor> buf{to_comm(state, t)};
    c10d::BroadcastOptions opts;
    opts.rootRank = src;
    wait(state, op, group(state, op).broadcast(buf, opts));
    return buf[0].cpu();
  };
  const int64_t length =
      run(at::full({1}, static_cast<int64_t>(bytes.size()), at::kLong)).item<int64_t>();
  auto buf = at::zeros({std::max<int64_t>(length, 1)}, at::kByte);
  if (state.process_index() == src) std::memcpy(buf.data_ptr(), bytes.data(), bytes.size());
  auto got = run(buf);
  return std::string(static_cast<const char*>(got.data_ptr()), static_cast<size_t>(length));
}

void barrier(const PartialState& state, const char* op) {
  if (!state.use_distributed()) return;
  // Agreeing is itself a barrier: it returns once every process stated the same call.
  agree(state, CallFingerprint::of(op, CallFingerprint::kBarrier, at::Tensor()));
}

}  // namespace accelerate::detail
