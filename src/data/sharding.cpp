#include <accelerate/data/sharding.h>

#include <algorithm>

namespace accelerate::data {

void check_batch_shard_options(const BatchShardOptions& o) {
  TORCH_CHECK(o.num_processes >= 1, "accelerate: num_processes must be at least 1, got ",
              o.num_processes);
  TORCH_CHECK(o.process_index >= 0 && o.process_index < o.num_processes,
              "accelerate: process_index must be in [0, ", o.num_processes, "), got ",
              o.process_index);
  TORCH_CHECK(!o.batch_size || *o.batch_size >= 1, "accelerate: batch_size must be positive, got ",
              o.batch_size.value_or(0));
  if (o.split_batches) {
    TORCH_CHECK(o.batch_size.has_value(),
                "accelerate: split_batches needs a batch sampler with a batch size");
    TORCH_CHECK(*o.batch_size % o.num_processes == 0,
                "accelerate: to use split_batches, the batch size (", *o.batch_size,
                ") needs to be a round multiple of the number of processes (", o.num_processes,
                ")");
  }
  TORCH_CHECK(o.batch_size.has_value() || !o.even_batches,
              "accelerate: a batch sampler without a batch size needs even_batches = false");
}

namespace {

int64_t ssize(const BatchIndices& b) {
  return static_cast<int64_t>(b.size());
}

// Python's batch[begin:end]: both ends clamped to the batch.
BatchIndices slice(const BatchIndices& batch, int64_t begin, int64_t end) {
  begin = std::clamp<int64_t>(begin, 0, ssize(batch));
  end = std::clamp<int64_t>(end, begin, ssize(batch));
  return {batch.begin() + begin, batch.begin() + end};
}

// Appends samples from `source` taken cyclically from position `*cursor`. Accelerate doubles
// its list until it is long enough and then reads it left to right; the doubled list is a
// prefix of the infinite repetition, so reading cyclically gives the same samples.
void fill_from(BatchIndices& batch, int64_t size, const BatchIndices& source, size_t* cursor) {
  while (ssize(batch) < size) {
    batch.push_back(source[*cursor % source.size()]);
    ++*cursor;
  }
}

std::vector<BatchIndices> shard_split(const std::vector<BatchIndices>& batches,
                                      const BatchShardOptions& o) {
  const int64_t size = *o.batch_size;
  const int64_t piece = size / o.num_processes;
  const int64_t begin = piece * o.process_index;
  std::vector<BatchIndices> out;
  // Incomplete batches are skipped wherever they are; only the last one can be given out below.
  for (const auto& batch : batches) {
    if (ssize(batch) == size) out.push_back(slice(batch, begin, begin + piece));
  }
  // Accelerate's guard is on the first batch: it is the padding source.
  if (o.drop_last || batches.empty() || batches.front().empty()) return out;
  const BatchIndices& tail = batches.back();
  if (ssize(tail) == size) return out;
  if (!o.even_batches) {
    // A process whose slice starts past the end of the tail gets nothing.
    if (ssize(tail) > begin) out.push_back(slice(tail, begin, begin + piece));
    return out;
  }
  BatchIndices full = tail;
  size_t cursor = 0;
  fill_from(full, size, batches.front(), &cursor);
  out.push_back(slice(full, begin, begin + piece));
  return out;
}

std::vector<BatchIndices> shard_round_robin(const std::vector<BatchIndices>& batches,
                                            const BatchShardOptions& o) {
  const int64_t n = o.num_processes;
  const int64_t p = o.process_index;
  const auto count = static_cast<int64_t>(batches.size());
  auto at = [&](int64_t i) -> const BatchIndices& { return batches[static_cast<size_t>(i)]; };
  std::vector<BatchIndices> out;
  // A round goes out only when it is complete and its last batch is full; otherwise this
  // process's batch of it stays pending (Accelerate's `batch_to_yield`) until a later round
  // replaces it or the epoch ends.
  const BatchIndices* pending = nullptr;
  for (int64_t idx = p; idx < count; idx += n) {
    const int64_t round_end = idx - p + n - 1;
    if (round_end < count && (!o.batch_size || ssize(at(round_end)) == *o.batch_size)) {
      out.push_back(at(idx));
      pending = nullptr;
    } else {
      pending = &at(idx);
    }
  }
  if (o.drop_last) return out;
  // The wrap-around source: the first num_processes batches of the epoch.
  BatchIndices initial;
  for (int64_t i = 0; i < std::min(n, count); ++i)
    initial.insert(initial.end(), at(i).begin(), at(i).end());
  if (initial.empty()) return out;
  if (!o.even_batches) {
    if (pending && !pending->empty()) out.push_back(*pending);
    return out;
  }
  const int64_t size = *o.batch_size;
  if (pending && ssize(*pending) == size) out.push_back(*pending);
  // Finish the last round: complete the last batch if it is short, then give every process
  // after it in the round a batch drawn from the start of the epoch.
  int64_t idx = count - 1;
  BatchIndices batch = at(idx);
  if (ssize(batch) == size) {
    batch.clear();
    ++idx;
  }
  size_t cursor = 0;
  for (; idx % n != 0 || !batch.empty(); ++idx) {
    fill_from(batch, size, initial, &cursor);
    if (idx % n == p) out.push_back(batch);
    batch.clear();
  }
  return out;
}

}  // namespace

std::vector<BatchIndices> shard_batches(const std::vector<BatchIndices>& batches,
                                        const BatchShardOptions& options) {
  check_batch_shard_options(options);
  if (options.batch_size) {
    // A batch sampler never yields more than its batch size; Accelerate's wrap-around
    // arithmetic would read out of order from such a batch, so refuse it.
    for (size_t i = 0; i < batches.size(); ++i) {
      TORCH_CHECK(ssize(batches[i]) <= *options.batch_size, "accelerate: batch ", i, " has ",
                  batches[i].size(), " indices, more than the batch size (", *options.batch_size,
                  ")");
    }
  }
  return options.split_batches ? shard_split(batches, options)
                               : shard_round_robin(batches, options);
}

int64_t sharded_length(int64_t num_batches, const BatchShardOptions& o) {
  check_batch_shard_options(o);
  TORCH_CHECK(num_batches >= 0, "accelerate: num_batches must not be negative, got ", num_batches);
  if (o.split_batches) return num_batches;
  const int64_t n = o.num_processes;
  const int64_t rounds = num_batches / n;
  if (num_batches % n == 0 || o.drop_last) return rounds;
  if (o.even_batches) return rounds + 1;
  return rounds + (o.process_index < num_batches % n ? 1 : 0);
}

void check_iterable_shard_options(const IterableShardOptions& o) {
  TORCH_CHECK(o.num_processes >= 1, "accelerate: num_processes must be at least 1, got ",
              o.num_processes);
  TORCH_CHECK(o.process_index >= 0 && o.process_index < o.num_processes,
              "accelerate: process_index must be in [0, ", o.num_processes, "), got ",
              o.process_index);
  TORCH_CHECK(o.batch_size >= 1, "accelerate: batch_size must be positive, got ", o.batch_size);
  // Stricter than Accelerate, which lets a batch size of 1 through and then gives every
  // process zero items per batch; PyTorch rejects that batch size of 0 later anyway.
  TORCH_CHECK(!o.split_batches || o.batch_size % o.num_processes == 0,
              "accelerate: to use split_batches with an iterable dataset, the batch size (",
              o.batch_size, ") needs to be a round multiple of the number of processes (",
              o.num_processes, ")");
}

DispatchSlice dispatch_slice(int64_t observed, bool last, bool drop_last, int num_processes,
                             int process_index) {
  TORCH_CHECK(num_processes >= 1 && process_index >= 0 && process_index < num_processes,
              "accelerate: process_index ", process_index, " out of range for ", num_processes,
              " processes");
  TORCH_CHECK(observed >= 0, "accelerate: a dispatched batch cannot have ", observed, " rows");
  int64_t per = observed / num_processes;
  DispatchSlice s;
  if (!drop_last && last && observed % num_processes != 0) {
    s.pad_with_first = true;
    per += 1;
  }
  s.start = per * process_index;
  s.end = per * (process_index + 1);
  return s;
}

DispatchedEpoch dispatch_epoch(const std::vector<int64_t>& batch_sizes, const DispatchOptions& o) {
  TORCH_CHECK(o.num_processes >= 1, "accelerate: num_processes must be at least 1, got ",
              o.num_processes);
  TORCH_CHECK(o.process_index >= 0 && o.process_index < o.num_processes,
              "accelerate: process_index must be in [0, ", o.num_processes, "), got ",
              o.process_index);
  const int64_t n = o.num_processes;
  // Each dispatched batch as [first row, row count) of the base loader's stream.
  std::vector<std::pair<int64_t, int64_t>> groups;
  int64_t row = 0;
  int64_t in_group = 0;
  for (size_t i = 0; i < batch_sizes.size(); ++i) {
    TORCH_CHECK(batch_sizes[i] >= 1, "accelerate: base batch ", i, " has size ", batch_sizes[i],
                "; batch sizes must be positive");
    if (o.split_batches || in_group == 0) groups.emplace_back(row, 0);
    groups.back().second += batch_sizes[i];
    row += batch_sizes[i];
    in_group = o.split_batches ? 0 : (in_group + 1) % n;
  }
  // When the base loader ends inside a group, Accelerate keeps that group only without
  // drop_last.
  if (in_group != 0 && o.drop_last) groups.pop_back();

  DispatchedEpoch epoch;
  if (groups.empty()) return epoch;
  // The first rows of the epoch's first dispatched batch pad the last one.
  const int64_t first_start = groups.front().first;
  const int64_t first_rows = std::min(n, groups.front().second);
  for (size_t g = 0; g < groups.size(); ++g) {
    const auto [start, observed] = groups[g];
    const bool last = g + 1 == groups.size();
    const DispatchSlice s =
        dispatch_slice(observed, last, o.drop_last, o.num_processes, o.process_index);
    BatchIndices rows(static_cast<size_t>(observed));
    for (int64_t r = 0; r < observed; ++r) rows[static_cast<size_t>(r)] = start + r;
    if (s.pad_with_first) {
      for (int64_t r = 0; r < first_rows; ++r) rows.push_back(first_start + r);
    }
    epoch.batches.push_back(slice(rows, s.start, s.end));
    if (last) epoch.remainder = observed;
  }
  return epoch;
}

}  // namespace accelerate::data
