#pragma once
/// \file
/// Accelerate's `GradientState`: what the training loop needs to know about the data loaders
/// being iterated (whether the current batch is the last one, how many of the last batch's
/// samples are real) and whether this step synchronises gradients. Data loaders register
/// themselves while they are iterated; `gather_for_metrics` and gradient accumulation read it.
///
/// Example:
/// \code
///   auto& gs = accelerate::data::GradientState::shared();
///   for (auto& batch : loader) {
///     if (gs.end_of_dataloader()) std::cout << "last batch, " << gs.remainder() << " real\n";
///   }
/// \endcode

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace accelerate::data {

/// The loader-side state one iteration of a data loader publishes (Accelerate's
/// `DataLoaderStateMixin`).
struct LoaderProgress {
  /// True while the batch being handed out is the last of the iteration.
  bool end_of_dataloader = false;
  /// Real samples in the last gathered batch (dataset length % total batch size), -1 when
  /// unknown (no length, or drop_last), 0 when the last batch is complete.
  int64_t remainder = -1;
};

/// Accelerate's `GradientState`. One per process is shared by default (shared()); tests that run
/// ranks as threads make one per rank.
class GradientState {
 public:
  GradientState() = default;
  GradientState(const GradientState&) = delete;
  GradientState& operator=(const GradientState&) = delete;

  /// The process-wide instance.
  static GradientState& shared();
  static std::shared_ptr<GradientState> shared_ptr();

  /// Whether gradients are synchronised (and the optimizer steps) at this step.
  bool sync_gradients() const;
  void set_sync_gradients(bool sync);
  /// Whether reaching the end of a data loader forces a synchronising step.
  bool sync_with_dataloader() const;
  void set_sync_with_dataloader(bool sync);

  /// True while the innermost active data loader hands out its last batch.
  bool end_of_dataloader() const;
  /// The innermost active loader's remainder (see LoaderProgress), -1 with none active.
  int64_t remainder() const;
  /// Whether some data loader is being iterated.
  bool in_dataloader() const;
  /// How many loaders are being iterated (nested loops).
  size_t active_dataloaders() const;

  /// Called by data loaders: start and end of one iteration. `progress` must outlive the
  /// registration.
  void add_dataloader(const std::shared_ptr<const LoaderProgress>& progress);
  void remove_dataloader(const LoaderProgress* progress);

 private:
  mutable std::mutex mutex_;
  bool sync_gradients_ = true;
  bool sync_with_dataloader_ = true;
  std::vector<std::shared_ptr<const LoaderProgress>> active_;
};

}  // namespace accelerate::data
