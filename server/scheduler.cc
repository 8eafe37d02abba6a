#include "server/scheduler.h"

#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace remotelens {

const char* JobKindName(JobKind kind) {
  switch (kind) {
    case JobKind::kRun:
      return "run";
    case JobKind::kInteractive:
      return "interactive";
    case JobKind::kGenerate:
      return "generate";
  }
  return "run";
}

Scheduler::Scheduler(Options options, Executor* executor)
    : options_(std::move(options)), executor_(executor) {
  thread_ = std::thread([this] { Loop(); });
}

Scheduler::~Scheduler() { Shutdown(absl::ZeroDuration()); }

absl::Status Scheduler::Submit(Job job) {
  std::vector<Queued> expired;
  absl::Status status;
  const absl::Time now = absl::Now();
  {
    absl::MutexLock lock(&mu_);
    if (!accepting_) return absl::UnavailableError("server is shutting down; not accepting new work");
    if (depth_ >= options_.max_queue) TakeExpired(now, &expired);
    if (depth_ >= options_.max_queue) {
      status = absl::ResourceExhaustedError(absl::StrCat(
          "request queue is full (", depth_, " queued, max_queue ", options_.max_queue,
          "); retry later"));
    } else {
      job.id = next_id_++;
      job.cancel_requested = std::make_shared<std::atomic<bool>>(false);
      auto& queue = per_user_[job.user];
      if (queue.empty()) turn_.push_back(job.user);
      queue.push_back({std::move(job), now});
      ++depth_;
      NotifyDepth();
    }
  }
  // Outside the lock: rejecting finishes a gRPC call.
  for (Queued& q : expired) {
    executor_->Reject(q.job, absl::DeadlineExceededError(absl::StrCat(
                                 "deadline passed after ", absl::FormatDuration(now - q.enqueued),
                                 " in the queue")));
  }
  return status;
}

void Scheduler::TakeExpired(absl::Time now, std::vector<Queued>* expired) {
  for (auto it = per_user_.begin(); it != per_user_.end();) {
    std::deque<Queued>& queue = it->second;
    for (auto q = queue.begin(); q != queue.end();) {
      if (now > q->job.deadline) {
        expired->push_back(std::move(*q));
        q = queue.erase(q);
        --depth_;
      } else {
        ++q;
      }
    }
    if (queue.empty()) {
      turn_.erase(std::remove(turn_.begin(), turn_.end(), it->first), turn_.end());
      it = per_user_.erase(it);
    } else {
      ++it;
    }
  }
  if (!expired->empty()) NotifyDepth();
}

void Scheduler::NotifyDepth() {
  if (options_.on_depth) options_.on_depth(depth_);
}

void Scheduler::NotifyRunning() {
  if (!options_.on_running) return;
  std::array<int64_t, kNumJobKinds> running{};
  for (const auto& [id, r] : running_) ++running[static_cast<int>(r.info.kind)];
  options_.on_running(running);
}

std::vector<Scheduler::Queued> Scheduler::TakeBatch() {
  std::vector<Queued> batch;
  int64_t tokens = 0;
  const size_t max_requests = static_cast<size_t>(std::max(1, options_.max_batch_requests));
  while (!turn_.empty() && batch.size() < max_requests) {
    std::string user = std::move(turn_.front());
    auto it = per_user_.find(user);
    const Queued& next = it->second.front();
    if (!batch.empty() && tokens + next.job.tokens > options_.max_batch_tokens) {
      turn_.front() = std::move(user);  // still this user's turn, in the next batch
      break;
    }
    turn_.pop_front();
    tokens += next.job.tokens;
    batch.push_back(std::move(it->second.front()));
    it->second.pop_front();
    if (it->second.empty()) {
      per_user_.erase(it);
    } else {
      turn_.push_back(std::move(user));  // back of the line: the next user goes first
    }
    --depth_;
  }
  if (!batch.empty()) NotifyDepth();
  return batch;
}

void Scheduler::Loop() {
  if (options_.on_thread_start) options_.on_thread_start();
  while (true) {
    const bool busy = executor_->Busy();  // only this thread changes it
    std::vector<Queued> batch;
    bool stopping;
    {
      absl::MutexLock lock(&mu_);
      if (!busy) {
        mu_.Await(absl::Condition(
            +[](Scheduler* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu_) { return s->stop_ || !s->turn_.empty(); },
            this));
        if (!stop_ && options_.batch_wait > absl::ZeroDuration() && depth_ < options_.max_batch_requests) {
          // Give concurrent requests a moment to share this forward.
          mu_.AwaitWithTimeout(
              absl::Condition(
                  +[](Scheduler* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu_) {
                    return s->stop_ || s->depth_ >= s->options_.max_batch_requests;
                  },
                  this),
              options_.batch_wait);
        }
      }
      batch = TakeBatch();
      stopping = stop_;
      if (batch.empty() && !busy) return;  // stop_ and nothing queued or running
    }
    std::vector<Job> jobs;
    const absl::Time now = absl::Now();
    for (Queued& q : batch) {
      absl::Status why;
      if (stopping) {
        why = absl::UnavailableError("server shut down before this request ran");  // grace over
      } else if (q.job.cancelled()) {
        why = absl::CancelledError("client cancelled while the request was queued");
      } else if (now > q.job.deadline) {
        why = absl::DeadlineExceededError(absl::StrCat(
            "deadline passed after ", absl::FormatDuration(now - q.enqueued), " in the queue"));
      }
      if (!why.ok()) {
        executor_->Reject(q.job, std::move(why));
        continue;
      }
      if (options_.on_start) options_.on_start(q.job, now - q.enqueued);
      jobs.push_back(std::move(q.job));
      Running running;
      running.info = {jobs.back().id, jobs.back().user, jobs.back().kind, jobs.back().tokens, true,
                      q.enqueued, now};
      running.cancel_requested = jobs.back().cancel_requested;
      absl::MutexLock lock(&mu_);
      running_.emplace(running.info.id, std::move(running));
    }
    if (!jobs.empty()) {
      absl::MutexLock lock(&mu_);
      NotifyRunning();
    }
    executor_->Execute(std::move(jobs));
  }
}

void Scheduler::Finished(uint64_t id) {
  absl::MutexLock lock(&mu_);
  if (running_.erase(id) > 0) NotifyRunning();
}

std::vector<Scheduler::JobInfo> Scheduler::ListJobs() const {
  absl::MutexLock lock(&mu_);
  std::vector<JobInfo> jobs;
  for (const auto& [id, r] : running_) jobs.push_back(r.info);
  // Queued jobs in the order the round robin would take them.
  std::map<std::string, size_t> taken;
  bool more = true;
  for (size_t round = 0; more; ++round) {
    more = false;
    for (const std::string& user : turn_) {
      const std::deque<Queued>& queue = per_user_.at(user);
      if (round < queue.size()) {
        const Queued& q = queue[round];
        jobs.push_back(JobInfo{q.job.id, q.job.user, q.job.kind, q.job.tokens, false, q.enqueued, absl::Time()});
        more = more || round + 1 < queue.size();
      }
    }
  }
  return jobs;
}

absl::Status Scheduler::Cancel(uint64_t id, const std::string& by) {
  std::optional<Queued> removed;
  {
    absl::MutexLock lock(&mu_);
    if (auto it = running_.find(id); it != running_.end()) {
      it->second.cancel_requested->store(true);
      return absl::OkStatus();
    }
    for (auto it = per_user_.begin(); it != per_user_.end(); ++it) {
      std::deque<Queued>& queue = it->second;
      auto q = std::find_if(queue.begin(), queue.end(), [id](const Queued& x) { return x.job.id == id; });
      if (q == queue.end()) continue;
      removed = std::move(*q);
      queue.erase(q);
      --depth_;
      if (queue.empty()) {
        turn_.erase(std::remove(turn_.begin(), turn_.end(), it->first), turn_.end());
        per_user_.erase(it);
      }
      NotifyDepth();
      break;
    }
  }
  if (!removed) {
    return absl::NotFoundError(absl::StrCat("no running or queued job has id ", id,
                                            "; ListJobs shows the current ones"));
  }
  executor_->Reject(removed->job, absl::CancelledError(absl::StrCat("cancelled by admin ", by)));
  return absl::OkStatus();
}

void Scheduler::Shutdown(absl::Duration grace) {
  {
    absl::MutexLock lock(&mu_);
    if (!thread_.joinable()) return;
    accepting_ = false;
    const absl::Time until = absl::Now() + grace;
    auto drained = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return turn_.empty(); };
    mu_.AwaitWithDeadline(absl::Condition(&drained), until);
    stop_ = true;
  }
  thread_.join();
}

int64_t Scheduler::depth() const {
  absl::MutexLock lock(&mu_);
  return depth_;
}

}  // namespace remotelens
