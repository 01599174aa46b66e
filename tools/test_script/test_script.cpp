// accelerate-test-script: what `accelerate test` launches (Python Accelerate's
// test_utils/scripts/test_script.py). Every process runs the same checks, in order:
//
//   process_state  ranks, world size and the launch environment agree on every process
//   collectives    gather, reduce (sum, mean), broadcast, gather_object, broadcast_object_list
//                  and pad_across_processes give exactly the expected values
//   data_loader    a prepared loader hands out every sample exactly once (gather_for_metrics)
//   training       data-parallel linear regression with AdamW: the loss falls and every process
//                  ends with bit-identical parameters
//   checkpoint     save_state, perturb, load_state: parameters and optimizer state come back
//
// The main process prints each check; a process whose check fails prints
// "CHECK FAILED [<check>] on process <i>: <reason>" on stderr (`accelerate test` looks for
// that) and exits 1 at once, so the launcher stops the others instead of leaving them waiting in
// a collective. Exit status 0 means every check passed on this process, and the launcher's 0
// means on every process.
//
// ACCELERATE_TEST_SCRIPT_FAIL=<check> makes that check fail on the last process, so that tests
// can watch `accelerate test` report a failure.

#include <accelerate/accelerator.h>

#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adamw.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <functional>
#include <iostream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace {

namespace fs = std::filesystem;

constexpr const char* kFailVariable = "ACCELERATE_TEST_SCRIPT_FAIL";
// A check that fails on one process must not leave the others waiting for Accelerate's 30
// minutes; a minute is far more than any collective here takes.
constexpr auto kCollectiveTimeout = std::chrono::seconds(60);

constexpr int64_t kBatchSize = 4;
constexpr int64_t kTrainRows = 64;
constexpr int64_t kTrainBatchSize = 8;
constexpr int kTrainSteps = 30;
constexpr double kLearningRate = 0.1;
// After 30 steps the loss must be below this fraction of where it started, and below the
// absolute bound. The untrained model's MSE is ~4; 30 steps reach ~0.02 with 1 to 4 processes,
// so the bounds leave a tenfold margin while still catching a run that did not learn.
constexpr double kMaxLossRatio = 0.1;
constexpr double kMaxFinalLoss = 0.2;

std::string message_of(const std::exception& e) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) {
    return c10_error->what_without_backtrace();
  }
  return e.what();
}

class CheckFailure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

void expect(bool ok, const std::string& what) {
  if (!ok) throw CheckFailure(what);
}

std::string show(const at::Tensor& t) {
  std::ostringstream out;
  const at::Tensor flat = t.detach().to(at::kDouble).flatten().contiguous();
  out << "[";
  for (int64_t i = 0; i < flat.numel(); ++i) out << (i ? ", " : "") << flat[i].item<double>();
  out << "]";
  return out.str();
}

void expect_equal(const at::Tensor& got, const at::Tensor& want, const std::string& what) {
  expect(got.sizes() == want.sizes() && at::equal(got.to(want.dtype()), want),
         what + ": got " + show(got) + ", expected " + show(want));
}

// ------------------------------------------------------------------ datasets

struct Indices {
  int64_t length = 0;
  int64_t size() const { return length; }
  at::Tensor get(size_t i) const { return at::scalar_tensor(static_cast<int64_t>(i), at::kLong); }
};

// y = 1.5 x0 - 2 x1 + 0.5 x2 + 0.3, with features spread over [-1, 1]: a deterministic dataset
// every process builds identically.
struct Regression {
  int64_t size() const { return kTrainRows; }
  torch::data::Example<> get(size_t i) const {
    const double v = static_cast<double>(i);
    const double x0 = std::sin(v);
    const double x1 = std::cos(2 * v);
    const double x2 = static_cast<double>(i % 7) / 3.0 - 1.0;
    return {at::tensor({x0, x1, x2}, at::kFloat),
            at::tensor({1.5 * x0 - 2.0 * x1 + 0.5 * x2 + 0.3}, at::kFloat)};
  }
  std::pair<at::Tensor, at::Tensor> all() const {
    std::vector<at::Tensor> xs;
    std::vector<at::Tensor> ys;
    for (int64_t i = 0; i < kTrainRows; ++i) {
      auto e = get(static_cast<size_t>(i));
      xs.push_back(e.data);
      ys.push_back(e.target);
    }
    return {at::stack(xs), at::stack(ys)};
  }
};

// remove_all stops at the first error, and another process may be deleting the same files
// (a failing process cleans up too), so a vanished entry is retried rather than reported.
bool remove_directory(const std::string& path) {
  for (int attempt = 0; attempt < 10; ++attempt) {
    std::error_code ec;
    fs::remove_all(path, ec);
    if (!fs::exists(path, ec)) return true;
  }
  return false;
}

at::Tensor flat_parameters(const torch::nn::Module& module) {
  std::vector<at::Tensor> parts;
  for (const auto& p : module.parameters()) parts.push_back(p.detach().flatten());
  return at::cat(parts);
}

// ------------------------------------------------------------------ the script

class TestScript {
 public:
  TestScript() {
    const char* fail = std::getenv(kFailVariable);
    injected_failure_ = fail ? fail : "";
  }

  int main() {
    // The Accelerator joins the process group, so creating it is part of the first check.
    check("process_state", "process state: ranks, world size and the launch environment",
          [&] { process_state(); });
    check("collectives",
          "collectives: gather, reduce, broadcast, gather_object, broadcast_object_list, "
          "pad_across_processes",
          [&] { collectives(); });
    check("data_loader", "data loader: every sample exactly once through gather_for_metrics",
          [&] { data_loader(); });
    check("training", "training: data-parallel linear regression with AdamW", [&] { training(); });
    check("checkpoint", "checkpoint: save_state, perturb, load_state", [&] { checkpoint(); });
    acc_->print("All ", checks_, " checks passed on ", acc_->num_processes(), " process",
                acc_->num_processes() == 1 ? "" : "es", ".");
    return 0;
  }

 private:
  void check(const std::string& name, const std::string& description,
             const std::function<void()>& body) {
    ++checks_;
    if (is_main())
      std::cout << "[" << checks_ << "] Checking " << description << " ..." << std::endl;
    std::string failure;
    try {
      body();
      const bool last = !acc_ || acc_->is_last_process();
      if (injected_failure_ == name && last) {
        failure = std::string("failure requested by ") + kFailVariable + "=" + name;
      }
    } catch (const std::exception& e) {
      failure = message_of(e);
    }
    if (!failure.empty()) fail(name, failure);
    try {
      acc_->wait_for_everyone();
    } catch (const std::exception& e) {
      // Usually another process failed this check and the launcher is stopping everyone.
      fail(name, "passed here, but waiting for the other processes failed: " + message_of(e));
    }
    checkpoint_dir_.clear();
    acc_->print("    ok");
  }

  // Before the Accelerator exists (or when creating it failed), the launcher's RANK says.
  int rank() const {
    if (acc_) return acc_->process_index();
    const char* r = std::getenv("RANK");
    return r ? std::atoi(r) : 0;
  }
  bool is_main() const { return rank() == 0; }

  [[noreturn]] void fail(const std::string& name, const std::string& reason) {
    std::ostringstream line;
    line << "accelerate-test-script: CHECK FAILED [" << name << "] on process " << rank() << ": "
         << reason << "\n";
    std::cerr << line.str() << std::flush;
    std::cout << std::flush;
    // Whichever process fails removes the checkpoint: the launcher may stop process 0 before
    // it gets to.
    if (!checkpoint_dir_.empty()) remove_directory(checkpoint_dir_);
    // Not a normal return: the state's destructor would wait in a final barrier for processes
    // that will never reach it.
    std::_Exit(1);
  }

  void process_state() {
    acc_ = std::make_unique<accelerate::Accelerator>(accelerate::AcceleratorOptions{
        .gradient_accumulation_steps = 1,
        .init_kwargs = accelerate::InitProcessGroupKwargs{.timeout = kCollectiveTimeout}});
    const int n = acc_->num_processes();
    const int rank = acc_->process_index();
    acc_->print(indent(acc_->state().describe()));
    expect(n >= 1, "num_processes is " + std::to_string(n));
    expect(rank >= 0 && rank < n,
           "process_index " + std::to_string(rank) + " is outside [0, " + std::to_string(n) + ")");
    if (const char* ws = std::getenv("WORLD_SIZE")) {
      expect(std::to_string(n) == ws,
             "num_processes is " + std::to_string(n) + " but the launcher set WORLD_SIZE=" + ws);
    }
    if (const char* r = std::getenv("RANK")) {
      expect(std::to_string(rank) == r,
             "process_index is " + std::to_string(rank) + " but the launcher set RANK=" + r);
    }
    expect(acc_->is_main_process() == (rank == 0), "is_main_process disagrees with the rank");
    expect(acc_->is_last_process() == (rank == n - 1), "is_last_process disagrees with the rank");
    expect(acc_->use_distributed() == (n > 1), "use_distributed disagrees with num_processes");
    expect((acc_->distributed_type() == accelerate::DistributedType::NO) == (n == 1),
           "distributed_type is " + accelerate::to_string(acc_->distributed_type()) + " with " +
               std::to_string(n) + " process(es)");
    const auto everyone = accelerate::gather_object(
        acc_->state(), std::make_tuple(rank, n, acc_->local_process_index()));
    expect(static_cast<int>(everyone.size()) == n,
           "gather_object returned " + std::to_string(everyone.size()) + " entries for " +
               std::to_string(n) + " processes");
    for (int i = 0; i < n; ++i) {
      const auto& [their_rank, their_n, their_local] = everyone[static_cast<size_t>(i)];
      expect(their_rank == i, "entry " + std::to_string(i) + " of the gathered ranks is " +
                                  std::to_string(their_rank));
      expect(their_n == n, "process " + std::to_string(i) + " sees " + std::to_string(their_n) +
                               " processes, this one " + std::to_string(n));
      expect(their_local >= 0,
             "process " + std::to_string(i) + " has local index " + std::to_string(their_local));
    }
  }

  void collectives() {
    const auto& state = acc_->state();
    const int64_t n = acc_->num_processes();
    const int64_t r = acc_->process_index();

    expect_equal(acc_->gather(at::tensor({2 * r, 2 * r + 1}, at::kFloat)),
                 at::arange(2 * n, at::kFloat), "gather of [2r, 2r+1]");
    expect_equal(acc_->reduce(at::full({3}, r + 1, at::kLong), accelerate::Reduction::kSum),
                 at::full({3}, n * (n + 1) / 2, at::kLong), "reduce(sum) of r+1");
    expect_equal(acc_->reduce(at::full({2}, static_cast<double>(r + 1), at::kFloat),
                              accelerate::Reduction::kMean),
                 at::full({2}, static_cast<double>(n + 1) / 2, at::kFloat), "reduce(mean) of r+1");
    expect_equal(accelerate::broadcast(state, at::full({2, 2}, r == 0 ? 7.0 : -1.0, at::kFloat)),
                 at::full({2, 2}, 7.0, at::kFloat), "broadcast from process 0");

    const auto names = accelerate::gather_object(state, "process " + std::to_string(r));
    for (int64_t i = 0; i < n; ++i) {
      const std::string want = "process " + std::to_string(i);
      expect(static_cast<int64_t>(names.size()) == n && names[static_cast<size_t>(i)] == want,
             "gather_object: entry " + std::to_string(i) + " is not '" + want + "'");
    }
    std::vector<std::string> words;
    if (r == 0) words = {"accelerate", "cpp"};
    accelerate::broadcast_object_list(state, words);
    expect(words == std::vector<std::string>{"accelerate", "cpp"},
           "broadcast_object_list did not deliver process 0's list");

    // Process r has r+1 copies of r+1; padded to n with -1, gathered: row i is i+1 copies of
    // i+1 then -1s (or -1s first with pad_first).
    const at::Tensor mine = at::full({r + 1}, r + 1, at::kLong);
    for (const bool first : {false, true}) {
      const auto padded = acc_->pad_across_processes(
          mine, accelerate::PadOptions{.dim = 0, .pad_index = -1, .pad_first = first});
      at::Tensor want = at::full({n, n}, -1, at::kLong);
      for (int64_t i = 0; i < n; ++i) {
        if (first) {
          want[i].slice(0, n - i - 1, n).fill_(i + 1);
        } else {
          want[i].slice(0, 0, i + 1).fill_(i + 1);
        }
      }
      expect_equal(acc_->gather(padded.unsqueeze(0)), want,
                   std::string("pad_across_processes(pad_index=-1, pad_first=") +
                       (first ? "true" : "false") + ") then gather");
    }
  }

  void data_loader() {
    const int64_t n = acc_->num_processes();
    // Two full rounds of batches and a short last one: the processes' last batches are evened
    // out with repeated samples that gather_for_metrics must drop.
    const int64_t length = 2 * kBatchSize * n + 3;
    accelerate::data::DataLoader loader(Indices{length}, {.batch_size = kBatchSize});
    auto prepared = acc_->prepare(loader);
    std::vector<at::Tensor> seen;
    for (at::Tensor& batch : prepared) seen.push_back(acc_->gather_for_metrics(batch).flatten());
    expect(!seen.empty(), "the prepared loader yielded no batch");
    expect_equal(at::cat(seen), at::arange(length, at::kLong),
                 "samples gathered over the prepared loader (length " + std::to_string(length) +
                     ", batch size " + std::to_string(kBatchSize) + ")");
  }

  void training() {
    torch::manual_seed(42);
    model_ = torch::nn::Linear(3, 1);
    optimizer_ = std::make_shared<torch::optim::AdamW>(
        model_->parameters(), torch::optim::AdamWOptions(kLearningRate).weight_decay(0.0));
    accelerate::data::DataLoader loader(Regression{}, {.batch_size = kTrainBatchSize});
    [[maybe_unused]] auto [net, optimizer, batches] = acc_->prepare(model_, optimizer_, loader);
    optimizer_wrapper_ = std::make_unique<accelerate::AcceleratedOptimizer>(optimizer);

    const double initial = full_loss();
    int steps = 0;
    while (steps < kTrainSteps) {
      for (auto& batch : batches) {
        train_step(batch.data, batch.target);
        if (++steps == kTrainSteps) break;
      }
    }
    const double final_loss = full_loss();
    acc_->print("    loss ", initial, " -> ", final_loss, " after ", kTrainSteps, " steps");
    expect(std::isfinite(final_loss) && final_loss < kMaxLossRatio * initial &&
               final_loss < kMaxFinalLoss,
           "the loss went from " + std::to_string(initial) + " to " + std::to_string(final_loss) +
               " in " + std::to_string(kTrainSteps) + " steps; expected below " +
               std::to_string(kMaxLossRatio) + " x the start and below " +
               std::to_string(kMaxFinalLoss));
    expect_same_everywhere(flat_parameters(*model_), "parameters after training");
  }

  void checkpoint() {
    std::vector<std::string> dir;
    if (acc_->is_main_process()) {
      std::string templ = (fs::temp_directory_path() / "accelerate_test_script_XXXXXX").string();
      expect(::mkdtemp(templ.data()) != nullptr, "cannot create a directory under /tmp");
      dir.push_back(templ);
    }
    accelerate::broadcast_object_list(acc_->state(), dir);
    expect(dir.size() == 1, "process 0 did not send the checkpoint directory");
    checkpoint_dir_ = dir.front();
    const std::string state_dir = checkpoint_dir_ + "/state";

    const auto [x, y] = Regression{}.all();
    const at::Tensor x0 = x.slice(0, 0, kTrainBatchSize);
    const at::Tensor y0 = y.slice(0, 0, kTrainBatchSize);
    const at::Tensor saved = flat_parameters(*model_).clone();
    acc_->save_state(state_dir);
    // The step right after the save, taken again after the load, must land on the same bits:
    // that needs Adam's moments and step count back, not only the weights.
    train_step(x0, y0);
    const at::Tensor after_step = flat_parameters(*model_).clone();
    {
      torch::NoGradGuard no_grad;
      for (auto& p : model_->parameters()) p.add_(1.0);
    }
    acc_->load_state(state_dir);
    expect_equal(flat_parameters(*model_), saved, "parameters after load_state");
    train_step(x0, y0);
    expect(at::equal(flat_parameters(*model_), after_step),
           "a step after load_state gave " + show(flat_parameters(*model_)) +
               ", the same step after save_state gave " + show(after_step) +
               ": the optimizer state was not restored");
    acc_->wait_for_everyone();
    if (acc_->is_main_process()) {
      expect(remove_directory(checkpoint_dir_), "cannot remove " + checkpoint_dir_);
    }
  }

  void train_step(const at::Tensor& x, const at::Tensor& y) {
    auto loss = torch::nn::functional::mse_loss(model_->forward(x), y);
    acc_->backward(loss);
    optimizer_wrapper_->step();
    optimizer_wrapper_->zero_grad();
  }

  double full_loss() {
    torch::NoGradGuard no_grad;
    const auto [x, y] = Regression{}.all();
    return torch::nn::functional::mse_loss(model_->forward(x), y).item<double>();
  }

  void expect_same_everywhere(const at::Tensor& local, const std::string& what) {
    const int64_t n = acc_->num_processes();
    const at::Tensor all = acc_->gather(local.unsqueeze(0)).reshape({n, -1});
    for (int64_t i = 1; i < n; ++i) {
      expect(at::equal(all[i], all[0]), what + " differ: process 0 has " + show(all[0]) +
                                            ", process " + std::to_string(i) + " has " +
                                            show(all[i]));
    }
  }

  static std::string indent(const std::string& text) {
    std::istringstream in(text);
    std::string out;
    for (std::string line; std::getline(in, line);) {
      out += (out.empty() ? "    " : "\n    ") + line;
    }
    return out;
  }

  std::string injected_failure_;
  int checks_ = 0;
  std::unique_ptr<accelerate::Accelerator> acc_;
  torch::nn::Linear model_{nullptr};
  std::shared_ptr<torch::optim::AdamW> optimizer_;
  std::unique_ptr<accelerate::AcceleratedOptimizer> optimizer_wrapper_;
  std::string checkpoint_dir_;
};

}  // namespace

int main() {
  try {
    return TestScript().main();
  } catch (const std::exception& e) {
    std::cerr << "accelerate-test-script: CHECK FAILED [internal] : " << message_of(e) << std::endl;
    std::_Exit(1);
  }
}
