// Fuzzes the two textproto files the server reads at start: the users file (parsed and validated
// by Authenticator::FromUsersFile) and the ServerConfig (parsed by TextFormat in server/main.cc).
// The first byte picks which. Invariant: a users file that loads authenticates nothing with a
// wrong key and answers a well-formed key without crashing.
#include <google/protobuf/text_format.h>

#include <cstddef>
#include <cstdint>

#include "fuzz/fuzz_util.h"
#include "remotelens/v1/config.pb.h"
#include "server/auth.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t which = data[0];
  ++data;
  --size;
  if (which % 2 == 0) {
    const std::string path = remotelens_fuzz::ScratchDir() + "/users.textproto";
    remotelens_fuzz::WriteFileOrDie(path, data, size);
    absl::StatusOr<std::unique_ptr<remotelens::Authenticator>> auth =
        remotelens::Authenticator::FromUsersFile(path);
    if (!auth.ok()) {
      FUZZ_CHECK(absl::IsInvalidArgument(auth.status()));
      return 0;
    }
    FUZZ_CHECK((*auth)->enabled());
    FUZZ_CHECK(!(*auth)->Authenticate("").ok());
    (void)(*auth)->Authenticate("Bearer fuzz-key-that-is-not-in-any-file");
  } else {
    remotelens::v1::ServerConfig config;
    std::string text(reinterpret_cast<const char*>(data), size);
    if (google::protobuf::TextFormat::ParseFromString(text, &config)) {
      std::string printed;
      FUZZ_CHECK(google::protobuf::TextFormat::PrintToString(config, &printed));
      remotelens::v1::ServerConfig again;
      FUZZ_CHECK(google::protobuf::TextFormat::ParseFromString(printed, &again));
      FUZZ_CHECK(again.SerializeAsString() == config.SerializeAsString());
    }
  }
  return 0;
}
