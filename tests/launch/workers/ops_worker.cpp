// Started as N processes by `accelerate launch -n N`: runs every operation of operations.h and
// the process-control calls of PartialState / random.h through PartialState::shared() and checks
// exact values derived from the rank and world size.
//   ops_worker                   -> "ops_worker rank R/N: OK" and exit 0 iff every check passed;
//                                   each failed check is printed to stderr, and the exit is 1.
//   ops_worker --debug-mismatch  -> (with ACCELERATE_DEBUG_MODE=1) gathers a tensor whose shape
//                                   depends on the rank, prints "MISMATCH: <error>" and exits 0
//                                   iff the error names 'gather' and every rank's shape.

#include <accelerate/operations.h>
#include <accelerate/random.h>
#include <accelerate/state.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include <chrono>
#include <cstring>
#include <exception>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace worker {
struct Outputs {
  at::Tensor logits;
  std::vector<at::Tensor> hidden;
  std::optional<at::Tensor> loss;
};
}  // namespace worker

ACCELERATE_TENSOR_FIELDS(worker::Outputs, logits, hidden, loss);

namespace {

at::Tensor longs(std::vector<int64_t> values) {
  return at::tensor(values, at::kLong);
}
at::Tensor range(int64_t from, int64_t to) {
  return at::arange(from, to, at::kLong);
}

std::string message_of(const std::exception& e) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) {
    return c10_error->what_without_backtrace();
  }
  return e.what();
}

class Checks {
 public:
  explicit Checks(int rank) : rank_(rank) {}

  void expect(bool ok, const std::string& what) {
    if (ok) return;
    ++failures_;
    std::ostringstream out;
    out << "ops_worker rank " << rank_ << ": FAILED " << what << "\n";
    std::cerr << out.str() << std::flush;
  }

  void same(const at::Tensor& got, const at::Tensor& want, const std::string& what) {
    const bool ok = got.defined() && got.scalar_type() == want.scalar_type() &&
                    got.sizes() == want.sizes() && at::equal(got, want);
    std::ostringstream detail;
    if (!ok) {
      detail << what << ": got ";
      if (got.defined()) {
        detail << got.scalar_type() << got.sizes() << " " << got.flatten();
      } else {
        detail << "undefined";
      }
      detail << ", expected " << want.scalar_type() << want.sizes() << " " << want.flatten();
    }
    expect(ok, detail.str());
  }

  int failures() const { return failures_; }

 private:
  int rank_;
  int failures_ = 0;
};

void check_gather(accelerate::PartialState& s, Checks& c) {
  const int64_t r = s.process_index();
  const int64_t n = s.num_processes();
  c.same(accelerate::gather(longs({2 * r, 2 * r + 1})), range(0, 2 * n), "gather 1-D");
  c.same(accelerate::gather(at::scalar_tensor(r, at::kLong)), range(0, n), "gather 0-dim");
  c.same(accelerate::gather(longs({r}).to(at::kBFloat16)), range(0, n).to(at::kBFloat16),
         "gather bfloat16");

  std::map<std::string, std::vector<at::Tensor>> batch{{"a", {longs({r})}},
                                                       {"b", {longs({10 + r, 20 + r})}}};
  auto g = accelerate::gather(s, batch);
  c.same(g.at("a")[0], range(0, n), "gather map['a'][0]");
  c.same(g.at("b")[0], at::stack({range(10, 10 + n), range(20, 20 + n)}, 1).reshape({2 * n}),
         "gather map['b'][0]");

  auto t = accelerate::gather(std::make_tuple(longs({-r}), at::full({1, 2}, r, at::kLong)));
  c.same(std::get<0>(t), -range(0, n), "gather tuple[0]");
  c.same(std::get<1>(t), range(0, n).repeat_interleave(2).reshape({n, 2}), "gather tuple[1]");

  worker::Outputs out{longs({r}), {longs({r * r})}, at::scalar_tensor(static_cast<double>(r))};
  auto go = accelerate::gather(out);
  c.same(go.logits, range(0, n), "gather struct .logits");
  c.same(go.hidden[0], range(0, n) * range(0, n), "gather struct .hidden[0]");
  c.expect(go.loss.has_value(), "gather struct .loss is set");
  if (go.loss) c.same(*go.loss, range(0, n).to(at::kFloat), "gather struct .loss");
}

void check_objects(accelerate::PartialState& s, Checks& c) {
  const int r = s.process_index();
  const int n = s.num_processes();
  std::vector<std::string> names, flat;
  for (int i = 0; i < n; ++i) {
    names.push_back("rank " + std::to_string(i));
    for (int j = 0; j <= i; ++j) flat.push_back(std::to_string(i) + ":" + std::to_string(j));
  }
  c.expect(accelerate::gather_object("rank " + std::to_string(r)) == names,
           "gather_object of one string per process");
  std::vector<std::string> mine;
  for (int j = 0; j <= r; ++j) mine.push_back(std::to_string(r) + ":" + std::to_string(j));
  c.expect(accelerate::gather_object(s, mine) == flat,
           "gather_object of vectors of strings, flattened in rank order");

  std::vector<std::string> files{"stale"};
  if (s.is_main_process()) files = {"a", "b", "c"};
  accelerate::broadcast_object_list(files);
  c.expect(files == std::vector<std::string>{"a", "b", "c"}, "broadcast_object_list from 0");
  std::vector<std::map<std::string, int>> config{{{"rank", r}}};
  accelerate::broadcast_object_list(s, config, n - 1);
  c.expect(config.size() == 1 && config[0].at("rank") == n - 1,
           "broadcast_object_list from the last process");
}

void check_broadcast(accelerate::PartialState& s, Checks& c) {
  const int64_t r = s.process_index();
  const int n = s.num_processes();
  for (int from = 0; from < n; ++from) {
    auto got = accelerate::broadcast(
        std::map<std::string, at::Tensor>{{"x", longs({10 * r, 10 * r + 1})},
                                          {"y", at::full({2}, r, at::kBFloat16)}},
        from);
    c.same(got.at("x"), longs({10 * from, 10 * from + 1}),
           "broadcast from " + std::to_string(from) + " ['x']");
    c.same(got.at("y"), at::full({2}, from, at::kBFloat16),
           "broadcast from " + std::to_string(from) + " ['y']");
  }
}

void check_reduce(accelerate::PartialState& s, Checks& c) {
  const int64_t r = s.process_index();
  const int64_t n = s.num_processes();
  c.same(accelerate::reduce(longs({r + 1, 2 * r}), "sum"), longs({n * (n + 1) / 2, n * (n - 1)}),
         "reduce sum");
  c.same(accelerate::reduce(at::full({1}, static_cast<double>(r), at::kFloat)),
         at::full({1}, (n - 1) / 2.0, at::kFloat), "reduce mean");
  c.same(accelerate::reduce(s, longs({r}), accelerate::Reduction::kNone), longs({n * (n - 1) / 2}),
         "reduce none (sums, as Accelerate's does)");
  c.same(accelerate::reduce(longs({r}), "sum", 2), longs({n * (n - 1)}), "reduce sum scale 2");
  c.same(accelerate::reduce(at::full({2}, static_cast<double>(r + 1), at::kBFloat16), "mean"),
         at::full({2}, (n + 1) / 2.0, at::kBFloat16), "reduce bfloat16 mean");
  auto nested = accelerate::reduce(
      std::make_tuple(std::vector<at::Tensor>{longs({1})}, longs({r * r})), "sum");
  int64_t squares = 0;
  for (int64_t i = 0; i < n; ++i) squares += i * i;
  c.same(std::get<0>(nested)[0], longs({n}), "reduce nested [0][0]");
  c.same(std::get<1>(nested), longs({squares}), "reduce nested [1]");
  std::string error;
  try {
    accelerate::reduce(longs({1}), "mean");
  } catch (const std::exception& e) {
    error = message_of(e);
  }
  c.expect(error.find("needs floating-point tensors, but data has dtype Long") != std::string::npos,
           "reduce mean of an integer tensor is an error naming the dtype, got: " + error);
}

void check_pad(accelerate::PartialState& s, Checks& c) {
  const int64_t r = s.process_index();
  const int64_t n = s.num_processes();
  const at::Tensor mine = range(0, r + 1);
  const at::Tensor fill = at::full({n - r - 1}, -1, at::kLong);
  c.same(accelerate::pad_across_processes(mine, {.pad_index = -1}), at::cat({mine, fill}),
         "pad_across_processes at the end");
  c.same(accelerate::pad_across_processes(s, mine, {.pad_index = -1, .pad_first = true}),
         at::cat({fill, mine}), "pad_across_processes at the start");
  const at::Tensor wide = at::ones({2, r + 1}, at::kLong);
  c.same(accelerate::pad_across_processes(wide, {.dim = -1}),
         at::cat({wide, at::zeros({2, n - r - 1}, at::kLong)}, 1), "pad_across_processes dim -1");
  c.same(accelerate::pad_across_processes(wide, {.dim = 2}), wide,
         "pad_across_processes of a missing dimension");

  std::map<std::string, at::Tensor> batch{{"ids", range(0, r + 1).unsqueeze(0)}};
  auto all = accelerate::gather(accelerate::pad_across_processes(batch, {.dim = 1}));
  std::vector<at::Tensor> rows;
  for (int64_t i = 0; i < n; ++i) {
    rows.push_back(at::cat({range(0, i + 1), at::zeros({n - i - 1}, at::kLong)}).unsqueeze(0));
  }
  c.same(all.at("ids"), at::cat(rows), "gather after pad_across_processes");
}

void check_local(accelerate::PartialState& s, Checks& c) {
  worker::Outputs out{longs({1, 2, 3}), {longs({4, 5, 6})}, std::nullopt};
  auto moved = accelerate::send_to_device(out, s.device());
  c.expect(moved.logits.device() == s.device(), "send_to_device moves tensors");
  c.same(moved.hidden[0].cpu(), longs({4, 5, 6}), "send_to_device keeps values");
  auto both = accelerate::concatenate(std::vector<worker::Outputs>{out, out});
  c.same(both.logits, longs({1, 2, 3, 1, 2, 3}), "concatenate");
  c.same(accelerate::slice_tensors(out, 1, 2).hidden[0], longs({5}), "slice_tensors");
  auto fp32 = accelerate::convert_to_fp32(
      std::make_pair(at::ones({1}, at::kHalf), at::ones({1}, at::kLong)));
  c.same(fp32.first, at::ones({1}, at::kFloat), "convert_to_fp32 of float16");
  c.same(fp32.second, at::ones({1}, at::kLong), "convert_to_fp32 leaves int64");
}

// Counts on how many processes `ran` is true: a way to check run-on-one-process helpers.
int64_t count_true(bool ran) {
  return accelerate::reduce(at::full({1}, ran ? 1 : 0, at::kLong), "sum").item<int64_t>();
}

void check_control(accelerate::PartialState& s, Checks& c) {
  const int r = s.process_index();
  const int n = s.num_processes();

  // split_between_processes over 10 items: the first 10 % n processes take one extra.
  std::vector<int> items(10);
  for (int i = 0; i < 10; ++i) items[static_cast<size_t>(i)] = i;
  const int per = 10 / n, extra = 10 % n;
  const int start = r * per + std::min(r, extra);
  const int count = per + (r < extra ? 1 : 0);
  std::vector<int> want(items.begin() + start, items.begin() + start + count);
  c.expect(s.split_between_processes(items) == want, "split_between_processes of a vector");
  auto padded = s.split_between_processes(items, true);
  c.expect(static_cast<int>(padded.size()) == per + (extra > 0 ? 1 : 0) &&
               std::equal(want.begin(), want.end(), padded.begin()) && padded.back() == want.back(),
           "split_between_processes with apply_padding");
  auto rows = s.split_between_processes(at::arange(10, at::kLong));
  c.same(rows, range(start, start + count), "split_between_processes of a tensor");
  // Padded tensor shares are filled with the input's last row (9) up to the longest share.
  std::vector<int64_t> all_padded;
  for (int i = 0; i < n; ++i) {
    const int b = i * per + std::min(i, extra);
    const int e = b + per + (i < extra ? 1 : 0);
    for (int k = b; k < e; ++k) all_padded.push_back(k);
    for (int k = e - b; k < per + (extra > 0 ? 1 : 0); ++k) all_padded.push_back(9);
  }
  c.same(accelerate::gather(s.split_between_processes(at::arange(10, at::kLong), true)),
         longs(all_padded), "split_between_processes of a tensor with apply_padding");

  // The on_* helpers run on exactly one process (per machine for the local ones).
  c.expect(count_true(s.on_main_process([] { return 1; }).has_value()) == 1, "on_main_process");
  c.expect(count_true(s.on_last_process([&] { return r; }) == std::optional<int>(n - 1)) == 1,
           "on_last_process");
  c.expect(count_true(s.on_process(n - 1, [] { return true; }).value_or(false)) == 1,
           "on_process(n - 1)");
  const int64_t machines = n / s.num_processes_per_node();
  c.expect(count_true(s.on_local_main_process([] { return 0; }).has_value()) == machines,
           "on_local_main_process once per machine");
  c.expect(count_true(
               s.on_local_process(s.num_processes_per_node() - 1, [] { return 0; }).has_value()) ==
               machines,
           "on_local_process once per machine");

  // main_process_first: the main process creates a file slowly; the others must find it.
  const char* port = std::getenv("MASTER_PORT");
  const auto marker = std::filesystem::temp_directory_path() /
                      ("ops_worker_first_" + std::string(port ? port : "none"));
  {
    auto first = s.main_process_first();
    if (s.is_main_process()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      std::ofstream(marker) << "made by the main process";
    }
    c.expect(std::filesystem::exists(marker), "main_process_first: the main process went first");
  }
  s.wait_for_everyone();
  if (s.is_main_process()) std::filesystem::remove(marker);

  // Triggers: one process sets it, every process sees it once.
  if (r == n - 1) s.set_trigger();
  c.expect(s.check_trigger(), "check_trigger after the last process set it");
  c.expect(!s.check_trigger(), "check_trigger is reset after being seen");

  // set_seed(device_specific) makes processes differ; synchronize_rng_states makes them agree
  // on process 0's stream.
  accelerate::set_seed(1234, {.device_specific = true});
  auto differ = accelerate::gather(at::rand({1}));
  c.expect(std::get<0>(at::unique_dim(differ, 0)).size(0) == n,
           "set_seed(device_specific) differs per process");
  accelerate::synchronize_rng_states(s, {accelerate::RNGType::TORCH});
  auto agree = accelerate::gather(at::rand({1}));
  c.expect(std::get<0>(at::unique_dim(agree, 0)).size(0) == 1,
           "synchronize_rng_states agrees on process 0's");
  // Process 0 had drawn once from seed 1234 + 0, so everybody now continues its stream.
  accelerate::set_seed(1234);
  (void)at::rand({1});
  c.same(agree.slice(0, 0, 1).flatten(), at::rand({1}), "synchronised stream is process 0's");
}

int debug_mismatch(accelerate::PartialState& s) {
  const int r = s.process_index();
  const int n = s.num_processes();
  if (!s.debug()) {
    std::cerr << "ops_worker: --debug-mismatch needs ACCELERATE_DEBUG_MODE=1\n";
    return 1;
  }
  std::string msg;
  try {
    accelerate::gather(at::zeros({r + 1, 2}, at::kLong));
  } catch (const std::exception& e) {
    msg = message_of(e);
  }
  std::cout << ("MISMATCH: " + msg + "\n") << std::flush;
  bool ok = msg.find("'gather'") != std::string::npos;
  for (int i = 0; i < n; ++i) {
    ok = ok && msg.find("process " + std::to_string(i) + ": call #") != std::string::npos &&
         msg.find("'gather' (all-gather) of shape [" + std::to_string(i + 1) + ", 2] Long") !=
             std::string::npos;
  }
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  // A failing check must not leave the other processes waiting for 30 minutes.
  auto& state =
      accelerate::PartialState::shared({.init_kwargs = {.timeout = std::chrono::seconds(60)}});
  if (argc > 1 && std::strcmp(argv[1], "--debug-mismatch") == 0) return debug_mismatch(state);

  Checks checks(state.process_index());
  try {
    check_gather(state, checks);
    check_objects(state, checks);
    check_broadcast(state, checks);
    check_reduce(state, checks);
    check_pad(state, checks);
    check_local(state, checks);
    check_control(state, checks);
    state.wait_for_everyone();
  } catch (const std::exception& e) {
    std::cerr << "ops_worker rank " << state.process_index()
              << ": FAILED with an error: " << message_of(e) << std::endl;
    return 1;
  }
  if (checks.failures() > 0) return 1;
  std::ostringstream out;
  out << "ops_worker rank " << state.process_index() << "/" << state.num_processes() << ": OK\n";
  std::cout << out.str() << std::flush;
  return 0;
}
