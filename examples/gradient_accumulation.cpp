// Gradient accumulation: `{.gradient_accumulation_steps = 4}` and `accelerator.accumulate(model)`
// make 4 batches of 8 on each process act as one optimizer step over 4 x 8 x num_processes
// samples. The program proves it on the first step: it gathers the 64 samples (2 processes) that
// went into that step and compares the accumulated gradient with the gradient of one plain
// forward/backward over all of them. Then it trains a small regression network to the noise level
// of its data, with a linear schedule, and counts the optimizer steps.
//
//   build/bin/accelerate launch -n 2 build/examples/gradient_accumulation
//
// Measured on the 2-core CI machine (2 processes, defaults, about 3 s in all): the accumulated
// gradient equals the one-batch gradient to 6e-8 (float rounding); each process takes 1280
// batches and 320 optimizer steps in 5 epochs; the held-out mean squared error is 0.007 (the
// targets carry noise of variance 0.0025). The test ExamplesThroughLauncher.GradientAccumulation
// checks the match, the counts and an error below 0.02.

#include <accelerate/accelerator.h>

#include <torch/torch.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

namespace {

constexpr int64_t kFeatures = 8;

// y = x . w / 2 + sin(2 x0) / 2 + noise(0.05): a smooth target that a small MLP fits well.
struct Regression {
  at::Tensor x, y;
  Regression(int64_t count, uint64_t seed) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    auto w = at::linspace(-1.0, 1.0, kFeatures);
    x = at::randn({count, kFeatures}, gen, at::TensorOptions().dtype(at::kFloat));
    auto noise = at::randn({count}, gen, at::TensorOptions().dtype(at::kFloat)) * 0.05;
    y = (at::mv(x, w) * 0.5 + at::sin(x.select(1, 0) * 2) * 0.5 + noise).unsqueeze(1);
  }
  int64_t size() const { return x.size(0); }
  torch::data::Example<> get(size_t i) const {
    const auto k = static_cast<int64_t>(i);
    return {x[k], y[k]};
  }
};

torch::nn::Sequential make_model() {
  return torch::nn::Sequential(torch::nn::Linear(kFeatures, 64), torch::nn::ReLU(),
                               torch::nn::Linear(64, 64), torch::nn::ReLU(),
                               torch::nn::Linear(64, 1));
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Gradient accumulation with accelerate-cpp"};
  int epochs = 5;
  int64_t batch_size = 8;
  int64_t accumulation = 4;
  double lr = 1e-2;
  int64_t train_size = 4096;
  uint64_t seed = 3;
  app.add_option("--epochs", epochs, "training epochs")->capture_default_str();
  app.add_option("--batch_size", batch_size, "samples per batch and process")
      ->capture_default_str();
  app.add_option("--accumulation_steps", accumulation, "batches per optimizer step")
      ->capture_default_str();
  app.add_option("--train_size", train_size, "training samples")->capture_default_str();
  app.add_option("--lr", lr, "learning rate (AdamW)")->capture_default_str();
  app.add_option("--seed", seed, "seed of the data and of the initial weights")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  // accelerate: an explicit option wins over `accelerate launch --gradient_accumulation_steps`.
  accelerate::Accelerator accelerator({.gradient_accumulation_steps = accumulation});
  accelerate::set_seed(seed);

  Regression train_set(train_size, seed), eval_set(512, seed + 1);
  accelerate::data::DataLoader train_loader(train_set, {.batch_size = batch_size, .shuffle = true});
  accelerate::data::DataLoader eval_loader(eval_set, {.batch_size = 128});
  auto model = make_model();
  torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(lr));
  // Written for one process: the prepared schedule steps num_processes times per optimizer step.
  const int64_t total_steps = epochs * static_cast<int64_t>(train_loader.size()) /
                              accelerator.gradient_accumulation_steps();
  std::shared_ptr<accelerate::LRScheduler> schedule =
      accelerate::get_linear_schedule_with_warmup(optimizer, total_steps / 20, total_steps);
  auto [net, opt, sched, train, eval] =
      accelerator.prepare(model, optimizer, schedule, train_loader, eval_loader);

  const int64_t effective =
      batch_size * accelerator.gradient_accumulation_steps() * accelerator.num_processes();
  accelerator.print("each optimizer step: ", accelerator.gradient_accumulation_steps(),
                    " batches of ", batch_size, " on each of ", accelerator.num_processes(),
                    " process(es) = effective batch ", effective);

  int64_t batches = 0, optimizer_steps = 0;
  bool checked = false;
  std::vector<at::Tensor> cycle_x, cycle_y;  // this process's samples of the current step
  for (int epoch = 0; epoch < epochs; ++epoch) {
    double total = 0;
    int64_t epoch_batches = 0;
    for (auto& batch : train) {
      auto sync = accelerator.accumulate(net);  // accelerate: counts the batch
      auto loss = torch::mse_loss(net->forward(batch.data), batch.target);
      accelerator.backward(loss);  // accelerate: divides by the accumulation steps
      if (!checked) {
        cycle_x.push_back(batch.data);
        cycle_y.push_back(batch.target);
      }
      if (accelerator.sync_gradients()) {
        ++optimizer_steps;
        if (!checked) {
          // Every sample of this step, from every process, against one plain backward pass.
          const auto all_x = accelerator.gather(at::cat(cycle_x));
          const auto all_y = accelerator.gather(at::cat(cycle_y));
          auto reference = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(net->clone());
          reference->zero_grad();
          torch::mse_loss(reference->forward(all_x), all_y).backward();
          double difference = 0;
          const auto mine = net->parameters(), theirs = reference->parameters();
          for (size_t i = 0; i < mine.size(); ++i) {
            difference = std::max(difference,
                                  (mine[i].grad() - theirs[i].grad()).abs().max().item<double>());
          }
          accelerator.print(
              "first step: ", all_x.size(0), " samples; accumulated gradient vs ", "one batch of ",
              all_x.size(0), ": max difference ", difference,
              all_x.size(0) == effective && difference < 1e-5 ? " (matches)" : " (MISMATCH)");
          checked = true;
        }
      }
      opt.step();    // accelerate: steps only when sync_gradients()
      sched.step();  // accelerate: likewise
      opt.zero_grad();
      total += loss.item<double>();
      ++batches;
      ++epoch_batches;
    }
    const auto mean = accelerator.reduce(at::tensor({total / static_cast<double>(epoch_batches)}),
                                         accelerate::Reduction::kMean);
    accelerator.print("epoch ", epoch + 1, ": train mse ", mean.item<double>());
  }
  accelerator.print("each process: ", batches, " batches, ", optimizer_steps,
                    " optimizer steps (one per ", accelerator.gradient_accumulation_steps(),
                    " batches)");

  torch::NoGradGuard no_grad;
  std::vector<at::Tensor> predictions, targets;
  for (auto& batch : eval) {
    predictions.push_back(accelerator.gather_for_metrics(net->forward(batch.data)));
    targets.push_back(accelerator.gather_for_metrics(batch.target));
  }
  const auto all_predictions = at::cat(predictions), all_targets = at::cat(targets);
  accelerator.print("evaluated ", all_targets.size(0), " samples: mse ",
                    torch::mse_loss(all_predictions, all_targets).item<double>());
  return 0;
}
