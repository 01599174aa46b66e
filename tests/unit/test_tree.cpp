// tree.h (the traversal every operation uses) and operations.h on a single process: local
// operations, and collectives whose single-process answers are the identity or trivial.

#include <accelerate/operations.h>
#include <accelerate/state.h>
#include <accelerate/tree.h>

#include <gtest/gtest.h>

#include "expect_error.h"

#include <array>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace user {
// A batch type as a user would write it: tensors, a container of tensors, and plain values.
struct Batch {
  at::Tensor input;
  std::vector<at::Tensor> extra;
  std::string id;
  int step = 0;
};

// A template type opting in by specialising the traits template itself.
template <class T>
struct Twins {
  T first;
  T second;
};
}  // namespace user

ACCELERATE_TENSOR_FIELDS(user::Batch, input, extra, id, step);

template <class T>
struct accelerate::TensorTree<user::Twins<T>> {
  template <class Self, class F>
  static void for_each_child(Self& self, F&& f) {
    f("first", self.first);
    f("second", self.second);
  }
};

namespace {

using accelerate::testing::error_of;
using accelerate::testing::same;

using accelerate::PartialState;
using accelerate::Reduction;
using accelerate::TreePath;

PartialState& single() {
  static auto state = PartialState::from_environment({}, accelerate::EnvMap{});
  return *state;
}

at::Tensor longs(std::vector<int64_t> values) {
  return at::tensor(values, at::kLong);
}
at::Tensor floats(std::vector<float> values) {
  return at::tensor(values, at::kFloat);
}

// Exact equality: same dtype, same shape, same values.
template <class T>
std::vector<std::string> paths_of(const T& data) {
  std::vector<std::string> out;
  accelerate::for_each_tensor(
      [&](const TreePath& path, const at::Tensor& t) {
        out.push_back(path.str() + "=" + std::to_string(t.sum().item<int64_t>()));
      },
      data);
  return out;
}

auto plus_one = [](const at::Tensor& t) { return t + 1; };

}  // namespace

// ------------------------------------------------------------------ traversal

TEST(Tree, TensorIsALeaf) {
  auto out = accelerate::recursively_apply(plus_one, longs({1, 2}));
  EXPECT_TRUE(same(out, longs({2, 3})));
  EXPECT_EQ(paths_of(longs({4})), (std::vector<std::string>{"data=4"}));
}

TEST(Tree, StandardSequencesAndTuples) {
  std::vector<at::Tensor> vec{longs({1}), longs({2})};
  auto v = accelerate::recursively_apply(plus_one, vec);
  ASSERT_EQ(v.size(), 2u);
  EXPECT_TRUE(same(v[0], longs({2})));
  EXPECT_TRUE(same(v[1], longs({3})));
  EXPECT_TRUE(same(vec[0], longs({1})));  // the input is untouched

  std::array<at::Tensor, 2> arr{longs({5}), longs({6})};
  auto a = accelerate::recursively_apply(plus_one, arr);
  EXPECT_TRUE(same(a[1], longs({7})));

  auto tup = std::make_tuple(longs({1}), std::string("keep"), 2.5, longs({3}));
  auto t = accelerate::recursively_apply(plus_one, tup);
  EXPECT_TRUE(same(std::get<0>(t), longs({2})));
  EXPECT_EQ(std::get<1>(t), "keep");
  EXPECT_EQ(std::get<2>(t), 2.5);
  EXPECT_TRUE(same(std::get<3>(t), longs({4})));
  EXPECT_EQ(paths_of(tup), (std::vector<std::string>{"data[0]=1", "data[3]=3"}));

  auto pair = std::make_pair(longs({10}), longs({20}));
  auto p = accelerate::recursively_apply(plus_one, pair);
  EXPECT_TRUE(same(p.first, longs({11})));
  EXPECT_TRUE(same(p.second, longs({21})));

  std::optional<at::Tensor> full = longs({1});
  std::optional<at::Tensor> empty;
  EXPECT_TRUE(same(*accelerate::recursively_apply(plus_one, full), longs({2})));
  EXPECT_FALSE(accelerate::recursively_apply(plus_one, empty).has_value());
  EXPECT_EQ(paths_of(full), (std::vector<std::string>{"data=1"}));
}

TEST(Tree, MapsAreVisitedInSortedKeyOrder) {
  std::map<std::string, std::vector<at::Tensor>> nested{{"b", {longs({2}), longs({3})}},
                                                        {"a", {longs({1})}}};
  EXPECT_EQ(paths_of(nested),
            (std::vector<std::string>{"data['a'][0]=1", "data['b'][0]=2", "data['b'][1]=3"}));
  auto out = accelerate::recursively_apply(plus_one, nested);
  EXPECT_TRUE(same(out.at("b")[1], longs({4})));

  // Hash order depends on the process; every process must see the same order.
  std::unordered_map<std::string, at::Tensor> hashed;
  for (const char* key : {"zeta", "alpha", "mid", "beta", "omega", "gamma"}) {
    hashed[key] = longs({static_cast<int64_t>(key[0])});
  }
  EXPECT_EQ(paths_of(hashed),
            (std::vector<std::string>{"data['alpha']=97", "data['beta']=98", "data['gamma']=103",
                                      "data['mid']=109", "data['omega']=111", "data['zeta']=122"}));
  auto h = accelerate::recursively_apply(plus_one, hashed);
  EXPECT_TRUE(same(h.at("mid"), longs({110})));

  std::map<int, at::Tensor> by_int{{3, longs({3})}, {-1, longs({1})}};
  EXPECT_EQ(paths_of(by_int), (std::vector<std::string>{"data[-1]=1", "data[3]=3"}));
}

TEST(Tree, LibTorchTypes) {
  torch::data::Example<at::Tensor, at::Tensor> example{longs({1, 2}), longs({0})};
  auto e = accelerate::recursively_apply(plus_one, example);
  EXPECT_TRUE(same(e.data, longs({2, 3})));
  EXPECT_TRUE(same(e.target, longs({1})));
  EXPECT_EQ(paths_of(example), (std::vector<std::string>{"data.data=3", "data.target=0"}));

  torch::data::Example<at::Tensor, torch::data::example::NoTarget> no_target(longs({5}));
  EXPECT_TRUE(same(accelerate::recursively_apply(plus_one, no_target).data, longs({6})));

  torch::OrderedDict<std::string, at::Tensor> dict;
  dict.insert("weight", longs({7}));
  dict.insert("bias", longs({8}));
  EXPECT_EQ(paths_of(dict), (std::vector<std::string>{"data['weight']=7", "data['bias']=8"}));
  auto d = accelerate::recursively_apply(plus_one, dict);
  EXPECT_TRUE(same(d["bias"], longs({9})));
}

TEST(Tree, IValuesAreWalkedAndRebuiltWithoutTouchingTheInput) {
  c10::impl::GenericDict dict(c10::StringType::get(), c10::AnyType::get());
  dict.insert("x", longs({1}));
  dict.insert("n", 7);
  c10::impl::GenericList list(c10::AnyType::get());
  list.push_back(longs({2}));
  list.push_back(c10::ivalue::Tuple::create(longs({3}), std::string("s")));
  list.push_back(c10::IValue());
  dict.insert("items", list);
  const c10::IValue value(dict);

  EXPECT_EQ(paths_of(value), (std::vector<std::string>{"data['x']=1", "data['items'][0]=2",
                                                       "data['items'][1][0]=3"}));
  const c10::IValue out = accelerate::recursively_apply(plus_one, value);
  auto out_dict = out.toGenericDict();
  EXPECT_TRUE(same(out_dict.at("x").toTensor(), longs({2})));
  EXPECT_EQ(out_dict.at("n").toInt(), 7);
  auto out_list = out_dict.at("items").toList();
  ASSERT_EQ(out_list.size(), 3u);
  EXPECT_TRUE(same(out_list.get(0).toTensor(), longs({3})));
  const auto& out_tuple = out_list.get(1).toTupleRef();
  EXPECT_TRUE(same(out_tuple.elements()[0].toTensor(), longs({4})));
  EXPECT_EQ(out_tuple.elements()[1].toStringRef(), "s");
  EXPECT_TRUE(out_list.get(2).isNone());
  // IValue containers are shared by reference: the input must not have been modified.
  EXPECT_TRUE(same(dict.at("x").toTensor(), longs({1})));
  EXPECT_TRUE(same(list.get(0).toTensor(), longs({2})));
  EXPECT_TRUE(same(list.get(1).toTupleRef().elements()[0].toTensor(), longs({3})));

  EXPECT_TRUE(same(accelerate::recursively_apply(plus_one, c10::IValue(longs({9}))).toTensor(),
                   longs({10})));
  EXPECT_EQ(accelerate::recursively_apply(plus_one, c10::IValue(std::string("text"))).toStringRef(),
            "text");
}

TEST(Tree, UserStructsOptIn) {
  user::Batch batch{longs({1, 2}), {longs({3}), longs({4})}, "b-1", 12};
  EXPECT_EQ(paths_of(batch),
            (std::vector<std::string>{"data.input=3", "data.extra[0]=3", "data.extra[1]=4"}));
  auto out = accelerate::recursively_apply(plus_one, batch);
  EXPECT_TRUE(same(out.input, longs({2, 3})));
  EXPECT_TRUE(same(out.extra[1], longs({5})));
  EXPECT_EQ(out.id, "b-1");
  EXPECT_EQ(out.step, 12);
  EXPECT_TRUE(same(batch.input, longs({1, 2})));

  std::vector<user::Twins<at::Tensor>> twins{{longs({1}), longs({2})}};
  EXPECT_EQ(paths_of(twins), (std::vector<std::string>{"data[0].first=1", "data[0].second=2"}));
  EXPECT_TRUE(same(accelerate::recursively_apply(plus_one, twins)[0].second, longs({3})));
}

TEST(Tree, OtherLeavesPassThroughOrAreErrors) {
  auto data = std::make_tuple(longs({1}), 3, std::string("x"), std::vector<bool>{true});
  auto out = accelerate::recursively_apply(plus_one, data);
  EXPECT_TRUE(same(std::get<0>(out), longs({2})));
  EXPECT_EQ(std::get<1>(out), 3);
  EXPECT_EQ(std::get<2>(out), "x");
  EXPECT_EQ(std::get<3>(out), std::vector<bool>{true});

  EXPECT_ERROR_CONTAINS(
      accelerate::recursively_apply(plus_one, data, {.error_on_other_type = true, .op = "my_op"}),
      "'my_op' takes tensors (possibly in nested containers), but data[1] is "
      "of type int");
  std::map<std::string, c10::IValue> ivalues{{"k", c10::IValue(2.5)}};
  EXPECT_ERROR_CONTAINS(
      accelerate::for_each_tensor([](const at::Tensor&) {}, ivalues,
                                  {.error_on_other_type = true, .op = "gather"}),
      "'gather' takes tensors (possibly in nested containers), but data['k'] is of type IValue "
      "Double");
  EXPECT_EQ(accelerate::count_tensors(data), 1u);
  EXPECT_EQ(accelerate::count_tensors(std::vector<std::vector<at::Tensor>>{{longs({1})}, {}}), 1u);
}

TEST(Tree, PathFunctionsSeeWhereTheyAre) {
  std::map<std::string, at::Tensor> batch{{"a", longs({1})}, {"b", longs({2})}};
  auto out = accelerate::recursively_apply(
      [](const TreePath& path, const at::Tensor& t) {
        return path.str() == "data['b']" ? t * 10 : t;
      },
      batch);
  EXPECT_TRUE(same(out.at("a"), longs({1})));
  EXPECT_TRUE(same(out.at("b"), longs({20})));
  TreePath path;
  path.push(accelerate::TreeKey::key("k"));
  path.push(accelerate::TreeKey::index(3));
  path.push("field");
  EXPECT_EQ(path.str("batch"), "batch['k'][3].field");
}

// ------------------------------------------------------------------ local operations

TEST(Operations, SendToDeviceCopiesTensorsAndKeepsTheRest) {
  user::Batch batch{floats({1, 2}), {longs({3})}, "id", 4};
  auto out = accelerate::send_to_device(batch, c10::Device(c10::kCPU));
  EXPECT_EQ(out.input.device(), c10::Device(c10::kCPU));
  EXPECT_TRUE(same(out.input, floats({1, 2})));
  EXPECT_TRUE(same(out.extra[0], longs({3})));
  EXPECT_EQ(out.id, "id");
  EXPECT_EQ(out.step, 4);
  auto again = accelerate::send_to_device(std::vector<at::Tensor>{floats({5})}, at::kCPU,
                                          {.non_blocking = true});
  EXPECT_TRUE(same(again[0], floats({5})));
}

TEST(Operations, ConcatenateJoinsLeafByLeaf) {
  using Step = std::map<std::string, std::vector<at::Tensor>>;
  std::vector<Step> steps{{{"x", {longs({1}), longs({10})}}},
                          {{"x", {longs({2, 3}), longs({20})}}}};
  auto all = accelerate::concatenate(steps);
  EXPECT_TRUE(same(all.at("x")[0], longs({1, 2, 3})));
  EXPECT_TRUE(same(all.at("x")[1], longs({10, 20})));

  std::vector<at::Tensor> rows{at::zeros({2, 1}, at::kLong), at::ones({2, 2}, at::kLong)};
  EXPECT_TRUE(same(accelerate::concatenate(rows, 1),
                   at::tensor({0, 1, 1, 0, 1, 1}, at::kLong).reshape({2, 3})));
  EXPECT_TRUE(same(accelerate::concatenate(std::vector<at::Tensor>{longs({4})}), longs({4})));

  EXPECT_ERROR_CONTAINS(accelerate::concatenate(std::vector<at::Tensor>{}),
                        "'concatenate' needs at least one structure, but the vector is empty");
  std::vector<Step> longer{{{"x", {longs({1})}}}, {{"x", {longs({2}), longs({3})}}}};
  EXPECT_ERROR_CONTAINS(accelerate::concatenate(longer),
                        "'concatenate': element 1 has more tensors than element 0 (1), starting "
                        "at data['x'][1]");
  std::vector<Step> shorter{{{"x", {longs({1}), longs({2})}}}, {{"x", {longs({3})}}}};
  EXPECT_ERROR_CONTAINS(accelerate::concatenate(shorter),
                        "'concatenate': element 1 has 1 tensors but element 0 has 2");
  std::vector<Step> renamed{{{"x", {longs({1})}}}, {{"y", {longs({2})}}}};
  EXPECT_ERROR_CONTAINS(accelerate::concatenate(renamed),
                        "'concatenate': element 1 has a tensor at data['y'][0] where element 0 "
                        "has one at data['x'][0]");
  using Mixed = std::tuple<at::Tensor, int>;
  EXPECT_ERROR_CONTAINS(accelerate::concatenate(std::vector<Mixed>{{longs({1}), 2}}),
                        "'concatenate' takes tensors (possibly in nested containers), but "
                        "data[1] is of type int");
  EXPECT_ERROR_CONTAINS(
      accelerate::concatenate(
          std::vector<std::vector<at::Tensor>>{{at::zeros({2, 2})}, {at::zeros({2, 3})}}),
      "'concatenate' could not concatenate the tensors at data[0]: Sizes of tensors must match");
}

TEST(Operations, SliceTensorsSlicesTheFirstDimension) {
  auto data = std::make_tuple(longs({0, 1, 2, 3, 4}), at::arange(10, at::kLong).reshape({5, 2}),
                              std::string("keep"));
  auto out = accelerate::slice_tensors(data, 1, 3);
  EXPECT_TRUE(same(std::get<0>(out), longs({1, 2})));
  EXPECT_TRUE(same(std::get<1>(out), at::tensor({2, 3, 4, 5}, at::kLong).reshape({2, 2})));
  EXPECT_EQ(std::get<2>(out), "keep");
  // Python's rules: negative bounds count from the end, bounds past the end are clamped.
  EXPECT_TRUE(same(accelerate::slice_tensors(longs({0, 1, 2, 3, 4}), -2, 100), longs({3, 4})));
  EXPECT_ERROR_CONTAINS(
      accelerate::slice_tensors(std::vector<at::Tensor>{longs({1}), at::scalar_tensor(1)}, 0, 1),
      "'slice_tensors' cannot slice data[1], which is a 0-dim tensor");
}

TEST(Operations, ConvertToFp32OnlyTouchesHalfPrecision) {
  auto data = std::make_tuple(floats({1.5}).to(at::kHalf), floats({2.5}).to(at::kBFloat16),
                              longs({3}), at::tensor({4.25}, at::kDouble), 7);
  auto out = accelerate::convert_to_fp32(data);
  EXPECT_TRUE(same(std::get<0>(out), floats({1.5})));
  EXPECT_TRUE(same(std::get<1>(out), floats({2.5})));
  EXPECT_TRUE(same(std::get<2>(out), longs({3})));
  EXPECT_TRUE(same(std::get<3>(out), at::tensor({4.25}, at::kDouble)));
  EXPECT_EQ(std::get<4>(out), 7);
}

TEST(Operations, FindBatchSize) {
  std::map<std::string, at::Tensor> batch{{"a", at::zeros({4, 2})}, {"b", at::zeros({3})}};
  EXPECT_EQ(accelerate::find_batch_size(batch), 4);
  EXPECT_EQ(accelerate::find_batch_size(std::make_tuple(1, at::zeros({6}))), 6);
  EXPECT_ERROR_CONTAINS(accelerate::find_batch_size(std::vector<at::Tensor>{}),
                        "'find_batch_size': the data holds no tensor");
  EXPECT_ERROR_CONTAINS(accelerate::find_batch_size(at::scalar_tensor(1)),
                        "'find_batch_size': the first tensor, data, is 0-dim");
}

// ------------------------------------------------------------------ collectives, one process

TEST(Operations, SingleProcessGatherAndBroadcastAreTheIdentity) {
  auto& s = single();
  user::Batch batch{longs({1, 2}), {at::scalar_tensor(3, at::kLong)}, "id", 1};
  auto g = accelerate::gather(s, std::vector<at::Tensor>{longs({1, 2}), at::scalar_tensor(3.0)});
  EXPECT_TRUE(same(g[0], longs({1, 2})));
  // One entry per process, as with several processes (Accelerate would keep it 0-dim here).
  EXPECT_TRUE(same(g[1], floats({3})));
  const at::Tensor x = longs({7});
  EXPECT_TRUE(accelerate::gather(s, x).is_same(x));  // no copy
  EXPECT_ERROR_CONTAINS(accelerate::gather(s, batch),
                        "'gather' takes tensors (possibly in nested containers), but data.id is "
                        "of type std::string");

  auto b = accelerate::broadcast(s, std::make_tuple(longs({5}), floats({0.5})));
  EXPECT_TRUE(same(std::get<0>(b), longs({5})));
  EXPECT_TRUE(same(std::get<1>(b), floats({0.5})));
  EXPECT_ERROR_CONTAINS(accelerate::broadcast(s, longs({1}), 1),
                        "'broadcast': from_process 1 is outside [0, 1)");
  EXPECT_ERROR_CONTAINS(accelerate::broadcast(s, longs({1}), -1),
                        "'broadcast': from_process -1 is outside [0, 1)");
}

TEST(Operations, SingleProcessObjects) {
  auto& s = single();
  EXPECT_EQ(accelerate::gather_object(s, std::vector<std::string>{"a", "b"}),
            (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(accelerate::gather_object(s, std::string("only")), (std::vector<std::string>{"only"}));
  EXPECT_EQ(accelerate::gather_object(s, 42), (std::vector<int>{42}));

  std::vector<std::string> objects{"x", "y"};
  auto& same_list = accelerate::broadcast_object_list(s, objects);
  EXPECT_EQ(&same_list, &objects);
  EXPECT_EQ(objects, (std::vector<std::string>{"x", "y"}));
  EXPECT_ERROR_CONTAINS(accelerate::broadcast_object_list(s, objects, 2),
                        "'broadcast_object_list': from_process 2 is outside [0, 1)");
}

TEST(Operations, SingleProcessReduce) {
  auto& s = single();
  auto data = std::make_tuple(floats({1, 2}), longs({3}));
  auto sum = accelerate::reduce(s, data, "sum");
  EXPECT_TRUE(same(std::get<0>(sum), floats({1, 2})));
  EXPECT_TRUE(same(std::get<1>(sum), longs({3})));
  // A new tensor, never the input itself.
  EXPECT_NE(std::get<0>(sum).data_ptr(), std::get<0>(data).data_ptr());
  EXPECT_TRUE(same(accelerate::reduce(s, floats({1, 2})), floats({1, 2})));
  EXPECT_TRUE(same(accelerate::reduce(s, floats({1, 2}), Reduction::kMean, 2.0), floats({2, 4})));
  EXPECT_TRUE(same(accelerate::reduce(s, longs({1, 2}), "none", 3), longs({3, 6})));
  EXPECT_TRUE(same(accelerate::reduce(s, floats({1.5}).to(at::kBFloat16), "mean"),
                   floats({1.5}).to(at::kBFloat16)));

  EXPECT_ERROR_CONTAINS(accelerate::reduce(s, floats({1}), "avg"),
                        "unknown reduction 'avg' (use \"mean\", \"sum\" or \"none\")");
  EXPECT_ERROR_CONTAINS(accelerate::reduce(s, data, "mean"),
                        "'reduce' with reduction 'mean' needs floating-point tensors, but data[1] "
                        "has dtype Long");
  EXPECT_ERROR_CONTAINS(accelerate::reduce(s, longs({1}), "sum", 0.5),
                        "'reduce': scale 0.5 cannot be applied to data, which has dtype Long");
  EXPECT_ERROR_CONTAINS(accelerate::reduce(s, std::make_tuple(floats({1}), 2), "sum"),
                        "'reduce' takes tensors (possibly in nested containers), but data[1] is of "
                        "type int");

  EXPECT_EQ(accelerate::reduction_from_string("mean"), Reduction::kMean);
  EXPECT_EQ(accelerate::reduction_from_string("sum"), Reduction::kSum);
  EXPECT_EQ(accelerate::reduction_from_string("none"), Reduction::kNone);
  EXPECT_EQ(accelerate::to_string(Reduction::kMean), "mean");
  EXPECT_EQ(accelerate::to_string(Reduction::kSum), "sum");
  EXPECT_EQ(accelerate::to_string(Reduction::kNone), "none");
}

TEST(Operations, SingleProcessPadIsTheIdentity) {
  auto& s = single();
  auto t = at::arange(6, at::kLong).reshape({2, 3});
  EXPECT_TRUE(same(accelerate::pad_across_processes(s, t), t));
  EXPECT_TRUE(same(accelerate::pad_across_processes(s, t, {.dim = -1, .pad_index = 9}), t));
  EXPECT_TRUE(same(accelerate::pad_across_processes(s, t, {.dim = 5}), t));
  auto nested = accelerate::pad_across_processes(
      s, std::map<std::string, at::Tensor>{{"a", t}, {"s", at::scalar_tensor(1)}});
  EXPECT_TRUE(same(nested.at("a"), t));
  EXPECT_TRUE(same(nested.at("s"), at::scalar_tensor(1)));
}

TEST(Operations, ObjectsSurviveTheWireFormat) {
  using Record = std::tuple<std::string, int64_t, double, bool, at::Tensor,
                            std::map<std::string, std::vector<int>>, std::optional<std::string>,
                            std::pair<int, float>, std::unordered_map<std::string, bool>>;
  Record record{"name",
                -5,
                0.25,
                true,
                floats({1, 2}),
                {{"a", {1, 2}}, {"b", {}}},
                std::nullopt,
                {7, 1.5f},
                {{"yes", true}, {"no", false}}};
  const auto bytes = accelerate::detail::encode_object(record, "gather_object");
  const auto back = accelerate::detail::decode_object<Record>(bytes, "gather_object");
  EXPECT_EQ(std::get<0>(back), "name");
  EXPECT_EQ(std::get<1>(back), -5);
  EXPECT_EQ(std::get<2>(back), 0.25);
  EXPECT_EQ(std::get<3>(back), true);
  EXPECT_TRUE(same(std::get<4>(back), floats({1, 2})));
  EXPECT_EQ(std::get<5>(back), (std::map<std::string, std::vector<int>>{{"a", {1, 2}}, {"b", {}}}));
  EXPECT_EQ(std::get<6>(back), std::nullopt);
  EXPECT_EQ(std::get<7>(back), (std::pair<int, float>{7, 1.5f}));
  EXPECT_EQ(std::get<8>(back),
            (std::unordered_map<std::string, bool>{{"yes", true}, {"no", false}}));

  const auto text = accelerate::detail::encode_object(std::string("text"), "gather_object");
  EXPECT_ERROR_CONTAINS(accelerate::detail::decode_object<int>(text, "gather_object"),
                        "'gather_object': expected an integer in the received object, got String");
  const auto big = accelerate::detail::encode_object(int64_t{1} << 40, "gather_object");
  EXPECT_ERROR_CONTAINS(accelerate::detail::decode_object<int32_t>(big, "gather_object"),
                        "'gather_object': received 1099511627776, which does not fit in int");
  EXPECT_ERROR_CONTAINS(accelerate::detail::decode_object<int>("not a pickle", "gather_object"),
                        "'gather_object' could not deserialise a received object");
}
