// Restored loader positions must lie inside the dataset: a position past the end of the epoch
// (a checkpoint of a larger dataset, or a damaged one) is refused, naming both numbers, and the
// loader is left as it was; so are the other loaders when load_state restores several.

#include <accelerate/accelerator.h>
#include <accelerate/data.h>

#include <gtest/gtest.h>

#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>
#include "expect_error.h"
#include "files.h"

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace {

namespace data = accelerate::data;
using accelerate::testing::error_of;
using accelerate::testing::same;
using accelerate::testing::TempDir;
using data::DataLoader;

struct Range {
  int64_t n;
  int64_t size() const { return n; }
  at::Tensor get(size_t i) const { return at::full({1}, static_cast<int64_t>(i), at::kLong); }
};

struct Counter {
  int64_t n;
  int64_t i = 0;
  void reset() { i = 0; }
  std::optional<int64_t> next() { return i < n ? std::optional<int64_t>(i++) : std::nullopt; }
};

template <class Loader>
std::vector<int64_t> firsts(Loader& loader) {
  std::vector<int64_t> out;
  for (at::Tensor& b : loader) out.push_back(b[0].item<int64_t>());
  return out;
}

TEST(LoaderPositions, APositionPastTheEpochIsRefusedAndChangesNothing) {
  DataLoader loader(Range{10}, {.batch_size = 4});  // 3 batches
  ASSERT_EQ(loader.size(), 3);
  loader.set_epoch(2);
  EXPECT_EQ(error_of([&] { loader.set_position({.epoch = 5, .batches_yielded = 4}); }),
            "accelerate: the loader position is outside the dataset: 4 batches already yielded, "
            "but this loader has 3 batches per epoch");
  EXPECT_EQ(loader.iteration(), 2);
  EXPECT_EQ(firsts(loader), (std::vector<int64_t>{0, 4, 8}));

  // The end of the epoch itself is inside: a position taken at the last batch.
  loader.set_position({.epoch = 1, .batches_yielded = 3});
  EXPECT_EQ(loader.iteration(), 1);
  EXPECT_TRUE(firsts(loader).empty());
  EXPECT_EQ(loader.iteration(), 2);
}

TEST(LoaderPositions, SkippedBatchesCountTowardsTheBound) {
  // Positions of a skip_first_batches loader include the skipped batches.
  DataLoader loader(Range{10}, {.batch_size = 4});
  auto skipped = data::skip_first_batches(loader, 1);
  ASSERT_EQ(skipped.size(), 2);
  EXPECT_NO_THROW(skipped.set_position({.batches_yielded = 3}));
  EXPECT_EQ(error_of([&] { skipped.set_position({.batches_yielded = 4}); }),
            "accelerate: the loader position is outside the dataset: 4 batches already yielded, "
            "but this loader has 3 batches per epoch");
}

TEST(LoaderPositions, IterableDatasetsAreBoundedOnlyWhenTheirSizeIsKnown) {
  DataLoader unsized(Counter{10}, {.batch_size = 3});
  EXPECT_NO_THROW(unsized.set_position({.batches_yielded = 100}));
  EXPECT_TRUE(firsts(unsized).empty());

  struct SizedCounter : Counter {
    int64_t size() const { return n; }
  };
  DataLoader sized(SizedCounter{{10}}, {.batch_size = 3});  // 4 batches
  EXPECT_EQ(error_of([&] { sized.set_position({.batches_yielded = 5}); }),
            "accelerate: the loader position is outside the dataset: 5 batches already yielded, "
            "but this loader has 4 batches per epoch");
}

// A model, an optimizer and a loader over `rows` rows in batches of 4, prepared.
struct Prepared {
  accelerate::Accelerator accelerator;
  torch::nn::Linear linear{nullptr};
  std::shared_ptr<torch::optim::SGD> sgd;
  DataLoader<at::Tensor> loader;

  Prepared(int64_t rows, float fill)
      : accelerator([] {
          accelerate::AcceleratorOptions o;
          o.state = accelerate::PartialState::from_environment({}, accelerate::EnvMap{});
          o.gradient_state = std::make_shared<data::GradientState>();
          return o;
        }()),
        loader(Range{rows}, {.batch_size = 4}) {
    linear = torch::nn::Linear(1, 1);
    {
      torch::NoGradGuard no_grad;
      linear->weight.fill_(fill);
      linear->bias.fill_(fill);
    }
    sgd = std::make_shared<torch::optim::SGD>(linear->parameters(), torch::optim::SGDOptions(0.1));
    loader = std::get<2>(accelerator.prepare(linear, sgd, loader));
  }
};

TEST(LoaderPositions, LoadStateRefusesAPositionOutsideTheDatasetBeforeLoadingAnything) {
  TempDir tmp;
  const auto dir = tmp.path() / "ckpt";
  {
    Prepared big(40, 1.0f);  // 10 batches
    int seen = 0;
    for (at::Tensor& b : big.loader) {
      (void)b;
      if (++seen == 3) {
        big.accelerator.save_state(dir.string());
        break;
      }
    }
  }
  Prepared small(8, 5.0f);  // 2 batches
  const std::string error = error_of([&] { small.accelerator.load_state(dir.string()); });
  EXPECT_EQ(error.rfind("accelerate: load_state: ", 0), 0u) << error;
  EXPECT_NE(error.find(dir.filename().string()), std::string::npos) << error;
  const std::string tail =
      ": data loader 0: the loader position is outside the dataset: 3 batches already yielded, "
      "but this loader has 2 batches per epoch";
  ASSERT_GE(error.size(), tail.size());
  EXPECT_EQ(error.substr(error.size() - tail.size()), tail);
  // Nothing was loaded: the model keeps its own weights, the loader its own start.
  EXPECT_TRUE(same(small.linear->weight.detach(), at::full({1, 1}, 5.0f)));
  EXPECT_TRUE(same(small.linear->bias.detach(), at::full({1}, 5.0f)));
  EXPECT_EQ(small.loader.position().batches_yielded, 0);
  EXPECT_EQ(firsts(small.loader), (std::vector<int64_t>{0, 4}));
}

// Two prepared loaders and nothing else: what load_state restores of them, all or nothing.
struct TwoLoaders {
  accelerate::Accelerator accelerator;
  DataLoader<at::Tensor> first;
  DataLoader<at::Tensor> second;

  TwoLoaders(int64_t first_rows, int64_t second_rows)
      : accelerator([] {
          accelerate::AcceleratorOptions o;
          o.state = accelerate::PartialState::from_environment({}, accelerate::EnvMap{});
          o.gradient_state = std::make_shared<data::GradientState>();
          return o;
        }()),
        first(accelerator.prepare_data_loader(DataLoader(Range{first_rows}, {.batch_size = 4}))),
        second(accelerator.prepare_data_loader(DataLoader(Range{second_rows}, {.batch_size = 4}))) {
  }
};

// Saves a checkpoint in which the first loader stands at epoch 7 after 2 batches and the second
// at epoch 0 after 3 batches (both over 40 rows, 10 batches an epoch).
void save_two_positions(const std::filesystem::path& dir) {
  TwoLoaders saving(40, 40);
  saving.first.set_epoch(7);
  int first_seen = 0;
  for (at::Tensor& a : saving.first) {
    (void)a;
    if (++first_seen < 2) continue;
    int second_seen = 0;
    for (at::Tensor& b : saving.second) {
      (void)b;
      if (++second_seen == 3) {
        ASSERT_EQ(saving.first.position(),
                  (data::LoaderPosition{.epoch = 7, .batches_yielded = 2}));
        ASSERT_EQ(saving.second.position(),
                  (data::LoaderPosition{.epoch = 0, .batches_yielded = 3}));
        saving.accelerator.save_state(dir.string());
        break;
      }
    }
    break;
  }
}

TEST(LoaderPositions, LoadStateRestoresEveryLoaderOrNone) {
  TempDir tmp;
  const auto dir = tmp.path() / "ckpt";
  ASSERT_NO_FATAL_FAILURE(save_two_positions(dir));

  // The second loader has 2 batches an epoch and refuses its 3: the first, which would accept
  // its position, must stay where it was (epoch 4, at the start).
  TwoLoaders loading(40, 8);
  loading.first.set_epoch(4);
  const data::LoaderPosition before{.epoch = 4, .batches_yielded = 0};
  ASSERT_EQ(loading.first.position(), before);
  EXPECT_EQ(error_of([&] { loading.accelerator.load_state(dir.string()); }),
            "accelerate: load_state: \"" + (dir / "random_states_0.safetensors").string() +
                "\": data loader 1: the loader position is outside the dataset: 3 batches already "
                "yielded, but this loader has 2 batches per epoch");
  EXPECT_EQ(loading.first.position(), before);
  EXPECT_EQ(loading.first.iteration(), 4);
  EXPECT_EQ(loading.second.position(), (data::LoaderPosition{}));
  // Whole epochs from their first batch, counted on from where each was.
  EXPECT_EQ(firsts(loading.first), (std::vector<int64_t>{0, 4, 8, 12, 16, 20, 24, 28, 32, 36}));
  EXPECT_EQ(loading.first.iteration(), 5);
  EXPECT_EQ(firsts(loading.second), (std::vector<int64_t>{0, 4}));
  EXPECT_EQ(loading.second.iteration(), 1);

  // With both positions inside their datasets both are restored.
  TwoLoaders fitting(40, 16);  // 4 batches: 3 yielded leave 1
  fitting.first.set_epoch(4);
  ASSERT_NO_THROW(fitting.accelerator.load_state(dir.string()));
  EXPECT_EQ(fitting.first.iteration(), 7);
  EXPECT_EQ(firsts(fitting.first), (std::vector<int64_t>{8, 12, 16, 20, 24, 28, 32, 36}));
  EXPECT_EQ(fitting.first.iteration(), 8);
  EXPECT_EQ(firsts(fitting.second), (std::vector<int64_t>{12}));
  EXPECT_EQ(fitting.second.iteration(), 1);
}

}  // namespace
