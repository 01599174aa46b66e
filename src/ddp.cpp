#include "accelerate/ddp.h"

#include "accelerate/detail/collectives.h"
#include "accelerate/detail/direct_gloo.h"
#include "fsdp_core.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <map>
#include <mutex>
#include <sstream>
#include <tuple>
#include <unordered_set>
#include <utility>

// How the processes agree at the end of backward (see finalize()):
//
// Without a communication hook, every bucket carries, after its gradients, one extra element per
// parameter: 1 if this process contributes a gradient for it, 0 otherwise. The all-reduce that
// averages the gradients sums those flags too, so after waiting every process knows, for every
// parameter, how many processes used it -- without any extra collective. finalize() always launches
// every bucket (a missing gradient counts as zeros), so all processes issue the same all-reduces in
// the same order, and all of them then see the same flags and take the same decision: average,
// leave a globally unused parameter alone, or throw the same error naming the same parameters. A
// hook's compression would garble the flags, so with a hook they travel in one small all-reduce of
// their own at the end of backward.
//
// Where the gradients go: each one is divided by the number of processes while it is copied into
// its bucket slice, as soon as autograd produced it (one pass; DDP does the same). With
// gradient_as_bucket_view the slice then becomes the parameter's .grad, so the fresh gradient is
// freed at once and nothing is copied back after the all-reduce.

namespace accelerate {
namespace detail {
namespace {

constexpr const char* kBackwardOp = "backward (gradient all-reduce)";
constexpr const char* kCheckOp = "GradientSynchronizer (parameter check)";
constexpr const char* kBroadcastOp = "GradientSynchronizer (broadcast from process 0)";
constexpr const char* kBuffersOp = "broadcast_buffers";
constexpr int64_t kMiB = 1024 * 1024;
// Tensors packed into a byte buffer start at multiples of this, so that viewing a slice back as
// the tensor's dtype is aligned for every dtype.
constexpr int64_t kByteAlign = 16;

compat::Backend& group(const PartialState& state, const char* op) {
  compat::Backend* pg = state.process_group();
  TORCH_CHECK(pg != nullptr, "accelerate: '", op, "' on process ", state.process_index(),
              ": the process group was destroyed");
  return *pg;
}

c10::Device comm_device(const PartialState& state, const c10::Device& tensor_device) {
  return state.backend() == "nccl" ? tensor_device : c10::Device(c10::kCPU);
}

// Gloo in LibTorch 1.13 cannot reduce bfloat16; 16-bit gradients are averaged in float32 on Gloo,
// which also loses less precision than summing in 16 bits.
c10::ScalarType bucket_dtype(const PartialState& state, c10::ScalarType t) {
  if (state.backend() != "nccl" && (t == at::kBFloat16 || t == at::kHalf)) return at::kFloat;
  return t;
}

int64_t round_up(int64_t n, int64_t to) {
  return (n + to - 1) / to * to;
}

uint64_t fnv1a(const std::string& text) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : text) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return h;
}

// What must agree across processes for the buckets and broadcasts to line up. Names are left out
// of the hash (like DDP, only shapes matter) but kept for the error message.
std::string shape_key(const at::Tensor& t, bool parameter) {
  std::ostringstream out;
  out << (parameter ? "parameter " : "buffer ") << t.scalar_type() << " " << t.sizes() << " "
      << c10::DeviceTypeName(t.device().type(), /*lower_case=*/true)
      << (parameter && t.requires_grad() ? " requires_grad" : "");
  return out.str();
}

// Copies process 0's `tensors` to every process: their bytes are packed into buffers of at most
// `cap_bytes` (a tensor larger than that gets its own), all broadcasts are launched, then waited.
void broadcast_packed(const PartialState& state, const char* op,
                      const std::vector<at::Tensor>& tensors, int64_t cap_bytes) {
  if (!state.use_distributed()) return;
  torch::NoGradGuard no_grad;
  struct Chunk {
    c10::Device device{c10::kCPU};
    std::vector<std::pair<at::Tensor, int64_t>> parts;  // tensor, byte offset
    int64_t bytes = 0;
    at::Tensor buffer;
    c10::intrusive_ptr<compat::Work> work;
  };
  std::vector<Chunk> chunks;
  for (const auto& t : tensors) {
    if (t.numel() == 0) continue;
    const c10::Device device = comm_device(state, t.device());
    const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
    const bool fits = !chunks.empty() && chunks.back().device == device &&
                      round_up(chunks.back().bytes, kByteAlign) + bytes <= cap_bytes;
    if (!fits) chunks.emplace_back().device = device;
    Chunk& chunk = chunks.back();
    const int64_t offset = round_up(chunk.bytes, kByteAlign);
    chunk.parts.emplace_back(t, offset);
    chunk.bytes = offset + bytes;
  }
  const bool main = state.is_main_process();
  for (auto& chunk : chunks) {
    chunk.buffer =
        at::empty({chunk.bytes}, at::TensorOptions().dtype(at::kByte).device(chunk.device));
    if (main) {
      for (const auto& [t, offset] : chunk.parts) {
        const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
        chunk.buffer.narrow(0, offset, bytes)
            .copy_(t.detach().contiguous().reshape({-1}).view(at::kByte));
      }
    }
    std::vector<at::Tensor> bufs{chunk.buffer};
    c10d::BroadcastOptions opts;
    opts.rootRank = 0;
    chunk.work = group(state, op).broadcast(bufs, opts);
  }
  for (auto& chunk : chunks) detail::wait(state, op, chunk.work);
  if (main) return;
  for (const auto& chunk : chunks) {
    for (const auto& [t, offset] : chunk.parts) {
      const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
      t.detach().copy_(chunk.buffer.narrow(0, offset, bytes).view(t.scalar_type()).view(t.sizes()));
    }
  }
}

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// One small all_gather proves every process has the same tensors before anything is sent whose
// size depends on them; a mismatch would otherwise hang or corrupt. Only when they differ, a
// second gather of the names finds the first difference for the message.
void check_same_tensors(const PartialState& state, const NamedTensors& all_params,
                        const NamedTensors& all_buffers) {
  std::ostringstream text;
  for (const auto& [name, t] : all_params) text << shape_key(t, true) << "\n";
  for (const auto& [name, t] : all_buffers) text << shape_key(t, false) << "\n";
  auto mine = at::empty({3}, at::kLong);
  mine[0] = static_cast<int64_t>(all_params.size());
  mine[1] = static_cast<int64_t>(all_buffers.size());
  mine[2] = static_cast<int64_t>(fnv1a(text.str()));
  auto all = all_gather(state, kCheckOp, mine);
  bool same = true;
  for (const auto& t : all) same = same && at::equal(t, all[0]);
  if (!same) {
    // Every process saw the mismatch, so every process gets here and joins this gather.
    std::ostringstream named;
    for (const auto& [name, t] : all_params)
      named << "'" << name << "' " << shape_key(t, true) << "\n";
    for (const auto& [name, t] : all_buffers)
      named << "'" << name << "' " << shape_key(t, false) << "\n";
    auto lists = all_gather_bytes(state, kCheckOp, named.str());
    auto lines = [](const std::string& s) {
      std::vector<std::string> out;
      std::istringstream in(s);
      for (std::string line; std::getline(in, line);) out.push_back(line);
      return out;
    };
    const auto reference = lines(lists[0]);
    std::ostringstream msg;
    msg << "accelerate: GradientSynchronizer: the model differs between processes; every "
           "process must build the same model before it is synchronized.";
    for (size_t r = 1; r < lists.size(); ++r) {
      const auto other = lines(lists[r]);
      if (other == reference) continue;
      size_t k = 0;
      while (k < reference.size() && k < other.size() && reference[k] == other[k]) ++k;
      msg << "\n  process " << r << " has " << all[r][0].item<int64_t>() << " parameters and "
          << all[r][1].item<int64_t>() << " buffers (process 0: " << all[0][0].item<int64_t>()
          << " and " << all[0][1].item<int64_t>() << "); first difference: process 0 "
          << (k < reference.size() ? reference[k] : "<none>") << " vs process " << r << " "
          << (k < other.size() ? other[k] : "<none>");
    }
    TORCH_CHECK(false, msg.str());
  }
}

// True when `grad` already is `slice` (a bucket view), so no copy is needed.
bool is_bucket_view(const at::Tensor& grad, const at::Tensor& slice) {
  return grad.defined() && grad.device() == slice.device() &&
         grad.scalar_type() == slice.scalar_type() && grad.is_contiguous() &&
         grad.numel() == slice.numel() && grad.data_ptr() == slice.data_ptr();
}

using Clock = std::chrono::steady_clock;

double seconds(Clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

// `world` as a 0-dim tensor that type promotion treats like a Python number, so dividing a
// float16 gradient by it stays float16, exactly as `grad.div_(world)` would.
at::Tensor divisor(int64_t world) {
  auto d = at::scalar_tensor(static_cast<double>(world), at::kDouble);
  d.unsafeGetTensorImpl()->set_wrapped_number(true);
  return d;
}

}  // namespace

// Shared between the synchronizer, its hooks (through weak_ptr, so they are harmless once it is
// gone) and the engine callbacks it queues.
struct SyncCore : std::enable_shared_from_this<SyncCore> {
  struct Param {
    at::Tensor tensor;
    std::string name;
    size_t bucket = 0;
    int64_t offset = 0;  // in elements, in the bucket buffer
    int64_t numel = 0;
    bool ready = false;  // its hook fired in the current synchronized backward
    bool used = false;   // its hook fired since the last synchronization (no_sync included)
  };
  struct Bucket {
    std::vector<size_t> params;
    c10::ScalarType dtype = at::kFloat;
    c10::Device device{c10::kCPU};  // of its parameters
    int64_t grad_numel = 0;
    // [grad_numel gradients | one used-flag per parameter]; when sharding, the gradients are
    // padded to world * shard_numel before the flags.
    at::Tensor buffer;
    int64_t flag_offset = 0;
    // ZeRO sharding: process r owns gradient elements [r * shard_numel, (r + 1) * shard_numel).
    int64_t shard_numel = 0;
    at::Tensor received;  // the world's contributions to this process's shard (alltoall)
    at::Tensor shard;     // this process's averaged shard, after finalize()
    size_t pending = 0;
    // Small enough for DirectGloo's exchange: sent on the calling thread when backward ends,
    // when everything is ready anyway, instead of through a worker.
    bool exchange = false;
    bool launched = false;
    bool protected_this_iteration = false;
    c10::intrusive_ptr<compat::Work> work;
    std::shared_ptr<DirectWork> direct_work;
    std::unique_ptr<GradBucket> hook_bucket;
    CommHookFinish finish;
    // When its communication started and (as far as we can tell) ended, for stats().
    Clock::time_point launch_time;
    std::shared_ptr<std::atomic<int64_t>> done_ns;
  };

  std::shared_ptr<torch::nn::Module> module;
  std::shared_ptr<PartialState> state;
  DistributedDataParallelKwargs kwargs;
  CommHook hook;
  bool distributed = false;
  bool as_view = false;  // gradient_as_bucket_view
  // ZeRO stage of gradient sharding: 0 all-reduces; 1 and 2 reduce-scatter each bucket, and 2
  // also drops the full buckets once this process's shard is out.
  int shard_stage = 0;
  at::Tensor world_divisor;
  std::vector<Param> params;
  std::vector<Bucket> buckets;
  std::vector<std::pair<std::shared_ptr<torch::autograd::Node>, uintptr_t>> hooks;
  std::atomic<int64_t> launched{0};
  // Parameters that no process used in the last synchronization (find_unused_parameters).
  std::vector<bool> unused;

  // Hooks run on the thread calling backward for the CPU but on device threads for CUDA.
  mutable std::mutex mutex;
  bool require_sync = true;
  bool pending = false;  // a synchronized backward started and is not finalized
  bool ever_synchronized = false;
  size_t next_launch = 0;
  uint64_t iteration = 0;  // advanced by every reset, so a stale callback cannot reset a new one

  SyncStats stats;

  void on_gradient(size_t index);
  // Puts parameter `p`'s gradient into its bucket slice (divided by the number of processes
  // unless a hook does the averaging), in one pass.
  void fill_slice(Param& p, Bucket& b);
  // Whether `p`'s .grad can be a view of `b` (same dtype and device).
  bool viewable(const Param& p, const Bucket& b) const;
  // Without gradient_as_bucket_view: moves `b` to new memory if something outside holds a
  // gradient view of it, so that writing the bucket does not change what they hold.
  void protect_outside_references(Bucket& b);
  void launch(size_t index);
  void launch_reduce_scatter(Bucket& bucket);
  void finish_reduce_scatter(Bucket& bucket);
  // The full bucket, allocated again after stage 2 dropped it.
  void ensure_buffer(Bucket& bucket);
  void allocate_buffers();
  void finalize();
  void abandon(uint64_t iteration) noexcept;
  void reset_iteration();
  void record_stats(Clock::time_point compute_end, Clock::time_point end);
};

namespace {

// Shared by the copies of the callback queued on the engine. A backward pass that fails drops its
// callbacks without running them; the last copy's destruction then abandons that iteration, so
// that the next backward starts clean instead of finding half of its parameters already ready.
struct CallbackToken {
  CallbackToken(std::weak_ptr<SyncCore> core, uint64_t iteration)
      : core(std::move(core)), iteration(iteration) {}
  CallbackToken(const CallbackToken&) = delete;
  CallbackToken& operator=(const CallbackToken&) = delete;
  ~CallbackToken() {
    if (ran) return;
    if (auto c = core.lock()) c->abandon(iteration);
  }
  std::weak_ptr<SyncCore> core;
  uint64_t iteration;
  bool ran = false;
};

class ReadyHook final : public torch::autograd::FunctionPostHook {
 public:
  ReadyHook(std::weak_ptr<SyncCore> core, size_t index) : core_(std::move(core)), index_(index) {}
  torch::autograd::variable_list operator()(
      const torch::autograd::variable_list& outputs,
      const torch::autograd::variable_list& /*inputs*/) override {
    if (auto core = core_.lock()) core->on_gradient(index_);
    return outputs;
  }

 private:
  std::weak_ptr<SyncCore> core_;
  size_t index_;
};

}  // namespace

void SyncCore::on_gradient(size_t index) {
  std::lock_guard<std::mutex> lock(mutex);
  Param& p = params[index];
  p.used = true;
  if (!require_sync) return;
  if (!pending) {
    // Runs once the whole backward pass is done, whichever parameters it reached.
    auto token = std::make_shared<CallbackToken>(weak_from_this(), iteration);
    torch::autograd::Engine::get_default_engine().queue_callback([token] {
      token->ran = true;
      if (auto core = token->core.lock()) core->finalize();
    });
    pending = true;
  }
  TORCH_CHECK(!p.ready, "accelerate: GradientSynchronizer: parameter '", p.name,
              "' received a gradient twice before the gradients were averaged: two backward passes "
              "through the model overlap (reentrant backward is not supported)");
  p.ready = true;
  // Copied now, while the gradient is hot in cache and the bucket waits for its other members;
  // as a bucket view the fresh gradient is freed at once and its memory reused in this backward.
  {
    torch::NoGradGuard no_grad;
    fill_slice(p, buckets[p.bucket]);
  }
  // Buckets complete in any order but are launched in a fixed order: Gloo pairs the collectives
  // of different processes by their position in the sequence.
  if (--buckets[p.bucket].pending == 0) {
    while (next_launch < buckets.size() && buckets[next_launch].pending == 0) {
      launch(next_launch++);
    }
  }
}

bool SyncCore::viewable(const Param& p, const Bucket& b) const {
  return b.buffer.device() == b.device && b.dtype == p.tensor.scalar_type();
}

void SyncCore::protect_outside_references(Bucket& b) {
  // Gradients handed out earlier are views of the bucket. Anything still holding one, other
  // than the parameters' own .grad, expects it to keep its value (as with a copied gradient):
  // the bucket moves to new memory and leaves the old one to them. Counted by storage
  // references: the buffer holds one, each installed view one, anything else is outside.
  int64_t expected = 1;
  std::vector<size_t> installed;
  for (size_t i : b.params) {
    const Param& q = params[i];
    if (is_bucket_view(q.tensor.grad(), b.buffer.narrow(0, q.offset, q.numel))) {
      ++expected;
      installed.push_back(i);
    }
  }
  if (static_cast<int64_t>(b.buffer.storage().use_count()) <= expected) return;
  b.buffer = b.buffer.clone();
  for (size_t i : installed) {
    Param& q = params[i];
    q.tensor.mutable_grad() = b.buffer.narrow(0, q.offset, q.numel).view(q.tensor.sizes()).detach();
  }
}

void SyncCore::fill_slice(Param& p, Bucket& b) {
  ensure_buffer(b);
  if (!b.protected_this_iteration) {
    b.protected_this_iteration = true;
    // Stage 1's shard is a view of the bucket, about to be overwritten; holding it is no
    // reason to move the bucket.
    if (shard_stage == 1) b.shard = at::Tensor();
    if (!as_view) protect_outside_references(b);
  }
  at::Tensor slice = b.buffer.narrow(0, p.offset, p.numel);
  const at::Tensor& grad = p.tensor.grad();
  // Like DDP, a parameter without a gradient this time still contributes what its .grad holds
  // (e.g. what no_sync steps accumulated), or zeros.
  if (!grad.defined()) {
    slice.zero_();
    return;
  }
  TORCH_CHECK(!grad.is_sparse(), "accelerate: GradientSynchronizer: parameter '", p.name,
              "' has a sparse gradient, which is not supported (use a dense embedding)");
  if (is_bucket_view(grad, slice)) {
    if (p.ready || as_view) {
      // Autograd accumulated into the bucket itself: only the division is left.
      if (!hook) slice.div_(world_divisor);
      return;
    }
    // A parameter this backward did not reach keeps its .grad unchanged if no process used it
    // (finalize()), so the bucket must not be divided in place under it.
    p.tensor.mutable_grad() = grad.clone();
  }
  const at::Tensor& source = p.tensor.grad();
  at::Tensor out = slice.view(source.sizes());
  if (hook) {
    out.copy_(source);
  } else if (source.device() == out.device() && source.scalar_type() == out.scalar_type()) {
    // Copy and divide in one pass. (Other dtypes are converted first, so that 16-bit
    // gradients are divided in the bucket's float32.)
    at::div_out(out, source, world_divisor);
  } else {
    out.copy_(source).div_(world_divisor);
  }
  // The bucket is the gradient from now on: the fresh gradient is freed here, during backward,
  // and nothing is copied back at the end. Not for a parameter this backward did not reach:
  // its .grad stays its own until finalize() knows whether any process used it.
  if (p.ready && viewable(p, b)) {
    // detach(): an autograd view would make Optimizer::zero_grad()'s detach_() throw.
    p.tensor.mutable_grad() = out.detach();
  }
}

void SyncCore::launch(size_t index) {
  Bucket& bucket = buckets[index];
  torch::NoGradGuard no_grad;
  std::vector<float> flags;
  flags.reserve(bucket.params.size());
  for (size_t i : bucket.params) {
    Param& p = params[i];
    if (!p.ready) fill_slice(p, bucket);
    // Each flag is chosen so that the decision finalize() takes on it is "is the sum zero?",
    // which stays exact in any dtype and for any number of processes.
    const bool flag = kwargs.find_unused_parameters ? p.used : !p.ready;
    flags.push_back(flag ? 1.0F : 0.0F);
  }
  ensure_buffer(bucket);
  bucket.buffer.narrow(0, bucket.flag_offset, static_cast<int64_t>(flags.size()))
      .copy_(at::from_blob(flags.data(), {static_cast<int64_t>(flags.size())}, at::kFloat));
  bucket.launched = true;
  bucket.launch_time = Clock::now();
  bucket.done_ns = std::make_shared<std::atomic<int64_t>>(0);
  launched.fetch_add(1);
  if (shard_stage > 0) {
    launch_reduce_scatter(bucket);
    return;
  }
  if (hook) {
    std::vector<at::Tensor> tensors;
    std::vector<std::string> names;
    std::vector<int64_t> offsets;
    for (size_t i : bucket.params) {
      tensors.push_back(params[i].tensor);
      names.push_back(params[i].name);
      offsets.push_back(params[i].offset);
    }
    bucket.hook_bucket = std::make_unique<GradBucket>(
        state, index, index + 1 == buckets.size(), bucket.buffer.narrow(0, 0, bucket.grad_numel),
        std::move(tensors), std::move(names), std::move(offsets));
    bucket.finish = hook(*bucket.hook_bucket);
    return;
  }
  DirectGloo* direct = state->direct();
  // A small bucket costs a round trip, not bandwidth: finalize() sends it on this thread, when
  // backward is over and every process is about to wait anyway. So does the last bucket when
  // it is small enough for an exchange: nothing is left to overlap it with.
  bucket.exchange =
      direct != nullptr && (DirectGloo::small(bucket.buffer) ||
                            (index + 1 == buckets.size() && direct->exchangeable(bucket.buffer)));
  if (bucket.exchange) return;
  auto done = bucket.done_ns;
  auto stamp = [done] {
    done->store(
        std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
            .count());
  };
  if (direct != nullptr && DirectGloo::ringable(bucket.buffer)) {
    bucket.direct_work = direct->ring_allreduce(bucket.buffer, bucket.buffer, c10d::ReduceOp::SUM);
  } else {
    std::vector<at::Tensor> bufs{bucket.buffer};
    bucket.work = group(*state, kBackwardOp).allreduce(bufs);
    if (auto future = bucket.work->getFuture()) {
      future->addCallback([stamp](c10::ivalue::Future&) { stamp(); });
    }
  }
}

void SyncCore::reset_iteration() {
  for (auto& p : params) {
    p.ready = false;
    p.used = false;
  }
  for (auto& b : buckets) {
    b.pending = b.params.size();
    // A collective abandoned after an error may still write into its buffer; the next
    // iteration must not share it.
    if ((b.work && !b.work->isCompleted()) || (b.direct_work && !b.direct_work->completed())) {
      if (b.buffer.defined()) b.buffer = at::zeros_like(b.buffer);
      b.received = at::Tensor();
    }
    b.work.reset();
    b.direct_work.reset();
    b.hook_bucket.reset();
    b.finish = nullptr;
    b.launched = false;
    b.protected_this_iteration = false;
  }
  next_launch = 0;
  pending = false;
  ++iteration;
}

void SyncCore::abandon(uint64_t failed_iteration) noexcept {
  try {
    std::lock_guard<std::mutex> lock(mutex);
    if (pending && iteration == failed_iteration) reset_iteration();
  } catch (...) {
    // Called from a destructor: if even this fails, the next backward reports the broken state.
  }
}

void SyncCore::record_stats(Clock::time_point compute_end, Clock::time_point end) {
  // The communication "channel" is busy over the union of [launch, done] of every bucket; the
  // part of that union before backward's compute ended was hidden behind it.
  std::vector<std::pair<Clock::time_point, Clock::time_point>> spans;
  for (const auto& b : buckets) {
    if (!b.launched) continue;
    Clock::time_point done = end;
    if (b.direct_work) {
      done = b.direct_work->completed_at();
    } else if (b.done_ns && b.done_ns->load() > 0) {
      done = Clock::time_point(std::chrono::nanoseconds(b.done_ns->load()));
    }
    spans.emplace_back(b.launch_time, std::max(b.launch_time, done));
  }
  std::sort(spans.begin(), spans.end());
  double busy = 0;
  double hidden = 0;
  for (size_t i = 0; i < spans.size();) {
    auto [from, to] = spans[i];
    for (++i; i < spans.size() && spans[i].first <= to; ++i) to = std::max(to, spans[i].second);
    busy += seconds(to - from);
    if (from < compute_end) hidden += seconds(std::min(to, compute_end) - from);
  }
  stats.synchronized_steps += 1;
  stats.communication_seconds += busy;
  stats.hidden_seconds += hidden;
  stats.exposed_seconds += seconds(end - compute_end);
}

void SyncCore::allocate_buffers() {
  const int64_t world = state->num_processes();
  for (auto& b : buckets) {
    b.shard_numel = shard_stage > 0 ? (b.grad_numel + world - 1) / world : 0;
    b.flag_offset = shard_stage > 0 ? b.shard_numel * world : b.grad_numel;
    b.buffer = at::Tensor();
    b.shard = at::Tensor();
    ensure_buffer(b);
  }
}

void SyncCore::ensure_buffer(Bucket& b) {
  if (b.buffer.defined()) return;
  const auto options = at::TensorOptions().dtype(b.dtype).device(comm_device(*state, b.device));
  const int64_t size = b.flag_offset + static_cast<int64_t>(b.params.size());
  if (shard_stage == 0) {
    b.buffer = at::zeros({size}, options);
    return;
  }
  // Every gradient slice and flag is written before a launch; only the padding of the last
  // shard must not hold stale values (they are summed, then ignored, but must stay finite).
  b.buffer = at::empty({size}, options);
  b.buffer.narrow(0, b.grad_numel, b.flag_offset - b.grad_numel).zero_();
}

void SyncCore::launch_reduce_scatter(Bucket& b) {
  const int64_t world = state->num_processes();
  at::Tensor input = b.buffer.narrow(0, 0, b.shard_numel * world);
  auto& backend = group(*state, kBackwardOp);
  auto done = b.done_ns;
  if (state->backend() == "nccl") {
    // NCCL has the real collective; the result is this process's shard, summed.
    b.received = at::empty({b.shard_numel}, input.options());
    b.work = backend._reduce_scatter_base(b.received, input);
  } else {
    // Gloo has no reduce_scatter (LibTorch 1.13 throws): an alltoall sends part j of the bucket
    // to process j, which sums what it receives. Same bytes on the wire as a ring
    // reduce-scatter; benchmarks/bench_reduce_scatter compares the ways to build it.
    b.received = at::empty({b.shard_numel * world}, input.options());
    std::vector<int64_t> output_splits;
    std::vector<int64_t> input_splits;
    b.work = backend.alltoall_base(b.received, input, output_splits, input_splits);
  }
  if (auto future = b.work->getFuture()) {
    future->addCallback([done](c10::ivalue::Future&) {
      done->store(
          std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
              .count());
    });
  }
}

void SyncCore::finish_reduce_scatter(Bucket& b) {
  detail::wait(*state, kBackwardOp, b.work);
  const int64_t world = state->num_processes();
  const int64_t rank = state->process_index();
  const int64_t begin = std::min(b.grad_numel, rank * b.shard_numel);
  const int64_t length = std::min(b.grad_numel, begin + b.shard_numel) - begin;
  // Summed in rank order, the same on every process.
  at::Tensor summed = b.received.numel() == b.shard_numel
                          ? b.received
                          : b.received.view({world, b.shard_numel}).sum(0);
  if (shard_stage == 1) {
    // The full bucket stays (ZeRO-1 keeps gradients whole); its own part now holds the average.
    at::Tensor own = b.buffer.narrow(0, begin, length);
    own.copy_(summed.narrow(0, 0, length));
    b.shard = own;
  } else {
    b.shard = summed.narrow(0, 0, length);
  }
  b.received = at::Tensor();
}

void SyncCore::finalize() {
  std::lock_guard<std::mutex> lock(mutex);
  if (!pending) return;
  const auto compute_end = Clock::now();
  struct Reset {
    SyncCore* core;
    ~Reset() {
      try {
        core->reset_iteration();
      } catch (...) {
        // Only allocation can fail here; the error being unwound, if any, matters more.
      }
    }
  } reset{this};
  torch::NoGradGuard no_grad;
  ever_synchronized = true;

  while (next_launch < buckets.size()) launch(next_launch++);
  for (auto& b : buckets) {
    if (shard_stage > 0) {
      finish_reduce_scatter(b);
    } else if (b.finish) {
      b.finish();
      // A hook may have put its result in a tensor of its own rather than into the buffer.
      const at::Tensor grads = b.buffer.narrow(0, 0, b.grad_numel);
      const at::Tensor& result = b.hook_bucket->buffer();
      TORCH_CHECK(result.defined() && result.numel() == b.grad_numel,
                  "accelerate: communication hook: bucket ", &b - buckets.data(), " must hold ",
                  b.grad_numel, " elements after the hook, not ",
                  result.defined() ? result.numel() : 0);
      if (!result.is_same(grads) && result.data_ptr() != grads.data_ptr()) grads.copy_(result);
    } else if (b.exchange) {
      b.launch_time = Clock::now();  // deferred until now: nothing of it was hidden
      state->direct()->exchange_allreduce_(b.buffer, c10d::ReduceOp::SUM, kBackwardOp);
      b.done_ns->store(
          std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
              .count());
    } else if (b.direct_work) {
      detail::wait(*state, kBackwardOp, b.direct_work);
    } else {
      detail::wait(*state, kBackwardOp, b.work);
    }
  }

  // Summed over processes: how many used each parameter (find_unused_parameters), or how many
  // did not (otherwise). Without a hook the flags rode along in the buckets; a hook's
  // compression would garble them, so then they travel in one small all-reduce of their own.
  std::vector<int64_t> flag_sums(params.size(), 0);
  if (hook || shard_stage > 0) {
    auto flags = at::empty({static_cast<int64_t>(params.size())}, at::kFloat);
    for (const auto& b : buckets) {
      auto tail = b.buffer.narrow(0, b.flag_offset, static_cast<int64_t>(b.params.size())).cpu();
      for (size_t k = 0; k < b.params.size(); ++k) {
        flags[static_cast<int64_t>(b.params[k])] = tail[static_cast<int64_t>(k)];
      }
    }
    at::Tensor on_wire = flags.to(comm_device(*state, state->device()));
    all_reduce_(*state, kBackwardOp, on_wire, c10d::ReduceOp::SUM);
    flags = on_wire.cpu();
    auto acc = flags.accessor<float, 1>();
    for (size_t i = 0; i < params.size(); ++i) {
      flag_sums[i] = std::llround(acc[static_cast<int64_t>(i)]);
    }
  } else {
    for (const auto& b : buckets) {
      auto counts = b.buffer.narrow(0, b.flag_offset, static_cast<int64_t>(b.params.size()))
                        .to(at::kCPU, at::kDouble);
      auto acc = counts.accessor<double, 1>();
      for (size_t k = 0; k < b.params.size(); ++k) {
        flag_sums[b.params[k]] = std::llround(acc[static_cast<int64_t>(k)]);
      }
    }
  }
  const int64_t world = state->num_processes();
  if (!kwargs.find_unused_parameters) {
    std::ostringstream missing;
    size_t count = 0;
    for (size_t i = 0; i < params.size(); ++i) {
      if (flag_sums[i] == 0) continue;
      missing << (count++ == 0 ? "" : ", ") << "'" << params[i].name << "' (on " << flag_sums[i]
              << " of " << world << " processes" << (params[i].ready ? "" : ", this one included")
              << ")";
    }
    TORCH_CHECK(count == 0, "accelerate: GradientSynchronizer: ", count,
                count == 1 ? " parameter" : " parameters",
                " received no gradient in this backward pass: ", missing.str(),
                ". With find_unused_parameters=false every trainable parameter must take part in "
                "the loss on every process. Set DistributedDataParallelKwargs::"
                "find_unused_parameters = true, or call requires_grad_(false) on parameters you "
                "do not train. The gradients of this step were not averaged.");
  }

  unused.assign(params.size(), false);
  for (size_t i = 0; i < params.size(); ++i) {
    unused[i] = kwargs.find_unused_parameters && flag_sums[i] == 0;
  }
  if (shard_stage == 2) {
    // Only this process's shard of the average is kept; the full buckets go, and with them the
    // gradients that were views of them.
    for (auto& b : buckets) {
      for (size_t i : b.params) {
        if (!unused[i]) params[i].tensor.mutable_grad().reset();
      }
      b.buffer = at::Tensor();
    }
    record_stats(compute_end, Clock::now());
    return;
  }
  for (const auto& b : buckets) {
    for (size_t i : b.params) {
      Param& p = params[i];
      // As DDP: a parameter that no process used keeps its .grad as it was (often undefined).
      if (kwargs.find_unused_parameters && flag_sums[i] == 0) continue;
      at::Tensor slice = b.buffer.narrow(0, p.offset, p.numel).view(p.tensor.sizes());
      at::Tensor& grad = p.tensor.mutable_grad();
      if (is_bucket_view(grad, slice)) continue;
      if (viewable(p, b)) {
        grad = slice.detach();
      } else if (grad.defined()) {
        grad.copy_(slice);
      } else {
        grad = slice.to(p.tensor.device(), p.tensor.scalar_type(), /*non_blocking=*/false,
                        /*copy=*/true);
      }
    }
  }
  record_stats(compute_end, Clock::now());
}

}  // namespace detail

// ---------------------------------------------------------------------- NoSyncGuard

NoSyncGuard::NoSyncGuard(std::weak_ptr<detail::SyncCore> core, bool previous)
    : core_(std::move(core)), previous_(previous) {}

NoSyncGuard::NoSyncGuard(NoSyncGuard&& other) noexcept
    : core_(std::move(other.core_)), previous_(other.previous_) {
  other.core_.reset();
}

NoSyncGuard::~NoSyncGuard() {
  if (auto core = core_.lock()) {
    std::lock_guard<std::mutex> lock(core->mutex);
    core->require_sync = previous_;
  }
}

// ---------------------------------------------------------------------- GradientSynchronizer

GradientSynchronizer::GradientSynchronizer(std::shared_ptr<torch::nn::Module> module,
                                           std::shared_ptr<PartialState> state,
                                           DistributedDataParallelKwargs kwargs)
    : kwargs_(kwargs), core_(std::make_shared<detail::SyncCore>()) {
  TORCH_CHECK(module != nullptr, "accelerate: GradientSynchronizer: the module is null");
  TORCH_CHECK(state != nullptr, "accelerate: GradientSynchronizer: the state is null");
  TORCH_CHECK(std::isfinite(kwargs.bucket_cap_mb) && kwargs.bucket_cap_mb > 0,
              "accelerate: GradientSynchronizer: bucket_cap_mb must be positive, got ",
              kwargs.bucket_cap_mb);
  auto& core = *core_;
  core.module = module;
  core.state = state;
  core.kwargs = kwargs;
  core.distributed = state->use_distributed();
  core.as_view = kwargs.gradient_as_bucket_view;
  core.world_divisor = detail::divisor(state->num_processes());
  // A hook of one's own, or Accelerate's named ones (validated even with one process, so that
  // a configuration error shows on the first single-process run).
  core.hook = kwargs.comm_hook_fn
                  ? kwargs.comm_hook_fn
                  : make_comm_hook(kwargs.comm_hook, kwargs.comm_wrapper, kwargs.comm_state_option);
  TORCH_CHECK(
      !(kwargs.comm_hook_fn && kwargs.comm_hook != DDPCommunicationHookType::NO),
      "accelerate: DistributedDataParallelKwargs: give comm_hook or comm_hook_fn, not both");

  // Tied weights appear under several names; each tensor is synchronized once, under its first.
  std::unordered_set<const c10::TensorImpl*> seen;
  detail::NamedTensors all_params;
  for (const auto& item : module->named_parameters(/*recurse=*/true)) {
    if (seen.insert(item.value().unsafeGetTensorImpl()).second) {
      all_params.emplace_back(item.key(), item.value());
    }
  }
  detail::NamedTensors all_buffers;
  for (const auto& item : module->named_buffers(/*recurse=*/true)) {
    if (seen.insert(item.value().unsafeGetTensorImpl()).second) {
      all_buffers.emplace_back(item.key(), item.value());
    }
  }

  const int64_t cap_bytes = std::max<int64_t>(
      1, static_cast<int64_t>(kwargs.bucket_cap_mb * static_cast<double>(detail::kMiB)));

  if (core.distributed) {
    detail::check_same_tensors(*state, all_params, all_buffers);
    std::vector<at::Tensor> tensors;
    for (const auto& [name, t] : all_params) tensors.push_back(t);
    for (const auto& [name, t] : all_buffers) tensors.push_back(t);
    detail::broadcast_packed(*state, detail::kBroadcastOp, tensors, cap_bytes);
  }

  // Buckets, by DDP's rule: trainable parameters in reverse registration order (gradients
  // become ready roughly in that order), split by dtype and device; a bucket is closed by the
  // parameter that brings it to its cap (that parameter included), the first of each kind at
  // min(1 MiB, cap) so that communication starts early in backward, later ones at the cap.
  // Buckets are launched in the order they closed, then the partly filled ones in the order of
  // their first parameter.
  const int64_t first_cap = std::min(cap_bytes, detail::kMiB);
  struct Open {
    std::vector<size_t> params;  // indices into core.params
    int64_t bytes = 0;
    int64_t limit = 0;
    c10::ScalarType dtype = at::kFloat;
    c10::Device device{c10::kCPU};
  };
  std::map<std::tuple<int, int, int>, Open> open;
  std::vector<Open> closed;
  std::vector<std::tuple<int, int, int>> open_order;
  for (auto it = all_params.rbegin(); it != all_params.rend(); ++it) {
    const auto& [name, t] = *it;
    if (!t.requires_grad()) continue;
    TORCH_CHECK(t.is_floating_point(), "accelerate: GradientSynchronizer: parameter '", name,
                "' has dtype ", t.scalar_type(), "; only floating-point parameters are supported");
    const auto dtype = detail::bucket_dtype(*state, t.scalar_type());
    const auto key = std::make_tuple(static_cast<int>(dtype), static_cast<int>(t.device().type()),
                                     static_cast<int>(t.device().index()));
    auto found = open.find(key);
    if (found == open.end()) {
      found = open.emplace(key, Open{{}, 0, first_cap, dtype, t.device()}).first;
    }
    Open& o = found->second;
    if (o.params.empty()) open_order.push_back(key);
    detail::SyncCore::Param p;
    p.tensor = t;
    p.name = name;
    p.numel = t.numel();
    o.params.push_back(core.params.size());
    core.params.push_back(std::move(p));
    o.bytes += t.numel() * static_cast<int64_t>(c10::elementSize(dtype));
    if (o.bytes >= o.limit) {
      closed.push_back(o);
      o.params.clear();
      o.bytes = 0;
      o.limit = cap_bytes;
      open_order.erase(std::find(open_order.begin(), open_order.end(), key));
    }
  }
  for (const auto& key : open_order) closed.push_back(open[key]);
  for (const auto& o : closed) {
    detail::SyncCore::Bucket bucket;
    bucket.dtype = o.dtype;
    bucket.device = o.device;
    for (size_t i : o.params) {
      auto& p = core.params[i];
      p.bucket = core.buckets.size();
      p.offset = bucket.grad_numel;
      bucket.grad_numel += p.numel;
      bucket.params.push_back(i);
    }
    core.buckets.push_back(std::move(bucket));
  }
  for (auto& b : core.buckets) b.pending = b.params.size();
  if (!core.distributed) return;

  core.allocate_buffers();
  // The synchronizer keeps the accumulators alive: a parameter's accumulator is otherwise freed
  // with the graph, and the next forward would create one without our hook.
  for (size_t i = 0; i < core.params.size(); ++i) {
    auto accumulator = torch::autograd::impl::grad_accumulator(core.params[i].tensor);
    TORCH_CHECK(accumulator != nullptr, "accelerate: GradientSynchronizer: parameter '",
                core.params[i].name, "' is not a leaf tensor that requires grad");
    const uintptr_t key = accumulator->add_post_hook(std::make_unique<detail::ReadyHook>(core_, i));
    core.hooks.emplace_back(std::move(accumulator), key);
  }
}

GradientSynchronizer::GradientSynchronizer(std::shared_ptr<torch::nn::Module> module,
                                           std::shared_ptr<PartialState> state,
                                           const FullyShardedOptions& options)
    : core_(std::make_shared<detail::SyncCore>()) {
  TORCH_CHECK(module != nullptr, "accelerate: GradientSynchronizer: the module is null");
  TORCH_CHECK(state != nullptr, "accelerate: GradientSynchronizer: the state is null");
  // The SyncCore holds no parameters here: it keeps the require_sync flag that no_sync guards
  // and the Accelerator already drive.
  core_->module = module;
  core_->state = state;
  core_->distributed = state->use_distributed();
  core_->shard_stage = 3;
  std::weak_ptr<detail::SyncCore> flags = core_;
  full_ = std::make_shared<detail::FullShardCore>(module, state, options, [flags] {
    auto core = flags.lock();
    if (!core) return true;
    std::lock_guard<std::mutex> lock(core->mutex);
    return core->require_sync;
  });
  full_->setup();
}

GradientSynchronizer::~GradientSynchronizer() {
  if (!core_) return;
  std::lock_guard<std::mutex> lock(core_->mutex);
  for (auto& [node, key] : core_->hooks) node->del_post_hook(key);
  core_->hooks.clear();
}

void GradientSynchronizer::finalize() {
  if (full_) {
    full_->finalize();
    return;
  }
  core_->finalize();
}

void GradientSynchronizer::set_require_sync(bool require_sync) {
  std::lock_guard<std::mutex> lock(core_->mutex);
  core_->require_sync = require_sync;
}

bool GradientSynchronizer::require_sync() const {
  std::lock_guard<std::mutex> lock(core_->mutex);
  return core_->require_sync;
}

NoSyncGuard GradientSynchronizer::no_sync() {
  std::lock_guard<std::mutex> lock(core_->mutex);
  NoSyncGuard guard(core_, core_->require_sync);
  core_->require_sync = false;
  return guard;
}

void GradientSynchronizer::broadcast_buffers() {
  if (!core_->distributed) return;
  std::vector<at::Tensor> buffers;
  std::unordered_set<const c10::TensorImpl*> seen;
  for (const auto& b : core_->module->buffers(/*recurse=*/true)) {
    if (seen.insert(b.unsafeGetTensorImpl()).second) buffers.push_back(b);
  }
  const auto cap_bytes = std::max<int64_t>(
      1, static_cast<int64_t>(kwargs_.bucket_cap_mb * static_cast<double>(detail::kMiB)));
  detail::broadcast_packed(*core_->state, detail::kBuffersOp, buffers, cap_bytes);
}

bool GradientSynchronizer::active() const {
  return core_->distributed;
}

std::vector<std::vector<std::string>> GradientSynchronizer::bucket_parameter_names() const {
  std::vector<std::vector<std::string>> out;
  if (full_) {
    for (const auto& u : full_->units) {
      auto& names = out.emplace_back();
      for (size_t i : u.params) names.push_back(full_->params[i].name);
    }
    return out;
  }
  for (const auto& b : core_->buckets) {
    auto& names = out.emplace_back();
    for (size_t i : b.params) names.push_back(core_->params[i].name);
  }
  return out;
}

void GradientSynchronizer::register_comm_hook(CommHook hook) {
  TORCH_CHECK(hook != nullptr, "accelerate: register_comm_hook: the hook is empty");
  std::lock_guard<std::mutex> lock(core_->mutex);
  TORCH_CHECK(!core_->hook,
              "accelerate: register_comm_hook: a communication hook is already "
              "registered (from DistributedDataParallelKwargs or an earlier call); DDP allows one");
  TORCH_CHECK(!core_->ever_synchronized && !core_->pending,
              "accelerate: register_comm_hook must be called before the first synchronized "
              "backward pass");
  core_->hook = std::move(hook);
}

SyncStats GradientSynchronizer::stats() const {
  std::lock_guard<std::mutex> lock(core_->mutex);
  return core_->stats;
}

void GradientSynchronizer::reset_stats() {
  std::lock_guard<std::mutex> lock(core_->mutex);
  core_->stats = SyncStats{};
}

size_t GradientSynchronizer::num_buckets() const {
  if (full_) return full_->units.size();
  return core_->buckets.size();
}

int64_t GradientSynchronizer::num_allreduces_launched() const {
  return core_->launched.load();
}

void GradientSynchronizer::shard_gradients(int stage) {
  TORCH_CHECK(!full_ || stage == 3,
              "accelerate: GradientSynchronizer::shard_gradients: this model is fully sharded "
              "(stage 3)");
  if (full_) return;
  TORCH_CHECK(stage >= 0 && stage <= 2,
              "accelerate: GradientSynchronizer::shard_gradients: stage must be 0, 1 or 2, got ",
              stage);
  std::lock_guard<std::mutex> lock(core_->mutex);
  TORCH_CHECK(!core_->ever_synchronized && !core_->pending,
              "accelerate: GradientSynchronizer::shard_gradients must be called before the first "
              "synchronized backward pass");
  TORCH_CHECK(
      stage == 0 || !core_->hook,
      "accelerate: communication hooks (DistributedDataParallelKwargs::comm_hook) cannot be "
      "combined with ZeRO gradient sharding");
  core_->shard_stage = stage;
  if (core_->distributed) core_->allocate_buffers();
}

int GradientSynchronizer::gradient_sharding_stage() const {
  return core_->shard_stage;
}

std::vector<at::Tensor> GradientSynchronizer::parameters() const {
  std::vector<at::Tensor> out;
  if (full_) {
    for (const auto& p : full_->params) out.push_back(p.tensor);
    return out;
  }
  for (const auto& p : core_->params) out.push_back(p.tensor);
  return out;
}

std::vector<GradientBucketLayout> GradientSynchronizer::bucket_layout() const {
  std::vector<GradientBucketLayout> out;
  if (full_) {
    for (const auto& u : full_->units) {
      auto& layout = out.emplace_back();
      layout.dtype = u.dtype;
      layout.numel = u.numel;
      layout.shard_numel = u.shard_numel;
      for (size_t i : u.params) {
        layout.params.push_back(i);
        layout.offsets.push_back(full_->params[i].offset);
      }
    }
    return out;
  }
  const int64_t world = core_->state->num_processes();
  for (const auto& b : core_->buckets) {
    auto& layout = out.emplace_back();
    layout.dtype = b.dtype;
    layout.numel = b.grad_numel;
    layout.shard_numel = (b.grad_numel + world - 1) / world;
    for (size_t i : b.params) {
      layout.params.push_back(i);
      layout.offsets.push_back(core_->params[i].offset);
    }
  }
  return out;
}

at::Tensor GradientSynchronizer::gradient_shard(size_t bucket) const {
  if (full_) {
    std::lock_guard<std::recursive_mutex> lock(full_->mutex);
    TORCH_CHECK(bucket < full_->units.size(), "accelerate: gradient_shard: unit ", bucket,
                " out of range");
    return full_->units[bucket].grad_shard;
  }
  std::lock_guard<std::mutex> lock(core_->mutex);
  TORCH_CHECK(bucket < core_->buckets.size(), "accelerate: gradient_shard: bucket ", bucket,
              " out of range");
  return core_->buckets[bucket].shard;
}

void GradientSynchronizer::release_gradient_shards() {
  if (full_) {
    std::lock_guard<std::recursive_mutex> lock(full_->mutex);
    for (auto& u : full_->units) u.grad_shard = at::Tensor();
    return;
  }
  std::lock_guard<std::mutex> lock(core_->mutex);
  for (auto& b : core_->buckets) b.shard = at::Tensor();
}

at::Tensor GradientSynchronizer::parameter_shard(size_t bucket) const {
  if (!full_) return {};
  std::lock_guard<std::recursive_mutex> lock(full_->mutex);
  TORCH_CHECK(bucket < full_->units.size(), "accelerate: parameter_shard: unit ", bucket,
              " out of range");
  return full_->units[bucket].shard;
}

void GradientSynchronizer::parameters_updated() {
  if (full_) full_->parameters_updated();
}

bool GradientSynchronizer::parameter_unused(size_t index) const {
  if (full_) return false;
  std::lock_guard<std::mutex> lock(core_->mutex);
  return index < core_->unused.size() && core_->unused[index];
}

}  // namespace accelerate
