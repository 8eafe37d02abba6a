// UTF-8 and the GPT-2 byte-level alphabet, as byte-level BPE tokenizers (Llama 3's) use them.
//
//   ByteLevelSymbol(' ')                  // "Ġ": how tokenizer.json spells the byte 0x20
//   RETURN_IF_ERROR(ValidateUtf8(text));  // INVALID_ARGUMENT naming the first bad byte
#ifndef REMOTELENS_ENGINE_BYTE_LEVEL_H_
#define REMOTELENS_ENGINE_BYTE_LEVEL_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace remotelens {

// Byte-level symbols live below U+0200; the size of a codepoint -> byte table.
inline constexpr int kByteLevelCodepointLimit = 512;

// The GPT-2 byte-to-unicode symbol for `byte`, as byte-level BPE vocabularies spell it: printable
// Latin-1 bytes stand for themselves, the rest are shifted above U+00FF (' ' -> "Ġ",
// '\n' -> "Ċ"), so every token is printable text in tokenizer.json. Returned as UTF-8.
std::string ByteLevelSymbol(uint8_t byte);
// Its codepoint.
uint32_t ByteLevelCodepoint(uint8_t byte);

// Decodes a vocab token's byte-level symbols back to raw bytes, given the inverse table
// (codepoint -> byte, -1 where none; kByteLevelCodepointLimit entries). A character outside the
// byte-level alphabet (none in a well-formed vocab) is kept as its own UTF-8 rather than dropped.
std::string ByteLevelToBytes(absl::string_view token, const std::vector<int>& codepoint_to_byte);

void AppendUtf8(uint32_t codepoint, std::string* out);

// Length of the well-formed UTF-8 sequence at s[pos], or 0 when it is ill-formed (overlong,
// surrogate, above U+10FFFF, truncated).
size_t Utf8SequenceLength(absl::string_view s, size_t pos);

// INVALID_ARGUMENT "text is not valid UTF-8: bad byte 0xff at offset 3" for ill-formed text.
absl::Status ValidateUtf8(absl::string_view text);

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_BYTE_LEVEL_H_
