#include <accelerate/data/gradient_state.h>

#include <algorithm>

namespace accelerate::data {

std::shared_ptr<GradientState> GradientState::shared_ptr() {
  static const auto instance = std::make_shared<GradientState>();
  return instance;
}

GradientState& GradientState::shared() {
  return *shared_ptr();
}

bool GradientState::sync_gradients() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return sync_gradients_;
}

void GradientState::set_sync_gradients(bool sync) {
  std::lock_guard<std::mutex> lock(mutex_);
  sync_gradients_ = sync;
}

bool GradientState::sync_with_dataloader() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return sync_with_dataloader_;
}

void GradientState::set_sync_with_dataloader(bool sync) {
  std::lock_guard<std::mutex> lock(mutex_);
  sync_with_dataloader_ = sync;
}

bool GradientState::end_of_dataloader() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return !active_.empty() && active_.back()->end_of_dataloader;
}

int64_t GradientState::remainder() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return active_.empty() ? -1 : active_.back()->remainder;
}

bool GradientState::in_dataloader() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return !active_.empty();
}

size_t GradientState::active_dataloaders() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return active_.size();
}

void GradientState::add_dataloader(const std::shared_ptr<const LoaderProgress>& progress) {
  std::lock_guard<std::mutex> lock(mutex_);
  // A loader restarted before its previous iteration ended is registered once.
  std::erase_if(active_, [&](const auto& p) { return p.get() == progress.get(); });
  active_.push_back(progress);
}

void GradientState::remove_dataloader(const LoaderProgress* progress) {
  std::lock_guard<std::mutex> lock(mutex_);
  std::erase_if(active_, [&](const auto& p) { return p.get() == progress; });
}

}  // namespace accelerate::data
