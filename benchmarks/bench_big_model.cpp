// Load time of a ~4 GiB float32 checkpoint mapped from disk against read into memory (issue 16).
//
// The model is a torch::nn::Sequential of Linear(4096, 4096) layers with Tanh between them (64 MiB
// of weights per layer, the layer count chosen from --gib), built with init_empty_weights so that
// building it costs no memory. Its checkpoint is written once with save_file_streaming, one random
// tensor at a time, so writing it never holds more than one tensor.
//
//   mapped: init_empty_weights + load_checkpoint_in_model with the device map {"": "disk"} (every
//           weight a zero-copy view of the privately mapped file) + dispatch_model with the same
//           map. "Ready" is when dispatch_model returns.
//   read:   init_empty_weights + load_checkpoint_in_model without a map (every weight copied into
//           anonymous memory).
//
// Mapping reads nothing until the weights are used: its cost moves to the first forward, where
// each page is faulted in (and the next unit's pages prefetched with MADV_WILLNEED). A ratio of
// "ready" times alone would flatter it, so both are also timed up to the end of the first forward
// of a batch of 4 (and a second forward, the steady state), each variant in a run of its own.
//
// Every variant runs twice per repetition: "cold" after evicting the checkpoint from the page
// cache with posix_fadvise(POSIX_FADV_DONTNEED) on the fsync'd file (no root needed; residency is
// checked with mincore), then "warm" after evicting it and read()ing it back, untimed (how the
// cache was filled matters, see warm_up). Cold means the guest's page cache only: the hypervisor
// may still cache the disk. Each run builds and destroys its own model, so no run inherits
// another's memory; RssAnon/RssFile are read from /proc/self/status after the first forward to
// show where the weights live.
//
// ratio = read time / mapped time, so > 1 means mapping is faster. Variants are interleaved within
// each repetition, in an order rotated from one repetition to the next, so that machine noise hits
// them alike; medians are reported. Outputs of every forward are compared with the first one: a
// mapped model computing something else would make the timing meaningless.
//
// Run it directly: build/benchmarks/bench_big_model [--gib 4] [--reps 3] [--dir /tmp]
// (it needs --gib GiB free in --dir, and about 2 × --gib GiB of memory: the read variant's copy
// plus the file's pages, mapped while they are copied).

#include "page_cache.h"

#include <accelerate/big_modeling.h>
#include <accelerate/checkpointing.h>
#include <accelerate/safetensors.h>

#include <ATen/Parallel.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using bench::die;
using bench::evict;
using bench::residency;

using Clock = std::chrono::steady_clock;
constexpr int64_t kWidth = 4096;
constexpr int64_t kBatch = 4;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// ------------------------------------------------------------------------------ page cache

// A mapped run reads only the header, so the cold run before it leaves the cache empty: a warm run
// needs the file read in explicitly. Evicting first makes every warm run start from the same cache:
// pages a cold run faulted in through a mapping made the next mapped forward about twice as slow as
// pages read() brought in (kernel 6.18; read() fills the cache with larger folios).
void warm_up(const std::string& path) {
  evict(path);
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) die("open " + path);
  std::vector<char> buffer(size_t{16} << 20);
  for (;;) {
    const ssize_t n = ::read(fd, buffer.data(), buffer.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) die("read " + path);
    if (n == 0) break;
  }
  ::close(fd);
}

// ------------------------------------------------------------------------------ memory

struct Rss {
  double anon_mib = 0;
  double file_mib = 0;
};

Rss read_rss() {
  Rss rss;
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    const auto kib = [&] { return std::atof(line.c_str() + line.find(':') + 1) / 1024; };
    if (line.rfind("RssAnon:", 0) == 0) rss.anon_mib = kib();
    if (line.rfind("RssFile:", 0) == 0) rss.file_mib = kib();
  }
  return rss;
}

// ------------------------------------------------------------------------------ the model

torch::nn::Sequential make_model(int64_t layers) {
  torch::nn::Sequential seq;
  for (int64_t i = 0; i < layers; ++i) {
    seq->push_back(torch::nn::Linear(kWidth, kWidth));
    // Tanh keeps activations bounded through many random layers, so outputs stay comparable.
    if (i + 1 < layers) seq->push_back(torch::nn::Tanh());
  }
  return seq;
}

void write_checkpoint(int64_t layers, const std::string& path) {
  // Meta specs: the file's layout comes from the model without allocating its weights.
  auto model = accelerate::init_empty_weights([&] { return make_model(layers); });
  std::vector<std::pair<std::string, at::Tensor>> specs;
  for (const auto& item : model->named_parameters()) specs.emplace_back(item.key(), item.value());
  // PyTorch's own Linear bound, so the values look like an initialised model's.
  const double bound = 1 / std::sqrt(static_cast<double>(kWidth));
  accelerate::safetensors::detail::save_file_streaming(
      specs, path, {{"format", "pt"}}, [&](size_t i) {
        return at::empty(specs[i].second.sizes(), at::kFloat).uniform_(-bound, bound);
      });
}

// ------------------------------------------------------------------------------ the variants

struct Run {
  double ready = 0;
  double forward = 0;  // the first forward; 0 where the variant stops at "ready"
  double second = 0;   // a second forward on the now-loaded model
  Rss rss;             // after the first forward (or at "ready")
  Rss after;           // once the model is destroyed
  size_t mapped = 0;   // parameters that are views of the file
  at::Tensor output;
};

struct Variant {
  std::string name;
  bool mapped = false;
  bool forward = false;
  std::vector<Run> runs[2];  // [0] cold, [1] warm
};

Run run_variant(const Variant& v, int64_t layers, const std::string& path, const at::Tensor& x) {
  Run run;
  const accelerate::DeviceMap disk{{"", "disk"}};
  const auto start = Clock::now();
  {
    auto model = accelerate::init_empty_weights([&] { return make_model(layers); });
    if (v.mapped) {
      accelerate::load_checkpoint_in_model(*model, path, {.strict = true, .device_map = disk});
      accelerate::dispatch_model(model.ptr(), disk);
    } else {
      accelerate::load_checkpoint_in_model(*model, path, {.strict = true});
    }
    run.ready = seconds_since(start);
    for (const auto& p : model->parameters()) run.mapped += accelerate::is_file_mapped(p) ? 1 : 0;
    if (v.forward) {
      torch::NoGradGuard no_grad;
      auto t = Clock::now();
      run.output = model->forward(x);
      run.forward = seconds_since(t);
      run.rss = read_rss();
      t = Clock::now();
      (void)model->forward(x);
      run.second = seconds_since(t);
    } else {
      run.rss = read_rss();
    }
  }  // the model, its memory and its mapping go here, before the next run is timed
  run.after = read_rss();
  return run;
}

std::string ms(double s) {
  char text[32];
  std::snprintf(text, sizeof text, "%.0f ms", s * 1e3);
  return text;
}

std::string env(const char* name) {
  const char* value = std::getenv(name);
  return value ? value : "(unset)";
}

// Removes the checkpoint however the run ends: it is gigabytes in a shared /tmp.
struct Cleanup {
  std::string dir;
  ~Cleanup() {
    ::unlink((dir + "/model.safetensors").c_str());
    ::rmdir(dir.c_str());
  }
};

int benchmark(int argc, char** argv) {
  double gib = 4;
  int reps = 3;
  std::string base = "/tmp";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--gib") == 0) gib = std::max(0.0625, std::atof(argv[i + 1]));
    if (std::strcmp(argv[i], "--reps") == 0) reps = std::max(1, std::atoi(argv[i + 1]));
    if (std::strcmp(argv[i], "--dir") == 0) base = argv[i + 1];
  }
  const int64_t layer_bytes = kWidth * kWidth * 4;
  const auto layers = std::max<int64_t>(1, std::llround(gib * (1 << 30) / layer_bytes));
  std::string templ = base + "/bench_big_model.XXXXXX";
  if (::mkdtemp(templ.data()) == nullptr) die("mkdtemp " + templ);
  const std::string dir = templ;
  const Cleanup cleanup{dir};
  const std::string path = dir + "/model.safetensors";
  const auto total_start = Clock::now();

  std::printf(
      "big model loading benchmark; OMP_NUM_THREADS=%s, at::get_num_threads()=%d, hardware "
      "threads=%u\n"
      "model: Sequential of %lld Linear(%lld, %lld) float32 layers with Tanh between, batch %lld; "
      "%d repetitions; checkpoint in %s\n",
      env("OMP_NUM_THREADS").c_str(), at::get_num_threads(), std::thread::hardware_concurrency(),
      static_cast<long long>(layers), static_cast<long long>(kWidth),
      static_cast<long long>(kWidth), static_cast<long long>(kBatch), reps, dir.c_str());

  at::manual_seed(0);
  auto t = Clock::now();
  write_checkpoint(layers, path);
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0) die("stat " + path);
  const auto bytes = static_cast<double>(info.st_size);
  std::printf("checkpoint: %.1f MiB written in %.1f s\n", bytes / (1 << 20), seconds_since(t));
  const at::Tensor x = at::randn({kBatch, kWidth});

  std::vector<Variant> variants = {{"mapped: ready", true, false},
                                   {"read: ready", false, false},
                                   {"mapped: ready + 1st forward", true, true},
                                   {"read: ready + 1st forward", false, true}};

  const Rss idle = read_rss();
  std::printf("before the runs: RssAnon %.0f MiB, RssFile %.0f MiB\n\n", idle.anon_mib,
              idle.file_mib);
  std::optional<at::Tensor> reference;
  double worst_residency = 0;
  double worst_diff = 0;
  const size_t params = static_cast<size_t>(2 * layers);
  for (int rep = 0; rep < reps; ++rep) {
    for (size_t k = 0; k < variants.size(); ++k) {
      Variant& v = variants[(k + static_cast<size_t>(rep)) % variants.size()];
      for (const bool warm : {false, true}) {
        if (warm) {
          warm_up(path);
        } else {
          evict(path);
        }
        const double resident = residency(path);
        if (!warm) worst_residency = std::max(worst_residency, resident);
        Run run = run_variant(v, layers, path, x);
        if (run.mapped != (v.mapped ? params : 0)) {
          std::fprintf(stderr, "%s: %zu of %zu parameters mapped\n", v.name.c_str(), run.mapped,
                       params);
          return 1;
        }
        if (v.forward) {
          if (!reference) reference = run.output;
          const double diff = (run.output - *reference).abs().max().item<double>();
          worst_diff = std::max(worst_diff, diff);
          if (!at::allclose(run.output, *reference, 1e-5, 1e-6)) {
            std::fprintf(stderr, "%s: output differs from the first run by %g\n", v.name.c_str(),
                         diff);
            return 1;
          }
        }
        std::printf(
            "rep %d %-28s %s (cache %5.1f%%): ready %6.0f ms, 1st forward %6.0f ms, 2nd %5.0f ms, "
            "RssAnon/RssFile %5.0f/%5.0f MiB (%.0f/%.0f after)\n",
            rep + 1, v.name.c_str(), warm ? "warm" : "cold", resident * 100, run.ready * 1e3,
            run.forward * 1e3, run.second * 1e3, run.rss.anon_mib, run.rss.file_mib,
            run.after.anon_mib, run.after.file_mib);
        std::fflush(stdout);
        run.output = at::Tensor();
        v.runs[warm].push_back(std::move(run));
      }
    }
  }

  auto med = [&](const Variant& v, bool warm, auto field) {
    std::vector<double> values;
    for (const auto& r : v.runs[warm]) values.push_back(field(r));
    return median(values);
  };
  auto total = [](const Run& r) { return r.ready + r.forward; };
  auto ready = [](const Run& r) { return r.ready; };
  auto forward = [](const Run& r) { return r.forward; };
  auto second = [](const Run& r) { return r.second; };
  auto anon = [](const Run& r) { return r.rss.anon_mib; };
  auto file = [](const Run& r) { return r.rss.file_mib; };

  std::printf(
      "\npage cache before cold runs: at most %.1f%% of the checkpoint resident after "
      "POSIX_FADV_DONTNEED%s\nforward outputs: largest difference from the first run %g\n\n",
      worst_residency * 100, worst_residency < 0.01 ? "" : " (eviction failed: cold is not cold)",
      worst_diff);
  std::printf("medians of %d repetitions, %.1f MiB checkpoint\n", reps, bytes / (1 << 20));
  // Forward variants also show their split: "ready" and "1st fwd" are medians of their own, so
  // they need not add up to the total exactly.
  std::printf("  %-28s %9s %9s %9s | %9s %9s %9s | %9s %12s %12s\n", "variant", "cold", "ready",
              "1st fwd", "warm", "ready", "1st fwd", "2nd fwd", "RssAnon", "RssFile");
  for (const auto& v : variants) {
    auto part = [&](bool warm, auto field) { return v.forward ? ms(med(v, warm, field)) : ""; };
    std::printf("  %-28s %9s %9s %9s | %9s %9s %9s | %9s %8.0f MiB %8.0f MiB\n", v.name.c_str(),
                ms(med(v, false, total)).c_str(), part(false, ready).c_str(),
                part(false, forward).c_str(), ms(med(v, true, total)).c_str(),
                part(true, ready).c_str(), part(true, forward).c_str(), part(true, second).c_str(),
                med(v, true, anon), med(v, true, file));
  }
  for (size_t m = 0; m < variants.size(); m += 2) {
    const Variant& mapped = variants[m];
    const Variant& read = variants[m + 1];
    std::printf("  ratio read / mapped, %-20s cold %.2f, warm %.2f\n",
                mapped.forward ? "ready + 1st forward:" : "ready:",
                med(read, false, total) / med(mapped, false, total),
                med(read, true, total) / med(mapped, true, total));
  }
  std::printf("  read throughput (read: ready): cold %.2f GB/s, warm %.2f GB/s\n",
              bytes / med(variants[1], false, total) / 1e9,
              bytes / med(variants[1], true, total) / 1e9);

  std::printf("\ntotal time %.0f s\n", seconds_since(total_start));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // Caught here so that the checkpoint's Cleanup runs on errors too.
  try {
    return benchmark(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_big_model: %s\n", e.what());
    return 1;
  }
}
