// RemoteLensService: the gRPC transport. It authenticates, validates and converts requests
// (request_builder), enqueues model work on the scheduler, and streams results through an
// Outbox. It does no math (engine/), no scheduling (scheduler), no byte-level tensor coding
// (tensor_codec) and owns no state beyond references to those parts.
//
//   RemoteLensService service(deps);
//   grpc::ServerBuilder builder;
//   builder.RegisterService(&service);
#ifndef REMOTELENS_SERVER_SERVICE_H_
#define REMOTELENS_SERVER_SERVICE_H_

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "engine/llama_model.h"
#include "engine/tokenizer.h"
#include "engine/tokenizer_config.h"
#include "remotelens/v1/config.pb.h"
#include "remotelens/v1/remotelens.grpc.pb.h"
#include "server/auth.h"
#include "server/metrics.h"
#include "server/raw_messages.h"
#include "server/scheduler.h"
#include "server/session_store.h"

namespace remotelens {

struct ServiceDeps {
  const LlamaModel* model = nullptr;
  const Tokenizer* tokenizer = nullptr;  // optional
  TokenizerConfig tokenizer_config;      // chat templates for ModelInfo; empty when none
  const Authenticator* auth = nullptr;
  SessionStore* sessions = nullptr;
  Scheduler* scheduler = nullptr;
  ServerMetrics* metrics = nullptr;      // optional
  v1::Limits limits;                     // with defaults filled in
  std::vector<std::string> devices;      // names, e.g. "cpu"
  // load.host_memory_limit_bytes: also bounds what requests may take (0: only the kernel's limits).
  int64_t host_memory_limit_bytes = 0;
};

// Every RPC is registered raw, grpc::ByteBuffer in and out, and parsed here (raw_messages.h):
// gRPC's generated handlers answer a request that does not parse with UNIMPLEMENTED and an empty
// message, which tells the caller nothing. See docs/decisions.md, "Hardening".
using RawRemoteLensService =
    v1::RemoteLens::WithRawCallbackMethod_GetModelInfo<
        v1::RemoteLens::WithRawCallbackMethod_Tokenize<
        v1::RemoteLens::WithRawCallbackMethod_Detokenize<
        v1::RemoteLens::WithRawCallbackMethod_CreateSession<
        v1::RemoteLens::WithRawCallbackMethod_CloseSession<
        v1::RemoteLens::WithRawCallbackMethod_ListSessions<
        v1::RemoteLens::WithRawCallbackMethod_AddHook<
        v1::RemoteLens::WithRawCallbackMethod_RemoveHook<
        v1::RemoteLens::WithRawCallbackMethod_ListHooks<
        v1::RemoteLens::WithRawCallbackMethod_ResetHooks<
        v1::RemoteLens::WithRawCallbackMethod_Run<
        v1::RemoteLens::WithRawCallbackMethod_RunInteractive<
        v1::RemoteLens::WithRawCallbackMethod_Generate<
        v1::RemoteLens::WithRawCallbackMethod_FetchCache<
        v1::RemoteLens::WithRawCallbackMethod_DeleteCache<
        v1::RemoteLens::WithRawCallbackMethod_GetWeights<
        v1::RemoteLens::WithRawCallbackMethod_ListJobs<
        v1::RemoteLens::WithRawCallbackMethod_CancelJob<
        v1::RemoteLens::Service>>>>>>>>>>>>>>>>>>;

class RemoteLensService final : public RawRemoteLensService {
 public:
  explicit RemoteLensService(ServiceDeps deps);

  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* ctx,
                                         const grpc::ByteBuffer* request,
                                         grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* ctx,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* ctx,
                                       const grpc::ByteBuffer* request,
                                       grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* CreateSession(grpc::CallbackServerContext* ctx,
                                          const grpc::ByteBuffer* request,
                                          grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* CloseSession(grpc::CallbackServerContext* ctx,
                                         const grpc::ByteBuffer* request,
                                         grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* ListSessions(grpc::CallbackServerContext* ctx,
                                         const grpc::ByteBuffer* request,
                                         grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* AddHook(grpc::CallbackServerContext* ctx,
                                    const grpc::ByteBuffer* request,
                                    grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* RemoveHook(grpc::CallbackServerContext* ctx,
                                       const grpc::ByteBuffer* request,
                                       grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* ListHooks(grpc::CallbackServerContext* ctx,
                                      const grpc::ByteBuffer* request,
                                      grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* ResetHooks(grpc::CallbackServerContext* ctx,
                                       const grpc::ByteBuffer* request,
                                       grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* ListJobs(grpc::CallbackServerContext* ctx,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* CancelJob(grpc::CallbackServerContext* ctx,
                                      const grpc::ByteBuffer* request,
                                      grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* DeleteCache(grpc::CallbackServerContext* ctx,
                                        const grpc::ByteBuffer* request,
                                        grpc::ByteBuffer* response) override;
  grpc::ServerWriteReactor<grpc::ByteBuffer>* Run(grpc::CallbackServerContext* ctx,
                                                  const grpc::ByteBuffer* request) override;
  grpc::ServerWriteReactor<grpc::ByteBuffer>* Generate(grpc::CallbackServerContext* ctx,
                                                  const grpc::ByteBuffer* request) override;
  grpc::ServerWriteReactor<grpc::ByteBuffer>* FetchCache(grpc::CallbackServerContext* ctx,
                                                  const grpc::ByteBuffer* request) override;
  grpc::ServerWriteReactor<grpc::ByteBuffer>* GetWeights(grpc::CallbackServerContext* ctx,
                                                  const grpc::ByteBuffer* request) override;
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* RunInteractive(
      grpc::CallbackServerContext* ctx) override;

  // Shared by the stream handlers (service_streams.cc); public for the reactors there.
  const ServiceDeps& deps() const { return deps_; }
  absl::StatusOr<const AuthUser*> Authenticate(grpc::CallbackServerContext* ctx) const;
  void UpdateSessionMetrics() const;
  ConcurrencyLimiter& limiter() { return limiter_; }

  // Shutdown: after BeginDrain every new call is UNAVAILABLE; streaming calls already running
  // finish. The server waits for active_streams() to reach zero (or its grace period).
  void BeginDrain() { draining_ = true; }
  int active_streams() const { return active_streams_.load(); }
  void StreamStarted() { ++active_streams_; }
  void StreamDone() { --active_streams_; }

 private:
  // Authenticates, parses the request, runs `body(user, request, &response)` for the caller,
  // serializes the response and finishes the RPC with the status.
  template <typename Request, typename Response, typename Body>
  grpc::ServerUnaryReactor* Unary(grpc::CallbackServerContext* ctx, const char* method,
                                  const grpc::ByteBuffer* raw_request, grpc::ByteBuffer* raw_response,
                                  Body body) {
    const absl::Time start = absl::Now();
    absl::Status status = [&]() -> absl::Status {
      auto user = Authenticate(ctx);
      if (!user.ok()) return user.status();
      Request request;
      Response response;
      absl::Status parsed = ParseRequest(*raw_request, method, &request);
      if (!parsed.ok()) return parsed;
      absl::Status done = body(**user, request, &response);
      if (!done.ok()) return done;
      return SerializeResponse(response, raw_response);
    }();
    return Finish(ctx, method, start, status);
  }
  grpc::ServerUnaryReactor* Finish(grpc::CallbackServerContext* ctx, const char* method,
                                   absl::Time start, const absl::Status& status);

  ServiceDeps deps_;
  ConcurrencyLimiter limiter_;
  std::atomic<bool> draining_{false};
  std::atomic<int> active_streams_{0};
};

grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace remotelens

#endif  // REMOTELENS_SERVER_SERVICE_H_
