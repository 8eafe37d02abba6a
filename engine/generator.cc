#include "engine/generator.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace remotelens {

absl::Status ValidateGenerate(const LlamaConfig& config, const at::Tensor& tokens,
                              const GenerateOptions& options) {
  if (options.max_new_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_new_tokens must be >= 1, got ", options.max_new_tokens));
  }
  RETURN_IF_ERROR(ValidateSamplingOptions(options.sampling));
  if (!tokens.defined() || tokens.dim() != 2) {
    return absl::InvalidArgumentError("generate needs a [batch, pos] prompt");
  }
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
  return absl::OkStatus();
}

GenerationState::GenerationState(const LlamaConfig& config, const at::Tensor& tokens,
                                 const at::Tensor& attention_mask, const GenerateOptions& options)
    : options_(options), generator_(at::make_generator<at::CPUGeneratorImpl>(options.seed)) {
  if (options_.eos_token_ids.empty()) options_.eos_token_ids = config.eos_token_ids;
  const std::vector<int64_t>& eos_ids = options_.eos_token_ids;
  sequence_ = tokens.to(at::kCPU, at::kLong);
  mask_ = attention_mask.defined() ? attention_mask.to(at::kCPU, at::kLong) : at::ones_like(sequence_);
  finished_ = at::zeros({sequence_.size(0)}, at::kBool);
  eos_ = at::tensor(eos_ids.empty() ? std::vector<int64_t>{-1} : eos_ids, at::kLong);
  first_eos_ = eos_ids.empty() ? 0 : eos_ids[0];
}

absl::StatusOr<bool> GenerationState::Advance(const at::Tensor& last_logits,
                                              const TokenCallback& on_token) {
  ASSIGN_OR_RETURN(at::Tensor next, SampleNextTokens(last_logits, options_.sampling, generator_));
  next = next.to(at::kCPU, at::kLong);
  if (options_.stop_at_eos) {
    next = at::where(finished_, at::full_like(next, first_eos_), next);
    finished_ = finished_.logical_or(at::isin(next, eos_));
  }
  sequence_ = at::cat({sequence_, next.unsqueeze(1)}, 1);
  mask_ = at::cat({mask_, at::ones({sequence_.size(0), 1}, at::kLong)}, 1);
  next_ = next;
  const int64_t step = steps_++;
  if (on_token) RETURN_IF_ERROR(on_token(step, next));
  return steps_ >= options_.max_new_tokens || (options_.stop_at_eos && finished_.all().item<bool>());
}

absl::StatusOr<at::Tensor> Generate(const LlamaModel& model, const at::Tensor& tokens,
                                    const at::Tensor& attention_mask,
                                    const GenerateOptions& options, HookPlan* plan,
                                    const TokenCallback& on_token) {
  RETURN_IF_ERROR(ValidateGenerate(model.config(), tokens, options));
  GenerationState state(model.config(), tokens, attention_mask, options);
  KvCache kv;
  ForwardInput input;
  input.tokens = state.sequence();
  input.attention_mask = state.mask();
  while (true) {
    ASSIGN_OR_RETURN(at::Tensor logits,
                     model.Forward(input, plan, options.use_past_kv_cache ? &kv : nullptr));
    ASSIGN_OR_RETURN(bool done, state.Advance(logits.select(1, logits.size(1) - 1), on_token));
    if (done) break;
    if (options.use_past_kv_cache) {
      input.tokens = state.next_tokens().unsqueeze(1);
      input.attention_mask = at::ones({state.next_tokens().size(0), 1}, at::kLong);
    } else {
      input.tokens = state.sequence();
      input.attention_mask = state.mask();
    }
  }
  return state.sequence();
}

}  // namespace remotelens
