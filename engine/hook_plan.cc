#include "engine/hook_plan.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/status_macros.h"

namespace remotelens {
namespace {

std::string ShapeString(at::IntArrayRef sizes) {
  return absl::StrCat("[", absl::StrJoin(sizes, ", "), "]");
}

// Resolves (possibly negative) indices along a dimension of `size` into an int64 index tensor.
absl::StatusOr<at::Tensor> ResolveIndices(const std::vector<int64_t>& indices, int64_t size,
                                          const char* what, HookId hook,
                                          const at::Device& device) {
  std::vector<int64_t> resolved;
  resolved.reserve(indices.size());
  for (int64_t i : indices) {
    int64_t r = i < 0 ? i + size : i;
    if (r < 0 || r >= size) {
      return absl::InvalidArgumentError(absl::StrCat(what, " ", i, " is out of range for hook \"",
                                                     HookName(hook), "\" with ", size, " ", what,
                                                     "s (valid: ", -size, "..", size - 1, ")"));
    }
    resolved.push_back(r);
  }
  return at::tensor(resolved, at::kLong).to(device);
}

// True when `value` broadcasts to exactly `target` (trailing-aligned, each dim 1 or equal).
bool BroadcastsTo(at::IntArrayRef value, at::IntArrayRef target) {
  if (value.size() > target.size()) return false;
  size_t offset = target.size() - value.size();
  for (size_t i = 0; i < value.size(); ++i) {
    if (value[i] != 1 && value[i] != target[offset + i]) return false;
  }
  return true;
}

}  // namespace

bool IsResidualShaped(HookSite site) {
  return HookDims(site) == std::vector<std::string>{"batch", "pos", "d_model"};
}

bool HasHeadDim(HookSite site) { return HeadDim(site) >= 0; }

bool IsResidualStream(HookSite site) {
  return site == HookSite::kEmbed || site == HookSite::kResidPre || site == HookSite::kResidMid ||
         site == HookSite::kResidPost;
}

HookPlan::HookPlan(int64_t n_layers) : n_layers_(n_layers), active_(NumHookIds(n_layers), 0) {}

absl::Status HookPlan::AddIntervention(InterventionOp op) {
  const std::string name = HookName(op.hook);
  if (!op.selector.heads.empty() && HeadDim(op.hook.site) < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "hook \"", name, "\" has no head dimension; a head selector is valid only on ",
        SiteNames(HasHeadDim)));
  }
  switch (op.kind) {
    case OpKind::kSet:
    case OpKind::kAdd:
      if (!op.value.defined()) {
        return absl::InvalidArgumentError(absl::StrCat("set/add op on \"", name, "\" has no value tensor"));
      }
      if (!at::isFloatingType(op.value.scalar_type())) {
        return absl::InvalidArgumentError(absl::StrCat("value tensor for \"", name,
                                                       "\" must be floating point, got ",
                                                       c10::toString(op.value.scalar_type())));
      }
      if (op.scale_by != AddScale::kNone && (op.kind != OpKind::kAdd || !IsResidualShaped(op.hook.site))) {
        return absl::InvalidArgumentError(absl::StrCat(
            "scale_by on \"", name, "\": only an add op on a [batch, pos, d_model] hook can be "
            "scaled by the activation's norm: ", SiteNames(IsResidualShaped)));
      }
      break;
    case OpKind::kCallback:
      if (!op.callback) {
        return absl::InvalidArgumentError(absl::StrCat("callback op on \"", name, "\" has no callback"));
      }
      break;
    case OpKind::kScale:
      if (!std::isfinite(op.factor)) {
        return absl::InvalidArgumentError(absl::StrCat("scale factor for \"", name, "\" must be finite"));
      }
      break;
    default:
      break;
  }
  active_[HookIndex(op.hook, n_layers_)] = 1;
  ++num_ops_;
  if (op.backward) ++num_backward_;
  Entry entry;
  entry.hook = op.hook;
  entry.op = std::move(op);
  entries_.push_back(std::move(entry));
  return absl::OkStatus();
}

void HookPlan::AddCache(CacheRequest request) {
  active_[HookIndex(request.hook, n_layers_)] = 1;
  ++num_ops_;
  if (request.gradient) ++num_backward_;
  Entry entry;
  entry.hook = request.hook;
  entry.is_cache = true;
  entry.cache = std::move(request);
  entries_.push_back(std::move(entry));
}

absl::Status HookPlan::AddReadout(ReadoutRequest request) {
  if (request.hooks.empty()) return absl::InvalidArgumentError("readout has no hooks");
  if (request.kind == ReadoutKind::kLens) {
    if (!request.lens) return absl::InvalidArgumentError("lens readout has no lens function");
    if (request.top_k < 0) {
      return absl::InvalidArgumentError(absl::StrCat("lens top_k ", request.top_k, " is negative"));
    }
    for (HookId hook : request.hooks) {
      if (!IsResidualStream(hook.site)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "lens readout at \"", HookName(hook), "\": valid only at residual-stream hooks "
            "(hook_embed, blocks.L.hook_resid_pre, hook_resid_mid, hook_resid_post)"));
      }
    }
  }
  const int index = static_cast<int>(readouts_.size());
  for (size_t slot = 0; slot < request.hooks.size(); ++slot) {
    const HookId hook = request.hooks[slot];
    active_[HookIndex(hook, n_layers_)] = 1;
    ++num_ops_;
    Entry entry;
    entry.hook = hook;
    entry.readout = index;
    entry.slot = static_cast<int>(slot);
    entries_.push_back(std::move(entry));
  }
  PendingReadout pending;
  pending.values.resize(request.hooks.size());
  pending.request = std::move(request);
  readouts_.push_back(std::move(pending));
  return absl::OkStatus();
}

absl::Status HookPlan::ServeReadout(int readout, int slot, const at::Tensor& activation) {
  PendingReadout& pending = readouts_[readout];
  const ReadoutRequest& request = pending.request;
  const HookId hook = request.hooks[slot];
  const int pos_dim = PosDim(hook.site);
  at::Tensor selected = activation;
  if (!request.positions.empty()) {
    ASSIGN_OR_RETURN(at::Tensor index, ResolveIndices(request.positions, activation.size(pos_dim),
                                                      "position", hook, activation.device()));
    selected = activation.index_select(pos_dim, index);
  }
  at::Tensor values;
  switch (request.kind) {
    case ReadoutKind::kLens:
      // The residual rows are kept (a private copy: the stream is written in place later) and
      // unembedded together in TakeReadouts: one pass over W_U for every hook and position
      // instead of one per hook, which dominates on CPU (W_U is read once per product).
      values = request.positions.empty() ? selected.clone() : selected;
      pending.values[slot] = std::move(values);
      return absl::OkStatus();
    case ReadoutKind::kNorm:
      values = at::linalg_vector_norm(selected.to(at::kFloat), 2, at::IntArrayRef{-1});
      break;
    case ReadoutKind::kMean:
      values = selected.to(at::kFloat).mean(pos_dim);
      break;
  }
  pending.values[slot] = values.to(at::kCPU).contiguous();
  return absl::OkStatus();
}

absl::StatusOr<std::vector<ReadoutResult>> HookPlan::TakeReadouts() {
  std::vector<ReadoutResult> results;
  for (PendingReadout& pending : readouts_) {
    for (size_t slot = 0; slot < pending.values.size(); ++slot) {
      if (!pending.values[slot].defined()) {
        return absl::FailedPreconditionError(absl::StrCat(
            "readout at \"", HookName(pending.request.hooks[slot]),
            "\" was not computed: the forward did not reach that hook"));
      }
    }
    ReadoutResult result;
    if (pending.request.kind != ReadoutKind::kLens) {
      result.values = at::stack(pending.values);
      results.push_back(std::move(result));
      continue;
    }
    // Hooks may sit on different devices (layers split across GPUs): gather on the last one's.
    const at::Device device = pending.values.back().device();
    std::vector<at::Tensor> rows;
    for (const at::Tensor& v : pending.values) rows.push_back(v.to(device));
    // [n_hooks, batch, n_pos, d_model] -> [n_hooks, batch, n_pos, d_vocab], ranked in float32.
    const at::Tensor logits = pending.request.lens(at::stack(rows)).to(at::kFloat);
    const int64_t top_k = pending.request.top_k;
    if (top_k > logits.size(-1)) {
      return absl::InvalidArgumentError(absl::StrCat("lens top_k ", top_k, " exceeds d_vocab = ",
                                                     logits.size(-1)));
    }
    if (top_k == 0) {
      result.values = logits.to(at::kCPU).contiguous();
    } else {
      auto top = at::topk(logits, top_k, /*dim=*/-1, /*largest=*/true, /*sorted=*/true);
      result.values = std::get<0>(top).to(at::kCPU).contiguous();
      result.indices = std::get<1>(top).to(at::kCPU).contiguous();
    }
    results.push_back(std::move(result));
  }
  readouts_.clear();
  return results;
}

absl::Status HookPlan::Apply(HookId id, at::Tensor& activation) {
  if (!Has(id)) return absl::OkStatus();
  bool owned = false;  // whether `activation` is already a private copy we may write in place
  bool backward = false;
  for (const Entry& entry : entries_) {
    if (entry.hook != id) continue;
    if (entry.readout >= 0) {
      // Readouts never hold on to a differentiable forward's graph.
      RETURN_IF_ERROR(ServeReadout(entry.readout, entry.slot, activation.detach()));
      continue;
    }
    if (entry.is_cache ? entry.cache.gradient : entry.op.backward) {
      backward = true;
      continue;
    }
    if (entry.is_cache) {
      RETURN_IF_ERROR(ServeCache(entry.cache, activation));
      continue;
    }
    if (!owned && entry.op.kind != OpKind::kCallback) {
      activation = activation.clone();
      owned = true;
    }
    RETURN_IF_ERROR(ApplyIntervention(entry.op, activation));
    if (entry.op.kind == OpKind::kCallback) owned = false;
  }
  if (backward) {
    if (!activation.requires_grad()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "hook \"", HookName(id), "\" has backward ops, but this forward is not differentiable"));
    }
    // A hook point of its own in the graph (TransformerLens's HookPoint is an identity module):
    // one tensor can be two hook points (the residual stream is blocks.L.hook_resid_post and
    // blocks.L+1.hook_resid_pre), and a gradient rewritten at the later one must reach the
    // earlier one rewritten, as it flows upstream through this view.
    activation = activation.view_as(activation);
    activation.register_hook([this, id](const at::Tensor& gradient) { return ApplyBackward(id, gradient); });
  }
  if (!requests_.empty()) ApplyRequests(id, activation);
  return absl::OkStatus();
}

at::Tensor SliceForRequest(const at::Tensor& activation, HookSite site, const RowSlice& slice) {
  at::Tensor view = activation.narrow(0, slice.row_begin, slice.rows);
  const int pos_dim = PosDim(site);
  if (pos_dim >= 0 && view.size(pos_dim) != slice.positions) {
    view = view.narrow(pos_dim, view.size(pos_dim) - slice.positions, slice.positions);
  }
  if ((site == HookSite::kAttnScores || site == HookSite::kAttnPattern) && view.size(3) != slice.keys) {
    view = view.narrow(3, view.size(3) - slice.keys, slice.keys);
  }
  return view;
}

void HookPlan::AddRequestPlan(HookPlan* request, RowSlice slice) {
  for (size_t i = 0; i < active_.size(); ++i) active_[i] |= request->active_[i];
  num_ops_ += request->num_ops_;
  requests_.push_back(RequestPlan{request, slice, absl::OkStatus()});
}

bool HookPlan::HasCallback(HookId id) const {
  for (const Entry& entry : entries_) {
    if (entry.hook == id && !entry.is_cache && entry.readout < 0 && entry.op.kind == OpKind::kCallback) {
      return true;
    }
  }
  return false;
}

void HookPlan::ApplyRequests(HookId id, at::Tensor& activation) {
  struct Work {
    RequestPlan* request;
    at::Tensor view;    // the request's slice of `activation`
    at::Tensor result;  // what the request's ops made of it (the view itself when unchanged)
    bool waits;         // a Python hook of the request's waits on its client here
    absl::Status status;
  };
  std::vector<Work> work;
  int waiting = 0;
  for (RequestPlan& r : requests_) {
    if (!r.status.ok() || !r.plan->Has(id)) continue;
    at::Tensor view = SliceForRequest(activation, id.site, r.slice);
    const bool waits = r.plan->HasCallback(id);
    waiting += waits ? 1 : 0;
    work.push_back(Work{&r, view, view, waits, absl::OkStatus()});
  }
  auto apply = [id](Work& w) { w.status = w.request->plan->Apply(id, w.result); };
  if (waiting < 2) {
    for (Work& w : work) apply(w);
  } else {
    // Each client answers in its own time: call them all at once rather than one after another.
    // The threads take this thread's autograd and inference modes.
    const bool inference = c10::InferenceMode::is_enabled();
    const bool grad = at::GradMode::is_enabled();
    std::vector<std::thread> threads;
    for (Work& w : work) {
      if (!w.waits) continue;
      threads.emplace_back([&apply, &w, inference, grad] {
        c10::InferenceMode inference_mode(inference);
        at::AutoGradMode grad_mode(grad);
        apply(w);
      });
    }
    for (Work& w : work) {
      if (!w.waits) apply(w);
    }
    for (std::thread& t : threads) t.join();
  }
  bool owned = false;
  for (Work& w : work) {
    if (w.status.ok() && !w.result.is_same(w.view) && w.result.sizes() != w.view.sizes()) {
      w.status = absl::InvalidArgumentError(absl::StrCat(
          "hook \"", HookName(id), "\": an op changed the activation's shape from ",
          ShapeString(w.view.sizes()), " to ", ShapeString(w.result.sizes())));
    }
    if (!w.status.ok()) {
      w.request->status = w.status;
      continue;
    }
    if (w.result.is_same(w.view)) continue;
    if (!owned) {
      activation = activation.clone();  // never written in place: the input may be aliased
      owned = true;
    }
    SliceForRequest(activation, id.site, w.request->slice).copy_(w.result);
  }
}

at::Tensor HookPlan::ApplyBackward(HookId id, const at::Tensor& gradient) {
  std::lock_guard<std::mutex> lock(*backward_mu_);
  if (!backward_status_.ok()) return gradient;
  at::Tensor g = gradient;
  bool owned = false;
  absl::Status status;
  for (const Entry& entry : entries_) {
    if (entry.hook != id || !(entry.is_cache ? entry.cache.gradient : entry.op.backward)) continue;
    if (entry.is_cache) {
      at::Tensor out = g.detach();
      if (entry.cache.pos_start.has_value() || entry.cache.pos_stop.has_value()) {
        const int dim = PosDim(id.site);
        const int64_t size = out.size(dim);
        auto clamp = [size](int64_t i) { return std::min(std::max<int64_t>(i < 0 ? i + size : i, 0), size); };
        const int64_t start = clamp(entry.cache.pos_start.value_or(0));
        const int64_t stop = clamp(entry.cache.pos_stop.value_or(size));
        out = out.narrow(dim, start, std::max<int64_t>(stop - start, 0));
      }
      at::TensorOptions options = out.options();
      if (entry.cache.dtype.has_value()) options = options.dtype(*entry.cache.dtype);
      if (entry.cache.to_host) options = options.device(at::kCPU);
      out = out.to(options, /*non_blocking=*/false, /*copy=*/true).contiguous();
      if (gradient_sink_) {
        status = gradient_sink_(id, std::move(out));
      } else {
        gradient_cache_.emplace_back(id, std::move(out));
      }
    } else {
      if (!owned && entry.op.kind != OpKind::kCallback) {
        g = g.clone();
        owned = true;
      }
      status = ApplyIntervention(entry.op, g);
      if (entry.op.kind == OpKind::kCallback) owned = false;
    }
    if (!status.ok()) {
      backward_status_ = status;
      return gradient;
    }
  }
  return g;
}

absl::Status HookPlan::backward_status() const {
  std::lock_guard<std::mutex> lock(*backward_mu_);
  return backward_status_;
}

absl::Status HookPlan::ApplyIntervention(const InterventionOp& op, at::Tensor& act) const {
  if (op.kind == OpKind::kCallback) {
    ASSIGN_OR_RETURN(std::optional<at::Tensor> replacement, op.callback(op.hook, act));
    if (!replacement.has_value()) return absl::OkStatus();
    if (replacement->sizes() != act.sizes()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "hook function for \"", HookName(op.hook), "\" returned shape ",
          ShapeString(replacement->sizes()), "; the activation's shape is ", ShapeString(act.sizes())));
    }
    if (!at::isFloatingType(replacement->scalar_type())) {
      return absl::InvalidArgumentError(absl::StrCat("hook function for \"", HookName(op.hook),
                                                     "\" returned dtype ",
                                                     c10::toString(replacement->scalar_type()),
                                                     "; expected a floating dtype"));
    }
    act = replacement->to(act.device(), act.scalar_type()).contiguous();
    return absl::OkStatus();
  }

  const int pos_dim = PosDim(op.hook.site);
  const int head_dim = HeadDim(op.hook.site);
  at::Tensor pos_index, head_index;
  if (!op.selector.positions.empty()) {
    ASSIGN_OR_RETURN(pos_index, ResolveIndices(op.selector.positions, act.size(pos_dim),
                                               "position", op.hook, act.device()));
  }
  if (!op.selector.heads.empty()) {
    ASSIGN_OR_RETURN(head_index, ResolveIndices(op.selector.heads, act.size(head_dim), "head",
                                                op.hook, act.device()));
  }
  // Gather the selected region (a copy when selectors are present), transform it, scatter back.
  at::Tensor by_pos = pos_index.defined() ? act.index_select(pos_dim, pos_index) : act;
  at::Tensor region = head_index.defined() ? by_pos.index_select(head_dim, head_index) : by_pos;

  switch (op.kind) {
    case OpKind::kZero:
      region.zero_();
      break;
    case OpKind::kSet:
    case OpKind::kAdd: {
      if (!BroadcastsTo(op.value.sizes(), region.sizes())) {
        return absl::InvalidArgumentError(absl::StrCat(
            op.kind == OpKind::kSet ? "set" : "add", " value for hook \"", HookName(op.hook),
            "\" has shape ", ShapeString(op.value.sizes()),
            ", which does not broadcast to the selected activation of shape ",
            ShapeString(region.sizes())));
      }
      at::Tensor value = op.value.to(region.device(), region.scalar_type());
      if (op.kind == OpKind::kSet) {
        region.copy_(value.expand(region.sizes()));
      } else if (op.scale_by == AddScale::kNone) {
        region.add_(value);
      } else {
        // Norms over d_model in float32, of the activation as it was before this op.
        const at::Tensor norms = op.scale_by == AddScale::kTokenNorm
            ? at::linalg_vector_norm(region.to(at::kFloat), 2, at::IntArrayRef{-1}, /*keepdim=*/true)  // [batch, n_pos, 1]
            : at::linalg_vector_norm(act.to(at::kFloat), 2, at::IntArrayRef{-1}, /*keepdim=*/true)
                  .mean(-2, /*keepdim=*/true);  // [batch, 1, 1]
        region.add_((value.to(at::kFloat) * norms).to(region.scalar_type()));
      }
      break;
    }
    case OpKind::kScale:
      region.mul_(op.factor);
      break;
    case OpKind::kMean:
      region.copy_(region.mean(0, /*keepdim=*/true).expand(region.sizes()));
      break;
    case OpKind::kCopyRow: {
      const int64_t batch = region.size(0);
      const int64_t row = op.source_row < 0 ? op.source_row + batch : op.source_row;
      if (row < 0 || row >= batch) {
        return absl::InvalidArgumentError(absl::StrCat(
            "copy_row source_row ", op.source_row, " is out of range for hook \"", HookName(op.hook),
            "\" with a batch of ", batch, " rows (valid: ", -batch, "..", batch - 1, ")"));
      }
      region.copy_(region.narrow(0, row, 1).clone().expand(region.sizes()));
      break;
    }
    case OpKind::kCallback:
      break;
  }
  if (head_index.defined()) by_pos.index_copy_(head_dim, head_index, region);
  if (pos_index.defined()) act.index_copy_(pos_dim, pos_index, by_pos);
  return absl::OkStatus();
}

absl::Status HookPlan::ServeCache(const CacheRequest& request, const at::Tensor& activation) {
  at::Tensor out = activation.detach();  // a cached activation never holds on to the graph
  if (request.pos_start.has_value() || request.pos_stop.has_value()) {
    const int dim = PosDim(request.hook.site);
    const int64_t size = out.size(dim);
    auto clamp = [size](int64_t i) {
      if (i < 0) i += size;
      return std::min(std::max<int64_t>(i, 0), size);
    };
    int64_t start = clamp(request.pos_start.value_or(0));
    int64_t stop = clamp(request.pos_stop.value_or(size));
    out = out.narrow(dim, start, std::max<int64_t>(stop - start, 0));
  }
  at::TensorOptions options = out.options();
  if (request.dtype.has_value()) options = options.dtype(*request.dtype);
  if (request.to_host && out.is_cuda()) {
    // The serving path: cast on the device, then an asynchronous copy into a pinned host buffer
    // on the forward's own stream, so the forward never waits for the bytes (nor for the network
    // behind the sink). Later in-place work on aliases is queued after the copy on that stream,
    // so the copy still sees this hook's values.
    const at::Tensor src = out.to(options.device(out.device()), /*non_blocking=*/false, /*copy=*/false);
    at::Tensor host = at::empty(src.sizes(), src.options().device(at::kCPU).pinned_memory(true));
    host.copy_(src, /*non_blocking=*/true);
    const c10::Stream stream = c10::impl::getDeviceGuardImpl(out.device().type())->getStream(out.device());
    c10::Event done(out.device().type());
    done.record(stream);
    pending_.push_back(PendingCopy{request.hook, std::move(host), stream, std::move(done)});
    return DeliverCompleted();
  }
  if (request.to_host) options = options.device(at::kCPU);
  // Always a private, contiguous copy: later in-place work on aliases (the residual stream is
  // one tensor across hook_resid_post and the next hook_resid_pre) must not reach the cache.
  out = out.to(options, /*non_blocking=*/false, /*copy=*/true).contiguous();
  // Keep forward order behind any copies still in flight.
  if (!pending_.empty()) RETURN_IF_ERROR(FlushCache());
  return Deliver(request.hook, std::move(out));
}

absl::Status HookPlan::Deliver(HookId hook, at::Tensor tensor) {
  if (sink_) return sink_(hook, std::move(tensor));
  cache_.emplace_back(hook, std::move(tensor));
  return absl::OkStatus();
}

absl::Status HookPlan::DeliverCompleted() {
  while (!pending_.empty() && pending_.front().done.query()) {
    PendingCopy copy = std::move(pending_.front());
    pending_.pop_front();
    RETURN_IF_ERROR(Deliver(copy.hook, std::move(copy.host)));
  }
  return absl::OkStatus();
}

absl::Status HookPlan::FlushCache() {
  for (RequestPlan& r : requests_) {
    if (!r.status.ok()) continue;
    if (absl::Status s = r.plan->FlushCache(); !s.ok()) r.status = s;
  }
  while (!pending_.empty()) {
    PendingCopy copy = std::move(pending_.front());
    pending_.pop_front();
    copy.stream.synchronize();
    RETURN_IF_ERROR(Deliver(copy.hook, std::move(copy.host)));
  }
  return absl::OkStatus();
}

}  // namespace remotelens
