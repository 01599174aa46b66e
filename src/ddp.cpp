#include "accelerate/ddp.h"

#include "accelerate/detail/collectives.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <map>
#include <mutex>
#include <sstream>
#include <tuple>
#include <unordered_set>
#include <utility>

// How the processes agree at the end of backward (see finalize()):
//
// Every bucket carries, after its gradients, one extra element per parameter: 1 if this process
// contributes a gradient for it, 0 otherwise. The all-reduce that averages the gradients sums
// those flags too, so after waiting every process knows, for every parameter, how many processes
// used it -- without any extra collective. finalize() always launches every bucket (a missing
// gradient counts as zeros), so all processes issue the same all-reduces in the same order, and
// all of them then see the same flags and take the same decision: average, leave a globally
// unused parameter alone, or throw the same error naming the same parameters.

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

// True when `grad` already is `slice` (gradient_as_bucket_view), so no copy is needed.
bool is_bucket_view(const at::Tensor& grad, const at::Tensor& slice) {
  return grad.defined() && grad.device() == slice.device() &&
         grad.scalar_type() == slice.scalar_type() && grad.is_contiguous() &&
         grad.numel() == slice.numel() && grad.data_ptr() == slice.data_ptr();
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
    at::Tensor buffer;  // [grad_numel gradients | one used-flag per parameter]
    size_t pending = 0;
    c10::intrusive_ptr<compat::Work> work;
  };

  std::shared_ptr<torch::nn::Module> module;
  std::shared_ptr<PartialState> state;
  DistributedDataParallelKwargs kwargs;
  bool distributed = false;
  std::vector<Param> params;
  std::vector<Bucket> buckets;
  std::vector<std::pair<std::shared_ptr<torch::autograd::Node>, uintptr_t>> hooks;
  std::atomic<int64_t> launched{0};

  // Hooks run on the thread calling backward for the CPU but on device threads for CUDA.
  std::mutex mutex;
  bool require_sync = true;
  bool pending = false;  // a synchronized backward started and is not finalized
  size_t next_launch = 0;

  uint64_t iteration = 0;  // advanced by every reset, so a stale callback cannot reset a new one

  void on_gradient(size_t index);
  void launch(Bucket& bucket);
  void finalize();
  void abandon(uint64_t iteration) noexcept;
  void reset_iteration();
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
  // Buckets complete in any order but are launched in a fixed order: Gloo pairs the collectives
  // of different processes by their position in the sequence.
  if (--buckets[p.bucket].pending == 0) {
    while (next_launch < buckets.size() && buckets[next_launch].pending == 0) {
      launch(buckets[next_launch++]);
    }
  }
}

void SyncCore::launch(Bucket& bucket) {
  torch::NoGradGuard no_grad;
  std::vector<float> flags;
  flags.reserve(bucket.params.size());
  for (size_t i : bucket.params) {
    Param& p = params[i];
    at::Tensor slice = bucket.buffer.narrow(0, p.offset, p.numel);
    const at::Tensor& grad = p.tensor.grad();
    // Like DDP, a parameter without a gradient this time still contributes what its .grad holds
    // (e.g. what no_sync steps accumulated), or zeros.
    if (!grad.defined()) {
      slice.zero_();
    } else if (!is_bucket_view(grad, slice)) {
      TORCH_CHECK(!grad.is_sparse(), "accelerate: GradientSynchronizer: parameter '", p.name,
                  "' has a sparse gradient, which is not supported (use a dense embedding)");
      slice.view(grad.sizes()).copy_(grad);
    }
    // Each flag is chosen so that the decision finalize() takes on it is "is the sum zero?",
    // which stays exact in any dtype and for any number of processes.
    const bool flag = kwargs.find_unused_parameters ? p.used : !p.ready;
    flags.push_back(flag ? 1.0F : 0.0F);
  }
  bucket.buffer.narrow(0, 0, bucket.grad_numel).div_(state->num_processes());
  bucket.buffer.narrow(0, bucket.grad_numel, static_cast<int64_t>(flags.size()))
      .copy_(at::from_blob(flags.data(), {static_cast<int64_t>(flags.size())}, at::kFloat));
  std::vector<at::Tensor> bufs{bucket.buffer};
  bucket.work = group(*state, kBackwardOp).allreduce(bufs);
  launched.fetch_add(1);
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
    if (b.work) b.buffer = at::zeros_like(b.buffer);
    b.work.reset();
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

void SyncCore::finalize() {
  std::lock_guard<std::mutex> lock(mutex);
  if (!pending) return;
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

  while (next_launch < buckets.size()) launch(buckets[next_launch++]);
  for (auto& b : buckets) {
    detail::wait(*state, kBackwardOp, b.work);
    b.work.reset();
  }

  // Summed over processes: how many used each parameter (find_unused_parameters), or how many
  // did not (otherwise).
  std::vector<int64_t> flag_sums(params.size(), 0);
  for (const auto& b : buckets) {
    auto counts = b.buffer.narrow(0, b.grad_numel, static_cast<int64_t>(b.params.size()))
                      .to(at::kCPU, at::kDouble);
    auto acc = counts.accessor<double, 1>();
    for (size_t k = 0; k < b.params.size(); ++k) {
      flag_sums[b.params[k]] = std::llround(acc[static_cast<int64_t>(k)]);
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

  for (const auto& b : buckets) {
    const bool as_view = kwargs.gradient_as_bucket_view && b.buffer.device() == b.device;
    for (size_t i : b.params) {
      Param& p = params[i];
      // As DDP: a parameter that no process used keeps its .grad as it was (often undefined).
      if (kwargs.find_unused_parameters && flag_sums[i] == 0) continue;
      at::Tensor slice = b.buffer.narrow(0, p.offset, p.numel).view(p.tensor.sizes());
      at::Tensor& grad = p.tensor.mutable_grad();
      if (as_view && slice.scalar_type() == p.tensor.scalar_type()) {
        // detach(): an autograd view would make Optimizer::zero_grad()'s detach_() throw.
        grad = slice.detach();
      } else if (grad.defined()) {
        grad.copy_(slice);
      } else {
        grad = slice.to(p.tensor.device(), p.tensor.scalar_type(), /*non_blocking=*/false,
                        /*copy=*/true);
      }
    }
  }
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

  // Buckets: trainable parameters in reverse registration order (gradients become ready roughly
  // in that order), split by dtype and device. The first bucket of each kind is small so that
  // communication starts early in backward.
  const int64_t first_cap = std::min(cap_bytes, detail::kMiB);
  struct Open {
    size_t bucket;
    int64_t bytes;
    int64_t limit;
  };
  std::map<std::tuple<int, int, int>, Open> open;
  for (auto it = all_params.rbegin(); it != all_params.rend(); ++it) {
    const auto& [name, t] = *it;
    if (!t.requires_grad()) continue;
    TORCH_CHECK(t.is_floating_point(), "accelerate: GradientSynchronizer: parameter '", name,
                "' has dtype ", t.scalar_type(), "; only floating-point parameters are supported");
    const auto dtype = detail::bucket_dtype(*state, t.scalar_type());
    const auto key = std::make_tuple(static_cast<int>(dtype), static_cast<int>(t.device().type()),
                                     static_cast<int>(t.device().index()));
    const int64_t bytes = t.numel() * static_cast<int64_t>(c10::elementSize(dtype));
    auto found = open.find(key);
    if (found == open.end() ||
        (found->second.bytes > 0 && found->second.bytes + bytes > found->second.limit)) {
      const int64_t limit = found == open.end() ? first_cap : cap_bytes;
      detail::SyncCore::Bucket bucket;
      bucket.dtype = dtype;
      bucket.device = t.device();
      core.buckets.push_back(std::move(bucket));
      open[key] = Open{core.buckets.size() - 1, 0, limit};
    }
    Open& o = open[key];
    auto& bucket = core.buckets[o.bucket];
    detail::SyncCore::Param p;
    p.tensor = t;
    p.name = name;
    p.bucket = o.bucket;
    p.offset = bucket.grad_numel;
    p.numel = t.numel();
    bucket.grad_numel += p.numel;
    bucket.params.push_back(core.params.size());
    core.params.push_back(std::move(p));
    o.bytes += bytes;
  }
  for (auto& b : core.buckets) b.pending = b.params.size();
  if (!core.distributed) return;

  for (auto& b : core.buckets) {
    b.buffer =
        at::zeros({b.grad_numel + static_cast<int64_t>(b.params.size())},
                  at::TensorOptions().dtype(b.dtype).device(detail::comm_device(*state, b.device)));
  }
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

GradientSynchronizer::~GradientSynchronizer() {
  if (!core_) return;
  std::lock_guard<std::mutex> lock(core_->mutex);
  for (auto& [node, key] : core_->hooks) node->del_post_hook(key);
  core_->hooks.clear();
}

void GradientSynchronizer::finalize() {
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
  for (const auto& b : core_->buckets) {
    auto& names = out.emplace_back();
    for (size_t i : b.params) names.push_back(core_->params[i].name);
  }
  return out;
}

size_t GradientSynchronizer::num_buckets() const {
  return core_->buckets.size();
}

int64_t GradientSynchronizer::num_allreduces_launched() const {
  return core_->launched.load();
}

}  // namespace accelerate
