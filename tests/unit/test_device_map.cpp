// Device maps for big models (device_map.h). Every expected value below is worked out by hand
// from the rules (sizes: 4 bytes per float32 element, 8 per int64; the allocation rules of
// Accelerate's infer_auto_device_map); the derivations are in the comments. Cases marked
// "Accelerate's test" carry over an expected map of tests/test_modeling_utils.py, re-derived here.

#include <accelerate/device_map.h>

#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/linear.h>

#include "expect_error.h"

#include <cstdint>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

using accelerate::ByteSize;
using accelerate::check_device_map;
using accelerate::clean_device_map;
using accelerate::compute_module_sizes;
using accelerate::device_for;
using accelerate::DeviceBudgets;
using accelerate::DeviceMap;
using accelerate::find_tied_parameters;
using accelerate::get_balanced_memory;
using accelerate::get_max_layer_size;
using accelerate::get_max_memory;
using accelerate::infer_auto_device_map;
using accelerate::InferDeviceMapOptions;
using accelerate::MaxMemory;
using accelerate::normalize_device_name;
using ModulePtr = std::shared_ptr<torch::nn::Module>;
using Sizes = std::map<std::string, int64_t>;
using Groups = std::vector<std::vector<std::string>>;

namespace {

// Accelerate's ModelForTest with LibTorch's own modules: linear1 = (4x3 + 4) floats = 64 bytes,
// batchnorm = weight, bias, running_mean, running_var (4 floats each) + num_batches_tracked (one
// int64) = 72, linear2 = (5x4 + 5) floats = 100; 236 in all.
struct ModelForTestImpl : torch::nn::Module {
  ModelForTestImpl() {
    linear1 = register_module("linear1", torch::nn::Linear(3, 4));
    batchnorm = register_module("batchnorm", torch::nn::BatchNorm1d(4));
    linear2 = register_module("linear2", torch::nn::Linear(4, 5));
  }
  torch::nn::Linear linear1{nullptr};
  torch::nn::BatchNorm1d batchnorm{nullptr};
  torch::nn::Linear linear2{nullptr};
};

// A module of type `type` (Module::name()), to build models the way Python code assigns
// attributes: tensors can be handed in, which is how LibTorch ties weights.
ModulePtr node(const std::string& type) {
  return std::make_shared<torch::nn::Module>(type);
}

// Python's nn.Linear(in, out): weight (out x in), bias (out), float32; either may be given.
ModulePtr linear(int64_t in, int64_t out, at::Tensor weight = {}, at::Tensor bias = {}) {
  auto m = node("Linear");
  m->register_parameter("weight", weight.defined() ? weight : at::zeros({out, in}));
  m->register_parameter("bias", bias.defined() ? bias : at::zeros({out}));
  return m;
}

// ModelForTest built from nodes, so that its Linear weights can be tied.
ModulePtr model_for_test(at::Tensor linear1_weight = {}, at::Tensor linear2_weight = {}) {
  auto m = node("ModelForTest");
  m->register_module("linear1", linear(3, 4, linear1_weight));
  m->register_module("batchnorm", torch::nn::BatchNorm1d(4).ptr());
  m->register_module("linear2", linear(4, 5, linear2_weight));
  return m;
}

at::Tensor param(const ModulePtr& m, const std::string& name) {
  return m->named_parameters()[name];
}

DeviceMap infer(const torch::nn::Module& model, const MaxMemory& budgets,
                InferDeviceMapOptions options = {}) {
  options.max_memory = budgets;
  return infer_auto_device_map(model, options);
}

}  // namespace

// ---------------------------------------------------------------------- sizes, names

TEST(DeviceMapByteSize, ReadsNumbersAndSizeStrings) {
  EXPECT_EQ(ByteSize(1000).bytes, 1000);
  EXPECT_EQ(ByteSize(int64_t{5'000'000'000}).bytes, 5'000'000'000);
  EXPECT_EQ(ByteSize(0).bytes, 0);
  EXPECT_EQ(ByteSize("10GB").bytes, 10'000'000'000);  // 10 x 1000^3
  EXPECT_EQ(ByteSize("512MiB").bytes, 536'870'912);   // 512 x 1024^2
  EXPECT_EQ(ByteSize(std::string("1KiB")).bytes, 1024);
  EXPECT_EQ(ByteSize("1.5KB").bytes, 1500);
  EXPECT_ERROR_CONTAINS(ByteSize(-1), "ByteSize: a byte count cannot be negative, got -1");
  EXPECT_ERROR_CONTAINS(ByteSize("ten"), "\"ten\"");
  EXPECT_ERROR_CONTAINS(ByteSize("10XB"), "unknown unit \"XB\"");
}

TEST(DeviceMapNames, NormalizesDeviceNames) {
  EXPECT_EQ(normalize_device_name("0"), "cuda:0");
  EXPECT_EQ(normalize_device_name("3"), "cuda:3");
  EXPECT_EQ(normalize_device_name("cuda"), "cuda:0");
  EXPECT_EQ(normalize_device_name("cuda:1"), "cuda:1");
  EXPECT_EQ(normalize_device_name("cpu"), "cpu");
  EXPECT_EQ(normalize_device_name("disk"), "disk");
  for (const std::string bad : {"gpu", "-1", "cuda:x", "cuda:", "mps", "", "CPU"}) {
    EXPECT_ERROR_CONTAINS(normalize_device_name(bad),
                          "normalize_device_name: unknown device \"" + bad + "\"; use \"cuda:N\"");
  }
}

TEST(DeviceMapNames, MatchesModuleTypes) {
  using accelerate::detail::module_type_matches;
  EXPECT_TRUE(module_type_matches("torch::nn::LinearImpl", "Linear"));
  EXPECT_TRUE(module_type_matches("torch::nn::LinearImpl", "LinearImpl"));
  EXPECT_TRUE(module_type_matches("torch::nn::LinearImpl", "torch::nn::Linear"));
  EXPECT_TRUE(module_type_matches("ns::BlockImpl", "Block"));
  EXPECT_TRUE(module_type_matches("Block", "BlockImpl"));
  EXPECT_TRUE(module_type_matches("(anonymous namespace)::ModelForTestImpl", "ModelForTest"));
  EXPECT_FALSE(module_type_matches("ns::BlockImpl", "other::Block"));
  EXPECT_FALSE(module_type_matches("ns::BlockImpl", "Bloc"));
  EXPECT_FALSE(module_type_matches("ns::Blocks", "Block"));
  EXPECT_FALSE(module_type_matches("Impl", ""));
  // What LibTorch itself reports.
  EXPECT_TRUE(module_type_matches(torch::nn::Linear(1, 1)->name(), "Linear"));
  EXPECT_TRUE(module_type_matches(ModelForTestImpl().name(), "ModelForTest"));
}

TEST(DeviceMapSizes, CountsEveryPrefixOfModelForTest) {
  ModelForTestImpl model;
  const Sizes fp32{{"", 236},
                   {"linear1", 64},
                   {"linear1.weight", 48},
                   {"linear1.bias", 16},
                   {"batchnorm", 72},
                   {"batchnorm.weight", 16},
                   {"batchnorm.bias", 16},
                   {"batchnorm.running_mean", 16},
                   {"batchnorm.running_var", 16},
                   {"batchnorm.num_batches_tracked", 8},
                   {"linear2", 100},
                   {"linear2.weight", 80},
                   {"linear2.bias", 20}};
  EXPECT_EQ(compute_module_sizes(model), fp32);
  // float16: every float tensor halves, the int64 counter keeps its 8 bytes (Accelerate's test:
  // 236 / 2 + 4 = 122).
  const Sizes fp16{{"", 122},
                   {"linear1", 32},
                   {"linear1.weight", 24},
                   {"linear1.bias", 8},
                   {"batchnorm", 40},
                   {"batchnorm.weight", 8},
                   {"batchnorm.bias", 8},
                   {"batchnorm.running_mean", 8},
                   {"batchnorm.running_var", 8},
                   {"batchnorm.num_batches_tracked", 8},
                   {"linear2", 50},
                   {"linear2.weight", 40},
                   {"linear2.bias", 10}};
  EXPECT_EQ(compute_module_sizes(model, {.dtype = at::kHalf}), fp16);
  // A wider dtype never grows a tensor.
  EXPECT_EQ(compute_module_sizes(model, {.dtype = at::kDouble}), fp32);
  // special_dtypes override dtype: linear2.weight as float64 = 20 x 8 = 160, linear2 = 170, all
  // = 32 + 40 + 170 = 242.
  const auto special = compute_module_sizes(
      model, {.dtype = at::kHalf, .special_dtypes = {{"linear2.weight", at::kDouble}}});
  EXPECT_EQ(special.at("linear2.weight"), 160);
  EXPECT_EQ(special.at("linear2"), 170);
  EXPECT_EQ(special.at(""), 242);
  // ... and apply to integer tensors too: the counter as int32 = 4 bytes, batchnorm 68.
  const auto counter = compute_module_sizes(
      model, {.special_dtypes = {{"batchnorm.num_batches_tracked", at::kInt}}});
  EXPECT_EQ(counter.at("batchnorm"), 68);
  EXPECT_EQ(counter.at(""), 232);
}

TEST(DeviceMapSizes, BoolsAreEighthsOfBytesTiedTensorsCountOnceEmptyModulesAreAbsent) {
  auto model = node("Model");
  model->register_buffer("mask", at::zeros({20}, at::kBool));  // ceil(20 / 8) = 3
  model->register_buffer("flags", at::zeros({8}, at::kBool));  // 1
  auto embed = node("Embedding");
  const at::Tensor shared = embed->register_parameter("weight", at::zeros({10, 4}));  // 160
  model->register_module("embed", embed);
  model->register_module("relu", node("ReLU"));           // no tensors: no entry
  model->register_module("head", linear(4, 10, shared));  // weight tied: bias 40 only
  model->register_module("meta", linear(1000, 1000, at::empty({1000, 1000}, at::kMeta),
                                        at::empty({1000}, at::kMeta)));  // 4,000,000 + 4,000
  const Sizes want{
      {"", 4'004'204},   {"embed", 160},      {"embed.weight", 160},      {"head", 40},
      {"head.bias", 40}, {"meta", 4'004'000}, {"meta.weight", 4'000'000}, {"meta.bias", 4'000},
      {"mask", 3},       {"flags", 1}};
  EXPECT_EQ(compute_module_sizes(*model), want);
  // float16 leaves the bools alone; a float tensor counted as bool is 1/8 byte per element.
  EXPECT_EQ(compute_module_sizes(*model, {.dtype = at::kHalf}).at("mask"), 3);
  EXPECT_EQ(compute_module_sizes(*model, {.special_dtypes = {{"head.bias", at::kBool}}}).at("head"),
            2);
}

TEST(DeviceMapTies, FindsGroupsOfTiedParameters) {
  ModelForTestImpl plain;
  EXPECT_EQ(find_tied_parameters(plain), Groups{});

  // Accelerate's test: linear2.weight = linear1.weight, then linear4.weight too.
  auto seq = node("Sequential");
  const at::Tensor w1 = at::zeros({4, 4});
  seq->register_module("linear1", linear(4, 4, w1));
  seq->register_module("linear2", linear(4, 4, w1));
  seq->register_module("linear3", linear(4, 4));
  seq->register_module("linear4", linear(4, 4, w1));
  EXPECT_EQ(find_tied_parameters(*seq),
            (Groups{{"linear1.weight", "linear2.weight", "linear4.weight"}}));

  // Two groups: linear1 = linear4, linear2 = linear3 = linear5; groups and names sorted.
  auto five = node("Sequential");
  const at::Tensor a = at::zeros({4, 4});
  const at::Tensor b = at::zeros({4, 4});
  for (const auto& [name, w] : std::vector<std::pair<std::string, at::Tensor>>{
           {"linear1", a}, {"linear2", b}, {"linear3", b}, {"linear4", a}, {"linear5", b}}) {
    five->register_module(name, linear(4, 4, w));
  }
  EXPECT_EQ(find_tied_parameters(*five),
            (Groups{{"linear1.weight", "linear4.weight"},
                    {"linear2.weight", "linear3.weight", "linear5.weight"}}));

  // One module under two names ties each of its parameters.
  auto twice = node("Sequential");
  torch::nn::Linear layer(10, 10);
  twice->register_module("0", layer);
  twice->register_module("1", layer);
  EXPECT_EQ(find_tied_parameters(*twice), (Groups{{"0.bias", "1.bias"}, {"0.weight", "1.weight"}}));
}

TEST(DeviceMapLayers, MaxLayerSizeListsEveryLayerOfTheLargestSize) {
  ModelForTestImpl model;
  const auto sizes = compute_module_sizes(model);
  std::vector<std::pair<std::string, ModulePtr>> top;
  for (const auto& c : model.named_children()) top.emplace_back(c.key(), c.value());
  EXPECT_EQ(get_max_layer_size(top, sizes, {}),
            (std::pair<int64_t, std::vector<std::string>>{100, {"linear2"}}));

  // Two layers of 80 bytes (4x4 + 4 floats) tie for the largest; the ReLU between counts 0.
  auto same = node("Sequential");
  same->register_module("0", linear(4, 4));
  same->register_module("1", node("ReLU"));
  same->register_module("2", linear(4, 4));
  std::vector<std::pair<std::string, ModulePtr>> items;
  for (const auto& c : same->named_children()) items.emplace_back(c.key(), c.value());
  EXPECT_EQ(get_max_layer_size(items, compute_module_sizes(*same), {}),
            (std::pair<int64_t, std::vector<std::string>>{80, {"0", "2"}}));

  // Nested blocks: without no-split classes the layers are the leaves (largest: linear2, 100),
  // with them each block (236) is one layer.
  auto nested = node("Sequential");
  nested->register_module("a", std::make_shared<ModelForTestImpl>());
  nested->register_module("b", std::make_shared<ModelForTestImpl>());
  std::vector<std::pair<std::string, ModulePtr>> blocks;
  for (const auto& c : nested->named_children()) blocks.emplace_back(c.key(), c.value());
  const auto nested_sizes = compute_module_sizes(*nested);
  EXPECT_EQ(get_max_layer_size(blocks, nested_sizes, {}),
            (std::pair<int64_t, std::vector<std::string>>{100, {"a.linear2", "b.linear2"}}));
  EXPECT_EQ(get_max_layer_size(blocks, nested_sizes, {"ModelForTest"}),
            (std::pair<int64_t, std::vector<std::string>>{236, {"a", "b"}}));
}

// ---------------------------------------------------------------------- budgets

TEST(DeviceMapBudgets, ParsesNormalisesAndOrdersBudgets) {
  ::testing::internal::CaptureStderr();
  const DeviceBudgets budgets = get_max_memory(
      MaxMemory{{"cpu", "1GB"}, {"10", 7}, {"disk", 5}, {"2", 100}, {"cuda", "1KiB"}});
  const std::string warnings = ::testing::internal::GetCapturedStderr();
  // GPUs by index (2 before 10, unlike string order), then cpu, then disk.
  EXPECT_EQ(
      budgets,
      (DeviceBudgets{
          {"cuda:0", 1024}, {"cuda:2", 100}, {"cuda:10", 7}, {"cpu", 1'000'000'000}, {"disk", 5}}));
  if (torch::cuda::device_count() <= 10) {
    EXPECT_NE(warnings.find("Device cuda:10 is not available, available devices are ["),
              std::string::npos)
        << warnings;
  }

  EXPECT_ERROR_CONTAINS(get_max_memory(MaxMemory{{"0", 1}, {"cuda:0", 2}}),
                        "get_max_memory: \"0\" and \"cuda:0\" both give the budget of cuda:0");
  EXPECT_ERROR_CONTAINS(get_max_memory(MaxMemory{{"gpu", 1}}),
                        "get_max_memory: unknown device \"gpu\"");

  // Unset: what is free; without CUDA just the available RAM.
  const DeviceBudgets free = get_max_memory();
  ASSERT_FALSE(free.empty());
  EXPECT_EQ(free.back().first, "cpu");
  EXPECT_GT(free.back().second, 0);
  if (!torch::cuda::is_available()) {
    EXPECT_EQ(free.size(), 1u);
  }
}

TEST(DeviceMapBudgets, BalancedMemoryOnTwoGpus) {
  // ModelForTest, 236 bytes. Lowest modules: linear1 64, batchnorm 72, linear2 100, mean
  // 236 / 3 = 78, margin int(1.25 x 78) = 97. Two GPUs: 236 / 2 + 97 = 215 for all but the last.
  // (Accelerate's test_get_balanced_memory.)
  ModelForTestImpl model;
  auto balanced = [&](MaxMemory budgets, bool low_zero = false) {
    return get_balanced_memory(model, {.max_memory = budgets, .low_zero = low_zero});
  };
  ::testing::internal::CaptureStderr();  // "Device cuda:N is not available" without GPUs
  EXPECT_EQ(balanced({{"0", 200}, {"1", 200}}), (DeviceBudgets{{"cuda:0", 200}, {"cuda:1", 200}}));
  EXPECT_EQ(balanced({{"0", 200}, {"2", 200}}), (DeviceBudgets{{"cuda:0", 200}, {"cuda:2", 200}}));
  EXPECT_EQ(balanced({{"0", 300}, {"1", 300}}), (DeviceBudgets{{"cuda:0", 215}, {"cuda:1", 300}}));
  EXPECT_EQ(balanced({{"0", 300}, {"1", 500}}), (DeviceBudgets{{"cuda:0", 215}, {"cuda:1", 500}}));
  // One GPU with a given budget: nothing to balance.
  EXPECT_EQ(balanced({{"0", 300}, {"cpu", 1000}}), (DeviceBudgets{{"cuda:0", 300}, {"cpu", 1000}}));
  // A GPU with a zero budget is not counted.
  EXPECT_EQ(balanced({{"0", 0}, {"1", 300}, {"2", 300}}),
            (DeviceBudgets{{"cuda:0", 0}, {"cuda:1", 215}, {"cuda:2", 300}}));
  EXPECT_EQ(balanced({{"0", 0}, {"cpu", 100}}), (DeviceBudgets{{"cuda:0", 0}, {"cpu", 100}}));
  EXPECT_EQ(balanced({{"cpu", 100}}), (DeviceBudgets{{"cpu", 100}}));
  // low_zero on two GPUs: the share is 236 / 1 + 97 = 333, the last keeps 300, and GPU 0 keeps
  // max(0, 236 - 300) = 0.
  EXPECT_EQ(balanced({{"0", 300}, {"1", 300}}, true),
            (DeviceBudgets{{"cuda:0", 0}, {"cuda:1", 300}}));
  // low_zero needs two GPUs.
  EXPECT_EQ(balanced({{"0", 300}, {"cpu", 1000}}, true),
            (DeviceBudgets{{"cuda:0", 300}, {"cpu", 1000}}));
  ::testing::internal::GetCapturedStderr();
}

TEST(DeviceMapBudgets, BalancedMemoryOnThreeGpusWithLowZero) {
  ModelForTestImpl model;
  ::testing::internal::CaptureStderr();
  // 236 / 3 + 97 = 175 for GPUs 0 and 1.
  EXPECT_EQ(
      get_balanced_memory(model, {.max_memory = MaxMemory{{"0", 300}, {"1", 300}, {"2", 300}}}),
      (DeviceBudgets{{"cuda:0", 175}, {"cuda:1", 175}, {"cuda:2", 300}}));
  // low_zero: the share is 236 / 2 + 97 = 215 (GPU 1); the others hold 215 + 300 >= 236, so GPU 0
  // keeps max(0, 236 - 515) = 0.
  EXPECT_EQ(get_balanced_memory(model, {.max_memory = MaxMemory{{"0", 300}, {"1", 300}, {"2", 300}},
                                        .low_zero = true}),
            (DeviceBudgets{{"cuda:0", 0}, {"cuda:1", 215}, {"cuda:2", 300}}));
  // When the others hold only 100 + 100, GPU 0 keeps the remaining 236 - 200 = 36.
  EXPECT_EQ(get_balanced_memory(model, {.max_memory = MaxMemory{{"0", 300}, {"1", 100}, {"2", 100}},
                                        .low_zero = true}),
            (DeviceBudgets{{"cuda:0", 36}, {"cuda:1", 100}, {"cuda:2", 100}}));
  // float16: 122 bytes; lowest modules 32, 40, 50, mean 40, margin 50; 122 / 2 + 50 = 111.
  EXPECT_EQ(get_balanced_memory(
                model, {.max_memory = MaxMemory{{"0", 300}, {"1", 300}}, .dtype = at::kHalf}),
            (DeviceBudgets{{"cuda:0", 111}, {"cuda:1", 300}}));
  ::testing::internal::GetCapturedStderr();
}

TEST(DeviceMapBudgets, BalancedMemoryMarginIsTheLargestNoSplitBlock) {
  // Three ModelForTest blocks, 708 bytes. Lowest modules: the nine Linear / BatchNorm, mean
  // 708 / 9 = 78, margin 97: 708 / 3 + 97 = 333. As no-split blocks (236 each) the margin is
  // int(1.25 x 236) = 295: 236 + 295 = 531.
  auto model = node("Sequential");
  for (const char* name : {"0", "1", "2"}) {
    model->register_module(name, std::make_shared<ModelForTestImpl>());
  }
  const MaxMemory budgets{{"0", 1000}, {"1", 1000}, {"2", 1000}};
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(get_balanced_memory(*model, {.max_memory = budgets}),
            (DeviceBudgets{{"cuda:0", 333}, {"cuda:1", 333}, {"cuda:2", 1000}}));
  EXPECT_EQ(get_balanced_memory(
                *model, {.max_memory = budgets, .no_split_module_classes = {"ModelForTest"}}),
            (DeviceBudgets{{"cuda:0", 531}, {"cuda:1", 531}, {"cuda:2", 1000}}));
  ::testing::internal::GetCapturedStderr();
}

// ---------------------------------------------------------------------- infer_auto_device_map

TEST(InferAutoDeviceMap, KeepsRoomForTheLargestLayerOnTheFirstGpu) {
  ModelForTestImpl model;
  ::testing::internal::CaptureStderr();
  // Accelerate's test. Largest layer linear2 (100). GPU 0 offers 200 - 100 = 100: linear1 (64)
  // fits, batchnorm (64 + 72 = 136) does not; GPU 1 is not a main device, so batchnorm (72) and
  // linear2 (72 + 100 = 172 <= 200) go there.
  EXPECT_EQ(infer(model, {{"0", 200}, {"1", 200}}),
            (DeviceMap{{"linear1", "cuda:0"}, {"batchnorm", "cuda:1"}, {"linear2", "cuda:1"}}));
  // 172 on GPU 1 is exactly enough.
  EXPECT_EQ(infer(model, {{"0", 200}, {"1", 172}, {"2", 200}}),
            (DeviceMap{{"linear1", "cuda:0"}, {"batchnorm", "cuda:1"}, {"linear2", "cuda:1"}}));
  // 235 bytes would hold linear1 + batchnorm (136), but not with 100 kept for linear2: the CPU
  // takes the rest.
  EXPECT_EQ(infer(model, {{"0", 235}, {"cpu", 1000}}),
            (DeviceMap{{"linear1", "cuda:0"}, {"batchnorm", "cpu"}, {"linear2", "cpu"}}));
  ::testing::internal::GetCapturedStderr();
}

TEST(InferAutoDeviceMap, EverythingFitsOnOneDevice) {
  ModelForTestImpl model;
  ::testing::internal::CaptureStderr();
  // 64 <= 900, 136 <= 900; for the last layer nothing is kept back: 236 <= 1000.
  EXPECT_EQ(infer(model, {{"0", 1000}}), (DeviceMap{{"", "cuda:0"}}));
  EXPECT_EQ(infer(model, {{"0", 1000}}, {.clean_result = false}),
            (DeviceMap{{"linear1", "cuda:0"}, {"batchnorm", "cuda:0"}, {"linear2", "cuda:0"}}));
  ::testing::internal::GetCapturedStderr();
  // Only the CPU: 236 <= 336 - 0 at the end.
  EXPECT_EQ(infer(model, {{"cpu", 336}}), (DeviceMap{{"", "cpu"}}));
  if (!torch::cuda::is_available()) {
    // Unset budgets on a machine without CUDA: all the available RAM.
    EXPECT_EQ(infer_auto_device_map(model), (DeviceMap{{"", "cpu"}}));
  }
}

TEST(InferAutoDeviceMap, OffloadsToDiskWhenTheCpuIsFull) {
  ModelForTestImpl model;
  // The CPU is the main device without GPUs: 235 - 100 = 135 holds linear1 (64) but not
  // batchnorm (136); the disk has no limit.
  EXPECT_EQ(infer(model, {{"cpu", 235}}),
            (DeviceMap{{"linear1", "cpu"}, {"batchnorm", "disk"}, {"linear2", "disk"}}));
  EXPECT_EQ(infer(model, {{"cpu", 0}}), (DeviceMap{{"", "disk"}}));
}

TEST(InferAutoDeviceMap, SplitsModulesThatDoNotFitAndHonoursNoSplitClasses) {
  // Accelerate's test: three ModelForTest (236 each), largest layer 100 (each linear2).
  auto model = node("Sequential");
  for (const char* name : {"0", "1", "2"}) {
    model->register_module(name, std::make_shared<ModelForTestImpl>());
  }
  ::testing::internal::CaptureStderr();
  // "0": 236 <= 500 - 100. "1": 472 > 400, split: 1.linear1 (300), 1.batchnorm (372) fit,
  // 1.linear2 (472) does not: GPU 1. "2": 100 + 236 <= 500.
  EXPECT_EQ(infer(*model, {{"0", 500}, {"1", 500}}), (DeviceMap{{"0", "cuda:0"},
                                                                {"1.linear1", "cuda:0"},
                                                                {"1.batchnorm", "cuda:0"},
                                                                {"1.linear2", "cuda:1"},
                                                                {"2", "cuda:1"}}));
  // As no-split blocks the largest layer is a block (236): "0" fits in 500 - 236, "1" cannot be
  // split and goes to GPU 1, as does "2" (472 <= 500).
  EXPECT_EQ(infer(*model, {{"0", 500}, {"1", 500}}, {.no_split_module_classes = {"ModelForTest"}}),
            (DeviceMap{{"0", "cuda:0"}, {"1", "cuda:1"}, {"2", "cuda:1"}}));
  ::testing::internal::GetCapturedStderr();
}

TEST(InferAutoDeviceMap, TiedEmbeddingAndHeadStayTogether) {
  // embed 10x4 = 160 bytes; body Linear(8, 8) = 288; head Linear(4, 10) whose weight is embed's
  // (counted under embed), so head = its bias, 40.
  auto build = [](bool tie) {
    auto model = node("LM");
    auto embed = node("Embedding");
    const at::Tensor w = embed->register_parameter("weight", at::zeros({10, 4}));
    model->register_module("embed", embed);
    model->register_module("body", torch::nn::Linear(8, 8));
    model->register_module("head", linear(4, 10, tie ? w : at::Tensor()));
    return model;
  };
  auto tied = build(true);
  EXPECT_EQ(find_tied_parameters(*tied), (Groups{{"embed.weight", "head.weight"}}));
  ::testing::internal::CaptureStderr();
  // Largest layer: body (288). embed with head needs 160 + 40 = 200.
  // GPU 0 of 500 offers 500 - 288 = 212: embed and head go there together, ahead of body, which
  // follows (200 + 288 = 488 <= 500: nothing is kept back for the last layer).
  EXPECT_EQ(infer(*tied, {{"0", 500}, {"cpu", 1000}}), (DeviceMap{{"", "cuda:0"}}));
  // GPU 0 of 450 offers 162 < 200 and head cannot be split: the pair moves on to the CPU.
  EXPECT_EQ(infer(*tied, {{"0", 450}, {"cpu", 1000}}), (DeviceMap{{"", "cpu"}}));
  // GPU 0 of 470 offers 182 < 200; GPU 1 (300, not a main device) takes the pair (200), and body
  // (200 + 288 > 300) goes to the CPU.
  EXPECT_EQ(infer(*tied, {{"0", 470}, {"1", 300}, {"cpu", 1000}}),
            (DeviceMap{{"embed", "cuda:1"}, {"head", "cuda:1"}, {"body", "cpu"}}));
  // Untied, head weighs 200 and is placed on its own after body: embed (160 <= 470 - 288) on
  // GPU 0; body: the largest layer left is head (200), 160 + 288 > 470 - 200 -> GPU 1
  // (288 <= 300); head: 288 + 200 > 300 -> CPU.
  auto untied = build(false);
  EXPECT_EQ(infer(*untied, {{"0", 470}, {"1", 300}, {"cpu", 1000}}),
            (DeviceMap{{"embed", "cuda:0"}, {"body", "cuda:1"}, {"head", "cpu"}}));
  ::testing::internal::GetCapturedStderr();
}

TEST(InferAutoDeviceMap, TiedWeightsAcrossBlocks) {
  // Accelerate's test_infer_auto_device_map_with_tied_weights, re-derived.
  auto layer1 = model_for_test();
  auto layer2 = model_for_test();
  auto layer3 = model_for_test({}, param(layer1, "linear2.weight"));
  auto model = node("Sequential");
  model->register_module("layer1", layer1);
  model->register_module("layer2", layer2);
  model->register_module("layer3", layer3);
  ::testing::internal::CaptureStderr();
  // layer3 = 64 + 72 + 20 (its linear2.weight is layer1's) = 156. layer1 with layer3 = 236 + 156
  // = 392 > 400 - 100; layer3 is split and layer1 goes with layer3.linear2 (236 + 20 = 256).
  // layer2 (largest layer left: 72): 256 + 236 > 328, split; layer2.linear1: 256 + 64 > 300 ->
  // GPU 1, which takes the rest (64 + 72 + 100 + 64 + 72 = 372 <= 500); layer2 regroups.
  EXPECT_EQ(infer(*model, {{"0", 400}, {"1", 500}}), (DeviceMap{{"layer1", "cuda:0"},
                                                                {"layer3.linear2", "cuda:0"},
                                                                {"layer2", "cuda:1"},
                                                                {"layer3.linear1", "cuda:1"},
                                                                {"layer3.batchnorm", "cuda:1"}}));

  // Three weights tied: layer2 = layer3 = 156. layer1 + layer2 + layer3 = 548 > 400 - 72; layer2
  // then layer3 are split, and layer1 + layer2.linear2 + layer3.linear2 = 276 <= 328 fit.
  // layer2.linear1: 276 + 64 > 328 -> GPU 1 takes the rest.
  auto layer2b = model_for_test({}, param(layer1, "linear2.weight"));
  auto layer3b = model_for_test({}, param(layer1, "linear2.weight"));
  auto three = node("Sequential");
  three->register_module("layer1", layer1);
  three->register_module("layer2", layer2b);
  three->register_module("layer3", layer3b);
  EXPECT_EQ(infer(*three, {{"0", 400}, {"1", 500}}), (DeviceMap{{"layer1", "cuda:0"},
                                                                {"layer2.linear2", "cuda:0"},
                                                                {"layer3.linear2", "cuda:0"},
                                                                {"layer2.linear1", "cuda:1"},
                                                                {"layer2.batchnorm", "cuda:1"},
                                                                {"layer3.linear1", "cuda:1"},
                                                                {"layer3.batchnorm", "cuda:1"}}));
  ::testing::internal::GetCapturedStderr();
}

TEST(InferAutoDeviceMap, TiesWithinTheModelAndNamesSharingAPrefix) {
  ::testing::internal::CaptureStderr();
  // Accelerate's test: linear3's weight and bias are linear1's. Sizes 80, 168, 0, 168; largest
  // 168. linear1 with linear3 = 80 + 0 + 0 <= 250 - 168; linear2: 248 > 82 -> GPU 1 (168),
  // linear4: 336 <= 400.
  auto seq = node("Sequential");
  auto l1 = linear(4, 4);
  seq->register_module("linear1", l1);
  seq->register_module("linear2", linear(6, 6));
  seq->register_module("linear3", linear(4, 4, param(l1, "weight"), param(l1, "bias")));
  seq->register_module("linear4", linear(6, 6));
  EXPECT_EQ(infer(*seq, {{"0", 250}, {"1", 400}}), (DeviceMap{{"linear1", "cuda:0"},
                                                              {"linear3", "cuda:0"},
                                                              {"linear2", "cuda:1"},
                                                              {"linear4", "cuda:1"}}));

  // Accelerate's test: compute.weight is also compute.weight_submodule.parameter, which is not
  // under "compute.weight". compute (96 + 32) is split; compute.weight with its tie (96) does not
  // fit GPU 0 (4) and goes to the CPU with compute.weight_submodule; compute.bias follows.
  auto model = node("Model");
  auto compute = node("LinearModuleAndSubModule");
  const at::Tensor w = compute->register_parameter("weight", at::zeros({8, 3}));
  compute->register_parameter("bias", at::zeros({8}));
  auto sub = node("SubModule");
  sub->register_parameter("parameter", w);
  compute->register_module("weight_submodule", sub);
  model->register_module("compute", compute);
  EXPECT_EQ(find_tied_parameters(*model),
            (Groups{{"compute.weight", "compute.weight_submodule.parameter"}}));
  EXPECT_EQ(infer(*model, {{"0", 4}, {"cpu", 96000}}, {.clean_result = false}),
            (DeviceMap{{"compute.weight", "cpu"},
                       {"compute.weight_submodule", "cpu"},
                       {"compute.bias", "cpu"}}));
  ::testing::internal::GetCapturedStderr();
}

TEST(InferAutoDeviceMap, AModuleThatFitsExactlyOnlyWithoutItsTieIsSplit) {
  // A = a1 + a2 (Linear(4, 4), 80 each); B's weight is a1's, so B = its bias, 16. Treating A, the
  // largest layer left is B (16): A alone fills 176 - 16 exactly, A with B (176) does not, and B
  // cannot be split. A is then split (Accelerate splits when the module alone reaches the limit):
  // a1 with B = 96 <= 176 - 80, then a2: 176 <= 176.
  auto model = node("Model");
  auto a = node("Block");
  auto a1 = linear(4, 4);
  a->register_module("a1", a1);
  a->register_module("a2", linear(4, 4));
  model->register_module("A", a);
  model->register_module("B", linear(4, 4, param(a1, "weight")));
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(infer(*model, {{"0", 176}, {"cpu", 1000}}, {.clean_result = false}),
            (DeviceMap{{"A.a1", "cuda:0"}, {"B", "cuda:0"}, {"A.a2", "cuda:0"}}));
  ::testing::internal::GetCapturedStderr();
}

TEST(InferAutoDeviceMap, TiesAreMatchedAtDotBoundaries) {
  // Accelerate's issue #3308 case: 15 Linear(10, 10) with one weight. "0" = 400 + 40 = 440, every
  // other = its bias, 40; 1000 in all. "0" takes its ties with it, each found in its own holder
  // ("10.weight" in "10", not in "1"), in the order of the sorted tie group. Largest layer left
  // after "0" is 40: 1000 <= 1040 - 40.
  auto fifteen = node("ModuleList");
  const at::Tensor w = at::zeros({10, 10});
  for (int i = 0; i < 15; ++i) fifteen->register_module(std::to_string(i), linear(10, 10, w));
  ::testing::internal::CaptureStderr();
  const DeviceMap map = infer(*fifteen, {{"0", 1040}}, {.clean_result = false});
  DeviceMap want{{"0", "cuda:0"}};
  for (const char* name :
       {"1", "10", "11", "12", "13", "14", "2", "3", "4", "5", "6", "7", "8", "9"}) {
    want.emplace_back(name, "cuda:0");
  }
  EXPECT_EQ(map, want);

  // "10".weight is "1".weight: "0" has nothing to do with that tie ("0." is inside "10.weight."
  // as text only). "1" brings "10" along; the rest follow in order.
  auto eleven = node("ModuleList");
  auto one = linear(1, 1);
  for (int i = 0; i < 11; ++i) {
    eleven->register_module(
        std::to_string(i),
        i == 1 ? one : linear(1, 1, i == 10 ? param(one, "weight") : at::Tensor()));
  }
  DeviceMap order{{"0", "cuda:0"}, {"1", "cuda:0"}, {"10", "cuda:0"}};
  for (int i = 2; i < 10; ++i) order.emplace_back(std::to_string(i), "cuda:0");
  EXPECT_EQ(infer(*eleven, {{"0", 1000}}, {.clean_result = false}), order);
  ::testing::internal::GetCapturedStderr();
}

TEST(InferAutoDeviceMap, ATiedParameterLeftAloneBySplittingGoesWithItsTie) {
  // embed (160) is tied to decoder.weight; decoder also holds proj (Linear(8, 8), 288); mid and
  // tail are 288 each. Largest layer 288. embed with decoder = 160 + 288 > 500 - 288 = 212, embed
  // alone fits: decoder is split into decoder.weight (0: counted under embed) and decoder.proj,
  // and embed takes decoder.weight along (160), ahead of mid. mid: 160 + 288 > 212 -> CPU, and
  // the rest follows. (Accelerate looks the tie up above decoder.weight only and fails here.)
  auto model = node("Model");
  auto embed = node("Embedding");
  const at::Tensor w = embed->register_parameter("weight", at::zeros({10, 4}));
  auto decoder = node("Decoder");
  decoder->register_parameter("weight", w);
  decoder->register_module("proj", torch::nn::Linear(8, 8));
  model->register_module("embed", embed);
  model->register_module("mid", torch::nn::Linear(8, 8));
  model->register_module("decoder", decoder);
  model->register_module("tail", torch::nn::Linear(8, 8));
  ::testing::internal::CaptureStderr();
  const DeviceMap map = infer(*model, {{"0", 500}, {"cpu", 10000}});
  ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(map, (DeviceMap{{"embed", "cuda:0"},
                            {"decoder.weight", "cuda:0"},
                            {"mid", "cpu"},
                            {"decoder.proj", "cpu"},
                            {"tail", "cpu"}}));
  check_device_map(*model, map);
}

TEST(InferAutoDeviceMap, DtypeHalvesFloatsButNotInt64Buffers) {
  ModelForTestImpl model;
  ::testing::internal::CaptureStderr();
  // float16: linear1 32, batchnorm 40 (its int64 counter stays 8), linear2 50, largest 50.
  // 121 - 50 = 71 holds linear1 (32) but not + batchnorm (72); were the counter halved too,
  // batchnorm would be 36 and everything would fit.
  EXPECT_EQ(infer(model, {{"0", 121}}, {.dtype = at::kHalf}),
            (DeviceMap{{"linear1", "cuda:0"}, {"batchnorm", "disk"}, {"linear2", "disk"}}));
  // 122 is the whole model in float16: 32, 72 <= 72, then 122 <= 122.
  EXPECT_EQ(infer(model, {{"0", 122}}, {.dtype = at::kHalf}), (DeviceMap{{"", "cuda:0"}}));
  // special_dtypes: linear2.weight in float64 makes linear2 170 (model 242), now the largest
  // layer: 241 - 170 = 71 holds linear1 (32) but not batchnorm (72), where the float16 model
  // (122) would fit whole.
  EXPECT_EQ(infer(model, {{"0", 241}},
                  {.dtype = at::kHalf, .special_dtypes = {{"linear2.weight", at::kDouble}}}),
            (DeviceMap{{"linear1", "cuda:0"}, {"batchnorm", "disk"}, {"linear2", "disk"}}));
  EXPECT_EQ(infer(model, {{"0", 241}}, {.dtype = at::kHalf}), (DeviceMap{{"", "cuda:0"}}));
  ::testing::internal::GetCapturedStderr();
}

TEST(InferAutoDeviceMap, WarnsWhenOffloadedBuffersFitNoGpu) {
  // Accelerate's test_infer_auto_device_map_with_buffer_check: extra buffers of 10x2, 10x3, 10x3
  // floats make linear1 144 (buffers 80), batchnorm 192 (buffers 40 + 120), linear2 220 (120).
  ModelForTestImpl model;
  model.linear1->register_buffer("test_buffer1", at::zeros({10, 2}));
  model.batchnorm->register_buffer("test_buffer2", at::zeros({10, 3}));
  model.linear2->register_buffer("test_buffer3", at::zeros({10, 3}));
  // GPU 0: 144 <= 400 - 220; batchnorm 336 > 180 -> CPU (GPU 0 now counts 144 + 220 = 364).
  // CPU buffers 160 + 120 = 280, and 400 < 280 + 364: warning.
  const DeviceMap want{{"linear1", "cuda:0"}, {"batchnorm", "cpu"}, {"linear2", "cpu"}};
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(infer(model, {{"0", 400}, {"cpu", "1GB"}}), want);
  std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("hold 280 bytes of buffers"), std::string::npos) << err;
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(infer(model, {{"0", 400}, {"cpu", "1GB"}}, {.offload_buffers = true}), want);
  err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(err.find("bytes of buffers"), std::string::npos) << err;

  // Accelerate's multi-GPU case: linear3 = Linear(4, 5) + a 10x2 buffer = 180. batchnorm goes
  // to GPU 1 (192 <= 400); linear2: 192 + 220 > 400 -> CPU; linear3 -> CPU. CPU buffers
  // 120 + 80 = 200 fit GPU 1 (200 + 192 <= 400): no warning. With GPU 1 at 200 they do not.
  model.register_module("linear3", torch::nn::Linear(4, 5))
      ->register_buffer("test_buffer4", at::zeros({10, 2}));
  const DeviceMap want3{
      {"linear1", "cuda:0"}, {"batchnorm", "cuda:1"}, {"linear2", "cpu"}, {"linear3", "cpu"}};
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(infer(model, {{"0", 400}, {"1", 400}, {"cpu", "1GB"}}), want3);
  err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(err.find("bytes of buffers"), std::string::npos) << err;
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(infer(model, {{"0", 400}, {"1", 200}, {"cpu", "1GB"}}), want3);
  err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("hold 200 bytes of buffers"), std::string::npos) << err;
}

TEST(InferAutoDeviceMap, FallbackAllocationFillsAnEmptyDevice) {
  // Accelerate's test_infer_auto_device_map_with_fallback_allocation: module = linear1 (10x4 + 4
  // floats = 176), linear2 (80), linear3 (160). "module" (416 > 256) is split; linear1:
  // 176 > 256 - 160 -> without fallback everything goes to disk.
  auto inner = node("Sequential");
  inner->register_module("linear1", linear(10, 4));
  inner->register_module("linear2", linear(4, 4));
  inner->register_module("linear3", linear(4, 8));
  auto model = node("Sequential");
  model->register_module("module", inner);
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(infer(*model, {{"0", 256}}), (DeviceMap{{"", "disk"}}));
  // With fallback: GPU 0 is empty, so look for a module within 256 - max(160, 176) = 80:
  // linear2 (80). It is placed first (80 <= 256 - 160), then linear1 and linear3 go to disk.
  ::testing::internal::CaptureStdout();
  const DeviceMap map = infer(*model, {{"0", 256}}, {.verbose = true, .fallback_allocation = true});
  std::cout << std::flush;
  const std::string out = ::testing::internal::GetCapturedStdout();
  ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(map, (DeviceMap{{"module.linear2", "cuda:0"},
                            {"module.linear1", "disk"},
                            {"module.linear3", "disk"}}));
  EXPECT_NE(out.find("Putting module.linear2 (size=80) (available=96) on cuda:0."),
            std::string::npos)
      << out;
  check_device_map(*model, map);
}

TEST(InferAutoDeviceMap, FallbackAllocationWithBuffers) {
  // Accelerate's test_infer_auto_device_map_with_fallback_allocation_and_buffers: linear1 and
  // linear2 = 440 + a 5-float buffer = 460 each; batchnorm(10) = 40 x 4 + 8 + 20 = 188. linear1:
  // 460 > 678 - 460; fallback within 678 - 460 = 218 finds batchnorm (188). Then linear1 and
  // linear2 go to disk; their buffers (40) do not fit next to GPU 0's 188 + 460 in 678: warning.
  auto model = node("Sequential");
  model->register_module("linear1", torch::nn::Linear(10, 10))
      ->register_buffer("buffer1", at::zeros({5}));
  model->register_module("batchnorm", torch::nn::BatchNorm1d(10))
      ->register_buffer("buffer2", at::zeros({5}));
  model->register_module("linear2", torch::nn::Linear(10, 10))
      ->register_buffer("buffer3", at::zeros({5}));
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(infer(*model, {{"0", 678}}, {.fallback_allocation = true}),
            (DeviceMap{{"batchnorm", "cuda:0"}, {"linear1", "disk"}, {"linear2", "disk"}}));
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("hold 40 bytes of buffers"), std::string::npos) << err;
}

TEST(InferAutoDeviceMap, ASplitModuleKeepsItsOwnBuffersInTheMap) {
  // block = lin1 (80) + lin2 (80) + its own buffer mask (4 floats, 16) = 176 > 170: split into
  // lin1, lin2, mask. lin1 80 <= 170 - 80, lin2 160 <= 170 (no layer left), mask 176 > 170 ->
  // disk.
  auto block = node("Block");
  block->register_module("lin1", linear(4, 4));
  block->register_module("lin2", linear(4, 4));
  block->register_buffer("mask", at::zeros({4}));
  auto model = node("Model");
  model->register_module("block", block);
  ::testing::internal::CaptureStderr();
  const DeviceMap map = infer(*model, {{"0", 170}});
  ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(
      map, (DeviceMap{{"block.lin1", "cuda:0"}, {"block.lin2", "cuda:0"}, {"block.mask", "disk"}}));
  check_device_map(*model, map);
}

TEST(InferAutoDeviceMap, AModuleUnderTwoNamesIsPlacedUnderBoth) {
  // "1" is "0" again: its tensors count under "0" (440 bytes), and "1" goes wherever "0" goes,
  // as its tie. "2" = 440, "3" = Linear(1, 1) = 8.
  auto model = node("Sequential");
  torch::nn::Linear layer(10, 10);
  model->register_module("0", layer);
  model->register_module("1", layer);
  model->register_module("2", linear(10, 10));
  model->register_module("3", linear(1, 1));
  ::testing::internal::CaptureStderr();
  // Largest layers "0" and "2" (440). "0" with "1" = 440 <= 880 - 440. "2": the largest layer
  // left is "3" (8), 440 + 440 > 880 - 8 -> CPU, and "3" follows.
  const DeviceMap map = infer(*model, {{"0", 880}, {"cpu", 1000}});
  ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(map, (DeviceMap{{"0", "cuda:0"}, {"1", "cuda:0"}, {"2", "cpu"}, {"3", "cpu"}}));
  check_device_map(*model, map);
}

// ---------------------------------------------------------------------- map utilities

TEST(DeviceMapClean, GroupsEntriesOnOneDevice) {
  // Accelerate's test_clean_device_map.
  EXPECT_EQ(clean_device_map({{"a", "cuda:0"}, {"b", "cuda:0"}, {"c", "cuda:0"}}),
            (DeviceMap{{"", "cuda:0"}}));
  EXPECT_EQ(clean_device_map({{"a.x", "cuda:0"},
                              {"a.y", "cuda:0"},
                              {"b.x", "cuda:1"},
                              {"b.y", "cuda:1"},
                              {"c", "cuda:1"}}),
            (DeviceMap{{"a", "cuda:0"}, {"b", "cuda:1"}, {"c", "cuda:1"}}));
  EXPECT_EQ(clean_device_map({{"a.x", "cuda:0"},
                              {"a.y", "cuda:0"},
                              {"b.x.0", "cuda:1"},
                              {"b.x.1", "cuda:1"},
                              {"b.y.0", "cuda:2"},
                              {"b.y.1", "cuda:2"},
                              {"c", "cuda:2"}}),
            (DeviceMap{{"a", "cuda:0"}, {"b.x", "cuda:1"}, {"b.y", "cuda:2"}, {"c", "cuda:2"}}));
  // A lone entry is left as it is; a grouped entry takes the place of the first it replaces.
  EXPECT_EQ(clean_device_map({{"a.x", "cpu"}}), (DeviceMap{{"a.x", "cpu"}}));
  EXPECT_EQ(clean_device_map({{"b.x", "cpu"}, {"a", "disk"}, {"b.y", "cpu"}}),
            (DeviceMap{{"b", "cpu"}, {"a", "disk"}}));
  // "layers.1" does not take in "layers.10".
  EXPECT_EQ(clean_device_map({{"layers.1.a", "cpu"}, {"layers.10", "disk"}, {"layers.1.b", "cpu"}}),
            (DeviceMap{{"layers.1", "cpu"}, {"layers.10", "disk"}}));
}

TEST(DeviceMapCheck, AcceptsCoveringMapsAndNamesWhatIsWrong) {
  ModelForTestImpl model;
  check_device_map(model, {{"", "0"}});
  check_device_map(model, {{"linear1", "cuda:0"}, {"linear2", "1"}, {"batchnorm", "cpu"}});
  check_device_map(model, {{"linear1.weight", "cpu"},
                           {"linear1.bias", "disk"},
                           {"batchnorm", "cpu"},
                           {"linear2", "cpu"}});
  // Accelerate's test: batchnorm is not covered.
  EXPECT_ERROR_CONTAINS(check_device_map(model, {{"linear1", "0"}, {"linear2", "1"}}),
                        "check_device_map: the device map gives no device for ['batchnorm.weight', "
                        "'batchnorm.bias', 'batchnorm.running_mean', 'batchnorm.running_var', "
                        "'batchnorm.num_batches_tracked']");
  EXPECT_ERROR_CONTAINS(check_device_map(model, {{"", "gpu"}}),
                        "check_device_map: entry \"\": unknown device \"gpu\"");
  EXPECT_ERROR_CONTAINS(check_device_map(model, {{"linear1", "cpu"}, {"linear2", "cuda:x"}}),
                        "entry \"linear2\": unknown device \"cuda:x\"");
  EXPECT_ERROR_CONTAINS(
      check_device_map(model, {{"", "cpu"}, {"linear3", "cpu"}, {"linear", "cpu"}}),
      "is no module, parameter or buffer of the model: ['linear3', 'linear']");
  // A tied tensor must be covered under each of its names.
  auto lm = node("LM");
  auto embed = node("Embedding");
  const at::Tensor w = embed->register_parameter("weight", at::zeros({10, 4}));
  lm->register_module("embed", embed);
  lm->register_module("head", linear(4, 10, w));
  EXPECT_ERROR_CONTAINS(check_device_map(*lm, {{"embed", "cpu"}}),
                        "gives no device for ['head.weight', 'head.bias']");
}

TEST(DeviceMapLookup, DeviceForTakesTheLongestCoveringEntry) {
  const DeviceMap map{{"", "cpu"}, {"layers.1", "cuda:1"}, {"layers.1.bias", "disk"}, {"x", "0"}};
  EXPECT_EQ(device_for(map, "layers.1.weight"), "cuda:1");
  EXPECT_EQ(device_for(map, "layers.1"), "cuda:1");
  EXPECT_EQ(device_for(map, "layers.1.bias"), "disk");
  EXPECT_EQ(device_for(map, "layers.10.weight"), "cpu");
  EXPECT_EQ(device_for(map, "x.w"), "cuda:0");  // normalised
  const DeviceMap partial{{"a", "cpu"}};
  EXPECT_ERROR_CONTAINS(device_for(partial, "ab.w"),
                        "device_for: no entry of the device map "
                        "covers \"ab.w\"");
  EXPECT_ERROR_CONTAINS(device_for(partial, "b.w"), "covers \"b.w\"");
}
