#pragma once
// The template definitions of data_loader.h; include that header instead.

#include <accelerate/data/data_loader.h>

#include <ATen/Context.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

namespace accelerate::data {

// ---------------------------------------------------------------------- sizes

template <class Batch>
int64_t DataLoader<Batch>::batch_size() const {
  const auto& s = impl_->shard;
  int64_t base = impl_->options.batch_size;
  if (impl_->batch_sampler) {
    auto b = impl_->batch_sampler->batch_size();
    TORCH_CHECK(b.has_value(), "accelerate: the batch sampler has no fixed batch size");
    base = *b;
  }
  return s && s->split_batches ? base / s->num_processes : base;
}

template <class Batch>
bool DataLoader<Batch>::drop_last() const {
  return impl_->batch_sampler ? impl_->batch_sampler->drop_last() : impl_->options.drop_last;
}

template <class Batch>
int64_t DataLoader<Batch>::total_batch_size() const {
  const auto& s = impl_->shard;
  const int64_t mine = batch_size();
  if (!s) return mine;
  return mine * s->num_processes;
}

template <class Batch>
int64_t DataLoader<Batch>::total_dataset_length() const {
  const auto& src = *impl_->source;
  if (src.map_style) return src.length;
  TORCH_CHECK(src.iterable_length.has_value(),
              "accelerate: this iterable dataset has no size(), so its length is unknown");
  return *src.iterable_length;
}

template <class Batch>
int64_t DataLoader<Batch>::size() const {
  const auto& s = impl_->shard;
  int64_t n = 0;
  if (impl_->source->map_style && !(s && s->dispatch)) {
    const int64_t whole = impl_->batch_sampler->size();
    n = s && s->num_processes > 1
            ? sharded_length(whole, {.num_processes = s->num_processes,
                                     .process_index = s->process_index,
                                     .batch_size = impl_->batch_sampler->batch_size(),
                                     .drop_last = impl_->batch_sampler->drop_last(),
                                     .split_batches = s->split_batches,
                                     .even_batches = s->even_batches})
            : whole;
  } else if (impl_->source->map_style) {
    // Accelerate's DataLoaderDispatcher.__len__.
    const int64_t whole = impl_->batch_sampler->size();
    const int64_t procs = s->num_processes;
    n = s->split_batches ? whole : drop_last() ? whole / procs : (whole + procs - 1) / procs;
  } else {
    const int64_t length = total_dataset_length();
    const int64_t procs = s ? s->num_processes : 1;
    const int64_t global = batch_size() * procs;
    if (s && s->dispatch) {
      const int64_t base_batches =
          drop_last() ? length / impl_->options.batch_size
                      : (length + impl_->options.batch_size - 1) / impl_->options.batch_size;
      n = s->split_batches ? base_batches
          : drop_last()    ? base_batches / procs
                           : (base_batches + procs - 1) / procs;
    } else {
      n = drop_last() ? length / global : (length + global - 1) / global;
    }
  }
  return std::max<int64_t>(0, n - impl_->skip_batches);
}

// ---------------------------------------------------------------------- position

template <class Batch>
LoaderPosition DataLoader<Batch>::position() const {
  if (auto run = impl_->active.lock(); run && !run->finished) {
    return {impl_->epoch_of_run, impl_->yielded, impl_->epoch_sampler_state};
  }
  return {impl_->iteration, 0, detail::generator_state(sampler_generator())};
}

template <class Batch>
void DataLoader<Batch>::set_position(const LoaderPosition& position) {
  TORCH_CHECK(position.epoch >= 0 && position.batches_yielded >= 0,
              "accelerate: invalid loader position (epoch ", position.epoch, ", batches_yielded ",
              position.batches_yielded, ")");
  TORCH_CHECK(position.sampler_state.empty() || sampler_generator().has_value(),
              "accelerate: the loader position has a sampler generator state, but this loader's "
              "sampler has no generator");
  // A position past the end would skip the whole epoch without a word, typically because the
  // checkpoint belongs to a larger dataset. Positions count the batches skip_first_batches
  // skips, so the bound is the epoch before skipping. Iterable datasets without size() cannot
  // be checked.
  if (impl_->source->map_style || impl_->source->iterable_length) {
    const int64_t batches = size() + impl_->skip_batches;
    TORCH_CHECK(
        position.batches_yielded <= batches,
        "accelerate: the loader position is outside the dataset: ", position.batches_yielded,
        " batches already yielded, but this loader has ", batches, " batches per epoch");
  }
  impl_->resume = position;
  // iteration() is what training loops count epochs by: it must say the resumed epoch at once.
  impl_->iteration = position.epoch;
}

// ---------------------------------------------------------------------- one iteration

template <class Batch>
DataLoader<Batch>::Run::Run(std::shared_ptr<Impl> impl_in) : impl(std::move(impl_in)) {
  if (auto previous = impl->active.lock()) previous->finish();
  const auto& shard = impl->shard;
  DataLoader<Batch> self(impl);
  auto generator = self.sampler_generator();

  // Every process must draw the same order: process 0's generators are copied to the others.
  if (shard && !shard->dispatch && shard->state) {
    for (RNGType type : shard->rng_types) {
      if (type == RNGType::GENERATOR) {
        if (generator) synchronize_rng_state(*shard->state, type, generator);
      } else {
        synchronize_rng_state(*shard->state, type);
      }
    }
  }
  if (impl->resume) {
    impl->iteration = impl->resume->epoch;
    detail::set_generator_state(generator, impl->resume->sampler_state);
    to_skip = impl->resume->batches_yielded;
    impl->resume.reset();
  }
  to_skip += impl->skip_batches;
  impl->epoch_sampler_state = detail::generator_state(generator);
  impl->epoch_of_run = impl->iteration;
  impl->yielded = to_skip;
  if (impl->batch_sampler && impl->batch_sampler->sampler()) {
    impl->batch_sampler->sampler()->set_epoch(impl->iteration);
  }

  auto& progress = *impl->progress;
  progress.end_of_dataloader = false;
  progress.remainder = -1;
  // A batch sampler of varying batch sizes has no remainder to predict; the last batch then
  // reports what it observed.
  const bool fixed_size = !impl->batch_sampler || impl->batch_sampler->batch_size().has_value();
  if (fixed_size && !self.drop_last() &&
      (impl->source->map_style || impl->source->iterable_length)) {
    const int64_t total = self.total_batch_size();
    if (total > 0) progress.remainder = self.total_dataset_length() % total;
  }
  if (impl->gradient_state) impl->gradient_state->add_dataloader(impl->progress);

  const auto& opts = impl->options;
  const int64_t depth = static_cast<int64_t>(opts.num_workers) * opts.prefetch_factor;
  auto src = impl->source;
  if (shard && shard->dispatch) {
    if (shard->state->is_main_process()) {
      if (src->map_style) {
        auto batches = std::make_shared<std::vector<BatchIndices>>(impl->batch_sampler->epoch());
        const auto count = static_cast<int64_t>(batches->size());
        auto load = [src, batches](int64_t i) {
          return src->fetch((*batches)[static_cast<size_t>(i)]);
        };
        std::shared_ptr<detail::Prefetcher<Batch>> pre;
        if (opts.num_workers > 0) {
          pre = std::make_shared<detail::Prefetcher<Batch>>(load, count, opts.num_workers, depth);
        }
        auto next = std::make_shared<int64_t>(0);
        base_next = [load, pre, next, count]() -> std::optional<Batch> {
          if (*next >= count) return std::nullopt;
          const int64_t i = (*next)++;
          return pre ? pre->take(i) : load(i);
        };
      } else {
        auto stream = src->open(std::nullopt, opts.batch_size, opts.drop_last);
        if (opts.num_workers > 0) {
          auto pre = std::make_shared<detail::StreamPrefetcher<Batch>>(stream, depth);
          base_next = [pre] { return pre->next(); };
        } else {
          base_next = stream;
        }
      }
    }
  } else if (src->map_style) {
    auto batches = impl->batch_sampler->epoch();
    // As in Accelerate, one process takes the sampler's batches unchanged (no wrap-around).
    if (shard && shard->num_processes > 1) {
      batches = shard_batches(batches, {.num_processes = shard->num_processes,
                                        .process_index = shard->process_index,
                                        .batch_size = impl->batch_sampler->batch_size(),
                                        .drop_last = impl->batch_sampler->drop_last(),
                                        .split_batches = shard->split_batches,
                                        .even_batches = shard->even_batches});
    }
    // Skipped batches are dropped from the schedule: never loaded.
    const auto skip = std::min<size_t>(static_cast<size_t>(to_skip), batches.size());
    schedule.assign(std::make_move_iterator(batches.begin() + static_cast<std::ptrdiff_t>(skip)),
                    std::make_move_iterator(batches.end()));
    to_skip = 0;
    if (opts.num_workers > 0 && !schedule.empty()) {
      auto indices = std::make_shared<std::vector<BatchIndices>>(schedule);
      prefetcher = std::make_unique<detail::Prefetcher<Batch>>(
          [src, indices](int64_t i) { return src->fetch((*indices)[static_cast<size_t>(i)]); },
          static_cast<int64_t>(schedule.size()), opts.num_workers, depth);
    }
  } else {
    std::optional<IterableShardOptions> item_shard;
    if (shard && shard->num_processes > 1) {
      item_shard = IterableShardOptions{.num_processes = shard->num_processes,
                                        .process_index = shard->process_index,
                                        .batch_size = opts.batch_size,
                                        .drop_last = opts.drop_last,
                                        .split_batches = shard->split_batches};
    }
    stream = src->open(item_shard, self.batch_size(), opts.drop_last);
    if (opts.num_workers > 0) {
      stream_prefetcher = std::make_unique<detail::StreamPrefetcher<Batch>>(stream, depth);
    }
  }
}

template <class Batch>
DataLoader<Batch>::Run::~Run() {
  if (!finished && impl->gradient_state)
    impl->gradient_state->remove_dataloader(impl->progress.get());
}

template <class Batch>
void DataLoader<Batch>::Run::finish() {
  if (finished) return;
  finished = true;
  current.reset();
  prefetcher.reset();
  stream_prefetcher.reset();
  if (impl->gradient_state) impl->gradient_state->remove_dataloader(impl->progress.get());
}

template <class Batch>
Batch DataLoader<Batch>::Run::place(Batch batch) const {
  const auto& shard = impl->shard;
  if (shard && shard->device && !shard->device->is_cpu()) {
    return send_to_device(batch, *shard->device, {.non_blocking = shard->non_blocking});
  }
  if (impl->options.pin_memory && at::hasCUDA()) {
    return recursively_apply([](const at::Tensor& t) { return t.is_cpu() ? t.pin_memory() : t; },
                             batch);
  }
  return batch;
}

template <class Batch>
std::optional<Batch> DataLoader<Batch>::Run::next_dispatched() {
  const auto& shard = *impl->shard;
  const PartialState& state = *shard.state;
  const int procs = shard.num_processes;
  const bool drop_last =
      impl->source->map_style ? impl->batch_sampler->drop_last() : impl->options.drop_last;
  // One group: a base batch (split_batches) or num_processes base batches concatenated; a
  // partial group at the end counts unless drop_last.
  auto fetch_group = [&]() -> std::optional<Batch> {
    std::optional<Batch> group;
    if (state.is_main_process()) {
      if (shard.split_batches) {
        group = base_next();
      } else {
        std::vector<Batch> parts;
        for (int i = 0; i < procs; ++i) {
          auto b = base_next();
          if (!b) break;
          parts.push_back(std::move(*b));
        }
        if (static_cast<int>(parts.size()) == procs || (!parts.empty() && !drop_last)) {
          try {
            group = concatenate(parts);
          } catch (const c10::Error& e) {
            TORCH_CHECK(false,
                        "accelerate: dispatch_batches concatenates num_processes batches, but "
                        "they do not fit together (batches of different structure or shape?): ",
                        e.what_without_backtrace());
          }
        }
      }
    }
    const bool has = group.has_value();
    return detail::broadcast_batch<Batch>(state, std::move(group), has);
  };

  if (!dispatch_pending_valid) {
    dispatch_pending = fetch_group();
    dispatch_pending_valid = true;
  }
  if (!dispatch_pending) return std::nullopt;
  Batch batch = std::move(*dispatch_pending);
  dispatch_pending = fetch_group();
  const bool last = !dispatch_pending.has_value();

  if (!drop_last && !dispatch_first) dispatch_first = slice_tensors(batch, 0, procs);
  const int64_t observed = find_batch_size(batch);
  int64_t per = observed / procs;
  if (!drop_last && last && observed % procs != 0) {
    batch = concatenate(std::vector<Batch>{batch, *dispatch_first});
    per += 1;
  }
  Batch mine = slice_tensors(batch, shard.process_index * per, (shard.process_index + 1) * per);
  if (last) impl->progress->remainder = observed;
  return mine;
}

template <class Batch>
std::optional<Batch> DataLoader<Batch>::Run::load_next() {
  const auto& shard = impl->shard;
  if (shard && shard->dispatch) {
    auto b = next_dispatched();
    if (b && !dispatch_pending) impl->progress->end_of_dataloader = true;
    return b;
  }
  if (impl->source->map_style) {
    const auto count = static_cast<int64_t>(schedule.size());
    if (next_index >= count) return std::nullopt;
    const int64_t i = next_index++;
    Batch b =
        prefetcher ? prefetcher->take(i) : impl->source->fetch(schedule[static_cast<size_t>(i)]);
    if (next_index == count) impl->progress->end_of_dataloader = true;
    return b;
  }
  auto pull = [&]() { return stream_prefetcher ? stream_prefetcher->next() : stream(); };
  if (!lookahead_valid) {
    lookahead = pull();
    lookahead_valid = true;
  }
  if (!lookahead) return std::nullopt;
  Batch b = std::move(*lookahead);
  lookahead = pull();
  if (!lookahead) impl->progress->end_of_dataloader = true;
  return b;
}

template <class Batch>
void DataLoader<Batch>::Run::advance() {
  if (finished) {
    current.reset();
    return;
  }
  // Batches skipped by reading (iterable or dispatched loaders).
  for (; to_skip > 0; --to_skip) {
    if (!load_next()) break;
    impl->progress->end_of_dataloader = false;
  }
  auto b = load_next();
  if (!b) {
    finish();
    ++impl->iteration;
    return;
  }
  current = place(std::move(*b));
  ++impl->yielded;
}

// ---------------------------------------------------------------------- prepare / skip

template <class Batch>
DataLoader<Batch> prepare_data_loader(const DataLoader<Batch>& loader,
                                      const PrepareDataLoaderOptions& options) {
  using Impl = typename DataLoader<Batch>::Impl;
  const auto& src = *loader.impl_;
  TORCH_CHECK(!src.shard, "accelerate: prepare_data_loader was given a loader it already prepared");
  auto state = options.state;
  if (!state) {
    PartialState::shared();
    state = PartialState::shared_if_created();
  }
  auto gradient_state =
      options.gradient_state ? options.gradient_state : GradientState::shared_ptr();
  detail::ShardConfig shard;
  shard.state = state;
  shard.num_processes = options.num_processes.value_or(state->num_processes());
  shard.process_index = options.process_index.value_or(state->process_index());
  TORCH_CHECK(shard.num_processes >= 1 && shard.process_index >= 0 &&
                  shard.process_index < shard.num_processes,
              "accelerate: prepare_data_loader: process_index ", shard.process_index,
              " is outside [0, ", shard.num_processes, ")");
  shard.split_batches = options.split_batches;
  shard.even_batches = options.even_batches;
  shard.dispatch = options.dispatch_batches.value_or(!src.source->map_style);
  shard.non_blocking = options.non_blocking;
  if (options.device_placement) shard.device = options.device.value_or(state->device());

  auto impl = std::make_shared<Impl>();
  impl->source = src.source;
  impl->options = src.options;
  impl->batch_sampler = src.batch_sampler;
  impl->gradient_state = gradient_state;

  if (src.batch_sampler) {
    auto sampler = src.batch_sampler->sampler();
    auto* random = dynamic_cast<RandomSampler*>(sampler.get());
    const bool plain_batches = typeid(*src.batch_sampler) == typeid(BatchSampler);
    if (options.use_seedable_sampler && random != nullptr &&
        dynamic_cast<SeedableRandomSampler*>(random) == nullptr) {
      TORCH_CHECK(plain_batches,
                  "accelerate: use_seedable_sampler replaces the sampler of a BatchSampler, but "
                  "this loader has a custom batch sampler");
      const uint64_t seed =
          options.data_seed.value_or(at::detail::getDefaultCPUGenerator().current_seed());
      impl->batch_sampler = std::make_shared<BatchSampler>(
          std::make_shared<SeedableRandomSampler>(random->size(), seed),
          *src.batch_sampler->batch_size(), src.batch_sampler->drop_last());
    } else if (sampler && !sampler->generator()) {
      // A generator of our own, so it can be synchronised and saved. Its seed is drawn from the
      // global generator, as Accelerate does, so that seeding LibTorch still seeds the shuffle.
      const auto seed = at::empty({}, at::kLong).random_().item<int64_t>();
      sampler->set_generator(at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed)));
    }
    const auto bs = impl->batch_sampler->batch_size();
    check_batch_shard_options({.num_processes = shard.num_processes,
                               .process_index = shard.process_index,
                               .batch_size = bs,
                               .drop_last = impl->batch_sampler->drop_last(),
                               .split_batches = shard.split_batches,
                               .even_batches = shard.even_batches || shard.dispatch});
  } else {
    check_iterable_shard_options({.num_processes = shard.num_processes,
                                  .process_index = shard.process_index,
                                  .batch_size = src.options.batch_size,
                                  .drop_last = src.options.drop_last,
                                  .split_batches = shard.split_batches});
  }
  if (shard.dispatch) {
    TORCH_CHECK(object_codec_supported<Batch>,
                "accelerate: dispatch_batches sends each batch from process 0, but ",
                c10::demangle_type<Batch>(),
                " is not a type accelerate::ObjectCodec can send; specialise ObjectCodec for it "
                "or pass dispatch_batches = false");
  }
  for (RNGType t : options.rng_types) shard.rng_types.push_back(t);
  impl->shard = std::move(shard);
  return DataLoader<Batch>(std::move(impl));
}

template <class Batch>
DataLoader<Batch> skip_first_batches(const DataLoader<Batch>& loader, int64_t num_batches) {
  using Impl = typename DataLoader<Batch>::Impl;
  TORCH_CHECK(num_batches >= 0, "accelerate: skip_first_batches: num_batches must be >= 0, got ",
              num_batches);
  const auto& src = *loader.impl_;
  auto impl = std::make_shared<Impl>();
  impl->source = src.source;
  impl->batch_sampler = src.batch_sampler;
  impl->options = src.options;
  impl->shard = src.shard;
  impl->gradient_state = src.gradient_state;
  impl->iteration = src.iteration;
  impl->skip_batches = src.skip_batches + num_batches;
  return DataLoader<Batch>(std::move(impl));
}

}  // namespace accelerate::data
