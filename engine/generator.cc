#include "engine/generator.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace remotelens {

absl::StatusOr<at::Tensor> Generate(const LlamaModel& model, const at::Tensor& tokens,
                                    const at::Tensor& attention_mask,
                                    const GenerateOptions& options, HookPlan* plan,
                                    const TokenCallback& on_token) {
  if (options.max_new_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_new_tokens must be >= 1, got ", options.max_new_tokens));
  }
  RETURN_IF_ERROR(ValidateSamplingOptions(options.sampling));
  if (!tokens.defined() || tokens.dim() != 2) {
    return absl::InvalidArgumentError("generate needs a [batch, pos] prompt");
  }
  const LlamaConfig& config = model.config();
  if (tokens.size(1) + options.max_new_tokens > config.n_ctx) {
    return absl::OutOfRangeError(absl::StrCat(
        "prompt of ", tokens.size(1), " positions plus max_new_tokens ", options.max_new_tokens,
        " exceeds the model's maximum of ", config.n_ctx, " positions"));
  }
  const std::vector<int64_t>& eos_ids =
      options.eos_token_ids.empty() ? config.eos_token_ids : options.eos_token_ids;
  for (int64_t id : eos_ids) {
    if (id < 0 || id >= config.d_vocab) {
      return absl::InvalidArgumentError(absl::StrCat("eos token id ", id, " is outside the vocabulary 0..",
                                                     config.d_vocab - 1));
    }
  }
  if (options.stop_at_eos && eos_ids.empty()) {
    return absl::InvalidArgumentError("stop_at_eos is set but the model defines no eos token id; "
                                      "pass eos_token_id or stop_at_eos=false");
  }
  const int64_t batch = tokens.size(0);
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(options.seed);
  at::Tensor sequence = tokens.to(at::kCPU, at::kLong);
  at::Tensor mask = attention_mask.defined() ? attention_mask.to(at::kCPU, at::kLong)
                                             : at::ones_like(sequence);
  at::Tensor finished = at::zeros({batch}, at::kBool);
  const at::Tensor eos_tensor = at::tensor(eos_ids.empty() ? std::vector<int64_t>{-1} : eos_ids, at::kLong);
  const int64_t first_eos = eos_ids.empty() ? 0 : eos_ids[0];

  KvCache kv;
  ForwardInput input;
  input.tokens = sequence;
  input.attention_mask = mask;
  for (int64_t step = 0; step < options.max_new_tokens; ++step) {
    ASSIGN_OR_RETURN(at::Tensor logits,
                     model.Forward(input, plan, options.use_past_kv_cache ? &kv : nullptr));
    const at::Tensor last = logits.select(1, logits.size(1) - 1);  // [batch, d_vocab]
    ASSIGN_OR_RETURN(at::Tensor next, SampleNextTokens(last, options.sampling, generator));
    next = next.to(at::kCPU, at::kLong);
    if (options.stop_at_eos) {
      next = at::where(finished, at::full_like(next, first_eos), next);
      finished = finished.logical_or(at::isin(next, eos_tensor));
    }
    sequence = at::cat({sequence, next.unsqueeze(1)}, 1);
    mask = at::cat({mask, at::ones({batch, 1}, at::kLong)}, 1);
    if (on_token) RETURN_IF_ERROR(on_token(step, next));
    if (options.stop_at_eos && finished.all().item<bool>()) break;
    if (options.use_past_kv_cache) {
      input.tokens = next.unsqueeze(1);
      input.attention_mask = at::ones({batch, 1}, at::kLong);
    } else {
      input.tokens = sequence;
      input.attention_mask = mask;
    }
  }
  return sequence;
}

}  // namespace remotelens
