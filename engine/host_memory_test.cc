#include "engine/host_memory.h"

#include <sys/resource.h>

#include <cstring>
#include <vector>

#include "gtest/gtest.h"

namespace remotelens {
namespace {

TEST(HostMemory, ParsesKilobyteFields) {
  const char* text = "MemTotal:       24576000 kB\nMemAvailable:   1000 kB\nHugePages_Total:    3\n";
  EXPECT_EQ(ProcKilobyteField(text, "MemTotal"), 24576000LL * 1024);
  EXPECT_EQ(ProcKilobyteField(text, "MemAvailable"), 1000 * 1024);
  EXPECT_EQ(ProcKilobyteField(text, "HugePages_Total"), 3);  // no unit: a plain count
  EXPECT_EQ(ProcKilobyteField(text, "MemFree"), -1);
  EXPECT_EQ(ProcKilobyteField(text, "Mem"), -1);  // a prefix of a key is not the key
}

TEST(HostMemory, AvailableIsPositiveAndBelowTotal) {
  auto available = AvailableHostMemory();
  ASSERT_TRUE(available.ok()) << available.status();
  EXPECT_GT(available->bytes, 0);
  EXPECT_FALSE(available->limited_by.empty());
}

TEST(HostMemory, RlimitDataBindsWhenSmallest) {
  FILE* f = fopen("/proc/self/status", "r");
  ASSERT_NE(f, nullptr);
  std::vector<char> buf(1 << 16);
  const size_t n = fread(buf.data(), 1, buf.size() - 1, f);
  fclose(f);
  const int64_t vm_data = ProcKilobyteField(std::string(buf.data(), n), "VmData");
  ASSERT_GT(vm_data, 0);

  // Allow 64 MiB more data segment than the process holds now: that limit must bind.
  struct rlimit saved;
  ASSERT_EQ(getrlimit(RLIMIT_DATA, &saved), 0);
  struct rlimit tight = saved;
  tight.rlim_cur = static_cast<rlim_t>(vm_data + (int64_t{64} << 20));
  if (saved.rlim_max != RLIM_INFINITY && tight.rlim_cur > saved.rlim_max) GTEST_SKIP();
  ASSERT_EQ(setrlimit(RLIMIT_DATA, &tight), 0);
  auto available = AvailableHostMemory();
  ASSERT_EQ(setrlimit(RLIMIT_DATA, &saved), 0);
  ASSERT_TRUE(available.ok());
  EXPECT_EQ(available->limited_by, "RLIMIT_DATA");
  EXPECT_LE(available->bytes, int64_t{64} << 20);
  EXPECT_GT(available->bytes, int64_t{48} << 20);
}

TEST(HostMemory, ProcessMemoryTracksAnonymousPages) {
  const ProcessMemory before = ReadProcessMemory();
  std::vector<char> block(size_t{64} << 20);
  std::memset(block.data(), 1, block.size());  // touch every page
  const ProcessMemory after = ReadProcessMemory();
  EXPECT_GE(after.anon_bytes - before.anon_bytes, int64_t{60} << 20);
  EXPECT_GE(after.rss_bytes, after.anon_bytes);
  EXPECT_GE(after.peak_rss_bytes, after.rss_bytes);
  EXPECT_EQ(block[12345], 1);
}

TEST(HostMemory, HumanBytes) {
  EXPECT_EQ(HumanBytes(16060522496), "16.1 GB");
  EXPECT_EQ(HumanBytes(2500000), "2.5 MB");
  EXPECT_EQ(HumanBytes(999), "999 bytes");
}

}  // namespace
}  // namespace remotelens
