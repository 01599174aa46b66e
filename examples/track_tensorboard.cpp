// Experiment tracking: fits a small MLP to a noisy sine wave and logs the training loss and the
// learning rate every epoch to TensorBoard and to JSON lines. Only the main process writes.
//
//   build/bin/accelerate launch -n 2 build/examples/track_tensorboard --project_dir runs
//   tensorboard --logdir runs/sine            # or: cat runs/sine/metrics.jsonl
//
// With the defaults, under `accelerate launch -n 2` (about 5 s here), the last line printed is
// "epoch 40: loss 0.00260575" (the noise alone gives 0.0025), and the last line of
// runs/sine/metrics.jsonl is {"step": 40, "loss": 0.002605746718472801, "lr": 0}; one process
// ends at 0.00259. The exact digits follow LibTorch's kernels.

#include <accelerate/accelerator.h>

#include <torch/torch.h>
#include <CLI/CLI.hpp>

#include <cmath>

namespace {

// y = sin(3x) + noise on [-1, 1]; the same seed gives every process the same points.
struct NoisySine {
  at::Tensor x, y;
  NoisySine(int64_t n, uint64_t seed) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    x = at::rand({n, 1}, gen) * 2 - 1;
    y = at::sin(3 * x) + 0.05 * at::randn({n, 1}, gen);
  }
  int64_t size() const { return x.size(0); }
  torch::data::Example<> get(size_t i) const {
    const auto k = static_cast<int64_t>(i);
    return {x[k], y[k]};
  }
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Log a training run to TensorBoard and JSON lines with accelerate-cpp"};
  std::string project_dir = "runs";
  int epochs = 40;
  int64_t batch_size = 32;
  double lr = 0.02;
  uint64_t seed = 0;
  app.add_option("--project_dir", project_dir, "where the run's files go")->capture_default_str();
  app.add_option("--epochs", epochs, "training epochs")->capture_default_str();
  app.add_option("--batch_size", batch_size, "samples per batch and process")
      ->capture_default_str();
  app.add_option("--lr", lr, "peak learning rate (AdamW)")->capture_default_str();
  app.add_option("--seed", seed, "seed of the data and of the initial weights")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  // accelerate: the trackers, and where they write (<project_dir>/<project name>/).
  accelerate::Accelerator accelerator(
      {.project_dir = project_dir, .log_with = {"tensorboard", "jsonl"}});
  accelerate::set_seed(seed);
  // accelerate: the run's hyperparameters go to TensorBoard's Text tab and config.json.
  accelerator.init_trackers("sine", {{"epochs", epochs},
                                     {"batch_size", batch_size},
                                     {"lr", lr},
                                     {"num_processes", accelerator.num_processes()}});

  NoisySine data(1024, seed);
  accelerate::data::DataLoader loader(data, {.batch_size = batch_size, .shuffle = true});
  torch::nn::Sequential model(torch::nn::Linear(1, 32), torch::nn::Tanh(),
                              torch::nn::Linear(32, 32), torch::nn::Tanh(),
                              torch::nn::Linear(32, 1));
  torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(lr));
  const int64_t steps = epochs * static_cast<int64_t>(loader.size());
  std::shared_ptr<accelerate::LRScheduler> schedule =
      accelerate::get_linear_schedule_with_warmup(optimizer, steps / 20, steps);
  auto [net, opt, sched, train] = accelerator.prepare(model, optimizer, schedule, loader);

  for (int epoch = 1; epoch <= epochs; ++epoch) {
    double total = 0;
    int64_t batches = 0;
    for (auto& batch : train) {
      auto loss = torch::mse_loss(net->forward(batch.data), batch.target);
      accelerator.backward(loss);
      opt.step();
      sched.step();
      opt.zero_grad();
      total += loss.item<double>();
      ++batches;
    }
    const auto mean = accelerator.reduce(at::tensor({total / static_cast<double>(batches)}),
                                         accelerate::Reduction::kMean);
    // accelerate: every process may call log; only the main one writes.
    accelerator.log({{"loss", mean}, {"lr", sched.get_last_lr()[0]}}, epoch);
    if (epoch % 10 == 0) accelerator.print("epoch ", epoch, ": loss ", mean.item<double>());
  }
  accelerator.end_training();  // accelerate: flushes and closes the trackers' files
  return 0;
}
