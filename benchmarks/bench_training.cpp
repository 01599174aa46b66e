// Training-step benchmarks for the Accelerator, each against a baseline measured in the same run.
//
// Workload (the training-step issue's, shared with benchmarks/python_workload.py): batch 64 per
// process, SGD lr 1e-3, MSE loss, MLPs tiny 8-16-1 and medium 512-2048-2048-512 with ReLU
// between layers, 5 warm-up steps, then timed steps between barriers; repetitions interleave the
// variants and report medians.
//
//   One process, started directly:  build/benchmarks/bench_training
//     raw LibTorch loop vs the same loop through the Accelerator (ratio, target <= 1.02), and
//     page faults per step of each.
//   Several processes:  build/bin/accelerate launch -n 2 build/benchmarks/bench_training
//     samples/s of the synchronised loop (exact averaging), of the same loop under no_sync (no
//     communication at all), of the loop with the bf16 communication hook, and the share of
//     the gradient communication hidden behind backward (GradientSynchronizer::stats()).
//
// Every result is also printed as "RESULT <name> <value>" for benchmarks/compare_training.py.
// Options: --steps N (timed steps per repetition for medium; tiny runs 40x as many), --reps N,
// --only tiny|medium, --bucket_cap_mb X (DDP's 25 by default), --gradient_as_bucket_view.

#include <accelerate/accelerator.h>

#include <torch/torch.h>

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

struct Size {
  const char* name;
  int64_t in, hidden, out;
  int steps_factor;  // timed steps = --steps * this
};
constexpr int64_t kBatch = 64;  // per process
constexpr int kWarmup = 5;
constexpr Size kSizes[] = {{"tiny", 8, 16, 1, 40}, {"medium", 512, 2048, 512, 1}};

torch::nn::Sequential make_mlp(const Size& s) {
  torch::manual_seed(0);
  return torch::nn::Sequential(torch::nn::Linear(s.in, s.hidden), torch::nn::ReLU(),
                               torch::nn::Linear(s.hidden, s.hidden), torch::nn::ReLU(),
                               torch::nn::Linear(s.hidden, s.out));
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

long minor_faults() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_minflt;
}

struct Timing {
  double seconds_per_step = 0;
  double faults_per_step = 0;
};

// Per-step time of `step` over `steps` timed steps after the warm-up, between barriers so that
// every process times the same interval.
template <class F>
Timing time_steps(accelerate::Accelerator& accelerator, int steps, F&& step) {
  for (int i = 0; i < kWarmup; ++i) step();
  accelerator.wait_for_everyone();
  const long faults = minor_faults();
  const auto start = Clock::now();
  for (int i = 0; i < steps; ++i) step();
  accelerator.wait_for_everyone();
  Timing t;
  t.seconds_per_step = std::chrono::duration<double>(Clock::now() - start).count() / steps;
  t.faults_per_step = static_cast<double>(minor_faults() - faults) / steps;
  return t;
}

void result(accelerate::Accelerator& accelerator, const std::string& name, double value) {
  char line[160];
  std::snprintf(line, sizeof line, "RESULT %s %.6g", name.c_str(), value);
  accelerator.print(line);
}

}  // namespace

int main(int argc, char** argv) {
  int steps = 60, reps = 5;
  std::string only;
  bool as_view = false;
  double bucket_cap_mb = accelerate::DistributedDataParallelKwargs{}.bucket_cap_mb;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--gradient_as_bucket_view") as_view = true;
    if (i + 1 >= argc) continue;
    if (a == "--steps") steps = std::atoi(argv[i + 1]);
    if (a == "--reps") reps = std::atoi(argv[i + 1]);
    if (a == "--only") only = argv[i + 1];
    if (a == "--bucket_cap_mb") bucket_cap_mb = std::atof(argv[i + 1]);
  }
  accelerate::DistributedDataParallelKwargs kwargs;
  kwargs.gradient_as_bucket_view = as_view;
  kwargs.bucket_cap_mb = bucket_cap_mb;
  accelerate::Accelerator accelerator({.ddp_kwargs = kwargs});
  // A second Accelerator for the compressed variant: its models get the bf16 hook.
  accelerate::DistributedDataParallelKwargs bf16_kwargs = kwargs;
  bf16_kwargs.comm_hook = accelerate::DDPCommunicationHookType::BF16;
  accelerate::Accelerator compressed({.ddp_kwargs = bf16_kwargs});
  const int world = accelerator.num_processes();
  auto env = [](const char* name) {
    const char* v = std::getenv(name);
    return std::string(v ? v : "unset");
  };
  accelerator.print("bench_training: ", world, " process(es), torch threads ",
                    at::get_num_threads(), " (OMP_NUM_THREADS=", env("OMP_NUM_THREADS"),
                    ", OPENBLAS_NUM_THREADS=", env("OPENBLAS_NUM_THREADS"),
                    ", GLIBC_TUNABLES=", env("GLIBC_TUNABLES"), "), batch ", kBatch, "/process, ",
                    reps, " repetitions, median");

  for (const auto& size : kSizes) {
    if (!only.empty() && only != size.name) continue;
    const int timed = steps * size.steps_factor;
    torch::manual_seed(1 + accelerator.process_index());
    auto x = at::randn({kBatch, size.in});
    auto y = at::randn({kBatch, size.out});
    const std::string shape = std::to_string(size.in) + "-" + std::to_string(size.hidden) + "-" +
                              std::to_string(size.hidden) + "-" + std::to_string(size.out);

    auto raw_model = make_mlp(size);
    torch::optim::SGD raw_opt(raw_model->parameters(), torch::optim::SGDOptions(1e-3));
    // The plain LibTorch loop as a user writes it (LibTorch 1.13's zero_grad() zeroes in place).
    auto raw_step = [&] {
      auto loss = torch::mse_loss(raw_model->forward(x), y);
      loss.backward();
      raw_opt.step();
      raw_opt.zero_grad();
    };

    auto model = make_mlp(size);
    torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(1e-3));
    auto [net, opt] = accelerator.prepare(model, sgd);
    auto acc_step = [&, &net = net, &opt = opt] {
      auto loss = torch::mse_loss(net->forward(x), y);
      accelerator.backward(loss);
      opt.step();
      opt.zero_grad();
    };
    auto unsynced_step = [&, &net = net] {
      auto guard = accelerator.no_sync(net);
      acc_step();
    };

    auto bf16_model = make_mlp(size);
    torch::optim::SGD bf16_sgd(bf16_model->parameters(), torch::optim::SGDOptions(1e-3));
    auto [bf16_net, bf16_opt] = compressed.prepare(bf16_model, bf16_sgd);
    auto bf16_step = [&, &bf16_net = bf16_net, &bf16_opt = bf16_opt] {
      auto loss = torch::mse_loss(bf16_net->forward(x), y);
      compressed.backward(loss);
      bf16_opt.step();
      bf16_opt.zero_grad();
    };

    std::vector<double> raw, ours, unsynced, bf16, raw_faults, our_faults;
    double hidden = 0, communication = 0, exposed = 0, bf16_exposed = 0, bf16_communication = 0;
    int64_t synced_steps = 0;
    auto* sync = accelerator.synchronizer(net);
    for (int r = 0; r < reps; ++r) {
      // Rotate the order so that no variant always inherits a warm (or cold) cache.
      std::vector<int> order{0, 1, 2, 3};
      std::rotate(order.begin(), order.begin() + r % 4, order.end());
      for (int v : order) {
        if (v == 0 && world == 1) {
          auto t = time_steps(accelerator, timed, raw_step);
          raw.push_back(t.seconds_per_step);
          raw_faults.push_back(t.faults_per_step);
        } else if (v == 1) {
          if (sync) sync->reset_stats();
          auto t = time_steps(accelerator, timed, acc_step);
          ours.push_back(t.seconds_per_step);
          our_faults.push_back(t.faults_per_step);
          if (sync) {
            auto s = sync->stats();
            hidden += s.hidden_seconds;
            communication += s.communication_seconds;
            exposed += s.exposed_seconds;
            synced_steps += s.synchronized_steps;
          }
        } else if (v == 2 && world > 1) {
          unsynced.push_back(time_steps(accelerator, timed, unsynced_step).seconds_per_step);
        } else if (v == 3 && world > 1) {
          auto* bf16_sync = compressed.synchronizer(bf16_net);
          if (bf16_sync) bf16_sync->reset_stats();
          bf16.push_back(time_steps(compressed, timed, bf16_step).seconds_per_step);
          if (bf16_sync) {
            auto s = bf16_sync->stats();
            bf16_exposed += s.exposed_seconds / std::max<double>(1.0, s.synchronized_steps);
            bf16_communication +=
                s.communication_seconds / std::max<double>(1.0, s.synchronized_steps);
          }
        }
      }
    }
    const std::string key =
        std::string(size.name) + (world == 1 ? "_1p" : "_" + std::to_string(world) + "p");
    const double samples = static_cast<double>(kBatch * world) / median(ours);
    if (world == 1) {
      accelerator.print(size.name, " (", shape, ", ", timed, " steps): raw ", median(raw) * 1e3,
                        " ms/step (", median(raw_faults), " page faults/step), Accelerator ",
                        median(ours) * 1e3, " ms/step (", median(our_faults),
                        " page faults/step), ratio Accelerator/raw ", median(ours) / median(raw));
      result(accelerator, key + "_raw_samples_per_s", kBatch / median(raw));
      result(accelerator, key + "_accelerator_samples_per_s", samples);
      result(accelerator, key + "_ratio_accelerator_over_raw", median(ours) / median(raw));
    } else {
      const double steps_done = std::max<double>(1.0, static_cast<double>(synced_steps));
      accelerator.print(
          size.name, " (", shape, ", ", timed, " steps): synchronised ", median(ours) * 1e3,
          " ms/step = ", samples, " samples/s (", median(our_faults),
          " page faults/step); no_sync ", median(unsynced) * 1e3, " ms/step; bf16 hook ",
          median(bf16) * 1e3, " ms/step = ", kBatch * world / median(bf16),
          " samples/s (communication ", bf16_communication / reps * 1e3, " ms/step, exposed ",
          bf16_exposed / reps * 1e3, " ms/step); exact: communication ",
          communication / steps_done * 1e3, " ms/step of which hidden behind backward ",
          communication > 0 ? hidden / communication : 0.0, ", exposed ",
          exposed / steps_done * 1e3, " ms/step");
      result(accelerator, key + "_samples_per_s", samples);
      result(accelerator, key + "_no_sync_samples_per_s", kBatch * world / median(unsynced));
      result(accelerator, key + "_bf16_hook_samples_per_s", kBatch * world / median(bf16));
      result(accelerator, key + "_hidden_share", communication > 0 ? hidden / communication : 0.0);
      result(accelerator, key + "_communication_ms_per_step", communication / steps_done * 1e3);
      result(accelerator, key + "_exposed_ms_per_step", exposed / steps_done * 1e3);
    }
  }
  return 0;
}
