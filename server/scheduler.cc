#include "server/scheduler.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace remotelens {

Scheduler::Scheduler(Options options) : options_(std::move(options)) {
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
      auto& queue = per_user_[job.user];
      if (queue.empty()) turn_.push_back(job.user);
      queue.push_back({std::move(job), now});
      ++depth_;
      NotifyDepth();
    }
  }
  // Outside the lock: a reject callback finishes a gRPC call.
  for (Queued& q : expired) {
    if (q.job.reject) {
      q.job.reject(absl::DeadlineExceededError(absl::StrCat(
          "deadline passed after ", absl::FormatDuration(now - q.enqueued), " in the queue")));
    }
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

bool Scheduler::TakeNext(Job* job, absl::Time* enqueued) {
  if (turn_.empty()) return false;
  std::string user = std::move(turn_.front());
  turn_.pop_front();
  auto it = per_user_.find(user);
  *job = std::move(it->second.front().job);
  *enqueued = it->second.front().enqueued;
  it->second.pop_front();
  if (it->second.empty()) {
    per_user_.erase(it);
  } else {
    turn_.push_back(std::move(user));  // back of the line: the next user goes first
  }
  --depth_;
  NotifyDepth();
  return true;
}

void Scheduler::Loop() {
  if (options_.on_thread_start) options_.on_thread_start();
  while (true) {
    Job job;
    absl::Time enqueued;
    bool stopping;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](Scheduler* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu_) { return s->stop_ || !s->turn_.empty(); },
          this));
      if (!TakeNext(&job, &enqueued)) return;  // stop_ and nothing queued
      stopping = stop_;
    }
    if (stopping) {
      // Grace period over: drop what is left.
      if (job.reject) job.reject(absl::UnavailableError("server shut down before this request ran"));
      continue;
    }
    if (job.is_cancelled && job.is_cancelled()) {
      if (job.reject) job.reject(absl::CancelledError("client cancelled while the request was queued"));
      continue;
    }
    const absl::Time now = absl::Now();
    if (now > job.deadline) {
      if (job.reject) {
        job.reject(absl::DeadlineExceededError(absl::StrCat(
            "deadline passed after ", absl::FormatDuration(now - enqueued), " in the queue")));
      }
      continue;
    }
    if (options_.on_start) options_.on_start(now - enqueued);
    job.run();
  }
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
