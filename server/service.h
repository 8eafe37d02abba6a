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
#include "remotelens/v1/config.pb.h"
#include "remotelens/v1/remotelens.grpc.pb.h"
#include "server/auth.h"
#include "server/metrics.h"
#include "server/scheduler.h"
#include "server/session_store.h"

namespace remotelens {

struct ServiceDeps {
  const LlamaModel* model = nullptr;
  const Tokenizer* tokenizer = nullptr;  // optional
  const Authenticator* auth = nullptr;
  SessionStore* sessions = nullptr;
  Scheduler* scheduler = nullptr;
  ServerMetrics* metrics = nullptr;      // optional
  v1::Limits limits;                     // with defaults filled in
  std::vector<std::string> devices;      // names, e.g. "cpu"
};

class RemoteLensService final : public v1::RemoteLens::CallbackService {
 public:
  explicit RemoteLensService(ServiceDeps deps);

  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* ctx,
                                         const v1::GetModelInfoRequest* request,
                                         v1::ModelInfo* response) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* ctx,
                                     const v1::TokenizeRequest* request,
                                     v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* ctx,
                                       const v1::DetokenizeRequest* request,
                                       v1::DetokenizeResponse* response) override;
  grpc::ServerUnaryReactor* CreateSession(grpc::CallbackServerContext* ctx,
                                          const v1::CreateSessionRequest* request,
                                          v1::Session* response) override;
  grpc::ServerUnaryReactor* CloseSession(grpc::CallbackServerContext* ctx,
                                         const v1::CloseSessionRequest* request,
                                         v1::CloseSessionResponse* response) override;
  grpc::ServerUnaryReactor* ListSessions(grpc::CallbackServerContext* ctx,
                                         const v1::ListSessionsRequest* request,
                                         v1::ListSessionsResponse* response) override;
  grpc::ServerUnaryReactor* AddHook(grpc::CallbackServerContext* ctx,
                                    const v1::AddHookRequest* request,
                                    v1::AddHookResponse* response) override;
  grpc::ServerUnaryReactor* RemoveHook(grpc::CallbackServerContext* ctx,
                                       const v1::RemoveHookRequest* request,
                                       v1::RemoveHookResponse* response) override;
  grpc::ServerUnaryReactor* ListHooks(grpc::CallbackServerContext* ctx,
                                      const v1::ListHooksRequest* request,
                                      v1::ListHooksResponse* response) override;
  grpc::ServerUnaryReactor* ResetHooks(grpc::CallbackServerContext* ctx,
                                       const v1::ResetHooksRequest* request,
                                       v1::ResetHooksResponse* response) override;
  grpc::ServerUnaryReactor* DeleteCache(grpc::CallbackServerContext* ctx,
                                        const v1::DeleteCacheRequest* request,
                                        v1::DeleteCacheResponse* response) override;

  grpc::ServerWriteReactor<v1::RunResponse>* Run(grpc::CallbackServerContext* ctx,
                                                 const v1::RunRequest* request) override;
  grpc::ServerBidiReactor<v1::InteractiveRequest, v1::InteractiveResponse>* RunInteractive(
      grpc::CallbackServerContext* ctx) override;
  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* ctx, const v1::GenerateRequest* request) override;
  grpc::ServerWriteReactor<v1::TensorChunk>* FetchCache(
      grpc::CallbackServerContext* ctx, const v1::FetchCacheRequest* request) override;
  grpc::ServerWriteReactor<v1::TensorChunk>* GetWeights(
      grpc::CallbackServerContext* ctx, const v1::GetWeightsRequest* request) override;

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
  // Authenticates, runs `body` for the caller, and finishes the RPC with its status.
  template <typename Body>
  grpc::ServerUnaryReactor* Unary(grpc::CallbackServerContext* ctx, const char* method, Body body) {
    const absl::Time start = absl::Now();
    auto user = Authenticate(ctx);
    return Finish(ctx, method, start, user.ok() ? body(**user) : user.status());
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
