#include "server/scheduler.h"

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace remotelens {
namespace {

// Jobs that record their order; the first one blocks until every job is queued, so the queue's
// order, not submission timing, decides what runs next.
class SchedulerTest : public ::testing::Test {
 protected:
  Scheduler::Job Recording(const std::string& user, const std::string& tag) {
    Scheduler::Job job;
    job.user = user;
    job.run = [this, tag] {
      absl::MutexLock lock(&mu_);
      order_.push_back(tag);
    };
    job.reject = [this, tag](absl::Status status) {
      absl::MutexLock lock(&mu_);
      rejected_.push_back(tag + ":" + std::string(absl::StatusCodeToString(status.code())));
    };
    return job;
  }
  Scheduler::Job Blocker(absl::Notification* release, absl::Notification* started) {
    Scheduler::Job job;
    job.user = "blocker";
    job.run = [release, started] {
      started->Notify();
      release->WaitForNotification();
    };
    return job;
  }

  absl::Mutex mu_;
  std::vector<std::string> order_;
  std::vector<std::string> rejected_;
};

TEST_F(SchedulerTest, RoundRobinBetweenUsersNotFifoBetweenRequests) {
  Scheduler scheduler({});
  absl::Notification release, started;
  ASSERT_TRUE(scheduler.Submit(Blocker(&release, &started)).ok());
  started.WaitForNotification();
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(scheduler.Submit(Recording("alice", "a" + std::to_string(i))).ok());
  for (int i = 0; i < 2; ++i) ASSERT_TRUE(scheduler.Submit(Recording("bob", "b" + std::to_string(i))).ok());
  EXPECT_EQ(scheduler.depth(), 6);
  release.Notify();
  scheduler.Shutdown(absl::Seconds(10));
  absl::MutexLock lock(&mu_);
  EXPECT_EQ(order_, (std::vector<std::string>{"a0", "b0", "a1", "b1", "a2", "a3"}));
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
  Scheduler scheduler(options);
  for (int i = 0; i < 2; ++i) {
    Scheduler::Job job;
    job.user = "alice";
    job.run = [&, i] {
      job_thread = std::this_thread::get_id();
      events.push_back("job");
      if (i == 1) done.Notify();
    };
    ASSERT_TRUE(scheduler.Submit(std::move(job)).ok());
  }
  done.WaitForNotification();
  scheduler.Shutdown(absl::Seconds(1));
  EXPECT_EQ(events, (std::vector<std::string>{"setup", "job", "job"}));
  EXPECT_EQ(setup_thread, job_thread);
  EXPECT_NE(setup_thread, std::this_thread::get_id());
}

TEST_F(SchedulerTest, FullQueueIsResourceExhausted) {
  Scheduler::Options options;
  options.max_queue = 2;
  std::vector<int64_t> depths;
  options.on_depth = [&](int64_t d) { depths.push_back(d); };
  Scheduler scheduler(options);
  absl::Notification release, started;
  ASSERT_TRUE(scheduler.Submit(Blocker(&release, &started)).ok());
  started.WaitForNotification();
  ASSERT_TRUE(scheduler.Submit(Recording("u", "1")).ok());
  ASSERT_TRUE(scheduler.Submit(Recording("u", "2")).ok());
  absl::Status full = scheduler.Submit(Recording("u", "3"));
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(full.message().find("queue is full"), std::string::npos) << full;
  release.Notify();
  scheduler.Shutdown(absl::Seconds(10));
  EXPECT_EQ(scheduler.depth(), 0);
}

// A full queue first gives up jobs whose deadline has passed (their callers are gone), so new
// work is not turned away for them; they are rejected with DEADLINE_EXCEEDED at once.
TEST_F(SchedulerTest, FullQueueMakesRoomByRejectingExpiredJobs) {
  Scheduler::Options options;
  options.max_queue = 2;
  Scheduler scheduler(options);
  absl::Notification release, started;
  ASSERT_TRUE(scheduler.Submit(Blocker(&release, &started)).ok());
  started.WaitForNotification();
  Scheduler::Job expiring = Recording("u", "expiring");
  expiring.deadline = absl::Now() + absl::Milliseconds(50);
  ASSERT_TRUE(scheduler.Submit(std::move(expiring)).ok());
  ASSERT_TRUE(scheduler.Submit(Recording("v", "waiting")).ok());
  EXPECT_EQ(scheduler.Submit(Recording("w", "early")).code(), absl::StatusCode::kResourceExhausted);
  absl::SleepFor(absl::Milliseconds(100));
  ASSERT_TRUE(scheduler.Submit(Recording("w", "late")).ok());
  EXPECT_EQ(scheduler.depth(), 2);
  {
    absl::MutexLock lock(&mu_);
    EXPECT_EQ(rejected_, std::vector<std::string>{"expiring:DEADLINE_EXCEEDED"});
  }
  release.Notify();
  scheduler.Shutdown(absl::Seconds(10));
  absl::MutexLock lock(&mu_);
  EXPECT_EQ(order_, (std::vector<std::string>{"waiting", "late"}));
}

TEST_F(SchedulerTest, DropsExpiredAndCancelledJobsBeforeRunning) {
  Scheduler scheduler({});
  absl::Notification release, started;
  ASSERT_TRUE(scheduler.Submit(Blocker(&release, &started)).ok());
  started.WaitForNotification();
  Scheduler::Job expired = Recording("u", "expired");
  expired.deadline = absl::Now() - absl::Seconds(1);
  Scheduler::Job cancelled = Recording("v", "cancelled");
  cancelled.is_cancelled = [] { return true; };
  ASSERT_TRUE(scheduler.Submit(std::move(expired)).ok());
  ASSERT_TRUE(scheduler.Submit(std::move(cancelled)).ok());
  ASSERT_TRUE(scheduler.Submit(Recording("w", "ok")).ok());
  release.Notify();
  scheduler.Shutdown(absl::Seconds(10));
  absl::MutexLock lock(&mu_);
  EXPECT_EQ(order_, std::vector<std::string>{"ok"});
  EXPECT_EQ(rejected_, (std::vector<std::string>{"expired:DEADLINE_EXCEEDED", "cancelled:CANCELLED"}));
}

TEST_F(SchedulerTest, ShutdownRejectsWhatGraceCannotFinish) {
  Scheduler scheduler({});
  absl::Notification release, started;
  ASSERT_TRUE(scheduler.Submit(Blocker(&release, &started)).ok());
  started.WaitForNotification();
  ASSERT_TRUE(scheduler.Submit(Recording("u", "late")).ok());
  std::thread releaser([&] {
    absl::SleepFor(absl::Milliseconds(200));
    release.Notify();
  });
  scheduler.Shutdown(absl::Milliseconds(50));  // the blocker outlives the grace period
  releaser.join();
  EXPECT_EQ(scheduler.Submit(Recording("u", "after")).code(), absl::StatusCode::kUnavailable);
  absl::MutexLock lock(&mu_);
  EXPECT_TRUE(order_.empty());
  EXPECT_EQ(rejected_, std::vector<std::string>{"late:UNAVAILABLE"});
}

TEST_F(SchedulerTest, ShutdownWithinGraceFinishesQueuedWork) {
  Scheduler scheduler({});
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(scheduler.Submit(Recording("u", std::to_string(i))).ok());
  scheduler.Shutdown(absl::Seconds(10));
  absl::MutexLock lock(&mu_);
  EXPECT_EQ(order_.size(), 5u);
  EXPECT_TRUE(rejected_.empty());
}

}  // namespace
}  // namespace remotelens
