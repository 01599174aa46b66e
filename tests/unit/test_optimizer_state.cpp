// Optimizer state to and from safetensors: every LibTorch optimizer resumes bitwise after a
// round trip, the layout is PyTorch's, and every malformed input is refused without touching
// the optimizer.

#include <accelerate/optimizer_state.h>
#include <accelerate/safetensors.h>

#include <gtest/gtest.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim.h>
#include <torch/utils.h>

#include "expect_error.h"

#include <unistd.h>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace optim = torch::optim;
using accelerate::load_optimizer_state;
using accelerate::load_optimizer_state_dict;
using accelerate::optimizer_state_dict;
using accelerate::OptimizerStateDict;
using accelerate::save_optimizer_state;
using accelerate::testing::same;

fs::path fresh_dir(const std::string& name) {
  auto dir = fs::temp_directory_path() /
             ("accelerate_optimizer_state_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

torch::nn::Sequential make_model(uint64_t seed = 0) {
  torch::manual_seed(seed);
  return torch::nn::Sequential(torch::nn::Linear(4, 8), torch::nn::Tanh(), torch::nn::Linear(8, 3));
}

// A model with different initial weights overwritten by `source`'s: equal values, own storage.
torch::nn::Sequential copy_of(const torch::nn::Sequential& source) {
  auto copy = make_model(/*seed=*/123);
  torch::NoGradGuard no_grad;
  auto from = source->parameters();
  auto to = copy->parameters();
  for (size_t i = 0; i < from.size(); ++i) to[i].copy_(from[i]);
  return copy;
}

// The first Linear's parameters in group 0 and the second's in group 1, or all in one group.
std::vector<optim::OptimizerParamGroup> param_groups(const torch::nn::Sequential& model,
                                                     bool two_groups) {
  auto params = model->parameters();
  if (!two_groups) return {optim::OptimizerParamGroup(params)};
  return {optim::OptimizerParamGroup({params[0], params[1]}),
          optim::OptimizerParamGroup({params[2], params[3]})};
}

void train_step(torch::nn::Sequential& model, optim::Optimizer& optimizer) {
  torch::manual_seed(7);
  const auto x = torch::randn({16, 4});
  const auto y = torch::randn({16, 3});
  // A closure for every optimizer, since LBFGS needs one.
  optimizer.step([&] {
    optimizer.zero_grad();
    auto loss = torch::nn::functional::mse_loss(model->forward(x), y);
    loss.backward();
    return loss;
  });
}

// Deep copy, so later steps cannot change it.
OptimizerStateDict snapshot(const optim::Optimizer& optimizer) {
  auto state = optimizer_state_dict(optimizer);
  for (auto& [name, tensor] : state.tensors) tensor = tensor.clone();
  return state;
}

void expect_same_state(const OptimizerStateDict& actual, const OptimizerStateDict& expected) {
  EXPECT_EQ(actual.metadata, expected.metadata);
  ASSERT_EQ(actual.tensors.size(), expected.tensors.size());
  for (size_t i = 0; i < actual.tensors.size(); ++i) {
    EXPECT_EQ(actual.tensors[i].first, expected.tensors[i].first);
    EXPECT_TRUE(same(actual.tensors[i].second, expected.tensors[i].second))
        << actual.tensors[i].first;
  }
}

std::vector<std::string> names_of(const OptimizerStateDict& state) {
  std::vector<std::string> names;
  for (const auto& item : state.tensors) names.push_back(item.first);
  return names;
}

using Factory = std::function<std::unique_ptr<optim::Optimizer>(
    std::vector<optim::OptimizerParamGroup> groups, bool other_hyperparameters)>;

struct RoundTrip {
  bool two_groups = true;
  // False for the LibTorch archive fallback, whose metadata holds no param_groups.
  bool native = true;
};

// 3 steps, save to a file, load into a fresh optimizer with other hyper-parameters over a copy
// of the model, then 2 more steps with both: the parameters must stay bitwise equal.
void expect_round_trip(const std::string& name, const Factory& make, RoundTrip options = {}) {
  SCOPED_TRACE(name);
  const auto path = (fresh_dir(name) / "optimizer.safetensors").string();
  auto model = make_model();
  auto optimizer = make(param_groups(model, options.two_groups), false);
  if (options.two_groups) optimizer->param_groups()[1].options().set_lr(0.004);
  for (int i = 0; i < 3; ++i) train_step(model, *optimizer);
  save_optimizer_state(*optimizer, path);

  auto resumed_model = copy_of(model);
  auto resumed = make(param_groups(resumed_model, options.two_groups), true);
  if (options.two_groups) resumed->param_groups()[1].options().set_lr(0.3);
  load_optimizer_state(*resumed, path);

  ASSERT_EQ(resumed->param_groups().size(), optimizer->param_groups().size());
  for (size_t g = 0; g < optimizer->param_groups().size(); ++g) {
    EXPECT_EQ(resumed->param_groups()[g].options().get_lr(),
              optimizer->param_groups()[g].options().get_lr())
        << "group " << g;
  }
  if (options.native) expect_same_state(snapshot(*resumed), snapshot(*optimizer));

  for (int i = 0; i < 2; ++i) {
    train_step(model, *optimizer);
    train_step(resumed_model, *resumed);
  }
  auto expected = model->parameters();
  auto actual = resumed_model->parameters();
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < actual.size(); ++i) EXPECT_TRUE(same(actual[i], expected[i])) << i;
  fs::remove_all(fs::path(path).parent_path());
}

TEST(OptimizerState, AdamResumesBitwise) {
  expect_round_trip("adam", [](auto groups, bool other) -> std::unique_ptr<optim::Optimizer> {
    return std::make_unique<optim::Adam>(std::move(groups),
                                         other ? optim::AdamOptions(0.5).betas({0.5, 0.6}).eps(1e-3)
                                               : optim::AdamOptions(0.01).weight_decay(0.001));
  });
}

TEST(OptimizerState, AdamAmsgradResumesBitwise) {
  expect_round_trip(
      "adam_amsgrad", [](auto groups, bool other) -> std::unique_ptr<optim::Optimizer> {
        return std::make_unique<optim::Adam>(
            std::move(groups), optim::AdamOptions(other ? 0.5 : 0.01).amsgrad(!other));
      });
}

TEST(OptimizerState, AdamWAmsgradResumesBitwise) {
  expect_round_trip("adamw_amsgrad",
                    [](auto groups, bool other) -> std::unique_ptr<optim::Optimizer> {
                      return std::make_unique<optim::AdamW>(
                          std::move(groups), other ? optim::AdamWOptions(0.5).weight_decay(0.5)
                                                   : optim::AdamWOptions(0.01).amsgrad(true));
                    });
}

TEST(OptimizerState, SgdNesterovResumesBitwise) {
  expect_round_trip(
      "sgd_nesterov", [](auto groups, bool other) -> std::unique_ptr<optim::Optimizer> {
        return std::make_unique<optim::SGD>(
            std::move(groups), other ? optim::SGDOptions(0.5).momentum(0.5).dampening(0.1)
                                     : optim::SGDOptions(0.05).momentum(0.9).nesterov(true));
      });
}

TEST(OptimizerState, PlainSgdHasNoStateAndRestoresLr) {
  auto model = make_model();
  optim::SGD optimizer(model->parameters(), optim::SGDOptions(0.05));
  train_step(model, optimizer);
  const auto state = optimizer_state_dict(optimizer);
  EXPECT_TRUE(state.tensors.empty());
  expect_round_trip("sgd_plain", [](auto groups, bool other) -> std::unique_ptr<optim::Optimizer> {
    return std::make_unique<optim::SGD>(std::move(groups), optim::SGDOptions(other ? 0.5 : 0.05));
  });
}

TEST(OptimizerState, RmspropCenteredMomentumResumesBitwise) {
  expect_round_trip("rmsprop", [](auto groups, bool other) -> std::unique_ptr<optim::Optimizer> {
    return std::make_unique<optim::RMSprop>(
        std::move(groups), other ? optim::RMSpropOptions(0.5)
                                 : optim::RMSpropOptions(0.01).centered(true).momentum(0.9));
  });
}

TEST(OptimizerState, AdagradResumesBitwise) {
  expect_round_trip("adagrad", [](auto groups, bool other) -> std::unique_ptr<optim::Optimizer> {
    return std::make_unique<optim::Adagrad>(
        std::move(groups), other ? optim::AdagradOptions(0.5).initial_accumulator_value(1.0)
                                 : optim::AdagradOptions(0.05).lr_decay(0.01));
  });
}

TEST(OptimizerState, LbfgsFallsBackToLibTorchArchive) {
  const auto make = [](auto groups, bool other) -> std::unique_ptr<optim::Optimizer> {
    return std::make_unique<optim::LBFGS>(
        std::move(groups),
        other ? optim::LBFGSOptions(0.5).history_size(7) : optim::LBFGSOptions(0.1).max_iter(4));
  };
  expect_round_trip("lbfgs", make, {.two_groups = false, .native = false});

  auto model = make_model();
  auto optimizer = make(param_groups(model, false), false);
  train_step(model, *optimizer);
  const auto state = optimizer_state_dict(*optimizer);
  EXPECT_EQ(state.metadata.at("format"), "accelerate-cpp optimizer 1");
  EXPECT_EQ(state.metadata.at("optimizer"), "libtorch-archive");
  EXPECT_EQ(state.metadata.at("class"), "torch::optim::LBFGS");
  ASSERT_EQ(names_of(state), std::vector<std::string>{"archive"});
  EXPECT_EQ(state.tensors[0].second.scalar_type(), at::kByte);
  EXPECT_EQ(state.tensors[0].second.dim(), 1);

  // All options come back, not only lr (LibTorch's own load() restores none of them).
  auto other_model = copy_of(model);
  auto other = make(param_groups(other_model, false), true);
  load_optimizer_state_dict(*other, state);
  const auto& options = static_cast<const optim::LBFGSOptions&>(other->param_groups()[0].options());
  EXPECT_EQ(options.lr(), 0.1);
  EXPECT_EQ(options.max_iter(), 4);
  EXPECT_EQ(options.history_size(), 100);
}

TEST(OptimizerState, ExactLayoutForAdamWithTwoGroups) {
  torch::manual_seed(0);
  torch::nn::Linear linear(3, 2);
  auto extra = torch::zeros({3}, torch::requires_grad());
  std::vector<optim::OptimizerParamGroup> groups = {
      optim::OptimizerParamGroup({linear->weight, linear->bias}),
      optim::OptimizerParamGroup({extra}, std::make_unique<optim::AdamOptions>(0.01))};
  optim::Adam optimizer(std::move(groups), optim::AdamOptions(0.001));
  linear->weight.mutable_grad() = torch::ones({2, 3});
  linear->bias.mutable_grad() = torch::ones({2});
  optimizer.step();  // `extra` has no gradient, so no state

  const auto state = optimizer_state_dict(optimizer);
  const std::vector<std::string> expected_names = {"state.0.step",       "state.0.exp_avg",
                                                   "state.0.exp_avg_sq", "state.1.step",
                                                   "state.1.exp_avg",    "state.1.exp_avg_sq"};
  EXPECT_EQ(names_of(state), expected_names);
  const std::map<std::string, std::string> expected_metadata = {
      {"format", "accelerate-cpp optimizer 1"},
      {"optimizer", "Adam"},
      {"param_groups",
       R"([{"lr":0.001,"betas":[0.9,0.999],"eps":1e-08,"weight_decay":0.0,"amsgrad":false,)"
       R"("params":[0,1]},{"lr":0.01,"betas":[0.9,0.999],"eps":1e-08,"weight_decay":0.0,)"
       R"("amsgrad":false,"params":[2]}])"}};
  EXPECT_EQ(state.metadata, expected_metadata);

  const auto& step = state.tensors[0].second;
  EXPECT_TRUE(same(step, at::scalar_tensor(int64_t{1}, at::kLong)));
  EXPECT_EQ(state.tensors[1].second.sizes(), (std::vector<int64_t>{2, 3}));
  EXPECT_TRUE(at::allclose(state.tensors[1].second, at::full({2, 3}, 0.1)));
  EXPECT_EQ(state.tensors[4].second.sizes(), (std::vector<int64_t>{2}));

  // The file holds exactly this, in this order.
  const auto dir = fresh_dir("layout");
  const auto path = (dir / "optimizer.safetensors").string();
  save_optimizer_state(optimizer, path);
  const auto file = accelerate::safetensors::load_file(path);
  EXPECT_EQ(file.names(), expected_names);
  EXPECT_EQ(file.metadata, expected_metadata);
  for (const auto& [name, tensor] : state.tensors)
    EXPECT_TRUE(same(file.get(name), tensor)) << name;
  fs::remove_all(dir);
}

TEST(OptimizerState, ParamWithoutGradientHasNoState) {
  auto model = make_model();
  auto unused = torch::ones({5}, torch::requires_grad());
  auto params = model->parameters();
  params.insert(params.begin() + 2, unused);  // index 2, between the two Linear layers
  optim::Adam optimizer(params, optim::AdamOptions(0.01));
  for (int i = 0; i < 2; ++i) train_step(model, optimizer);
  for (const auto& name : names_of(optimizer_state_dict(optimizer))) {
    EXPECT_NE(name.rfind("state.2.", 0), 0u) << name;
  }
  EXPECT_EQ(names_of(optimizer_state_dict(optimizer)).size(), 4u * 3u);
}

TEST(OptimizerState, StepIsAnExactInt64) {
  auto model = make_model();
  optim::Adam optimizer(model->parameters(), optim::AdamOptions(0.01));
  train_step(model, optimizer);
  const int64_t big = (int64_t{1} << 53) + 1;  // not representable as a double
  for (auto& [key, state] : optimizer.state())
    static_cast<optim::AdamParamState&>(*state).step(big);

  const auto dir = fresh_dir("step");
  const auto path = (dir / "optimizer.safetensors").string();
  save_optimizer_state(optimizer, path);
  auto other_model = copy_of(model);
  optim::Adam other(other_model->parameters(), optim::AdamOptions(0.01));
  load_optimizer_state(other, path);
  ASSERT_EQ(other.state().size(), 4u);
  for (auto& [key, state] : other.state()) {
    EXPECT_EQ(static_cast<optim::AdamParamState&>(*state).step(), big);
  }
  fs::remove_all(dir);
}

TEST(OptimizerState, InMemoryRoundTripCopiesTensors) {
  auto model = make_model();
  optim::RMSprop optimizer(model->parameters(), optim::RMSpropOptions(0.01).momentum(0.5));
  for (int i = 0; i < 3; ++i) train_step(model, optimizer);
  auto state = optimizer_state_dict(optimizer);

  auto other_model = copy_of(model);
  optim::RMSprop other(other_model->parameters(), optim::RMSpropOptions(0.2));
  load_optimizer_state_dict(other, state);
  const auto loaded = snapshot(other);
  expect_same_state(loaded, snapshot(optimizer));
  EXPECT_EQ(other.param_groups()[0].options().get_lr(), 0.01);

  // The loaded state owns its memory: changing the source (here, the first optimizer's own
  // state, which optimizer_state_dict aliases) leaves it alone.
  for (auto& [name, tensor] : state.tensors) tensor.fill_(42);
  expect_same_state(snapshot(other), loaded);

  train_step(model, optimizer);
  expect_same_state(snapshot(other), loaded);
}

TEST(OptimizerState, LoadedStateDoesNotAliasTheFile) {
  auto model = make_model();
  optim::Adam optimizer(model->parameters(), optim::AdamOptions(0.01));
  for (int i = 0; i < 2; ++i) train_step(model, optimizer);
  const auto dir = fresh_dir("alias");
  const auto path = (dir / "optimizer.safetensors").string();
  save_optimizer_state(optimizer, path);

  optim::Adam other(copy_of(model)->parameters(), optim::AdamOptions(0.01));
  load_optimizer_state(other, path);
  const auto loaded = snapshot(other);

  // Overwrite the data buffer in place (same inode): a tensor still mapping the file would see
  // the new bytes.
  uint64_t header_size = 0;
  {
    std::fstream file(path, std::ios::in | std::ios::out | std::ios::binary);
    file.read(reinterpret_cast<char*>(&header_size), sizeof(header_size));
    const auto data_start = static_cast<std::streamoff>(8 + header_size);
    const auto size = static_cast<std::streamoff>(fs::file_size(path)) - data_start;
    file.seekp(data_start);
    const std::string garbage(static_cast<size_t>(size), '\x7f');
    file.write(garbage.data(), static_cast<std::streamsize>(garbage.size()));
  }
  expect_same_state(snapshot(other), loaded);
  fs::remove_all(dir);
}

TEST(OptimizerState, LoadedStateReplacesExistingState) {
  auto model = make_model();
  optim::Adam fresh(model->parameters(), optim::AdamOptions(0.02));
  const auto empty = optimizer_state_dict(fresh);  // never stepped: no state at all
  EXPECT_TRUE(empty.tensors.empty());

  optim::Adam trained(model->parameters(), optim::AdamOptions(0.01));
  train_step(model, trained);
  ASSERT_EQ(trained.state().size(), 4u);
  load_optimizer_state_dict(trained, empty);
  EXPECT_TRUE(trained.state().empty());
  EXPECT_EQ(trained.param_groups()[0].options().get_lr(), 0.02);
}

TEST(OptimizerState, AdagradParamMissingFromCheckpointStartsFresh) {
  auto model = make_model();
  optim::Adagrad optimizer(model->parameters(),
                           optim::AdagradOptions(0.01).initial_accumulator_value(0.25));
  train_step(model, optimizer);
  auto state = optimizer_state_dict(optimizer);
  std::erase_if(state.tensors,
                [](const auto& item) { return item.first.rfind("state.1.", 0) == 0; });

  optim::Adagrad other(copy_of(model)->parameters(), optim::AdagradOptions(0.01));
  load_optimizer_state_dict(other, state);
  const auto loaded = optimizer_state_dict(other);
  const auto find = [&](const std::string& name) {
    for (const auto& [n, t] : loaded.tensors) {
      if (n == name) return t;
    }
    return at::Tensor();
  };
  EXPECT_TRUE(same(find("state.1.step"), at::scalar_tensor(int64_t{0}, at::kLong)));
  EXPECT_TRUE(same(find("state.1.sum"), at::full({8}, 0.25)));
  EXPECT_TRUE(same(find("state.0.step"), at::scalar_tensor(int64_t{1}, at::kLong)));
  train_step(model, other);  // LibTorch's Adagrad needs state for every parameter
}

// ------------------------------------------------------------------ errors

class OptimizerStateErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = make_model();
    source_ = std::make_unique<optim::Adam>(param_groups(model_, true), optim::AdamOptions(0.01));
    for (int i = 0; i < 3; ++i) train_step(model_, *source_);
    saved_ = snapshot(*source_);
    target_model_ = copy_of(model_);
    target_ =
        std::make_unique<optim::Adam>(param_groups(target_model_, true), optim::AdamOptions(0.3));
    train_step(target_model_, *target_);  // has state of its own, which a failure must keep
  }

  // Loads `state` into `optimizer`, expects an error containing `text` and no change at all.
  void expect_refused(optim::Optimizer& optimizer, const OptimizerStateDict& state,
                      const std::string& text) {
    SCOPED_TRACE(text);
    const auto before = snapshot(optimizer);
    EXPECT_ERROR_CONTAINS(load_optimizer_state_dict(optimizer, state), text);
    expect_same_state(snapshot(optimizer), before);
  }
  void expect_refused(const OptimizerStateDict& state, const std::string& text) {
    expect_refused(*target_, state, text);
  }

  OptimizerStateDict with_groups(const std::string& json) const {
    auto state = saved_;
    state.metadata["param_groups"] = json;
    return state;
  }
  OptimizerStateDict renamed(const std::string& from, const std::string& to) const {
    auto state = saved_;
    for (auto& item : state.tensors) {
      if (item.first == from) item.first = to;
    }
    return state;
  }
  OptimizerStateDict replaced(const std::string& name, const at::Tensor& tensor) const {
    auto state = saved_;
    for (auto& item : state.tensors) {
      if (item.first == name) item.second = tensor;
    }
    return state;
  }

  torch::nn::Sequential model_{nullptr};
  torch::nn::Sequential target_model_{nullptr};
  std::unique_ptr<optim::Adam> source_;
  std::unique_ptr<optim::Adam> target_;
  OptimizerStateDict saved_;
};

TEST_F(OptimizerStateErrors, FormatMissingOrUnknown) {
  auto state = saved_;
  state.metadata.erase("format");
  expect_refused(state, "no \"format\" metadata entry");
  state.metadata["format"] = "pt";
  expect_refused(state, "unknown optimizer state format \"pt\"");
  state = saved_;
  state.metadata.erase("optimizer");
  expect_refused(state, "no \"optimizer\" metadata entry");
  state.metadata["optimizer"] = "Lion";
  expect_refused(state, "unknown optimizer \"Lion\"");
}

TEST_F(OptimizerStateErrors, OptimizerKindDiffers) {
  optim::SGD sgd(target_model_->parameters(), optim::SGDOptions(0.1).momentum(0.9));
  train_step(target_model_, sgd);
  expect_refused(sgd, saved_, "the checkpoint holds Adam state, the optimizer is SGD");

  optim::AdamW adamw(target_model_->parameters());
  expect_refused(adamw, saved_, "the checkpoint holds Adam state, the optimizer is AdamW");

  optim::LBFGS lbfgs(target_model_->parameters());
  expect_refused(lbfgs, saved_,
                 "the checkpoint holds Adam state, the optimizer is torch::optim::LBFGS");
  train_step(target_model_, lbfgs);
  const auto archive = snapshot(lbfgs);
  expect_refused(archive,
                 "the checkpoint holds a LibTorch archive (torch::optim::LBFGS), the "
                 "optimizer is Adam");

  auto corrupt = archive;
  corrupt.tensors[0].second = at::full({64}, 7, at::kByte);
  optim::LBFGS other_lbfgs(target_model_->parameters());
  train_step(target_model_, other_lbfgs);
  expect_refused(other_lbfgs, corrupt, "cannot read the LibTorch archive");
  auto extra = archive;
  extra.tensors.emplace_back("state.0.step", at::scalar_tensor(int64_t{1}, at::kLong));
  expect_refused(other_lbfgs, extra, "must hold exactly one tensor, \"archive\"");
}

TEST_F(OptimizerStateErrors, GroupCountDiffers) {
  optim::Adam one_group(param_groups(target_model_, false), optim::AdamOptions(0.3));
  train_step(target_model_, one_group);
  expect_refused(one_group, saved_, "the checkpoint holds 2 param groups, the optimizer has 1");
}

TEST_F(OptimizerStateErrors, ParamsPerGroupDiffer) {
  auto params = target_model_->parameters();
  optim::Adam uneven({optim::OptimizerParamGroup({params[0], params[1], params[2]}),
                      optim::OptimizerParamGroup({params[3]})},
                     optim::AdamOptions(0.3));
  train_step(target_model_, uneven);
  expect_refused(uneven, saved_,
                 "param group 0 holds 2 parameters in the checkpoint, 3 in the optimizer");
}

TEST_F(OptimizerStateErrors, StateShapeDiffers) {
  // The last parameter, so that the others have been read when the mismatch is found.
  expect_refused(replaced("state.3.exp_avg", at::zeros({5})),
                 "state.3.exp_avg has shape [5] but parameter 3 has shape [3]");
  expect_refused(replaced("state.2.exp_avg_sq", at::zeros({8, 3})),
                 "state.2.exp_avg_sq has shape [8, 3] but parameter 2 has shape [3, 8]");
}

TEST_F(OptimizerStateErrors, UnknownKeyOrIndex) {
  auto state = saved_;
  state.tensors.emplace_back("state.0.momentum_buffer", at::zeros({8, 4}));
  expect_refused(state, "state.0.momentum_buffer has an unknown key \"momentum_buffer\" for Adam");
  expect_refused(renamed("state.3.exp_avg", "state.4.exp_avg"),
                 "state.4.exp_avg is for parameter 4, which param_groups does not list");
  state = saved_;
  state.tensors.push_back(state.tensors.front());
  expect_refused(state, "holds state.0.step twice");
}

TEST_F(OptimizerStateErrors, MalformedNames) {
  for (const char* name : {"exp_avg", "state.x.step", "state.0", "state.0.", "state..step",
                           "state.01.step", "state.-1.step", "stat.0.step"}) {
    expect_refused(renamed("state.0.step", name), "malformed optimizer state tensor name");
  }
}

TEST_F(OptimizerStateErrors, MissingStateEntries) {
  auto state = saved_;
  std::erase_if(state.tensors, [](const auto& item) { return item.first == "state.1.exp_avg_sq"; });
  expect_refused(state, "holds Adam state for parameter 1 but no state.1.exp_avg_sq");
  // amsgrad needs max_exp_avg_sq, which an Adam without amsgrad never made.
  const std::string groups = saved_.metadata.at("param_groups");
  std::string amsgrad = groups;
  amsgrad.replace(amsgrad.find("\"amsgrad\":false"), 15, "\"amsgrad\":true");
  expect_refused(with_groups(amsgrad), "but no state.0.max_exp_avg_sq");
}

TEST_F(OptimizerStateErrors, BadStep) {
  expect_refused(replaced("state.0.step", at::ones({2}, at::kLong)),
                 "state.0.step must be a 0-dim tensor, got shape [2]");
  expect_refused(replaced("state.0.step", at::scalar_tensor(-1, at::kLong)),
                 "state.0.step must not be negative");
  expect_refused(replaced("state.0.step", at::scalar_tensor(1.5, at::kDouble)),
                 "state.0.step must hold a whole number");
  expect_refused(replaced("state.0.step", at::scalar_tensor(true, at::kBool)),
                 "state.0.step must be an integer tensor");
}

TEST_F(OptimizerStateErrors, MalformedParamGroups) {
  const std::string group0 =
      R"({"lr":0.01,"betas":[0.9,0.999],"eps":1e-08,"weight_decay":0.0,"amsgrad":false,)";
  const std::string group1 = group0 + R"("params":[2,3]})";
  const auto two = [&](const std::string& first) { return "[" + first + "," + group1 + "]"; };
  // Sanity check: the hand-written form is accepted.
  EXPECT_NO_THROW(
      load_optimizer_state_dict(*target_, with_groups(two(group0 + R"("params":[0,1]})"))));

  expect_refused(with_groups("[{"), "the param_groups metadata is not valid JSON");
  expect_refused(with_groups(R"({"lr":1})"), "the param_groups metadata must be a JSON array");
  expect_refused(with_groups("[1," + group1 + "]"), "param_groups[0] must be a JSON object");
  expect_refused(
      with_groups(two(R"({"lr":"fast","betas":[0.9,0.999],"eps":1e-08,"weight_decay":0.0,)"
                      R"("amsgrad":false,"params":[0,1]})")),
      "param_groups[0].lr must be a number, got \"fast\"");
  expect_refused(with_groups(two(R"({"lr":0.1,"betas":[0.9],"eps":1e-08,"weight_decay":0.0,)"
                                 R"("amsgrad":false,"params":[0,1]})")),
                 "param_groups[0].betas must be an array of two numbers, got [0.9]");
  expect_refused(with_groups(two(R"({"lr":0.1,"betas":[0.9,0.999],"eps":1e-08,"weight_decay":0.0,)"
                                 R"("amsgrad":1,"params":[0,1]})")),
                 "param_groups[0].amsgrad must be true or false, got 1");
  expect_refused(with_groups(two(R"({"betas":[0.9,0.999],"eps":1e-08,"weight_decay":0.0,)"
                                 R"("amsgrad":false,"params":[0,1]})")),
                 "param_groups[0] has no \"lr\"");
  expect_refused(with_groups(two(group0 + R"("maximize":true,"params":[0,1]})")),
                 "param_groups[0] has an unknown field \"maximize\" for Adam");
  expect_refused(with_groups(two(group0.substr(0, group0.size() - 1) + "}")),
                 "param_groups[0] has no \"params\"");
  expect_refused(with_groups(two(group0 + R"("params":"0,1"})")),
                 "param_groups[0].params must be an array of parameter indices");
  expect_refused(with_groups(two(group0 + R"("params":[0,-1]})")),
                 "param_groups[0].params[1] must be a non-negative integer, got -1");
  expect_refused(with_groups(two(group0 + R"("params":[0,1.5]})")),
                 "param_groups[0].params[1] must be a non-negative integer, got 1.5");
  expect_refused(with_groups(two(group0 + R"("params":[0,3]})")),
                 "parameter index 3 appears twice in param_groups");
  expect_refused(with_groups(two(group0 + R"("params":[0]})")),
                 "param group 0 holds 1 parameters in the checkpoint, 2 in the optimizer");
  auto state = saved_;
  state.metadata.erase("param_groups");
  expect_refused(state, "no \"param_groups\" metadata entry");
}

TEST_F(OptimizerStateErrors, MissingFile) {
  const auto before = snapshot(*target_);
  EXPECT_ANY_THROW(load_optimizer_state(*target_, "/nonexistent/optimizer.safetensors"));
  expect_same_state(snapshot(*target_), before);
}

}  // namespace
