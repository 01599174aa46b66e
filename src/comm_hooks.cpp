#include "accelerate/comm_hooks.h"

#include "accelerate/detail/collectives.h"
#include "accelerate/detail/direct_gloo.h"
#include "accelerate/logging.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cmath>
#include <map>
#include <sstream>
#include <utility>

namespace accelerate {

namespace {

constexpr const char* kHookOp = "backward (communication hook)";

c10::Device comm_device(const PartialState& state, const at::Tensor& t) {
  return state.backend() == "nccl" ? t.device() : c10::Device(c10::kCPU);
}

}  // namespace

std::string to_string(DDPCommunicationHookType type) {
  switch (type) {
    case DDPCommunicationHookType::NO:
      return "no";
    case DDPCommunicationHookType::FP16:
      return "fp16";
    case DDPCommunicationHookType::BF16:
      return "bf16";
    case DDPCommunicationHookType::POWER_SGD:
      return "power_sgd";
    case DDPCommunicationHookType::BATCHED_POWER_SGD:
      return "batched_power_sgd";
  }
  return "?";
}

DDPCommunicationHookType comm_hook_type_from_string(const std::string& name) {
  for (auto t : {DDPCommunicationHookType::NO, DDPCommunicationHookType::FP16,
                 DDPCommunicationHookType::BF16, DDPCommunicationHookType::POWER_SGD,
                 DDPCommunicationHookType::BATCHED_POWER_SGD}) {
    if (to_string(t) == name) return t;
  }
  TORCH_CHECK(false, "accelerate: unknown communication hook \"", name,
              "\"; known: no, fp16, bf16, power_sgd, batched_power_sgd");
}

// ---------------------------------------------------------------------- PendingCollective

void PendingCollective::wait() {
  if (!state_) return;
  if (direct_) detail::wait(*state_, kHookOp, direct_);
  if (work_) detail::wait(*state_, kHookOp, work_);
  if (carrier_.defined()) target_.copy_(carrier_);
  direct_.reset();
  work_.reset();
  carrier_ = at::Tensor();
  target_ = at::Tensor();
  state_.reset();
}

// ---------------------------------------------------------------------- GradBucket

GradBucket::GradBucket(std::shared_ptr<const PartialState> state, size_t index, bool is_last,
                       at::Tensor buffer, std::vector<at::Tensor> parameters,
                       std::vector<std::string> names, std::vector<int64_t> offsets)
    : state_(std::move(state)),
      index_(index),
      is_last_(is_last),
      buffer_(std::move(buffer)),
      parameters_(std::move(parameters)),
      names_(std::move(names)),
      offsets_(std::move(offsets)) {
  TORCH_CHECK(state_ != nullptr, "accelerate: GradBucket: the state is null");
  TORCH_CHECK(parameters_.size() == offsets_.size() && names_.size() == offsets_.size(),
              "accelerate: GradBucket: parameters, names and offsets differ in length");
}

std::vector<at::Tensor> GradBucket::gradients() const {
  std::vector<at::Tensor> out;
  out.reserve(parameters_.size());
  for (size_t i = 0; i < parameters_.size(); ++i) {
    out.push_back(
        buffer_.narrow(0, offsets_[i], parameters_[i].numel()).view(parameters_[i].sizes()));
  }
  return out;
}

GradBucket GradBucket::with_buffer(at::Tensor buffer) const {
  TORCH_CHECK(buffer.defined() && buffer.numel() == buffer_.numel() && buffer.dim() == 1,
              "accelerate: GradBucket::with_buffer: the new buffer must be flat with ",
              buffer_.numel(), " elements");
  return GradBucket(state_, index_, is_last_, std::move(buffer), parameters_, names_, offsets_);
}

PendingCollective GradBucket::all_reduce(const at::Tensor& t) const {
  PendingCollective pending;
  if (!state_->use_distributed()) return pending;
  TORCH_CHECK(t.is_contiguous() && t.device() == comm_device(*state_, t),
              "accelerate: GradBucket::all_reduce needs a contiguous tensor on the communication "
              "device (",
              comm_device(*state_, t), "), got one on ", t.device());
  pending.state_ = state_;
  if (detail::DirectGloo* direct = state_->direct(); direct != nullptr && t.device().is_cpu()) {
    at::Tensor mutable_t = t;
    // Small ones complete here, on this thread (a round trip); the rest go to the ring worker.
    if (detail::DirectGloo::small(t)) {
      direct->exchange_allreduce_(mutable_t, c10d::ReduceOp::SUM, kHookOp);
      pending.state_.reset();
      return pending;
    }
    if (detail::DirectGloo::ringable(t)) {
      pending.direct_ = direct->ring_allreduce(t, t, c10d::ReduceOp::SUM);
      return pending;
    }
  }
  at::Tensor wire = t;
  // Gloo in LibTorch 1.13 reduces no bfloat16: it travels as float32 and is rounded back.
  if (state_->backend() != "nccl" && t.scalar_type() == at::kBFloat16) {
    wire = t.to(at::kFloat);
    pending.target_ = t;
    pending.carrier_ = wire;
  }
  std::vector<at::Tensor> bufs{wire};
  compat::Backend* pg = state_->process_group();
  TORCH_CHECK(pg != nullptr, "accelerate: '", kHookOp, "': the process group was destroyed");
  pending.work_ = pg->allreduce(bufs);
  return pending;
}

// ---------------------------------------------------------------------- simple hooks

CommHook allreduce_hook() {
  return [](GradBucket& bucket) -> CommHookFinish {
    bucket.buffer().div_(bucket.num_processes());
    auto pending = bucket.all_reduce(bucket.buffer());
    return [pending]() mutable { pending.wait(); };
  };
}

namespace {

// Casts the bucket to `dtype`, averages, casts back into the bucket.
CommHook compress_hook(c10::ScalarType dtype) {
  return [dtype](GradBucket& bucket) -> CommHookFinish {
    // Divided (in the bucket's precision) and narrowed in one pass.
    at::Tensor compressed =
        at::empty(bucket.buffer().sizes(), bucket.buffer().options().dtype(dtype));
    auto world = at::scalar_tensor(static_cast<double>(bucket.num_processes()), at::kDouble);
    world.unsafeGetTensorImpl()->set_wrapped_number(true);
    at::div_out(compressed, bucket.buffer(), world);
    auto pending = bucket.all_reduce(compressed);
    return [&bucket, compressed, pending]() mutable {
      pending.wait();
      bucket.buffer().copy_(compressed);
    };
  };
}

// Runs `hook` on a `dtype` copy of the bucket; its result is cast back into the bucket.
CommHook compress_wrapper(c10::ScalarType dtype, CommHook hook) {
  TORCH_CHECK(hook != nullptr, "accelerate: a compression wrapper needs a hook to wrap");
  return [dtype, hook = std::move(hook)](GradBucket& bucket) -> CommHookFinish {
    auto inner = std::make_shared<GradBucket>(bucket.with_buffer(bucket.buffer().to(dtype)));
    CommHookFinish finish = hook(*inner);
    return [&bucket, inner, finish]() {
      if (finish) finish();
      bucket.buffer().copy_(inner->buffer());
    };
  };
}

}  // namespace

CommHook fp16_compress_hook() {
  return compress_hook(at::kHalf);
}

CommHook bf16_compress_hook() {
  return compress_hook(at::kBFloat16);
}

CommHook fp16_compress_wrapper(CommHook hook) {
  return compress_wrapper(at::kHalf, std::move(hook));
}

CommHook bf16_compress_wrapper(CommHook hook) {
  return compress_wrapper(at::kBFloat16, std::move(hook));
}

// ---------------------------------------------------------------------- PowerSGD

PowerSGDState::PowerSGDState(PowerSGDOptions options)
    : options_(options), rng_(options.random_seed) {
  TORCH_CHECK(options_.matrix_approximation_rank >= 1,
              "accelerate: PowerSGD: matrix_approximation_rank must be >= 1, got ",
              options_.matrix_approximation_rank);
  TORCH_CHECK(options_.start_powerSGD_iter >= 0,
              "accelerate: PowerSGD: start_powerSGD_iter must be >= 0, got ",
              options_.start_powerSGD_iter);
  TORCH_CHECK(options_.min_compression_rate >= 0 && std::isfinite(options_.min_compression_rate),
              "accelerate: PowerSGD: min_compression_rate must be a finite number >= 0, got ",
              options_.min_compression_rate);
  TORCH_CHECK(options_.orthogonalization_epsilon >= 0,
              "accelerate: PowerSGD: orthogonalization_epsilon must be >= 0, got ",
              options_.orthogonalization_epsilon);
  options_.compression_stats_logging_frequency =
      std::max<int64_t>(1, options_.compression_stats_logging_frequency);
}

double PowerSGDState::compression_rate() const {
  return numel_after_ > 0 ? static_cast<double>(numel_before_) / static_cast<double>(numel_after_)
                          : 0.0;
}

// The hooks' access to the state (kept out of the public interface).
struct PowerSGDAccess {
  PowerSGDState& s;

  const PowerSGDOptions& opt() const { return s.options_; }

  // Advanced after the last bucket of each step, as PyTorch's maybe_increase_iter.
  void maybe_increase_iter(const GradBucket& bucket) {
    if (bucket.is_last()) ++s.iter_;
  }

  void report(const GradBucket& bucket) {
    if (!bucket.is_last() || s.iter_ < s.next_stats_report_) return;
    std::ostringstream out;
    out << "PowerSGD compression stats: iter " << s.iter_ << ", total before compression "
        << s.numel_before_ << ", total after compression " << s.numel_after_ << ", rate "
        << s.compression_rate();
    get_logger(bucket.state(), "accelerate.powerSGD").info(out.str());
    s.next_stats_report_ = s.iter_ + s.options_.compression_stats_logging_frequency;
  }

  // A generator every process seeds alike, so the random starting Q is the same everywhere.
  at::Generator fresh_generator() {
    return at::make_generator<at::CPUGeneratorImpl>(s.rng_() % 1000000000ULL);
  }

  // Error feedback: add last step's compression error, keep a copy of what was compressed.
  at::Tensor apply_error_feedback(size_t index, at::Tensor& input) {
    if (!s.options_.use_error_feedback) return at::Tensor();
    auto it = s.error_.find(index);
    if (it != s.error_.end() && it->second.numel() == input.numel()) {
      input.add_(it->second);
    } else {
      s.error_[index] = at::zeros_like(input);
    }
    return input.clone();
  }

  void keep_error(size_t index, const at::Tensor& before, const at::Tensor& after) {
    if (s.options_.use_error_feedback) s.error_[index] = before - after;
  }

  std::map<size_t, at::Tensor>& p() { return s.p_memory_; }
  std::map<size_t, at::Tensor>& q() { return s.q_memory_; }
  int64_t& before() { return s.numel_before_; }
  int64_t& after() { return s.numel_after_; }
  int64_t iter() const { return s.iter_; }
};

namespace {

// LibTorch's CPU kernels lack matrix products (and norms) in float16: on the CPU, 16-bit
// matrices (a compression wrapper's) are computed in float32 and stored back.
bool compute_wide(const at::Tensor& t) {
  return t.is_cpu() && (t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16);
}

// out = a @ b, batched (3-d) or not.
void matmul_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  if (compute_wide(out)) {
    out.copy_(at::matmul(a.to(at::kFloat), b.to(at::kFloat)));
  } else if (out.dim() == 3) {
    at::bmm_out(out, a, b);
  } else {
    at::matmul_out(out, a, b);
  }
}

void orthogonalize_in_place(at::Tensor m, double epsilon);

// Orthogonalizes the columns of each matrix in `m` (batch x rows x cols), in place: Gram-Schmidt
// for rank <= 2 and 16-bit types (as PyTorch), QR otherwise.
void orthogonalize(at::Tensor m, double epsilon) {
  if (compute_wide(m)) {
    at::Tensor wide = m.to(at::kFloat);
    orthogonalize_in_place(wide, epsilon);
    m.copy_(wide);
    return;
  }
  orthogonalize_in_place(m, epsilon);
}

void orthogonalize_in_place(at::Tensor m, double epsilon) {
  TORCH_INTERNAL_ASSERT(m.dim() == 3 && m.size(2) <= m.size(1));
  const int64_t cols = m.size(2);
  if (cols <= 2 || m.scalar_type() == at::kHalf || m.scalar_type() == at::kBFloat16) {
    for (int64_t i = 0; i < cols; ++i) {
      at::Tensor col = m.narrow(2, i, 1);
      at::Tensor norm = at::linalg_vector_norm(col, 2, {1}, /*keepdim=*/true);
      // As PyTorch: with epsilon 0 an all-zero column gives NaNs rather than an error.
      if (epsilon != 0) norm = norm + epsilon;
      col.div_(norm);
      if (i + 1 < cols) {
        at::Tensor rest = m.narrow(2, i + 1, cols - i - 1);
        rest.sub_(at::sum(col * rest, {1}, /*keepdim=*/true) * col);
      }
    }
  } else {
    auto [q, r] = at::linalg_qr(m);
    m.copy_(q);
  }
}

bool should_compress(int64_t rows, int64_t cols, int64_t rank, double min_rate) {
  return static_cast<double>((rows + cols) * rank) * min_rate < static_cast<double>(rows * cols);
}

}  // namespace

CommHook powerSGD_hook(std::shared_ptr<PowerSGDState> state) {
  TORCH_CHECK(state != nullptr, "accelerate: powerSGD_hook: the state is null");
  return [state](GradBucket& bucket) -> CommHookFinish {
    PowerSGDAccess access{*state};
    const int world = bucket.num_processes();
    at::Tensor& input = bucket.buffer();
    if (access.iter() < access.opt().start_powerSGD_iter) {
      access.maybe_increase_iter(bucket);
      return allreduce_hook()(bucket);
    }
    const size_t index = bucket.index();
    const auto& opt = access.opt();
    const at::Tensor before = access.apply_error_feedback(index, input);

    // Matrices (2 dims or more, viewed as rows x rest) worth compressing, and the rest.
    std::vector<at::Tensor> to_compress;
    std::vector<at::Tensor> uncompressed;
    int64_t p_size = 0;
    int64_t q_size = 0;
    for (const at::Tensor& grad : bucket.gradients()) {
      at::Tensor matrix = grad.dim() == 0 ? grad.view({1, 1}) : grad.view({grad.size(0), -1});
      const int64_t n = matrix.size(0);
      const int64_t m = matrix.size(1);
      const int64_t rank = std::min({n, m, opt.matrix_approximation_rank});
      access.before() += n * m;
      if (should_compress(n, m, rank, opt.min_compression_rate)) {
        to_compress.push_back(matrix);
        p_size += n * rank;
        q_size += m * rank;
        access.after() += (n + m) * rank;
      } else {
        uncompressed.push_back(grad);
        access.after() += n * m;
      }
    }
    access.report(bucket);

    std::vector<at::Tensor> flat;
    for (const auto& t : uncompressed) flat.push_back(t.reshape({-1}));
    at::Tensor uncompressed_memory = flat.empty() ? at::empty({0}, input.options()) : at::cat(flat);

    bool randomize_q = false;
    if (!opt.warm_start || access.p().count(index) == 0 || access.p()[index].numel() != p_size) {
      randomize_q = true;
      access.p()[index] = at::empty({p_size}, input.options());
      access.q()[index] = at::empty({q_size}, input.options());
    }
    // Same-shaped matrices may be batched into one product.
    std::map<std::vector<int64_t>, std::vector<at::Tensor>> by_shape;
    std::vector<std::vector<int64_t>> shape_order;
    for (const auto& t : to_compress) {
      auto key = t.sizes().vec();
      if (by_shape.count(key) == 0) shape_order.push_back(key);
      by_shape[key].push_back(t);
    }
    struct Group {
      at::Tensor matrices;  // batch x n x m
      std::vector<at::Tensor> originals;
      at::Tensor p;  // batch x n x r, view of the P memory
      at::Tensor q;  // batch x m x r, view of the Q memory
    };
    auto groups = std::make_shared<std::vector<Group>>();
    int64_t p_at = 0;
    int64_t q_at = 0;
    for (const auto& key : shape_order) {
      auto& same = by_shape[key];
      std::vector<std::vector<at::Tensor>> batches;
      if (opt.batch_tensors_with_same_shape) {
        batches.push_back(same);
      } else {
        for (const auto& t : same) batches.push_back({t});
      }
      for (auto& batch : batches) {
        Group g;
        g.originals = batch;
        g.matrices = batch.size() == 1 ? batch[0].unsqueeze(0) : at::stack(batch);
        const int64_t b = g.matrices.size(0);
        const int64_t n = g.matrices.size(1);
        const int64_t m = g.matrices.size(2);
        const int64_t rank = std::min({n, m, opt.matrix_approximation_rank});
        g.p = access.p()[index].narrow(0, p_at, b * n * rank).view({b, n, rank});
        g.q = access.q()[index].narrow(0, q_at, b * m * rank).view({b, m, rank});
        p_at += b * n * rank;
        q_at += b * m * rank;
        groups->push_back(std::move(g));
      }
    }
    if (!randomize_q) {
      for (auto& g : *groups) orthogonalize(g.q, opt.orthogonalization_epsilon);
    } else {
      at::Generator gen = access.fresh_generator();
      for (auto& g : *groups) {
        // Drawn in float32 on the CPU (as PyTorch draws on the CPU), whatever the bucket's type.
        g.q.copy_(at::randn(g.q.sizes(), gen, at::TensorOptions().dtype(at::kFloat)));
        orthogonalize(g.q, opt.orthogonalization_epsilon);
      }
    }
    for (auto& g : *groups) matmul_into(g.p, g.matrices, g.q);

    // Both go out now, in this order on every process; the rest happens at the end of backward.
    auto pending_uncompressed = bucket.all_reduce(uncompressed_memory);
    at::Tensor p_memory = access.p()[index];
    auto pending_p = bucket.all_reduce(p_memory);

    return [state, &bucket, index, world, before, groups, uncompressed, uncompressed_memory,
            pending_uncompressed, pending_p, p_memory]() mutable {
      PowerSGDAccess access{*state};
      const auto& opt = access.opt();
      pending_uncompressed.wait();
      uncompressed_memory.div_(world);
      int64_t at = 0;
      for (auto& t : uncompressed) {
        t.copy_(uncompressed_memory.narrow(0, at, t.numel()).view_as(t));
        at += t.numel();
      }
      pending_p.wait();
      for (auto& g : *groups) orthogonalize(g.p, opt.orthogonalization_epsilon);
      for (auto& g : *groups) matmul_into(g.q, g.matrices.transpose(1, 2), g.p);
      at::Tensor q_memory = access.q()[index];
      auto pending_q = bucket.all_reduce(q_memory);
      pending_q.wait();
      q_memory.div_(world);
      for (auto& g : *groups) {
        matmul_into(g.matrices, g.p, g.q.transpose(1, 2));
        // A batch made by stacking is a copy: its rows go back to their gradients.
        if (g.originals.size() > 1) {
          for (size_t i = 0; i < g.originals.size(); ++i) {
            g.originals[i].copy_(g.matrices[static_cast<int64_t>(i)]);
          }
        }
      }
      access.keep_error(index, before, bucket.buffer());
      if (!opt.warm_start) {
        access.p().clear();
        access.q().clear();
      }
      access.maybe_increase_iter(bucket);
    };
  };
}

CommHook batched_powerSGD_hook(std::shared_ptr<PowerSGDState> state) {
  TORCH_CHECK(state != nullptr, "accelerate: batched_powerSGD_hook: the state is null");
  return [state](GradBucket& bucket) -> CommHookFinish {
    PowerSGDAccess access{*state};
    const int world = bucket.num_processes();
    if (access.iter() < access.opt().start_powerSGD_iter) {
      access.maybe_increase_iter(bucket);
      return allreduce_hook()(bucket);
    }
    const auto& opt = access.opt();
    const size_t index = bucket.index();
    const int64_t length = bucket.buffer().numel();
    const auto side = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(length))));
    const int64_t rank = std::min(side, opt.matrix_approximation_rank);
    access.before() += length;
    access.after() += side * rank * 2;
    access.report(bucket);
    // The bucket, zero-padded to a square.
    at::Tensor padded = at::zeros({side * side}, bucket.buffer().options());
    padded.narrow(0, 0, length).copy_(bucket.buffer());
    const at::Tensor before = access.apply_error_feedback(index, padded);
    at::Tensor matrix = padded.view({side, side});
    if (!opt.warm_start || access.p().count(index) == 0 || access.p()[index].size(0) != side) {
      at::Generator gen = access.fresh_generator();
      access.p()[index] = at::empty({side, rank}, padded.options());
      access.q()[index] =
          at::randn({side, rank}, gen, at::TensorOptions().dtype(at::kFloat)).to(padded.options());
    }
    at::Tensor p = access.p()[index];
    at::Tensor q = access.q()[index];
    orthogonalize(q.unsqueeze(0), opt.orthogonalization_epsilon);
    matmul_into(p, matrix, q);
    auto pending_p = bucket.all_reduce(p);
    return
        [state, &bucket, index, world, length, padded, matrix, before, p, q, pending_p]() mutable {
          PowerSGDAccess access{*state};
          const auto& opt = access.opt();
          pending_p.wait();
          orthogonalize(p.unsqueeze(0), opt.orthogonalization_epsilon);
          matmul_into(q, matrix.t(), p);
          auto pending_q = bucket.all_reduce(q);
          pending_q.wait();
          q.div_(world);
          matmul_into(matrix, p, q.t());
          access.keep_error(index, before, padded);
          bucket.buffer().copy_(padded.narrow(0, 0, length));
          if (!opt.warm_start) {
            access.p().clear();
            access.q().clear();
          }
          access.maybe_increase_iter(bucket);
        };
  };
}

CommHook make_comm_hook(DDPCommunicationHookType hook, DDPCommunicationHookType wrapper,
                        const PowerSGDOptions& options) {
  TORCH_CHECK(wrapper == DDPCommunicationHookType::NO ||
                  wrapper == DDPCommunicationHookType::FP16 ||
                  wrapper == DDPCommunicationHookType::BF16,
              "accelerate: comm_wrapper must be \"no\", \"fp16\" or \"bf16\", got \"",
              to_string(wrapper), "\"");
  TORCH_CHECK(wrapper == DDPCommunicationHookType::NO || hook != DDPCommunicationHookType::NO,
              "accelerate: comm_wrapper \"", to_string(wrapper),
              "\" wraps a communication hook, but comm_hook is \"no\"");
  CommHook made;
  switch (hook) {
    case DDPCommunicationHookType::NO:
      return {};
    case DDPCommunicationHookType::FP16:
      made = fp16_compress_hook();
      break;
    case DDPCommunicationHookType::BF16:
      made = bf16_compress_hook();
      break;
    case DDPCommunicationHookType::POWER_SGD:
      made = powerSGD_hook(std::make_shared<PowerSGDState>(options));
      break;
    case DDPCommunicationHookType::BATCHED_POWER_SGD:
      made = batched_powerSGD_hook(std::make_shared<PowerSGDState>(options));
      break;
  }
  if (wrapper == DDPCommunicationHookType::FP16) return fp16_compress_wrapper(std::move(made));
  if (wrapper == DDPCommunicationHookType::BF16) return bf16_compress_wrapper(std::move(made));
  return made;
}

}  // namespace accelerate
