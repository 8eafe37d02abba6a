#include "engine/llama_weights.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <map>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/safetensors.h"
#include "engine/status_macros.h"

namespace remotelens {
namespace {

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

std::string LayerPrefix(int64_t layer) { return absl::StrCat("model.layers.", layer, "."); }

// Lists at most `limit` names, then how many more.
std::string NameList(const std::vector<std::string>& names, size_t limit = 8) {
  std::vector<std::string> shown(names.begin(), names.begin() + std::min(limit, names.size()));
  std::string text = absl::StrJoin(shown, ", ");
  if (names.size() > limit) absl::StrAppend(&text, " and ", names.size() - limit, " more");
  return text;
}

}  // namespace

at::Device LayerDevice(const LoadOptions& options, int64_t layer, int64_t n_layers) {
  if (options.devices.empty()) return at::Device(at::kCPU);
  size_t index = static_cast<size_t>(layer * static_cast<int64_t>(options.devices.size()) / n_layers);
  return options.devices[std::min(index, options.devices.size() - 1)];
}

std::vector<std::pair<std::string, std::vector<int64_t>>> ExpectedCheckpointTensors(
    const LlamaConfig& c) {
  const int64_t q = c.n_heads * c.d_head, kv = c.n_kv_heads * c.d_head;
  std::vector<std::pair<std::string, std::vector<int64_t>>> expected;
  expected.push_back({"model.embed_tokens.weight", {c.d_vocab, c.d_model}});
  for (int64_t layer = 0; layer < c.n_layers; ++layer) {
    const std::string p = LayerPrefix(layer);
    expected.push_back({p + "input_layernorm.weight", {c.d_model}});
    expected.push_back({p + "self_attn.q_proj.weight", {q, c.d_model}});
    expected.push_back({p + "self_attn.k_proj.weight", {kv, c.d_model}});
    expected.push_back({p + "self_attn.v_proj.weight", {kv, c.d_model}});
    expected.push_back({p + "self_attn.o_proj.weight", {c.d_model, q}});
    expected.push_back({p + "post_attention_layernorm.weight", {c.d_model}});
    expected.push_back({p + "mlp.gate_proj.weight", {c.d_mlp, c.d_model}});
    expected.push_back({p + "mlp.up_proj.weight", {c.d_mlp, c.d_model}});
    expected.push_back({p + "mlp.down_proj.weight", {c.d_model, c.d_mlp}});
  }
  expected.push_back({"model.norm.weight", {c.d_model}});
  if (!c.tie_word_embeddings) expected.push_back({"lm_head.weight", {c.d_vocab, c.d_model}});
  return expected;
}

absl::StatusOr<LlamaWeights> LoadLlamaWeights(const std::string& model_dir,
                                              const LlamaConfig& config,
                                              const LoadOptions& options) {
  const at::ScalarType dtype = options.dtype;
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf) {
    return absl::InvalidArgumentError(absl::StrCat("unsupported load dtype ", c10::toString(dtype),
                                                   "; supported: float32, bfloat16, float16"));
  }
  // Some LibTorch builds (1.13 on CPU, for one) cannot multiply float16 matrices; find out here
  // with a 1x1 product rather than failing every forward pass later.
  for (const at::Device& device : options.devices) {
    try {
      at::mm(at::ones({1, 1}, at::TensorOptions().dtype(dtype).device(device)),
             at::ones({1, 1}, at::TensorOptions().dtype(dtype).device(device)));
    } catch (const c10::Error&) {
      return absl::InvalidArgumentError(absl::StrCat(
          "dtype ", c10::toString(dtype), " is not supported on ", device.str(),
          " by this LibTorch (no matrix multiply); use bfloat16 or float32 there"));
    }
  }
  ASSIGN_OR_RETURN(std::unique_ptr<CheckpointTensors> checkpoint, CheckpointTensors::Open(model_dir));

  // Validate names and shapes of everything before reading a byte of data.
  const auto expected = ExpectedCheckpointTensors(config);
  std::set<std::string> present;
  for (const std::string& name : checkpoint->Names()) present.insert(name);
  std::vector<std::string> missing, misshaped, unexpected;
  std::set<std::string> expected_names;
  for (const auto& [name, shape] : expected) {
    expected_names.insert(name);
    if (!present.count(name)) {
      missing.push_back(name);
      continue;
    }
    ASSIGN_OR_RETURN(std::vector<int64_t> actual, checkpoint->Shape(name));
    if (actual != shape) {
      misshaped.push_back(absl::StrCat(name, " is ", ShapeString(actual), ", expected ",
                                       ShapeString(shape)));
    }
  }
  for (const std::string& name : present) {
    // Rotary inverse frequencies are derived from the config; old checkpoints carry them as
    // buffers, and a tied model may still ship lm_head: both are harmless to skip.
    if (expected_names.count(name) || absl::EndsWith(name, "rotary_emb.inv_freq") ||
        name == "lm_head.weight") {
      continue;
    }
    unexpected.push_back(name);
  }
  if (!missing.empty() || !misshaped.empty() || !unexpected.empty()) {
    std::vector<std::string> problems;
    if (!missing.empty()) problems.push_back("missing tensors: " + NameList(missing));
    if (!misshaped.empty()) problems.push_back("mis-shaped tensors: " + NameList(misshaped));
    if (!unexpected.empty()) problems.push_back("unexpected tensors: " + NameList(unexpected));
    return absl::InvalidArgumentError(absl::StrCat(
        model_dir, " does not hold a Llama checkpoint matching its config.json (",
        config.n_layers, " layers, d_model ", config.d_model, "): ",
        absl::StrJoin(problems, "; ")));
  }

  auto load = [&](const std::string& name, at::Device device) -> absl::StatusOr<at::Tensor> {
    ASSIGN_OR_RETURN(at::Tensor t, checkpoint->Tensor(name));
    // to() returns the mmapped view itself when nothing changes: the weights then stay
    // zero-copy, backed by the page cache.
    return t.to(device, dtype).contiguous();
  };
  auto load_cat = [&](std::initializer_list<std::string> names,
                      at::Device device) -> absl::StatusOr<at::Tensor> {
    std::vector<at::Tensor> parts;
    for (const std::string& name : names) {
      ASSIGN_OR_RETURN(at::Tensor t, checkpoint->Tensor(name));
      parts.push_back(t.to(dtype));
    }
    return at::cat(parts, 0).to(device);
  };

  LlamaWeights weights;
  const at::Device first = options.devices.empty() ? at::Device(at::kCPU) : options.devices.front();
  const at::Device last = options.devices.empty() ? at::Device(at::kCPU) : options.devices.back();
  ASSIGN_OR_RETURN(weights.embed, load("model.embed_tokens.weight", first));
  for (int64_t layer = 0; layer < config.n_layers; ++layer) {
    const std::string p = LayerPrefix(layer);
    const at::Device device = LayerDevice(options, layer, config.n_layers);
    LayerWeights lw;
    ASSIGN_OR_RETURN(lw.ln1, load(p + "input_layernorm.weight", device));
    ASSIGN_OR_RETURN(lw.w_qkv, load_cat({p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                                         p + "self_attn.v_proj.weight"},
                                        device));
    ASSIGN_OR_RETURN(lw.w_o, load(p + "self_attn.o_proj.weight", device));
    ASSIGN_OR_RETURN(lw.ln2, load(p + "post_attention_layernorm.weight", device));
    ASSIGN_OR_RETURN(lw.w_gate_up, load_cat({p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"}, device));
    ASSIGN_OR_RETURN(lw.w_down, load(p + "mlp.down_proj.weight", device));
    weights.layers.push_back(std::move(lw));
  }
  ASSIGN_OR_RETURN(weights.ln_final, load("model.norm.weight", last));
  if (config.tie_word_embeddings) {
    weights.unembed = weights.embed.device() == last ? weights.embed : weights.embed.to(last);
  } else {
    ASSIGN_OR_RETURN(weights.unembed, load("lm_head.weight", last));
  }
  return weights;
}

}  // namespace remotelens
