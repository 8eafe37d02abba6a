// Streaming RPCs of RemoteLensService: Run, RunInteractive, Generate, FetchCache, GetWeights.
// Model work is validated here on the gRPC thread, then runs as a scheduler job that streams
// through an Outbox; the reactor only moves bytes.
#include <ATen/ATen.h>

#include <atomic>
#include <deque>

#include "absl/strings/str_cat.h"
#include "engine/sampler.h"
#include "engine/status_macros.h"
#include "server/echo.h"
#include "server/executor.h"
#include "server/outbox.h"
#include "server/request_builder.h"
#include "server/run_job.h"
#include "server/service.h"
#include "server/tensor_codec.h"

namespace remotelens {
namespace {

// A server-streaming reactor whose writes come from an Outbox of `Message`s, each serialized as
// its write starts (the RPCs are registered raw; see service.h). Records the RPC's metrics when
// it finishes.
template <typename Message>
class StreamReactor final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  StreamReactor(RemoteLensService* service, const char* method)
      : service_(service), outbox_(std::make_shared<Outbox<Message>>()) {
    service_->StreamStarted();
    outbox_->SetMaxQueuedBytes(service->deps().limits.max_queued_bytes_per_call(),
                               "max_queued_bytes_per_call");
    ServerMetrics* metrics = service->deps().metrics;
    const absl::Time start = absl::Now();
    auto record = [metrics, method, start](const grpc::Status& status) {
      if (metrics != nullptr) {
        metrics->RecordRpc(method, static_cast<absl::StatusCode>(status.error_code()),
                           absl::ToDoubleSeconds(absl::Now() - start));
      }
    };
    outbox_->Attach(
        [this, record](const Message* m, grpc::WriteOptions o, std::optional<grpc::Status> last) {
          // One write is in flight at a time (the outbox's rule), so one buffer serves them all.
          buffer_.Clear();
          if (absl::Status s = SerializeResponse(*m, &buffer_); !s.ok()) {
            record(ToGrpcStatus(s));
            return this->Finish(ToGrpcStatus(s));
          }
          if (!last.has_value()) return this->StartWrite(&buffer_, o);
          record(*last);
          this->StartWriteAndFinish(&buffer_, o, std::move(*last));
        },
        [this, record](grpc::Status status) {
          record(status);
          this->Finish(std::move(status));
        });
  }
  const std::shared_ptr<Outbox<Message>>& outbox() const { return outbox_; }
  void OnWriteDone(bool ok) override { outbox_->OnWriteDone(ok); }
  void OnCancel() override { outbox_->OnCancel(); }
  void OnDone() override {
    service_->StreamDone();
    delete this;
  }

 private:
  RemoteLensService* service_;
  std::shared_ptr<Outbox<Message>> outbox_;
  grpc::ByteBuffer buffer_;  // the write in flight
};

absl::Time DeadlineOf(grpc::CallbackServerContext* ctx) {
  const auto deadline = ctx->deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return absl::InfiniteFuture();
  return absl::FromChrono(deadline);
}

// Pushes a message, or reports that the client has gone.
template <typename Message>
absl::Status PushOrCancelled(Outbox<Message>& outbox, Message message) {
  return outbox.Push(std::move(message)) ? absl::OkStatus() : absl::CancelledError("client went away");
}

// What a forward-pass job reports through: tensors as they are computed, then a Summary (or an
// error). Response is RunResponse or InteractiveResponse, which carry the same two items.
template <typename Response>
struct RunSink {
  ChunkEmitter emit;
  std::function<bool()> cancelled;
  std::function<void(absl::StatusOr<v1::RunResponse::Summary>)> done;
};

template <typename Response>
RunSink<Response> MakeRunSink(std::shared_ptr<Outbox<Response>> outbox) {
  RunSink<Response> sink;
  sink.emit = [outbox](v1::TensorChunk&& chunk) {
    Response response;
    *response.mutable_tensor() = std::move(chunk);
    return PushOrCancelled(*outbox, std::move(response));
  };
  sink.cancelled = [outbox] { return outbox->cancelled(); };
  sink.done = [outbox](absl::StatusOr<v1::RunResponse::Summary> summary) {
    if (!summary.ok()) {
      outbox->Close(ToGrpcStatus(summary.status()));
      return;
    }
    Response response;
    *response.mutable_summary() = std::move(*summary);
    outbox->PushLast(std::move(response), grpc::Status::OK);
  };
  return sink;
}

int64_t MaxTokensFor(const AuthUser& user, const v1::Limits& limits) {
  const int64_t quota = user.quota.max_tokens_per_request();
  return quota > 0 ? std::min(quota, limits.max_tokens_per_request()) : limits.max_tokens_per_request();
}

// HookReplies from an interactive client, handed from the reactor's reads to the scheduler
// thread that waits for them. At most one reply is held: the one answering the hook call in
// flight. A reply nobody asked for is refused, so a client cannot make the server buffer
// replies without bound.
class ReplyChannel {
 public:
  // The job is about to send HookCall `call_id`; its reply may arrive from now on.
  void Expect(int64_t call_id) {
    absl::MutexLock lock(&mu_);
    expected_ = call_id;
  }
  // FAILED_PRECONDITION when no hook call is waiting for a reply (or its reply already came).
  absl::Status Push(v1::HookReply reply) {
    absl::MutexLock lock(&mu_);
    if (expected_ == 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "HookReply (call_id ", reply.call_id(), ") arrived while no hook call was waiting for "
          "one; send exactly one HookReply per HookCall, after receiving it"));
    }
    expected_ = 0;
    replies_.push_back(std::move(reply));
    return absl::OkStatus();
  }
  void Close(absl::Status why) {
    absl::MutexLock lock(&mu_);
    if (closed_.ok()) closed_ = std::move(why);
  }
  absl::StatusOr<v1::HookReply> Wait(int64_t call_id, const std::string& hook, absl::Duration timeout) {
    absl::MutexLock lock(&mu_);
    auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !replies_.empty() || !closed_.ok(); };
    if (!mu_.AwaitWithTimeout(absl::Condition(&ready), timeout)) {
      return absl::DeadlineExceededError(absl::StrCat("no reply to hook call ", call_id, " (", hook,
                                                      ") within ", absl::FormatDuration(timeout),
                                                      " (hook_timeout_ms)"));
    }
    if (replies_.empty()) return closed_;
    v1::HookReply reply = std::move(replies_.front());
    replies_.pop_front();
    if (reply.call_id() != call_id) {
      return absl::InvalidArgumentError(absl::StrCat("HookReply.call_id ", reply.call_id(),
                                                     " does not answer the pending hook call ", call_id));
    }
    return reply;
  }

 private:
  absl::Mutex mu_;
  std::deque<v1::HookReply> replies_ ABSL_GUARDED_BY(mu_);
  int64_t expected_ ABSL_GUARDED_BY(mu_) = 0;  // the call awaiting a reply; 0: none
  absl::Status closed_ ABSL_GUARDED_BY(mu_);  // OK while open
};

using CallbackFactory = std::function<HookCallback(int64_t callback_id)>;

// Converts session hooks and one-shot hooks into engine ops (session hooks first).
absl::StatusOr<std::vector<InterventionOp>> BuildOps(
    const ServiceDeps& deps, const AuthUser& user, const std::string& session_id,
    const google::protobuf::RepeatedPtrField<v1::HookOp>& one_shot, const CallbackFactory& callbacks) {
  const LlamaConfig& config = deps.model->config();
  std::vector<InterventionOp> ops;
  CacheLookup lookup;
  if (!session_id.empty()) {
    lookup = [&deps, &user, session_id](const std::string& handle) {
      return deps.sessions->GetCache(user.name, session_id, handle);
    };
    ASSIGN_OR_RETURN(std::vector<SessionHook> hooks, deps.sessions->ListHooks(user.name, session_id));
    for (const SessionHook& hook : hooks) {
      const std::string what = absl::StrCat("session hook ", hook.id);
      std::shared_ptr<const ParsedHookOp> parsed = hook.parsed;
      if (parsed == nullptr) {
        ASSIGN_OR_RETURN(ParsedHookOp p, ParseHookOp(hook.op, config, false, what));
        parsed = std::make_shared<const ParsedHookOp>(std::move(p));
      }
      ASSIGN_OR_RETURN(InterventionOp built, ResolveHookOp(*parsed, config, lookup, nullptr, what));
      ops.push_back(std::move(built));
    }
  }
  if (one_shot.size() > deps.limits.max_hooks_per_session()) {
    return absl::InvalidArgumentError(absl::StrCat("hooks: ", one_shot.size(), " one-shot hooks; at most ",
                                                   deps.limits.max_hooks_per_session()));
  }
  for (int i = 0; i < one_shot.size(); ++i) {
    const v1::HookOp& op = one_shot[i];
    HookCallback callback;
    if (op.op_case() == v1::HookOp::kClientCallback && callbacks) {
      callback = callbacks(op.client_callback().callback_id());
    }
    ASSIGN_OR_RETURN(InterventionOp built,
                     BuildInterventionOp(op, config, lookup, callback, absl::StrCat("hooks[", i, "]")));
    ops.push_back(std::move(built));
  }
  return ops;
}

// Validates a RunRequest, and enqueues its forward pass. `done` receives the outcome exactly
// once (from the scheduler thread, or from Submit's caller when enqueueing fails).
absl::Status SubmitRun(RemoteLensService& service, grpc::CallbackServerContext* ctx,
                       const AuthUser& user, const v1::RunRequest& request,
                       const CallbackFactory& callbacks, ChunkEmitter emit,
                       std::function<bool()> cancelled,
                       std::function<void(absl::StatusOr<v1::RunResponse::Summary>)> done) {
  const ServiceDeps& deps = service.deps();
  ASSIGN_OR_RETURN(ConcurrencyLimiter::Lease lease, service.limiter().Acquire(user));
  const v1::Quota& quota = user.quota;
  ModelContext mc{deps.model, deps.tokenizer, &deps.limits};
  auto payload = std::make_shared<RunPayload>();
  PreparedRun* run = &payload->run;
  ASSIGN_OR_RETURN(run->input, BuildForwardInput(request, mc, MaxTokensFor(user, deps.limits)));
  ASSIGN_OR_RETURN(run->ops, BuildOps(deps, user, request.session_id(), request.hooks(), callbacks));
  const v1::CacheSelection& cache = request.cache();
  ASSIGN_OR_RETURN(run->cache, BuildCacheRequests(cache, deps.model->config()));
  if (!request.readouts().empty()) {
    const LlamaModel* model = deps.model;
    ASSIGN_OR_RETURN(run->readouts,
                     BuildReadouts(request.readouts(), model->config(), run->input,
                                   [model](const at::Tensor& residual) { return model->Lens(residual); },
                                   quota.max_streamed_bytes_per_request()));
  }
  run->stream_cache = cache.stream();
  run->store_cache = cache.store();
  if (!run->cache.empty() && !cache.stream() && !cache.store()) {
    return absl::InvalidArgumentError("cache: names are selected but neither stream nor store is set");
  }
  if (cache.store()) {
    if (request.session_id().empty()) {
      return absl::InvalidArgumentError("cache.store needs a session_id to keep the cache in");
    }
    SessionStore* sessions = deps.sessions;
    const std::string owner = user.name, session_id = request.session_id();
    const int64_t max_bytes = quota.max_stored_cache_bytes();
    run->store = [sessions, owner, session_id, max_bytes](StoredCache stored) {
      return sessions->StoreCache(owner, session_id, std::move(stored), max_bytes);
    };
    run->unstore = [sessions, owner, session_id](const std::string& handle) {
      sessions->DeleteCache(owner, session_id, handle).IgnoreError();  // gone already: fine
    };
  }
  run->return_type = request.return_type();
  run->loss_per_token = request.loss_per_token();
  if (request.logits_dtype() != v1::DTYPE_UNSPECIFIED) {
    ASSIGN_OR_RETURN(run->logits_dtype, ScalarTypeFromProto(request.logits_dtype()));
    if (!at::isFloatingType(run->logits_dtype)) {
      return absl::InvalidArgumentError("logits_dtype must be a floating dtype");
    }
  }
  run->chunk_bytes = deps.limits.chunk_bytes();
  run->max_streamed_bytes = quota.max_streamed_bytes_per_request();
  run->host_memory_limit_bytes = deps.host_memory_limit_bytes;
  if (request.has_backward()) {
    ASSIGN_OR_RETURN(run->backward, BuildBackwardSpec(request.backward(), run->input,
                                                      deps.model->config()));
    run->input.differentiable = true;
  }

  if (request.has_past_kv_cache()) {
    SessionStore* sessions = deps.sessions;
    const std::string owner = user.name, session_id = request.session_id();
    CacheLookup lookup;
    if (!session_id.empty()) {
      lookup = [sessions, owner, session_id](const std::string& handle) {
        return sessions->GetCache(owner, session_id, handle);
      };
    }
    ASSIGN_OR_RETURN(run->kv_cache, BuildPastKvCache(request, run->input, *deps.model, lookup));
    const int64_t max_bytes = quota.max_stored_cache_bytes();
    const std::string handle = run->kv_cache->handle;
    const std::shared_ptr<const StoredCache> past = run->kv_cache->past;
    run->kv_cache->commit = [sessions, owner, session_id, max_bytes, handle,
                             past](StoredCache next) -> absl::StatusOr<std::string> {
      if (handle.empty()) return sessions->StoreCache(owner, session_id, std::move(next), max_bytes);
      RETURN_IF_ERROR(sessions->ReplaceCache(owner, session_id, handle, past, std::move(next), max_bytes));
      return handle;
    };
  }

  auto shared_lease = std::make_shared<ConcurrencyLimiter::Lease>(std::move(lease));
  RemoteLensService* svc = &service;
  const bool stores = run->store_cache || (run->kv_cache && !run->kv_cache->frozen);
  payload->emit = std::move(emit);
  payload->done = [done = std::move(done), shared_lease, svc,
                   stores](absl::StatusOr<v1::RunResponse::Summary> summary) {
    if (stores) svc->UpdateSessionMetrics();
    shared_lease->Release();
    done(std::move(summary));
  };
  const at::Tensor& shaped = run->input.tokens.defined() ? run->input.tokens : run->input.residual;
  Scheduler::Job job;
  job.user = user.name;
  job.kind = callbacks ? JobKind::kInteractive : JobKind::kRun;
  job.tokens = shaped.size(0) * shaped.size(1);
  job.deadline = DeadlineOf(ctx);
  job.client_gone = std::move(cancelled);
  job.payload = std::move(payload);
  return deps.scheduler->Submit(std::move(job));
}

// Validates a GenerateRequest and enqueues its generation. `callbacks` (may be empty) serve
// client_callback hooks (RunInteractive); `emit` streams Step, tensor and Done messages; `done`
// receives the outcome exactly once (from the scheduler thread, or from Submit's caller when
// enqueueing fails).
absl::Status SubmitGenerate(RemoteLensService& service, grpc::CallbackServerContext* ctx,
                            const AuthUser& user, const v1::GenerateRequest& request,
                            const CallbackFactory& callbacks, GenerateEmitter emit,
                            std::function<bool()> cancelled, std::function<void(absl::Status)> done) {
  const ServiceDeps& deps = service.deps();
  ASSIGN_OR_RETURN(ConcurrencyLimiter::Lease lease, service.limiter().Acquire(user));
  const LlamaConfig& config = deps.model->config();
  ModelContext mc{deps.model, deps.tokenizer, &deps.limits};
  auto payload = std::make_shared<GeneratePayload>();
  PreparedGenerate* job = &payload->generate;
  ASSIGN_OR_RETURN(EncodedBatch batch,
                   BuildTokenInput(request.tokens(), request.texts(), request.prepend_bos(),
                                   request.attention_mask(), mc, MaxTokensFor(user, deps.limits)));
  job->tokens = batch.tokens;
  job->attention_mask = batch.attention_mask;
  if (request.max_new_tokens() < 1 || request.max_new_tokens() > deps.limits.max_new_tokens()) {
    return absl::InvalidArgumentError(absl::StrCat("max_new_tokens must be in 1..",
                                                   deps.limits.max_new_tokens(), ", got ",
                                                   request.max_new_tokens()));
  }
  // The token quota covers what the request makes the server hold: prompt plus new tokens.
  const int64_t rows = batch.tokens.size(0), prompt = batch.tokens.size(1);
  const int64_t max_tokens = MaxTokensFor(user, deps.limits);
  if (rows * (prompt + request.max_new_tokens()) > max_tokens) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "request has ", rows * (prompt + request.max_new_tokens()), " tokens (batch ", rows,
        " x (prompt ", prompt, " + max_new_tokens ", request.max_new_tokens(),
        ")); your limit is max_tokens_per_request = ", max_tokens));
  }
  GenerateOptions& o = job->options;
  o.max_new_tokens = request.max_new_tokens();
  const v1::SamplingParams& s = request.sampling();
  o.sampling.do_sample = s.do_sample();
  o.sampling.temperature = s.temperature() == 0 ? 1.0 : s.temperature();
  o.sampling.top_k = s.top_k();
  o.sampling.top_p = s.top_p() == 0 ? 1.0 : s.top_p();
  o.seed = s.seed();
  RETURN_IF_ERROR(ValidateSamplingOptions(o.sampling));
  o.stop_at_eos = request.stop_at_eos();
  o.eos_token_ids.assign(request.eos_token_ids().begin(), request.eos_token_ids().end());
  o.use_past_kv_cache = !request.disable_kv_cache();
  ASSIGN_OR_RETURN(job->ops, BuildOps(deps, user, request.session_id(), request.hooks(), callbacks));
  if (request.step_cache().names_size() > 0) {
    if (!request.step_cache().stream()) {
      return absl::InvalidArgumentError("step_cache: activations per step can only be streamed (set stream)");
    }
    ASSIGN_OR_RETURN(job->step_cache, BuildCacheRequests(request.step_cache(), config));
  }
  job->chunk_bytes = deps.limits.chunk_bytes();
  job->max_streamed_bytes = user.quota.max_streamed_bytes_per_request();
  job->host_memory_limit_bytes = deps.host_memory_limit_bytes;

  auto shared_lease = std::make_shared<ConcurrencyLimiter::Lease>(std::move(lease));
  const Tokenizer* tokenizer = deps.tokenizer;
  payload->token_text = [tokenizer](int64_t id) -> std::string {
    if (tokenizer == nullptr) return "";
    auto text = tokenizer->TokenToString(id);
    return text.ok() ? *text : std::string();
  };
  payload->emit = std::move(emit);
  payload->done = [done = std::move(done), shared_lease](absl::Status status) {
    shared_lease->Release();
    done(std::move(status));
  };
  Scheduler::Job sjob;
  sjob.user = user.name;
  sjob.kind = JobKind::kGenerate;
  sjob.tokens = rows * prompt;
  sjob.deadline = DeadlineOf(ctx);
  sjob.client_gone = std::move(cancelled);
  sjob.payload = std::move(payload);
  return deps.scheduler->Submit(std::move(sjob));
}

// Streams a tensor into an outbox of TensorChunk messages, within a byte budget.
absl::Status StreamToOutbox(const std::shared_ptr<Outbox<v1::TensorChunk>>& outbox,
                            const std::string& name, const at::Tensor& t, int64_t chunk_bytes) {
  return StreamTensorChunks(name, t, chunk_bytes, [&outbox](v1::TensorChunk&& chunk) {
           return PushOrCancelled(*outbox, std::move(chunk));
         }).status();
}

}  // namespace

grpc::ServerWriteReactor<grpc::ByteBuffer>* RemoteLensService::Run(grpc::CallbackServerContext* ctx,
                                                                   const grpc::ByteBuffer* raw_request) {
  auto* reactor = new StreamReactor<v1::RunResponse>(this, "Run");
  auto outbox = reactor->outbox();
  absl::Status status = [&]() -> absl::Status {
    ASSIGN_OR_RETURN(const AuthUser* user, Authenticate(ctx));
    v1::RunRequest request;
    RETURN_IF_ERROR(ParseRequest(*raw_request, "Run", &request));
    RunSink<v1::RunResponse> sink = MakeRunSink(outbox);
    return SubmitRun(*this, ctx, *user, request, nullptr, sink.emit, sink.cancelled, sink.done);
  }();
  if (!status.ok()) outbox->Close(ToGrpcStatus(status));
  return reactor;
}

namespace {

class InteractiveReactor final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  InteractiveReactor(RemoteLensService* service, grpc::CallbackServerContext* ctx)
      : service_(service), ctx_(ctx), outbox_(std::make_shared<Outbox<v1::InteractiveResponse>>()),
        replies_(std::make_shared<ReplyChannel>()) {
    service_->StreamStarted();
    outbox_->SetMaxQueuedBytes(service->deps().limits.max_queued_bytes_per_call(),
                               "max_queued_bytes_per_call");
    const absl::Time start = absl::Now();
    ServerMetrics* metrics = service->deps().metrics;
    auto record = [metrics, start](const grpc::Status& status) {
      if (metrics != nullptr) {
        metrics->RecordRpc("RunInteractive", static_cast<absl::StatusCode>(status.error_code()),
                           absl::ToDoubleSeconds(absl::Now() - start));
      }
    };
    outbox_->Attach(
        [this, record](const v1::InteractiveResponse* m, grpc::WriteOptions o,
                       std::optional<grpc::Status> last) {
          write_buffer_.Clear();
          if (absl::Status s = SerializeResponse(*m, &write_buffer_); !s.ok()) {
            record(ToGrpcStatus(s));
            return Finish(ToGrpcStatus(s));
          }
          if (!last.has_value()) return StartWrite(&write_buffer_, o);
          record(*last);
          StartWriteAndFinish(&write_buffer_, o, std::move(*last));
        },
        [this, record](grpc::Status status) {
          record(status);
          Finish(std::move(status));
        });
    StartRead(&read_buffer_);
  }

  void OnReadDone(bool ok) override {
    // Bytes that do not parse end the call with INVALID_ARGUMENT, first message or later.
    request_.Clear();
    const absl::Status parsed =
        ok ? ParseRequest(read_buffer_, "RunInteractive", &request_) : absl::OkStatus();
    if (!started_) {
      started_ = true;
      absl::Status status = parsed.ok() ? Start(ok) : parsed;
      if (!status.ok()) {
        outbox_->Close(ToGrpcStatus(status));
        return;
      }
      StartRead(&read_buffer_);
      return;
    }
    if (!ok) {
      replies_->Close(absl::CancelledError("client closed the stream while a hook call was pending"));
      return;
    }
    if (!parsed.ok()) {
      replies_->Close(parsed);
      outbox_->Close(ToGrpcStatus(parsed));
      return;
    }
    if (request_.item_case() != v1::InteractiveRequest::kReply) {
      replies_->Close(absl::InvalidArgumentError("after the RunRequest, only HookReply messages are valid"));
      return;
    }
    absl::Status pushed = replies_->Push(request_.reply());
    if (!pushed.ok()) {
      // Ends the call: the job's next push fails and a waiting job wakes with this status.
      replies_->Close(pushed);
      outbox_->Close(ToGrpcStatus(pushed));
      return;
    }
    StartRead(&read_buffer_);
  }
  void OnWriteDone(bool ok) override { outbox_->OnWriteDone(ok); }
  void OnCancel() override {
    outbox_->OnCancel();
    replies_->Close(absl::CancelledError("client cancelled"));
  }
  void OnDone() override {
    service_->StreamDone();
    delete this;
  }

 private:
  absl::Status Start(bool ok) {
    if (!ok || (request_.item_case() != v1::InteractiveRequest::kRun &&
                request_.item_case() != v1::InteractiveRequest::kGenerate)) {
      return absl::InvalidArgumentError(
          "the first RunInteractive message must be a RunRequest (run) or a GenerateRequest (generate)");
    }
    ASSIGN_OR_RETURN(const AuthUser* user, service_->Authenticate(ctx_));
    auto outbox = outbox_;
    auto replies = replies_;
    const int64_t chunk_bytes = service_->deps().limits.chunk_bytes();
    const absl::Duration timeout = absl::Milliseconds(service_->deps().limits.hook_timeout_ms());
    auto call_ids = std::make_shared<std::atomic<int64_t>>(0);
    // Hook-call activations and the run's own tensors share the streamed-bytes quota.
    auto streamed = std::make_shared<std::atomic<int64_t>>(0);
    const int64_t max_streamed = user->quota.max_streamed_bytes_per_request();
    CallbackFactory callbacks = [=](int64_t callback_id) -> HookCallback {
      return [=](HookId id, const at::Tensor& activation) -> absl::StatusOr<std::optional<at::Tensor>> {
        const int64_t call_id = ++*call_ids;
        const std::string name = HookName(id);
        const int64_t size = activation.numel() * activation.element_size();
        if (*streamed + size > max_streamed) {
          return absl::ResourceExhaustedError(absl::StrCat(
              "hook call at ", name, " would stream ", size, " bytes, past your quota of ",
              max_streamed, " streamed bytes per request (", streamed->load(), " sent)"));
        }
        *streamed += size;
        replies->Expect(call_id);
        v1::InteractiveResponse call;
        call.mutable_hook_call()->set_call_id(call_id);
        call.mutable_hook_call()->set_callback_id(callback_id);
        call.mutable_hook_call()->set_hook_name(name);
        RETURN_IF_ERROR(PushOrCancelled(*outbox, std::move(call)));
        RETURN_IF_ERROR(StreamTensorChunks(name, activation, chunk_bytes, [&](v1::TensorChunk&& chunk) {
                          v1::InteractiveResponse r;
                          *r.mutable_tensor() = std::move(chunk);
                          return PushOrCancelled(*outbox, std::move(r));
                        }).status());
        ASSIGN_OR_RETURN(v1::HookReply reply, replies->Wait(call_id, name, timeout));
        if (reply.unchanged()) return std::optional<at::Tensor>();
        ASSIGN_OR_RETURN(at::Tensor replacement,
                         TensorFromProto(reply.replacement(), "HookReply.replacement",
                                         activation.numel() + 1));
        return std::optional<at::Tensor>(std::move(replacement));
      };
    };
    if (request_.item_case() == v1::InteractiveRequest::kGenerate) {
      // Steps, step activations and Done go out as InteractiveResponses, between hook calls.
      GenerateEmitter emit = [outbox](v1::GenerateResponse&& r) {
        v1::InteractiveResponse response;
        switch (r.item_case()) {
          case v1::GenerateResponse::kStep:
            *response.mutable_step() = std::move(*r.mutable_step());
            break;
          case v1::GenerateResponse::kTensor:
            *response.mutable_tensor() = std::move(*r.mutable_tensor());
            break;
          case v1::GenerateResponse::kDone:
            *response.mutable_done() = std::move(*r.mutable_done());
            break;
          case v1::GenerateResponse::ITEM_NOT_SET:
            return absl::OkStatus();
        }
        return PushOrCancelled(*outbox, std::move(response));
      };
      return SubmitGenerate(*service_, ctx_, *user, request_.generate(), callbacks, std::move(emit),
                            [outbox] { return outbox->cancelled(); },
                            [outbox](absl::Status s) { outbox->Close(ToGrpcStatus(s)); });
    }
    RunSink<v1::InteractiveResponse> sink = MakeRunSink(outbox);
    sink.emit = [emit = std::move(sink.emit), streamed, max_streamed](v1::TensorChunk&& chunk) {
      if ((*streamed += static_cast<int64_t>(chunk.data().size())) > max_streamed) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "streaming \"", chunk.name(), "\" would exceed your quota of ", max_streamed,
            " streamed bytes per request, hook calls included"));
      }
      return emit(std::move(chunk));
    };
    return SubmitRun(*service_, ctx_, *user, request_.run(), callbacks, sink.emit, sink.cancelled,
                     sink.done);
  }

  RemoteLensService* service_;
  grpc::CallbackServerContext* ctx_;
  std::shared_ptr<Outbox<v1::InteractiveResponse>> outbox_;
  std::shared_ptr<ReplyChannel> replies_;
  grpc::ByteBuffer read_buffer_;   // the message being read
  grpc::ByteBuffer write_buffer_;  // the write in flight
  v1::InteractiveRequest request_;  // the last message read, parsed
  bool started_ = false;
};

}  // namespace

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>*
RemoteLensService::RunInteractive(grpc::CallbackServerContext* ctx) {
  return new InteractiveReactor(this, ctx);
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* RemoteLensService::Generate(
    grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw_request) {
  auto* reactor = new StreamReactor<v1::GenerateResponse>(this, "Generate");
  auto outbox = reactor->outbox();
  absl::Status status = [&]() -> absl::Status {
    ASSIGN_OR_RETURN(const AuthUser* user, Authenticate(ctx));
    v1::GenerateRequest request;
    RETURN_IF_ERROR(ParseRequest(*raw_request, "Generate", &request));
    return SubmitGenerate(
        *this, ctx, *user, request, nullptr,
        [outbox](v1::GenerateResponse&& r) { return PushOrCancelled(*outbox, std::move(r)); },
        [outbox] { return outbox->cancelled(); },
        [outbox](absl::Status s) { outbox->Close(ToGrpcStatus(s)); });
  }();
  if (!status.ok()) outbox->Close(ToGrpcStatus(status));
  return reactor;
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* RemoteLensService::FetchCache(
    grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw_request) {
  auto* reactor = new StreamReactor<v1::TensorChunk>(this, "FetchCache");
  auto outbox = reactor->outbox();
  absl::Status status = [&]() -> absl::Status {
    ASSIGN_OR_RETURN(const AuthUser* user, Authenticate(ctx));
    v1::FetchCacheRequest request;
    RETURN_IF_ERROR(ParseRequest(*raw_request, "FetchCache", &request));
    ASSIGN_OR_RETURN(std::shared_ptr<const StoredCache> cache,
                     deps_.sessions->GetCache(user->name, request.session_id(), request.cache_handle()));
    std::vector<std::pair<std::string, const at::Tensor*>> selected;
    if (request.names().empty()) {
      for (const auto& [name, t] : cache->tensors) selected.emplace_back(name, &t);
    } else {
      for (const std::string& name : request.names()) {
        const at::Tensor* t = cache->Find(name);
        if (t == nullptr) {
          return absl::NotFoundError(absl::StrCat("cache '", Echo(request.cache_handle()), "' holds no \"", Echo(name), "\""));
        }
        selected.emplace_back(name, t);
      }
    }
    int64_t total = 0;
    for (const auto& [name, t] : selected) total += t->numel() * t->element_size();
    if (total > user->quota.max_streamed_bytes_per_request()) {
      return absl::ResourceExhaustedError(absl::StrCat("fetching ", total, " bytes exceeds your quota of ",
                                                       user->quota.max_streamed_bytes_per_request(),
                                                       " streamed bytes per request; fetch fewer names"));
    }
    // Chunks are cut lazily, one per completed write, so a large cache is never duplicated into
    // messages all at once. The cursors keep their tensors (and so the cache) alive even if the
    // session deletes the cache meanwhile.
    auto cursors = std::make_shared<std::deque<ChunkCursor>>();
    for (const auto& [name, t] : selected) {
      ASSIGN_OR_RETURN(ChunkCursor cursor, ChunkCursor::Create(name, *t, deps_.limits.chunk_bytes()));
      cursors->push_back(std::move(cursor));
    }
    outbox->SetProducer([cursors]() -> std::optional<v1::TensorChunk> {
      while (!cursors->empty() && cursors->front().done()) cursors->pop_front();
      if (cursors->empty()) return std::nullopt;
      return cursors->front().Next();
    });
    if (deps_.metrics != nullptr) deps_.metrics->AddStreamedBytes(total);
    outbox->Close(grpc::Status::OK);
    return absl::OkStatus();
  }();
  if (!status.ok()) outbox->Close(ToGrpcStatus(status));
  return reactor;
}

namespace {

// A weight in TransformerLens's shape and naming.
absl::StatusOr<at::Tensor> TransformerLensWeight(const LlamaModel& model, const std::string& name,
                                                 int layer) {
  const LlamaConfig& c = model.config();
  const LlamaWeights& w = model.weights();
  if (name == "W_E") return w.embed;
  if (name == "W_U") return w.unembed.t();
  if (name == "ln_final_w") return w.ln_final;
  if (layer < 0 || layer >= c.n_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is out of range 0..", c.n_layers - 1));
  }
  const LayerWeights& l = w.layers[layer];
  const int64_t H = c.n_heads, Hkv = c.n_kv_heads, dh = c.d_head;
  // w_qkv rows: [H dh | Hkv dh | Hkv dh], each [rows, d_model]; TL wants [heads, d_model, d_head].
  auto heads = [&](int64_t row0, int64_t n) {
    return l.w_qkv.narrow(0, row0, n * dh).view({n, dh, c.d_model}).transpose(1, 2);
  };
  if (name == "W_Q") return heads(0, H);
  if (name == "W_K") return heads(H * dh, Hkv);
  if (name == "W_V") return heads((H + Hkv) * dh, Hkv);
  if (name == "W_O") return l.w_o.view({c.d_model, H, dh}).permute({1, 2, 0});
  if (name == "W_gate") return l.w_gate_up.narrow(0, 0, c.d_mlp).t();
  if (name == "W_in") return l.w_gate_up.narrow(0, c.d_mlp, c.d_mlp).t();
  if (name == "W_out") return l.w_down.t();
  if (name == "ln1_w") return l.ln1;
  if (name == "ln2_w") return l.ln2;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown weight \"", Echo(name), "\"; valid: W_E, W_U, W_Q, W_K, W_V, W_O, W_in, W_gate, W_out, ",
      "ln1_w, ln2_w, ln_final_w"));
}

}  // namespace

grpc::ServerWriteReactor<grpc::ByteBuffer>* RemoteLensService::GetWeights(
    grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw_request) {
  auto* reactor = new StreamReactor<v1::TensorChunk>(this, "GetWeights");
  auto outbox = reactor->outbox();
  absl::Status status = [&]() -> absl::Status {
    ASSIGN_OR_RETURN(const AuthUser* user, Authenticate(ctx));
    v1::GetWeightsRequest request;
    RETURN_IF_ERROR(ParseRequest(*raw_request, "GetWeights", &request));
    ASSIGN_OR_RETURN(at::Tensor weight, TransformerLensWeight(*deps_.model, request.name(), request.layer()));
    if (request.dtype() != v1::DTYPE_UNSPECIFIED) {
      ASSIGN_OR_RETURN(at::ScalarType dtype, ScalarTypeFromProto(request.dtype()));
      if (!at::isFloatingType(dtype)) {
        return absl::InvalidArgumentError("dtype: weights are floating point; use DTYPE_FLOAT32, DTYPE_BFLOAT16 or DTYPE_FLOAT16");
      }
      weight = weight.to(dtype);
    }
    const int64_t bytes = weight.numel() * weight.element_size();
    if (bytes > user->quota.max_streamed_bytes_per_request()) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "weight ", request.name(), " is ", bytes, " bytes, more than your quota of ",
          user->quota.max_streamed_bytes_per_request(), " streamed bytes per request"));
    }
    RETURN_IF_ERROR(StreamToOutbox(outbox, request.name(), weight.to(at::kCPU), deps_.limits.chunk_bytes()));
    outbox->Close(grpc::Status::OK);
    return absl::OkStatus();
  }();
  if (!status.ok()) outbox->Close(ToGrpcStatus(status));
  return reactor;
}

}  // namespace remotelens
