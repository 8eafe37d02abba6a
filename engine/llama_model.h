// LlamaModel: the Llama 3.1 forward pass with every TransformerLens hook point.
//
// The model is immutable once created: hooks, caches and key/value caches belong to the call
// (HookPlan, KvCache), never to the model, so one model serves many users concurrently.
//
//   ASSIGN_OR_RETURN(auto model, LlamaModel::Create(config, std::move(weights), options));
//   HookPlan plan(config.n_layers);
//   plan.AddCache({HookId{1, HookSite::kResidPost}});
//   ForwardInput input;
//   input.tokens = tokens;  // [batch, pos] int64
//   ASSIGN_OR_RETURN(at::Tensor logits, model->Forward(input, &plan));  // [batch, pos, d_vocab]
#ifndef REMOTELENS_ENGINE_LLAMA_MODEL_H_
#define REMOTELENS_ENGINE_LLAMA_MODEL_H_

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/hook_plan.h"
#include "engine/llama_config.h"
#include "engine/llama_weights.h"

namespace remotelens {

class KvCache;
class LlamaModel;
// engine/kv_cache_tensors: a KvCache as named tensors and back (stored caches, past_kv_cache).
using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;
NamedTensors KvCacheToTensors(const KvCache& cache);
absl::StatusOr<KvCache> KvCacheFromTensors(const NamedTensors& tensors, const LlamaModel& model);

// Keys and values of earlier positions, for incremental decoding. Belongs to one generation
// request, or (as named tensors in a stored cache) to a session's past_kv_cache. Capacity grows by doubling, so appending a token is amortised O(1).
class KvCache {
 public:
  KvCache() = default;
  int64_t length() const { return length_; }
  // [batch, length]: 1 for real tokens, 0 for left padding, over every cached position.
  const at::Tensor& mask() const { return mask_; }
  int64_t rows() const { return mask_.defined() ? mask_.size(0) : 0; }

  // Batching generations. Stack: one cache holding `parts`' rows in order, each left-padded
  // (masked) to the longest, so every row keeps its own positions. SelectRows: a cache of the
  // given rows only, without leading positions that are padding in all of them. Both copy.
  // InvalidArgument for empty caches or caches of different models.
  static absl::StatusOr<KvCache> Stack(const std::vector<const KvCache*>& parts);
  absl::StatusOr<KvCache> SelectRows(const std::vector<int64_t>& rows) const;

 private:
  friend class LlamaModel;
  friend NamedTensors KvCacheToTensors(const KvCache& cache);
  friend absl::StatusOr<KvCache> KvCacheFromTensors(const NamedTensors& tensors,
                                                    const LlamaModel& model);
  int64_t length_ = 0;
  at::Tensor mask_;
  std::vector<at::Tensor> keys_;    // per layer [batch, n_kv_heads, capacity, d_head]
  std::vector<at::Tensor> values_;  // per layer [batch, n_kv_heads, capacity, d_head]
};

struct ForwardInput {
  // [batch, pos] token ids; used when start_at_layer == 0.
  at::Tensor tokens;
  // [batch, pos, d_model]: the residual stream entering block start_at_layer; used (instead of
  // tokens) when start_at_layer > 0, as in TransformerLens.
  at::Tensor residual;
  // [batch, pos] 1 for real tokens and 0 for padding, padding on the left. Undefined: all real.
  // With a KvCache, covers only the new positions; the cache remembers the earlier ones.
  at::Tensor attention_mask;
  // First block to run (inclusive) and the block to stop before (exclusive); negative values
  // count from n_layers. With stop_at_layer set, Forward returns the residual stream
  // [batch, pos, d_model] instead of logits.
  int64_t start_at_layer = 0;
  std::optional<int64_t> stop_at_layer;
  // Run under autograd with respect to activations, so that Backward can follow: the graph
  // starts at hook_embed (or at the residual input), weights never require gradients and are
  // never written. Takes ATen's differentiable kernels instead of the fused inference ones (about
  // 2x the memory of the activations, kept until the output is freed). No key/value cache.
  bool differentiable = false;
};

class LlamaModel {
 public:
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Create(LlamaConfig config,
                                                            LlamaWeights weights,
                                                            LoadOptions options);

  // Runs the model. `plan` (may be null) applies hook ops; `kv_cache` (may be null) supplies and
  // receives keys and values of earlier positions. Returns logits [batch, pos, d_vocab] in the
  // model's dtype, on the last device.
  // Errors: InvalidArgument for malformed input (ids outside the vocabulary, wrong shapes, bad
  // masks, hook op problems); OutOfRange when positions exceed n_ctx; ResourceExhausted when the
  // device runs out of memory.
  absl::StatusOr<at::Tensor> Forward(const ForwardInput& input, HookPlan* plan = nullptr,
                                     KvCache* kv_cache = nullptr) const;

  // After a differentiable Forward: back-propagates `output_grad` (d(metric)/d(output), the
  // output's shape) from `output` (the Forward's result, or any tensor computed from it, e.g. a
  // loss with output_grad 1), firing the plan's backward ops and gradient cache requests as the
  // pass reaches each hook. `plan` must be the Forward's plan, still alive. Errors:
  // FAILED_PRECONDITION when `output` has no graph; INVALID_ARGUMENT for a gradient of another
  // shape or a non-floating dtype; the first error of a backward op; RESOURCE_EXHAUSTED when the
  // device runs out of memory.
  absl::Status Backward(const at::Tensor& output, const at::Tensor& output_grad,
                        HookPlan* plan = nullptr) const;

  // The logit lens: the final RMSNorm and the unembedding, without hooks, applied to residual-
  // stream rows [..., d_model] on any device. Returns [..., d_vocab] in the model's dtype on the
  // unembedding's device. HookPlan readouts call it through a LensFn.
  at::Tensor Lens(const at::Tensor& residual) const;

  const LlamaConfig& config() const { return config_; }
  const LlamaWeights& weights() const { return weights_; }
  const LoadOptions& options() const { return options_; }

 private:
  LlamaModel(LlamaConfig config, LlamaWeights weights, LoadOptions options);
  absl::StatusOr<at::Tensor> ForwardImpl(const ForwardInput& input, HookPlan* plan,
                                         KvCache* kv_cache) const;

  LlamaConfig config_;
  LlamaWeights weights_;
  LoadOptions options_;
  // Rotary tables [n_ctx, d_head] (cos and sin, rotate-half layout), one copy per block device.
  std::vector<at::Tensor> rope_cos_;  // per layer (shared tensors for layers on one device)
  std::vector<at::Tensor> rope_sin_;
};

// Rotary inverse frequencies [d_head / 2] (float64 on CPU), with llama3 scaling when configured.
at::Tensor RopeInverseFrequencies(const LlamaConfig& config);

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_LLAMA_MODEL_H_
