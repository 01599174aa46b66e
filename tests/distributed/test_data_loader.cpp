// The data loader across ranks run as threads: prepare_data_loader's sharding, gather_for_metrics,
// end_of_dataloader / remainder, generator synchronisation, the seedable sampler,
// dispatch_batches, iterable sharding and resuming from a position. Every rank builds its own
// loader over its own dataset copy (loaders are handles and are never shared between ranks) and
// its own GradientState, and values are compared exactly with what Accelerate yields.

#include <accelerate/data.h>
#include <accelerate/operations.h>
#include <accelerate/state.h>

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include "thread_ranks.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

using accelerate::PartialState;
using accelerate::data::DataLoader;
using accelerate::data::DataLoaderOptions;
using accelerate::data::GradientState;
using accelerate::data::PrepareDataLoaderOptions;
using accelerate::testing::message;
using accelerate::testing::run_ranks;
using accelerate::testing::run_ranks_collect;

namespace {

using Ints = std::vector<int64_t>;
using Batches = std::vector<Ints>;

// A failing rank must not leave the others waiting in a collective for half an hour.
const accelerate::testing::RankOptions kRanks{
    .state = {.init_kwargs = {.timeout = std::chrono::seconds(60)}}};

// Map-style: item i is the number i. `calls`, when set, counts get() per rank.
struct Numbers {
  int64_t n;
  std::atomic<int64_t>* calls = nullptr;
  int64_t size() const { return n; }
  int64_t get(size_t i) const {
    if (calls != nullptr) calls->fetch_add(1);
    return static_cast<int64_t>(i);
  }
};

// "w<i>". (Not `"w" + std::to_string(i)`: GCC 12 warns wrongly about that operator+,
// -Wstringop-overflow.)
std::string word(int64_t i) {
  return std::string("w").append(std::to_string(i));
}

// Map-style with string items: batches are std::vector<std::string>.
struct Words {
  int64_t n;
  int64_t size() const { return n; }
  std::string get(size_t i) const { return word(static_cast<int64_t>(i)); }
};

// Iterable: yields 0, 1, ..., n - 1; counts next() and reset() calls.
struct Stream {
  int64_t n;
  std::atomic<int64_t>* nexts = nullptr;
  std::atomic<int64_t>* resets = nullptr;
  int64_t i = 0;
  void reset() {
    if (resets != nullptr) resets->fetch_add(1);
    i = 0;
  }
  std::optional<int64_t> next() {
    if (nexts != nullptr) nexts->fetch_add(1);
    return i < n ? std::optional<int64_t>(i++) : std::nullopt;
  }
};

// Iterable with a size() and tensor items [i, 100 + i].
struct SizedTensorStream {
  int64_t n;
  std::atomic<int64_t>* nexts = nullptr;
  int64_t i = 0;
  int64_t size() const { return n; }
  void reset() { i = 0; }
  std::optional<at::Tensor> next() {
    if (nexts != nullptr) nexts->fetch_add(1);
    if (i >= n) return std::nullopt;
    const int64_t v = i++;
    return at::tensor(Ints{v, 100 + v}, at::kLong);
  }
};

Ints flat(const at::Tensor& t) {
  auto c = t.contiguous().to(at::kLong).flatten();
  return Ints(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

Ints iota(int64_t n) {
  Ints out(static_cast<size_t>(n));
  std::iota(out.begin(), out.end(), 0);
  return out;
}

Ints sorted(Ints v) {
  std::sort(v.begin(), v.end());
  return v;
}

Ints concat(const Batches& batches) {
  Ints out;
  for (const auto& b : batches) out.insert(out.end(), b.begin(), b.end());
  return out;
}

Ints randperm(int64_t n, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return flat(at::randperm(n, gen, at::TensorOptions().dtype(at::kLong)));
}

// Options with this rank's states filled in.
PrepareDataLoaderOptions for_rank(PartialState& s, const std::shared_ptr<GradientState>& gs,
                                  PrepareDataLoaderOptions options = {}) {
  options.state = s.shared_from_this();
  options.gradient_state = gs;
  return options;
}

// What one rank saw during one epoch of a prepared loader.
struct RankEpoch {
  Batches batches;
  Batches gathered;  // gather_for_metrics of every batch
  std::vector<bool> end_flags;
  std::vector<bool> loader_end_flags;
  std::vector<int64_t> remainders;
  int64_t size = -1;
  bool in_dataloader_after = true;
};

// `gather`: call gather_for_metrics on every batch (only when every rank yields as many batches);
// `sized`: the loader knows its length.
RankEpoch run_epoch(PartialState& s, DataLoader<at::Tensor>& loader, GradientState& gs,
                    bool gather = true, bool sized = true) {
  RankEpoch r;
  if (sized) r.size = loader.size();
  for (at::Tensor& batch : loader) {
    r.batches.push_back(flat(batch));
    r.end_flags.push_back(gs.end_of_dataloader());
    r.loader_end_flags.push_back(loader.end_of_dataloader());
    r.remainders.push_back(gs.remainder());
    if (gather) r.gathered.push_back(flat(accelerate::data::gather_for_metrics(s, gs, batch)));
  }
  r.in_dataloader_after = gs.in_dataloader();
  return r;
}

// One epoch of a map-style loader over Numbers{length} prepared on every rank.
std::vector<RankEpoch> map_epoch(int world, int64_t length, const DataLoaderOptions& options,
                                 const PrepareDataLoaderOptions& prepare = {}) {
  std::vector<RankEpoch> out(static_cast<size_t>(world));
  run_ranks(
      world,
      [&](PartialState& s) {
        auto gs = std::make_shared<GradientState>();
        DataLoader loader(Numbers{length}, options);
        auto mine = accelerate::data::prepare_data_loader(loader, for_rank(s, gs, prepare));
        // With uneven batches, ranks yield different numbers of batches: no collectives.
        out[static_cast<size_t>(s.process_index())] = run_epoch(s, mine, *gs, prepare.even_batches);
      },
      kRanks);
  return out;
}

std::string describe(const Batches& b) {
  std::string s = "{";
  for (const auto& batch : b) {
    s += "{";
    for (size_t i = 0; i < batch.size(); ++i) {
      if (i > 0) s += ",";
      s += std::to_string(batch[i]);
    }
    s += "}";
  }
  return s + "}";
}

// Accelerate's DataLoaderDispatcher on sequential batches of `batch_size` over 0..length-1
// (drop_last false): process 0 reads one batch (split_batches) or num_processes batches
// concatenated; each process takes k = rows / num_processes rows; when the last group does not
// divide, it is followed by the first num_processes rows of the first group and k + 1 rows
// each.
Batches dispatch_reference(int64_t length, int64_t batch_size, int n, bool split, int rank) {
  Batches base;
  for (int64_t start = 0; start < length; start += batch_size) {
    Ints b;
    for (int64_t i = start; i < std::min(length, start + batch_size); ++i) b.push_back(i);
    base.push_back(b);
  }
  Batches groups;
  for (size_t i = 0; i < base.size(); i += split ? 1 : static_cast<size_t>(n)) {
    Ints g;
    for (size_t j = i; j < std::min(base.size(), i + (split ? 1 : static_cast<size_t>(n))); ++j) {
      g.insert(g.end(), base[j].begin(), base[j].end());
    }
    groups.push_back(g);
  }
  const Ints first(groups.front().begin(),
                   groups.front().begin() + std::min<int64_t>(n, groups.front().size()));
  Batches out;
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    Ints g = groups[gi];
    const auto observed = static_cast<int64_t>(g.size());
    int64_t k = observed / n;
    if (gi + 1 == groups.size() && observed % n != 0) {
      g.insert(g.end(), first.begin(), first.end());
      k += 1;
    }
    out.emplace_back(g.begin() + rank * k, g.begin() + (rank + 1) * k);
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------------- map-style sharding

struct ShardCase {
  const char* name;
  int world;
  int64_t length;
  DataLoaderOptions options;
  PrepareDataLoaderOptions prepare;
  std::vector<Batches> expected;  // per rank
  // Whether loader.size() is checked against the batches yielded. Not with split_batches and
  // uneven batches: there size() is len(batch_sampler) on every rank (Accelerate's __len__),
  // although a rank whose slice of the short last batch is empty yields one batch fewer.
  bool check_size = true;
};

TEST(DataDistributedSharding, PrepareWiresBatchSamplerShard) {
  const std::vector<ShardCase> cases = {
      {"2 ranks, 5 by 2, even", 2, 5, {.batch_size = 2}, {}, {{{0, 1}, {4, 0}}, {{2, 3}, {1, 2}}}},
      {"2 ranks, 5 by 2, uneven",
       2,
       5,
       {.batch_size = 2},
       {.even_batches = false},
       {{{0, 1}, {4}}, {{2, 3}}}},
      {"3 ranks, 5 by 2, even", 3, 5, {.batch_size = 2}, {}, {{{0, 1}}, {{2, 3}}, {{4, 0}}}},
      {"3 ranks, 5 by 2, uneven",
       3,
       5,
       {.batch_size = 2},
       {.even_batches = false},
       {{{0, 1}}, {{2, 3}}, {{4}}}},
      {"4 ranks, 5 by 2, even",
       4,
       5,
       {.batch_size = 2},
       {},
       {{{0, 1}}, {{2, 3}}, {{4, 0}}, {{1, 2}}}},
      {"4 ranks, 5 by 2, uneven",
       4,
       5,
       {.batch_size = 2},
       {.even_batches = false},
       {{{0, 1}}, {{2, 3}}, {{4}}, {}}},
      {"4 ranks, 11 by 2, even",
       4,
       11,
       {.batch_size = 2},
       {},
       {{{0, 1}, {8, 9}}, {{2, 3}, {10, 0}}, {{4, 5}, {1, 2}}, {{6, 7}, {3, 4}}}},
      {"2 ranks, 10 by 4, split",
       2,
       10,
       {.batch_size = 4},
       {.split_batches = true},
       {{{0, 1}, {4, 5}, {8, 9}}, {{2, 3}, {6, 7}, {0, 1}}}},
      {"2 ranks, 10 by 4, split, uneven",
       2,
       10,
       {.batch_size = 4},
       {.split_batches = true, .even_batches = false},
       {{{0, 1}, {4, 5}, {8, 9}}, {{2, 3}, {6, 7}}},
       /*check_size=*/false},
      {"4 ranks, 10 by 4, split",
       4,
       10,
       {.batch_size = 4},
       {.split_batches = true},
       {{{0}, {4}, {8}}, {{1}, {5}, {9}}, {{2}, {6}, {0}}, {{3}, {7}, {1}}}},
      {"3 ranks, 9 by 3, split",
       3,
       9,
       {.batch_size = 3},
       {.split_batches = true},
       {{{0}, {3}, {6}}, {{1}, {4}, {7}}, {{2}, {5}, {8}}}},
      {"2 ranks, 5 by 2, drop_last",
       2,
       5,
       {.batch_size = 2, .drop_last = true},
       {},
       {{{0, 1}}, {{2, 3}}}},
      {"2 ranks, 9 by 2, drop_last",
       2,
       9,
       {.batch_size = 2, .drop_last = true},
       {},
       {{{0, 1}, {4, 5}}, {{2, 3}, {6, 7}}}},
      {"3 ranks, 7 by 2, drop_last",
       3,
       7,
       {.batch_size = 2, .drop_last = true},
       {},
       {{{0, 1}}, {{2, 3}}, {{4, 5}}}},
      {"3 ranks, 10 by 2, drop_last (the round of 3 is incomplete)",
       3,
       10,
       {.batch_size = 2, .drop_last = true},
       {},
       {{{0, 1}}, {{2, 3}}, {{4, 5}}}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto got = map_epoch(c.world, c.length, c.options, c.prepare);
    for (int rank = 0; rank < c.world; ++rank) {
      const auto& r = got[static_cast<size_t>(rank)];
      EXPECT_EQ(r.batches, c.expected[static_cast<size_t>(rank)])
          << "rank " << rank << " got " << describe(r.batches);
      if (c.check_size) {
        EXPECT_EQ(r.size, static_cast<int64_t>(r.batches.size())) << "rank " << rank;
      }
      EXPECT_FALSE(r.in_dataloader_after) << "rank " << rank;
    }
  }
}

TEST(DataDistributedSharding, LoaderSizesMatchAccelerate) {
  run_ranks(
      3,
      [&](PartialState& s) {
        auto gs = std::make_shared<GradientState>();
        DataLoader loader(Numbers{10}, {.batch_size = 3});
        auto mine = accelerate::data::prepare_data_loader(loader, for_rank(s, gs));
        EXPECT_EQ(mine.batch_size(), 3);
        EXPECT_EQ(mine.total_batch_size(), 9);
        EXPECT_EQ(mine.total_dataset_length(), 10);
        EXPECT_TRUE(mine.prepared());
        EXPECT_FALSE(mine.dispatches());
        EXPECT_FALSE(loader.prepared());
        DataLoader split_loader(Numbers{10}, {.batch_size = 6});
        auto split = accelerate::data::prepare_data_loader(
            split_loader, for_rank(s, gs, {.split_batches = true}));
        EXPECT_EQ(split.batch_size(), 2);
        EXPECT_EQ(split.total_batch_size(), 6);
        EXPECT_EQ(split.size(), 2);
      },
      kRanks);
}

// ---------------------------------------------------------------------- gather_for_metrics

TEST(DataDistributedGather, GatherForMetricsCountsEverySampleOnce) {
  for (int world : {2, 3, 4}) {
    SCOPED_TRACE("world " + std::to_string(world));
    {
      SCOPED_TRACE("length 10, batch 3");
      auto got = map_epoch(world, 10, {.batch_size = 3});
      for (const auto& r : got) EXPECT_EQ(concat(r.gathered), iota(10));
      // Every rank gathers the same values.
      for (const auto& r : got) EXPECT_EQ(r.gathered, got[0].gathered);
    }
    {
      SCOPED_TRACE("split_batches, batch 2 per process");
      auto got = map_epoch(world, 10, {.batch_size = 2 * world}, {.split_batches = true});
      for (const auto& r : got) EXPECT_EQ(concat(r.gathered), iota(10));
    }
    {
      SCOPED_TRACE("shuffle");
      auto got = map_epoch(world, 10, {.batch_size = 3, .shuffle = true});
      for (const auto& r : got) {
        EXPECT_EQ(sorted(concat(r.gathered)), iota(10)) << describe(r.gathered);
        EXPECT_EQ(r.gathered, got[0].gathered);
      }
    }
    {
      SCOPED_TRACE("shuffle, 2 loader threads");
      auto got = map_epoch(world, 10, {.batch_size = 3, .shuffle = true, .num_workers = 2});
      for (const auto& r : got) EXPECT_EQ(sorted(concat(r.gathered)), iota(10));
    }
    {
      SCOPED_TRACE("dispatch_batches, 2 loader threads on process 0");
      auto got =
          map_epoch(world, 10, {.batch_size = 3, .num_workers = 2}, {.dispatch_batches = true});
      for (const auto& r : got) EXPECT_EQ(concat(r.gathered), iota(10));
    }
    {
      SCOPED_TRACE("shuffle, split_batches");
      auto got =
          map_epoch(world, 10, {.batch_size = 2 * world, .shuffle = true}, {.split_batches = true});
      for (const auto& r : got) EXPECT_EQ(sorted(concat(r.gathered)), iota(10));
    }
  }
}

TEST(DataDistributedGather, GatherObjectForMetricsOfStrings) {
  std::vector<std::string> want;
  for (int i = 0; i < 10; ++i) want.push_back(word(i));
  for (int world : {2, 3, 4}) {
    for (bool shuffle : {false, true}) {
      SCOPED_TRACE("world " + std::to_string(world) + (shuffle ? " shuffled" : ""));
      std::vector<std::vector<std::string>> got(static_cast<size_t>(world));
      run_ranks(
          world,
          [&](PartialState& s) {
            auto gs = std::make_shared<GradientState>();
            DataLoader loader(Words{10}, {.batch_size = 3, .shuffle = shuffle});
            auto mine = accelerate::data::prepare_data_loader(loader, for_rank(s, gs));
            auto& all = got[static_cast<size_t>(s.process_index())];
            for (std::vector<std::string>& batch : mine) {
              EXPECT_EQ(batch.size(), 3u);
              auto g = accelerate::data::gather_object_for_metrics(s, *gs, batch);
              all.insert(all.end(), g.begin(), g.end());
            }
          },
          kRanks);
      for (auto all : got) {
        if (shuffle)
          std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) {
            return std::stoi(a.substr(1)) < std::stoi(b.substr(1));
          });
        EXPECT_EQ(all, want);
      }
    }
  }
}

// ---------------------------------------------------------------------- end_of_dataloader

TEST(DataDistributedGather, EndOfDataloaderOnlyOnTheLastBatch) {
  struct Case {
    int world;
    int64_t length;
    DataLoaderOptions options;
    PrepareDataLoaderOptions prepare;
    int64_t remainder;  // what Accelerate computes: length % total_batch_size, -1 with drop_last
  };
  const std::vector<Case> cases = {
      {2, 10, {.batch_size = 3}, {}, 4},
      {3, 10, {.batch_size = 3}, {}, 1},
      {4, 10, {.batch_size = 3}, {}, 10},
      {2, 12, {.batch_size = 3}, {}, 0},
      {2, 10, {.batch_size = 4}, {.split_batches = true}, 2},
      {3, 10, {.batch_size = 3}, {.even_batches = false}, 1},
      {2, 10, {.batch_size = 3, .drop_last = true}, {}, -1},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE("world " + std::to_string(c.world) + " length " + std::to_string(c.length) +
                 " batch " + std::to_string(c.options.batch_size));
    auto got = map_epoch(c.world, c.length, c.options, c.prepare);
    for (int rank = 0; rank < c.world; ++rank) {
      const auto& r = got[static_cast<size_t>(rank)];
      ASSERT_FALSE(r.batches.empty()) << "rank " << rank;
      std::vector<bool> want(r.batches.size(), false);
      want.back() = true;
      EXPECT_EQ(r.end_flags, want) << "rank " << rank;
      EXPECT_EQ(r.loader_end_flags, want) << "rank " << rank;
      EXPECT_EQ(r.remainders.back(), c.remainder) << "rank " << rank;
      EXPECT_EQ(r.size, static_cast<int64_t>(r.batches.size())) << "rank " << rank;
    }
  }
}

// ---------------------------------------------------------------------- shuffling

namespace {

// Epochs of a shuffled loader over Numbers{length} on `world` ranks: the gathered index batches
// of every epoch, per rank. `local_generator(rank)` is the generator that rank's loader is given
// (nullopt: none); `perturb(rank, loader)` runs after prepare.
struct ShuffleRun {
  int world = 2;
  int64_t length = 12;
  int64_t batch_size = 2;
  int epochs = 2;
  std::function<std::optional<at::Generator>(int)> local_generator;
  std::function<void(int, DataLoader<at::Tensor>&)> perturb;
  PrepareDataLoaderOptions prepare;
};

// [rank][epoch] -> the concatenation of the gathered batches; and [rank][epoch] -> local batches.
struct ShuffleResult {
  std::vector<Batches> gathered;
  std::vector<std::vector<Batches>> local;
};

ShuffleResult shuffle_epochs(const ShuffleRun& run) {
  ShuffleResult out;
  out.gathered.resize(static_cast<size_t>(run.world));
  out.local.resize(static_cast<size_t>(run.world));
  run_ranks(
      run.world,
      [&](PartialState& s) {
        const int rank = s.process_index();
        auto gs = std::make_shared<GradientState>();
        DataLoaderOptions o{.batch_size = run.batch_size, .shuffle = true};
        if (run.local_generator) o.generator = run.local_generator(rank);
        DataLoader loader(Numbers{run.length}, o);
        auto mine = accelerate::data::prepare_data_loader(loader, for_rank(s, gs, run.prepare));
        if (run.perturb) run.perturb(rank, mine);
        for (int e = 0; e < run.epochs; ++e) {
          Ints all;
          Batches local;
          for (at::Tensor& batch : mine) {
            local.push_back(flat(batch));
            auto g = flat(accelerate::gather(s, batch));
            all.insert(all.end(), g.begin(), g.end());
          }
          out.gathered[static_cast<size_t>(rank)].push_back(all);
          out.local[static_cast<size_t>(rank)].push_back(local);
        }
      },
      kRanks);
  return out;
}

}  // namespace

TEST(DataDistributedShuffle, PrepareGivesTheSamplerAGeneratorThatIsSynchronised) {
  // No generator passed: prepare gives the sampler one. Each rank then reseeds it differently
  // on purpose; the synchronisation at the start of the epoch copies rank 0's state to all.
  ShuffleRun run;
  run.perturb = [](int rank, DataLoader<at::Tensor>& loader) {
    auto sampler = loader.batch_sampler()->sampler();
    ASSERT_TRUE(sampler->generator().has_value()) << "prepare did not give the sampler a generator";
    at::Generator g = *sampler->generator();
    std::lock_guard<std::mutex> lock(g.mutex());
    g.set_current_seed(100 + static_cast<uint64_t>(rank));
  };
  auto r = shuffle_epochs(run);
  for (int rank = 0; rank < run.world; ++rank) {
    const auto& epochs = r.gathered[static_cast<size_t>(rank)];
    ASSERT_EQ(epochs.size(), 2u);
    // Every index exactly once, and exactly rank 0's permutation.
    EXPECT_EQ(epochs[0], randperm(12, 100)) << "rank " << rank;
    EXPECT_EQ(sorted(epochs[1]), iota(12)) << "rank " << rank;
    EXPECT_NE(epochs[0], epochs[1]) << "rank " << rank;
  }
  // Epoch 1 continues rank 0's generator stream.
  auto gen = at::make_generator<at::CPUGeneratorImpl>(100);
  (void)at::randperm(12, gen, at::TensorOptions().dtype(at::kLong));
  EXPECT_EQ(r.gathered[0][1], flat(at::randperm(12, gen, at::TensorOptions().dtype(at::kLong))));
  // Rank 0 holds batches 0, 2, 4 of the permutation; rank 1 batches 1, 3, 5.
  const Ints perm = randperm(12, 100);
  EXPECT_EQ(r.local[0][0], (Batches{{perm[0], perm[1]}, {perm[4], perm[5]}, {perm[8], perm[9]}}));
  EXPECT_EQ(r.local[1][0], (Batches{{perm[2], perm[3]}, {perm[6], perm[7]}, {perm[10], perm[11]}}));
}

TEST(DataDistributedShuffle, WithoutAGeneratorEveryRankFollowsRankZeroSeededFromTheGlobalOne) {
  // The generator prepare adds is seeded from the global generator, as in Accelerate
  // (`torch.empty((), dtype=torch.int64).random_()`), so at::manual_seed decides the shuffle.
  // The ranks are threads sharing one global generator and draw in no fixed order, so rank 0
  // holds one of the first three draws; synchronisation hands its state to the others.
  constexpr uint64_t kSeed = 4242;
  at::manual_seed(kSeed);
  std::vector<Ints> candidates;
  for (int i = 0; i < 3; ++i) {
    const auto seed = at::empty({}, at::kLong).random_().item<int64_t>();
    candidates.push_back(randperm(12, static_cast<uint64_t>(seed)));
  }
  at::manual_seed(kSeed);
  ShuffleRun run;
  run.world = 3;
  auto r = shuffle_epochs(run);
  for (int rank = 0; rank < run.world; ++rank) {
    EXPECT_EQ(r.gathered[static_cast<size_t>(rank)][0], r.gathered[0][0]);
    EXPECT_EQ(sorted(r.gathered[static_cast<size_t>(rank)][0]), iota(12));
  }
  EXPECT_NE(std::find(candidates.begin(), candidates.end(), r.gathered[0][0]), candidates.end())
      << "rank 0's shuffle does not come from the global generator";
  EXPECT_NE(r.gathered[0][0], randperm(12, c10::default_rng_seed_val));
}

TEST(DataDistributedShuffle, DifferentLocalGeneratorsAreSynchronisedFromRankZero) {
  ShuffleRun run;
  run.world = 3;
  run.length = 12;
  run.local_generator = [](int rank) {
    return at::make_generator<at::CPUGeneratorImpl>(100 + static_cast<uint64_t>(rank));
  };
  auto first = shuffle_epochs(run);
  auto second = shuffle_epochs(run);
  for (int rank = 0; rank < run.world; ++rank) {
    const auto& epochs = first.gathered[static_cast<size_t>(rank)];
    EXPECT_EQ(epochs[0], randperm(12, 100)) << "rank " << rank;
    EXPECT_EQ(sorted(epochs[1]), iota(12)) << "rank " << rank;
    EXPECT_NE(epochs[0], epochs[1]) << "rank " << rank;
    // Two runs with the same seeds agree.
    EXPECT_EQ(second.gathered[static_cast<size_t>(rank)], epochs) << "rank " << rank;
  }

  // Without synchronisation each rank follows its own generator: proof that the agreement
  // above comes from the synchronisation.
  run.prepare.rng_types = {};
  auto unsynced = shuffle_epochs(run);
  for (int rank = 0; rank < run.world; ++rank) {
    const Ints own = randperm(12, 100 + static_cast<uint64_t>(rank));
    Batches want;
    for (size_t b = static_cast<size_t>(rank); b < 6; b += 3)
      want.push_back({own[2 * b], own[2 * b + 1]});
    EXPECT_EQ(unsynced.local[static_cast<size_t>(rank)][0], want) << "rank " << rank;
  }
  // ... so the ranks' batches together are no longer a permutation.
  EXPECT_NE(sorted(unsynced.gathered[0][0]), iota(12)) << describe({unsynced.gathered[0][0]});
}

TEST(DataDistributedShuffle, SeedableSamplerOrdersEpochByDataSeedPlusEpoch) {
  const int world = 2;
  const int64_t length = 12;
  std::vector<std::vector<Ints>> got(world);
  run_ranks(
      world,
      [&](PartialState& s) {
        auto gs = std::make_shared<GradientState>();
        // Local generators differ; the seedable sampler replaces them.
        DataLoader loader(Numbers{length}, {.batch_size = 2,
                                            .shuffle = true,
                                            .generator = at::make_generator<at::CPUGeneratorImpl>(
                                                500 + static_cast<uint64_t>(s.process_index()))});
        auto mine = accelerate::data::prepare_data_loader(
            loader, for_rank(s, gs, {.use_seedable_sampler = true, .data_seed = 7}));
        EXPECT_NE(dynamic_cast<accelerate::data::SeedableRandomSampler*>(
                      mine.batch_sampler()->sampler().get()),
                  nullptr);
        auto epoch = [&] {
          Ints all;
          for (at::Tensor& batch : mine) {
            auto g = flat(accelerate::gather(s, batch));
            all.insert(all.end(), g.begin(), g.end());
          }
          return all;
        };
        auto& mine_got = got[static_cast<size_t>(s.process_index())];
        mine_got.push_back(epoch());  // epoch 0
        mine_got.push_back(epoch());  // epoch 1
        mine.set_epoch(3);
        mine_got.push_back(epoch());  // epoch 3
        EXPECT_EQ(mine.iteration(), 4);
      },
      kRanks);
  for (int rank = 0; rank < world; ++rank) {
    const auto& g = got[static_cast<size_t>(rank)];
    ASSERT_EQ(g.size(), 3u);
    EXPECT_EQ(g[0], randperm(length, 7)) << "rank " << rank;
    EXPECT_EQ(g[1], randperm(length, 8)) << "rank " << rank;
    EXPECT_EQ(g[2], randperm(length, 10)) << "rank " << rank;
  }
}

// ---------------------------------------------------------------------- dispatch_batches

TEST(DataDistributedDispatch, MapStyleDispatchFromRankZero) {
  for (int world : {2, 3, 4}) {
    for (bool split : {false, true}) {
      const int64_t batch_size = split ? 2 * world : 3;
      SCOPED_TRACE("world " + std::to_string(world) + (split ? " split" : ""));
      std::vector<std::atomic<int64_t>> calls(static_cast<size_t>(world));
      std::vector<RankEpoch> got(static_cast<size_t>(world));
      run_ranks(
          world,
          [&](PartialState& s) {
            const auto rank = static_cast<size_t>(s.process_index());
            auto gs = std::make_shared<GradientState>();
            DataLoader loader(Numbers{10, &calls[rank]}, {.batch_size = batch_size});
            auto mine = accelerate::data::prepare_data_loader(
                loader, for_rank(s, gs, {.split_batches = split, .dispatch_batches = true}));
            EXPECT_TRUE(mine.dispatches());
            got[rank] = run_epoch(s, mine, *gs);
          },
          kRanks);
      for (int rank = 0; rank < world; ++rank) {
        const auto& r = got[static_cast<size_t>(rank)];
        EXPECT_EQ(r.batches, dispatch_reference(10, batch_size, world, split, rank))
            << "rank " << rank << " got " << describe(r.batches);
        EXPECT_EQ(r.size, static_cast<int64_t>(r.batches.size())) << "rank " << rank;
        EXPECT_EQ(concat(r.gathered), iota(10)) << "rank " << rank << describe(r.gathered);
        std::vector<bool> want(r.batches.size(), false);
        if (!want.empty()) want.back() = true;
        EXPECT_EQ(r.end_flags, want) << "rank " << rank;
        EXPECT_EQ(calls[static_cast<size_t>(rank)].load(), rank == 0 ? 10 : 0) << "rank " << rank;
      }
    }
  }
}

TEST(DataDistributedDispatch, ReferenceSpotValues) {
  // The reference model itself, on the cases worked out by hand from DataLoaderDispatcher.
  // 3 ranks, 10 by 3: group {0..8}, then {9} padded with {0,1,2}: one row each.
  EXPECT_EQ(dispatch_reference(10, 3, 3, false, 0), (Batches{{0, 1, 2}, {9}}));
  EXPECT_EQ(dispatch_reference(10, 3, 3, false, 1), (Batches{{3, 4, 5}, {0}}));
  EXPECT_EQ(dispatch_reference(10, 3, 3, false, 2), (Batches{{6, 7, 8}, {1}}));
  // 4 ranks, 10 by 3: one group of 10 rows padded with {0,1,2,3}: 3 rows each.
  EXPECT_EQ(dispatch_reference(10, 3, 4, false, 3), (Batches{{9, 0, 1}}));
  // 2 ranks: {0..5}, then {6,7,8,9} divides.
  EXPECT_EQ(dispatch_reference(10, 3, 2, false, 1), (Batches{{3, 4, 5}, {8, 9}}));
}

TEST(DataDistributedDispatch, IterableDatasetDispatchesByDefault) {
  for (int world : {2, 3, 4}) {
    for (bool split : {false, true}) {
      const int64_t batch_size = split ? 2 * world : 3;
      SCOPED_TRACE("world " + std::to_string(world) + (split ? " split" : ""));
      std::vector<std::atomic<int64_t>> nexts(static_cast<size_t>(world));
      std::vector<std::atomic<int64_t>> resets(static_cast<size_t>(world));
      std::vector<RankEpoch> got(static_cast<size_t>(world));
      run_ranks(
          world,
          [&](PartialState& s) {
            const auto rank = static_cast<size_t>(s.process_index());
            auto gs = std::make_shared<GradientState>();
            DataLoader loader(Stream{11, &nexts[rank], &resets[rank]}, {.batch_size = batch_size});
            auto mine = accelerate::data::prepare_data_loader(
                loader, for_rank(s, gs, {.split_batches = split}));
            EXPECT_TRUE(mine.dispatches());
            got[rank] = run_epoch(s, mine, *gs, /*gather=*/true, /*sized=*/false);
          },
          kRanks);
      for (int rank = 0; rank < world; ++rank) {
        const auto& r = got[static_cast<size_t>(rank)];
        EXPECT_EQ(r.batches, dispatch_reference(11, batch_size, world, split, rank))
            << "rank " << rank << " got " << describe(r.batches);
        EXPECT_EQ(concat(r.gathered), iota(11)) << "rank " << rank << describe(r.gathered);
        std::vector<bool> want(r.batches.size(), false);
        if (!want.empty()) want.back() = true;
        EXPECT_EQ(r.end_flags, want) << "rank " << rank;
        // 11 items and the end of the stream, read by rank 0 only.
        EXPECT_EQ(nexts[static_cast<size_t>(rank)].load(), rank == 0 ? 12 : 0) << "rank " << rank;
        EXPECT_EQ(resets[static_cast<size_t>(rank)].load(), rank == 0 ? 1 : 0) << "rank " << rank;
      }
    }
  }
}

TEST(DataDistributedDispatch, IterableTensorItemsWithSize) {
  // 2-D batches ([rows, 2]) are sliced by rows; the loader knows its length from size().
  const int world = 3;
  std::vector<std::atomic<int64_t>> nexts(world);
  std::vector<RankEpoch> got(world);
  std::vector<int64_t> sizes(world);
  run_ranks(
      world,
      [&](PartialState& s) {
        const auto rank = static_cast<size_t>(s.process_index());
        auto gs = std::make_shared<GradientState>();
        DataLoader loader(SizedTensorStream{10, &nexts[rank]}, {.batch_size = 3});
        auto mine = accelerate::data::prepare_data_loader(loader, for_rank(s, gs));
        sizes[rank] = mine.size();
        RankEpoch r;
        for (at::Tensor& batch : mine) {
          EXPECT_EQ(batch.dim(), 2);
          r.batches.push_back(flat(batch.select(1, 0)));
          EXPECT_TRUE(at::equal(batch.select(1, 1), batch.select(1, 0) + 100));
          r.gathered.push_back(
              flat(accelerate::data::gather_for_metrics(s, *gs, batch).select(1, 0)));
        }
        got[rank] = r;
      },
      kRanks);
  for (int rank = 0; rank < world; ++rank) {
    const auto& r = got[static_cast<size_t>(rank)];
    EXPECT_EQ(r.batches, dispatch_reference(10, 3, world, false, rank)) << describe(r.batches);
    EXPECT_EQ(sizes[static_cast<size_t>(rank)], static_cast<int64_t>(r.batches.size()));
    EXPECT_EQ(concat(r.gathered), iota(10));
    EXPECT_EQ(nexts[static_cast<size_t>(rank)].load(), rank == 0 ? 11 : 0) << "rank " << rank;
  }
}

// ---------------------------------------------------------------------- iterable sharding

TEST(DataDistributedIterable, IterableDatasetShardWithoutDispatch) {
  struct Case {
    int world;
    int64_t length;
    int64_t batch_size;
    bool split;
    std::vector<Batches> expected;
  };
  const std::vector<Case> cases = {
      // Chunks of 4: {0,1,2,3}, then {4,5,6} completed from the first chunk to {4,5,6,0}.
      {2, 7, 2, false, {{{0, 1}, {4, 5}}, {{2, 3}, {6, 0}}}},
      // Chunks of 6: {0..5}, then {6} completed to {6,0,1,2,3,4}.
      {3, 7, 2, false, {{{0, 1}, {6, 0}}, {{2, 3}, {1, 2}}, {{4, 5}, {3, 4}}}},
      // split_batches: chunks of the global batch 4.
      {2, 7, 4, true, {{{0, 1}, {4, 5}}, {{2, 3}, {6, 0}}}},
      {2, 8, 2, false, {{{0, 1}, {4, 5}}, {{2, 3}, {6, 7}}}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE("world " + std::to_string(c.world) + " length " + std::to_string(c.length) +
                 (c.split ? " split" : ""));
    std::vector<RankEpoch> got(static_cast<size_t>(c.world));
    run_ranks(
        c.world,
        [&](PartialState& s) {
          auto gs = std::make_shared<GradientState>();
          DataLoader loader(Stream{c.length}, {.batch_size = c.batch_size});
          auto mine = accelerate::data::prepare_data_loader(
              loader, for_rank(s, gs, {.split_batches = c.split, .dispatch_batches = false}));
          EXPECT_FALSE(mine.dispatches());
          got[static_cast<size_t>(s.process_index())] =
              run_epoch(s, mine, *gs, /*gather=*/true, /*sized=*/false);
        },
        kRanks);
    for (int rank = 0; rank < c.world; ++rank) {
      const auto& r = got[static_cast<size_t>(rank)];
      EXPECT_EQ(r.batches, c.expected[static_cast<size_t>(rank)])
          << "rank " << rank << " got " << describe(r.batches);
      std::vector<bool> want(r.batches.size(), false);
      if (!want.empty()) want.back() = true;
      EXPECT_EQ(r.end_flags, want) << "rank " << rank;
    }
  }
}

TEST(DataDistributedIterable, SizedIterableShardGathersEverySampleOnce) {
  // With size(), the remainder is known: gather_for_metrics drops the completed samples.
  for (int world : {2, 3, 4}) {
    SCOPED_TRACE("world " + std::to_string(world));
    std::vector<RankEpoch> got(static_cast<size_t>(world));
    std::vector<int64_t> sizes(static_cast<size_t>(world));
    run_ranks(
        world,
        [&](PartialState& s) {
          auto gs = std::make_shared<GradientState>();
          DataLoader loader(SizedTensorStream{7}, {.batch_size = 2});
          auto mine = accelerate::data::prepare_data_loader(
              loader, for_rank(s, gs, {.dispatch_batches = false}));
          sizes[static_cast<size_t>(s.process_index())] = mine.size();
          RankEpoch r;
          for (at::Tensor& batch : mine) {
            r.batches.push_back(flat(batch.select(1, 0)));
            r.gathered.push_back(
                flat(accelerate::data::gather_for_metrics(s, *gs, batch).select(1, 0)));
          }
          got[static_cast<size_t>(s.process_index())] = r;
        },
        kRanks);
    for (int rank = 0; rank < world; ++rank) {
      const auto& r = got[static_cast<size_t>(rank)];
      EXPECT_EQ(concat(r.gathered), iota(7)) << "rank " << rank << describe(r.gathered);
      EXPECT_EQ(sizes[static_cast<size_t>(rank)], static_cast<int64_t>(r.batches.size()));
    }
  }
}

// ---------------------------------------------------------------------- resuming

TEST(DataDistributedResume, PositionResumesMidEpochOnEveryRank) {
  constexpr int world = 2;
  static constexpr int64_t length = 14;
  // Local generators differ on purpose: the saved state must be the synchronised one.
  auto make = [](PartialState& s, const std::shared_ptr<GradientState>& gs) {
    DataLoader loader(Numbers{length}, {.batch_size = 2,
                                        .shuffle = true,
                                        .generator = at::make_generator<at::CPUGeneratorImpl>(
                                            100 + static_cast<uint64_t>(s.process_index()))});
    return accelerate::data::prepare_data_loader(loader, for_rank(s, gs));
  };
  // [rank] -> epochs 0, 1, 2 of an uninterrupted run.
  std::vector<std::vector<Batches>> full(world);
  // [rank] -> what the resumed loader yields: the rest of epoch 1, then epoch 2.
  std::vector<std::vector<Batches>> resumed(world);
  std::vector<accelerate::data::LoaderPosition> positions(world);
  run_ranks(
      world,
      [&](PartialState& s) {
        const auto rank = static_cast<size_t>(s.process_index());
        auto gs = std::make_shared<GradientState>();
        {
          auto loader = make(s, gs);
          for (int e = 0; e < 3; ++e) {
            Batches b;
            for (at::Tensor& batch : loader) b.push_back(flat(batch));
            full[rank].push_back(b);
          }
        }
        // Interrupted run: epoch 0, then two batches of epoch 1.
        accelerate::data::LoaderPosition pos;
        {
          auto loader = make(s, gs);
          for ([[maybe_unused]] at::Tensor& batch : loader) {
          }
          int64_t seen = 0;
          for ([[maybe_unused]] at::Tensor& batch : loader) {
            if (++seen == 2) {
              pos = loader.position();
              break;
            }
          }
        }
        positions[rank] = pos;
        // A fresh loader (a restarted program) continues from the position.
        auto loader = make(s, gs);
        loader.set_position(pos);
        for (int e = 0; e < 2; ++e) {
          Batches b;
          for (at::Tensor& batch : loader) b.push_back(flat(batch));
          resumed[rank].push_back(b);
        }
        EXPECT_EQ(loader.iteration(), 3);
      },
      kRanks);
  for (int rank = 0; rank < world; ++rank) {
    const auto r = static_cast<size_t>(rank);
    ASSERT_EQ(full[r].size(), 3u);
    ASSERT_EQ(full[r][1].size(), 4u) << describe(full[r][1]);
    EXPECT_EQ(positions[r].epoch, 1);
    EXPECT_EQ(positions[r].batches_yielded, 2);
    EXPECT_FALSE(positions[r].sampler_state.empty());
    EXPECT_EQ(positions[r].sampler_state, positions[0].sampler_state) << "rank " << rank;
    EXPECT_EQ(resumed[r][0], Batches(full[r][1].begin() + 2, full[r][1].end())) << "rank " << rank;
    EXPECT_EQ(resumed[r][1], full[r][2]) << "rank " << rank;
  }
  // And the uninterrupted run is rank 0's permutation, shared out round-robin.
  Ints all;
  for (size_t b = 0; b < full[0][0].size(); ++b) {
    for (int rank = 0; rank < world; ++rank) {
      const auto& batch = full[static_cast<size_t>(rank)][0][b];
      all.insert(all.end(), batch.begin(), batch.end());
    }
  }
  // The last round is completed from the start: the first `length` samples are the permutation.
  ASSERT_GE(all.size(), static_cast<size_t>(length));
  EXPECT_EQ(Ints(all.begin(), all.begin() + length), randperm(length, 100));
}

// ---------------------------------------------------------------------- bad input

TEST(DataDistributedErrors, SplitBatchesNeedsADivisibleBatchSize) {
  auto errors = run_ranks_collect(
      2,
      [](PartialState& s) {
        auto gs = std::make_shared<GradientState>();
        DataLoader loader(Numbers{10}, {.batch_size = 3});
        accelerate::data::prepare_data_loader(loader, for_rank(s, gs, {.split_batches = true}));
      },
      kRanks);
  for (const auto& e : errors) {
    const auto msg = message(e);
    EXPECT_NE(msg.find("split_batches"), std::string::npos) << msg;
    EXPECT_NE(msg.find("(3)"), std::string::npos) << msg;
    EXPECT_NE(msg.find("(2)"), std::string::npos) << msg;
  }
  errors = run_ranks_collect(
      3,
      [](PartialState& s) {
        auto gs = std::make_shared<GradientState>();
        DataLoader loader(Stream{10}, {.batch_size = 4});
        accelerate::data::prepare_data_loader(loader, for_rank(s, gs, {.split_batches = true}));
      },
      kRanks);
  for (const auto& e : errors) {
    const auto msg = message(e);
    EXPECT_NE(msg.find("(4)"), std::string::npos) << msg;
    EXPECT_NE(msg.find("(3)"), std::string::npos) << msg;
  }
}

TEST(DataDistributedErrors, PreparingAPreparedLoaderIsAnError) {
  auto errors = run_ranks_collect(
      2,
      [](PartialState& s) {
        auto gs = std::make_shared<GradientState>();
        DataLoader loader(Numbers{10}, {.batch_size = 2});
        auto once = accelerate::data::prepare_data_loader(loader, for_rank(s, gs));
        accelerate::data::prepare_data_loader(once, for_rank(s, gs));
      },
      kRanks);
  for (const auto& e : errors) {
    const auto msg = message(e);
    EXPECT_NE(msg.find("already prepared"), std::string::npos) << msg;
  }
}
