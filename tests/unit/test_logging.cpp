// The process-aware logger (logging.h), with ranks run as threads, and the progress bar
// (progress.h) rendered against an injected clock.

#include <accelerate/environment.h>
#include <accelerate/logging.h>
#include <accelerate/progress.h>

#include <gtest/gtest.h>

#include "expect_error.h"
#include "thread_ranks.h"

#include <algorithm>
#include <chrono>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

using accelerate::get_logger;
using accelerate::LogLevel;
using accelerate::PartialState;
using accelerate::ProgressBar;
using accelerate::testing::run_ranks;

namespace {

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

// A one-process state that does not touch the environment or PartialState::shared().
std::shared_ptr<PartialState> single_state() {
  return PartialState::from_store(c10::make_intrusive<c10d::HashStore>(), 0, 1);
}

}  // namespace

// ---------------------------------------------------------------------- levels

TEST(LogLevel, ParsesNamesInAnyCase) {
  EXPECT_EQ(accelerate::log_level_from_string("debug"), LogLevel::kDebug);
  EXPECT_EQ(accelerate::log_level_from_string("INFO"), LogLevel::kInfo);
  EXPECT_EQ(accelerate::log_level_from_string("Warning"), LogLevel::kWarning);
  EXPECT_EQ(accelerate::log_level_from_string("warn"), LogLevel::kWarning);
  EXPECT_EQ(accelerate::log_level_from_string("eRRoR"), LogLevel::kError);
  EXPECT_EQ(accelerate::log_level_from_string("CRITICAL"), LogLevel::kCritical);
  EXPECT_EQ(accelerate::log_level_from_string("fatal"), LogLevel::kCritical);
  EXPECT_EQ(accelerate::to_string(LogLevel::kWarning), "WARNING");
}

TEST(LogLevel, UnknownNameIsAnErrorNamingIt) {
  EXPECT_ERROR_CONTAINS(accelerate::log_level_from_string("verbose", "the level"),
                        "the level 'verbose' is not a log level (use debug, info, warning, error "
                        "or critical");
}

TEST(Logger, LevelComesFromTheEnvironmentInAnyCase) {
  auto env = accelerate::patch_environment({{"ACCELERATE_LOG_LEVEL", "eRrOr"}});
  EXPECT_EQ(get_logger("env_level").level(), LogLevel::kError);
}

TEST(Logger, ExplicitLevelBeatsTheEnvironment) {
  auto env = accelerate::patch_environment({{"ACCELERATE_LOG_LEVEL", "error"}});
  EXPECT_EQ(get_logger("explicit_level", {.level = LogLevel::kDebug}).level(), LogLevel::kDebug);
}

TEST(Logger, InvalidEnvironmentLevelIsAnErrorNamingTheVariable) {
  auto env = accelerate::patch_environment({{"ACCELERATE_LOG_LEVEL", "loud"}});
  EXPECT_ERROR_CONTAINS(get_logger("bad_env_level"),
                        "ACCELERATE_LOG_LEVEL 'loud' is not a log level");
}

TEST(Logger, NewLoggerDefaultsToInfoAndKeepsItsLevelByName) {
  auto env = accelerate::patch_environment({{"ACCELERATE_LOG_LEVEL", ""}});
  auto first = get_logger("shared_name");
  EXPECT_EQ(first.level(), LogLevel::kInfo);
  first.set_level(LogLevel::kCritical);
  // Like logging.getLogger(name): a second logger of that name shares the level.
  EXPECT_EQ(get_logger("shared_name").level(), LogLevel::kCritical);
  EXPECT_EQ(get_logger("other_name").level(), LogLevel::kInfo);
}

// ---------------------------------------------------------------------- records

TEST(Logger, RecordHasLevelNameRankAndStreamedMessage) {
  std::ostringstream out;
  auto state = single_state();
  auto logger = get_logger(*state, "fmt", {.level = LogLevel::kDebug, .stream = &out});
  logger.info("loss ", 0.5, " at step ", 3);
  logger.debug("d");
  logger.critical("c");
  EXPECT_EQ(out.str(),
            "INFO:fmt:[RANK 0] loss 0.5 at step 3\n"
            "DEBUG:fmt:[RANK 0] d\n"
            "CRITICAL:fmt:[RANK 0] c\n");
}

TEST(Logger, RecordsBelowTheThresholdAreDropped) {
  std::ostringstream out;
  auto state = single_state();
  auto logger = get_logger(*state, "threshold", {.level = LogLevel::kWarning, .stream = &out});
  logger.debug("no");
  logger.info("no");
  logger.warning("yes ", 1);
  logger.error("yes ", 2);
  EXPECT_FALSE(logger.is_enabled_for(LogLevel::kInfo));
  EXPECT_EQ(out.str(), "WARNING:threshold:[RANK 0] yes 1\nERROR:threshold:[RANK 0] yes 2\n");
  logger.set_level(LogLevel::kDebug);
  logger.debug("now");
  EXPECT_EQ(lines_of(out.str()).back(), "DEBUG:threshold:[RANK 0] now");
}

TEST(Logger, WarningOnceWritesAMessageOnce) {
  std::ostringstream out;
  auto state = single_state();
  auto logger = get_logger(*state, "once", {.level = LogLevel::kInfo, .stream = &out});
  logger.warning_once("deprecated ", "x");
  logger.warning_once("deprecated ", "x");
  logger.warning_once("deprecated ", "y");
  EXPECT_EQ(out.str(), "WARNING:once:[RANK 0] deprecated x\nWARNING:once:[RANK 0] deprecated y\n");
}

TEST(Logger, WithoutAStateTheFirstRecordIsAnError) {
  if (PartialState::shared_if_created()) GTEST_SKIP() << "another test created the shared state";
  std::ostringstream out;
  auto logger = get_logger("stateless", {.level = LogLevel::kInfo, .stream = &out});
  EXPECT_ERROR_CONTAINS(logger.info("x"), "logger 'stateless' has no process state to log for");
  // A record below the threshold needs no state: nothing would be written anyway.
  logger.debug("fine");
  EXPECT_EQ(out.str(), "");
}

// ---------------------------------------------------------------------- ranks as threads

TEST(LoggerRanks, MainProcessOnlyByDefault) {
  std::ostringstream out;
  run_ranks(3, [&](PartialState& state) {
    auto logger = get_logger(state, "ranks_main", {.level = LogLevel::kInfo, .stream = &out});
    logger.info("hello from ", state.process_index());
  });
  EXPECT_EQ(out.str(), "INFO:ranks_main:[RANK 0] hello from 0\n");
}

TEST(LoggerRanks, EveryProcessWhenMainProcessOnlyIsFalse) {
  std::ostringstream out;
  run_ranks(3, [&](PartialState& state) {
    auto logger = get_logger(state, "ranks_all", {.level = LogLevel::kInfo, .stream = &out});
    logger.warning({.main_process_only = false}, "hello from ", state.process_index());
  });
  auto lines = lines_of(out.str());
  std::sort(lines.begin(), lines.end());
  EXPECT_EQ(lines, (std::vector<std::string>{"WARNING:ranks_all:[RANK 0] hello from 0",
                                             "WARNING:ranks_all:[RANK 1] hello from 1",
                                             "WARNING:ranks_all:[RANK 2] hello from 2"}));
}

TEST(LoggerRanks, InOrderWritesInRankOrderEvenWhenLaterRanksArriveFirst) {
  std::ostringstream out;
  run_ranks(3, [&](PartialState& state) {
    auto logger = get_logger(state, "ranks_order", {.level = LogLevel::kInfo, .stream = &out});
    // Rank 2 reaches the call first and rank 0 last: without the barriers the order would be
    // reversed.
    std::this_thread::sleep_for(std::chrono::milliseconds(60 * (2 - state.process_index())));
    // in_order wins over main_process_only, as in Accelerate.
    logger.info({.main_process_only = true, .in_order = true}, "rank ", state.process_index());
  });
  EXPECT_EQ(out.str(),
            "INFO:ranks_order:[RANK 0] rank 0\n"
            "INFO:ranks_order:[RANK 1] rank 1\n"
            "INFO:ranks_order:[RANK 2] rank 2\n");
}

TEST(LoggerRanks, InOrderBelowTheThresholdWritesNothingAndDoesNotWait) {
  std::ostringstream out;
  run_ranks(2, [&](PartialState& state) {
    auto logger = get_logger(state, "ranks_quiet", {.level = LogLevel::kError, .stream = &out});
    logger.info({.in_order = true}, "hidden");
  });
  EXPECT_EQ(out.str(), "");
}

// ---------------------------------------------------------------------- progress bar

namespace {

struct FakeClock {
  double now = 100.0;  // not 0: only differences may matter
  std::function<double()> fn() {
    return [this] { return now; };
  }
};

}  // namespace

TEST(ProgressBar, FormatsIntervalsLikeTqdm) {
  EXPECT_EQ(accelerate::detail::format_interval(0), "00:00");
  EXPECT_EQ(accelerate::detail::format_interval(59.9), "00:59");
  EXPECT_EQ(accelerate::detail::format_interval(61), "01:01");
  EXPECT_EQ(accelerate::detail::format_interval(3725), "1:02:05");
}

TEST(ProgressBar, RendersCountPercentBarRateAndEta) {
  FakeClock clock;
  std::ostringstream out;
  ProgressBar bar({.total = 100,
                   .description = "train",
                   .stream = &out,
                   .force = true,
                   .all_processes = true,
                   .clock = clock.fn()});
  EXPECT_EQ(bar.render(), "train:   0%|                    | 0/100 [00:00<?, ?it/s]");
  clock.now += 2;
  bar.update(40);
  EXPECT_EQ(bar.render(), "train:  40%|########            | 40/100 [00:02<00:03, 20.00it/s]");
  bar.set_postfix("loss", 0.123456);
  bar.set_postfix("step", 40);
  bar.set_postfix("loss", 0.25);  // replaces, keeping its place
  EXPECT_EQ(bar.render(),
            "train:  40%|########            | 40/100 [00:02<00:03, 20.00it/s, loss=0.25, "
            "step=40]");
  clock.now += 3;
  bar.update(60);
  bar.clear_postfix();
  EXPECT_EQ(bar.render(), "train: 100%|####################| 100/100 [00:05<00:00, 20.00it/s]");
}

TEST(ProgressBar, WithoutTotalShowsCountAndSlowRatesAsSecondsPerIteration) {
  FakeClock clock;
  std::ostringstream out;
  ProgressBar bar({.stream = &out, .force = true, .all_processes = true, .clock = clock.fn()});
  clock.now += 2;
  bar.update(7);
  EXPECT_EQ(bar.render(), "7it [00:02, 3.50it/s]");
  clock.now += 6;
  bar.update(-5);
  EXPECT_EQ(bar.render(), "2it [00:08, 4.00s/it]");
  bar.set_postfix("loss", 1.0 / 3.0);
  EXPECT_EQ(bar.render(), "2it [00:08, 4.00s/it, loss=0.333]");
}

TEST(ProgressBar, RedrawsAtMostEveryMinIntervalAndCloseEndsTheLine) {
  FakeClock clock;
  std::ostringstream out;
  {
    ProgressBar bar({.total = 4,
                     .stream = &out,
                     .force = true,
                     .all_processes = true,
                     .min_interval = 0.5,
                     .bar_width = 4,
                     .clock = clock.fn()});
    clock.now += 0.25;
    bar.update();  // too soon: not drawn
    clock.now += 0.25;
    bar.update();  // 0.5 s after the first drawing
    clock.now += 0.25;
    bar.update();  // too soon again
    clock.now += 0.25;
    bar.close();
    bar.close();  // once only
    bar.update();
  }  // the destructor does not draw again
  EXPECT_EQ(out.str(),
            "\r  0%|    | 0/4 [00:00<?, ?it/s]"
            "\r 50%|##  | 2/4 [00:00<00:00, 4.00it/s]"
            "\r 75%|### | 3/4 [00:01<00:00, 3.00it/s]\n");
}

TEST(ProgressBar, BlanksTheTailOfALongerPreviousLine) {
  FakeClock clock;
  std::ostringstream out;
  ProgressBar bar({.description = "abcdef",
                   .stream = &out,
                   .force = true,
                   .all_processes = true,
                   .clock = clock.fn()});
  bar.set_description("a");
  bar.refresh();
  EXPECT_EQ(out.str(), "\rabcdef: 0it [00:00, ?it/s]\ra: 0it [00:00, ?it/s]     ");
}

TEST(ProgressBar, DrawsNothingOnAStreamThatIsNotATerminalUnlessForced) {
  std::ostringstream out;
  {
    ProgressBar bar({.total = 3, .stream = &out, .all_processes = true});
    bar.update(3);
    EXPECT_FALSE(bar.enabled());
    EXPECT_EQ(bar.n(), 3);
  }
  {
    ProgressBar bar({.total = 3, .stream = &out, .force = true, .disable = true});
    EXPECT_FALSE(bar.enabled());
  }
  EXPECT_EQ(out.str(), "");
}

TEST(ProgressBarRanks, OnlyTheLocalMainProcessDrawsUnlessAllProcessesAsked) {
  std::ostringstream outs[4];
  // Two machines of two processes: local ranks 0, 1, 0, 1.
  run_ranks(4,
            [&](PartialState& state) {
              const int rank = state.process_index();
              ProgressBar bar(state, {.total = 1, .stream = &outs[rank], .force = true});
              EXPECT_EQ(bar.enabled(), state.is_local_main_process()) << "rank " << rank;
              ProgressBar all(
                  state, {.total = 1, .stream = &outs[rank], .force = true, .all_processes = true});
              EXPECT_TRUE(all.enabled()) << "rank " << rank;
            },
            {.per_node = 2});
  for (int rank = 0; rank < 4; ++rank) {
    const std::string text = outs[rank].str();
    const auto bars = static_cast<size_t>(std::count(text.begin(), text.end(), '\n'));
    EXPECT_EQ(bars, rank % 2 == 0 ? 2u : 1u) << "rank " << rank << ": " << text;
  }
}
