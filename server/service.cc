// Unary RPCs of RemoteLensService. The streaming RPCs are in service_streams.cc.
#include "server/service.h"

#include <ATen/ATen.h>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "engine/hook_names.h"
#include "engine/status_macros.h"
#include "server/echo.h"
#include "server/request_builder.h"
#include "server/tensor_codec.h"

namespace remotelens {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  // Messages echo caller input through Echo(); this cap is the backstop that keeps any status
  // inside gRPC's trailer limits, so the code the caller sees is the real one.
  constexpr size_t kMaxMessageBytes = 1024;
  absl::string_view message = status.message();
  if (message.size() <= kMaxMessageBytes) {
    return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(message));
  }
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()),
                      absl::StrCat(Echo(message.substr(0, kMaxMessageBytes - 32)), " [truncated]"));
}

RemoteLensService::RemoteLensService(ServiceDeps deps) : deps_(std::move(deps)) {}

absl::StatusOr<const AuthUser*> RemoteLensService::Authenticate(
    grpc::CallbackServerContext* ctx) const {
  if (draining_) return absl::UnavailableError("server is shutting down; retry on another replica");
  const auto& metadata = ctx->client_metadata();
  auto it = metadata.find("authorization");
  absl::string_view value;
  if (it != metadata.end()) value = absl::string_view(it->second.data(), it->second.size());
  return deps_.auth->Authenticate(value);
}

void RemoteLensService::UpdateSessionMetrics() const {
  if (deps_.metrics == nullptr) return;
  deps_.metrics->SetActiveSessions(deps_.sessions->NumSessions());
  deps_.metrics->SetActiveHooks(deps_.sessions->NumHooks());
  deps_.metrics->SetStoredCacheBytes(deps_.sessions->StoredBytes());
}

grpc::ServerUnaryReactor* RemoteLensService::Finish(grpc::CallbackServerContext* ctx,
                                                    const char* method, absl::Time start,
                                                    const absl::Status& status) {
  if (deps_.metrics != nullptr) {
    deps_.metrics->RecordRpc(method, status.code(), absl::ToDoubleSeconds(absl::Now() - start));
  }
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

namespace {

absl::Status RequireAdmin(const AuthUser& user, const char* method) {
  if (user.admin) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrCat(
      method, " is for operators: it needs a user with role \"admin\" in the users file"));
}

}  // namespace

namespace {

v1::Session SessionToProto(const SessionSummary& s) {
  v1::Session out;
  out.set_session_id(s.id);
  out.set_ttl_seconds(absl::ToInt64Seconds(s.ttl));
  out.set_expires_unix_ms(absl::ToUnixMillis(s.expires));
  out.set_num_hooks(s.num_hooks);
  out.set_num_caches(s.num_caches);
  out.set_stored_cache_bytes(s.stored_bytes);
  out.set_owner(s.owner);
  return out;
}

}  // namespace

grpc::ServerUnaryReactor* RemoteLensService::GetModelInfo(grpc::CallbackServerContext* ctx,
                                                          const grpc::ByteBuffer* raw_request,
                                                          grpc::ByteBuffer* raw_response) {
  return Unary<v1::GetModelInfoRequest, v1::ModelInfo>(
      ctx, "GetModelInfo", raw_request, raw_response,
      [&](const AuthUser& user, const v1::GetModelInfoRequest& request, v1::ModelInfo* out) -> absl::Status {
    const LlamaConfig& c = deps_.model->config();
    out->set_model_name(c.model_name);
    out->set_n_layers(c.n_layers);
    out->set_d_model(c.d_model);
    out->set_n_heads(c.n_heads);
    out->set_n_key_value_heads(c.n_kv_heads);
    out->set_d_head(c.d_head);
    out->set_d_mlp(c.d_mlp);
    out->set_d_vocab(c.d_vocab);
    out->set_n_ctx(c.n_ctx);
    out->set_rms_norm_eps(c.rms_norm_eps);
    out->set_rope_theta(c.rope_theta);
    out->set_dtype(DTypeToProto(deps_.model->weights().embed.scalar_type()));
    for (const std::string& d : deps_.devices) out->add_devices(d);
    for (HookId id : AllHookIds(c.n_layers)) {
      v1::HookInfo* info = out->add_hooks();
      info->set_name(HookName(id));
      for (int64_t d : HookShape(id, c)) info->add_shape(d);
      for (std::string& dim : HookDims(id.site)) info->add_dims(std::move(dim));
      info->set_pos_dim(PosDim(id.site));
      info->set_head_dim(HeadDim(id.site));
      for (std::string& alias : HookAliases(id, c.n_layers)) info->add_aliases(std::move(alias));
      info->set_enabled_by(std::string(EnablingFlag(id.site)));
      info->set_supports_backward(true);  // every hook point is on the differentiable path
    }
    out->set_bos_token_id(c.bos_token_id);
    for (int64_t id : c.eos_token_ids) out->add_eos_token_ids(id);
    out->set_tie_word_embeddings(c.tie_word_embeddings);
    out->set_rope_scaling(c.rope_scaling.type == RopeScaling::Type::kLlama3 ? "llama3" : "");
    out->set_api_version(v1::API_VERSION_CURRENT);
    for (const ChatTemplateSource& t : deps_.tokenizer_config.chat_templates) {
      v1::ChatTemplate* chat_template = out->add_chat_templates();
      chat_template->set_name(t.name);
      chat_template->set_source(t.source);
    }
    out->set_bos_token(deps_.tokenizer_config.bos_token);
    out->set_eos_token(deps_.tokenizer_config.eos_token);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* RemoteLensService::Tokenize(grpc::CallbackServerContext* ctx,
                                                      const grpc::ByteBuffer* raw_request,
                                                      grpc::ByteBuffer* raw_response) {
  return Unary<v1::TokenizeRequest, v1::TokenizeResponse>(
      ctx, "Tokenize", raw_request, raw_response,
      [&](const AuthUser& user, const v1::TokenizeRequest& request, v1::TokenizeResponse* out) -> absl::Status {
    ModelContext mc{deps_.model, deps_.tokenizer, &deps_.limits};
    ASSIGN_OR_RETURN(EncodedBatch batch, EncodeTexts(mc, request.texts(), request.prepend_bos(),
                                                     request.padding_side()));
    ASSIGN_OR_RETURN(*out->mutable_tokens(), TensorToProto(batch.tokens));
    ASSIGN_OR_RETURN(*out->mutable_attention_mask(), TensorToProto(batch.attention_mask));
    for (int64_t n : batch.lengths) out->add_lengths(n);
    out->set_pad_token_id(batch.pad_token_id);
    if (request.return_str_tokens()) {
      const bool right = request.padding_side() == v1::PADDING_SIDE_RIGHT;
      const auto ids = batch.tokens.accessor<int64_t, 2>();
      for (int64_t r = 0; r < ids.size(0); ++r) {
        v1::StrTokens* row = out->add_str_tokens();
        const int64_t n = batch.lengths[r], first = right ? 0 : ids.size(1) - n;
        for (int64_t i = first; i < first + n; ++i) {
          ASSIGN_OR_RETURN(*row->add_tokens(), deps_.tokenizer->TokenToString(ids[r][i]));
        }
      }
    }
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* RemoteLensService::Detokenize(grpc::CallbackServerContext* ctx,
                                                        const grpc::ByteBuffer* raw_request,
                                                        grpc::ByteBuffer* raw_response) {
  return Unary<v1::DetokenizeRequest, v1::DetokenizeResponse>(
      ctx, "Detokenize", raw_request, raw_response,
      [&](const AuthUser& user, const v1::DetokenizeRequest& request, v1::DetokenizeResponse* out) -> absl::Status {
    if (deps_.tokenizer == nullptr) {
      return absl::FailedPreconditionError("this model has no tokenizer.json");
    }
    if (request.rows_size() > deps_.limits.max_batch()) {
      return absl::InvalidArgumentError(absl::StrCat("rows: ", request.rows_size(),
                                                     " rows; at most max_batch = ", deps_.limits.max_batch()));
    }
    for (int r = 0; r < request.rows_size(); ++r) {
      const auto& ids = request.rows(r).ids();
      if (ids.size() > deps_.limits.max_tokens_per_request()) {
        return absl::InvalidArgumentError(absl::StrCat("rows[", r, "]: too many ids"));
      }
      auto text = deps_.tokenizer->Decode(absl::MakeConstSpan(ids.data(), ids.size()));
      if (!text.ok()) {
        return absl::Status(text.status().code(), absl::StrCat("rows[", r, "]: ", text.status().message()));
      }
      out->add_texts(*text);
      if (request.return_str_tokens()) {
        v1::StrTokens* row = out->add_str_tokens();
        for (int64_t id : ids) {
          ASSIGN_OR_RETURN(*row->add_tokens(), deps_.tokenizer->TokenToString(id));
        }
      }
    }
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* RemoteLensService::CreateSession(grpc::CallbackServerContext* ctx,
                                                           const grpc::ByteBuffer* raw_request,
                                                           grpc::ByteBuffer* raw_response) {
  return Unary<v1::CreateSessionRequest, v1::Session>(
      ctx, "CreateSession", raw_request, raw_response,
      [&](const AuthUser& user, const v1::CreateSessionRequest& request, v1::Session* out) -> absl::Status {
    if (request.ttl_seconds() < 0) {
      return absl::InvalidArgumentError("ttl_seconds must be >= 0 (0: the server default)");
    }
    ASSIGN_OR_RETURN(SessionSummary s, deps_.sessions->Create(user.name, absl::Seconds(request.ttl_seconds())));
    *out = SessionToProto(s);
    UpdateSessionMetrics();
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* RemoteLensService::CloseSession(grpc::CallbackServerContext* ctx,
                                                          const grpc::ByteBuffer* raw_request,
                                                          grpc::ByteBuffer* raw_response) {
  return Unary<v1::CloseSessionRequest, v1::CloseSessionResponse>(
      ctx, "CloseSession", raw_request, raw_response,
      [&](const AuthUser& user, const v1::CloseSessionRequest& request, v1::CloseSessionResponse* out) -> absl::Status {
    RETURN_IF_ERROR(deps_.sessions->Close(user.name, request.session_id()));
    UpdateSessionMetrics();
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* RemoteLensService::ListSessions(grpc::CallbackServerContext* ctx,
                                                          const grpc::ByteBuffer* raw_request,
                                                          grpc::ByteBuffer* raw_response) {
  return Unary<v1::ListSessionsRequest, v1::ListSessionsResponse>(
      ctx, "ListSessions", raw_request, raw_response,
      [&](const AuthUser& user, const v1::ListSessionsRequest& request, v1::ListSessionsResponse* out) -> absl::Status {
    // config.proto's role "admin": every user's sessions; anyone else: their own.
    const std::vector<SessionSummary> sessions =
        user.admin ? deps_.sessions->ListAll() : deps_.sessions->List(user.name);
    for (const SessionSummary& s : sessions) *out->add_sessions() = SessionToProto(s);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* RemoteLensService::ListJobs(grpc::CallbackServerContext* ctx,
                                                      const grpc::ByteBuffer* raw_request,
                                                      grpc::ByteBuffer* raw_response) {
  return Unary<v1::ListJobsRequest, v1::ListJobsResponse>(
      ctx, "ListJobs", raw_request, raw_response,
      [&](const AuthUser& user, const v1::ListJobsRequest&, v1::ListJobsResponse* out) -> absl::Status {
    RETURN_IF_ERROR(RequireAdmin(user, "ListJobs"));
    const absl::Time now = absl::Now();
    for (const Scheduler::JobInfo& info : deps_.scheduler->ListJobs()) {
      v1::Job* job = out->add_jobs();
      job->set_job_id(info.id);
      job->set_user(info.user);
      job->set_kind(JobKindName(info.kind));
      job->set_tokens(info.tokens);
      job->set_state(info.running ? "running" : "queued");
      job->set_age_seconds(absl::ToDoubleSeconds(now - info.enqueued));
    }
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* RemoteLensService::CancelJob(grpc::CallbackServerContext* ctx,
                                                       const grpc::ByteBuffer* raw_request,
                                                       grpc::ByteBuffer* raw_response) {
  return Unary<v1::CancelJobRequest, v1::CancelJobResponse>(
      ctx, "CancelJob", raw_request, raw_response,
      [&](const AuthUser& user, const v1::CancelJobRequest& request, v1::CancelJobResponse*) -> absl::Status {
    RETURN_IF_ERROR(RequireAdmin(user, "CancelJob"));
    return deps_.scheduler->Cancel(request.job_id(), user.name);
  });
}

grpc::ServerUnaryReactor* RemoteLensService::AddHook(grpc::CallbackServerContext* ctx,
                                                     const grpc::ByteBuffer* raw_request,
                                                     grpc::ByteBuffer* raw_response) {
  return Unary<v1::AddHookRequest, v1::AddHookResponse>(
      ctx, "AddHook", raw_request, raw_response,
      [&](const AuthUser& user, const v1::AddHookRequest& request, v1::AddHookResponse* out) -> absl::Status {
    // Parsed (and its values decoded) once, here; every later run uses the parsed form.
    ASSIGN_OR_RETURN(ParsedHookOp parsed,
                     ParseHookOp(request.op(), deps_.model->config(), /*allow_callback=*/false, "op"));
    ASSIGN_OR_RETURN(int64_t id, deps_.sessions->AddHook(
                                     user.name, request.session_id(), request.op(), request.prepend(),
                                     user.quota.max_stored_cache_bytes(),
                                     std::make_shared<const ParsedHookOp>(std::move(parsed))));
    out->set_hook_id(id);
    UpdateSessionMetrics();
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* RemoteLensService::RemoveHook(grpc::CallbackServerContext* ctx,
                                                        const grpc::ByteBuffer* raw_request,
                                                        grpc::ByteBuffer* raw_response) {
  return Unary<v1::RemoveHookRequest, v1::RemoveHookResponse>(
      ctx, "RemoveHook", raw_request, raw_response,
      [&](const AuthUser& user, const v1::RemoveHookRequest& request, v1::RemoveHookResponse* out) -> absl::Status {
    RETURN_IF_ERROR(deps_.sessions->RemoveHook(user.name, request.session_id(), request.hook_id()));
    UpdateSessionMetrics();
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* RemoteLensService::ListHooks(grpc::CallbackServerContext* ctx,
                                                       const grpc::ByteBuffer* raw_request,
                                                       grpc::ByteBuffer* raw_response) {
  return Unary<v1::ListHooksRequest, v1::ListHooksResponse>(
      ctx, "ListHooks", raw_request, raw_response,
      [&](const AuthUser& user, const v1::ListHooksRequest& request, v1::ListHooksResponse* out) -> absl::Status {
    ASSIGN_OR_RETURN(auto hooks, deps_.sessions->ListHooks(user.name, request.session_id()));
    for (SessionHook& hook : hooks) {
      v1::RegisteredHook* h = out->add_hooks();
      h->set_hook_id(hook.id);
      *h->mutable_op() = std::move(hook.op);
    }
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* RemoteLensService::ResetHooks(grpc::CallbackServerContext* ctx,
                                                        const grpc::ByteBuffer* raw_request,
                                                        grpc::ByteBuffer* raw_response) {
  return Unary<v1::ResetHooksRequest, v1::ResetHooksResponse>(
      ctx, "ResetHooks", raw_request, raw_response,
      [&](const AuthUser& user, const v1::ResetHooksRequest& request, v1::ResetHooksResponse* out) -> absl::Status {
    ASSIGN_OR_RETURN(int64_t removed, deps_.sessions->ResetHooks(user.name, request.session_id()));
    out->set_removed(removed);
    UpdateSessionMetrics();
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* RemoteLensService::DeleteCache(grpc::CallbackServerContext* ctx,
                                                         const grpc::ByteBuffer* raw_request,
                                                         grpc::ByteBuffer* raw_response) {
  return Unary<v1::DeleteCacheRequest, v1::DeleteCacheResponse>(
      ctx, "DeleteCache", raw_request, raw_response,
      [&](const AuthUser& user, const v1::DeleteCacheRequest& request, v1::DeleteCacheResponse* out) -> absl::Status {
    ASSIGN_OR_RETURN(int64_t freed, deps_.sessions->DeleteCache(user.name, request.session_id(),
                                                                request.cache_handle()));
    out->set_freed_bytes(freed);
    UpdateSessionMetrics();
    return absl::OkStatus();
  });
}

}  // namespace remotelens
