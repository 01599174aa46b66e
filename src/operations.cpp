#include "accelerate/operations.h"

#include "accelerate/detail/direct_gloo.h"

#include <torch/serialize.h>

#include <cmath>
#include <sstream>

namespace accelerate {
namespace {

std::string message_of(const std::exception& e) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) {
    return c10_error->what_without_backtrace();
  }
  return e.what();
}

}  // namespace

Reduction reduction_from_string(std::string_view name) {
  if (name == "mean") return Reduction::kMean;
  if (name == "sum") return Reduction::kSum;
  if (name == "none") return Reduction::kNone;
  TORCH_CHECK(false, "accelerate: 'reduce': unknown reduction '", name,
              "' (use \"mean\", \"sum\" or \"none\")");
}

std::string to_string(Reduction reduction) {
  switch (reduction) {
    case Reduction::kMean:
      return "mean";
    case Reduction::kSum:
      return "sum";
    case Reduction::kNone:
      return "none";
  }
  TORCH_INTERNAL_ASSERT(false, "unknown Reduction");
}

namespace detail {

void fail_decode(const char* op, const char* expected, const c10::IValue& got) {
  TORCH_CHECK(false, "accelerate: '", op, "': expected ", expected, " in the received object, got ",
              got.tagKind(), " (do all processes pass the same type?)");
}

std::string pickle_object(const c10::IValue& value, const char* op) {
  std::vector<char> bytes;
  try {
    bytes = torch::pickle_save(value);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "accelerate: '", op, "' could not serialise the object: ", message_of(e));
  }
  return std::string(bytes.begin(), bytes.end());
}

c10::IValue unpickle_object(const std::string& bytes, const char* op) {
  try {
    return torch::pickle_load(std::vector<char>(bytes.begin(), bytes.end()));
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "accelerate: '", op,
                "' could not deserialise a received object: ", message_of(e));
  }
}

void check_from_process(const PartialState& state, int from_process, const char* op) {
  TORCH_CHECK(from_process >= 0 && from_process < state.num_processes(), "accelerate: '", op,
              "': from_process ", from_process, " is outside [0, ", state.num_processes(), ")");
}

void check_reducible(const TreePath& path, const at::Tensor& t, Reduction reduction, double scale) {
  const auto dtype = t.scalar_type();
  const bool fractional = at::isFloatingType(dtype) || at::isComplexType(dtype);
  TORCH_CHECK(reduction != Reduction::kMean || fractional,
              "accelerate: 'reduce' with reduction 'mean' needs floating-point tensors, but ",
              path.str(), " has dtype ", dtype,
              "; use reduction 'sum', or convert the tensor to a floating-point dtype first");
  TORCH_CHECK(scale == 1.0 || fractional || (dtype != at::kBool && scale == std::trunc(scale)),
              "accelerate: 'reduce': scale ", scale, " cannot be applied to ", path.str(),
              ", which has dtype ", dtype);
}

at::Tensor gather_tensor(const PartialState& state, const at::Tensor& t) {
  // A 0-dim tensor becomes one entry per process, with one process too, so that the result's
  // shape never depends on the world size (Accelerate returns it unchanged on one process).
  const at::Tensor one = t.dim() == 0 ? t.reshape({1}) : t;
  if (!state.use_distributed()) return one;
  return at::cat(detail::all_gather(state, "gather", one), 0);
}

at::Tensor broadcast_tensor(const PartialState& state, const at::Tensor& t, int from_process) {
  if (!state.use_distributed()) return t;
  return detail::broadcast(state, "broadcast", t, from_process);
}

at::Tensor reduce_tensor(const PartialState& state, const at::Tensor& t, Reduction reduction,
                         double scale) {
  // float16/bfloat16 are summed and divided in float32, and rounded once at the end.
  const auto dtype = t.scalar_type();
  const bool widen = dtype == at::kHalf || dtype == at::kBFloat16;
  // At most one copy of the input, as Accelerate's clone-then-all_reduce; none of our own when
  // the reduction can read the caller's tensor and write a new one (detail::all_reduce): for
  // large tensors the copies (and the page faults of fresh buffers) cost as much as the
  // communication.
  at::Tensor x;  // a tensor this call owns, when it had to make one
  if (widen) x = t.to(at::kFloat);
  if (scale != 1.0) {
    const at::Tensor& from = x.defined() ? x : t;
    const bool fractional =
        at::isFloatingType(from.scalar_type()) || at::isComplexType(from.scalar_type());
    x = fractional ? at::mul(from, scale) : at::mul(from, static_cast<int64_t>(scale));
  }
  if (!state.use_distributed()) {
    if (!x.defined()) x = t.clone(at::MemoryFormat::Contiguous);
  } else if (x.defined() && detail::reducible_in_place(state, x)) {
    detail::all_reduce_(state, "reduce", x, c10d::ReduceOp::SUM);
  } else {
    x = detail::all_reduce(state, "reduce", x.defined() ? x : t, c10d::ReduceOp::SUM);
  }
  if (reduction == Reduction::kMean) x.div_(state.num_processes());
  return widen ? x.to(dtype) : x;
}

at::Tensor pad_tensor(const PartialState& state, const at::Tensor& t, const PadOptions& options) {
  const int64_t ndim = t.dim();
  int64_t dim = options.dim;
  if (dim >= ndim || dim < -ndim) return t;
  if (dim < 0) dim += ndim;
  if (!state.use_distributed()) return t;
  const auto sizes = at::tensor(t.sizes().vec(), at::kLong);
  int64_t max_size = 0;
  for (const auto& s : detail::all_gather(state, "pad_across_processes", sizes)) {
    max_size = std::max(max_size, s[dim].item<int64_t>());
  }
  const int64_t old_size = t.size(dim);
  if (max_size == old_size) return t;
  auto new_sizes = t.sizes().vec();
  new_sizes[static_cast<size_t>(dim)] = max_size;
  at::Tensor out = at::full(new_sizes, options.pad_index, t.options());
  out.narrow(dim, options.pad_first ? max_size - old_size : 0, old_size).copy_(t);
  return out;
}

at::Tensor concatenate_tensors(const std::vector<at::Tensor>& tensors, int64_t dim,
                               const std::string& path) {
  try {
    return at::cat(tensors, dim);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "accelerate: 'concatenate' could not concatenate the tensors at ", path,
                ": ", message_of(e));
  }
}

at::Tensor slice_tensor(const at::Tensor& t, int64_t start, int64_t end, const TreePath& path) {
  TORCH_CHECK(t.dim() >= 1, "accelerate: 'slice_tensors' cannot slice ", path.str(),
              ", which is a 0-dim tensor");
  return t.slice(0, start, end);
}

at::Tensor convert_tensor_to_fp32(const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  return dtype == at::kHalf || dtype == at::kBFloat16 ? t.to(at::kFloat) : t;
}

void describe_leaf(const TreePath& path, const at::Tensor& t, std::string& key,
                   std::string& display) {
  const std::string where = path.str();
  std::ostringstream k;
  k << where << ' ' << t.scalar_type() << ' ' << t.dim() << '\n';
  key += k.str();
  std::ostringstream d;
  d << (display.empty() ? "" : "; ") << where << ": shape " << t.sizes() << " dtype "
    << t.scalar_type();
  display += d.str();
}

void verify_same_structure(const PartialState& state, const char* op, const std::string& key,
                           const std::string& display) {
  // Its own statement first, so that a mismatch shows as the structure check of each side's
  // operation rather than as an all-gather.
  detail::agree(state, CallFingerprint::of(op, CallFingerprint::kStructureCheck, at::Tensor()));
  const auto all = detail::all_gather_bytes(state, op, key + '\0' + display);
  std::vector<std::string> keys, displays;
  for (const auto& bytes : all) {
    const auto split = bytes.find('\0');
    TORCH_INTERNAL_ASSERT(split != std::string::npos, "malformed structure description");
    keys.push_back(bytes.substr(0, split));
    displays.push_back(bytes.substr(split + 1));
  }
  bool same = true;
  for (const auto& k : keys) same = same && k == keys[0];
  if (same) return;
  std::ostringstream msg;
  msg << "accelerate: debug mode: '" << op
      << "' was called with differently structured data on different processes:";
  for (size_t i = 0; i < displays.size(); ++i) {
    msg << "\n  process " << i << ": " << (displays[i].empty() ? "(no tensors)" : displays[i]);
  }
  msg << "\nEvery process must pass the same containers holding tensors of the same dtypes and "
         "numbers of dimensions.";
  TORCH_CHECK(false, msg.str());
}

}  // namespace detail
}  // namespace accelerate
