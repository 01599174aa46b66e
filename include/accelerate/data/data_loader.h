#pragma once
/// \file
/// A data loader built like PyTorch's Python one, and Accelerate's distributed version of it
/// (`prepare_data_loader`, `skip_first_batches`, `gather_for_metrics`).
///
/// Datasets:
///  - map-style: any object with `size()` (an integer, or `std::optional<size_t>` as LibTorch's
///    `torch::data` datasets have) and `get(index)`; `get` may be called from several loader
///    threads at once when `num_workers > 0`.
///  - iterable: any object with `reset()` (start again from the beginning) and `next()`
///    returning `std::optional<Item>` (nullopt at the end); optionally `size()`.
///
/// A DataLoader is a handle: copies share the same loader (like `torch::nn` module holders).
///
/// Example:
/// \code
///   struct Squares {
///     int64_t size() const { return 10; }
///     at::Tensor get(size_t i) const { return at::full({2}, static_cast<double>(i * i)); }
///   };
///   accelerate::data::DataLoader loader(Squares{}, {.batch_size = 4, .shuffle = true});
///   auto sharded = accelerate::data::prepare_data_loader(loader);  // this process's share
///   for (at::Tensor& batch : sharded) {                              // [4, 2] tensors
///     auto all = accelerate::data::gather_for_metrics(batch);        // no duplicate samples
///   }
/// \endcode

#include <accelerate/data/collate.h>
#include <accelerate/data/gradient_state.h>
#include <accelerate/data/sampler.h>
#include <accelerate/data/sharding.h>
#include <accelerate/operations.h>
#include <accelerate/random.h>
#include <accelerate/state.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace accelerate::data {

// ---------------------------------------------------------------------- dataset concepts

/// A map-style dataset: `size()` and `get(index)`.
template <class D>
concept MapDataset = requires(D& d, size_t i) {
  d.get(i);
  d.size();
};

/// An iterable dataset: `reset()` and `next()` returning an optional item.
template <class D>
concept IterableDataset = requires(D& d) {
  d.reset();
  { d.next().has_value() } -> std::convertible_to<bool>;
  *d.next();
};

namespace detail {
template <class D>
struct DatasetItem {};
template <MapDataset D>
struct DatasetItem<D> {
  using type = std::decay_t<decltype(std::declval<D&>().get(size_t{}))>;
};
template <class D>
requires(!MapDataset<D> && IterableDataset<D>) struct DatasetItem<D> {
  using type = std::decay_t<decltype(*std::declval<D&>().next())>;
};
}  // namespace detail

/// The item type of dataset D.
template <class D>
using dataset_item_t = typename detail::DatasetItem<D>::type;

// ---------------------------------------------------------------------- options

/// What the user sets on a loader (PyTorch's `DataLoader` arguments).
///
/// Example:
/// \code
///   accelerate::data::DataLoaderOptions o{.batch_size = 32, .shuffle = true, .num_workers = 2};
/// \endcode
struct DataLoaderOptions {
  /// Samples per batch (ignored when batch_sampler is given).
  int64_t batch_size = 1;
  /// A random order every epoch (a RandomSampler over `generator`).
  bool shuffle = false;
  /// Drop the last incomplete batch.
  bool drop_last = false;
  /// The generator shuffling draws from; without one each epoch seeds from LibTorch's global
  /// generator, as PyTorch does.
  std::optional<at::Generator> generator;
  /// Which indices, in which order (map-style only; excludes shuffle).
  std::shared_ptr<Sampler> sampler;
  /// Which batches (map-style only; excludes batch_size, shuffle, sampler and drop_last).
  std::shared_ptr<BatchSampler> batch_sampler;
  /// Threads loading batches ahead of the training loop; 0 loads in the loop's thread.
  int num_workers = 0;
  /// Batches each worker thread loads ahead.
  int prefetch_factor = 2;
  /// Page-lock batches for faster copies to a CUDA device (only when CUDA is available).
  bool pin_memory = false;
};

/// What prepare_data_loader does to a loader (Accelerate's `prepare_data_loader` arguments).
///
/// Example:
/// \code
///   auto mine = accelerate::data::prepare_data_loader(loader, {.split_batches = true});
/// \endcode
struct PrepareDataLoaderOptions {
  /// Where batches are placed; defaults to the state's device. Ignored without
  /// device_placement.
  std::optional<c10::Device> device;
  bool device_placement = true;
  /// Split each batch between the processes instead of giving each process whole batches.
  bool split_batches = false;
  /// Process 0 reads every batch and sends each process its slice. Default: true for
  /// iterable datasets, false for map-style ones.
  std::optional<bool> dispatch_batches;
  /// Complete the last round with samples from the start so that all processes get the same
  /// number of batches.
  bool even_batches = true;
  /// Generators synchronised from process 0 at the start of every iteration. GENERATOR is the
  /// sampler's generator (dropped when there is none, as in Accelerate).
  std::vector<RNGType> rng_types = {RNGType::GENERATOR};
  /// Replace a random sampler by a SeedableRandomSampler seeded with data_seed (default: the
  /// global generator's initial seed).
  bool use_seedable_sampler = false;
  std::optional<uint64_t> data_seed;
  bool non_blocking = false;
  /// Override the layout (defaults: the state's).
  std::optional<int> num_processes;
  std::optional<int> process_index;
  /// The states used; nullptr means the process-wide ones.
  std::shared_ptr<PartialState> state;
  std::shared_ptr<GradientState> gradient_state;
};

/// Where a loader is within its epochs, for checkpoints: a loader given this position goes on
/// with exactly the batches it would have yielded next.
struct LoaderPosition {
  /// Completed iterations (Accelerate's `iteration`, the epoch passed to set_epoch).
  int64_t epoch = 0;
  /// Batches this process already received in the current epoch.
  int64_t batches_yielded = 0;
  /// The sampler generator's state at the start of the epoch (empty when it has none).
  std::vector<uint8_t> sampler_state;

  bool operator==(const LoaderPosition&) const = default;
};

// ---------------------------------------------------------------------- internals

namespace detail {

/// The resolved sharding of a prepared loader.
struct ShardConfig {
  int num_processes = 1;
  int process_index = 0;
  bool split_batches = false;
  bool even_batches = true;
  bool dispatch = false;
  std::vector<RNGType> rng_types;
  std::optional<c10::Device> device;
  bool non_blocking = false;
  std::shared_ptr<PartialState> state;
};

/// A pass over an iterable dataset, as batches.
template <class Batch>
using BatchStream = std::function<std::optional<Batch>()>;

/// What a loader needs from its dataset, with the item type erased.
template <class Batch>
struct Source {
  bool map_style = true;
  /// Map-style: the dataset length, and the batch of the given indices (thread-safe).
  int64_t length = 0;
  std::function<Batch(const BatchIndices&)> fetch;
  /// Iterable: the dataset length if it has one, and a fresh pass, with this process's item
  /// sharding applied when given, batched by batch_size.
  std::optional<int64_t> iterable_length;
  std::function<BatchStream<Batch>(const std::optional<IterableShardOptions>&, int64_t batch_size,
                                   bool drop_last)>
      open;
};

template <class D>
int64_t dataset_length(const D& d) {
  const auto n = d.size();
  if constexpr (requires { n.has_value(); }) {
    TORCH_CHECK(n.has_value(),
                "accelerate: a map-style dataset must know its size, but size() returned "
                "nullopt");
    return static_cast<int64_t>(*n);
  } else {
    TORCH_CHECK(n >= 0, "accelerate: dataset size() returned ", n);
    return static_cast<int64_t>(n);
  }
}

template <class Batch, class D, class Collate>
std::shared_ptr<Source<Batch>> make_source(std::shared_ptr<D> dataset, Collate collate) {
  auto source = std::make_shared<Source<Batch>>();
  if constexpr (MapDataset<D>) {
    source->map_style = true;
    source->length = dataset_length(*dataset);
    source->fetch = [dataset, collate](const BatchIndices& indices) -> Batch {
      using Item = dataset_item_t<D>;
      std::vector<Item> items;
      items.reserve(indices.size());
      for (int64_t i : indices) items.push_back(dataset->get(static_cast<size_t>(i)));
      return collate(std::move(items));
    };
  } else {
    static_assert(IterableDataset<D>,
                  "accelerate::data::DataLoader needs a map-style dataset (size() and get(i)) or "
                  "an iterable one (reset() and next() returning std::optional)");
    source->map_style = false;
    if constexpr (requires { dataset->size(); }) {
      source->iterable_length = dataset_length(*dataset);
    }
    source->open = [dataset, collate](const std::optional<IterableShardOptions>& shard,
                                      int64_t batch_size, bool drop_last) -> BatchStream<Batch> {
      using Item = dataset_item_t<D>;
      dataset->reset();
      struct Pass {
        std::optional<IterableShardBuffer<Item>> shard;
        std::deque<Item> ready;
        bool source_done = false;
      };
      auto pass = std::make_shared<Pass>();
      if (shard) pass->shard.emplace(*shard);
      return [dataset, collate, pass, batch_size, drop_last]() -> std::optional<Batch> {
        while (static_cast<int64_t>(pass->ready.size()) < batch_size && !pass->source_done) {
          auto item = dataset->next();
          if (!item) {
            pass->source_done = true;
            if (pass->shard) {
              for (auto& x : pass->shard->finish()) pass->ready.push_back(std::move(x));
            }
            break;
          }
          if (pass->shard) {
            for (auto& x : pass->shard->push(std::move(*item))) pass->ready.push_back(std::move(x));
          } else {
            pass->ready.push_back(std::move(*item));
          }
        }
        if (pass->ready.empty()) return std::nullopt;
        if (static_cast<int64_t>(pass->ready.size()) < batch_size && drop_last) {
          pass->ready.clear();
          return std::nullopt;
        }
        std::vector<Item> items;
        const auto take = std::min<size_t>(pass->ready.size(), static_cast<size_t>(batch_size));
        for (size_t i = 0; i < take; ++i) {
          items.push_back(std::move(pass->ready.front()));
          pass->ready.pop_front();
        }
        return collate(std::move(items));
      };
    };
  }
  return source;
}

/// Loads batches `0..count` of a schedule on worker threads, in order, at most `depth` ahead.
template <class Batch>
class Prefetcher {
 public:
  Prefetcher(std::function<Batch(int64_t)> load, int64_t count, int workers, int64_t depth)
      : load_(std::move(load)), count_(count), depth_(std::max<int64_t>(depth, 1)) {
    for (int w = 0; w < workers; ++w) threads_.emplace_back([this] { work(); });
  }
  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;
  ~Prefetcher() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }

  /// Batch `i` (called with i = 0, 1, 2, ...); rethrows what loading it threw.
  Batch take(int64_t i) {
    std::unique_lock<std::mutex> lock(mutex_);
    consumed_ = i;
    wake_.notify_all();
    ready_.wait(lock, [&] { return results_.count(i) > 0; });
    auto node = results_.extract(i);
    consumed_ = i + 1;
    wake_.notify_all();
    if (node.mapped().error) std::rethrow_exception(node.mapped().error);
    return std::move(*node.mapped().batch);
  }

 private:
  struct Result {
    std::optional<Batch> batch;
    std::exception_ptr error;
  };

  void work() {
    for (;;) {
      int64_t i = 0;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock,
                   [&] { return stopping_ || (next_ < count_ && next_ < consumed_ + depth_); });
        if (stopping_) return;
        i = next_++;
      }
      Result r;
      try {
        r.batch.emplace(load_(i));
      } catch (...) {
        r.error = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> lock(mutex_);
        results_.emplace(i, std::move(r));
      }
      ready_.notify_all();
    }
  }

  std::function<Batch(int64_t)> load_;
  int64_t count_;
  int64_t depth_;
  std::mutex mutex_;
  std::condition_variable wake_, ready_;
  std::map<int64_t, Result> results_;
  int64_t next_ = 0;
  int64_t consumed_ = 0;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

/// Reads a stream on one background thread, at most `depth` batches ahead.
template <class Batch>
class StreamPrefetcher {
 public:
  StreamPrefetcher(BatchStream<Batch> stream, int64_t depth)
      : stream_(std::move(stream)), depth_(std::max<int64_t>(depth, 1)) {
    thread_ = std::thread([this] { work(); });
  }
  StreamPrefetcher(const StreamPrefetcher&) = delete;
  StreamPrefetcher& operator=(const StreamPrefetcher&) = delete;
  ~StreamPrefetcher() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    changed_.notify_all();
    thread_.join();
  }
  std::optional<Batch> next() {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [&] { return !queue_.empty() || done_; });
    if (queue_.empty()) {
      if (error_) std::rethrow_exception(error_);
      return std::nullopt;
    }
    auto b = std::move(queue_.front());
    queue_.pop_front();
    changed_.notify_all();
    return b;
  }

 private:
  void work() {
    try {
      for (;;) {
        {
          std::unique_lock<std::mutex> lock(mutex_);
          changed_.wait(lock,
                        [&] { return stopping_ || static_cast<int64_t>(queue_.size()) < depth_; });
          if (stopping_) return;
        }
        auto b = stream_();
        std::lock_guard<std::mutex> lock(mutex_);
        if (!b) break;
        queue_.push_back(std::move(*b));
        changed_.notify_all();
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      error_ = std::current_exception();
    }
    std::lock_guard<std::mutex> lock(mutex_);
    done_ = true;
    changed_.notify_all();
  }

  BatchStream<Batch> stream_;
  int64_t depth_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<Batch> queue_;
  bool done_ = false;
  bool stopping_ = false;
  std::exception_ptr error_;
  std::thread thread_;
};

/// Sends a batch from process 0 to every process (dispatch_batches). Others pass nullopt.
template <class Batch>
std::optional<Batch> broadcast_batch(const PartialState& state, std::optional<Batch> batch,
                                     bool has_batch) {
  if constexpr (object_codec_supported<Batch>) {
    std::vector<Batch> box;
    if (state.is_main_process() && has_batch) box.push_back(std::move(*batch));
    broadcast_object_list(state, box, 0);
    if (box.empty()) return std::nullopt;
    return std::move(box.front());
  } else {
    TORCH_CHECK(false, "accelerate: dispatch_batches sends each batch from process 0, but ",
                c10::demangle_type<Batch>(),
                " is not a type accelerate::ObjectCodec can send; specialise ObjectCodec for it "
                "or use dispatch_batches = false");
  }
}

void check_loader_options(const DataLoaderOptions& options, bool map_style);
std::shared_ptr<BatchSampler> make_batch_sampler(const DataLoaderOptions& options, int64_t length);
std::vector<uint8_t> generator_state(const std::optional<at::Generator>& generator);
void set_generator_state(const std::optional<at::Generator>& generator,
                         const std::vector<uint8_t>& state);

}  // namespace detail

// ---------------------------------------------------------------------- DataLoader

/// Batches of a dataset, in epochs, optionally sharded between processes by
/// prepare_data_loader.
template <class Batch>
class DataLoader {
  struct Impl;
  struct Run;

 public:
  using batch_type = Batch;

  /// A loader over `dataset` (held by value, shared by copies of the loader). `collate` turns
  /// a std::vector of items into a Batch.
  template <class D, class Collate = DefaultCollate>
  requires(!std::is_same_v<std::decay_t<D>, DataLoader>) explicit DataLoader(
      D dataset, DataLoaderOptions options = {}, Collate collate = {})
      : DataLoader(std::make_shared<std::decay_t<D>>(std::move(dataset)), std::move(options),
                   std::move(collate)) {}

  /// As above, sharing `dataset` with the caller.
  template <class D, class Collate = DefaultCollate>
  DataLoader(std::shared_ptr<D> dataset, DataLoaderOptions options = {}, Collate collate = {})
      : impl_(std::make_shared<Impl>()) {
    impl_->source = detail::make_source<Batch>(std::move(dataset), std::move(collate));
    detail::check_loader_options(options, impl_->source->map_style);
    if (impl_->source->map_style) {
      impl_->batch_sampler = detail::make_batch_sampler(options, impl_->source->length);
    }
    impl_->options = std::move(options);
  }

  class Iterator;
  struct Sentinel {};

  /// Starts an iteration (an epoch). Starting a new one while another is under way ends that
  /// one.
  Iterator begin() {
    auto run = std::make_shared<Run>(impl_);
    impl_->active = run;
    return Iterator(std::move(run));
  }
  Sentinel end() const { return {}; }

  /// Batches this process gets per epoch (Accelerate's `len(dataloader)`); an error for an
  /// iterable dataset without size().
  int64_t size() const;
  /// Samples per optimisation step over all processes (Accelerate's `total_batch_size`).
  int64_t total_batch_size() const;
  /// Samples of the whole dataset (Accelerate's `total_dataset_length`).
  int64_t total_dataset_length() const;
  /// This process's batch size.
  int64_t batch_size() const;
  bool drop_last() const;
  bool map_style() const { return impl_->source->map_style; }

  /// Sets the epoch the next iteration uses: passed to the sampler (SeedableRandomSampler
  /// orders by seed + epoch) and kept as the loader's iteration count.
  void set_epoch(int64_t epoch) { impl_->iteration = epoch; }
  /// Completed iterations (the epoch of the next one).
  int64_t iteration() const { return impl_->iteration; }

  /// True while the batch just handed out is the last of the iteration.
  bool end_of_dataloader() const { return impl_->progress->end_of_dataloader; }
  /// Real samples of the last gathered batch; see LoaderProgress.
  int64_t remainder() const { return impl_->progress->remainder; }

  /// Where the loader is, for checkpoints. Take it inside the loop, while the iteration is
  /// running: once a range-for ends (or is left with `break`) the iteration is over and the
  /// position points at the start of the next iteration (the epoch counts up only when an
  /// iteration runs to its end, as in Accelerate).
  ///
  ///   for (auto& batch : loader) {
  ///     train(batch);
  ///     if (time_to_save) save(loader.position());
  ///   }
  LoaderPosition position() const;
  /// Continue from `position` at the next iteration: the same epoch, without the batches
  /// already yielded, which map-style loaders skip without loading them.
  void set_position(const LoaderPosition& position);

  /// The batch sampler (map-style loaders), e.g. to inspect its sampler.
  std::shared_ptr<BatchSampler> batch_sampler() const { return impl_->batch_sampler; }
  const DataLoaderOptions& options() const { return impl_->options; }
  /// Whether prepare_data_loader made this loader.
  bool prepared() const { return impl_->shard.has_value(); }
  bool dispatches() const { return impl_->shard && impl_->shard->dispatch; }

  /// The iterator of one pass. Copies share the pass.
  class Iterator {
   public:
    using iterator_category = std::input_iterator_tag;
    using value_type = Batch;
    using difference_type = std::ptrdiff_t;
    using pointer = Batch*;
    using reference = Batch&;

    Iterator() = default;
    Batch& operator*() const { return *run_->current; }
    Batch* operator->() const { return &*run_->current; }
    Iterator& operator++() {
      run_->advance();
      return *this;
    }
    void operator++(int) { ++*this; }
    bool operator==(const Sentinel&) const { return !run_ || !run_->current; }

   private:
    friend class DataLoader;
    explicit Iterator(std::shared_ptr<Run> run) : run_(std::move(run)) { run_->advance(); }
    std::shared_ptr<Run> run_;
  };

  // Implementation access for prepare_data_loader and skip_first_batches.
  template <class B>
  friend DataLoader<B> prepare_data_loader(const DataLoader<B>& loader,
                                           const PrepareDataLoaderOptions& options);
  template <class B>
  friend DataLoader<B> skip_first_batches(const DataLoader<B>& loader, int64_t num_batches);

 private:
  struct Impl {
    std::shared_ptr<detail::Source<Batch>> source;
    std::shared_ptr<BatchSampler> batch_sampler;
    DataLoaderOptions options;
    std::optional<detail::ShardConfig> shard;
    std::shared_ptr<GradientState> gradient_state;
    int64_t iteration = 0;
    int64_t skip_batches = 0;              // skip_first_batches: every iteration
    std::optional<LoaderPosition> resume;  // set_position: the next iteration only
    // The current iteration's start, for position().
    std::vector<uint8_t> epoch_sampler_state;
    int64_t epoch_of_run = -1;
    int64_t yielded = 0;
    std::shared_ptr<LoaderProgress> progress = std::make_shared<LoaderProgress>();
    std::weak_ptr<Run> active;
  };

  explicit DataLoader(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

  std::optional<at::Generator> sampler_generator() const {
    if (!impl_->batch_sampler) return std::nullopt;
    auto sampler = impl_->batch_sampler->sampler();
    return sampler ? sampler->generator() : std::nullopt;
  }

  /// One iteration: the schedule, the loading machinery, and the registration with the
  /// gradient state.
  struct Run {
    explicit Run(std::shared_ptr<Impl> impl);
    ~Run();
    void advance();
    void finish();
    std::optional<Batch> load_next();
    std::optional<Batch> next_dispatched();
    Batch place(Batch batch) const;

    std::shared_ptr<Impl> impl;
    std::optional<Batch> current;
    bool finished = false;
    // Map-style, not dispatched: this process's batches.
    std::vector<BatchIndices> schedule;
    int64_t next_index = 0;
    std::unique_ptr<detail::Prefetcher<Batch>> prefetcher;
    // Iterable, not dispatched.
    detail::BatchStream<Batch> stream;
    std::unique_ptr<detail::StreamPrefetcher<Batch>> stream_prefetcher;
    std::optional<Batch> lookahead;
    bool lookahead_valid = false;
    // Dispatched: process 0 reads base batches from here.
    std::function<std::optional<Batch>()> base_next;
    std::optional<Batch> dispatch_first;  // first num_processes rows of the first batch
    std::optional<Batch> dispatch_pending;
    bool dispatch_pending_valid = false;
    bool dispatch_stop = false;
    int64_t to_skip = 0;
  };

  std::shared_ptr<Impl> impl_;
};

/// Deduction: DataLoader(dataset, options) batches with DefaultCollate.
template <class D>
DataLoader(D, DataLoaderOptions = {}) -> DataLoader<collated_t<dataset_item_t<D>>>;
template <class D>
DataLoader(std::shared_ptr<D>, DataLoaderOptions = {}) -> DataLoader<collated_t<dataset_item_t<D>>>;

/// Accelerate's `prepare_data_loader`: a loader over the same dataset that gives this process
/// its share of every epoch (see sharding.h for the exact rules), synchronises the sampler's
/// generator across processes at every iteration, places batches on the device, and reports
/// end_of_dataloader / remainder to the gradient state so gather_for_metrics can drop the
/// samples added to even out the last batches.
template <class Batch>
DataLoader<Batch> prepare_data_loader(const DataLoader<Batch>& loader,
                                      const PrepareDataLoaderOptions& options = {});

/// Accelerate's `skip_first_batches`: a loader that skips the first `num_batches` batches of
/// every iteration of `loader` (sharing its sampler and generator). Map-style loaders skip
/// without loading; iterable ones read and drop.
template <class Batch>
DataLoader<Batch> skip_first_batches(const DataLoader<Batch>& loader, int64_t num_batches);

/// Accelerate's `gather_for_metrics`: gathers `data` from all processes; on the last batch of
/// a prepared loader, drops the samples that were repeated to even out the batches, so that
/// every sample of the dataset is counted once.
template <class T>
T gather_for_metrics(const PartialState& state, const GradientState& gradient_state,
                     const T& data) {
  T all = gather(state, data);
  if (!gradient_state.end_of_dataloader()) return all;
  const int64_t keep = gradient_state.remainder();
  if (keep <= 0) return all;
  return recursively_apply([keep](const at::Tensor& t) { return t.slice(0, 0, keep); }, all);
}
template <class T>
T gather_for_metrics(const T& data) {
  return gather_for_metrics(PartialState::shared(), GradientState::shared(), data);
}

/// gather_for_metrics for objects (Accelerate's `use_gather_object=True`): one object per
/// sample of this process's batch.
template <class T>
std::vector<T> gather_object_for_metrics(const PartialState& state,
                                         const GradientState& gradient_state,
                                         const std::vector<T>& objects) {
  auto all = gather_object(state, objects);
  if (!gradient_state.end_of_dataloader()) return all;
  const int64_t keep = gradient_state.remainder();
  if (keep > 0 && keep < static_cast<int64_t>(all.size())) all.resize(static_cast<size_t>(keep));
  return all;
}
template <class T>
std::vector<T> gather_object_for_metrics(const std::vector<T>& objects) {
  return gather_object_for_metrics(PartialState::shared(), GradientState::shared(), objects);
}

}  // namespace accelerate::data

#include <accelerate/data/detail/data_loader_impl.h>
