// Scheduler: the one thread that owns the model. gRPC threads validate requests and Submit jobs;
// the scheduler thread runs them one at a time.
//
// Fairness is between users, not requests: each user has a FIFO of jobs and the scheduler takes
// one job from each user with pending work in turn (round robin), so a user who floods the
// queue delays only themselves. The queue is bounded over all users (RESOURCE_EXHAUSTED when
// full). A job whose deadline has passed or whose client has gone is dropped before it runs,
// its `reject` called instead of `run`.
//
//   Scheduler scheduler(options);
//   Scheduler::Job job;
//   job.user = "alice";
//   job.deadline = absl::Now() + absl::Seconds(5);
//   job.is_cancelled = [ctx] { return ctx->IsCancelled(); };
//   job.run = [=] { /* model->Forward(...) on the scheduler thread */ };
//   job.reject = [=](absl::Status status) { /* finish the RPC with status */ };
//   RETURN_IF_ERROR(scheduler.Submit(std::move(job)));
#ifndef REMOTELENS_SERVER_SCHEDULER_H_
#define REMOTELENS_SERVER_SCHEDULER_H_

#include <deque>
#include <functional>
#include <map>
#include <string>
#include <vector>
#include <thread>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace remotelens {

class Scheduler {
 public:
  struct Options {
    int max_queue = 256;  // queued jobs over all users
    // Observers (may be empty): queue depth after each change; wait time of each started job.
    std::function<void(int64_t depth)> on_depth;
    std::function<void(absl::Duration wait)> on_start;
    // Once, on the scheduler thread, before its first job: per-thread setup of what the jobs use
    // (the server initialises LibTorch's intra-op thread count there).
    std::function<void()> on_thread_start;
  };

  struct Job {
    std::string user;
    absl::Time deadline = absl::InfiniteFuture();
    std::function<bool()> is_cancelled;       // optional; polled before the job starts
    std::function<void()> run;                // on the scheduler thread
    std::function<void(absl::Status)> reject; // instead of run: deadline, cancel, shutdown
  };

  explicit Scheduler(Options options);
  ~Scheduler();  // Shutdown(absl::ZeroDuration()) if still running
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // RESOURCE_EXHAUSTED when the queue is full; UNAVAILABLE once shutting down.
  absl::Status Submit(Job job);

  // Stops accepting jobs, lets queued and running work finish for up to `grace`, rejects what is
  // still queued after that with UNAVAILABLE, and joins the thread. Idempotent.
  void Shutdown(absl::Duration grace);

  int64_t depth() const;

 private:
  struct Queued {
    Job job;
    absl::Time enqueued;
  };
  void Loop();
  bool TakeNext(Job* job, absl::Time* enqueued) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Moves queued jobs whose deadline has passed into `expired` (their callers are gone; a full
  // queue must not turn new work away for them). Only the deadline is read under the lock: an
  // is_cancelled callback may take locks of its own.
  void TakeExpired(absl::Time now, std::vector<Queued>* expired) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void NotifyDepth() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Options options_;
  mutable absl::Mutex mu_;
  std::map<std::string, std::deque<Queued>> per_user_ ABSL_GUARDED_BY(mu_);
  std::deque<std::string> turn_ ABSL_GUARDED_BY(mu_);  // users with pending jobs, in turn order
  int64_t depth_ ABSL_GUARDED_BY(mu_) = 0;
  bool accepting_ ABSL_GUARDED_BY(mu_) = true;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace remotelens

#endif  // REMOTELENS_SERVER_SCHEDULER_H_
