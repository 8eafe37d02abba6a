// HookPlan: everything one forward call does at hook points, owned by that call and never stored
// on the model. Two kinds of op:
//   - interventions (zero, set, add, scale, mean, or a C++ callback) rewrite the activation, in
//     the order they were added, before anything downstream reads it;
//   - cache requests copy the final (post-intervention) activation aside, optionally sliced along
//     positions, cast, and moved to the host.
// A hook point with nothing registered costs one table look-up; an empty plan costs nothing.
//
//   HookPlan plan(config.n_layers);
//   RETURN_IF_ERROR(plan.AddIntervention(
//       {.hook = z_of_layer_1, .kind = OpKind::kZero, .selector = {.heads = {3}}}));
//   plan.AddCache({.hook = resid_post_of_layer_1});
//   ASSIGN_OR_RETURN(at::Tensor logits, model.Forward(tokens, {}, &plan));
//   at::Tensor resid = plan.cache()[0].second;  // [batch, pos, d_model]
#ifndef REMOTELENS_ENGINE_HOOK_PLAN_H_
#define REMOTELENS_ENGINE_HOOK_PLAN_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/hook_names.h"

namespace remotelens {

// Which part of an activation an op touches. Positions index PosDim(site) (query positions for
// attention scores and patterns); heads index HeadDim(site) (key/value heads for hook_k, hook_v,
// hook_rot_k). Negative values count from the end. Empty: all.
struct Selector {
  std::vector<int64_t> positions;
  std::vector<int64_t> heads;
};

enum class OpKind {
  kZero,      // region = 0
  kSet,       // region = value, broadcast to the region's shape
  kAdd,       // region += value, broadcast (steering vectors)
  kScale,     // region *= factor
  kMean,      // region = its mean over the batch
  kCallback,  // region-free: callback(hook, activation) returns a replacement or nullopt
  kCopyRow,   // region = the region of batch row `source_row`, in every row
};

// What an add op's value is multiplied by (nnbench's relative steering strength): the L2 norm of
// the activation over its last dimension, averaged over the row's positions (kMeanNorm) or per
// position (kTokenNorm). Valid only on [batch, pos, d_model] hooks.
enum class AddScale { kNone, kMeanNorm, kTokenNorm };

// Runs at a hook with the activation; returns a replacement of the same shape and dtype, or
// nullopt for "unchanged". The server implements remote Python hooks with this.
using HookCallback =
    std::function<absl::StatusOr<std::optional<at::Tensor>>(HookId, const at::Tensor&)>;

struct InterventionOp {
  HookId hook;
  OpKind kind = OpKind::kZero;
  Selector selector;
  at::Tensor value;     // kSet, kAdd: broadcastable to the selected region
  double factor = 1.0;  // kScale
  AddScale scale_by = AddScale::kNone;  // kAdd
  int64_t source_row = 0;  // kCopyRow; negative counts from the end
  HookCallback callback;  // kCallback
  // A backward op: it rewrites d(metric)/d(activation) as the backward pass reaches the hook,
  // before anything upstream receives it (TransformerLens's bwd hooks: returning zeros at one
  // block's resid_pre zeroes every gradient before it). Needs a differentiable forward.
  bool backward = false;
};

// Final RMSNorm + unembedding of residual-stream rows: [..., d_model] -> [..., d_vocab]
// (LlamaModel::Lens). Kept as a function so the plan needs no weights.
using LensFn = std::function<at::Tensor(const at::Tensor&)>;

enum class ReadoutKind {
  kLens,  // logits of the lens at the selected positions, or their top-k
  kNorm,  // L2 norm over the last dimension, at the selected positions
  kMean,  // mean over the selected positions
};

// A small answer computed at hook points during the forward (after the hook's interventions),
// stacked over `hooks` in the order given. Results are float32 on the host.
struct ReadoutRequest {
  std::vector<HookId> hooks;        // non-empty; every hook's activation has the same shape
  ReadoutKind kind = ReadoutKind::kNorm;
  std::vector<int64_t> positions;   // along PosDim; negative from the end; empty: all
  int64_t top_k = 0;                // kLens: 0 = full logits, else the k largest
  LensFn lens;                      // kLens
};

struct ReadoutResult {
  // kLens: [n_hooks, batch, n_pos, d_vocab or k]; kNorm: [n_hooks, <activation shape without
  // its last dim, positions selected>]; kMean: [n_hooks, <activation shape without PosDim>].
  at::Tensor values;
  at::Tensor indices;  // kLens with top_k > 0: int64 token ids, the shape of `values`
};

struct CacheRequest {
  HookId hook;
  // Python slice [pos_start:pos_stop] along PosDim; unset ends mean the sequence's ends.
  std::optional<int64_t> pos_start;
  std::optional<int64_t> pos_stop;
  std::optional<at::ScalarType> dtype;  // unset: the model's dtype
  bool to_host = true;                  // false: keep on the device the layer ran on
  // Cache d(metric)/d(activation) instead, when the backward pass reaches the hook (after the
  // backward ops there). Delivered through the gradient sink, or gradient_cache().
  bool gradient = false;
};

// Batching: the part of a shared forward's batch that belongs to one request. Requests are
// left-padded to the batch's length, so a request's own positions are the last `positions`
// query positions and the last `keys` key positions (past + new, with a key/value cache).
struct RowSlice {
  int64_t row_begin = 0;
  int64_t rows = 0;
  int64_t positions = 0;
  int64_t keys = 0;
};

// The view of `activation` (at a hook of `site`) that belongs to `slice`: its rows, its query
// positions and, for attention scores and patterns, its keys. The shape the request would see
// alone.
at::Tensor SliceForRequest(const at::Tensor& activation, HookSite site, const RowSlice& slice);

// Receives each cached activation as soon as it is computed, in forward order. When set, the
// plan keeps nothing itself (the server streams activations out of here).
using CacheSink = std::function<absl::Status(HookId, at::Tensor)>;

// Sites whose activation is [batch, pos, d_model] (scale_by is valid there), and sites with a
// head dimension (head selectors are valid there); both read off hook_names.h's tables.
bool IsResidualShaped(HookSite site);
bool HasHeadDim(HookSite site);
// The residual stream itself: hook_embed, hook_resid_pre, hook_resid_mid, hook_resid_post (a
// lens readout is valid there).
bool IsResidualStream(HookSite site);

class HookPlan {
 public:
  explicit HookPlan(int64_t n_layers);

  // Validates the op against its hook (a head selector on a site without heads, a missing value
  // or callback, a non-floating value) and appends it.
  absl::Status AddIntervention(InterventionOp op);
  void AddCache(CacheRequest request);
  void SetCacheSink(CacheSink sink) { sink_ = std::move(sink); }
  // Receives cached gradients; called from the backward pass (on CUDA, an autograd thread),
  // one call at a time.
  void SetGradientSink(CacheSink sink) { gradient_sink_ = std::move(sink); }

  // Whether any backward op or gradient cache request is registered: the forward must then be
  // differentiable.
  bool has_backward() const { return num_backward_ != 0; }
  // The first error a backward op or gradient delivery hit during the backward pass (autograd
  // hooks cannot return one); LlamaModel::Backward returns it.
  absl::Status backward_status() const;
  // Registers a readout at each of its hooks (InvalidArgument without hooks, a lens without a
  // LensFn or top_k < 0). Results come from TakeReadouts() after the forward.
  absl::Status AddReadout(ReadoutRequest request);

  // Batching: `request`, a plan built for one request as if it ran alone (and outliving this
  // one), owns the rows and trailing positions of `slice` in this plan's forward. At each hook
  // this plan applies its own entries, then each request's plan to its slice only, so every
  // request sees exactly the shapes it would see alone and never another request's rows. A
  // request whose op, callback or sink fails (a client gone, a quota passed) is dropped from the
  // rest of the forward with its error kept in request_status(i); the forward and the other
  // requests go on. Python callbacks of several requests at one hook are called concurrently.
  // Inference only: a differentiable forward is never shared.
  void AddRequestPlan(HookPlan* request, RowSlice slice);
  size_t num_requests() const { return requests_.size(); }
  const absl::Status& request_status(size_t i) const { return requests_[i].status; }

  bool empty() const { return num_ops_ == 0; }
  // True when a callback op (a client's Python hook) is registered at `id`.
  bool HasCallback(HookId id) const;
  // True when any op is registered at `id`.
  bool Has(HookId id) const { return num_ops_ != 0 && active_[HookIndex(id, n_layers_)]; }

  // Applies the interventions at `id` to `activation` (replacing it; the input is never written
  // in place, so tensors aliased elsewhere stay intact), then serves its cache requests.
  absl::Status Apply(HookId id, at::Tensor& activation);

  // Delivers every cache copy still in flight (CUDA activations copied asynchronously into
  // pinned host buffers), waiting for them; in forward order. LlamaModel::Forward calls it
  // before returning, so callers see a complete cache or sink.
  absl::Status FlushCache();

  // Cached activations in forward order (empty when a sink is set).
  const std::vector<std::pair<HookId, at::Tensor>>& cache() const { return cache_; }
  std::vector<std::pair<HookId, at::Tensor>> TakeCache() { return std::move(cache_); }
  // Cached gradients in the order the backward pass reached them (empty with a gradient sink).
  const std::vector<std::pair<HookId, at::Tensor>>& gradient_cache() const { return gradient_cache_; }

  // One result per AddReadout call, in order. FailedPrecondition when a readout's hook did not
  // run (a forward cut short by start_at_layer / stop_at_layer).
  absl::StatusOr<std::vector<ReadoutResult>> TakeReadouts();

 private:
  struct Entry {
    HookId hook;
    bool is_cache = false;
    int readout = -1;  // index into readouts_ when this entry serves a readout
    int slot = 0;      // which of that readout's hooks
    InterventionOp op;
    CacheRequest cache;
  };
  struct PendingReadout {
    ReadoutRequest request;
    // Per hook, filled as the forward reaches it: the reduction on the host, or for a lens the
    // selected residual rows on their device (unembedded together in TakeReadouts).
    std::vector<at::Tensor> values;
  };
  absl::Status ApplyIntervention(const InterventionOp& op, at::Tensor& activation) const;
  // Applies the request plans at `id`, each to its own slice of `activation`.
  void ApplyRequests(HookId id, at::Tensor& activation);
  absl::Status ServeCache(const CacheRequest& request, const at::Tensor& activation);
  // Runs the backward entries at `id` on the gradient arriving there; returns what flows on.
  at::Tensor ApplyBackward(HookId id, const at::Tensor& gradient);
  absl::Status ServeReadout(int readout, int slot, const at::Tensor& activation);
  absl::Status Deliver(HookId hook, at::Tensor tensor);
  // Delivers, in order, the leading pending copies that have completed; never waits.
  absl::Status DeliverCompleted();

  // A device-to-host copy queued on `stream` into a pinned buffer; `done` fires when it lands.
  struct PendingCopy {
    HookId hook;
    at::Tensor host;
    c10::Stream stream;
    c10::Event done;
  };

  int64_t n_layers_;
  int num_ops_ = 0;
  int num_backward_ = 0;
  std::vector<uint8_t> active_;  // by HookIndex
  std::vector<Entry> entries_;   // registration order
  std::vector<std::pair<HookId, at::Tensor>> cache_;
  std::vector<PendingReadout> readouts_;
  std::deque<PendingCopy> pending_;
  CacheSink sink_;
  CacheSink gradient_sink_;
  std::vector<std::pair<HookId, at::Tensor>> gradient_cache_;
  struct RequestPlan {
    HookPlan* plan;
    RowSlice slice;
    absl::Status status;  // the first error of this request; it is skipped from then on
  };
  std::vector<RequestPlan> requests_;
  std::unique_ptr<std::mutex> backward_mu_ = std::make_unique<std::mutex>();  // guards below
  absl::Status backward_status_;
};

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_HOOK_PLAN_H_
