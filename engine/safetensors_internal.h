// Internals shared by the safetensors reader (safetensors.cc) and writers
// (safetensors_writer.cc): format constants, dtype names, quoting of untrusted names, and small
// POSIX helpers. Private to the safetensors target (a header in its srcs): include
// engine/safetensors.h instead.
#ifndef REMOTELENS_ENGINE_SAFETENSORS_INTERNAL_H_
#define REMOTELENS_ENGINE_SAFETENSORS_INTERNAL_H_

#include <c10/core/ScalarType.h>
#include <unistd.h>

#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"

namespace remotelens {

inline constexpr uint64_t kLengthFieldBytes = 8;
// Bounds what a hostile or corrupt length field can make us parse; real headers are kilobytes.
inline constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;
inline constexpr char kMetadataKey[] = "__metadata__";
inline constexpr char kSingleFileName[] = "model.safetensors";
inline constexpr char kIndexFileName[] = "model.safetensors.index.json";

struct DtypeInfo {
  const char* name;  // as spelled in the header
  at::ScalarType type;
};
// The dtypes the engine serves; null for any other.
const DtypeInfo* DtypeByName(const std::string& name);
const DtypeInfo* DtypeByType(at::ScalarType type);

// Text from an untrusted file with control bytes escaped and the length capped, so an error
// message stays one readable line; Quote() also puts it in single quotes.
std::string Escaped(absl::string_view text);
std::string Quote(absl::string_view name);

bool PathExists(const std::string& path);

// Closes a file descriptor on every return path.
class ScopedFd {
 public:
  explicit ScopedFd(int fd) : fd_(fd) {}
  ~ScopedFd() { Reset(); }
  ScopedFd(const ScopedFd&) = delete;
  ScopedFd& operator=(const ScopedFd&) = delete;
  int get() const { return fd_; }
  // close() can report a failed write-back (e.g. on NFS), so writers check its result.
  int Reset() {
    int rc = 0;
    if (fd_ >= 0) rc = ::close(fd_);
    fd_ = -1;
    return rc;
  }

 private:
  int fd_;
};

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_SAFETENSORS_INTERNAL_H_
