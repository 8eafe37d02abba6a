#include "server/raw_messages.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "remotelens/v1/remotelens.pb.h"

namespace remotelens {
namespace {

using ::testing::HasSubstr;

grpc::ByteBuffer Bytes(const std::string& data) {
  grpc::Slice slice(data);
  return grpc::ByteBuffer(&slice, 1);
}

absl::Status Parse(const std::string& data) {
  v1::RunRequest request;
  return ParseRequest(Bytes(data), "Run", &request);
}

TEST(RawMessages, RoundTrip) {
  v1::RunRequest sent;
  sent.add_texts("The cat sat");
  sent.set_return_type(v1::RETURN_TYPE_LOSS);
  grpc::ByteBuffer bytes;
  ASSERT_TRUE(SerializeResponse(sent, &bytes).ok());
  v1::RunRequest got;
  ASSERT_TRUE(ParseRequest(bytes, "Run", &got).ok());
  EXPECT_EQ(got.texts(0), "The cat sat");
  EXPECT_EQ(got.return_type(), v1::RETURN_TYPE_LOSS);
}

TEST(RawMessages, UndecodableBytesAreInvalidArgumentNamingTheRpc) {
  v1::RunRequest request;
  request.add_texts("hello there");
  const std::string whole = request.SerializeAsString();
  std::string nested;
  // Unknown field 100 as a group, nested 200 deep: past protobuf's recursion limit of 100.
  for (int i = 0; i < 200; ++i) nested += "\xa3\x06";
  for (int i = 0; i < 200; ++i) nested += "\xa4\x06";
  const std::string cases[] = {
      std::string("\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", 11),  // a varint that never ends
      whole.substr(0, whole.size() - 3),                                  // truncated
      std::string("\x1a\x02\xc3\x28", 4),  // texts[0] = invalid UTF-8 (proto3 strings must be UTF-8)
      nested,
  };
  for (const std::string& data : cases) {
    const absl::Status status = Parse(data);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << data.size();
    EXPECT_THAT(status.message(), HasSubstr("Run: the request is not a valid remotelens.v1.RunRequest"));
  }
}

TEST(RawMessages, UnknownEnumValuesAreRejectedAtParse) {
  v1::RunRequest request;
  request.set_return_type(static_cast<v1::ReturnType>(9));
  const absl::Status status = Parse(request.SerializeAsString());
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("Run: return_type: 9 is not a valid ReturnType"));
}

}  // namespace
}  // namespace remotelens
