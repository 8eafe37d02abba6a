// A real, small Llama-3-style tokenizer.json for the built-in demo model, generated in process so
// the demo needs no downloaded files.
//
//   ASSIGN_OR_RETURN(std::string json, MakeDemoTokenizerJson(DemoTokenizerSpec{}));
//   ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::FromJsonString(json));
//
// Layout of the ids (the same shape as Llama 3's, scaled down):
//   [0, 256)                      the 256 byte-level symbols, id b for byte b;
//   [256, ...)                    byte-pair merges learned by count-based BPE over a fixed English
//                                 text built into demo_tokenizer.cc, most frequent pair first;
//   ...                           "<|reserved_special_token_N|>" for ids the text cannot fill;
//   [vocab_size - 5, vocab_size)  <|begin_of_text|>, <|end_of_text|>, <|start_header_id|>,
//                                 <|end_header_id|>, <|eot_id|> (special added tokens).
// The output is deterministic: the same vocab_size always gives byte-identical JSON. It is valid
// Hugging Face `tokenizers` format (BPE model, Split+ByteLevel pre-tokenizer, ByteLevel decoder,
// TemplateProcessing that prepends <|begin_of_text|>).
#ifndef REMOTELENS_ENGINE_DEMO_TOKENIZER_H_
#define REMOTELENS_ENGINE_DEMO_TOKENIZER_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace remotelens {

// Number of special added tokens at the top of the demo vocabulary.
inline constexpr int64_t kDemoSpecialTokenCount = 5;

struct DemoTokenizerSpec {
  int64_t vocab_size = 512;  // ids in total; at least 256 + kDemoSpecialTokenCount, at most 2^20
};

// InvalidArgument when vocab_size is outside [256 + kDemoSpecialTokenCount, 2^20].
absl::StatusOr<std::string> MakeDemoTokenizerJson(int64_t vocab_size);
absl::StatusOr<std::string> MakeDemoTokenizerJson(const DemoTokenizerSpec& spec);

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_DEMO_TOKENIZER_H_
