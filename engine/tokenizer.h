// Llama 3 tokenizer: reads a Hugging Face `tokenizers` tokenizer.json (byte-level BPE) and
// encodes/decodes text without Python.
//
//   ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer,
//                    Tokenizer::FromJsonFile(model_dir + "/tokenizer.json", config.bos_token_id));
//   ASSIGN_OR_RETURN(std::vector<int64_t> ids, tokenizer->Encode(prompt, /*prepend_bos=*/true));
//   ASSIGN_OR_RETURN(std::string text, tokenizer->Decode(ids));
//
// What is read from tokenizer.json, and what is refused rather than silently mis-tokenized:
//   model           type "BPE"; vocab (token -> id); merges as "a b" strings or [a, b] pairs;
//                   ignore_merges (Llama 3 sets it: a pre-token already in vocab is one token).
//   added_tokens    matched verbatim in the raw text before pre-tokenization, leftmost-longest,
//                   so "<|eot_id|>" in a prompt is always its single id and never split.
//   pre_tokenizer   Split(Regex, behavior Isolated), ByteLevel (use_regex adds the GPT-2 pattern;
//                   add_prefix_space must be false), or a Sequence of these. null: Llama 3's regex.
//   normalizer      must be null (Llama 3 has none); anything else is InvalidArgument.
// The post_processor is not interpreted: callers say whether to prepend BOS per Encode call.
//
// A Tokenizer is immutable after construction, so concurrent Encode/Decode calls are safe.
#ifndef REMOTELENS_ENGINE_TOKENIZER_H_
#define REMOTELENS_ENGINE_TOKENIZER_H_

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace remotelens {

// Llama 3's pre-tokenizer split pattern, used when tokenizer.json names none.
inline constexpr absl::string_view kLlama3SplitPattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

class Tokenizer {
 public:
  // bos_token_id / eos_token_id: from the model's config.json. When absent, the ids of the added
  // tokens "<|begin_of_text|>" / "<|end_of_text|>" if tokenizer.json has them. A given id must lie
  // in [0, vocab_size()).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJsonFile(
      const std::string& path, std::optional<int64_t> bos_token_id = std::nullopt,
      std::optional<int64_t> eos_token_id = std::nullopt);
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJsonString(
      absl::string_view json, std::optional<int64_t> bos_token_id = std::nullopt,
      std::optional<int64_t> eos_token_id = std::nullopt);

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // `text` must be valid UTF-8 (InvalidArgument otherwise, naming the byte offset).
  // prepend_bos without a known BOS id is FailedPrecondition.
  absl::StatusOr<std::vector<int64_t>> Encode(absl::string_view text, bool prepend_bos) const;

  // Concatenated raw bytes of the tokens; special tokens appear as their text. The result is not
  // forced to valid UTF-8: a slice of ids may end inside a multi-byte character, and streaming
  // callers need those bytes intact to join with the next slice.
  // An id outside [0, vocab_size()) or an unassigned id inside it is InvalidArgument.
  absl::StatusOr<std::string> Decode(absl::Span<const int64_t> ids) const;

  // One token's decoded bytes (what TransformerLens' to_str_tokens shows for it).
  absl::StatusOr<std::string> TokenToString(int64_t id) const;

  // The id of `token_text` when it encodes (without BOS) to exactly one token; InvalidArgument
  // when it encodes to zero or several.
  absl::StatusOr<int64_t> TokenToId(absl::string_view token_text) const;

  // The pieces Encode runs BPE on, as raw bytes: each added token whole, and the pre-tokenizer's
  // split of the text between them. BPE merges never cross these boundaries.
  absl::StatusOr<std::vector<std::string>> PreTokenize(absl::string_view text) const;

  // Max id + 1 over model.vocab and added_tokens.
  int64_t vocab_size() const { return static_cast<int64_t>(id_to_bytes_.size()); }
  std::optional<int64_t> bos_token_id() const { return bos_token_id_; }
  std::optional<int64_t> eos_token_id() const { return eos_token_id_; }

 private:
  struct Merge {
    int64_t rank;       // position in model.merges: lower merges first
    int64_t merged_id;  // id of the concatenation
  };
  struct AddedToken {
    std::string content;
    int64_t id;
  };
  struct CompiledRegex;  // PCRE2 code, kept out of this header
  struct Loader;         // tokenizer.json reading steps, kept out of this header
  friend struct Loader;

  Tokenizer();

  // Splits a span of plain text (no added tokens in it) into pre-tokens with every regex in turn.
  absl::Status SplitPlainText(absl::string_view text,
                              std::vector<absl::string_view>* pieces) const;
  // Walks the text in order: on_piece(span) for each pre-token of the plain text (split by the
  // regexes) and on_added(token) for each added token. Encode and PreTokenize differ only in
  // what they do with the two.
  template <typename OnPiece, typename OnAdded>
  absl::Status ForEachPreToken(absl::string_view text, OnPiece on_piece, OnAdded on_added) const;
  // Byte-level BPE over one pre-token; appends ids to `out`.
  absl::Status EncodePiece(absl::string_view piece, std::vector<int64_t>* out) const;
  // The added token starting at text[pos], longest first, or nullptr.
  const AddedToken* MatchAddedToken(absl::string_view text, size_t pos) const;
  // InvalidArgument unless `id` is an assigned id in [0, vocab_size()).
  absl::Status CheckId(int64_t id) const;

  static uint64_t PairKey(int64_t left, int64_t right) {
    return (static_cast<uint64_t>(left) << 32) | static_cast<uint32_t>(right);
  }

  // Byte-level symbols ("Ġ" for ' ', ...) keyed by token text, as written in model.vocab.
  absl::flat_hash_map<std::string, int64_t> vocab_;
  absl::flat_hash_map<uint64_t, Merge> merges_;  // PairKey(left id, right id) -> merge
  std::array<std::string, 256> byte_symbols_;    // ByteLevelSymbol(b), precomputed
  std::array<int64_t, 256> byte_to_id_;          // id of each single-byte symbol, -1 when absent
  std::vector<std::string> id_to_bytes_;         // decoded bytes per id
  std::vector<bool> id_assigned_;                // false for gaps in the id space
  // Added tokens bucketed by first byte, longest first within a bucket, for leftmost-longest.
  std::array<std::vector<AddedToken>, 256> added_by_first_byte_;
  std::vector<std::unique_ptr<CompiledRegex>> split_regexes_;  // applied in order
  bool ignore_merges_ = false;
  std::optional<int64_t> bos_token_id_;
  std::optional<int64_t> eos_token_id_;
};

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_TOKENIZER_H_
