// The Accelerator with several ranks (threads over a HashStore): training on 2 processes
// matches training on 1 with the same global batch; accumulation keeps gradients local until
// the sync step; the scheduler follows Accelerate's num_processes rule; gather_for_metrics.

#include <accelerate/accelerator.h>

#include <gtest/gtest.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/functional.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>

#include "thread_ranks.h"

#include <mutex>
#include <vector>

namespace {

using accelerate::Accelerator;
using accelerate::AcceleratorOptions;
using accelerate::PartialState;
using accelerate::testing::run_ranks;
namespace data = accelerate::data;

// Rows i: features [i/8, i/16, 1 - i/10, i % 3], target [i/16 - 1, (i % 2)].
struct Rows {
  int64_t n;
  int64_t size() const { return n; }
  torch::data::Example<> get(size_t i) const {
    const double v = static_cast<double>(i);
    return {at::tensor({v / 8, v / 16, 1 - v / 10, static_cast<double>(i % 3)}, at::kFloat),
            at::tensor({v / 16 - 1, static_cast<double>(i % 2)}, at::kFloat)};
  }
};

// 1x6x6 images with a pattern that depends on i; target: two numbers.
struct Images {
  int64_t n;
  int64_t size() const { return n; }
  torch::data::Example<> get(size_t i) const {
    auto img =
        at::arange(36, at::kFloat).view({1, 6, 6}).mul(0.01 * static_cast<double>(i % 5)).sin();
    return {img,
            at::tensor({static_cast<double>(i % 4) / 4, 0.1 * static_cast<double>(i)}, at::kFloat)};
  }
};

std::mutex seed_mutex;  // the global generator is shared by the rank threads

torch::nn::Sequential make_mlp(uint64_t seed) {
  std::lock_guard<std::mutex> lock(seed_mutex);
  torch::manual_seed(seed);
  return torch::nn::Sequential(torch::nn::Linear(4, 16), torch::nn::Tanh(),
                               torch::nn::Linear(16, 2));
}

torch::nn::Sequential make_convnet(uint64_t seed) {
  std::lock_guard<std::mutex> lock(seed_mutex);
  torch::manual_seed(seed);
  return torch::nn::Sequential(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3)), torch::nn::ReLU(),
      torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 4, 3)), torch::nn::ReLU(),
      torch::nn::Functional([](const at::Tensor& t) { return t.flatten(1); }),
      torch::nn::Linear(16, 2));
}

std::vector<at::Tensor> snapshot(const torch::nn::Module& m) {
  std::vector<at::Tensor> out;
  for (const auto& p : m.parameters()) out.push_back(p.detach().clone());
  return out;
}

struct Trained {
  std::vector<double> losses;  // the global batch's mean loss, step by step
  std::vector<at::Tensor> weights;
};

// Trains `epochs` epochs with AdamW; every rank builds its model from a different seed, so
// the first broadcast is part of what is tested. The global batch is 8 rows either way.
template <class Dataset, class MakeModel>
Trained train(PartialState& s, Dataset dataset, MakeModel make, bool split_batches) {
  const int world = s.num_processes();
  Accelerator acc({.split_batches = split_batches,
                   .state = s.shared_from_this(),
                   .gradient_state = std::make_shared<data::GradientState>()});
  auto model = make(100 + static_cast<uint64_t>(s.process_index()));
  torch::optim::AdamW adamw(model->parameters(), torch::optim::AdamWOptions(0.01));
  const int64_t per_process = 8 / world;
  data::DataLoader loader(dataset, {.batch_size = split_batches ? 8 : per_process});
  auto [m, opt, dl] = acc.prepare(model, adamw, loader);
  Trained out;
  for (int epoch = 0; epoch < 3; ++epoch) {
    for (auto& batch : dl) {
      EXPECT_EQ(batch.data.size(0), per_process);
      at::Tensor loss = torch::mse_loss(m->forward(batch.data), batch.target);
      acc.backward(loss);
      opt.step();
      opt.zero_grad();
      const at::Tensor mean = acc.reduce(loss.detach(), accelerate::Reduction::kMean);
      out.losses.push_back(mean.item<double>());
    }
  }
  out.weights = snapshot(*m);
  return out;
}

template <class Dataset, class MakeModel>
void expect_two_processes_match_one(Dataset dataset, MakeModel make, bool split_batches) {
  Trained one;
  run_ranks(1, [&](PartialState& s) { one = train(s, dataset, make, split_batches); });
  std::vector<Trained> two(2);
  run_ranks(2, [&](PartialState& s) {
    two[static_cast<size_t>(s.process_index())] = train(s, dataset, make, split_batches);
  });
  ASSERT_EQ(one.losses.size(), 12u);
  for (const auto& rank : two) {
    ASSERT_EQ(rank.losses.size(), one.losses.size());
    for (size_t i = 0; i < one.losses.size(); ++i) {
      EXPECT_NEAR(rank.losses[i], one.losses[i], 1e-5) << "step " << i;
    }
    ASSERT_EQ(rank.weights.size(), one.weights.size());
    for (size_t i = 0; i < one.weights.size(); ++i) {
      EXPECT_TRUE(at::allclose(rank.weights[i], one.weights[i], 1e-5, 1e-5)) << "parameter " << i;
    }
  }
  // Training did something: the last epoch's loss is below the first's (same batches).
  double first = 0, last = 0;
  for (size_t i = 0; i < 4; ++i) {
    first += one.losses[i];
    last += one.losses[one.losses.size() - 4 + i];
  }
  EXPECT_LT(last, first);
}

TEST(AcceleratorDistributed, TwoProcessesTrainAnMlpLikeOne) {
  expect_two_processes_match_one(Rows{32}, make_mlp, /*split_batches=*/true);
  expect_two_processes_match_one(Rows{32}, make_mlp, /*split_batches=*/false);
}

TEST(AcceleratorDistributed, TwoProcessesTrainAConvNetLikeOne) {
  expect_two_processes_match_one(Images{32}, make_convnet, /*split_batches=*/false);
}

TEST(AcceleratorDistributed, AccumulationKeepsGradientsLocalUntilTheSyncStep) {
  std::vector<std::vector<at::Tensor>> local(2), synced(2);
  run_ranks(2, [&](PartialState& s) {
    const auto r = static_cast<size_t>(s.process_index());
    Accelerator acc({.gradient_accumulation_steps = 2,
                     .state = s.shared_from_this(),
                     .gradient_state = std::make_shared<data::GradientState>()});
    auto model = acc.prepare(make_mlp(5));
    auto x = at::full({3, 4}, 1.0 + static_cast<double>(r));  // different data per rank
    {
      auto guard = acc.accumulate(model);
      EXPECT_FALSE(acc.sync_gradients());
      acc.backward(model->forward(x).sum());
      for (const auto& p : model->parameters()) local[r].push_back(p.grad().clone());
    }
    {
      auto guard = acc.accumulate(model);
      EXPECT_TRUE(acc.sync_gradients());
      acc.backward(model->forward(x).sum());
      for (const auto& p : model->parameters()) synced[r].push_back(p.grad().clone());
    }
  });
  // Inside the accumulation step the ranks' gradients differ...
  EXPECT_FALSE(at::allclose(local[0][0], local[1][0]));
  // ...after the sync step they are equal, and equal to the mean of both ranks' two halves.
  for (size_t i = 0; i < synced[0].size(); ++i) {
    EXPECT_TRUE(at::allclose(synced[0][i], synced[1][i], 1e-6, 1e-6)) << i;
    EXPECT_TRUE(at::allclose(synced[0][i], local[0][i] + local[1][i], 1e-5, 1e-5)) << i;
  }
}

TEST(AcceleratorDistributed, TriggerSyncInBackwardOverridesNoSyncAndEvaluationModelsStayLocal) {
  std::vector<std::vector<at::Tensor>> unsynced(2), triggered(2), evaluated(2);
  run_ranks(2, [&](PartialState& s) {
    const auto r = static_cast<size_t>(s.process_index());
    Accelerator acc(
        {.state = s.shared_from_this(), .gradient_state = std::make_shared<data::GradientState>()});
    auto model = acc.prepare(make_mlp(9));
    auto x = at::full({2, 4}, 0.5 + static_cast<double>(r));
    auto grads = [&](const torch::nn::Sequential& m) {
      std::vector<at::Tensor> out;
      for (const auto& p : m->parameters()) out.push_back(p.grad().clone());
      for (auto& p : m->parameters()) p.mutable_grad().reset();
      return out;
    };
    {
      auto off = acc.no_sync(model);
      acc.backward(model->forward(x).sum());
      unsynced[r] = grads(model);
      auto on = acc.trigger_sync_in_backward(model);
      acc.backward(model->forward(x).sum());
      triggered[r] = grads(model);
    }
    auto frozen = acc.prepare_model(make_mlp(9), {.evaluation_mode = true});
    acc.backward(frozen->forward(x).sum());
    evaluated[r] = grads(frozen);
  });
  EXPECT_FALSE(at::allclose(unsynced[0][0], unsynced[1][0]));
  for (size_t i = 0; i < triggered[0].size(); ++i) {
    EXPECT_TRUE(at::allclose(triggered[0][i], triggered[1][i], 1e-6, 1e-6)) << i;
    EXPECT_TRUE(at::allclose(triggered[0][i], (unsynced[0][i] + unsynced[1][i]) / 2, 1e-5, 1e-5))
        << i;
  }
  // Evaluation-mode models get no synchroniser: their gradients are each rank's own.
  EXPECT_TRUE(at::allclose(evaluated[0][0], unsynced[0][0]));
  EXPECT_TRUE(at::allclose(evaluated[1][0], unsynced[1][0]));
}

// DDP broadcasts buffers from process 0 before each forward; here the optimizer step is where
// processes agree again, so batch-norm statistics computed on different data become rank 0's.
TEST(AcceleratorDistributed, OptimizerStepGivesEveryProcessTheBuffersOfProcessZero) {
  std::vector<at::Tensor> mean_before(2), mean_after(2);
  run_ranks(2, [&](PartialState& s) {
    const auto r = static_cast<size_t>(s.process_index());
    Accelerator acc(
        {.state = s.shared_from_this(), .gradient_state = std::make_shared<data::GradientState>()});
    torch::nn::Sequential model = [] {
      std::lock_guard<std::mutex> lock(seed_mutex);
      torch::manual_seed(3);
      return torch::nn::Sequential(torch::nn::Linear(4, 4), torch::nn::BatchNorm1d(4));
    }();
    torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.1));
    auto [m, opt] = acc.prepare(model, sgd);
    auto x = at::full({3, 4}, static_cast<double>(r)) + at::arange(12, at::kFloat).view({3, 4});
    acc.backward(m->forward(x).pow(2).sum());
    mean_before[r] = m[1]->as<torch::nn::BatchNorm1d>()->running_mean.clone();
    opt.step();
    mean_after[r] = m[1]->as<torch::nn::BatchNorm1d>()->running_mean.clone();
  });
  EXPECT_FALSE(at::allclose(mean_before[0], mean_before[1]));
  EXPECT_TRUE(at::equal(mean_after[0], mean_before[0]));
  EXPECT_TRUE(at::equal(mean_after[1], mean_before[0]));
}

TEST(AcceleratorDistributed, SchedulerStepsOncePerProcessUnlessSplitBatches) {
  for (bool split : {false, true}) {
    std::vector<int64_t> epochs(3);
    run_ranks(3, [&](PartialState& s) {
      Accelerator acc({.split_batches = split,
                       .state = s.shared_from_this(),
                       .gradient_state = std::make_shared<data::GradientState>()});
      auto model = make_mlp(1);
      torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.1));
      auto [m, opt, sched] =
          acc.prepare(model, sgd,
                      std::shared_ptr<accelerate::LRScheduler>(
                          accelerate::get_linear_schedule_with_warmup(sgd, 0, 100)));
      for (int i = 0; i < 2; ++i) {
        acc.backward(m->forward(at::ones({1, 4})).sum());
        opt.step();
        sched.step();
        opt.zero_grad();
      }
      epochs[static_cast<size_t>(s.process_index())] = sched->last_epoch();
    });
    for (auto e : epochs) EXPECT_EQ(e, split ? 2 : 6) << "split_batches " << split;
  }
}

TEST(AcceleratorDistributed, GatherForMetricsCountsEverySampleOnce) {
  std::vector<std::vector<int64_t>> seen(3);
  run_ranks(3, [&](PartialState& s) {
    Accelerator acc(
        {.state = s.shared_from_this(), .gradient_state = std::make_shared<data::GradientState>()});
    struct Ids {
      int64_t size() const { return 13; }
      at::Tensor get(size_t i) const { return at::tensor({static_cast<int64_t>(i)}); }
    };
    auto dl = acc.prepare(data::DataLoader(Ids{}, {.batch_size = 2}));
    std::vector<int64_t> all;
    for (auto& batch : dl) {
      auto g = acc.gather_for_metrics(batch).flatten();
      for (int64_t i = 0; i < g.numel(); ++i) all.push_back(g[i].item<int64_t>());
    }
    std::sort(all.begin(), all.end());
    seen[static_cast<size_t>(s.process_index())] = all;
  });
  std::vector<int64_t> expected(13);
  for (int64_t i = 0; i < 13; ++i) expected[static_cast<size_t>(i)] = i;
  for (const auto& s : seen) EXPECT_EQ(s, expected);
}

}  // namespace
