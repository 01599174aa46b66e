#include <accelerate/safetensors.h>

#include <expect_error.h>
#include <files.h>
#include <gtest/gtest.h>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

namespace st = accelerate::safetensors;
using accelerate::testing::same;
using accelerate::testing::TempDir;

namespace {

std::string le_u64(uint64_t value) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((value >> (8 * i)) & 0xff);
  return bytes;
}

// A file from a header written by hand and raw data bytes, as the format spec describes it.
std::string file_bytes(const std::string& header, const std::string& data = "") {
  return le_u64(header.size()) + header + data;
}

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

void write_all(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
}

::testing::AssertionResult bit_identical(const at::Tensor& actual, const at::Tensor& expected) {
  if (actual.scalar_type() != expected.scalar_type() || actual.sizes() != expected.sizes()) {
    return ::testing::AssertionFailure()
           << "got " << actual.scalar_type() << actual.sizes() << ", expected "
           << expected.scalar_type() << expected.sizes();
  }
  const auto a = actual.contiguous();
  const auto e = expected.contiguous();
  // memcmp may not be given the null data pointer of an empty tensor (UBSan), even for 0 bytes.
  if (a.nbytes() != e.nbytes() ||
      (a.nbytes() != 0 && std::memcmp(a.data_ptr(), e.data_ptr(), a.nbytes()) != 0)) {
    return ::testing::AssertionFailure() << "bytes differ:\n" << a << "\nexpected\n" << e;
  }
  return ::testing::AssertionSuccess();
}

std::vector<std::pair<std::string, at::Tensor>> every_dtype() {
  return {
      {"f64", at::tensor({1.0, -2.5, 1e300}, at::kDouble)},
      {"f32", at::tensor({0.1f, std::numeric_limits<float>::quiet_NaN(), -0.0f}).reshape({3, 1})},
      {"f16", at::tensor({0.5f, 65504.0f, -3.0f}).to(at::kHalf)},
      {"bf16", at::tensor({1.0f, -1.5f, 3.0e38f}).to(at::kBFloat16)},
      {"i64", at::tensor({int64_t{1} << 62, int64_t{-7}})},
      {"i32", at::tensor({int32_t{-2147483647}, int32_t{5}})},
      {"i16", at::tensor({int16_t{-300}, int16_t{12}}).reshape({1, 2})},
      {"i8", at::tensor({int8_t{-128}, int8_t{127}})},
      {"u8", at::tensor({uint8_t{0}, uint8_t{255}, uint8_t{7}})},
      {"bool", at::tensor({1, 0, 1}).to(at::kBool)},
      {"scalar", at::scalar_tensor(3.25, at::kDouble)},
      {"empty", at::empty({0, 3}, at::kFloat)},
      {"empty_i8", at::empty({0}, at::kChar)},
  };
}

const std::map<std::string, std::string> kMetadata = {{"format", "pt"}, {"step", "12"}};

void expect_round_trip(const std::vector<std::pair<std::string, at::Tensor>>& expected,
                       const st::SafetensorsFile& file) {
  ASSERT_EQ(file.tensors.size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(file.tensors[i].first, expected[i].first);
    EXPECT_TRUE(bit_identical(file.tensors[i].second, expected[i].second)) << expected[i].first;
  }
  EXPECT_EQ(file.metadata, kMetadata);
}

}  // namespace

TEST(Safetensors, RoundTripsEveryDtypeInMemory) {
  const auto tensors = every_dtype();
  expect_round_trip(tensors, st::deserialize(st::serialize(tensors, kMetadata)));
}

TEST(Safetensors, RoundTripsEveryDtypeThroughAFile) {
  TempDir dir;
  const auto tensors = every_dtype();
  st::save_file(tensors, dir.file("all.safetensors"), kMetadata);
  expect_round_trip(tensors, st::load_file(dir.file("all.safetensors")));
}

TEST(Safetensors, OrderedDictOverloadAndNonContiguousInputs) {
  TempDir dir;
  torch::OrderedDict<std::string, at::Tensor> dict;
  const auto base = at::arange(12, at::kFloat).reshape({3, 4});
  dict.insert("transposed", base.t());
  dict.insert("sliced", base.index({at::indexing::Slice(), 1}));
  dict.insert("grad", at::ones({2}, at::TensorOptions().requires_grad(true)));
  st::save_file(dict, dir.file("d.safetensors"));
  const auto file = st::load_file(dir.file("d.safetensors"));
  EXPECT_EQ(file.names(), (std::vector<std::string>{"transposed", "sliced", "grad"}));
  EXPECT_TRUE(same(file.get("transposed"), base.t().contiguous()));
  EXPECT_TRUE(same(file.get("sliced"), at::tensor({1.0f, 5.0f, 9.0f})));
  EXPECT_TRUE(same(file.get("grad"), at::ones({2})));
  EXPECT_TRUE(file.metadata.empty());
  EXPECT_EQ(st::serialize(dict), read_all(dir.file("d.safetensors")));
}

TEST(Safetensors, LoadsAHandBuiltFile) {
  // Bytes as any other implementation would lay them out: 1.5f, -2.0f, then int16 300, -1.
  const std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("b":{"dtype":"I16","shape":[1,2],"data_offsets":[8,12]},)"
                             R"("__metadata__":{"format":"pt"}})";
  const std::string data("\x00\x00\xc0\x3f\x00\x00\x00\xc0\x2c\x01\xff\xff", 12);
  const auto file = st::deserialize(file_bytes(header, data));
  EXPECT_EQ(file.names(), (std::vector<std::string>{"a", "b"}));
  EXPECT_TRUE(same(file.get("a"), at::tensor({1.5f, -2.0f})));
  EXPECT_TRUE(same(file.get("b"), at::tensor({int16_t{300}, int16_t{-1}}).reshape({1, 2})));
  EXPECT_EQ(file.metadata, (std::map<std::string, std::string>{{"format", "pt"}}));

  TempDir dir;
  write_all(dir.file("hand.safetensors"), file_bytes(header, data));
  const auto mapped = st::load_file(dir.file("hand.safetensors"));
  EXPECT_TRUE(same(mapped.get("a"), at::tensor({1.5f, -2.0f})));
  EXPECT_TRUE(same(mapped.get("b"), at::tensor({int16_t{300}, int16_t{-1}}).reshape({1, 2})));
}

TEST(Safetensors, WriterOutputMatchesTheSpec) {
  const std::string bytes =
      st::serialize({{"b", at::tensor({1.0f, 2.0f, 3.0f}).to(at::kHalf)},
                     {"a", at::tensor({1.0f, 2.0f, 3.0f, 4.0f}).reshape({2, 2})},
                     {"c", at::scalar_tensor(-5, at::kLong)}},
                    {{"k", "v"}});
  ASSERT_GE(bytes.size(), 8u);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  EXPECT_EQ((8 + n) % 8, 0u);
  const std::string header = bytes.substr(8, n);
  const auto json = nlohmann::ordered_json::parse(header);
  // Padding is spaces after the JSON, fewer than 8 of them.
  EXPECT_EQ(header[header.find_last_not_of(' ')], '}');
  EXPECT_LT(header.size() - header.find_last_not_of(' ') - 1, 8u);

  std::vector<std::string> keys;
  for (const auto& [key, value] : json.items()) keys.push_back(key);
  EXPECT_EQ(keys, (std::vector<std::string>{"__metadata__", "b", "a", "c"}));
  EXPECT_EQ(json["__metadata__"], nlohmann::json({{"k", "v"}}));
  // Data sorted by element size: c (8-byte), a (4-byte), b (2-byte).
  EXPECT_EQ(json["c"]["dtype"], "I64");
  EXPECT_EQ(json["c"]["shape"], nlohmann::json::array());
  EXPECT_EQ(json["c"]["data_offsets"], nlohmann::json({0, 8}));
  EXPECT_EQ(json["a"]["dtype"], "F32");
  EXPECT_EQ(json["a"]["shape"], nlohmann::json({2, 2}));
  EXPECT_EQ(json["a"]["data_offsets"], nlohmann::json({8, 24}));
  EXPECT_EQ(json["b"]["dtype"], "F16");
  EXPECT_EQ(json["b"]["shape"], nlohmann::json({3}));
  EXPECT_EQ(json["b"]["data_offsets"], nlohmann::json({24, 30}));
  ASSERT_EQ(bytes.size(), 8 + n + 30);

  const std::string data = bytes.substr(8 + n);
  EXPECT_EQ(data.substr(0, 8), le_u64(static_cast<uint64_t>(-5)));
  EXPECT_EQ(data.substr(8, 4), std::string("\x00\x00\x80\x3f", 4));  // 1.0f
  EXPECT_EQ(data.substr(24, 2), std::string("\x00\x3c", 2));         // half 1.0
}

TEST(Safetensors, AlignedTensorsShareAPrivateMapping) {
  TempDir dir;
  const std::string path = dir.file("m.safetensors");
  st::save_file({{"x", at::tensor({1.0f, 2.0f, 3.0f})}, {"y", at::tensor({4.0f, 5.0f})}}, path);
  const std::string before = read_all(path);
  const auto header = st::read_header(path);
  {
    auto file = st::load_file(path);
    auto x = file.get("x");
    auto y = file.get("y");
    EXPECT_TRUE(same(x, at::tensor({1.0f, 2.0f, 3.0f})));
    EXPECT_TRUE(same(y, at::tensor({4.0f, 5.0f})));
    // Both point into one buffer at exactly the header's distance apart: no copy was made.
    EXPECT_EQ(static_cast<char*>(y.data_ptr()) - static_cast<char*>(x.data_ptr()),
              static_cast<ptrdiff_t>(header.tensors[1].begin - header.tensors[0].begin));
    EXPECT_FALSE(x.storage().resizable());
    EXPECT_EQ(reinterpret_cast<uintptr_t>(x.data_ptr()) % 4096, header.data_start % 4096);

    // Writes are copy-on-write: the tensor changes, the file does not.
    file.tensors.clear();
    x.add_(10);
    EXPECT_TRUE(same(x, at::tensor({11.0f, 12.0f, 13.0f})));
    EXPECT_EQ(read_all(path), before);
    EXPECT_TRUE(same(st::load_file(path).get("x"), at::tensor({1.0f, 2.0f, 3.0f})));
  }
  // The mapping stays alive through the tensor's storage, after the file object is gone.
  at::Tensor survivor = st::load_file(path).get("y");
  EXPECT_TRUE(same(survivor, at::tensor({4.0f, 5.0f})));
}

TEST(Safetensors, MisalignedTensorsAreCopied) {
  // Padding the header so that the data starts at 1 mod 4 misaligns every F32 in it.
  TempDir dir;
  const std::string header = R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  std::string padded = header;
  while ((8 + padded.size()) % 4 != 1) padded += ' ';
  write_all(dir.file("odd.safetensors"), file_bytes(padded, std::string("\x00\x00\xc0\x3f", 4)));
  const auto a = st::load_file(dir.file("odd.safetensors")).get("a");
  EXPECT_TRUE(same(a, at::tensor({1.5f})));
  EXPECT_TRUE(a.storage().resizable());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a.data_ptr()) % 4, 0u);
}

TEST(Safetensors, ReadHeaderReportsLayoutWithoutData) {
  TempDir dir;
  const std::string path = dir.file("h.safetensors");
  st::save_file({{"w", at::zeros({2, 3}, at::kBFloat16)}, {"s", at::scalar_tensor(1, at::kLong)}},
                path, {{"format", "pt"}});
  const auto header = st::read_header(path);
  ASSERT_EQ(header.tensors.size(), 2u);
  EXPECT_EQ(header.tensors[0].name, "w");
  EXPECT_EQ(header.tensors[0].dtype, at::kBFloat16);
  EXPECT_EQ(header.tensors[0].shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(header.tensors[0].begin, 8u);
  EXPECT_EQ(header.tensors[0].end, 20u);
  EXPECT_EQ(header.tensors[1].name, "s");
  EXPECT_EQ(header.tensors[1].dtype, at::kLong);
  EXPECT_TRUE(header.tensors[1].shape.empty());
  EXPECT_EQ(header.tensors[1].nbytes(), 8u);
  EXPECT_EQ(header.metadata.at("format"), "pt");
  EXPECT_EQ(header.data_start % 8, 0u);
  EXPECT_EQ(header.data_size, 20u);
  EXPECT_EQ(header.data_start + header.data_size, std::filesystem::file_size(path));
  const auto from_bytes = st::parse_header(read_all(path));
  EXPECT_EQ(from_bytes.data_start, header.data_start);
  EXPECT_EQ(from_bytes.tensors.size(), 2u);
}

TEST(Safetensors, DtypeNames) {
  EXPECT_EQ(st::dtype_name(at::kBFloat16), "BF16");
  EXPECT_EQ(st::dtype_name(at::kBool), "BOOL");
  EXPECT_EQ(st::dtype_from_name("I8"), at::kChar);
  EXPECT_ERROR_CONTAINS(st::dtype_name(at::kComplexFloat), "unsupported dtype ComplexFloat");
  EXPECT_ERROR_CONTAINS(st::dtype_from_name("f32"), "unknown dtype \"f32\"");
  EXPECT_ERROR_CONTAINS(st::dtype_from_name("U32"), "unsupported dtype \"U32\"");
}

TEST(Safetensors, RejectsMalformedLengthPrefix) {
  EXPECT_ERROR_CONTAINS(st::deserialize(""), "shorter than the 8-byte header length");
  EXPECT_ERROR_CONTAINS(st::deserialize("1234567"), "shorter than the 8-byte header length");
  EXPECT_ERROR_CONTAINS(st::deserialize(le_u64(100) + "{}"), "is larger than the 2 bytes");
  EXPECT_ERROR_CONTAINS(st::deserialize(le_u64(200'000'000) + "{}"), "exceeds the limit");
  EXPECT_ERROR_CONTAINS(st::deserialize(le_u64(~uint64_t{0}) + "{}"), "exceeds the limit");
}

TEST(Safetensors, RejectsMalformedJson) {
  EXPECT_ERROR_CONTAINS(st::deserialize(file_bytes("")), "must start with '{'");
  EXPECT_ERROR_CONTAINS(st::deserialize(file_bytes("[1,2]")), "must start with '{'");
  EXPECT_ERROR_CONTAINS(st::deserialize(file_bytes(" {}")), "must start with '{'");
  EXPECT_ERROR_CONTAINS(st::deserialize(file_bytes("{not json")), "not valid JSON");
  EXPECT_ERROR_CONTAINS(st::deserialize(file_bytes("{} {}")),
                        "has the byte 0x7b at file offset 11 after its JSON text");
  EXPECT_ERROR_CONTAINS(st::deserialize(file_bytes("{\"\xff\":1}")), "not valid JSON");
  EXPECT_ERROR_CONTAINS(st::deserialize(file_bytes(R"({"a":[[[[[[[[1]]]]]]]]})")), "nests deeper");
  EXPECT_ERROR_CONTAINS(st::deserialize(file_bytes(R"({"a":1})")),
                        "tensor 'a': header entry must be an object");
  EXPECT_ERROR_CONTAINS(st::deserialize(file_bytes(R"({"__metadata__":[]})")),
                        "\"__metadata__\" must be an object");
  EXPECT_ERROR_CONTAINS(st::deserialize(file_bytes(R"({"__metadata__":{"k":1}})")),
                        "\"__metadata__\" value of 'k' must be a string");
  // An empty header with an empty buffer is a valid, empty file.
  EXPECT_TRUE(st::deserialize(file_bytes("{}")).tensors.empty());
}

TEST(Safetensors, OnlySpacesMayFollowTheJson) {
  using accelerate::testing::error_of;
  // nlohmann's parser takes a NUL for the end of its input; the bytes after it must still be
  // checked.
  EXPECT_EQ(error_of([] { st::deserialize(file_bytes(std::string("{}\0garbage", 10))); }),
            "safetensors header has the byte 0x00 at file offset 10 after its JSON text, which "
            "ends at offset 10; only spaces (0x20) may pad it");
  EXPECT_EQ(error_of([] { st::deserialize(file_bytes(std::string("{}   \0", 6))); }),
            "safetensors header has the byte 0x00 at file offset 13 after its JSON text, which "
            "ends at offset 10; only spaces (0x20) may pad it");
  // Other whitespace is valid JSON but not the format's padding.
  EXPECT_EQ(error_of([] { st::deserialize(file_bytes("{}\n")); }),
            "safetensors header has the byte 0x0a at file offset 10 after its JSON text, which "
            "ends at offset 10; only spaces (0x20) may pad it");
  EXPECT_EQ(error_of([] { st::deserialize(file_bytes("{} \t")); }),
            "safetensors header has the byte 0x09 at file offset 11 after its JSON text, which "
            "ends at offset 10; only spaces (0x20) may pad it");
  // A NUL inside the JSON text, in a string or between tokens.
  EXPECT_EQ(error_of([] { st::deserialize(file_bytes(std::string("{\"a\0\":1}", 8))); }),
            "safetensors header has a NUL byte at file offset 11 inside its JSON text");
  EXPECT_EQ(error_of([] { st::deserialize(file_bytes(std::string("{\0}", 3))); }),
            "safetensors header has a NUL byte at file offset 9 inside its JSON text");
  // An object that never closes is left to the JSON parser.
  EXPECT_ERROR_CONTAINS(st::deserialize(file_bytes("{\"a\":{}    ")), "not valid JSON");

  // A real file whose padding was overwritten: a NUL then garbage where the spaces were.
  const std::string valid = st::serialize({{"w", at::ones({2})}}, {{"k", "}\"]{"}});
  uint64_t n = 0;
  std::memcpy(&n, valid.data(), 8);
  const std::string json = valid.substr(8, valid.find_last_not_of(' ', 8 + n - 1) + 1 - 8);
  const std::string broken = file_bytes(json + std::string("\0x", 2), valid.substr(8 + n));
  const std::string at = std::to_string(8 + json.size());
  EXPECT_EQ(error_of([&] { st::deserialize(broken); }),
            "safetensors header has the byte 0x00 at file offset " + at +
                " after its JSON text, which ends at offset " + at +
                "; only spaces (0x20) may pad it");
  // Brackets and quotes inside strings do not end the object early.
  EXPECT_EQ(st::deserialize(valid).metadata.at("k"), "}\"]{");
}

TEST(Safetensors, HeaderErrorsNameTheFile) {
  using accelerate::testing::error_of;
  TempDir dir;
  const std::string nul = dir.file("nul.safetensors");
  write_all(nul, file_bytes(std::string("{}\0garbage", 10)));
  const std::string message =
      "safetensors header has the byte 0x00 at file offset 10 after its JSON text, which ends at "
      "offset 10; only spaces (0x20) may pad it";
  EXPECT_EQ(error_of([&] { st::read_header(nul); }), "'" + nul + "': " + message);
  EXPECT_EQ(error_of([&] { st::load_file(nul); }), "'" + nul + "': " + message);
  EXPECT_EQ(error_of([&] { st::load_file(nul, {.copy = true}); }), "'" + nul + "': " + message);

  // Every kind of header error, through each reader.
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"abc", "safetensors file is 3 bytes, shorter than the 8-byte header length"},
      {"", "safetensors file is 0 bytes, shorter than the 8-byte header length"},
      {le_u64(200'000'000) + "{}",
       "safetensors header length 200000000 exceeds the limit of 100000000 bytes"},
      {le_u64(100) + "{}",
       "safetensors header length 100 is larger than the 2 bytes after the "
       "length prefix"},
      {file_bytes("[]"), "safetensors header must start with '{' (is this a safetensors file?)"},
      {file_bytes(R"({"a":1})"), "tensor 'a': header entry must be an object, got 1"},
      {file_bytes("{}", "x"),
       "the data buffer has 1 bytes after the last tensor (ends at 0) that no tensor covers"},
  };
  for (const auto& [bytes, expected] : cases) {
    const std::string path = dir.file("bad.safetensors");
    write_all(path, bytes);
    EXPECT_EQ(error_of([&] { st::read_header(path); }), "'" + path + "': " + expected);
    EXPECT_EQ(error_of([&] { st::load_file(path); }), "'" + path + "': " + expected);
    EXPECT_EQ(error_of([&] { st::load_file(path, {.copy = true}); }),
              "'" + path + "': " + expected);
  }
  EXPECT_ERROR_CONTAINS(st::read_header(dir.file("x.safetensors")),
                        "cannot open '" + dir.file("x.safetensors") + "'");
  EXPECT_ERROR_CONTAINS(st::load_file(dir.file("x.safetensors"), {.copy = true}),
                        "cannot open '" + dir.file("x.safetensors") + "'");
  EXPECT_ERROR_CONTAINS(st::load_file(dir.path().string(), {.copy = true}), "not a regular file");
  // Data errors name it too.
  const std::string bools = dir.file("bools.safetensors");
  write_all(bools, file_bytes(R"({"t":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}})",
                              std::string("\x01\x02", 2)));
  for (bool copy : {false, true}) {
    EXPECT_EQ(error_of([&] { st::load_file(bools, {.copy = copy}); }),
              "'" + bools +
                  "': tensor 't' of dtype BOOL holds the byte 2 at element 1; only 0 and 1 are "
                  "valid");
  }
}

TEST(Safetensors, CopyingLoadOwnsItsMemory) {
  TempDir dir;
  const std::string path = dir.file("c.safetensors");
  const auto tensors = every_dtype();
  st::save_file(tensors, path, kMetadata);
  const auto file = st::load_file(path, {.copy = true});
  expect_round_trip(tensors, file);
  for (const auto& [name, tensor] : file.tensors) {
    EXPECT_TRUE(tensor.storage().resizable()) << name;  // ordinary CPU memory, not the file
  }
  // Truncating the file in place cannot reach tensors that own their memory.
  ASSERT_EQ(::truncate(path.c_str(), 0), 0);
  expect_round_trip(tensors, file);
  // A file cut short after its header is refused, naming it.
  const std::string full = st::serialize({{"x", at::ones({4})}});
  write_all(path, full.substr(0, full.size() - 1));
  EXPECT_ERROR_CONTAINS(st::load_file(path, {.copy = true}), "'" + path + "': tensor 'x'");
}

TEST(SafetensorsDeathTest, TruncatingAMappedFileRaisesSigbus) {
  // What LoadOptions::copy exists for (see SafetensorsFile): a mapped tensor whose pages the
  // file no longer has.
  TempDir dir;
  const std::string path = dir.file("t.safetensors");
  st::save_file({{"x", at::ones({1 << 16})}}, path);
  EXPECT_EXIT(
      {
        const auto x = st::load_file(path).get("x");
        if (::truncate(path.c_str(), 0) != 0) std::_Exit(2);
        // A plain loop: LibTorch's thread pool is not usable in a forked child.
        const float* data = x.data_ptr<float>();
        volatile float total = 0;
        for (int64_t i = 0; i < x.numel(); ++i) total = total + data[i];
        std::_Exit(0);
      },
      ::testing::KilledBySignal(SIGBUS), "");
}

TEST(Safetensors, RejectsDuplicateKeys) {
  const std::string entry = R"({"dtype":"U8","shape":[0],"data_offsets":[0,0]})";
  EXPECT_ERROR_CONTAINS(st::deserialize(file_bytes("{\"a\":" + entry + ",\"a\":" + entry + "}")),
                        "duplicate key 'a'");
  EXPECT_ERROR_CONTAINS(st::deserialize(file_bytes(R"({"a":{"dtype":"U8","dtype":"U8","shape":[0],)"
                                                   R"("data_offsets":[0,0]}})")),
                        "duplicate key 'dtype'");
}

TEST(Safetensors, RejectsBadEntryFields) {
  auto with = [](const std::string& dtype, const std::string& shape, const std::string& offsets,
                 size_t data_size = 4) {
    return st::deserialize(file_bytes(R"({"t":{"dtype":)" + dtype + R"(,"shape":)" + shape +
                                          R"(,"data_offsets":)" + offsets + "}}",
                                      std::string(data_size, '\0')));
  };
  EXPECT_NO_THROW(with("\"F32\"", "[1]", "[0,4]"));
  EXPECT_ERROR_CONTAINS(st::deserialize(file_bytes(R"({"t":{"shape":[],"data_offsets":[0,0]}})")),
                        "tensor 't': header entry lacks \"dtype\"");
  EXPECT_ERROR_CONTAINS(with("5", "[1]", "[0,4]"), "tensor 't': \"dtype\" must be a string");
  EXPECT_ERROR_CONTAINS(with("\"F13\"", "[1]", "[0,4]"), "tensor 't': unknown dtype \"F13\"");
  EXPECT_ERROR_CONTAINS(with("\"U16\"", "[2]", "[0,4]"), "tensor 't': unsupported dtype \"U16\"");
  EXPECT_ERROR_CONTAINS(with("\"F32\"", "1", "[0,4]"), "tensor 't': \"shape\" must be an array");
  EXPECT_ERROR_CONTAINS(with("\"F32\"", "[-1]", "[0,4]"),
                        "tensor 't': shape entry must not be negative");
  EXPECT_ERROR_CONTAINS(with("\"F32\"", "[1.0]", "[0,4]"),
                        "tensor 't': shape entry must be an integer");
  EXPECT_ERROR_CONTAINS(with("\"F32\"", "[\"1\"]", "[0,4]"), "shape entry must be an integer");
  EXPECT_ERROR_CONTAINS(with("\"F32\"", "[18446744073709551615]", "[0,4]"), "is too large");
  EXPECT_ERROR_CONTAINS(with("\"F32\"", "[4294967296,4294967296]", "[0,4]"),
                        "more elements than fit in 64 bits");
  EXPECT_ERROR_CONTAINS(with("\"F32\"", "[4611686018427387904]", "[0,4]"),
                        "more bytes than fit in 64 bits");
  EXPECT_ERROR_CONTAINS(with("\"F32\"", "[1]", "[0]"),
                        "tensor 't': \"data_offsets\" must be an array [begin, end]");
  EXPECT_ERROR_CONTAINS(with("\"F32\"", "[1]", "{}"), "\"data_offsets\" must be an array");
  EXPECT_ERROR_CONTAINS(with("\"F32\"", "[1]", "[0,-4]"), "data_offsets end must not be negative");
  EXPECT_ERROR_CONTAINS(with("\"F32\"", "[1]", "[4,0]"),
                        "tensor 't': data_offsets begin 4 is after end 0");
  EXPECT_ERROR_CONTAINS(with("\"F32\"", "[1]", "[0,8]"),
                        "tensor 't': data_offsets end 8 is past the end of the data buffer (4");
  EXPECT_ERROR_CONTAINS(with("\"F32\"", "[2]", "[0,4]"), "span 4 bytes but shape [2]");
  EXPECT_ERROR_CONTAINS(with("\"BOOL\"", "[4]", "[0,4]", 4), "no error");  // zeros are valid
  EXPECT_ERROR_CONTAINS(
      st::deserialize(file_bytes(R"({"t":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}})",
                                 std::string("\x01\x02", 2))),
      "tensor 't' of dtype BOOL holds the byte 2");
}

TEST(Safetensors, RejectsOverlapsHolesAndTrailingBytes) {
  auto two = [](const std::string& a, const std::string& b, size_t data_size) {
    return st::deserialize(file_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":)" + a +
                                          R"(},"b":{"dtype":"F32","shape":[2],"data_offsets":)" +
                                          b + "}}",
                                      std::string(data_size, '\0')));
  };
  EXPECT_NO_THROW(two("[8,16]", "[0,8]", 16));  // any order is valid
  EXPECT_ERROR_CONTAINS(two("[0,8]", "[4,12]", 12), "tensor 'b' at [4, 12) overlaps");
  EXPECT_ERROR_CONTAINS(two("[0,8]", "[0,8]", 8), "overlaps the tensor before it");
  EXPECT_ERROR_CONTAINS(two("[0,8]", "[12,20]", 20),
                        "tensor 'b' starts at 12 leaving a hole in the data buffer after byte 8");
  EXPECT_ERROR_CONTAINS(two("[4,12]", "[12,20]", 20), "tensor 'a' starts at 4 leaving a hole");
  EXPECT_ERROR_CONTAINS(two("[0,8]", "[8,16]", 20), "the data buffer has 4 bytes after");
  EXPECT_ERROR_CONTAINS(st::deserialize(file_bytes("{}", "x")), "1 bytes after the last tensor");
}

TEST(Safetensors, FileErrorsNameThePath) {
  TempDir dir;
  EXPECT_ERROR_CONTAINS(st::load_file(dir.file("missing.safetensors")), "cannot open");
  EXPECT_ERROR_CONTAINS(st::read_header(dir.file("missing.safetensors")), "cannot open");
  write_all(dir.file("short.safetensors"), "abc");
  EXPECT_ERROR_CONTAINS(st::load_file(dir.file("short.safetensors")), "shorter than the 8-byte");
  EXPECT_ERROR_CONTAINS(st::read_header(dir.file("short.safetensors")), "shorter than the 8-byte");
  write_all(dir.file("empty.safetensors"), "");
  EXPECT_ERROR_CONTAINS(st::load_file(dir.file("empty.safetensors")), "is 0 bytes");
  // A truncated file: the header promises more data than is there.
  const std::string full = st::serialize({{"x", at::ones({4})}});
  write_all(dir.file("cut.safetensors"), full.substr(0, full.size() - 1));
  EXPECT_ERROR_CONTAINS(st::load_file(dir.file("cut.safetensors")), "cut.safetensors");
  EXPECT_ERROR_CONTAINS(st::load_file(dir.file("cut.safetensors")), "past the end");
  EXPECT_ERROR_CONTAINS(st::read_header(dir.file("cut.safetensors")), "past the end");
  EXPECT_ERROR_CONTAINS(st::load_file(dir.path().string()), "not a regular file");
}

TEST(Safetensors, RejectsBadTensorsWhenSaving) {
  const auto x = at::ones({2});
  EXPECT_ERROR_CONTAINS(st::serialize({{"a", x}, {"a", x}}), "duplicate tensor name 'a'");
  EXPECT_ERROR_CONTAINS(st::serialize({{"", x}}), "names must not be empty");
  EXPECT_ERROR_CONTAINS(st::serialize({{"__metadata__", x}}), "is reserved");
  EXPECT_ERROR_CONTAINS(st::serialize({{"c", at::ones({2}, at::kComplexFloat)}}),
                        "tensor 'c': unsupported dtype ComplexFloat");
  EXPECT_ERROR_CONTAINS(st::serialize({{"u", at::Tensor()}}), "tensor 'u' is undefined");
  EXPECT_ERROR_CONTAINS(st::serialize({{"s", at::eye(2).to_sparse()}}), "must be a dense tensor");
  EXPECT_ERROR_CONTAINS(st::serialize({{"bad\xff", x}}), "must be valid UTF-8");
  EXPECT_ERROR_CONTAINS(st::deserialize(st::serialize({{"a", x}})).get("b"),
                        "no tensor named 'b' in the safetensors file; it holds: a");
  // Tensors sharing storage are written as separate entries.
  const auto file = st::deserialize(st::serialize({{"a", x}, {"b", x}}));
  EXPECT_TRUE(same(file.get("b"), x));
  EXPECT_NE(file.get("a").data_ptr(), file.get("b").data_ptr());
}

TEST(Safetensors, SavesAtomically) {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  write_all(path, "old contents that are not safetensors");
  st::save_file({{"x", at::tensor({7.0f})}}, path);
  EXPECT_EQ(dir.entries(), (std::vector<std::string>{"model.safetensors"}));
  EXPECT_TRUE(same(st::load_file(path).get("x"), at::tensor({7.0f})));

  st::save_file({{"y", at::tensor({8.0f})}}, path);
  EXPECT_EQ(dir.entries(), (std::vector<std::string>{"model.safetensors"}));
  EXPECT_EQ(st::load_file(path).names(), (std::vector<std::string>{"y"}));

  // A failed save leaves the previous file alone and no temporary behind.
  EXPECT_ERROR_CONTAINS(st::save_file({{"z", at::ones({1})}, {"z", at::ones({1})}}, path),
                        "duplicate tensor name");
  EXPECT_ERROR_CONTAINS(st::save_file({{"z", at::ones({1})}}, dir.file("no/such/dir/f")),
                        "cannot create");
  EXPECT_EQ(dir.entries(), (std::vector<std::string>{"model.safetensors"}));
  EXPECT_EQ(st::load_file(path).names(), (std::vector<std::string>{"y"}));
}

TEST(Safetensors, SurvivesRandomMutations) {
  const std::string valid = st::serialize({{"w", at::arange(6, at::kFloat).reshape({2, 3})},
                                           {"b", at::tensor({1, 0}).to(at::kBool)},
                                           {"h", at::ones({3}, at::kHalf)},
                                           {"n", at::scalar_tensor(42, at::kLong)}},
                                          {{"format", "pt"}});
  std::mt19937_64 rng(20240601);
  auto pick = [&](size_t bound) {
    return bound == 0 ? size_t{0} : static_cast<size_t>(rng() % bound);
  };
  const std::string alphabet = "{}[]\":,0123456789-.eE \\abFIUL\xff\x00";
  int loaded = 0;
  int rejected = 0;
  for (int i = 0; i < 2000; ++i) {
    std::string bytes = valid;
    const int edits = 1 + static_cast<int>(pick(4));
    for (int e = 0; e < edits; ++e) {
      switch (pick(6)) {
        case 0:  // flip bits anywhere
          if (!bytes.empty()) bytes[pick(bytes.size())] ^= static_cast<char>(1 + pick(255));
          break;
        case 1:  // JSON-ish character in the header
          if (bytes.size() > 8) {
            bytes[8 + pick(bytes.size() - 8)] = alphabet[pick(alphabet.size())];
          }
          break;
        case 2:  // truncate
          bytes.resize(pick(bytes.size() + 1));
          break;
        case 3:  // insert
          bytes.insert(pick(bytes.size() + 1), 1, alphabet[pick(alphabet.size())]);
          break;
        case 4:  // erase
          if (!bytes.empty()) bytes.erase(pick(bytes.size()), 1 + pick(4));
          break;
        default:  // a different length prefix
          if (bytes.size() >= 8) {
            const auto n = static_cast<uint64_t>(pick(bytes.size() + 16));
            bytes.replace(0, 8, le_u64(rng() % 8 == 0 ? rng() : n));
          }
          break;
      }
    }
    try {
      const auto file = st::deserialize(bytes);
      for (const auto& [name, tensor] : file.tensors) (void)tensor.sum();
      ++loaded;
    } catch (const c10::Error&) {
      ++rejected;
    } catch (const std::exception&) {
      ++rejected;
    }
  }
  EXPECT_EQ(loaded + rejected, 2000);
  EXPECT_GT(loaded, 0);
  EXPECT_GT(rejected, 0);
}
