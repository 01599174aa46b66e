// operations.h across processes: every operation on 2, 3 and 4 ranks run as threads of this
// process over a shared HashStore, with exact values derived from each rank and the world size.

#include <accelerate/operations.h>
#include <accelerate/state.h>

#include <gtest/gtest.h>

#include "expect_error.h"

#include "thread_ranks.h"

#include <atomic>
#include <chrono>
#include <functional>
#include <future>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace test_ops {
// Model outputs as a user would declare them.
struct Outputs {
  at::Tensor logits;
  std::vector<at::Tensor> hidden;
  std::optional<at::Tensor> loss;
};
}  // namespace test_ops

ACCELERATE_TENSOR_FIELDS(test_ops::Outputs, logits, hidden, loss);

namespace {

using accelerate::testing::error_of;
using accelerate::testing::same;

using accelerate::PartialState;
using accelerate::Reduction;
using accelerate::StateOptions;
using accelerate::testing::message;
using accelerate::testing::run_ranks;
using accelerate::testing::run_ranks_collect;

// A failing rank leaves the others waiting in a collective; this bounds how long.
StateOptions bounded(StateOptions options = {}) {
  options.init_kwargs.timeout = std::chrono::seconds(30);
  return options;
}

// Runs fn on every rank for world sizes 2, 3 and 4 (each rank a thread with its own
// PartialState over a fresh, uniquely prefixed store), and reports any rank's exception here.
void for_each_world(const std::function<void(PartialState&)>& fn,
                    const StateOptions& options = bounded()) {
  for (int world : {2, 3, 4}) {
    try {
      run_ranks(world, fn, {.state = options});
    } catch (const std::exception& e) {
      ADD_FAILURE() << "world size " << world << ": " << e.what();
    }
  }
}

at::Tensor longs(std::vector<int64_t> values) {
  return at::tensor(values, at::kLong);
}
at::Tensor floats(std::vector<float> values) {
  return at::tensor(values, at::kFloat);
}
at::Tensor range(int64_t from, int64_t to) {
  return at::arange(from, to, at::kLong);
}

// Exact equality: same dtype, same shape, same values.
bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

}  // namespace

// ------------------------------------------------------------------ gather

TEST(DistributedOperations, GatherConcatenatesInRankOrder) {
  for_each_world([](PartialState& s) {
    const int64_t r = s.process_index();
    const int64_t n = s.num_processes();
    EXPECT_TRUE(same(accelerate::gather(s, longs({2 * r, 2 * r + 1})), range(0, 2 * n)));

    auto rows = accelerate::gather(s, at::full({2, 3}, static_cast<double>(r), at::kFloat));
    EXPECT_TRUE(same(rows, range(0, n).repeat_interleave(6).reshape({2 * n, 3}).to(at::kFloat)));

    // 0-dim tensors become one entry per process.
    EXPECT_TRUE(same(accelerate::gather(s, at::scalar_tensor(static_cast<double>(r) + 0.5)),
                     range(0, n).to(at::kFloat) + 0.5));
    // Dtypes Gloo cannot carry: bfloat16, bool, int16.
    EXPECT_TRUE(
        same(accelerate::gather(s, longs({r}).to(at::kBFloat16)), range(0, n).to(at::kBFloat16)));
    EXPECT_TRUE(same(
        accelerate::gather(s, longs({r % 2, 1}).to(at::kBool)),
        at::stack({range(0, n) % 2, at::ones({n}, at::kLong)}, 1).reshape({2 * n}).to(at::kBool)));
    EXPECT_TRUE(same(accelerate::gather(s, at::scalar_tensor(-r, at::kShort)),
                     (-range(0, n)).to(at::kShort)));
  });
}

TEST(DistributedOperations, GatherNestedContainers) {
  for_each_world([](PartialState& s) {
    const int64_t r = s.process_index();
    const int64_t n = s.num_processes();
    std::map<std::string, std::vector<at::Tensor>> batch{{"a", {longs({r})}},
                                                         {"b", {longs({10 + r, 20 + r})}}};
    auto g = accelerate::gather(s, batch);
    EXPECT_TRUE(same(g.at("a")[0], range(0, n)));
    at::Tensor b = at::stack({range(10, 10 + n), range(20, 20 + n)}, 1).reshape({2 * n});
    EXPECT_TRUE(same(g.at("b")[0], b));

    auto t =
        accelerate::gather(s, std::make_tuple(longs({r}), floats({1.0f * static_cast<float>(r)})));
    EXPECT_TRUE(same(std::get<0>(t), range(0, n)));
    EXPECT_TRUE(same(std::get<1>(t), range(0, n).to(at::kFloat)));

    test_ops::Outputs out{at::full({1, 2}, r, at::kLong), {longs({-r})}, at::scalar_tensor(r)};
    auto go = accelerate::gather(s, out);
    EXPECT_TRUE(same(go.logits, range(0, n).repeat_interleave(2).reshape({n, 2})));
    EXPECT_TRUE(same(go.hidden[0], -range(0, n)));
    ASSERT_TRUE(go.loss.has_value());
    EXPECT_TRUE(same(*go.loss, range(0, n).to(at::kFloat)));

    c10::impl::GenericDict dict(c10::StringType::get(), c10::AnyType::get());
    dict.insert("x", longs({r}));
    auto gd = accelerate::gather(s, c10::IValue(dict));
    EXPECT_TRUE(same(gd.toGenericDict().at("x").toTensor(), range(0, n)));
  });
}

// ------------------------------------------------------------------ objects

TEST(DistributedOperations, GatherObjectKeepsRankOrder) {
  for_each_world([](PartialState& s) {
    const int r = s.process_index();
    const int n = s.num_processes();
    std::vector<std::string> names, flat;
    std::vector<std::map<std::string, std::vector<int>>> maps;
    for (int i = 0; i < n; ++i) {
      names.push_back("rank" + std::to_string(i));
      for (int j = 0; j <= i; ++j) flat.push_back(std::to_string(i) + ":" + std::to_string(j));
      maps.push_back({{"rank", {i}}, {"squares", std::vector<int>(static_cast<size_t>(i), i * i)}});
    }
    EXPECT_EQ(accelerate::gather_object(s, "rank" + std::to_string(r)), names);

    // A vector is flattened one level, as in Accelerate; lengths may differ between processes.
    std::vector<std::string> mine;
    for (int j = 0; j <= r; ++j) mine.push_back(std::to_string(r) + ":" + std::to_string(j));
    EXPECT_EQ(accelerate::gather_object(s, mine), flat);
    EXPECT_EQ(accelerate::gather_object(s, std::vector<std::string>{}), std::vector<std::string>{});

    std::map<std::string, std::vector<int>> map{
        {"rank", {r}}, {"squares", std::vector<int>(static_cast<size_t>(r), r * r)}};
    EXPECT_EQ(accelerate::gather_object(s, map), maps);

    // Tensors of different shapes travel inside objects.
    auto tensors = accelerate::gather_object(s, std::vector<at::Tensor>{range(0, r + 1)});
    ASSERT_EQ(tensors.size(), static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) EXPECT_TRUE(same(tensors[static_cast<size_t>(i)], range(0, i + 1)));

    auto pairs = accelerate::gather_object(s, std::make_pair(r, 0.5 * r));
    ASSERT_EQ(pairs.size(), static_cast<size_t>(n));
    EXPECT_EQ(pairs.back(), (std::pair<int, double>{n - 1, 0.5 * (n - 1)}));
  });
}

TEST(DistributedOperations, BroadcastObjectListReplacesTheList) {
  for_each_world([](PartialState& s) {
    const int r = s.process_index();
    const int n = s.num_processes();
    std::vector<std::string> files{"stale-" + std::to_string(r)};
    if (s.is_main_process()) files = {"a", "b", "c"};
    auto& out = accelerate::broadcast_object_list(s, files);
    EXPECT_EQ(&out, &files);
    EXPECT_EQ(files, (std::vector<std::string>{"a", "b", "c"}));

    std::vector<int> from_last(static_cast<size_t>(r), r);
    accelerate::broadcast_object_list(s, from_last, n - 1);
    EXPECT_EQ(from_last, std::vector<int>(static_cast<size_t>(n - 1), n - 1));

    EXPECT_TRUE(contains(error_of([&] { accelerate::broadcast_object_list(s, files, n); }),
                         "'broadcast_object_list': from_process " + std::to_string(n) +
                             " is outside [0, " + std::to_string(n) + ")"));
  });
}

// ------------------------------------------------------------------ broadcast

TEST(DistributedOperations, BroadcastFromEveryProcess) {
  for_each_world([](PartialState& s) {
    const int64_t r = s.process_index();
    const int n = s.num_processes();
    for (int from = 0; from < n; ++from) {
      auto data = std::make_tuple(
          longs({10 * r, 10 * r + 1}),
          std::map<std::string, at::Tensor>{{"x", at::full({2, 2}, 0.5 + static_cast<double>(r))}});
      auto got = accelerate::broadcast(s, data, from);
      EXPECT_TRUE(same(std::get<0>(got), longs({10 * from, 10 * from + 1})));
      EXPECT_TRUE(same(std::get<1>(got).at("x"), at::full({2, 2}, 0.5 + from)));
      // The input is left as it was.
      EXPECT_TRUE(same(std::get<0>(data), longs({10 * r, 10 * r + 1})));
    }
    auto odd = accelerate::broadcast(
        s,
        std::make_pair(at::full({3}, 0.25 * static_cast<double>(r), at::kBFloat16),
                       at::full({2}, r == 1, at::kBool)),
        1);
    EXPECT_TRUE(same(odd.first, at::full({3}, 0.25, at::kBFloat16)));
    EXPECT_TRUE(same(odd.second, at::full({2}, true, at::kBool)));
    test_ops::Outputs out{longs({r}), {longs({r, r})}, std::nullopt};
    auto got = accelerate::broadcast(s, out, n - 1);
    EXPECT_TRUE(same(got.logits, longs({n - 1})));
    EXPECT_TRUE(same(got.hidden[0], longs({n - 1, n - 1})));
    EXPECT_FALSE(got.loss.has_value());
    EXPECT_TRUE(contains(error_of([&] { accelerate::broadcast(s, longs({1}), -1); }),
                         "'broadcast': from_process -1 is outside [0, " + std::to_string(n) + ")"));
  });
}

// ------------------------------------------------------------------ reduce

TEST(DistributedOperations, ReduceSumMeanNone) {
  for_each_world([](PartialState& s) {
    const int64_t r = s.process_index();
    const int64_t n = s.num_processes();
    EXPECT_TRUE(same(accelerate::reduce(s, longs({r + 1, 2 * r}), "sum"),
                     longs({n * (n + 1) / 2, n * (n - 1)})));
    EXPECT_TRUE(same(accelerate::reduce(s, floats({static_cast<float>(r)})),
                     floats({static_cast<float>(n - 1) / 2})));
    // Accelerate's "none" still sums; only "mean" divides.
    EXPECT_TRUE(same(accelerate::reduce(s, floats({static_cast<float>(r)}), Reduction::kNone),
                     floats({static_cast<float>(n * (n - 1) / 2)})));
    EXPECT_TRUE(same(accelerate::reduce(s, longs({r}), "sum", 3), longs({3 * n * (n - 1) / 2})));
    EXPECT_TRUE(same(accelerate::reduce(s, floats({static_cast<float>(r)}), "mean", 2.0),
                     floats({static_cast<float>(n - 1)})));

    // bfloat16: summed in float32, rounded once; these values are exact in bfloat16.
    auto bf = at::full({2}, static_cast<double>(r + 1), at::kBFloat16);
    EXPECT_TRUE(same(accelerate::reduce(s, bf, "sum"),
                     at::full({2}, static_cast<double>(n * (n + 1) / 2), at::kBFloat16)));
    EXPECT_TRUE(
        same(accelerate::reduce(s, bf, "mean"), at::full({2}, (n + 1) / 2.0, at::kBFloat16)));

    std::map<std::string, std::vector<at::Tensor>> nested{{"a", {longs({r})}},
                                                          {"b", {longs({1}), longs({r * r})}}};
    auto sum = accelerate::reduce(s, nested, Reduction::kSum);
    int64_t squares = 0;
    for (int64_t i = 0; i < n; ++i) squares += i * i;
    EXPECT_TRUE(same(sum.at("a")[0], longs({n * (n - 1) / 2})));
    EXPECT_TRUE(same(sum.at("b")[0], longs({n})));
    EXPECT_TRUE(same(sum.at("b")[1], longs({squares})));

    // Every process fails the same way, before communicating, so none is left waiting.
    EXPECT_TRUE(contains(error_of([&] { accelerate::reduce(s, nested, "mean"); }),
                         "'reduce' with reduction 'mean' needs floating-point tensors, but "
                         "data['a'][0] has dtype Long"));
    EXPECT_TRUE(contains(error_of([&] { accelerate::reduce(s, floats({1}), "max"); }),
                         "unknown reduction 'max'"));
    // The group still works after those errors.
    EXPECT_TRUE(same(accelerate::reduce(s, longs({1}), "sum"), longs({n})));
  });
}

// ------------------------------------------------------------------ pad_across_processes

TEST(DistributedOperations, PadAcrossProcessesMakesShapesGatherable) {
  for_each_world([](PartialState& s) {
    const int64_t r = s.process_index();
    const int64_t n = s.num_processes();
    at::Tensor mine = range(0, r + 1);
    at::Tensor fill = at::full({n - r - 1}, -1, at::kLong);
    auto end = accelerate::pad_across_processes(s, mine, {.pad_index = -1});
    EXPECT_TRUE(same(end, at::cat({mine, fill})));
    auto start = accelerate::pad_across_processes(s, mine, {.pad_index = -1, .pad_first = true});
    EXPECT_TRUE(same(start, at::cat({fill, mine})));

    // Another dimension, counted from either end.
    at::Tensor wide = at::ones({2, r + 1}, at::kFloat);
    at::Tensor expected = at::cat({wide, at::full({2, n - r - 1}, 0.5)}, 1);
    EXPECT_TRUE(
        same(accelerate::pad_across_processes(s, wide, {.dim = 1, .pad_index = 0.5}), expected));
    EXPECT_TRUE(
        same(accelerate::pad_across_processes(s, wide, {.dim = -1, .pad_index = 0.5}), expected));
    // Dimensions the tensor lacks leave it as it is.
    EXPECT_TRUE(same(accelerate::pad_across_processes(s, wide, {.dim = 2}), wide));
    EXPECT_TRUE(same(accelerate::pad_across_processes(s, wide, {.dim = -3}), wide));
    // Equal sizes: the same tensor comes back.
    at::Tensor even = at::zeros({3, 2});
    EXPECT_TRUE(accelerate::pad_across_processes(s, even).is_same(even));

    // Nested, then gathered: every process sees every process's padded rows.
    std::map<std::string, at::Tensor> batch{{"ids", range(0, r + 1).unsqueeze(0)},
                                            {"mask", at::ones({1, r + 1}, at::kLong)}};
    auto all = accelerate::gather(s, accelerate::pad_across_processes(s, batch, {.dim = 1}));
    std::vector<at::Tensor> ids, mask;
    for (int64_t i = 0; i < n; ++i) {
      ids.push_back(at::cat({range(0, i + 1), at::zeros({n - i - 1}, at::kLong)}).unsqueeze(0));
      mask.push_back(
          at::cat({at::ones({i + 1}, at::kLong), at::zeros({n - i - 1}, at::kLong)}).unsqueeze(0));
    }
    EXPECT_TRUE(same(all.at("ids"), at::cat(ids)));
    EXPECT_TRUE(same(all.at("mask"), at::cat(mask)));
  });
}

// ------------------------------------------------------------------ debug mode and timeouts

TEST(DistributedOperations, DebugModeNamesTheOperationAndEveryShape) {
  auto errors =
      run_ranks_collect(3,
                        [](PartialState& s) {
                          accelerate::gather(s, at::zeros({s.process_index() + 1, 2}, at::kLong));
                        },
                        {.state = bounded({.debug = true})});
  for (size_t r = 0; r < 3; ++r) {
    const auto msg = message(errors[r]);
    EXPECT_TRUE(contains(msg, "collective 'gather' (call #")) << msg;
    EXPECT_TRUE(contains(msg, "does not match across processes")) << msg;
    for (int i = 0; i < 3; ++i) {
      EXPECT_TRUE(contains(msg, "process " + std::to_string(i) + ": call #")) << msg;
      EXPECT_TRUE(
          contains(msg, " 'gather' (all-gather) of shape [" + std::to_string(i + 1) + ", 2] Long"))
          << msg;
    }
  }

  // Different structures fail on every process too, instead of leaving some waiting.
  errors = run_ranks_collect(2,
                             [](PartialState& s) {
                               std::vector<at::Tensor> parts(
                                   static_cast<size_t>(s.process_index() + 1), longs({1}));
                               accelerate::reduce(s, parts, "sum");
                             },
                             {.state = bounded({.debug = true})});
  for (size_t r = 0; r < 2; ++r) {
    const auto msg = message(errors[r]);
    EXPECT_TRUE(contains(msg, "'reduce' was called with differently structured data")) << msg;
    EXPECT_TRUE(contains(msg, "process 0: data[0]: shape [1] dtype Long\n")) << msg;
    EXPECT_TRUE(contains(msg,
                         "process 1: data[0]: shape [1] dtype Long; data[1]: shape [1] "
                         "dtype Long\n"))
        << msg;
  }

  // Uneven sizes are what pad_across_processes is for: no error there in debug mode.
  run_ranks(
      3,
      [](PartialState& s) {
        auto padded = accelerate::pad_across_processes(
            s, std::vector<at::Tensor>{range(0, s.process_index() + 1)});
        EXPECT_TRUE(same(accelerate::gather(s, padded)[0], longs({0, 0, 0, 0, 1, 0, 0, 1, 2})));
      },
      {.state = bounded({.debug = true})});
}

TEST(DistributedOperations, StuckGatherTimesOutNamingIt) {
  StateOptions options;
  options.init_kwargs.timeout = std::chrono::seconds(2);
  std::promise<void> rank0_done;
  auto done = rank0_done.get_future().share();
  std::atomic<double> waited{0};
  auto errors = run_ranks_collect(
      2,
      [&](PartialState& s) {
        if (s.process_index() == 0) {
          const auto start = std::chrono::steady_clock::now();
          try {
            accelerate::gather(s, longs({1}));
          } catch (...) {
            waited =
                std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            rank0_done.set_value();
            throw;
          }
          rank0_done.set_value();
        } else {
          // Stays in the group but never calls gather.
          done.wait_for(std::chrono::seconds(15));
        }
      },
      {.state = options});
  const auto msg = message(errors[0]);
  EXPECT_TRUE(contains(msg, "collective 'gather' (call #")) << msg;
  EXPECT_TRUE(contains(msg,
                       ") failed on process 0 of 2: timed out after 2 s: process 1 did not "
                       "arrive (no sign of it"))
      << msg;
  EXPECT_GE(waited.load(), 1.5);
  EXPECT_LT(waited.load(), 6.0);
  EXPECT_FALSE(errors[1]) << message(errors[1]);
}
