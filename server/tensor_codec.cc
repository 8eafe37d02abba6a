#include "server/tensor_codec.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/types/span.h"
#include "engine/status_macros.h"

// The wire format is little-endian and the codec copies element bytes verbatim. Every platform
// LibTorch targets in practice (x86-64, aarch64) is little-endian; a big-endian port would need
// a byte swap here, and this makes that impossible to miss.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "tensor_codec copies element bytes verbatim and assumes a little-endian host");

namespace remotelens {
namespace {

constexpr char kValidDTypes[] = "float32, bfloat16, float16, int64, int32";

// Names as users write them in Python (torch.float32), not the enum's spelling.
const char* DTypeName(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FLOAT32:
      return "float32";
    case v1::DTYPE_BFLOAT16:
      return "bfloat16";
    case v1::DTYPE_FLOAT16:
      return "float16";
    case v1::DTYPE_INT64:
      return "int64";
    case v1::DTYPE_INT32:
      return "int32";
    default:
      return "unspecified";
  }
}

std::string ShapeString(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::Status Prefixed(absl::string_view what, const absl::Status& status) {
  return absl::Status(status.code(), absl::StrCat(what, ": ", status.message()));
}

// What a (dtype, shape) pair from the wire describes, once validated.
struct Layout {
  at::ScalarType type;
  int64_t numel = 0;
  int64_t nbytes = 0;
};

// Validates a dtype and shape received from a client before anything is allocated for them:
// the shape is untrusted, so every product is overflow-checked.
absl::StatusOr<Layout> CheckLayout(v1::DType dtype, absl::Span<const int64_t> shape,
                                   absl::string_view what, int64_t max_elements) {
  absl::StatusOr<at::ScalarType> type = ScalarTypeFromProto(dtype);
  if (!type.ok()) return Prefixed(what, type.status());
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": dimension ", i, " of shape ",
                                                     ShapeString(shape), " is negative"));
    }
  }
  Layout layout;
  layout.type = *type;
  // The product of the non-zero dimensions must fit even when a zero makes the tensor empty:
  // LibTorch's allocator checks it that way and would throw rather than return an error.
  int64_t extent = 1;
  bool empty = false;
  for (int64_t d : shape) {
    if (d == 0) {
      empty = true;
      continue;
    }
    if (extent > std::numeric_limits<int64_t>::max() / d) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": shape ", ShapeString(shape), " has more elements than fit in int64"));
    }
    extent *= d;
  }
  layout.numel = empty ? 0 : extent;
  if (layout.numel > max_elements) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": shape ", ShapeString(shape), " has ",
                                                   layout.numel, " elements, more than the limit of ",
                                                   max_elements));
  }
  const int64_t element_size = static_cast<int64_t>(c10::elementSize(layout.type));
  if (extent > std::numeric_limits<int64_t>::max() / element_size) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": shape ", ShapeString(shape), " ",
                                                   DTypeName(dtype),
                                                   " has more bytes than fit in int64"));
  }
  layout.nbytes = layout.numel * element_size;
  return layout;
}

// The tensor as contiguous CPU memory, copying only when it is not already laid out that way.
absl::StatusOr<at::Tensor> HostContiguous(const at::Tensor& tensor, v1::DType* dtype) {
  if (!tensor.defined()) return absl::InvalidArgumentError("cannot encode an undefined tensor");
  *dtype = DTypeToProto(tensor.scalar_type());
  if (*dtype == v1::DTYPE_UNSPECIFIED) {
    return absl::InvalidArgumentError(absl::StrCat("cannot encode a tensor of dtype ",
                                                   c10::toString(tensor.scalar_type()),
                                                   "; supported: ", kValidDTypes));
  }
  return tensor.to(at::Device(at::kCPU)).contiguous();
}

const char* BytesOf(const at::Tensor& host) {
  // An empty tensor may have no storage at all; callers then copy zero bytes from here.
  return host.numel() == 0 ? "" : static_cast<const char*>(host.data_ptr());
}

}  // namespace

absl::StatusOr<at::ScalarType> ScalarTypeFromProto(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FLOAT32:
      return at::kFloat;
    case v1::DTYPE_BFLOAT16:
      return at::kBFloat16;
    case v1::DTYPE_FLOAT16:
      return at::kHalf;
    case v1::DTYPE_INT64:
      return at::kLong;
    case v1::DTYPE_INT32:
      return at::kInt;
    case v1::DTYPE_UNSPECIFIED:
      return absl::InvalidArgumentError(
          absl::StrCat("dtype is unspecified; valid: ", kValidDTypes));
    default:
      return absl::InvalidArgumentError(absl::StrCat("unknown dtype ", static_cast<int>(dtype),
                                                     "; valid: ", kValidDTypes));
  }
}

v1::DType DTypeToProto(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return v1::DTYPE_FLOAT32;
    case at::kBFloat16:
      return v1::DTYPE_BFLOAT16;
    case at::kHalf:
      return v1::DTYPE_FLOAT16;
    case at::kLong:
      return v1::DTYPE_INT64;
    case at::kInt:
      return v1::DTYPE_INT32;
    default:
      return v1::DTYPE_UNSPECIFIED;
  }
}

absl::StatusOr<at::Tensor> TensorFromProto(const v1::Tensor& proto, absl::string_view what,
                                           int64_t max_elements) {
  const absl::Span<const int64_t> shape(proto.shape().data(), proto.shape().size());
  ASSIGN_OR_RETURN(Layout layout, CheckLayout(proto.dtype(), shape, what, max_elements));
  const int64_t data_bytes = static_cast<int64_t>(proto.data().size());
  if (data_bytes != layout.nbytes) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", data_bytes, " bytes of data for shape ",
                                                   ShapeString(shape), " ",
                                                   DTypeName(proto.dtype()), ", expected ",
                                                   layout.nbytes));
  }
  at::Tensor tensor = at::empty(at::IntArrayRef(shape.data(), shape.size()),
                                at::TensorOptions().dtype(layout.type));
  if (data_bytes > 0) std::memcpy(tensor.data_ptr(), proto.data().data(), data_bytes);
  return tensor;
}

absl::StatusOr<v1::Tensor> TensorToProto(const at::Tensor& tensor) {
  v1::DType dtype;
  ASSIGN_OR_RETURN(at::Tensor host, HostContiguous(tensor, &dtype));
  v1::Tensor proto;
  proto.set_dtype(dtype);
  for (int64_t d : host.sizes()) proto.add_shape(d);
  proto.set_data(BytesOf(host), host.nbytes());
  return proto;
}

absl::StatusOr<ChunkCursor> ChunkCursor::Create(std::string name, const at::Tensor& tensor,
                                                int64_t chunk_bytes) {
  if (chunk_bytes < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk_bytes must be at least 1, got ", chunk_bytes));
  }
  ChunkCursor cursor;
  absl::StatusOr<at::Tensor> host_or = HostContiguous(tensor, &cursor.dtype_);
  if (!host_or.ok()) return Prefixed(name, host_or.status());
  cursor.host_ = *std::move(host_or);
  cursor.name_ = std::move(name);
  cursor.chunk_bytes_ = chunk_bytes;
  cursor.total_ = static_cast<int64_t>(cursor.host_.nbytes());
  return cursor;
}

v1::TensorChunk ChunkCursor::Next() {
  // At least one chunk: an empty tensor is still announced with one (empty) chunk.
  const int64_t length = std::min(chunk_bytes_, total_ - offset_);
  v1::TensorChunk chunk;
  chunk.set_name(name_);
  chunk.set_dtype(dtype_);
  chunk.mutable_shape()->Reserve(static_cast<int>(host_.dim()));
  for (int64_t d : host_.sizes()) chunk.add_shape(d);
  chunk.set_total_bytes(total_);
  chunk.set_offset(offset_);
  chunk.set_data(BytesOf(host_) + offset_, length);
  offset_ += length;
  done_ = offset_ >= total_;
  return chunk;
}

absl::StatusOr<int64_t> StreamTensorChunks(
    absl::string_view name, const at::Tensor& tensor, int64_t chunk_bytes,
    const std::function<absl::Status(v1::TensorChunk&&)>& emit) {
  ASSIGN_OR_RETURN(ChunkCursor cursor, ChunkCursor::Create(std::string(name), tensor, chunk_bytes));
  while (!cursor.done()) RETURN_IF_ERROR(emit(cursor.Next()));
  return cursor.total_bytes();
}

absl::StatusOr<std::optional<std::pair<std::string, at::Tensor>>> ChunkAssembler::Add(
    const v1::TensorChunk& chunk) {
  absl::Status status = in_progress() ? CheckContinues(chunk) : Start(chunk);
  const int64_t length = static_cast<int64_t>(chunk.data().size());
  if (status.ok() && length > total_bytes_ - next_offset_) {
    status = absl::InvalidArgumentError(absl::StrCat(
        "chunk '", chunk.name(), "' at offset ", chunk.offset(), " carries ", length,
        " bytes, past its total_bytes ", total_bytes_));
  }
  // A chunk that adds nothing to a non-empty tensor would let a stream spin without progress.
  if (status.ok() && length == 0 && total_bytes_ > 0) {
    status = absl::InvalidArgumentError(absl::StrCat("chunk '", chunk.name(), "' at offset ",
                                                     chunk.offset(), " carries no data"));
  }
  if (!status.ok()) {
    tensor_ = at::Tensor();  // drop the partial tensor: the stream is no longer trustworthy
    return status;
  }
  if (length > 0) {
    std::memcpy(static_cast<char*>(tensor_.data_ptr()) + next_offset_, chunk.data().data(),
                length);
  }
  next_offset_ += length;
  if (next_offset_ < total_bytes_) return std::nullopt;
  auto done = std::make_optional(std::make_pair(std::move(name_), std::move(tensor_)));
  tensor_ = at::Tensor();
  return done;
}

absl::Status ChunkAssembler::Start(const v1::TensorChunk& chunk) {
  if (chunk.offset() != 0) {
    return absl::InvalidArgumentError(absl::StrCat("chunk '", chunk.name(),
                                                   "' starts a tensor at offset ", chunk.offset(),
                                                   "; a tensor's first chunk has offset 0"));
  }
  const absl::Span<const int64_t> shape(chunk.shape().data(), chunk.shape().size());
  ASSIGN_OR_RETURN(Layout layout, CheckLayout(chunk.dtype(), shape,
                                              absl::StrCat("chunk '", chunk.name(), "'"),
                                              max_elements_));
  if (chunk.total_bytes() != layout.nbytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "chunk '", chunk.name(), "': total_bytes ", chunk.total_bytes(), " for shape ",
        ShapeString(shape), " ", DTypeName(chunk.dtype()), ", expected ", layout.nbytes));
  }
  name_ = chunk.name();
  dtype_ = chunk.dtype();
  shape_.assign(shape.begin(), shape.end());
  total_bytes_ = layout.nbytes;
  next_offset_ = 0;
  tensor_ = at::empty(shape_, at::TensorOptions().dtype(layout.type));
  return absl::OkStatus();
}

absl::Status ChunkAssembler::CheckContinues(const v1::TensorChunk& chunk) const {
  if (chunk.name() != name_) {
    return absl::InvalidArgumentError(absl::StrCat("chunk '", chunk.name(), "' arrived while '",
                                                   name_, "' was incomplete (", next_offset_,
                                                   " of ", total_bytes_, " bytes)"));
  }
  const absl::Span<const int64_t> shape(chunk.shape().data(), chunk.shape().size());
  if (chunk.dtype() != dtype_ || shape != absl::Span<const int64_t>(shape_) ||
      chunk.total_bytes() != total_bytes_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "chunk '", name_, "' at offset ", chunk.offset(), " changed its tensor mid-stream: ",
        DTypeName(chunk.dtype()), " ", ShapeString(shape), " ", chunk.total_bytes(),
        " bytes, the first chunk said ", DTypeName(dtype_), " ", ShapeString(shape_), " ",
        total_bytes_, " bytes"));
  }
  if (chunk.offset() != next_offset_) {
    return absl::InvalidArgumentError(absl::StrCat("chunk '", name_, "' at offset ",
                                                   chunk.offset(), ", expected offset ",
                                                   next_offset_));
  }
  return absl::OkStatus();
}

}  // namespace remotelens
