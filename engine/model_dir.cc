#include "engine/model_dir.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engine/status_macros.h"

namespace remotelens {

absl::StatusOr<std::unique_ptr<LlamaModel>> LoadModelDir(const std::string& model_dir,
                                                         const LoadOptions& options) {
  ASSIGN_OR_RETURN(LlamaConfig config, ReadLlamaConfig(model_dir));
  ASSIGN_OR_RETURN(LlamaWeights weights, LoadLlamaWeights(model_dir, config, options));
  return LlamaModel::Create(std::move(config), std::move(weights), options);
}

absl::StatusOr<at::ScalarType> ParseDtype(const std::string& name) {
  if (name == "float32" || name == "fp32") return at::kFloat;
  if (name == "bfloat16" || name == "bf16") return at::kBFloat16;
  if (name == "float16" || name == "fp16") return at::kHalf;
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported dtype \"", name, "\"; supported: float32, bfloat16, float16"));
}

absl::StatusOr<std::vector<at::Device>> ParseDevices(const std::string& list) {
  std::vector<at::Device> devices;
  for (absl::string_view part : absl::StrSplit(list, ',', absl::SkipWhitespace())) {
    std::string name(part);
    try {
      at::Device device(name);
      if (device.is_cuda()) {
        const int count = at::detail::getCUDAHooks().getNumGPUs();
        if (device.index() >= count || count == 0) {
          return absl::InvalidArgumentError(absl::StrCat(
              "device \"", name, "\" is not available: this machine has ", count, " CUDA devices"));
        }
      } else if (!device.is_cpu()) {
        return absl::InvalidArgumentError(
            absl::StrCat("device \"", name, "\" is not supported; use cpu or cuda:N"));
      }
      devices.push_back(device);
    } catch (const c10::Error&) {
      return absl::InvalidArgumentError(
          absl::StrCat("cannot parse device \"", name, "\"; use cpu or cuda:N"));
    }
  }
  if (devices.empty()) return absl::InvalidArgumentError("no device given; use cpu or cuda:N");
  return devices;
}

}  // namespace remotelens
