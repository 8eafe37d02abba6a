#include "server/forward_threads.h"

#include <ATen/Parallel.h>
#include <sched.h>

#include <filesystem>
#include <fstream>

#include "gtest/gtest.h"

namespace remotelens {
namespace {

TEST(ForwardThreadPolicyTest, ForwardsWithEnoughWorkTakeTheLargeCount) {
  ForwardThreadPolicy policy{1, 4, /*flops_per_token=*/1e8, /*min_large_flops=*/1e9};
  EXPECT_EQ(policy.ThreadsFor(1), 1);
  EXPECT_EQ(policy.ThreadsFor(9), 1);
  EXPECT_EQ(policy.ThreadsFor(10), 4);
  EXPECT_EQ(policy.ThreadsFor(16 * 16), 4);
}

TEST(ForwardThreadPolicyTest, NoLargeCountKeepsOneCountThroughout) {
  ForwardThreadPolicy policy{3, 0, 1e8, 1e9};
  EXPECT_EQ(policy.ThreadsFor(1), 3);
  EXPECT_EQ(policy.ThreadsFor(1 << 20), 3);
}

TEST(ForwardThreadsTest, MatmulFlopsCountEveryProductOnce) {
  LlamaConfig c;
  c.d_model = 8;
  c.d_mlp = 16;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.d_head = 2;
  c.d_vocab = 10;
  // Per block: q 8x8, k and v 8x4 each, o 8x8, gate/up/down 3 x 8x16 = 64+64+64+384 = 576.
  EXPECT_DOUBLE_EQ(MatmulFlopsPerToken(c), 2.0 * (2 * 576 + 8 * 10));
}

void WriteTopology(const std::filesystem::path& root, int cpu, int package, int core) {
  const std::filesystem::path dir = root / ("cpu" + std::to_string(cpu)) / "topology";
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "physical_package_id") << package << "\n";
  std::ofstream(dir / "core_id") << core << "\n";
}

TEST(ForwardThreadsTest, PhysicalCoresCountSmtSiblingsOnce) {
  cpu_set_t set;
  CPU_ZERO(&set);
  ASSERT_EQ(sched_getaffinity(0, sizeof(set), &set), 0);
  const int logical = CPU_COUNT(&set);
  const std::filesystem::path root =
      std::filesystem::path(testing::TempDir()) / "forward_threads_sysfs";
  std::filesystem::remove_all(root);
  // Every allowed CPU i on core i / 2: pairs of siblings.
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &set)) WriteTopology(root, cpu, 0, cpu / 2);
  }
  int expected_pairs = 0;
  for (int core = 0; core < CPU_SETSIZE / 2; ++core) {
    if (CPU_ISSET(2 * core, &set) || CPU_ISSET(2 * core + 1, &set)) ++expected_pairs;
  }
  EXPECT_EQ(PhysicalCores(root.string()), expected_pairs);
  // Distinct cores: every CPU counts.
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &set)) WriteTopology(root, cpu, 0, cpu);
  }
  EXPECT_EQ(PhysicalCores(root.string()), logical);
  // No topology: the logical count.
  EXPECT_EQ(PhysicalCores((root / "missing").string()), logical);
  EXPECT_GE(PhysicalCores(), 1);
  EXPECT_LE(PhysicalCores(), logical);
}

TEST(ForwardThreadsTest, UseSwitchesTheCallingThreadsCount) {
  const int before = at::get_num_threads();
  ForwardThreadPolicy policy{1, 2, 1.0, 64.0};
  EXPECT_EQ(UseForwardThreads(policy, 64), 2);
  EXPECT_EQ(at::get_num_threads(), 2);
  EXPECT_EQ(UseForwardThreads(policy, 16), 1);
  EXPECT_EQ(at::get_num_threads(), 1);
  at::set_num_threads(before);
}

}  // namespace
}  // namespace remotelens
