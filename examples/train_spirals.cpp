// Trains a small MLP to tell three interleaved spirals apart: a plain LibTorch training loop
// plus the Accelerate lines (marked "accelerate:"). Run it as one process or many:
//
//   build/examples/train_spirals
//   build/bin/accelerate launch -n 2 build/examples/train_spirals --epochs 20
//   build/bin/accelerate launch -n 2 --mixed_precision bf16 build/examples/train_spirals
//
// It prints the training loss every epoch and ends with the held-out loss and accuracy, counted
// over every evaluation sample exactly once whatever the number of processes.

#include <accelerate/accelerator.h>

#include <torch/torch.h>
#include <CLI/CLI.hpp>

#include <cmath>
#include <cstdio>

namespace {

// Three spiral arms in the plane with a little noise; class = arm. The same seed gives the same
// points in every process, so every process holds the whole dataset and the loader shards it.
struct Spirals {
  at::Tensor points;  // [n, 2]
  at::Tensor labels;  // [n]

  Spirals(int64_t per_class, uint64_t seed) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    const int64_t n = 3 * per_class;
    auto radius = at::linspace(0.05, 1.0, per_class).repeat({3});
    auto arm = at::arange(3, at::kLong).repeat_interleave(per_class);
    auto angle = radius * 4.0 + arm.to(at::kFloat) * (2.0 * M_PI / 3.0) +
                 at::randn({n}, gen, at::TensorOptions().dtype(at::kFloat)) * 0.08;
    points = at::stack({radius * at::cos(angle), radius * at::sin(angle)}, 1);
    labels = arm;
  }
  int64_t size() const { return points.size(0); }
  torch::data::Example<> get(size_t i) const {
    const auto k = static_cast<int64_t>(i);
    return {points[k], labels[k]};
  }
};

struct NetImpl : torch::nn::Module {
  torch::nn::Linear fc1{nullptr}, fc2{nullptr}, fc3{nullptr};
  NetImpl() {
    fc1 = register_module("fc1", torch::nn::Linear(2, 64));
    fc2 = register_module("fc2", torch::nn::Linear(64, 64));
    fc3 = register_module("fc3", torch::nn::Linear(64, 3));
  }
  at::Tensor forward(const at::Tensor& x) {
    return fc3->forward(torch::relu(fc2->forward(torch::relu(fc1->forward(x)))));
  }
};
TORCH_MODULE(Net);

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Train an MLP on three spirals with accelerate-cpp"};
  int epochs = 30;
  int64_t batch_size = 32;
  double lr = 0.01;
  uint64_t seed = 42;
  app.add_option("--epochs", epochs, "training epochs")->capture_default_str();
  app.add_option("--batch_size", batch_size, "samples per batch and process")
      ->capture_default_str();
  app.add_option("--lr", lr, "peak learning rate (AdamW)")->capture_default_str();
  app.add_option("--seed", seed, "seed of the data and of the initial weights")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  // accelerate: mixed precision and gradient accumulation come from `accelerate launch`.
  accelerate::Accelerator accelerator;
  accelerate::set_seed(seed);

  Spirals train_set(600, seed), eval_set(200, seed + 1);
  accelerate::data::DataLoader train_loader(train_set, {.batch_size = batch_size, .shuffle = true});
  accelerate::data::DataLoader eval_loader(eval_set, {.batch_size = 64});
  Net model;
  torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(lr));
  // Written for one process, as in Accelerate: the prepared schedule steps once per process
  // per optimizer step, so it ends with the training whatever the number of processes.
  const int64_t steps = epochs * static_cast<int64_t>(train_loader.size()) /
                        accelerator.gradient_accumulation_steps();
  std::shared_ptr<accelerate::LRScheduler> schedule =
      accelerate::get_linear_schedule_with_warmup(optimizer, steps / 10, steps);

  // accelerate: shard the data, synchronise gradients, wrap optimizer and schedule.
  auto [net, opt, sched, train, eval] =
      accelerator.prepare(model, optimizer, schedule, train_loader, eval_loader);
  accelerator.print(accelerator.state().describe(), accelerator.config().describe());

  for (int epoch = 0; epoch < epochs; ++epoch) {
    net->train();
    double total = 0;
    int64_t batches = 0;
    for (auto& batch : train) {
      auto sync = accelerator.accumulate(net);  // accelerate: accumulation
      at::Tensor loss;
      {
        auto autocast = accelerator.autocast();  // accelerate: mixed precision
        loss = torch::cross_entropy_loss(net->forward(batch.data), batch.target);
      }
      accelerator.backward(loss);  // accelerate: instead of loss.backward()
      if (accelerator.sync_gradients()) accelerator.clip_grad_norm_(net->parameters(), 1.0);
      opt.step();
      sched.step();
      opt.zero_grad();
      total += loss.detach().to(at::kFloat).item<double>();
      ++batches;
    }
    // accelerate: the mean over processes.
    const auto mean = accelerator.reduce(at::tensor({total / static_cast<double>(batches)}),
                                         accelerate::Reduction::kMean);
    if (epoch % 5 == 4 || epoch == epochs - 1) {
      accelerator.print("epoch ", epoch + 1, ": train loss ", mean.item<double>(), ", lr ",
                        sched.get_last_lr()[0]);
    }
  }

  net->eval();
  torch::NoGradGuard no_grad;
  std::vector<at::Tensor> logits, labels;
  for (auto& batch : eval) {
    auto autocast = accelerator.autocast();
    // accelerate: every sample once, whatever the number of processes.
    logits.push_back(accelerator.gather_for_metrics(net->forward(batch.data).to(at::kFloat)));
    labels.push_back(accelerator.gather_for_metrics(batch.target));
  }
  auto all_logits = at::cat(logits), all_labels = at::cat(labels);
  const double eval_loss = torch::cross_entropy_loss(all_logits, all_labels).item<double>();
  const double accuracy = all_logits.argmax(1).eq(all_labels).to(at::kDouble).mean().item<double>();
  accelerator.print("evaluated ", all_labels.size(0), " samples: loss ", eval_loss, ", accuracy ",
                    accuracy);
  return 0;
}
