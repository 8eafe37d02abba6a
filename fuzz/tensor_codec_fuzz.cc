// Fuzzes TensorFromProto, which decodes every tensor a client sends (tokens, hook values): the
// input is a serialized remotelens.v1.Tensor. Invariant: a decoded tensor encodes back
// (TensorToProto) to the same dtype, shape and bytes.
#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

#include "fuzz/fuzz_util.h"
#include "server/tensor_codec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  remotelens::v1::Tensor proto;
  if (!proto.ParseFromArray(data, static_cast<int>(size))) return 0;
  // A small element bound keeps one input's allocation small, as the server's limits do.
  absl::StatusOr<at::Tensor> tensor = remotelens::TensorFromProto(proto, "fuzz", 1 << 16);
  if (!tensor.ok()) {
    FUZZ_CHECK(absl::IsInvalidArgument(tensor.status()));
    return 0;
  }
  absl::StatusOr<remotelens::v1::Tensor> back = remotelens::TensorToProto(*tensor);
  FUZZ_CHECK(back.ok());
  FUZZ_CHECK(back->dtype() == proto.dtype());
  FUZZ_CHECK(back->data() == proto.data());
  FUZZ_CHECK(back->shape_size() == proto.shape_size());
  for (int i = 0; i < proto.shape_size(); ++i) FUZZ_CHECK(back->shape(i) == proto.shape(i));
  return 0;
}
