#include "engine/demo_model.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

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

absl::StatusOr<std::string> ReadText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading ", path));
  return text.str();
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
  std::string tokenizer_json;
  if (spec.tokenizer_dir.empty()) {
    ASSIGN_OR_RETURN(tokenizer_json, MakeDemoTokenizerJson(spec.vocab_size));
  } else {
    ASSIGN_OR_RETURN(tokenizer_json, ReadText(spec.tokenizer_dir + "/tokenizer.json"));
  }
  // Special token ids come from the tokenizer, as they do in a real checkpoint.
  const nlohmann::json tokenizer = nlohmann::json::parse(tokenizer_json, nullptr, false);
  if (tokenizer.is_discarded() || !tokenizer.contains("added_tokens") ||
      !tokenizer.contains("model") || !tokenizer["model"].contains("vocab")) {
    return absl::InvalidArgumentError(absl::StrCat(
        spec.tokenizer_dir, "/tokenizer.json is not a tokenizer.json with model.vocab and added_tokens"));
  }
  int64_t max_id = -1;
  for (const auto& [token, id] : tokenizer["model"]["vocab"].items()) max_id = std::max<int64_t>(max_id, id);
  for (const auto& added : tokenizer.at("added_tokens")) {
    const std::string content = added.at("content");
    const int64_t id = added.at("id");
    max_id = std::max(max_id, id);
    if (content == "<|begin_of_text|>") config.bos_token_id = id;
    if (content == "<|end_of_text|>" || content == "<|eot_id|>") config.eos_token_ids.push_back(id);
  }
  if (max_id >= spec.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat("vocab_size ", spec.vocab_size, " is too small for ",
                                                   spec.tokenizer_dir, "/tokenizer.json, whose ids go up to ",
                                                   max_id, "; the model needs a vocab_size of ", max_id + 1, " or more"));
  }

  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", ec.message()));

  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(spec.seed);
  const auto expected = ExpectedCheckpointTensors(config);
  std::vector<std::string> names;
  for (const auto& entry : expected) names.push_back(entry.first);
  constexpr int64_t kTileElements = int64_t{1} << 22;
  at::Tensor tile;  // [kTileElements] float32, drawn once when spec.tile_random
  auto make = [&](size_t i) -> absl::StatusOr<at::Tensor> {
    const auto& [name, shape] = expected[i];
    int64_t numel = 1;
    for (int64_t d : shape) numel *= d;
    if (shape.size() == 1) {
      // Norm weights near 1, so the random model is not degenerate.
      return (1.0 + 0.1 * at::randn(shape, gen, at::kFloat)).to(dtype);
    }
    // Variance-preserving projections keep activations of order one through the blocks.
    const double scale =
        name == "model.embed_tokens.weight" ? 1.0 : 1.0 / std::sqrt(static_cast<double>(shape[1]));
    if (spec.tile_random && numel > kTileElements) {
      if (!tile.defined()) tile = at::randn({kTileElements}, gen, at::kFloat);
      // Each tensor starts at its own place in the tile, so no two are equal.
      const at::Tensor block =
          (at::roll(tile, {static_cast<int64_t>(i) * 7919}, {0}) * scale).to(dtype);
      return block.repeat({(numel + kTileElements - 1) / kTileElements})
          .narrow(0, 0, numel)
          .reshape(shape);
    }
    if (name == "model.embed_tokens.weight") return at::randn(shape, gen, at::kFloat).to(dtype);
    return (at::randn(shape, gen, at::kFloat) / std::sqrt(static_cast<double>(shape[1]))).to(dtype);
  };
  RETURN_IF_ERROR(WriteCheckpointLazily(dir, names, make, spec.num_shards));
  RETURN_IF_ERROR(WriteText(dir + "/config.json", LlamaConfigToJson(config)));
  RETURN_IF_ERROR(WriteText(dir + "/tokenizer.json", tokenizer_json));
  for (const char* name : {"tokenizer_config.json", "chat_template.jinja"}) {
    const std::string from = spec.tokenizer_dir + "/" + name;
    if (spec.tokenizer_dir.empty() || !std::filesystem::exists(from)) continue;
    ASSIGN_OR_RETURN(std::string text, ReadText(from));
    RETURN_IF_ERROR(WriteText(dir + "/" + name, text));
  }
  return absl::OkStatus();
}

}  // namespace remotelens
