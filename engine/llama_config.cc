#include "engine/llama_config.h"

#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/status_macros.h"
#include <nlohmann/json.hpp>

namespace remotelens {
namespace {

using Json = nlohmann::json;

absl::Status Invalid(absl::string_view field, absl::string_view problem) {
  return absl::InvalidArgumentError(absl::StrCat("config.json: ", field, " ", problem));
}

// Reads a required positive integer field.
absl::StatusOr<int64_t> PositiveInt(const Json& json, const char* key) {
  auto it = json.find(key);
  if (it == json.end() || it->is_null()) return Invalid(key, "is missing (a positive integer)");
  if (!it->is_number_integer()) return Invalid(key, absl::StrCat("must be an integer, got ", it->dump()));
  int64_t value = it->get<int64_t>();
  if (value <= 0) return Invalid(key, absl::StrCat("must be positive, got ", value));
  return value;
}

absl::StatusOr<int64_t> OptionalPositiveInt(const Json& json, const char* key, int64_t fallback) {
  auto it = json.find(key);
  if (it == json.end() || it->is_null()) return fallback;
  return PositiveInt(json, key);
}

absl::StatusOr<double> PositiveNumber(const Json& json, const char* key, double fallback) {
  auto it = json.find(key);
  if (it == json.end() || it->is_null()) return fallback;
  if (!it->is_number()) return Invalid(key, absl::StrCat("must be a number, got ", it->dump()));
  double value = it->get<double>();
  if (!std::isfinite(value) || value <= 0) {
    return Invalid(key, absl::StrCat("must be a positive finite number, got ", it->dump()));
  }
  return value;
}

absl::StatusOr<bool> OptionalBool(const Json& json, const char* key, bool fallback) {
  auto it = json.find(key);
  if (it == json.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) return Invalid(key, absl::StrCat("must be true or false, got ", it->dump()));
  return it->get<bool>();
}

// A string field; json.value() would throw on a non-string value (found by fuzz/llama_config_fuzz).
absl::StatusOr<std::string> OptionalString(const Json& json, const char* key, std::string fallback) {
  auto it = json.find(key);
  if (it == json.end() || it->is_null()) return fallback;
  if (!it->is_string()) return Invalid(key, absl::StrCat("must be a string, got ", it->dump()));
  return it->get<std::string>();
}

absl::StatusOr<RopeScaling> ParseRopeScaling(const Json& json) {
  RopeScaling scaling;
  auto it = json.find("rope_scaling");
  if (it == json.end() || it->is_null()) return scaling;
  if (!it->is_object()) return Invalid("rope_scaling", "must be an object or null");
  const Json& rs = *it;
  // Older configs say "type", newer "rope_type".
  std::string type;
  if (rs.contains("rope_type") && rs["rope_type"].is_string()) type = rs["rope_type"];
  else if (rs.contains("type") && rs["type"].is_string()) type = rs["type"];
  if (type == "default") return scaling;
  if (type != "llama3") {
    return Invalid("rope_scaling.rope_type",
                   absl::StrCat("\"", type, "\" is not supported; supported: \"llama3\" or null"));
  }
  scaling.type = RopeScaling::Type::kLlama3;
  ASSIGN_OR_RETURN(scaling.factor, PositiveNumber(rs, "factor", 8.0));
  ASSIGN_OR_RETURN(scaling.low_freq_factor, PositiveNumber(rs, "low_freq_factor", 1.0));
  ASSIGN_OR_RETURN(scaling.high_freq_factor, PositiveNumber(rs, "high_freq_factor", 4.0));
  ASSIGN_OR_RETURN(scaling.original_max_position_embeddings,
                   OptionalPositiveInt(rs, "original_max_position_embeddings", 8192));
  if (scaling.high_freq_factor <= scaling.low_freq_factor) {
    return Invalid("rope_scaling", absl::StrCat("needs high_freq_factor > low_freq_factor, got ",
                                                scaling.high_freq_factor, " <= ",
                                                scaling.low_freq_factor));
  }
  return scaling;
}

absl::StatusOr<std::vector<int64_t>> ParseTokenIds(const Json& json, const char* key) {
  std::vector<int64_t> ids;
  auto it = json.find(key);
  if (it == json.end() || it->is_null()) return ids;
  auto add = [&](const Json& v) -> absl::Status {
    if (!v.is_number_integer() || v.get<int64_t>() < 0) {
      return Invalid(key, absl::StrCat("must be a non-negative integer or a list of them, got ",
                                       it->dump()));
    }
    ids.push_back(v.get<int64_t>());
    return absl::OkStatus();
  };
  if (it->is_array()) {
    for (const Json& v : *it) RETURN_IF_ERROR(add(v));
  } else {
    RETURN_IF_ERROR(add(*it));
  }
  return ids;
}

// Features some Llama-like checkpoints carry that this engine does not implement. Loading such a
// model would silently compute something else, so each is refused by name.
absl::Status RejectUnsupported(const Json& json) {
  if (json.contains("model_type") && json["model_type"] != "llama") {
    return Invalid("model_type", absl::StrCat(json["model_type"].dump(),
                                              " is not supported; remotelens serves \"llama\""));
  }
  if (json.contains("architectures") && json["architectures"].is_array()) {
    for (const Json& a : json["architectures"]) {
      if (a != "LlamaForCausalLM") {
        return Invalid("architectures", absl::StrCat(a.dump(), " is not supported; supported: ",
                                                     "\"LlamaForCausalLM\""));
      }
    }
  }
  if (json.contains("hidden_act") && json["hidden_act"] != "silu") {
    return Invalid("hidden_act", absl::StrCat(json["hidden_act"].dump(),
                                              " is not supported; supported: \"silu\""));
  }
  for (const char* key : {"attention_bias", "mlp_bias"}) {
    if (json.contains(key) && json[key].is_boolean() && json[key].get<bool>()) {
      return Invalid(key, "true is not supported; Llama 3 projections have no bias");
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<LlamaConfig> ParseLlamaConfig(absl::string_view json_text,
                                             absl::string_view default_name) {
  Json json = Json::parse(json_text.begin(), json_text.end(), nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded() || !json.is_object()) {
    return absl::InvalidArgumentError("config.json is not a JSON object");
  }
  RETURN_IF_ERROR(RejectUnsupported(json));
  LlamaConfig c;
  ASSIGN_OR_RETURN(c.model_name, OptionalString(json, "_name_or_path", std::string(default_name)));
  if (c.model_name.empty()) c.model_name = std::string(default_name);
  ASSIGN_OR_RETURN(c.d_model, PositiveInt(json, "hidden_size"));
  ASSIGN_OR_RETURN(c.d_mlp, PositiveInt(json, "intermediate_size"));
  ASSIGN_OR_RETURN(c.n_layers, PositiveInt(json, "num_hidden_layers"));
  ASSIGN_OR_RETURN(c.n_heads, PositiveInt(json, "num_attention_heads"));
  ASSIGN_OR_RETURN(c.n_kv_heads, OptionalPositiveInt(json, "num_key_value_heads", c.n_heads));
  if (c.n_heads % c.n_kv_heads != 0) {
    return Invalid("num_key_value_heads",
                   absl::StrCat(c.n_kv_heads, " must divide num_attention_heads ", c.n_heads));
  }
  if (!json.contains("head_dim") && c.d_model % c.n_heads != 0) {
    return Invalid("hidden_size", absl::StrCat(c.d_model, " is not divisible by num_attention_heads ",
                                               c.n_heads, " and head_dim is not given"));
  }
  ASSIGN_OR_RETURN(c.d_head, OptionalPositiveInt(json, "head_dim", c.d_model / c.n_heads));
  if (c.d_head % 2 != 0) return Invalid("head_dim", absl::StrCat(c.d_head, " must be even for rotary"));
  ASSIGN_OR_RETURN(c.d_vocab, PositiveInt(json, "vocab_size"));
  ASSIGN_OR_RETURN(c.n_ctx, PositiveInt(json, "max_position_embeddings"));
  ASSIGN_OR_RETURN(c.rms_norm_eps, PositiveNumber(json, "rms_norm_eps", 1e-5));
  ASSIGN_OR_RETURN(c.rope_theta, PositiveNumber(json, "rope_theta", 10000.0));
  ASSIGN_OR_RETURN(c.rope_scaling, ParseRopeScaling(json));
  ASSIGN_OR_RETURN(c.tie_word_embeddings, OptionalBool(json, "tie_word_embeddings", false));
  ASSIGN_OR_RETURN(std::vector<int64_t> bos, ParseTokenIds(json, "bos_token_id"));
  if (bos.size() > 1) return Invalid("bos_token_id", "must be a single id");
  c.bos_token_id = bos.empty() ? -1 : bos[0];
  ASSIGN_OR_RETURN(c.eos_token_ids, ParseTokenIds(json, "eos_token_id"));
  for (int64_t id : c.eos_token_ids) {
    if (id >= c.d_vocab) return Invalid("eos_token_id", absl::StrCat(id, " is >= vocab_size ", c.d_vocab));
  }
  if (c.bos_token_id >= c.d_vocab) {
    return Invalid("bos_token_id", absl::StrCat(c.bos_token_id, " is >= vocab_size ", c.d_vocab));
  }
  ASSIGN_OR_RETURN(c.torch_dtype, OptionalString(json, "torch_dtype", "float32"));
  return c;
}

absl::StatusOr<LlamaConfig> ReadLlamaConfig(const std::string& model_dir) {
  std::string path = model_dir + "/config.json";
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream text;
  text << in.rdbuf();
  std::string name = model_dir;
  while (!name.empty() && name.back() == '/') name.pop_back();
  name = name.substr(name.find_last_of('/') + 1);
  auto config = ParseLlamaConfig(text.str(), name);
  if (!config.ok()) {
    return absl::Status(config.status().code(),
                        absl::StrCat(model_dir, ": ", config.status().message()));
  }
  return config;
}

std::string LlamaConfigToJson(const LlamaConfig& c) {
  Json json = {
      {"architectures", {"LlamaForCausalLM"}},
      {"model_type", "llama"},
      {"_name_or_path", c.model_name},
      {"hidden_size", c.d_model},
      {"intermediate_size", c.d_mlp},
      {"num_hidden_layers", c.n_layers},
      {"num_attention_heads", c.n_heads},
      {"num_key_value_heads", c.n_kv_heads},
      {"head_dim", c.d_head},
      {"vocab_size", c.d_vocab},
      {"max_position_embeddings", c.n_ctx},
      {"rms_norm_eps", c.rms_norm_eps},
      {"rope_theta", c.rope_theta},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"hidden_act", "silu"},
      {"attention_bias", false},
      {"mlp_bias", false},
      {"torch_dtype", c.torch_dtype.empty() ? "float32" : c.torch_dtype},
  };
  if (c.rope_scaling.type == RopeScaling::Type::kLlama3) {
    json["rope_scaling"] = {
        {"rope_type", "llama3"},
        {"factor", c.rope_scaling.factor},
        {"low_freq_factor", c.rope_scaling.low_freq_factor},
        {"high_freq_factor", c.rope_scaling.high_freq_factor},
        {"original_max_position_embeddings", c.rope_scaling.original_max_position_embeddings},
    };
  } else {
    json["rope_scaling"] = nullptr;
  }
  if (c.bos_token_id >= 0) json["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_ids.size() == 1) json["eos_token_id"] = c.eos_token_ids[0];
  else if (!c.eos_token_ids.empty()) json["eos_token_id"] = c.eos_token_ids;
  return json.dump(2) + "\n";
}

int64_t ParameterCount(const LlamaConfig& c) {
  int64_t q = c.n_heads * c.d_head, kv = c.n_kv_heads * c.d_head;
  int64_t per_layer = 2 * c.d_model                 // two RMSNorm weights
                      + c.d_model * (q + 2 * kv)    // W_Q, W_K, W_V
                      + q * c.d_model               // W_O
                      + 3 * c.d_model * c.d_mlp;    // gate, up, down
  int64_t embed = c.d_vocab * c.d_model;
  return embed * (c.tie_word_embeddings ? 1 : 2) + c.n_layers * per_layer + c.d_model;
}

}  // namespace remotelens
