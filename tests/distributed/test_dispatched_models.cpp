// A model dispatched across devices (big_modeling.h) and the Accelerator: verify_device_map
// says so, prepare leaves its placement alone, and a distributed run refuses to train it.

#include <accelerate/accelerator.h>
#include <accelerate/big_modeling.h>

#include <gtest/gtest.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <unistd.h>

#include "expect_error.h"
#include "thread_ranks.h"

#include <filesystem>
#include <string>

namespace fs = std::filesystem;
using accelerate::Accelerator;
using accelerate::PartialState;
using accelerate::testing::error_of;
using accelerate::testing::run_ranks;

namespace {

// A small model dispatched over "cpu" and "disk" (its disk weights written to `folder`).
torch::nn::Sequential dispatched(const fs::path& folder) {
  torch::nn::Sequential model(torch::nn::Linear(4, 4), torch::nn::ReLU(), torch::nn::Linear(4, 2));
  accelerate::dispatch_model(model.ptr(), {{"0", "cpu"}, {"2", "disk"}},
                             {.offload_dir = folder.string()});
  return model;
}

fs::path scratch(const std::string& name) {
  return fs::temp_directory_path() /
         ("accelerate_dispatched_" + name + "_" + std::to_string(::getpid()));
}

}  // namespace

TEST(DispatchedModels, VerifyDeviceMapAndOneProcessPrepare) {
  const fs::path dir = scratch("one");
  run_ranks(1, [&](PartialState& s) {
    Accelerator acc({.state = s.shared_from_this()});
    auto model = dispatched(dir);
    torch::nn::Sequential plain(torch::nn::Linear(2, 2));
    EXPECT_TRUE(acc.verify_device_map(*model));
    EXPECT_FALSE(acc.verify_device_map(*plain));
    auto prepared = acc.prepare(model);
    // Placement untouched: the disk weights are still views of the offload folder's files.
    const auto& weight = prepared->named_children()[2].value()->as<torch::nn::LinearImpl>()->weight;
    EXPECT_TRUE(accelerate::is_file_mapped(weight));
  });
  fs::remove_all(dir);
}

TEST(DispatchedModels, DistributedPrepareRefusesThem) {
  std::vector<std::string> errors(2);
  run_ranks(2, [&](PartialState& s) {
    const auto r = static_cast<size_t>(s.process_index());
    Accelerator acc({.state = s.shared_from_this()});
    auto model = dispatched(scratch("two_" + std::to_string(r)));
    errors[r] = error_of([&] { acc.prepare(model); });
  });
  for (size_t r = 0; r < 2; ++r) {
    EXPECT_NE(errors[r].find("a model dispatched across devices (dispatch_model / "
                             "load_checkpoint_and_dispatch) cannot be trained in a distributed "
                             "mode"),
              std::string::npos)
        << errors[r];
    fs::remove_all(scratch("two_" + std::to_string(r)));
  }
}
