// Data loader overhead, in one process, with baselines measured in the same run:
//  (a) DataLoader (DefaultCollate, 0 workers) against a hand-written loop that gathers the same
//      prebuilt items per batch and calls at::stack: N = 20000 items of 64 floats, batches of 32.
//      ratio = raw time / loader time (1.0 = no overhead; target >= 0.95).
//  (b) a costly get(): 0, 1, 2 (and 4) worker threads against 0 workers, for two kinds of cost:
//      CPU work (a dependent floating-point loop calibrated to ~0.5 ms per item on this machine)
//      and waiting (std::this_thread::sleep_for(200 us) per item, like I/O).
// Run it directly: build/benchmarks/bench_data_loader [--reps 31] (repetitions of (a); (b) runs 3)

#include <accelerate/data.h>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
namespace data = accelerate::data;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// ---------------------------------------------------------------------- (a) overhead

/// Prebuilt items: get() only hands out a tensor handle.
struct Prebuilt {
  std::shared_ptr<const std::vector<at::Tensor>> items;
  int64_t size() const { return static_cast<int64_t>(items->size()); }
  at::Tensor get(size_t i) const { return (*items)[i]; }
};

/// What both sides do with a batch: enough that it cannot be skipped, cheap enough not to hide
/// the loader's cost.
int64_t consume(const at::Tensor& batch) {
  return batch.size(0) + batch.size(1);
}

double raw_epoch(const std::vector<at::Tensor>& items, const std::vector<int64_t>& order,
                 int64_t batch_size, int64_t& sink) {
  const auto start = Clock::now();
  const auto n = static_cast<int64_t>(order.size());
  std::vector<at::Tensor> batch;
  for (int64_t b = 0; b < n; b += batch_size) {
    batch.clear();
    const int64_t end = std::min(n, b + batch_size);
    for (int64_t i = b; i < end; ++i)
      batch.push_back(items[static_cast<size_t>(order[static_cast<size_t>(i)])]);
    sink += consume(at::stack(batch));
  }
  return seconds_since(start);
}

template <class L>
double loader_epoch(L& loader, int64_t& sink) {
  const auto start = Clock::now();
  for (at::Tensor& b : loader) sink += consume(b);
  return seconds_since(start);
}

void overhead(int reps, int64_t& sink) {
  constexpr int64_t kItems = 20000;
  constexpr int64_t kBatch = 32;
  auto items = std::make_shared<std::vector<at::Tensor>>();
  items->reserve(kItems);
  for (int64_t i = 0; i < kItems; ++i) items->push_back(at::rand({64}));

  std::printf(
      "(a) %lld items of 64 float32, batches of %lld (%lld batches), %d repetitions, "
      "interleaved; times per epoch (median, min)\n",
      static_cast<long long>(kItems), static_cast<long long>(kBatch),
      static_cast<long long>((kItems + kBatch - 1) / kBatch), reps);
  std::printf("    %-10s %14s %14s %20s %20s %7s\n", "order", "raw med ms", "raw min ms",
              "DataLoader med ms", "DataLoader min ms", "ratio");

  for (bool shuffle : {false, true}) {
    const uint64_t seed = 1234;
    data::DataLoaderOptions options{.batch_size = kBatch};
    if (shuffle) {
      options.shuffle = true;
      options.generator = at::make_generator<at::CPUGeneratorImpl>(seed);
    }
    data::DataLoader loader(Prebuilt{items}, options);
    // The raw loop draws the same permutation itself (at::randperm with its own generator),
    // so both pay for shuffling.
    auto raw_gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    auto raw_order = [&] {
      std::vector<int64_t> order(static_cast<size_t>(kItems));
      if (!shuffle) {
        for (int64_t i = 0; i < kItems; ++i) order[static_cast<size_t>(i)] = i;
        return order;
      }
      at::Tensor perm = at::randperm(kItems, raw_gen, at::TensorOptions().dtype(at::kLong));
      std::copy(perm.data_ptr<int64_t>(), perm.data_ptr<int64_t>() + kItems, order.begin());
      return order;
    };
    auto timed_raw = [&] {
      const auto start = Clock::now();
      const auto order = raw_order();
      raw_epoch(*items, order, kBatch, sink);
      return seconds_since(start);  // drawing the order included
    };
    // Warm up both (allocator, first-touch).
    timed_raw();
    loader_epoch(loader, sink);
    std::vector<double> raw, ours;
    for (int r = 0; r < reps; ++r) {
      if (r % 2 == 0) {
        raw.push_back(timed_raw());
        ours.push_back(loader_epoch(loader, sink));
      } else {
        ours.push_back(loader_epoch(loader, sink));
        raw.push_back(timed_raw());
      }
    }
    const double raw_med = median(raw), ours_med = median(ours);
    std::printf("    %-10s %14.2f %14.2f %20.2f %20.2f %7.3f\n",
                shuffle ? "shuffled" : "sequential", raw_med * 1e3,
                *std::min_element(raw.begin(), raw.end()) * 1e3, ours_med * 1e3,
                *std::min_element(ours.begin(), ours.end()) * 1e3, raw_med / ours_med);
  }
  std::printf("    ratio = raw median / DataLoader median (1.0 = no overhead)\n\n");
}

// ---------------------------------------------------------------------- (b) workers

/// A dependent chain of floating-point operations: CPU work that cannot be vectorised away.
double spin(int64_t iterations, double x) {
  for (int64_t i = 0; i < iterations; ++i) x = x * 0.999999937 + 1.0e-7;
  return x;
}

/// Each get() costs either `spin_iterations` of CPU work or a sleep of `sleep`.
struct Costly {
  int64_t n;
  int64_t spin_iterations;
  std::chrono::microseconds sleep;
  int64_t size() const { return n; }
  at::Tensor get(size_t i) const {
    double v = static_cast<double>(i);
    if (spin_iterations > 0) v = spin(spin_iterations, v);
    if (sleep.count() > 0) std::this_thread::sleep_for(sleep);
    return at::full({64}, v, at::kFloat);
  }
};

int64_t calibrate_spin(double target_seconds) {
  volatile double sink = 0;
  int64_t iterations = 1 << 16;
  for (;;) {
    const auto start = Clock::now();
    sink = sink + spin(iterations, 1.0);
    const double t = seconds_since(start);
    if (t > 0.05) return static_cast<int64_t>(static_cast<double>(iterations) * target_seconds / t);
    iterations *= 2;
  }
}

void workers(int reps, int64_t& sink) {
  constexpr int64_t kBatch = 32;
  const int64_t spin_iterations = calibrate_spin(0.5e-3);
  struct Kind {
    const char* name;
    Costly dataset;
  };
  const Kind kinds[] = {
      {"CPU work ~0.5 ms/item", Costly{1024, spin_iterations, std::chrono::microseconds(0)}},
      {"sleep 200 us/item", Costly{2048, 0, std::chrono::microseconds(200)}},
  };
  std::printf(
      "(b) costly get(), batches of %lld, prefetch_factor 2, %d repetitions (median); "
      "CPU work = %lld dependent multiply-adds per item, calibrated here\n",
      static_cast<long long>(kBatch), reps, static_cast<long long>(spin_iterations));
  std::printf("    %-22s %6s %8s %12s %12s %10s\n", "get() cost", "items", "workers", "epoch ms",
              "items/s", "speed-up");
  for (const Kind& kind : kinds) {
    double base = 0;
    for (int w : {0, 1, 2, 4}) {
      data::DataLoader loader(kind.dataset, {.batch_size = kBatch, .num_workers = w});
      std::vector<double> times;
      for (int r = 0; r < reps; ++r) times.push_back(loader_epoch(loader, sink));
      const double t = median(times);
      if (w == 0) base = t;
      std::printf("    %-22s %6lld %8d %12.1f %12.0f %9.2fx\n", kind.name,
                  static_cast<long long>(kind.dataset.n), w, t * 1e3,
                  static_cast<double>(kind.dataset.n) / t, base / t);
    }
  }
  std::printf("    speed-up = 0-worker epoch time / this epoch time\n");
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 31;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--reps") == 0) reps = std::max(1, std::atoi(argv[i + 1]));
  }
  auto env = [](const char* name) {
    const char* v = std::getenv(name);
    return std::string(v ? v : "unset");
  };
  std::printf(
      "data loader benchmark; OMP_NUM_THREADS=%s, at::get_num_threads()=%d, "
      "hardware threads=%u\n\n",
      env("OMP_NUM_THREADS").c_str(), at::get_num_threads(), std::thread::hardware_concurrency());
  const auto start = Clock::now();
  int64_t sink = 0;
  overhead(reps, sink);
  workers(3, sink);
  std::printf("\ntotal %.1f s (checksum %lld)\n", seconds_since(start),
              static_cast<long long>(sink));
  return 0;
}
