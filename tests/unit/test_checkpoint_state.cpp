// save_state / load_state in one process: the layout, resuming bit for bit, automatic naming with
// total_limit, hooks, custom objects, and every refusal.

#include <accelerate/accelerator.h>
#include <accelerate/checkpoint_state.h>
#include <accelerate/optimizer_state.h>
#include <accelerate/safetensors.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <torch/nn/modules/linear.h>
#include <torch/optim/adam.h>
#include <torch/optim/sgd.h>
#include "../../src/detail/checksum.h"
#include "expect_error.h"
#include "launch_util.h"
#include "resume_training.h"

#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace data = accelerate::data;
using accelerate::Accelerator;
using accelerate::AcceleratorOptions;
using accelerate::EnvMap;
using accelerate::testing::error_of;
using accelerate::testing::same;
using accelerate::testing::TempDir;

AcceleratorOptions single(AcceleratorOptions o = {}) {
  o.state = accelerate::PartialState::from_environment({}, EnvMap{});
  o.gradient_state = std::make_shared<data::GradientState>();
  return o;
}

AcceleratorOptions automatic(const fs::path& project, std::optional<int64_t> total_limit = {}) {
  accelerate::ProjectConfiguration config;
  config.project_dir = project.string();
  config.automatic_checkpoint_naming = true;
  config.total_limit = total_limit;
  return single({.project_config = config});
}

std::set<std::string> files_in(const fs::path& dir) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.insert(e.path().filename().string());
  return out;
}

void expect_same_state(const accelerate::NamedTensors& a, const accelerate::NamedTensors& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].first, b[i].first);
    EXPECT_TRUE(same(a[i].second, b[i].second)) << a[i].first;
  }
}

// A model, an SGD optimizer with momentum (state after one step), and a loader, prepared.
struct Small {
  Accelerator accelerator;
  torch::nn::Linear linear{nullptr};
  std::shared_ptr<torch::optim::SGD> sgd;
  data::DataLoader<torch::data::Example<>> loader;

  explicit Small(AcceleratorOptions options, float fill = 1.0f)
      : accelerator(std::move(options)),
        loader(accelerate::testing::ResumeRows{}, data::DataLoaderOptions{.batch_size = 4}) {
    linear = torch::nn::Linear(4, 2);
    {
      torch::NoGradGuard no_grad;
      linear->weight.fill_(fill);
      linear->bias.fill_(-fill);
    }
    sgd = std::make_shared<torch::optim::SGD>(linear->parameters(),
                                              torch::optim::SGDOptions(0.1).momentum(0.9));
    auto prepared = accelerator.prepare(linear, sgd, loader);
    loader = std::get<2>(prepared);
    linear->weight.mutable_grad() = at::ones({2, 4});
    linear->bias.mutable_grad() = at::ones({2});
    sgd->step();
  }
};

TEST(CheckpointState, FileNamesFollowAccelerate) {
  EXPECT_EQ(accelerate::indexed_file_name("model", 0, ".safetensors"), "model.safetensors");
  EXPECT_EQ(accelerate::indexed_file_name("model", 1, ".safetensors"), "model_1.safetensors");
  EXPECT_EQ(accelerate::indexed_file_name("scheduler", 12, ".json"), "scheduler_12.json");
}

TEST(CheckpointState, LayoutAndMarker) {
  TempDir tmp;
  const auto dir = tmp.path() / "ckpt";
  Accelerator accelerator(single());
  torch::manual_seed(0);
  torch::nn::Linear a(3, 2), b(2, 1);
  auto adam = std::make_shared<torch::optim::Adam>(a->parameters(), torch::optim::AdamOptions(0.1));
  std::shared_ptr<accelerate::LRScheduler> schedule =
      accelerate::get_linear_schedule_with_warmup(*adam, 2, 10);
  data::DataLoader loader(accelerate::testing::ResumeRows{},
                          data::DataLoaderOptions{.batch_size = 4, .shuffle = true});
  auto [pa, pb, opt, sched, dl] = accelerator.prepare(a, b, adam, schedule, loader);
  auto progress = std::make_shared<accelerate::testing::Progress>();
  progress->steps = 7;
  accelerator.register_for_checkpointing(progress);

  int batches = 0;
  for (auto& batch : dl) {
    (void)batch;
    if (++batches == 3) break;
  }
  // Leaving the loop early ended that iteration without completing the epoch (Accelerate counts
  // an epoch only when the loader runs out); take the position inside a second one.
  for (auto& batch : dl) {
    (void)batch;
    EXPECT_EQ(accelerator.save_state(dir.string()), dir.string());
    break;
  }

  EXPECT_EQ(files_in(dir), (std::set<std::string>{
                               "model.safetensors", "model_1.safetensors", "optimizer.safetensors",
                               "scheduler.json", "custom_checkpoint_0.safetensors",
                               "random_states_0.safetensors", "accelerate_state.json"}));
  EXPECT_FALSE(fs::exists(tmp.path() / ".ckpt.partial"));

  auto marker = nlohmann::json::parse(
      accelerate::testing::read_text_file(dir / accelerate::kCheckpointMarkerName));
  EXPECT_EQ(marker["format"], "accelerate-cpp checkpoint");
  EXPECT_EQ(marker["format_version"], 1);
  EXPECT_EQ(marker["library_version"], accelerate::library_version());
  EXPECT_EQ(marker["world_size"], 1);
  EXPECT_EQ(marker["num_models"], 2);
  EXPECT_EQ(marker["num_optimizers"], 1);
  EXPECT_EQ(marker["num_schedulers"], 1);
  EXPECT_EQ(marker["num_data_loaders"], 1);
  EXPECT_EQ(marker["num_custom_objects"], 1);
  EXPECT_EQ(marker["scaler"], false);
  EXPECT_EQ(marker["files"].size(), 6u);
  EXPECT_EQ(marker["files"]["model.safetensors"].get<int64_t>(),
            static_cast<int64_t>(fs::file_size(dir / "model.safetensors")));

  auto weights = accelerate::safetensors::load_file((dir / "model.safetensors").string());
  EXPECT_EQ(weights.names(), (std::vector<std::string>{"weight", "bias"}));
  EXPECT_TRUE(same(weights.get("weight"), a->weight.detach()));

  auto rank0 = accelerate::safetensors::load_file((dir / "random_states_0.safetensors").string());
  EXPECT_EQ(rank0.metadata.at("dataloader_0.epoch"), "0");
  EXPECT_EQ(rank0.metadata.at("dataloader_0.batches_yielded"), "1");
  EXPECT_EQ(rank0.metadata.at("step"), "0");
  EXPECT_EQ(rank0.get("torch_manual_seed").numel(),
            at::detail::getDefaultCPUGenerator().get_state().numel());
  EXPECT_GT(rank0.get("dataloader_0.sampler_state").numel(), 0);

  auto scheduler =
      nlohmann::json::parse(accelerate::testing::read_text_file(dir / "scheduler.json"));
  EXPECT_EQ(scheduler["last_epoch"], 0);
  EXPECT_EQ(scheduler["base_lrs"], (std::vector<double>{0.1}));

  auto custom =
      accelerate::safetensors::load_file((dir / "custom_checkpoint_0.safetensors").string());
  EXPECT_EQ(custom.get("steps").item<int64_t>(), 7);
}

// The central promise: stop after k steps, resume in a fresh Accelerator, and the result equals
// the uninterrupted run bit for bit (mid-epoch, shuffled, dropout, Adam, warm-up).
TEST(CheckpointState, ResumingReproducesTheUninterruptedRunExactly) {
  TempDir tmp;
  using accelerate::testing::ResumeRun;
  using accelerate::testing::train_resumable;
  const auto straight = train_resumable(ResumeRun{.total_steps = 23}, single());
  for (int64_t k : {3, 10, 13}) {
    const auto dir = (tmp.path() / ("at_" + std::to_string(k))).string();
    train_resumable(ResumeRun{.total_steps = 23, .save_at = k, .directory = dir}, single());
    // Whatever the global generator did meanwhile must not matter.
    torch::manual_seed(999);
    const auto resumed =
        train_resumable(ResumeRun{.total_steps = 23, .directory = dir, .resume = true}, single());
    SCOPED_TRACE("saved after " + std::to_string(k) + " steps");
    expect_same_state(resumed, straight);
  }
  // And the interruption is not a no-op: fewer steps give other weights.
  const auto shorter = train_resumable(ResumeRun{.total_steps = 22}, single());
  EXPECT_FALSE(at::equal(shorter[0].second, straight[0].second));
}

// What `accelerate launch --max_restarts` relies on: a restarted run with automatic naming
// resumes from the latest checkpoint with no resume code in the program.
TEST(CheckpointState, ARestartedRunResumesByItself) {
  TempDir tmp;
  using accelerate::testing::ResumeRun;
  using accelerate::testing::train_resumable;
  const auto straight = train_resumable(ResumeRun{.total_steps = 23}, single());
  const ResumeRun run{
      .total_steps = 23, .directory = tmp.path().string(), .automatic = true, .save_every = 5};
  auto crashed = run;
  crashed.stop_at = 13;  // checkpoints after steps 5 and 10, then "dies"
  train_resumable(crashed, single());
  EXPECT_EQ(accelerate::latest_checkpoint((tmp.path() / "checkpoints").string()),
            (tmp.path() / "checkpoints" / "checkpoint_1").string());
  {
    accelerate::PatchEnvironment restart(
        std::map<std::string, std::string>{{"ACCELERATE_RESTART_COUNT", "1"}});
    torch::manual_seed(999);
    int64_t started = -1;
    auto restarted = run;
    restarted.started_at = &started;
    expect_same_state(train_resumable(restarted, single()), straight);
    EXPECT_EQ(started, 10);
  }
  // Restored objects must all be prepared before training goes on.
  accelerate::PatchEnvironment restart(
      std::map<std::string, std::string>{{"ACCELERATE_RESTART_COUNT", "2"}});
  Accelerator accelerator(automatic(tmp.path()));
  EXPECT_EQ(accelerator.save_iteration(), 4);  // checkpoint_3 is the latest now
  EXPECT_ERROR_CONTAINS(accelerator.save_state(),
                        "holds 1 model(s) but 0 were prepared before training went on");
}

TEST(CheckpointState, RestoresEveryPieceIntoFreshObjects) {
  TempDir tmp;
  const auto dir = (tmp.path() / "ckpt").string();
  {
    Small first(single(), 1.0f);
    first.accelerator.save_state(dir);
  }
  Small second(single(), 5.0f);  // other weights, other momentum
  second.accelerator.load_state(dir);
  EXPECT_TRUE(same(second.linear->weight.detach(), at::full({2, 4}, 1.0f - 0.1f)));
  EXPECT_TRUE(same(second.linear->bias.detach(), at::full({2}, -1.0f - 0.1f)));
  auto saved = accelerate::optimizer_state_dict(*second.sgd);
  bool found = false;
  for (const auto& [name, tensor] : saved.tensors) {
    if (name == "state.0.momentum_buffer") {
      found = true;
      EXPECT_TRUE(same(tensor, at::ones({2, 4})));
    }
  }
  EXPECT_TRUE(found);
}

TEST(CheckpointState, AutomaticNamingCountsAndKeepsTotalLimit) {
  TempDir tmp;
  const auto checkpoints = tmp.path() / "checkpoints";
  {
    Small run(automatic(tmp.path(), 2));
    for (int i = 0; i < 4; ++i) {
      EXPECT_EQ(run.accelerator.save_iteration(), i);
      EXPECT_EQ(run.accelerator.save_state(),
                (checkpoints / ("checkpoint_" + std::to_string(i))).string());
    }
    EXPECT_EQ(run.accelerator.save_iteration(), 4);
    EXPECT_EQ(files_in(checkpoints), (std::set<std::string>{"checkpoint_2", "checkpoint_3"}));
    EXPECT_ERROR_CONTAINS(run.accelerator.save_state((tmp.path() / "x").string()),
                          "call save_state() without one");
    run.accelerator.set_save_iteration(3);
    EXPECT_ERROR_CONTAINS(run.accelerator.save_state(), "already exists");
  }
  // Leftovers of crashed saves and foreign directories are never picked.
  fs::create_directories(checkpoints / "checkpoint_9");
  fs::create_directories(checkpoints / ".checkpoint_8.partial");
  fs::create_directories(checkpoints / "checkpoint_x");
  EXPECT_EQ(accelerate::latest_checkpoint(checkpoints.string()),
            (checkpoints / "checkpoint_3").string());
  Small resumed(automatic(tmp.path(), 2), 3.0f);
  EXPECT_EQ(resumed.accelerator.load_state(), (checkpoints / "checkpoint_3").string());
  EXPECT_EQ(resumed.accelerator.save_iteration(), 4);
  EXPECT_TRUE(same(resumed.linear->bias.detach(), at::full({2}, -1.0f - 0.1f)));
}

TEST(CheckpointState, SavingOverACheckpointReplacesIt) {
  TempDir tmp;
  const auto dir = (tmp.path() / "ckpt").string();
  Small run(single(), 1.0f);
  run.accelerator.save_state(dir);
  {
    torch::NoGradGuard no_grad;
    run.linear->weight.fill_(42);
  }
  run.accelerator.save_state(dir);
  auto weights = accelerate::safetensors::load_file(dir + "/model.safetensors");
  EXPECT_TRUE(same(weights.get("weight"), at::full({2, 4}, 42.0f)));
  EXPECT_EQ(files_in(tmp.path()), std::set<std::string>{"ckpt"});
}

TEST(CheckpointState, HooksSeeTheModelsAndCanBeRemoved) {
  TempDir tmp;
  const auto dir = (tmp.path() / "ckpt").string();
  Small run(single());
  int saves = 0;
  auto handle = run.accelerator.register_save_state_pre_hook(
      [&](std::vector<std::shared_ptr<torch::nn::Module>>& models,
          std::vector<accelerate::NamedTensors>& weights, const std::string& output_dir) {
        ++saves;
        EXPECT_EQ(models.size(), 1u);
        EXPECT_EQ(models[0].get(), run.linear.ptr().get());
        EXPECT_EQ(weights[0].size(), 2u);
        EXPECT_TRUE(fs::is_directory(output_dir));
        // Saves the model itself: Accelerate's pattern for custom formats.
        models.clear();
        weights.clear();
      });
  run.accelerator.save_state(dir);
  EXPECT_EQ(saves, 1);
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors"));

  int loads = 0;
  auto load_handle = run.accelerator.register_load_state_pre_hook(
      [&](std::vector<std::shared_ptr<torch::nn::Module>>& models, const std::string& input_dir) {
        ++loads;
        EXPECT_EQ(input_dir, dir);
        models.clear();
      });
  run.accelerator.load_state(dir);
  EXPECT_EQ(loads, 1);

  handle.remove();
  handle.remove();  // idempotent
  load_handle.remove();
  run.accelerator.save_state(dir);
  EXPECT_EQ(saves, 1);
  EXPECT_TRUE(fs::exists(dir + "/model.safetensors"));
  run.accelerator.load_state(dir);
  EXPECT_EQ(loads, 1);
}

TEST(CheckpointState, RegisteredModulesAndSchedulersComeBack) {
  TempDir tmp;
  const auto dir = (tmp.path() / "ckpt").string();
  auto make = [](float fill) {
    auto ema = std::make_shared<torch::nn::LinearImpl>(3, 3);
    torch::NoGradGuard no_grad;
    ema->weight.fill_(fill);
    return ema;
  };
  torch::optim::SGD sgd({at::zeros({1}, at::requires_grad())}, torch::optim::SGDOptions(1.0));
  std::shared_ptr<accelerate::LRScheduler> decay =
      accelerate::get_linear_schedule_with_warmup(sgd, 0, 10);
  {
    Accelerator accelerator(single());
    accelerator.register_for_checkpointing(make(2.5f));
    decay->step();
    decay->step();
    accelerator.register_for_checkpointing(decay);
    accelerator.save_state(dir);
  }
  Accelerator accelerator(single());
  auto ema = make(0.0f);
  accelerator.register_for_checkpointing(ema);
  torch::optim::SGD sgd2({at::zeros({1}, at::requires_grad())}, torch::optim::SGDOptions(1.0));
  std::shared_ptr<accelerate::LRScheduler> decay2 =
      accelerate::get_linear_schedule_with_warmup(sgd2, 0, 10);
  accelerator.register_for_checkpointing(decay2);
  accelerator.load_state(dir);
  EXPECT_TRUE(same(ema->weight.detach(), at::full({3, 3}, 2.5f)));
  EXPECT_EQ(decay2->state_dict(), decay->state_dict());
  EXPECT_EQ(decay2->last_epoch(), 2);
}

TEST(CheckpointState, SaveWritesOnTheMainProcessAtomically) {
  TempDir tmp;
  Accelerator accelerator(single());
  const auto path = (tmp.path() / "sub" / "x.safetensors").string();
  EXPECT_TRUE(accelerator.save({{"x", at::arange(4)}}, path, {{"note", "hi"}}));
  auto file = accelerate::safetensors::load_file(path);
  EXPECT_TRUE(same(file.get("x"), at::arange(4)));
  EXPECT_EQ(file.metadata.at("note"), "hi");

  const auto pt = (tmp.path() / "t.pt").string();
  EXPECT_TRUE(accelerator.save(at::arange(3), pt));
  at::Tensor back;
  torch::load(back, pt);
  EXPECT_TRUE(same(back, at::arange(3)));
  EXPECT_EQ(files_in(tmp.path()), (std::set<std::string>{"sub", "t.pt"}));

  torch::nn::Linear linear(2, 2);
  auto written = accelerator.save_model(*linear, (tmp.path() / "model").string());
  EXPECT_EQ(written.size(), 1u);
  EXPECT_TRUE(fs::exists(tmp.path() / "model" / "model.safetensors"));
}

TEST(CheckpointState, RefusalsNameTheProblemAndChangeNothing) {
  TempDir tmp;
  const auto dir = tmp.path() / "ckpt";
  {
    Small run(single(), 1.0f);
    EXPECT_ERROR_CONTAINS(run.accelerator.save_state(), "save_state needs a directory");
    EXPECT_ERROR_CONTAINS(run.accelerator.load_state(), "load_state needs a directory");
    run.accelerator.save_state(dir.string());

    // A directory with other files is never replaced.
    fs::create_directories(tmp.path() / "mine");
    std::ofstream(tmp.path() / "mine" / "notes.txt") << "keep me";
    EXPECT_ERROR_CONTAINS(run.accelerator.save_state((tmp.path() / "mine").string()),
                          "is not a checkpoint; refusing to replace");
    EXPECT_EQ(accelerate::testing::read_text_file(tmp.path() / "mine" / "notes.txt"), "keep me");
  }
  Small other(single(), 7.0f);
  auto unchanged = [&] {
    EXPECT_TRUE(same(other.linear->weight.detach(), at::full({2, 4}, 7.0f - 0.1f)));
  };
  EXPECT_ERROR_CONTAINS(other.accelerator.load_state((tmp.path() / "nowhere").string()),
                        "is not a directory");
  EXPECT_ERROR_CONTAINS(other.accelerator.load_state((tmp.path() / "mine").string()),
                        "is not a complete checkpoint");

  const auto marker = dir / accelerate::kCheckpointMarkerName;
  const auto original = accelerate::testing::read_text_file(marker);
  auto edit = [&](const std::function<void(nlohmann::ordered_json&)>& change) {
    auto j = nlohmann::ordered_json::parse(original);
    change(j);
    std::ofstream(marker, std::ios::trunc) << j.dump();
  };
  // (Another world size loads: tests/launch/test_checkpoint_multiprocess.cpp.)
  // The marker may list files in sub-folders (sharded optimizer state), never outside.
  for (const std::string bad : {"../model.safetensors", "a//b", "/etc/passwd", "x/./y"}) {
    edit([&](auto& j) { j["files"][bad] = 1; });
    EXPECT_ERROR_CONTAINS(other.accelerator.load_state(dir.string()),
                          "\"" + bad + "\" is not a file name inside the checkpoint");
  }
  edit([](auto& j) { j["num_optimizers"] = 2; });
  EXPECT_ERROR_CONTAINS(other.accelerator.load_state(dir.string()),
                        "holds 2 optimizer(s), this Accelerator has 1");
  edit([](auto& j) { j["format_version"] = 99; });
  EXPECT_ERROR_CONTAINS(other.accelerator.load_state(dir.string()), "format version 99");
  edit([](auto& j) { j["files"]["model.safetensors"] = 3; });
  EXPECT_ERROR_CONTAINS(other.accelerator.load_state(dir.string()), "the checkpoint recorded 3");
  edit([](auto& j) { j["files"]["gone.bin"] = 3; });
  EXPECT_ERROR_CONTAINS(other.accelerator.load_state(dir.string()), "lists gone.bin");
  edit([](auto& j) { j.erase("step"); });
  EXPECT_ERROR_CONTAINS(other.accelerator.load_state(dir.string()), "lacks \"step\"");
  std::ofstream(marker, std::ios::trunc) << "{not json";
  EXPECT_ERROR_CONTAINS(other.accelerator.load_state(dir.string()), "is not valid JSON");
  unchanged();

  std::ofstream(marker, std::ios::trunc) << original;
  other.accelerator.load_state(dir.string());
  EXPECT_TRUE(same(other.linear->weight.detach(), at::full({2, 4}, 1.0f - 0.1f)));

  // Fewer prepared objects than saved.
  Accelerator bare(single());
  EXPECT_ERROR_CONTAINS(bare.load_state(dir.string()),
                        "holds 1 optimizer(s), this Accelerator has 0");
  EXPECT_ERROR_CONTAINS(
      bare.register_for_checkpointing(std::shared_ptr<accelerate::Checkpointable>()),
      "null object");
}

// Flips the bits of the last byte of `file` (its size stays the same).
void flip_last_byte(const fs::path& file) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(-1, std::ios::end);
  char c = 0;
  f.get(c);
  f.seekp(-1, std::ios::end);
  f.put(static_cast<char>(~c));
}

std::string crc_of(const fs::path& file) {
  return accelerate::detail::crc32c_hex(accelerate::detail::crc32c_of_file(file.string()));
}

TEST(CheckpointState, EveryFileHasAChecksumAndACorruptedOneIsRefusedByName) {
  TempDir tmp;
  const auto dir = tmp.path() / "ckpt";
  auto make_scheduler = [](torch::optim::Optimizer& opt) {
    return std::shared_ptr<accelerate::LRScheduler>(
        accelerate::get_linear_schedule_with_warmup(opt, 0, 10));
  };
  auto counter = [](float fill) {
    auto ema = std::make_shared<torch::nn::LinearImpl>(3, 3);
    torch::NoGradGuard no_grad;
    ema->weight.fill_(fill);
    return ema;
  };
  {
    Small run(single(), 1.0f);
    run.accelerator.prepare_scheduler(make_scheduler(*run.sgd));
    run.accelerator.register_for_checkpointing(counter(2.0f));
    run.accelerator.save_state(dir.string());
  }
  const auto marker = nlohmann::json::parse(
      accelerate::testing::read_text_file(dir / accelerate::kCheckpointMarkerName));
  // Every file the marker lists has a checksum of the whole file.
  ASSERT_EQ(marker["crc32c"].size(), marker["files"].size());
  for (const auto& [name, size] : marker["files"].items()) {
    EXPECT_EQ(marker["crc32c"][name], crc_of(dir / name)) << name;
  }
  const std::vector<std::string> kinds = {"model.safetensors", "optimizer.safetensors",
                                          "scheduler.json", "custom_checkpoint_0.safetensors",
                                          "random_states_0.safetensors"};
  for (const auto& name : kinds) ASSERT_TRUE(marker["crc32c"].contains(name)) << name;

  Small other(single(), 7.0f);
  other.accelerator.prepare_scheduler(make_scheduler(*other.sgd));
  auto ema = counter(0.0f);
  other.accelerator.register_for_checkpointing(ema);
  for (const auto& name : kinds) {
    SCOPED_TRACE(name);
    const auto file = dir / name;
    const auto pristine = accelerate::testing::read_text_file(file);
    flip_last_byte(file);
    EXPECT_EQ(error_of([&] { other.accelerator.load_state(dir.string()); }),
              "accelerate: load_state: \"" + file.string() + "\" is corrupted: its CRC32C is " +
                  crc_of(file) + ", the checkpoint recorded " +
                  marker["crc32c"][name].get<std::string>());
    // Refused before anything changed.
    EXPECT_TRUE(same(other.linear->weight.detach(), at::full({2, 4}, 7.0f - 0.1f)));
    EXPECT_TRUE(same(ema->weight.detach(), at::zeros({3, 3})));
    std::ofstream(file, std::ios::binary | std::ios::trunc) << pristine;
  }
  // Unchanged files load; so does a marker from before checksums (sizes only).
  other.accelerator.load_state(dir.string());
  EXPECT_TRUE(same(ema->weight.detach(), at::full({3, 3}, 2.0f)));
  auto old = nlohmann::ordered_json::parse(
      accelerate::testing::read_text_file(dir / accelerate::kCheckpointMarkerName));
  old.erase("crc32c");
  std::ofstream(dir / accelerate::kCheckpointMarkerName, std::ios::trunc) << old.dump(2);
  flip_last_byte(dir / "scheduler.json");
  EXPECT_ERROR_CONTAINS(other.accelerator.load_state(dir.string()), "is not a scheduler state");
}

TEST(CheckpointState, ChecksumsCanBeTurnedOffAndBadMarkerEntriesAreRefused) {
  TempDir tmp;
  const auto dir = tmp.path() / "ckpt";
  {
    accelerate::PatchEnvironment off(
        std::map<std::string, std::string>{{accelerate::kCheckpointChecksumsEnv, "0"}});
    Small run(single(), 1.0f);
    run.accelerator.save_state(dir.string());
  }
  const auto marker_path = dir / accelerate::kCheckpointMarkerName;
  const auto original = accelerate::testing::read_text_file(marker_path);
  EXPECT_EQ(nlohmann::json::parse(original).count("crc32c"), 0u);
  Small other(single(), 7.0f);
  other.accelerator.load_state(dir.string());
  auto edit = [&](const std::function<void(nlohmann::ordered_json&)>& change) {
    auto j = nlohmann::ordered_json::parse(original);
    change(j);
    std::ofstream(marker_path, std::ios::trunc) << j.dump();
  };
  edit([](auto& j) { j["crc32c"] = {{"model.safetensors", "ABCDEF01"}}; });
  EXPECT_ERROR_CONTAINS(other.accelerator.load_state(dir.string()),
                        "the checksum of \"model.safetensors\" is not 8 lower-case hex digits");
  edit([](auto& j) { j["crc32c"] = {{"elsewhere.bin", "abcdef01"}}; });
  EXPECT_ERROR_CONTAINS(other.accelerator.load_state(dir.string()),
                        "has a checksum of \"elsewhere.bin\", which \"files\" does not list");
  edit([](auto& j) { j["crc32c"] = 5; });
  EXPECT_ERROR_CONTAINS(other.accelerator.load_state(dir.string()), "\"crc32c\" is not an object");
  edit([](auto& j) { j["crc32c"] = {{"model.safetensors", "00000000"}}; });
  EXPECT_ERROR_CONTAINS(other.accelerator.load_state(dir.string()),
                        "model.safetensors\" is corrupted");
  // Without verification, sizes are still checked but not checksums.
  EXPECT_NO_THROW(accelerate::read_checkpoint_info(dir.string(), /*verify=*/false));
}

// A restart must not die on a corrupted latest checkpoint while an older one can continue the
// run: it warns, names the file, and resumes from the previous complete checkpoint.
TEST(CheckpointState, ARestartFallsBackFromACorruptedCheckpoint) {
  TempDir tmp;
  using accelerate::testing::ResumeRun;
  using accelerate::testing::train_resumable;
  const auto straight = train_resumable(ResumeRun{.total_steps = 23}, single());
  const ResumeRun run{
      .total_steps = 23, .directory = tmp.path().string(), .automatic = true, .save_every = 5};
  auto crashed = run;
  crashed.stop_at = 13;  // checkpoint_0 after step 5, checkpoint_1 after step 10
  train_resumable(crashed, single());
  const auto newest = tmp.path() / "checkpoints" / "checkpoint_1";
  const auto file = newest / "model.safetensors";
  const auto recorded = nlohmann::json::parse(accelerate::testing::read_text_file(
      newest / accelerate::kCheckpointMarkerName))["crc32c"]["model.safetensors"]
                            .get<std::string>();
  flip_last_byte(file);
  const auto actual = crc_of(file);  // the resumed run's saves may remove the file
  accelerate::PatchEnvironment restart(
      std::map<std::string, std::string>{{"ACCELERATE_RESTART_COUNT", "1"}});
  int64_t started = -1;
  auto restarted = run;
  restarted.started_at = &started;
  ::testing::internal::CaptureStderr();
  const auto resumed = train_resumable(restarted, single());
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(started, 5);
  expect_same_state(resumed, straight);
  EXPECT_NE(err.find("accelerate: warning: restart 1: accelerate: load_state: \"" + file.string() +
                     "\" is corrupted: its CRC32C is " + actual + ", the checkpoint recorded " +
                     recorded + "; falling back to the previous complete checkpoint"),
            std::string::npos)
      << err;
  EXPECT_NE(err.find("resuming from \"" + (tmp.path() / "checkpoints" / "checkpoint_0").string()),
            std::string::npos)
      << err;
}

}  // namespace
