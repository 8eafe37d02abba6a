#include "engine/tokenizer_config.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include <nlohmann/json.hpp>
#include "engine/status_macros.h"

namespace remotelens {
namespace {

using Json = nlohmann::json;

absl::Status Invalid(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("tokenizer_config.json: ", field, " ", what));
}

// A special token is written either as its text or as an added-token object with "content".
absl::StatusOr<std::string> SpecialTokenText(const Json& json, const char* key) {
  auto it = json.find(key);
  if (it == json.end() || it->is_null()) return std::string();
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object()) {
    auto content = it->find("content");
    if (content != it->end() && content->is_string()) return content->get<std::string>();
  }
  return Invalid(key, "must be a string or an object with a string \"content\"");
}

absl::StatusOr<std::optional<std::string>> ReadOptionalFile(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return std::optional<std::string>();
  const auto size = std::filesystem::file_size(path, ec);
  if (ec) return absl::NotFoundError(absl::StrCat("cannot stat ", path, ": ", ec.message()));
  if (static_cast<int64_t>(size) > kMaxTokenizerConfigBytes) {
    return absl::InvalidArgumentError(absl::StrCat(path, " is ", size, " bytes; at most ",
                                                   kMaxTokenizerConfigBytes, " are read"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading ", path));
  return std::optional<std::string>(text.str());
}

}  // namespace

absl::StatusOr<TokenizerConfig> ParseTokenizerConfig(absl::string_view config_json,
                                                     std::optional<std::string> chat_template_jinja) {
  TokenizerConfig out;
  if (!config_json.empty()) {
    const Json json = Json::parse(config_json, nullptr, /*allow_exceptions=*/false);
    if (json.is_discarded() || !json.is_object()) {
      return absl::InvalidArgumentError("tokenizer_config.json is not a JSON object");
    }
    ASSIGN_OR_RETURN(out.bos_token, SpecialTokenText(json, "bos_token"));
    ASSIGN_OR_RETURN(out.eos_token, SpecialTokenText(json, "eos_token"));
    auto it = json.find("chat_template");
    if (it != json.end() && !it->is_null()) {
      if (it->is_string()) {
        out.chat_templates.push_back({"default", it->get<std::string>()});
      } else if (it->is_array()) {
        if (it->size() > static_cast<size_t>(kMaxChatTemplates)) {
          return Invalid("chat_template", absl::StrCat("lists ", it->size(), " templates; at most ",
                                                       kMaxChatTemplates, " are accepted"));
        }
        for (const Json& entry : *it) {
          auto name = entry.is_object() ? entry.find("name") : entry.end();
          auto source = entry.is_object() ? entry.find("template") : entry.end();
          if (!entry.is_object() || name == entry.end() || !name->is_string() ||
              source == entry.end() || !source->is_string()) {
            return Invalid("chat_template", "list entries must be {\"name\": string, \"template\": string}");
          }
          out.chat_templates.push_back({name->get<std::string>(), source->get<std::string>()});
        }
      } else {
        return Invalid("chat_template", "must be a string or a list of {\"name\", \"template\"} objects");
      }
    }
  }
  if (chat_template_jinja.has_value()) {
    auto it = std::find_if(out.chat_templates.begin(), out.chat_templates.end(),
                           [](const ChatTemplateSource& t) { return t.name == "default"; });
    if (it != out.chat_templates.end()) {
      it->source = *std::move(chat_template_jinja);
    } else {
      out.chat_templates.push_back({"default", *std::move(chat_template_jinja)});
    }
  }
  // "default" first: clients that take the first template get the checkpoint's main one.
  std::stable_partition(out.chat_templates.begin(), out.chat_templates.end(),
                        [](const ChatTemplateSource& t) { return t.name == "default"; });
  return out;
}

absl::StatusOr<TokenizerConfig> ReadTokenizerConfig(const std::string& model_dir) {
  const std::string config_path = model_dir + "/tokenizer_config.json";
  ASSIGN_OR_RETURN(std::optional<std::string> config_json, ReadOptionalFile(config_path));
  ASSIGN_OR_RETURN(std::optional<std::string> jinja, ReadOptionalFile(model_dir + "/chat_template.jinja"));
  auto config = ParseTokenizerConfig(config_json.value_or(""), std::move(jinja));
  if (!config.ok()) {
    return absl::Status(config.status().code(),
                        absl::StrCat(model_dir, ": ", config.status().message()));
  }
  return config;
}

}  // namespace remotelens
