// DirectGloo (Gloo contexts of our own next to ProcessGroupGloo): the exchange all-reduce for
// small and medium tensors, the out-of-place ring for large ones, and the collectives built on
// them. Ranks run as threads over a HashStore; expected values are computed in each test from
// the inputs, in rank order, without any communication.

#include <accelerate/detail/collectives.h>
#include <accelerate/detail/direct_gloo.h>
#include <accelerate/operations.h>
#include <accelerate/state.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "thread_ranks.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <vector>

namespace {

using accelerate::PartialState;
using accelerate::StateOptions;
using accelerate::detail::DirectGloo;
using accelerate::testing::message;
using accelerate::testing::run_ranks;
using accelerate::testing::run_ranks_collect;

accelerate::testing::RankOptions bounded() {
  StateOptions options;
  options.init_kwargs.timeout = std::chrono::seconds(20);
  return {.state = options};
}

// Rank r's operand: distinct per rank and element, with fractional parts so that the order of
// 16-bit additions matters.
at::Tensor operand(int rank, int64_t n, c10::ScalarType dtype) {
  auto base = at::arange(n, at::kDouble);
  at::Tensor values;
  if (at::isFloatingType(dtype)) {
    values = (base * 0.37 + rank * 1.71 + 0.123).sin() * (10.0 + rank);
  } else {
    values = (base * (rank + 3)).remainder(23) - 7 * rank;
    if (dtype == at::kByte) values = values.abs();
  }
  return values.to(dtype);
}

// The rank-order reduction of every rank's operand, pairwise in `dtype` (16-bit floats combined
// in float32 and rounded after every step), as the exchange defines it.
at::Tensor rank_order(int world, int64_t n, c10::ScalarType dtype, c10d::ReduceOp op) {
  const bool narrow = dtype == at::kHalf || dtype == at::kBFloat16;
  at::Tensor acc = operand(0, n, dtype);
  for (int r = 1; r < world; ++r) {
    at::Tensor x = operand(r, n, dtype);
    at::Tensor a = narrow ? acc.to(at::kFloat) : acc;
    at::Tensor b = narrow ? x.to(at::kFloat) : x;
    at::Tensor c;
    if (op == c10d::ReduceOp::SUM) c = a + b;
    if (op == c10d::ReduceOp::PRODUCT) c = a * b;
    if (op == c10d::ReduceOp::MAX) c = at::maximum(a, b);
    if (op == c10d::ReduceOp::MIN) c = at::minimum(a, b);
    acc = c.to(dtype);
  }
  return acc;
}

TEST(DirectGloo, IsThereForGlooGroups) {
  ASSERT_TRUE(accelerate::detail::direct_gloo_available())
      << "this build found no Gloo symbols; the tests below would test nothing";
  run_ranks(2, [](PartialState& state) {
    if (state.direct() == nullptr) throw std::runtime_error("no DirectGloo on a Gloo group");
  });
}

TEST(DirectGloo, ExchangeReducesEveryDtypeInRankOrderOnEveryProcess) {
  const std::vector<c10::ScalarType> dtypes{at::kFloat, at::kDouble, at::kHalf, at::kBFloat16,
                                            at::kInt,   at::kLong,   at::kChar, at::kByte};
  for (int world : {2, 3}) {
    run_ranks(
        world,
        [&](PartialState& state) {
          auto* direct = state.direct();
          const int rank = state.process_index();
          for (auto dtype : dtypes) {
            for (auto op : {c10d::ReduceOp::SUM, c10d::ReduceOp::MAX, c10d::ReduceOp::MIN}) {
              at::Tensor t = operand(rank, 1000, dtype);
              direct->exchange_allreduce_(t, op);
              const auto want = rank_order(world, 1000, dtype, op);
              if (!at::equal(t, want)) {
                throw std::runtime_error("world " + std::to_string(world) + " dtype " +
                                         c10::toString(dtype) + ": wrong result");
              }
            }
          }
          // Products of small integers stay exact.
          at::Tensor p = at::full({7}, rank + 2, at::kLong);
          direct->exchange_allreduce_(p, c10d::ReduceOp::PRODUCT);
          int64_t want = 1;
          for (int r = 0; r < world; ++r) want *= r + 2;
          if (!at::equal(p, at::full({7}, want, at::kLong))) throw std::runtime_error("product");
        },
        bounded());
  }
}

TEST(DirectGloo, MediumMessagesAndTheRingGiveTheSameResults) {
  // 256 KiB takes the medium exchange, 4 MiB the ring; both sum in float32 exactly here
  // (integers well below 2^24).
  for (int world : {2, 3}) {
    run_ranks(
        world,
        [&](PartialState& state) {
          auto* direct = state.direct();
          const int rank = state.process_index();
          for (int64_t n : {int64_t{64} * 1024, int64_t{1} << 20}) {
            auto in = at::arange(n, at::kFloat).remainder(1000) + rank;
            const auto keep = in.clone();
            auto out = at::empty_like(in);
            if (n * 4 <= DirectGloo::kMediumExchangeBytes) {
              if (!direct->exchangeable(in)) throw std::runtime_error("medium not exchangeable");
              out.copy_(in);
              direct->exchange_allreduce_(out, c10d::ReduceOp::SUM);
            } else {
              if (direct->exchangeable(in)) throw std::runtime_error("4 MiB exchangeable");
              direct->ring_allreduce(in, out, c10d::ReduceOp::SUM)->wait();
              if (!at::equal(in, keep)) throw std::runtime_error("the ring wrote its input");
            }
            const auto want = (at::arange(n, at::kFloat).remainder(1000)) * world +
                              static_cast<float>(world * (world - 1) / 2);
            if (!at::equal(out, want))
              throw std::runtime_error("wrong sum, n " + std::to_string(n));
          }
        },
        bounded());
  }
}

TEST(DirectGloo, CallsThatDoNotPairUpAreAnErrorOnEveryProcessNamingBothSides) {
  const auto start = std::chrono::steady_clock::now();
  auto errors = run_ranks_collect(
      2,
      [](PartialState& state) {
        const int rank = state.process_index();
        at::Tensor t = at::ones({rank == 0 ? 3 : 4});
        state.direct()->exchange_allreduce_(t, c10d::ReduceOp::SUM, "reduce");
      },
      bounded());
  for (int rank = 0; rank < 2; ++rank) {
    const auto text = message(errors[static_cast<size_t>(rank)]);
    EXPECT_NE(text.find("'reduce' (call #"), std::string::npos) << text;
    EXPECT_NE(text.find("does not match across processes"), std::string::npos) << text;
    EXPECT_NE(text.find("process 0: call #"), std::string::npos) << text;
    EXPECT_NE(text.find("'reduce' (all-reduce, sum) of shape [3] Float"), std::string::npos)
        << text;
    EXPECT_NE(text.find("'reduce' (all-reduce, sum) of shape [4] Float"), std::string::npos)
        << text;
  }
  errors = run_ranks_collect(
      2,
      [](PartialState& state) {
        at::Tensor t = at::ones({5});
        state.direct()->exchange_allreduce_(
            t, state.process_index() == 0 ? c10d::ReduceOp::SUM : c10d::ReduceOp::MAX);
      },
      bounded());
  for (const auto& e : errors) {
    EXPECT_NE(message(e).find("'all_reduce' (all-reduce, max) of shape [5] Float"),
              std::string::npos)
        << message(e);
  }
  // Found by the header, not by a timeout.
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
}

// A medium or large all-reduce travels on another channel than a small one; without agreeing
// first, one process would wait on one channel and its peer on the other until the timeout.
TEST(DirectGloo, CallsOfEverySizeAgreeInOneSequence) {
  const auto start = std::chrono::steady_clock::now();
  for (int64_t large : {int64_t{100000}, int64_t{1} << 21}) {
    auto errors = run_ranks_collect(
        2,
        [large](PartialState& state) {
          const int rank = state.process_index();
          accelerate::reduce(state, at::ones({rank == 0 ? large : 2}), "sum");
        },
        bounded());
    for (const auto& e : errors) {
      const auto text = message(e);
      EXPECT_NE(text.find("process 0: call #1 'reduce' (all-reduce, sum) of shape [" +
                          std::to_string(large) + "] Float\n"),
                std::string::npos)
          << text;
      EXPECT_NE(text.find("process 1: call #1 'reduce' (all-reduce, sum) of shape [2] Float\n"),
                std::string::npos)
          << text;
    }
  }
  // A barrier against a reduce, and a call made after a mismatch: the group still pairs calls.
  run_ranks(
      3,
      [](PartialState& state) {
        const int rank = state.process_index();
        try {
          if (rank == 2) {
            state.wait_for_everyone();
          } else {
            accelerate::reduce(state, at::ones({3}), "sum");
          }
          throw std::runtime_error("no error");
        } catch (const c10::Error& e) {
          const std::string text = e.what_without_backtrace();
          if (text.find("process 2: call #1 'wait_for_everyone' (barrier)\n") == std::string::npos)
            throw std::runtime_error(text);
        }
        auto sum = accelerate::reduce(state, at::full({1 << 20}, rank + 1.0), "sum");
        if (!at::equal(sum, at::full({1 << 20}, 6.0))) throw std::runtime_error("wrong sum");
      },
      bounded());
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));
}

TEST(DirectGloo, ReduceIsExactFromBytesToMegabytesAndLeavesItsInputAlone) {
  for (int world : {2, 3}) {
    run_ranks(
        world,
        [&](PartialState& state) {
          const int rank = state.process_index();
          for (int64_t n : {int64_t{1}, int64_t{300}, int64_t{100000}, int64_t{3} << 20}) {
            auto t = at::arange(n, at::kFloat).remainder(97) * (rank + 1);
            const auto keep = t.clone();
            auto sum = accelerate::reduce(state, t, "sum");
            auto mean = accelerate::reduce(state, t, "mean");
            const double factor = world * (world + 1) / 2.0;
            const auto want = at::arange(n, at::kFloat).remainder(97) * factor;
            if (!at::equal(sum, want)) throw std::runtime_error("sum, n " + std::to_string(n));
            if (!at::allclose(mean, want / world)) throw std::runtime_error("mean");
            if (!at::equal(t, keep)) throw std::runtime_error("reduce changed its input");
          }
          // Dtypes reduced in a wider type, through the same paths.
          auto flags = at::full({5}, rank == 1, at::kBool);
          auto any = accelerate::detail::all_reduce(state, "t", flags, c10d::ReduceOp::MAX);
          if (any.scalar_type() != at::kBool || !any.all().item<bool>())
            throw std::runtime_error("bool");
          auto bf = at::full({3}, 1.5, at::kBFloat16);
          auto bsum = accelerate::reduce(state, bf, "sum");
          if (bsum.scalar_type() != at::kBFloat16 ||
              !at::equal(bsum, at::full({3}, 1.5 * world, at::kBFloat16)))
            throw std::runtime_error("bfloat16");
        },
        bounded());
  }
}

TEST(DirectGloo, SwitchedOffByTheEnvironmentEverythingStillWorks) {
  // A free port for a real TCPStore: from_environment is what every launched program runs.
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const int port = ntohs(addr.sin_port);
  ::close(fd);
  std::vector<std::exception_ptr> errors(2);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < 2; ++rank) {
    threads.emplace_back([&, rank] {
      try {
        accelerate::EnvMap env{
            {"RANK", std::to_string(rank)},       {"WORLD_SIZE", "2"},
            {"LOCAL_RANK", std::to_string(rank)}, {"LOCAL_WORLD_SIZE", "2"},
            {"MASTER_ADDR", "127.0.0.1"},         {"MASTER_PORT", std::to_string(port)},
            {"ACCELERATE_DIRECT_GLOO", "0"}};
        StateOptions options;
        options.init_kwargs.timeout = std::chrono::seconds(20);
        auto state = PartialState::from_environment(options, env);
        if (state->direct() != nullptr)
          throw std::runtime_error("ACCELERATE_DIRECT_GLOO=0 ignored");
        auto sum = accelerate::reduce(*state, at::full({4}, rank + 1.0), "sum");
        if (!at::equal(sum, at::full({4}, 3.0))) throw std::runtime_error("sum without DirectGloo");
        // Fingerprints travel through the process group's all-gather: a mismatch is still an
        // error on both, listing both calls, and the group keeps working afterwards.
        try {
          accelerate::gather(*state, at::ones({rank + 2}));
          throw std::runtime_error("no error for gathers of different shapes");
        } catch (const c10::Error& e) {
          const std::string text = e.what_without_backtrace();
          for (const char* part : {"collective 'gather' (call #",
                                   ": call #2 'gather' (all-gather) of shape [2] Float\n",
                                   ": call #2 'gather' (all-gather) of shape [3] Float\n"}) {
            if (text.find(part) == std::string::npos)
              throw std::runtime_error("missing '" + std::string(part) + "' in: " + text);
          }
        }
        sum = accelerate::reduce(*state, at::full({4}, rank + 1.0), "sum");
        if (!at::equal(sum, at::full({4}, 3.0))) throw std::runtime_error("sum after mismatch");
      } catch (...) {
        errors[static_cast<size_t>(rank)] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& e : errors) EXPECT_EQ(message(e), "");
}

}  // namespace
