#include <accelerate/amp.h>
#include <accelerate/compat.h>

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <gtest/gtest.h>

#include "expect_error.h"

#include <functional>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

using accelerate::AutocastGuard;
using accelerate::GradScaler;
using accelerate::GradScalerKwargs;
using accelerate::GradScalerState;

namespace {

using accelerate::testing::error_of;

at::Tensor fp32(const std::vector<float>& values) {
  return torch::tensor(values);
}

// loss = (w * x).sum(), so d loss / d w = x: the gradient is known exactly.
struct Problem {
  at::Tensor w = fp32({1.0f, 2.0f, 3.0f}).requires_grad_();
  at::Tensor x = fp32({0.5f, -1.5f, 4.0f});
  torch::optim::SGD sgd{{w}, torch::optim::SGDOptions(1.0)};

  void backward(GradScaler& scaler) {
    sgd.zero_grad();
    scaler.scale((w * x).sum()).backward();
  }
};

}  // namespace

// ---------------------------------------------------------------------- autocast

TEST(Autocast, CpuBfloat16InsideFloatOutside) {
  auto a = torch::randn({4, 3});
  auto b = torch::randn({3, 5});
  torch::nn::Linear linear(3, 2);
  {
    AutocastGuard autocast(c10::kCPU, at::kBFloat16);
    EXPECT_TRUE(accelerate::compat::is_autocast_enabled(c10::kCPU));
    EXPECT_EQ(at::matmul(a, b).scalar_type(), at::kBFloat16);
    EXPECT_EQ(linear(a).scalar_type(), at::kBFloat16);
  }
  EXPECT_FALSE(accelerate::compat::is_autocast_enabled(c10::kCPU));
  EXPECT_EQ(at::matmul(a, b).scalar_type(), at::kFloat);
  EXPECT_EQ(linear(a).scalar_type(), at::kFloat);
}

TEST(Autocast, DisabledNestedGuardSwitchesAutocastOff) {
  auto a = torch::randn({4, 3});
  auto b = torch::randn({3, 5});
  AutocastGuard outer(c10::kCPU, at::kBFloat16);
  {
    AutocastGuard off(c10::kCPU, at::kBFloat16, {.enabled = false});
    EXPECT_FALSE(off.enabled());
    EXPECT_FALSE(accelerate::compat::is_autocast_enabled(c10::kCPU));
    EXPECT_EQ(at::matmul(a, b).scalar_type(), at::kFloat);
  }
  EXPECT_TRUE(accelerate::compat::is_autocast_enabled(c10::kCPU));
  EXPECT_EQ(at::matmul(a, b).scalar_type(), at::kBFloat16);
}

TEST(Autocast, RestoresStateWhenAnExceptionUnwinds) {
  auto a = torch::randn({2, 2});
  EXPECT_THROW(
      {
        AutocastGuard autocast(c10::kCPU, at::kBFloat16, {.cache_enabled = false});
        EXPECT_EQ(at::matmul(a, a).scalar_type(), at::kBFloat16);
        throw std::runtime_error("boom");
      },
      std::runtime_error);
  EXPECT_FALSE(accelerate::compat::is_autocast_enabled(c10::kCPU));
  EXPECT_TRUE(at::autocast::is_autocast_cache_enabled());
  EXPECT_EQ(at::matmul(a, a).scalar_type(), at::kFloat);
  // Nesting is back at 0: one increment now reads 1.
  EXPECT_EQ(at::autocast::increment_nesting(), 1);
  EXPECT_EQ(at::autocast::decrement_nesting(), 0);
}

TEST(Autocast, RestoresDtypeCacheAndNestingForCuda) {
  // The CUDA flags are thread-local state, so they can be checked without a GPU.
  const auto dtype_before = accelerate::compat::get_autocast_dtype(c10::kCUDA);
  ASSERT_EQ(dtype_before, at::kHalf);
  {
    AutocastGuard outer(c10::kCUDA, at::kBFloat16, {.cache_enabled = false});
    EXPECT_TRUE(accelerate::compat::is_autocast_enabled(c10::kCUDA));
    EXPECT_FALSE(accelerate::compat::is_autocast_enabled(c10::kCPU));
    EXPECT_EQ(accelerate::compat::get_autocast_dtype(c10::kCUDA), at::kBFloat16);
    EXPECT_FALSE(at::autocast::is_autocast_cache_enabled());
    {
      AutocastGuard inner(c10::kCUDA, at::kHalf);
      EXPECT_EQ(accelerate::compat::get_autocast_dtype(c10::kCUDA), at::kHalf);
      EXPECT_TRUE(at::autocast::is_autocast_cache_enabled());
      EXPECT_EQ(at::autocast::increment_nesting(), 3);
      EXPECT_EQ(at::autocast::decrement_nesting(), 2);
    }
    EXPECT_EQ(accelerate::compat::get_autocast_dtype(c10::kCUDA), at::kBFloat16);
    EXPECT_FALSE(at::autocast::is_autocast_cache_enabled());
  }
  EXPECT_FALSE(accelerate::compat::is_autocast_enabled(c10::kCUDA));
  EXPECT_EQ(accelerate::compat::get_autocast_dtype(c10::kCUDA), dtype_before);
  EXPECT_TRUE(at::autocast::is_autocast_cache_enabled());
}

TEST(Autocast, RejectsUnsupportedDevicesAndDtypes) {
  EXPECT_ERROR_CONTAINS(AutocastGuard g(c10::kCPU, at::kDouble), "CPU autocast supports");
  EXPECT_ERROR_CONTAINS(AutocastGuard g(c10::kCUDA, at::kFloat),
                        "CUDA autocast supports float16 and bfloat16, not Float");
  EXPECT_ERROR_CONTAINS(AutocastGuard g(c10::kMeta, at::kBFloat16),
                        "autocast supports CPU and CUDA devices, not meta");
  if (!accelerate::compat::kAutocastCpuSupportsHalf) {
    EXPECT_ERROR_CONTAINS(AutocastGuard g(c10::kCPU, at::kHalf), "only bfloat16");
  }
  // A failed guard changed nothing.
  EXPECT_FALSE(accelerate::compat::is_autocast_enabled(c10::kCPU));
  EXPECT_FALSE(accelerate::compat::is_autocast_enabled(c10::kCUDA));
  EXPECT_EQ(at::autocast::increment_nesting(), 1);
  EXPECT_EQ(at::autocast::decrement_nesting(), 0);
  // A disabled region only switches autocast off, whatever the dtype.
  AutocastGuard off(c10::kCPU, at::kFloat, {.enabled = false});
  EXPECT_FALSE(accelerate::compat::is_autocast_enabled(c10::kCPU));
}

// ---------------------------------------------------------------------- GradScaler

TEST(GradScaler, ScaleMultipliesTheLoss) {
  GradScaler scaler({.init_scale = 8.0, .growth_interval = 3});
  EXPECT_TRUE(scaler.is_enabled());
  EXPECT_EQ(scaler.get_scale(), 8.0);
  auto loss = fp32({1.5f, -2.0f}).sum();
  EXPECT_TRUE(at::equal(scaler.scale(loss), loss * 8));
  EXPECT_EQ(scaler.scale(loss).scalar_type(), at::kFloat);
  EXPECT_EQ(scaler.growth_tracker(), 0);
}

TEST(GradScaler, StepUnscalesExactlyThenSteps) {
  GradScaler scaler({.init_scale = 8.0, .growth_interval = 3});
  Problem p;
  const auto w0 = p.w.detach().clone();
  p.backward(scaler);
  EXPECT_TRUE(at::equal(p.w.grad(), p.x * 8));
  EXPECT_TRUE(scaler.step(p.sgd));
  EXPECT_FALSE(scaler.found_inf(p.sgd));
  EXPECT_TRUE(at::equal(p.w.grad(), p.x));
  EXPECT_TRUE(at::equal(p.w.detach(), w0 - p.x));
  scaler.update();
  EXPECT_EQ(scaler.get_scale(), 8.0);
  EXPECT_EQ(scaler.growth_tracker(), 1);
}

TEST(GradScaler, ExplicitUnscaleIsNotRepeatedByStep) {
  GradScaler scaler({.init_scale = 8.0});
  Problem p;
  const auto w0 = p.w.detach().clone();
  p.backward(scaler);
  scaler.unscale_(p.sgd);
  EXPECT_TRUE(at::equal(p.w.grad(), p.x));
  EXPECT_TRUE(scaler.step(p.sgd));
  EXPECT_TRUE(at::equal(p.w.grad(), p.x));
  EXPECT_TRUE(at::equal(p.w.detach(), w0 - p.x));
}

TEST(GradScaler, InfSkipsTheStepBacksOffThenGrowsBack) {
  GradScaler scaler({.init_scale = 8.0, .growth_interval = 3});
  Problem p;
  const auto w0 = p.w.detach().clone();
  p.backward(scaler);
  p.w.mutable_grad()[1] = std::numeric_limits<float>::infinity();
  EXPECT_FALSE(scaler.step(p.sgd));
  EXPECT_TRUE(scaler.found_inf(p.sgd));
  EXPECT_TRUE(at::equal(p.w.detach(), w0));
  scaler.update();
  EXPECT_EQ(scaler.get_scale(), 4.0);
  EXPECT_EQ(scaler.growth_tracker(), 0);

  for (int i = 1; i <= 3; ++i) {
    const auto before = p.w.detach().clone();
    p.backward(scaler);
    EXPECT_TRUE(at::equal(p.w.grad(), p.x * 4)) << "step " << i;
    EXPECT_TRUE(scaler.step(p.sgd)) << "step " << i;
    EXPECT_TRUE(at::equal(p.w.detach(), before - p.x)) << "step " << i;
    scaler.update();
    EXPECT_EQ(scaler.get_scale(), i < 3 ? 4.0 : 8.0) << "step " << i;
    EXPECT_EQ(scaler.growth_tracker(), i < 3 ? i : 0) << "step " << i;
  }
}

TEST(GradScaler, NanIsFoundToo) {
  GradScaler scaler({.init_scale = 8.0, .growth_interval = 3});
  Problem p;
  const auto w0 = p.w.detach().clone();
  p.backward(scaler);
  p.w.mutable_grad()[0] = std::numeric_limits<float>::quiet_NaN();
  scaler.unscale_(p.sgd);
  EXPECT_TRUE(scaler.found_inf(p.sgd));
  EXPECT_FALSE(scaler.step(p.sgd));
  EXPECT_TRUE(at::equal(p.w.detach(), w0));
  scaler.update();
  EXPECT_EQ(scaler.get_scale(), 4.0);
}

TEST(GradScaler, AnyOptimizerWithInfBacksOffTheSharedScale) {
  GradScaler scaler({.init_scale = 8.0, .growth_interval = 3});
  Problem clean;
  Problem broken;
  const auto clean0 = clean.w.detach().clone();
  const auto broken0 = broken.w.detach().clone();
  clean.backward(scaler);
  broken.backward(scaler);
  broken.w.mutable_grad()[2] = -std::numeric_limits<float>::infinity();
  EXPECT_TRUE(scaler.step(clean.sgd));
  EXPECT_FALSE(scaler.step(broken.sgd));
  EXPECT_FALSE(scaler.found_inf(clean.sgd));
  EXPECT_TRUE(scaler.found_inf(broken.sgd));
  EXPECT_TRUE(at::equal(clean.w.detach(), clean0 - clean.x));
  EXPECT_TRUE(at::equal(broken.w.detach(), broken0));
  scaler.update();
  EXPECT_EQ(scaler.get_scale(), 4.0);
  EXPECT_EQ(scaler.growth_tracker(), 0);
}

TEST(GradScaler, CallsOutOfOrderAreErrors) {
  GradScaler scaler({.init_scale = 8.0});
  Problem p;
  EXPECT_ERROR_CONTAINS(scaler.unscale_(p.sgd), "unscale_() before any scale()");
  p.backward(scaler);
  EXPECT_ERROR_CONTAINS(scaler.found_inf(p.sgd), "were not unscaled since the last update()");
  EXPECT_ERROR_CONTAINS(scaler.update(), "update() without unscale_() or step()");
  scaler.unscale_(p.sgd);
  EXPECT_ERROR_CONTAINS(scaler.unscale_(p.sgd),
                        "unscale_() was already called on this optimizer since the last update()");
  EXPECT_TRUE(scaler.step(p.sgd));
  EXPECT_ERROR_CONTAINS(scaler.step(p.sgd), "step() was already called on this optimizer");
  EXPECT_ERROR_CONTAINS(scaler.unscale_(p.sgd), "unscale_() was called after step()");
  scaler.update();
  // update() starts a new step for every optimizer.
  p.backward(scaler);
  EXPECT_TRUE(scaler.step(p.sgd));
  scaler.update();
}

TEST(GradScaler, OptimizerWithoutGradientsCannotStep) {
  GradScaler scaler({.init_scale = 8.0});
  Problem p;
  (void)scaler.scale(fp32({1.0f}));
  EXPECT_ERROR_CONTAINS(scaler.step(p.sgd), "the optimizer has no gradients to check");
}

TEST(GradScaler, RefusesFloat16Gradients) {
  GradScaler scaler({.init_scale = 8.0});
  auto w = torch::ones({2}, at::kHalf).requires_grad_();
  torch::optim::SGD sgd({w}, torch::optim::SGDOptions(1.0));
  (void)scaler.scale(fp32({1.0f}));
  w.mutable_grad() = torch::ones({2}, at::kHalf);
  EXPECT_ERROR_CONTAINS(scaler.unscale_(sgd), "cannot unscale float16 gradients");
}

TEST(GradScaler, GrowthThatWouldOverflowKeepsTheScale) {
  const double big = 2.0e38;  // doubling it overflows float32
  GradScaler scaler({.init_scale = big, .growth_interval = 1});
  auto w = fp32({1.0f, 2.0f}).requires_grad_();
  torch::optim::SGD sgd({w}, torch::optim::SGDOptions(1.0));
  scaler.scale((w * 0.0f).sum()).backward();  // zero gradients: finite at any scale
  EXPECT_TRUE(scaler.step(sgd));
  scaler.update();
  EXPECT_EQ(scaler.get_scale(), static_cast<double>(static_cast<float>(big)));
  EXPECT_EQ(scaler.growth_tracker(), 0);
}

TEST(GradScaler, DisabledIsAPassThrough) {
  GradScaler scaler({.init_scale = 8.0, .enabled = false});
  Problem p;
  const auto w0 = p.w.detach().clone();
  auto loss = (p.w * p.x).sum();
  auto scaled = scaler.scale(loss);
  EXPECT_TRUE(scaled.is_same(loss));
  scaled.backward();
  scaler.unscale_(p.sgd);
  EXPECT_TRUE(at::equal(p.w.grad(), p.x));
  EXPECT_FALSE(scaler.found_inf(p.sgd));
  p.w.mutable_grad()[0] = std::numeric_limits<float>::infinity();
  EXPECT_TRUE(scaler.step(p.sgd));  // no checks: it always steps
  EXPECT_TRUE(std::isinf(p.w[0].item<float>()));
  EXPECT_TRUE(at::equal(p.w.detach().slice(0, 1), (w0 - p.x).slice(0, 1)));
  scaler.update();
  EXPECT_FALSE(scaler.is_enabled());
  EXPECT_EQ(scaler.get_scale(), 1.0);
  EXPECT_EQ(scaler.growth_tracker(), 0);
  EXPECT_FALSE(scaler.state_dict().enabled);
}

TEST(GradScaler, StateRoundTripsThroughStateDictAndArchives) {
  GradScaler scaler({.init_scale = 8.0, .growth_factor = 4.0, .growth_interval = 3});
  Problem p;
  for (int i = 0; i < 2; ++i) {
    p.backward(scaler);
    (void)scaler.step(p.sgd);
    scaler.update();
  }
  const GradScalerState s = scaler.state_dict();
  EXPECT_EQ(s.scale, 8.0);
  EXPECT_EQ(s.growth_tracker, 2);
  EXPECT_EQ(s.growth_factor, 4.0);
  EXPECT_EQ(s.backoff_factor, 0.5);
  EXPECT_EQ(s.growth_interval, 3);
  EXPECT_TRUE(s.enabled);

  // Loaded before its first scale(): the scale tensor starts from the loaded values.
  GradScaler fresh;
  fresh.load_state_dict(s);
  EXPECT_EQ(fresh.get_scale(), 8.0);
  EXPECT_EQ(fresh.growth_tracker(), 2);
  EXPECT_EQ(fresh.options().growth_factor, 4.0);
  EXPECT_EQ(fresh.options().growth_interval, 3);
  // One more good step reaches the interval: 8 * 4.
  Problem q;
  q.backward(fresh);
  EXPECT_TRUE(fresh.step(q.sgd));
  fresh.update();
  EXPECT_EQ(fresh.get_scale(), 32.0);
  EXPECT_EQ(fresh.growth_tracker(), 0);

  // Loaded after scale(): the live tensors take the values.
  fresh.load_state_dict(s);
  EXPECT_EQ(fresh.get_scale(), 8.0);
  EXPECT_EQ(fresh.growth_tracker(), 2);

  std::stringstream stream;
  torch::save(scaler, stream);
  GradScaler from_archive({.init_scale = 1.0});
  torch::load(from_archive, stream);
  const auto t = from_archive.state_dict();
  EXPECT_EQ(t.scale, 8.0);
  EXPECT_EQ(t.growth_tracker, 2);
  EXPECT_EQ(t.growth_factor, 4.0);
  EXPECT_EQ(t.backoff_factor, 0.5);
  EXPECT_EQ(t.growth_interval, 3);
}

TEST(GradScaler, LoadingAStateFromADisabledScalerIsAnError) {
  GradScaler disabled({.enabled = false});
  GradScaler enabled;
  EXPECT_ERROR_CONTAINS(enabled.load_state_dict(disabled.state_dict()),
                        "saved from a disabled GradScaler");
  std::stringstream stream;
  torch::save(disabled, stream);
  EXPECT_ERROR_CONTAINS(torch::load(enabled, stream), "saved from a disabled GradScaler");
  // A disabled scaler ignores what it is given, as PyTorch's does.
  disabled.load_state_dict(enabled.state_dict());
  EXPECT_EQ(disabled.get_scale(), 1.0);
}

TEST(GradScaler, InvalidKwargsNameTheField) {
  EXPECT_ERROR_CONTAINS(GradScaler g({.init_scale = 0.0}), "GradScalerKwargs.init_scale");
  EXPECT_ERROR_CONTAINS(GradScaler g({.init_scale = -1.0}), "GradScalerKwargs.init_scale");
  EXPECT_ERROR_CONTAINS(GradScaler g({.growth_factor = 1.0}),
                        "GradScalerKwargs.growth_factor must be a finite number > 1, got 1");
  EXPECT_ERROR_CONTAINS(GradScaler g({.backoff_factor = 1.0}),
                        "GradScalerKwargs.backoff_factor must be in (0, 1), got 1");
  EXPECT_ERROR_CONTAINS(GradScaler g({.backoff_factor = 0.0}), "GradScalerKwargs.backoff_factor");
  EXPECT_ERROR_CONTAINS(GradScaler g({.growth_interval = 0}),
                        "GradScalerKwargs.growth_interval must be at least 1, got 0");
  GradScaler scaler;
  GradScalerState bad = scaler.state_dict();
  bad.growth_factor = 0.5;
  EXPECT_ERROR_CONTAINS(scaler.load_state_dict(bad), "GradScalerState.growth_factor");
  EXPECT_EQ(scaler.options().growth_factor, 2.0);  // unchanged by the failed load
}
