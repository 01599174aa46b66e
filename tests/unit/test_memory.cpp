// Memory helpers (memory.h) in one process: which errors mean "out of memory", the batch size
// search, and model sizes.

#include <accelerate/memory.h>

#include <gtest/gtest.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>

#include "expect_error.h"

#include <cstdint>
#include <map>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

using accelerate::compute_module_sizes;
using accelerate::find_executable_batch_size;
using accelerate::PartialState;
using accelerate::should_reduce_batch_size;

namespace {

std::shared_ptr<PartialState> single_state() {
  return PartialState::from_store(c10::make_intrusive<c10d::HashStore>(), 0, 1);
}

// The error LibTorch's CPU allocator raises when the system refuses memory.
[[noreturn]] void fail_like_the_cpu_allocator(int64_t bytes) {
  TORCH_CHECK(false, "DefaultCPUAllocator: can't allocate memory: you tried to allocate ", bytes,
              " bytes. Error code 12 (Cannot allocate memory)");
}

template <class F>
std::exception_ptr capture(F&& fn) {
  try {
    fn();
  } catch (...) {
    return std::current_exception();
  }
  return nullptr;
}

}  // namespace

// ---------------------------------------------------------------------- should_reduce_batch_size

TEST(ShouldReduceBatchSize, RecognisesOutOfMemoryErrors) {
  EXPECT_TRUE(should_reduce_batch_size(capture([] { fail_like_the_cpu_allocator(1 << 20); })));
  EXPECT_TRUE(should_reduce_batch_size(capture([] { throw std::bad_alloc(); })));
  EXPECT_TRUE(should_reduce_batch_size(capture(
      [] { TORCH_CHECK_WITH(OutOfMemoryError, false, "CUDA error: device-side trouble"); })));
  EXPECT_TRUE(should_reduce_batch_size(std::runtime_error(
      "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 15.78 GiB total capacity)")));
  EXPECT_TRUE(should_reduce_batch_size(
      std::runtime_error("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if")));
  EXPECT_TRUE(should_reduce_batch_size(
      std::runtime_error("DefaultCPUAllocator: not enough memory: you tried to allocate 8 bytes")));
}

TEST(ShouldReduceBatchSize, RejectsOtherErrors) {
  EXPECT_FALSE(should_reduce_batch_size(std::exception_ptr()));
  EXPECT_FALSE(should_reduce_batch_size(capture([] { throw 42; })));
  EXPECT_FALSE(should_reduce_batch_size(std::runtime_error("shape mismatch")));
  EXPECT_FALSE(should_reduce_batch_size(capture([] { TORCH_CHECK(false, "index out of range"); })));
  // " out of memory." needs its period, as in Accelerate: "out of memory" alone is not enough.
  EXPECT_FALSE(should_reduce_batch_size(std::runtime_error("ran out of memory quota")));
}

TEST(ShouldReduceBatchSize, RecognisesARealFailedCpuAllocation) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "AddressSanitizer aborts on impossible allocations instead of failing them";
#else
  // 2^60 bytes: more than any address space, so the allocator fails rather than overcommits.
  const auto error = capture([] { (void)at::empty({int64_t{1} << 60}, at::kByte); });
  ASSERT_TRUE(error);
  EXPECT_TRUE(should_reduce_batch_size(error))
      << accelerate::testing::error_of([&] { std::rethrow_exception(error); });
#endif
}

// ---------------------------------------------------------------------- find_executable_batch_size

TEST(FindExecutableBatchSize, ShrinksByAccelerateDefaultRuleUntilItFits) {
  auto state = single_state();
  std::vector<int64_t> tried;
  const int64_t used = find_executable_batch_size(*state, [&](int64_t batch_size) {
    tried.push_back(batch_size);
    if (batch_size > 30) fail_like_the_cpu_allocator(batch_size * 4096);
    return batch_size;
  });
  // int(b * 0.9) from 128, as Accelerate does.
  EXPECT_EQ(tried,
            (std::vector<int64_t>{128, 115, 103, 92, 82, 73, 65, 58, 52, 46, 41, 36, 32, 28}));
  EXPECT_EQ(used, 28);
}

TEST(FindExecutableBatchSize, TakesAReductionRuleAndAStartingSize) {
  auto state = single_state();
  std::vector<int64_t> tried;
  find_executable_batch_size(
      *state,
      [&](int64_t batch_size) {
        tried.push_back(batch_size);
        if (batch_size > 30) throw std::bad_alloc();
      },
      {.starting_batch_size = 256, .reduce_batch_size_fn = [](int64_t b) { return b / 2; }});
  EXPECT_EQ(tried, (std::vector<int64_t>{256, 128, 64, 32, 16}));
}

TEST(FindExecutableBatchSize, ReachingZeroIsAnError) {
  auto state = single_state();
  int calls = 0;
  EXPECT_ERROR_CONTAINS(
      find_executable_batch_size(
          *state,
          [&](int64_t) {
            ++calls;
            fail_like_the_cpu_allocator(1);
          },
          {.starting_batch_size = 8, .reduce_batch_size_fn = [](int64_t b) { return b / 2; }}),
      "find_executable_batch_size: no executable batch size found, reached zero");
  EXPECT_EQ(calls, 4);  // 8, 4, 2, 1
  EXPECT_ERROR_CONTAINS(
      find_executable_batch_size(*state, [](int64_t) {}, {.starting_batch_size = 0}),
      "reached zero");
}

TEST(FindExecutableBatchSize, OtherErrorsPropagateAtOnce) {
  auto state = single_state();
  std::vector<int64_t> tried;
  EXPECT_ERROR_CONTAINS(find_executable_batch_size(*state,
                                                   [&](int64_t batch_size) -> int {
                                                     tried.push_back(batch_size);
                                                     throw std::runtime_error("bad input");
                                                   }),
                        "bad input");
  EXPECT_EQ(tried, (std::vector<int64_t>{128}));
}

TEST(FindExecutableBatchSize, RejectsARuleThatDoesNotShrink) {
  auto state = single_state();
  EXPECT_ERROR_CONTAINS(
      find_executable_batch_size(
          *state, [](int64_t) { throw std::bad_alloc(); },
          {.starting_batch_size = 4, .reduce_batch_size_fn = [](int64_t b) { return b; }}),
      "reduce_batch_size_fn must return a smaller, non-negative batch size, but turned 4 into 4");
  EXPECT_ERROR_CONTAINS(
      find_executable_batch_size(*state, [](int64_t) {}, {.starting_batch_size = -3}),
      "the batch size must be positive, got -3");
}

TEST(ReleaseMemory, DropsTheTensors) {
  at::Tensor a = at::ones({100, 100});
  at::Tensor b = at::ones({10});
  accelerate::release_memory(a, b);
  EXPECT_FALSE(a.defined());
  EXPECT_FALSE(b.defined());
  accelerate::clear_device_cache();  // no cache on the CPU: must simply return
}

// ---------------------------------------------------------------------- module sizes

namespace {

// A weight held by the model and, tied, by its child: counted once, under the first name.
struct HolderImpl : torch::nn::Module {
  explicit HolderImpl(const at::Tensor& w) { register_parameter("w", w); }
};
struct TiedImpl : torch::nn::Module {
  TiedImpl() {
    auto w = register_parameter("w", at::ones({3, 3}));
    register_module("child", std::make_shared<HolderImpl>(w));
  }
};

// Own parameter at the top, a container below: layers are "scale" and the container's leaves.
struct NestedImpl : torch::nn::Module {
  NestedImpl() {
    register_parameter("scale", at::ones({1}));
    register_module("body", torch::nn::Sequential(torch::nn::Linear(2, 3), torch::nn::ReLU(),
                                                  torch::nn::Linear(3, 3)));
    register_buffer("mask", at::ones({2}, at::kBool));
  }
};

}  // namespace

TEST(ComputeModuleSizes, CountsEveryPrefixInBytes) {
  torch::nn::Sequential net(torch::nn::Linear(10, 20), torch::nn::Linear(20, 5));
  const std::map<std::string, int64_t> want{{"", 1300},     {"0", 880}, {"0.weight", 800},
                                            {"0.bias", 80}, {"1", 420}, {"1.weight", 400},
                                            {"1.bias", 20}};
  EXPECT_EQ(compute_module_sizes(*net), want);
}

TEST(ComputeModuleSizes, DtypeShrinksFloatingPointTensorsOnly) {
  torch::nn::Sequential net(torch::nn::Linear(10, 20), torch::nn::Linear(20, 5));
  const std::map<std::string, int64_t> half{{"", 650},      {"0", 440}, {"0.weight", 400},
                                            {"0.bias", 40}, {"1", 210}, {"1.weight", 200},
                                            {"1.bias", 10}};
  EXPECT_EQ(compute_module_sizes(*net, {.dtype = at::kHalf}), half);
  // A wider dtype never grows a tensor.
  EXPECT_EQ(compute_module_sizes(*net, {.dtype = at::kDouble}).at(""), 1300);
  // A special dtype overrides `dtype` for that tensor.
  auto special = compute_module_sizes(
      *net, {.dtype = at::kHalf, .special_dtypes = {{"0.weight", at::kDouble}}});
  EXPECT_EQ(special.at("0.weight"), 1600);
  EXPECT_EQ(special.at("0"), 1640);
  EXPECT_EQ(special.at(""), 1850);
}

TEST(ComputeModuleSizes, CountsBuffersAndKeepsIntegerSizes) {
  torch::nn::BatchNorm1d bn(4);
  // weight, bias (4 floats each), running_mean, running_var (4 floats each), num_batches_tracked
  // (one int64).
  EXPECT_EQ(compute_module_sizes(*bn).at(""), 72);
  EXPECT_EQ(compute_module_sizes(*bn, {.buffers_only = true}).at(""), 40);
  const auto half = compute_module_sizes(*bn, {.dtype = at::kHalf, .buffers_only = true});
  EXPECT_EQ(half.at(""), 24);
  EXPECT_EQ(half.at("num_batches_tracked"), 8);
}

TEST(ComputeModuleSizes, CountsATiedTensorOnce) {
  TiedImpl tied;
  EXPECT_EQ(compute_module_sizes(tied), (std::map<std::string, int64_t>{{"", 36}, {"w", 36}}));
}

TEST(CalculateMaximumSizes, TotalAndLargestLayer) {
  torch::nn::Sequential net(torch::nn::Linear(10, 20), torch::nn::Linear(20, 5));
  const auto sizes = accelerate::calculate_maximum_sizes(*net);
  EXPECT_EQ(sizes.total_size, 1300);
  EXPECT_EQ(sizes.largest_layer_size, 880);
  EXPECT_EQ(sizes.largest_layer_names, (std::vector<std::string>{"0"}));
}

TEST(CalculateMaximumSizes, NamesEveryLayerOfTheLargestSize) {
  torch::nn::Sequential same(torch::nn::Linear(4, 4), torch::nn::ReLU(), torch::nn::Linear(4, 4));
  const auto sizes = accelerate::calculate_maximum_sizes(*same);
  EXPECT_EQ(sizes.total_size, 160);
  EXPECT_EQ(sizes.largest_layer_size, 80);
  EXPECT_EQ(sizes.largest_layer_names, (std::vector<std::string>{"0", "2"}));
}

TEST(CalculateMaximumSizes, WalksNestedModulesAndTopLevelTensors) {
  NestedImpl nested;
  // scale 4, body.0 (2x3 + 3) * 4 = 36, body.1 (ReLU) 0, body.2 (3x3 + 3) * 4 = 48, mask 2 bits
  // (one byte, as Accelerate's 1/8 byte per bool).
  const auto sizes = compute_module_sizes(nested);
  EXPECT_EQ(sizes.at(""), 89);
  EXPECT_EQ(sizes.at("body"), 84);
  EXPECT_EQ(sizes.at("mask"), 1);
  const auto max = accelerate::calculate_maximum_sizes(nested);
  EXPECT_EQ(max.total_size, 89);
  EXPECT_EQ(max.largest_layer_size, 48);
  EXPECT_EQ(max.largest_layer_names, (std::vector<std::string>{"body.2"}));
}

TEST(ConvertBytes, PrintsLikeAccelerate) {
  EXPECT_EQ(accelerate::convert_bytes(0), "0 bytes");
  EXPECT_EQ(accelerate::convert_bytes(880), "880 bytes");
  EXPECT_EQ(accelerate::convert_bytes(1023), "1023 bytes");
  EXPECT_EQ(accelerate::convert_bytes(1024), "1.0 KB");
  EXPECT_EQ(accelerate::convert_bytes(1300), "1.27 KB");
  EXPECT_EQ(accelerate::convert_bytes(1536), "1.5 KB");
  EXPECT_EQ(accelerate::convert_bytes(3 * 1024 * 1024), "3.0 MB");
  EXPECT_EQ(accelerate::convert_bytes(int64_t{5} << 40), "5.0 TB");
  EXPECT_EQ(accelerate::convert_bytes(int64_t{2} << 50), "2.0 PB");
}
