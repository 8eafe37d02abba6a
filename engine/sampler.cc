#include "engine/sampler.h"

#include <cmath>
#include <limits>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"

namespace remotelens {

absl::Status ValidateSamplingOptions(const SamplingOptions& options) {
  // Checked as float32 values (kMinTemperature): 1e-300 is positive as a double but zero where
  // the logits are divided. Written so that NaN fails too.
  if (!(options.temperature >= kMinTemperature && options.temperature <= kMaxTemperature)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "temperature must be in [", kMinTemperature, ", ", kMaxTemperature, "], got ",
        options.temperature, " (for greedy decoding set do_sample = false)"));
  }
  if (options.top_k < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_k must be >= 0 (0 disables it), got ", options.top_k));
  }
  if (!(options.top_p >= kMinTopP && options.top_p <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "top_p must be in [", kMinTopP, ", 1] (1 disables it), got ", options.top_p));
  }
  return absl::OkStatus();
}

namespace {

absl::Status ValidateLogits(const at::Tensor& logits) {
  if (!logits.defined()) return absl::InvalidArgumentError("logits tensor is undefined");
  if (logits.dim() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "logits must be [batch, d_vocab], got rank ", logits.dim(), " shape ",
        c10::str(logits.sizes())));
  }
  if (logits.size(1) < 1) return absl::InvalidArgumentError("logits have d_vocab 0");
  if (!at::isFloatingType(logits.scalar_type())) {
    return absl::InvalidArgumentError(
        absl::StrCat("logits must be a floating dtype, got ", c10::toString(logits.scalar_type())));
  }
  return absl::OkStatus();
}

// logits: [batch, d_vocab] float32. NaN or +inf would turn softmax into NaN, and an all -inf row
// has no distribution; both mean the model produced garbage, which should be reported, not
// sampled from.
absl::Status CheckRowsSamplable(const at::Tensor& logits) {
  if (at::isnan(logits).any().item<bool>()) {
    return absl::InvalidArgumentError("logits contain NaN");
  }
  if (at::isposinf(logits).any().item<bool>()) {
    return absl::InvalidArgumentError("logits contain +inf");
  }
  if (logits.size(0) > 0 &&
      at::isneginf(logits).all(/*dim=*/1).any().item<bool>()) {
    return absl::InvalidArgumentError("a logits row is entirely -inf");
  }
  return absl::OkStatus();
}

// Keeps the k largest logits per row, exactly k even when values tie at the boundary.
at::Tensor TopKFilter(const at::Tensor& logits, int64_t k) {  // [batch, d_vocab]
  const auto [values, indices] = at::topk(logits, k, /*dim=*/1);  // [batch, k]
  at::Tensor filtered =
      at::full_like(logits, -std::numeric_limits<float>::infinity());  // [batch, d_vocab]
  return filtered.scatter_(1, indices, values);
}

// Keeps, per row, the most likely tokens whose probabilities first reach top_p in total; the top
// token always survives, so tiny top_p degenerates to greedy rather than to an empty set.
at::Tensor TopPFilter(const at::Tensor& logits, double top_p) {  // [batch, d_vocab]
  const auto [sorted_logits, sorted_indices] =
      at::sort(logits, /*dim=*/1, /*descending=*/true);  // [batch, d_vocab]
  const at::Tensor sorted_probs = at::softmax(sorted_logits, /*dim=*/1);
  // Probability mass strictly before each token: a token is needed while that is below top_p.
  const at::Tensor mass_before = at::cumsum(sorted_probs, /*dim=*/1) - sorted_probs;
  const at::Tensor drop_sorted = mass_before >= top_p;  // [batch, d_vocab] bool
  const at::Tensor drop = at::zeros_like(drop_sorted).scatter_(1, sorted_indices, drop_sorted);
  return logits.masked_fill(drop, -std::numeric_limits<float>::infinity());
}

}  // namespace

absl::StatusOr<at::Tensor> SampleNextTokens(const at::Tensor& logits,
                                            const SamplingOptions& options,
                                            at::Generator& generator) {
  if (absl::Status status = ValidateSamplingOptions(options); !status.ok()) return status;
  if (absl::Status status = ValidateLogits(logits); !status.ok()) return status;
  if (!generator.defined() || generator.device().type() != at::kCPU) {
    return absl::InvalidArgumentError("generator must be a defined CPU generator");
  }
  try {
    const at::Tensor cpu_logits =
        logits.to(at::kCPU, at::kFloat).contiguous();  // [batch, d_vocab] float32
    if (absl::Status status = CheckRowsSamplable(cpu_logits); !status.ok()) return status;
    if (!options.do_sample) return at::argmax(cpu_logits, /*dim=*/1);  // [batch] int64

    // Shifting each row's max to 0 first keeps a small temperature from overflowing to +inf.
    at::Tensor scaled = (cpu_logits - std::get<0>(cpu_logits.max(/*dim=*/1, /*keepdim=*/true))) /
                        options.temperature;  // [batch, d_vocab]
    const int64_t d_vocab = scaled.size(1);
    if (options.top_k > 0 && options.top_k < d_vocab) scaled = TopKFilter(scaled, options.top_k);
    if (options.top_p < 1.0) scaled = TopPFilter(scaled, options.top_p);
    const at::Tensor probs = at::softmax(scaled, /*dim=*/1);  // [batch, d_vocab]
    return at::multinomial(probs, /*num_samples=*/1, /*replacement=*/true, generator)
        .squeeze(1);  // [batch] int64
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("sampling failed: ", e.what_without_backtrace()));
  }
}

}  // namespace remotelens
