#include "server/outbox.h"

#include <optional>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace remotelens {
namespace {

using ::testing::ElementsAre;

// A fake reactor: records what the outbox asked of it, in order.
struct FakeReactor {
  std::vector<std::string> events;
  int writes_in_flight = 0;

  void Attach(Outbox<std::string>& outbox) {
    outbox.Attach(
        [this](const std::string* m, grpc::WriteOptions o, std::optional<grpc::Status> last) {
          std::string event = "write " + *m;
          if (o.get_buffer_hint()) event += " +hint";
          if (last.has_value()) event += " +finish(" + std::to_string(last->error_code()) + ")";
          events.push_back(event);
          if (!last.has_value()) ++writes_in_flight;  // write-and-finish has no OnWriteDone
        },
        [this](grpc::Status s) { events.push_back("finish(" + std::to_string(s.error_code()) + ")"); });
  }
  // Completes the write in flight, as gRPC's OnWriteDone would.
  void Complete(Outbox<std::string>& outbox, bool ok = true) {
    ASSERT_GT(writes_in_flight, 0) << "no write in flight";
    --writes_in_flight;
    outbox.OnWriteDone(ok);
  }
};

class OutboxTest : public ::testing::Test {
 protected:
  void SetUp() override { r.Attach(outbox); }
  void Complete(bool ok = true) { r.Complete(outbox, ok); }

  Outbox<std::string> outbox;
  FakeReactor r;
};

TEST_F(OutboxTest, IdlePushLastIsOneWriteThatFinishes) {
  EXPECT_TRUE(outbox.PushLast("summary", grpc::Status::OK));
  EXPECT_THAT(r.events, ElementsAre("write summary +finish(0)"));
  EXPECT_EQ(r.writes_in_flight, 0);
  EXPECT_FALSE(outbox.Push("late"));
}

TEST_F(OutboxTest, LastQueuedMessageCarriesTheStatus) {
  // How a small Run streams: logits start writing at once, the summary queues behind them.
  EXPECT_TRUE(outbox.Push("logits"));
  EXPECT_TRUE(outbox.PushLast("summary", grpc::Status::OK));
  EXPECT_THAT(r.events, ElementsAre("write logits"));
  Complete();
  EXPECT_THAT(r.events, ElementsAre("write logits", "write summary +finish(0)"));
  EXPECT_EQ(r.writes_in_flight, 0);
}

TEST_F(OutboxTest, QueuedMessagesAreHintedExceptTheLast) {
  outbox.Push("a");
  outbox.Push("b");
  outbox.Push("c");
  outbox.Close(grpc::Status::OK);
  Complete();
  Complete();
  EXPECT_THAT(r.events, ElementsAre("write a", "write b +hint", "write c +finish(0)"));
}

TEST_F(OutboxTest, ErrorStatusIsItsOwnFinishAfterTheMessages) {
  outbox.Push("a");
  outbox.Push("b");
  outbox.Close(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "quota"));
  Complete();
  EXPECT_THAT(r.events, ElementsAre("write a", "write b"));
  Complete();
  EXPECT_THAT(r.events, ElementsAre("write a", "write b", "finish(8)"));
}

TEST_F(OutboxTest, CloseWithNothingQueuedFinishesAtOnce) {
  outbox.Close(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "bad"));
  outbox.Close(grpc::Status::OK);  // a second close is ignored
  EXPECT_THAT(r.events, ElementsAre("finish(3)"));
}

TEST_F(OutboxTest, CloseWhileWritingFinishesAfterTheWrite) {
  outbox.Push("a");
  outbox.Close(grpc::Status::OK);
  EXPECT_THAT(r.events, ElementsAre("write a"));
  Complete();
  EXPECT_THAT(r.events, ElementsAre("write a", "finish(0)"));
}

TEST_F(OutboxTest, BrokenStreamDropsTheQueueAndRefusesPushes) {
  outbox.Push("a");
  outbox.Push("b");
  Complete(/*ok=*/false);  // the client went away
  EXPECT_TRUE(outbox.cancelled());
  EXPECT_FALSE(outbox.Push("c"));
  outbox.Close(grpc::Status::OK);
  EXPECT_THAT(r.events, ElementsAre("write a", "finish(0)"));
}

TEST_F(OutboxTest, CancelStopsPushes) {
  outbox.OnCancel();
  EXPECT_FALSE(outbox.Push("a"));
  EXPECT_FALSE(outbox.PushLast("b", grpc::Status::OK));
  EXPECT_TRUE(r.events.empty());
}

TEST_F(OutboxTest, ProducerIsPulledOneMessagePerCompletedWrite) {
  int pulled = 0;
  outbox.SetProducer([&pulled]() -> std::optional<std::string> {
    if (pulled == 3) return std::nullopt;
    return "chunk" + std::to_string(pulled++);
  });
  outbox.Close(grpc::Status::OK);
  EXPECT_EQ(pulled, 1);  // only the chunk being written is in memory
  Complete();
  EXPECT_EQ(pulled, 2);
  Complete();
  Complete();
  EXPECT_THAT(r.events, ElementsAre("write chunk0", "write chunk1", "write chunk2", "finish(0)"));
}

TEST_F(OutboxTest, AClientThatStopsReadingEndsTheCallAtTheCap) {
  outbox.SetMaxQueuedBytes(10, "max_queued_bytes_per_call");
  EXPECT_TRUE(outbox.Push("first"));     // written at once, not counted
  EXPECT_TRUE(outbox.Push("12345"));     // 5 queued
  EXPECT_TRUE(outbox.Push("67890"));     // 10 queued: at the cap, still fine
  EXPECT_FALSE(outbox.Push("x"));        // 11: the call ends
  EXPECT_TRUE(outbox.cancelled());       // so the job stops producing
  EXPECT_FALSE(outbox.Push("later"));
  EXPECT_THAT(r.events, ElementsAre("write first"));
  Complete();                            // the write in flight completes; queued ones are dropped
  EXPECT_THAT(r.events, ElementsAre("write first", "finish(8)"));  // RESOURCE_EXHAUSTED
  outbox.Close(grpc::Status::OK);        // the job's own close changes nothing
  EXPECT_EQ(r.events.size(), 2u);
}

TEST_F(OutboxTest, WrittenMessagesGiveTheirBytesBack) {
  outbox.SetMaxQueuedBytes(10, "cap");
  for (int i = 0; i < 100; ++i) {
    ASSERT_TRUE(outbox.Push("0123456789")) << i;  // one in flight, one queued at most
    if (i > 0) Complete();
  }
  EXPECT_FALSE(outbox.cancelled());
}

}  // namespace
}  // namespace remotelens
