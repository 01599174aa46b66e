// The Accelerator in one process: option resolution, prepare, gradient accumulation, the
// optimizer and scheduler wrappers, autocast.

#include <accelerate/accelerator.h>

#include <gtest/gtest.h>

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>
#include "expect_error.h"

#include <cmath>
#include <memory>
#include <string>
#include <vector>

namespace {

using accelerate::testing::error_of;

using accelerate::Accelerator;
using accelerate::AcceleratorOptions;
using accelerate::EnvMap;
using accelerate::resolve_accelerator_options;
namespace data = accelerate::data;

// One process, its own states, so tests do not share the process-wide ones.
AcceleratorOptions single(AcceleratorOptions o = {}) {
  o.state = accelerate::PartialState::from_environment({}, EnvMap{});
  o.gradient_state = std::make_shared<data::GradientState>();
  return o;
}

// Rows i of x: [i, i/2, 1 - i/10, (i % 3)], target 0.5*i - 1.
struct Rows {
  int64_t n;
  int64_t size() const { return n; }
  torch::data::Example<> get(size_t i) const {
    const double v = static_cast<double>(i);
    return {at::tensor({v / 8, v / 16, 1 - v / 10, static_cast<double>(i % 3)}, at::kFloat),
            at::tensor({0.5 * v / 8 - 1}, at::kFloat)};
  }
};

torch::nn::Sequential mlp(uint64_t seed) {
  torch::manual_seed(seed);
  return torch::nn::Sequential(torch::nn::Linear(4, 8), torch::nn::Tanh(), torch::nn::Linear(8, 1));
}

std::vector<at::Tensor> snapshot(const torch::nn::Module& m) {
  std::vector<at::Tensor> out;
  for (const auto& p : m.parameters()) out.push_back(p.detach().clone());
  return out;
}

void expect_close(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b, double tol) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(at::allclose(a[i], b[i], tol, tol)) << "tensor " << i << "\n"
                                                    << a[i] << "\nvs\n"
                                                    << b[i];
  }
}

// ---------------------------------------------------------------------- options

TEST(AcceleratorOptions, ExplicitBeatsEnvironmentBeatsDefault) {
  const EnvMap env{{"ACCELERATE_MIXED_PRECISION", "bf16"},
                   {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4"},
                   {"ACCELERATE_USE_CPU", "true"}};
  auto from_env = resolve_accelerator_options({}, env);
  EXPECT_EQ(from_env.mixed_precision, accelerate::MixedPrecision::BF16);
  EXPECT_EQ(from_env.gradient_accumulation.num_steps, 4);
  EXPECT_EQ(from_env.cpu, std::optional<bool>(true));
  EXPECT_EQ(from_env.sources.at("mixed_precision"), "environment");
  EXPECT_EQ(from_env.sources.at("gradient_accumulation_steps"), "environment");

  auto explicit_wins = resolve_accelerator_options(
      {.mixed_precision = "no", .gradient_accumulation_steps = 2, .cpu = false}, env);
  EXPECT_EQ(explicit_wins.mixed_precision, accelerate::MixedPrecision::NO);
  EXPECT_EQ(explicit_wins.gradient_accumulation.num_steps, 2);
  EXPECT_EQ(explicit_wins.cpu, std::optional<bool>(false));
  EXPECT_EQ(explicit_wins.sources.at("mixed_precision"), "argument");

  auto defaults = resolve_accelerator_options({}, {});
  EXPECT_EQ(defaults.mixed_precision, accelerate::MixedPrecision::NO);
  EXPECT_EQ(defaults.gradient_accumulation.num_steps, 1);
  EXPECT_TRUE(defaults.device_placement);
  EXPECT_TRUE(defaults.even_batches);
  EXPECT_TRUE(defaults.step_scheduler_with_optimizer);
  EXPECT_FALSE(defaults.split_batches);
  EXPECT_FALSE(defaults.cpu.has_value());
  EXPECT_EQ(defaults.sources.at("mixed_precision"), "default");
  const auto text = from_env.describe();
  EXPECT_NE(text.find("mixed_precision = bf16 (environment)"), std::string::npos) << text;
  EXPECT_NE(text.find("gradient_accumulation_steps = 4 (environment)"), std::string::npos) << text;
}

TEST(AcceleratorOptions, BadValuesAreNamed) {
  EXPECT_ERROR_CONTAINS(resolve_accelerator_options({.mixed_precision = "fp8"}, {}),
                        "mixed_precision must be \"no\", \"bf16\" or \"fp16\", got \"fp8\"");
  EXPECT_ERROR_CONTAINS(resolve_accelerator_options({}, {{"ACCELERATE_MIXED_PRECISION", "half"}}),
                        "ACCELERATE_MIXED_PRECISION");
  EXPECT_ERROR_CONTAINS(resolve_accelerator_options({.gradient_accumulation_steps = 0}, {}),
                        "gradient_accumulation_steps must be >= 1, got 0");
  EXPECT_ERROR_CONTAINS(
      resolve_accelerator_options(
          {.gradient_accumulation_steps = 2,
           .gradient_accumulation_plugin = accelerate::GradientAccumulationPlugin{.num_steps = 2}},
          {}),
      "not both");
  EXPECT_ERROR_CONTAINS(
      resolve_accelerator_options({}, {{"ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "x"}}),
      "ACCELERATE_GRADIENT_ACCUMULATION_STEPS");
  EXPECT_ERROR_CONTAINS(
      resolve_accelerator_options({.scaler_kwargs = accelerate::GradScalerKwargs{}}, {}),
      "scaler_kwargs only apply to mixed_precision=\"fp16\"");
  EXPECT_ERROR_CONTAINS(Accelerator(single({.mixed_precision = "fp16"})),
                        "mixed_precision=\"fp16\" needs a CUDA device");
}

// ---------------------------------------------------------------------- prepare

TEST(AcceleratorPrepare, ReturnsTheSameObjectsInOrder) {
  Accelerator acc(single());
  auto model = mlp(1);
  auto shared = std::make_shared<torch::nn::LinearImpl>(2, 2);
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.1));
  data::DataLoader loader(Rows{10}, {.batch_size = 4});
  auto scheduler = std::shared_ptr<accelerate::LRScheduler>(
      accelerate::get_constant_schedule_with_warmup(sgd, 2));

  auto [m, sh, opt, dl, sched] = acc.prepare(model, shared, sgd, loader, scheduler);
  static_assert(std::is_same_v<decltype(m), torch::nn::Sequential>);
  static_assert(std::is_same_v<decltype(sh), std::shared_ptr<torch::nn::LinearImpl>>);
  static_assert(std::is_same_v<decltype(opt), accelerate::AcceleratedOptimizer>);
  static_assert(std::is_same_v<decltype(dl), decltype(loader)>);
  static_assert(std::is_same_v<decltype(sched), accelerate::AcceleratedScheduler>);
  EXPECT_EQ(m.ptr().get(), model.ptr().get());
  EXPECT_EQ(sh.get(), shared.get());
  EXPECT_EQ(&opt.optimizer(), &sgd);
  EXPECT_EQ(&sched.scheduler(), scheduler.get());
  EXPECT_EQ(dl.size(), 3);
  // One object comes back bare.
  auto again = acc.prepare(model);
  EXPECT_EQ(again.ptr().get(), model.ptr().get());
  EXPECT_EQ(acc.num_processes(), 1);
  EXPECT_EQ(acc.distributed_type(), accelerate::DistributedType::NO);
  EXPECT_TRUE(acc.is_main_process());
  EXPECT_EQ(acc.mixed_precision(), "no");
  EXPECT_EQ(acc.device().type(), c10::kCPU);
}

// ---------------------------------------------------------------------- accumulation

TEST(AcceleratorAccumulation, SyncStepsFollowTheCountAndTheEndOfTheLoader) {
  for (bool with_loader : {true, false}) {
    Accelerator acc(single({.gradient_accumulation_plugin = accelerate::GradientAccumulationPlugin{
                                .num_steps = 3, .sync_with_dataloader = with_loader}}));
    auto model = acc.prepare(mlp(1));
    data::DataLoader loader(Rows{7}, {.batch_size = 1});
    auto dl = acc.prepare(loader);
    std::vector<bool> syncs;
    for (auto& batch : dl) {
      (void)batch;
      auto guard = acc.accumulate(model);
      syncs.push_back(acc.sync_gradients());
    }
    // Batches 3 and 6 complete a cycle; batch 7 is the loader's last.
    EXPECT_EQ(syncs, (std::vector<bool>{false, false, true, false, false, true, with_loader}))
        << "sync_with_dataloader " << with_loader;
    // As in Accelerate the count only restarts at the end of a loader.
    EXPECT_EQ(acc.step(), with_loader ? 0 : 7);
  }
}

// k accumulated batches of b rows step exactly like one batch of k*b rows.
TEST(AcceleratorAccumulation, KStepsEqualOneStepOnAKTimesLargerBatch) {
  constexpr int kSteps = 4;
  auto run = [](int accumulation, int64_t batch_size) {
    Accelerator acc(single({.gradient_accumulation_steps = accumulation}));
    auto model = mlp(7);
    torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.05));
    data::DataLoader loader(Rows{16}, {.batch_size = batch_size});
    auto [m, opt, dl] = acc.prepare(model, sgd, loader);
    for (int epoch = 0; epoch < 2; ++epoch) {
      for (auto& batch : dl) {
        auto guard = acc.accumulate(m);
        auto loss = torch::mse_loss(m->forward(batch.data), batch.target);
        acc.backward(loss);
        opt.step();
        opt.zero_grad();
      }
    }
    return snapshot(*model);
  };
  const auto big = run(1, 4 * kSteps);
  const auto accumulated = run(kSteps, 4);
  expect_close(accumulated, big, 1e-6);
  // And both moved: a test of nothing would pass too.
  const auto start = snapshot(*mlp(7));
  EXPECT_FALSE(at::allclose(big[0], start[0]));
}

TEST(AcceleratorAccumulation, OptimizerWaitsForTheSyncStep) {
  Accelerator acc(single({.gradient_accumulation_steps = 2}));
  auto model = mlp(3);
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.1));
  auto [m, opt] = acc.prepare(model, sgd);
  const auto before = snapshot(*m);
  auto x = at::ones({2, 4});
  {
    auto guard = acc.accumulate(m);
    EXPECT_FALSE(acc.sync_gradients());
    acc.backward(m->forward(x).sum());
    opt.step();
    opt.zero_grad();
  }
  expect_close(snapshot(*m), before, 0);
  const auto grad_after_one = m->parameters()[0].grad().clone();
  {
    auto guard = acc.accumulate(m);
    EXPECT_TRUE(acc.sync_gradients());
    acc.backward(m->forward(x).sum());
    // Two half-weighted backward passes of the same loss: the gradient of one full one.
    EXPECT_TRUE(at::allclose(m->parameters()[0].grad(), grad_after_one * 2));
    opt.step();
    opt.zero_grad();
  }
  EXPECT_FALSE(at::allclose(snapshot(*m)[0], before[0]));
  EXPECT_FALSE(m->parameters()[0].grad().defined());
}

// ---------------------------------------------------------------------- scheduler

TEST(AcceleratorScheduler, StepsOnlyAfterRealOptimizerSteps) {
  Accelerator acc(single({.gradient_accumulation_steps = 2}));
  auto model = mlp(3);
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(1.0));
  auto linear = std::shared_ptr<accelerate::LRScheduler>(
      accelerate::get_linear_schedule_with_warmup(sgd, 0, 10));
  auto [m, opt, sched] = acc.prepare(model, sgd, linear);
  std::vector<double> lrs;
  for (int i = 0; i < 6; ++i) {
    auto guard = acc.accumulate(m);
    acc.backward(m->forward(at::ones({1, 4})).sum());
    opt.step();
    sched.step();
    opt.zero_grad();
    lrs.push_back(sched.get_last_lr()[0]);
  }
  // Steps 2, 4, 6 step the optimizer: 1 - k/10 after k scheduler steps.
  const std::vector<double> expected{1.0, 0.9, 0.9, 0.8, 0.8, 0.7};
  ASSERT_EQ(lrs.size(), expected.size());
  for (size_t i = 0; i < lrs.size(); ++i) EXPECT_NEAR(lrs[i], expected[i], 1e-12) << i;
  EXPECT_NEAR(sgd.param_groups()[0].options().get_lr(), 0.7, 1e-12);
}

TEST(AcceleratorScheduler, WithoutStepWithOptimizerItStepsEveryCall) {
  Accelerator acc(
      single({.gradient_accumulation_steps = 2, .step_scheduler_with_optimizer = false}));
  auto model = mlp(3);
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(1.0));
  auto [m, opt, sched] = acc.prepare(model, sgd,
                                     std::shared_ptr<accelerate::LRScheduler>(
                                         accelerate::get_linear_schedule_with_warmup(sgd, 0, 10)));
  for (int i = 0; i < 3; ++i) {
    auto guard = acc.accumulate(m);
    sched.step();
  }
  EXPECT_NEAR(sched.get_last_lr()[0], 0.7, 1e-12);
}

// ---------------------------------------------------------------------- precision and clipping

TEST(AcceleratorPrecision, Bf16AutocastInsideTheGuardFp32Outside) {
  Accelerator acc(single({.mixed_precision = "bf16"}));
  auto model = acc.prepare(torch::nn::Linear(4, 3));
  auto x = at::randn({2, 4});
  {
    auto autocast = acc.autocast();
    EXPECT_TRUE(autocast.active());
    EXPECT_EQ(model->forward(x).scalar_type(), at::kBFloat16);
    EXPECT_EQ(at::matmul(x, x.t()).scalar_type(), at::kBFloat16);
  }
  EXPECT_EQ(model->forward(x).scalar_type(), at::kFloat);
  EXPECT_EQ(at::matmul(x, x.t()).scalar_type(), at::kFloat);

  Accelerator plain(single());
  auto none = plain.autocast();
  EXPECT_FALSE(none.active());
  EXPECT_EQ(at::matmul(x, x.t()).scalar_type(), at::kFloat);
}

TEST(AcceleratorPrecision, ClipGradNormReturnsTheNormBeforeClipping) {
  Accelerator acc(single());
  auto w = torch::tensor({1.0, 2.0}, torch::requires_grad());
  (w * torch::tensor({3.0, 4.0})).sum().backward();  // grad (3, 4), norm 5
  const double norm = acc.clip_grad_norm_({w}, 1.0);
  EXPECT_NEAR(norm, 5.0, 1e-9);
  EXPECT_NEAR(w.grad()[0].item<double>(), 0.6, 1e-6);
  EXPECT_NEAR(w.grad()[1].item<double>(), 0.8, 1e-6);
  acc.clip_grad_value_({w}, 0.7);
  EXPECT_NEAR(w.grad()[1].item<double>(), 0.7, 1e-6);
}

TEST(AcceleratorModels, StateDictHasParametersAndBuffersOnTheCpu) {
  Accelerator acc(single());
  auto model = acc.prepare(mlp(2));
  auto sd = acc.get_state_dict(*model);
  EXPECT_EQ(sd.keys(), (std::vector<std::string>{"0.weight", "0.bias", "2.weight", "2.bias"}));
  EXPECT_TRUE(at::equal(sd["0.weight"], model->parameters()[0]));
  sd["0.weight"].fill_(0);  // a copy
  EXPECT_FALSE(at::equal(sd["0.weight"], model->parameters()[0]));
  EXPECT_EQ(acc.unwrap_model(model).ptr().get(), model.ptr().get());
  EXPECT_FALSE(acc.verify_device_map(*model));
  acc.free_memory();
  EXPECT_EQ(acc.step(), 0);
}

}  // namespace
