#include "server/forward_threads.h"

#include <ATen/Parallel.h>

#include "gtest/gtest.h"

namespace remotelens {
namespace {

TEST(ForwardThreadPolicyTest, LargeForwardsTakeTheLargeCount) {
  ForwardThreadPolicy policy{1, 4, 128};
  EXPECT_EQ(policy.ThreadsFor(1), 1);
  EXPECT_EQ(policy.ThreadsFor(127), 1);
  EXPECT_EQ(policy.ThreadsFor(128), 4);
  EXPECT_EQ(policy.ThreadsFor(16 * 16), 4);
}

TEST(ForwardThreadPolicyTest, ZeroLargeCountKeepsOneCountThroughout) {
  ForwardThreadPolicy policy{3, 0, 128};
  EXPECT_EQ(policy.ThreadsFor(1), 3);
  EXPECT_EQ(policy.ThreadsFor(1 << 20), 3);
}

TEST(ForwardThreadsTest, AvailableCpusIsPositive) { EXPECT_GE(AvailableCpus(), 1); }

TEST(ForwardThreadsTest, UseSwitchesTheCallingThreadsCount) {
  const int before = at::get_num_threads();
  ForwardThreadPolicy policy{1, 2, 64};
  EXPECT_EQ(UseForwardThreads(policy, 64), 2);
  EXPECT_EQ(at::get_num_threads(), 2);
  EXPECT_EQ(UseForwardThreads(policy, 16), 1);
  EXPECT_EQ(at::get_num_threads(), 1);
  at::set_num_threads(before);
}

}  // namespace
}  // namespace remotelens
