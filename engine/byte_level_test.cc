#include "engine/byte_level.h"

#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace remotelens {
namespace {

TEST(ByteLevelTest, SymbolsAsTokenizerJsonSpellsThem) {
  EXPECT_EQ(ByteLevelSymbol('a'), "a");
  EXPECT_EQ(ByteLevelSymbol('!'), "!");
  EXPECT_EQ(ByteLevelSymbol(' '), "\xC4\xA0");   // Ġ U+0120
  EXPECT_EQ(ByteLevelSymbol('\n'), "\xC4\x8A");  // Ċ U+010A
  EXPECT_EQ(ByteLevelSymbol(0), "\xC4\x80");     // U+0100: the first shifted byte
  EXPECT_EQ(ByteLevelCodepoint(0xFF), 0xFFu);    // ÿ is printable Latin-1
  EXPECT_EQ(ByteLevelCodepoint(0xAD), 0x143u);   // soft hyphen is not: the last shifted byte
}

TEST(ByteLevelTest, EveryByteHasItsOwnSymbolBelowTheLimit) {
  std::set<uint32_t> seen;
  for (int b = 0; b < 256; ++b) {
    const uint32_t cp = ByteLevelCodepoint(static_cast<uint8_t>(b));
    EXPECT_LT(cp, static_cast<uint32_t>(kByteLevelCodepointLimit));
    EXPECT_TRUE(seen.insert(cp).second) << "byte " << b << " shares codepoint " << cp;
  }
}

TEST(ByteLevelTest, SymbolsDecodeBackToEveryByte) {
  std::vector<int> codepoint_to_byte(kByteLevelCodepointLimit, -1);
  std::string all_symbols, all_bytes;
  for (int b = 0; b < 256; ++b) {
    codepoint_to_byte[ByteLevelCodepoint(static_cast<uint8_t>(b))] = b;
    all_symbols += ByteLevelSymbol(static_cast<uint8_t>(b));
    all_bytes.push_back(static_cast<char>(b));
  }
  EXPECT_EQ(ByteLevelToBytes(all_symbols, codepoint_to_byte), all_bytes);
  // A character outside the alphabet (U+4E2D) survives as its own UTF-8.
  EXPECT_EQ(ByteLevelToBytes("a\xE4\xB8\xAD", codepoint_to_byte), "a\xE4\xB8\xAD");
}

TEST(ByteLevelTest, AppendUtf8EncodesEveryLength) {
  std::string out;
  for (uint32_t cp : {0x41u, 0xE9u, 0x4E2Du, 0x1F600u}) AppendUtf8(cp, &out);
  EXPECT_EQ(out, "A\xC3\xA9\xE4\xB8\xAD\xF0\x9F\x98\x80");
}

TEST(ByteLevelTest, Utf8ValidationRefusesIllFormedSequences) {
  EXPECT_TRUE(ValidateUtf8("plain ascii, \xC3\xA9t\xC3\xA9, \xF0\x9F\x98\x80").ok());
  struct Case {
    std::string text;
    size_t bad_offset;
  };
  const std::vector<Case> cases = {
      {"ab\xFF", 2},              // never valid in UTF-8
      {"\xC0\xAF", 0},            // overlong '/'
      {"x\xE0\x80\xAF", 1},       // overlong three-byte
      {"\xED\xA0\x80", 0},        // UTF-16 surrogate U+D800
      {"\xF4\x90\x80\x80", 0},    // above U+10FFFF
      {"ok\xE4\xB8", 2},          // truncated at the end
      {"\xC3(", 0},               // continuation byte missing
  };
  for (const Case& c : cases) {
    const absl::Status status = ValidateUtf8(c.text);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.bad_offset;
    EXPECT_NE(status.message().find("at offset " + std::to_string(c.bad_offset)), std::string::npos)
        << status.message();
    EXPECT_EQ(Utf8SequenceLength(c.text, c.bad_offset), 0u);
  }
  EXPECT_EQ(Utf8SequenceLength("\xF0\x9F\x98\x80", 0), 4u);
}

}  // namespace
}  // namespace remotelens
