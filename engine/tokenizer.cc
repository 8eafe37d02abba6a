#include "engine/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <fstream>
#include <queue>
#include <sstream>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/byte_level.h"
#include "engine/status_macros.h"

namespace remotelens {
namespace {

using Json = nlohmann::json;

// GPT-2's ByteLevel pre-tokenizer pattern, used when a ByteLevel step has use_regex=true.
constexpr absl::string_view kGpt2SplitPattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

absl::StatusOr<int64_t> ReadId(const Json& value, absl::string_view what) {
  if (!value.is_number_integer()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": id is not an integer"));
  }
  const int64_t id = value.get<int64_t>();
  // The id tables are dense, sized by the largest id: one stray large id in a small file would
  // allocate gigabytes (found by fuzz/tokenizer_fuzz). Real vocabularies are under 2^20 ids.
  constexpr int64_t kMaxId = (int64_t{1} << 24) - 1;
  if (id < 0 || id > kMaxId) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": id ", id, " is outside [0, ", kMaxId, "]"));
  }
  return id;
}

}  // namespace

struct Tokenizer::CompiledRegex {
  pcre2_code* code = nullptr;
  ~CompiledRegex() { pcre2_code_free(code); }
};

Tokenizer::Tokenizer() {
  byte_to_id_.fill(-1);
  for (int b = 0; b < 256; ++b) byte_symbols_[b] = ByteLevelSymbol(static_cast<uint8_t>(b));
}
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJsonFile(
    const std::string& path, std::optional<int64_t> bos_token_id,
    std::optional<int64_t> eos_token_id) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return absl::NotFoundError(absl::StrCat("cannot open tokenizer file ", path));
  std::stringstream contents;
  contents << file.rdbuf();
  if (file.bad()) return absl::DataLossError(absl::StrCat("error reading ", path));
  auto tokenizer = FromJsonString(contents.str(), bos_token_id, eos_token_id);
  if (!tokenizer.ok()) {
    return absl::Status(tokenizer.status().code(),
                        absl::StrCat(path, ": ", tokenizer.status().message()));
  }
  return tokenizer;
}

namespace {

absl::Status CompileRegex(absl::string_view pattern, pcre2_code** code) {
  int error_code = 0;
  PCRE2_SIZE error_offset = 0;
  *code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                        PCRE2_UTF | PCRE2_UCP, &error_code, &error_offset, nullptr);
  if (*code == nullptr) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error_code, message, sizeof(message));
    return absl::InvalidArgumentError(
        absl::StrCat("pre_tokenizer regex does not compile at offset ", error_offset, ": ",
                     reinterpret_cast<char*>(message)));
  }
  // JIT is an optimisation only: without it (e.g. no JIT support on this CPU) matching still works.
  pcre2_jit_compile(*code, PCRE2_JIT_COMPLETE);
  return absl::OkStatus();
}

// Flattens the pre_tokenizer tree into the list of split patterns applied in order.
absl::Status CollectSplitPatterns(const Json& node, std::vector<std::string>* patterns) {
  if (!node.is_object() || !node.contains("type") || !node["type"].is_string()) {
    return absl::InvalidArgumentError("pre_tokenizer: expected an object with a string \"type\"");
  }
  const std::string type = node["type"].get<std::string>();
  if (type == "Sequence") {
    if (!node.contains("pretokenizers") || !node["pretokenizers"].is_array()) {
      return absl::InvalidArgumentError("pre_tokenizer Sequence: missing \"pretokenizers\" list");
    }
    for (const Json& child : node["pretokenizers"]) {
      RETURN_IF_ERROR(CollectSplitPatterns(child, patterns));
    }
    return absl::OkStatus();
  }
  if (type == "Split") {
    if (!node.contains("pattern") || !node["pattern"].is_object() ||
        !node["pattern"].contains("Regex") || !node["pattern"]["Regex"].is_string()) {
      return absl::InvalidArgumentError(
          "pre_tokenizer Split: only {\"pattern\": {\"Regex\": ...}} is supported");
    }
    if (node.value("behavior", std::string("Isolated")) != "Isolated" ||
        node.value("invert", false)) {
      return absl::InvalidArgumentError(
          "pre_tokenizer Split: only behavior \"Isolated\" with invert false is supported");
    }
    patterns->push_back(node["pattern"]["Regex"].get<std::string>());
    return absl::OkStatus();
  }
  if (type == "ByteLevel") {
    // The byte-to-symbol mapping itself is always applied in EncodePiece; here only its options
    // matter. A prefix space would make pre-tokens differ from the input bytes, which Llama 3
    // never asks for, so it is refused instead of half-supported.
    if (node.value("add_prefix_space", false)) {
      return absl::InvalidArgumentError(
          "pre_tokenizer ByteLevel: add_prefix_space=true is not supported");
    }
    if (node.value("use_regex", true)) patterns->push_back(std::string(kGpt2SplitPattern));
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat("pre_tokenizer type \"", type, "\" is not supported"));
}

}  // namespace

// The loading steps, one per part of tokenizer.json. A friend struct rather than private members
// keeps nlohmann types out of tokenizer.h. Each may throw nlohmann exceptions on wrongly typed
// values; FromJsonString turns those into Status.
struct Tokenizer::Loader {
  static void AssignId(int64_t id, std::string bytes, Tokenizer* tokenizer) {
    if (id >= tokenizer->vocab_size()) {
      tokenizer->id_to_bytes_.resize(id + 1);
      tokenizer->id_assigned_.resize(id + 1, false);
    }
    tokenizer->id_to_bytes_[id] = std::move(bytes);
    tokenizer->id_assigned_[id] = true;
  }

  static absl::Status ReadVocab(const Json& model, Tokenizer* tokenizer) {
    if (!model.contains("vocab") || !model["vocab"].is_object()) {
      return absl::InvalidArgumentError("tokenizer.json: missing \"model.vocab\" object");
    }
    std::vector<int> codepoint_to_byte(kByteLevelCodepointLimit, -1);
    for (int b = 0; b < 256; ++b) codepoint_to_byte[ByteLevelCodepoint(b)] = b;
    for (const auto& [token, value] : model["vocab"].items()) {
      ASSIGN_OR_RETURN(const int64_t id, ReadId(value, absl::StrCat("model.vocab[", token, "]")));
      if (id < tokenizer->vocab_size() && tokenizer->id_assigned_[id]) {
        return absl::InvalidArgumentError(
            absl::StrCat("tokenizer.json: model.vocab assigns id ", id, " twice"));
      }
      AssignId(id, ByteLevelToBytes(token, codepoint_to_byte), tokenizer);
      tokenizer->vocab_.emplace(token, id);
    }
    for (int b = 0; b < 256; ++b) {
      auto it = tokenizer->vocab_.find(tokenizer->byte_symbols_[b]);
      if (it != tokenizer->vocab_.end()) tokenizer->byte_to_id_[b] = it->second;
    }
    return absl::OkStatus();
  }

  // Rank = position in model.merges.
  static absl::Status ReadMerges(const Json& model, Tokenizer* tokenizer) {
    if (!model.contains("merges") || model["merges"].is_null()) return absl::OkStatus();
    const Json& merges = model["merges"];
    if (!merges.is_array()) {
      return absl::InvalidArgumentError("tokenizer.json: model.merges is not a list");
    }
    tokenizer->merges_.reserve(merges.size());
    for (size_t rank = 0; rank < merges.size(); ++rank) {
      const Json& merge = merges[rank];
      std::string left, right;
      if (merge.is_string()) {
        const std::string text = merge.get<std::string>();
        const size_t space = text.find(' ');
        // Byte-level symbols never contain ' ' (it is "Ġ"), so one space splits exactly.
        if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos) {
          return absl::InvalidArgumentError(absl::StrCat(
              "tokenizer.json: model.merges[", rank, "] \"", text, "\" is not \"a b\""));
        }
        left = text.substr(0, space);
        right = text.substr(space + 1);
      } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
                 merge[1].is_string()) {
        left = merge[0].get<std::string>();
        right = merge[1].get<std::string>();
      } else {
        return absl::InvalidArgumentError(absl::StrCat(
            "tokenizer.json: model.merges[", rank, "] is neither \"a b\" nor [\"a\", \"b\"]"));
      }
      int64_t ids[3];
      const std::string parts[3] = {left, right, left + right};
      for (int i = 0; i < 3; ++i) {
        auto it = tokenizer->vocab_.find(parts[i]);
        if (it == tokenizer->vocab_.end()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "tokenizer.json: model.merges[", rank, "] uses \"", parts[i], "\", not in vocab"));
        }
        ids[i] = it->second;
      }
      // A repeated pair keeps its first (lowest) rank.
      tokenizer->merges_.try_emplace(PairKey(ids[0], ids[1]),
                                     Merge{static_cast<int64_t>(rank), ids[2]});
    }
    return absl::OkStatus();
  }

  // An added token's content is both what is matched in text and what Decode emits.
  static absl::Status ReadAddedTokens(const Json& root, Tokenizer* tokenizer) {
    if (!root.contains("added_tokens") || root["added_tokens"].is_null()) {
      return absl::OkStatus();
    }
    if (!root["added_tokens"].is_array()) {
      return absl::InvalidArgumentError("tokenizer.json: added_tokens is not a list");
    }
    for (const Json& added : root["added_tokens"]) {
      if (!added.is_object() || !added.contains("id") || !added.contains("content") ||
          !added["content"].is_string()) {
        return absl::InvalidArgumentError(
            "tokenizer.json: each added_tokens entry needs \"id\" and \"content\"");
      }
      const std::string content = added["content"].get<std::string>();
      ASSIGN_OR_RETURN(const int64_t id,
                       ReadId(added["id"], absl::StrCat("added_tokens[", content, "]")));
      if (content.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("tokenizer.json: added token ", id, " has empty content"));
      }
      AssignId(id, content, tokenizer);
      tokenizer->added_by_first_byte_[static_cast<uint8_t>(content[0])].push_back(
          AddedToken{content, id});
    }
    for (auto& bucket : tokenizer->added_by_first_byte_) {
      std::stable_sort(bucket.begin(), bucket.end(), [](const AddedToken& a, const AddedToken& b) {
        return a.content.size() > b.content.size();
      });
    }
    return absl::OkStatus();
  }

  static absl::Status ReadPreTokenizer(const Json& root, Tokenizer* tokenizer) {
    std::vector<std::string> patterns;
    if (!root.contains("pre_tokenizer") || root["pre_tokenizer"].is_null()) {
      patterns.push_back(std::string(kLlama3SplitPattern));
    } else {
      RETURN_IF_ERROR(CollectSplitPatterns(root["pre_tokenizer"], &patterns));
    }
    for (const std::string& pattern : patterns) {
      auto regex = std::make_unique<CompiledRegex>();
      RETURN_IF_ERROR(CompileRegex(pattern, &regex->code));
      tokenizer->split_regexes_.push_back(std::move(regex));
    }
    return absl::OkStatus();
  }

  // A config id wins; otherwise the added token spelled `default_content`, if any.
  static absl::StatusOr<std::optional<int64_t>> ResolveSpecialId(
      const Tokenizer& tokenizer, absl::string_view name, std::optional<int64_t> config_id,
      absl::string_view default_content) {
    if (!config_id.has_value()) {
      for (const AddedToken& token :
           tokenizer.added_by_first_byte_[static_cast<uint8_t>(default_content[0])]) {
        if (token.content == default_content) return token.id;
      }
      return std::nullopt;
    }
    if (*config_id < 0 || *config_id >= tokenizer.vocab_size()) {
      return absl::InvalidArgumentError(absl::StrCat(name, " ", *config_id, " is outside [0, ",
                                                     tokenizer.vocab_size(), ")"));
    }
    return config_id;
  }
};

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJsonString(
    absl::string_view json, std::optional<int64_t> bos_token_id,
    std::optional<int64_t> eos_token_id) {
  // nlohmann reports malformed input and wrong value types by throwing; everything below is
  // inside this try so that a bad file is a Status, never a crash.
  try {
    const Json root = Json::parse(json.begin(), json.end());
    if (!root.is_object()) return absl::InvalidArgumentError("tokenizer.json: not a JSON object");
    if (root.contains("normalizer") && !root["normalizer"].is_null()) {
      return absl::InvalidArgumentError(
          "tokenizer.json: a normalizer is not supported (Llama 3 has none)");
    }
    if (!root.contains("model") || !root["model"].is_object()) {
      return absl::InvalidArgumentError("tokenizer.json: missing \"model\" object");
    }
    const Json& model = root["model"];
    if (model.contains("type") && model["type"] != "BPE") {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer.json: model.type ", model["type"].dump(), " is not \"BPE\""));
    }

    auto tokenizer = std::unique_ptr<Tokenizer>(new Tokenizer());
    tokenizer->ignore_merges_ = model.value("ignore_merges", false);
    RETURN_IF_ERROR(Loader::ReadVocab(model, tokenizer.get()));
    RETURN_IF_ERROR(Loader::ReadMerges(model, tokenizer.get()));
    RETURN_IF_ERROR(Loader::ReadAddedTokens(root, tokenizer.get()));
    RETURN_IF_ERROR(Loader::ReadPreTokenizer(root, tokenizer.get()));
    ASSIGN_OR_RETURN(tokenizer->bos_token_id_,
                     Loader::ResolveSpecialId(*tokenizer, "bos_token_id", bos_token_id,
                                              "<|begin_of_text|>"));
    ASSIGN_OR_RETURN(tokenizer->eos_token_id_,
                     Loader::ResolveSpecialId(*tokenizer, "eos_token_id", eos_token_id,
                                              "<|end_of_text|>"));
    return tokenizer;
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: ", e.what()));
  }
}

const Tokenizer::AddedToken* Tokenizer::MatchAddedToken(absl::string_view text,
                                                       size_t pos) const {
  for (const AddedToken& token : added_by_first_byte_[static_cast<uint8_t>(text[pos])]) {
    if (text.compare(pos, token.content.size(), token.content) == 0) return &token;
  }
  return nullptr;
}

template <typename OnPiece, typename OnAdded>
absl::Status Tokenizer::ForEachPreToken(absl::string_view text, OnPiece on_piece,
                                        OnAdded on_added) const {
  // Validating once here lets every regex match skip PCRE2's own per-call UTF check, which would
  // rescan the rest of the text on each match and make encoding quadratic.
  RETURN_IF_ERROR(ValidateUtf8(text));
  std::vector<absl::string_view> pieces;
  auto on_plain = [&](absl::string_view plain) -> absl::Status {
    pieces.clear();
    RETURN_IF_ERROR(SplitPlainText(plain, &pieces));
    for (absl::string_view piece : pieces) RETURN_IF_ERROR(on_piece(piece));
    return absl::OkStatus();
  };
  size_t plain_start = 0;
  for (size_t pos = 0; pos < text.size();) {
    const AddedToken* added = MatchAddedToken(text, pos);
    if (added == nullptr) {
      ++pos;
      continue;
    }
    if (pos > plain_start) RETURN_IF_ERROR(on_plain(text.substr(plain_start, pos - plain_start)));
    RETURN_IF_ERROR(on_added(*added));
    pos += added->content.size();
    plain_start = pos;
  }
  if (plain_start < text.size()) RETURN_IF_ERROR(on_plain(text.substr(plain_start)));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int64_t>> Tokenizer::Encode(absl::string_view text,
                                                       bool prepend_bos) const {
  std::vector<int64_t> ids;
  ids.reserve(text.size() / 3 + 2);
  if (prepend_bos) {
    if (!bos_token_id_.has_value()) {
      return absl::FailedPreconditionError(
          "prepend_bos requested but the tokenizer has no BOS token id");
    }
    ids.push_back(*bos_token_id_);
  }
  RETURN_IF_ERROR(ForEachPreToken(
      text, [&](absl::string_view piece) { return EncodePiece(piece, &ids); },
      [&](const AddedToken& added) -> absl::Status {
        ids.push_back(added.id);
        return absl::OkStatus();
      }));
  return ids;
}

absl::StatusOr<std::vector<std::string>> Tokenizer::PreTokenize(absl::string_view text) const {
  std::vector<std::string> out;
  RETURN_IF_ERROR(ForEachPreToken(
      text,
      [&](absl::string_view piece) -> absl::Status {
        out.emplace_back(piece);
        return absl::OkStatus();
      },
      [&](const AddedToken& added) -> absl::Status {
        out.push_back(added.content);
        return absl::OkStatus();
      }));
  return out;
}

absl::Status Tokenizer::SplitPlainText(absl::string_view text,
                                       std::vector<absl::string_view>* pieces) const {
  pieces->push_back(text);
  std::vector<absl::string_view> next;
  for (const auto& regex : split_regexes_) {
    std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> match_data(
        pcre2_match_data_create_from_pattern(regex->code, nullptr), &pcre2_match_data_free);
    if (match_data == nullptr) return absl::ResourceExhaustedError("pcre2 match data allocation");
    next.clear();
    for (absl::string_view piece : *pieces) {
      const auto* subject = reinterpret_cast<PCRE2_SPTR>(piece.data());
      size_t gap_start = 0;  // Isolated: text between matches is a pre-token of its own too
      for (size_t offset = 0; offset < piece.size();) {
        int rc = pcre2_match(regex->code, subject, piece.size(), offset, PCRE2_NO_UTF_CHECK,
                             match_data.get(), nullptr);
        if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
          // The JIT's fixed stack ran out on a pathological run; the interpreter uses the heap.
          rc = pcre2_match(regex->code, subject, piece.size(), offset,
                           PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, match_data.get(), nullptr);
        }
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
          PCRE2_UCHAR message[256];
          pcre2_get_error_message(rc, message, sizeof(message));
          return absl::ResourceExhaustedError(absl::StrCat(
              "pre-tokenizer regex failed: ", reinterpret_cast<char*>(message)));
        }
        const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match_data.get());
        const size_t start = ovector[0], end = ovector[1];
        if (end == start) {
          // An empty match yields no pre-token; step one character to guarantee progress.
          offset = start + std::max<size_t>(1, Utf8SequenceLength(piece, start));
          continue;
        }
        if (start > gap_start) next.push_back(piece.substr(gap_start, start - gap_start));
        next.push_back(piece.substr(start, end - start));
        gap_start = offset = end;
      }
      if (gap_start < piece.size()) next.push_back(piece.substr(gap_start));
    }
    pieces->swap(next);
  }
  return absl::OkStatus();
}

absl::Status Tokenizer::EncodePiece(absl::string_view piece, std::vector<int64_t>* out) const {
  if (ignore_merges_) {
    // Llama 3 (like tiktoken) takes a pre-token that is itself a vocab entry whole; merging from
    // bytes could reach a different split of it.
    std::string symbols;
    for (char c : piece) symbols += byte_symbols_[static_cast<uint8_t>(c)];
    auto it = vocab_.find(symbols);
    if (it != vocab_.end()) {
      out->push_back(it->second);
      return absl::OkStatus();
    }
  }

  // Symbols form a doubly linked list over positions so a merge is O(1); a heap orders candidate
  // pairs by (rank, position), which is the order the reference implementation merges in.
  const int n = static_cast<int>(piece.size());
  std::vector<int64_t> ids(n);
  std::vector<int> prev(n), next(n);
  for (int i = 0; i < n; ++i) {
    const uint8_t byte = static_cast<uint8_t>(piece[i]);
    ids[i] = byte_to_id_[byte];
    if (ids[i] < 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "byte 0x%02x has no single-byte token (\"%s\") in model.vocab", byte,
          byte_symbols_[byte]));
    }
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  struct Candidate {
    int64_t rank;
    int left;  // position of the left symbol
    int64_t left_id, right_id;
    int64_t merged_id;
    bool operator>(const Candidate& other) const {
      return rank != other.rank ? rank > other.rank : left > other.left;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
  auto push_pair = [&](int left) {
    if (left < 0 || next[left] < 0) return;
    const int right = next[left];
    auto it = merges_.find(PairKey(ids[left], ids[right]));
    if (it == merges_.end()) return;
    heap.push({it->second.rank, left, ids[left], ids[right], it->second.merged_id});
  };
  for (int i = 0; i + 1 < n; ++i) push_pair(i);
  while (!heap.empty()) {
    const Candidate candidate = heap.top();
    heap.pop();
    const int left = candidate.left;
    const int right = next[left];
    // Skip entries made stale by an earlier merge of either symbol.
    if (ids[left] != candidate.left_id || right < 0 || ids[right] != candidate.right_id) continue;
    ids[left] = candidate.merged_id;
    ids[right] = -1;
    next[left] = next[right];
    if (next[right] >= 0) prev[next[right]] = left;
    push_pair(prev[left]);
    push_pair(left);
  }
  for (int i = 0; i >= 0 && i < n; i = next[i]) out->push_back(ids[i]);
  return absl::OkStatus();
}

absl::Status Tokenizer::CheckId(int64_t id) const {
  if (id < 0 || id >= vocab_size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("token id ", id, " is outside the valid range [0, ", vocab_size(), ")"));
  }
  if (!id_assigned_[id]) {
    return absl::InvalidArgumentError(absl::StrCat(
        "token id ", id, " is in [0, ", vocab_size(), ") but assigned to no token"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> Tokenizer::TokenToString(int64_t id) const {
  RETURN_IF_ERROR(CheckId(id));
  return id_to_bytes_[id];
}

absl::StatusOr<std::string> Tokenizer::Decode(absl::Span<const int64_t> ids) const {
  std::string text;
  for (const int64_t id : ids) {
    RETURN_IF_ERROR(CheckId(id));
    text += id_to_bytes_[id];
  }
  return text;
}

absl::StatusOr<int64_t> Tokenizer::TokenToId(absl::string_view token_text) const {
  ASSIGN_OR_RETURN(const std::vector<int64_t> ids, Encode(token_text, /*prepend_bos=*/false));
  if (ids.size() != 1) {
    return absl::InvalidArgumentError(absl::StrCat("\"", token_text, "\" encodes to ", ids.size(),
                                                   " tokens, not exactly one"));
  }
  return ids[0];
}

}  // namespace remotelens
