// A small training run that save_state / load_state must be able to interrupt and resume
// without changing a bit of the result. Shared by the in-process unit tests and the worker that
// the launch tests start as several processes.
//
// Everything that could make a resumed run differ is in it: dropout (the global generator), a
// shuffled loader whose epoch does not divide into batches (the sampler generator and the
// position inside the epoch), Adam (moments and step counts), a warm-up schedule (scheduler
// state) and a registered object (the step counter the loop itself resumes from).
#pragma once

#include <accelerate/accelerator.h>
#include <accelerate/safetensors.h>

#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adam.h>

#include <csignal>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace accelerate::testing {

/// Steps taken so far: what the training loop resumes from.
struct Progress : accelerate::Checkpointable {
  int64_t steps = 0;
  accelerate::ObjectState state_dict() const override {
    return {{{"steps", at::scalar_tensor(steps, at::kLong)}}, {{"kind", "progress"}}};
  }
  void load_state_dict(const accelerate::ObjectState& state) override {
    steps = state.get("steps").item<int64_t>();
  }
};

/// 37 rows (an epoch of 10 batches of 4, the last short; 5 per process with 2 processes).
struct ResumeRows {
  int64_t size() const { return 37; }
  torch::data::Example<> get(size_t i) const {
    const double v = static_cast<double>(i);
    return {
        at::tensor({v / 37, 1 - v / 20, static_cast<double>(i % 5) / 4, v * v / 1369}, at::kFloat),
        at::tensor({v / 37 - 0.25 * static_cast<double>(i % 3)}, at::kFloat)};
  }
};

struct ResumeRun {
  /// Steps the whole run takes.
  int64_t total_steps = 23;
  /// Save after this many steps and stop (0: never).
  int64_t save_at = 0;
  /// Where save_at saves; where the run resumes from when `resume`.
  std::string directory;
  bool resume = false;
  /// Automatic checkpoint naming under `directory` (the project dir), saving every
  /// `save_every` steps; a restarted run (ACCELERATE_RESTART_COUNT > 0) resumes by itself.
  bool automatic = false;
  int64_t save_every = 0;
  /// Simulated crash: return after this many steps without saving (0: never).
  int64_t stop_at = 0;
  /// Real crash: on the first attempt, process `kill_rank` SIGKILLs itself after `kill_at`
  /// steps.
  int kill_rank = -1;
  int64_t kill_at = 0;
  /// Receives the step the run started from (0, or where it resumed).
  int64_t* started_at = nullptr;
};

/// Runs `run` and returns the model's final parameters (every process has the same).
inline accelerate::NamedTensors train_resumable(const ResumeRun& run,
                                                accelerate::AcceleratorOptions options = {}) {
  if (run.automatic) {
    accelerate::ProjectConfiguration project;
    project.project_dir = run.directory;
    project.automatic_checkpoint_naming = true;
    project.total_limit = 2;
    options.project_config = project;
  }
  accelerate::Accelerator accelerator(options);
  torch::manual_seed(1234);
  torch::nn::Sequential model(torch::nn::Linear(4, 16), torch::nn::Dropout(0.2), torch::nn::Tanh(),
                              torch::nn::Linear(16, 1));
  auto adam =
      std::make_shared<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(0.02));
  std::shared_ptr<accelerate::LRScheduler> schedule =
      accelerate::get_linear_schedule_with_warmup(*adam, 5, run.total_steps);
  accelerate::data::DataLoaderOptions loader_options;
  loader_options.batch_size = 4;
  loader_options.shuffle = true;
  accelerate::data::DataLoader loader(ResumeRows{}, loader_options);

  auto [net, optimizer, scheduler, batches] = accelerator.prepare(model, adam, schedule, loader);
  auto progress = std::make_shared<Progress>();
  accelerator.register_for_checkpointing(progress);
  if (run.resume) accelerator.load_state(run.directory);
  if (run.started_at) *run.started_at = progress->steps;

  while (progress->steps < run.total_steps) {
    for (auto& batch : batches) {
      auto loss = torch::nn::functional::mse_loss(net->forward(batch.data), batch.target);
      accelerator.backward(loss);
      optimizer.step();
      scheduler.step();
      optimizer.zero_grad();
      ++progress->steps;
      if (run.save_every > 0 && progress->steps % run.save_every == 0) accelerator.save_state();
      if (progress->steps == run.stop_at) return accelerate::model_state(*net);
      if (progress->steps == run.kill_at && accelerator.process_index() == run.kill_rank &&
          accelerator.config().restart_count == 0) {
        ::raise(SIGKILL);
      }
      if (progress->steps == run.save_at) {
        accelerator.save_state(run.directory);
        return accelerate::model_state(*net);
      }
      if (progress->steps == run.total_steps) break;
    }
  }
  return accelerate::model_state(*net);
}

/// What the crash test saves over and over: every checkpoint is self-consistent, so loading a
/// mix of two saves is caught. After step c the parameters all equal c, Adam has taken c steps,
/// and the Progress object says c.
struct CrashTarget {
  torch::nn::Sequential model{torch::nn::Linear(1024, 1024), torch::nn::Linear(1024, 1024)};
  std::shared_ptr<torch::optim::Adam> adam =
      std::make_shared<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(0.01));
  std::shared_ptr<Progress> progress = std::make_shared<Progress>();

  void step_to(int64_t c) {
    for (auto& p : model->parameters()) p.mutable_grad() = at::ones_like(p);
    adam->step();
    torch::NoGradGuard no_grad;
    for (auto& p : model->parameters()) p.fill_(static_cast<double>(c));
    progress->steps = c;
  }

  /// "" when consistent at step c, else what is wrong.
  std::string inconsistency() const {
    const int64_t c = progress->steps;
    for (const auto& p : model->parameters()) {
      if (!at::equal(p.detach(), at::full_like(p, static_cast<double>(c)))) {
        return "a parameter is not " + std::to_string(c);
      }
      auto it = adam->state().find(c10::guts::to_string(p.unsafeGetTensorImpl()));
      if (it == adam->state().end()) return "no Adam state at step " + std::to_string(c);
      const auto& s = static_cast<const torch::optim::AdamParamState&>(*it->second);
      if (s.step() != c) {
        return "Adam took " + std::to_string(s.step()) + " steps, progress says " +
               std::to_string(c);
      }
    }
    return "";
  }
};

}  // namespace accelerate::testing
