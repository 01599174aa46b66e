// Ways to build a reduce-scatter on Gloo, whose LibTorch 1.13 ProcessGroupGloo has none (it
// throws), for the ZeRO engine's gradient buckets:
//   alltoall   alltoall_base of the bucket (part j to process j), then a local sum of the N parts
//              received: what src/ddp.cpp uses;
//   allreduce  all-reduce of the whole bucket, keeping this process's part (twice the bytes);
//   reduce     N reduce calls, one to each process as root, each of one part.
// All three are timed on the same process group, interleaved, 1 MiB ... 64 MiB of float32.
//
//   build/bin/accelerate launch -n 2 build/benchmarks/bench_reduce_scatter [--reps 7]

#include <accelerate/state.h>

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 7;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string(argv[i]) == "--reps") reps = std::atoi(argv[i + 1]);
  }
  auto& state = accelerate::PartialState::shared();
  auto* pg = state.process_group();
  if (pg == nullptr) {
    std::printf("bench_reduce_scatter: needs several processes (accelerate launch -n 2 ...)\n");
    return 0;
  }
  const int64_t world = state.num_processes();
  const int64_t rank = state.process_index();
  state.print("bench_reduce_scatter: ", world, " processes, Gloo, float32, median of ", reps,
              " interleaved repetitions (ms per call)");
  state.print("      size   alltoall  allreduce     reduce   best");
  for (int64_t mib : {1, 4, 16, 64}) {
    const int64_t numel = mib * 1024 * 1024 / 4;
    const int64_t part = (numel + world - 1) / world;
    at::Tensor bucket = at::randn({part * world});
    at::Tensor expected;
    std::vector<double> times[3];
    for (int r = 0; r < reps + 1; ++r) {
      for (int way = 0; way < 3; ++way) {
        state.wait_for_everyone();
        const auto start = Clock::now();
        at::Tensor mine;
        if (way == 0) {
          at::Tensor out = at::empty_like(bucket);
          std::vector<int64_t> splits_out, splits_in;
          pg->alltoall_base(out, bucket, splits_out, splits_in)->wait();
          mine = out.view({world, part}).sum(0);
        } else if (way == 1) {
          at::Tensor copy = bucket.clone();
          std::vector<at::Tensor> t{copy};
          pg->allreduce(t)->wait();
          mine = copy.narrow(0, rank * part, part);
        } else {
          for (int64_t root = 0; root < world; ++root) {
            std::vector<at::Tensor> t{bucket.narrow(0, root * part, part).clone()};
            c10d::ReduceOptions options;
            options.rootRank = root;
            pg->reduce(t, options)->wait();
            if (root == rank) mine = t[0];
          }
        }
        const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
        if (r > 0) times[way].push_back(ms);  // the first round warms up
        // The three agree (up to summation order).
        if (way == 0) expected = mine;
        if (way > 0 && !at::allclose(mine, expected, 1e-5, 1e-5)) {
          std::fprintf(stderr, "bench_reduce_scatter: way %d disagrees\n", way);
          return 1;
        }
      }
    }
    const double a = median(times[0]), b = median(times[1]), c = median(times[2]);
    const char* best = a <= b && a <= c ? "alltoall" : (b <= c ? "allreduce" : "reduce");
    char line[160];
    std::snprintf(line, sizeof line, "%6lld MiB %10.2f %10.2f %10.2f   %s",
                  static_cast<long long>(mib), a, b, c, best);
    state.print(line);
  }
  return 0;
}
