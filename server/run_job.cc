#include "server/run_job.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/device_memory.h"
#include "engine/forward_memory.h"
#include "engine/host_memory.h"
#include "engine/kv_cache_tensors.h"
#include "engine/status_macros.h"
#include "server/request_builder.h"
#include "server/tensor_codec.h"

namespace remotelens {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Streams tensors while enforcing the per-response byte quota.
class QuotaStreamer {
 public:
  QuotaStreamer(const ChunkEmitter& emit, int64_t chunk_bytes, int64_t max_bytes)
      : emit_(emit), chunk_bytes_(chunk_bytes), max_bytes_(max_bytes) {}
  absl::Status Send(const std::string& name, const at::Tensor& t) {
    const int64_t size = t.numel() * t.element_size();
    if (sent_ + size > max_bytes_) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "streaming \"", name, "\" (", size, " bytes) would exceed your quota of ", max_bytes_,
          " streamed bytes per request (", sent_, " sent); select fewer hooks or a position slice"));
    }
    ASSIGN_OR_RETURN(int64_t n, StreamTensorChunks(name, t, chunk_bytes_, emit_));
    sent_ += n;
    return absl::OkStatus();
  }
  int64_t sent() const { return sent_; }

 private:
  const ChunkEmitter& emit_;
  int64_t chunk_bytes_, max_bytes_;
  int64_t sent_ = 0;
};

// Backward ops apply only to a run with a backward pass, as TransformerLens's bwd hooks fire
// only when one runs.
absl::Status BuildPlan(HookPlan& plan, std::vector<InterventionOp>& ops, bool differentiable = false) {
  for (InterventionOp& op : ops) {
    if (op.backward && !differentiable) continue;
    RETURN_IF_ERROR(plan.AddIntervention(op));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckJobFits(const LlamaModel& model, const ForwardSize& size, int64_t kept_bytes,
                          int64_t host_memory_limit_bytes) {
  const at::Device device = model.weights().embed.device();
  const int64_t working =
      ForwardWorkingBytes(model.config(), model.weights().embed.scalar_type(), size);
  // `activations` and `kept` of the need fall on `where`, which has `available` (per `source`).
  auto check = [&](const std::string& where, int64_t activations, int64_t kept, int64_t available,
                   const std::string& source) -> absl::Status {
    if (activations + kept <= available) return absl::OkStatus();
    std::string shape = absl::StrCat(size.batch, " rows x ", size.pos, " positions");
    if (size.past > 0) absl::StrAppend(&shape, " after ", size.past, " cached");
    std::vector<std::string> parts;
    if (activations > 0) parts.push_back(absl::StrCat("activations ", HumanBytes(activations)));
    if (kept > 0) parts.push_back(absl::StrCat("activations kept until it ends ", HumanBytes(kept)));
    return absl::ResourceExhaustedError(absl::StrCat(
        "this request needs about ", HumanBytes(activations + kept), " on ", where, " (", shape,
        ": ", absl::StrJoin(parts, ", "), ") but only ", HumanBytes(std::max<int64_t>(available, 0)),
        " is available there (", source, "); send fewer rows or positions, cache fewer hooks or ",
        "a position slice, or stream the cache instead of storing it"));
  };
  auto host_available = [&]() -> std::optional<std::pair<int64_t, std::string>> {
    absl::StatusOr<HostMemory> host = AvailableHostMemory();
    if (!host.ok()) return std::nullopt;
    std::pair<int64_t, std::string> result{host->bytes, host->limited_by};
    if (host_memory_limit_bytes > 0) {
      const int64_t left = host_memory_limit_bytes - ReadProcessMemory().rss_bytes;
      if (left < result.first) {
        result = {left, "load.host_memory_limit_bytes less what the server holds"};
      }
    }
    return result;
  };
  if (device.is_cpu()) {
    if (auto host = host_available()) {
      RETURN_IF_ERROR(check("cpu", working, kept_bytes, host->first, host->second));
    }
    return absl::OkStatus();
  }
  // On a GPU the activations are the device's need; kept caches go to the host (to_host).
  if (std::optional<int64_t> free = FreeDeviceBytes(device)) {
    RETURN_IF_ERROR(check(device.str(), working, 0, *free, "free device memory"));
  }
  if (kept_bytes > 0) {
    if (auto host = host_available()) {
      RETURN_IF_ERROR(check("cpu", 0, kept_bytes, host->first, host->second));
    }
  }
  return absl::OkStatus();
}

class RunExecution::Streamer : public QuotaStreamer {
 public:
  using QuotaStreamer::QuotaStreamer;
};

RunExecution::RunExecution(const LlamaModel& model, PreparedRun& run, ChunkEmitter emit,
                           std::function<bool()> cancelled)
    : model_(model), run_(run), emit_(std::move(emit)), cancelled_(std::move(cancelled)),
      plan_(model.config().n_layers),
      streamer_(std::make_unique<Streamer>(emit_, run.chunk_bytes, run.max_streamed_bytes)) {}

RunExecution::~RunExecution() = default;

int64_t RunExecution::tokens() const {
  const at::Tensor& shaped = run_.input.tokens.defined() ? run_.input.tokens : run_.input.residual;
  return shaped.size(0) * shaped.size(1);
}

int64_t RunExecution::bytes_streamed() const { return streamer_->sent(); }

absl::Status RunExecution::Prepare() {
  const LlamaConfig& config = model_.config();
  PreparedRun& run = run_;
  {
    const at::Tensor& shaped = run.input.tokens.defined() ? run.input.tokens : run.input.residual;
    const int64_t past = run.kv_cache ? run.kv_cache->cache.length() : 0;
    const ForwardSize size{shaped.size(0), shaped.size(1), past};
    int64_t kept = 0;
    if (run.kv_cache && !run.kv_cache->frozen) {
      // The extended cache's compact copy (KvCacheToTensors), kept until it is stored.
      kept += 2 * config.n_layers * size.batch * config.n_kv_heads * (past + size.pos) *
              config.d_head * at::elementSize(model_.weights().embed.scalar_type());
    }
    if (run.store_cache) {
      for (const CacheRequest& r : run.cache) {
        kept += CacheRequestBytes(r, config, model_.weights().embed.scalar_type(), size);
      }
    }
    // Autograd keeps every block's activations until the backward.
    if (run.backward) {
      kept += config.n_layers *
              BlockActivationBytes(config, model_.weights().embed.scalar_type(), size);
    }
    RETURN_IF_ERROR(CheckJobFits(model_, size, kept, run.host_memory_limit_bytes));
  }
  RETURN_IF_ERROR(BuildPlan(plan_, run.ops, run.input.differentiable));
  if (run.backward) {
    for (const CacheRequest& request : run.backward->gradients) plan_.AddCache(request);
  }
  for (const CacheRequest& request : run.cache) plan_.AddCache(request);
  // Copied: the request stays whole.
  for (const ReadoutRequest& request : run.readouts) RETURN_IF_ERROR(plan_.AddReadout(request));
  plan_.SetCacheSink([this](HookId id, at::Tensor t) -> absl::Status {
    // Checked at every cached hook: a vanished client stops its part of the forward early.
    if (cancelled_()) return absl::CancelledError("client cancelled the run");
    const std::string name = HookName(id);
    if (run_.stream_cache) RETURN_IF_ERROR(streamer_->Send(name, t));
    if (run_.store_cache) {
      stored_.bytes += t.numel() * t.element_size();
      stored_.tensors.emplace_back(name, std::move(t));
    }
    return absl::OkStatus();
  });
  return absl::OkStatus();
}

absl::StatusOr<v1::RunResponse::Summary> RunExecution::Finish(at::Tensor logits,
                                                              double forward_s) {
  PreparedRun& run = run_;
  QuotaStreamer& streamer = *streamer_;
  HookPlan& plan = plan_;
  const auto& cancelled = cancelled_;
  if (cancelled()) return absl::CancelledError("client cancelled the run");

  ASSIGN_OR_RETURN(std::vector<ReadoutResult> readouts, plan.TakeReadouts());
  for (size_t i = 0; i < readouts.size(); ++i) {
    RETURN_IF_ERROR(streamer.Send(absl::StrCat("readouts.", i), readouts[i].values));
    if (readouts[i].indices.defined()) {
      RETURN_IF_ERROR(streamer.Send(absl::StrCat("readouts.", i, ".indices"), readouts[i].indices));
    }
  }

  const bool want_logits = run.return_type == v1::RETURN_TYPE_LOGITS || run.return_type == v1::RETURN_TYPE_BOTH;
  const bool want_loss = run.return_type == v1::RETURN_TYPE_LOSS || run.return_type == v1::RETURN_TYPE_BOTH;
  if (want_loss) {
    if (!run.input.tokens.defined() || run.input.stop_at_layer.has_value()) {
      return absl::InvalidArgumentError("return_type loss needs token input and the full model (no stop_at_layer)");
    }
    if (run.input.tokens.size(1) < 2) {
      return absl::InvalidArgumentError("return_type loss needs at least 2 positions");
    }
    const at::Tensor loss = NextTokenLoss(logits, run.input.tokens, run.input.attention_mask, run.loss_per_token);
    RETURN_IF_ERROR(streamer.Send("loss", loss.detach().to(at::kCPU, at::kFloat)));
  }
  if (want_logits) {
    RETURN_IF_ERROR(streamer.Send("logits", logits.detach().to(at::kCPU, run.logits_dtype)));
  }

  v1::RunResponse::Summary summary;
  if (run.backward) {
    const auto backward_start = std::chrono::steady_clock::now();
    const BackwardSpec& spec = *run.backward;
    at::Tensor output, output_grad;
    switch (spec.metric) {
      case BackwardSpec::Metric::kLoss:
        output = NextTokenLoss(logits, run.input.tokens, run.input.attention_mask, false);
        break;
      case BackwardSpec::Metric::kLogitDiff:
        output = LogitDifference(logits, spec.correct, spec.incorrect, spec.position);
        break;
      case BackwardSpec::Metric::kOutputGrad:
        output = logits;
        output_grad = spec.output_grad;
        break;
    }
    if (!output_grad.defined()) {
      output_grad = at::full({}, spec.metric_grad, output.options().requires_grad(false));
      RETURN_IF_ERROR(streamer.Send("metric", output.detach().to(at::kCPU, at::kFloat)));
    }
    plan.SetGradientSink([&](HookId id, at::Tensor t) -> absl::Status {
      if (cancelled()) return absl::CancelledError("client cancelled the run");
      return streamer.Send(absl::StrCat(HookName(id), "_grad"), t);
    });
    RETURN_IF_ERROR(model_.Backward(output, output_grad, &plan));
    summary.set_backward_ms(SecondsSince(backward_start) * 1e3);
  }
  if (run.store_cache) {
    ASSIGN_OR_RETURN(std::string handle, run.store(std::move(stored_)));
    summary.set_cache_handle(handle);
  }
  if (run.kv_cache) {
    PreparedKvCache& kv = *run.kv_cache;
    if (kv.frozen) {
      // Read, not extended: the handle keeps what it had (a frozen new cache keeps nothing).
      summary.set_kv_cache_handle(kv.handle);
      summary.set_kv_cache_length(kv.past_length);
    } else {
      StoredCache next;
      next.kind = StoredCache::Kind::kKeyValues;
      next.tensors = KvCacheToTensors(kv.cache);
      absl::StatusOr<std::string> handle = kv.commit(std::move(next));
      if (!handle.ok()) {
        // The run fails as a whole: the activation cache it stored above goes too, rather than
        // staying in the session (and its quota) with no handle the client ever saw.
        if (!summary.cache_handle().empty() && run.unstore) run.unstore(summary.cache_handle());
        return handle.status();
      }
      summary.set_kv_cache_handle(*handle);
      summary.set_kv_cache_length(kv.cache.length());
    }
  }
  summary.set_tokens_processed(tokens());
  summary.set_forward_ms(forward_s * 1e3);
  summary.set_bytes_streamed(streamer.sent());
  return summary;
}

absl::StatusOr<v1::RunResponse::Summary> ExecuteRun(const LlamaModel& model, PreparedRun& run,
                                                    const ChunkEmitter& emit,
                                                    const std::function<bool()>& cancelled,
                                                    ServerMetrics* metrics) {
  RunExecution execution(model, run, emit, cancelled);
  RETURN_IF_ERROR(execution.Prepare());
  const auto start = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(at::Tensor logits,
                   model.Forward(run.input, &execution.plan(), execution.kv_cache()));
  const double forward_s = SecondsSince(start);
  if (metrics != nullptr) {
    metrics->ObserveForward(forward_s);
    metrics->ObserveBatch(1, execution.tokens());
    metrics->AddTokens(execution.tokens());
  }
  absl::StatusOr<v1::RunResponse::Summary> summary = execution.Finish(std::move(logits), forward_s);
  if (metrics != nullptr) metrics->AddStreamedBytes(execution.bytes_streamed());
  return summary;
}

class GenerateExecution::Streamer : public QuotaStreamer {
 public:
  using QuotaStreamer::QuotaStreamer;
};

GenerateExecution::GenerateExecution(const LlamaModel& model, PreparedGenerate& job,
                                     std::function<std::string(int64_t)> token_text,
                                     GenerateEmitter emit, std::function<bool()> cancelled)
    : model_(model), job_(job), token_text_(std::move(token_text)), emit_(std::move(emit)),
      cancelled_(std::move(cancelled)), plan_(model.config().n_layers) {
  chunk_emit_ = [this](v1::TensorChunk&& chunk) {
    v1::GenerateResponse response;
    *response.mutable_tensor() = std::move(chunk);
    return emit_(std::move(response));
  };
  streamer_ = std::make_unique<Streamer>(chunk_emit_, job.chunk_bytes, job.max_streamed_bytes);
}

GenerateExecution::~GenerateExecution() = default;

int64_t GenerateExecution::bytes_streamed() const { return streamer_->sent(); }
double GenerateExecution::seconds() const { return SecondsSince(start_); }

absl::Status GenerateExecution::Prepare() {
  start_ = std::chrono::steady_clock::now();
  PreparedGenerate& job = job_;
  {
    // The last step attends over prompt and every new token, with the key/value cache full.
    const int64_t rows = job.tokens.size(0), prompt = job.tokens.size(1);
    const int64_t total = prompt + job.options.max_new_tokens;
    const ForwardSize prefill{rows, prompt, 0};
    const ForwardSize last = job.options.use_past_kv_cache ? ForwardSize{rows, 1, total - 1}
                                                           : ForwardSize{rows, total, 0};
    int64_t kept = 0;  // step activations wait for their step's token
    for (const CacheRequest& r : job.step_cache) {
      kept += CacheRequestBytes(r, model_.config(), model_.weights().embed.scalar_type(), prefill);
    }
    const LlamaConfig& c = model_.config();
    const at::ScalarType dtype = model_.weights().embed.scalar_type();
    RETURN_IF_ERROR(CheckJobFits(
        model_, ForwardWorkingBytes(c, dtype, prefill) >= ForwardWorkingBytes(c, dtype, last) ? prefill : last,
        kept, job.host_memory_limit_bytes));
  }
  RETURN_IF_ERROR(BuildPlan(plan_, job.ops));
  // Step activations are held until the step's token is known, then sent after its Step.
  for (const CacheRequest& request : job.step_cache) plan_.AddCache(request);
  plan_.SetCacheSink([this](HookId id, at::Tensor t) -> absl::Status {
    pending_.emplace_back(HookName(id), std::move(t));
    return absl::OkStatus();
  });
  return absl::OkStatus();
}

absl::Status GenerateExecution::OnToken(int64_t step, const at::Tensor& next) {
  if (cancelled_()) return absl::CancelledError("client cancelled the generation");
  v1::GenerateResponse response;
  auto* s = response.mutable_step();
  s->set_step(step);
  for (int64_t i = 0; i < next.size(0); ++i) {
    const int64_t id = next[i].item<int64_t>();
    s->add_tokens(id);
    if (token_text_) s->add_texts(token_text_(id));
  }
  RETURN_IF_ERROR(emit_(std::move(response)));
  for (auto& [name, t] : pending_) RETURN_IF_ERROR(streamer_->Send(name, t));
  pending_.clear();
  steps_ = step + 1;
  return absl::OkStatus();
}

absl::Status GenerateExecution::Done(const at::Tensor& sequences) {
  v1::GenerateResponse done;
  auto* d = done.mutable_done();
  ASSIGN_OR_RETURN(*d->mutable_sequences(), TensorToProto(sequences));
  d->set_steps(steps_);
  d->set_generate_ms(seconds() * 1e3);
  return emit_(std::move(done));
}

absl::Status ExecuteGenerate(const LlamaModel& model, PreparedGenerate& job,
                             const std::function<std::string(int64_t)>& token_text,
                             const GenerateEmitter& emit, const std::function<bool()>& cancelled,
                             ServerMetrics* metrics) {
  GenerateExecution execution(model, job, token_text, emit, cancelled);
  RETURN_IF_ERROR(execution.Prepare());
  absl::StatusOr<at::Tensor> sequences =
      Generate(model, job.tokens, job.attention_mask, job.options, &execution.plan(),
               [&](int64_t step, const at::Tensor& next) { return execution.OnToken(step, next); });
  if (metrics != nullptr && sequences.ok()) {
    metrics->ObserveForward(execution.seconds());
    metrics->AddTokens(sequences->numel());
    metrics->AddStreamedBytes(execution.bytes_streamed());
  }
  RETURN_IF_ERROR(sequences.status());
  return execution.Done(*sequences);
}

}  // namespace remotelens
