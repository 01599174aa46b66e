// Started as N processes by `accelerate launch -n N`: an evaluation loop over a prepared data
// loader whose dataset (length 23, batches of 4) does not divide between the processes.
// Each batch's "predictions" (value * 2) are gathered with gather_for_metrics, which must drop
// the samples repeated to even out the last batches.
//   data_worker              -> sequential sampler: the gathered predictions must be exactly
//                               0, 2, ..., 44 in order;
//   data_worker --shuffle    -> shuffled: sorted, they must be exactly 0, 2, ..., 44;
//   data_worker --dispatch   -> dispatch_batches: process 0 reads every batch and sends slices.
// Every process checks the gathered values (gather_for_metrics gives them to all). Process 0
// prints "data_worker: OK <count>" iff every check passed on every process; each failed check is
// printed to stderr and the exit status is 1.

#include <accelerate/data.h>
#include <accelerate/operations.h>
#include <accelerate/state.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

constexpr int64_t kLength = 23;
constexpr int64_t kBatchSize = 4;

struct Numbers {
  int64_t size() const { return kLength; }
  at::Tensor get(size_t i) const { return at::scalar_tensor(static_cast<int64_t>(i), at::kLong); }
};

std::string message_of(const std::exception& e) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) {
    return c10_error->what_without_backtrace();
  }
  return e.what();
}

std::string join(const std::vector<int64_t>& v) {
  std::ostringstream out;
  for (size_t i = 0; i < v.size(); ++i) out << (i ? "," : "") << v[i];
  return out.str();
}

}  // namespace

int main(int argc, char** argv) {
  bool shuffle = false;
  bool dispatch = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--shuffle") == 0) {
      shuffle = true;
    } else if (std::strcmp(argv[i], "--dispatch") == 0) {
      dispatch = true;
    } else {
      std::cerr << "data_worker: unknown argument " << argv[i] << "\n";
      return 2;
    }
  }
  // A failing check must not leave the other processes waiting for 30 minutes.
  auto& state =
      accelerate::PartialState::shared({.init_kwargs = {.timeout = std::chrono::seconds(60)}});
  const int rank = state.process_index();
  std::vector<std::string> failures;
  auto expect = [&](bool ok, const std::string& what) {
    if (!ok) failures.push_back(what);
  };

  try {
    accelerate::data::DataLoader loader(Numbers{}, {.batch_size = kBatchSize, .shuffle = shuffle});
    auto prepared = accelerate::data::prepare_data_loader(loader, {.dispatch_batches = dispatch});
    auto& gradient_state = accelerate::data::GradientState::shared();

    std::vector<int64_t> predictions;
    int64_t batches = 0;
    bool end_seen_early = false;
    for (at::Tensor& batch : prepared) {
      if (end_seen_early) expect(false, "a batch after end_of_dataloader");
      ++batches;
      at::Tensor preds = batch * 2;
      at::Tensor all = accelerate::data::gather_for_metrics(preds);
      const at::Tensor flat = all.contiguous().to(at::kLong).flatten();
      predictions.insert(predictions.end(), flat.data_ptr<int64_t>(),
                         flat.data_ptr<int64_t>() + flat.numel());
      end_seen_early = gradient_state.end_of_dataloader();
    }
    expect(end_seen_early, "end_of_dataloader was not set on the last batch");
    expect(batches == prepared.size(), "loader.size() is " + std::to_string(prepared.size()) +
                                           " but " + std::to_string(batches) +
                                           " batches were yielded");
    expect(!gradient_state.in_dataloader(), "the loader is still registered after the loop");

    std::vector<int64_t> want;
    for (int64_t i = 0; i < kLength; ++i) want.push_back(2 * i);
    std::vector<int64_t> got = predictions;
    if (shuffle) std::sort(got.begin(), got.end());
    expect(got == want, "gathered predictions " + join(predictions) + ", expected " +
                            (shuffle ? std::string("(sorted) ") : std::string()) + join(want));

    // Every process must have passed before process 0 says OK.
    const auto ok = accelerate::gather(
        state, at::full({1}, failures.empty() ? int64_t{1} : int64_t{0}, at::kLong));
    const bool all_ok = ok.min().item<int64_t>() == 1;
    for (const auto& f : failures) {
      std::cerr << ("data_worker rank " + std::to_string(rank) + ": FAILED " + f + "\n")
                << std::flush;
    }
    if (!all_ok) return 1;
    if (state.is_main_process()) {
      std::cout << ("data_worker: OK " + std::to_string(predictions.size()) + "\n") << std::flush;
    }
  } catch (const std::exception& e) {
    std::cerr << "data_worker rank " << rank << ": FAILED with an error: " << message_of(e)
              << std::endl;
    return 1;
  }
  return 0;
}
