#include "accelerate/detail/collectives.h"

#include "accelerate/detail/direct_gloo.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <sstream>

namespace accelerate::detail {
namespace {

// The shape descriptor compared in debug mode: dtype, ndim, up to kMaxDims sizes, and a fold of
// any further sizes so tensors of very high rank are still compared exactly enough.
constexpr int64_t kMaxDims = 12;
constexpr int64_t kSlots = kMaxDims + 3;

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

at::Tensor descriptor(const at::Tensor& t) {
  auto d = at::zeros({kSlots}, at::kLong);
  auto acc = d.accessor<int64_t, 1>();
  acc[0] = static_cast<int64_t>(t.scalar_type());
  acc[1] = t.dim();
  int64_t fold = 0;
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i < kMaxDims) {
      acc[2 + i] = t.size(i);
    } else {
      fold = fold * 1000003 + t.size(i);
    }
  }
  acc[kSlots - 1] = fold;
  return d;
}

std::string describe(const at::Tensor& d) {
  auto acc = d.accessor<int64_t, 1>();
  std::ostringstream out;
  out << "shape [";
  for (int64_t i = 0; i < acc[1]; ++i) {
    if (i > 0) out << ", ";
    if (i < kMaxDims) {
      out << acc[2 + i];
    } else {
      out << "...";
      break;
    }
  }
  out << "] dtype " << c10::toString(static_cast<c10::ScalarType>(acc[0]));
  return out.str();
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

// Gloo's own timeout ends a stuck collective; this names what the user called, and where.
template <class Work>
void wait_naming(const PartialState& state, const char* op, const Work& work) {
  try {
    work->wait();
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "accelerate: collective '", op, "' failed on process ",
                state.process_index(), " of ", state.num_processes(), " (timeout ",
                std::chrono::duration<double>(state.timeout()).count(), " s): ", e.what());
  }
}

}  // namespace

void wait(const PartialState& state, const char* op, const c10::intrusive_ptr<compat::Work>& work) {
  wait_naming(state, op, work);
}

void wait(const PartialState& state, const char* op, const std::shared_ptr<DirectWork>& work) {
  wait_naming(state, op, work);
}

void verify_same_shape(const PartialState& state, const char* op, const at::Tensor& t) {
  if (!state.debug() || !state.use_distributed()) return;
  auto all = raw_all_gather(state, op, descriptor(t));
  bool same = true;
  for (const auto& d : all) same = same && at::equal(d.cpu(), all[0].cpu());
  if (same) return;
  std::ostringstream msg;
  msg << "accelerate: debug mode: '" << op
      << "' was called with tensors of different shapes on different processes:";
  for (size_t i = 0; i < all.size(); ++i) {
    msg << "\n  process " << i << ": " << describe(all[i].cpu());
  }
  msg << "\nEvery process must pass a tensor of the same shape (use pad_across_processes first "
         "for uneven sizes).";
  TORCH_CHECK(false, msg.str());
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
  verify_same_shape(state, op, buf);
  if (DirectGloo* direct = state.direct()) {
    // Small: one exchange on this thread. Large: Gloo's ring without ProcessGroupGloo's queue.
    if (direct->exchangeable(buf)) {
      direct->exchange_allreduce_(buf, reduce_op, op);
      return;
    }
    if (DirectGloo::ringable(buf)) {
      wait(state, op, direct->ring_allreduce(buf, buf, reduce_op));
      return;
    }
  }
  std::vector<at::Tensor> bufs{buf};
  c10d::AllreduceOptions opts;
  opts.reduceOp = reduce_op;
  wait(state, op, group(state, op).allreduce(bufs, opts));
}

at::Tensor all_reduce(const PartialState& state, const char* op, const at::Tensor& t,
                      c10d::ReduceOp reduce_op) {
  if (!state.use_distributed()) return t.clone();
  verify_same_shape(state, op, t);
  const auto dtype = reduce_dtype(t.scalar_type());
  if (DirectGloo* direct = state.direct(); direct != nullptr && t.device().is_cpu()) {
    // The ring reads `t` and writes a fresh tensor: the copy a reduction must make is folded
    // into the ring's first pass instead of made before it.
    const at::Tensor in = t.to(dtype).contiguous();
    at::Tensor out;
    if (direct->exchangeable(in)) {
      out = in.is_same(t) ? t.clone() : in;
      direct->exchange_allreduce_(out, reduce_op, op);
    } else if (DirectGloo::ringable(in)) {
      out = at::empty_like(in);
      wait(state, op, direct->ring_allreduce(in, out, reduce_op));
    }
    if (out.defined()) {
      if (t.scalar_type() == at::kBool) out = out.ne(0);
      return out.to(t.scalar_type());
    }
  }
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
  verify_same_shape(state, op, t);
  auto out = raw_all_gather(state, op, to_wire(t));
  for (auto& x : out) x = x.view(t.scalar_type()).to(t.device());
  return out;
}

at::Tensor broadcast(const PartialState& state, const char* op, const at::Tensor& t, int src) {
  TORCH_CHECK(src >= 0 && src < state.num_processes(), "accelerate: '", op, "': from_process ", src,
              " is outside [0, ", state.num_processes(), ")");
  if (!state.use_distributed()) return t.clone();
  verify_same_shape(state, op, t);
  std::vector<at::Tensor> buf{to_comm(state, to_wire(t)).clone()};
  c10d::BroadcastOptions opts;
  opts.rootRank = src;
  wait(state, op, group(state, op).broadcast(buf, opts));
  return buf[0].view(t.scalar_type()).to(t.device());
}

std::vector<std::string> all_gather_bytes(const PartialState& state, const char* op,
                                          const std::string& bytes) {
  if (!state.use_distributed()) return {bytes};
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
  wait(state, op, group(state, op).barrier());
}

}  // namespace accelerate::detail
