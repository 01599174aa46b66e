// Full parameter sharding (FSDP FULL_SHARD / ZeRO-3), ranks as threads: the same training as
// plain data parallelism to 1e-6 relative for a Sequential MLP (holders installed by prepare)
// and a small transformer-style model (blocks in a ModuleList called through fsdp::call, an
// output layer tied to the embedding), with AdamW, 2 and 3 processes, accumulation and
// clipping; within bf16 tolerance under the bf16 policy; parameters freed between uses;
// checkpoints saved by 3 processes resumed by 2; wrap policies and errors.

#include <accelerate/accelerator.h>
#include <accelerate/checkpointing.h>
#include <accelerate/fsdp.h>

#include <gtest/gtest.h>
#include <torch/nn/functional/activation.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>

#include "thread_ranks.h"

#include <unistd.h>

#include <filesystem>
#include <map>
#include <mutex>
#include <numeric>
#include <vector>

namespace {

using accelerate::Accelerator;
using accelerate::FullyShardedDataParallelPlugin;
using accelerate::PartialState;
using accelerate::ShardingStrategy;
using accelerate::StateDictType;
using accelerate::testing::message;
using accelerate::testing::run_ranks;
using accelerate::testing::run_ranks_collect;
namespace data = accelerate::data;
namespace fs = std::filesystem;
namespace F = torch::nn::functional;

std::mutex seed_mutex;

// 6*13+13 + 13*11+11 + 11*3+3 = 281 parameters; with min_num_params 30 each Linear is a unit.
torch::nn::Sequential make_mlp(uint64_t seed) {
  std::lock_guard<std::mutex> lock(seed_mutex);
  torch::manual_seed(seed);
  return torch::nn::Sequential(torch::nn::Linear(6, 13), torch::nn::Tanh(),
                               torch::nn::Linear(13, 11), torch::nn::Tanh(),
                               torch::nn::Linear(11, 3));
}

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

constexpr int64_t kVocab = 17;
constexpr int64_t kWidth = 8;
constexpr int64_t kLength = 5;

// Attention and an MLP with residuals: what transformer layers are made of.
struct BlockImpl : torch::nn::Module {
  BlockImpl() {
    ln1 = register_module("ln1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kWidth})));
    // No bias: the key bias cancels in the softmax, so its gradient is rounding noise that
    // Adam would amplify into steps that differ with the order of summation.
    qkv = register_module(
        "qkv", torch::nn::Linear(torch::nn::LinearOptions(kWidth, 3 * kWidth).bias(false)));
    proj = register_module("proj", torch::nn::Linear(kWidth, kWidth));
    ln2 = register_module("ln2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kWidth})));
    fc1 = register_module("fc1", torch::nn::Linear(kWidth, 2 * kWidth));
    fc2 = register_module("fc2", torch::nn::Linear(2 * kWidth, kWidth));
  }
  at::Tensor forward(at::Tensor x) {
    auto parts = qkv(ln1(x)).chunk(3, -1);
    auto scores = at::matmul(parts[0], parts[1].transpose(-2, -1)) / std::sqrt(double(kWidth));
    x = x + proj(at::matmul(at::softmax(scores, -1), parts[2]));
    return x + fc2(at::gelu(fc1(ln2(x))));
  }
  torch::nn::LayerNorm ln1{nullptr}, ln2{nullptr};
  torch::nn::Linear qkv{nullptr}, proj{nullptr}, fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(Block);

// An output layer whose weight is the embedding's (registered under its own name too).
struct HeadImpl : torch::nn::Module {
  explicit HeadImpl(const at::Tensor& tied) { weight = register_parameter("weight", tied); }
  at::Tensor forward(const at::Tensor& x) { return at::linear(x, weight); }
  at::Tensor weight;
};

struct TinyLMImpl : torch::nn::Module {
  explicit TinyLMImpl(uint64_t seed) {
    std::lock_guard<std::mutex> lock(seed_mutex);
    torch::manual_seed(seed);
    embed = register_module("embed", torch::nn::Embedding(kVocab, kWidth));
    blocks = register_module("blocks", torch::nn::ModuleList());
    for (int i = 0; i < 3; ++i) blocks->push_back(Block());
    ln_f = register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kWidth})));
    head = register_module("head", std::make_shared<HeadImpl>(embed->weight));  // tied
  }
  at::Tensor forward(const at::Tensor& tokens) {
    at::Tensor x = embed(tokens);
    for (const auto& block : *blocks) x = accelerate::fsdp::call<BlockImpl>(block, x);
    return head->forward(ln_f(x));
  }
  torch::nn::Embedding embed{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  torch::nn::LayerNorm ln_f{nullptr};
  std::shared_ptr<HeadImpl> head;
};
TORCH_MODULE(TinyLM);

struct Tokens {
  int64_t n;
  int64_t size() const { return n; }
  torch::data::Example<> get(size_t i) const {
    auto t =
        at::arange(kLength, at::kLong).mul(3).add(static_cast<int64_t>(i) * 7).remainder(kVocab);
    return {t, t.add(static_cast<int64_t>(i % 2) + 1).remainder(kVocab)};
  }
};

enum class Model { kMlp, kTinyLM };

struct RunSpec {
  Model model = Model::kMlp;
  bool full_shard = false;  // false: plain data parallelism
  int64_t accumulation = 1;
  double clip = 0;
  bool bf16 = false;
  bool sgd = false;
  std::string prefetch = "NO_PREFETCH";
  bool forward_prefetch = false;
  int steps = 6;
};

accelerate::AcceleratorOptions options_for(const RunSpec& s, PartialState& state) {
  accelerate::AcceleratorOptions o{.mixed_precision = s.bf16 ? "bf16" : "no",
                                   .gradient_accumulation_steps = s.accumulation,
                                   .state = state.shared_from_this(),
                                   .gradient_state = std::make_shared<data::GradientState>()};
  if (s.full_shard) {
    FullyShardedDataParallelPlugin plugin{.sharding_strategy = ShardingStrategy::FULL_SHARD,
                                          .backward_prefetch = s.prefetch,
                                          .forward_prefetch = s.forward_prefetch};
    if (s.model == Model::kMlp) {
      plugin.auto_wrap_policy = "SIZE_BASED_WRAP";
      plugin.min_num_params = 30;
    } else {
      plugin.auto_wrap_policy = "TRANSFORMER_BASED_WRAP";
      plugin.transformer_layer_cls_to_wrap = std::vector<std::string>{"Block"};
    }
    o.fsdp_plugin = plugin;
  }
  return o;
}

// Each tensor once: LibTorch's parameters() lists a tied weight under each of its names.
std::vector<at::Tensor> unique_parameters(const torch::nn::Module& model) {
  std::vector<at::Tensor> out;
  for (const auto& p : model.parameters()) {
    bool seen = false;
    for (const auto& q : out) seen = seen || q.is_same(p);
    if (!seen) out.push_back(p);
  }
  return out;
}

std::shared_ptr<torch::optim::Optimizer> make_optimizer(const RunSpec& s,
                                                        std::vector<at::Tensor> params) {
  if (s.sgd) {
    return std::make_shared<torch::optim::SGD>(params, torch::optim::SGDOptions(0.1).momentum(0.9));
  }
  return std::make_shared<torch::optim::AdamW>(params,
                                               torch::optim::AdamWOptions(0.01).weight_decay(0.05));
}

using Weights = std::map<std::string, at::Tensor>;

Weights state_of(Accelerator& acc, const torch::nn::Module& model) {
  Weights out;
  for (const auto& item : acc.get_state_dict(model)) out[item.key()] = item.value();
  return out;
}

template <class M, class Data, class Loss>
Weights train_model(PartialState& state, const RunSpec& s, M model, Data dataset, Loss loss_of) {
  Accelerator acc(options_for(s, state));
  auto optimizer = make_optimizer(s, unique_parameters(*model));
  data::DataLoader loader(dataset, {.batch_size = 4});
  auto [m, opt, dl] = acc.prepare(model, optimizer, loader);
  int steps = 0;
  for (auto& batch : dl) {
    auto guard = acc.accumulate(m);
    acc.backward(loss_of(m, batch));
    if (s.clip > 0 && acc.sync_gradients()) acc.clip_grad_norm_(unique_parameters(*m), s.clip);
    opt.step();
    opt.zero_grad();
    if (++steps == s.steps * s.accumulation) break;
  }
  return state_of(acc, *m);
}

Weights train(PartialState& state, const RunSpec& s) {
  const auto seed = 7 + static_cast<uint64_t>(state.process_index());  // process 0's wins
  if (s.model == Model::kMlp) {
    return train_model<torch::nn::Sequential>(
        state, s, make_mlp(seed), Rows{96}, [](torch::nn::Sequential& m, const auto& b) {
          return torch::mse_loss(m->forward(b.data).to(at::kFloat), b.target);
        });
  }
  return train_model<TinyLM>(state, s, TinyLM(seed), Tokens{96}, [](TinyLM& m, const auto& b) {
    auto logits = m->forward(b.data).to(at::kFloat);
    return F::cross_entropy(logits.reshape({-1, kVocab}), b.target.reshape({-1}));
  });
}

std::vector<Weights> train_all(int world, const RunSpec& s) {
  std::vector<Weights> out(static_cast<size_t>(world));
  run_ranks(world, [&](PartialState& state) {
    out[static_cast<size_t>(state.process_index())] = train(state, s);
  });
  return out;
}

double max_relative(const Weights& a, const Weights& b) {
  EXPECT_EQ(a.size(), b.size());
  double worst = 0;
  for (const auto& [name, t] : b) {
    auto it = a.find(name);
    if (it == a.end()) {
      ADD_FAILURE() << "missing " << name;
      continue;
    }
    const double diff = (it->second.to(at::kDouble) - t.to(at::kDouble)).abs().max().item<double>();
    const double scale = std::max(t.abs().max().item<double>(), 1e-12);
    worst = std::max(worst, diff / scale);
  }
  return worst;
}

Weights initial(Model model) {
  Weights out;
  if (model == Model::kMlp) {
    auto m = make_mlp(7);
    for (const auto& item : m->named_parameters()) out[item.key()] = item.value().detach().clone();
  } else {
    TinyLM m(7);
    for (const auto& item : m->named_parameters()) out[item.key()] = item.value().detach().clone();
  }
  return out;
}

void expect_matches_ddp(int world, RunSpec s, double tolerance = 1e-6) {
  s.full_shard = false;
  const bool bf16 = s.bf16;
  s.bf16 = false;  // the reference is float32 data parallelism
  const auto ddp = train_all(world, s);
  s.full_shard = true;
  s.bf16 = bf16;
  const auto sharded = train_all(world, s);
  for (int r = 1; r < world; ++r) {
    EXPECT_EQ(max_relative(sharded[static_cast<size_t>(r)], sharded[0]), 0) << "rank " << r;
  }
  EXPECT_LT(max_relative(sharded[0], ddp[0]), tolerance)
      << "world " << world << " accumulation " << s.accumulation << " clip " << s.clip;
  EXPECT_GT(max_relative(ddp[0], initial(s.model)), 1e-3);  // training moved the weights
}

TEST(FullShard, SequentialMlpTrainsLikeDataParallelism) {
  for (int world : {2, 3}) {
    expect_matches_ddp(world, {.model = Model::kMlp});
    expect_matches_ddp(world, {.model = Model::kMlp, .sgd = true});
    expect_matches_ddp(world, {.model = Model::kMlp, .accumulation = 3, .clip = 0.05});
  }
}

TEST(FullShard, TransformerWithTiedOutputLayerTrainsLikeDataParallelism) {
  for (int world : {2, 3}) {
    expect_matches_ddp(world, {.model = Model::kTinyLM});
    expect_matches_ddp(world, {.model = Model::kTinyLM, .accumulation = 2, .clip = 0.5});
  }
}

TEST(FullShard, PrefetchDoesNotChangeResults) {
  for (const char* prefetch : {"BACKWARD_PRE", "BACKWARD_POST"}) {
    expect_matches_ddp(2,
                       {.model = Model::kTinyLM, .prefetch = prefetch, .forward_prefetch = true});
  }
}

TEST(FullShard, Bf16PolicyTrainsWithinBf16Tolerance) {
  // bfloat16 keeps 8 bits of mantissa: computation and reductions in it, updates in float32.
  expect_matches_ddp(2, {.model = Model::kMlp, .bf16 = true}, 0.05);
}

TEST(FullShard, ParametersAreFreedBetweenUsesAndTiesStayTied) {
  run_ranks(2, [](PartialState& state) {
    Accelerator acc(options_for({.model = Model::kTinyLM, .full_shard = true}, state));
    TinyLM model(7);
    const auto names_before = model->named_parameters().keys();
    auto adamw = std::make_shared<torch::optim::AdamW>(unique_parameters(*model),
                                                       torch::optim::AdamWOptions(0.01));
    auto [m, opt] = acc.prepare(model, adamw);
    auto* sync = acc.synchronizer(m);
    ASSERT_NE(sync, nullptr);
    EXPECT_EQ(sync->gradient_sharding_stage(), 3);
    EXPECT_EQ(acc.distributed_type(), accelerate::DistributedType::FSDP);
    EXPECT_EQ(m->named_parameters().keys(), names_before);  // names and state dict unchanged
    auto stats = accelerate::fsdp::stats(*sync);
    // The root unit (embedding tied to the head, final norm) and three blocks.
    ASSERT_EQ(stats.units, 4);
    EXPECT_EQ(stats.unit_names, (std::vector<std::string>{"", "blocks.0", "blocks.1", "blocks.2"}));
    const auto tokens = Tokens{8}.get(0).data.unsqueeze(0);
    for (int step = 0; step < 2; ++step) {
      auto logits = m->forward(tokens);
      acc.backward(
          F::cross_entropy(logits.reshape({-1, kVocab}), Tokens{8}.get(0).target.reshape({-1})));
      opt.step();
      opt.zero_grad();
    }
    stats = accelerate::fsdp::stats(*sync);
    // Between steps only the root unit is whole; each block's parameters are freed.
    EXPECT_EQ(stats.gathered_bytes, stats.unit_bytes[0]);
    EXPECT_FALSE(accelerate::fsdp::is_unit(*m));
    EXPECT_TRUE(accelerate::fsdp::is_unit(*m->blocks[1]));
    EXPECT_TRUE(m->head->weight.is_same(m->embed->weight));
    const int64_t elements = [&] {
      int64_t n = 0;
      for (const auto& p : unique_parameters(*model)) n += p.numel();
      return n;
    }();
    EXPECT_LT(stats.shard_bytes, elements * 4 / 2 + 64);  // about half, padding aside
    // A block's parameters hold no memory now (reading one outside fsdp::call is a use of
    // freed memory, as with PyTorch FSDP: summon_full_params is the way).
    EXPECT_EQ(m->blocks[0]->as<BlockImpl>()->fc1->weight.storage().nbytes(), 0u);
    EXPECT_GT(m->embed->weight.storage().nbytes(), 0u);
    {
      auto full = accelerate::fsdp::summon_full_params(*sync);
      EXPECT_TRUE(at::isfinite(m->blocks[0]->as<BlockImpl>()->fc1->weight).all().item<bool>());
      EXPECT_EQ(accelerate::fsdp::stats(*sync).gathered_bytes,
                std::accumulate(stats.unit_bytes.begin(), stats.unit_bytes.end(), int64_t{0}));
    }
    EXPECT_EQ(accelerate::fsdp::stats(*sync).gathered_bytes, stats.unit_bytes[0]);
    // free_memory gathers the model whole before dropping the engine: it stays usable.
    const auto before = state_of(acc, *m);
    acc.free_memory();
    EXPECT_FALSE(accelerate::fsdp::is_unit(*m->blocks[1]));
    EXPECT_GT(m->blocks[0]->as<BlockImpl>()->fc1->weight.storage().nbytes(), 0u);
    Weights after;
    for (const auto& item : m->named_parameters()) after[item.key()] = item.value().detach();
    EXPECT_EQ(max_relative(after, before), 0);
    EXPECT_TRUE(at::isfinite(m->forward(tokens)).all().item<bool>());
  });
}

TEST(FullShard, AUnitCalledDirectlyStaysWholeAndStillTrainsRight) {
  // A Block called without fsdp::call: the unit cannot be freed between uses, so it stays
  // whole; its gradients and optimizer state are still sharded.
  struct DirectImpl : torch::nn::Module {
    DirectImpl() {
      std::lock_guard<std::mutex> lock(seed_mutex);
      torch::manual_seed(3);
      a = register_module("a", Block());
      b = register_module("b", Block());
    }
    at::Tensor forward(const at::Tensor& x) { return b(accelerate::fsdp::call(a, x)); }
    Block a{nullptr}, b{nullptr};
  };
  auto run = [](bool sharded) {
    Weights out;
    run_ranks(2, [&](PartialState& state) {
      RunSpec s{.model = Model::kTinyLM, .full_shard = sharded};
      Accelerator acc(options_for(s, state));
      auto model = std::make_shared<DirectImpl>();
      auto adamw = std::make_shared<torch::optim::AdamW>(unique_parameters(*model),
                                                         torch::optim::AdamWOptions(0.01));
      auto [m, opt] = acc.prepare(model, adamw);
      for (int step = 0; step < 3; ++step) {
        auto x = at::arange(2 * kLength * kWidth, at::kFloat)
                     .reshape({2, kLength, kWidth})
                     .mul(0.01 * (state.process_index() + 1 + step));
        acc.backward(m->forward(x).pow(2).mean());
        opt.step();
        opt.zero_grad();
      }
      if (sharded) {
        auto stats = accelerate::fsdp::stats(*acc.synchronizer(m));
        // Unit "a" is freed between steps, unit "b" is whole.
        EXPECT_EQ(stats.gathered_bytes, stats.unit_bytes[1]);
        EXPECT_EQ(stats.unit_names[1], "b");
      }
      auto w = state_of(acc, *m);
      if (state.process_index() == 0) out = w;
    });
    return out;
  };
  EXPECT_LT(max_relative(run(true), run(false)), 1e-6);
}

void expect_resume(StateDictType type, bool main_reads = false) {
  const fs::path dir = fs::temp_directory_path() /
                       ("fsdp_resume_" + std::to_string(::getpid()) + "_" +
                        std::to_string(static_cast<int>(type)) + (main_reads ? "m" : ""));
  fs::remove_all(dir);
  const int total = 6;
  const int k = 3;
  auto run = [&](PartialState& state, bool save, bool load) {
    auto o = options_for({.model = Model::kTinyLM, .full_shard = true}, state);
    o.split_batches = true;
    o.fsdp_plugin->state_dict_type = type;
    // Only process 0 reads the checkpoint; the others receive their shards.
    o.fsdp_plugin->cpu_ram_efficient_loading = main_reads;
    Accelerator acc(o);
    TinyLM model(7);
    auto adamw = std::make_shared<torch::optim::AdamW>(unique_parameters(*model),
                                                       torch::optim::AdamWOptions(0.01));
    data::DataLoader loader(Tokens{96}, {.batch_size = 12});
    auto [m, opt, dl] = acc.prepare(model, adamw, loader);
    int step = 0;
    if (load) {
      acc.load_state(dir.string());
      step = k;
    }
    for (auto& batch : dl) {
      auto logits = m->forward(batch.data);
      acc.backward(F::cross_entropy(logits.reshape({-1, kVocab}), batch.target.reshape({-1})));
      opt.step();
      opt.zero_grad();
      ++step;
      if (save && step == k) acc.save_state(dir.string());
      if (step == total) break;
    }
    return state_of(acc, *m);
  };
  Weights uninterrupted, resumed;
  run_ranks(3, [&](PartialState& state) {
    auto w = run(state, true, false);
    if (state.process_index() == 0) uninterrupted = w;
  });
  if (type == StateDictType::SHARDED_STATE_DICT) {
    EXPECT_TRUE(fs::exists(dir / "pytorch_model_fsdp_0" / "fsdp_index.json"));
    EXPECT_TRUE(fs::exists(dir / "pytorch_model_fsdp_0" / "shard_2.safetensors"));
    EXPECT_FALSE(fs::exists(dir / "model.safetensors"));
  } else {
    EXPECT_TRUE(fs::exists(dir / "model.safetensors"));
  }
  run_ranks(2, [&](PartialState& state) {
    auto w = run(state, false, true);
    if (state.process_index() == 0) resumed = w;
  });
  EXPECT_LT(max_relative(resumed, uninterrupted), 1e-6) << accelerate::to_string(type);
  EXPECT_GT(max_relative(resumed, initial(Model::kTinyLM)), 1e-3);
  fs::remove_all(dir);
}

TEST(FullShard, CheckpointSavedByThreeResumesOnTwo) {
  expect_resume(StateDictType::SHARDED_STATE_DICT);
  expect_resume(StateDictType::FULL_STATE_DICT);
  expect_resume(StateDictType::FULL_STATE_DICT, /*main_reads=*/true);
}

TEST(FullShard, SaveModelWritesTheFullModelThatAnUnshardedModelLoads) {
  const fs::path dir =
      fs::temp_directory_path() / ("fsdp_save_model_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  Weights expected;
  run_ranks(3, [&](PartialState& state) {
    Accelerator acc(options_for({.model = Model::kTinyLM, .full_shard = true}, state));
    TinyLM model(7);
    auto m = acc.prepare(model);
    // A small max_shard_size: several files, each streamed one unit at a time.
    acc.save_model(*m, dir.string(), {.max_shard_size = "2KB"});
    acc.wait_for_everyone();
    auto w = state_of(acc, *m);
    if (state.process_index() == 0) expected = w;
    // And back into the sharded model.
    accelerate::load_checkpoint_in_model(*m, dir.string());
    EXPECT_EQ(max_relative(state_of(acc, *m), w), 0);
  });
  EXPECT_TRUE(fs::exists(dir / "model.safetensors.index.json"));
  TinyLM plain(99);
  auto report = accelerate::load_checkpoint_in_model(*plain, dir.string(), {.strict = true});
  Weights loaded;
  for (const auto& item : plain->named_parameters()) loaded[item.key()] = item.value().detach();
  for (const auto& item : plain->named_buffers()) loaded[item.key()] = item.value().detach();
  EXPECT_EQ(max_relative(loaded, expected), 0);
  EXPECT_EQ(max_relative(expected, initial(Model::kTinyLM)), 0);  // process 0's weights
  fs::remove_all(dir);
}

TEST(FullShard, DifferentModelsOnTwoProcessesAreNamed) {
  auto errors = run_ranks_collect(2, [](PartialState& state) {
    Accelerator acc(options_for({.model = Model::kMlp, .full_shard = true}, state));
    auto model = state.process_index() == 0
                     ? make_mlp(1)
                     : torch::nn::Sequential(torch::nn::Linear(6, 13), torch::nn::Tanh(),
                                             torch::nn::Linear(13, 12), torch::nn::Tanh(),
                                             torch::nn::Linear(12, 3));
    acc.prepare(model);
  });
  for (const auto& e : errors) {
    EXPECT_NE(message(e).find("shards another model than process 0"), std::string::npos)
        << message(e);
  }
}

TEST(FullShard, AnOptimizerGivenATiedWeightTwiceIsRefused) {
  auto errors = run_ranks_collect(2, [](PartialState& state) {
    Accelerator acc(options_for({.model = Model::kTinyLM, .full_shard = true}, state));
    TinyLM model(7);
    auto sgd = std::make_shared<torch::optim::SGD>(model->parameters(),  // embed.weight twice
                                                   torch::optim::SGDOptions(0.1).momentum(0.9));
    acc.prepare(model, sgd);
  });
  for (const auto& e : errors) {
    EXPECT_NE(message(e).find("the optimizer lists one tensor twice"), std::string::npos)
        << message(e);
  }
}

TEST(FullShard, TransformerPolicyWithoutClassNamesIsRefused) {
  auto errors = run_ranks_collect(2, [](PartialState& state) {
    auto o = options_for({.model = Model::kMlp, .full_shard = true}, state);
    o.fsdp_plugin->auto_wrap_policy = "TRANSFORMER_BASED_WRAP";
    o.fsdp_plugin->min_num_params.reset();
    Accelerator acc(o);
  });
  for (const auto& e : errors) {
    EXPECT_NE(message(e).find("TRANSFORMER_BASED_WRAP needs transformer_layer_cls_to_wrap"),
              std::string::npos)
        << message(e);
  }
}

}  // namespace
