// All-reduce bandwidth of accelerate::reduce against Gloo's allreduce called directly, in the
// same run, on tensors of 1 KiB to 64 MiB. Start it with the launcher:
//   build/bin/accelerate launch -n 2 build/benchmarks/bench_allreduce [--max_mib 64] [--seconds
//   0.5]
// Rank 0 prints one row per size: time per call and bus bandwidth for both, and their ratio.
// Bus bandwidth uses NCCL's convention, 2 (n - 1) / n * bytes / time, so numbers compare across
// process counts.

#include <accelerate/operations.h>
#include <accelerate/state.h>

#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

using Clock = std::chrono::steady_clock;

// Every rank must run the same number of iterations, so rank 0 decides and broadcasts it.
int agree_iterations(const accelerate::PartialState& state, double seconds_per_call,
                     double budget) {
  int iters = static_cast<int>(budget / std::max(seconds_per_call, 1e-6));
  iters = std::max(3, std::min(iters, 2000));
  auto t = at::full({1}, iters, at::kLong);
  return static_cast<int>(accelerate::broadcast(state, t, 0).item<int64_t>());
}

long minor_faults() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_minflt;
}

// Seconds per call; adds the page faults per call to *faults.
template <class F>
double time_per_call(const accelerate::PartialState& state, int iters, F&& call, double* faults) {
  state.wait_for_everyone();
  const long faults_before = minor_faults();
  auto start = Clock::now();
  for (int i = 0; i < iters; ++i) call();
  state.wait_for_everyone();
  *faults += static_cast<double>(minor_faults() - faults_before) / iters;
  return std::chrono::duration<double>(Clock::now() - start).count() / iters;
}

}  // namespace

int main(int argc, char** argv) {
  double max_mib = 64;
  double budget = 0.5;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--max_mib") == 0) max_mib = std::atof(argv[i + 1]);
    if (std::strcmp(argv[i], "--seconds") == 0) budget = std::atof(argv[i + 1]);
  }
  auto& state = accelerate::PartialState::shared();
  auto* pg = state.process_group();
  if (pg == nullptr) {
    std::fprintf(stderr, "bench_allreduce: run it with `accelerate launch -n 2` or more\n");
    return 2;
  }
  const int n = state.num_processes();
  const double bus = 2.0 * (n - 1) / n;
  auto env = [](const char* name) {
    const char* v = std::getenv(name);
    return std::string(v ? v : "unset");
  };
  // Both decide the result on few cores: threads per process, and whether the copy reduce()
  // makes reuses freed memory or faults fresh pages in (see the launcher's GLIBC_TUNABLES).
  state.print("all-reduce (sum, float32), ", n,
              " processes, Gloo; OMP_NUM_THREADS=", env("OMP_NUM_THREADS"),
              "; GLIBC_TUNABLES=", env("GLIBC_TUNABLES"));
  state.print(
      "      size   raw gloo us   raw GB/s   accelerate::reduce us   GB/s   ratio   "
      "faults/call raw ours");
  for (int64_t bytes = 1024; bytes <= static_cast<int64_t>(max_mib * 1024 * 1024); bytes *= 4) {
    auto t = at::ones({bytes / 4}, at::kFloat);
    auto raw = [&] {
      std::vector<at::Tensor> buf{t};
      pg->allreduce(buf)->wait();
    };
    auto ours = [&] { (void)accelerate::reduce(state, t, "sum"); };
    // Warm up both paths (steady state: buffers allocated, pages faulted in) and size the
    // measurement from the raw path's speed.
    for (int i = 0; i < 3; ++i) {
      raw();
      ours();
    }
    auto probe_start = Clock::now();
    raw();
    const double probe = std::chrono::duration<double>(Clock::now() - probe_start).count();
    const int iters = agree_iterations(state, probe, budget);
    // Interleave the two so drift on a shared machine hits both alike.
    double raw_s = 0, ours_s = 0, raw_faults = 0, ours_faults = 0;
    for (int round = 0; round < 2; ++round) {
      raw_s += time_per_call(state, iters, raw, &raw_faults) / 2;
      ours_s += time_per_call(state, iters, ours, &ours_faults) / 2;
    }
    char label[32];
    if (bytes >= 1024 * 1024) {
      std::snprintf(label, sizeof label, "%lld MiB", static_cast<long long>(bytes >> 20));
    } else {
      std::snprintf(label, sizeof label, "%lld KiB", static_cast<long long>(bytes >> 10));
    }
    char row[200];
    std::snprintf(row, sizeof row, "%10s   %11.1f   %8.3f   %21.1f   %5.3f   %5.3f   %6.0f %6.0f",
                  label, raw_s * 1e6, bus * bytes / raw_s / 1e9, ours_s * 1e6,
                  bus * bytes / ours_s / 1e9, raw_s / ours_s, raw_faults / 2, ours_faults / 2);
    state.print(row);
  }
  state.print("ratio = raw time / accelerate::reduce time (1.0 = no overhead)");
  return 0;
}
