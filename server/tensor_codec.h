// tensor_codec: the one place that converts between at::Tensor and the wire's Tensor and
// TensorChunk messages (raw row-major little-endian bytes, a typed dtype, a shape).
// Everything else in server/ hands tensors here instead of touching proto bytes itself.
//
//   ASSIGN_OR_RETURN(at::Tensor tokens, TensorFromProto(request.tokens(), "tokens"));
//   // tokens: int64 [batch, pos] on the CPU, or InvalidArgument naming "tokens"
//
//   ASSIGN_OR_RETURN(int64_t sent, StreamTensorChunks("blocks.0.hook_resid_post", resid,
//                                                     config.limits().chunk_bytes(),
//                                                     [&](v1::TensorChunk&& chunk) {
//                                                       return WriteChunk(std::move(chunk));
//                                                     }));
//
//   ChunkAssembler assembler;  // the receiving side
//   for (const v1::TensorChunk& chunk : chunks) {
//     ASSIGN_OR_RETURN(auto done, assembler.Add(chunk));
//     if (done) Use(done->first, done->second);  // name, tensor
//   }
#ifndef REMOTELENS_SERVER_TENSOR_CODEC_H_
#define REMOTELENS_SERVER_TENSOR_CODEC_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "remotelens/v1/tensor.pb.h"

namespace remotelens {

// DTYPE_UNSPECIFIED and values outside the enum are InvalidArgument, listing the valid dtypes.
absl::StatusOr<at::ScalarType> ScalarTypeFromProto(v1::DType dtype);

// float, bfloat16, half, long and int map to their DType; anything else to DTYPE_UNSPECIFIED
// (callers that must encode use TensorToProto, which turns that into an error).
v1::DType DTypeToProto(at::ScalarType type);

// Decodes a Tensor message into a CPU tensor that owns its memory (the message's bytes are copied
// once and not kept alive). `what` names the field in error messages ("tokens",
// "hooks[2].add.value"). InvalidArgument when the dtype is unspecified or unknown, a dimension is
// negative, the element count overflows int64 or exceeds `max_elements`, or the data size is not
// numel * element size:
//   "tokens: 12 bytes of data for shape [2, 3] int64, expected 48"
absl::StatusOr<at::Tensor> TensorFromProto(const v1::Tensor& proto, absl::string_view what,
                                           int64_t max_elements = int64_t{1} << 31);

// Encodes any tensor (any device, any strides) as contiguous CPU little-endian bytes.
// InvalidArgument for an undefined tensor or a dtype the wire has no DType for.
absl::StatusOr<v1::Tensor> TensorToProto(const at::Tensor& tensor);

// Streams `tensor` as consecutive TensorChunks of at most `chunk_bytes` (>= 1) of data each; a
// tensor with no elements still gets one chunk with empty data. Every chunk carries name, dtype,
// shape, total_bytes and offset, so a receiver can validate each one on its own. Chunk data is
// copied straight from the tensor's (contiguous CPU) memory into the message: no full
// intermediate copy beyond moving it to the CPU or making it contiguous when it is not already.
// Calls `emit` in order and stops at, and returns, emit's first error. Returns the data bytes
// emitted (== tensor.nbytes()).
absl::StatusOr<int64_t> StreamTensorChunks(
    absl::string_view name, const at::Tensor& tensor, int64_t chunk_bytes,
    const std::function<absl::Status(v1::TensorChunk&&)>& emit);

// Cuts a tensor into TensorChunks on demand, one Next() at a time, for streams that should not
// hold every chunk in memory at once (FetchCache). Same chunks as StreamTensorChunks.
class ChunkCursor {
 public:
  // InvalidArgument for chunk_bytes < 1 or an unsupported dtype.
  static absl::StatusOr<ChunkCursor> Create(std::string name, const at::Tensor& tensor,
                                            int64_t chunk_bytes);
  bool done() const { return done_; }
  int64_t total_bytes() const { return total_; }
  v1::TensorChunk Next();  // requires !done()

 private:
  ChunkCursor() = default;
  std::string name_;
  at::Tensor host_;  // contiguous, CPU
  v1::DType dtype_ = v1::DTYPE_UNSPECIFIED;
  int64_t chunk_bytes_ = 0, total_ = 0, offset_ = 0;
  bool done_ = false;
};

// Reassembles TensorChunks into tensors, one tensor at a time, as StreamTensorChunks sends them.
// Every chunk is checked against the tensor it continues: same name, dtype and shape, an offset
// that continues exactly where the previous chunk ended, and a total_bytes consistent with the
// shape. After an error the partial tensor is dropped and the next chunk must start a new one.
// Not thread-safe: one assembler per stream.
class ChunkAssembler {
 public:
  // `max_elements` bounds what a first chunk may make this allocate.
  explicit ChunkAssembler(int64_t max_elements = std::numeric_limits<int64_t>::max())
      : max_elements_(max_elements) {}

  // The finished (name, CPU tensor) when `chunk` completes a tensor; nullopt while more chunks
  // are expected. InvalidArgument for an inconsistent chunk.
  absl::StatusOr<std::optional<std::pair<std::string, at::Tensor>>> Add(
      const v1::TensorChunk& chunk);

  // True between a tensor's first and last chunk.
  bool in_progress() const { return tensor_.defined(); }

 private:
  absl::Status Start(const v1::TensorChunk& chunk);
  absl::Status CheckContinues(const v1::TensorChunk& chunk) const;

  int64_t max_elements_;
  std::string name_;
  v1::DType dtype_ = v1::DTYPE_UNSPECIFIED;
  std::vector<int64_t> shape_;
  int64_t total_bytes_ = 0;
  int64_t next_offset_ = 0;
  at::Tensor tensor_;  // defined while a tensor is in progress
};

}  // namespace remotelens

#endif  // REMOTELENS_SERVER_TENSOR_CODEC_H_
