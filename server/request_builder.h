// Request building: proto requests -> engine types, validated once on the gRPC thread so the
// scheduler thread only ever runs well-formed work. Every error is INVALID_ARGUMENT (or
// OUT_OF_RANGE / NOT_FOUND / RESOURCE_EXHAUSTED where noted) with a message naming the field.
//
//   ASSIGN_OR_RETURN(Limits limits, LimitsWithDefaults(config.limits()));
//   ModelContext ctx{model.get(), tokenizer.get(), &limits};
//   ASSIGN_OR_RETURN(ForwardInput input, BuildForwardInput(request, ctx, user_max_tokens));
//   ASSIGN_OR_RETURN(InterventionOp op, BuildInterventionOp(request.hooks(0), config, lookup, "hooks[0]"));
#ifndef REMOTELENS_SERVER_REQUEST_BUILDER_H_
#define REMOTELENS_SERVER_REQUEST_BUILDER_H_

#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/hook_plan.h"
#include "engine/llama_model.h"
#include "engine/tokenizer.h"
#include "remotelens/v1/config.pb.h"
#include "remotelens/v1/remotelens.pb.h"
#include "server/parsed_hook_op.h"
#include "server/session_store.h"

namespace remotelens {

// Every enum field in `request`, nested messages included, holds a value its enum defines.
// proto3 parses unknown numbers into enum fields, and a switch's default would quietly run them
// as something else. INVALID_ARGUMENT "return_type: 7 is not a valid ReturnType; valid:
// RETURN_TYPE_LOGITS (0), ...". Checked once per request, before anything reads it.
absl::Status ValidateEnums(const google::protobuf::Message& request);

// v1::Limits with every unset (zero) field given its documented default.
v1::Limits LimitsWithDefaults(const v1::Limits& limits);

struct ModelContext {
  const LlamaModel* model = nullptr;
  const Tokenizer* tokenizer = nullptr;  // may be null: text inputs are then FAILED_PRECONDITION
  const v1::Limits* limits = nullptr;    // with defaults filled in
};

struct EncodedBatch {
  at::Tensor tokens;          // int64 [batch, pos]
  at::Tensor attention_mask;  // int64 [batch, pos]
  std::vector<int64_t> lengths;
  int64_t pad_token_id = 0;
};

// Tokenizes texts and pads them (left unless `side` is RIGHT). Bounds: 1..max_batch texts,
// each at most max_text_bytes.
absl::StatusOr<EncodedBatch> EncodeTexts(const ModelContext& ctx,
                                         const google::protobuf::RepeatedPtrField<std::string>& texts,
                                         bool prepend_bos, v1::PaddingSide side);

// The forward input of a Run: exactly one of tokens / texts / residual. `max_tokens` bounds
// batch * pos (RESOURCE_EXHAUSTED beyond it); positions past n_ctx are OUT_OF_RANGE.
absl::StatusOr<ForwardInput> BuildForwardInput(const v1::RunRequest& request,
                                               const ModelContext& ctx, int64_t max_tokens);

// Token input shared by Run and Generate: tokens or texts plus an optional mask.
// Texts are padded on `side` (left unless RIGHT; a single forward handles either, generation
// needs left).
absl::StatusOr<EncodedBatch> BuildTokenInput(const v1::Tensor& tokens,
                                             const google::protobuf::RepeatedPtrField<std::string>& texts,
                                             bool prepend_bos, const v1::Tensor& attention_mask,
                                             const ModelContext& ctx, int64_t max_tokens,
                                             v1::PaddingSide side = v1::PADDING_SIDE_LEFT);

// An attention mask: an integer tensor of 0s and 1s with the given shape.
absl::StatusOr<at::Tensor> DecodeAttentionMask(const v1::Tensor& proto, at::IntArrayRef shape);

// Finds the caller's stored cache for a handle (NOT_FOUND / PERMISSION_DENIED from the store).
using CacheLookup =
    std::function<absl::StatusOr<std::shared_ptr<const StoredCache>>(const std::string& handle)>;

// Validates a hook op (name, selector, payload against the hook's fixed dimensions) and converts
// it into its engine form, decoding values once. Stored caches are not looked up (a patch is
// resolved per run) and callbacks not attached. Client callbacks are only valid when
// `allow_callback` (RunInteractive's one-shot hooks).
absl::StatusOr<ParsedHookOp> ParseHookOp(const v1::HookOp& op, const LlamaConfig& config,
                                         bool allow_callback, absl::string_view what);

// A parsed op ready for one run: a patch's region of the stored activation looked up (NOT_FOUND
// when the cache or its hook is gone), a client callback attached.
absl::StatusOr<InterventionOp> ResolveHookOp(const ParsedHookOp& parsed, const LlamaConfig& config,
                                             const CacheLookup& lookup, const HookCallback& callback,
                                             absl::string_view what);

// ParseHookOp's verdict alone (AddHook).
absl::Status ValidateHookOp(const v1::HookOp& op, const LlamaConfig& config, bool allow_callback,
                            absl::string_view what);

// ParseHookOp then ResolveHookOp. PatchFromCache becomes a Set whose value is
// the selected region of the stored activation. ClientCallbackOp needs `callback` (else
// INVALID_ARGUMENT).
absl::StatusOr<InterventionOp> BuildInterventionOp(const v1::HookOp& op, const LlamaConfig& config,
                                                   const CacheLookup& lookup,
                                                   const HookCallback& callback,
                                                   absl::string_view what);

// Expands a cache selection ("*" = every hook) into cache requests, in forward order, each
// hook at most once. Values are cast to `dtype` (UNSPECIFIED: the model's) on the host.
absl::StatusOr<std::vector<CacheRequest>> BuildCacheRequests(const v1::CacheSelection& selection,
                                                             const LlamaConfig& config);

// Converts RunRequest.readouts into engine readouts for `input`: hook names parsed (hooks that
// run in this forward; a lens only at residual-stream hooks; one readout's hooks share a shape),
// lens top_k within 0..d_vocab, positions within the input's -pos..pos-1, at most 64 readouts.
// INVALID_ARGUMENT naming the field and what is valid; RESOURCE_EXHAUSTED when a lens's float32
// logits (hooks x batch x positions x d_vocab x 4 bytes, computed before any top-k) exceed
// `max_lens_bytes`.
absl::StatusOr<std::vector<ReadoutRequest>> BuildReadouts(
    const google::protobuf::RepeatedPtrField<v1::Readout>& readouts, const LlamaConfig& config,
    const ForwardInput& input, const LensFn& lens, int64_t max_lens_bytes);

// RunRequest.past_kv_cache, checked once against the request and its input: the key/value cache
// restored for the model (empty for a new one) and what the run must do with it afterwards.
struct PreparedKvCache {
  std::string handle;                       // empty: a new cache
  bool frozen = false;
  std::shared_ptr<const StoredCache> past;  // what the handle held when read; null for a new one
  int64_t past_length = 0;                  // positions in `past`
  KvCache cache;                            // the forward reads and extends this copy
  // Stores the extended cache: under a new handle when `handle` is empty (returning it), else in
  // place of `past` (SessionStore::ReplaceCache; returns `handle`). Set by the service.
  std::function<absl::StatusOr<std::string>(StoredCache next)> commit;
};

// INVALID_ARGUMENT naming the field (past_kv_cache needs session_id; residual / start_at_layer,
// stop_at_layer and backward do not combine with it; a batch other than the cache's; a handle
// naming an activation cache, or a cache whose tensors do not fit the model), OUT_OF_RANGE when
// cached plus new positions pass n_ctx; NOT_FOUND / PERMISSION_DENIED from `lookup`. `commit` is
// left unset.
absl::StatusOr<PreparedKvCache> BuildPastKvCache(const v1::RunRequest& request,
                                                 const ForwardInput& input, const LlamaModel& model,
                                                 const CacheLookup& lookup);

// TransformerLens next-token loss. logits [batch, pos, d_vocab], tokens [batch, pos], mask
// (optional) [batch, pos]. Per token: [batch, pos - 1]; otherwise the mean over real targets.
at::Tensor NextTokenLoss(const at::Tensor& logits, const at::Tensor& tokens,
                         const at::Tensor& attention_mask, bool per_token);

// RunRequest.backward, validated against the request's input: the metric to back-propagate and
// the gradients to return.
struct BackwardSpec {
  enum class Metric { kLoss, kLogitDiff, kOutputGrad };
  Metric metric = Metric::kLoss;
  std::vector<int64_t> correct, incorrect;  // kLogitDiff: one per row, or one for all rows
  int64_t position = -1;                    // kLogitDiff
  at::Tensor output_grad;                   // kOutputGrad (its shape is checked by the engine)
  double metric_grad = 1.0;                 // kLoss, kLogitDiff: d(value)/d(metric)
  std::vector<CacheRequest> gradients;      // CacheRequest::gradient set
};

// INVALID_ARGUMENT naming the field for a missing metric, a loss or logit difference without
// the full model (stop_at_layer) or tokens, ids outside the vocabulary, row counts that are
// neither 1 nor the batch, a position outside the sequence, or a stored gradient cache.
absl::StatusOr<BackwardSpec> BuildBackwardSpec(const v1::BackwardRequest& request,
                                               const ForwardInput& input, const LlamaConfig& config);

// Mean over rows of logits[row, position, correct] - logits[row, position, incorrect];
// differentiable. Vectors of one entry apply to every row.
at::Tensor LogitDifference(const at::Tensor& logits, const std::vector<int64_t>& correct,
                           const std::vector<int64_t>& incorrect, int64_t position);

}  // namespace remotelens

#endif  // REMOTELENS_SERVER_REQUEST_BUILDER_H_
