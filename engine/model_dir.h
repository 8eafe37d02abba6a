// Loading a Hugging Face model directory into a ready LlamaModel: config.json, the weights, and
// (optionally) tokenizer.json.
//
//   LoadOptions options;
//   options.dtype = at::kBFloat16;
//   ASSIGN_OR_RETURN(std::unique_ptr<LlamaModel> model, LoadModelDir("/models/llama", options));
#ifndef REMOTELENS_ENGINE_MODEL_DIR_H_
#define REMOTELENS_ENGINE_MODEL_DIR_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/llama_model.h"

namespace remotelens {

absl::StatusOr<std::unique_ptr<LlamaModel>> LoadModelDir(const std::string& model_dir,
                                                         const LoadOptions& options);

// Parses "float32" / "bfloat16" / "float16" (also "fp32", "bf16", "fp16").
absl::StatusOr<at::ScalarType> ParseDtype(const std::string& name);

// Parses a comma-separated device list such as "cpu" or "cuda:0,cuda:1". Devices that are not
// available on this machine are an error naming them.
absl::StatusOr<std::vector<at::Device>> ParseDevices(const std::string& list);

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_MODEL_DIR_H_
