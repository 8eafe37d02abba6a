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

// tokens: [batch, pos] prompt; attention_mask: [batch, pos] for left-padded prompts (or
// undefined). Returns [batch, pos + steps] prompt and generated ids.
absl::StatusOr<at::Tensor> Generate(const LlamaModel& model, const at::Tensor& tokens,
                                    const at::Tensor& attention_mask,
                                    const GenerateOptions& options, HookPlan* plan,
                                    const TokenCallback& on_token);

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_GENERATOR_H_
