// remotelens_run: loads a Hugging Face Llama directory, runs token ids through it with hooks, and
// writes float32 tensors to a safetensors file: "logits" and one tensor per requested hook,
// keyed by its TransformerLens name, with TransformerLens shapes (batch first).
//
//   remotelens_run --model_dir DIR --tokens "1,2,3;4,5,6" --names all --out out.safetensors
//
// Rows of different lengths are left-padded with id 0 and masked; "attention_mask" [batch, pos]
// is then written too. --hooks SPEC.json applies intervention ops (see ParseHookSpec below) with
// value tensors from --hook_tensors FILE.safetensors.
#include <ATen/ATen.h>

#include <cstdio>
#include <fstream>
#include <sstream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engine/hook_names.h"
#include "engine/hook_plan.h"
#include "engine/model_dir.h"
#include "engine/safetensors.h"
#include "engine/status_macros.h"
#include <nlohmann/json.hpp>

ABSL_FLAG(std::string, model_dir, "", "Hugging Face model directory (config.json, safetensors)");
ABSL_FLAG(std::string, tokens, "", "token ids: rows separated by ';', ids by ','");
ABSL_FLAG(std::string, names, "all", "hook names to write, comma-separated, or 'all'");
ABSL_FLAG(std::string, out, "", "output .safetensors path");
ABSL_FLAG(std::string, dtype, "float32", "compute dtype: float32, bfloat16 or float16");
ABSL_FLAG(std::string, device, "cpu", "device(s), comma-separated: cpu, cuda:0, ...");
ABSL_FLAG(std::string, hooks, "", "JSON file of intervention ops: {\"ops\": [...]}");
ABSL_FLAG(std::string, hook_tensors, "", "safetensors file with the ops' value tensors");
ABSL_FLAG(int64_t, stop_at_layer, -1000000, "stop before this block and write the residual "
                                            "stream as \"logits\" (TransformerLens semantics)");

namespace remotelens {
namespace {

struct Batch {
  at::Tensor tokens;          // [batch, pos] int64
  at::Tensor attention_mask;  // [batch, pos]; undefined when every row has the same length
};

absl::StatusOr<Batch> ParseTokens(const std::string& text) {
  std::vector<std::vector<int64_t>> rows;
  for (absl::string_view row : absl::StrSplit(text, ';', absl::SkipWhitespace())) {
    std::vector<int64_t> ids;
    for (absl::string_view field : absl::StrSplit(row, ',', absl::SkipWhitespace())) {
      int64_t id;
      if (!absl::SimpleAtoi(field, &id)) {
        return absl::InvalidArgumentError(absl::StrCat("--tokens: \"", field, "\" is not an integer token id"));
      }
      ids.push_back(id);
    }
    if (ids.empty()) return absl::InvalidArgumentError("--tokens: empty row");
    rows.push_back(std::move(ids));
  }
  if (rows.empty()) return absl::InvalidArgumentError("--tokens is empty; example: \"1,2,3;4,5,6\"");
  size_t pos = 0;
  for (const auto& r : rows) pos = std::max(pos, r.size());
  Batch batch;
  batch.tokens = at::zeros({static_cast<int64_t>(rows.size()), static_cast<int64_t>(pos)}, at::kLong);
  at::Tensor mask = at::zeros_like(batch.tokens);
  bool ragged = false;
  for (size_t b = 0; b < rows.size(); ++b) {
    const size_t pad = pos - rows[b].size();
    ragged |= pad > 0;
    for (size_t i = 0; i < rows[b].size(); ++i) {
      batch.tokens[b][pad + i] = rows[b][i];
      mask[b][pad + i] = 1;
    }
  }
  if (ragged) batch.attention_mask = mask;
  return batch;
}

absl::StatusOr<std::vector<int64_t>> IntList(const nlohmann::json& op, const char* key) {
  std::vector<int64_t> out;
  if (!op.contains(key)) return out;
  if (!op[key].is_array()) return absl::InvalidArgumentError(absl::StrCat("op field \"", key, "\" must be a list of integers"));
  for (const auto& v : op[key]) {
    if (!v.is_number_integer()) return absl::InvalidArgumentError(absl::StrCat("op field \"", key, "\" must be a list of integers"));
    out.push_back(v.get<int64_t>());
  }
  return out;
}

// {"ops": [{"hook": NAME, "op": "zero"|"set"|"add"|"scale"|"mean", "positions": [..],
//           "heads": [..], "tensor": NAME_IN_HOOK_TENSORS, "factor": X}, ...]}
absl::Status ParseHookSpec(const std::string& path, const std::string& tensors_path,
                           int64_t n_layers, HookPlan& plan) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open --hooks file ", path));
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::json spec = nlohmann::json::parse(text.str(), nullptr, false);
  if (spec.is_discarded() || !spec.is_object() || !spec.contains("ops") || !spec["ops"].is_array()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": expected {\"ops\": [...]}"));
  }
  std::unique_ptr<SafetensorsFile> tensors;
  for (const auto& op : spec["ops"]) {
    if (!op.is_object() || !op.contains("hook") || !op["hook"].is_string() || !op.contains("op") ||
        !op["op"].is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": every op needs \"hook\" and \"op\" strings"));
    }
    InterventionOp iop;
    ASSIGN_OR_RETURN(iop.hook, ParseHookName(op["hook"].get<std::string>(), n_layers));
    ASSIGN_OR_RETURN(iop.selector.positions, IntList(op, "positions"));
    ASSIGN_OR_RETURN(iop.selector.heads, IntList(op, "heads"));
    const std::string kind = op["op"];
    if (kind == "zero") iop.kind = OpKind::kZero;
    else if (kind == "set") iop.kind = OpKind::kSet;
    else if (kind == "add") iop.kind = OpKind::kAdd;
    else if (kind == "scale") iop.kind = OpKind::kScale;
    else if (kind == "mean") iop.kind = OpKind::kMean;
    else {
      return absl::InvalidArgumentError(absl::StrCat("unknown op \"", kind,
                                                     "\"; valid: zero, set, add, scale, mean"));
    }
    if (iop.kind == OpKind::kScale) {
      if (!op.contains("factor") || !op["factor"].is_number()) {
        return absl::InvalidArgumentError("scale op needs a numeric \"factor\"");
      }
      iop.factor = op["factor"].get<double>();
    }
    if (iop.kind == OpKind::kSet || iop.kind == OpKind::kAdd) {
      if (!op.contains("tensor") || !op["tensor"].is_string()) {
        return absl::InvalidArgumentError(absl::StrCat(kind, " op needs \"tensor\", a name in --hook_tensors"));
      }
      if (!tensors) {
        if (tensors_path.empty()) return absl::InvalidArgumentError(absl::StrCat(kind, " op needs --hook_tensors"));
        ASSIGN_OR_RETURN(tensors, SafetensorsFile::Open(tensors_path));
      }
      ASSIGN_OR_RETURN(iop.value, tensors->Tensor(op["tensor"].get<std::string>()));
    }
    RETURN_IF_ERROR(plan.AddIntervention(std::move(iop)));
  }
  return absl::OkStatus();
}

absl::Status Run() {
  const std::string model_dir = absl::GetFlag(FLAGS_model_dir);
  const std::string out_path = absl::GetFlag(FLAGS_out);
  if (model_dir.empty() || out_path.empty() || absl::GetFlag(FLAGS_tokens).empty()) {
    return absl::InvalidArgumentError("--model_dir, --tokens and --out are required; see --help");
  }
  LoadOptions options;
  ASSIGN_OR_RETURN(options.dtype, ParseDtype(absl::GetFlag(FLAGS_dtype)));
  ASSIGN_OR_RETURN(options.devices, ParseDevices(absl::GetFlag(FLAGS_device)));
  ASSIGN_OR_RETURN(Batch batch, ParseTokens(absl::GetFlag(FLAGS_tokens)));
  ASSIGN_OR_RETURN(std::unique_ptr<LlamaModel> model, LoadModelDir(model_dir, options));
  const int64_t n_layers = model->config().n_layers;

  HookPlan plan(n_layers);
  if (!absl::GetFlag(FLAGS_hooks).empty()) {
    RETURN_IF_ERROR(ParseHookSpec(absl::GetFlag(FLAGS_hooks), absl::GetFlag(FLAGS_hook_tensors),
                                  n_layers, plan));
  }
  const std::string names = absl::GetFlag(FLAGS_names);
  if (names == "all") {
    for (HookId id : AllHookIds(n_layers)) plan.AddCache({id, std::nullopt, std::nullopt, at::kFloat});
  } else {
    for (absl::string_view name : absl::StrSplit(names, ',', absl::SkipWhitespace())) {
      ASSIGN_OR_RETURN(HookId id, ParseHookName(name, n_layers));
      plan.AddCache({id, std::nullopt, std::nullopt, at::kFloat});
    }
  }

  ForwardInput input;
  input.tokens = batch.tokens;
  input.attention_mask = batch.attention_mask;
  if (absl::GetFlag(FLAGS_stop_at_layer) != -1000000) input.stop_at_layer = absl::GetFlag(FLAGS_stop_at_layer);
  ASSIGN_OR_RETURN(at::Tensor logits, model->Forward(input, &plan));

  std::vector<std::pair<std::string, at::Tensor>> outputs;
  outputs.emplace_back("logits", logits.to(at::kCPU, at::kFloat));
  if (batch.attention_mask.defined()) outputs.emplace_back("attention_mask", batch.attention_mask.to(at::kFloat));
  for (auto& [id, tensor] : plan.TakeCache()) outputs.emplace_back(HookName(id), std::move(tensor));
  return WriteSafetensors(out_path, outputs);
}

}  // namespace
}  // namespace remotelens

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "remotelens_run --model_dir DIR --tokens \"1,2,3;4,5,6\" --names all|NAME,... --out FILE");
  absl::ParseCommandLine(argc, argv);
  absl::Status status = remotelens::Run();
  if (!status.ok()) {
    std::fprintf(stderr, "remotelens_run: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
