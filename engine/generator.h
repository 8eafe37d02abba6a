// Autoregressive generation: prefill, then one token per step through a KV cache, sampling with
// SamplingOptions. The caller's HookPlan applies at every step (a steering vector stays on for
// the whole generation); at decode steps the hooks see only the new position, as in
// TransformerLens with a past key/value cache.
//
//   GenerateOptions options;
//   options.max_new_tokens = 20;
//   options.sampling.do_sample = false;  // greedy
//   ASSIGN_OR_RETURN(at::Tensor all, Generate(model, prompt, at::Tensor(), options, &plan,
//                                             [](int64_t step, const at::Tensor& next) {
//                                               return absl::OkStatus();  // stream `next`
//                                             }));
#ifndef REMOTELENS_ENGINE_GENERATOR_H_
#define REMOTELENS_ENGINE_GENERATOR_H_

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/hook_plan.h"
#include "engine/llama_model.h"
#include "engine/sampler.h"

namespace remotelens {

struct GenerateOptions {
  int64_t max_new_tokens = 10;        // >= 1
  SamplingOptions sampling;
  bool stop_at_eos = true;            // stop a row at its first eos; stop when all rows have
  std::vector<int64_t> eos_token_ids; // empty: the model config's eos ids
  bool use_past_kv_cache = true;      // false: re-run the whole sequence each step (slow; exact)
  uint64_t seed = 0;                  // sampling seed; same seed, same tokens
};

// Called after each step with the step index (0-based) and the new tokens [batch] (int64, CPU).
// Rows that already finished receive their eos id again. A non-OK status stops generation and
// is returned (the server returns Cancelled this way when the client goes away).
using TokenCallback = std::function<absl::Status(int64_t step, const at::Tensor& new_tokens)>;

// Checks a generation before it starts: max_new_tokens >= 1, sampling options, a [batch, pos]
// prompt that fits n_ctx with its new tokens, eos ids inside the vocabulary.
absl::Status ValidateGenerate(const LlamaConfig& config, const at::Tensor& tokens,
                              const GenerateOptions& options);

// What one generation request has produced, and how it samples and stops. Generate() drives one
// through its own forwards; GenerationBatch drives many through shared decode steps. Either way
// the tokens depend only on the logits and the request's own options and seed.
class GenerationState {
 public:
  GenerationState(const LlamaConfig& config, const at::Tensor& tokens,
                  const at::Tensor& attention_mask, const GenerateOptions& options);
  // Samples the next tokens from `last_logits` [batch, d_vocab], appends them and reports them
  // through `on_token` (may be empty). Returns true when the generation is over (max_new_tokens
  // reached, or every row stopped at eos).
  absl::StatusOr<bool> Advance(const at::Tensor& last_logits, const TokenCallback& on_token);
  const at::Tensor& sequence() const { return sequence_; }  // [batch, pos + steps]
  const at::Tensor& mask() const { return mask_; }          // [batch, pos + steps]
  const at::Tensor& next_tokens() const { return next_; }   // [batch], the last sampled
  int64_t steps() const { return steps_; }

 private:
  GenerateOptions options_;
  at::Generator generator_;
  at::Tensor sequence_, mask_, next_, finished_, eos_;
  int64_t first_eos_ = 0;
  int64_t steps_ = 0;
};

// tokens: [batch, pos] prompt; attention_mask: [batch, pos] for left-padded prompts (or
// undefined). Returns [batch, pos + steps] prompt and generated ids.
absl::StatusOr<at::Tensor> Generate(const LlamaModel& model, const at::Tensor& tokens,
                                    const at::Tensor& attention_mask,
                                    const GenerateOptions& options, HookPlan* plan,
                                    const TokenCallback& on_token);

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_GENERATOR_H_
