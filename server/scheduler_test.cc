#include "server/scheduler.h"

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_join.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace remotelens {
namespace {

// A job's payload here: a tag to record, or a blocker that holds the scheduler thread.
struct TagPayload : JobPayload {
  std::string tag;
  absl::Notification* release = nullptr;
  absl::Notification* started = nullptr;
};

// Records what it runs: each job's tag, and each batch as "tag+tag+...". The first job (a
// blocker) holds the thread until every job is queued, so the queue's order, not submission
// timing, decides what runs next.
class RecordingExecutor : public Scheduler::Executor {
 public:
  void Execute(std::vector<Scheduler::Job> jobs) override {
    std::vector<std::string> tags;
    for (Scheduler::Job& job : jobs) {
      auto* p = static_cast<TagPayload*>(job.payload.get());
      if (p->started != nullptr) {
        p->started->Notify();
        p->release->WaitForNotification();
      } else {
        tags.push_back(p->tag);
        if (on_run) on_run(job);
      }
      scheduler->Finished(job.id);
    }
    if (busy_steps > 0) --busy_steps;
    absl::MutexLock lock(&mu);
    for (const std::string& t : tags) order.push_back(t);
    if (!tags.empty()) batches.push_back(absl::StrJoin(tags, "+"));
    if (jobs.empty()) ++empty_calls;
  }
  bool Busy() const override { return busy_steps > 0; }
  void Reject(Scheduler::Job& job, absl::Status status) override {
    absl::MutexLock lock(&mu);
    rejected.push_back(static_cast<TagPayload*>(job.payload.get())->tag + ":" +
                       std::string(absl::StatusCodeToString(status.code())));
  }

  Scheduler* scheduler = nullptr;
  std::function<void(const Scheduler::Job&)> on_run;
  std::atomic<int> busy_steps{0};
  absl::Mutex mu;
  std::vector<std::string> order, batches, rejected;
  int empty_calls = 0;
};

class SchedulerTest : public ::testing::Test {
 protected:
  // max_batch_requests 1 unless a test batches.
  std::unique_ptr<Scheduler> Make(Scheduler::Options options = Unbatched()) {
    auto scheduler = std::make_unique<Scheduler>(options, &executor_);
    executor_.scheduler = scheduler.get();
    return scheduler;
  }
  static Scheduler::Options Unbatched() {
    Scheduler::Options options;
    options.max_batch_requests = 1;
    return options;
  }
  Scheduler::Job Recording(const std::string& user, const std::string& tag, int64_t tokens = 1) {
    Scheduler::Job job;
    job.user = user;
    job.tokens = tokens;
    auto payload = std::make_shared<TagPayload>();
    payload->tag = tag;
    job.payload = payload;
    return job;
  }
  Scheduler::Job Blocker(absl::Notification* release, absl::Notification* started) {
    Scheduler::Job job = Recording("blocker", "blocker");
    auto* p = static_cast<TagPayload*>(job.payload.get());
    p->release = release;
    p->started = started;
    return job;
  }
  std::vector<std::string> order() {
    absl::MutexLock lock(&executor_.mu);
    return executor_.order;
  }
  std::vector<std::string> rejected() {
    absl::MutexLock lock(&executor_.mu);
    return executor_.rejected;
  }

  RecordingExecutor executor_;
};

TEST_F(SchedulerTest, RoundRobinBetweenUsersNotFifoBetweenRequests) {
  auto scheduler = Make();
  absl::Notification release, started;
  ASSERT_TRUE(scheduler->Submit(Blocker(&release, &started)).ok());
  started.WaitForNotification();
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(scheduler->Submit(Recording("alice", "a" + std::to_string(i))).ok());
  for (int i = 0; i < 2; ++i) ASSERT_TRUE(scheduler->Submit(Recording("bob", "b" + std::to_string(i))).ok());
  EXPECT_EQ(scheduler->depth(), 6);
  release.Notify();
  scheduler->Shutdown(absl::Seconds(10));
  EXPECT_EQ(order(), (std::vector<std::string>{"a0", "b0", "a1", "b1", "a2", "a3"}));
}

// A batch takes one job per user per round, then goes round again, within max_batch_requests.
TEST_F(SchedulerTest, BatchesGoRoundRobinWithinTheRequestLimit) {
  Scheduler::Options options;
  options.max_batch_requests = 3;
  auto scheduler = Make(options);
  absl::Notification release, started;
  ASSERT_TRUE(scheduler->Submit(Blocker(&release, &started)).ok());
  started.WaitForNotification();
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(scheduler->Submit(Recording("alice", "a" + std::to_string(i))).ok());
  for (int i = 0; i < 2; ++i) ASSERT_TRUE(scheduler->Submit(Recording("bob", "b" + std::to_string(i))).ok());
  release.Notify();
  scheduler->Shutdown(absl::Seconds(10));
  absl::MutexLock lock(&executor_.mu);
  EXPECT_EQ(executor_.batches, (std::vector<std::string>{"a0+b0+a1", "b1+a2+a3"}));
}

// One huge request does not take everyone's turn: it runs in a batch of its own, and the small
// ones share the batches around it.
TEST_F(SchedulerTest, TokenBudgetRunsAHugeJobAloneAndTheRestTogether) {
  Scheduler::Options options;
  options.max_batch_requests = 8;
  options.max_batch_tokens = 100;
  auto scheduler = Make(options);
  absl::Notification release, started;
  ASSERT_TRUE(scheduler->Submit(Blocker(&release, &started)).ok());
  started.WaitForNotification();
  ASSERT_TRUE(scheduler->Submit(Recording("alice", "a0", 40)).ok());
  ASSERT_TRUE(scheduler->Submit(Recording("huge", "h", 1000)).ok());
  ASSERT_TRUE(scheduler->Submit(Recording("bob", "b0", 40)).ok());
  ASSERT_TRUE(scheduler->Submit(Recording("alice", "a1", 40)).ok());
  release.Notify();
  scheduler->Shutdown(absl::Seconds(10));
  absl::MutexLock lock(&executor_.mu);
  EXPECT_EQ(executor_.batches, (std::vector<std::string>{"a0", "h", "b0+a1"}));
}

// While the executor has work of its own (generations mid-decode) it is called again without
// waiting for new jobs, and new jobs join it between its steps.
TEST_F(SchedulerTest, ABusyExecutorKeepsStepping) {
  auto scheduler = Make();
  executor_.busy_steps = 5;
  ASSERT_TRUE(scheduler->Submit(Recording("u", "x")).ok());
  scheduler->Shutdown(absl::Seconds(10));
  absl::MutexLock lock(&executor_.mu);
  EXPECT_EQ(executor_.order, std::vector<std::string>{"x"});
  EXPECT_GE(executor_.empty_calls, 3);
  EXPECT_EQ(executor_.busy_steps.load(), 0);
}

TEST_F(SchedulerTest, AdminListsAndCancelsQueuedAndRunningJobs) {
  auto scheduler = Make();
  absl::Notification release, started;
  ASSERT_TRUE(scheduler->Submit(Blocker(&release, &started)).ok());
  started.WaitForNotification();
  Scheduler::Job a = Recording("alice", "a", 16);
  a.kind = JobKind::kGenerate;
  ASSERT_TRUE(scheduler->Submit(std::move(a)).ok());
  ASSERT_TRUE(scheduler->Submit(Recording("bob", "b", 8)).ok());
  std::vector<Scheduler::JobInfo> jobs = scheduler->ListJobs();
  ASSERT_EQ(jobs.size(), 3u);
  EXPECT_TRUE(jobs[0].running);
  EXPECT_EQ(jobs[0].user, "blocker");
  EXPECT_FALSE(jobs[1].running);
  EXPECT_EQ(jobs[1].user, "alice");
  EXPECT_EQ(jobs[1].kind, JobKind::kGenerate);
  EXPECT_EQ(jobs[1].tokens, 16);
  EXPECT_EQ(jobs[2].user, "bob");
  // Queued: rejected at once. Running: asked to stop (the job sees cancelled()).
  EXPECT_TRUE(scheduler->Cancel(jobs[1].id, "root").ok());
  EXPECT_EQ(rejected(), std::vector<std::string>{"a:CANCELLED"});
  bool saw_cancel = false;
  executor_.on_run = [&](const Scheduler::Job& job) { saw_cancel = job.cancelled(); };
  EXPECT_EQ(scheduler->Cancel(12345, "root").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(scheduler->ListJobs().size(), 2u);
  release.Notify();
  scheduler->Shutdown(absl::Seconds(10));
  EXPECT_EQ(order(), std::vector<std::string>{"b"});
  EXPECT_FALSE(saw_cancel);
  EXPECT_TRUE(scheduler->ListJobs().empty());
}

TEST_F(SchedulerTest, ThreadStartRunsOnceOnTheSchedulerThreadBeforeAnyJob) {
  std::vector<std::string> events;
  std::thread::id setup_thread, job_thread;
  absl::Notification done;
  Scheduler::Options options;
  options.on_thread_start = [&] {
    setup_thread = std::this_thread::get_id();
    events.push_back("setup");
  };
  options.max_batch_requests = 1;
  int ran = 0;
  executor_.on_run = [&](const Scheduler::Job&) {
    job_thread = std::this_thread::get_id();
    events.push_back("job");
    if (++ran == 2) done.Notify();
  };
  auto scheduler = Make(options);
  for (int i = 0; i < 2; ++i) ASSERT_TRUE(scheduler->Submit(Recording("alice", "j")).ok());
  done.WaitForNotification();
  scheduler->Shutdown(absl::Seconds(1));
  EXPECT_EQ(events, (std::vector<std::string>{"setup", "job", "job"}));
  EXPECT_EQ(setup_thread, job_thread);
  EXPECT_NE(setup_thread, std::this_thread::get_id());
}

TEST_F(SchedulerTest, FullQueueIsResourceExhausted) {
  Scheduler::Options options = Unbatched();
  options.max_queue = 2;
  std::vector<int64_t> depths;
  options.on_depth = [&](int64_t d) { depths.push_back(d); };
  auto scheduler = Make(options);
  absl::Notification release, started;
  ASSERT_TRUE(scheduler->Submit(Blocker(&release, &started)).ok());
  started.WaitForNotification();
  ASSERT_TRUE(scheduler->Submit(Recording("u", "1")).ok());
  ASSERT_TRUE(scheduler->Submit(Recording("u", "2")).ok());
  absl::Status full = scheduler->Submit(Recording("u", "3"));
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(full.message().find("queue is full"), std::string::npos) << full;
  release.Notify();
  scheduler->Shutdown(absl::Seconds(10));
  EXPECT_EQ(scheduler->depth(), 0);
}

// A full queue first gives up jobs whose deadline has passed (their callers are gone), so new
// work is not turned away for them; they are rejected with DEADLINE_EXCEEDED at once.
TEST_F(SchedulerTest, FullQueueMakesRoomByRejectingExpiredJobs) {
  Scheduler::Options options = Unbatched();
  options.max_queue = 2;
  auto scheduler = Make(options);
  absl::Notification release, started;
  ASSERT_TRUE(scheduler->Submit(Blocker(&release, &started)).ok());
  started.WaitForNotification();
  Scheduler::Job expiring = Recording("u", "expiring");
  expiring.deadline = absl::Now() + absl::Milliseconds(50);
  ASSERT_TRUE(scheduler->Submit(std::move(expiring)).ok());
  ASSERT_TRUE(scheduler->Submit(Recording("v", "waiting")).ok());
  EXPECT_EQ(scheduler->Submit(Recording("w", "early")).code(), absl::StatusCode::kResourceExhausted);
  absl::SleepFor(absl::Milliseconds(100));
  ASSERT_TRUE(scheduler->Submit(Recording("w", "late")).ok());
  EXPECT_EQ(scheduler->depth(), 2);
  EXPECT_EQ(rejected(), std::vector<std::string>{"expiring:DEADLINE_EXCEEDED"});
  release.Notify();
  scheduler->Shutdown(absl::Seconds(10));
  EXPECT_EQ(order(), (std::vector<std::string>{"waiting", "late"}));
}

TEST_F(SchedulerTest, DropsExpiredAndCancelledJobsBeforeRunning) {
  auto scheduler = Make();
  absl::Notification release, started;
  ASSERT_TRUE(scheduler->Submit(Blocker(&release, &started)).ok());
  started.WaitForNotification();
  Scheduler::Job expired = Recording("u", "expired");
  expired.deadline = absl::Now() - absl::Seconds(1);
  Scheduler::Job cancelled = Recording("v", "cancelled");
  cancelled.client_gone = [] { return true; };
  ASSERT_TRUE(scheduler->Submit(std::move(expired)).ok());
  ASSERT_TRUE(scheduler->Submit(std::move(cancelled)).ok());
  ASSERT_TRUE(scheduler->Submit(Recording("w", "ok")).ok());
  release.Notify();
  scheduler->Shutdown(absl::Seconds(10));
  EXPECT_EQ(order(), std::vector<std::string>{"ok"});
  EXPECT_EQ(rejected(), (std::vector<std::string>{"expired:DEADLINE_EXCEEDED", "cancelled:CANCELLED"}));
}

TEST_F(SchedulerTest, ShutdownRejectsWhatGraceCannotFinish) {
  auto scheduler = Make();
  absl::Notification release, started;
  ASSERT_TRUE(scheduler->Submit(Blocker(&release, &started)).ok());
  started.WaitForNotification();
  ASSERT_TRUE(scheduler->Submit(Recording("u", "late")).ok());
  std::thread releaser([&] {
    absl::SleepFor(absl::Milliseconds(200));
    release.Notify();
  });
  scheduler->Shutdown(absl::Milliseconds(50));  // the blocker outlives the grace period
  releaser.join();
  EXPECT_EQ(scheduler->Submit(Recording("u", "after")).code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(order().empty());
  EXPECT_EQ(rejected(), std::vector<std::string>{"late:UNAVAILABLE"});
}

TEST_F(SchedulerTest, ShutdownWithinGraceFinishesQueuedWork) {
  auto scheduler = Make();
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(scheduler->Submit(Recording("u", std::to_string(i))).ok());
  scheduler->Shutdown(absl::Seconds(10));
  EXPECT_EQ(order().size(), 5u);
  EXPECT_TRUE(rejected().empty());
}

}  // namespace
}  // namespace remotelens
