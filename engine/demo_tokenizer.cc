#include "engine/demo_tokenizer.h"

#include <map>
#include <memory>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "engine/byte_level.h"
#include "engine/status_macros.h"
#include "engine/tokenizer.h"

namespace remotelens {
namespace {

using OrderedJson = nlohmann::ordered_json;

constexpr int64_t kMaxDemoVocabSize = int64_t{1} << 20;

// Listed in the order they take the top ids.
constexpr const char* kSpecialTokens[kDemoSpecialTokenCount] = {
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>"};

// Training text for the merges: plain everyday English, so that the demo model's prompts (which
// are English) compress the way a real tokenizer's do. Changing it changes every demo id.
constexpr const char kTrainingText[] =
    "The lighthouse keeper woke before the sun, as he had done for thirty years. He made a "
    "pot of tea, opened the small window that faced the sea, and looked at the water. The "
    "morning was calm and grey. There were no ships on the line where the sky met the sea, "
    "and the birds were still asleep on the rocks below the tower.\n"
    "\n"
    "He liked the quiet hours. In the evening the town would send the boat with bread, "
    "letters and the news, and he would have to talk with the young man who rowed it. The "
    "young man always asked the same questions: was it lonely, was it cold, did he ever "
    "think of leaving. The keeper always gave the same answers. It was not lonely, because "
    "the sea was never the same two days in a row. It was cold, but the lamp room was warm. "
    "And he did think of leaving, every winter, and every spring he decided to stay.\n"
    "\n"
    "The lamp itself was older than the keeper. It had been built by people who wanted it to "
    "work for a hundred years, and so far it had. Every week he cleaned the glass, checked "
    "the oil, and wrote a line in the book that held the history of the tower. Most lines "
    "were short: \"Clear night, light on at 6:14, off at 5:52.\" Some were longer, when a "
    "storm came in from the west and the waves reached the door.\n"
    "\n"
    "One of those storms had come in the autumn of his twelfth year. The wind had been so "
    "strong that the windows shook, and the rain came sideways. At two in the morning he saw "
    "a light on the water that should not have been there. It was a small fishing boat, far "
    "too close to the rocks. He could not reach it, and he could not call to it. All he "
    "could do was keep the lamp turning and hope that the people on the boat could see it "
    "and understand what it meant.\n"
    "\n"
    "They did. The boat turned, slowly, and found the deep water on the other side of the "
    "point. In the morning the harbour master came out to thank him, and told him that the "
    "boat had carried four people: a father, his two daughters and an old friend of the "
    "family. The keeper wrote it in the book in one line, like the others: \"Storm from the "
    "west, boat safe, 4 on board.\"\n"
    "\n"
    "Years later one of the daughters came back to visit. She was a teacher now, and she had "
    "brought her class to see the tower. The children ran up the stairs and counted them out "
    "loud, one hundred and twenty three, and asked why the light had to turn. The keeper "
    "explained that a light that turns can be told apart from the lights of the town, and "
    "that each lighthouse on the coast has its own pattern, so that a sailor who sees it "
    "knows where he is.\n"
    "\n"
    "\"It is like a name,\" said one of the children. \"Yes,\" said the keeper, \"it is exactly "
    "like a name. The light says who it is, and the sailor knows where he is, and that is "
    "all anyone needs to get home.\"\n"
    "\n"
    "When the children had gone, he sat by the window for a long time. He thought about the "
    "boat, and the storm, and the thirty years. Then he got up, because it was getting dark, "
    "and he went up the stairs to light the lamp, as he did every evening, and would do "
    "again tomorrow.\n"
    "\n"
    "A model that reads this text learns which letters tend to follow which, which words are "
    "common and how sentences are built. It learns that \"the\" is more frequent than \"tea\", "
    "that a question often ends with a question mark, and that numbers like 12, 365 and 2024 "
    "are written with digits. It does not learn what the sea smells like, or why a keeper "
    "would stay in a tower for thirty years. Those things are not in the text; they are in "
    "the people who read it.";

// Tie-breaking on the pair itself (not on hash order) is what keeps the output deterministic.
using Pair = std::pair<int64_t, int64_t>;

struct Word {
  std::vector<int64_t> symbols;
  int64_t count;
};

// Count-based BPE: repeatedly merges the most frequent adjacent pair (ties: smallest ids) until
// `max_new_ids` ids have been created or no pair occurs twice. Appends to `tokens` (id -> text) and
// `merges` (in rank order).
void LearnMerges(std::vector<Word>& words, int64_t max_new_ids, std::vector<std::string>* tokens,
                 std::vector<Pair>* merges) {
  absl::flat_hash_map<std::string, int64_t> token_ids;
  for (int64_t id = 0; id < static_cast<int64_t>(tokens->size()); ++id) {
    token_ids.emplace((*tokens)[id], id);
  }
  int64_t new_ids = 0;
  while (new_ids < max_new_ids) {
    std::map<Pair, int64_t> pair_counts;
    for (const Word& word : words) {
      for (size_t i = 0; i + 1 < word.symbols.size(); ++i) {
        pair_counts[{word.symbols[i], word.symbols[i + 1]}] += word.count;
      }
    }
    Pair best{-1, -1};
    int64_t best_count = 1;  // a pair seen once is memorising, not learning
    for (const auto& [pair, count] : pair_counts) {
      if (count > best_count) best = pair, best_count = count;
    }
    if (best.first < 0) break;
    // Two different pairs can spell the same string ("a"+"bc", "ab"+"c"); the second one becomes
    // a merge onto the existing id, as in Hugging Face vocabularies.
    const std::string merged = (*tokens)[best.first] + (*tokens)[best.second];
    auto [it, inserted] = token_ids.try_emplace(merged, static_cast<int64_t>(tokens->size()));
    if (inserted) {
      tokens->push_back(merged);
      ++new_ids;
    }
    merges->push_back(best);
    for (Word& word : words) {
      std::vector<int64_t> merged_symbols;
      merged_symbols.reserve(word.symbols.size());
      for (size_t i = 0; i < word.symbols.size(); ++i) {
        if (i + 1 < word.symbols.size() && word.symbols[i] == best.first &&
            word.symbols[i + 1] == best.second) {
          merged_symbols.push_back(it->second);
          ++i;
        } else {
          merged_symbols.push_back(word.symbols[i]);
        }
      }
      word.symbols = std::move(merged_symbols);
    }
  }
}

OrderedJson PreTokenizerJson() {
  return {{"type", "Sequence"},
          {"pretokenizers",
           OrderedJson::array(
               {{{"type", "Split"},
                 {"pattern", {{"Regex", std::string(kLlama3SplitPattern)}}},
                 {"behavior", "Isolated"},
                 {"invert", false}},
                {{"type", "ByteLevel"},
                 {"add_prefix_space", false},
                 {"trim_offsets", true},
                 {"use_regex", false}}})}};
}

OrderedJson PostProcessorJson(int64_t bos_id) {
  const std::string bos = kSpecialTokens[0];
  auto special = [&](int type_id) {
    return OrderedJson{{"SpecialToken", {{"id", bos}, {"type_id", type_id}}}};
  };
  auto sequence = [](const char* id, int type_id) {
    return OrderedJson{{"Sequence", {{"id", id}, {"type_id", type_id}}}};
  };
  return {{"type", "TemplateProcessing"},
          {"single", OrderedJson::array({special(0), sequence("A", 0)})},
          {"pair",
           OrderedJson::array({special(0), sequence("A", 0), special(1), sequence("B", 1)})},
          {"special_tokens",
           {{bos, {{"id", bos}, {"ids", {bos_id}}, {"tokens", {bos}}}}}}};
}

OrderedJson AddedTokenJson(int64_t id, const std::string& content) {
  return {{"id", id},          {"content", content}, {"single_word", false}, {"lstrip", false},
          {"rstrip", false},   {"normalized", false}, {"special", true}};
}

}  // namespace

absl::StatusOr<std::string> MakeDemoTokenizerJson(int64_t vocab_size) {
  const int64_t min_vocab_size = 256 + kDemoSpecialTokenCount;
  if (vocab_size < min_vocab_size || vocab_size > kMaxDemoVocabSize) {
    return absl::InvalidArgumentError(absl::StrCat("demo tokenizer vocab_size ", vocab_size,
                                                   " is outside [", min_vocab_size, ", ",
                                                   kMaxDemoVocabSize, "]"));
  }

  // Words are split exactly as the finished tokenizer will split text, by running the real
  // pre-tokenizer over the training text; a merge across a split could never apply.
  OrderedJson byte_vocab = OrderedJson::object();
  std::vector<std::string> tokens;
  for (int b = 0; b < 256; ++b) {
    tokens.push_back(ByteLevelSymbol(static_cast<uint8_t>(b)));
    byte_vocab[tokens.back()] = b;
  }
  OrderedJson bytes_only = {{"pre_tokenizer", PreTokenizerJson()},
                            {"model", {{"type", "BPE"}, {"vocab", byte_vocab}}}};
  ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> splitter,
                   Tokenizer::FromJsonString(bytes_only.dump()));
  ASSIGN_OR_RETURN(std::vector<std::string> pieces, splitter->PreTokenize(kTrainingText));
  std::map<std::string, int64_t> piece_counts;
  for (const std::string& piece : pieces) ++piece_counts[piece];
  std::vector<Word> words;
  for (const auto& [piece, count] : piece_counts) {
    Word word{{}, count};
    for (char c : piece) word.symbols.push_back(static_cast<uint8_t>(c));
    words.push_back(std::move(word));
  }

  const int64_t first_special_id = vocab_size - kDemoSpecialTokenCount;
  std::vector<Pair> merges;
  LearnMerges(words, first_special_id - 256, &tokens, &merges);

  OrderedJson vocab = OrderedJson::object();
  for (int64_t id = 0; id < static_cast<int64_t>(tokens.size()); ++id) vocab[tokens[id]] = id;
  OrderedJson merge_list = OrderedJson::array();
  for (const auto& [left, right] : merges) {
    merge_list.push_back(absl::StrCat(tokens[left], " ", tokens[right]));
  }
  OrderedJson added_tokens = OrderedJson::array();
  // Ids the text could not fill stay reserved specials, as Llama 3 does with its spare ids, so
  // the id space has no gaps and embedding rows all have a token.
  for (int64_t id = static_cast<int64_t>(tokens.size()); id < first_special_id; ++id) {
    added_tokens.push_back(AddedTokenJson(
        id, absl::StrCat("<|reserved_special_token_", id - static_cast<int64_t>(tokens.size()),
                         "|>")));
  }
  for (int64_t i = 0; i < kDemoSpecialTokenCount; ++i) {
    added_tokens.push_back(AddedTokenJson(first_special_id + i, kSpecialTokens[i]));
  }

  const OrderedJson document = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", added_tokens},
      {"normalizer", nullptr},
      {"pre_tokenizer", PreTokenizerJson()},
      {"post_processor", PostProcessorJson(first_special_id)},
      {"decoder",
       {{"type", "ByteLevel"},
        {"add_prefix_space", true},
        {"trim_offsets", true},
        {"use_regex", true}}},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", nullptr},
        {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr},
        {"fuse_unk", false},
        {"byte_fallback", false},
        {"ignore_merges", true},
        {"vocab", vocab},
        {"merges", merge_list}}}};
  return document.dump(2);
}

absl::StatusOr<std::string> MakeDemoTokenizerJson(const DemoTokenizerSpec& spec) {
  return MakeDemoTokenizerJson(spec.vocab_size);
}

}  // namespace remotelens
