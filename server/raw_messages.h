// Request parsing and response serialization for RPCs registered raw (grpc::ByteBuffer in and
// out). gRPC's generated handlers parse requests themselves and answer one that does not parse
// (garbage, a truncated message, invalid UTF-8 in a string field, groups nested past protobuf's
// depth limit) with UNIMPLEMENTED and no message; parsing here gives INVALID_ARGUMENT naming the
// RPC and what was expected. Enum fields are checked in the same step (ValidateEnums), so every
// handler starts from a request that is well formed.
//
//   v1::RunRequest request;
//   RETURN_IF_ERROR(ParseRequest(raw, "Run", &request));
//   ...
//   grpc::ByteBuffer out;
//   RETURN_IF_ERROR(SerializeResponse(response, &out));
#ifndef REMOTELENS_SERVER_RAW_MESSAGES_H_
#define REMOTELENS_SERVER_RAW_MESSAGES_H_

#include <google/protobuf/message.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/codegen/proto_utils.h>
#include <grpcpp/support/proto_buffer_reader.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "server/request_builder.h"

namespace remotelens {

// Parses `raw` into `out`. INVALID_ARGUMENT "Run: the request is not a valid
// remotelens.v1.RunRequest ..." when the bytes do not parse; ValidateEnums's error (prefixed with
// the method) when an enum field holds an undefined value.
inline absl::Status ParseRequest(const grpc::ByteBuffer& raw, absl::string_view method,
                                 google::protobuf::Message* out) {
  grpc::ByteBuffer bytes(raw);  // shares the slices; the reader needs a mutable buffer
  grpc::ProtoBufferReader reader(&bytes);
  if (!reader.status().ok() || !out->ParseFromZeroCopyStream(&reader)) {
    return absl::InvalidArgumentError(absl::StrCat(
        method, ": the request is not a valid ", out->GetDescriptor()->full_name(),
        " message (truncated or corrupt bytes, invalid UTF-8 in a string field, or nesting "
        "deeper than 100 levels)"));
  }
  absl::Status enums = ValidateEnums(*out);
  if (!enums.ok()) return absl::InvalidArgumentError(absl::StrCat(method, ": ", enums.message()));
  return absl::OkStatus();
}

inline absl::Status SerializeResponse(const google::protobuf::Message& message, grpc::ByteBuffer* out) {
  bool own_buffer = false;
  const grpc::Status status = grpc::GenericSerialize<grpc::ProtoBufferWriter, google::protobuf::Message>(
      message, out, &own_buffer);
  if (!status.ok()) {
    return absl::InternalError(absl::StrCat("cannot serialize ", message.GetDescriptor()->full_name(),
                                            ": ", status.error_message()));
  }
  return absl::OkStatus();
}

}  // namespace remotelens

#endif  // REMOTELENS_SERVER_RAW_MESSAGES_H_
