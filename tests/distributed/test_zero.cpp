// ZeRO stages 1 and 2 (DeepSpeed plugin) and FSDP's SHARD_GRAD_OP, ranks as threads: the same
// training as plain data parallelism to 1e-6 relative, for SGD with momentum and AdamW, 2 and 3
// processes, with and without accumulation and clipping; optimizer state held for the shard
// only; sharded and full checkpoints, resumed on another number of processes; bad plugins.

#include <accelerate/accelerator.h>

#include <gtest/gtest.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/lbfgs.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>

#include "thread_ranks.h"

#include <filesystem>
#include <functional>
#include <mutex>
#include <vector>

namespace {

using accelerate::Accelerator;
using accelerate::DeepSpeedPlugin;
using accelerate::FullyShardedDataParallelPlugin;
using accelerate::PartialState;
using accelerate::testing::message;
using accelerate::testing::run_ranks;
using accelerate::testing::run_ranks_collect;
namespace data = accelerate::data;
namespace fs = std::filesystem;

std::mutex seed_mutex;

// Odd sizes, so that shards cut parameters in the middle: 6*13+13 + 13*11+11 + 11*3+3 = 281.
torch::nn::Sequential make_mlp(uint64_t seed) {
  std::lock_guard<std::mutex> lock(seed_mutex);
  torch::manual_seed(seed);
  return torch::nn::Sequential(torch::nn::Linear(6, 13), torch::nn::Tanh(),
                               torch::nn::Linear(13, 11), torch::nn::Tanh(),
                               torch::nn::Linear(11, 3));
}

// Rows of a fixed pseudo-random regression problem, the same for every run.
struct Rows {
  int64_t n;
  int64_t size() const { return n; }
  torch::data::Example<> get(size_t i) const {
    const double v = static_cast<double>(i);
    auto x = at::arange(6, at::kFloat).mul(0.37 * (v + 1)).sin();
    auto y =
        at::tensor({std::cos(v / 3), v / 40 - 0.5, static_cast<double>(i % 3) / 3}, at::kFloat);
    return {x, y};
  }
};

enum class Opt { kSgd, kAdamW, kAdam, kRmsprop, kAdagrad };

std::shared_ptr<torch::optim::Optimizer> make_optimizer(Opt kind, torch::nn::Sequential& model) {
  // Two param groups with different options: the sharded optimizer must keep them apart.
  std::vector<at::Tensor> first, rest;
  int i = 0;
  for (const auto& p : model->parameters()) (i++ < 2 ? first : rest).push_back(p);
  switch (kind) {
    case Opt::kSgd: {
      std::vector<torch::optim::OptimizerParamGroup> groups{
          torch::optim::OptimizerParamGroup(first,
                                            std::make_unique<torch::optim::SGDOptions>(
                                                torch::optim::SGDOptions(0.05).momentum(0.9))),
          torch::optim::OptimizerParamGroup(rest)};
      return std::make_shared<torch::optim::SGD>(
          groups, torch::optim::SGDOptions(0.1).momentum(0.5).weight_decay(0.01));
    }
    case Opt::kAdamW: {
      std::vector<torch::optim::OptimizerParamGroup> groups{
          torch::optim::OptimizerParamGroup(first, std::make_unique<torch::optim::AdamWOptions>(
                                                       torch::optim::AdamWOptions(0.003))),
          torch::optim::OptimizerParamGroup(rest)};
      return std::make_shared<torch::optim::AdamW>(
          groups, torch::optim::AdamWOptions(0.01).weight_decay(0.05));
    }
    case Opt::kAdam:
      return std::make_shared<torch::optim::Adam>(model->parameters(),
                                                  torch::optim::AdamOptions(0.01).amsgrad(true));
    case Opt::kRmsprop:
      return std::make_shared<torch::optim::RMSprop>(
          model->parameters(), torch::optim::RMSpropOptions(0.01).momentum(0.5).centered(true));
    case Opt::kAdagrad:
      return std::make_shared<torch::optim::Adagrad>(model->parameters(),
                                                     torch::optim::AdagradOptions(0.05));
  }
  return nullptr;
}

struct Setup {
  int stage = 0;  // 0: plain data parallelism
  bool fsdp = false;
  Opt opt = Opt::kAdamW;
  int64_t accumulation = 1;
  double clip = 0;  // clip_grad_norm_ to this when > 0
  std::optional<double> plugin_clip;
  int steps = 8;
  bool split_batches = false;
  bool bf16 = false;
};

accelerate::AcceleratorOptions options_for(const Setup& s, PartialState& state) {
  accelerate::AcceleratorOptions o{.split_batches = s.split_batches,
                                   .mixed_precision = s.bf16 ? "bf16" : "no",
                                   .gradient_accumulation_steps = s.accumulation,
                                   .state = state.shared_from_this(),
                                   .gradient_state = std::make_shared<data::GradientState>()};
  // Small buckets: several of them, and parameters spread over buckets and shards.
  o.ddp_kwargs = accelerate::DistributedDataParallelKwargs{.bucket_cap_mb = 0.0004};
  if (s.fsdp) {
    o.fsdp_plugin = FullyShardedDataParallelPlugin{
        .sharding_strategy = s.stage == 2 ? accelerate::ShardingStrategy::SHARD_GRAD_OP
                                          : accelerate::ShardingStrategy::NO_SHARD};
  } else if (s.stage > 0 || s.plugin_clip) {
    o.deepspeed_plugin = DeepSpeedPlugin{.zero_stage = s.stage, .gradient_clipping = s.plugin_clip};
  }
  return o;
}

std::vector<at::Tensor> train(PartialState& state, const Setup& s) {
  Accelerator acc(options_for(s, state));
  auto model = make_mlp(7 + static_cast<uint64_t>(state.process_index()));
  auto optimizer = make_optimizer(s.opt, model);
  data::DataLoader loader(Rows{96}, {.batch_size = s.split_batches ? 12 : 4});
  auto [m, opt, dl] = acc.prepare(model, optimizer, loader);
  int steps = 0;
  for (auto& batch : dl) {
    auto guard = acc.accumulate(m);
    at::Tensor loss;
    {
      auto autocast = acc.autocast();
      loss = torch::mse_loss(m->forward(batch.data), batch.target);
    }
    acc.backward(loss);
    if (s.clip > 0 && acc.sync_gradients()) acc.clip_grad_norm_(m->parameters(), s.clip);
    opt.step();
    opt.zero_grad();
    if (++steps == s.steps * s.accumulation) break;
  }
  std::vector<at::Tensor> out;
  for (const auto& p : m->parameters()) out.push_back(p.detach().clone());
  return out;
}

std::vector<std::vector<at::Tensor>> train_all(int world, const Setup& s) {
  std::vector<std::vector<at::Tensor>> out(static_cast<size_t>(world));
  run_ranks(world, [&](PartialState& state) {
    out[static_cast<size_t>(state.process_index())] = train(state, s);
  });
  return out;
}

// Relative difference of two weight lists, the largest over parameters.
double max_relative(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  EXPECT_EQ(a.size(), b.size());
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double diff = (a[i] - b[i]).abs().max().item<double>();
    const double scale = std::max(b[i].abs().max().item<double>(), 1e-12);
    worst = std::max(worst, diff / scale);
  }
  return worst;
}

void expect_matches_ddp(int world, Setup s, const std::vector<at::Tensor>& initial) {
  const int stage = s.stage;
  s.stage = 0;
  const bool fsdp = s.fsdp;
  s.fsdp = false;
  const auto ddp = train_all(world, s);
  s.stage = stage;
  s.fsdp = fsdp;
  const auto zero = train_all(world, s);
  for (int r = 0; r < world; ++r) {
    // Every process holds the whole, identical model again.
    for (size_t i = 0; i < zero[0].size(); ++i) {
      EXPECT_TRUE(at::equal(zero[static_cast<size_t>(r)][i], zero[0][i])) << "rank " << r;
    }
  }
  EXPECT_LT(max_relative(zero[0], ddp[0]), 1e-6) << "world " << world << " stage " << stage;
  // Training moved the weights (a comparison of two untrained models proves nothing).
  EXPECT_GT(max_relative(ddp[0], initial), 1e-3);
}

std::vector<at::Tensor> initial_weights() {
  auto m = make_mlp(7);
  std::vector<at::Tensor> out;
  for (const auto& p : m->parameters()) out.push_back(p.detach().clone());
  return out;
}

TEST(Zero, StagesOneAndTwoTrainLikeDataParallelismWithSgdAndAdamW) {
  const auto initial = initial_weights();
  for (int world : {2, 3}) {
    for (Opt opt : {Opt::kSgd, Opt::kAdamW}) {
      for (int stage : {1, 2}) {
        expect_matches_ddp(world, {.stage = stage, .opt = opt}, initial);
      }
    }
  }
}

TEST(Zero, AccumulationAndClippingTrainLikeDataParallelism) {
  const auto initial = initial_weights();
  for (int world : {2, 3}) {
    for (Opt opt : {Opt::kSgd, Opt::kAdamW}) {
      for (int stage : {1, 2}) {
        expect_matches_ddp(world, {.stage = stage, .opt = opt, .accumulation = 3}, initial);
        expect_matches_ddp(world, {.stage = stage, .opt = opt, .clip = 0.05}, initial);
        expect_matches_ddp(world, {.stage = stage, .opt = opt, .accumulation = 2, .clip = 0.05},
                           initial);
      }
    }
  }
}

TEST(Zero, Bf16AutocastTrainsLikeDataParallelism) {
  const auto initial = initial_weights();
  for (int stage : {1, 2}) {
    expect_matches_ddp(2, {.stage = stage, .opt = Opt::kAdamW, .bf16 = true}, initial);
  }
}

// Branch b takes no part in the loss: with find_unused_parameters its gradient stays undefined
// and the optimizer leaves it alone, sharded or not.
struct Branchy : torch::nn::Module {
  explicit Branchy(uint64_t seed) {
    std::lock_guard<std::mutex> lock(seed_mutex);
    torch::manual_seed(seed);
    a = register_module("a", torch::nn::Linear(6, 3));
    b = register_module("b", torch::nn::Linear(6, 3));
  }
  at::Tensor forward(const at::Tensor& x) { return a(x); }
  torch::nn::Linear a{nullptr}, b{nullptr};
};

TEST(Zero, UnusedParametersAreLeftAloneLikeDataParallelism) {
  auto train_branchy = [](int stage) {
    std::vector<at::Tensor> out;
    run_ranks(2, [&](PartialState& state) {
      auto o = options_for({.stage = stage}, state);
      o.ddp_kwargs->find_unused_parameters = true;
      Accelerator acc(o);
      auto model = std::make_shared<Branchy>(3);
      auto adamw = std::make_shared<torch::optim::AdamW>(
          model->parameters(), torch::optim::AdamWOptions(0.01).weight_decay(0.1));
      auto [m, opt] = acc.prepare(model, adamw);
      for (int step = 0; step < 4; ++step) {
        const auto x = at::full({4, 6}, 0.1 * (step + 1) * (state.process_index() + 1));
        acc.backward(m->forward(x).pow(2).sum());
        opt.step();
        opt.zero_grad();
      }
      if (state.process_index() == 0) {
        for (const auto& p : m->parameters()) out.push_back(p.detach().clone());
      }
    });
    return out;
  };
  const auto ddp = train_branchy(0);
  const auto zero = train_branchy(2);
  EXPECT_LT(max_relative(zero, ddp), 1e-6);
  Branchy fresh(3);
  EXPECT_TRUE(at::equal(zero[2], fresh.b->weight));  // b: no gradient, no weight decay either
  EXPECT_FALSE(at::equal(zero[0], fresh.a->weight));
}

TEST(Zero, DeepSpeedGradientClippingClipsEveryStep) {
  // The plugin's clipping equals clip_grad_norm_ called by hand before every step.
  const auto by_hand = train_all(2, {.stage = 2, .clip = 0.05});
  const auto by_plugin = train_all(2, {.stage = 2, .plugin_clip = 0.05});
  EXPECT_LT(max_relative(by_plugin[0], by_hand[0]), 1e-6);
  const auto unclipped = train_all(2, {.stage = 2});
  EXPECT_GT(max_relative(by_plugin[0], unclipped[0]), 1e-4);
}

TEST(Zero, FsdpShardGradOpIsStageTwo) {
  const auto initial = initial_weights();
  expect_matches_ddp(2, {.stage = 2, .fsdp = true}, initial);
  run_ranks(2, [](PartialState& state) {
    Accelerator acc(options_for({.stage = 2, .fsdp = true}, state));
    EXPECT_EQ(acc.config().sharding.stage, 2);
    EXPECT_EQ(acc.distributed_type(), accelerate::DistributedType::FSDP);
  });
}

TEST(Zero, EveryElementWiseOptimizerKeepsItsUpdate) {
  const auto initial = initial_weights();
  for (Opt opt : {Opt::kAdam, Opt::kRmsprop, Opt::kAdagrad}) {
    expect_matches_ddp(3, {.stage = 2, .opt = opt, .steps = 5}, initial);
  }
}

TEST(Zero, EachProcessHoldsTheStateOfItsShardOnly) {
  // 281 parameters; AdamW keeps two moments of 4 bytes per element (plus a step per piece).
  std::vector<int64_t> elements(3), state_bytes(3);
  run_ranks(3, [&](PartialState& state) {
    Accelerator acc(options_for({.stage = 2}, state));
    auto model = make_mlp(7);
    auto optimizer = make_optimizer(Opt::kAdamW, model);
    auto [m, opt] = acc.prepare(model, optimizer);
    acc.backward(m->forward(at::ones({2, 6})).sum());
    opt.step();
    const auto r = static_cast<size_t>(state.process_index());
    for (const auto& p : m->parameters()) EXPECT_FALSE(p.grad().defined());  // stage 2
    for (const auto& group : optimizer->param_groups()) {
      for (const auto& piece : group.params()) elements[r] += piece.numel();
    }
    for (const auto& [name, t] : accelerate::optimizer_state_dict(*optimizer).tensors) {
      if (t.dim() > 0) state_bytes[r] += static_cast<int64_t>(t.nbytes());
    }
  });
  int64_t total = 0;
  for (size_t r = 0; r < 3; ++r) {
    total += elements[r];
    EXPECT_EQ(state_bytes[r], elements[r] * 8) << r;  // exp_avg + exp_avg_sq, float32
    EXPECT_LT(elements[r], 281 / 3 + 30) << r;        // about a third each
  }
  EXPECT_EQ(total, 281);  // the shards partition the parameters
}

// Saves at step `k` (of `total`) with `save_world` processes, resumes with `load_world`.
void expect_resume(int save_world, int load_world, accelerate::StateDictType type, int stage,
                   int load_stage) {
  const fs::path dir =
      fs::temp_directory_path() /
      ("zero_resume_" + std::to_string(::getpid()) + "_" + std::to_string(save_world) +
       std::to_string(load_world) + std::to_string(static_cast<int>(type)) + std::to_string(stage) +
       std::to_string(load_stage));
  fs::remove_all(dir);
  const int total = 8;
  const int k = 4;
  auto run = [&](PartialState& state, bool save, bool load) {
    accelerate::AcceleratorOptions o = options_for({.split_batches = true}, state);
    const int s = load ? load_stage : stage;
    o.fsdp_plugin = FullyShardedDataParallelPlugin{
        .sharding_strategy = s == 2 ? accelerate::ShardingStrategy::SHARD_GRAD_OP
                                    : accelerate::ShardingStrategy::NO_SHARD,
        .state_dict_type = type};
    Accelerator acc(o);
    auto model = make_mlp(7);
    auto optimizer = make_optimizer(Opt::kAdamW, model);
    data::DataLoader loader(Rows{96}, {.batch_size = 12});
    auto [m, opt, dl] = acc.prepare(model, optimizer, loader);
    int step = 0;
    if (load) {
      acc.load_state(dir.string());
      step = k;
    }
    for (auto& batch : dl) {
      acc.backward(torch::mse_loss(m->forward(batch.data), batch.target));
      opt.step();
      opt.zero_grad();
      ++step;
      if (save && step == k) acc.save_state(dir.string());
      if (step == total) break;
    }
    std::vector<at::Tensor> out;
    for (const auto& p : m->parameters()) out.push_back(p.detach().clone());
    return out;
  };
  std::vector<at::Tensor> uninterrupted, resumed;
  run_ranks(save_world, [&](PartialState& state) {
    auto w = run(state, true, false);
    if (state.process_index() == 0) uninterrupted = w;
  });
  if (type == accelerate::StateDictType::SHARDED_STATE_DICT && stage > 0) {
    EXPECT_TRUE(fs::exists(dir / "optimizer_0" / accelerate::kZeroIndexFile));
    EXPECT_TRUE(fs::exists(dir / "optimizer_0" / accelerate::zero_shard_file_name(save_world - 1)));
  } else {
    EXPECT_TRUE(fs::exists(dir / "optimizer.safetensors"));
  }
  run_ranks(load_world, [&](PartialState& state) {
    auto w = run(state, false, true);
    if (state.process_index() == 0) resumed = w;
  });
  EXPECT_LT(max_relative(resumed, uninterrupted), 1e-6)
      << save_world << " -> " << load_world << " " << accelerate::to_string(type) << " stage "
      << stage;
  fs::remove_all(dir);
}

TEST(Zero, ShardedCheckpointSavedByThreeResumesOnTwo) {
  expect_resume(3, 2, accelerate::StateDictType::SHARDED_STATE_DICT, 2, 2);
  expect_resume(2, 3, accelerate::StateDictType::SHARDED_STATE_DICT, 2, 2);
  // Without sharding (one process, or stage 0) the shards are put together.
  expect_resume(3, 1, accelerate::StateDictType::SHARDED_STATE_DICT, 2, 2);
  expect_resume(2, 2, accelerate::StateDictType::SHARDED_STATE_DICT, 2, 0);
}

TEST(Zero, FullCheckpointResumesOnAnotherNumberOfProcessesAndWithoutSharding) {
  expect_resume(3, 2, accelerate::StateDictType::FULL_STATE_DICT, 2, 2);
  // A FULL_STATE_DICT optimizer file is the ordinary one: plain data parallelism reads it, and
  // a sharded run reads an unsharded run's.
  expect_resume(3, 2, accelerate::StateDictType::FULL_STATE_DICT, 2, 0);
  expect_resume(2, 3, accelerate::StateDictType::FULL_STATE_DICT, 0, 2);
}

TEST(Zero, AnOptimizerWithoutAnElementWiseUpdateIsRefused) {
  auto errors = run_ranks_collect(2, [](PartialState& state) {
    Accelerator acc(options_for({.stage = 1}, state));
    auto model = make_mlp(7);
    auto lbfgs = std::make_shared<torch::optim::LBFGS>(model->parameters());
    auto [m, opt] = acc.prepare(model, lbfgs);
  });
  for (const auto& e : errors) {
    EXPECT_NE(message(e).find("element-wise update (SGD, Adam, AdamW, RMSprop or Adagrad)"),
              std::string::npos)
        << message(e);
  }
}

TEST(Zero, AParameterOutsideThePreparedModelsIsNamed) {
  auto errors = run_ranks_collect(2, [](PartialState& state) {
    Accelerator acc(options_for({.stage = 2}, state));
    auto model = make_mlp(7);
    auto params = model->parameters();
    params.push_back(at::zeros({5}, at::requires_grad()));
    auto sgd = std::make_shared<torch::optim::SGD>(params, torch::optim::SGDOptions(0.1));
    auto [m, opt] = acc.prepare(model, sgd);
    acc.backward(m->forward(at::ones({1, 6})).sum());
    opt.step();
  });
  for (const auto& e : errors) {
    EXPECT_NE(message(e).find("parameter 6 (param group 0, shape [5]) is not a trainable "
                              "parameter of a prepared model"),
              std::string::npos)
        << message(e);
  }
}

TEST(Zero, BadPluginValuesFailOnEveryProcess) {
  const std::vector<std::pair<std::function<void(accelerate::AcceleratorOptions&)>, std::string>>
      cases{{[](auto& o) { o.deepspeed_plugin = DeepSpeedPlugin{.zero_stage = 4}; },
             "DeepSpeed zero_stage must be 0, 1, 2 or 3, got 4"},
            {[](auto& o) {
               o.deepspeed_plugin = DeepSpeedPlugin{.offload_optimizer_device = "nvme"};
             },
             "offload_optimizer_device nvme is not supported"},
            {[](auto& o) {
               o.fsdp_plugin = FullyShardedDataParallelPlugin{
                   .sharding_strategy = accelerate::ShardingStrategy::HYBRID_SHARD};
             },
             "HYBRID_SHARD (sharding within a machine, replication across machines) is not "
             "available"},
            {[](auto& o) {
               o.fsdp_plugin = FullyShardedDataParallelPlugin{};
               o.deepspeed_plugin = DeepSpeedPlugin{};
             },
             "give fsdp_plugin or deepspeed_plugin, not both"}};
  for (const auto& [set, text] : cases) {
    auto errors = run_ranks_collect(2, [&](PartialState& state) {
      auto o = options_for({}, state);
      set(o);
      Accelerator acc(o);
    });
    for (const auto& e : errors) {
      // One line of message (c10::Error appends its backtrace after it).
      const auto m = message(e);
      EXPECT_NE(m.substr(0, m.find('\n')).find(text), std::string::npos) << m;
    }
  }
}

}  // namespace
