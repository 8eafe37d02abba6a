#include "engine/safetensors.h"

#include <ATen/ATen.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace remotelens {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// A fresh, empty directory per test, under Bazel's TEST_TMPDIR.
std::string FreshDir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  fs::path dir = fs::path(::testing::TempDir()) /
                 absl::StrCat(info->test_suite_name(), ".", info->name());
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

std::string LengthField(uint64_t n) {
  std::string field(8, '\0');
  for (int i = 0; i < 8; ++i) field[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return field;
}

// A safetensors file from a hand-written header and data buffer.
std::string MakeFile(const std::string& header, const std::string& data) {
  return LengthField(header.size()) + header + data;
}

std::string Bytes(std::initializer_list<unsigned> bytes) {
  std::string s;
  for (unsigned b : bytes) s.push_back(static_cast<char>(b));
  return s;
}

// Bit-for-bit equality, so -0.0 vs 0.0 or a changed NaN payload would also fail.
void ExpectSameBytes(const at::Tensor& expected, const at::Tensor& actual) {
  ASSERT_TRUE(actual.defined());
  ASSERT_EQ(actual.scalar_type(), expected.scalar_type());
  ASSERT_EQ(actual.sizes().vec(), expected.sizes().vec());
  ASSERT_TRUE(actual.device().is_cpu());
  ASSERT_TRUE(actual.is_contiguous());
  at::Tensor e = expected.contiguous();
  EXPECT_EQ(std::memcmp(e.data_ptr(), actual.data_ptr(), e.nbytes()), 0);
}

std::vector<std::pair<std::string, at::Tensor>> SampleTensors() {
  at::manual_seed(1234);
  return {
      {"layers.0.attn.w_q", at::randn({4, 6})},
      {"layers.0.mlp.w_in", at::randn({3, 5}).to(at::kHalf)},
      {"embed", at::randn({7, 2, 3}).to(at::kBFloat16)},
      {"bias", at::randn({5})},
  };
}

// Asserts a status's code and that its message names every fragment.
#define EXPECT_ERROR(status_expr, expected_code, ...)                                            \
  do {                                                                                    \
    const absl::Status expect_error_status_ = (status_expr);                              \
    EXPECT_EQ(expect_error_status_.code(), expected_code) << expect_error_status_;               \
    for (const char* fragment : {__VA_ARGS__}) {                                          \
      EXPECT_THAT(std::string(expect_error_status_.message()), HasSubstr(fragment));      \
    }                                                                                     \
  } while (0)

// ------------------------------------------------------------------------------------------------
// Round trips

TEST(Safetensors, RoundTripsValuesShapesAndDtypesExactly) {
  const std::string path = FreshDir() + "/t.safetensors";
  const auto tensors = SampleTensors();
  ASSERT_TRUE(WriteSafetensors(path, tensors).ok());

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_EQ((*file)->entries().size(), tensors.size());
  EXPECT_EQ((*file)->path(), path);
  for (const auto& [name, expected] : tensors) {
    SCOPED_TRACE(name);
    auto actual = (*file)->Tensor(name);
    ASSERT_TRUE(actual.ok()) << actual.status();
    ExpectSameBytes(expected, *actual);
    EXPECT_TRUE(at::equal(*actual, expected));
  }
  EXPECT_EQ((*file)->entries().at("embed").dtype, at::kBFloat16);
  EXPECT_EQ((*file)->entries().at("layers.0.mlp.w_in").dtype, at::kHalf);
  EXPECT_EQ((*file)->entries().at("bias").dtype, at::kFloat);
  EXPECT_THAT((*file)->entries().at("embed").shape, ElementsAre(7, 2, 3));
}

TEST(Safetensors, LaysOutDataInTheOrderGivenAfterAnAlignedHeader) {
  const std::string path = FreshDir() + "/t.safetensors";
  const auto tensors = SampleTensors();
  ASSERT_TRUE(WriteSafetensors(path, tensors).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();

  uint64_t expected_begin = 0;
  for (const auto& [name, tensor] : tensors) {
    const SafetensorsFile::Entry& entry = (*file)->entries().at(name);
    EXPECT_EQ(entry.begin, expected_begin) << name;
    EXPECT_EQ(entry.end - entry.begin, tensor.nbytes()) << name;
    expected_begin = entry.end;
  }
  const std::string bytes = ReadBytes(path);
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | uint8_t(bytes[i]);
  EXPECT_EQ((8 + header_size) % 8, 0u);
  EXPECT_EQ(bytes.size(), 8 + header_size + expected_begin);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
}

TEST(Safetensors, RoundTripsZeroDimAndEmptyTensors) {
  const std::string path = FreshDir() + "/t.safetensors";
  const std::vector<std::pair<std::string, at::Tensor>> tensors = {
      {"scalar", at::scalar_tensor(3.5, at::kFloat)},
      {"empty_1d", at::empty({0}, at::kFloat)},
      {"empty_3d", at::empty({3, 0, 2}, at::kHalf)},
      {"after", at::arange(4, at::kFloat)},
  };
  ASSERT_TRUE(WriteSafetensors(path, tensors).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();

  auto scalar = (*file)->Tensor("scalar");
  ASSERT_TRUE(scalar.ok()) << scalar.status();
  EXPECT_EQ(scalar->dim(), 0);
  EXPECT_EQ(scalar->item<float>(), 3.5f);
  EXPECT_TRUE((*file)->entries().at("scalar").shape.empty());

  auto empty_3d = (*file)->Tensor("empty_3d");
  ASSERT_TRUE(empty_3d.ok()) << empty_3d.status();
  EXPECT_EQ(empty_3d->sizes().vec(), (std::vector<int64_t>{3, 0, 2}));
  EXPECT_EQ(empty_3d->scalar_type(), at::kHalf);
  auto empty_1d = (*file)->Tensor("empty_1d");
  ASSERT_TRUE(empty_1d.ok());
  EXPECT_EQ(empty_1d->numel(), 0);

  auto after = (*file)->Tensor("after");
  ASSERT_TRUE(after.ok());
  ExpectSameBytes(tensors[3].second, *after);
}

TEST(Safetensors, WritesNonContiguousTensorsRowMajor) {
  const std::string path = FreshDir() + "/t.safetensors";
  at::Tensor base = at::arange(12, at::kFloat).reshape({3, 4});
  at::Tensor transposed = base.t();  // [4, 3], strides (1, 4)
  ASSERT_FALSE(transposed.is_contiguous());
  ASSERT_TRUE(WriteSafetensors(path, {{"t", transposed}}).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok());
  auto t = (*file)->Tensor("t");
  ASSERT_TRUE(t.ok());
  ExpectSameBytes(transposed.contiguous(), *t);
  EXPECT_EQ((*t)[0][1].item<float>(), 4.0f);  // row-major: element (0, 1) of the transpose
}

TEST(Safetensors, TensorViewsTheMappingAndOutlivesTheFileObject) {
  const std::string path = FreshDir() + "/t.safetensors";
  const auto tensors = SampleTensors();
  ASSERT_TRUE(WriteSafetensors(path, tensors).ok());

  at::Tensor kept;
  {
    auto file = SafetensorsFile::Open(path);
    ASSERT_TRUE(file.ok());
    auto first = (*file)->Tensor("layers.0.attn.w_q");
    auto second = (*file)->Tensor("layers.0.attn.w_q");
    ASSERT_TRUE(first.ok() && second.ok());
    // Both calls view the same mapped bytes: no copy was made.
    EXPECT_EQ(first->data_ptr(), second->data_ptr());
    kept = *first;
  }
  // The file object is gone and the file itself unlinked; the mapping must still be readable.
  fs::remove(path);
  ExpectSameBytes(tensors[0].second, kept);
  EXPECT_TRUE(at::equal(kept * 2, tensors[0].second * 2));
}

TEST(Safetensors, ViewBytesSpansAdjacentTensorsAndRefusesWhatItCannotView) {
  const std::string path = FreshDir() + "/t.safetensors";
  at::manual_seed(5);
  const at::Tensor gate = at::randn({3, 4}).to(at::kBFloat16);
  const at::Tensor up = at::randn({2, 4}).to(at::kBFloat16);
  ASSERT_TRUE(WriteSafetensors(path, {{"gate", gate}, {"up", up}}).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const uint64_t start = (*file)->data_offset() + (*file)->entries().at("gate").begin;

  auto fused = (*file)->ViewBytes(start, {5, 4}, at::kBFloat16);
  ASSERT_TRUE(fused.ok()) << fused.status();
  EXPECT_TRUE(at::equal(*fused, at::cat({gate, up})));
  // A view, not a copy: the same bytes Tensor() views.
  EXPECT_EQ(fused->data_ptr(), (*file)->Tensor("gate")->data_ptr());

  EXPECT_ERROR((*file)->ViewBytes(start, {6, 4}, at::kBFloat16).status(),
               absl::StatusCode::kOutOfRange, "not inside the data");
  EXPECT_ERROR((*file)->ViewBytes(0, {1}, at::kBFloat16).status(), absl::StatusCode::kOutOfRange,
               "not inside the data");
  EXPECT_ERROR((*file)->ViewBytes(start + 1, {2}, at::kBFloat16).status(),
               absl::StatusCode::kFailedPrecondition, "aligned");
}

TEST(Safetensors, RoundTripsMetadata) {
  const std::string path = FreshDir() + "/t.safetensors";
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"}, {"empty", ""}, {"unicode", "caf\xc3\xa9 \xe2\x9c\x93"}};
  ASSERT_TRUE(WriteSafetensors(path, {{"x", at::ones({2})}}, metadata).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata(), metadata);
  EXPECT_EQ((*file)->entries().size(), 1u);  // __metadata__ is not a tensor
}

TEST(Safetensors, ReadsHandWrittenFileWithKnownBytes) {
  // As another writer might produce it: no padding, so the data starts unaligned.
  const std::string header =
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("b":{"dtype":"F16","shape":[1,3],"data_offsets":[8,14]},)"
      R"("c":{"dtype":"BF16","shape":[],"data_offsets":[14,16]},)"
      R"("__metadata__":{"source":"hand"}})";
  const std::string data = Bytes({0x00, 0x00, 0x80, 0x3f,    // F32 1.0
                                  0x00, 0x00, 0x20, 0xc0,    // F32 -2.5
                                  0x00, 0x38,                // F16 0.5
                                  0x00, 0xbc,                // F16 -1.0
                                  0xff, 0x7b,                // F16 65504 (largest finite)
                                  0x40, 0x40});              // BF16 3.0
  const std::string path = FreshDir() + "/hand.safetensors";
  WriteBytes(path, MakeFile(header, data));

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata().at("source"), "hand");

  auto a = (*file)->Tensor("a");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->scalar_type(), at::kFloat);
  EXPECT_EQ(a->sizes().vec(), std::vector<int64_t>{2});
  EXPECT_EQ((*a)[0].item<float>(), 1.0f);
  EXPECT_EQ((*a)[1].item<float>(), -2.5f);
  // 'a' starts 2 bytes past a 4-byte boundary in the mapping, so it must have been copied into
  // aligned memory rather than viewed.
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a->data_ptr()) % 4, 0u);

  auto b = (*file)->Tensor("b");
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->scalar_type(), at::kHalf);
  EXPECT_EQ(b->sizes().vec(), (std::vector<int64_t>{1, 3}));
  EXPECT_EQ((*b)[0][0].item<float>(), 0.5f);
  EXPECT_EQ((*b)[0][1].item<float>(), -1.0f);
  EXPECT_EQ((*b)[0][2].item<float>(), 65504.0f);

  auto c = (*file)->Tensor("c");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->scalar_type(), at::kBFloat16);
  EXPECT_EQ(c->dim(), 0);
  EXPECT_EQ(c->item<float>(), 3.0f);
}

// ------------------------------------------------------------------------------------------------
// Writer errors

TEST(Safetensors, WriterRejectsBadTensorsAndWritesNothing) {
  const std::string path = FreshDir() + "/t.safetensors";
  EXPECT_ERROR(WriteSafetensors(path, {{"ids", at::arange(3)}}),
               absl::StatusCode::kInvalidArgument, "'ids'", "Long", "float32");
  EXPECT_ERROR(WriteSafetensors(path, {{"d", at::ones({2}, at::kDouble)}}),
               absl::StatusCode::kInvalidArgument, "'d'", "Double");
  EXPECT_ERROR(WriteSafetensors(path, {{"x", at::ones({2})}, {"x", at::ones({3})}}),
               absl::StatusCode::kInvalidArgument, "'x'", "repeats");
  EXPECT_ERROR(WriteSafetensors(path, {{"", at::ones({2})}}), absl::StatusCode::kInvalidArgument,
               "empty name");
  EXPECT_ERROR(WriteSafetensors(path, {{"u", at::Tensor()}}), absl::StatusCode::kInvalidArgument,
               "'u'", "undefined");
  EXPECT_ERROR(WriteSafetensors(path, {{"__metadata__", at::ones({1})}}),
               absl::StatusCode::kInvalidArgument, "reserved");
  EXPECT_FALSE(fs::exists(path));
  EXPECT_FALSE(fs::exists(path + ".tmp"));
}

TEST(Safetensors, WriterReplacesAnExistingFileWhole) {
  const std::string path = FreshDir() + "/t.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, {{"old", at::zeros({100})}}).ok());
  ASSERT_TRUE(WriteSafetensors(path, {{"new", at::full({2}, 7.0)}}).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok());
  EXPECT_EQ((*file)->entries().count("old"), 0u);
  auto t = (*file)->Tensor("new");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ((*t)[1].item<float>(), 7.0f);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
}

// ------------------------------------------------------------------------------------------------
// Reader errors

class SafetensorsErrors : public ::testing::Test {
 protected:
  void SetUp() override { path_ = FreshDir() + "/bad.safetensors"; }

  absl::Status OpenWith(const std::string& header, const std::string& data) {
    WriteBytes(path_, MakeFile(header, data));
    return SafetensorsFile::Open(path_).status();
  }

  std::string path_;
};

TEST_F(SafetensorsErrors, TruncatedFileNamesFileAndProblemAtEveryCut) {
  ASSERT_TRUE(WriteSafetensors(path_, SampleTensors()).ok());
  const std::string whole = ReadBytes(path_);
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | uint8_t(whole[i]);
  const size_t data_start = 8 + header_size;

  struct Cut {
    size_t size;
    const char* problem;
  };
  const Cut cuts[] = {
      {0, "shorter than the 8-byte header length field"},
      {3, "shorter than the 8-byte header length field"},
      {7, "shorter than the 8-byte header length field"},
      {8, "bytes that follow the length field"},
      {8 + header_size / 2, "bytes that follow the length field"},
      {data_start - 1, "bytes that follow the length field"},
      {data_start, "beyond the end of the 0-byte data buffer"},
      {data_start + 10, "beyond the end of the 10-byte data buffer"},
      {whole.size() - 1, "beyond the end"},
  };
  for (const Cut& cut : cuts) {
    SCOPED_TRACE(absl::StrCat("cut at ", cut.size, " of ", whole.size()));
    WriteBytes(path_, whole.substr(0, cut.size));
    EXPECT_ERROR(SafetensorsFile::Open(path_).status(), absl::StatusCode::kDataLoss,
                 path_.c_str(), cut.problem);
  }
}

TEST_F(SafetensorsErrors, HeaderLengthBeyondFileOrLimit) {
  WriteBytes(path_, LengthField(1000) + "{}");
  EXPECT_ERROR(SafetensorsFile::Open(path_).status(), absl::StatusCode::kDataLoss, path_.c_str(),
               "header length 1000 exceeds the 2 bytes");
  WriteBytes(path_, LengthField(uint64_t{200} << 20) + "{}");
  EXPECT_ERROR(SafetensorsFile::Open(path_).status(), absl::StatusCode::kDataLoss,
               "exceeds the 104857600-byte limit");
  WriteBytes(path_, LengthField(~uint64_t{0}) + "{}");
  EXPECT_ERROR(SafetensorsFile::Open(path_).status(), absl::StatusCode::kDataLoss,
               "-byte limit");
}

TEST_F(SafetensorsErrors, InvalidJsonOrNonObjectHeader) {
  EXPECT_ERROR(OpenWith("{\"a\": {", ""), absl::StatusCode::kDataLoss, path_.c_str(),
               "header is not valid JSON");
  EXPECT_ERROR(OpenWith("[1, 2]", ""), absl::StatusCode::kDataLoss, "not a JSON object");
  EXPECT_ERROR(OpenWith("\xff\xfe", ""), absl::StatusCode::kDataLoss, "not valid JSON");
  EXPECT_ERROR(OpenWith(R"({"a": 5})", ""), absl::StatusCode::kDataLoss,
               "tensor 'a' is not a JSON object");
}

TEST_F(SafetensorsErrors, EntryFieldsOfTheWrongJsonType) {
  EXPECT_ERROR(OpenWith(R"({"a":{"dtype":5,"shape":[1],"data_offsets":[0,4]}})", "abcd"),
               absl::StatusCode::kDataLoss, "tensor 'a' has no \"dtype\" string");
  EXPECT_ERROR(OpenWith(R"({"a":{"shape":[1],"data_offsets":[0,4]}})", "abcd"),
               absl::StatusCode::kDataLoss, "no \"dtype\"");
  EXPECT_ERROR(OpenWith(R"({"a":{"dtype":"F32","shape":"1","data_offsets":[0,4]}})", "abcd"),
               absl::StatusCode::kDataLoss, "tensor 'a' has no \"shape\" array");
  EXPECT_ERROR(OpenWith(R"({"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}})", "abcd"),
               absl::StatusCode::kDataLoss, "non-integer dimension");
  EXPECT_ERROR(OpenWith(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4]}})", "abcd"),
               absl::StatusCode::kDataLoss, "\"data_offsets\" as two non-negative integers");
  EXPECT_ERROR(OpenWith(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", "abcd"),
               absl::StatusCode::kDataLoss, "data_offsets");
  EXPECT_ERROR(OpenWith(R"({"__metadata__":{"k":1}})", ""), absl::StatusCode::kDataLoss,
               "__metadata__ value for 'k' is not a string");
  EXPECT_ERROR(OpenWith(R"({"__metadata__":[]})", ""), absl::StatusCode::kDataLoss,
               "__metadata__ is not a JSON object");
}

TEST_F(SafetensorsErrors, UnsupportedDtype) {
  EXPECT_ERROR(OpenWith(R"({"x":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})",
                        std::string(8, '\0')),
               absl::StatusCode::kInvalidArgument, path_.c_str(),
               "tensor 'x' has unsupported dtype I64; supported: F32, F16, BF16");
  EXPECT_ERROR(OpenWith(R"({"y":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})",
                        std::string(8, '\0')),
               absl::StatusCode::kInvalidArgument, "tensor 'y' has unsupported dtype F64");
}

TEST_F(SafetensorsErrors, OffsetsThatDisagreeWithShape) {
  EXPECT_ERROR(OpenWith(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})",
                        std::string(12, '\0')),
               absl::StatusCode::kDataLoss, path_.c_str(), "tensor 'w'", "spanning 8 bytes",
               "needs 12");
  EXPECT_ERROR(OpenWith(R"({"w":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,16]}})",
                        std::string(16, '\0')),
               absl::StatusCode::kDataLoss, "BF16 shape [2, 2] needs 8");
}

TEST_F(SafetensorsErrors, OverlappingOutOfBoundsAndReversedOffsets) {
  EXPECT_ERROR(OpenWith(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                        R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                        std::string(12, '\0')),
               absl::StatusCode::kDataLoss, "tensors 'a' [0, 8) and 'b' [4, 12) overlap");
  EXPECT_ERROR(OpenWith(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})",
                        std::string(12, '\0')),
               absl::StatusCode::kDataLoss, path_.c_str(), "tensor 'a'",
               "beyond the end of the 12-byte data buffer");
  EXPECT_ERROR(OpenWith(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})",
                        std::string(12, '\0')),
               absl::StatusCode::kDataLoss, "begin after end");
  EXPECT_ERROR(
      OpenWith(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551615]}})",
               std::string(4, '\0')),
      absl::StatusCode::kDataLoss, "beyond the end");
}

TEST_F(SafetensorsErrors, NegativeAndOverflowingDimensions) {
  EXPECT_ERROR(OpenWith(R"({"n":{"dtype":"F32","shape":[2,-3],"data_offsets":[0,0]}})", ""),
               absl::StatusCode::kDataLoss, path_.c_str(), "tensor 'n' has negative dimension -3");
  EXPECT_ERROR(OpenWith(R"({"n":{"dtype":"F32","shape":[4611686018427387904,4],)"
                        R"("data_offsets":[0,0]}})",
                        ""),
               absl::StatusCode::kDataLoss, "overflows int64");
  EXPECT_ERROR(OpenWith(R"({"n":{"dtype":"F32","shape":[18446744073709551615],)"
                        R"("data_offsets":[0,0]}})",
                        ""),
               absl::StatusCode::kDataLoss, "too large for int64");
  // A zero dimension makes the tensor empty however large the others are.
  EXPECT_TRUE(OpenWith(R"({"z":{"dtype":"F32","shape":[4611686018427387904,4,0],)"
                       R"("data_offsets":[0,0]}})",
                       "")
                  .ok());
}

TEST_F(SafetensorsErrors, MissingFileAndMissingTensorAreNotFound) {
  EXPECT_ERROR(SafetensorsFile::Open(path_ + ".nope").status(), absl::StatusCode::kNotFound,
               "bad.safetensors.nope");
  ASSERT_TRUE(WriteSafetensors(path_, {{"x", at::ones({1})}}).ok());
  auto file = SafetensorsFile::Open(path_);
  ASSERT_TRUE(file.ok());
  EXPECT_ERROR((*file)->Tensor("y").status(), absl::StatusCode::kNotFound, "'y'",
               path_.c_str());
}

// Random damage to a valid file must never crash or hand out a tensor outside the file: every
// Open either fails with a message naming the file, or succeeds with entries whose bytes all lie
// inside the data buffer and can be read.
TEST_F(SafetensorsErrors, RandomCorruptionFailsCleanlyOrReadsInBounds) {
  ASSERT_TRUE(WriteSafetensors(path_, SampleTensors(), {{"format", "pt"}}).ok());
  const std::string valid = ReadBytes(path_);
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | uint8_t(valid[i]);
  const size_t data_start = 8 + header_size;

  std::mt19937 rng(20240917);
  auto uniform = [&rng](size_t lo, size_t hi) {  // inclusive
    return std::uniform_int_distribution<size_t>(lo, hi)(rng);
  };
  int failures = 0;
  int successes = 0;
  for (int iteration = 0; iteration < 200; ++iteration) {
    SCOPED_TRACE(absl::StrCat("iteration ", iteration));
    std::string bytes = valid;
    switch (iteration % 4) {
      case 0:  // truncate anywhere
        bytes.resize(uniform(0, valid.size() - 1));
        break;
      case 1:  // flip bytes anywhere
        for (size_t k = uniform(1, 8); k > 0; --k) {
          bytes[uniform(0, bytes.size() - 1)] ^= static_cast<char>(uniform(1, 255));
        }
        break;
      case 2:  // flip bytes in the length field and header, where parsing happens
        for (size_t k = uniform(1, 4); k > 0; --k) {
          bytes[uniform(0, data_start - 1)] ^= static_cast<char>(uniform(1, 255));
        }
        break;
      case 3:  // swap a header byte for a JSON-significant character
        bytes[uniform(8, data_start - 1)] = "{}[],:\"0-9e."[uniform(0, 11)];
        break;
    }
    WriteBytes(path_, bytes);
    auto file = SafetensorsFile::Open(path_);
    if (!file.ok()) {
      ++failures;
      EXPECT_THAT(file.status().code(), ::testing::AnyOf(absl::StatusCode::kDataLoss,
                                                         absl::StatusCode::kInvalidArgument));
      EXPECT_THAT(std::string(file.status().message()), HasSubstr(path_));
      continue;
    }
    ++successes;
    uint64_t stored_header_size = 0;
    for (int i = 7; i >= 0; --i) stored_header_size = (stored_header_size << 8) | uint8_t(bytes[i]);
    const uint64_t buffer_size = bytes.size() - 8 - stored_header_size;
    for (const auto& [name, entry] : (*file)->entries()) {
      EXPECT_LE(entry.end, buffer_size) << name;
      auto tensor = (*file)->Tensor(name);
      ASSERT_TRUE(tensor.ok()) << tensor.status();
      EXPECT_EQ(static_cast<uint64_t>(tensor->nbytes()), entry.end - entry.begin) << name;
      // Reads every element, so an out-of-bounds view would fault under this test.
      (void)tensor->to(at::kDouble).sum().item<double>();
    }
  }
  // Both outcomes happen: flips in the data buffer leave a valid file; the rest do not.
  EXPECT_GT(failures, 50);
  EXPECT_GT(successes, 5);
}

// ------------------------------------------------------------------------------------------------
// Checkpoint directories

TEST(CheckpointTensors, ShardedRoundTripWithIndex) {
  const std::string dir = FreshDir() + "/model";
  at::manual_seed(7);
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (int i = 0; i < 7; ++i) {
    const at::ScalarType dtype = i % 3 == 0 ? at::kFloat : i % 3 == 1 ? at::kHalf : at::kBFloat16;
    tensors.emplace_back(absl::StrCat("layers.", i, ".w"), at::randn({i + 1, 3}).to(dtype));
  }
  ASSERT_TRUE(WriteCheckpoint(dir, tensors, 3).ok());

  for (const char* shard : {"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                            "model-00003-of-00003.safetensors"}) {
    EXPECT_TRUE(fs::exists(dir + "/" + shard)) << shard;
  }
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors"));
  const auto index = nlohmann::json::parse(ReadBytes(dir + "/model.safetensors.index.json"));
  uint64_t total_size = 0;
  for (const auto& [name, tensor] : tensors) total_size += tensor.nbytes();
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), total_size);
  EXPECT_EQ(index["weight_map"]["layers.0.w"], "model-00001-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["layers.3.w"], "model-00002-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["layers.6.w"], "model-00003-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"].size(), tensors.size());

  at::Tensor kept;
  {
    auto checkpoint = CheckpointTensors::Open(dir);
    ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
    std::vector<std::string> expected_names;
    for (const auto& [name, tensor] : tensors) expected_names.push_back(name);
    std::sort(expected_names.begin(), expected_names.end());
    EXPECT_EQ((*checkpoint)->Names(), expected_names);
    for (const auto& [name, expected] : tensors) {
      SCOPED_TRACE(name);
      auto shape = (*checkpoint)->Shape(name);
      ASSERT_TRUE(shape.ok());
      EXPECT_EQ(*shape, expected.sizes().vec());
      auto actual = (*checkpoint)->Tensor(name);
      ASSERT_TRUE(actual.ok()) << actual.status();
      ExpectSameBytes(expected, *actual);
    }
    EXPECT_ERROR((*checkpoint)->Tensor("lm_head").status(), absl::StatusCode::kNotFound,
                 "'lm_head'");
    EXPECT_ERROR((*checkpoint)->Shape("lm_head").status(), absl::StatusCode::kNotFound,
                 "'lm_head'");
    auto last = (*checkpoint)->Tensor("layers.6.w");
    ASSERT_TRUE(last.ok());
    kept = *last;
  }
  ExpectSameBytes(tensors[6].second, kept);  // outlives the checkpoint object
}

// Hugging Face's writer (the safetensors library) sorts each file's tensors by element size,
// largest first, then by name; loaders are tested on that layout.
TEST(CheckpointTensors, ShardsLayOutTheirTensorsAsHuggingFaceDoes) {
  const std::string dir = FreshDir() + "/model";
  const std::vector<std::pair<std::string, at::Tensor>> tensors = {
      {"q_proj", at::ones({2, 2}, at::kBFloat16)}, {"k_proj", at::ones({1, 2}, at::kBFloat16)},
      {"norm", at::ones({2}, at::kFloat)}, {"v_proj", at::ones({1, 2}, at::kBFloat16)},
      {"o_proj", at::ones({2, 2}, at::kBFloat16)}};
  ASSERT_TRUE(WriteCheckpoint(dir, tensors, 1).ok());
  auto checkpoint = CheckpointTensors::Open(dir);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  std::vector<std::pair<uint64_t, std::string>> by_offset;
  for (const std::string& name : (*checkpoint)->Names()) {
    by_offset.emplace_back((*checkpoint)->Locate(name)->offset, name);
  }
  std::sort(by_offset.begin(), by_offset.end());
  std::vector<std::string> order;
  for (const auto& entry : by_offset) order.push_back(entry.second);
  EXPECT_EQ(order, (std::vector<std::string>{"norm", "k_proj", "o_proj", "q_proj", "v_proj"}));
  auto view = (*checkpoint)->ViewBytes(*(*checkpoint)->Locate("o_proj")->path,
                                       (*checkpoint)->Locate("o_proj")->offset, {4, 2},
                                       at::kBFloat16);
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_TRUE(at::equal(*view, at::ones({4, 2}, at::kBFloat16)));
  EXPECT_ERROR((*checkpoint)->ViewBytes("/elsewhere", 0, {1}, at::kFloat).status(),
               absl::StatusCode::kNotFound, "/elsewhere");
}

TEST(CheckpointTensors, SingleFileCheckpoint) {
  const std::string dir = FreshDir() + "/model";
  const auto tensors = SampleTensors();
  ASSERT_TRUE(WriteCheckpoint(dir, tensors, 1).ok());
  EXPECT_TRUE(fs::exists(dir + "/model.safetensors"));
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors.index.json"));

  auto file = SafetensorsFile::Open(dir + "/model.safetensors");
  ASSERT_TRUE(file.ok());
  EXPECT_EQ((*file)->metadata().at("format"), "pt");

  auto checkpoint = CheckpointTensors::Open(dir);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  EXPECT_THAT((*checkpoint)->Names(),
              ElementsAre("bias", "embed", "layers.0.attn.w_q", "layers.0.mlp.w_in"));
  for (const auto& [name, expected] : tensors) {
    auto actual = (*checkpoint)->Tensor(name);
    ASSERT_TRUE(actual.ok());
    ExpectSameBytes(expected, *actual);
  }
}

TEST(CheckpointTensors, WriterRejectsBadShardCountsAndShadowedLayouts) {
  const std::string dir = FreshDir();
  EXPECT_ERROR(WriteCheckpoint(dir, SampleTensors(), 0), absl::StatusCode::kInvalidArgument,
               "num_shards");
  // A name repeated across two shards would pass each shard's own check.
  EXPECT_ERROR(WriteCheckpoint(dir, {{"a", at::ones({1})}, {"a", at::ones({1})}}, 2),
               absl::StatusCode::kInvalidArgument, "'a'", "repeats");
  ASSERT_TRUE(WriteCheckpoint(dir, SampleTensors(), 1).ok());
  EXPECT_ERROR(WriteCheckpoint(dir, SampleTensors(), 2),
               absl::StatusCode::kFailedPrecondition, "model.safetensors exists");
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors.index.json"));
}

TEST(CheckpointTensors, MissingDirectoryContentsListWhatWasLookedFor) {
  const std::string dir = FreshDir();
  EXPECT_ERROR(CheckpointTensors::Open(dir).status(), absl::StatusCode::kNotFound, dir.c_str(),
               "model.safetensors", "model.safetensors.index.json");
  EXPECT_ERROR(CheckpointTensors::Open(dir + "/absent").status(), absl::StatusCode::kNotFound,
               "does not exist", "model.safetensors.index.json");
}

class CheckpointIndexErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = FreshDir();
    ASSERT_TRUE(WriteSafetensors(dir_ + "/shard-a.safetensors", {{"w1", at::ones({2})}}).ok());
  }
  absl::Status OpenWithIndex(const std::string& index) {
    WriteBytes(dir_ + "/model.safetensors.index.json", index);
    return CheckpointTensors::Open(dir_).status();
  }
  std::string dir_;
};

TEST_F(CheckpointIndexErrors, IndexPointingAtMissingShard) {
  EXPECT_ERROR(
      OpenWithIndex(R"({"weight_map":{"w1":"shard-a.safetensors","w2":"shard-b.safetensors"}})"),
      absl::StatusCode::kNotFound, "'w2'", "'shard-b.safetensors'",
      "model.safetensors.index.json");
}

TEST_F(CheckpointIndexErrors, ShardNamesThatLeaveTheDirectory) {
  for (const char* shard : {"../shard-a.safetensors", "sub/shard-a.safetensors", "..", ""}) {
    SCOPED_TRACE(shard);
    EXPECT_ERROR(OpenWithIndex(absl::StrCat(R"({"weight_map":{"w1":")", shard, R"("}})")),
                 absl::StatusCode::kDataLoss, "not a plain file name");
  }
  EXPECT_ERROR(OpenWithIndex(R"({"weight_map":{"w1":"shard-a.safetensors\u0000x"}})"),
               absl::StatusCode::kDataLoss, "not a plain file name");
}

TEST_F(CheckpointIndexErrors, TensorMissingFromItsShard) {
  EXPECT_ERROR(
      OpenWithIndex(R"({"weight_map":{"w1":"shard-a.safetensors","w9":"shard-a.safetensors"}})"),
      absl::StatusCode::kDataLoss, "'w9'", "'shard-a.safetensors'", "has no such tensor");
}

TEST_F(CheckpointIndexErrors, MalformedIndex) {
  EXPECT_ERROR(OpenWithIndex("{\"weight_map\": "), absl::StatusCode::kDataLoss,
               "model.safetensors.index.json", "not valid JSON");
  EXPECT_ERROR(OpenWithIndex(R"({"metadata":{}})"), absl::StatusCode::kDataLoss,
               "no \"weight_map\" object");
  EXPECT_ERROR(OpenWithIndex(R"({"weight_map":{"w1":3}})"), absl::StatusCode::kDataLoss,
               "shard for tensor 'w1' is not a string");
}

TEST_F(CheckpointIndexErrors, CorruptShardIsReportedWithTheIndexContext) {
  WriteBytes(dir_ + "/shard-c.safetensors", LengthField(99) + "{}");
  EXPECT_ERROR(OpenWithIndex(R"({"weight_map":{"w1":"shard-c.safetensors"}})"),
               absl::StatusCode::kDataLoss, "shard-c.safetensors", "header length 99");
}

TEST_F(CheckpointIndexErrors, ValidIndexReadsOnlyTheNamesItLists) {
  ASSERT_TRUE(WriteSafetensors(dir_ + "/shard-b.safetensors",
                               {{"w2", at::full({3}, 2.0)}, {"unlisted", at::ones({1})}})
                  .ok());
  ASSERT_TRUE(
      OpenWithIndex(R"({"weight_map":{"w1":"shard-a.safetensors","w2":"shard-b.safetensors"}})")
          .ok());
  auto checkpoint = CheckpointTensors::Open(dir_);
  ASSERT_TRUE(checkpoint.ok());
  EXPECT_THAT((*checkpoint)->Names(), ElementsAre("w1", "w2"));
  auto w2 = (*checkpoint)->Tensor("w2");
  ASSERT_TRUE(w2.ok());
  EXPECT_EQ((*w2)[2].item<float>(), 2.0f);
}

}  // namespace
}  // namespace remotelens
