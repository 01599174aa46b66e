// Accelerator's experiment-tracking methods (accelerator.h); the trackers are in tracking.cpp.

#include "accelerate/accelerator.h"

#include <algorithm>
#include <exception>

namespace accelerate {

namespace {

// What get_tracker hands the processes that keep no trackers, so that the same code runs on
// every process (Accelerate's blank GeneralTracker).
class BlankTracker final : public GeneralTracker {
 public:
  explicit BlankTracker(std::string name) : name_(std::move(name)) {}
  std::string name() const override { return name_; }
  void log(const LogValues&, std::optional<int64_t>) override {}

 private:
  std::string name_;
};

bool in_log_with(const AcceleratorConfig& config, const std::string& name) {
  return std::any_of(config.log_with.begin(), config.log_with.end(),
                     [&](const auto& spec) { return spec.name() == name; });
}

std::string available_trackers(const AcceleratorConfig& config) {
  std::string names;
  for (const auto& spec : config.log_with) names += (names.empty() ? "" : ", ") + spec.name();
  return names.empty() ? "none (log_with is empty)" : names;
}

}  // namespace

void Accelerator::init_trackers(const std::string& project_name, const LogValues& config,
                                const TrackerInitKwargs& init_kwargs) {
  auto& core = *core_;
  TORCH_CHECK(!core.trackers_initialized, "accelerate: init_trackers was already called");
  for (const auto& [name, kwargs] : init_kwargs) {
    TORCH_CHECK(in_log_with(core.config, name), "accelerate: init_kwargs for \"", name,
                "\", which is not in log_with (", available_trackers(core.config), ")");
  }
  core.trackers_initialized = true;
  if (!core.state->is_main_process()) return;
  std::vector<std::shared_ptr<GeneralTracker>> trackers;
  for (const auto& spec : core.config.log_with) {
    if (spec.tracker()) {
      trackers.push_back(spec.tracker());  // custom trackers come constructed
      continue;
    }
    auto kwargs = init_kwargs.find(spec.name());
    trackers.push_back(
        make_builtin_tracker(spec.name(), project_name, core.config.project_config.logging_dir,
                             kwargs == init_kwargs.end() ? LogValues{} : kwargs->second));
  }
  for (const auto& tracker : trackers) tracker->start();
  if (!config.empty()) {
    for (const auto& tracker : trackers) tracker->store_init_configuration(config);
  }
  core.trackers = std::move(trackers);
}

void Accelerator::log(const LogValues& values, std::optional<int64_t> step) {
  auto& core = *core_;
  if (!core.state->is_main_process()) return;
  TORCH_CHECK(core.trackers_initialized || core.config.log_with.empty(),
              "accelerate: call init_trackers before log");
  for (const auto& tracker : core.trackers) tracker->log(values, step);
}

std::shared_ptr<GeneralTracker> Accelerator::get_tracker(const std::string& name) const {
  const auto& core = *core_;
  TORCH_CHECK(in_log_with(core.config, name), "accelerate: no tracker named \"", name,
              "\"; available: ", available_trackers(core.config));
  if (!core.state->is_main_process()) return std::make_shared<BlankTracker>(name);
  TORCH_CHECK(core.trackers_initialized, "accelerate: call init_trackers before get_tracker(\"",
              name, "\")");
  for (const auto& tracker : core.trackers) {
    if (tracker->name() == name) return tracker;
  }
  TORCH_INTERNAL_ASSERT(false, "tracker \"", name, "\" is configured but was not started");
}

void Accelerator::end_training() {
  // A tracker failing on the main process must not leave the others waiting: join them first.
  std::exception_ptr failure;
  for (const auto& tracker : core_->trackers) {
    try {
      tracker->finish();
    } catch (...) {
      if (!failure) failure = std::current_exception();
    }
  }
  core_->state->wait_for_everyone();
  if (failure) std::rethrow_exception(failure);
}

}  // namespace accelerate
