#include "../../src/detail/file_mapping.h"

#include <accelerate/safetensors.h>

#include <expect_error.h>
#include <files.h>
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <string>

namespace fm = accelerate::detail;
using accelerate::testing::file_bytes;
using accelerate::testing::in_quotes;
using accelerate::testing::same;
using accelerate::testing::TempDir;
using accelerate::testing::write_file;

namespace {

// Eight little-endian float32 values 0..7.
std::string eight_floats() {
  std::string bytes(32, '\0');
  for (int i = 0; i < 8; ++i) {
    const float value = static_cast<float>(i);
    std::memcpy(bytes.data() + 4 * i, &value, 4);
  }
  return bytes;
}

}  // namespace

TEST(FileMapping, MapsTheWholeFile) {
  TempDir dir;
  write_file(dir.file("f"), eight_floats());
  const auto mapping = fm::map_file(dir.file("f"));
  EXPECT_EQ(mapping->size(), 32u);
  EXPECT_EQ(mapping->path(), dir.file("f"));
  EXPECT_EQ(std::string(mapping->data(), mapping->size()), eight_floats());
}

TEST(FileMapping, EmptyFileGivesAnEmptyMapping) {
  TempDir dir;
  write_file(dir.file("empty"), "");
  const auto mapping = fm::map_file(dir.file("empty"));
  EXPECT_EQ(mapping->size(), 0u);
  EXPECT_EQ(mapping->data(), nullptr);
  const at::Tensor t = fm::mapped_tensor(mapping, 0, {0, 3}, at::kFloat);
  EXPECT_EQ(t.sizes(), at::IntArrayRef({0, 3}));
  EXPECT_TRUE(fm::is_file_mapped(t));
  EXPECT_ERROR_CONTAINS(fm::mapped_tensor(mapping, 0, {1}, at::kFloat), "outside the 0-byte file");
}

TEST(FileMapping, MapErrorsNameThePathAndTheReason) {
  TempDir dir;
  const std::string missing = dir.file("missing");
  EXPECT_ERROR_CONTAINS(fm::map_file(missing), "cannot open " + in_quotes(missing));
  EXPECT_ERROR_CONTAINS(fm::map_file(missing), "No such file or directory");
  EXPECT_ERROR_CONTAINS(fm::map_file(dir.path().string()),
                        in_quotes(dir.path().string()) + " is not a regular file");
}

TEST(FileMapping, TensorViewsItsRangeWithoutACopy) {
  TempDir dir;
  write_file(dir.file("f"), eight_floats());
  const auto mapping = fm::map_file(dir.file("f"));
  const at::Tensor t = fm::mapped_tensor(mapping, 8, {2, 3}, at::kFloat);
  EXPECT_TRUE(same(t, at::arange(2, 8, at::kFloat).reshape({2, 3})));
  EXPECT_TRUE(t.is_contiguous());
  EXPECT_EQ(t.data_ptr(), mapping->data() + 8);
  // The storage owns exactly the viewed bytes, so set_data/copy see a consistent size.
  EXPECT_EQ(t.storage().nbytes(), 24u);
  EXPECT_EQ(t.storage_offset(), 0);

  // Two tensors over overlapping ranges are the same memory.
  const at::Tensor whole = fm::mapped_tensor(mapping, 0, {8}, at::kFloat);
  t[0][0].fill_(100.0f);
  EXPECT_EQ(whole[2].item<float>(), 100.0f);
  // ... and the memory is private: the file keeps its bytes.
  EXPECT_EQ(file_bytes(dir.file("f")), eight_floats());
  EXPECT_EQ(fm::mapped_tensor(fm::map_file(dir.file("f")), 8, {1}, at::kFloat).item<float>(), 2.0f);
}

TEST(FileMapping, ZeroDimTensorViewsOneElement) {
  TempDir dir;
  write_file(dir.file("f"), eight_floats());
  const at::Tensor t = fm::mapped_tensor(fm::map_file(dir.file("f")), 28, {}, at::kFloat);
  EXPECT_EQ(t.dim(), 0);
  EXPECT_EQ(t.item<float>(), 7.0f);
  EXPECT_EQ(t.storage().nbytes(), 4u);
}

TEST(FileMapping, RangeAndAlignmentErrors) {
  TempDir dir;
  write_file(dir.file("f"), eight_floats());
  const auto mapping = fm::map_file(dir.file("f"));
  EXPECT_ERROR_CONTAINS(fm::mapped_tensor(mapping, 4, {8}, at::kFloat),
                        "the 32 bytes of a Float tensor of shape [8] at offset 4 are outside the "
                        "32-byte file " +
                            in_quotes(dir.file("f")));
  EXPECT_ERROR_CONTAINS(fm::mapped_tensor(mapping, UINT64_MAX - 1, {1}, at::kFloat),
                        "are outside the 32-byte file");
  EXPECT_ERROR_CONTAINS(fm::mapped_tensor(mapping, 0, {INT64_MAX, INT64_MAX}, at::kFloat),
                        "too many bytes");
  EXPECT_ERROR_CONTAINS(fm::mapped_tensor(mapping, 0, {-1}, at::kFloat), "negative dimension");
  EXPECT_ERROR_CONTAINS(
      fm::mapped_tensor(mapping, 2, {2}, at::kFloat),
      "offset 2 in " + in_quotes(dir.file("f")) + " is not aligned for Float (4 bytes)");
  // One-byte elements fit anywhere.
  EXPECT_EQ(fm::mapped_tensor(mapping, 7, {1}, at::kByte).item<uint8_t>(), 0x3f);
}

TEST(FileMapping, MappingLivesAsLongAsAnyTensor) {
  TempDir dir;
  write_file(dir.file("f"), eight_floats());
  auto mapping = fm::map_file(dir.file("f"));
  const std::weak_ptr<fm::FileMapping> watch = mapping;
  at::Tensor t = fm::mapped_tensor(mapping, 0, {8}, at::kFloat);
  mapping.reset();
  EXPECT_FALSE(watch.expired());
  at::Tensor view = t.slice(0, 4, 8);
  t.reset();
  EXPECT_FALSE(watch.expired());
  // Unlinking the file does not take the pages away from a mapping.
  std::filesystem::remove(dir.file("f"));
  EXPECT_TRUE(same(view, at::arange(4, 8, at::kFloat)));
  view.reset();
  EXPECT_TRUE(watch.expired());
}

TEST(FileMapping, RecognisesMappedStorage) {
  TempDir dir;
  write_file(dir.file("f"), eight_floats());
  const at::Tensor t = fm::mapped_tensor(fm::map_file(dir.file("f")), 0, {2, 4}, at::kFloat);
  EXPECT_TRUE(fm::is_file_mapped(t));
  EXPECT_EQ(fm::mapped_path(t), dir.file("f"));
  EXPECT_TRUE(fm::is_file_mapped(t.t()));
  EXPECT_TRUE(fm::is_file_mapped(t[1]));
  EXPECT_EQ(fm::mapped_path(t.view({8})), dir.file("f"));

  EXPECT_FALSE(fm::is_file_mapped(t.clone()));
  EXPECT_FALSE(fm::is_file_mapped(at::ones({3})));
  EXPECT_FALSE(fm::is_file_mapped(at::from_blob(t.data_ptr(), {8}, at::kFloat)));
  EXPECT_FALSE(fm::is_file_mapped(at::Tensor()));
  EXPECT_EQ(fm::mapped_path(at::ones({3})), "");
  EXPECT_EQ(fm::mapped_path(at::Tensor()), "");
}

TEST(FileMapping, BehavesAsAnOrdinaryTensor) {
  TempDir dir;
  write_file(dir.file("f"), eight_floats());
  const at::Tensor mapped = fm::mapped_tensor(fm::map_file(dir.file("f")), 0, {8}, at::kFloat);

  at::Tensor param = at::zeros({8});
  param.set_data(mapped);
  EXPECT_TRUE(fm::is_file_mapped(param));
  EXPECT_TRUE(same(param, at::arange(8, at::kFloat)));

  mapped.copy_(at::ones({8}));
  EXPECT_TRUE(same(param, at::ones({8})));
  mapped.mul_(3);
  EXPECT_TRUE(same(mapped.sum(), at::scalar_tensor(24.0f)));
  EXPECT_EQ(file_bytes(dir.file("f")), eight_floats());

  // The storage cannot grow: that would have to copy out of the file behind the caller's back.
  at::Tensor grown = mapped.view({8});
  EXPECT_ANY_THROW(grown.resize_({16}));
}

TEST(FileMapping, AdviseWillNeedIsHarmless) {
  TempDir dir;
  std::string bytes(3 * 4096 + 8, '\0');
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<char>(i % 2);
  write_file(dir.file("f"), bytes);
  const auto mapping = fm::map_file(dir.file("f"));
  const at::Tensor t =
      fm::mapped_tensor(mapping, 0, {static_cast<int64_t>(bytes.size())}, at::kByte);
  fm::advise_will_need(t);
  fm::advise_will_need(t.slice(0, 5000, 9000));
  fm::advise_will_need(t.slice(0, bytes.size() - 3));
  fm::advise_will_need(t.slice(0, 0, 0));
  fm::advise_will_need(t.view({-1, 8}).t());
  fm::advise_will_need(at::ones({4}));
  fm::advise_will_need(at::Tensor());
  fm::advise_will_need(fm::mapped_tensor(fm::map_file(dir.file("f")), 0, {0}, at::kByte));
  EXPECT_EQ(std::string(static_cast<const char*>(t.data_ptr()), bytes.size()), bytes);
}

// load_file goes through the same mapping: aligned tensors are views, unaligned ones copies.
TEST(FileMapping, SafetensorsLoadFileMapsAlignedTensorsAndCopiesOthers) {
  TempDir dir;
  accelerate::safetensors::save_file({{"w", at::arange(6, at::kFloat).reshape({2, 3})},
                                      {"flag", at::tensor({1, 0}).to(at::kBool)}},
                                     dir.file("model.safetensors"));
  const auto file = accelerate::safetensors::load_file(dir.file("model.safetensors"));
  EXPECT_TRUE(fm::is_file_mapped(file.get("w")));
  EXPECT_TRUE(fm::is_file_mapped(file.get("flag")));
  EXPECT_EQ(fm::mapped_path(file.get("w")), dir.file("model.safetensors"));
  EXPECT_EQ(file.get("w").storage().nbytes(), 24u);
  EXPECT_TRUE(same(file.get("w"), at::arange(6, at::kFloat).reshape({2, 3})));

  // A header padded to a multiple of 8 puts the data buffer on an 8-byte boundary, so the F32
  // at data offset 1 is unaligned and must be copied, while the U8 before it is mapped.
  std::string header = R"({"u":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                       R"("f":{"dtype":"F32","shape":[1],"data_offsets":[1,5]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  std::string length(8, '\0');
  const uint64_t n = header.size();
  std::memcpy(length.data(), &n, 8);
  write_file(dir.file("odd.safetensors"), length + header + std::string("\x07\x00\x00\xc0\x3f", 5));
  const auto odd = accelerate::safetensors::load_file(dir.file("odd.safetensors"));
  EXPECT_TRUE(fm::is_file_mapped(odd.get("u")));
  EXPECT_FALSE(fm::is_file_mapped(odd.get("f")));
  EXPECT_TRUE(same(odd.get("f"), at::tensor({1.5f})));
  EXPECT_TRUE(same(odd.get("u"), at::tensor({uint8_t{7}})));

  // A bool byte other than 0/1 is refused on the mapped path too.
  std::string bad_header = R"({"b":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}})";
  bad_header.append((8 - bad_header.size() % 8) % 8, ' ');
  const uint64_t m = bad_header.size();
  std::memcpy(length.data(), &m, 8);
  write_file(dir.file("bool.safetensors"), length + bad_header + std::string("\x01\x02", 2));
  EXPECT_ERROR_CONTAINS(accelerate::safetensors::load_file(dir.file("bool.safetensors")),
                        "holds the byte 2");
}
