#include "accelerate/scheduler.h"

#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <algorithm>
#include <cmath>
#include <numbers>
#include <utility>

namespace accelerate {

// ------------------------------------------------------------------ LRScheduler

LRScheduler::LRScheduler(torch::optim::Optimizer& optimizer) : optimizer_(&optimizer) {
  const auto& groups = optimizer.param_groups();
  base_lrs_.reserve(groups.size());
  for (const auto& group : groups) base_lrs_.push_back(group.options().get_lr());
}

void LRScheduler::initial_step() {
  TORCH_CHECK(last_epoch_ == -1, "LRScheduler::initial_step: called twice (last_epoch is ",
              last_epoch_, "); call it once, at the end of the subclass constructor");
  step();
}

void LRScheduler::step() {
  const auto groups = optimizer_->param_groups().size();
  TORCH_CHECK(groups == base_lrs_.size(), "LRScheduler::step: the optimizer has ", groups,
              " param groups but the scheduler was created with ", base_lrs_.size(),
              "; create the scheduler after adding every param group");
  ++last_epoch_;
  auto lrs = get_lr();
  // A user subclass is the only way to get this wrong, so say which contract it broke.
  TORCH_CHECK(lrs.size() == groups, "LRScheduler::step: get_lr() returned ", lrs.size(),
              " learning rates for ", groups, " param groups");
  write_lrs(lrs);
  last_lrs_ = std::move(lrs);
}

void LRScheduler::write_lrs(const std::vector<double>& lrs) {
  auto& groups = optimizer_->param_groups();
  for (size_t i = 0; i < groups.size(); ++i) groups[i].options().set_lr(lrs[i]);
}

std::vector<double> LRScheduler::get_last_lr() const {
  TORCH_CHECK(last_epoch_ >= 0,
              "LRScheduler::get_last_lr: the scheduler has not taken its initial step; a "
              "subclass constructor must end with initial_step()");
  return last_lrs_;
}

SchedulerState LRScheduler::state_dict() const {
  TORCH_CHECK(last_epoch_ >= 0,
              "LRScheduler::state_dict: the scheduler has not taken its initial step; a "
              "subclass constructor must end with initial_step()");
  return {.last_epoch = last_epoch_, .base_lrs = base_lrs_, .last_lrs = last_lrs_};
}

void LRScheduler::load_state_dict(const SchedulerState& state) {
  const auto groups = optimizer_->param_groups().size();
  TORCH_CHECK(state.base_lrs.size() == groups && state.last_lrs.size() == groups,
              "LRScheduler::load_state_dict: the state has ", state.base_lrs.size(),
              " base lrs and ", state.last_lrs.size(), " last lrs but the optimizer has ", groups,
              " param groups; load into a scheduler over the same param groups");
  TORCH_CHECK(state.last_epoch >= 0, "LRScheduler::load_state_dict: last_epoch is ",
              state.last_epoch, "; a saved scheduler has at least taken its initial step (0)");
  last_epoch_ = state.last_epoch;
  base_lrs_ = state.base_lrs;
  last_lrs_ = state.last_lrs;
  write_lrs(last_lrs_);
}

namespace {

std::vector<double> read_doubles(torch::serialize::InputArchive& archive, const char* key) {
  c10::IValue value;
  TORCH_CHECK(archive.try_read(key, value), "LRScheduler::load: the archive has no '", key,
              "'; was it written by LRScheduler::save?");
  TORCH_CHECK(value.isDoubleList(), "LRScheduler::load: '", key, "' is not a list of floats but ",
              value.tagKind());
  return value.toDoubleVector();
}

}  // namespace

void LRScheduler::save(torch::serialize::OutputArchive& archive) const {
  const auto state = state_dict();
  archive.write("last_epoch", c10::IValue(state.last_epoch));
  archive.write("base_lrs", c10::IValue(state.base_lrs));
  archive.write("last_lrs", c10::IValue(state.last_lrs));
}

void LRScheduler::load(torch::serialize::InputArchive& archive) {
  c10::IValue epoch;
  TORCH_CHECK(archive.try_read("last_epoch", epoch),
              "LRScheduler::load: the archive has no 'last_epoch'; was it written by "
              "LRScheduler::save?");
  TORCH_CHECK(epoch.isInt(), "LRScheduler::load: 'last_epoch' is not an integer but ",
              epoch.tagKind());
  SchedulerState state;
  state.last_epoch = epoch.toInt();
  state.base_lrs = read_doubles(archive, "base_lrs");
  state.last_lrs = read_doubles(archive, "last_lrs");
  load_state_dict(state);
}

torch::serialize::OutputArchive& operator<<(torch::serialize::OutputArchive& archive,
                                            const LRScheduler& scheduler) {
  scheduler.save(archive);
  return archive;
}

torch::serialize::InputArchive& operator>>(torch::serialize::InputArchive& archive,
                                           LRScheduler& scheduler) {
  scheduler.load(archive);
  return archive;
}

// ------------------------------------------------------------------ LambdaLR, StepLR,
// ExponentialLR

LambdaLR::LambdaLR(torch::optim::Optimizer& optimizer, LRLambda lr_lambda)
    : LRScheduler(optimizer) {
  TORCH_CHECK(static_cast<bool>(lr_lambda), "LambdaLR: lr_lambda is empty");
  lr_lambdas_.assign(base_lrs().size(), lr_lambda);
  initial_step();
}

LambdaLR::LambdaLR(torch::optim::Optimizer& optimizer, std::vector<LRLambda> lr_lambdas)
    : LRScheduler(optimizer), lr_lambdas_(std::move(lr_lambdas)) {
  TORCH_CHECK(lr_lambdas_.size() == base_lrs().size(), "LambdaLR: got ", lr_lambdas_.size(),
              " lr_lambdas for ", base_lrs().size(),
              " param groups; pass one per group, or a single one for all");
  for (size_t i = 0; i < lr_lambdas_.size(); ++i) {
    TORCH_CHECK(static_cast<bool>(lr_lambdas_[i]), "LambdaLR: lr_lambdas[", i, "] is empty");
  }
  initial_step();
}

std::vector<double> LambdaLR::get_lr() const {
  const auto& base = base_lrs();
  std::vector<double> lrs(base.size());
  for (size_t i = 0; i < base.size(); ++i) lrs[i] = base[i] * lr_lambdas_[i](last_epoch());
  return lrs;
}

StepLR::StepLR(torch::optim::Optimizer& optimizer, int64_t step_size, double gamma)
    : LRScheduler(optimizer), step_size_(step_size), gamma_(gamma) {
  TORCH_CHECK(step_size > 0, "StepLR: step_size must be positive, got ", step_size);
  initial_step();
}

std::vector<double> StepLR::get_lr() const {
  const double factor = std::pow(gamma_, static_cast<double>(last_epoch() / step_size_));
  std::vector<double> lrs;
  for (double base : base_lrs()) lrs.push_back(base * factor);
  return lrs;
}

ExponentialLR::ExponentialLR(torch::optim::Optimizer& optimizer, double gamma)
    : LRScheduler(optimizer), gamma_(gamma) {
  initial_step();
}

std::vector<double> ExponentialLR::get_lr() const {
  const double factor = std::pow(gamma_, static_cast<double>(last_epoch()));
  std::vector<double> lrs;
  for (double base : base_lrs()) lrs.push_back(base * factor);
  return lrs;
}

// ------------------------------------------------------------------ transformers' schedules

namespace {

void check_warmup(const char* fn, int64_t num_warmup_steps) {
  TORCH_CHECK(num_warmup_steps >= 0, fn, ": num_warmup_steps must be non-negative, got ",
              num_warmup_steps);
}

void check_training(const char* fn, int64_t num_warmup_steps, int64_t num_training_steps) {
  check_warmup(fn, num_warmup_steps);
  // num_training_steps < num_warmup_steps is allowed, as in transformers: a short smoke run
  // with the production warmup simply never leaves the warmup.
  TORCH_CHECK(num_training_steps >= 0, fn, ": num_training_steps must be non-negative, got ",
              num_training_steps);
}

// The factors below keep transformers' operand order so that the doubles match Python's bit
// for bit: `float(a) / float(b)` and left-to-right products.
double warmup_factor(int64_t step, int64_t num_warmup_steps) {
  return static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, num_warmup_steps));
}

double decay_progress(int64_t step, int64_t num_warmup_steps, int64_t num_training_steps) {
  return static_cast<double>(step - num_warmup_steps) /
         static_cast<double>(std::max<int64_t>(1, num_training_steps - num_warmup_steps));
}

// Python's float `%`: the result takes the divisor's sign, unlike std::fmod.
double py_mod1(double x) {
  const double r = std::fmod(x, 1.0);
  return r < 0 ? r + 1.0 : r;
}

}  // namespace

std::unique_ptr<LRScheduler> get_constant_schedule(torch::optim::Optimizer& optimizer) {
  return std::make_unique<LambdaLR>(optimizer, [](int64_t) { return 1.0; });
}

std::unique_ptr<LRScheduler> get_constant_schedule_with_warmup(torch::optim::Optimizer& optimizer,
                                                               int64_t num_warmup_steps) {
  check_warmup("get_constant_schedule_with_warmup", num_warmup_steps);
  return std::make_unique<LambdaLR>(optimizer, [num_warmup_steps](int64_t step) {
    if (step < num_warmup_steps) return warmup_factor(step, num_warmup_steps);
    return 1.0;
  });
}

std::unique_ptr<LRScheduler> get_linear_schedule_with_warmup(torch::optim::Optimizer& optimizer,
                                                             int64_t num_warmup_steps,
                                                             int64_t num_training_steps) {
  check_training("get_linear_schedule_with_warmup", num_warmup_steps, num_training_steps);
  return std::make_unique<LambdaLR>(optimizer, [=](int64_t step) {
    if (step < num_warmup_steps) return warmup_factor(step, num_warmup_steps);
    return std::max(
        0.0, static_cast<double>(num_training_steps - step) /
                 static_cast<double>(std::max<int64_t>(1, num_training_steps - num_warmup_steps)));
  });
}

std::unique_ptr<LRScheduler> get_cosine_schedule_with_warmup(torch::optim::Optimizer& optimizer,
                                                             int64_t num_warmup_steps,
                                                             int64_t num_training_steps,
                                                             double num_cycles) {
  check_training("get_cosine_schedule_with_warmup", num_warmup_steps, num_training_steps);
  TORCH_CHECK(std::isfinite(num_cycles),
              "get_cosine_schedule_with_warmup: num_cycles must be finite, got ", num_cycles);
  return std::make_unique<LambdaLR>(optimizer, [=](int64_t step) {
    if (step < num_warmup_steps) return warmup_factor(step, num_warmup_steps);
    const double progress = decay_progress(step, num_warmup_steps, num_training_steps);
    return std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * num_cycles * 2.0 * progress)));
  });
}

std::unique_ptr<LRScheduler> get_cosine_with_hard_restarts_schedule_with_warmup(
    torch::optim::Optimizer& optimizer, int64_t num_warmup_steps, int64_t num_training_steps,
    double num_cycles) {
  check_training("get_cosine_with_hard_restarts_schedule_with_warmup", num_warmup_steps,
                 num_training_steps);
  TORCH_CHECK(std::isfinite(num_cycles),
              "get_cosine_with_hard_restarts_schedule_with_warmup: num_cycles must be finite, got ",
              num_cycles);
  return std::make_unique<LambdaLR>(optimizer, [=](int64_t step) {
    if (step < num_warmup_steps) return warmup_factor(step, num_warmup_steps);
    const double progress = decay_progress(step, num_warmup_steps, num_training_steps);
    if (progress >= 1.0) return 0.0;
    return std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * py_mod1(num_cycles * progress))));
  });
}

std::unique_ptr<LRScheduler> get_polynomial_decay_schedule_with_warmup(
    torch::optim::Optimizer& optimizer, int64_t num_warmup_steps, int64_t num_training_steps,
    double lr_end, double power) {
  constexpr const char* fn = "get_polynomial_decay_schedule_with_warmup";
  check_training(fn, num_warmup_steps, num_training_steps);
  // transformers divides by (num_training_steps - num_warmup_steps) once the warmup ends and
  // raises ZeroDivisionError there; failing now says why.
  TORCH_CHECK(num_training_steps != num_warmup_steps, fn, ": num_training_steps (",
              num_training_steps, ") must differ from num_warmup_steps (", num_warmup_steps,
              "): the decay would last zero steps");
  // A negative power divides by zero at the last step, as in Python.
  TORCH_CHECK(power >= 0, fn, ": power must be non-negative, got ", power);
  const double lr_init = optimizer.defaults().get_lr();
  TORCH_CHECK(lr_init > lr_end, fn, ": lr_end (", lr_end,
              ") must be smaller than the optimizer's initial lr (", lr_init, ")");
  return std::make_unique<LambdaLR>(optimizer, [=](int64_t step) {
    if (step < num_warmup_steps) return warmup_factor(step, num_warmup_steps);
    if (step > num_training_steps) return lr_end / lr_init;
    const double lr_range = lr_init - lr_end;
    const auto decay_steps = static_cast<double>(num_training_steps - num_warmup_steps);
    const double pct_remaining = 1 - static_cast<double>(step - num_warmup_steps) / decay_steps;
    const double decay = lr_range * std::pow(pct_remaining, power) + lr_end;
    return decay / lr_init;
  });
}

std::unique_ptr<LRScheduler> get_inverse_sqrt_schedule(torch::optim::Optimizer& optimizer,
                                                       int64_t num_warmup_steps,
                                                       std::optional<int64_t> timescale) {
  check_warmup("get_inverse_sqrt_schedule", num_warmup_steps);
  // transformers' `timescale or num_warmup_steps or 10_000`.
  const int64_t scale = timescale.value_or(num_warmup_steps > 0 ? num_warmup_steps : 10000);
  TORCH_CHECK(scale > 0, "get_inverse_sqrt_schedule: timescale must be positive, got ", scale);
  return std::make_unique<LambdaLR>(optimizer, [=](int64_t step) {
    if (step < num_warmup_steps) return warmup_factor(step, num_warmup_steps);
    const int64_t shift = scale - num_warmup_steps;
    return 1.0 / std::sqrt(static_cast<double>(step + shift) / static_cast<double>(scale));
  });
}

// ------------------------------------------------------------------ get_scheduler

namespace {

constexpr const char* kSchedulerNames =
    "\"linear\", \"cosine\", \"cosine_with_restarts\", \"polynomial\", \"constant\", "
    "\"constant_with_warmup\", \"inverse_sqrt\"";

template <typename T>
T require(const std::optional<T>& value, const std::string& name, const char* field) {
  TORCH_CHECK(value.has_value(), "get_scheduler: '", name, "' requires ", field);
  return *value;
}

template <typename T>
void forbid(const std::optional<T>& value, const std::string& name, const char* field) {
  TORCH_CHECK(!value.has_value(), "get_scheduler: '", name, "' does not take ", field);
}

}  // namespace

std::unique_ptr<LRScheduler> get_scheduler(const std::string& name,
                                           torch::optim::Optimizer& optimizer,
                                           const SchedulerOptions& options) {
  const auto& o = options;
  const bool known = name == "linear" || name == "cosine" || name == "cosine_with_restarts" ||
                     name == "polynomial" || name == "constant" || name == "constant_with_warmup" ||
                     name == "inverse_sqrt";
  TORCH_CHECK(known, "get_scheduler: unknown scheduler '", name, "'; expected one of ",
              kSchedulerNames);
  if (name != "polynomial") {
    forbid(o.lr_end, name, "lr_end");
    forbid(o.power, name, "power");
  }
  if (name != "cosine" && name != "cosine_with_restarts") forbid(o.num_cycles, name, "num_cycles");
  if (name != "inverse_sqrt") forbid(o.timescale, name, "timescale");

  // Like transformers, "constant" ignores the step counts: scripts pass them for every type.
  if (name == "constant") return get_constant_schedule(optimizer);
  const int64_t warmup = require(o.num_warmup_steps, name, "num_warmup_steps");
  if (name == "constant_with_warmup") return get_constant_schedule_with_warmup(optimizer, warmup);
  if (name == "inverse_sqrt") return get_inverse_sqrt_schedule(optimizer, warmup, o.timescale);
  const int64_t training = require(o.num_training_steps, name, "num_training_steps");
  if (name == "linear") return get_linear_schedule_with_warmup(optimizer, warmup, training);
  if (name == "cosine") {
    return get_cosine_schedule_with_warmup(optimizer, warmup, training, o.num_cycles.value_or(0.5));
  }
  if (name == "cosine_with_restarts") {
    return get_cosine_with_hard_restarts_schedule_with_warmup(optimizer, warmup, training,
                                                              o.num_cycles.value_or(1.0));
  }
  return get_polynomial_decay_schedule_with_warmup(optimizer, warmup, training,
                                                   o.lr_end.value_or(1e-7), o.power.value_or(1.0));
}

}  // namespace accelerate
