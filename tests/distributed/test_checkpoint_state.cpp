// save_state / load_state and save() with several ranks as threads: who writes what, and a
// failure on one rank failing every rank instead of leaving the others waiting.

#include <accelerate/accelerator.h>
#include <accelerate/checkpoint_state.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>
#include "../../src/detail/checksum.h"
#include "expect_error.h"
#include "launch_util.h"
#include "thread_ranks.h"

#include <atomic>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace data = accelerate::data;
using accelerate::Accelerator;
using accelerate::AcceleratorOptions;
using accelerate::PartialState;
using accelerate::testing::RankOptions;
using accelerate::testing::run_ranks;
using accelerate::testing::run_ranks_collect;
using accelerate::testing::TempDir;

AcceleratorOptions on(PartialState& s, accelerate::ProjectConfiguration project = {}) {
  return {.project_config = project,
          .state = s.shared_from_this(),
          .gradient_state = std::make_shared<data::GradientState>()};
}

TEST(CheckpointStateRanks, SaveWritesOncePerMachineOrOncePerNode) {
  TempDir tmp;
  std::vector<int> wrote(4, -1);
  run_ranks(4, [&](PartialState& s) {
    Accelerator accelerator(on(s));
    const auto path = tmp.path() / ("all_" + std::to_string(s.process_index()) + ".safetensors");
    wrote[static_cast<size_t>(s.process_index())] =
        accelerator.save({{"x", at::ones({1})}}, path.string());
  });
  EXPECT_EQ(wrote, (std::vector<int>{1, 0, 0, 0}));

  accelerate::ProjectConfiguration each_node;
  each_node.save_on_each_node = true;
  run_ranks(
      4,
      [&](PartialState& s) {
        Accelerator accelerator(on(s, each_node));
        const auto path = tmp.path() / ("node_" + std::to_string(s.process_index()) + ".pt");
        wrote[static_cast<size_t>(s.process_index())] =
            accelerator.save(at::ones({1}), path.string());
      },
      RankOptions{.per_node = 2});
  EXPECT_EQ(wrote, (std::vector<int>{1, 0, 1, 0}));
  EXPECT_TRUE(fs::exists(tmp.path() / "all_0.safetensors"));
  EXPECT_FALSE(fs::exists(tmp.path() / "all_1.safetensors"));
  EXPECT_TRUE(fs::exists(tmp.path() / "node_2.pt"));
}

TEST(CheckpointStateRanks, EveryRankWritesItsOwnStateAndLoadsIt) {
  TempDir tmp;
  const auto dir = (tmp.path() / "ckpt").string();
  run_ranks(2, [&](PartialState& s) {
    Accelerator accelerator(on(s));
    torch::nn::Linear linear(3, 2);
    torch::optim::SGD sgd(linear->parameters(), torch::optim::SGDOptions(0.1));
    auto [model, optimizer] = accelerator.prepare(linear, sgd);
    accelerator.save_state(dir);
    const auto saved = linear->weight.detach().clone();
    {
      torch::NoGradGuard no_grad;
      linear->weight.fill_(3);  // every rank, after the save
    }
    accelerator.load_state(dir);
    EXPECT_TRUE(at::equal(linear->weight.detach(), saved));
  });
  std::set<std::string> files;
  for (const auto& e : fs::directory_iterator(dir)) files.insert(e.path().filename().string());
  EXPECT_EQ(files, (std::set<std::string>{"model.safetensors", "optimizer.safetensors",
                                          "random_states_0.safetensors",
                                          "random_states_1.safetensors", "accelerate_state.json"}));
  EXPECT_EQ(accelerate::read_checkpoint_info(dir).world_size, 2);
}

TEST(CheckpointStateRanks, AFailureOnOneRankFailsEveryRankInsteadOfHanging) {
  TempDir tmp;
  const auto dir = tmp.path() / "ckpt";
  run_ranks(2, [&](PartialState& s) {
    Accelerator accelerator(on(s));
    accelerator.save_state(dir.string());
  });
  // Only process 1 can notice: its own file is gone and the marker no longer lists it.
  fs::remove(dir / "random_states_1.safetensors");
  const auto marker = dir / accelerate::kCheckpointMarkerName;
  auto j = nlohmann::ordered_json::parse(accelerate::testing::read_text_file(marker));
  j["files"].erase("random_states_1.safetensors");
  j["crc32c"].erase("random_states_1.safetensors");
  std::ofstream(marker, std::ios::trunc) << j.dump();

  auto errors = run_ranks_collect(2, [&](PartialState& s) {
    Accelerator accelerator(on(s));
    accelerator.load_state(dir.string());
  });
  for (const auto& error : errors) {
    const auto text = accelerate::testing::message(error);
    EXPECT_NE(text.find("load_state failed"), std::string::npos) << text;
    EXPECT_NE(text.find("process 1: accelerate: load_state: "), std::string::npos) << text;
    EXPECT_NE(text.find("random_states_1.safetensors\" is missing"), std::string::npos) << text;
    EXPECT_EQ(text.find("process 0:"), std::string::npos) << text;
  }
}

// A file written by process 1 (its generator and loader state) with a flipped byte: every
// process checks every file, so every one refuses it, naming it.
TEST(CheckpointStateRanks, ACorruptedFileOfAnotherRankIsRefusedEverywhere) {
  TempDir tmp;
  const auto dir = tmp.path() / "ckpt";
  run_ranks(2, [&](PartialState& s) {
    Accelerator accelerator(on(s));
    accelerator.save_state(dir.string());
  });
  const auto file = dir / "random_states_1.safetensors";
  const auto marker = nlohmann::json::parse(
      accelerate::testing::read_text_file(dir / accelerate::kCheckpointMarkerName));
  const std::string recorded = marker["crc32c"]["random_states_1.safetensors"];
  {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-1, std::ios::end);
    f.put('\x7f');
  }
  const std::string actual =
      accelerate::detail::crc32c_hex(accelerate::detail::crc32c_of_file(file.string()));
  ASSERT_NE(actual, recorded);
  const std::string one = "accelerate: load_state: \"" + file.string() +
                          "\" is corrupted: its CRC32C is " + actual +
                          ", the checkpoint recorded " + recorded;
  auto errors = run_ranks_collect(2, [&](PartialState& s) {
    Accelerator accelerator(on(s));
    accelerator.load_state(dir.string());
  });
  ASSERT_EQ(errors.size(), 2u);
  for (const auto& error : errors) {
    const auto text = accelerate::testing::message(error);
    EXPECT_EQ(text.substr(0, text.find("\nException raised from")),
              "accelerate: load_state failed\nprocess 0: " + one + "\nprocess 1: " + one);
  }
}

}  // namespace
