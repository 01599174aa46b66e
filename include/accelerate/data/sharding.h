#pragma once
/// \file
/// The pure index arithmetic behind prepare_data_loader: which samples each process sees
/// (Accelerate's `BatchSamplerShard`, `IterableDatasetShard` and the slicing done by
/// `DataLoaderDispatcher`). No tensors and no communication: everything here is a function of
/// the batches of one epoch and the process layout, so it can be tested exhaustively.
///
/// Example:
/// \code
///   // 2 processes, batches of 2 over 5 samples: {0,1} {2,3} {4}
///   std::vector<std::vector<int64_t>> batches{{0, 1}, {2, 3}, {4}};
///   auto mine = accelerate::data::shard_batches(batches, {.num_processes = 2,
///                                                         .process_index = 1,
///                                                         .batch_size = 2});
///   // process 1 gets {2,3} then {1,2}: the last round is completed from the dataset start
///   // (process 0 gets {0,1} then {4,0})
/// \endcode

#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace accelerate::data {

/// The indices of one batch.
using BatchIndices = std::vector<int64_t>;

/// How a batch sampler is split between processes (the arguments of Accelerate's
/// `BatchSamplerShard`).
///
/// Example:
/// \code
///   accelerate::data::BatchShardOptions o{.num_processes = 4, .process_index = 1,
///                                         .batch_size = 8, .split_batches = true};
/// \endcode
struct BatchShardOptions {
  int num_processes = 1;
  int process_index = 0;
  /// The batch size of the sampler being split; unset for samplers of varying batch size,
  /// which need even_batches = false.
  std::optional<int64_t> batch_size;
  /// Whether the sampler dropped its last incomplete batch.
  bool drop_last = false;
  /// Split each batch into num_processes pieces instead of giving whole batches round-robin.
  bool split_batches = false;
  /// Wrap around to the start of the data so that every process gets the same number of full
  /// batches.
  bool even_batches = true;
};

/// Checks `options` (process index in range, split_batches needs a batch size divisible by the
/// number of processes, even_batches needs a batch size); throws c10::Error naming the problem.
void check_batch_shard_options(const BatchShardOptions& options);

/// The batches process `options.process_index` yields from one epoch of `batches`, by
/// Accelerate's BatchSamplerShard rules:
///  - without split_batches, batch i goes to process i % num_processes, but a round of
///    num_processes batches is only given out when its last batch is full;
///  - with split_batches, every full batch is cut into num_processes equal slices;
///  - the incomplete tail (unless drop_last) is, with even_batches, completed with samples
///    from the start of the epoch so that every process gets the same number of full batches,
///    and otherwise given out as it is (without split_batches the last, incomplete round then
///    leaves the later processes one batch short; with split_batches a process whose slice
///    starts past the end of the tail gets nothing from it).
/// Throws c10::Error for invalid options (see check_batch_shard_options) and for a batch
/// longer than options.batch_size, which a batch sampler never yields.
std::vector<BatchIndices> shard_batches(const std::vector<BatchIndices>& batches,
                                        const BatchShardOptions& options);

/// How many batches shard_batches yields for a sampler of `num_batches` batches (Accelerate's
/// `len(BatchSamplerShard)`). Exact except in one case that Accelerate also miscounts:
/// split_batches without even_batches or drop_last, when the incomplete last batch is too short
/// to reach this process's slice; shard_batches then yields one batch fewer.
int64_t sharded_length(int64_t num_batches, const BatchShardOptions& options);

/// How an iterable dataset is split between processes (Accelerate's `IterableDatasetShard`).
///
/// Example:
/// \code
///   accelerate::data::IterableShardOptions o{.num_processes = 2, .process_index = 0,
///                                            .batch_size = 4};
/// \endcode
struct IterableShardOptions {
  int num_processes = 1;
  int process_index = 0;
  /// Per-process batch size, or with split_batches the global one (then divisible by
  /// num_processes).
  int64_t batch_size = 1;
  bool drop_last = false;
  bool split_batches = false;
};

/// Checks `options`; throws c10::Error naming the problem.
void check_iterable_shard_options(const IterableShardOptions& options);

/// Streaming IterableDatasetShard: push() the dataset's items in order and yield what it returns;
/// finish() returns the tail. Items are read in chunks of the global batch size; this process
/// takes its slice of each chunk. The last incomplete chunk is dropped with drop_last and
/// otherwise completed by repeating the first chunk.
///
/// Example:
/// \code
///   accelerate::data::IterableShardBuffer<int> shard({.num_processes = 2, .process_index = 1,
///                                                     .batch_size = 2});
///   for (int i = 0; i < 5; ++i)
///     for (int x : shard.push(i)) use(x);   // yields 2, 3
///   for (int x : shard.finish()) use(x);    // yields 1, 2: the tail {4} is completed to
///                                           // {4, 0, 1, 2} from the first chunk
/// \endcode
template <class T>
class IterableShardBuffer {
 public:
  explicit IterableShardBuffer(const IterableShardOptions& options) : options_(options) {
    check_iterable_shard_options(options);
    const int64_t n = options.num_processes;
    chunk_ = options.split_batches ? options.batch_size : options.batch_size * n;
    per_process_ = options.split_batches ? options.batch_size / n : options.batch_size;
    begin_ = options.process_index * per_process_;
  }

  /// Adds one item; returns this process's items when a chunk completes, else nothing.
  std::vector<T> push(T item) {
    current_.push_back(std::move(item));
    if (static_cast<int64_t>(current_.size()) < chunk_) return {};
    std::vector<T> out(current_.begin() + begin_, current_.begin() + begin_ + per_process_);
    if (!have_first_) {
      first_ = std::move(current_);
      have_first_ = true;
    }
    current_.clear();
    return out;
  }

  /// Ends the stream: this process's share of the completed last chunk (nothing with
  /// drop_last or when the stream ended on a chunk boundary).
  std::vector<T> finish() {
    if (options_.drop_last || current_.empty()) return {};
    if (!have_first_) first_ = current_;
    while (static_cast<int64_t>(current_.size()) < chunk_) {
      current_.insert(current_.end(), first_.begin(), first_.end());
    }
    std::vector<T> out(current_.begin() + begin_, current_.begin() + begin_ + per_process_);
    current_.clear();
    return out;
  }

  /// Items this process yields per chunk.
  int64_t per_process() const { return per_process_; }

 private:
  IterableShardOptions options_;
  int64_t chunk_ = 1;
  int64_t per_process_ = 1;
  int64_t begin_ = 0;
  std::vector<T> current_;
  std::vector<T> first_;
  bool have_first_ = false;
};

/// The batches process `options.process_index` gets from an iterable dataset that yields
/// `items`: its IterableDatasetShard items, batched per process (options.batch_size items, or
/// batch_size / num_processes with split_batches). Every batch is full: the shard hands out
/// whole per-process batches, completing the tail from the first chunk unless drop_last.
///
/// Example:
/// \code
///   // 2 processes, batches of 2, items 0..4
///   auto mine = accelerate::data::shard_iterable<int64_t>(
///       {0, 1, 2, 3, 4}, {.num_processes = 2, .process_index = 0, .batch_size = 2});
///   // mine == {{0, 1}, {4, 0}}; process 1 gets {{2, 3}, {1, 2}}
/// \endcode
template <class T>
std::vector<std::vector<T>> shard_iterable(const std::vector<T>& items,
                                           const IterableShardOptions& options) {
  IterableShardBuffer<T> shard(options);
  std::vector<std::vector<T>> out;
  for (const T& item : items) {
    auto mine = shard.push(item);
    if (!mine.empty()) out.push_back(std::move(mine));
  }
  auto tail = shard.finish();
  if (!tail.empty()) out.push_back(std::move(tail));
  return out;
}

/// What one process takes from one dispatched batch (Accelerate's `DataLoaderDispatcher`):
/// process 0 reads a batch (with split_batches) or num_processes batches concatenated, and every
/// process takes rows [start, end) of it. When `pad_with_first` is set, the rows of the batch
/// are first followed by the first num_processes rows of the epoch's first dispatched batch.
struct DispatchSlice {
  int64_t start = 0;
  int64_t end = 0;
  bool pad_with_first = false;
};

/// The slice process `process_index` takes from a dispatched batch of `observed` rows; `last`
/// tells whether it is the epoch's last one. The last batch, when its size does not divide,
/// is padded (unless drop_last) so every process gets observed / num_processes + 1 rows.
DispatchSlice dispatch_slice(int64_t observed, bool last, bool drop_last, int num_processes,
                             int process_index);

/// How DataLoaderDispatcher hands out an epoch (the arguments its slicing depends on).
///
/// Example:
/// \code
///   accelerate::data::DispatchOptions o{.num_processes = 2, .process_index = 1};
/// \endcode
struct DispatchOptions {
  int num_processes = 1;
  int process_index = 0;
  /// Dispatch each base batch split into num_processes slices, rather than num_processes base
  /// batches concatenated.
  bool split_batches = false;
  /// The base loader's drop_last. Without split_batches it also drops a last group of fewer
  /// than num_processes base batches; without it the last dispatched batch is padded.
  bool drop_last = false;
};

/// What one process receives over one epoch of DataLoaderDispatcher.
struct DispatchedEpoch {
  /// The rows of each batch this process gets. A row is a position in the base loader's stream:
  /// base batch k holds the rows after those of base batches 0..k-1.
  std::vector<BatchIndices> batches;
  /// Rows in the last dispatched batch before padding: gather_for_metrics keeps this many of
  /// the gathered last batch. -1 when nothing is dispatched.
  int64_t remainder = -1;
};

/// The whole-epoch view of DataLoaderDispatcher for a base loader yielding batches of
/// `batch_sizes` rows: process 0 reads one base batch (split_batches) or num_processes of them
/// concatenated, and each process takes its dispatch_slice. An epoch with nothing to dispatch
/// (no base batches, or, with drop_last and without split_batches, fewer than num_processes of
/// them) gives no batches, where Accelerate raises. As in Accelerate, an epoch of fewer rows
/// than processes pads its only batch with itself, which can leave the last processes short.
///
/// Example:
/// \code
///   // batches of 2 over 5 samples, 2 processes: dispatched rows {0,1,2,3}, then {4}
///   auto e = accelerate::data::dispatch_epoch({2, 2, 1}, {.num_processes = 2,
///                                                         .process_index = 1});
///   // e.batches == {{2, 3}, {0}}: {4} is padded to {4, 0, 1}; e.remainder == 1
/// \endcode
DispatchedEpoch dispatch_epoch(const std::vector<int64_t>& batch_sizes,
                               const DispatchOptions& options);

}  // namespace accelerate::data
