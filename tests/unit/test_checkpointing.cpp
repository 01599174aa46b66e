// save_model / load_checkpoint_in_model: Hugging Face's names and layout, sharding, tied
// weights, and what loading reports.

#include <accelerate/checkpointing.h>
#include <accelerate/safetensors.h>

#include <gtest/gtest.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <nlohmann/json.hpp>

#include "expect_error.h"

#include <filesystem>
#include <fstream>

namespace {

namespace fs = std::filesystem;
using accelerate::load_checkpoint_in_model;
using accelerate::save_model;

fs::path fresh_dir(const std::string& name) {
  auto dir =
      fs::temp_directory_path() / ("accelerate_ckpt_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

torch::nn::Sequential net(uint64_t seed) {
  torch::manual_seed(seed);
  return torch::nn::Sequential(torch::nn::Linear(16, 16), torch::nn::BatchNorm1d(16),
                               torch::nn::Linear(16, 4));
}

void expect_same_weights(const torch::nn::Module& a, const torch::nn::Module& b) {
  auto pa = a.named_parameters();
  auto pb = b.named_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (const auto& item : pa) EXPECT_TRUE(at::equal(item.value(), pb[item.key()])) << item.key();
  auto ba = a.named_buffers();
  auto bb = b.named_buffers();
  for (const auto& item : ba) EXPECT_TRUE(at::equal(item.value(), bb[item.key()])) << item.key();
}

TEST(Checkpointing, FileSizesFollowHuggingFace) {
  EXPECT_EQ(accelerate::parse_file_size("10GB"), 10'000'000'000);
  EXPECT_EQ(accelerate::parse_file_size("5MiB"), 5 * 1024 * 1024);
  EXPECT_EQ(accelerate::parse_file_size("1.5KB"), 1500);
  EXPECT_EQ(accelerate::parse_file_size("1000"), 1000);
  EXPECT_ERROR_CONTAINS(accelerate::parse_file_size("big"), "cannot read the file size \"big\"");
  EXPECT_ERROR_CONTAINS(accelerate::parse_file_size("5XB"), "unknown unit \"XB\"");
}

TEST(Checkpointing, ShardPlanStartsANewShardWhenTheNextTensorDoesNotFit) {
  // 400, 400, 400 and 1000 bytes with a 900-byte limit: [a b] [c] [d].
  std::vector<std::pair<std::string, at::Tensor>> t{{"a", at::zeros({100})},
                                                    {"b", at::zeros({100})},
                                                    {"c", at::zeros({100})},
                                                    {"d", at::zeros({250})}};
  auto plan = accelerate::shard_checkpoint(t, 900);
  ASSERT_EQ(plan.shards.size(), 3u);
  EXPECT_EQ(plan.shards[0].first, "model-00001-of-00003.safetensors");
  EXPECT_EQ(plan.shards[0].second, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(plan.shards[1].second, (std::vector<std::string>{"c"}));
  EXPECT_EQ(plan.shards[2].first, "model-00003-of-00003.safetensors");
  EXPECT_EQ(plan.shards[2].second, (std::vector<std::string>{"d"}));
  EXPECT_EQ(plan.total_size, 2200);
  auto one = accelerate::shard_checkpoint(t, 1 << 20);
  ASSERT_EQ(one.shards.size(), 1u);
  EXPECT_EQ(one.shards[0].first, "model.safetensors");
}

TEST(Checkpointing, OneFileRoundTrip) {
  auto dir = fresh_dir("one");
  auto a = net(1);
  a->forward(at::randn({8, 16}));  // batch-norm statistics move
  auto files = save_model(*a, dir.string());
  ASSERT_EQ(files.size(), 1u);
  EXPECT_EQ(fs::path(files[0]).filename(), "model.safetensors");
  EXPECT_FALSE(fs::exists(dir / "model.safetensors.index.json"));
  auto file = accelerate::safetensors::load_file(files[0]);
  EXPECT_EQ(file.metadata.at("format"), "pt");
  EXPECT_TRUE(file.contains("0.weight"));
  EXPECT_TRUE(file.contains("1.running_mean"));

  auto b = net(2);
  auto report = load_checkpoint_in_model(*b, dir.string());
  EXPECT_TRUE(report.missing_keys.empty());
  EXPECT_TRUE(report.unexpected_keys.empty());
  expect_same_weights(*a, *b);
  fs::remove_all(dir);
}

TEST(Checkpointing, ShardedRoundTripWithIndex) {
  auto dir = fresh_dir("sharded");
  auto a = net(3);
  // 0.weight is 1024 bytes: a 1200-byte limit gives several shards.
  auto files = save_model(*a, dir.string(), {.max_shard_size = "1200"});
  ASSERT_GT(files.size(), 2u);
  std::ifstream in(dir / "model.safetensors.index.json");
  nlohmann::json index;
  in >> index;
  int64_t total = 0;
  for (const auto& item : a->named_parameters()) total += item.value().numel() * 4;
  for (const auto& item : a->named_buffers()) {
    total += item.value().numel() * static_cast<int64_t>(item.value().element_size());
  }
  EXPECT_EQ(index["metadata"]["total_size"].get<int64_t>(), total);
  const auto shards = files.size() - 1;
  char last[64];
  std::snprintf(last, sizeof(last), "model-%05zu-of-%05zu.safetensors", shards, shards);
  EXPECT_TRUE(fs::exists(dir / last)) << last;
  EXPECT_EQ(index["weight_map"]["0.weight"], "model-00001-of-" + std::string(last).substr(15));
  EXPECT_FALSE(fs::exists(dir / "model.safetensors"));

  auto b = net(4);
  auto report = load_checkpoint_in_model(*b, dir.string());
  EXPECT_TRUE(report.missing_keys.empty());
  expect_same_weights(*a, *b);
  // Loading through the index file itself works too.
  auto c = net(5);
  load_checkpoint_in_model(*c, (dir / "model.safetensors.index.json").string());
  expect_same_weights(*a, *c);

  // Saving again unsharded removes the stale shards and the index.
  save_model(*a, dir.string());
  EXPECT_FALSE(fs::exists(dir / "model.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(dir / last));
  EXPECT_TRUE(fs::exists(dir / "model.safetensors"));
  fs::remove_all(dir);
}

struct TiedImpl : torch::nn::Module {
  at::Tensor embed, out;
  TiedImpl() {
    embed = register_parameter("embed_weight", torch::randn({5, 3}));
    out = register_parameter("head_weight", embed);  // the same tensor: tied
  }
};

TEST(Checkpointing, TiedWeightsAreStoredOnceAndStayTied) {
  auto dir = fresh_dir("tied");
  auto a = std::make_shared<TiedImpl>();
  save_model(*a, dir.string());
  auto file = accelerate::safetensors::load_file((dir / "model.safetensors").string());
  EXPECT_EQ(file.names(), (std::vector<std::string>{"embed_weight"}));
  auto b = std::make_shared<TiedImpl>();
  auto report = load_checkpoint_in_model(*b, dir.string());
  EXPECT_TRUE(report.missing_keys.empty());
  EXPECT_TRUE(at::equal(b->embed, a->embed));
  EXPECT_EQ(b->embed.data_ptr(), b->out.data_ptr());
  fs::remove_all(dir);
}

TEST(Checkpointing, MismatchesAreReportedByName) {
  auto dir = fresh_dir("mismatch");
  accelerate::safetensors::save_file({{"0.weight", at::zeros({16, 16})}, {"extra", at::zeros({2})}},
                                     (dir / "model.safetensors").string());
  auto model = net(6);
  auto report = load_checkpoint_in_model(*model, dir.string());
  EXPECT_EQ(report.unexpected_keys, (std::vector<std::string>{"extra"}));
  EXPECT_NE(std::find(report.missing_keys.begin(), report.missing_keys.end(), "2.bias"),
            report.missing_keys.end());
  EXPECT_TRUE(at::equal(model[0]->as<torch::nn::Linear>()->weight, at::zeros({16, 16})));
  EXPECT_ERROR_CONTAINS(load_checkpoint_in_model(*model, dir.string(), {.strict = true}),
                        "unexpected: [extra]");

  accelerate::safetensors::save_file({{"0.weight", at::zeros({4, 4})}},
                                     (dir / "model.safetensors").string());
  EXPECT_ERROR_CONTAINS(load_checkpoint_in_model(*model, dir.string()),
                        "'0.weight' has shape [4, 4]");
  EXPECT_ERROR_CONTAINS(load_checkpoint_in_model(*model, (dir / "nothing").string()),
                        "no checkpoint at");
  EXPECT_ERROR_CONTAINS(save_model(*model, dir.string(), {.safe_serialization = false}),
                        "safetensors only");
  fs::remove_all(dir);
}

}  // namespace
