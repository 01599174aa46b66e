#pragma once
/// \file
/// Learning-rate schedulers: PyTorch's `LRScheduler` family (`LambdaLR`, `StepLR`,
/// `ExponentialLR`) and the `transformers` schedule factories that training scripts pick with
/// `get_scheduler`. LibTorch 1.13 ships only a bare `torch::optim::StepLR`.
///
/// Every scheduler here is closed-form: the learning rate of param group `i` after `n` calls to
/// step() is a function of `base_lrs[i]` and `n` alone. That is why a checkpoint needs only
/// three fields (SchedulerState) and why resuming reproduces the uninterrupted run exactly.
///
/// Example:
/// \code
///   torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1));
///   auto sched = accelerate::get_linear_schedule_with_warmup(opt, /*num_warmup_steps=*/10,
///                                                            /*num_training_steps=*/100);
///   for (int64_t step = 0; step < 100; ++step) {
///     train_step();  // forward, backward, opt.step()
///     sched->step();
///   }
///   torch::save(*sched, "scheduler.pt");
/// \endcode

#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace accelerate {

/// Everything a scheduler needs to resume: what PyTorch's `scheduler.state_dict()` holds for
/// the closed-form schedulers.
///
/// Example:
/// \code
///   accelerate::SchedulerState saved = sched->state_dict();
///   // ... later, on a scheduler built the same way over a fresh optimizer:
///   other->load_state_dict(saved);
/// \endcode
struct SchedulerState {
  /// How many times step() has run after the initial step (0 right after construction).
  int64_t last_epoch = -1;
  /// Each param group's learning rate when the scheduler was created.
  std::vector<double> base_lrs{};
  /// Each param group's learning rate as last set by the scheduler.
  std::vector<double> last_lrs{};

  bool operator==(const SchedulerState&) const = default;
};

/// Base of all schedulers (PyTorch's `LRScheduler`): sets every param group's learning rate to
/// what get_lr() computes from last_epoch(), once at construction and again on every step().
///
/// The scheduler keeps a pointer to the optimizer, which must outlive it. Create it after the
/// optimizer has all its param groups: base_lrs are read from the groups' current learning
/// rates at construction. (PyTorch reads a group's `initial_lr` instead when a scheduler was
/// already attached; LibTorch groups have nowhere to keep one, so attach one scheduler per
/// optimizer.)
///
/// A subclass implements get_lr() and calls initial_step() at the end of its constructor: the
/// base constructor cannot, because get_lr() is virtual and the subclass is not yet built.
///
/// Example:
/// \code
///   class HalveEveryEpoch : public accelerate::LRScheduler {
///    public:
///     explicit HalveEveryEpoch(torch::optim::Optimizer& opt) : LRScheduler(opt) {
///       initial_step();
///     }
///     std::vector<double> get_lr() const override {
///       std::vector<double> lrs;
///       for (double base : base_lrs()) lrs.push_back(base * std::pow(0.5, last_epoch()));
///       return lrs;
///     }
///   };
///   std::shared_ptr<accelerate::LRScheduler> sched = std::make_shared<HalveEveryEpoch>(opt);
/// \endcode
class LRScheduler {
 public:
  virtual ~LRScheduler() = default;
  // Schedulers live behind pointers and hold a pointer to their optimizer: copying one would
  // give two objects stepping the same learning rates.
  LRScheduler(const LRScheduler&) = delete;
  LRScheduler& operator=(const LRScheduler&) = delete;

  /// Advances last_epoch by one and writes get_lr() into the optimizer's param groups.
  void step();

  /// The learning rates the scheduler last wrote, one per param group.
  std::vector<double> get_last_lr() const;

  /// The learning rates for the current last_epoch(), one per param group. Pure: it neither
  /// reads nor changes the optimizer.
  virtual std::vector<double> get_lr() const = 0;

  /// How many times step() has run since construction (0 right after construction).
  int64_t last_epoch() const { return last_epoch_; }

  /// Each param group's learning rate when the scheduler was created (or loaded).
  const std::vector<double>& base_lrs() const { return base_lrs_; }

  /// The optimizer whose learning rates this scheduler sets.
  torch::optim::Optimizer& optimizer() { return *optimizer_; }
  const torch::optim::Optimizer& optimizer() const { return *optimizer_; }

  /// A copy of the scheduler's position.
  SchedulerState state_dict() const;

  /// Resumes from `state`: restores last_epoch, base_lrs and last_lrs, and writes last_lrs into
  /// the optimizer's param groups. `state` must have one learning rate per param group.
  void load_state_dict(const SchedulerState& state);

  /// Writes state_dict() into `archive` (keys "last_epoch", "base_lrs", "last_lrs"), so that
  /// `torch::save(scheduler, path)` works as it does for LibTorch optimizers.
  void save(torch::serialize::OutputArchive& archive) const;

  /// Reads what save() wrote and load_state_dict()s it.
  void load(torch::serialize::InputArchive& archive);

 protected:
  /// Records base_lrs from the optimizer's param groups. Leaves last_epoch at -1 until the
  /// subclass calls initial_step().
  explicit LRScheduler(torch::optim::Optimizer& optimizer);

  /// PyTorch's `_initial_step`: the first step(), taking last_epoch from -1 to 0 and setting
  /// the learning rates to get_lr() at step 0. Subclass constructors call it last.
  void initial_step();

 private:
  void write_lrs(const std::vector<double>& lrs);

  torch::optim::Optimizer* optimizer_;
  std::vector<double> base_lrs_;
  std::vector<double> last_lrs_;
  int64_t last_epoch_ = -1;
};

/// `torch::save(scheduler, ...)` support.
torch::serialize::OutputArchive& operator<<(torch::serialize::OutputArchive& archive,
                                            const LRScheduler& scheduler);
/// `torch::load(scheduler, ...)` support.
torch::serialize::InputArchive& operator>>(torch::serialize::InputArchive& archive,
                                           LRScheduler& scheduler);

/// A multiplicative factor of the base learning rate as a function of the step count.
using LRLambda = std::function<double(int64_t)>;

/// PyTorch's `LambdaLR`: lr of group i = base_lrs[i] * lambda_i(last_epoch), with one lambda
/// for all groups or one per group. The lambdas are not part of the saved state: rebuild the
/// scheduler with the same lambdas before loading.
///
/// Example:
/// \code
///   accelerate::LambdaLR sched(opt, [](int64_t step) { return 1.0 / (1.0 + step); });
///   accelerate::LambdaLR per_group(opt, {[](int64_t) { return 1.0; },
///                                        [](int64_t s) { return 0.9 * s; }});
/// \endcode
class LambdaLR : public LRScheduler {
 public:
  /// The same lambda for every param group.
  LambdaLR(torch::optim::Optimizer& optimizer, LRLambda lr_lambda);
  /// One lambda per param group; the counts must match.
  LambdaLR(torch::optim::Optimizer& optimizer, std::vector<LRLambda> lr_lambdas);

  std::vector<double> get_lr() const override;

 private:
  std::vector<LRLambda> lr_lambdas_;
};

/// PyTorch's `StepLR` in closed form: lr = base_lr * gamma^(last_epoch / step_size), the
/// division rounding down.
///
/// Example:
/// \code
///   accelerate::StepLR sched(opt, /*step_size=*/30, /*gamma=*/0.1);  // 0.1 ×0.1 every 30 steps
/// \endcode
class StepLR : public LRScheduler {
 public:
  StepLR(torch::optim::Optimizer& optimizer, int64_t step_size, double gamma = 0.1);

  std::vector<double> get_lr() const override;

 private:
  int64_t step_size_;
  double gamma_;
};

/// PyTorch's `ExponentialLR` in closed form: lr = base_lr * gamma^last_epoch.
///
/// Example:
/// \code
///   accelerate::ExponentialLR sched(opt, /*gamma=*/0.95);
/// \endcode
class ExponentialLR : public LRScheduler {
 public:
  ExponentialLR(torch::optim::Optimizer& optimizer, double gamma);

  std::vector<double> get_lr() const override;

 private:
  double gamma_;
};

// ------------------------------------------------------------------ transformers' schedules
// Each returns a LambdaLR whose factor follows `transformers.optimization` exactly (same
// formulas, same floating-point order of operations), applied to every param group.
//
// Warmup, shared by all but get_constant_schedule: factor = step / max(1, num_warmup_steps) for
// step < num_warmup_steps.

/// Factor 1: the optimizer's learning rates, unchanged.
///
/// Example:
/// \code
///   auto sched = accelerate::get_constant_schedule(opt);
/// \endcode
std::unique_ptr<LRScheduler> get_constant_schedule(torch::optim::Optimizer& optimizer);

/// Linear warmup from 0, then factor 1.
///
/// Example:
/// \code
///   auto sched = accelerate::get_constant_schedule_with_warmup(opt, /*num_warmup_steps=*/100);
/// \endcode
std::unique_ptr<LRScheduler> get_constant_schedule_with_warmup(torch::optim::Optimizer& optimizer,
                                                               int64_t num_warmup_steps);

/// Linear warmup, then linear decay to 0 at num_training_steps:
/// factor = max(0, (num_training_steps - step) / max(1, num_training_steps - num_warmup_steps)).
///
/// Example:
/// \code
///   auto sched = accelerate::get_linear_schedule_with_warmup(opt, 10, 100);
///   // base 0.1: step 0 → 0, 5 → 0.05, 10 → 0.1, 55 → 0.05, 100 and after → 0
/// \endcode
std::unique_ptr<LRScheduler> get_linear_schedule_with_warmup(torch::optim::Optimizer& optimizer,
                                                             int64_t num_warmup_steps,
                                                             int64_t num_training_steps);

/// Linear warmup, then cosine decay: with progress = (step - num_warmup_steps) /
/// max(1, num_training_steps - num_warmup_steps),
/// factor = max(0, 0.5 * (1 + cos(pi * num_cycles * 2 * progress))). The default half cycle
/// goes from 1 to 0 over the decay.
///
/// Example:
/// \code
///   auto sched = accelerate::get_cosine_schedule_with_warmup(opt, 10, 100);
/// \endcode
std::unique_ptr<LRScheduler> get_cosine_schedule_with_warmup(torch::optim::Optimizer& optimizer,
                                                             int64_t num_warmup_steps,
                                                             int64_t num_training_steps,
                                                             double num_cycles = 0.5);

/// Linear warmup, then `num_cycles` cosine decays from 1 to 0, each restarting at 1; factor 0
/// from num_training_steps on.
///
/// Example:
/// \code
///   auto sched = accelerate::get_cosine_with_hard_restarts_schedule_with_warmup(opt, 10, 100, 3);
/// \endcode
std::unique_ptr<LRScheduler> get_cosine_with_hard_restarts_schedule_with_warmup(
    torch::optim::Optimizer& optimizer, int64_t num_warmup_steps, int64_t num_training_steps,
    double num_cycles = 1.0);

/// Linear warmup, then polynomial decay from the initial lr to `lr_end` at num_training_steps,
/// and `lr_end` after. The initial lr (lr_init) is the optimizer's default lr, as transformers'
/// `optimizer.defaults["lr"]`; the factor is lr / lr_init, so groups with other base lrs keep
/// their ratio. lr_init must be greater than lr_end, and num_training_steps must differ from
/// num_warmup_steps (transformers divides by their difference).
///
/// Example:
/// \code
///   auto sched = accelerate::get_polynomial_decay_schedule_with_warmup(
///       opt, 10, 100, /*lr_end=*/1e-7, /*power=*/2.0);
/// \endcode
std::unique_ptr<LRScheduler> get_polynomial_decay_schedule_with_warmup(
    torch::optim::Optimizer& optimizer, int64_t num_warmup_steps, int64_t num_training_steps,
    double lr_end = 1e-7, double power = 1.0);

/// Linear warmup, then factor 1 / sqrt((step - num_warmup_steps + timescale) / timescale).
/// `timescale` defaults to num_warmup_steps, or 10000 when that is 0.
///
/// Example:
/// \code
///   auto sched = accelerate::get_inverse_sqrt_schedule(opt, /*num_warmup_steps=*/1000);
/// \endcode
std::unique_ptr<LRScheduler> get_inverse_sqrt_schedule(
    torch::optim::Optimizer& optimizer, int64_t num_warmup_steps,
    std::optional<int64_t> timescale = std::nullopt);

/// Arguments of get_scheduler, as `transformers.get_scheduler` takes them. Fields a schedule
/// does not use must stay unset. (The `{}` initializers keep GCC's -Wmissing-field-initializers
/// quiet in user code that sets only some fields.)
///
/// Example:
/// \code
///   accelerate::SchedulerOptions options{.num_warmup_steps = 100, .num_training_steps = 1000,
///                                        .num_cycles = 2.0};
/// \endcode
struct SchedulerOptions {
  std::optional<int64_t> num_warmup_steps{};
  std::optional<int64_t> num_training_steps{};
  /// "cosine" (default 0.5) and "cosine_with_restarts" (default 1).
  std::optional<double> num_cycles{};
  /// "polynomial" (default 1e-7).
  std::optional<double> lr_end{};
  /// "polynomial" (default 1.0).
  std::optional<double> power{};
  /// "inverse_sqrt".
  std::optional<int64_t> timescale{};
};

/// `transformers.get_scheduler`: a schedule by its `SchedulerType` name, one of "linear",
/// "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
/// "inverse_sqrt". Like transformers, every name but "constant" requires num_warmup_steps, and
/// all but those two and "inverse_sqrt" require num_training_steps.
///
/// Example:
/// \code
///   auto sched = accelerate::get_scheduler("cosine", opt,
///                                          {.num_warmup_steps = 100, .num_training_steps = 1000});
/// \endcode
std::unique_ptr<LRScheduler> get_scheduler(const std::string& name,
                                           torch::optim::Optimizer& optimizer,
                                           const SchedulerOptions& options = {});

}  // namespace accelerate
