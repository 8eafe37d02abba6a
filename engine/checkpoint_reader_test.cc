#include "engine/checkpoint_reader.h"

#include <ATen/ATen.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"
#include "engine/safetensors.h"
#include "gtest/gtest.h"

namespace remotelens {
namespace {

std::string TempPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return absl::StrCat(dir != nullptr ? dir : "/tmp", "/", name);
}

// A file with one tensor per dtype, and where each one's bytes lie.
struct TestFile {
  std::string path;
  std::unique_ptr<SafetensorsFile> file;
  std::map<std::string, at::Tensor> tensors;

  ReadPiece Piece(const std::string& name, at::Tensor destination, int64_t offset = 0) const {
    const SafetensorsFile::Entry& e = file->entries().at(name);
    ReadPiece p;
    p.name = name;
    p.path = path;
    p.file_offset = file->data_offset() + e.begin;
    p.source_dtype = e.dtype;
    p.numel = static_cast<int64_t>((e.end - e.begin) / c10::elementSize(e.dtype));
    p.destination = std::move(destination);
    p.destination_offset = offset;
    return p;
  }
};

TestFile MakeFile(const std::string& name) {
  TestFile f;
  f.path = TempPath(name);
  at::manual_seed(7);
  const at::Tensor base = at::randn({37, 11});
  f.tensors = {{"f32", base}, {"f16", base.to(at::kHalf) * 3}, {"bf16", base.to(at::kBFloat16) - 1}};
  std::vector<std::pair<std::string, at::Tensor>> list(f.tensors.begin(), f.tensors.end());
  EXPECT_TRUE(WriteSafetensors(f.path, list).ok());
  auto opened = SafetensorsFile::Open(f.path);
  EXPECT_TRUE(opened.ok()) << opened.status();
  f.file = std::move(opened).value();
  return f;
}

TEST(CheckpointReader, EveryDtypePairMatchesTensorTo) {
  const TestFile f = MakeFile("dtypes.safetensors");
  for (const auto& [name, source] : f.tensors) {
    for (at::ScalarType to : {at::kFloat, at::kHalf, at::kBFloat16}) {
      at::Tensor destination = at::empty(source.sizes(), at::TensorOptions().dtype(to));
      ASSERT_TRUE(ReadPieces({f.Piece(name, destination)}, ReadOptions()).ok());
      EXPECT_TRUE(at::equal(destination, source.to(to))) << name << " -> " << to;
    }
  }
}

TEST(CheckpointReader, StacksPiecesIntoOneTensorInSmallChunksOnManyThreads) {
  const TestFile f = MakeFile("stack.safetensors");
  at::Tensor fused = at::empty({3 * 37, 11}, at::TensorOptions().dtype(at::kFloat));
  ReadOptions options;
  options.threads = 4;
  options.chunk_bytes = 24;  // many chunks per piece, some ending mid-row
  int reports = 0;
  ReadProgress last;
  options.on_progress = [&](const ReadProgress& p) {
    ++reports;
    last = p;
  };
  const std::vector<ReadPiece> pieces = {f.Piece("bf16", fused, 0), f.Piece("f32", fused, 37 * 11),
                                         f.Piece("f16", fused, 2 * 37 * 11)};
  ASSERT_TRUE(ReadPieces(pieces, options).ok());
  const at::Tensor expected =
      at::cat({f.tensors.at("bf16").to(at::kFloat), f.tensors.at("f32"),
               f.tensors.at("f16").to(at::kFloat)});
  EXPECT_TRUE(at::equal(fused, expected));
  ASSERT_GE(reports, 1);
  EXPECT_EQ(last.bytes_total, 37 * 11 * (2 + 4 + 2));
  EXPECT_EQ(last.bytes_done, last.bytes_total);
  EXPECT_EQ(last.files_done, 1);
  EXPECT_EQ(last.files_total, 1);
}

TEST(CheckpointReader, FileTruncatedAfterOpenIsDataLossNamingTheTensor) {
  const TestFile f = MakeFile("truncated.safetensors");
  at::Tensor destination = at::empty({37, 11});
  const ReadPiece piece = f.Piece("f32", destination);
  ASSERT_EQ(::truncate(f.path.c_str(), static_cast<off_t>(piece.file_offset + 8)), 0);
  const absl::Status status = ReadPieces({piece}, ReadOptions());
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss) << status;
  EXPECT_NE(status.message().find("f32"), std::string::npos) << status;
  EXPECT_NE(status.message().find(f.path), std::string::npos) << status;
}

TEST(CheckpointReader, MissingFileIsNotFound) {
  const TestFile f = MakeFile("missing.safetensors");
  ReadPiece piece = f.Piece("f32", at::empty({37, 11}));
  piece.path = TempPath("no-such-file.safetensors");
  const absl::Status status = ReadPieces({piece}, ReadOptions());
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound) << status;
  EXPECT_NE(status.message().find("no-such-file"), std::string::npos) << status;
}

TEST(CheckpointReader, DestinationTooSmallIsRefused) {
  const TestFile f = MakeFile("small.safetensors");
  const absl::Status status = ReadPieces({f.Piece("f32", at::empty({37, 11}), 5)}, ReadOptions());
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
}

// A destination that views the mapped file is faulted in, not copied, and counts as progress.
TEST(CheckpointReader, MappedDestinationsArePopulatedInPlace) {
  const TestFile f = MakeFile("mapped.safetensors");
  auto view = f.file->Tensor("bf16");
  ASSERT_TRUE(view.ok()) << view.status();
  ReadPiece piece = f.Piece("bf16", *view);
  piece.destination_maps_source = true;
  ReadOptions options;
  options.threads = 3;
  options.chunk_bytes = 100;  // chunks that start and end inside pages
  ReadProgress last;
  options.on_progress = [&](const ReadProgress& p) { last = p; };
  ASSERT_TRUE(ReadPieces({piece}, options).ok());
  EXPECT_EQ(last.bytes_done, 37 * 11 * 2);
  EXPECT_EQ(last.files_done, 1);
  EXPECT_TRUE(at::equal(*view, f.tensors.at("bf16")));

  // Mapping in place cannot convert, nor live on another device.
  piece.source_dtype = at::kHalf;
  EXPECT_EQ(ReadPieces({piece}, ReadOptions()).code(), absl::StatusCode::kInvalidArgument);
}

TEST(CheckpointReader, ConvertElementsRoundsToNearestEvenLikeTensorTo) {
  at::manual_seed(3);
  const at::Tensor x = at::randn({4096}) * 1000;
  for (at::ScalarType to : {at::kHalf, at::kBFloat16}) {
    at::Tensor out = at::empty({4096}, at::TensorOptions().dtype(to));
    ConvertElements(x.data_ptr(), at::kFloat, out.data_ptr(), to, x.numel());
    EXPECT_TRUE(at::equal(out, x.to(to)));
  }
}

TEST(CheckpointReader, EmptyHostTensorIsHugePageAlignedAndWritable) {
  at::Tensor big = EmptyHostTensor({3, 1 << 20}, at::kFloat);  // 12 MiB
  EXPECT_EQ(reinterpret_cast<uintptr_t>(big.data_ptr()) % (2 << 20), 0u);
  EXPECT_EQ(big.sizes(), (std::vector<int64_t>{3, 1 << 20}));
  big.fill_(2.5);
  EXPECT_EQ(big.sum().item<double>(), 2.5 * 3 * (1 << 20));
  at::Tensor small = EmptyHostTensor({4}, at::kBFloat16);
  EXPECT_EQ(small.scalar_type(), at::kBFloat16);
  EXPECT_EQ(small.numel(), 4);
}

}  // namespace
}  // namespace remotelens
