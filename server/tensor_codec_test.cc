#include "server/tensor_codec.h"

#include <ATen/ATen.h>

#include <cstring>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace remotelens {
namespace {

using ::testing::HasSubstr;

// Raw element bytes of a tensor, for bit-exact comparisons (NaN payloads and -0.0 included).
std::string Bytes(const at::Tensor& tensor) {
  at::Tensor host = tensor.contiguous();
  return std::string(static_cast<const char*>(host.data_ptr()), host.nbytes());
}

std::vector<int64_t> Shape(const google::protobuf::RepeatedField<int64_t>& shape) {
  return std::vector<int64_t>(shape.begin(), shape.end());
}

v1::Tensor ProtoOf(v1::DType dtype, std::vector<int64_t> shape, size_t data_bytes) {
  v1::Tensor proto;
  proto.set_dtype(dtype);
  for (int64_t d : shape) proto.add_shape(d);
  proto.set_data(std::string(data_bytes, '\0'));
  return proto;
}

std::vector<v1::TensorChunk> Chunks(const at::Tensor& tensor, int64_t chunk_bytes,
                                    const std::string& name = "t") {
  std::vector<v1::TensorChunk> chunks;
  absl::StatusOr<int64_t> sent =
      StreamTensorChunks(name, tensor, chunk_bytes, [&](v1::TensorChunk&& chunk) {
        chunks.push_back(std::move(chunk));
        return absl::OkStatus();
      });
  EXPECT_TRUE(sent.ok()) << sent.status();
  if (sent.ok()) {
    EXPECT_EQ(*sent, static_cast<int64_t>(tensor.nbytes()));
  }
  return chunks;
}

// Feeds every chunk; expects exactly the last to complete the tensor.
std::pair<std::string, at::Tensor> Assemble(const std::vector<v1::TensorChunk>& chunks) {
  ChunkAssembler assembler;
  for (size_t i = 0; i < chunks.size(); ++i) {
    auto done = assembler.Add(chunks[i]);
    EXPECT_TRUE(done.ok()) << done.status();
    if (!done.ok()) return {};
    if (i + 1 < chunks.size()) {
      EXPECT_FALSE(done->has_value()) << "finished early at chunk " << i;
    } else if (done->has_value()) {
      EXPECT_FALSE(assembler.in_progress());
      return **std::move(done);
    }
  }
  ADD_FAILURE() << "the last chunk did not complete the tensor";
  return {};
}

TEST(DTypes, MapBothWays) {
  const std::vector<std::pair<at::ScalarType, v1::DType>> pairs = {
      {at::kFloat, v1::DTYPE_FLOAT32}, {at::kBFloat16, v1::DTYPE_BFLOAT16},
      {at::kHalf, v1::DTYPE_FLOAT16},  {at::kLong, v1::DTYPE_INT64},
      {at::kInt, v1::DTYPE_INT32},
  };
  for (const auto& [type, dtype] : pairs) {
    EXPECT_EQ(DTypeToProto(type), dtype);
    absl::StatusOr<at::ScalarType> back = ScalarTypeFromProto(dtype);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(*back, type);
  }
  EXPECT_EQ(DTypeToProto(at::kDouble), v1::DTYPE_UNSPECIFIED);
  EXPECT_EQ(DTypeToProto(at::kBool), v1::DTYPE_UNSPECIFIED);
}

TEST(DTypes, UnspecifiedAndUnknownAreInvalid) {
  absl::StatusOr<at::ScalarType> unspecified = ScalarTypeFromProto(v1::DTYPE_UNSPECIFIED);
  EXPECT_EQ(unspecified.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(unspecified.status().message(),
              HasSubstr("valid: float32, bfloat16, float16, int64, int32"));
  absl::StatusOr<at::ScalarType> unknown = ScalarTypeFromProto(static_cast<v1::DType>(99));
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(unknown.status().message(), HasSubstr("unknown dtype 99"));
}

TEST(TensorCodec, RoundTripsEveryDTypeBitExactly) {
  at::Tensor floats = at::randn({2, 3, 5});
  floats[0][0][0] = -0.0f;
  floats[0][0][1] = std::numeric_limits<float>::quiet_NaN();
  floats[0][0][2] = std::numeric_limits<float>::infinity();
  // bfloat16 bit patterns that a float round trip could disturb: a NaN with a payload, the
  // smallest subnormal, -0.
  at::Tensor bf16 = at::tensor({0x7FC1, 0x0001, 0x8000, 0x3F80, 0xC2F7}, at::kInt)
                        .to(at::kShort)
                        .view(at::kBFloat16);
  const std::vector<at::Tensor> inputs = {
      floats,
      bf16,
      at::randn({4, 3}).to(at::kHalf),
      at::tensor({int64_t{0}, int64_t{128000}, std::numeric_limits<int64_t>::min(),
                  std::numeric_limits<int64_t>::max()}),
      at::tensor({-7, 0, 2147483647}, at::kInt),
  };
  for (const at::Tensor& input : inputs) {
    SCOPED_TRACE(c10::toString(input.scalar_type()));
    absl::StatusOr<v1::Tensor> proto = TensorToProto(input);
    ASSERT_TRUE(proto.ok()) << proto.status();
    EXPECT_EQ(proto->dtype(), DTypeToProto(input.scalar_type()));
    EXPECT_EQ(Shape(proto->shape()), input.sizes().vec());
    EXPECT_EQ(proto->data(), Bytes(input));
    absl::StatusOr<at::Tensor> back = TensorFromProto(*proto, "x");
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->scalar_type(), input.scalar_type());
    EXPECT_EQ(back->sizes(), input.sizes());
    EXPECT_EQ(Bytes(*back), Bytes(input));
  }
}

TEST(TensorCodec, WritesLittleEndianRowMajorBytes) {
  absl::StatusOr<v1::Tensor> ints = TensorToProto(at::tensor({int64_t{1}, int64_t{258}}));
  ASSERT_TRUE(ints.ok());
  EXPECT_EQ(ints->data(), std::string("\x01\0\0\0\0\0\0\0\x02\x01\0\0\0\0\0\0", 16));
  // bfloat16 1.0 is 0x3F80: the upper half of float32 1.0 (0x3F800000).
  absl::StatusOr<v1::Tensor> bf16 = TensorToProto(at::ones({1}, at::kBFloat16));
  ASSERT_TRUE(bf16.ok());
  EXPECT_EQ(bf16->data(), std::string("\x80\x3F", 2));
  EXPECT_EQ(bf16->dtype(), v1::DTYPE_BFLOAT16);
}

TEST(TensorCodec, EmptyAndScalarShapes) {
  absl::StatusOr<v1::Tensor> empty = TensorToProto(at::zeros({0, 3}));
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_EQ(Shape(empty->shape()), (std::vector<int64_t>{0, 3}));
  EXPECT_TRUE(empty->data().empty());
  absl::StatusOr<at::Tensor> back = TensorFromProto(*empty, "x");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->sizes().vec(), (std::vector<int64_t>{0, 3}));

  absl::StatusOr<v1::Tensor> scalar = TensorToProto(at::scalar_tensor(2.5f));
  ASSERT_TRUE(scalar.ok());
  EXPECT_EQ(scalar->shape_size(), 0);
  EXPECT_EQ(scalar->data().size(), 4u);
  absl::StatusOr<at::Tensor> scalar_back = TensorFromProto(*scalar, "x");
  ASSERT_TRUE(scalar_back.ok());
  EXPECT_EQ(scalar_back->dim(), 0);
  EXPECT_EQ(scalar_back->item<float>(), 2.5f);
}

TEST(TensorCodec, EncodesNonContiguousInputsInRowMajorOrder) {
  at::Tensor base = at::arange(24, at::kFloat).view({4, 6});
  const std::vector<at::Tensor> views = {
      base.t(),                                      // transposed [6, 4]
      base.slice(/*dim=*/1, /*start=*/1, /*end=*/6, /*step=*/2),  // strided columns [4, 3]
      base.select(1, 2),                             // one column [4]
      at::arange(3, at::kFloat).expand({2, 3}),      // zero stride [2, 3]
  };
  for (const at::Tensor& view : views) {
    ASSERT_FALSE(view.is_contiguous());
    absl::StatusOr<v1::Tensor> proto = TensorToProto(view);
    ASSERT_TRUE(proto.ok()) << proto.status();
    EXPECT_EQ(Shape(proto->shape()), view.sizes().vec());
    EXPECT_EQ(proto->data(), Bytes(view.contiguous()));
    absl::StatusOr<at::Tensor> back = TensorFromProto(*proto, "x");
    ASSERT_TRUE(back.ok());
    EXPECT_TRUE(at::equal(*back, view));
  }
  // Element [0, 1] of the transpose is base[1, 0] == 6: the bytes follow the view, not storage.
  absl::StatusOr<v1::Tensor> transposed = TensorToProto(base.t());
  ASSERT_TRUE(transposed.ok());
  float second;
  std::memcpy(&second, transposed->data().data() + sizeof(float), sizeof(float));
  EXPECT_EQ(second, 6.0f);
}

TEST(TensorCodec, DecodedTensorOwnsItsMemory) {
  absl::StatusOr<v1::Tensor> proto = TensorToProto(at::arange(4, at::kInt));
  ASSERT_TRUE(proto.ok());
  absl::StatusOr<at::Tensor> decoded = TensorFromProto(*proto, "x");
  ASSERT_TRUE(decoded.ok());
  proto->mutable_data()->assign(16, '\xFF');
  proto.value() = v1::Tensor();
  EXPECT_TRUE(at::equal(*decoded, at::arange(4, at::kInt)));
}

TEST(TensorCodec, RejectsUnsupportedAndUndefinedTensors) {
  absl::StatusOr<v1::Tensor> doubles = TensorToProto(at::zeros({2}, at::kDouble));
  EXPECT_EQ(doubles.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(doubles.status().message(), HasSubstr("cannot encode a tensor of dtype Double"));
  EXPECT_EQ(TensorToProto(at::Tensor()).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(TensorFromProtoErrors, DTypeUnspecifiedOrUnknown) {
  absl::StatusOr<at::Tensor> unspecified =
      TensorFromProto(ProtoOf(v1::DTYPE_UNSPECIFIED, {2}, 8), "hooks[2].add.value");
  EXPECT_EQ(unspecified.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(unspecified.status().message(),
            "hooks[2].add.value: dtype is unspecified; valid: float32, bfloat16, float16, int64, "
            "int32");
  absl::StatusOr<at::Tensor> unknown =
      TensorFromProto(ProtoOf(static_cast<v1::DType>(42), {2}, 8), "tokens");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(unknown.status().message(), HasSubstr("tokens: unknown dtype 42"));
}

TEST(TensorFromProtoErrors, NegativeDimension) {
  absl::StatusOr<at::Tensor> result = TensorFromProto(ProtoOf(v1::DTYPE_INT64, {2, -3}, 0), "tokens");
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(result.status().message(), "tokens: dimension 1 of shape [2, -3] is negative");
}

TEST(TensorFromProtoErrors, ElementCountOverflow) {
  absl::StatusOr<at::Tensor> result = TensorFromProto(
      ProtoOf(v1::DTYPE_FLOAT32, {int64_t{1} << 62, 4}, 0), "residual",
      std::numeric_limits<int64_t>::max());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(result.status().message(),
            "residual: shape [4611686018427387904, 4] has more elements than fit in int64");
  // Elements fit but their bytes do not.
  absl::StatusOr<at::Tensor> bytes = TensorFromProto(
      ProtoOf(v1::DTYPE_INT64, {int64_t{1} << 61}, 0), "residual",
      std::numeric_limits<int64_t>::max());
  EXPECT_EQ(bytes.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bytes.status().message(), HasSubstr("more bytes than fit in int64"));
  // A zero dimension does not excuse the others: LibTorch would throw allocating this.
  absl::StatusOr<at::Tensor> empty_overflow =
      TensorFromProto(ProtoOf(v1::DTYPE_FLOAT32, {int64_t{1} << 62, 4, 0}, 0), "x");
  EXPECT_EQ(empty_overflow.status().message(),
            "x: shape [4611686018427387904, 4, 0] has more elements than fit in int64");
  // Large but representable dimensions beside a zero are an ordinary empty tensor.
  absl::StatusOr<at::Tensor> empty =
      TensorFromProto(ProtoOf(v1::DTYPE_FLOAT32, {0, int64_t{1} << 40, 1 << 20}, 0), "x");
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_EQ(empty->numel(), 0);
}

TEST(TensorFromProtoErrors, TooManyElements) {
  absl::StatusOr<at::Tensor> result =
      TensorFromProto(ProtoOf(v1::DTYPE_FLOAT32, {3, 4}, 48), "value", /*max_elements=*/10);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(result.status().message(),
            "value: shape [3, 4] has 12 elements, more than the limit of 10");
  EXPECT_TRUE(TensorFromProto(ProtoOf(v1::DTYPE_FLOAT32, {3, 4}, 48), "value", 12).ok());
  // The default limit is 2^31 elements.
  absl::StatusOr<at::Tensor> huge =
      TensorFromProto(ProtoOf(v1::DTYPE_FLOAT32, {int64_t{1} << 31, 2}, 0), "value");
  EXPECT_THAT(huge.status().message(), HasSubstr("more than the limit of 2147483648"));
}

TEST(TensorFromProtoErrors, DataSizeMismatch) {
  absl::StatusOr<at::Tensor> short_data =
      TensorFromProto(ProtoOf(v1::DTYPE_INT64, {2, 3}, 12), "tokens");
  EXPECT_EQ(short_data.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(short_data.status().message(),
            "tokens: 12 bytes of data for shape [2, 3] int64, expected 48");
  absl::StatusOr<at::Tensor> long_data =
      TensorFromProto(ProtoOf(v1::DTYPE_BFLOAT16, {3}, 8), "value");
  EXPECT_EQ(long_data.status().message(),
            "value: 8 bytes of data for shape [3] bfloat16, expected 6");
}

TEST(StreamTensorChunks, FiveMiBInOneMiBChunks) {
  constexpr int64_t kMiB = 1 << 20;
  at::Tensor tensor = at::randn({5 * kMiB / 4});  // float32: 5 MiB
  std::vector<v1::TensorChunk> chunks = Chunks(tensor, kMiB, "blocks.0.hook_resid_post");
  ASSERT_EQ(chunks.size(), 5u);
  for (size_t i = 0; i < chunks.size(); ++i) {
    EXPECT_EQ(chunks[i].name(), "blocks.0.hook_resid_post");
    EXPECT_EQ(chunks[i].dtype(), v1::DTYPE_FLOAT32);
    EXPECT_EQ(Shape(chunks[i].shape()), tensor.sizes().vec());
    EXPECT_EQ(chunks[i].total_bytes(), 5 * kMiB);
    EXPECT_EQ(chunks[i].offset(), static_cast<int64_t>(i) * kMiB);
    EXPECT_EQ(static_cast<int64_t>(chunks[i].data().size()), kMiB);
  }
  auto [name, back] = Assemble(chunks);
  EXPECT_EQ(name, "blocks.0.hook_resid_post");
  ASSERT_TRUE(back.defined());
  EXPECT_EQ(Bytes(back), Bytes(tensor));
}

TEST(StreamTensorChunks, ChunkSizeNotAMultipleOfElementSize) {
  at::Tensor tensor = at::randn({3, 5}).t();  // non-contiguous, 60 bytes
  std::vector<v1::TensorChunk> chunks = Chunks(tensor, 7);
  ASSERT_EQ(chunks.size(), 9u);  // 8 * 7 + 4
  EXPECT_EQ(chunks.back().offset(), 56);
  EXPECT_EQ(chunks.back().data().size(), 4u);
  auto [name, back] = Assemble(chunks);
  ASSERT_TRUE(back.defined());
  EXPECT_EQ(back.sizes().vec(), (std::vector<int64_t>{5, 3}));
  EXPECT_TRUE(at::equal(back, tensor));
}

TEST(StreamTensorChunks, EmptyTensorGetsOneEmptyChunk) {
  std::vector<v1::TensorChunk> chunks = Chunks(at::zeros({0, 3}, at::kHalf), 1024);
  ASSERT_EQ(chunks.size(), 1u);
  EXPECT_TRUE(chunks[0].data().empty());
  EXPECT_EQ(chunks[0].total_bytes(), 0);
  EXPECT_EQ(Shape(chunks[0].shape()), (std::vector<int64_t>{0, 3}));
  EXPECT_EQ(chunks[0].dtype(), v1::DTYPE_FLOAT16);
  auto [name, back] = Assemble(chunks);
  ASSERT_TRUE(back.defined());
  EXPECT_EQ(back.sizes().vec(), (std::vector<int64_t>{0, 3}));
}

TEST(StreamTensorChunks, StopsAtTheFirstEmitError) {
  int calls = 0;
  absl::StatusOr<int64_t> sent =
      StreamTensorChunks("logits", at::zeros({100}), 40, [&](v1::TensorChunk&& chunk) {
        ++calls;
        return calls == 2 ? absl::CancelledError("client went away") : absl::OkStatus();
      });
  EXPECT_EQ(calls, 2);  // 400 bytes would have been 10 chunks
  EXPECT_EQ(sent.status(), absl::CancelledError("client went away"));
}

TEST(StreamTensorChunks, RejectsBadArguments) {
  auto ignore = [](v1::TensorChunk&&) { return absl::OkStatus(); };
  absl::StatusOr<int64_t> zero = StreamTensorChunks("x", at::zeros({4}), 0, ignore);
  EXPECT_EQ(zero.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(zero.status().message(), "chunk_bytes must be at least 1, got 0");
  absl::StatusOr<int64_t> doubles = StreamTensorChunks("W_E", at::zeros({4}, at::kDouble), 8, ignore);
  EXPECT_EQ(doubles.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(doubles.status().message(), HasSubstr("W_E: cannot encode a tensor of dtype Double"));
}

TEST(ChunkAssembler, AssemblesConsecutiveTensors) {
  std::vector<v1::TensorChunk> chunks = Chunks(at::arange(10, at::kLong), 32, "a");
  std::vector<v1::TensorChunk> more = Chunks(at::arange(6, at::kInt).view({2, 3}), 8, "b");
  chunks.insert(chunks.end(), more.begin(), more.end());
  ChunkAssembler assembler;
  std::vector<std::pair<std::string, at::Tensor>> done;
  for (const v1::TensorChunk& chunk : chunks) {
    auto result = assembler.Add(chunk);
    ASSERT_TRUE(result.ok()) << result.status();
    if (result->has_value()) done.push_back(**std::move(result));
  }
  ASSERT_EQ(done.size(), 2u);
  EXPECT_EQ(done[0].first, "a");
  EXPECT_TRUE(at::equal(done[0].second, at::arange(10, at::kLong)));
  EXPECT_EQ(done[1].first, "b");
  EXPECT_TRUE(at::equal(done[1].second, at::arange(6, at::kInt).view({2, 3})));
}

class ChunkAssemblerErrors : public ::testing::Test {
 protected:
  // 40 bytes of float32 in 16-byte chunks: offsets 0, 16, 32.
  std::vector<v1::TensorChunk> chunks_ = Chunks(at::arange(10, at::kFloat), 16, "z");

  // Feeds chunk 0, then `second`; returns the error `second` caused.
  absl::Status SecondChunkError(const v1::TensorChunk& second) {
    ChunkAssembler assembler;
    auto first = assembler.Add(chunks_[0]);
    EXPECT_TRUE(first.ok() && !first->has_value());
    absl::Status status = assembler.Add(second).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_FALSE(assembler.in_progress());
    return status;
  }
};

TEST_F(ChunkAssemblerErrors, FirstChunkMustStartAtZero) {
  ChunkAssembler assembler;
  absl::Status status = assembler.Add(chunks_[1]).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(status.message(),
            "chunk 'z' starts a tensor at offset 16; a tensor's first chunk has offset 0");
}

TEST_F(ChunkAssemblerErrors, FirstChunkValidatesDTypeShapeAndTotal) {
  v1::TensorChunk bad_dtype = chunks_[0];
  bad_dtype.set_dtype(v1::DTYPE_UNSPECIFIED);
  EXPECT_THAT(ChunkAssembler().Add(bad_dtype).status().message(),
              HasSubstr("chunk 'z': dtype is unspecified"));
  v1::TensorChunk bad_shape = chunks_[0];
  bad_shape.set_shape(0, -10);
  EXPECT_THAT(ChunkAssembler().Add(bad_shape).status().message(),
              HasSubstr("chunk 'z': dimension 0 of shape [-10] is negative"));
  v1::TensorChunk bad_total = chunks_[0];
  bad_total.set_total_bytes(44);
  EXPECT_EQ(ChunkAssembler().Add(bad_total).status().message(),
            "chunk 'z': total_bytes 44 for shape [10] float32, expected 40");
  EXPECT_THAT(ChunkAssembler(/*max_elements=*/5).Add(chunks_[0]).status().message(),
              HasSubstr("more than the limit of 5"));
}

TEST_F(ChunkAssemblerErrors, OffsetGap) {
  EXPECT_EQ(SecondChunkError(chunks_[2]).message(), "chunk 'z' at offset 32, expected offset 16");
}

TEST_F(ChunkAssemblerErrors, OtherTensorInterleaved) {
  v1::TensorChunk other = chunks_[1];
  other.set_name("y");
  EXPECT_EQ(SecondChunkError(other).message(),
            "chunk 'y' arrived while 'z' was incomplete (16 of 40 bytes)");
}

TEST_F(ChunkAssemblerErrors, DTypeShapeOrTotalChangedMidTensor) {
  v1::TensorChunk dtype = chunks_[1];
  dtype.set_dtype(v1::DTYPE_INT32);
  EXPECT_THAT(SecondChunkError(dtype).message(), HasSubstr("changed its tensor mid-stream"));
  v1::TensorChunk shape = chunks_[1];
  shape.set_shape(0, 5);
  shape.add_shape(2);
  EXPECT_EQ(SecondChunkError(shape).message(),
            "chunk 'z' at offset 16 changed its tensor mid-stream: float32 [5, 2] 40 bytes, the "
            "first chunk said float32 [10] 40 bytes");
  v1::TensorChunk total = chunks_[1];
  total.set_total_bytes(80);
  EXPECT_THAT(SecondChunkError(total).message(),
              HasSubstr("80 bytes, the first chunk said float32 [10] 40 bytes"));
}

TEST_F(ChunkAssemblerErrors, DataPastTotalOrEmpty) {
  v1::TensorChunk too_long = chunks_[1];
  too_long.set_data(std::string(32, '\0'));
  EXPECT_EQ(SecondChunkError(too_long).message(),
            "chunk 'z' at offset 16 carries 32 bytes, past its total_bytes 40");
  v1::TensorChunk empty = chunks_[1];
  empty.clear_data();
  EXPECT_EQ(SecondChunkError(empty).message(), "chunk 'z' at offset 16 carries no data");
}

TEST_F(ChunkAssemblerErrors, RecoversWithTheNextTensor) {
  ChunkAssembler assembler;
  ASSERT_TRUE(assembler.Add(chunks_[0]).ok());
  ASSERT_FALSE(assembler.Add(chunks_[2]).ok());
  for (size_t i = 0; i < chunks_.size(); ++i) {
    auto result = assembler.Add(chunks_[i]);
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(result->has_value(), i + 1 == chunks_.size());
  }
}

}  // namespace
}  // namespace remotelens
