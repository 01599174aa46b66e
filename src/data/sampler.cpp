#include <accelerate/data/sampler.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>

#include <mutex>
#include <numeric>

namespace accelerate::data {

namespace {
std::vector<int64_t> permutation(int64_t size, at::Generator& generator) {
  // randperm takes the generator's mutex itself.
  at::Tensor perm = at::randperm(size, generator, at::TensorOptions().dtype(at::kLong));
  return std::vector<int64_t>(perm.data_ptr<int64_t>(), perm.data_ptr<int64_t>() + size);
}
}  // namespace

SequentialSampler::SequentialSampler(int64_t size) : size_(size) {
  TORCH_CHECK(size >= 0, "accelerate: SequentialSampler: size must be >= 0, got ", size);
}

std::vector<int64_t> SequentialSampler::epoch() {
  std::vector<int64_t> out(static_cast<size_t>(size_));
  std::iota(out.begin(), out.end(), 0);
  return out;
}

RandomSampler::RandomSampler(int64_t size, std::optional<at::Generator> generator)
    : size_(size), generator_(std::move(generator)) {
  TORCH_CHECK(size >= 0, "accelerate: RandomSampler: size must be >= 0, got ", size);
  TORCH_CHECK(!generator_ || generator_->defined(),
              "accelerate: RandomSampler was given an undefined generator");
}

std::vector<int64_t> RandomSampler::epoch() {
  if (generator_) return permutation(size_, *generator_);
  // PyTorch's RandomSampler without a generator: a fresh one per epoch, seeded from the
  // global generator, so that seeding LibTorch seeds the shuffling.
  at::Tensor seed_source = at::empty({}, at::kLong).random_();
  auto fresh =
      at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed_source.item<int64_t>()));
  return permutation(size_, fresh);
}

bool RandomSampler::set_generator(at::Generator generator) {
  TORCH_CHECK(generator.defined(), "accelerate: RandomSampler::set_generator: undefined generator");
  generator_ = std::move(generator);
  return true;
}

SeedableRandomSampler::SeedableRandomSampler(int64_t size, uint64_t seed)
    : RandomSampler(size, at::make_generator<at::CPUGeneratorImpl>(seed)), seed_(seed) {}

std::vector<int64_t> SeedableRandomSampler::epoch() {
  {
    std::lock_guard<std::mutex> lock(generator_->mutex());
    generator_->set_current_seed(seed_ + static_cast<uint64_t>(epoch_));
  }
  auto out = RandomSampler::epoch();
  ++epoch_;
  return out;
}

BatchSampler::BatchSampler(std::shared_ptr<Sampler> sampler, int64_t batch_size, bool drop_last)
    : sampler_(std::move(sampler)), batch_size_(batch_size), drop_last_(drop_last) {
  TORCH_CHECK(sampler_ != nullptr, "accelerate: BatchSampler needs a sampler");
  TORCH_CHECK(batch_size > 0, "accelerate: batch_size must be positive, got ", batch_size);
}

std::vector<BatchIndices> BatchSampler::epoch() {
  const auto indices = sampler_->epoch();
  std::vector<BatchIndices> out;
  out.reserve(indices.size() / static_cast<size_t>(batch_size_) + 1);
  for (size_t start = 0; start < indices.size(); start += static_cast<size_t>(batch_size_)) {
    const size_t end = std::min(indices.size(), start + static_cast<size_t>(batch_size_));
    if (drop_last_ && end - start < static_cast<size_t>(batch_size_)) break;
    out.emplace_back(indices.begin() + static_cast<std::ptrdiff_t>(start),
                     indices.begin() + static_cast<std::ptrdiff_t>(end));
  }
  return out;
}

int64_t BatchSampler::size() const {
  const int64_t n = sampler_->size();
  return drop_last_ ? n / batch_size_ : (n + batch_size_ - 1) / batch_size_;
}

}  // namespace accelerate::data
