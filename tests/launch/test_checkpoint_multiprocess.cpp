// save_state / load_state across real processes: resuming through `accelerate launch` gives the
// uninterrupted run's weights bit for bit (1 and 2 processes), also when a restart must fall back
// from a corrupted newest checkpoint, and a process SIGKILLed at any moment of a save never leaves
// a checkpoint that load_state picks and then fails on.

#include <accelerate/accelerator.h>
#include <accelerate/checkpoint_state.h>
#include <accelerate/safetensors.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "../../src/detail/checksum.h"
#include "expect_error.h"
#include "launch_util.h"
#include "resume_training.h"

#include <signal.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace fs = std::filesystem;
using accelerate::testing::ChildProcess;
using accelerate::testing::cli_path;
using accelerate::testing::kLaunchVariables;
using accelerate::testing::read_text_file;
using accelerate::testing::run_command;
using accelerate::testing::same;
using accelerate::testing::TempDir;
using accelerate::testing::worker_path;

constexpr auto kTimeout = std::chrono::seconds(120);

accelerate::testing::RunResult launch(int n, const std::vector<std::string>& args) {
  std::vector<std::string> argv{cli_path(), "launch", "-n", std::to_string(n),
                                worker_path("checkpoint_worker")};
  argv.insert(argv.end(), args.begin(), args.end());
  return run_command(argv, kTimeout, {{"OMP_NUM_THREADS", "1"}}, kLaunchVariables);
}

class ResumeThroughLauncher : public ::testing::TestWithParam<int> {};

TEST_P(ResumeThroughLauncher, ResumedRunEqualsTheUninterruptedOneBitForBit) {
  const int n = GetParam();
  TempDir tmp;
  const auto straight = (tmp.path() / "straight.safetensors").string();
  const auto resumed = (tmp.path() / "resumed.safetensors").string();
  const auto dir = (tmp.path() / "ckpt").string();

  auto r = launch(n, {"train", "--steps", "23", "--out", straight});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // 13 steps is mid-epoch for 1 process (10 batches an epoch) and for 2 (5 each).
  r = launch(n, {"train", "--steps", "23", "--save-at", "13", "--dir", dir});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (int rank = 0; rank < n; ++rank) {
    EXPECT_TRUE(fs::exists(dir + "/random_states_" + std::to_string(rank) + ".safetensors"));
  }
  EXPECT_EQ(accelerate::read_checkpoint_info(dir).world_size, n);
  r = launch(n, {"train", "--steps", "23", "--resume", "--dir", dir, "--out", resumed});
  ASSERT_EQ(r.exit_code, 0) << r.output;

  auto a = accelerate::safetensors::load_file(straight);
  auto b = accelerate::safetensors::load_file(resumed);
  ASSERT_EQ(a.names(), b.names());
  ASSERT_EQ(a.names().size(), 4u);
  for (const auto& name : a.names()) EXPECT_TRUE(same(b.get(name), a.get(name))) << name;

  // Another number of processes: 2 x 13 batches continue as 26 on one process (the worker
  // checks that the optimizer's step count follows); 13 batches cannot be split between two.
  r = launch(n == 1 ? 2 : 1, {"train", "--steps", "23", "--resume", "--dir", dir});
  if (n == 2) {
    EXPECT_EQ(r.exit_code, 0) << r.output;
  } else {
    EXPECT_NE(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find("was saved by 1 processes after 3 batches each (3 in all), which 2 "
                            "processes cannot continue from exactly"),
              std::string::npos)
        << r.output;
  }
}

// ZeRO through the launcher's flags: the program does not mention it. Stage 2 on two processes
// trains like plain data parallelism, and its sharded checkpoint resumes on one process.
// FULL_SHARD from launch flags alone: the first Linear of the worker's Sequential is a unit (its
// 80 parameters reach min_num_params), the last stays in the root unit.
TEST(FullShardThroughLauncher, TrainsLikeDataParallelismAndResumesOnOneProcess) {
  TempDir tmp;
  const auto plain = (tmp.path() / "plain.safetensors").string();
  const auto sharded = (tmp.path() / "sharded.safetensors").string();
  const auto dir = (tmp.path() / "ckpt").string();
  auto r = launch(2, {"train", "--steps", "23", "--out", plain});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto fsdp_launch = [&](int n, const std::vector<std::string>& args) {
    std::vector<std::string> argv{cli_path(),
                                  "launch",
                                  "-n",
                                  std::to_string(n),
                                  "--use_fsdp",
                                  "--fsdp_sharding_strategy",
                                  "FULL_SHARD",
                                  "--fsdp_auto_wrap_policy",
                                  "SIZE_BASED_WRAP",
                                  "--fsdp_min_num_params",
                                  "50",
                                  "--fsdp_backward_prefetch",
                                  "BACKWARD_PRE",
                                  worker_path("checkpoint_worker")};
    argv.insert(argv.end(), args.begin(), args.end());
    return run_command(argv, kTimeout, {{"OMP_NUM_THREADS", "1"}}, kLaunchVariables);
  };
  r = fsdp_launch(2, {"train", "--steps", "23", "--out", sharded, "--save-at", "13", "--dir", dir});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(fs::exists(dir + "/model.safetensors"));  // FULL_STATE_DICT, Accelerate's default
  auto a = accelerate::safetensors::load_file(plain);
  auto b = accelerate::safetensors::load_file(sharded);
  ASSERT_EQ(a.names(), b.names());
  for (const auto& name : a.names()) {
    const auto diff = (a.get(name) - b.get(name)).abs().max().item<double>();
    EXPECT_LT(diff, 1e-6 * std::max(1.0, a.get(name).abs().max().item<double>())) << name;
    EXPECT_FALSE(at::equal(a.get(name), at::zeros_like(a.get(name)))) << name;
  }
  r = fsdp_launch(1, {"train", "--steps", "23", "--resume", "--dir", dir});
  EXPECT_EQ(r.exit_code, 0) << r.output;
}

TEST(ZeroThroughLauncher, StageTwoTrainsLikeDataParallelismAndResumesOnOneProcess) {
  TempDir tmp;
  const auto plain = (tmp.path() / "plain.safetensors").string();
  const auto zero = (tmp.path() / "zero.safetensors").string();
  const auto dir = (tmp.path() / "ckpt").string();
  auto r = launch(2, {"train", "--steps", "23", "--out", plain});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto zero_launch = [&](int n, const std::vector<std::string>& args) {
    std::vector<std::string> argv{
        cli_path(),        "launch",       "-n", std::to_string(n),
        "--use_deepspeed", "--zero_stage", "2",  worker_path("checkpoint_worker")};
    argv.insert(argv.end(), args.begin(), args.end());
    return run_command(argv, kTimeout, {{"OMP_NUM_THREADS", "1"}}, kLaunchVariables);
  };
  r = zero_launch(2, {"train", "--steps", "23", "--out", zero, "--save-at", "13", "--dir", dir});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(fs::exists(dir + "/optimizer_0/zero_index.json"));
  EXPECT_TRUE(fs::exists(dir + "/optimizer_0/zero_shard_1.safetensors"));
  auto a = accelerate::safetensors::load_file(plain);
  auto b = accelerate::safetensors::load_file(zero);
  ASSERT_EQ(a.names(), b.names());
  for (const auto& name : a.names()) {
    const auto diff = (a.get(name) - b.get(name)).abs().max().item<double>();
    EXPECT_LT(diff, 1e-6 * std::max(1.0, a.get(name).abs().max().item<double>())) << name;
    EXPECT_FALSE(at::equal(a.get(name), at::zeros_like(a.get(name)))) << name;
  }
  r = zero_launch(1, {"train", "--steps", "23", "--resume", "--dir", dir});
  EXPECT_EQ(r.exit_code, 0) << r.output;
  // A bad plugin value is one line on every process, before any training.
  std::vector<std::string> argv{cli_path(),
                                "launch",
                                "-n",
                                "2",
                                "--use_deepspeed",
                                "--zero_stage",
                                "2",
                                "--offload_optimizer_device",
                                "nvme",
                                worker_path("checkpoint_worker"),
                                "train",
                                "--steps",
                                "3"};
  r = run_command(argv, kTimeout, {{"OMP_NUM_THREADS", "1"}}, kLaunchVariables);
  EXPECT_NE(r.exit_code, 0) << r.output;
  const std::string refusal =
      "DeepSpeed offload_optimizer_device nvme (from "
      "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE)";
  size_t count = 0;
  for (size_t at = r.output.find(refusal); at != std::string::npos;
       at = r.output.find(refusal, at + 1)) {
    ++count;
  }
  // The launcher stops the others once one fails; each process refuses by itself (the threads-as-
  // ranks test Zero.BadPluginValuesFailOnEveryProcess shows every one does).
  EXPECT_GE(count, 1u) << r.output;
}

INSTANTIATE_TEST_SUITE_P(Launch, ResumeThroughLauncher, ::testing::Values(1, 2),
                         [](const auto& info) { return std::to_string(info.param) + "Processes"; });

// The promise for long runs: rank 1 is SIGKILLed mid-run (after step 13; the last
// checkpoint is from step 10), `accelerate launch --max_restarts 3` restarts both workers, the
// program resumes by itself, and the final weights are those of a run that never crashed.
TEST(CheckpointRestart, AKilledRankIsRestartedAndTheRunEndsWithTheUninterruptedWeights) {
  TempDir tmp;
  const auto straight = (tmp.path() / "straight.safetensors").string();
  const auto restarted = (tmp.path() / "restarted.safetensors").string();
  auto r = launch(2, {"train", "--steps", "23", "--out", straight});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_command({cli_path(),
                   "launch",
                   "-n",
                   "2",
                   "--max_restarts",
                   "3",
                   worker_path("checkpoint_worker"),
                   "train",
                   "--steps",
                   "23",
                   "--auto",
                   "--dir",
                   (tmp.path() / "project").string(),
                   "--save-every",
                   "5",
                   "--kill-rank",
                   "1",
                   "--kill-at",
                   "13",
                   "--out",
                   restarted},
                  kTimeout, {{"OMP_NUM_THREADS", "1"}}, kLaunchVariables);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("restart 1: resuming from"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("checkpoint_1"), std::string::npos) << r.output;
  auto a = accelerate::safetensors::load_file(straight);
  auto b = accelerate::safetensors::load_file(restarted);
  ASSERT_EQ(a.names(), b.names());
  for (const auto& name : a.names()) EXPECT_TRUE(same(b.get(name), a.get(name))) << name;
}

// A restarted job whose newest checkpoint is corrupted continues from the previous complete one:
// process 0 finds the damage while picking, and every process says which file it was, resumes
// from the same older checkpoint, and ends with the weights of a run that never stopped.
TEST(CheckpointRestart, ACorruptedNewestCheckpointFallsBackOnEveryProcess) {
  TempDir tmp;
  const auto straight = (tmp.path() / "straight.safetensors").string();
  const auto restarted = (tmp.path() / "restarted.safetensors").string();
  const auto project = tmp.path() / "project";
  const auto checkpoints = project / "checkpoints";
  auto r = launch(2, {"train", "--steps", "23", "--out", straight});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // A run that ends after step 13 without saving: checkpoint_0 after step 5, checkpoint_1 after
  // step 10.
  r = launch(2, {"train", "--steps", "23", "--auto", "--dir", project.string(), "--save-every", "5",
                 "--stop-at", "13"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  ASSERT_EQ(
      accelerate::list_checkpoints(checkpoints.string()),
      (std::vector<std::pair<int64_t, std::string>>{{0, (checkpoints / "checkpoint_0").string()},
                                                    {1, (checkpoints / "checkpoint_1").string()}}));

  // One byte of the newest checkpoint's weights flips on the disk.
  const auto file = checkpoints / "checkpoint_1" / "model.safetensors";
  const auto marker = nlohmann::json::parse(
      read_text_file(checkpoints / "checkpoint_1" / accelerate::kCheckpointMarkerName));
  const std::string recorded = marker["crc32c"]["model.safetensors"].get<std::string>();
  const uint64_t data_start = accelerate::safetensors::read_header(file.string()).data_start;
  {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(data_start + 5));
    char c = 0;
    f.get(c);
    f.seekp(static_cast<std::streamoff>(data_start + 5));
    f.put(static_cast<char>(c ^ 0x10));
  }
  const std::string actual =
      accelerate::detail::crc32c_hex(accelerate::detail::crc32c_of_file(file.string()));
  ASSERT_NE(actual, recorded);

  // The job crashes (rank 1 SIGKILLs itself after its first step, before any save) and the
  // launcher restarts it; the restarted workers resume by themselves.
  r = run_command({cli_path(),
                   "launch",
                   "-n",
                   "2",
                   "--max_restarts",
                   "1",
                   "--rank_prefix",
                   worker_path("checkpoint_worker"),
                   "train",
                   "--steps",
                   "23",
                   "--auto",
                   "--dir",
                   project.string(),
                   "--save-every",
                   "5",
                   "--kill-rank",
                   "1",
                   "--kill-at",
                   "1",
                   "--out",
                   restarted},
                  kTimeout, {{"OMP_NUM_THREADS", "1"}}, kLaunchVariables);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const std::string rank : {"0", "1"}) {
    const std::string prefix = "[rank " + rank + "] ";
    EXPECT_NE(r.output.find(prefix + "accelerate: warning: restart 1: accelerate: load_state: \"" +
                            file.string() + "\" is corrupted: its CRC32C is " + actual +
                            ", the checkpoint recorded " + recorded +
                            "; falling back to the previous complete checkpoint\n"),
              std::string::npos)
        << "rank " << rank << "\n"
        << r.output;
    EXPECT_NE(r.output.find(prefix + "checkpoint_worker: process " + rank + " started at step 5\n"),
              std::string::npos)
        << "rank " << rank << "\n"
        << r.output;
  }
  EXPECT_NE(r.output.find("[rank 0] accelerate: restart 1: resuming from \"" +
                          (checkpoints / "checkpoint_0").string() + "\"\n"),
            std::string::npos)
      << r.output;
  auto a = accelerate::safetensors::load_file(straight);
  auto b = accelerate::safetensors::load_file(restarted);
  ASSERT_EQ(a.names(), b.names());
  for (const auto& name : a.names()) EXPECT_TRUE(same(b.get(name), a.get(name))) << name;
  // Saves were numbered on after the corrupted checkpoint (2 after step 10, 3 after 15, 4 after
  // 20) instead of replacing it; total_limit 2 then removed it with the older ones.
  EXPECT_EQ(
      accelerate::list_checkpoints(checkpoints.string()),
      (std::vector<std::pair<int64_t, std::string>>{{3, (checkpoints / "checkpoint_3").string()},
                                                    {4, (checkpoints / "checkpoint_4").string()}}));
}

// The last "saved <c> <ms>" line of `output`: {c, ms}, or {-1, 0}.
std::pair<int64_t, double> last_saved(const std::string& output) {
  std::pair<int64_t, double> out{-1, 0.0};
  std::istringstream lines(output);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream words(line);
    std::string word;
    int64_t c = 0;
    double ms = 0;
    if (words >> word && word == "saved" && words >> c >> ms) out = {c, ms};
  }
  return out;
}

TEST(CheckpointCrash, SigkillAtAnyMomentOfASaveLeavesALoadableCheckpoint) {
  TempDir tmp;
  const auto project = tmp.path().string();
  const auto checkpoints = tmp.path() / "checkpoints";
  std::mt19937 random(7);
  int64_t last_reported = 0;
  double save_ms = 0;
  constexpr int kRounds = 24;
  for (int round = 0; round < kRounds; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    auto child =
        ChildProcess::start({worker_path("checkpoint_worker"), "save-loop", "--project", project},
                            {{"OMP_NUM_THREADS", "1"}}, kLaunchVariables);
    // Wait for a completed save in this round, then kill at a point spread over the next save
    // (and, every fourth round, the one after), so the kills land in every phase: writing the
    // files, the marker, the rename, the removal of the oldest checkpoint.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (last_saved(child.output()).first < 0 && std::chrono::steady_clock::now() < deadline) {
      child.poll_output(std::chrono::milliseconds(5));
    }
    auto [c, ms] = last_saved(child.output());
    ASSERT_GE(c, 0) << child.output();
    last_reported = c;
    save_ms = ms;
    const double span = (round % 4 == 3 ? 2.0 : 1.0) * save_ms;
    const double delay = span * std::uniform_real_distribution<double>(0.0, 1.0)(random);
    std::this_thread::sleep_for(std::chrono::microseconds(static_cast<int64_t>(delay * 1000)));
    ::kill(child.pid(), SIGKILL);
    auto r = child.wait(std::chrono::seconds(10));
    ASSERT_EQ(r.term_signal, SIGKILL) << r.output;
    last_reported = std::max(last_reported, last_saved(r.output).first);

    // What a restarted run would do: pick the latest complete checkpoint and load it.
    accelerate::ProjectConfiguration config;
    config.project_dir = project;
    config.automatic_checkpoint_naming = true;
    accelerate::AcceleratorOptions options;
    options.project_config = config;
    options.state = accelerate::PartialState::from_environment({}, accelerate::EnvMap{});
    options.gradient_state = std::make_shared<accelerate::data::GradientState>();
    accelerate::Accelerator accelerator(options);
    accelerate::testing::CrashTarget target;
    auto prepared = accelerator.prepare(target.model, target.adam);
    (void)prepared;
    accelerator.register_for_checkpointing(target.progress);
    ASSERT_NO_THROW(accelerator.load_state());
    EXPECT_EQ(target.inconsistency(), "");
    // The newest complete save: the last one reported, or one that finished but was not
    // printed before the kill.
    EXPECT_GE(target.progress->steps, last_reported);
    EXPECT_LE(target.progress->steps, last_reported + 1);
    last_reported = target.progress->steps;
    // total_limit 2, plus at most one the kill kept from being removed.
    EXPECT_LE(accelerate::list_checkpoints(checkpoints.string()).size(), 3u);
  }
  // Leftovers are only ever the last kill's.
  int leftovers = 0;
  for (const auto& e : fs::directory_iterator(checkpoints)) {
    if (e.path().filename().string().front() == '.') ++leftovers;
  }
  EXPECT_LE(leftovers, 1) << "only the last kill may leave a .partial or .removing directory";
  EXPECT_GE(last_reported, kRounds);
  std::cout << "[ info ] a save took " << save_ms << " ms; " << kRounds << " kills, last step "
            << last_reported << "\n";
}

}  // namespace
