// Full parameter sharding (FSDP FULL_SHARD / ZeRO-3): memory per process, step time against plain
// data parallelism, and training a model whose AdamW state does not fit one process's budget.
//
//   build/bin/accelerate launch -n N build/benchmarks/bench_fsdp --part memory
//   build/bin/accelerate launch -n 2 build/benchmarks/bench_fsdp --part time [--steps 20]
//   build/bin/accelerate launch -n 4 build/benchmarks/bench_fsdp --part budget [--budget_mb 250]
//        [--width 1536] [--ddp]
// benchmarks/fsdp.sh runs all of them.
//
// memory: an MLP of 8 Linear(1024, 1024) units (Ψ = 8.4M float32 parameters), AdamW. Per process,
//   the peak of parameters + gradients + optimizer state, from the engine's accounting
//   (fsdp::stats: shards, gathered units, unsharded gradients in flight) plus the gradient shards
//   and the optimizer's state tensors, each at its own peak (so an upper bound of the peak of the
//   sum), against the goal 16Ψ/N + the two largest units' full size + 10%. Also the CPU caching
//   allocator's live large blocks after a step (everything at rest, activations freed).
// time: the medium MLP of bench_training (512-2048-2048-512, batch 64 per process), each Linear a
//   unit: FULL_SHARD with and without prefetch against plain data parallelism, interleaved,
//   medians; the share of all-gather time hidden by prefetching (1 - waited / total).
// budget: an MLP of 8 Linear(W, W) (--width W, default 1536: Ψ = 18.9M, float32 AdamW training
//   state 16Ψ = 302 MB) trains 3 steps with 4 processes, each held to --budget_mb of resident
//   memory above what it held before the model was built (a watchdog stops a process that
//   exceeds it; the kernel's peak, VmHWM, is checked at the end). --ddp runs plain data
//   parallelism under the same budget instead, which must be stopped.
// Every result is also printed as "RESULT <name> <value>".

#include <accelerate/accelerator.h>
#include <accelerate/detail/cpu_allocator.h>
#include <accelerate/fsdp.h>
#include <accelerate/optimizer_state.h>

#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

torch::nn::Sequential mlp(const std::vector<int64_t>& widths, bool relu_between) {
  torch::nn::Sequential model;
  for (size_t i = 0; i + 1 < widths.size(); ++i) {
    model->push_back(torch::nn::Linear(widths[i], widths[i + 1]));
    if (relu_between && i + 2 < widths.size()) model->push_back(torch::nn::ReLU());
  }
  return model;
}

int64_t count(const torch::nn::Module& m) {
  int64_t n = 0;
  for (const auto& p : m.parameters()) n += p.numel();
  return n;
}

accelerate::AcceleratorOptions fsdp_options(int64_t min_num_params, const std::string& prefetch,
                                            bool forward_prefetch) {
  accelerate::AcceleratorOptions o;
  o.fsdp_plugin = accelerate::FullyShardedDataParallelPlugin{
      .sharding_strategy = accelerate::ShardingStrategy::FULL_SHARD,
      .auto_wrap_policy = "SIZE_BASED_WRAP",
      .min_num_params = min_num_params,
      .backward_prefetch = prefetch,
      .forward_prefetch = forward_prefetch};
  return o;
}

int64_t state_bytes(torch::optim::Optimizer& optimizer) {
  int64_t bytes = 0;
  for (const auto& [name, t] : accelerate::optimizer_state_dict(optimizer).tensors) {
    if (name.rfind("state.", 0) == 0 && t.dim() > 0) bytes += static_cast<int64_t>(t.nbytes());
  }
  return bytes;
}

void memory_part(accelerate::PartialState& state, int steps) {
  const int64_t width = 1024;
  const int world = state.num_processes();
  accelerate::Accelerator acc(fsdp_options(width * width / 2, "BACKWARD_PRE", true));
  const int64_t before = accelerate::detail::cpu_cache_stats().live_bytes;
  torch::manual_seed(0);
  auto model = mlp(std::vector<int64_t>(9, width), true);
  const double psi = static_cast<double>(count(*model));
  auto adamw =
      std::make_shared<torch::optim::AdamW>(model->parameters(), torch::optim::AdamWOptions(1e-3));
  auto [m, opt] = acc.prepare(model, adamw);
  auto& sync = *acc.synchronizer(m);
  const auto x = at::randn({32, width});
  int64_t grad_shard_peak = 0, state_peak = 0, at_rest = 0;
  for (int i = 0; i < steps; ++i) {
    if (i == 1) accelerate::fsdp::reset_stats(sync);  // the first step starts from whole units
    acc.backward(torch::mse_loss(m->forward(x), x));
    opt.step();
    int64_t grads = 0;
    for (size_t u = 0; u < sync.num_buckets(); ++u) {
      auto g = sync.gradient_shard(u);
      if (g.defined()) grads += static_cast<int64_t>(g.nbytes());
    }
    grad_shard_peak = std::max(grad_shard_peak, grads);
    state_peak = std::max(state_peak, state_bytes(*adamw));
    opt.zero_grad();
    at_rest = accelerate::detail::cpu_cache_stats().live_bytes - before;
  }
  const auto s = accelerate::fsdp::stats(sync);
  auto units = s.unit_bytes;
  std::sort(units.rbegin(), units.rend());
  const double two_largest = static_cast<double>(units[0] + (units.size() > 1 ? units[1] : 0));
  const double measured = static_cast<double>(s.shard_bytes + grad_shard_peak + state_peak +
                                              s.peak_gathered_bytes + s.peak_unsharded_grad_bytes);
  const double goal = (16 * psi / world + two_largest) * 1.1;
  char line[640];
  std::snprintf(line, sizeof line,
                "memory N=%d rank %d: Ψ=%.0f, %lld units; peak params+grads+optimizer %.1f MB "
                "(shards %.1f + grad shards %.1f + AdamW %.1f + gathered peak %.1f + unsharded "
                "grads peak %.1f); goal 16Ψ/N + two largest units + 10%% = %.1f MB: ratio %.3f; "
                "at rest (allocator) %.1f MB = %.3f x 16Ψ/N",
                world, state.process_index(), psi, static_cast<long long>(s.units), measured / 1e6,
                s.shard_bytes / 1e6, grad_shard_peak / 1e6, state_peak / 1e6,
                s.peak_gathered_bytes / 1e6, s.peak_unsharded_grad_bytes / 1e6, goal / 1e6,
                measured / goal, at_rest / 1e6, at_rest / (16 * psi / world));
  std::printf("%s\n", line);
  std::fflush(stdout);
  acc.wait_for_everyone();
  if (state.is_main_process()) {
    state.print("RESULT memory_n", world, "_ratio_to_goal ", measured / goal);
  }
}

struct TimeSample {
  double seconds = 0;
  double gather = 0;
  double waited = 0;
};

TimeSample time_one(int variant, int steps, const at::Tensor& x, const at::Tensor& y) {
  accelerate::AcceleratorOptions o;
  if (variant == 1) o = fsdp_options(500000, "NO_PREFETCH", false);
  if (variant == 2) o = fsdp_options(500000, "BACKWARD_PRE", true);
  accelerate::Accelerator acc(o);
  torch::manual_seed(0);
  auto model = mlp({512, 2048, 2048, 512}, true);
  auto adamw =
      std::make_shared<torch::optim::AdamW>(model->parameters(), torch::optim::AdamWOptions(1e-3));
  auto [m, opt] = acc.prepare(model, adamw);
  auto step = [&] {
    acc.backward(torch::mse_loss(m->forward(x), y));
    opt.step();
    opt.zero_grad();
  };
  for (int i = 0; i < 3; ++i) step();
  auto* sync = acc.synchronizer(m);
  if (variant > 0) accelerate::fsdp::reset_stats(*sync);
  acc.wait_for_everyone();
  const auto start = Clock::now();
  for (int i = 0; i < steps; ++i) step();
  acc.wait_for_everyone();
  TimeSample t;
  t.seconds = std::chrono::duration<double>(Clock::now() - start).count() / steps;
  if (variant > 0) {
    const auto s = accelerate::fsdp::stats(*sync);
    t.gather = s.gather_seconds;
    t.waited = s.gather_wait_seconds;
  }
  acc.free_memory();
  return t;
}

void time_part(accelerate::PartialState& state, int steps, int reps) {
  torch::manual_seed(1 + state.process_index());
  const auto x = at::randn({64, 512});
  const auto y = at::randn({64, 512});
  const char* names[] = {"DDP", "FULL_SHARD, no prefetch", "FULL_SHARD, BACKWARD_PRE + forward"};
  std::vector<std::vector<TimeSample>> samples(3);
  for (int r = 0; r < reps; ++r) {
    for (int v = 0; v < 3; ++v) samples[v].push_back(time_one(v, steps, x, y));
  }
  double base = 0;
  for (int v = 0; v < 3; ++v) {
    std::vector<double> t, hidden;
    for (const auto& s : samples[v]) {
      t.push_back(s.seconds);
      if (s.gather > 0) hidden.push_back(1 - s.waited / s.gather);
    }
    const double ms = median(t) * 1e3;
    if (v == 0) base = ms;
    char line[256];
    std::snprintf(line, sizeof line, "time N=%d %s: %.2f ms/step (%.3f x DDP)%s",
                  state.num_processes(), names[v], ms, ms / base,
                  hidden.empty() ? ""
                                 : (", all-gather hidden " +
                                    std::to_string(static_cast<int>(median(hidden) * 100)) + "%")
                                       .c_str());
    state.print(line);
    state.print("RESULT time_variant", v, "_ratio_to_ddp ", ms / base);
    if (!hidden.empty()) state.print("RESULT time_variant", v, "_gather_hidden ", median(hidden));
  }
}

// A line of /proc/self/status, in kB.
int64_t status_kb(const char* wanted) {
  std::ifstream in("/proc/self/status");
  std::string key;
  while (in >> key) {
    if (key == wanted) {
      int64_t kb = 0;
      in >> kb;
      return kb;
    }
    std::string rest;
    std::getline(in, rest);
  }
  return 0;
}

// The budget is on resident memory above what the process held before the model was built: a
// watchdog ends the process as soon as it is exceeded, and the kernel's own peak (VmHWM) is
// checked at the end. (RLIMIT_DATA would count the heap's high-water mark of address space, and
// RLIMIT_AS LibTorch's and Gloo's reservations; this machine's cgroups are read-only.)
int budget_part(accelerate::PartialState& state, int64_t budget_mb, bool ddp, int64_t width) {
  accelerate::AcceleratorOptions o;
  if (!ddp) o = fsdp_options(width * width / 2, "BACKWARD_PRE", false);
  accelerate::Accelerator acc(o);
  acc.wait_for_everyone();  // the process group and its threads exist
  const int64_t base_kb = status_kb("VmRSS:");
  const int64_t limit_kb = base_kb + budget_mb * 1024;
  std::atomic<bool> done{false};
  std::thread watchdog([&] {
    while (!done.load()) {
      const int64_t rss = status_kb("VmRSS:");
      if (rss > limit_kb) {
        std::printf(
            "budget rank %d: resident memory %lld MB above the start exceeds the budget of "
            "%lld MB: stopped\n",
            state.process_index(), static_cast<long long>((rss - base_kb) / 1024),
            static_cast<long long>(budget_mb));
        std::fflush(stdout);
        std::_Exit(3);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
  torch::manual_seed(0);
  auto model = mlp(std::vector<int64_t>(9, width), true);
  const double psi = static_cast<double>(count(*model));
  state.print("budget: ", ddp ? "DDP" : "FULL_SHARD", ", ", state.num_processes(),
              " processes, Ψ=", static_cast<int64_t>(psi), ", 16Ψ = ", 16 * psi / 1e6,
              " MB of AdamW training state, budget ", budget_mb,
              " MB of resident memory per process above the ", base_kb / 1024, " MB at the start");
  auto adamw =
      std::make_shared<torch::optim::AdamW>(model->parameters(), torch::optim::AdamWOptions(1e-4));
  const int64_t built_kb = status_kb("VmRSS:");
  auto [m, opt] = acc.prepare(model, adamw);
  const int64_t prepared_kb = status_kb("VmRSS:");
  state.print("budget: resident above the start: ", (built_kb - base_kb) / 1024,
              " MB after building the model, ", (prepared_kb - base_kb) / 1024,
              " MB after prepare");
  const auto x = at::randn({16, width});
  for (int i = 0; i < 3; ++i) {
    const auto start = Clock::now();
    auto loss = torch::mse_loss(m->forward(x), x);
    acc.backward(loss);
    opt.step();
    opt.zero_grad();
    state.print("budget step ", i, ": loss ", loss.item<double>(), ", ",
                std::chrono::duration<double>(Clock::now() - start).count(), " s, resident ",
                (status_kb("VmRSS:") - base_kb) / 1024, " MB above the start");
  }
  done = true;
  watchdog.join();
  const int64_t peak_mb = (status_kb("VmHWM:") - base_kb) / 1024;
  std::printf("budget rank %d: peak resident memory %lld MB above the start (budget %lld MB)\n",
              state.process_index(), static_cast<long long>(peak_mb),
              static_cast<long long>(budget_mb));
  std::fflush(stdout);
  if (peak_mb > budget_mb) return 3;
  acc.wait_for_everyone();
  state.print("RESULT budget_", ddp ? "ddp" : "fsdp", "_trained 1");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string part = "memory";
  int steps = 20, reps = 3;
  int64_t budget_mb = 250;
  int64_t width = 1536;
  bool ddp = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--ddp") ddp = true;
    if (i + 1 >= argc) continue;
    if (a == "--part") part = argv[i + 1];
    if (a == "--steps") steps = std::atoi(argv[i + 1]);
    if (a == "--reps") reps = std::atoi(argv[i + 1]);
    if (a == "--budget_mb") budget_mb = std::atoll(argv[i + 1]);
    if (a == "--width") width = std::atoll(argv[i + 1]);
  }
  auto& state = accelerate::PartialState::shared();
  const char* threads = std::getenv("OMP_NUM_THREADS");
  state.print("bench_fsdp ", part, ": ", state.num_processes(), " process(es), torch threads ",
              at::get_num_threads(), " (OMP_NUM_THREADS=", threads ? threads : "unset", ")");
  if (part == "memory") memory_part(state, 5);
  if (part == "time") time_part(state, steps, reps);
  if (part == "budget") return budget_part(state, budget_mb, ddp, width);
  return 0;
}
