// Big-model loading and execution: empty init, set_module_tensor_to_device, loading with device
// maps (disk weights as views of the checkpoint), offload folders and dispatch hooks.

#include <accelerate/big_modeling.h>
#include <accelerate/checkpointing.h>
#include <accelerate/safetensors.h>

#include "../support/expect_error.h"
#include "../support/files.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <regex>

namespace fs = std::filesystem;
using accelerate::testing::error_of;
using accelerate::testing::file_bytes;
using accelerate::testing::proc_status_bytes;
using accelerate::testing::same;
using accelerate::testing::TempDir;

namespace {

::testing::AssertionResult has(const std::string& text, const std::string& part) {
  if (text.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "\"" << part << "\" is not in: " << text;
}

torch::nn::Sequential tiny_net() {
  return torch::nn::Sequential(torch::nn::Linear(8, 16), torch::nn::ReLU(),
                               torch::nn::Linear(16, 16), torch::nn::ReLU(),
                               torch::nn::Linear(16, 4));
}

// The weight of the Linear registered as child `index` of `seq` (a dispatched Sequential's
// operator[] gives the holder standing in its forward chain, not the Linear).
const at::Tensor& weight_of(const torch::nn::Sequential& seq, size_t index) {
  return seq->named_children()[index].value()->as<torch::nn::LinearImpl>()->weight;
}

// The reference model, saved, and its output on a fixed input.
struct Saved {
  torch::nn::Sequential model;
  at::Tensor input;
  at::Tensor output;
};

Saved save_tiny(const std::string& dir) {
  torch::manual_seed(3);
  Saved s{tiny_net(), at::randn({5, 8}), {}};
  accelerate::save_model(*s.model, dir);
  torch::NoGradGuard no_grad;
  s.output = s.model->forward(s.input);
  return s;
}

}  // namespace

// ---------------------------------------------------------------------- empty init

TEST(EmptyInit, TenGigabyteModelTakesNoMemory) {
  const int64_t before = proc_status_bytes("VmRSS");
  auto model = accelerate::init_empty_weights([] {
    torch::nn::Sequential seq;
    for (int i = 0; i < 10; ++i) seq->push_back(torch::nn::Linear(16384, 16384));
    return seq;
  });
  const int64_t growth = proc_status_bytes("VmRSS") - before;
  int64_t bytes = 0;
  for (const auto& p : model->parameters()) {
    EXPECT_TRUE(p.is_meta());
    bytes += p.numel() * static_cast<int64_t>(p.element_size());
  }
  EXPECT_GT(bytes, int64_t{10} << 30);
  EXPECT_LT(growth, int64_t{100} << 20) << "RSS grew by " << growth << " bytes";
  std::cout << "empty init: " << (bytes >> 20) << " MiB of parameters, RSS grew by "
            << (growth >> 10) << " KiB\n";
  // Members follow the parameter dict (one tensor object), and the thread computes normally.
  EXPECT_TRUE(model[0]->as<torch::nn::LinearImpl>()->weight.is_meta());
  EXPECT_EQ(at::ones({3}).sum().item<float>(), 3.0F);
  EXPECT_FALSE(at::empty({4}).is_meta());
  EXPECT_TRUE(accelerate::has_meta_tensors(*model));
}

TEST(EmptyInit, BuffersAreEmptyAndTheThreadRecoversFromAThrowingConstructor) {
  auto model = accelerate::init_empty_weights(
      [] { return torch::nn::Sequential(torch::nn::Linear(4, 4), torch::nn::BatchNorm1d(4)); });
  for (const auto& b : model->buffers()) EXPECT_TRUE(b.is_meta());
  EXPECT_TRUE(has(error_of([] {
                    accelerate::init_empty_weights([]() -> torch::nn::Sequential {
                      throw std::runtime_error("constructor failed");
                    });
                  }),
                  "constructor failed"));
  EXPECT_EQ(at::full({2}, 2.0).sum().item<float>(), 4.0F);
  torch::nn::Linear plain(2, 2);
  EXPECT_FALSE(plain->weight.is_meta());
  EXPECT_NE(plain->weight.abs().sum().item<float>(), 0.0F);  // initialised as usual
}

// ----------------------------------------------------------------------
// set_module_tensor_to_device

TEST(SetModuleTensor, MaterialisesConvertsAndRefusesBadInput) {
  auto model = accelerate::init_empty_weights([] { return tiny_net(); });
  const at::Tensor w = at::arange(128, at::kFloat).reshape({16, 8});
  accelerate::set_module_tensor_to_device(*model, "0.weight", at::kCPU, w);
  const auto& weight = model[0]->as<torch::nn::LinearImpl>()->weight;
  EXPECT_TRUE(same(weight.detach(), w));
  EXPECT_TRUE(weight.requires_grad());
  accelerate::set_module_tensor_to_device(*model, "0.bias", at::kCPU, at::ones({16}, at::kDouble));
  EXPECT_EQ(model[0]->as<torch::nn::LinearImpl>()->bias.scalar_type(), at::kFloat);
  accelerate::set_module_tensor_to_device(*model, "2.bias", at::kCPU, at::ones({16}), at::kHalf);
  EXPECT_EQ(model[2]->as<torch::nn::LinearImpl>()->bias.scalar_type(), at::kHalf);

  EXPECT_TRUE(
      has(error_of([&] { accelerate::set_module_tensor_to_device(*model, "2.weight", at::kCPU); }),
          "'2.weight' is on the meta device; a value is needed"));
  EXPECT_TRUE(has(
      error_of([&] {
        accelerate::set_module_tensor_to_device(*model, "2.weight", at::kCPU, at::zeros({16, 9}));
      }),
      "a tensor of shape [16, 9] cannot be set in '2.weight', which has shape "
      "[16, 16]"));
  EXPECT_TRUE(has(error_of([&] {
                    accelerate::set_module_tensor_to_device(*model, "9.weight", at::kCPU,
                                                            at::zeros({1}));
                  }),
                  "no parameter or buffer named '9.weight'"));

  // An existing tensor on the right device is written in place: its storage is kept.
  const void* storage = weight.data_ptr();
  accelerate::set_module_tensor_to_device(*model, "0.weight", at::kCPU, w * 2);
  EXPECT_EQ(weight.data_ptr(), storage);
  EXPECT_TRUE(same(weight.detach(), w * 2));
}

// ---------------------------------------------------------------------- loading

TEST(LoadWithDeviceMap, EmptyModelIsFilledAndRunsLikeTheOriginal) {
  TempDir dir;
  const Saved ref = save_tiny(dir.path().string());
  auto model = accelerate::init_empty_weights([] { return tiny_net(); });
  const auto report = accelerate::load_checkpoint_in_model(*model, dir.path().string());
  EXPECT_TRUE(report.missing_keys.empty());
  EXPECT_FALSE(accelerate::has_meta_tensors(*model));
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(same(model->forward(ref.input), ref.output));
}

TEST(LoadWithDeviceMap, DiskWeightsAreViewsOfTheCheckpointFile) {
  TempDir dir;
  const Saved ref = save_tiny(dir.path().string());
  const std::string file = dir.file("model.safetensors");
  const std::string bytes_before = file_bytes(file);
  auto model = accelerate::init_empty_weights([] { return tiny_net(); });
  accelerate::load_checkpoint_in_model(
      *model, dir.path().string(), {.device_map = {{"0", "cpu"}, {"2", "disk"}, {"4", "disk"}}});
  for (const auto& item : model->named_parameters()) {
    const bool on_disk = item.key()[0] != '0';
    EXPECT_EQ(accelerate::is_file_mapped(item.value()), on_disk) << item.key();
    if (on_disk) {
      EXPECT_EQ(accelerate::mapped_file(item.value()), file);
    }
  }
  {
    torch::NoGradGuard no_grad;
    EXPECT_TRUE(same(model->forward(ref.input), ref.output));
    // A write lands in private pages: the model sees it, the file does not change.
    model[2]->as<torch::nn::LinearImpl>()->weight.fill_(1.0);
    EXPECT_EQ(model[2]->as<torch::nn::LinearImpl>()->weight.sum().item<float>(), 256.0F);
  }
  EXPECT_EQ(file_bytes(file), bytes_before);
}

TEST(LoadWithDeviceMap, ConvertedDiskWeightsGoThroughTheOffloadFolder) {
  TempDir dir;
  const Saved ref = save_tiny(dir.path().string());
  auto model = accelerate::init_empty_weights([] { return tiny_net(); });
  accelerate::LoadCheckpointOptions options{
      .dtype = at::kHalf,
      .device_map = {{"0", "cpu"}, {"2", "disk"}, {"4", "cpu"}},
      .keep_in_fp32_modules = {"4"}};
  EXPECT_TRUE(has(
      error_of([&] { accelerate::load_checkpoint_in_model(*model, dir.path().string(), options); }),
      "' is mapped to \"disk\" but cannot be served from"));
  options.offload_folder = dir.file("offload");
  model = accelerate::init_empty_weights([] { return tiny_net(); });
  accelerate::load_checkpoint_in_model(*model, dir.path().string(), options);
  const auto index = accelerate::read_offload_index(dir.file("offload"));
  ASSERT_EQ(index.size(), 2U);
  for (const auto& [name, info] : index) {
    EXPECT_EQ(info.dtype, "float16") << name;
    EXPECT_TRUE(fs::exists(dir.path() / "offload" / (name + ".dat")));
  }
  const auto& w2 = model[2]->as<torch::nn::LinearImpl>()->weight;
  EXPECT_TRUE(accelerate::is_file_mapped(w2));
  EXPECT_EQ(accelerate::mapped_file(w2), dir.file("offload/2.weight.dat"));
  EXPECT_EQ(w2.scalar_type(), at::kHalf);
  EXPECT_EQ(model[0]->as<torch::nn::LinearImpl>()->weight.scalar_type(), at::kHalf);
  EXPECT_EQ(model[4]->as<torch::nn::LinearImpl>()->weight.scalar_type(), at::kFloat);
  torch::nn::Sequential reference = ref.model;
  EXPECT_TRUE(
      same(w2.detach(), reference[2]->as<torch::nn::LinearImpl>()->weight.detach().to(at::kHalf)));
}

TEST(LoadWithDeviceMap, OffloadStateDictAndBuffers) {
  TempDir dir;
  torch::manual_seed(5);
  torch::nn::Sequential ref(torch::nn::Linear(4, 4), torch::nn::BatchNorm1d(4));
  {
    torch::NoGradGuard no_grad;
    ref[1]->as<torch::nn::BatchNorm1dImpl>()->running_mean.copy_(at::arange(4, at::kFloat));
  }
  accelerate::save_model(*ref, dir.path().string());
  auto make = [] {
    return accelerate::init_empty_weights(
        [] { return torch::nn::Sequential(torch::nn::Linear(4, 4), torch::nn::BatchNorm1d(4)); });
  };
  auto staged = make();
  accelerate::load_checkpoint_in_model(*staged, dir.path().string(),
                                       {.device_map = {{"", "cpu"}}, .offload_state_dict = true});
  for (const auto& item : ref->named_parameters()) {
    EXPECT_TRUE(same(staged->named_parameters()[item.key()].detach(), item.value().detach()));
  }
  EXPECT_TRUE(
      same(staged[1]->as<torch::nn::BatchNorm1dImpl>()->running_mean, at::arange(4, at::kFloat)));

  auto kept = make();
  accelerate::load_checkpoint_in_model(*kept, dir.path().string(), {.device_map = {{"", "disk"}}});
  EXPECT_TRUE(accelerate::is_file_mapped(kept[0]->as<torch::nn::LinearImpl>()->weight));
  EXPECT_FALSE(accelerate::is_file_mapped(kept[1]->as<torch::nn::BatchNorm1dImpl>()->running_mean));
  auto offloaded = make();
  accelerate::load_checkpoint_in_model(*offloaded, dir.path().string(),
                                       {.device_map = {{"", "disk"}}, .offload_buffers = true});
  EXPECT_TRUE(
      accelerate::is_file_mapped(offloaded[1]->as<torch::nn::BatchNorm1dImpl>()->running_mean));
}

TEST(LoadWithDeviceMap, BadMapsAndCorruptFilesGiveClearErrors) {
  TempDir dir;
  save_tiny(dir.path().string());
  auto model = accelerate::init_empty_weights([] { return tiny_net(); });
  EXPECT_TRUE(has(error_of([&] {
                    accelerate::load_checkpoint_in_model(*model, dir.path().string(),
                                                         {.device_map = {{"0", "gpu7"}}});
                  }),
                  "gpu7"));
  // Another architecture: the mismatch is named as without a map.
  auto wider = accelerate::init_empty_weights([] {
    return torch::nn::Sequential(torch::nn::Linear(8, 32), torch::nn::ReLU(),
                                 torch::nn::Linear(32, 16), torch::nn::ReLU(),
                                 torch::nn::Linear(16, 4));
  });
  const std::string mismatch = error_of([&] {
    accelerate::load_checkpoint_in_model(*wider, dir.path().string(),
                                         {.device_map = {{"", "disk"}}});
  });
  EXPECT_TRUE(std::regex_search(mismatch, std::regex("'0\\.(weight|bias)' has shape \\[16")))
      << mismatch;
  EXPECT_TRUE(has(mismatch, "in the model"));
  // Truncated in its data: the header names more bytes than the file has.
  const std::string file = dir.file("model.safetensors");
  const std::string bytes = file_bytes(file);
  std::ofstream(file, std::ios::binary | std::ios::trunc).write(bytes.data(), bytes.size() - 100);
  EXPECT_TRUE(has(error_of([&] {
                    accelerate::load_checkpoint_in_model(*model, dir.path().string(),
                                                         {.device_map = {{"", "disk"}}});
                  }),
                  "model.safetensors"));
  EXPECT_TRUE(accelerate::has_meta_tensors(*model));
}

namespace {
// An output layer that reads the embedding's weight: LibTorch ties by registering one tensor
// under two names.
struct TiedHeadImpl : torch::nn::Module {
  explicit TiedHeadImpl(const at::Tensor& tied) { weight = register_parameter("weight", tied); }
  at::Tensor forward(const at::Tensor& x) { return at::matmul(x, weight); }
  at::Tensor weight;
};
TORCH_MODULE(TiedHead);

struct TiedNetImpl : torch::nn::Module {
  TiedNetImpl() {
    embed = register_module("embed", torch::nn::Linear(6, 4));
    head = register_module("head", TiedHead(embed->weight));
  }
  at::Tensor forward(const at::Tensor& x) { return head(embed(x)); }
  torch::nn::Linear embed{nullptr};
  TiedHead head{nullptr};
};
TORCH_MODULE(TiedNet);
}  // namespace

TEST(LoadWithDeviceMap, TiedWeightsStayOneTensorOnDisk) {
  TempDir dir;
  torch::manual_seed(11);
  TiedNet ref;
  accelerate::save_model(*ref, dir.path().string());
  auto model = accelerate::init_empty_weights([] { return TiedNet(); });
  EXPECT_EQ(model->head->weight.unsafeGetTensorImpl(), model->embed->weight.unsafeGetTensorImpl());
  const auto report = accelerate::load_checkpoint_in_model(*model, dir.path().string(),
                                                           {.device_map = {{"", "disk"}}});
  EXPECT_TRUE(report.missing_keys.empty());  // head.weight is filled through embed.weight
  EXPECT_EQ(model->head->weight.unsafeGetTensorImpl(), model->embed->weight.unsafeGetTensorImpl());
  EXPECT_TRUE(accelerate::is_file_mapped(model->head->weight));
  const at::Tensor x = at::randn({3, 6});
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(same(model->forward(x), ref->forward(x)));
}

TEST(RetieParameters, GivesEveryNameTheFirstMaterialisedTensor) {
  torch::nn::Sequential model(torch::nn::Linear(3, 3), torch::nn::Linear(3, 3));
  const auto& first = weight_of(model, 0);
  const auto& second = weight_of(model, 1);
  EXPECT_FALSE(at::equal(first, second));
  accelerate::retie_parameters(*model, {{"0.weight", "1.weight"}});
  EXPECT_EQ(first.data_ptr(), second.data_ptr());
  // A meta tensor first in its group is skipped: the group takes the first real one.
  auto empty = accelerate::init_empty_weights(
      [] { return torch::nn::Sequential(torch::nn::Linear(3, 3), torch::nn::Linear(3, 3)); });
  accelerate::set_module_tensor_to_device(*empty, "1.weight", at::kCPU, at::ones({3, 3}));
  accelerate::retie_parameters(*empty, {{"0.weight", "1.weight"}});
  EXPECT_TRUE(same(weight_of(empty, 0).detach(), at::ones({3, 3})));
  EXPECT_TRUE(has(error_of([&] {
                    accelerate::retie_parameters(*model, {{"0.weight", "x"}});
                  }),
                  "retie_parameters: no parameter 'x'"));
}

// ---------------------------------------------------------------------- offload folders

TEST(OffloadedWeights, LoadedBackIntoAnEmptyModel) {
  TempDir dir;
  const Saved ref = save_tiny(dir.file("ckpt"));
  std::vector<std::pair<std::string, at::Tensor>> state;
  for (const auto& item : ref.model->named_parameters())
    state.emplace_back(item.key(), item.value());
  accelerate::offload_state_dict(dir.file("offload"), state);
  auto model = accelerate::init_empty_weights([] { return tiny_net(); });
  accelerate::load_offloaded_weights(*model, accelerate::read_offload_index(dir.file("offload")),
                                     dir.file("offload"));
  EXPECT_FALSE(accelerate::has_meta_tensors(*model));
  EXPECT_FALSE(accelerate::is_file_mapped(model[0]->as<torch::nn::LinearImpl>()->weight));
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(same(model->forward(ref.input), ref.output));
}

// ---------------------------------------------------------------------- dispatch

TEST(Dispatch, DiskUnitsRunFromTheMappingAndHooksComeOff) {
  TempDir dir;
  const Saved ref = save_tiny(dir.path().string());
  auto model = accelerate::init_empty_weights([] { return tiny_net(); });
  const accelerate::DeviceMap map{{"0", "cpu"}, {"2", "disk"}, {"4", "disk"}};
  accelerate::load_checkpoint_in_model(*model, dir.path().string(), {.device_map = map});
  const auto info = accelerate::dispatch_model(model.ptr(), map);
  EXPECT_EQ(info.main_device, "cpu");
  EXPECT_EQ(info.units, (std::vector<std::string>{"0", "2", "4"}));
  EXPECT_TRUE(info.streamed_units.empty());  // executing on the CPU: nothing to copy
  EXPECT_TRUE(accelerate::is_dispatched(*model));
  // The Sequential's chain now enters units through holders; its children are unchanged.
  const torch::nn::Module* first = model->named_children()[0].value().get();
  EXPECT_NE(model->begin()->ptr().get(), first);
  {
    torch::NoGradGuard no_grad;
    EXPECT_TRUE(same(model->forward(ref.input), ref.output));
    EXPECT_TRUE(same(model->forward(ref.input), ref.output));
  }
  accelerate::remove_dispatch_hooks(*model);
  EXPECT_FALSE(accelerate::is_dispatched(*model));
  EXPECT_EQ(model->begin()->ptr().get(), first);
}

TEST(Dispatch, ADestroyedModelReleasesItsMappedFile) {
  TempDir dir;
  save_tiny(dir.path().string());
  const std::string file = dir.file("model.safetensors");
  auto mapped = [&] { return file_bytes("/proc/self/maps").find(file) != std::string::npos; };
  {
    auto model = accelerate::init_empty_weights([] { return tiny_net(); });
    const accelerate::DeviceMap map{{"0", "cpu"}, {"2", "disk"}, {"4", "disk"}};
    accelerate::load_checkpoint_in_model(*model, dir.path().string(), {.device_map = map});
    accelerate::dispatch_model(model.ptr(), map);
    torch::NoGradGuard no_grad;
    model->forward(at::ones({1, 8}));
    EXPECT_TRUE(mapped());
  }
  // The hooks outlive the model in their registry, but hold nothing of it.
  EXPECT_FALSE(mapped());
}

TEST(Dispatch, MapsFromAPythonOffloadFolderAndRefusesUnloadedWeights) {
  TempDir dir;
  const Saved ref = save_tiny(dir.file("ckpt"));
  auto model = accelerate::init_empty_weights([] { return tiny_net(); });
  const accelerate::DeviceMap map{{"0", "cpu"}, {"2", "disk"}, {"4", "disk"}};
  EXPECT_TRUE(has(error_of([&] { accelerate::dispatch_model(model.ptr(), map); }),
                  "never loaded (they are still on the meta device): 0.bias, 0.weight"));
  // Weights held in memory and mapped to "disk": written to the offload folder, then mapped.
  auto loaded = tiny_net();
  accelerate::load_checkpoint_in_model(*loaded, dir.file("ckpt"));
  EXPECT_TRUE(has(error_of([&] { accelerate::dispatch_model(loaded.ptr(), map); }),
                  "'2.bias' is mapped to \"disk\" but is held in memory"));
  accelerate::dispatch_model(loaded.ptr(), map, {.offload_dir = dir.file("folder")});
  EXPECT_TRUE(accelerate::is_file_mapped(weight_of(loaded, 4)));
  // A fresh empty model picks its disk weights up from that folder.
  accelerate::load_checkpoint_in_model(*model, dir.file("ckpt"), {.device_map = {{"", "cpu"}}});
  auto fresh = accelerate::init_empty_weights([] { return tiny_net(); });
  for (const auto& name : {"0.weight", "0.bias"}) {
    accelerate::set_module_tensor_to_device(*fresh, name, at::kCPU,
                                            model->named_parameters()[name].detach());
  }
  accelerate::dispatch_model(fresh.ptr(), map, {.offload_dir = dir.file("folder")});
  EXPECT_TRUE(accelerate::is_file_mapped(weight_of(fresh, 2)));
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(same(fresh->forward(ref.input), ref.output));
  EXPECT_TRUE(same(loaded->forward(ref.input), ref.output));
}

namespace {
struct StackImpl : torch::nn::Module {
  StackImpl() {
    for (int i = 0; i < 3; ++i) blocks->push_back(torch::nn::Linear(6, 6));
    register_module("blocks", blocks);
  }
  at::Tensor forward(at::Tensor x) {
    for (const auto& block : *blocks) x = accelerate::call<torch::nn::LinearImpl>(block, x);
    return x;
  }
  torch::nn::ModuleList blocks;
};
TORCH_MODULE(Stack);
}  // namespace

TEST(Dispatch, AutoMapOverBudgetGoesToDiskAndUnitsCalledThroughCall) {
  TempDir dir;
  torch::manual_seed(7);
  Stack ref;
  accelerate::save_model(*ref, dir.path().string());
  const at::Tensor x = at::randn({2, 6});
  at::Tensor expected;
  {
    torch::NoGradGuard no_grad;
    expected = ref->forward(x);
  }
  auto model = accelerate::init_empty_weights([] { return Stack(); });
  // Each block is 6*6*4 + 6*4 = 168 bytes; the CPU keeps room for the largest layer (168), so
  // a 400-byte budget holds one block (168 + 168 <= 400 < 168 + 336) and the rest go to disk.
  const auto report = accelerate::load_checkpoint_and_dispatch(
      model.ptr(), dir.path().string(),
      {.device_map = "auto", .max_memory = accelerate::MaxMemory{{"cpu", 400}}});
  EXPECT_TRUE(report.missing_keys.empty());
  EXPECT_FALSE(accelerate::is_file_mapped(model->blocks[0]->as<torch::nn::LinearImpl>()->weight));
  EXPECT_TRUE(accelerate::is_file_mapped(model->blocks[1]->as<torch::nn::LinearImpl>()->weight));
  EXPECT_TRUE(accelerate::is_file_mapped(model->blocks[2]->as<torch::nn::LinearImpl>()->weight));
  EXPECT_TRUE(accelerate::is_dispatched(*model));
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(same(model->forward(x), expected));
  EXPECT_TRUE(has(error_of([&] {
                    accelerate::load_checkpoint_and_dispatch(model.ptr(), dir.path().string(),
                                                             {.device_map = "fastest"});
                  }),
                  "device_map \"fastest\" is not a map nor one of"));
}

TEST(Dispatch, StreamsOffloadedWeightsToTheGpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "needs a CUDA device (none here)";
  TempDir dir;
  const Saved ref = save_tiny(dir.path().string());
  auto model = accelerate::init_empty_weights([] { return tiny_net(); });
  const accelerate::DeviceMap map{{"0", "cuda:0"}, {"2", "cpu"}, {"4", "disk"}};
  accelerate::load_checkpoint_in_model(*model, dir.path().string(), {.device_map = map});
  const auto info = accelerate::dispatch_model(model.ptr(), map);
  EXPECT_EQ(info.main_device, "cuda:0");
  EXPECT_EQ(info.streamed_units, (std::vector<std::string>{"2", "4"}));
  torch::NoGradGuard no_grad;
  const at::Tensor out = model->forward(ref.input.to(at::kCUDA));
  EXPECT_TRUE(at::allclose(out.cpu(), ref.output, 1e-5, 1e-6));
  EXPECT_TRUE(weight_of(model, 2).device().is_cpu());
  EXPECT_TRUE(accelerate::is_file_mapped(weight_of(model, 4)));
}
