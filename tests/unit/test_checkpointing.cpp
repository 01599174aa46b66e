// save_model / load_checkpoint_in_model: Hugging Face's names and layout, sharding, tied
// weights, and what loading reports.

#include <accelerate/checkpointing.h>
#include <accelerate/safetensors.h>

#include <gtest/gtest.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <nlohmann/json.hpp>

#include "../../src/detail/checksum.h"
#include "expect_error.h"

#include <filesystem>
#include <fstream>
#include <string>

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

// Flips the bits of the byte `from_end` bytes before the end (in the data buffer).
void flip_byte(const fs::path& file, int64_t from_end = 1) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(-from_end, std::ios::end);
  char c = 0;
  f.get(c);
  f.seekp(-from_end, std::ios::end);
  f.put(static_cast<char>(~c));
}

std::string hex_of_file(const fs::path& file, uint64_t offset = 0) {
  return accelerate::detail::crc32c_hex(accelerate::detail::crc32c_of_file(file.string(), offset));
}

TEST(Checkpointing, Crc32cIsTheCastagnoliChecksum) {
  const std::string text = "123456789";  // the standard check input
  EXPECT_EQ(accelerate::detail::crc32c(0, text.data(), text.size()), 0xE3069283u);
  EXPECT_EQ(accelerate::detail::crc32c_portable(0, text.data(), text.size()), 0xE3069283u);
  // Pieces, odd lengths and alignments agree with one pass, in both implementations.
  std::string bytes(1000, '\0');
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<char>(i * 131 + 7);
  const uint32_t whole = accelerate::detail::crc32c_portable(0, bytes.data(), bytes.size());
  for (size_t cut : {0, 1, 3, 8, 13, 999}) {
    const uint32_t head = accelerate::detail::crc32c(0, bytes.data(), cut);
    EXPECT_EQ(accelerate::detail::crc32c(head, bytes.data() + cut, bytes.size() - cut), whole);
  }
  // Long enough for the interleaved streams (blocks of 3 x 8 KiB), from odd starts.
  std::string big(3 * 3 * 8192 + 4321, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>((i * 2654435761u) >> 11);
  for (size_t start : {0, 1, 5}) {
    EXPECT_EQ(accelerate::detail::crc32c(0, big.data() + start, big.size() - start),
              accelerate::detail::crc32c_portable(0, big.data() + start, big.size() - start))
        << start;
  }
  uint32_t parsed = 0;
  EXPECT_TRUE(accelerate::detail::parse_crc32c_hex("e3069283", &parsed));
  EXPECT_EQ(parsed, 0xE3069283u);
  EXPECT_FALSE(accelerate::detail::parse_crc32c_hex("E3069283", &parsed));
  EXPECT_FALSE(accelerate::detail::parse_crc32c_hex("e306928", &parsed));
}

TEST(Checkpointing, OneFileRecordsItsDataChecksumAndRefusesACorruptedFile) {
  auto dir = fresh_dir("crc_one");
  auto a = net(7);
  save_model(*a, dir.string());
  const auto file = dir / "model.safetensors";
  const auto header = accelerate::safetensors::read_header(file.string());
  const std::string recorded = header.metadata.at("accelerate_crc32c");
  EXPECT_EQ(recorded, hex_of_file(file, header.data_start));
  EXPECT_EQ(header.metadata.at("format"), "pt");

  flip_byte(file);
  auto b = net(8);
  EXPECT_EQ(accelerate::testing::error_of([&] { load_checkpoint_in_model(*b, dir.string()); }),
            "accelerate: " + file.string() + " is corrupted: the CRC32C of its data is " +
                hex_of_file(file, header.data_start) + ", its header recorded " + recorded +
                " (verify=false loads it anyway)");
  expect_same_weights(*net(8), *b);  // nothing was loaded
  load_checkpoint_in_model(*b, dir.string(), {.verify = false});
  // Loaded, flipped byte included: exactly one value differs from the saved model.
  int64_t differing = 0;
  auto sa = a->named_parameters();
  for (const auto& item : b->named_parameters()) {
    differing += item.value().ne(sa[item.key()]).sum().item<int64_t>();
  }
  auto ba = a->named_buffers();
  for (const auto& item : b->named_buffers()) {
    differing += item.value().ne(ba[item.key()]).sum().item<int64_t>();
  }
  EXPECT_EQ(differing, 1);
  fs::remove_all(dir);
}

TEST(Checkpointing, ShardedIndexRecordsShardChecksumsAndRefusesACorruptedShard) {
  auto dir = fresh_dir("crc_sharded");
  auto a = net(9);
  auto files = save_model(*a, dir.string(), {.max_shard_size = "1200"});
  ASSERT_GT(files.size(), 2u);
  nlohmann::json index;
  std::ifstream(dir / "model.safetensors.index.json") >> index;
  const auto& sums = index["metadata"]["accelerate_crc32c"];
  ASSERT_EQ(sums.size(), files.size() - 1);
  for (size_t k = 0; k + 1 < files.size(); ++k) {
    EXPECT_EQ(sums[fs::path(files[k]).filename().string()], hex_of_file(files[k]));
  }
  const fs::path second = files[1];
  const std::string recorded = sums[second.filename().string()];
  flip_byte(second);
  auto b = net(10);
  const std::string expected = "accelerate: " + second.string() + " is corrupted: its CRC32C is " +
                               hex_of_file(second) + ", model.safetensors.index.json recorded " +
                               recorded + " (verify=false loads it anyway)";
  EXPECT_EQ(accelerate::testing::error_of([&] { load_checkpoint_in_model(*b, dir.string()); }),
            expected);
  EXPECT_EQ(accelerate::testing::error_of([&] {
              load_checkpoint_in_model(*b, (dir / "model.safetensors.index.json").string());
            }),
            expected);
  expect_same_weights(*net(10), *b);  // refused before anything was loaded
  const auto report = load_checkpoint_in_model(*b, dir.string(), {.verify = false});
  EXPECT_TRUE(report.missing_keys.empty());
  fs::remove_all(dir);
}

TEST(Checkpointing, FilesWithoutChecksumsStillLoad) {
  auto dir = fresh_dir("crc_none");
  auto a = net(11);
  // What another writer leaves: no checksum in the header, none in the index.
  std::vector<std::pair<std::string, at::Tensor>> first, rest;
  for (const auto& item : a->named_parameters()) {
    (first.empty() ? first : rest).emplace_back(item.key(), item.value().detach());
  }
  for (const auto& item : a->named_buffers()) rest.emplace_back(item.key(), item.value());
  accelerate::safetensors::save_file(first, (dir / "a.safetensors").string());
  accelerate::safetensors::save_file(rest, (dir / "b.safetensors").string());
  nlohmann::json index;
  index["metadata"] = {{"total_size", 0}};
  for (const auto& [name, t] : first) index["weight_map"][name] = "a.safetensors";
  for (const auto& [name, t] : rest) index["weight_map"][name] = "b.safetensors";
  std::ofstream(dir / "model.safetensors.index.json") << index.dump();
  auto b = net(12);
  EXPECT_TRUE(load_checkpoint_in_model(*b, dir.string(), {.strict = true}).missing_keys.empty());
  expect_same_weights(*a, *b);
  auto c = net(13);
  load_checkpoint_in_model(*c, (dir / "a.safetensors").string());
  EXPECT_TRUE(
      at::equal(c[0]->as<torch::nn::Linear>()->weight, a[0]->as<torch::nn::Linear>()->weight));
  fs::remove_all(dir);
}

TEST(Checkpointing, PickleCheckpointsAreRefusedWithAClearMessage) {
  auto dir = fresh_dir("pickle");
  // The start of a torch.save zip archive: read as safetensors it is a header length error.
  std::ofstream(dir / "pytorch_model.bin", std::ios::binary)
      << std::string("PK\x03\x04\x00\x00", 6);
  auto model = net(14);
  auto message = [](const fs::path& p) {
    return "accelerate: " + p.string() +
           ": pickle checkpoints are not supported; convert to safetensors";
  };
  EXPECT_EQ(accelerate::testing::error_of([&] { load_checkpoint_in_model(*model, dir.string()); }),
            message(dir / "pytorch_model.bin"));
  EXPECT_EQ(accelerate::testing::error_of(
                [&] { load_checkpoint_in_model(*model, (dir / "pytorch_model.bin").string()); }),
            message(dir / "pytorch_model.bin"));
  std::ofstream(dir / "pytorch_model.bin.index.json")
      << R"({"metadata": {}, "weight_map": {"0.weight": "pytorch_model-00001-of-00001.bin"}})";
  EXPECT_EQ(accelerate::testing::error_of([&] { load_checkpoint_in_model(*model, dir.string()); }),
            message(dir / "pytorch_model.bin.index.json"));
  EXPECT_EQ(accelerate::testing::error_of([&] {
              load_checkpoint_in_model(*model, (dir / "pytorch_model.bin.index.json").string());
            }),
            message(dir / "pytorch_model.bin.index.json"));
  fs::remove_all(dir);
}

}  // namespace
