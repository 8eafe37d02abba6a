// LlamaConfig: the architecture of a Llama-family checkpoint, read from its Hugging Face
// config.json. Any Llama-architecture model (Llama 3, 3.1, 3.2, 3.3) loads by its config; there is
// no list of known model names. Unsupported architectures or values are an InvalidArgument error
// that names the field, the value and what is supported.
//
//   ASSIGN_OR_RETURN(LlamaConfig config, ReadLlamaConfig("/models/Llama-3.1-8B"));
//   int64_t group = config.n_heads / config.n_kv_heads;  // query heads per key/value head
#ifndef REMOTELENS_ENGINE_LLAMA_CONFIG_H_
#define REMOTELENS_ENGINE_LLAMA_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace remotelens {

// Rotary frequency scaling. Llama 3.1+ uses "llama3": long wavelengths are divided by `factor`,
// short ones kept, and the band between interpolated smoothly.
struct RopeScaling {
  enum class Type { kNone, kLlama3 };
  Type type = Type::kNone;
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

// Field names follow TransformerLens (cfg.d_model, cfg.n_heads ...); comments give the
// Hugging Face config.json key each one is read from.
struct LlamaConfig {
  std::string model_name;           // "_name_or_path", else the directory's name
  int64_t d_model = 0;              // hidden_size
  int64_t d_mlp = 0;                // intermediate_size
  int64_t n_layers = 0;             // num_hidden_layers
  int64_t n_heads = 0;              // num_attention_heads
  int64_t n_kv_heads = 0;           // num_key_value_heads (default: n_heads)
  int64_t d_head = 0;               // head_dim (default: d_model / n_heads)
  int64_t d_vocab = 0;              // vocab_size
  int64_t n_ctx = 0;                // max_position_embeddings: longest sequence served
  double rms_norm_eps = 1e-5;       // rms_norm_eps
  double rope_theta = 10000.0;      // rope_theta
  RopeScaling rope_scaling;         // rope_scaling (null: none)
  bool tie_word_embeddings = false; // tie_word_embeddings: unembed reuses the embedding
  int64_t bos_token_id = -1;        // bos_token_id (-1: none)
  std::vector<int64_t> eos_token_ids;  // eos_token_id, an int or a list (Llama 3.1 has three)
  std::string torch_dtype;          // torch_dtype as stored ("bfloat16", ...); informative only
};

// Parses and validates config.json text. `default_name` is used when "_name_or_path" is absent.
absl::StatusOr<LlamaConfig> ParseLlamaConfig(absl::string_view json_text,
                                             absl::string_view default_name = "");

// Reads `model_dir`/config.json.
absl::StatusOr<LlamaConfig> ReadLlamaConfig(const std::string& model_dir);

// Serialises to Hugging Face config.json form (used to write generated checkpoints).
std::string LlamaConfigToJson(const LlamaConfig& config);

// Total parameters the checkpoint holds (embedding + blocks + final norm + unembed if untied).
int64_t ParameterCount(const LlamaConfig& config);

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_LLAMA_CONFIG_H_
