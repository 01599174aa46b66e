#include <accelerate/data/data_loader.h>

#include <cstring>

namespace accelerate::data::detail {

void check_loader_options(const DataLoaderOptions& o, bool map_style) {
  TORCH_CHECK(o.num_workers >= 0, "accelerate: num_workers must be >= 0, got ", o.num_workers);
  TORCH_CHECK(o.prefetch_factor >= 1, "accelerate: prefetch_factor must be >= 1, got ",
              o.prefetch_factor);
  if (o.batch_sampler) {
    TORCH_CHECK(map_style, "accelerate: a batch_sampler needs a map-style dataset");
    TORCH_CHECK(!o.shuffle && !o.sampler && !o.drop_last && o.batch_size == 1,
                "accelerate: batch_sampler option is mutually exclusive with batch_size, "
                "shuffle, sampler and drop_last (as in PyTorch)");
    return;
  }
  TORCH_CHECK(o.batch_size > 0, "accelerate: batch_size must be positive, got ", o.batch_size);
  TORCH_CHECK(!(o.sampler && o.shuffle),
              "accelerate: sampler option is mutually exclusive with shuffle (as in PyTorch)");
  TORCH_CHECK(map_style || (!o.sampler && !o.shuffle),
              "accelerate: an iterable dataset takes neither a sampler nor shuffle; it yields "
              "items in its own order");
}

std::shared_ptr<BatchSampler> make_batch_sampler(const DataLoaderOptions& o, int64_t length) {
  if (o.batch_sampler) return o.batch_sampler;
  std::shared_ptr<Sampler> sampler = o.sampler;
  if (!sampler) {
    if (o.shuffle) {
      sampler = std::make_shared<RandomSampler>(length, o.generator);
    } else {
      sampler = std::make_shared<SequentialSampler>(length);
    }
  }
  return std::make_shared<BatchSampler>(std::move(sampler), o.batch_size, o.drop_last);
}

std::vector<uint8_t> generator_state(const std::optional<at::Generator>& generator) {
  if (!generator) return {};
  at::Generator gen = *generator;  // a handle: same generator, non-const access
  at::Tensor state;
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    state = gen.get_state();
  }
  const auto* p = state.data_ptr<uint8_t>();
  return std::vector<uint8_t>(p, p + state.numel());
}

void set_generator_state(const std::optional<at::Generator>& generator,
                         const std::vector<uint8_t>& state) {
  if (!generator || state.empty()) return;
  at::Tensor t = at::empty({static_cast<int64_t>(state.size())}, at::kByte);
  std::memcpy(t.data_ptr<uint8_t>(), state.data(), state.size());
  at::Generator gen = *generator;
  std::lock_guard<std::mutex> lock(gen.mutex());
  try {
    gen.set_state(t);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false,
                "accelerate: the saved sampler generator state does not fit this "
                "loader's generator: ",
                e.what_without_backtrace());
  }
}

}  // namespace accelerate::data::detail
