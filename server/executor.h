// ModelExecutor: the scheduler thread's side of the model. It receives batches of typed jobs
// (Scheduler) and runs compatible ones as rows of one forward:
//   - Runs and RunInteractive calls sharing a layer range (start_at_layer, stop_at_layer) and
//     fed tokens are left-padded to the longest and run together; each run's own plan owns its
//     rows (HookPlan::AddRequestPlan), so its ops, caches, readouts and Python hooks see exactly
//     what they would alone, and its output is cut from its own rows. Gradient runs,
//     residual inputs and past_kv_cache runs (earlier positions of their own) run alone.
//   - Generations join a decode batch (GenerationBatch) at step boundaries, up to
//     max_batch_requests of them, and leave when done; the executor stays Busy while any are
//     in it, so the scheduler interleaves new jobs with decode steps. Generations without a
//     key/value cache run alone.
// One request's failure (a bad op, a quota, a client gone, a failing Python hook) ends that
// request only.
#ifndef REMOTELENS_SERVER_EXECUTOR_H_
#define REMOTELENS_SERVER_EXECUTOR_H_

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/forward_memory.h"
#include "engine/generation_batch.h"
#include "engine/llama_model.h"
#include "server/forward_threads.h"
#include "server/metrics.h"
#include "server/run_job.h"
#include "server/scheduler.h"

namespace remotelens {

// A Run or RunInteractive job: the validated request and where its answer goes.
struct RunPayload : JobPayload {
  PreparedRun run;
  ChunkEmitter emit;
  // Exactly once: the summary or the error (finishes the RPC, releases the user's lease).
  std::function<void(absl::StatusOr<v1::RunResponse::Summary>)> done;
  absl::Time enqueued = absl::Now();
  absl::Time started;  // set when the executor takes it
};

// A Generate job.
struct GeneratePayload : JobPayload {
  PreparedGenerate generate;
  std::function<std::string(int64_t)> token_text;
  GenerateEmitter emit;
  std::function<void(absl::Status)> done;  // exactly once
};

class ModelExecutor : public Scheduler::Executor {
 public:
  struct Options {
    int max_batch_requests = 16;  // runs per forward; generations per decode step
    // CPU threads per forward by its work. small_threads <= 0: the model thread's own count,
    // read on the first Execute (after Scheduler::Options::on_thread_start set it).
    ForwardThreadPolicy threads{0, 0, 0.0, 1e8};
    // Whether a shared forward of `size` fits in memory, for runs whose own limit is
    // `host_memory_limit_bytes`; when not, its runs go one at a time. Null: CheckJobFits.
    std::function<absl::Status(const ForwardSize& size, int64_t host_memory_limit_bytes)> shared_fits;
  };
  ModelExecutor(const LlamaModel& model, ServerMetrics* metrics, Options options);
  ~ModelExecutor() override;
  // The scheduler to report finished jobs to; set before the first job.
  void set_scheduler(Scheduler* scheduler) { scheduler_ = scheduler; }

  void Execute(std::vector<Scheduler::Job> jobs) override;
  bool Busy() const override { return !generations_.empty() || !waiting_.empty(); }
  void Reject(Scheduler::Job& job, absl::Status status) override;

 private:
  struct Generation;  // one generation in the decode batch
  // Runs `group` (compatible runs) as one forward, or alone when there is one.
  void RunTogether(std::vector<Scheduler::Job*> group);
  // `prepared`: the job's execution, already prepared (a group that could not share a forward);
  // null: prepared here.
  void RunAlone(Scheduler::Job& job, std::unique_ptr<RunExecution> prepared = nullptr);
  void FinishRun(Scheduler::Job& job, absl::StatusOr<v1::RunResponse::Summary> summary,
                 int64_t tokens, int64_t streamed);
  // Prepares a generation; one that uses the key/value cache goes into `joining` (the executor
  // joins them to the decode batch together), one that recomputes runs to its end here.
  void StartGeneration(Scheduler::Job job, std::vector<GenerationBatch::Request>* joining);
  void FinishGeneration(uint64_t id, absl::Status status);
  // Before each forward: the thread count for `tokens` rows x positions (forward_threads.h).
  void UseThreadsFor(int64_t tokens);

  const LlamaModel& model_;
  ServerMetrics* metrics_;
  Options options_;
  Scheduler* scheduler_ = nullptr;
  GenerationBatch generations_;
  std::deque<Scheduler::Job> waiting_;  // generations beyond max_batch_requests
  std::map<uint64_t, std::unique_ptr<Generation>> active_;
  // The host memory bound the generations being joined were prepared under.
  int64_t joining_memory_limit_ = 0;
};

}  // namespace remotelens

#endif  // REMOTELENS_SERVER_EXECUTOR_H_
