// Communication hooks (comm_hooks.h) on GradientSynchronizer, ranks as threads over a HashStore:
// the 16-bit compression hooks against the exact average, a user-defined hook, PowerSGD's
// training against exact synchronisation, and the configuration errors.

#include <accelerate/comm_hooks.h>
#include <accelerate/ddp.h>
#include <accelerate/state.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "expect_error.h"
#include "thread_ranks.h"

#include <chrono>
#include <cmath>
#include <iomanip>
#include <iostream>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using accelerate::CommHook;
using accelerate::CommHookFinish;
using accelerate::DDPCommunicationHookType;
using accelerate::DistributedDataParallelKwargs;
using accelerate::GradBucket;
using accelerate::GradientSynchronizer;
using accelerate::PartialState;
using accelerate::PowerSGDOptions;
using accelerate::StateOptions;
using accelerate::testing::run_ranks;

accelerate::testing::RankOptions bounded() {
  StateOptions options;
  options.init_kwargs.timeout = std::chrono::seconds(30);
  return {.state = options};
}

std::mutex generator_mutex;

torch::nn::Sequential make_mlp(uint64_t seed, int64_t in, int64_t hidden, int64_t out) {
  std::lock_guard<std::mutex> lock(generator_mutex);
  torch::manual_seed(seed);
  return torch::nn::Sequential(torch::nn::Linear(in, hidden), torch::nn::ReLU(),
                               torch::nn::Linear(hidden, hidden), torch::nn::ReLU(),
                               torch::nn::Linear(hidden, out));
}

torch::Tensor randn(uint64_t seed, std::vector<int64_t> shape) {
  std::lock_guard<std::mutex> lock(generator_mutex);
  torch::manual_seed(seed);
  return torch::randn(shape);
}

// Each rank's local gradients (no synchronisation) of `model`'s current weights on `x`, `y`.
std::vector<torch::Tensor> local_grads(torch::nn::Sequential& model, const torch::Tensor& x,
                                       const torch::Tensor& y) {
  std::shared_ptr<torch::nn::SequentialImpl> copy;
  {
    // clone() re-initialises the copy's parameters from the global generator before copying the
    // values: under the lock, or it would shift another rank thread's seeded draws.
    std::lock_guard<std::mutex> lock(generator_mutex);
    copy = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(model->clone());
  }
  for (auto& p : copy->parameters()) p.mutable_grad() = torch::Tensor();
  torch::mse_loss(copy->forward(x), y).backward();
  std::vector<torch::Tensor> out;
  for (const auto& p : copy->parameters()) out.push_back(p.grad().clone());
  return out;
}

// Every rank's local gradients, gathered by running each rank's batch on this rank's copy.
std::vector<std::vector<torch::Tensor>> all_local_grads(torch::nn::Sequential& model, int world,
                                                        int64_t in, int64_t out) {
  std::vector<std::vector<torch::Tensor>> all;
  for (int r = 0; r < world; ++r) {
    all.push_back(local_grads(model, randn(100 + r, {16, in}), randn(200 + r, {16, out})));
  }
  return all;
}

TEST(CommHooks, HookNamesAreAccelerates) {
  for (auto [name, type] : std::vector<std::pair<std::string, DDPCommunicationHookType>>{
           {"no", DDPCommunicationHookType::NO},
           {"fp16", DDPCommunicationHookType::FP16},
           {"bf16", DDPCommunicationHookType::BF16},
           {"power_sgd", DDPCommunicationHookType::POWER_SGD},
           {"batched_power_sgd", DDPCommunicationHookType::BATCHED_POWER_SGD}}) {
    EXPECT_EQ(accelerate::to_string(type), name);
    EXPECT_EQ(accelerate::comm_hook_type_from_string(name), type);
  }
  EXPECT_ERROR_CONTAINS(accelerate::comm_hook_type_from_string("powersgd"),
                        "unknown communication hook \"powersgd\"");
}

// The 16-bit hooks: each process casts its bucket, divides by the number of processes, and the
// sum is taken in that type. The result must equal the exact average to the type's precision:
// |hook - exact| <= world * eps * (sum of |g_r| / world) + smallest normal, per element.
TEST(CommHooks, Fp16AndBf16HooksEqualTheExactAverageToTheirPrecision) {
  for (auto [hook, dtype, eps] :
       std::vector<std::tuple<DDPCommunicationHookType, c10::ScalarType, double>>{
           {DDPCommunicationHookType::FP16, at::kHalf, std::pow(2.0, -10)},
           {DDPCommunicationHookType::BF16, at::kBFloat16, std::pow(2.0, -7)}}) {
    for (int world : {2, 3}) {
      run_ranks(
          world,
          [&](PartialState& state) {
            const int rank = state.process_index();
            auto model = make_mlp(7, 12, 20, 3);
            GradientSynchronizer sync(model.ptr(), state.shared_from_this(), {.comm_hook = hook});
            const auto locals = all_local_grads(model, world, 12, 3);
            torch::mse_loss(model->forward(randn(100 + rank, {16, 12})), randn(200 + rank, {16, 3}))
                .backward();
            const auto params = model->parameters();
            bool compressed_somewhere = false;
            for (size_t i = 0; i < params.size(); ++i) {
              auto exact = at::zeros_like(locals[0][i], at::kDouble);
              auto magnitude = at::zeros_like(exact);
              for (int r = 0; r < world; ++r) {
                exact += locals[static_cast<size_t>(r)][i].to(at::kDouble);
                magnitude += locals[static_cast<size_t>(r)][i].to(at::kDouble).abs();
              }
              exact /= world;
              const auto got = params[i].grad().to(at::kDouble);
              const auto err = (got - exact).abs();
              const auto bound = magnitude * eps + 1e-4;
              if ((err > bound).any().item<bool>()) {
                throw std::runtime_error(c10::toString(dtype) + std::string(": parameter ") +
                                         std::to_string(i) + " off by " +
                                         std::to_string(err.max().item<double>()));
              }
              compressed_somewhere = compressed_somewhere || !at::equal(got, exact);
            }
            if (!compressed_somewhere) throw std::runtime_error("no rounding seen: no hook ran?");
          },
          bounded());
    }
  }
}

TEST(CommHooks, AUserHookSeesEveryBucketInOrderAndItsResultIsTheGradient) {
  run_ranks(
      2,
      [&](PartialState& state) {
        const int rank = state.process_index();
        auto model = make_mlp(8, 6, 10, 2);
        std::vector<std::pair<size_t, bool>> seen;
        std::vector<std::vector<std::string>> names;
        CommHook doubled = [&](GradBucket& bucket) -> CommHookFinish {
          seen.emplace_back(bucket.index(), bucket.is_last());
          names.push_back(bucket.names());
          auto grads = bucket.gradients();
          for (size_t k = 0; k < grads.size(); ++k) {
            if (grads[k].sizes() != bucket.parameters()[k].sizes())
              throw std::runtime_error("gradient view shape");
          }
          // Twice the average: a result no built-in path produces.
          bucket.buffer().mul_(2.0 / bucket.num_processes());
          auto pending = bucket.all_reduce(bucket.buffer());
          return [pending]() mutable { pending.wait(); };
        };
        // One parameter per bucket, so that there are several.
        GradientSynchronizer sync(model.ptr(), state.shared_from_this(),
                                  {.bucket_cap_mb = 0.00001});
        sync.register_comm_hook(doubled);
        const auto locals = all_local_grads(model, 2, 6, 2);
        torch::mse_loss(model->forward(randn(100 + rank, {16, 6})), randn(200 + rank, {16, 2}))
            .backward();
        const auto params = model->parameters();
        for (size_t i = 0; i < params.size(); ++i) {
          const auto want = locals[0][i] + locals[1][i];
          if (!at::allclose(params[i].grad(), want, 1e-5, 1e-6))
            throw std::runtime_error("hook result not used for parameter " + std::to_string(i));
        }
        const auto buckets = sync.num_buckets();
        if (seen.size() != buckets) throw std::runtime_error("hook calls != buckets");
        for (size_t k = 0; k < seen.size(); ++k) {
          if (seen[k].first != k || seen[k].second != (k + 1 == buckets))
            throw std::runtime_error("bucket index / is_last");
        }
        if (names != sync.bucket_parameter_names()) throw std::runtime_error("bucket names");
        EXPECT_THROW(sync.register_comm_hook(doubled), c10::Error);
      },
      bounded());
}

TEST(CommHooks, ACompressionWrapperRunsTheHookOnA16BitCopy) {
  for (auto [wrapper, dtype] : std::vector<std::pair<DDPCommunicationHookType, c10::ScalarType>>{
           {DDPCommunicationHookType::FP16, at::kHalf},
           {DDPCommunicationHookType::BF16, at::kBFloat16}}) {
    run_ranks(
        2,
        [&](PartialState& state) {
          const int rank = state.process_index();
          auto model = make_mlp(9, 6, 10, 2);
          std::vector<c10::ScalarType> seen;
          CommHook average = [&](GradBucket& bucket) -> CommHookFinish {
            seen.push_back(bucket.buffer().scalar_type());
            bucket.buffer().div_(bucket.num_processes());
            auto pending = bucket.all_reduce(bucket.buffer());
            return [pending]() mutable { pending.wait(); };
          };
          auto hook = wrapper == DDPCommunicationHookType::FP16
                          ? accelerate::fp16_compress_wrapper(average)
                          : accelerate::bf16_compress_wrapper(average);
          GradientSynchronizer sync(model.ptr(), state.shared_from_this(), {.comm_hook_fn = hook});
          const auto locals = all_local_grads(model, 2, 6, 2);
          torch::mse_loss(model->forward(randn(100 + rank, {16, 6})), randn(200 + rank, {16, 2}))
              .backward();
          if (seen != std::vector<c10::ScalarType>{dtype}) throw std::runtime_error("dtype seen");
          const auto params = model->parameters();
          for (size_t i = 0; i < params.size(); ++i) {
            // Each gradient rounded to 16 bits, halved, summed in rank order, rounded again.
            const auto a = (locals[0][i].to(dtype) / 2).to(at::kFloat);
            const auto b = (locals[1][i].to(dtype) / 2).to(at::kFloat);
            const auto want = (a + b).to(dtype).to(at::kFloat);
            if (!at::equal(params[i].grad(), want))
              throw std::runtime_error("parameter " + std::to_string(i) + " not the 16-bit sum");
          }
        },
        bounded());
  }
}

// Trains the medium MLP of the benchmarks (512-2048-2048-512) on a teacher's targets, once with
// exact averaging and once per hook, from the same start and data. Returns the loss on a fixed
// held-out batch after training; *initial gets it before.
double train(PartialState& state, const DistributedDataParallelKwargs& kwargs, int steps,
             double* initial) {
  const int rank = state.process_index();
  auto teacher = make_mlp(11, 512, 64, 512);
  auto model = make_mlp(12, 512, 2048, 512);
  const auto x_eval = randn(9999, {64, 512});
  auto eval = [&] {
    torch::NoGradGuard no_grad;
    return torch::mse_loss(model->forward(x_eval), teacher->forward(x_eval)).item<double>();
  };
  *initial = eval();
  GradientSynchronizer sync(model.ptr(), state.shared_from_this(), kwargs);
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  for (int step = 0; step < steps; ++step) {
    auto x = randn(1000 + static_cast<uint64_t>(step * 8 + rank), {32, 512});
    at::Tensor target;
    {
      torch::NoGradGuard no_grad;
      target = teacher->forward(x);
    }
    torch::mse_loss(model->forward(x), target).backward();
    sgd.step();
    sgd.zero_grad();
  }
  return eval();
}

TEST(CommHooks, PowerSGDTrainsTheMediumMlpToTheLossOfExactAveraging) {
  constexpr int kSteps = 40;
  struct Variant {
    const char* name;
    DistributedDataParallelKwargs kwargs;
  };
  std::vector<Variant> variants{
      {"exact", {}},
      {"power_sgd rank 2",
       {.comm_hook = DDPCommunicationHookType::POWER_SGD,
        .comm_state_option = {.matrix_approximation_rank = 2, .start_powerSGD_iter = 5}}},
      {"power_sgd rank 4 (QR)",
       {.comm_hook = DDPCommunicationHookType::POWER_SGD,
        .comm_state_option = {.matrix_approximation_rank = 4, .start_powerSGD_iter = 5}}},
      {"batched_power_sgd rank 8",
       {.comm_hook = DDPCommunicationHookType::BATCHED_POWER_SGD,
        .comm_state_option = {.matrix_approximation_rank = 8, .start_powerSGD_iter = 5}}},
      {"fp16 wrapper around power_sgd",
       {.comm_hook = DDPCommunicationHookType::POWER_SGD,
        .comm_wrapper = DDPCommunicationHookType::FP16,
        .comm_state_option = {.matrix_approximation_rank = 2, .start_powerSGD_iter = 5}}},
  };
  std::vector<double> final_loss(variants.size());
  std::vector<double> initial(variants.size());
  run_ranks(
      2,
      [&](PartialState& state) {
        for (size_t v = 0; v < variants.size(); ++v) {
          double start = 0;
          const double end = train(state, variants[v].kwargs, kSteps, &start);
          if (state.process_index() == 0) {
            final_loss[v] = end;
            initial[v] = start;
          }
        }
      },
      bounded());
  for (size_t v = 0; v < variants.size(); ++v) {
    std::cout << std::setprecision(9) << variants[v].name << ": held-out loss " << initial[v]
              << " -> " << final_loss[v] << "\n";
    EXPECT_DOUBLE_EQ(initial[v], initial[0]) << variants[v].name << ": same start";
    EXPECT_LT(final_loss[0], 0.5 * initial[0]) << "exact averaging must learn, or this is moot";
    EXPECT_NEAR(final_loss[v], final_loss[0], 0.05 * initial[0])
        << variants[v].name << ": initial " << initial[v] << ", exact " << final_loss[0];
  }
}

TEST(CommHooks, PowerSGDStateCountsStepsAndCompression) {
  run_ranks(
      2,
      [&](PartialState& state) {
        const int rank = state.process_index();
        auto model = make_mlp(13, 64, 128, 64);
        auto power = std::make_shared<accelerate::PowerSGDState>(
            PowerSGDOptions{.matrix_approximation_rank = 1, .start_powerSGD_iter = 2});
        GradientSynchronizer sync(model.ptr(), state.shared_from_this());
        sync.register_comm_hook(accelerate::powerSGD_hook(power));
        for (int step = 0; step < 5; ++step) {
          torch::mse_loss(model->forward(randn(50 + rank, {8, 64})), randn(60 + rank, {8, 64}))
              .backward();
        }
        if (power->iteration() != 5) throw std::runtime_error("iteration count");
        // Three steps compressed 64x128, 128x128 and 128x64 to rank 1; the biases went whole.
        const int64_t before = 3 * (64 * 128 + 128 + 128 * 128 + 128 + 128 * 64 + 64);
        const int64_t after = 3 * ((128 + 64) + 128 + (128 + 128) + 128 + (64 + 128) + 64);
        if (power->numel_before_compression() != before ||
            power->numel_after_compression() != after)
          throw std::runtime_error("compression statistics " +
                                   std::to_string(power->numel_before_compression()) + " / " +
                                   std::to_string(power->numel_after_compression()));
      },
      bounded());
}

TEST(CommHooks, BadConfigurationsAreErrorsNamingTheProblem) {
  EXPECT_ERROR_CONTAINS(
      accelerate::make_comm_hook(DDPCommunicationHookType::NO, DDPCommunicationHookType::FP16, {}),
      "comm_wrapper \"fp16\" wraps a communication hook, but comm_hook is \"no\"");
  EXPECT_ERROR_CONTAINS(accelerate::make_comm_hook(DDPCommunicationHookType::FP16,
                                                   DDPCommunicationHookType::POWER_SGD, {}),
                        "comm_wrapper must be \"no\", \"fp16\" or \"bf16\", got \"power_sgd\"");
  EXPECT_ERROR_CONTAINS(
      accelerate::make_comm_hook(DDPCommunicationHookType::POWER_SGD, DDPCommunicationHookType::NO,
                                 {.matrix_approximation_rank = 0}),
      "matrix_approximation_rank must be >= 1, got 0");
  run_ranks(
      2,
      [&](PartialState& state) {
        auto model = make_mlp(14, 4, 4, 1);
        EXPECT_ERROR_CONTAINS(GradientSynchronizer(model.ptr(), state.shared_from_this(),
                                                   {.comm_hook = DDPCommunicationHookType::FP16,
                                                    .comm_hook_fn = accelerate::allreduce_hook()}),
                              "give comm_hook or comm_hook_fn, not both");
        GradientSynchronizer sync(model.ptr(), state.shared_from_this());
        torch::mse_loss(model->forward(at::ones({2, 4})), at::zeros({2, 1})).backward();
        EXPECT_ERROR_CONTAINS(sync.register_comm_hook(accelerate::fp16_compress_hook()),
                              "must be called before the first synchronized backward pass");
      },
      bounded());
}

}  // namespace
