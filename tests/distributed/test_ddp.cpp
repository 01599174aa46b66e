// GradientSynchronizer across 2 and 3 ranks run as threads over a HashStore. Every rank builds
// its model from a different seed (so only the initial broadcast can make them agree) and trains
// on its own batch; the expected gradients are computed in each rank without any
// synchronization, from copies of the synchronized model, and compared to 1e-6.

#include <accelerate/ddp.h>
#include <accelerate/state.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "thread_ranks.h"

#include <algorithm>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using accelerate::GradientSynchronizer;
using accelerate::PartialState;
using accelerate::StateOptions;
using accelerate::testing::message;
using accelerate::testing::run_ranks;
using accelerate::testing::run_ranks_collect;

constexpr double kTol = 1e-6;

// A failing rank would leave the others in a collective; this bounds how long.
accelerate::testing::RankOptions bounded() {
  StateOptions options;
  options.init_kwargs.timeout = std::chrono::seconds(20);
  return {.state = options};
}

// The global generator is shared by the rank threads: every draw from it, model initialization
// included, happens under this lock (at namespace scope: a static inside the template would be
// one mutex per instantiation).
std::mutex generator_mutex;

template <class F>
auto seeded(uint64_t seed, F&& fn) {
  std::lock_guard<std::mutex> lock(generator_mutex);
  torch::manual_seed(seed);
  return fn();
}

struct MlpImpl : torch::nn::Module {
  explicit MlpImpl(int64_t hidden = 16)
      : fc1(register_module("fc1", torch::nn::Linear(8, hidden))),
        fc2(register_module("fc2", torch::nn::Linear(hidden, 4))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::tanh(fc1(x))); }
  torch::nn::Linear fc1, fc2;
};

std::shared_ptr<MlpImpl> make_mlp(uint64_t seed, int64_t hidden = 16) {
  return seeded(seed, [&] { return std::make_shared<MlpImpl>(hidden); });
}

torch::Tensor batch(int rank) {
  return seeded(1000 + static_cast<uint64_t>(rank), [] { return torch::randn({5, 8}); });
}

torch::Tensor loss_of(const torch::Tensor& out) {
  return out.pow(2).mean();
}

std::shared_ptr<torch::nn::Module> as_module(const std::shared_ptr<MlpImpl>& m) {
  return m;
}

void copy_parameters(torch::nn::Module& dst, const torch::nn::Module& src) {
  torch::NoGradGuard no_grad;
  auto d = dst.parameters();
  auto s = src.parameters();
  for (size_t i = 0; i < d.size(); ++i) d[i].copy_(s[i]);
}

std::vector<torch::Tensor> grads_of(const torch::nn::Module& m) {
  std::vector<torch::Tensor> out;
  for (const auto& p : m.parameters())
    out.push_back(p.grad().defined() ? p.grad().clone() : p.grad());
  return out;
}

void zero_grads(torch::nn::Module& m) {
  for (auto& p : m.parameters()) {
    if (p.grad().defined()) p.mutable_grad().zero_();
  }
}

// The gradients `model`'s current parameters get from `run` on each of the `world` batches,
// without synchronization, averaged.
std::vector<torch::Tensor> mean_local_grads(
    const MlpImpl& model, int world, const std::function<torch::Tensor(MlpImpl&, int)>& run,
    const std::function<void(MlpImpl&)>& prepare = [](MlpImpl&) {}) {
  std::vector<torch::Tensor> sum;
  for (int r = 0; r < world; ++r) {
    auto copy = make_mlp(0, model.fc1->options.out_features());
    prepare(*copy);
    copy_parameters(*copy, model);
    run(*copy, r).backward();
    auto g = grads_of(*copy);
    if (sum.empty()) {
      sum = g;
    } else {
      for (size_t i = 0; i < g.size(); ++i) sum[i] += g[i];
    }
  }
  for (auto& s : sum) s /= world;
  return sum;
}

torch::Tensor run_mlp(MlpImpl& m, int rank) {
  return loss_of(m.forward(batch(rank)));
}

// Throws (and so fails the rank) when the tensors differ by more than `tol`.
void check_close(const std::vector<torch::Tensor>& got, const std::vector<torch::Tensor>& want,
                 const std::string& what, double tol = kTol) {
  if (got.size() != want.size()) throw std::runtime_error(what + ": different counts");
  for (size_t i = 0; i < got.size(); ++i) {
    if (!got[i].defined() || !want[i].defined()) {
      if (got[i].defined() != want[i].defined()) {
        throw std::runtime_error(what + ": tensor " + std::to_string(i) +
                                 " defined on one side only");
      }
      continue;
    }
    const double diff =
        (got[i].to(torch::kDouble) - want[i].to(torch::kDouble)).abs().max().item<double>();
    if (diff > tol) {
      throw std::runtime_error(what + ": tensor " + std::to_string(i) + " differs by " +
                               std::to_string(diff));
    }
  }
}

torch::nn::Sequential make_sequential(uint64_t seed) {
  return seeded(seed, [] {
    torch::nn::Sequential seq;
    seq->push_back(torch::nn::Linear(8, 16));
    seq->push_back(torch::nn::BatchNorm1d(16));
    seq->push_back(torch::nn::Linear(16, 4));
    return seq;
  });
}

TEST(Ddp, ConstructionGivesEveryProcessTheParametersAndBuffersOfProcessZero) {
  for (int world : {2, 3}) {
    std::vector<std::vector<torch::Tensor>> seen(static_cast<size_t>(world));
    run_ranks(world, [&](PartialState& state) {
      auto model = make_sequential(10 + static_cast<uint64_t>(state.process_index()));
      {
        torch::NoGradGuard no_grad;
        for (auto& b : model->buffers()) b.add_(state.process_index() + 1);
      }
      GradientSynchronizer sync(model.ptr(), state.shared_from_this());
      auto& mine = seen[static_cast<size_t>(state.process_index())];
      for (const auto& p : model->parameters()) mine.push_back(p.detach().clone());
      for (const auto& b : model->buffers()) mine.push_back(b.clone());
    });
    ASSERT_TRUE(torch::equal(seen[0][0], make_sequential(10)->parameters()[0]))
        << "process 0 must keep its own weights";
    ASSERT_FALSE(torch::equal(seen[0][0], make_sequential(11)->parameters()[0]))
        << "the seeds must give different weights, or this test proves nothing";
    for (int r = 1; r < world; ++r) {
      ASSERT_EQ(seen[static_cast<size_t>(r)].size(), seen[0].size());
      for (size_t i = 0; i < seen[0].size(); ++i) {
        EXPECT_TRUE(torch::equal(seen[static_cast<size_t>(r)][i], seen[0][i]))
            << "world " << world << " rank " << r << " tensor " << i;
      }
    }
  }
}

TEST(Ddp, BackwardAveragesGradientsOverProcesses) {
  for (int world : {2, 3}) {
    EXPECT_NO_THROW(run_ranks(
        world,
        [&](PartialState& state) {
          auto model = make_mlp(20 + static_cast<uint64_t>(state.process_index()));
          GradientSynchronizer sync(as_module(model), state.shared_from_this());
          EXPECT_TRUE(sync.active());
          const auto want = mean_local_grads(*model, world, run_mlp);
          run_mlp(*model, state.process_index()).backward();
          check_close(grads_of(*model), want, "first step");
          // Already finalized by backward: nothing more to do, nothing changes.
          const auto launched = sync.num_allreduces_launched();
          sync.finalize();
          EXPECT_EQ(sync.num_allreduces_launched(), launched);
          check_close(grads_of(*model), want, "after finalize()");
          // A second step accumulates onto the averaged gradients.
          run_mlp(*model, state.process_index()).backward();
          auto twice = want;
          for (auto& t : twice) t = t * 2;
          check_close(grads_of(*model), twice, "second step");
        },
        bounded()))
        << "world " << world;
  }
}

TEST(Ddp, TinyBucketsHoldOneParameterEachInReverseRegistrationOrder) {
  for (int world : {2, 3}) {
    EXPECT_NO_THROW(run_ranks(
        world,
        [&](PartialState& state) {
          auto model = make_mlp(30 + static_cast<uint64_t>(state.process_index()));
          // 10 bytes: every parameter fills a bucket on its own.
          GradientSynchronizer sync(as_module(model), state.shared_from_this(),
                                    {.bucket_cap_mb = 0.00001});
          const std::vector<std::vector<std::string>> expected{
              {"fc2.bias"}, {"fc2.weight"}, {"fc1.bias"}, {"fc1.weight"}};
          if (sync.bucket_parameter_names() != expected) throw std::runtime_error("bucket order");
          EXPECT_EQ(sync.num_buckets(), 4U);
          const auto want = mean_local_grads(*model, world, run_mlp);
          const auto before = sync.num_allreduces_launched();
          run_mlp(*model, state.process_index()).backward();
          EXPECT_EQ(sync.num_allreduces_launched() - before, 4);
          check_close(grads_of(*model), want, "tiny buckets");
        },
        bounded()))
        << "world " << world;
  }
}

TEST(Ddp, DefaultBucketsGroupByDtype) {
  run_ranks(
      2,
      [&](PartialState& state) {
        auto model = make_mlp(40 + static_cast<uint64_t>(state.process_index()));
        model->fc1->to(torch::kDouble);
        GradientSynchronizer sync(as_module(model), state.shared_from_this());
        const std::vector<std::vector<std::string>> expected{{"fc2.bias", "fc2.weight"},
                                                             {"fc1.bias", "fc1.weight"}};
        if (sync.bucket_parameter_names() != expected) throw std::runtime_error("dtype buckets");
        auto run = [](MlpImpl& m, int rank) {
          return loss_of(
              m.fc2(torch::tanh(m.fc1(batch(rank).to(torch::kDouble))).to(torch::kFloat)));
        };
        const auto want =
            mean_local_grads(*model, 2, run, [](MlpImpl& m) { m.fc1->to(torch::kDouble); });
        run(*model, state.process_index()).backward();
        check_close(grads_of(*model), want, "mixed dtypes");
        if (model->fc1->weight.grad().scalar_type() != torch::kDouble)
          throw std::runtime_error("dtype");
      },
      bounded());
}

// Records how many all-reduces the synchronizer had launched when backward reached it.
struct LaunchProbe : torch::autograd::Function<LaunchProbe> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const GradientSynchronizer* sync, int64_t* seen) {
    ctx->saved_data["sync"] = reinterpret_cast<int64_t>(sync);
    ctx->saved_data["seen"] = reinterpret_cast<int64_t>(seen);
    return x.clone();
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto* sync = reinterpret_cast<const GradientSynchronizer*>(ctx->saved_data["sync"].toInt());
    *reinterpret_cast<int64_t*>(ctx->saved_data["seen"].toInt()) = sync->num_allreduces_launched();
    return {grads[0], torch::Tensor(), torch::Tensor()};
  }
};

TEST(Ddp, FirstAllReducesStartWhileBackwardIsStillRunning) {
  run_ranks(
      2,
      [&](PartialState& state) {
        auto model = make_mlp(50 + static_cast<uint64_t>(state.process_index()));
        GradientSynchronizer sync(as_module(model), state.shared_from_this(),
                                  {.bucket_cap_mb = 0.00001});
        // fc1 -> probe -> fc2: backward reaches the probe after fc2's gradients and before fc1's.
        int64_t at_probe = -1;
        auto run = [&](MlpImpl& m, int rank) {
          auto h = LaunchProbe::apply(m.fc1(batch(rank)), &sync, &at_probe);
          return loss_of(m.fc2(torch::tanh(h)));
        };
        const auto start = sync.num_allreduces_launched();
        run(*model, state.process_index()).backward();
        const auto total = sync.num_allreduces_launched() - start;
        if (at_probe < 0) throw std::runtime_error("the probe did not run");
        // fc2's two buckets went out before backward reached fc1; fc1's two after.
        EXPECT_EQ(at_probe - start, 2);
        EXPECT_EQ(total, 4);
      },
      bounded());
}

struct TwoBranchesImpl : torch::nn::Module {
  TwoBranchesImpl()
      : a(register_module("a", torch::nn::Linear(8, 3))),
        b(register_module("b", torch::nn::Linear(8, 5))) {}
  // Autograd runs the branch built last first, so `a_first` decides which branch's gradients
  // arrive first.
  torch::Tensor forward(const torch::Tensor& x, bool a_first) {
    if (a_first) {
      auto ya = a(x).pow(2).sum();
      return ya + b(x).pow(2).sum();
    }
    auto yb = b(x).pow(2).sum();
    return a(x).pow(2).sum() + yb;
  }
  torch::nn::Linear a, b;
};

// Fails in backward when its flag is set, after the layers above it got their gradients.
struct FailingBackward : torch::autograd::Function<FailingBackward> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               bool fail) {
    ctx->saved_data["fail"] = fail;
    return x.clone();
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (ctx->saved_data["fail"].toBool()) throw std::runtime_error("injected backward failure");
    return {grads[0], torch::Tensor()};
  }
};

TEST(Ddp, AFailedBackwardDoesNotPoisonTheNextOne) {
  run_ranks(
      2,
      [&](PartialState& state) {
        const int rank = state.process_index();
        auto model = make_mlp(57 + static_cast<uint64_t>(rank));
        GradientSynchronizer sync(as_module(model), state.shared_from_this(),
                                  {.bucket_cap_mb = 0.00001});
        auto run = [](MlpImpl& m, int r, bool fail) {
          auto h = FailingBackward::apply(m.fc1(batch(r)), fail);
          return loss_of(m.fc2(torch::tanh(h)));
        };
        const auto launched = sync.num_allreduces_launched();
        bool failed = false;
        try {
          run(*model, rank, true).backward();
        } catch (const std::exception& e) {
          failed = std::string(e.what()).find("injected backward failure") != std::string::npos;
        }
        if (!failed) throw std::runtime_error("the injected failure did not surface");
        // fc2's buckets went out before the failure; their results are dropped.
        EXPECT_EQ(sync.num_allreduces_launched() - launched, 2);
        zero_grads(*model);
        const auto want =
            mean_local_grads(*model, 2, [&](MlpImpl& m, int r) { return run(m, r, false); });
        run(*model, rank, false).backward();
        check_close(grads_of(*model), want, "the step after a failed backward");
      },
      bounded());
}

TEST(Ddp, BucketsLaunchInOneOrderWhicheverGradientsArriveFirst) {
  const int world = 2;
  run_ranks(
      world,
      [&](PartialState& state) {
        const int rank = state.process_index();
        auto model = seeded(55 + static_cast<uint64_t>(rank),
                            [] { return std::make_shared<TwoBranchesImpl>(); });
        // One bucket per parameter, of four different sizes: were they launched in arrival
        // order, the two processes would pair all-reduces of different buckets.
        GradientSynchronizer sync(model, state.shared_from_this(), {.bucket_cap_mb = 0.00001});
        std::vector<torch::Tensor> want;
        for (int r = 0; r < world; ++r) {
          auto copy = seeded(0, [] { return std::make_shared<TwoBranchesImpl>(); });
          copy_parameters(*copy, *model);
          copy->forward(batch(r), r == 0).backward();
          auto g = grads_of(*copy);
          if (want.empty()) {
            want = g;
          } else {
            for (size_t i = 0; i < g.size(); ++i) want[i] += g[i];
          }
        }
        for (auto& t : want) t /= world;
        model->forward(batch(rank), rank == 0).backward();
        check_close(grads_of(*model), want, "arrival order differs between processes");
      },
      bounded());
}

TEST(Ddp, NoSyncAccumulatesLocallyAndTheNextSyncAveragesTheSum) {
  run_ranks(
      2,
      [&](PartialState& state) {
        const int rank = state.process_index();
        auto model = make_mlp(60 + static_cast<uint64_t>(rank));
        GradientSynchronizer sync(as_module(model), state.shared_from_this());
        auto local = [&](int r) {
          auto copy = make_mlp(0);
          copy_parameters(*copy, *model);
          run_mlp(*copy, r).backward();
          return grads_of(*copy);
        };
        const auto a = local(rank);
        const auto launched = sync.num_allreduces_launched();
        {
          auto guard = sync.no_sync();
          EXPECT_FALSE(sync.require_sync());
          run_mlp(*model, rank).backward();
        }
        EXPECT_TRUE(sync.require_sync());
        EXPECT_EQ(sync.num_allreduces_launched(), launched);
        check_close(grads_of(*model), a, "no_sync keeps local gradients");
        // The two ranks' local gradients differ, so this proves nothing was averaged.
        const auto other = local(1 - rank);
        if ((a[0] - other[0]).abs().max().item<double>() < 1e-3)
          throw std::runtime_error("batches");

        sync.set_require_sync(true);
        run_mlp(*model, 2 + rank).backward();  // a different batch for the synced step
        std::vector<torch::Tensor> want;
        const auto a0 = local(0), a1 = local(1), b0 = local(2), b1 = local(3);
        for (size_t i = 0; i < a0.size(); ++i) want.push_back((a0[i] + a1[i] + b0[i] + b1[i]) / 2);
        check_close(grads_of(*model), want, "sync after accumulation");
      },
      bounded());
}

struct BranchyImpl : torch::nn::Module {
  BranchyImpl()
      : trunk(register_module("trunk", torch::nn::Linear(8, 4))),
        sometimes(register_module("sometimes", torch::nn::Linear(8, 4))),
        never(register_module("never", torch::nn::Linear(8, 4))) {}
  torch::Tensor forward(const torch::Tensor& x, bool use_sometimes, bool use_all = false) {
    auto y = trunk(x);
    if (use_sometimes || use_all) y = y + sometimes(x);
    if (use_all) y = y + never(x);
    return y;
  }
  torch::nn::Linear trunk, sometimes, never;
};

TEST(Ddp, FindUnusedParametersAveragesWhatEachProcessUsed) {
  const int world = 3;
  run_ranks(
      world,
      [&](PartialState& state) {
        const int rank = state.process_index();
        auto model = seeded(70 + static_cast<uint64_t>(rank),
                            [] { return std::make_shared<BranchyImpl>(); });
        GradientSynchronizer sync(model, state.shared_from_this(),
                                  {.find_unused_parameters = true});
        // Process 1 skips `sometimes`; nobody uses `never`.
        std::vector<torch::Tensor> want;
        for (int r = 0; r < world; ++r) {
          auto copy = seeded(0, [] { return std::make_shared<BranchyImpl>(); });
          copy_parameters(*copy, *model);
          loss_of(copy->forward(batch(r), r != 1)).backward();
          auto g = grads_of(*copy);
          if (want.empty()) {
            want = g;
          } else {
            for (size_t i = 0; i < g.size(); ++i) {
              if (g[i].defined()) want[i] = want[i].defined() ? want[i] + g[i] : g[i];
            }
          }
        }
        for (auto& t : want) {
          if (t.defined()) t = t / world;
        }
        for (int step = 0; step < 2; ++step) {
          zero_grads(*model);
          loss_of(model->forward(batch(rank), rank != 1)).backward();
          check_close(grads_of(*model), want, "step " + std::to_string(step));
          if (model->never->weight.grad().defined())
            throw std::runtime_error("`never` got a gradient");
          if (!model->sometimes->weight.grad().defined()) throw std::runtime_error("`sometimes`");
        }
      },
      bounded());
}

TEST(Ddp, UnusedParameterWithoutTheFlagIsAnErrorOnEveryProcess) {
  const auto start = std::chrono::steady_clock::now();
  const int world = 2;
  std::vector<int> recovered(world, 0);
  auto errors = run_ranks_collect(
      world,
      [&](PartialState& state) {
        const int rank = state.process_index();
        auto model = seeded(80 + static_cast<uint64_t>(rank),
                            [] { return std::make_shared<BranchyImpl>(); });
        GradientSynchronizer sync(model, state.shared_from_this());
        std::string error;
        try {
          loss_of(model->forward(batch(rank), rank == 0)).backward();
        } catch (const std::exception& e) {
          error = e.what();
        }
        // The next step, with every parameter used, is averaged normally.
        zero_grads(*model);
        auto run = [](BranchyImpl& m, int r) { return loss_of(m.forward(batch(r), true, true)); };
        std::vector<torch::Tensor> want;
        for (int r = 0; r < world; ++r) {
          auto copy = seeded(0, [] { return std::make_shared<BranchyImpl>(); });
          copy_parameters(*copy, *model);
          run(*copy, r).backward();
          auto g = grads_of(*copy);
          if (want.empty()) {
            want = g;
          } else {
            for (size_t i = 0; i < g.size(); ++i) want[i] = want[i] + g[i];
          }
        }
        for (auto& t : want) t = t / world;
        run(*model, rank).backward();
        check_close(grads_of(*model), want, "step after the error");
        recovered[static_cast<size_t>(rank)] = 1;
        if (!error.empty()) throw std::runtime_error(error);
      },
      bounded());
  for (int r = 0; r < world; ++r) {
    const auto what = message(errors[static_cast<size_t>(r)]);
    EXPECT_NE(what.find("received no gradient"), std::string::npos) << "rank " << r << ": " << what;
    EXPECT_NE(what.find("'sometimes.weight' (on 1 of 2 processes"), std::string::npos) << what;
    EXPECT_NE(what.find("'never.weight' (on 2 of 2 processes"), std::string::npos) << what;
    EXPECT_NE(what.find("find_unused_parameters = true"), std::string::npos) << what;
    EXPECT_EQ(what.find("'trunk.weight'"), std::string::npos) << what;
    EXPECT_TRUE(recovered[static_cast<size_t>(r)]) << "rank " << r;
  }
  // Far below the 20 s collective timeout: nobody waited for a partner that never came.
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
}

TEST(Ddp, GradientAsBucketViewAveragesAndAliasesTheBucket) {
  run_ranks(
      2,
      [&](PartialState& state) {
        const int rank = state.process_index();
        auto model = make_mlp(90 + static_cast<uint64_t>(rank));
        GradientSynchronizer sync(as_module(model), state.shared_from_this(),
                                  {.gradient_as_bucket_view = true});
        const auto want = mean_local_grads(*model, 2, run_mlp);
        // Only zero_grad(): the parameters must stay where `want` was computed.
        torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1));
        for (int step = 0; step < 4; ++step) {
          if (step == 2) {
            // set_to_none, as LibTorch 2.x's zero_grad() does: the next gradient is copied in
            // again.
            for (auto& p : model->parameters()) p.mutable_grad() = torch::Tensor();
          } else if (step == 3) {
            zero_grads(*model);
          } else {
            optimizer.zero_grad();  // 1.13 detaches the gradient in place first
          }
          run_mlp(*model, rank).backward();
          check_close(grads_of(*model), want, "step " + std::to_string(step));
          // One bucket: every gradient is a view of the same buffer.
          const auto& first = model->fc2->bias.grad();
          for (const auto& p : model->parameters()) {
            if (!p.grad().is_alias_of(first)) throw std::runtime_error("not a bucket view");
          }
        }
      },
      bounded());
}

TEST(Ddp, BFloat16GradientsAreAveragedInFloat) {
  run_ranks(
      2,
      [&](PartialState& state) {
        const int rank = state.process_index();
        auto model = make_mlp(100 + static_cast<uint64_t>(rank));
        model->to(torch::kBFloat16);
        GradientSynchronizer sync(as_module(model), state.shared_from_this());
        auto run = [](MlpImpl& m, int r) {
          return loss_of(m.forward(batch(r).to(torch::kBFloat16)));
        };
        std::vector<torch::Tensor> g[2];
        for (int r = 0; r < 2; ++r) {
          auto copy = make_mlp(0);
          copy->to(torch::kBFloat16);
          copy_parameters(*copy, *model);
          run(*copy, r).backward();
          g[r] = grads_of(*copy);
        }
        std::vector<torch::Tensor> want;
        for (size_t i = 0; i < g[0].size(); ++i) {
          want.push_back(
              ((g[0][i].to(torch::kFloat) + g[1][i].to(torch::kFloat)) / 2).to(torch::kBFloat16));
        }
        run(*model, rank).backward();
        check_close(grads_of(*model), want, "bfloat16", 0.0);
        if (model->fc1->weight.grad().scalar_type() != torch::kBFloat16)
          throw std::runtime_error("dtype");
      },
      bounded());
}

TEST(Ddp, DestroyedSynchronizerLeavesBackwardLocal) {
  run_ranks(
      2,
      [&](PartialState& state) {
        const int rank = state.process_index();
        auto model = make_mlp(110 + static_cast<uint64_t>(rank));
        auto loss = [&] {
          GradientSynchronizer sync(as_module(model), state.shared_from_this());
          run_mlp(*model, rank).backward();
          // A graph built while the synchronizer lives, run after it is gone.
          return run_mlp(*model, rank);
        }();
        zero_grads(*model);
        auto copy = make_mlp(0);
        copy_parameters(*copy, *model);
        run_mlp(*copy, rank).backward();
        loss.backward();
        check_close(grads_of(*model), grads_of(*copy), "after destruction");
        zero_grads(*model);
        zero_grads(*copy);
        run_mlp(*model, rank).backward();
        run_mlp(*copy, rank).backward();
        check_close(grads_of(*model), grads_of(*copy), "a fresh graph");
      },
      bounded());
}

TEST(Ddp, DifferentModelsAreAnErrorOnEveryProcess) {
  auto errors = run_ranks_collect(
      2,
      [&](PartialState& state) {
        auto model = make_mlp(120, state.process_index() == 0 ? 16 : 17);
        GradientSynchronizer sync(as_module(model), state.shared_from_this());
      },
      bounded());
  for (int r = 0; r < 2; ++r) {
    const auto what = message(errors[static_cast<size_t>(r)]);
    EXPECT_NE(what.find("the model differs between processes"), std::string::npos) << what;
    EXPECT_NE(what.find("'fc1.weight' parameter Float [16, 8]"), std::string::npos) << what;
    EXPECT_NE(what.find("'fc1.weight' parameter Float [17, 8]"), std::string::npos) << what;
  }
}

TEST(Ddp, BroadcastBuffersCopiesProcessZerosBuffers) {
  std::vector<std::vector<torch::Tensor>> seen(3);
  run_ranks(
      3,
      [&](PartialState& state) {
        auto model = seeded(130, [] {
          return torch::nn::Sequential(torch::nn::Linear(8, 16), torch::nn::BatchNorm1d(16));
        });
        GradientSynchronizer sync(model.ptr(), state.shared_from_this());
        model->forward(batch(state.process_index()));  // training mode: running stats diverge
        sync.broadcast_buffers();
        for (const auto& b : model->buffers())
          seen[static_cast<size_t>(state.process_index())].push_back(b.clone());
      },
      bounded());
  ASSERT_EQ(seen[0].size(), 3U);  // running_mean, running_var, num_batches_tracked
  EXPECT_EQ(seen[0][2].item<int64_t>(), 1);
  for (int r = 1; r < 3; ++r) {
    for (size_t i = 0; i < seen[0].size(); ++i)
      EXPECT_TRUE(torch::equal(seen[static_cast<size_t>(r)][i], seen[0][i]));
  }
}

TEST(Ddp, SingleProcessIsANoOp) {
  run_ranks(1, [&](PartialState& state) {
    auto model = make_mlp(140);
    auto before = model->fc1->weight.detach().clone();
    GradientSynchronizer sync(as_module(model), state.shared_from_this());
    EXPECT_FALSE(sync.active());
    EXPECT_EQ(sync.num_buckets(), 1U);
    EXPECT_TRUE(torch::equal(model->fc1->weight, before));
    auto copy = make_mlp(0);
    copy_parameters(*copy, *model);
    run_mlp(*model, 0).backward();
    run_mlp(*copy, 0).backward();
    sync.finalize();
    sync.broadcast_buffers();
    check_close(grads_of(*model), grads_of(*copy), "single process", 0.0);
    EXPECT_EQ(sync.num_allreduces_launched(), 0);
  });
}

TEST(Ddp, RejectsANonPositiveBucketCap) {
  run_ranks(1, [&](PartialState& state) {
    EXPECT_THROW(GradientSynchronizer(as_module(make_mlp(1)), state.shared_from_this(),
                                      {.bucket_cap_mb = 0}),
                 c10::Error);
  });
}

// DDP's bucket assignment (torch.distributed's compute_bucket_assignment_by_size), stated
// independently of ddp.cpp: parameters in reverse registration order, grouped by dtype; a
// group's bucket is emitted by the parameter that brings it to its limit, that parameter
// included; each group's first limit is min(1 MiB, cap), later ones the cap; buckets left open
// at the end follow in the order of their first parameter.
std::vector<std::vector<std::string>> ddp_rule(const torch::nn::Module& model, double cap_mb) {
  const auto cap = static_cast<int64_t>(cap_mb * 1024 * 1024);
  struct Open {
    std::vector<std::string> names;
    int64_t bytes = 0;
    int64_t limit = 0;
  };
  std::map<c10::ScalarType, Open> open;
  std::vector<c10::ScalarType> open_order;
  std::vector<std::vector<std::string>> out;
  const auto named_dict = model.named_parameters();
  std::vector<std::pair<std::string, torch::Tensor>> named;
  for (const auto& item : named_dict) named.emplace_back(item.key(), item.value());
  for (auto it = named.rbegin(); it != named.rend(); ++it) {
    const auto& t = it->second;
    // Gloo buckets 16-bit gradients in float32.
    const auto dtype = t.scalar_type() == torch::kBFloat16 || t.scalar_type() == torch::kHalf
                           ? torch::kFloat
                           : t.scalar_type();
    if (open.count(dtype) == 0) open[dtype].limit = std::min<int64_t>(cap, 1024 * 1024);
    auto& o = open[dtype];
    if (o.names.empty()) open_order.push_back(dtype);
    o.names.push_back(it->first);
    o.bytes += t.numel() * static_cast<int64_t>(c10::elementSize(dtype));
    if (o.bytes >= o.limit) {
      out.push_back(o.names);
      o.names.clear();
      o.bytes = 0;
      o.limit = cap;
      open_order.erase(std::find(open_order.begin(), open_order.end(), dtype));
    }
  }
  for (auto dtype : open_order) out.push_back(open[dtype].names);
  return out;
}

TEST(Ddp, BucketsFollowDdpsAssignmentRule) {
  // Layer sizes around the 1 MiB first bucket and the caps of the grid.
  auto model = seeded(150, [] {
    torch::nn::Sequential seq;
    seq->push_back(torch::nn::Linear(512, 512));   // 1 MiB weight
    seq->push_back(torch::nn::Linear(512, 300));   // 600 KiB
    seq->push_back(torch::nn::Linear(300, 1000));  // 1.14 MiB
    seq->push_back(torch::nn::Linear(1000, 64));   // 250 KiB
    seq->push_back(torch::nn::Linear(64, 2));      // 512 B
    return seq;
  });
  auto mixed = seeded(151, [] {
    torch::nn::Sequential seq;
    seq->push_back(torch::nn::Linear(300, 300));
    seq->push_back(torch::nn::Linear(300, 400));
    seq->push_back(torch::nn::Linear(400, 200));
    return seq;
  });
  mixed[1]->to(torch::kDouble);
  run_ranks(
      2,
      [&](PartialState& state) {
        size_t checked = 0;
        for (auto* m : {&model, &mixed}) {
          for (double cap : {0.00001, 0.001, 0.3, 0.7, 1.0, 1.5, 2.0, 25.0}) {
            GradientSynchronizer sync(m->ptr(), state.shared_from_this(), {.bucket_cap_mb = cap});
            const auto want = ddp_rule(**m, cap);
            if (sync.bucket_parameter_names() != want) {
              throw std::runtime_error("cap " + std::to_string(cap) + ": buckets differ");
            }
            checked += want.size();
          }
        }
        // The grid must produce more than one bucket somewhere, or it proves little.
        if (checked < 40) throw std::runtime_error("grid too coarse");
      },
      bounded());
}

TEST(Ddp, GradientsAreBucketViewsYetAGradientKeptFromAnEarlierStepKeepsItsValue) {
  for (bool as_view : {false, true}) {
    run_ranks(
        2,
        [&](PartialState& state) {
          const int rank = state.process_index();
          auto model = make_mlp(160 + static_cast<uint64_t>(rank));
          GradientSynchronizer sync(as_module(model), state.shared_from_this(),
                                    {.gradient_as_bucket_view = as_view});
          const auto want = mean_local_grads(*model, 2, run_mlp);
          run_mlp(*model, rank).backward();
          check_close(grads_of(*model), want, "first step");
          // Every gradient is a view of the one bucket: nothing was copied back.
          const auto first = model->fc2->bias.grad();
          for (const auto& p : model->parameters()) {
            if (!p.grad().is_alias_of(first)) throw std::runtime_error("not a bucket view");
          }
          // Kept past zero_grad(set_to_none), then a backward on other data.
          const at::Tensor kept = model->fc1->weight.grad();
          const at::Tensor value = kept.clone();
          for (auto& p : model->parameters()) p.mutable_grad() = torch::Tensor();
          auto other = [](MlpImpl& m, int r) { return loss_of(m.forward(batch(r + 7))); };
          const auto want2 = mean_local_grads(*model, 2, other);
          other(*model, rank).backward();
          check_close(grads_of(*model), want2, "second step");
          const bool unchanged = at::equal(kept, value);
          if (!as_view && !unchanged) throw std::runtime_error("the kept gradient changed");
          // With gradient_as_bucket_view the next synchronization overwrites it, as in DDP.
          if (as_view && unchanged) throw std::runtime_error("the kept gradient is no view");
          if (!as_view && kept.is_alias_of(model->fc1->weight.grad()))
            throw std::runtime_error("the bucket did not move away from the kept gradient");
          // Gradients zeroed in place (zero_grad without set_to_none) stay the bucket: autograd
          // accumulates into it, and the bucket does not move (nothing outside holds it).
          const at::Tensor installed = model->fc2->weight.grad();
          zero_grads(*model);
          run_mlp(*model, rank).backward();
          check_close(grads_of(*model), want, "third step, zeroed in place");
          if (!model->fc2->weight.grad().is_same(installed))
            throw std::runtime_error("the in-place gradient was replaced");
        },
        bounded());
  }
}

TEST(Ddp, StatsCountStepsCommunicationAndTheShareHiddenBehindBackward) {
  run_ranks(
      2,
      [&](PartialState& state) {
        const int rank = state.process_index();
        auto model = make_mlp(170 + static_cast<uint64_t>(rank), 64);
        GradientSynchronizer sync(as_module(model), state.shared_from_this(),
                                  {.bucket_cap_mb = 0.00001});
        for (int step = 0; step < 4; ++step) {
          run_mlp(*model, rank).backward();
          if (step == 1) {
            auto local = sync.no_sync();
            run_mlp(*model, rank).backward();  // not a synchronized step
          }
        }
        const auto s = sync.stats();
        if (s.synchronized_steps != 4) throw std::runtime_error("steps");
        if (!(s.communication_seconds > 0) || s.hidden_seconds < 0 ||
            s.hidden_seconds > s.communication_seconds + 1e-9 || !(s.exposed_seconds > 0))
          throw std::runtime_error("implausible timings");
        sync.reset_stats();
        if (sync.stats().synchronized_steps != 0) throw std::runtime_error("reset");
      },
      bounded());
}

}  // namespace
