// Echo: caller-supplied text (session ids, cache handles, names) as it may appear in an error
// message. Statuses travel in gRPC trailers, which peers cap at a few KiB: an 8 KiB session id
// echoed whole turned NOT_FOUND into RESOURCE_EXHAUSTED ("metadata too large"). Every message that
// quotes what the caller sent quotes it through Echo.
//
//   return absl::NotFoundError(absl::StrCat("session '", Echo(id), "' not found or expired"));
#ifndef REMOTELENS_SERVER_ECHO_H_
#define REMOTELENS_SERVER_ECHO_H_

#include <cstddef>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace remotelens {

// Longest caller-supplied text echoed whole, in bytes.
inline constexpr size_t kMaxEchoBytes = 64;

// `text` unchanged when at most kMaxEchoBytes; otherwise its first bytes (cut at a UTF-8
// character boundary) followed by "...(N bytes)".
inline std::string Echo(absl::string_view text) {
  if (text.size() <= kMaxEchoBytes) return std::string(text);
  size_t cut = kMaxEchoBytes;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
  return absl::StrCat(text.substr(0, cut), "...(", text.size(), " bytes)");
}

}  // namespace remotelens

#endif  // REMOTELENS_SERVER_ECHO_H_
