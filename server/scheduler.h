// Scheduler: the queue in front of the one thread that owns the model. gRPC threads validate
// requests into typed jobs and Submit them; the scheduler thread hands them, a batch at a time,
// to the Executor, which runs compatible jobs as rows of shared forwards (server/executor.h).
//
// Jobs are data the scheduler can read: user, kind, token count, deadline; what to run is the
// payload, opaque here. Fairness is between users, not requests: each user has a FIFO of jobs
// and a batch takes one job from each user with pending work in turn (round robin), then goes
// round again, within max_batch_requests and max_batch_tokens, so a user who floods the queue
// delays only themselves and one huge request runs in a batch of its own instead of starving
// others. The queue is bounded over all users (RESOURCE_EXHAUSTED when full). A job whose
// deadline has passed or whose client has gone is dropped before it runs (Executor::Reject).
//
//   class MyExecutor : public Scheduler::Executor { ... };
//   MyExecutor executor;
//   Scheduler scheduler(options, &executor);
//   Scheduler::Job job;
//   job.user = "alice";
//   job.kind = JobKind::kRun;
//   job.tokens = 128;
//   job.payload = std::make_shared<RunPayload>(...);
//   RETURN_IF_ERROR(scheduler.Submit(std::move(job)));
//   // on the scheduler thread: executor.Execute({job, ...}); ... scheduler.Finished(job.id);
#ifndef REMOTELENS_SERVER_SCHEDULER_H_
#define REMOTELENS_SERVER_SCHEDULER_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace remotelens {

enum class JobKind { kRun, kInteractive, kGenerate };
inline constexpr int kNumJobKinds = 3;
const char* JobKindName(JobKind kind);  // "run", "interactive", "generate"

// What a job runs: typed request data defined by the executor (server/executor.h).
struct JobPayload {
  virtual ~JobPayload() = default;
};

class Scheduler {
 public:
  struct Job {
    uint64_t id = 0;  // assigned by Submit
    std::string user;
    JobKind kind = JobKind::kRun;
    int64_t tokens = 0;  // rows x positions the job feeds the model (its share of a batch)
    absl::Time deadline = absl::InfiniteFuture();
    std::function<bool()> client_gone;  // optional
    std::shared_ptr<JobPayload> payload;
    // Set by Cancel (an admin) while the job runs; set by Submit.
    std::shared_ptr<std::atomic<bool>> cancel_requested;

    // The client went away or an admin cancelled the job.
    bool cancelled() const {
      return (cancel_requested && cancel_requested->load()) || (client_gone && client_gone());
    }
  };

  // The model thread's side. Everything but Reject runs on the scheduler thread.
  class Executor {
   public:
    virtual ~Executor() = default;
    // Runs `jobs` (one batch; may be empty when Busy) and finishes each, calling
    // Scheduler::Finished(id) once its RPC has its answer. May keep jobs across calls:
    // generations stay in their decode batch while new jobs arrive.
    virtual void Execute(std::vector<Job> jobs) = 0;
    // Work that goes on without new jobs (decode steps): Execute is called again at once.
    virtual bool Busy() const = 0;
    // Ends a job that will not run (deadline, cancellation, shutdown, full queue) with `status`.
    // May run on any thread, never under the scheduler's lock.
    virtual void Reject(Job& job, absl::Status status) = 0;
  };

  struct Options {
    int max_queue = 256;  // queued jobs over all users
    // A batch: at most this many jobs (1 turns batching off) and this many tokens (a single job
    // over the budget still runs, alone).
    int max_batch_requests = 16;
    int64_t max_batch_tokens = 16384;
    // When the model is idle and a job arrives, wait this long for others to share its forward.
    absl::Duration batch_wait = absl::ZeroDuration();
    // Observers (may be empty): queue depth after each change; each started job and its wait;
    // jobs in flight (running) by kind after each change.
    std::function<void(int64_t depth)> on_depth;
    std::function<void(const Job& job, absl::Duration wait)> on_start;
    std::function<void(const std::array<int64_t, kNumJobKinds>& running)> on_running;
    // Once, on the scheduler thread, before its first job: per-thread setup of what the jobs use
    // (the server initialises LibTorch's intra-op thread count there).
    std::function<void()> on_thread_start;
  };

  // A job as an admin sees it.
  struct JobInfo {
    uint64_t id = 0;
    std::string user;
    JobKind kind = JobKind::kRun;
    int64_t tokens = 0;
    bool running = false;
    absl::Time enqueued;
    absl::Time started;  // running jobs
  };

  // `executor` must outlive the scheduler.
  Scheduler(Options options, Executor* executor);
  ~Scheduler();  // Shutdown(absl::ZeroDuration()) if still running
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // RESOURCE_EXHAUSTED when the queue is full; UNAVAILABLE once shutting down.
  absl::Status Submit(Job job);

  // The executor is done with job `id` (its RPC has its answer).
  void Finished(uint64_t id);

  // Running jobs, then queued ones in the order they would run.
  std::vector<JobInfo> ListJobs() const;
  // A queued job is rejected with CANCELLED at once; a running one is asked to stop (it ends
  // with CANCELLED at its next check: a hook, a decode step). NOT_FOUND for an unknown id.
  absl::Status Cancel(uint64_t id, const std::string& by);

  // Stops accepting jobs, lets queued and running work finish for up to `grace`, rejects what is
  // still queued after that with UNAVAILABLE, and joins the thread. Idempotent.
  void Shutdown(absl::Duration grace);

  int64_t depth() const;

 private:
  struct Queued {
    Job job;
    absl::Time enqueued;
  };
  struct Running {
    JobInfo info;
    std::shared_ptr<std::atomic<bool>> cancel_requested;
  };
  void Loop();
  // Takes the next batch in round-robin order within the batch limits.
  std::vector<Queued> TakeBatch() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Moves queued jobs whose deadline has passed into `expired` (their callers are gone; a full
  // queue must not turn new work away for them).
  void TakeExpired(absl::Time now, std::vector<Queued>* expired) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void NotifyDepth() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void NotifyRunning() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Options options_;
  Executor* const executor_;
  mutable absl::Mutex mu_;
  std::map<std::string, std::deque<Queued>> per_user_ ABSL_GUARDED_BY(mu_);
  std::deque<std::string> turn_ ABSL_GUARDED_BY(mu_);  // users with pending jobs, in turn order
  std::map<uint64_t, Running> running_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  int64_t depth_ ABSL_GUARDED_BY(mu_) = 0;
  bool accepting_ ABSL_GUARDED_BY(mu_) = true;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace remotelens

#endif  // REMOTELENS_SERVER_SCHEDULER_H_
