// Training-step benchmarks for the Accelerator, each against a baseline measured in the same run.
//
//   One process:  build/benchmarks/bench_training
//     (a) per-step time of the Accelerator loop vs the same raw LibTorch loop (tiny and medium
//         MLP); ratio = Accelerator / raw, target <= 1.02.
//   Several:      build/bin/accelerate launch -n 2 build/benchmarks/bench_training
//     (b) samples/s of the 2-process Accelerator loop (compare with benchmarks/ddp_peer.py run
//         the same way, and with the 1-process run above);
//     (c) bucketed, overlapped gradient sync vs the same loop with sync switched off (no_sync):
//         the cost of communication.
//
// Options: --steps N (timed steps per repetition), --reps N, --only tiny|medium.

#include <accelerate/accelerator.h>

#include <torch/torch.h>

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
  int64_t in, hidden, out, batch;
};
// batch is per process; the 1-process runs use the same per-process batch.
constexpr Size kSizes[] = {{"tiny", 32, 64, 10, 64}, {"medium", 512, 1024, 512, 256}};

torch::nn::Sequential make_mlp(const Size& s) {
  torch::manual_seed(0);
  return torch::nn::Sequential(torch::nn::Linear(s.in, s.hidden), torch::nn::ReLU(),
                               torch::nn::Linear(s.hidden, s.hidden), torch::nn::ReLU(),
                               torch::nn::Linear(s.hidden, s.out));
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Seconds per step of `step` over `steps` steps, after a warm-up.
template <class F>
double time_steps(int steps, F&& step) {
  for (int i = 0; i < 3; ++i) step();
  const auto start = Clock::now();
  for (int i = 0; i < steps; ++i) step();
  return std::chrono::duration<double>(Clock::now() - start).count() / steps;
}

}  // namespace

int main(int argc, char** argv) {
  int steps = 30, reps = 5;
  std::string only;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--steps") steps = std::atoi(argv[i + 1]);
    if (a == "--reps") reps = std::atoi(argv[i + 1]);
    if (a == "--only") only = argv[i + 1];
  }
  accelerate::Accelerator accelerator;
  const int world = accelerator.num_processes();
  const char* omp = std::getenv("OMP_NUM_THREADS");
  accelerator.print("bench_training: ", world, " process(es), torch threads ",
                    at::get_num_threads(), " (OMP_NUM_THREADS=", omp ? omp : "unset", "), ", steps,
                    " steps x ", reps, " repetitions, median");

  for (const auto& size : kSizes) {
    if (!only.empty() && only != size.name) continue;
    auto x = at::randn({size.batch, size.in});
    auto y = at::randn({size.batch, size.out});

    auto raw_model = make_mlp(size);
    torch::optim::SGD raw_opt(raw_model->parameters(), torch::optim::SGDOptions(1e-3));
    auto raw_step = [&] {
      auto loss = torch::mse_loss(raw_model->forward(x), y);
      loss.backward();
      raw_opt.step();
      raw_opt.zero_grad();
    };

    auto model = make_mlp(size);
    torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(1e-3));
    auto [net, opt] = accelerator.prepare(model, sgd);
    auto acc_step = [&] {
      auto loss = torch::mse_loss(net->forward(x), y);
      accelerator.backward(loss);
      opt.step();
      opt.zero_grad();
    };
    auto unsynced_step = [&] {
      auto guard = accelerator.no_sync(net);
      acc_step();
    };

    std::vector<double> raw, ours, unsynced;
    // Alternate which loop goes first so that neither always inherits a warm cache.
    for (int r = 0; r < reps; ++r) {
      const bool baseline_first = r % 2 == 0;
      auto baseline = [&] {
        if (world == 1) raw.push_back(time_steps(steps, raw_step));
        if (world > 1) unsynced.push_back(time_steps(steps, unsynced_step));
      };
      if (baseline_first) baseline();
      ours.push_back(time_steps(steps, acc_step));
      if (!baseline_first) baseline();
    }
    const double step_s = median(ours);
    const double samples = static_cast<double>(size.batch * world) / step_s;
    if (world == 1) {
      accelerator.print(size.name, " (", size.in, "-", size.hidden, "-", size.hidden, "-", size.out,
                        ", batch ", size.batch, "): raw ", median(raw) * 1e3,
                        " ms/step, Accelerator ", step_s * 1e3, " ms/step, ratio ",
                        step_s / median(raw), " ; ", samples, " samples/s");
    } else {
      accelerator.print(size.name, " (", size.in, "-", size.hidden, "-", size.hidden, "-", size.out,
                        ", batch ", size.batch, "/process): synced ", step_s * 1e3,
                        " ms/step, no_sync ", median(unsynced) * 1e3, " ms/step, sync cost ratio ",
                        step_s / median(unsynced), " ; ", samples, " samples/s");
    }
  }
  return 0;
}
