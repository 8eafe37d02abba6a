#include "engine/demo_model.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include <nlohmann/json.hpp>
#include "engine/demo_tokenizer.h"
#include "engine/llama_weights.h"
#include "engine/safetensors.h"
#include "engine/status_macros.h"

namespace remotelens {
namespace {

absl::Status WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

}  // namespace

LlamaConfig DemoModelConfig(const DemoModelSpec& spec) {
  LlamaConfig c;
  c.model_name = "remotelens-demo";
  c.d_model = spec.d_model;
  c.d_mlp = spec.d_mlp;
  c.n_layers = spec.n_layers;
  c.n_heads = spec.n_heads;
  c.n_kv_heads = spec.n_kv_heads;
  c.d_head = spec.d_model / spec.n_heads;
  c.d_vocab = spec.vocab_size;
  c.n_ctx = spec.n_ctx;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 500000.0;
  c.rope_scaling.type = RopeScaling::Type::kLlama3;
  c.rope_scaling.factor = 8.0;
  c.rope_scaling.low_freq_factor = 1.0;
  c.rope_scaling.high_freq_factor = 4.0;
  c.rope_scaling.original_max_position_embeddings = spec.original_max_position_embeddings;
  c.tie_word_embeddings = spec.tie_word_embeddings;
  c.torch_dtype = spec.dtype;
  return c;
}

absl::Status WriteDemoModel(const std::string& dir, const DemoModelSpec& spec) {
  if (spec.d_model % spec.n_heads != 0 || spec.n_heads % spec.n_kv_heads != 0 ||
      (spec.d_model / spec.n_heads) % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "demo model needs n_heads | d_model, n_kv_heads | n_heads and an even d_head; got d_model ",
        spec.d_model, ", n_heads ", spec.n_heads, ", n_kv_heads ", spec.n_kv_heads));
  }
  at::ScalarType dtype;
  if (spec.dtype == "float32") dtype = at::kFloat;
  else if (spec.dtype == "bfloat16") dtype = at::kBFloat16;
  else if (spec.dtype == "float16") dtype = at::kHalf;
  else {
    return absl::InvalidArgumentError(absl::StrCat("demo model dtype \"", spec.dtype,
                                                   "\" is not supported; use float32, bfloat16 or float16"));
  }
  LlamaConfig config = DemoModelConfig(spec);
  ASSIGN_OR_RETURN(std::string tokenizer_json, MakeDemoTokenizerJson(spec.vocab_size));
  // Special token ids come from the tokenizer, as they do in a real checkpoint.
  const nlohmann::json tokenizer = nlohmann::json::parse(tokenizer_json);
  for (const auto& added : tokenizer.at("added_tokens")) {
    const std::string content = added.at("content");
    const int64_t id = added.at("id");
    if (content == "<|begin_of_text|>") config.bos_token_id = id;
    if (content == "<|end_of_text|>" || content == "<|eot_id|>") config.eos_token_ids.push_back(id);
  }

  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", ec.message()));

  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(spec.seed);
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& [name, shape] : ExpectedCheckpointTensors(config)) {
    at::Tensor t;
    if (shape.size() == 1) {
      // Norm weights near 1, so the random model is not degenerate.
      t = 1.0 + 0.1 * at::randn(shape, gen, at::kFloat);
    } else if (name == "model.embed_tokens.weight") {
      t = at::randn(shape, gen, at::kFloat);
    } else {
      // Variance-preserving projections keep activations of order one through the blocks.
      t = at::randn(shape, gen, at::kFloat) / std::sqrt(static_cast<double>(shape[1]));
    }
    tensors.emplace_back(name, t.to(dtype));
  }
  RETURN_IF_ERROR(WriteCheckpoint(dir, tensors, spec.num_shards));
  RETURN_IF_ERROR(WriteText(dir + "/config.json", LlamaConfigToJson(config)));
  RETURN_IF_ERROR(WriteText(dir + "/tokenizer.json", tokenizer_json));
  return absl::OkStatus();
}

}  // namespace remotelens
