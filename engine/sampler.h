// Next-token selection from logits: greedy argmax, or sampling with temperature, top-k and top-p
// (nucleus) filtering, reproducible through a caller-owned generator.
//
//   SamplingOptions options;
//   options.temperature = 0.7;
//   options.top_p = 0.9;
//   RETURN_IF_ERROR(ValidateSamplingOptions(options));
//   at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(/*seed=*/1234);
//   for (int step = 0; step < max_new_tokens; ++step) {
//     at::Tensor logits = ...;  // [batch, d_vocab], last position
//     ASSIGN_OR_RETURN(at::Tensor next, SampleNextTokens(logits, options, generator));  // [batch]
//   }
//
// Filters apply in the order temperature -> top_k -> top_p, as in Hugging Face's generate(), so the
// distribution sampled from matches the one Python users expect for the same options.
#ifndef REMOTELENS_ENGINE_SAMPLER_H_
#define REMOTELENS_ENGINE_SAMPLER_H_

#include <cstdint>
#include <limits>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace remotelens {

// Bounds of the sampling options. The math runs in float32, where a double like 1e-300 rounds to
// zero (a division by zero, an empty nucleus): both must stay a positive normal float32.
inline constexpr double kMinTemperature = std::numeric_limits<float>::min();  // ~1.18e-38
inline constexpr double kMaxTemperature = std::numeric_limits<float>::max();
inline constexpr double kMinTopP = std::numeric_limits<float>::min();

struct SamplingOptions {
  bool do_sample = true;     // false: greedy argmax; the other fields are then unused
  double temperature = 1.0;  // divides the logits; [kMinTemperature, kMaxTemperature]
  int64_t top_k = 0;         // keep the k most likely tokens; 0: off; >= 0
  double top_p = 1.0;        // keep the fewest tokens whose probability reaches top_p; [kMinTopP, 1]
                             // 1: off
};

// InvalidArgument naming the field and its valid range. Checked even when do_sample is false, so a
// bad request fails the same way whichever mode it asks for.
absl::Status ValidateSamplingOptions(const SamplingOptions& options);

// logits: [batch, d_vocab], any floating dtype on any device; the math runs in float32 on a CPU
// copy (one row of logits is small next to the forward pass that made it).
// generator: a CPU generator seeded by the caller and passed again on every step, so a seed fixes
// the whole generated sequence.
// Returns int64 [batch] token ids on the CPU, where callers append them to token lists.
// InvalidArgument for bad options, a logits shape other than [batch, d_vocab >= 1], a non-float
// dtype, a NaN or +inf logit, a row whose logits are all -inf, or a non-CPU generator.
absl::StatusOr<at::Tensor> SampleNextTokens(const at::Tensor& logits,
                                            const SamplingOptions& options,
                                            at::Generator& generator);

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_SAMPLER_H_
