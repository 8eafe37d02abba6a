#include "engine/tokenizer.h"

#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/demo_tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace remotelens {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Byte-level vocab for "hello world" plus merges whose ranks decide the split. Byte-level
// symbols: "Ġ" is ' '. Ids are chosen by hand so expected sequences are exact.
constexpr const char kTinyVocab[] = R"(
  "h": 0, "e": 1, "l": 2, "o": 3, "Ġ": 4, "w": 5, "r": 6, "d": 7, "a": 8, "b": 9, "c": 10,
  "he": 11, "ll": 12, "hell": 13, "hello": 14, "Ġw": 15, "or": 16, "Ġwor": 17,
  "bc": 18, "ab": 19)";

std::string TinyTokenizerJson(absl::string_view merges, bool ignore_merges = false) {
  return absl::StrCat(R"({
    "added_tokens": [
      {"id": 20, "content": "<|begin_of_text|>", "special": true},
      {"id": 22, "content": "<|eot_id|>", "special": true}
    ],
    "normalizer": null,
    "model": {"type": "BPE", "ignore_merges": )",
                      ignore_merges ? "true" : "false", R"(, "vocab": {)", kTinyVocab,
                      R"(}, "merges": )", merges, "}}");
}

// "b c" ranks before "a b", so "abc" must become [a, bc] although "ab" is leftmost.
constexpr const char kTinyMergeStrings[] =
    R"(["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "b c", "a b"])";
constexpr const char kTinyMergePairs[] =
    R"([["h","e"], ["l","l"], ["he","ll"], ["hell","o"], ["Ġ","w"], ["o","r"], ["Ġw","or"],
        ["b","c"], ["a","b"]])";

std::unique_ptr<Tokenizer> LoadOrDie(absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer) {
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  return tokenizer.ok() ? std::move(tokenizer).value() : nullptr;
}

std::unique_ptr<Tokenizer> Demo(int64_t vocab_size = 512) {
  absl::StatusOr<std::string> json = MakeDemoTokenizerJson(vocab_size);
  EXPECT_TRUE(json.ok()) << json.status();
  if (!json.ok()) return nullptr;
  return LoadOrDie(Tokenizer::FromJsonString(*json));
}

std::vector<int64_t> EncodeOrDie(const Tokenizer& tokenizer, absl::string_view text,
                                 bool prepend_bos = false) {
  absl::StatusOr<std::vector<int64_t>> ids = tokenizer.Encode(text, prepend_bos);
  EXPECT_TRUE(ids.ok()) << ids.status();
  return ids.ok() ? *ids : std::vector<int64_t>{};
}

std::vector<std::string> PreTokenizeOrDie(const Tokenizer& tokenizer, absl::string_view text) {
  absl::StatusOr<std::vector<std::string>> pieces = tokenizer.PreTokenize(text);
  EXPECT_TRUE(pieces.ok()) << pieces.status();
  return pieces.ok() ? *pieces : std::vector<std::string>{};
}

void ExpectRoundTrip(const Tokenizer& tokenizer, const std::string& text) {
  const std::vector<int64_t> ids = EncodeOrDie(tokenizer, text);
  absl::StatusOr<std::string> decoded = tokenizer.Decode(ids);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(*decoded, text);
}

TEST(Tokenizer, TinyMergesGiveExactIdsInRankOrder) {
  auto tokenizer = LoadOrDie(Tokenizer::FromJsonString(TinyTokenizerJson(kTinyMergeStrings)));
  ASSERT_NE(tokenizer, nullptr);
  // "hello" | " world": h e l l o -> hello; Ġ w o r l d -> Ġwor l d.
  EXPECT_THAT(EncodeOrDie(*tokenizer, "hello world"), ElementsAre(14, 17, 2, 7));
  EXPECT_THAT(EncodeOrDie(*tokenizer, "abc"), ElementsAre(8, 18));
  EXPECT_THAT(EncodeOrDie(*tokenizer, "he"), ElementsAre(11));
  EXPECT_EQ(tokenizer->vocab_size(), 23);  // added token 22 is the max id
}

TEST(Tokenizer, MergePairsFormatMatchesStringFormat) {
  auto tokenizer = LoadOrDie(Tokenizer::FromJsonString(TinyTokenizerJson(kTinyMergePairs)));
  ASSERT_NE(tokenizer, nullptr);
  EXPECT_THAT(EncodeOrDie(*tokenizer, "hello world"), ElementsAre(14, 17, 2, 7));
  EXPECT_THAT(EncodeOrDie(*tokenizer, "abc"), ElementsAre(8, 18));
}

TEST(Tokenizer, IgnoreMergesTakesWholeVocabPiece) {
  // With no merges at all, only ignore_merges' whole-piece lookup can produce "hello".
  auto plain = LoadOrDie(Tokenizer::FromJsonString(TinyTokenizerJson(R"([])")));
  auto whole = LoadOrDie(Tokenizer::FromJsonString(TinyTokenizerJson(R"([])", true)));
  ASSERT_NE(plain, nullptr);
  ASSERT_NE(whole, nullptr);
  EXPECT_THAT(EncodeOrDie(*plain, "hello"), ElementsAre(0, 1, 2, 2, 3));
  EXPECT_THAT(EncodeOrDie(*whole, "hello"), ElementsAre(14));
}

TEST(Tokenizer, AddedTokensMatchVerbatimAndBosIsPrepended) {
  auto tokenizer = LoadOrDie(Tokenizer::FromJsonString(TinyTokenizerJson(kTinyMergeStrings)));
  ASSERT_NE(tokenizer, nullptr);
  ASSERT_EQ(tokenizer->bos_token_id(), 20);
  EXPECT_EQ(tokenizer->eos_token_id(), std::nullopt);  // no <|end_of_text|>, none given
  EXPECT_THAT(EncodeOrDie(*tokenizer, "hello<|eot_id|>he", /*prepend_bos=*/true),
              ElementsAre(20, 14, 22, 11));
  EXPECT_THAT(EncodeOrDie(*tokenizer, "<|begin_of_text|><|eot_id|>"), ElementsAre(20, 22));
  absl::StatusOr<std::string> text = tokenizer->Decode({20, 14, 22});
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, "<|begin_of_text|>hello<|eot_id|>");
}

TEST(Tokenizer, ConfigIdsOverrideAddedTokensAndAreRangeChecked) {
  auto tokenizer =
      LoadOrDie(Tokenizer::FromJsonString(TinyTokenizerJson(kTinyMergeStrings), 14, 22));
  ASSERT_NE(tokenizer, nullptr);
  EXPECT_EQ(tokenizer->bos_token_id(), 14);
  EXPECT_EQ(tokenizer->eos_token_id(), 22);
  EXPECT_THAT(EncodeOrDie(*tokenizer, "he", true), ElementsAre(14, 11));

  auto bad = Tokenizer::FromJsonString(TinyTokenizerJson(kTinyMergeStrings), 23);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("bos_token_id 23"));
}

TEST(Tokenizer, PrependBosWithoutBosIdFails) {
  const std::string json = R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}})";
  auto tokenizer = LoadOrDie(Tokenizer::FromJsonString(json));
  ASSERT_NE(tokenizer, nullptr);
  EXPECT_EQ(tokenizer->Encode("a", true).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(EncodeOrDie(*tokenizer, "aa"), ElementsAre(0, 0));
  // A byte with no token is an error naming it, not a silent drop.
  auto missing = tokenizer->Encode("ab", false);
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(missing.status().message(), HasSubstr("0x62"));
}

TEST(Tokenizer, MalformedJsonIsAnErrorNotACrash) {
  for (const std::string& json : {
           std::string("{not json"),
           std::string(""),
           std::string("[1, 2]"),
           std::string(R"({"model": {"type": "BPE"}})"),
           std::string(R"({"model": {"type": "BPE", "vocab": []}})"),
           std::string(R"({"model": {"type": "BPE", "vocab": {"a": "zero"}}})"),
           std::string(R"({"model": {"type": "BPE", "vocab": {"a": -1}}})"),
           std::string(R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 0}}})"),
           std::string(R"({"model": {"type": "WordPiece", "vocab": {"a": 0}}})"),
           std::string(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a z"]}})"),
           std::string(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["aa"]}})"),
           std::string(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [7]}})"),
           std::string(R"({"added_tokens": [{"id": 1}], "model": {"vocab": {"a": 0}}})"),
           std::string(R"({"normalizer": {"type": "NFC"}, "model": {"vocab": {"a": 0}}})"),
           std::string(
               R"({"pre_tokenizer": {"type": "Whitespace"}, "model": {"vocab": {"a": 0}}})"),
           std::string(R"({"pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(("},
                "behavior": "Isolated"}, "model": {"vocab": {"a": 0}}})"),
       }) {
    auto tokenizer = Tokenizer::FromJsonString(json);
    EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kInvalidArgument) << json;
  }
  auto missing_vocab = Tokenizer::FromJsonString(R"({"model": {"type": "BPE", "merges": []}})");
  EXPECT_THAT(missing_vocab.status().message(), HasSubstr("model.vocab"));
}

TEST(Tokenizer, FromJsonFileReadsFileAndReportsMissingFile) {
  const std::string path = absl::StrCat(testing::TempDir(), "/tiny_tokenizer.json");
  {
    std::ofstream out(path);
    out << TinyTokenizerJson(kTinyMergeStrings);
  }
  auto tokenizer = LoadOrDie(Tokenizer::FromJsonFile(path));
  ASSERT_NE(tokenizer, nullptr);
  EXPECT_THAT(EncodeOrDie(*tokenizer, "hello"), ElementsAre(14));
  EXPECT_EQ(Tokenizer::FromJsonFile(path + ".absent").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(Tokenizer, DecodeRejectsIdsOutsideTheVocab) {
  auto tokenizer = LoadOrDie(Tokenizer::FromJsonString(TinyTokenizerJson(kTinyMergeStrings)));
  ASSERT_NE(tokenizer, nullptr);
  for (int64_t id : {int64_t{23}, int64_t{-1}, int64_t{1} << 40}) {
    auto text = tokenizer->Decode({14, id});
    ASSERT_FALSE(text.ok());
    EXPECT_EQ(text.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(text.status().message(), HasSubstr(absl::StrCat("token id ", id)));
    EXPECT_THAT(text.status().message(), HasSubstr("[0, 23)"));
  }
  // 21 lies inside the range but no token has it.
  EXPECT_THAT(tokenizer->Decode({21}).status().message(), HasSubstr("assigned to no token"));
  EXPECT_FALSE(tokenizer->TokenToString(23).ok());
}

TEST(Tokenizer, RoundTripsAsciiUtf8AndWhitespace) {
  auto tokenizer = Demo();
  ASSERT_NE(tokenizer, nullptr);
  ExpectRoundTrip(*tokenizer, "The quick brown fox jumps over the lazy dog.");
  ExpectRoundTrip(*tokenizer, "héllo wörld 日本語 🙂");
  ExpectRoundTrip(*tokenizer, "  leading\n\n\ttabs   and\r\nCRLF   \n   trailing   ");
  ExpectRoundTrip(*tokenizer, "I'll say it's 12345 o'clock, DON'T you?");
  ExpectRoundTrip(*tokenizer, "");
  std::string all_bytes_utf8;
  for (int c = 1; c < 0x800; c += 7) {
    if (c < 0x80) {
      all_bytes_utf8.push_back(static_cast<char>(c));
    } else {
      all_bytes_utf8.push_back(static_cast<char>(0xC0 | (c >> 6)));
      all_bytes_utf8.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    }
  }
  ExpectRoundTrip(*tokenizer, all_bytes_utf8);
}

TEST(Tokenizer, MultiByteCharactersSplitIntoByteTokensWhenUnmerged) {
  auto tokenizer = Demo();
  ASSERT_NE(tokenizer, nullptr);
  // 🙂 is F0 9F 99 82; the demo text has no emoji, so it stays four byte tokens (id = byte).
  EXPECT_THAT(EncodeOrDie(*tokenizer, "🙂"), ElementsAre(0xF0, 0x9F, 0x99, 0x82));
  auto piece = tokenizer->TokenToString(0xF0);
  ASSERT_TRUE(piece.ok());
  EXPECT_EQ(*piece, "\xF0");
}

TEST(Tokenizer, PreTokenizerGroupsDigitsByThree) {
  auto tokenizer = Demo();
  ASSERT_NE(tokenizer, nullptr);
  EXPECT_THAT(PreTokenizeOrDie(*tokenizer, "12345"), ElementsAre("123", "45"));
  EXPECT_THAT(PreTokenizeOrDie(*tokenizer, "x 1234567"), ElementsAre("x", " ", "123", "456", "7"));
}

TEST(Tokenizer, PreTokenizerSplitsContractions) {
  auto tokenizer = Demo();
  ASSERT_NE(tokenizer, nullptr);
  EXPECT_THAT(PreTokenizeOrDie(*tokenizer, "I'll don't we've HE'S"),
              ElementsAre("I", "'ll", " don", "'t", " we", "'ve", " HE", "'S"));
}

TEST(Tokenizer, PreTokenizerKeepsWhitespaceRunsAndNewlines) {
  auto tokenizer = Demo();
  ASSERT_NE(tokenizer, nullptr);
  // The last space of a run joins the next word; newline runs stand alone.
  EXPECT_THAT(PreTokenizeOrDie(*tokenizer, "a  b\n\nc   "),
              ElementsAre("a", " ", " b", "\n\n", "c", "   "));
  EXPECT_THAT(PreTokenizeOrDie(*tokenizer, "x;\n y"), ElementsAre("x", ";\n", " y"));
}

TEST(Tokenizer, SpecialTokensInTextAreSingleIds) {
  auto tokenizer = Demo(512);
  ASSERT_NE(tokenizer, nullptr);
  const std::vector<int64_t> ids =
      EncodeOrDie(*tokenizer, "<|begin_of_text|>hi<|eot_id|><|eot_id|>", /*prepend_bos=*/false);
  ASSERT_GE(ids.size(), 4u);
  EXPECT_EQ(ids.front(), 507);
  EXPECT_EQ(ids[ids.size() - 2], 511);
  EXPECT_EQ(ids.back(), 511);
  // An incomplete marker is ordinary text.
  for (int64_t id : EncodeOrDie(*tokenizer, "<|eot_id|")) EXPECT_LT(id, 507);
  auto eot = tokenizer->TokenToId("<|eot_id|>");
  ASSERT_TRUE(eot.ok()) << eot.status();
  EXPECT_EQ(*eot, 511);
}

TEST(Tokenizer, PrependBosPutsBosFirst) {
  auto tokenizer = Demo(512);
  ASSERT_NE(tokenizer, nullptr);
  EXPECT_EQ(tokenizer->bos_token_id(), 507);
  EXPECT_EQ(tokenizer->eos_token_id(), 508);
  const std::vector<int64_t> plain = EncodeOrDie(*tokenizer, "the sea");
  std::vector<int64_t> expected = {507};
  expected.insert(expected.end(), plain.begin(), plain.end());
  EXPECT_EQ(EncodeOrDie(*tokenizer, "the sea", /*prepend_bos=*/true), expected);
}

TEST(Tokenizer, TokenToIdNeedsExactlyOneToken) {
  auto tokenizer = LoadOrDie(Tokenizer::FromJsonString(TinyTokenizerJson(kTinyMergeStrings)));
  ASSERT_NE(tokenizer, nullptr);
  auto hello = tokenizer->TokenToId("hello");
  ASSERT_TRUE(hello.ok()) << hello.status();
  EXPECT_EQ(*hello, 14);
  auto wor = tokenizer->TokenToId(" wor");
  ASSERT_TRUE(wor.ok()) << wor.status();
  EXPECT_EQ(*wor, 17);
  EXPECT_EQ(tokenizer->TokenToId("hello world").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(tokenizer->TokenToId("").status().code(), absl::StatusCode::kInvalidArgument);
  auto as_string = tokenizer->TokenToString(17);
  ASSERT_TRUE(as_string.ok());
  EXPECT_EQ(*as_string, " wor");
}

TEST(Tokenizer, InvalidUtf8IsRejectedWithOffset) {
  auto tokenizer = Demo();
  ASSERT_NE(tokenizer, nullptr);
  for (const std::string& text : {std::string("ab\xC3"), std::string("ab\xC0\x80"),
                                 std::string("ab\xED\xA0\x80"), std::string("ab\xFF")}) {
    auto ids = tokenizer->Encode(text, false);
    ASSERT_FALSE(ids.ok());
    EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(ids.status().message(), HasSubstr("offset 2"));
  }
}

TEST(Tokenizer, LongInputsEncodeQuicklyAndRoundTrip) {
  auto tokenizer = Demo();
  ASSERT_NE(tokenizer, nullptr);
  // One 100k-byte pre-token exercises the merge heap; a long space run exercises the regex.
  ExpectRoundTrip(*tokenizer, std::string(100000, 'e'));
  ExpectRoundTrip(*tokenizer, std::string(100000, ' ') + "x");
  std::string prose;
  while (prose.size() < 300000) prose += "The keeper lit the lamp at 6:14, as always.\n";
  ExpectRoundTrip(*tokenizer, prose);
}

TEST(DemoTokenizer, HasExactVocabSizeAndSpecialsOnTop) {
  for (int64_t vocab_size : {int64_t{261}, int64_t{300}, int64_t{512}, int64_t{4096}}) {
    auto tokenizer = Demo(vocab_size);
    ASSERT_NE(tokenizer, nullptr);
    EXPECT_EQ(tokenizer->vocab_size(), vocab_size);
    EXPECT_EQ(tokenizer->bos_token_id(), vocab_size - 5);
    auto eot = tokenizer->TokenToString(vocab_size - 1);
    ASSERT_TRUE(eot.ok());
    EXPECT_EQ(*eot, "<|eot_id|>");
    // Every id decodes: the id space has no gaps.
    for (int64_t id = 0; id < vocab_size; ++id) EXPECT_TRUE(tokenizer->TokenToString(id).ok());
  }
  EXPECT_EQ(MakeDemoTokenizerJson(260).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeDemoTokenizerJson(-1).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(DemoTokenizer, IsDeterministicAndWellFormed) {
  absl::StatusOr<std::string> first = MakeDemoTokenizerJson(DemoTokenizerSpec{});
  absl::StatusOr<std::string> second = MakeDemoTokenizerJson(512);
  ASSERT_TRUE(first.ok() && second.ok());
  EXPECT_EQ(*first, *second);
  EXPECT_THAT(*first, HasSubstr(R"("type": "TemplateProcessing")"));
  EXPECT_THAT(*first, HasSubstr(R"("behavior": "Isolated")"));
  EXPECT_THAT(*first, HasSubstr(R"("ids": [
          507
        ])"));
}

TEST(DemoTokenizer, CompressesCommonEnglishWords) {
  auto tokenizer = Demo(512);
  ASSERT_NE(tokenizer, nullptr);
  const std::string text = "The keeper and the children looked at the sea from the tower.";
  const std::vector<int64_t> ids = EncodeOrDie(*tokenizer, text);
  EXPECT_LT(ids.size(), text.size() / 2);
  // " the" is frequent enough in the demo text to be one token.
  auto the = tokenizer->TokenToId(" the");
  EXPECT_TRUE(the.ok()) << the.status();
  // The smallest vocab has no merges, so every byte is its own token.
  auto bytes_only = Demo(261);
  ASSERT_NE(bytes_only, nullptr);
  EXPECT_EQ(EncodeOrDie(*bytes_only, text).size(), text.size());
}

}  // namespace
}  // namespace remotelens
