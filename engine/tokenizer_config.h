// The chat side of a Hugging Face checkpoint's tokenizer: chat templates and the special-token
// texts they refer to, read from tokenizer_config.json (and chat_template.jinja, which newer
// checkpoints save beside it). The engine does not render templates; the server passes them to
// clients, which render them as Hugging Face's apply_chat_template does (docs/decisions.md).
//
//   ASSIGN_OR_RETURN(TokenizerConfig tc, ReadTokenizerConfig("/models/Llama-3.1-8B-Instruct"));
//   if (!tc.chat_templates.empty()) { /* tc.chat_templates[0] is "default" */ }
//
// What is read, and what is refused:
//   chat_template   a string (the "default" template), or a list of {"name", "template"} objects;
//                   anything else is InvalidArgument. A chat_template.jinja file replaces (or
//                   adds) "default".
//   bos_token,      a string, or an added-token object {"content": ...}; null or absent: "".
//   eos_token
// Bounds: each file at most kMaxTokenizerConfigBytes, at most kMaxChatTemplates templates.
#ifndef REMOTELENS_ENGINE_TOKENIZER_CONFIG_H_
#define REMOTELENS_ENGINE_TOKENIZER_CONFIG_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace remotelens {

// Meta's Llama 3.1 tokenizer_config.json is 51 KB; 16 MiB leaves room for any real one.
inline constexpr int64_t kMaxTokenizerConfigBytes = int64_t{16} << 20;
inline constexpr int kMaxChatTemplates = 64;

struct ChatTemplateSource {
  std::string name;    // "default" or the name tokenizer_config.json gives it
  std::string source;  // Jinja, verbatim
};

struct TokenizerConfig {
  std::vector<ChatTemplateSource> chat_templates;  // "default" first when there is one
  std::string bos_token;                           // "" when not given
  std::string eos_token;
};

// `config_json`: tokenizer_config.json's text. `chat_template_jinja`: chat_template.jinja's text
// when the directory has one.
absl::StatusOr<TokenizerConfig> ParseTokenizerConfig(
    absl::string_view config_json, std::optional<std::string> chat_template_jinja = std::nullopt);

// Reads `model_dir`/tokenizer_config.json and `model_dir`/chat_template.jinja. Either may be
// absent (an empty TokenizerConfig when both are); errors name the file.
absl::StatusOr<TokenizerConfig> ReadTokenizerConfig(const std::string& model_dir);

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_TOKENIZER_CONFIG_H_
