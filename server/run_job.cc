#include "server/run_job.h"

#include <ATen/ATen.h>

#include <chrono>

#include "absl/strings/str_cat.h"
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

absl::Status BuildPlan(HookPlan& plan, std::vector<InterventionOp>& ops) {
  for (InterventionOp& op : ops) RETURN_IF_ERROR(plan.AddIntervention(op));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<v1::RunResponse::Summary> ExecuteRun(const LlamaModel& model, PreparedRun& run,
                                                    const ChunkEmitter& emit,
                                                    const std::function<bool()>& cancelled,
                                                    ServerMetrics* metrics) {
  const LlamaConfig& config = model.config();
  HookPlan plan(config.n_layers);
  RETURN_IF_ERROR(BuildPlan(plan, run.ops));
  QuotaStreamer streamer(emit, run.chunk_bytes, run.max_streamed_bytes);
  StoredCache stored;
  for (const CacheRequest& request : run.cache) plan.AddCache(request);
  for (ReadoutRequest& request : run.readouts) RETURN_IF_ERROR(plan.AddReadout(std::move(request)));
  plan.SetCacheSink([&](HookId id, at::Tensor t) -> absl::Status {
    // Checked at every cached hook: a vanished client stops the forward pass early.
    if (cancelled()) return absl::CancelledError("client cancelled the run");
    const std::string name = HookName(id);
    if (run.stream_cache) RETURN_IF_ERROR(streamer.Send(name, t));
    if (run.store_cache) {
      stored.bytes += t.numel() * t.element_size();
      stored.tensors.emplace_back(name, std::move(t));
    }
    return absl::OkStatus();
  });

  const auto start = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(at::Tensor logits, model.Forward(run.input, &plan));
  const double forward_s = SecondsSince(start);
  const int64_t tokens = run.input.tokens.defined() ? run.input.tokens.numel()
                                                    : run.input.residual.size(0) * run.input.residual.size(1);
  if (metrics != nullptr) {
    metrics->ObserveForward(forward_s);
    metrics->AddTokens(tokens);
  }
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
    RETURN_IF_ERROR(streamer.Send("loss", loss.to(at::kCPU, at::kFloat)));
  }
  if (want_logits) RETURN_IF_ERROR(streamer.Send("logits", logits.to(at::kCPU, run.logits_dtype)));

  v1::RunResponse::Summary summary;
  if (run.store_cache) {
    ASSIGN_OR_RETURN(std::string handle, run.store(std::move(stored)));
    summary.set_cache_handle(handle);
  }
  summary.set_tokens_processed(tokens);
  summary.set_forward_ms(forward_s * 1e3);
  summary.set_bytes_streamed(streamer.sent());
  if (metrics != nullptr) metrics->AddStreamedBytes(streamer.sent());
  return summary;
}

absl::Status ExecuteGenerate(const LlamaModel& model, PreparedGenerate& job,
                             const std::function<std::string(int64_t)>& token_text,
                             const GenerateEmitter& emit, const std::function<bool()>& cancelled,
                             ServerMetrics* metrics) {
  HookPlan plan(model.config().n_layers);
  RETURN_IF_ERROR(BuildPlan(plan, job.ops));
  ChunkEmitter chunk_emit = [&](v1::TensorChunk&& chunk) {
    v1::GenerateResponse response;
    *response.mutable_tensor() = std::move(chunk);
    return emit(std::move(response));
  };
  QuotaStreamer streamer(chunk_emit, job.chunk_bytes, job.max_streamed_bytes);
  // Step activations are held until the step's token is known, then sent after its Step.
  std::vector<std::pair<std::string, at::Tensor>> pending;
  for (const CacheRequest& request : job.step_cache) plan.AddCache(request);
  plan.SetCacheSink([&](HookId id, at::Tensor t) -> absl::Status {
    pending.emplace_back(HookName(id), std::move(t));
    return absl::OkStatus();
  });
  const auto start = std::chrono::steady_clock::now();
  int64_t steps = 0;
  auto on_token = [&](int64_t step, const at::Tensor& next) -> absl::Status {
    if (cancelled()) return absl::CancelledError("client cancelled the generation");
    v1::GenerateResponse response;
    auto* s = response.mutable_step();
    s->set_step(step);
    for (int64_t i = 0; i < next.size(0); ++i) {
      const int64_t id = next[i].item<int64_t>();
      s->add_tokens(id);
      if (token_text) s->add_texts(token_text(id));
    }
    RETURN_IF_ERROR(emit(std::move(response)));
    for (auto& [name, t] : pending) RETURN_IF_ERROR(streamer.Send(name, t));
    pending.clear();
    steps = step + 1;
    return absl::OkStatus();
  };
  ASSIGN_OR_RETURN(at::Tensor sequences, Generate(model, job.tokens, job.attention_mask, job.options,
                                                  &plan, on_token));
  if (metrics != nullptr) {
    metrics->ObserveForward(SecondsSince(start));
    metrics->AddTokens(sequences.numel());
    metrics->AddStreamedBytes(streamer.sent());
  }
  v1::GenerateResponse done;
  auto* d = done.mutable_done();
  ASSIGN_OR_RETURN(*d->mutable_sequences(), TensorToProto(sequences));
  d->set_steps(steps);
  d->set_generate_ms(SecondsSince(start) * 1e3);
  return emit(std::move(done));
}

}  // namespace remotelens
