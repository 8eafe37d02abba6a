#include "engine/byte_level.h"

#include "absl/strings/str_format.h"

namespace remotelens {

void AppendUtf8(uint32_t codepoint, std::string* out) {
  if (codepoint < 0x80) {
    out->push_back(static_cast<char>(codepoint));
  } else if (codepoint < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (codepoint >> 6)));
    out->push_back(static_cast<char>(0x80 | (codepoint & 0x3F)));
  } else if (codepoint < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (codepoint >> 12)));
    out->push_back(static_cast<char>(0x80 | ((codepoint >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (codepoint & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (codepoint >> 18)));
    out->push_back(static_cast<char>(0x80 | ((codepoint >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((codepoint >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (codepoint & 0x3F)));
  }
}

uint32_t ByteLevelCodepoint(uint8_t byte) {
  auto printable = [](int b) {
    return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
  };
  if (printable(byte)) return byte;
  // Non-printable bytes take U+0100, U+0101, ... in byte order.
  uint32_t shifted = 0;
  for (int b = 0; b < byte; ++b) {
    if (!printable(b)) ++shifted;
  }
  return 256 + shifted;
}

size_t Utf8SequenceLength(absl::string_view s, size_t pos) {
  const auto byte = [&](size_t i) { return static_cast<uint8_t>(s[i]); };
  const uint8_t lead = byte(pos);
  if (lead < 0x80) return 1;
  size_t length;
  uint8_t min_second = 0x80, max_second = 0xBF;
  if (lead >= 0xC2 && lead <= 0xDF) {
    length = 2;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    length = 3;
    if (lead == 0xE0) min_second = 0xA0;  // overlong
    if (lead == 0xED) max_second = 0x9F;  // UTF-16 surrogates
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    length = 4;
    if (lead == 0xF0) min_second = 0x90;  // overlong
    if (lead == 0xF4) max_second = 0x8F;  // above U+10FFFF
  } else {
    return 0;
  }
  if (pos + length > s.size()) return 0;
  if (byte(pos + 1) < min_second || byte(pos + 1) > max_second) return 0;
  for (size_t i = 2; i < length; ++i) {
    if ((byte(pos + i) & 0xC0) != 0x80) return 0;
  }
  return length;
}

absl::Status ValidateUtf8(absl::string_view text) {
  for (size_t pos = 0; pos < text.size();) {
    const size_t length = Utf8SequenceLength(text, pos);
    if (length == 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("text is not valid UTF-8: bad byte 0x%02x at offset %d",
                          static_cast<uint8_t>(text[pos]), pos));
    }
    pos += length;
  }
  return absl::OkStatus();
}

std::string ByteLevelToBytes(absl::string_view token,
                             const std::vector<int>& codepoint_to_byte) {
  std::string out;
  for (size_t pos = 0; pos < token.size();) {
    const size_t length = Utf8SequenceLength(token, pos);
    if (length == 0) {
      out.push_back(token[pos++]);
      continue;
    }
    uint32_t codepoint = static_cast<uint8_t>(token[pos]);
    if (length > 1) {
      codepoint &= 0xFF >> (length + 1);
      for (size_t i = 1; i < length; ++i) {
        codepoint = (codepoint << 6) | (static_cast<uint8_t>(token[pos + i]) & 0x3F);
      }
    }
    if (codepoint < kByteLevelCodepointLimit && codepoint_to_byte[codepoint] >= 0) {
      out.push_back(static_cast<char>(codepoint_to_byte[codepoint]));
    } else {
      out.append(token.data() + pos, length);
    }
    pos += length;
  }
  return out;
}

std::string ByteLevelSymbol(uint8_t byte) {
  std::string out;
  AppendUtf8(ByteLevelCodepoint(byte), &out);
  return out;
}

}  // namespace remotelens
