// A model of ~2 GB runs forward with its weights served from the mapped checkpoint: anonymous
// memory stays small, and the output is the fully loaded model's, bit for bit.

#include <accelerate/big_modeling.h>
#include <accelerate/safetensors.h>

#include "../support/expect_error.h"
#include "../support/files.h"

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <iostream>

namespace fs = std::filesystem;
using accelerate::testing::proc_status_bytes;

namespace {

constexpr int kLayers = 128;
constexpr int64_t kWidth = 2048;

torch::nn::Sequential deep_net() {
  torch::nn::Sequential net;
  for (int i = 0; i < kLayers; ++i) {
    net->push_back(torch::nn::Linear(kWidth, kWidth));
    net->push_back(torch::nn::Tanh());
  }
  return net;
}

// Weights scaled so that 128 tanh layers keep a signal of order one (an all-zero output would
// make the comparison meaningless).
at::Tensor weight_value(size_t index, at::IntArrayRef shape) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 + index);
  const double scale = shape.size() == 2 ? 1.5 / std::sqrt(static_cast<double>(shape[1])) : 0.1;
  return at::randn(shape, gen) * scale;
}

}  // namespace

TEST(BigModelDisk, TwoGigabyteModelRunsFromTheFileWithLittleAnonymousMemory) {
  const accelerate::testing::TempDir dir;
  const std::string file = dir.file("model.safetensors");

  // The checkpoint, one tensor at a time: the whole model never exists in memory here.
  {
    auto spec = accelerate::init_empty_weights([] { return deep_net(); });
    std::vector<std::pair<std::string, at::Tensor>> specs;
    for (const auto& item : spec->named_parameters()) specs.emplace_back(item.key(), item.value());
    accelerate::safetensors::detail::save_file_streaming(
        specs, file, {{"format", "pt"}},
        [&](size_t i) { return weight_value(i, specs[i].second.sizes()); });
  }
  const int64_t file_size = static_cast<int64_t>(fs::file_size(file));
  ASSERT_GT(file_size, int64_t{2} << 30);

  torch::manual_seed(0);
  const at::Tensor x = at::randn({4, kWidth});
  at::Tensor from_disk;
  int64_t anon = 0;
  {
    auto model = accelerate::init_empty_weights([] { return deep_net(); });
    accelerate::load_checkpoint_in_model(*model, dir.path().string(),
                                         {.device_map = {{"", "disk"}}});
    accelerate::dispatch_model(model.ptr(), {{"", "disk"}});
    torch::NoGradGuard no_grad;
    from_disk = model->forward(x);
    anon = proc_status_bytes("RssAnon");
    std::cout << "disk map: RssAnon " << (anon >> 20) << " MiB, RssFile "
              << (proc_status_bytes("RssFile") >> 20) << " MiB, checkpoint " << (file_size >> 20)
              << " MiB\n";
  }
  EXPECT_LT(anon, int64_t{300} << 20);
  EXPECT_GT(from_disk.std().item<float>(), 0.1F);

  // The same model fully in memory.
  auto full = deep_net();
  accelerate::load_checkpoint_in_model(*full, dir.path().string());
  EXPECT_GT(proc_status_bytes("RssAnon"), int64_t{2} << 30);
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(accelerate::testing::same(full->forward(x), from_disk));
}
