// Restored loader positions must lie inside the dataset: a position past the end of the epoch
// (a checkpoint of a larger dataset, or a damaged one) is refused, naming both numbers, and the
// loader is left as it was.

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

}  // namespace
