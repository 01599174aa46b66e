// Experiment tracking with several ranks as threads: only the main process creates trackers and
// writes files; on the other ranks log() returns at once, without communicating.

#include <accelerate/accelerator.h>
#include <accelerate/tracking.h>

#include <gtest/gtest.h>

#include "expect_error.h"
#include "launch_util.h"
#include "thread_ranks.h"

#include <atomic>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using accelerate::Accelerator;
using accelerate::AcceleratorOptions;
using accelerate::LogValues;
using accelerate::PartialState;
using accelerate::testing::run_ranks;
using accelerate::testing::TempDir;

struct CountingTracker : accelerate::GeneralTracker {
  std::string name() const override { return "counting"; }
  void start() override { ++calls; }
  void log(const LogValues&, std::optional<int64_t>) override { ++calls; }
  void finish() override { ++calls; }
  std::atomic<int> calls{0};
};

AcceleratorOptions on(PartialState& s, const fs::path& project_dir,
                      std::vector<accelerate::TrackerSpec> log_with) {
  return {.project_dir = project_dir.string(),
          .log_with = std::move(log_with),
          .state = s.shared_from_this(),
          .gradient_state = std::make_shared<accelerate::data::GradientState>()};
}

std::string slurp(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

TEST(TrackingRanks, OnlyTheMainProcessCreatesTrackersAndWrites) {
  TempDir dir;
  constexpr int kWorld = 3;
  std::vector<std::shared_ptr<CountingTracker>> custom;
  for (int r = 0; r < kWorld; ++r) custom.push_back(std::make_shared<CountingTracker>());
  std::mutex mutex;
  std::vector<std::string> blank_names;
  run_ranks(kWorld, [&](PartialState& s) {
    const int rank = s.process_index();
    // Each rank its own project_dir: a file under any but rank 0's would be a stray write.
    Accelerator acc(on(s, dir.path() / ("rank" + std::to_string(rank)),
                       {"jsonl", "csv", "tensorboard", custom[static_cast<size_t>(rank)]}));
    acc.init_trackers("run", {{"rank", rank}});
    for (int64_t step = 0; step < 3; ++step)
      acc.log({{"loss", 1.0 / (step + 1)}, {"rank", rank}}, step);
    if (rank == 0) {
      EXPECT_EQ(acc.trackers().size(), 4U);
    } else {
      EXPECT_TRUE(acc.trackers().empty());
      // The same code runs everywhere: elsewhere get_tracker gives a tracker that does nothing.
      auto blank = acc.get_tracker("jsonl");
      blank->log({{"loss", 9}}, 9);
      std::lock_guard lock(mutex);
      blank_names.push_back(blank->name());
    }
    EXPECT_ERROR_CONTAINS(acc.get_tracker("wandb"), "no tracker named \"wandb\"");
    acc.end_training();
  });

  EXPECT_EQ(blank_names, (std::vector<std::string>(kWorld - 1, "jsonl")));
  EXPECT_EQ(custom[0]->calls.load(), 5);  // start, three logs, finish
  for (int r = 1; r < kWorld; ++r) {
    EXPECT_EQ(custom[static_cast<size_t>(r)]->calls.load(), 0) << "rank " << r;
    EXPECT_FALSE(fs::exists(dir.path() / ("rank" + std::to_string(r)))) << "rank " << r;
  }
  const auto run = dir.path() / "rank0" / "run";
  EXPECT_EQ(slurp(run / "metrics.jsonl"),
            "{\"step\": 0, \"loss\": 1, \"rank\": 0}\n"
            "{\"step\": 1, \"loss\": 0.5, \"rank\": 0}\n"
            "{\"step\": 2, \"loss\": 0.3333333333333333, \"rank\": 0}\n");
  EXPECT_EQ(slurp(run / "config.json"), "{\"rank\": 0}\n");
  EXPECT_EQ(slurp(run / "metrics.csv"), "step,loss,rank\n0,1,0\n1,0.5,0\n2,0.3333333333333333,0\n");
  int event_files = 0;
  for (const auto& entry : fs::directory_iterator(run)) {
    event_files += entry.path().filename().string().rfind("events.out.tfevents.", 0) == 0;
  }
  EXPECT_EQ(event_files, 1);
}

TEST(TrackingRanks, LogOnTheOtherRanksNeedsNoPartner) {
  // If log() communicated, ranks calling it different numbers of times would hang or fail.
  TempDir dir;
  run_ranks(2, [&](PartialState& s) {
    Accelerator acc(on(s, dir.path(), {"jsonl"}));
    acc.init_trackers("run");
    const int calls = s.is_main_process() ? 1 : 10000;
    for (int i = 0; i < calls; ++i) acc.log({{"loss", 0.5}}, i);
    acc.end_training();
  });
  EXPECT_EQ(slurp(dir.path() / "run" / "metrics.jsonl"), "{\"step\": 0, \"loss\": 0.5}\n");
}

TEST(TrackingRanks, AFailingTrackerOnTheMainProcessStillReleasesTheOthers) {
  struct FailingFinish : accelerate::GeneralTracker {
    std::string name() const override { return "failing"; }
    void log(const LogValues&, std::optional<int64_t>) override {}
    void finish() override { throw std::runtime_error("disk full"); }
  };
  TempDir dir;
  auto errors = accelerate::testing::run_ranks_collect(2, [&](PartialState& s) {
    Accelerator acc(on(s, dir.path(), {std::make_shared<FailingFinish>()}));
    acc.init_trackers("run");
    acc.end_training();
  });
  EXPECT_EQ(accelerate::testing::message(errors[0]), "disk full");
  EXPECT_FALSE(errors[1]) << accelerate::testing::message(errors[1]);
}

}  // namespace
