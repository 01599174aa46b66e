// ZeRO stages 1 and 2 against plain data parallelism (stage 0), interleaved in one run.
//
//   build/bin/accelerate launch -n 2 build/benchmarks/bench_zero [--steps 30] [--reps 3]
//        [--hidden 2048]
//
// Workload: the medium MLP of bench_training (512-H-H-512, ReLU), AdamW lr 1e-3, MSE loss, batch
// 64 per process. Per variant:
//  - bytes of parameters + gradients + optimizer state per process, measured from the CPU
//    caching allocator's live large blocks (every tensor here is >= 256 KiB; see
//    include/accelerate/detail/cpu_allocator.h) right after opt.step(), against ZeRO's formulas
//    for AdamW in float32 (DDP 16Ψ; stage 1 8Ψ + 8Ψ/N; stage 2 4Ψ + 12Ψ/N);
//  - step time (median over repetitions), as a ratio to stage 0 (goal <= 1.10);
//  - bytes this process wrote to its sockets per step (/proc/self/io wchar: Gloo writes with
//    writev), against theory: 2(N-1)/N * 4Ψ for every variant (all-reduce = reduce-scatter +
//    all-gather).
// Every result is also printed as "RESULT <name> <value>".

#include <accelerate/accelerator.h>
#include <accelerate/detail/cpu_allocator.h>

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
constexpr int64_t kBatch = 64;
constexpr int kWarmup = 3;

int64_t written_bytes() {
  std::ifstream in("/proc/self/io");
  std::string key;
  int64_t value = 0;
  while (in >> key >> value) {
    if (key == "wchar:") return value;
  }
  return 0;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

struct Sample {
  double seconds_per_step = 0;
  double live_bytes = 0;
  double written_per_step = 0;
};

Sample run(int stage, int64_t hidden, int steps, const at::Tensor& x, const at::Tensor& y) {
  accelerate::AcceleratorOptions options;
  if (stage > 0) options.deepspeed_plugin = accelerate::DeepSpeedPlugin{.zero_stage = stage};
  accelerate::Accelerator acc(options);
  const int64_t before = accelerate::detail::cpu_cache_stats().live_bytes;
  torch::manual_seed(0);
  auto model = torch::nn::Sequential(torch::nn::Linear(512, hidden), torch::nn::ReLU(),
                                     torch::nn::Linear(hidden, hidden), torch::nn::ReLU(),
                                     torch::nn::Linear(hidden, 512));
  auto adamw =
      std::make_shared<torch::optim::AdamW>(model->parameters(), torch::optim::AdamWOptions(1e-3));
  auto [m, opt] = acc.prepare(model, adamw);
  Sample s;
  auto step = [&](bool measure) {
    acc.backward(torch::mse_loss(m->forward(x), y));
    opt.step();
    if (measure) {
      s.live_bytes = static_cast<double>(accelerate::detail::cpu_cache_stats().live_bytes - before);
    }
    opt.zero_grad();
  };
  for (int i = 0; i < kWarmup; ++i) step(i + 1 == kWarmup);
  acc.wait_for_everyone();
  const int64_t written = written_bytes();
  const auto start = Clock::now();
  for (int i = 0; i < steps; ++i) step(false);
  acc.wait_for_everyone();
  s.seconds_per_step = std::chrono::duration<double>(Clock::now() - start).count() / steps;
  s.written_per_step = static_cast<double>(written_bytes() - written) / steps;
  acc.free_memory();
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  int steps = 30, reps = 3;
  int64_t hidden = 2048;
  for (int i = 1; i + 1 < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--steps") steps = std::atoi(argv[i + 1]);
    if (a == "--reps") reps = std::atoi(argv[i + 1]);
    if (a == "--hidden") hidden = std::atoll(argv[i + 1]);
  }
  auto& state = accelerate::PartialState::shared();
  const int world = state.num_processes();
  const double psi =
      static_cast<double>(512 * hidden + hidden + hidden * hidden + hidden + hidden * 512 + 512);
  auto env = [](const char* name) {
    const char* v = std::getenv(name);
    return std::string(v ? v : "unset");
  };
  state.print("bench_zero: ", world, " process(es), torch threads ", at::get_num_threads(),
              " (OMP_NUM_THREADS=", env("OMP_NUM_THREADS"), "), MLP 512-", hidden, "-", hidden,
              "-512 (", static_cast<int64_t>(psi), " parameters), AdamW, batch ", kBatch,
              "/process, ", steps, " steps x ", reps, " repetitions, medians");
  torch::manual_seed(1 + state.process_index());
  const auto x = at::randn({kBatch, 512});
  const auto y = at::randn({kBatch, 512});
  const int stages[] = {0, 1, 2};
  std::vector<std::vector<Sample>> samples(3);
  for (int r = 0; r < reps; ++r) {
    for (int k = 0; k < 3; ++k) samples[k].push_back(run(stages[k], hidden, steps, x, y));
  }
  const double n = world;
  const double theory_bytes[] = {16 * psi, 8 * psi + 8 * psi / n, 4 * psi + 12 * psi / n};
  const double theory_sent = 2 * (n - 1) / n * 4 * psi;
  double base_time = 0;
  for (int k = 0; k < 3; ++k) {
    std::vector<double> time, live, sent;
    for (const auto& s : samples[k]) {
      time.push_back(s.seconds_per_step);
      live.push_back(s.live_bytes);
      sent.push_back(s.written_per_step);
    }
    const double t = median(time);
    if (k == 0) base_time = t;
    const double bytes = median(live);
    const double out = median(sent);
    char line[512];
    std::snprintf(line, sizeof line,
                  "stage %d: %.2f ms/step (%.3f x stage 0); params+grads+optimizer %.1f MB "
                  "(theory %.1f MB, ratio %.3f); sent %.2f MB/step (theory %.2f MB, ratio %.3f)",
                  stages[k], t * 1e3, t / base_time, bytes / 1e6, theory_bytes[k] / 1e6,
                  bytes / theory_bytes[k], out / 1e6, theory_sent / 1e6, out / theory_sent);
    state.print(line);
    const std::string prefix = "RESULT stage" + std::to_string(stages[k]) + "_";
    state.print(prefix, "ms_per_step ", t * 1e3);
    state.print(prefix, "time_ratio ", t / base_time);
    state.print(prefix, "memory_ratio_to_theory ", bytes / theory_bytes[k]);
    state.print(prefix, "sent_ratio_to_theory ", out / theory_sent);
  }
  return 0;
}
