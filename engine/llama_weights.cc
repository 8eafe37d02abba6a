#include "engine/llama_weights.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <map>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/host_memory.h"
#include "engine/safetensors.h"
#include "engine/status_macros.h"

#ifdef REMOTELENS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

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

// Free bytes on a device as its runtime reports them; nullopt where it cannot tell (a build
// without CUDA headers never has CUDA devices, so that is only a device the check skips).
std::optional<std::pair<int64_t, std::string>> DeviceFreeBytes(const at::Device& device,
                                                                const LoadOptions& options) {
  if (device.is_cpu()) {
    auto host = AvailableHostMemory();
    if (!host.ok()) return std::nullopt;
    if (options.host_memory_limit_bytes > 0 && options.host_memory_limit_bytes < host->bytes) {
      return std::make_pair(options.host_memory_limit_bytes,
                            std::string("the configured host memory limit"));
    }
    return std::make_pair(host->bytes, host->limited_by);
  }
#ifdef REMOTELENS_WITH_CUDA
  if (device.is_cuda()) {
    c10::cuda::CUDAGuard guard(device);
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) {
      cudaGetLastError();  // clear the sticky error so later calls are not blamed for it
      return std::nullopt;
    }
    return std::make_pair(static_cast<int64_t>(free_bytes), std::string("cudaMemGetInfo"));
  }
#endif
  return std::nullopt;
}

std::string DtypeName(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    default: return c10::toString(dtype);
  }
}

}  // namespace

absl::StatusOr<std::vector<DeviceMemoryNeed>> PlanLoadMemory(const LlamaConfig& config,
                                                             const LoadOptions& options) {
  const std::vector<at::Device> devices =
      options.devices.empty() ? std::vector<at::Device>{at::Device(at::kCPU)} : options.devices;
  std::vector<DeviceMemoryNeed> plan;
  auto entry = [&](const at::Device& device) -> DeviceMemoryNeed& {
    for (DeviceMemoryNeed& need : plan) {
      if (need.device == device.str()) return need;
    }
    plan.emplace_back();
    plan.back().device = device.str();
    plan.back().reserve_bytes = options.reserve_bytes;
    if (auto free = DeviceFreeBytes(device, options)) {
      plan.back().available_bytes = free->first;
      plan.back().available_source = free->second;
    }
    return plan.back();
  };
  const int64_t element = static_cast<int64_t>(c10::elementSize(options.dtype));
  auto numel = [](const std::vector<int64_t>& shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  };
  for (const auto& [name, shape] : ExpectedCheckpointTensors(config)) {
    at::Device device = devices.front();
    if (absl::StartsWith(name, "model.layers.")) {
      const int64_t layer = std::stoll(name.substr(13, name.find('.', 13) - 13));
      device = LayerDevice(options, layer, config.n_layers);
    } else if (name == "model.norm.weight" || name == "lm_head.weight") {
      device = devices.back();
    }
    entry(device).weight_bytes += numel(shape) * element;
  }
  if (config.tie_word_embeddings && devices.back() != devices.front()) {
    entry(devices.back()).weight_bytes += config.d_vocab * config.d_model * element;
  }
  std::set<std::string> rotary_devices;
  for (int64_t layer = 0; layer < config.n_layers; ++layer) {
    const at::Device device = LayerDevice(options, layer, config.n_layers);
    if (rotary_devices.insert(device.str()).second) {
      entry(device).rotary_bytes = 2 * config.n_ctx * config.d_head * int64_t{4};
    }
  }
  return plan;
}

namespace {

absl::Status CheckPlanFits(const std::string& model_dir, at::ScalarType dtype,
                           const std::vector<DeviceMemoryNeed>& plan) {
  for (const DeviceMemoryNeed& need : plan) {
    if (!need.available_bytes || need.needed() <= *need.available_bytes) continue;
    std::string message = absl::StrCat(
        "loading ", model_dir, " as ", DtypeName(dtype), " needs ",
        HumanBytes(need.needed()), " on ", need.device, " (weights ", HumanBytes(need.weight_bytes),
        " + rotary tables ", HumanBytes(need.rotary_bytes), " + reserved working memory ",
        HumanBytes(need.reserve_bytes), "), but only ", HumanBytes(*need.available_bytes),
        " is available there (", need.available_source, ")");
    // What would fit instead: a narrower dtype on the same devices, or more devices like this one.
    std::vector<std::string> alternatives;
    for (at::ScalarType other : {at::kBFloat16, at::kHalf}) {
      if (c10::elementSize(other) >= c10::elementSize(dtype)) continue;
      const int64_t weights = need.weight_bytes * static_cast<int64_t>(c10::elementSize(other)) /
                              static_cast<int64_t>(c10::elementSize(dtype));
      const int64_t total = weights + need.rotary_bytes + need.reserve_bytes;
      if (total <= *need.available_bytes) {
        alternatives.push_back(absl::StrCat(DtypeName(other), " would need ", HumanBytes(total),
                                            " and fit (--dtype ", DtypeName(other), ")"));
        break;
      }
    }
    const int64_t room = *need.available_bytes - need.rotary_bytes - need.reserve_bytes;
    if (need.device != "cpu" && room > 0) {
      const int64_t devices = (need.weight_bytes + room - 1) / room;
      alternatives.push_back(absl::StrCat("split across ", devices, " devices with ",
                                          HumanBytes(*need.available_bytes),
                                          " free each it would fit (--device cuda:0,...)"));
    }
    if (alternatives.empty()) {
      alternatives.push_back("free memory, lower load.reserve_bytes, or use a larger machine");
    }
    absl::StrAppend(&message, "; ", absl::StrJoin(alternatives, "; "));
    return absl::ResourceExhaustedError(message);
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckLoadFits(const std::string& model_dir, const LlamaConfig& config,
                           const LoadOptions& options) {
  ASSIGN_OR_RETURN(std::vector<DeviceMemoryNeed> plan, PlanLoadMemory(config, options));
  return CheckPlanFits(model_dir, options.dtype, plan);
}

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

  ASSIGN_OR_RETURN(const std::vector<DeviceMemoryNeed> memory_plan, PlanLoadMemory(config, options));
  RETURN_IF_ERROR(CheckPlanFits(model_dir, options.dtype, memory_plan));

  // Allocate every weight in its final layout, then read all of them in one parallel pass.
  std::vector<ReadPiece> pieces;
  auto allocate = [&](at::IntArrayRef shape, at::Device device) {
    return device.is_cpu() ? EmptyHostTensor(shape, dtype)
                           : at::empty(shape, at::TensorOptions().dtype(dtype).device(device));
  };
  // `names` are stacked along dim 0 into one tensor (fused projections), in order.
  auto plan = [&](std::initializer_list<std::string> names,
                  at::Device device) -> absl::StatusOr<at::Tensor> {
    std::vector<CheckpointTensors::Location> parts;
    int64_t rows = 0;
    for (const std::string& name : names) {
      ASSIGN_OR_RETURN(CheckpointTensors::Location where, checkpoint->Locate(name));
      rows += where.shape.empty() ? 1 : where.shape[0];
      parts.push_back(std::move(where));
    }
    std::vector<int64_t> shape = parts.front().shape;
    if (!shape.empty()) shape[0] = rows;
    // Used in place when the file already holds exactly these bytes: the load dtype, and the
    // parts back to back in one shard.
    bool in_place = options.map_cpu_weights && device.is_cpu();
    for (size_t i = 0; in_place && i < parts.size(); ++i) {
      in_place = parts[i].dtype == dtype && *parts[i].path == *parts.front().path &&
                 (i == 0 || parts[i].offset == parts[i - 1].offset + parts[i - 1].nbytes);
    }
    at::Tensor destination;
    if (in_place) {
      // Misaligned bytes (files from other writers) are copied instead.
      absl::StatusOr<at::Tensor> view =
          checkpoint->ViewBytes(*parts.front().path, parts.front().offset, shape, dtype);
      if (view.ok()) destination = *std::move(view);
      in_place = view.ok();
    }
    if (!in_place) destination = allocate(shape, device);
    int64_t offset = 0;
    for (size_t i = 0; i < parts.size(); ++i) {
      ReadPiece piece;
      piece.name = *(names.begin() + i);
      piece.path = *parts[i].path;
      piece.file_offset = parts[i].offset;
      piece.source_dtype = parts[i].dtype;
      piece.numel = static_cast<int64_t>(parts[i].nbytes / c10::elementSize(parts[i].dtype));
      piece.destination = destination;
      piece.destination_offset = offset;
      piece.destination_maps_source = in_place;
      offset += piece.numel;
      pieces.push_back(std::move(piece));
    }
    return destination;
  };

  LlamaWeights weights;
  const at::Device first = options.devices.empty() ? at::Device(at::kCPU) : options.devices.front();
  const at::Device last = options.devices.empty() ? at::Device(at::kCPU) : options.devices.back();
  try {
    ASSIGN_OR_RETURN(weights.embed, plan({"model.embed_tokens.weight"}, first));
    for (int64_t layer = 0; layer < config.n_layers; ++layer) {
      const std::string p = LayerPrefix(layer);
      const at::Device device = LayerDevice(options, layer, config.n_layers);
      LayerWeights lw;
      ASSIGN_OR_RETURN(lw.ln1, plan({p + "input_layernorm.weight"}, device));
      ASSIGN_OR_RETURN(lw.w_qkv, plan({p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                                       p + "self_attn.v_proj.weight"},
                                      device));
      ASSIGN_OR_RETURN(lw.w_o, plan({p + "self_attn.o_proj.weight"}, device));
      ASSIGN_OR_RETURN(lw.ln2, plan({p + "post_attention_layernorm.weight"}, device));
      ASSIGN_OR_RETURN(lw.w_gate_up,
                       plan({p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"}, device));
      ASSIGN_OR_RETURN(lw.w_down, plan({p + "mlp.down_proj.weight"}, device));
      weights.layers.push_back(std::move(lw));
    }
    ASSIGN_OR_RETURN(weights.ln_final, plan({"model.norm.weight"}, last));
    if (!config.tie_word_embeddings) {
      ASSIGN_OR_RETURN(weights.unembed, plan({"lm_head.weight"}, last));
    }

    ReadOptions read;
    read.threads = options.load_threads;
    read.on_progress = options.on_progress;
    // Where the host cannot hold both the copied weights and the pages they are copied from,
    // drop what has been read from the page cache so the kernel does not evict what is still to
    // be read. (Weights used in place are those pages: they count once, in the plan.)
    int64_t copied_bytes = 0;
    for (const ReadPiece& piece : pieces) {
      const int64_t bytes = piece.numel * static_cast<int64_t>(c10::elementSize(piece.source_dtype));
      (piece.destination_maps_source ? weights.bytes_in_place : copied_bytes) += bytes;
    }
    for (const DeviceMemoryNeed& need : memory_plan) {
      if (need.device == "cpu" && need.available_bytes &&
          need.needed() + copied_bytes > *need.available_bytes) {
        read.drop_page_cache = true;
      }
    }
    RETURN_IF_ERROR(ReadPieces(pieces, read));
    pieces.clear();  // drops the readers' references to the destinations

    if (config.tie_word_embeddings) {
      weights.unembed = weights.embed.device() == last ? weights.embed : weights.embed.to(last);
    }
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    if (absl::StrContains(what, "out of memory") || absl::StrContains(what, "can't allocate")) {
      return absl::ResourceExhaustedError(
          absl::StrCat("out of memory while loading ", model_dir, ": ", what));
    }
    return absl::InternalError(absl::StrCat("loading ", model_dir, ": ", what));
  }
  return weights;
}

}  // namespace remotelens
