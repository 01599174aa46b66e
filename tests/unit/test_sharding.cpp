// sharding.h against Accelerate: an independent reference model (the Python generators of
// BatchSamplerShard, IterableDatasetShard and DataLoaderDispatcher, transliterated line by line
// into loops that append to a vector) over a grid of dataset lengths, batch sizes and process
// layouts, plus invariants that do not depend on either model, plus hand-derived cases.

#include <accelerate/data/sharding.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace {

using accelerate::data::BatchShardOptions;
using accelerate::data::IterableShardOptions;
using List = std::vector<int64_t>;
using Batches = std::vector<List>;

// ------------------------------------------------------------------ Python list helpers

int64_t len(const List& v) {
  return static_cast<int64_t>(v.size());
}

// v[begin:end] for non-negative bounds.
List py_slice(const List& v, int64_t begin, int64_t end) {
  begin = std::min(begin, len(v));
  end = std::min(end, len(v));
  if (begin >= end) return {};
  return List(v.begin() + begin, v.begin() + end);
}

List plus(const List& a, const List& b) {
  List out = a;
  out.insert(out.end(), b.begin(), b.end());
  return out;
}

// torch.utils.data.BatchSampler over SequentialSampler(length).
Batches sequential_batches(int64_t length, int64_t batch_size, bool drop_last) {
  Batches out;
  List batch;
  for (int64_t i = 0; i < length; ++i) {
    batch.push_back(i);
    if (len(batch) == batch_size) {
      out.push_back(batch);
      batch.clear();
    }
  }
  if (!batch.empty() && !drop_last) out.push_back(batch);
  return out;
}

// ------------------------------------------------------------------ reference: Accelerate

// BatchSamplerShard._iter_with_split.
Batches ref_iter_with_split(const Batches& batch_sampler, int64_t batch_size, bool drop_last,
                            int num_processes, int process_index, bool even_batches) {
  Batches yielded;
  List initial_data;
  const int64_t batch_length = batch_size / num_processes;
  List batch;
  for (size_t idx = 0; idx < batch_sampler.size(); ++idx) {
    batch = batch_sampler[idx];
    if (idx == 0) initial_data = batch;
    if (len(batch) == batch_size) {
      yielded.push_back(
          py_slice(batch, batch_length * process_index, batch_length * (process_index + 1)));
    }
  }
  // `initial_data = batch` binds the same Python list: with a single batch, the in-place
  // doubling of initial_data below grows `batch` too.
  const bool aliased = batch_sampler.size() == 1;
  if (!drop_last && len(initial_data) > 0 && len(batch) < batch_size) {
    if (!even_batches) {
      if (len(batch) > batch_length * process_index) {
        yielded.push_back(
            py_slice(batch, batch_length * process_index, batch_length * (process_index + 1)));
      }
    } else {
      while (len(initial_data) < batch_size) {
        initial_data = plus(initial_data, initial_data);
        if (aliased) batch = initial_data;
      }
      batch = plus(batch, initial_data);
      yielded.push_back(
          py_slice(batch, batch_length * process_index, batch_length * (process_index + 1)));
    }
  }
  return yielded;
}

// BatchSamplerShard._iter_with_no_split.
Batches ref_iter_with_no_split(const Batches& batch_sampler, std::optional<int64_t> batch_size,
                               bool drop_last, int num_processes, int process_index,
                               bool even_batches) {
  Batches yielded;
  List initial_data;
  List batch_to_yield;
  List batch;
  int64_t idx = 0;
  for (size_t i = 0; i < batch_sampler.size(); ++i) {
    idx = static_cast<int64_t>(i);
    batch = batch_sampler[i];
    if (!drop_last && idx < num_processes) initial_data = plus(initial_data, batch);
    if (idx % num_processes == process_index) batch_to_yield = batch;
    if (idx % num_processes == num_processes - 1 &&
        (!batch_size.has_value() || len(batch) == *batch_size)) {
      yielded.push_back(batch_to_yield);
      batch_to_yield = {};
    }
  }
  if (!drop_last && len(initial_data) > 0) {
    if (!even_batches) {
      if (len(batch_to_yield) > 0) yielded.push_back(batch_to_yield);
    } else {
      const int64_t bs = *batch_size;
      if (len(batch_to_yield) == bs) yielded.push_back(batch_to_yield);
      while (len(initial_data) < num_processes * bs)
        initial_data = plus(initial_data, initial_data);
      if (len(batch) == bs) {
        batch = {};
        idx += 1;
      }
      int64_t cycle_index = 0;
      while (idx % num_processes != 0 || len(batch) > 0) {
        const int64_t end_index = cycle_index + bs - len(batch);
        batch = plus(batch, py_slice(initial_data, cycle_index, end_index));
        if (idx % num_processes == process_index) yielded.push_back(batch);
        cycle_index = end_index;
        batch = {};
        idx += 1;
      }
    }
  }
  return yielded;
}

// BatchSamplerShard.__len__.
int64_t ref_len(int64_t num_batches, bool split_batches, bool drop_last, bool even_batches,
                int num_processes, int process_index) {
  if (split_batches) return num_batches;
  if (num_batches % num_processes == 0) return num_batches / num_processes;
  const int64_t length = num_batches / num_processes;
  if (drop_last) return length;
  if (even_batches) return length + 1;
  return process_index < num_batches % num_processes ? length + 1 : length;
}

// IterableDatasetShard.__iter__ over range(length), followed by the per-process DataLoader
// batching of its items.
Batches ref_iterable(int64_t length, int64_t batch_size, bool drop_last, int num_processes,
                     int process_index, bool split_batches) {
  List items;
  const int64_t real_batch_size = split_batches ? batch_size : batch_size * num_processes;
  const int64_t process_batch_size = split_batches ? batch_size / num_processes : batch_size;
  const int64_t slice_begin = process_index * process_batch_size;
  const int64_t slice_end = (process_index + 1) * process_batch_size;
  std::optional<List> first_batch;
  List current_batch;
  for (int64_t element = 0; element < length; ++element) {
    current_batch.push_back(element);
    if (len(current_batch) == real_batch_size) {
      for (int64_t i = slice_begin; i < slice_end; ++i) items.push_back(current_batch[i]);
      if (!first_batch) first_batch = current_batch;
      current_batch = {};
    }
  }
  if (!drop_last && len(current_batch) > 0) {
    if (!first_batch) first_batch = current_batch;
    while (len(current_batch) < real_batch_size) current_batch = plus(current_batch, *first_batch);
    for (int64_t i = slice_begin; i < slice_end; ++i) items.push_back(current_batch[i]);
  }
  const int64_t loader_batch_size = split_batches ? batch_size / num_processes : batch_size;
  Batches out;
  List batch;
  for (int64_t item : items) {
    batch.push_back(item);
    if (len(batch) == loader_batch_size) {
      out.push_back(batch);
      batch.clear();
    }
  }
  if (!batch.empty() && !drop_last) out.push_back(batch);
  return out;
}

// DataLoaderDispatcher._fetch_batches and __iter__ as seen by one process, with each base batch
// given as its rows. `raised` reports Accelerate's ValueError for an empty base loader.
struct RefDispatch {
  Batches yielded;
  int64_t remainder = -1;
  bool raised = false;
};

RefDispatch ref_dispatch(const Batches& base_loader, bool split_batches, bool drop_last,
                         int num_processes, int process_index) {
  RefDispatch r;
  size_t main_iterator = 0;
  bool self_stop_iteration = false;
  // Returns `batch`; nullopt stands for batch_info[0] being None.
  auto fetch_batches = [&]() -> std::optional<List> {
    std::optional<List> batch;
    std::optional<Batches> batches;
    bool stop;
    if (split_batches) {
      stop = main_iterator == base_loader.size();
      if (!stop) batch = base_loader[main_iterator++];
    } else {
      batches = Batches{};
      stop = false;
      for (int i = 0; i < num_processes; ++i) {
        if (main_iterator == base_loader.size()) {
          stop = true;
          break;
        }
        batches->push_back(base_loader[main_iterator++]);
      }
      if (!stop) {
        batch = List{};
        for (const auto& b : *batches) batch = plus(*batch, b);
      }
    }
    self_stop_iteration = stop;
    if (self_stop_iteration) {
      if (!split_batches && !drop_last) {
        if (batches && !batches->empty()) {
          batch = List{};
          for (const auto& b : *batches) batch = plus(*batch, b);
        } else {
          batch = std::nullopt;
        }
      }
    }
    return batch;
  };

  bool stop_iteration = false;
  std::optional<List> first_batch;
  std::optional<List> next_batch = fetch_batches();
  while (!stop_iteration) {
    std::optional<List> batch = next_batch;
    if (!drop_last && !first_batch && batch) first_batch = py_slice(*batch, 0, num_processes);
    if (!batch) {
      r.raised = true;
      return r;
    }
    const int64_t observed_batch_size = len(*batch);
    int64_t batch_size = observed_batch_size / num_processes;
    stop_iteration = self_stop_iteration;
    if (!stop_iteration) {
      next_batch = fetch_batches();
      if (self_stop_iteration && !next_batch) stop_iteration = true;
    }
    if (!drop_last && stop_iteration && observed_batch_size % num_processes != 0) {
      batch = plus(*batch, *first_batch);
      batch_size += 1;
    }
    List mine = py_slice(*batch, process_index * batch_size, (process_index + 1) * batch_size);
    if (stop_iteration) r.remainder = observed_batch_size;
    r.yielded.push_back(mine);
  }
  return r;
}

// ------------------------------------------------------------------ grid helpers

std::string show(const Batches& batches) {
  std::ostringstream s;
  s << "{";
  for (const auto& b : batches) {
    s << "{";
    for (size_t i = 0; i < b.size(); ++i) s << (i ? "," : "") << b[i];
    s << "}";
  }
  s << "}";
  return s.str();
}

struct Config {
  int64_t length;
  int64_t batch_size;
  int num_processes;
  bool split_batches;
  bool even_batches;
  bool drop_last;

  std::string str() const {
    std::ostringstream s;
    s << "length=" << length << " batch_size=" << batch_size << " num_processes=" << num_processes
      << " split_batches=" << split_batches << " even_batches=" << even_batches
      << " drop_last=" << drop_last;
    return s.str();
  }
  // Accelerate refuses split_batches with a batch size that does not divide.
  bool valid() const { return !split_batches || batch_size % num_processes == 0; }
  BatchShardOptions options(int process_index) const {
    return {.num_processes = num_processes,
            .process_index = process_index,
            .batch_size = batch_size,
            .drop_last = drop_last,
            .split_batches = split_batches,
            .even_batches = even_batches};
  }
};

std::vector<Config> grid() {
  std::vector<Config> out;
  for (int64_t length = 1; length <= 33; ++length)
    for (int64_t bs = 1; bs <= 5; ++bs)
      for (int n : {2, 3, 4})
        for (bool split : {false, true})
          for (bool even : {false, true})
            for (bool drop : {false, true}) out.push_back({length, bs, n, split, even, drop});
  return out;
}

std::map<int64_t, int> count_samples(const std::vector<Batches>& per_process) {
  std::map<int64_t, int> counts;
  for (const auto& batches : per_process)
    for (const auto& b : batches)
      for (int64_t x : b) ++counts[x];
  return counts;
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// ------------------------------------------------------------------ BatchSamplerShard

TEST(ShardingBatches, MatchesAccelerateOnGrid) {
  int checked = 0;
  for (const Config& c : grid()) {
    if (!c.valid()) continue;
    const Batches sampler = sequential_batches(c.length, c.batch_size, c.drop_last);
    for (int p = 0; p < c.num_processes; ++p) {
      const Batches expected = c.split_batches
                                   ? ref_iter_with_split(sampler, c.batch_size, c.drop_last,
                                                         c.num_processes, p, c.even_batches)
                                   : ref_iter_with_no_split(sampler, c.batch_size, c.drop_last,
                                                            c.num_processes, p, c.even_batches);
      const Batches got = accelerate::data::shard_batches(sampler, c.options(p));
      ASSERT_EQ(show(got), show(expected)) << c.str() << " process " << p;
      ++checked;
    }
  }
  EXPECT_GT(checked, 3000);
}

TEST(ShardingBatches, SplitBatchesNeedsDivisibleBatchSize) {
  for (const Config& c : grid()) {
    if (c.valid()) continue;
    const Batches sampler = sequential_batches(c.length, c.batch_size, c.drop_last);
    try {
      accelerate::data::shard_batches(sampler, c.options(0));
      FAIL() << "no error for " << c.str();
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what()).find("round multiple of the number of processes"),
                std::string::npos)
          << e.what();
    }
    EXPECT_THROW(
        accelerate::data::sharded_length(static_cast<int64_t>(sampler.size()), c.options(0)),
        c10::Error);
  }
}

// (a) even_batches without drop_last: the same number of batches everywhere, all full.
TEST(ShardingBatches, EvenBatchesGiveEveryProcessTheSameFullBatches) {
  for (const Config& c : grid()) {
    if (!c.valid() || !c.even_batches || c.drop_last) continue;
    const Batches sampler = sequential_batches(c.length, c.batch_size, false);
    const int64_t full = c.split_batches ? c.batch_size / c.num_processes : c.batch_size;
    std::optional<size_t> count;
    for (int p = 0; p < c.num_processes; ++p) {
      const Batches got = accelerate::data::shard_batches(sampler, c.options(p));
      if (!count) count = got.size();
      ASSERT_EQ(got.size(), *count) << c.str() << " process " << p;
      ASSERT_GE(got.size(), 1U) << c.str();
      for (const auto& b : got) ASSERT_EQ(len(b), full) << c.str() << " process " << p;
    }
  }
}

// (b) coverage and exact duplication; (c) no duplicates without even_batches or with drop_last.
TEST(ShardingBatches, CoverageAndDuplicatesMatchGatherArithmetic) {
  for (const Config& c : grid()) {
    if (!c.valid()) continue;
    const Batches sampler = sequential_batches(c.length, c.batch_size, c.drop_last);
    std::vector<Batches> per_process;
    int64_t yielded = 0;
    for (int p = 0; p < c.num_processes; ++p) {
      per_process.push_back(accelerate::data::shard_batches(sampler, c.options(p)));
      for (const auto& b : per_process.back()) yielded += len(b);
    }
    const auto counts = count_samples(per_process);
    // The samples that must be seen: everything without drop_last; with it, the full batches,
    // and without split_batches only the complete rounds of them.
    int64_t kept = c.length;
    if (c.drop_last) {
      const int64_t full_batches = c.length / c.batch_size;
      const int64_t used =
          c.split_batches ? full_batches : full_batches / c.num_processes * c.num_processes;
      kept = used * c.batch_size;
    }
    for (int64_t i = 0; i < kept; ++i) {
      ASSERT_TRUE(counts.count(i)) << c.str() << ": sample " << i << " never yielded";
    }
    ASSERT_EQ(static_cast<int64_t>(counts.size()), kept) << c.str() << ": stray samples";
    if (c.even_batches && !c.drop_last) {
      const int64_t total = c.split_batches ? c.batch_size : c.batch_size * c.num_processes;
      const int64_t rounds = ceil_div(c.length, total);
      ASSERT_EQ(yielded - c.length, rounds * total - c.length) << c.str();
    } else {
      ASSERT_EQ(yielded, kept) << c.str() << ": duplicated samples";
    }
  }
}

// (d) the length Accelerate reports is what is yielded, but for its one miscount.
TEST(ShardingBatches, ShardedLengthMatchesYieldedCount) {
  int miscounts = 0;
  for (const Config& c : grid()) {
    if (!c.valid()) continue;
    const Batches sampler = sequential_batches(c.length, c.batch_size, c.drop_last);
    const auto num_batches = static_cast<int64_t>(sampler.size());
    for (int p = 0; p < c.num_processes; ++p) {
      const auto got =
          static_cast<int64_t>(accelerate::data::shard_batches(sampler, c.options(p)).size());
      const int64_t length = accelerate::data::sharded_length(num_batches, c.options(p));
      ASSERT_EQ(length, ref_len(num_batches, c.split_batches, c.drop_last, c.even_batches,
                                c.num_processes, p))
          << c.str() << " process " << p;
      // split_batches without even_batches: a tail shorter than this process's slice start
      // yields nothing, yet Accelerate's __len__ still counts it.
      const int64_t tail = c.length % c.batch_size;
      const int64_t piece = c.batch_size / c.num_processes;
      const bool short_tail =
          c.split_batches && !c.even_batches && !c.drop_last && tail > 0 && tail <= piece * p;
      if (short_tail) {
        ASSERT_EQ(got, length - 1) << c.str() << " process " << p;
        ++miscounts;
      } else {
        ASSERT_EQ(got, length) << c.str() << " process " << p;
      }
    }
  }
  EXPECT_GT(miscounts, 0);
}

// gather_for_metrics: the last batches of all processes, concatenated in process order and cut
// to `length % total_batch_size`, are exactly the samples the earlier batches did not cover.
TEST(ShardingBatches, GatherForMetricsRemainderRecoversEverySampleOnce) {
  for (const Config& c : grid()) {
    if (!c.valid() || !c.even_batches || c.drop_last) continue;
    const Batches sampler = sequential_batches(c.length, c.batch_size, false);
    const int64_t total = c.split_batches ? c.batch_size : c.batch_size * c.num_processes;
    const int64_t remainder = c.length % total;
    List seen;
    List last;
    for (int p = 0; p < c.num_processes; ++p) {
      const Batches got = accelerate::data::shard_batches(sampler, c.options(p));
      for (size_t i = 0; i + 1 < got.size(); ++i) seen = plus(seen, got[i]);
      last = plus(last, got.back());
    }
    if (remainder > 0) last = py_slice(last, 0, remainder);
    List all = plus(seen, last);
    std::sort(all.begin(), all.end());
    List expected(static_cast<size_t>(c.length));
    for (int64_t i = 0; i < c.length; ++i) expected[static_cast<size_t>(i)] = i;
    ASSERT_EQ(all, expected) << c.str();
  }
}

TEST(ShardingBatches, HandCheckedCases) {
  auto shard = [](int64_t length, int64_t bs, int n, int p, bool split, bool even, bool drop) {
    return accelerate::data::shard_batches(sequential_batches(length, bs, drop),
                                           {.num_processes = n,
                                            .process_index = p,
                                            .batch_size = bs,
                                            .drop_last = drop,
                                            .split_batches = split,
                                            .even_batches = even});
  };
  // 5 samples, batches {0,1} {2,3} {4}, 2 processes. Round 0 goes out whole. Round 1 is
  // incomplete: {4} is topped up from the first round's samples {0,1,2,3} to {4,0}, and
  // process 1 continues the cycle with {1,2}.
  EXPECT_EQ(shard(5, 2, 2, 0, false, true, false), (Batches{{0, 1}, {4, 0}}));
  EXPECT_EQ(shard(5, 2, 2, 1, false, true, false), (Batches{{2, 3}, {1, 2}}));
  // The same without even_batches: {4} goes out as it is and process 1 has no second batch.
  EXPECT_EQ(shard(5, 2, 2, 0, false, false, false), (Batches{{0, 1}, {4}}));
  EXPECT_EQ(shard(5, 2, 2, 1, false, false, false), (Batches{{2, 3}}));
  // 4 samples, batches of 1, 3 processes: {3} is full, so process 0 keeps it; processes 1 and 2
  // finish the round from the start of the epoch: {0}, {1}.
  EXPECT_EQ(shard(4, 1, 3, 0, false, true, false), (Batches{{0}, {3}}));
  EXPECT_EQ(shard(4, 1, 3, 1, false, true, false), (Batches{{1}, {0}}));
  EXPECT_EQ(shard(4, 1, 3, 2, false, true, false), (Batches{{2}, {1}}));
  // 2 samples, batches of 3, 2 processes: the only batch {0,1} is short. The padding source
  // {0,1} is doubled to {0,1,0,1,0,1,0,1}; {0,1} takes one sample -> {0,1,0}; process 1 reads
  // on from position 1 -> {1,0,1}.
  EXPECT_EQ(shard(2, 3, 2, 0, false, true, false), (Batches{{0, 1, 0}}));
  EXPECT_EQ(shard(2, 3, 2, 1, false, true, false), (Batches{{1, 0, 1}}));
  // 7 samples, drop_last with batches of 2: {0,1} {2,3} {4,5}; the incomplete round {4,5}
  // is dropped too.
  EXPECT_EQ(shard(7, 2, 2, 0, false, true, true), (Batches{{0, 1}}));
  EXPECT_EQ(shard(7, 2, 2, 1, false, true, true), (Batches{{2, 3}}));
  // split_batches, 7 samples, batches of 4 cut into halves: {0,1,2,3} -> {0,1} | {2,3}; the
  // tail {4,5,6} is completed from the first batch to {4,5,6,0} -> {4,5} | {6,0}.
  EXPECT_EQ(shard(7, 4, 2, 0, true, true, false), (Batches{{0, 1}, {4, 5}}));
  EXPECT_EQ(shard(7, 4, 2, 1, true, true, false), (Batches{{2, 3}, {6, 0}}));
  // Without even_batches the tail is cut as it is: {4,5} | {6}.
  EXPECT_EQ(shard(7, 4, 2, 0, true, false, false), (Batches{{0, 1}, {4, 5}}));
  EXPECT_EQ(shard(7, 4, 2, 1, true, false, false), (Batches{{2, 3}, {6}}));
  // split_batches, 5 samples, batches of 4 over 2 processes, no even_batches: the tail {4}
  // does not reach process 1's slice, which starts at 2, so process 1 gets one batch although
  // Accelerate's len() says 2.
  EXPECT_EQ(shard(5, 4, 2, 1, true, false, false), (Batches{{2, 3}}));
  EXPECT_EQ(accelerate::data::sharded_length(2, {.num_processes = 2,
                                                 .process_index = 1,
                                                 .batch_size = 4,
                                                 .split_batches = true,
                                                 .even_batches = false}),
            2);
}

TEST(ShardingBatches, SamplerWithoutBatchSize) {
  // Batches of varying size: every round goes out, the incomplete one without padding.
  const Batches batches{{0}, {1, 2, 3}, {4, 5}, {6}, {7, 8}};
  for (int p = 0; p < 2; ++p) {
    const BatchShardOptions o{.num_processes = 2, .process_index = p, .even_batches = false};
    EXPECT_EQ(show(accelerate::data::shard_batches(batches, o)),
              show(ref_iter_with_no_split(batches, std::nullopt, false, 2, p, false)));
  }
  EXPECT_EQ(accelerate::data::shard_batches(batches, {.num_processes = 2, .even_batches = false}),
            (Batches{{0}, {4, 5}, {7, 8}}));
  try {
    accelerate::data::shard_batches(batches, {.num_processes = 2});
    FAIL() << "even_batches without a batch size accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("even_batches"), std::string::npos) << e.what();
  }
}

TEST(ShardingBatches, IrregularBatchesFollowAccelerate) {
  // Inputs no sequential sampler produces, but which the Python handles in a defined way: an
  // incomplete batch mid-epoch holds back its round, and empty batches.
  const std::vector<Batches> inputs{{{0, 1}, {2}, {3, 4}, {5, 6}, {7, 8}},
                                    {{0}, {1, 2}, {3, 4}},
                                    {{0, 1}, {2, 3}, {4}, {5, 6}, {7}},
                                    {{}, {0, 1}, {2}}};
  for (const auto& batches : inputs) {
    for (int n : {2, 3}) {
      for (bool even : {false, true}) {
        for (int p = 0; p < n; ++p) {
          const BatchShardOptions o{
              .num_processes = n, .process_index = p, .batch_size = 2, .even_batches = even};
          EXPECT_EQ(show(accelerate::data::shard_batches(batches, o)),
                    show(ref_iter_with_no_split(batches, 2, false, n, p, even)))
              << show(batches) << " n=" << n << " even=" << even << " p=" << p;
          BatchShardOptions s = o;
          s.split_batches = true;
          s.num_processes = 2;
          if (p < 2) {
            EXPECT_EQ(show(accelerate::data::shard_batches(batches, s)),
                      show(ref_iter_with_split(batches, 2, false, 2, p, even)))
                << show(batches) << " split even=" << even << " p=" << p;
          }
        }
      }
    }
  }
}

TEST(ShardingBatches, RejectsInvalidOptions) {
  auto message = [](auto&& fn) {
    try {
      fn();
    } catch (const c10::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const Batches batches{{0, 1}, {2}};
  EXPECT_NE(message([&] {
              accelerate::data::shard_batches(
                  batches, {.num_processes = 2, .process_index = 2, .batch_size = 2});
            }).find("process_index"),
            std::string::npos);
  EXPECT_NE(message([&] {
              accelerate::data::shard_batches(batches, {.num_processes = 0, .batch_size = 2});
            }).find("num_processes"),
            std::string::npos);
  EXPECT_NE(message([&] {
              accelerate::data::shard_batches(batches, {.num_processes = 2, .batch_size = 0});
            }).find("batch_size"),
            std::string::npos);
  EXPECT_NE(message([&] {
              accelerate::data::shard_batches({{0, 1, 2}}, {.num_processes = 2, .batch_size = 2});
            }).find("more than the batch size"),
            std::string::npos);
  EXPECT_NE(message([&] {
              accelerate::data::shard_batches(batches, {.num_processes = 2, .split_batches = true});
            }).find("split_batches"),
            std::string::npos);
  EXPECT_NE(message([&] {
              accelerate::data::sharded_length(-1, {.num_processes = 2, .batch_size = 2});
            }).find("num_batches"),
            std::string::npos);
}

// ------------------------------------------------------------------ IterableDatasetShard

TEST(ShardingIterable, MatchesAccelerateOnGrid) {
  int checked = 0;
  for (const Config& c : grid()) {
    if (c.even_batches || !c.valid()) continue;  // even_batches does not apply to iterables
    List items(static_cast<size_t>(c.length));
    for (int64_t i = 0; i < c.length; ++i) items[static_cast<size_t>(i)] = i;
    for (int p = 0; p < c.num_processes; ++p) {
      const IterableShardOptions o{.num_processes = c.num_processes,
                                   .process_index = p,
                                   .batch_size = c.batch_size,
                                   .drop_last = c.drop_last,
                                   .split_batches = c.split_batches};
      const Batches expected =
          ref_iterable(c.length, c.batch_size, c.drop_last, c.num_processes, p, c.split_batches);
      ASSERT_EQ(show(accelerate::data::shard_iterable(items, o)), show(expected))
          << c.str() << " process " << p;
      // Streaming: push() hands out whole per-process batches as chunks complete.
      accelerate::data::IterableShardBuffer<int64_t> buffer(o);
      Batches streamed;
      for (int64_t x : items) {
        List out = buffer.push(x);
        if (!out.empty()) streamed.push_back(out);
      }
      List tail = buffer.finish();
      if (!tail.empty()) streamed.push_back(tail);
      ASSERT_EQ(show(streamed), show(expected)) << c.str() << " process " << p;
      ASSERT_EQ(buffer.per_process(),
                c.split_batches ? c.batch_size / c.num_processes : c.batch_size);
      ++checked;
    }
  }
  EXPECT_GT(checked, 1000);
}

TEST(ShardingIterable, InvariantsOnGrid) {
  for (const Config& c : grid()) {
    if (c.even_batches || !c.valid()) continue;
    List items(static_cast<size_t>(c.length));
    for (int64_t i = 0; i < c.length; ++i) items[static_cast<size_t>(i)] = i;
    const int64_t chunk = c.split_batches ? c.batch_size : c.batch_size * c.num_processes;
    const int64_t per = chunk / c.num_processes;
    std::vector<Batches> per_process;
    for (int p = 0; p < c.num_processes; ++p) {
      per_process.push_back(
          accelerate::data::shard_iterable(items, {.num_processes = c.num_processes,
                                                   .process_index = p,
                                                   .batch_size = c.batch_size,
                                                   .drop_last = c.drop_last,
                                                   .split_batches = c.split_batches}));
    }
    const auto rounds =
        static_cast<size_t>(c.drop_last ? c.length / chunk : ceil_div(c.length, chunk));
    for (const auto& batches : per_process) {
      ASSERT_EQ(batches.size(), rounds) << c.str();
      for (const auto& b : batches) ASSERT_EQ(len(b), per) << c.str();
    }
    // Batch k of every process, in process order, is chunk k of the stream; the last one, cut
    // to the real items, gives every item once.
    List gathered;
    for (size_t k = 0; k < rounds; ++k) {
      List round;
      for (const auto& batches : per_process) round = plus(round, batches[k]);
      if (k + 1 == rounds && c.length % chunk != 0 && !c.drop_last) {
        round = py_slice(round, 0, c.length % chunk);
      }
      gathered = plus(gathered, round);
    }
    List expected(static_cast<size_t>(c.drop_last ? c.length / chunk * chunk : c.length));
    for (size_t i = 0; i < expected.size(); ++i) expected[i] = static_cast<int64_t>(i);
    ASSERT_EQ(gathered, expected) << c.str();
  }
}

TEST(ShardingIterable, HandCheckedCases) {
  auto shard = [](int64_t length, int64_t bs, int n, int p, bool split, bool drop) {
    List items;
    for (int64_t i = 0; i < length; ++i) items.push_back(i);
    return accelerate::data::shard_iterable(items, {.num_processes = n,
                                                    .process_index = p,
                                                    .batch_size = bs,
                                                    .drop_last = drop,
                                                    .split_batches = split});
  };
  // 5 items, 2 processes of batch 2: chunks of 4. {0,1,2,3} -> {0,1} | {2,3}; the tail {4} is
  // extended by the first chunk to {4,0,1,2,3} -> {4,0} | {1,2}.
  EXPECT_EQ(shard(5, 2, 2, 0, false, false), (Batches{{0, 1}, {4, 0}}));
  EXPECT_EQ(shard(5, 2, 2, 1, false, false), (Batches{{2, 3}, {1, 2}}));
  // drop_last drops the tail chunk.
  EXPECT_EQ(shard(5, 2, 2, 0, false, true), (Batches{{0, 1}}));
  EXPECT_EQ(shard(5, 2, 2, 1, false, true), (Batches{{2, 3}}));
  // 3 items, no full chunk: the tail is its own padding source, {0,1,2,0,1,2} -> {0,1} | {2,0}.
  EXPECT_EQ(shard(3, 2, 2, 0, false, false), (Batches{{0, 1}}));
  EXPECT_EQ(shard(3, 2, 2, 1, false, false), (Batches{{2, 0}}));
  // split_batches, batch 2 over 2 processes: chunks of 2, one item each; the tail {4} becomes
  // {4,0,1} -> {4} | {0}.
  EXPECT_EQ(shard(5, 2, 2, 0, true, false), (Batches{{0}, {2}, {4}}));
  EXPECT_EQ(shard(5, 2, 2, 1, true, false), (Batches{{1}, {3}, {0}}));
}

TEST(ShardingIterable, SplitBatchesNeedsDivisibleBatchSize) {
  for (int n : {2, 3, 4}) {
    for (int64_t bs = 1; bs <= 5; ++bs) {
      if (bs % n == 0) continue;
      try {
        accelerate::data::IterableShardBuffer<int64_t> b(
            {.num_processes = n, .batch_size = bs, .split_batches = true});
        FAIL() << "batch size " << bs << " accepted for " << n << " processes";
      } catch (const c10::Error& e) {
        EXPECT_NE(std::string(e.what()).find("round multiple of the number of processes"),
                  std::string::npos)
            << e.what();
      }
    }
  }
  EXPECT_THROW(accelerate::data::check_iterable_shard_options(
                   {.num_processes = 2, .process_index = -1, .batch_size = 2}),
               c10::Error);
  EXPECT_THROW(
      accelerate::data::check_iterable_shard_options({.num_processes = 2, .batch_size = 0}),
      c10::Error);
}

// ------------------------------------------------------------------ DataLoaderDispatcher

struct DispatchCase {
  Batches base;
  std::vector<int64_t> sizes;
};

DispatchCase base_loader(int64_t length, int64_t bs, bool drop_last) {
  DispatchCase d;
  d.base = sequential_batches(length, bs, drop_last);
  for (const auto& b : d.base) d.sizes.push_back(len(b));
  return d;
}

TEST(ShardingDispatch, MatchesAccelerateOnGrid) {
  int checked = 0;
  int empty = 0;
  for (const Config& c : grid()) {
    if (c.even_batches) continue;  // the dispatcher always evens out
    const DispatchCase d = base_loader(c.length, c.batch_size, c.drop_last);
    for (int p = 0; p < c.num_processes; ++p) {
      const RefDispatch expected =
          ref_dispatch(d.base, c.split_batches, c.drop_last, c.num_processes, p);
      const auto got = accelerate::data::dispatch_epoch(d.sizes, {.num_processes = c.num_processes,
                                                                  .process_index = p,
                                                                  .split_batches = c.split_batches,
                                                                  .drop_last = c.drop_last});
      if (expected.raised) {
        // Accelerate raises when there is nothing to dispatch (an empty base loader, or with
        // drop_last fewer than num_processes base batches); the epoch here is just empty.
        ASSERT_TRUE(got.batches.empty()) << c.str();
        ASSERT_EQ(got.remainder, -1) << c.str();
        ++empty;
        continue;
      }
      ASSERT_EQ(show(got.batches), show(expected.yielded)) << c.str() << " process " << p;
      ASSERT_EQ(got.remainder, expected.remainder) << c.str() << " process " << p;
      ++checked;
    }
  }
  EXPECT_GT(checked, 1000);
  EXPECT_GT(empty, 0);
}

TEST(ShardingDispatch, GatherForMetricsRecoversTheDispatchedRows) {
  for (const Config& c : grid()) {
    if (c.even_batches || !c.valid()) continue;
    const DispatchCase d = base_loader(c.length, c.batch_size, c.drop_last);
    if (d.base.empty()) continue;
    std::vector<accelerate::data::DispatchedEpoch> per_process;
    for (int p = 0; p < c.num_processes; ++p) {
      per_process.push_back(
          accelerate::data::dispatch_epoch(d.sizes, {.num_processes = c.num_processes,
                                                     .process_index = p,
                                                     .split_batches = c.split_batches,
                                                     .drop_last = c.drop_last}));
    }
    const size_t count = per_process[0].batches.size();
    for (const auto& e : per_process) {
      ASSERT_EQ(e.batches.size(), count) << c.str();
      ASSERT_EQ(e.remainder, per_process[0].remainder) << c.str();
    }
    // Every process gets equal slices of each dispatched batch; gathered in process order and
    // the last cut to the remainder, they are the base loader's rows once each, in order.
    List gathered;
    for (size_t k = 0; k < count; ++k) {
      List round;
      for (const auto& e : per_process) {
        // With fewer rows than processes the padding source is too short to even out the
        // slices (see HandCheckedCases).
        if (c.length >= c.num_processes) {
          ASSERT_EQ(e.batches[k].size(), per_process[0].batches[k].size()) << c.str();
        }
        round = plus(round, e.batches[k]);
      }
      if (k + 1 == count) round = py_slice(round, 0, per_process[0].remainder);
      gathered = plus(gathered, round);
    }
    // Without split_batches, drop_last also drops a last group of fewer than num_processes
    // base batches.
    int64_t kept = 0;
    const size_t used = c.split_batches || !c.drop_last
                            ? d.base.size()
                            : d.base.size() / static_cast<size_t>(c.num_processes) *
                                  static_cast<size_t>(c.num_processes);
    for (size_t i = 0; i < used; ++i) kept += d.sizes[i];
    List expected(static_cast<size_t>(kept));
    for (int64_t i = 0; i < kept; ++i) expected[static_cast<size_t>(i)] = i;
    ASSERT_EQ(gathered, expected) << c.str();
  }
}

TEST(ShardingDispatch, HandCheckedCases) {
  auto dispatch = [](std::vector<int64_t> sizes, int n, int p, bool split, bool drop) {
    return accelerate::data::dispatch_epoch(
        sizes, {.num_processes = n, .process_index = p, .split_batches = split, .drop_last = drop});
  };
  // Batches of 2 over 5 samples (sizes 2,2,1), 2 processes: rows {0,1,2,3} are cut in halves;
  // the base loader ends after {4}, a partial group of 1 row, padded with the first 2 rows of
  // the first dispatched batch to {4,0,1} and cut into 1-row slices.
  auto e0 = dispatch({2, 2, 1}, 2, 0, false, false);
  auto e1 = dispatch({2, 2, 1}, 2, 1, false, false);
  EXPECT_EQ(e0.batches, (Batches{{0, 1}, {4}}));
  EXPECT_EQ(e1.batches, (Batches{{2, 3}, {0}}));
  EXPECT_EQ(e0.remainder, 1);
  // split_batches, batches of 4 over 5 samples: {0,1,2,3} -> {0,1} | {2,3}; {4} + {0,1} ->
  // {4} | {0}.
  EXPECT_EQ(dispatch({4, 1}, 2, 0, true, false).batches, (Batches{{0, 1}, {4}}));
  EXPECT_EQ(dispatch({4, 1}, 2, 1, true, false).batches, (Batches{{2, 3}, {0}}));
  // drop_last, batches of 2 over 7 samples (sizes 2,2,2): the group {4,5} has one base batch
  // instead of 2 and is dropped; the remainder is still the last dispatched batch's size.
  auto d0 = dispatch({2, 2, 2}, 2, 0, false, true);
  EXPECT_EQ(d0.batches, (Batches{{0, 1}}));
  EXPECT_EQ(dispatch({2, 2, 2}, 2, 1, false, true).batches, (Batches{{2, 3}}));
  EXPECT_EQ(d0.remainder, 4);
  // 3 processes, batches of 2 over 7 samples (sizes 2,2,2,1): rows 0..5 in thirds; the last
  // group {6} is padded with the first 3 rows to {6,0,1,2} and cut into single rows.
  EXPECT_EQ(dispatch({2, 2, 2, 1}, 3, 0, false, false).batches, (Batches{{0, 1}, {6}}));
  EXPECT_EQ(dispatch({2, 2, 2, 1}, 3, 1, false, false).batches, (Batches{{2, 3}, {0}}));
  EXPECT_EQ(dispatch({2, 2, 2, 1}, 3, 2, false, false).batches, (Batches{{4, 5}, {1}}));
  // One row over 3 processes: the padding source is that single row, so {0} becomes {0,0}
  // and, cut into 1-row slices, leaves process 2 with nothing (as in Accelerate).
  EXPECT_EQ(dispatch({1}, 3, 0, false, false).batches, (Batches{{0}}));
  EXPECT_EQ(dispatch({1}, 3, 1, false, false).batches, (Batches{{0}}));
  EXPECT_EQ(dispatch({1}, 3, 2, false, false).batches, (Batches{{}}));
  // Nothing to dispatch.
  EXPECT_TRUE(dispatch({}, 2, 0, false, false).batches.empty());
  EXPECT_EQ(dispatch({}, 2, 0, false, false).remainder, -1);
}

TEST(ShardingDispatch, SliceArithmeticAndErrors) {
  // 7 rows over 3 processes at the end of the epoch: padded to 3 rows each.
  const auto s = accelerate::data::dispatch_slice(7, true, false, 3, 2);
  EXPECT_TRUE(s.pad_with_first);
  EXPECT_EQ(s.start, 6);
  EXPECT_EQ(s.end, 9);
  // Mid-epoch or with drop_last, the slice is the floor share.
  const auto m = accelerate::data::dispatch_slice(7, false, false, 3, 2);
  EXPECT_FALSE(m.pad_with_first);
  EXPECT_EQ(m.start, 4);
  EXPECT_EQ(m.end, 6);
  EXPECT_FALSE(accelerate::data::dispatch_slice(7, true, true, 3, 0).pad_with_first);
  EXPECT_THROW(accelerate::data::dispatch_slice(4, true, false, 2, 2), c10::Error);
  EXPECT_THROW(accelerate::data::dispatch_epoch({2, 0}, {.num_processes = 2}), c10::Error);
  EXPECT_THROW(accelerate::data::dispatch_epoch({2}, {.num_processes = 2, .process_index = 3}),
               c10::Error);
}

}  // namespace
