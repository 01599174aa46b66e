// Single-process behaviour of the data loader: datasets, samplers, collate, workers, iterable
// datasets, positions.

#include <accelerate/data.h>

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <torch/csrc/api/include/torch/data/datasets/base.h>
#include <torch/csrc/api/include/torch/data/datasets/tensor.h>
#include "expect_error.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using accelerate::testing::error_of;

using accelerate::data::DataLoader;

struct Range {
  int64_t n;
  int64_t size() const { return n; }
  at::Tensor get(size_t i) const { return at::full({1}, static_cast<int64_t>(i), at::kLong); }
};

std::vector<int64_t> flat(const at::Tensor& t) {
  auto c = t.contiguous().to(at::kLong).flatten();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

TEST(DataLoader, SequentialBatchesWithPartialLast) {
  DataLoader loader(Range{5}, {.batch_size = 2});
  std::vector<std::vector<int64_t>> got;
  for (at::Tensor& b : loader) got.push_back(flat(b));
  EXPECT_EQ(got, (std::vector<std::vector<int64_t>>{{0, 1}, {2, 3}, {4}}));
  EXPECT_EQ(loader.size(), 3);
}

}  // namespace

namespace {

struct Counter {
  int64_t n;
  int64_t i = 0;
  void reset() { i = 0; }
  std::optional<int64_t> next() { return i < n ? std::optional<int64_t>(i++) : std::nullopt; }
};

TEST(DataLoader, PreparedSingleProcessInstantiatesEveryMode) {
  auto gs = std::make_shared<accelerate::data::GradientState>();
  DataLoader map_loader(Range{5}, {.batch_size = 2, .shuffle = true, .num_workers = 2});
  auto prepared = accelerate::data::prepare_data_loader(map_loader, {.gradient_state = gs});
  int64_t seen = 0;
  for (at::Tensor& b : prepared) seen += b.size(0);
  EXPECT_EQ(seen, 5);
  auto dispatched = accelerate::data::prepare_data_loader(
      map_loader, {.dispatch_batches = true, .gradient_state = gs});
  seen = 0;
  for (at::Tensor& b : dispatched) seen += b.size(0);
  EXPECT_EQ(seen, 5);
  DataLoader it_loader(Counter{7}, {.batch_size = 3});
  auto it_prepared = accelerate::data::prepare_data_loader(it_loader, {.gradient_state = gs});
  std::vector<std::vector<int64_t>> got;
  for (at::Tensor& b : it_prepared) got.push_back(flat(b));
  EXPECT_EQ(got, (std::vector<std::vector<int64_t>>{{0, 1, 2}, {3, 4, 5}, {6}}));
  auto skipped = accelerate::data::skip_first_batches(it_prepared, 1);
  got.clear();
  for (at::Tensor& b : skipped) got.push_back(flat(b));
  EXPECT_EQ(got, (std::vector<std::vector<int64_t>>{{3, 4, 5}, {6}}));
}

}  // namespace

namespace {

namespace data = accelerate::data;
using Batches = std::vector<std::vector<int64_t>>;
using namespace std::chrono_literals;

// ---------------------------------------------------------------------- helpers

/// The message of what `f` throws, or "<no exception>".
/// One epoch of a loader of tensors, as the values of each batch.
template <class L>
Batches epoch_of(L& loader) {
  Batches out;
  for (at::Tensor& b : loader) out.push_back(flat(b));
  return out;
}

at::Generator seeded(uint64_t seed) {
  return at::make_generator<at::CPUGeneratorImpl>(seed);
}

std::vector<int64_t> randperm_of(int64_t n, at::Generator gen) {
  return flat(at::randperm(n, gen, at::TensorOptions().dtype(at::kLong)));
}

/// `order` cut into batches of `size` (the last one may be short).
Batches chunks(const std::vector<int64_t>& order, size_t size) {
  Batches out;
  for (size_t i = 0; i < order.size(); i += size) {
    out.emplace_back(order.begin() + static_cast<std::ptrdiff_t>(i),
                     order.begin() + static_cast<std::ptrdiff_t>(std::min(order.size(), i + size)));
  }
  return out;
}

std::vector<int64_t> concat(const Batches& batches) {
  std::vector<int64_t> out;
  for (const auto& b : batches) out.insert(out.end(), b.begin(), b.end());
  return out;
}

bool is_permutation_of_range(std::vector<int64_t> v, int64_t n) {
  if (static_cast<int64_t>(v.size()) != n) return false;
  std::sort(v.begin(), v.end());
  for (int64_t i = 0; i < n; ++i) {
    if (v[static_cast<size_t>(i)] != i) return false;
  }
  return true;
}

/// A map-style dataset of 1-element tensors that counts get() calls.
struct CountingRange {
  int64_t n;
  std::shared_ptr<std::atomic<int64_t>> calls = std::make_shared<std::atomic<int64_t>>(0);
  int64_t size() const { return n; }
  at::Tensor get(size_t i) const {
    ++*calls;
    return at::full({1}, static_cast<int64_t>(i), at::kLong);
  }
};

/// get(i) throws for one index.
struct Faulty {
  int64_t n;
  int64_t bad;
  int64_t size() const { return n; }
  at::Tensor get(size_t i) const {
    if (static_cast<int64_t>(i) == bad) {
      throw std::runtime_error("Faulty: cannot read sample " + std::to_string(i));
    }
    return at::full({1}, static_cast<int64_t>(i), at::kLong);
  }
};

/// get(i) sleeps, to give worker threads something to do.
struct Slow {
  int64_t n;
  std::chrono::microseconds delay;
  int64_t size() const { return n; }
  at::Tensor get(size_t i) const {
    std::this_thread::sleep_for(delay);
    return at::full({1}, static_cast<int64_t>(i), at::kLong);
  }
};

/// An iterable dataset of 0..n-1 with a length.
struct SizedCounter {
  int64_t n;
  int64_t i = 0;
  void reset() { i = 0; }
  std::optional<int64_t> next() { return i < n ? std::optional<int64_t>(i++) : std::nullopt; }
  int64_t size() const { return n; }
};

/// An iterable dataset whose next() throws at one item.
struct FaultyStream {
  int64_t n;
  int64_t bad;
  int64_t i = 0;
  void reset() { i = 0; }
  std::optional<int64_t> next() {
    if (i == bad) throw std::runtime_error("FaultyStream: broken item " + std::to_string(i));
    return i < n ? std::optional<int64_t>(i++) : std::nullopt;
  }
};

// ---------------------------------------------------------------------- default collate

TEST(DataLoaderCollate, StacksTensorsAlongANewFirstDimension) {
  std::vector<at::Tensor> items{at::arange(6, at::kLong).view({2, 3}),
                                at::arange(6, 12, at::kLong).view({2, 3})};
  at::Tensor b = data::DefaultCollate{}(items);
  EXPECT_EQ(b.sizes(), (std::vector<int64_t>{2, 2, 3}));
  EXPECT_EQ(b.scalar_type(), at::kLong);
  EXPECT_EQ(flat(b), (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}));
}

TEST(DataLoaderCollate, NumbersBecomeInt64Float64AndBoolTensors) {
  at::Tensor ints = data::DefaultCollate{}(std::vector<int>{3, -1, 7});
  EXPECT_EQ(ints.scalar_type(), at::kLong);
  EXPECT_EQ(ints.sizes(), (std::vector<int64_t>{3}));
  EXPECT_EQ(flat(ints), (std::vector<int64_t>{3, -1, 7}));

  at::Tensor longs = data::DefaultCollate{}(std::vector<int64_t>{int64_t{1} << 40, 2});
  EXPECT_EQ(longs.scalar_type(), at::kLong);
  EXPECT_EQ(longs[0].item<int64_t>(), int64_t{1} << 40);

  at::Tensor doubles = data::DefaultCollate{}(std::vector<double>{0.5, -2.25});
  EXPECT_EQ(doubles.scalar_type(), at::kDouble);
  EXPECT_EQ(doubles[0].item<double>(), 0.5);
  EXPECT_EQ(doubles[1].item<double>(), -2.25);

  at::Tensor floats = data::DefaultCollate{}(std::vector<float>{1.5F, 3.0F});
  EXPECT_EQ(floats.scalar_type(), at::kDouble);
  EXPECT_EQ(floats[0].item<double>(), 1.5);
  EXPECT_EQ(floats[1].item<double>(), 3.0);

  at::Tensor bools = data::DefaultCollate{}(std::vector<bool>{true, false, true});
  EXPECT_EQ(bools.scalar_type(), at::kBool);
  EXPECT_EQ(bools.sizes(), (std::vector<int64_t>{3}));
  EXPECT_TRUE(bools[0].item<bool>());
  EXPECT_FALSE(bools[1].item<bool>());
  EXPECT_TRUE(bools[2].item<bool>());
}

TEST(DataLoaderCollate, StringsBecomeAVectorOfStrings) {
  std::vector<std::string> b = data::DefaultCollate{}(std::vector<std::string>{"a", "bc", ""});
  EXPECT_EQ(b, (std::vector<std::string>{"a", "bc", ""}));
}

TEST(DataLoaderCollate, ExamplesWithAndWithoutTarget) {
  using Ex = torch::data::Example<at::Tensor, at::Tensor>;
  std::vector<Ex> items{{at::full({2}, 1.0), at::full({}, 10, at::kLong)},
                        {at::full({2}, 2.0), at::full({}, 20, at::kLong)},
                        {at::full({2}, 3.0), at::full({}, 30, at::kLong)}};
  Ex b = data::DefaultCollate{}(items);
  EXPECT_EQ(b.data.sizes(), (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(flat(b.data), (std::vector<int64_t>{1, 1, 2, 2, 3, 3}));
  EXPECT_EQ(b.target.sizes(), (std::vector<int64_t>{3}));
  EXPECT_EQ(flat(b.target), (std::vector<int64_t>{10, 20, 30}));

  // Example<Data, int>: the target becomes an int64 tensor.
  std::vector<torch::data::Example<at::Tensor, int>> labelled{{at::ones({1}), 4},
                                                              {at::zeros({1}), 5}};
  auto lb = data::DefaultCollate{}(labelled);
  static_assert(std::is_same_v<decltype(lb), Ex>);
  EXPECT_EQ(flat(lb.target), (std::vector<int64_t>{4, 5}));

  std::vector<torch::data::TensorExample> plain{at::full({1, 2}, 7.0), at::full({1, 2}, 8.0)};
  torch::data::TensorExample pb = data::DefaultCollate{}(plain);
  EXPECT_EQ(pb.data.sizes(), (std::vector<int64_t>{2, 1, 2}));
  EXPECT_EQ(flat(pb.data), (std::vector<int64_t>{7, 7, 8, 8}));
}

TEST(DataLoaderCollate, VectorsAreCollatedElementByElement) {
  std::vector<std::vector<at::Tensor>> items{
      {at::full({2}, 1, at::kLong), at::full({}, 5, at::kLong)},
      {at::full({2}, 2, at::kLong), at::full({}, 6, at::kLong)}};
  std::vector<at::Tensor> b = data::DefaultCollate{}(items);
  ASSERT_EQ(b.size(), 2u);
  EXPECT_EQ(b[0].sizes(), (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(flat(b[0]), (std::vector<int64_t>{1, 1, 2, 2}));
  EXPECT_EQ(b[1].sizes(), (std::vector<int64_t>{2}));
  EXPECT_EQ(flat(b[1]), (std::vector<int64_t>{5, 6}));

  // Element j of every item makes tensor j; std::vector<bool> too, though it has no references.
  std::vector<std::vector<bool>> flags{{true, false}, {false, false}, {true, true}};
  std::vector<at::Tensor> fb = data::DefaultCollate{}(flags);
  ASSERT_EQ(fb.size(), 2u);
  EXPECT_EQ(fb[0].scalar_type(), at::kBool);
  EXPECT_EQ(flat(fb[0]), (std::vector<int64_t>{1, 0, 1}));
  EXPECT_EQ(flat(fb[1]), (std::vector<int64_t>{0, 0, 1}));
  std::vector<std::vector<int>> numbers{{1, 2, 3}, {4, 5, 6}};
  std::vector<at::Tensor> fn = data::DefaultCollate{}(numbers);
  ASSERT_EQ(fn.size(), 3u);
  EXPECT_EQ(flat(fn[2]), (std::vector<int64_t>{3, 6}));
}

TEST(DataLoaderCollate, MapsAreCollatedKeyByKey) {
  std::vector<std::map<std::string, at::Tensor>> items{
      {{"x", at::full({3}, 1, at::kLong)}, {"y", at::full({}, 0, at::kLong)}},
      {{"x", at::full({3}, 2, at::kLong)}, {"y", at::full({}, 1, at::kLong)}}};
  std::map<std::string, at::Tensor> b = data::DefaultCollate{}(items);
  ASSERT_EQ(b.size(), 2u);
  EXPECT_EQ(b.at("x").sizes(), (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(flat(b.at("x")), (std::vector<int64_t>{1, 1, 1, 2, 2, 2}));
  EXPECT_EQ(flat(b.at("y")), (std::vector<int64_t>{0, 1}));

  std::vector<std::map<std::string, at::Tensor>> missing{{{"x", at::ones({1})}},
                                                         {{"z", at::ones({1})}}};
  EXPECT_ERROR_CONTAINS(data::DefaultCollate{}(missing), "key 'x' is in item 0 but not in every");
}

TEST(DataLoaderCollate, TuplesAndPairsAreCollatedFieldByField) {
  std::vector<std::tuple<at::Tensor, int, std::string>> items{
      {at::full({2}, 1, at::kLong), 10, "a"}, {at::full({2}, 2, at::kLong), 20, "b"}};
  std::tuple<at::Tensor, at::Tensor, std::vector<std::string>> b = data::DefaultCollate{}(items);
  EXPECT_EQ(flat(std::get<0>(b)), (std::vector<int64_t>{1, 1, 2, 2}));
  EXPECT_EQ(std::get<1>(b).scalar_type(), at::kLong);
  EXPECT_EQ(flat(std::get<1>(b)), (std::vector<int64_t>{10, 20}));
  EXPECT_EQ(std::get<2>(b), (std::vector<std::string>{"a", "b"}));

  std::vector<std::pair<int64_t, double>> pairs{{1, 0.5}, {2, 1.5}, {3, 2.5}};
  std::pair<at::Tensor, at::Tensor> pb = data::DefaultCollate{}(pairs);
  EXPECT_EQ(flat(pb.first), (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(pb.second.scalar_type(), at::kDouble);
  EXPECT_EQ(pb.second[2].item<double>(), 2.5);

  // Nested: a pair of a map of vectors.
  std::vector<std::pair<std::string, std::map<std::string, std::vector<int>>>> nested{
      {"p", {{"k", {1, 2}}}}, {"q", {{"k", {3, 4}}}}};
  auto nb = data::DefaultCollate{}(nested);
  EXPECT_EQ(nb.first, (std::vector<std::string>{"p", "q"}));
  ASSERT_EQ(nb.second.at("k").size(), 2u);
  EXPECT_EQ(flat(nb.second.at("k")[0]), (std::vector<int64_t>{1, 3}));
  EXPECT_EQ(flat(nb.second.at("k")[1]), (std::vector<int64_t>{2, 4}));
}

TEST(DataLoaderCollate, MismatchesNameBothItems) {
  std::vector<at::Tensor> items{at::zeros({2}), at::zeros({2}), at::zeros({3})};
  const std::string msg = error_of([&] { data::DefaultCollate{}(items); });
  EXPECT_NE(msg.find("item 0 has shape [2]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("item 2 has shape [3]"), std::string::npos) << msg;

  std::vector<std::vector<int>> ragged{{1, 2}, {3, 4, 5}};
  const std::string vmsg = error_of([&] { data::DefaultCollate{}(ragged); });
  EXPECT_NE(vmsg.find("item 0 has 2 elements and item 1 has 3"), std::string::npos) << vmsg;

  EXPECT_ERROR_CONTAINS(data::DefaultCollate{}(std::vector<at::Tensor>{}),
                        "cannot collate an empty batch");

  // Through a loader: the error surfaces from the loop.
  struct Ragged {
    int64_t size() const { return 4; }
    at::Tensor get(size_t i) const { return at::zeros({static_cast<int64_t>(i < 3 ? 2 : 5)}); }
  };
  DataLoader loader(Ragged{}, {.batch_size = 4});
  EXPECT_ERROR_CONTAINS(epoch_of(loader), "item 3 has shape [5]");
}

// ---------------------------------------------------------------------- loaders of other types

TEST(DataLoaderCollate, LoaderBatchesMapsTuplesAndStrings) {
  struct Records {
    int64_t size() const { return 5; }
    std::map<std::string, at::Tensor> get(size_t i) const {
      return {{"input", at::full({2}, static_cast<int64_t>(i), at::kLong)},
              {"label", at::full({}, static_cast<int64_t>(10 * i), at::kLong)}};
    }
  };
  DataLoader loader(Records{}, {.batch_size = 2});
  static_assert(std::is_same_v<decltype(loader)::batch_type, std::map<std::string, at::Tensor>>);
  std::vector<std::vector<int64_t>> inputs, labels;
  for (auto& b : loader) {
    inputs.push_back(flat(b.at("input")));
    labels.push_back(flat(b.at("label")));
  }
  EXPECT_EQ(inputs, (Batches{{0, 0, 1, 1}, {2, 2, 3, 3}, {4, 4}}));
  EXPECT_EQ(labels, (Batches{{0, 10}, {20, 30}, {40}}));

  struct Named {
    int64_t size() const { return 3; }
    std::tuple<std::string, int64_t> get(size_t i) const {
      const char* names[] = {"s0", "s1", "s2"};
      return {names[i], static_cast<int64_t>(i)};
    }
  };
  DataLoader named(Named{}, {.batch_size = 2});
  std::vector<std::vector<std::string>> names;
  for (auto& [n, idx] : named) {
    names.push_back(n);
    EXPECT_EQ(idx.scalar_type(), at::kLong);
  }
  EXPECT_EQ(names, (std::vector<std::vector<std::string>>{{"s0", "s1"}, {"s2"}}));
}

struct IdBatch {
  std::vector<int64_t> ids;
  int64_t sum = 0;
};

TEST(DataLoaderCollate, CustomCollateFunctionMakesAUserType) {
  struct Ints {
    int64_t size() const { return 7; }
    int64_t get(size_t i) const { return static_cast<int64_t>(i) * 2; }
  };
  auto collate = [](std::vector<int64_t> items) {
    IdBatch b;
    b.ids = items;
    b.sum = std::accumulate(items.begin(), items.end(), int64_t{0});
    return b;
  };
  for (int workers : {0, 2}) {
    DataLoader<IdBatch> loader(Ints{}, {.batch_size = 3, .num_workers = workers}, collate);
    std::vector<std::vector<int64_t>> ids;
    std::vector<int64_t> sums;
    for (IdBatch& b : loader) {
      ids.push_back(b.ids);
      sums.push_back(b.sum);
    }
    EXPECT_EQ(ids, (Batches{{0, 2, 4}, {6, 8, 10}, {12}})) << workers << " workers";
    EXPECT_EQ(sums, (std::vector<int64_t>{6, 24, 12})) << workers << " workers";
  }
}

// ---------------------------------------------------------------------- LibTorch datasets

struct SquaresDataset : torch::data::datasets::Dataset<SquaresDataset> {
  explicit SquaresDataset(int64_t n) : n(n) {}
  torch::data::Example<> get(size_t i) override {
    const auto v = static_cast<int64_t>(i);
    return {at::full({2}, v, at::kLong), at::full({}, v * v, at::kLong)};
  }
  torch::optional<size_t> size() const override { return static_cast<size_t>(n); }
  int64_t n;
};

TEST(DataLoaderDatasets, LibTorchDatasetSubclass) {
  DataLoader loader(SquaresDataset(5), {.batch_size = 2});
  static_assert(std::is_same_v<decltype(loader)::batch_type, torch::data::Example<>>);
  EXPECT_EQ(loader.size(), 3);
  EXPECT_EQ(loader.total_dataset_length(), 5);
  Batches data, targets;
  for (auto& b : loader) {
    data.push_back(flat(b.data));
    targets.push_back(flat(b.target));
  }
  EXPECT_EQ(data, (Batches{{0, 0, 1, 1}, {2, 2, 3, 3}, {4, 4}}));
  EXPECT_EQ(targets, (Batches{{0, 1}, {4, 9}, {16}}));
}

TEST(DataLoaderDatasets, LibTorchTensorDatasetWithWorkers) {
  torch::data::datasets::TensorDataset ds(at::arange(20, at::kLong).view({10, 2}));
  for (int workers : {0, 2}) {
    DataLoader loader(ds, {.batch_size = 4, .num_workers = workers});
    static_assert(std::is_same_v<decltype(loader)::batch_type, torch::data::TensorExample>);
    Batches got;
    std::vector<std::vector<int64_t>> shapes;
    for (auto& b : loader) {
      got.push_back(flat(b.data));
      shapes.push_back(b.data.sizes().vec());
    }
    EXPECT_EQ(shapes, (Batches{{4, 2}, {4, 2}, {2, 2}}));
    EXPECT_EQ(concat(got), flat(at::arange(20, at::kLong)));
  }
}

TEST(DataLoaderDatasets, SharedDatasetAndUnknownSize) {
  auto ds = std::make_shared<CountingRange>(CountingRange{6});
  DataLoader loader(ds, {.batch_size = 4});
  EXPECT_EQ(epoch_of(loader), (Batches{{0, 1, 2, 3}, {4, 5}}));
  EXPECT_EQ(ds->calls->load(), 6);  // the caller's object was used, not a copy

  struct Unsized {
    std::optional<size_t> size() const { return std::nullopt; }
    at::Tensor get(size_t) const { return at::zeros({1}); }
  };
  EXPECT_ERROR_CONTAINS(DataLoader(Unsized{}), "must know its size");
}

// ---------------------------------------------------------------------- samplers

TEST(DataLoaderSampler, SequentialSampler) {
  data::SequentialSampler s(4);
  EXPECT_EQ(s.size(), 4);
  EXPECT_EQ(s.epoch(), (std::vector<int64_t>{0, 1, 2, 3}));
  EXPECT_EQ(s.epoch(), (std::vector<int64_t>{0, 1, 2, 3}));
  EXPECT_FALSE(s.generator().has_value());
  EXPECT_TRUE(data::SequentialSampler(0).epoch().empty());
  EXPECT_ERROR_CONTAINS(data::SequentialSampler(-1), "size must be >= 0");
}

TEST(DataLoaderSampler, RandomSamplerWithGeneratorIsRandpermOfItsSeed) {
  data::RandomSampler s(17, seeded(42));
  auto reference = seeded(42);
  const auto first = s.epoch();
  EXPECT_EQ(first, randperm_of(17, reference));
  const auto second = s.epoch();
  EXPECT_EQ(second, randperm_of(17, reference));  // the generator advances, as PyTorch's does
  EXPECT_NE(first, second);
  EXPECT_TRUE(is_permutation_of_range(first, 17));
  EXPECT_TRUE(is_permutation_of_range(second, 17));
}

TEST(DataLoaderSampler, RandomSamplerWithoutGeneratorFollowsTheGlobalSeed) {
  data::RandomSampler s(50);
  EXPECT_FALSE(s.generator().has_value());
  at::manual_seed(123);
  const auto a = s.epoch();
  at::manual_seed(123);
  const auto b = s.epoch();
  EXPECT_EQ(a, b);
  EXPECT_NE(s.epoch(), a);
  EXPECT_TRUE(is_permutation_of_range(a, 50));
}

TEST(DataLoaderSampler, SeedableRandomSamplerEpochIsSeedPlusEpoch) {
  data::SeedableRandomSampler s(12, 100);
  EXPECT_EQ(s.initial_seed(), 100u);
  EXPECT_EQ(s.current_epoch(), 0);
  EXPECT_EQ(s.epoch(), randperm_of(12, seeded(100)));
  EXPECT_EQ(s.current_epoch(), 1);
  EXPECT_EQ(s.epoch(), randperm_of(12, seeded(101)));
  EXPECT_EQ(s.current_epoch(), 2);
  s.set_epoch(7);
  EXPECT_EQ(s.epoch(), randperm_of(12, seeded(107)));
  EXPECT_EQ(s.current_epoch(), 8);
  s.set_epoch(0);
  EXPECT_EQ(s.epoch(), randperm_of(12, seeded(100)));  // recomputable from (seed, epoch) alone

  // In a loader, the loader's epoch picks the order.
  auto sampler = std::make_shared<data::SeedableRandomSampler>(12, 100);
  DataLoader loader(Range{12}, {.batch_size = 5, .sampler = sampler});
  EXPECT_EQ(epoch_of(loader), chunks(randperm_of(12, seeded(100)), 5));
  EXPECT_EQ(epoch_of(loader), chunks(randperm_of(12, seeded(101)), 5));
  loader.set_epoch(5);
  EXPECT_EQ(epoch_of(loader), chunks(randperm_of(12, seeded(105)), 5));
  EXPECT_EQ(loader.iteration(), 6);
}

TEST(DataLoaderSampler, BatchSamplerSizesAndDropLast) {
  auto seq = std::make_shared<data::SequentialSampler>(10);
  data::BatchSampler keep(seq, 3, false);
  EXPECT_EQ(keep.size(), 4);
  EXPECT_EQ(keep.batch_size(), 3);
  EXPECT_FALSE(keep.drop_last());
  EXPECT_EQ(keep.epoch(), (Batches{{0, 1, 2}, {3, 4, 5}, {6, 7, 8}, {9}}));
  data::BatchSampler drop(seq, 3, true);
  EXPECT_EQ(drop.size(), 3);
  EXPECT_TRUE(drop.drop_last());
  EXPECT_EQ(drop.epoch(), (Batches{{0, 1, 2}, {3, 4, 5}, {6, 7, 8}}));
  data::BatchSampler exact(seq, 5, true);
  EXPECT_EQ(exact.size(), 2);
  EXPECT_EQ(exact.epoch().size(), 2u);
  data::BatchSampler big(seq, 11, true);
  EXPECT_EQ(big.size(), 0);
  EXPECT_TRUE(big.epoch().empty());
  EXPECT_EQ(data::BatchSampler(seq, 11, false).epoch(), (Batches{concat(keep.epoch())}));
  EXPECT_ERROR_CONTAINS(data::BatchSampler(seq, 0, false), "batch_size must be positive");
  EXPECT_ERROR_CONTAINS(data::BatchSampler(nullptr, 2, false), "needs a sampler");

  DataLoader loader(Range{10}, {.batch_size = 3, .drop_last = true});
  EXPECT_EQ(epoch_of(loader), (Batches{{0, 1, 2}, {3, 4, 5}, {6, 7, 8}}));
  EXPECT_EQ(loader.size(), 3);
}

/// A user batch sampler: even indices, then odd ones, in batches of 3.
class EvenOddBatches : public data::BatchSampler {
 public:
  explicit EvenOddBatches(int64_t n) : n_(n) {}
  std::vector<data::BatchIndices> epoch() override {
    ++epochs;
    std::vector<int64_t> order;
    for (int64_t i = 0; i < n_; i += 2) order.push_back(i);
    for (int64_t i = 1; i < n_; i += 2) order.push_back(i);
    return chunks(order, 3);
  }
  int64_t size() const override { return (n_ + 2) / 3; }
  std::optional<int64_t> batch_size() const override { return 3; }
  int epochs = 0;

 private:
  int64_t n_;
};

TEST(DataLoaderSampler, UserBatchSamplerIsUsed) {
  auto bs = std::make_shared<EvenOddBatches>(8);
  for (int workers : {0, 2}) {
    DataLoader loader(Range{8}, {.batch_sampler = bs, .num_workers = workers});
    EXPECT_EQ(loader.batch_sampler(), bs);
    EXPECT_EQ(loader.size(), 3);
    EXPECT_EQ(loader.batch_size(), 3);
    EXPECT_FALSE(loader.drop_last());
    EXPECT_EQ(epoch_of(loader), (Batches{{0, 2, 4}, {6, 1, 3}, {5, 7}}));
  }
  EXPECT_EQ(bs->epochs, 2);
}

// A batch sampler of varying batch size (batch_size() == nullopt), as PyTorch allows (e.g.
// bucketing by length): the loader has no fixed batch size but iterates all the same.
class VaryingBatches : public data::BatchSampler {
 public:
  std::vector<data::BatchIndices> epoch() override { return {{0}, {1, 2}, {3, 4, 5}}; }
  int64_t size() const override { return 3; }
  std::optional<int64_t> batch_size() const override { return std::nullopt; }
};

TEST(DataLoaderSampler, UserBatchSamplerOfVaryingSize) {
  DataLoader loader(Range{6}, {.batch_sampler = std::make_shared<VaryingBatches>()});
  EXPECT_EQ(loader.size(), 3);
  Batches got;
  EXPECT_NO_THROW(got = epoch_of(loader));
  EXPECT_EQ(got, (Batches{{0}, {1, 2}, {3, 4, 5}}));
}

TEST(DataLoaderSampler, OptionConflictsAreClearErrors) {
  auto bs = std::make_shared<EvenOddBatches>(8);
  auto seq = std::make_shared<data::SequentialSampler>(8);
  EXPECT_ERROR_CONTAINS(DataLoader(Range{8}, {.shuffle = true, .batch_sampler = bs}),
                        "batch_sampler option is mutually exclusive with batch_size, shuffle");
  EXPECT_ERROR_CONTAINS(DataLoader(Range{8}, {.batch_size = 2, .batch_sampler = bs}),
                        "batch_sampler option is mutually exclusive");
  EXPECT_ERROR_CONTAINS(DataLoader(Range{8}, {.drop_last = true, .batch_sampler = bs}),
                        "batch_sampler option is mutually exclusive");
  EXPECT_ERROR_CONTAINS(DataLoader(Range{8}, {.sampler = seq, .batch_sampler = bs}),
                        "batch_sampler option is mutually exclusive");
  EXPECT_ERROR_CONTAINS(DataLoader(Range{8}, {.shuffle = true, .sampler = seq}),
                        "sampler option is mutually exclusive with shuffle");
  EXPECT_ERROR_CONTAINS(DataLoader(Counter{8}, {.shuffle = true}),
                        "an iterable dataset takes neither a sampler nor shuffle");
  EXPECT_ERROR_CONTAINS(DataLoader(Counter{8}, {.sampler = seq}),
                        "an iterable dataset takes neither a sampler nor shuffle");
  EXPECT_ERROR_CONTAINS(DataLoader(Counter{8}, {.batch_sampler = bs}),
                        "a batch_sampler needs a map-style dataset");
  EXPECT_ERROR_CONTAINS(DataLoader(Range{8}, {.batch_size = 0}),
                        "batch_size must be positive, got 0");
  EXPECT_ERROR_CONTAINS(DataLoader(Counter{8}, {.batch_size = -3}),
                        "batch_size must be positive, got -3");
  EXPECT_ERROR_CONTAINS(DataLoader(Range{8}, {.num_workers = -1}),
                        "num_workers must be >= 0, got -1");
  EXPECT_ERROR_CONTAINS(DataLoader(Range{8}, {.num_workers = 1, .prefetch_factor = 0}),
                        "prefetch_factor must be >= 1, got 0");
}

// ---------------------------------------------------------------------- shuffling

TEST(DataLoaderShuffle, SeededGeneratorsGiveTheSameOrderAndEpochsDiffer) {
  DataLoader a(Range{23}, {.batch_size = 4, .shuffle = true, .generator = seeded(7)});
  DataLoader b(Range{23}, {.batch_size = 4, .shuffle = true, .generator = seeded(7)});
  auto reference = seeded(7);
  std::vector<std::vector<int64_t>> orders;
  for (int e = 0; e < 3; ++e) {
    const Batches ea = epoch_of(a);
    const Batches eb = epoch_of(b);
    EXPECT_EQ(ea, eb) << "epoch " << e;
    ASSERT_EQ(ea.size(), 6u);
    EXPECT_EQ(ea.back().size(), 3u);
    // The order PyTorch's RandomSampler gives for the same seed.
    EXPECT_EQ(concat(ea), randperm_of(23, reference)) << "epoch " << e;
    EXPECT_TRUE(is_permutation_of_range(concat(ea), 23)) << "epoch " << e;
    orders.push_back(concat(ea));
  }
  EXPECT_NE(orders[0], orders[1]);
  EXPECT_NE(orders[1], orders[2]);
  EXPECT_EQ(a.iteration(), 3);

  DataLoader c(Range{23}, {.batch_size = 4, .shuffle = true, .generator = seeded(8)});
  EXPECT_NE(concat(epoch_of(c)), orders[0]);
}

TEST(DataLoaderShuffle, WithoutGeneratorEveryEpochIsAPermutation) {
  DataLoader loader(Range{31}, {.batch_size = 8, .shuffle = true});
  const auto first = concat(epoch_of(loader));
  const auto second = concat(epoch_of(loader));
  EXPECT_TRUE(is_permutation_of_range(first, 31));
  EXPECT_TRUE(is_permutation_of_range(second, 31));
  EXPECT_NE(first, second);
}

// prepare_data_loader gives a generator-less RandomSampler a generator of its own, seeded from
// the global generator as Accelerate does, so at::manual_seed still decides the shuffle.
TEST(DataLoaderShuffle, PreparedLoaderWithoutGeneratorFollowsTheGlobalSeed) {
  auto first_epoch = [](uint64_t seed) {
    at::manual_seed(seed);
    DataLoader loader(Range{50}, {.batch_size = 50, .shuffle = true});
    auto prepared = data::prepare_data_loader(
        loader, {.gradient_state = std::make_shared<data::GradientState>()});
    return concat(epoch_of(prepared));
  };
  EXPECT_EQ(first_epoch(1), first_epoch(1));
  EXPECT_NE(first_epoch(1), first_epoch(2));
}

// ---------------------------------------------------------------------- workers

TEST(DataLoaderWorkers, SameBatchesInTheSameOrderAsWithoutWorkers) {
  for (bool drop_last : {false, true}) {
    DataLoader ref(
        Range{37},
        {.batch_size = 4, .shuffle = true, .drop_last = drop_last, .generator = seeded(3)});
    std::vector<Batches> expected;
    for (int e = 0; e < 3; ++e) expected.push_back(epoch_of(ref));
    for (int workers : {1, 2}) {
      for (int prefetch : {1, 2}) {
        DataLoader loader(Range{37}, {.batch_size = 4,
                                      .shuffle = true,
                                      .drop_last = drop_last,
                                      .generator = seeded(3),
                                      .num_workers = workers,
                                      .prefetch_factor = prefetch});
        for (int e = 0; e < 3; ++e) {
          EXPECT_EQ(epoch_of(loader), expected[static_cast<size_t>(e)])
              << workers << " workers, prefetch " << prefetch << ", epoch " << e << ", drop_last "
              << drop_last;
        }
      }
    }
  }
}

TEST(DataLoaderWorkers, GetExceptionSurfacesAtItsBatch) {
  for (int workers : {0, 1, 2}) {
    // Index 5 is in the third batch ({4, 5}).
    DataLoader loader(Faulty{10, 5}, {.batch_size = 2, .num_workers = workers});
    Batches got;
    EXPECT_THROW(
        {
          try {
            for (at::Tensor& b : loader) got.push_back(flat(b));
          } catch (const std::runtime_error& e) {
            EXPECT_STREQ(e.what(), "Faulty: cannot read sample 5");
            throw;
          }
        },
        std::runtime_error)
        << workers << " workers";
    EXPECT_EQ(got, (Batches{{0, 1}, {2, 3}})) << workers << " workers";
    // The loader is still usable: the next iteration fails at the same batch again.
    got.clear();
    EXPECT_ERROR_CONTAINS(
        {
          for (at::Tensor& b : loader) got.push_back(flat(b));
        },
        "cannot read sample 5");
    EXPECT_EQ(got.size(), 2u) << workers << " workers";
  }
  // In the very first batch: thrown by begin().
  DataLoader first(Faulty{4, 0}, {.batch_size = 2, .num_workers = 2});
  EXPECT_ERROR_CONTAINS(first.begin(), "cannot read sample 0");
}

TEST(DataLoaderWorkers, BreakingOutEarlyAndDestroyingDoesNotHang) {
  const auto start = std::chrono::steady_clock::now();
  for (int workers : {1, 2}) {
    DataLoader loader(Slow{40, 5ms},
                      {.batch_size = 2, .num_workers = workers, .prefetch_factor = 4});
    int seen = 0;
    for (at::Tensor& b : loader) {
      EXPECT_EQ(flat(b), (std::vector<int64_t>{2L * seen, 2L * seen + 1}));
      if (++seen == 2) break;
    }
    // A new iteration starts from the beginning.
    for (at::Tensor& b : loader) {
      EXPECT_EQ(flat(b), (std::vector<int64_t>{0, 1}));
      break;
    }
    // Destroyed with an iterator under way and workers loading.
    auto it = loader.begin();
    EXPECT_EQ(flat(*it), (std::vector<int64_t>{0, 1}));
  }
  // Nothing loaded the remaining 38 samples (~190 ms per loader) before returning.
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
}

TEST(DataLoaderWorkers, IteratorOutlivesTheLoaderHandleAndNewBeginEndsTheOldPass) {
  std::optional<DataLoader<at::Tensor>> loader;
  loader.emplace(Range{6}, data::DataLoaderOptions{.batch_size = 2, .num_workers = 2});
  auto it = loader->begin();
  loader.reset();
  Batches got;
  for (; it != DataLoader<at::Tensor>::Sentinel{}; ++it) got.push_back(flat(*it));
  EXPECT_EQ(got, (Batches{{0, 1}, {2, 3}, {4, 5}}));

  DataLoader again(Range{6}, {.batch_size = 2, .num_workers = 1});
  auto old_pass = again.begin();
  EXPECT_EQ(flat(*old_pass), (std::vector<int64_t>{0, 1}));
  auto new_pass = again.begin();
  EXPECT_TRUE(old_pass == again.end());
  EXPECT_EQ(flat(*new_pass), (std::vector<int64_t>{0, 1}));
  ++new_pass;
  EXPECT_EQ(flat(*new_pass), (std::vector<int64_t>{2, 3}));
}

/// Records how many get() calls run at once. With `wait_for_peer`, a call waits (at most 2 s)
/// until a second call has been seen in flight, so a concurrent loader is detected without
/// depending on timing.
struct Overlap {
  int64_t n;
  bool wait_for_peer;
  std::shared_ptr<std::atomic<int>> in_flight = std::make_shared<std::atomic<int>>(0);
  std::shared_ptr<std::atomic<int>> max_in_flight = std::make_shared<std::atomic<int>>(0);
  int64_t size() const { return n; }
  at::Tensor get(size_t i) const {
    const int now = ++*in_flight;
    int seen = max_in_flight->load();
    while (seen < now && !max_in_flight->compare_exchange_weak(seen, now)) {
    }
    if (wait_for_peer) {
      const auto deadline = std::chrono::steady_clock::now() + 2s;
      while (max_in_flight->load() < 2 && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(1ms);
      }
    } else {
      std::this_thread::sleep_for(2ms);
    }
    --*in_flight;
    return at::full({1}, static_cast<int64_t>(i), at::kLong);
  }
};

TEST(DataLoaderWorkers, WorkersLoadConcurrently) {
  Overlap two{8, true};
  DataLoader concurrent(two, {.batch_size = 1, .num_workers = 2});
  EXPECT_EQ(concat(epoch_of(concurrent)), (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_GE(two.max_in_flight->load(), 2);

  for (int workers : {0, 1}) {
    Overlap one{8, false};
    DataLoader serial(one, {.batch_size = 1, .num_workers = workers});
    EXPECT_EQ(concat(epoch_of(serial)), (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7}));
    EXPECT_EQ(one.max_in_flight->load(), 1) << workers << " workers";
  }
}

// ---------------------------------------------------------------------- iterable datasets

TEST(DataLoaderIterable, BatchesAndDropLast) {
  for (int workers : {0, 1, 2}) {
    DataLoader loader(Counter{7}, {.batch_size = 3, .num_workers = workers});
    EXPECT_FALSE(loader.map_style());
    EXPECT_EQ(epoch_of(loader), (Batches{{0, 1, 2}, {3, 4, 5}, {6}})) << workers;
    EXPECT_EQ(epoch_of(loader), (Batches{{0, 1, 2}, {3, 4, 5}, {6}})) << workers;  // reset()
    DataLoader dropping(Counter{7}, {.batch_size = 3, .drop_last = true, .num_workers = workers});
    EXPECT_EQ(epoch_of(dropping), (Batches{{0, 1, 2}, {3, 4, 5}})) << workers;
    DataLoader exact(Counter{6}, {.batch_size = 3, .drop_last = true, .num_workers = workers});
    EXPECT_EQ(epoch_of(exact), (Batches{{0, 1, 2}, {3, 4, 5}})) << workers;
    DataLoader empty(Counter{0}, {.batch_size = 3, .num_workers = workers});
    EXPECT_TRUE(epoch_of(empty).empty()) << workers;
  }
}

TEST(DataLoaderIterable, SizeWithAndWithoutDatasetSize) {
  DataLoader sized(SizedCounter{7}, {.batch_size = 3});
  EXPECT_EQ(sized.size(), 3);
  EXPECT_EQ(sized.total_dataset_length(), 7);
  EXPECT_EQ(sized.batch_size(), 3);
  EXPECT_EQ(sized.total_batch_size(), 3);
  EXPECT_EQ(epoch_of(sized).size(), 3u);
  DataLoader sized_drop(SizedCounter{7}, {.batch_size = 3, .drop_last = true});
  EXPECT_EQ(sized_drop.size(), 2);
  EXPECT_TRUE(sized_drop.drop_last());

  DataLoader unsized(Counter{7}, {.batch_size = 3});
  EXPECT_ERROR_CONTAINS(unsized.size(), "has no size()");
  EXPECT_ERROR_CONTAINS(unsized.total_dataset_length(), "has no size()");
  EXPECT_EQ(unsized.batch_size(), 3);
}

TEST(DataLoaderIterable, NextExceptionSurfacesAndDoesNotHang) {
  for (int workers : {0, 1}) {
    // Item 4 is in the second batch; the loader reads one batch ahead (to know which batch is
    // the last, as Accelerate's DataLoaderShard does), so the error comes while fetching the
    // first one.
    DataLoader loader(FaultyStream{9, 4}, {.batch_size = 3, .num_workers = workers});
    Batches got;
    EXPECT_ERROR_CONTAINS(
        {
          for (at::Tensor& b : loader) got.push_back(flat(b));
        },
        "FaultyStream: broken item 4");
    EXPECT_TRUE(got.empty()) << workers;
    // In the third batch: the first batch comes through.
    DataLoader later(FaultyStream{9, 7}, {.batch_size = 3, .num_workers = workers});
    got.clear();
    EXPECT_ERROR_CONTAINS(
        {
          for (at::Tensor& b : later) got.push_back(flat(b));
        },
        "FaultyStream: broken item 7");
    EXPECT_EQ(got, (Batches{{0, 1, 2}})) << workers;
  }
}

TEST(DataLoaderIterable, BreakingOutOfABackgroundReaderDoesNotHang) {
  struct Endless {
    int64_t i = 0;
    void reset() { i = 0; }
    std::optional<int64_t> next() { return i++; }
  };
  DataLoader loader(Endless{}, {.batch_size = 4, .num_workers = 1});
  int seen = 0;
  for (at::Tensor& b : loader) {
    EXPECT_EQ(flat(b)[0], 4 * seen);
    if (++seen == 3) break;
  }
  EXPECT_EQ(seen, 3);
}

// ---------------------------------------------------------------------- sizes

TEST(DataLoaderSizes, MapStyleSizes) {
  DataLoader loader(Range{10}, {.batch_size = 3});
  EXPECT_TRUE(loader.map_style());
  EXPECT_EQ(loader.size(), 4);
  EXPECT_EQ(loader.batch_size(), 3);
  EXPECT_EQ(loader.total_batch_size(), 3);
  EXPECT_EQ(loader.total_dataset_length(), 10);
  EXPECT_FALSE(loader.drop_last());
  EXPECT_FALSE(loader.prepared());

  DataLoader dropping(Range{10}, {.batch_size = 3, .drop_last = true});
  EXPECT_EQ(dropping.size(), 3);
  EXPECT_TRUE(dropping.drop_last());
  EXPECT_EQ(dropping.total_dataset_length(), 10);

  DataLoader one(Range{10});
  EXPECT_EQ(one.size(), 10);
  EXPECT_EQ(one.batch_size(), 1);

  auto gs = std::make_shared<data::GradientState>();
  auto prepared = data::prepare_data_loader(loader, {.gradient_state = gs});
  EXPECT_TRUE(prepared.prepared());
  EXPECT_EQ(prepared.size(), 4);
  EXPECT_EQ(prepared.total_batch_size(), 3);
  EXPECT_EQ(prepared.total_dataset_length(), 10);

  auto skipped = data::skip_first_batches(loader, 1);
  EXPECT_EQ(skipped.size(), 3);
  EXPECT_EQ(data::skip_first_batches(loader, 9).size(), 0);
  EXPECT_ERROR_CONTAINS(data::skip_first_batches(loader, -1), "num_batches must be >= 0");
}

// ---------------------------------------------------------------------- positions

TEST(DataLoaderPosition, ResumesMidEpochOnAFreshLoader) {
  for (int workers : {0, 2}) {
    const data::DataLoaderOptions options{
        .batch_size = 3, .shuffle = true, .generator = seeded(11), .num_workers = workers};
    DataLoader original(Range{20}, options);
    EXPECT_EQ(epoch_of(original).size(), 7u);  // epoch 0, so that the position is in epoch 1
    Batches epoch1;
    data::LoaderPosition pos;
    for (at::Tensor& b : original) {
      epoch1.push_back(flat(b));
      if (epoch1.size() == 2) pos = original.position();
    }
    EXPECT_EQ(pos.epoch, 1);
    EXPECT_EQ(pos.batches_yielded, 2);
    EXPECT_FALSE(pos.sampler_state.empty());
    const Batches epoch2 = epoch_of(original);

    DataLoader fresh(
        Range{20},
        data::DataLoaderOptions{
            .batch_size = 3, .shuffle = true, .generator = seeded(11), .num_workers = workers});
    fresh.set_position(pos);
    EXPECT_EQ(epoch_of(fresh), Batches(epoch1.begin() + 2, epoch1.end())) << workers;
    EXPECT_EQ(fresh.iteration(), 2);
    EXPECT_EQ(epoch_of(fresh), epoch2) << workers;
  }
}

TEST(DataLoaderPosition, PositionBetweenEpochs) {
  DataLoader loader(Range{10}, {.batch_size = 4, .shuffle = true, .generator = seeded(5)});
  const auto start = loader.position();
  EXPECT_EQ(start.epoch, 0);
  EXPECT_EQ(start.batches_yielded, 0);
  const Batches first = epoch_of(loader);
  const auto after = loader.position();
  EXPECT_EQ(after.epoch, 1);
  EXPECT_EQ(after.batches_yielded, 0);
  const Batches second = epoch_of(loader);

  // A fresh loader from the start position repeats the first epoch; from `after`, the second.
  DataLoader from_start(Range{10}, {.batch_size = 4, .shuffle = true, .generator = seeded(99)});
  from_start.set_position(start);
  EXPECT_EQ(epoch_of(from_start), first);
  DataLoader from_after(Range{10}, {.batch_size = 4, .shuffle = true, .generator = seeded(99)});
  from_after.set_position(after);
  EXPECT_EQ(epoch_of(from_after), second);
  EXPECT_EQ(from_after.position().epoch, 2);

  // A position carrying a generator state does not fit a loader whose sampler has none.
  DataLoader plain(Range{10}, {.batch_size = 4});
  EXPECT_TRUE(plain.position().sampler_state.empty());
  EXPECT_ERROR_CONTAINS(plain.set_position(after), "sampler has no generator");
  EXPECT_ERROR_CONTAINS(plain.set_position({.epoch = -1}), "invalid loader position");
}

TEST(DataLoaderPosition, IterableLoaderResumesByReading) {
  DataLoader original(Counter{10}, {.batch_size = 3});
  data::LoaderPosition pos;
  int seen = 0;
  for (at::Tensor& b : original) {
    (void)b;
    if (++seen == 1) pos = original.position();
  }
  EXPECT_EQ(pos.epoch, 0);
  EXPECT_EQ(pos.batches_yielded, 1);
  DataLoader fresh(Counter{10}, {.batch_size = 3, .num_workers = 1});
  fresh.set_position(pos);
  EXPECT_EQ(epoch_of(fresh), (Batches{{3, 4, 5}, {6, 7, 8}, {9}}));
  EXPECT_EQ(epoch_of(fresh), (Batches{{0, 1, 2}, {3, 4, 5}, {6, 7, 8}, {9}}));
}

TEST(DataLoaderPosition, SkipFirstBatchesAndSetPositionDoNotLoadSkippedSamples) {
  for (int workers : {0, 2}) {
    CountingRange ds{10};
    DataLoader loader(ds, {.batch_size = 2, .num_workers = workers});
    auto skipped = data::skip_first_batches(loader, 3);
    EXPECT_EQ(epoch_of(skipped), (Batches{{6, 7}, {8, 9}})) << workers;
    EXPECT_EQ(ds.calls->load(), 4) << workers;
    EXPECT_EQ(epoch_of(skipped), (Batches{{6, 7}, {8, 9}})) << workers;  // every iteration
    EXPECT_EQ(ds.calls->load(), 8) << workers;

    ds.calls->store(0);
    loader.set_position({.epoch = 0, .batches_yielded = 4});
    EXPECT_EQ(epoch_of(loader), (Batches{{8, 9}})) << workers;
    EXPECT_EQ(ds.calls->load(), 2) << workers;
    EXPECT_EQ(epoch_of(loader).size(), 5u) << workers;  // only the next iteration skips
  }
  // Shuffled: the skipped loader gives the tail of the same permutation.
  DataLoader shuffled(Range{10}, {.batch_size = 3, .shuffle = true, .generator = seeded(4)});
  const Batches full = chunks(randperm_of(10, seeded(4)), 3);
  auto tail = data::skip_first_batches(shuffled, 2);
  EXPECT_EQ(epoch_of(tail), Batches(full.begin() + 2, full.end()));
}

// ---------------------------------------------------------------------- gradient state

TEST(DataLoaderGradientState, EndOfDataloaderAndRemainder) {
  struct Case {
    int64_t n, batch_size;
    bool drop_last;
    int64_t batches, remainder;
  };
  for (const Case& c : {Case{10, 4, false, 3, 2}, Case{12, 4, false, 3, 0},
                        Case{10, 4, true, 2, -1}, Case{3, 4, false, 1, 3}}) {
    for (int workers : {0, 2}) {
      auto gs = std::make_shared<data::GradientState>();
      DataLoader loader(
          Range{c.n},
          {.batch_size = c.batch_size, .drop_last = c.drop_last, .num_workers = workers});
      auto prepared = data::prepare_data_loader(loader, {.gradient_state = gs});
      EXPECT_FALSE(gs->in_dataloader());
      EXPECT_EQ(gs->remainder(), -1);
      std::vector<bool> ends;
      for (at::Tensor& b : prepared) {
        (void)b;
        EXPECT_TRUE(gs->in_dataloader());
        EXPECT_EQ(gs->active_dataloaders(), 1u);
        ends.push_back(gs->end_of_dataloader());
        EXPECT_EQ(prepared.end_of_dataloader(), ends.back());
        EXPECT_EQ(gs->remainder(), c.remainder) << c.n << "/" << c.batch_size;
        EXPECT_EQ(prepared.remainder(), c.remainder);
      }
      std::vector<bool> expected(static_cast<size_t>(c.batches), false);
      expected.back() = true;
      EXPECT_EQ(ends, expected) << c.n << "/" << c.batch_size << " drop_last " << c.drop_last;
      EXPECT_FALSE(gs->in_dataloader());
      EXPECT_FALSE(gs->end_of_dataloader());

      // break: unregistered when the loop's iterator goes away.
      for (at::Tensor& b : prepared) {
        (void)b;
        EXPECT_TRUE(gs->in_dataloader());
        break;
      }
      EXPECT_FALSE(gs->in_dataloader());
      EXPECT_EQ(gs->active_dataloaders(), 0u);
    }
  }
}

TEST(DataLoaderGradientState, UnregisteredWhenALoadFails) {
  for (int workers : {0, 2}) {
    auto gs = std::make_shared<data::GradientState>();
    auto prepared = data::prepare_data_loader(
        DataLoader(Faulty{10, 5}, {.batch_size = 2, .num_workers = workers}),
        {.gradient_state = gs});
    int seen = 0;
    EXPECT_ERROR_CONTAINS(
        {
          for (at::Tensor& b : prepared) {
            (void)b;
            EXPECT_TRUE(gs->in_dataloader());
            ++seen;
          }
        },
        "cannot read sample 5");
    EXPECT_EQ(seen, 2);
    EXPECT_FALSE(gs->in_dataloader()) << workers;
  }
}

TEST(DataLoaderGradientState, NestedLoadersReportTheInnermost) {
  auto gs = std::make_shared<data::GradientState>();
  auto outer =
      data::prepare_data_loader(DataLoader(Range{4}, {.batch_size = 2}), {.gradient_state = gs});
  auto inner =
      data::prepare_data_loader(DataLoader(Range{3}, {.batch_size = 2}), {.gradient_state = gs});
  int outer_batches = 0;
  for (at::Tensor& o : outer) {
    (void)o;
    ++outer_batches;
    std::vector<bool> inner_ends;
    for (at::Tensor& i : inner) {
      (void)i;
      EXPECT_EQ(gs->active_dataloaders(), 2u);
      EXPECT_EQ(gs->remainder(), 1);
      inner_ends.push_back(gs->end_of_dataloader());
    }
    EXPECT_EQ(inner_ends, (std::vector<bool>{false, true}));
    EXPECT_EQ(gs->active_dataloaders(), 1u);
    EXPECT_EQ(gs->remainder(), 0);
    EXPECT_EQ(gs->end_of_dataloader(), outer_batches == 2);
  }
  EXPECT_FALSE(gs->in_dataloader());

  // An unprepared loader does not register.
  DataLoader plain(Range{4}, {.batch_size = 2});
  for (at::Tensor& b : plain) {
    (void)b;
    EXPECT_FALSE(gs->in_dataloader());
  }
}

TEST(DataLoaderGradientState, IterablePreparedLoader) {
  auto gs = std::make_shared<data::GradientState>();
  auto prepared = data::prepare_data_loader(DataLoader(SizedCounter{7}, {.batch_size = 3}),
                                            {.gradient_state = gs});
  std::vector<bool> ends;
  for (at::Tensor& b : prepared) {
    (void)b;
    ends.push_back(gs->end_of_dataloader());
    EXPECT_EQ(gs->remainder(), 1);
  }
  EXPECT_EQ(ends, (std::vector<bool>{false, false, true}));
  EXPECT_FALSE(gs->in_dataloader());
}

}  // namespace
