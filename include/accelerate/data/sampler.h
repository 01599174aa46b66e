#pragma once
/// \file
/// Samplers (which dataset indices one epoch visits, in which order) and batch samplers (how
/// they are grouped into batches), like `torch.utils.data`'s, plus Accelerate's
/// `SeedableRandomSampler` and `SkipBatchSampler`. A sampler hands out a whole epoch at once:
/// the index list is what sharding, skipping and resuming work on, and it costs 8 bytes per
/// sample.
///
/// Example:
/// \code
///   auto sampler = std::make_shared<accelerate::data::RandomSampler>(100);
///   accelerate::data::BatchSampler batches(sampler, /*batch_size=*/8, /*drop_last=*/false);
///   for (const auto& batch : batches.epoch()) use(batch);  // 13 batches, the last of 4
/// \endcode

#include <ATen/core/Generator.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace accelerate::data {

/// The indices of one batch.
using BatchIndices = std::vector<int64_t>;

/// The order in which one epoch visits a map-style dataset.
class Sampler {
 public:
  virtual ~Sampler() = default;
  /// The indices of the next epoch. Random samplers advance their generator.
  virtual std::vector<int64_t> epoch() = 0;
  /// How many indices an epoch has.
  virtual int64_t size() const = 0;
  /// Called with the epoch number before each epoch (PyTorch's `set_epoch` convention).
  virtual void set_epoch(int64_t /*epoch*/) {}
  /// The generator the sampler draws from, if any: the loader synchronises it across
  /// processes and saves its state in the loader position.
  virtual std::optional<at::Generator> generator() const { return std::nullopt; }
  /// Gives the sampler a generator when it has none (prepare_data_loader does this so that
  /// the generator can be synchronised). Returns false for samplers that draw nothing.
  virtual bool set_generator(at::Generator /*generator*/) { return false; }
};

/// 0, 1, ..., size - 1.
///
/// Example:
/// \code
///   accelerate::data::SequentialSampler s(4);  // s.epoch() == {0, 1, 2, 3}
/// \endcode
class SequentialSampler : public Sampler {
 public:
  explicit SequentialSampler(int64_t size);
  std::vector<int64_t> epoch() override;
  int64_t size() const override { return size_; }

 private:
  int64_t size_;
};

/// A random permutation per epoch (PyTorch's `RandomSampler` without replacement): with a
/// generator, `randperm(size, generator)`, so the same seed gives the same order as PyTorch's
/// Python sampler; without one, each epoch seeds a fresh generator from LibTorch's global one,
/// as PyTorch does.
///
/// Example:
/// \code
///   auto gen = at::make_generator<at::CPUGeneratorImpl>(42);
///   accelerate::data::RandomSampler s(10, gen);
/// \endcode
class RandomSampler : public Sampler {
 public:
  explicit RandomSampler(int64_t size, std::optional<at::Generator> generator = std::nullopt);
  std::vector<int64_t> epoch() override;
  int64_t size() const override { return size_; }
  std::optional<at::Generator> generator() const override { return generator_; }
  bool set_generator(at::Generator generator) override;

 protected:
  int64_t size_;
  std::optional<at::Generator> generator_;
};

/// Accelerate's `SeedableRandomSampler`: epoch e is the permutation of a generator seeded with
/// `seed + e`, so every process (and a resumed run) can recompute any epoch from two numbers.
/// The epoch advances by one after each epoch() and is overridden by set_epoch().
///
/// Example:
/// \code
///   accelerate::data::SeedableRandomSampler s(10, /*seed=*/42);
///   s.set_epoch(3);
///   auto order = s.epoch();  // randperm(10) of a generator seeded with 45
/// \endcode
class SeedableRandomSampler : public RandomSampler {
 public:
  SeedableRandomSampler(int64_t size, uint64_t seed);
  std::vector<int64_t> epoch() override;
  void set_epoch(int64_t epoch) override { epoch_ = epoch; }
  int64_t current_epoch() const { return epoch_; }
  uint64_t initial_seed() const { return seed_; }

 private:
  uint64_t seed_;
  int64_t epoch_ = 0;
};

/// Groups a sampler's indices into batches (PyTorch's `BatchSampler`).
///
/// Example:
/// \code
///   accelerate::data::BatchSampler b(std::make_shared<accelerate::data::SequentialSampler>(5),
///                                    2, /*drop_last=*/false);  // {0,1} {2,3} {4}
/// \endcode
class BatchSampler {
 public:
  BatchSampler(std::shared_ptr<Sampler> sampler, int64_t batch_size, bool drop_last);
  virtual ~BatchSampler() = default;
  /// The batches of the next epoch.
  virtual std::vector<BatchIndices> epoch();
  /// Batches per epoch.
  virtual int64_t size() const;
  /// The size of every batch but possibly the last; nullopt for samplers of varying size.
  virtual std::optional<int64_t> batch_size() const { return batch_size_; }
  virtual bool drop_last() const { return drop_last_; }
  /// The sampler underneath, if any.
  virtual std::shared_ptr<Sampler> sampler() const { return sampler_; }

 protected:
  BatchSampler() = default;
  std::shared_ptr<Sampler> sampler_;
  int64_t batch_size_ = 1;
  bool drop_last_ = false;
};

}  // namespace accelerate::data
