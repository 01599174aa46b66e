#include <accelerate/offload.h>

#include "../../src/detail/file_mapping.h"

#include <expect_error.h>
#include <files.h>
#include <gtest/gtest.h>

#include <string>
#include <utility>
#include <vector>

using accelerate::OffloadedTensorInfo;
using accelerate::OffloadIndex;
using accelerate::testing::file_bytes;
using accelerate::testing::in_quotes;
using accelerate::testing::same;
using accelerate::testing::TempDir;
using accelerate::testing::write_file;

namespace {

// The bytes of a .dat file after offloading `t` under the name "t".
std::string dat_bytes(const at::Tensor& t, OffloadIndex* index = nullptr) {
  TempDir dir;
  accelerate::offload_weight(t, "t", dir.path().string(), index);
  return file_bytes(dir.file("t.dat"));
}

std::string bytes(std::initializer_list<int> values) {
  std::string result;
  for (int v : values) result.push_back(static_cast<char>(v));
  return result;
}

bool operator==(const OffloadedTensorInfo& a, const OffloadedTensorInfo& b) {
  return a.dtype == b.dtype && a.shape == b.shape;
}

}  // namespace

TEST(Offload, DtypeNamesAreNumpys) {
  const std::vector<std::pair<at::ScalarType, std::string>> expected = {
      {at::kFloat, "float32"},
      {at::kHalf, "float16"},
      {at::kBFloat16, "bfloat16"},
      {at::kDouble, "float64"},
      {at::kLong, "int64"},
      {at::kInt, "int32"},
      {at::kShort, "int16"},
      {at::kChar, "int8"},
      {at::kByte, "uint8"},
      {at::kBool, "bool"},
      {at::kComplexFloat, "complex64"},
      {at::kComplexDouble, "complex128"},
  };
  for (const auto& [dtype, name] : expected) {
    EXPECT_EQ(accelerate::offload_dtype_name(dtype), name);
    EXPECT_EQ(accelerate::offload_dtype_from_name(name), dtype);
  }
  EXPECT_ERROR_CONTAINS(accelerate::offload_dtype_name(at::kComplexHalf),
                        "numpy has no dtype for ComplexHalf");
  EXPECT_ERROR_CONTAINS(accelerate::offload_dtype_name(at::kQInt8), "numpy has no dtype for QInt8");
  EXPECT_ERROR_CONTAINS(accelerate::offload_dtype_from_name("float8"),
                        "unknown offload dtype \"float8\"; known: float32 float16 bfloat16");
  EXPECT_ERROR_CONTAINS(accelerate::offload_dtype_from_name("F32"), "unknown offload dtype");
  EXPECT_ERROR_CONTAINS(accelerate::offload_dtype_from_name("uint16"),
                        "\"uint16\": LibTorch 1.13 has no such dtype");
}

// What Python's json.dump(index, f, indent=2) writes: 2-space indent, one array element per line,
// "[]" for an empty list, ": " after keys, "," at line ends, non-ASCII escaped (ensure_ascii,
// surrogate pairs beyond the BMP), no trailing newline.
TEST(Offload, IndexIsWrittenAsPythonJsonDumpIndent2) {
  TempDir dir;
  accelerate::save_offload_index({{"blocks.0.weight", {"float32", {2, 3}}},
                                  {"step", {"int64", {}}},
                                  {"caf\xc3\xa9\xf0\x9f\x98\x80", {"bfloat16", {4}}}},
                                 dir.path().string());
  const std::string expected = R"({
  "blocks.0.weight": {
    "dtype": "float32",
    "shape": [
      2,
      3
    ]
  },
  "step": {
    "dtype": "int64",
    "shape": []
  },
  "caf\u00e9\ud83d\ude00": {
    "dtype": "bfloat16",
    "shape": [
      4
    ]
  }
})";
  EXPECT_EQ(file_bytes(dir.file("index.json")), expected);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"index.json"});  // no temporary left behind

  const OffloadIndex index = accelerate::read_offload_index(dir.path().string());
  ASSERT_EQ(index.size(), 3u);
  EXPECT_EQ(index[0].first, "blocks.0.weight");
  EXPECT_EQ(index[2].first, "caf\xc3\xa9\xf0\x9f\x98\x80");
  EXPECT_TRUE(index[1].second == (OffloadedTensorInfo{"int64", {}}));
}

// As Python's dict.update: existing keys keep their place (and any other fields of entries not
// updated), updated ones change in place, new ones are appended.
TEST(Offload, SaveIndexMergesIntoTheExistingFile) {
  TempDir dir;
  write_file(dir.file("index.json"), R"({"a": {"dtype": "float32", "shape": [1]}, )"
                                     R"("b": {"dtype": "int8", "shape": [2], "extra": true}})");
  accelerate::save_offload_index({{"c", {"bool", {3}}}, {"a", {"float16", {}}}},
                                 dir.path().string());
  EXPECT_EQ(file_bytes(dir.file("index.json")), R"({
  "a": {
    "dtype": "float16",
    "shape": []
  },
  "b": {
    "dtype": "int8",
    "shape": [
      2
    ],
    "extra": true
  },
  "c": {
    "dtype": "bool",
    "shape": [
      3
    ]
  }
})");

  // An empty index writes nothing, as in Python.
  TempDir other;
  accelerate::save_offload_index({}, other.path().string());
  EXPECT_TRUE(other.entries().empty());
}

TEST(Offload, OffloadStateDictMergesAcrossCalls) {
  TempDir dir;
  const std::string folder = dir.file("nested/offload");
  accelerate::offload_state_dict(folder, {{"x", at::ones({2})}, {"y", at::zeros({1}, at::kLong)}});
  accelerate::offload_state_dict(
      folder, {{"z", at::ones({1}, at::kBool)}, {"x", at::ones({3}, at::kHalf)}});
  const OffloadIndex index = accelerate::read_offload_index(folder);
  ASSERT_EQ(index.size(), 3u);
  EXPECT_EQ(index[0].first, "x");
  EXPECT_TRUE(index[0].second == (OffloadedTensorInfo{"float16", {3}}));
  EXPECT_EQ(index[1].first, "y");
  EXPECT_TRUE(index[1].second == (OffloadedTensorInfo{"int64", {1}}));
  EXPECT_EQ(index[2].first, "z");
  EXPECT_TRUE(same(accelerate::load_offloaded_weight(folder + "/x.dat", index[0].second),
                   at::ones({3}, at::kHalf)));
}

TEST(Offload, OffloadWeightUpdatesTheIndexLikeADict) {
  TempDir dir;
  OffloadIndex index;
  accelerate::offload_weight(at::ones({2}), "a", dir.path().string(), &index);
  accelerate::offload_weight(at::ones({1}), "b", dir.path().string(), &index);
  accelerate::offload_weight(at::ones({4}, at::kInt), "a", dir.path().string(), &index);
  ASSERT_EQ(index.size(), 2u);
  EXPECT_EQ(index[0].first, "a");
  EXPECT_TRUE(index[0].second == (OffloadedTensorInfo{"int32", {4}}));
  EXPECT_EQ(index[1].first, "b");
  // Without an index only the file is written.
  accelerate::offload_weight(at::ones({1}), "c", dir.path().string());
  EXPECT_EQ(dir.entries(), (std::vector<std::string>{"a.dat", "b.dat", "c.dat"}));
}

// Raw C-order little-endian bytes, nothing else, as numpy.memmap writes them.
TEST(Offload, DatFilesHoldRawLittleEndianBytes) {
  OffloadIndex index;
  EXPECT_EQ(dat_bytes(at::tensor({1.5f, -2.0f}), &index),
            bytes({0x00, 0x00, 0xc0, 0x3f, 0x00, 0x00, 0x00, 0xc0}));
  EXPECT_TRUE(index.at(0).second == (OffloadedTensorInfo{"float32", {2}}));

  // bfloat16 as its 16-bit words: 1.0 is 0x3f80, -2.0 is 0xc000.
  index.clear();
  EXPECT_EQ(dat_bytes(at::tensor({1.0f, -2.0f}).to(at::kBFloat16), &index),
            bytes({0x80, 0x3f, 0x00, 0xc0}));
  EXPECT_TRUE(index.at(0).second == (OffloadedTensorInfo{"bfloat16", {2}}));

  EXPECT_EQ(dat_bytes(at::tensor({int64_t{1}, int64_t{-2}})),
            bytes({1, 0, 0, 0, 0, 0, 0, 0, 0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}));
  EXPECT_EQ(dat_bytes(at::tensor({1, 0, 1}).to(at::kBool)), bytes({1, 0, 1}));

  // 0-dim: one element in the file, shape [] in the index.
  index.clear();
  EXPECT_EQ(dat_bytes(at::scalar_tensor(2.0, at::kFloat), &index), bytes({0, 0, 0, 0x40}));
  EXPECT_TRUE(index.at(0).second == (OffloadedTensorInfo{"float32", {}}));

  // Strides are not stored: a transposed view is written in its own C order.
  index.clear();
  const at::Tensor t = at::arange(6, at::kByte).reshape({2, 3}).t();
  EXPECT_EQ(dat_bytes(t, &index), bytes({0, 3, 1, 4, 2, 5}));
  EXPECT_TRUE(index.at(0).second == (OffloadedTensorInfo{"uint8", {3, 2}}));

  // A conjugate view is stored with its values, not the flag.
  const at::Tensor z = at::complex(at::tensor({1.0f}), at::tensor({2.0f})).conj();
  EXPECT_EQ(dat_bytes(z), bytes({0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0xc0}));

  // Empty tensors give empty files (numpy cannot map those, but we can).
  EXPECT_EQ(dat_bytes(at::empty({0, 4})), "");
}

TEST(Offload, RoundTripMappedAndCopied) {
  TempDir dir;
  const std::vector<std::pair<std::string, at::Tensor>> state = {
      {"blocks.0.weight", at::randn({3, 5})},
      {"blocks.0.bias", at::randn({5}).to(at::kBFloat16)},
      {"half", at::randn({2, 2}).to(at::kHalf)},
      {"double", at::randn({4}, at::kDouble)},
      {"step", at::scalar_tensor(7, at::kLong)},
      {"ints", at::arange(-3, 3, at::kInt)},
      {"shorts", at::arange(-3, 3, at::kShort)},
      {"chars", at::arange(-3, 3, at::kChar)},
      {"bytes", at::arange(0, 250, 7, at::kByte)},
      {"mask", at::rand({7}) > 0.5},
      {"complex", at::randn({3}, at::kComplexFloat)},
      {"empty", at::empty({0, 3})},
  };
  accelerate::offload_state_dict(dir.path().string(), state);
  const OffloadIndex index = accelerate::read_offload_index(dir.path().string());
  ASSERT_EQ(index.size(), state.size());
  for (size_t i = 0; i < state.size(); ++i) {
    const auto& [name, expected] = state[i];
    ASSERT_EQ(index[i].first, name);
    EXPECT_EQ(index[i].second.shape, expected.sizes().vec()) << name;
    const std::string file = dir.file(name + ".dat");

    const at::Tensor mapped = accelerate::load_offloaded_weight(file, index[i].second);
    EXPECT_TRUE(same(mapped, expected)) << name;
    EXPECT_TRUE(accelerate::detail::is_file_mapped(mapped)) << name;
    EXPECT_EQ(accelerate::detail::mapped_path(mapped), file) << name;

    const at::Tensor copied = accelerate::load_offloaded_weight(file, index[i].second, false);
    EXPECT_TRUE(same(copied, expected)) << name;
    EXPECT_FALSE(accelerate::detail::is_file_mapped(copied)) << name;
  }
}

TEST(Offload, MappedTensorsArePrivateViewsOfTheFile) {
  TempDir dir;
  OffloadIndex index;
  accelerate::offload_weight(at::arange(4, at::kFloat), "w", dir.path().string(), &index);
  const std::string file = dir.file("w.dat");
  const std::string before = file_bytes(file);

  const at::Tensor w = accelerate::load_offloaded_weight(file, index[0].second);
  EXPECT_EQ(w.storage().nbytes(), 16u);
  const auto mapping = accelerate::detail::map_file(file);
  w.add_(10);
  EXPECT_TRUE(same(w, at::arange(10, 14, at::kFloat)));
  EXPECT_EQ(file_bytes(file), before);
  EXPECT_TRUE(
      same(accelerate::load_offloaded_weight(file, index[0].second), at::arange(4, at::kFloat)));
  // Another mapping of the file does not see the private writes either.
  EXPECT_EQ(std::string(mapping->data(), mapping->size()), before);

  // Offloading the name again replaces the file, not its pages: w keeps its values.
  const at::Tensor original = accelerate::load_offloaded_weight(file, index[0].second);
  accelerate::offload_weight(at::full({4}, 9.0f), "w", dir.path().string(), &index);
  EXPECT_TRUE(same(original, at::arange(4, at::kFloat)));
  EXPECT_TRUE(same(accelerate::load_offloaded_weight(file, index[0].second), at::full({4}, 9.0f)));
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"w.dat"});
}

TEST(Offload, WrongFileSizeNamesTheFile) {
  TempDir dir;
  const std::string file = dir.file("w.dat");
  write_file(file, std::string(7, '\0'));
  for (bool mapped : {true, false}) {
    EXPECT_ERROR_CONTAINS(accelerate::load_offloaded_weight(file, {"float32", {2}}, mapped),
                          in_quotes(file) + " holds 7 bytes, but shape [2] of float32 needs 8");
    EXPECT_ERROR_CONTAINS(accelerate::load_offloaded_weight(file, {"float64", {}}, mapped),
                          "holds 7 bytes, but shape [] of float64 needs 8");
    EXPECT_ERROR_CONTAINS(
        accelerate::load_offloaded_weight(dir.file("missing.dat"), {"float32", {2}}, mapped),
        "cannot open " + in_quotes(dir.file("missing.dat")));
    EXPECT_ERROR_CONTAINS(accelerate::load_offloaded_weight(file, {"float32", {-1}}, mapped),
                          "negative dimension");
    EXPECT_ERROR_CONTAINS(
        accelerate::load_offloaded_weight(file, {"float32", {INT64_MAX, INT64_MAX}}, mapped),
        "too many bytes");
  }
}

TEST(Offload, UnknownDtypeNamesTheFile) {
  TempDir dir;
  const std::string file = dir.file("w.dat");
  write_file(file, std::string(8, '\0'));
  EXPECT_ERROR_CONTAINS(accelerate::load_offloaded_weight(file, {"float8", {8}}),
                        in_quotes(file) + ": unknown offload dtype \"float8\"");
  EXPECT_ERROR_CONTAINS(accelerate::load_offloaded_weight(file, {"uint16", {4}}, false),
                        "LibTorch 1.13 has no such dtype");
}

TEST(Offload, InvalidBoolBytesAreRefused) {
  TempDir dir;
  const std::string file = dir.file("mask.dat");
  write_file(file, bytes({1, 0, 2}));
  for (bool mapped : {true, false}) {
    EXPECT_ERROR_CONTAINS(accelerate::load_offloaded_weight(file, {"bool", {3}}, mapped),
                          in_quotes(file) + " holds the byte 2 for bool element 2");
  }
}

TEST(Offload, NamesThatAreNotFileNamesAreRefused) {
  TempDir dir;
  for (const std::string& name :
       {std::string("a/b"), std::string(""), std::string(".."), std::string("../up")}) {
    EXPECT_ERROR_CONTAINS(
        accelerate::offload_weight(at::ones({1}), name, dir.path().string()),
        "tensor name " + in_quotes(name) + " cannot name a file in an offload folder");
  }
  EXPECT_ERROR_CONTAINS(
      accelerate::offload_weight(at::ones({1}), std::string("nul\0x", 5), dir.path().string()),
      "tensor name 'nul\\0x' cannot name a file");
  // Checked before anything is written.
  EXPECT_ERROR_CONTAINS(accelerate::offload_state_dict(
                            dir.path().string(), {{"ok", at::ones({1})}, {"a/b", at::ones({1})}}),
                        "'a/b'");
  EXPECT_ERROR_CONTAINS(accelerate::offload_state_dict(
                            dir.path().string(), {{"ok", at::ones({1})}, {"ok", at::ones({1})}}),
                        "duplicate tensor name 'ok'");
  EXPECT_TRUE(dir.entries().empty());

  // Dots are part of parameter names.
  accelerate::offload_weight(at::ones({1}), "blocks.0.attn.weight", dir.path().string());
  accelerate::offload_weight(at::ones({1}), ".", dir.path().string());
  EXPECT_EQ(dir.entries(), (std::vector<std::string>{"..dat", "blocks.0.attn.weight.dat"}));
}

TEST(Offload, UnsupportedTensorsNameTheTensor) {
  TempDir dir;
  EXPECT_ERROR_CONTAINS(
      accelerate::offload_weight(at::ones({2}, at::kComplexHalf), "z", dir.path().string()),
      "tensor 'z': numpy has no dtype for ComplexHalf");
  const at::Tensor q = at::quantize_per_tensor(at::ones({2}), 0.1, 0, at::kQInt8);
  EXPECT_ERROR_CONTAINS(accelerate::offload_weight(q, "q", dir.path().string()), "tensor 'q'");
  EXPECT_ERROR_CONTAINS(
      accelerate::offload_weight(at::ones({2}).to_sparse(), "s", dir.path().string()),
      "tensor 's' must be a dense tensor");
  EXPECT_ERROR_CONTAINS(accelerate::offload_weight(at::Tensor(), "u", dir.path().string()),
                        "tensor 'u' is undefined");
  EXPECT_ERROR_CONTAINS(accelerate::offload_weight(at::ones({1}), "w", dir.file("missing")),
                        "cannot create");
  EXPECT_TRUE(dir.entries().empty());
}

TEST(Offload, BadIndexFilesAreNamedWithTheProblem) {
  TempDir dir;
  const std::string path = dir.file("index.json");
  EXPECT_ERROR_CONTAINS(accelerate::read_offload_index(dir.path().string()),
                        "cannot open " + in_quotes(path));

  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{\"a\": ", "is not valid JSON"},
      {"[1, 2]", "must hold a JSON object (tensor name -> {dtype, shape}), got array"},
      {R"({"a": 1})", "entry 'a' must be an object, got 1"},
      {R"({"a": {"shape": [1]}})", "entry 'a' lacks \"dtype\""},
      {R"({"a": {"dtype": "float32"}})", "entry 'a' lacks \"shape\""},
      {R"({"a": {"dtype": 3, "shape": [1]}})", "entry 'a': \"dtype\" must be a string, got 3"},
      {R"({"a": {"dtype": "float32", "shape": 1}})", "\"shape\" must be an array, got 1"},
      {R"({"a": {"dtype": "float32", "shape": [-1]}})", "must hold non-negative integers"},
      {R"({"a": {"dtype": "float32", "shape": [1.5]}})", "must hold non-negative integers"},
      {R"({"a": {"dtype": "float32", "shape": [18446744073709551615]}})", "is too large"},
  };
  for (const auto& [text, problem] : cases) {
    write_file(path, text);
    const std::string message =
        accelerate::testing::error_of([&] { accelerate::read_offload_index(dir.path().string()); });
    EXPECT_NE(message.find("offload index " + in_quotes(path)), std::string::npos) << message;
    EXPECT_NE(message.find(problem), std::string::npos) << text << "\n" << message;
  }

  // Merging into a file that is not an index is refused, and the file is left as it was.
  write_file(path, "not json");
  EXPECT_ERROR_CONTAINS(
      accelerate::save_offload_index({{"a", {"float32", {1}}}}, dir.path().string()),
      "is not valid JSON");
  EXPECT_EQ(file_bytes(path), "not json");

  // Unknown fields are ignored, so that indexes from future writers still load.
  write_file(path, R"({"a": {"dtype": "float32", "shape": [2], "new": 1}})");
  const OffloadIndex index = accelerate::read_offload_index(dir.path().string());
  ASSERT_EQ(index.size(), 1u);
  EXPECT_TRUE(index[0].second == (OffloadedTensorInfo{"float32", {2}}));
}
