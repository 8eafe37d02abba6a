// Jobs that run on the scheduler thread: a forward pass (Run, RunInteractive) or a generation.
// Everything was validated and converted to engine types beforehand (request_builder); these
// functions only run the model and stream results through an emitter, so they know nothing of
// gRPC reactors and are testable with a plain callback.
//
//   PreparedRun run = ...;   // built on the gRPC thread
//   auto summary = ExecuteRun(model, run, [&](v1::TensorChunk&& c) { return outbox.Push(c); },
//                             [&] { return outbox.cancelled(); }, metrics);
#ifndef REMOTELENS_SERVER_RUN_JOB_H_
#define REMOTELENS_SERVER_RUN_JOB_H_

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/forward_memory.h"
#include "engine/generator.h"
#include "engine/hook_plan.h"
#include "engine/llama_model.h"
#include "remotelens/v1/remotelens.pb.h"
#include "server/metrics.h"
#include "server/request_builder.h"
#include "server/session_store.h"

namespace remotelens {

// Sends one chunk to the client. Returns CANCELLED when the client has gone.
using ChunkEmitter = std::function<absl::Status(v1::TensorChunk&&)>;

struct PreparedRun {
  ForwardInput input;
  std::vector<InterventionOp> ops;   // session hooks first, then one-shot hooks
  std::vector<CacheRequest> cache;
  std::vector<ReadoutRequest> readouts;  // streamed as "readouts.{i}" after the forward
  bool stream_cache = false;
  bool store_cache = false;
  // Stores the cache in the caller's session and returns its handle (set when store_cache).
  std::function<absl::StatusOr<std::string>(StoredCache)> store;
  // Deletes a cache `store` kept, when the run fails after storing it (set with store).
  std::function<void(const std::string& handle)> unstore;
  v1::ReturnType return_type = v1::RETURN_TYPE_LOGITS;
  bool loss_per_token = false;
  at::ScalarType logits_dtype = at::kFloat;
  int64_t chunk_bytes = 1 << 20;
  int64_t max_streamed_bytes = int64_t{4} << 30;  // the user's quota for one response
  int64_t host_memory_limit_bytes = 0;  // the server's bound on host memory (0: none)
  // RunRequest.backward: the forward is differentiable (input.differentiable) and the metric's
  // gradients stream after the forward's tensors, named "<hook>_grad".
  std::optional<BackwardSpec> backward;
  // RunRequest.past_kv_cache: the forward reads and extends kv_cache->cache; Finish commits the
  // extended cache (unless frozen) after everything else succeeded, so a failed run leaves the
  // handle as it was. Such runs run alone (server/executor).
  std::optional<PreparedKvCache> kv_cache;
};

// One run's side of a forward, in phases, so that several runs can share one forward
// (server/executor.h): Prepare checks the run fits and builds its own plan and sinks; the
// forward runs alone or shared (the run's plan then owns its rows); Finish streams readouts,
// loss and logits from the run's own output and runs its backward pass, if any.
class RunExecution {
 public:
  RunExecution(const LlamaModel& model, PreparedRun& run, ChunkEmitter emit,
               std::function<bool()> cancelled);
  ~RunExecution();
  RunExecution(const RunExecution&) = delete;
  RunExecution& operator=(const RunExecution&) = delete;

  // RESOURCE_EXHAUSTED when the run cannot fit (CheckJobFits); op validation errors.
  absl::Status Prepare();
  HookPlan& plan() { return plan_; }
  const PreparedRun& run() const { return run_; }
  // The key/value cache the forward must use (RunRequest.past_kv_cache), or null.
  KvCache* kv_cache() { return run_.kv_cache ? &run_.kv_cache->cache : nullptr; }
  // The run's rows x positions.
  int64_t tokens() const;
  // `output`: what the forward returned for this run's rows and positions only.
  absl::StatusOr<v1::RunResponse::Summary> Finish(at::Tensor output, double forward_seconds);
  int64_t bytes_streamed() const;

 private:
  class Streamer;
  const LlamaModel& model_;
  PreparedRun& run_;
  ChunkEmitter emit_;
  std::function<bool()> cancelled_;
  HookPlan plan_;
  std::unique_ptr<Streamer> streamer_;
  StoredCache stored_;
};

// Before any forward, both refuse a job that cannot fit (CheckJobFits): RESOURCE_EXHAUSTED.
absl::StatusOr<v1::RunResponse::Summary> ExecuteRun(const LlamaModel& model, PreparedRun& run,
                                                    const ChunkEmitter& emit,
                                                    const std::function<bool()>& cancelled,
                                                    ServerMetrics* metrics);

struct PreparedGenerate {
  at::Tensor tokens;          // [batch, pos]
  at::Tensor attention_mask;  // may be undefined
  GenerateOptions options;
  std::vector<InterventionOp> ops;
  std::vector<CacheRequest> step_cache;  // streamed each step
  int64_t chunk_bytes = 1 << 20;
  int64_t max_streamed_bytes = int64_t{4} << 30;
  int64_t host_memory_limit_bytes = 0;
};

// Emits a Step message per generated token column, step_cache tensors after it, then Done.
using GenerateEmitter = std::function<absl::Status(v1::GenerateResponse&&)>;

// One generation in phases, so that generations can share decode steps (GenerationBatch):
// Prepare checks it fits and builds its plan (step activations held until their step's token is
// known); OnToken streams a Step and that step's activations; Done streams the sequences.
class GenerateExecution {
 public:
  GenerateExecution(const LlamaModel& model, PreparedGenerate& job,
                    std::function<std::string(int64_t)> token_text, GenerateEmitter emit,
                    std::function<bool()> cancelled);
  ~GenerateExecution();
  GenerateExecution(const GenerateExecution&) = delete;
  GenerateExecution& operator=(const GenerateExecution&) = delete;

  absl::Status Prepare();
  HookPlan& plan() { return plan_; }
  PreparedGenerate& job() { return job_; }
  absl::Status OnToken(int64_t step, const at::Tensor& next);
  absl::Status Done(const at::Tensor& sequences);
  int64_t bytes_streamed() const;
  double seconds() const;  // since Prepare

 private:
  class Streamer;
  const LlamaModel& model_;
  PreparedGenerate& job_;
  std::function<std::string(int64_t)> token_text_;
  GenerateEmitter emit_;
  ChunkEmitter chunk_emit_;
  std::function<bool()> cancelled_;
  HookPlan plan_;
  std::unique_ptr<Streamer> streamer_;
  std::vector<std::pair<std::string, at::Tensor>> pending_;
  std::chrono::steady_clock::time_point start_;
  int64_t steps_ = 0;
};

absl::Status ExecuteGenerate(const LlamaModel& model, PreparedGenerate& job,
                             const std::function<std::string(int64_t)>& token_text,
                             const GenerateEmitter& emit, const std::function<bool()>& cancelled,
                             ServerMetrics* metrics);

// Refuses a job whose activations (ForwardWorkingBytes) and the caches it keeps until it ends
// (`kept_bytes`: stored caches, or step activations) cannot fit in what the model's device has
// left: RESOURCE_EXHAUSTED naming the job's shape, its need and what is available. Host memory is
// the least of the kernel's limits (host_memory.h) and `host_memory_limit_bytes` less what the
// process holds; CUDA memory is the driver's free memory plus the allocator's unused cache.
absl::Status CheckJobFits(const LlamaModel& model, const ForwardSize& size, int64_t kept_bytes,
                          int64_t host_memory_limit_bytes);

}  // namespace remotelens

#endif  // REMOTELENS_SERVER_RUN_JOB_H_
